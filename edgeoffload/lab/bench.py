"""Benchmarks behind ``edgeoffload bench`` and ``benchmarks/`` (they measure; tests check).

``cost_accuracy``: how well the profile + calibration predict the wall time of real head and
tail sessions, over every single-tensor cut of a model. Predicted and measured times use the
same thread count; the result has Spearman's rank correlation and the median relative error.
"""

from __future__ import annotations

import functools
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edgeoffload._ort import make_session, run
from edgeoffload.core.costmodel import ComputeModel

Progress = Callable[[str, float], None]


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(values: list[float]) -> np.ndarray:
        order = np.argsort(values, kind="stable")
        ranked = np.empty(len(values), dtype=np.float64)
        sorted_values = np.asarray(values)[order]
        i = 0
        while i < len(values):
            j = i
            while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
                j += 1
            ranked[order[i : j + 1]] = (i + j) / 2.0
            i = j + 1
        return ranked

    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def _interleaved_ms(fns: list[Callable[[], object]], *, runs: int) -> list[float]:
    """Median ms of each function, timed round-robin so load drift hits all alike."""
    for fn in fns:
        fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            samples[i].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(s) for s in samples]


def environment() -> dict[str, Any]:
    import onnxruntime

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def cost_accuracy(
    model: Any,
    *,
    threads: int = 1,
    runs: int = 15,
    dims: dict[str, int] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Predicted vs measured head/tail time at every single-tensor cut of ``model``."""
    from edgeoffload.split.splitter import Analysis

    started = time.perf_counter()
    analysis = Analysis.of(model, dims=dims)
    profile = analysis.profile(threads=threads, runs=runs)
    profile_s = time.perf_counter() - started
    compute = ComputeModel(profile, analysis.node_order)
    n = len(analysis.node_order)
    cuts = [c for c in analysis.cuts if 0 < c.index < n and len(c.tensors) == 1]
    rows: list[dict[str, Any]] = []
    for i, cut in enumerate(cuts):
        if progress:
            progress(f"timing {cut.id}", i / max(1, len(cuts)))
        head_model, tail_model = analysis.graph.split(cut)
        head = make_session(head_model, threads=threads)
        tail = make_session(tail_model, threads=threads)
        head_feed = {x.name: analysis.inputs[x.name] for x in head.get_inputs()}
        crossing = run(head, head_feed)
        crossing.update({k: analysis.inputs[k] for k in analysis.inputs})
        tail_feed = {x.name: crossing[x.name] for x in tail.get_inputs()}
        head_ms, tail_ms = _interleaved_ms(
            [
                functools.partial(run, head, head_feed),
                functools.partial(run, tail, tail_feed),
            ],
            runs=runs,
        )
        rows.append(
            {
                "cut": cut.id,
                "after": cut.after,
                "predicted_head_ms": compute.head_ms(cut.index),
                "measured_head_ms": head_ms,
                "predicted_tail_ms": compute.tail_ms(cut.index),
                "measured_tail_ms": tail_ms,
            }
        )

    def summary(kind: str) -> dict[str, float]:
        predicted = [r[f"predicted_{kind}_ms"] for r in rows]
        measured = [r[f"measured_{kind}_ms"] for r in rows]
        rel = [abs(p - m) / m for p, m in zip(predicted, measured, strict=True) if m > 0]
        return {
            "spearman": round(spearman(predicted, measured), 4),
            "median_relative_error": round(statistics.median(rel), 4) if rel else float("nan"),
            "max_relative_error": round(max(rel), 4) if rel else float("nan"),
        }

    return {
        "benchmark": "cost-accuracy",
        "model": analysis.source_name,
        "nodes": n,
        "threads": threads,
        "runs": runs,
        "single_tensor_cuts": len(rows),
        "profile_seconds": round(profile_s, 2),
        "head": summary("head"),
        "tail": summary("tail"),
        "environment": environment(),
        "rows": rows,
    }


def _size_model(n_floats: int) -> Any:
    """x[n] -> Relu (head) | Neg -> ReduceSum (tail): the cut carries exactly n floats."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="head/relu"),
        helper.make_node("Neg", ["h"], ["t"], name="tail/neg"),
        helper.make_node("ReduceSum", ["t"], ["y"], name="tail/sum", keepdims=1),
    ]
    graph = helper.make_graph(
        nodes,
        "overhead",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n_floats])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 8)
    onnx.checker.check_model(model)
    return model


def offload_overhead(
    sizes: tuple[int, ...] = (4 << 10, 256 << 10, 4 << 20),
    *,
    requests: int = 60,
    codec: str = "none",
    protocol: str | None = None,
) -> dict[str, Any]:
    """Per-request framework overhead on loopback: end to end minus head and tail compute.

    The edge server runs in its own process (``edgeoffload serve``), as in deployment, and
    the device client in this one. Head and tail compute are measured by timing their
    onnxruntime sessions directly, in the same run, on the same inputs; everything else
    (encode, encrypt, websocket, server scheduling, decrypt, decode, result) is overhead.
    """
    import asyncio
    import tempfile
    from pathlib import Path

    from edgeoffload.core.noise import DEFAULT_PROTOCOL
    from edgeoffload.keys import encode_public, generate_identity
    from edgeoffload.lab.demo import run_client, spawn_server
    from edgeoffload.split.splitter import Analysis, split_model

    rows = []
    for size in sizes:
        n = size // 4
        analysis = Analysis.of(_size_model(n))
        cut = analysis.graph.find_cut("head/relu")
        rng = np.random.default_rng(0)
        inputs = [{"x": rng.standard_normal(n).astype(np.float32)} for _ in range(requests)]
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            bundle = split_model(analysis, cut, root / "b", codec=codec)
            head = make_session(bundle.head_path)
            tail = make_session(bundle.tail_path)
            crossing = run(head, inputs[0])
            head_ms, tail_ms = _interleaved_ms(
                [functools.partial(run, head, inputs[0]), functools.partial(run, tail, crossing)],
                runs=requests,
            )
            server_id = generate_identity(root / "server")
            device_id = generate_identity(root / "device")
            (root / "allow").write_text(encode_public(device_id.public) + "\n")
            proc, port = spawn_server([bundle.path], key_dir=root / "server", allow=root / "allow")
            try:
                timings = asyncio.run(
                    run_client(
                        bundle,
                        inputs,
                        port=port,
                        server_public=server_id.public,
                        device=device_id,
                        protocol=protocol or DEFAULT_PROTOCOL,
                    )
                )
            finally:
                proc.terminate()
                proc.wait(30)

        floor_ms = _raw_websocket_round_trip_ms(size, requests)

        def med(component: str, ts: list[Any] = timings) -> float:
            return round(float(statistics.median(float(getattr(t, component)) for t in ts)), 4)

        totals = [t.total_ms for t in timings]
        rows.append(
            {
                "crossing_bytes": size,
                "requests": len(totals),
                "median_total_ms": med("total_ms"),
                "p90_total_ms": round(float(np.percentile(totals, 90)), 4),
                "head_ms": round(head_ms, 4),
                "tail_ms": round(tail_ms, 4),
                "median_overhead_ms": round(statistics.median(totals) - head_ms - tail_ms, 4),
                "median_encode_ms": med("encode_ms"),
                "median_network_ms": med("network_ms"),
                "median_server_ms": med("server_ms"),
                "median_decode_ms": med("decode_ms"),
                "raw_websocket_round_trip_ms": round(floor_ms, 4),
            }
        )
    return {
        "benchmark": "offload-overhead",
        "codec": codec,
        "protocol": protocol or "default",
        "server": "separate process (edgeoffload serve), 127.0.0.1",
        "environment": environment(),
        "rows": rows,
    }


_ECHO_SERVER = """
import asyncio, sys
from websockets.asyncio.server import serve
async def main():
    async def handler(ws):
        async for _ in ws:
            await ws.send(b"ok")
    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None,
                     write_limit=1 << 22) as server:
        print(next(iter(server.sockets)).getsockname()[1], flush=True)
        await asyncio.Future()
asyncio.run(main())
"""


def _raw_websocket_round_trip_ms(size: int, requests: int) -> float:
    """Baseline: plain websockets (no crypto, no codec) sending ``size`` bytes to a server
    process on 127.0.0.1 that answers two bytes; median round trip in ms."""
    import asyncio
    import subprocess
    import sys

    from websockets.asyncio.client import connect

    proc = subprocess.Popen([sys.executable, "-c", _ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())

        async def measure() -> float:
            payload = bytes(size)
            times = []
            async with connect(
                f"ws://127.0.0.1:{port}",
                compression=None,
                max_size=None,
                proxy=None,
                write_limit=1 << 22,
            ) as ws:
                for i in range(requests + 3):
                    start = time.perf_counter()
                    await ws.send(payload)
                    await ws.recv()
                    if i >= 3:
                        times.append((time.perf_counter() - start) * 1e3)
            return float(statistics.median(times))

        return asyncio.run(measure())
    finally:
        proc.kill()
        proc.wait(10)


def pipeline_throughput(size: int = 4 << 20, *, repeats: int = 20) -> dict[str, Any]:
    """encode + encrypt + decrypt + decode of one tensor, GB/s, per Noise suite and codec.

    Drives the real sans-I/O connections: ``ClientConnection.send_run`` (codec encode,
    msgpack framing, Transport encryption) on one side and ``ServerConnection.receive`` plus
    ``decode_checked`` (decryption, strict unpack, byte-length checks, codec decode) on the
    other — everything a request does except the socket.
    """
    from edgeoffload.core import codec as codec_mod
    from edgeoffload.core.noise import RUNTIME_PROTOCOLS
    from edgeoffload.device.runtime import decode_checked
    from edgeoffload.keys import KeyPair
    from edgeoffload.protocol.connection import (
        ClientConnection,
        HostedBundle,
        ReplayGuard,
        RunRequest,
    )
    from edgeoffload.protocol.connection import ServerConnection as ProtocolServer
    from edgeoffload.types import TensorSpec

    rng = np.random.default_rng(0)
    array = np.maximum(rng.standard_normal(size // 4), 0).astype(np.float32)  # ReLU-like
    spec = TensorSpec("x", "float32", (array.size,))
    rows = []
    for suite in RUNTIME_PROTOCOLS:
        server_key, device_key = KeyPair.generate(), KeyPair.generate()
        hosted = {"v1": HostedBundle("model:c1", "v1")}
        client = ClientConnection(
            static=device_key,
            server_public=server_key.public,
            bundle="model:c1",
            version="v1",
            time_ns=time.time_ns(),
            protocol=suite,
        )
        server = ProtocolServer(
            static=server_key,
            is_allowed=lambda _: True,
            bundles=hosted,
            replay_guard=ReplayGuard(),
            max_message=4 * size,
        )
        client.start()
        server.receive(client.data_to_send()[0])
        client.receive(server.data_to_send()[0])
        for codec_name in ("none", "lz4", "fp16"):
            codec = codec_mod.CodecSpec.parse(codec_name)
            device_ms, server_ms = [], []
            for request_id in range(repeats):
                start = time.perf_counter()
                client.send_run(request_id, [("x", codec_mod.encode(array, codec))])
                (wire,) = client.data_to_send()
                middle = time.perf_counter()
                (event,) = server.receive(wire)
                assert isinstance(event, RunRequest)
                wanted = codec.name
                decode_checked(event.tensors, (spec,), lambda _, c=wanted: c, max_bytes=4 * size)
                end = time.perf_counter()
                device_ms.append((middle - start) * 1e3)
                server_ms.append((end - middle) * 1e3)
            dev, srv = statistics.median(device_ms), statistics.median(server_ms)
            rows.append(
                {
                    "suite": suite.removeprefix("Noise_IK_25519_"),
                    "codec": codec_name,
                    "tensor_bytes": array.nbytes,
                    "device_encode_encrypt_ms": round(dev, 3),
                    "server_decrypt_decode_ms": round(srv, 3),
                    "round_trip_gb_per_s": round(array.nbytes / (dev + srv) / 1e6, 3),
                    "device_gb_per_s": round(array.nbytes / dev / 1e6, 3),
                    "server_gb_per_s": round(array.nbytes / srv / 1e6, 3),
                }
            )
    return {"benchmark": "pipeline-throughput", "environment": environment(), "rows": rows}
