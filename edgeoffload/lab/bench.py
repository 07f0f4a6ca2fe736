"""Benchmarks behind ``edgeoffload bench`` and ``benchmarks/`` (they measure; tests check).

``cost_accuracy``: how well the profile + calibration predict the wall time of real head and
tail sessions, over every single-tensor cut of a model. Predicted and measured times use the
same thread count; the result has Spearman's rank correlation and the median relative error.

``offload_overhead``: per-request framework overhead on loopback, against a plain websockets
round trip of the same payload. ``pipeline_throughput``: encode + encrypt + decrypt + decode
GB/s of one tensor per Noise suite and codec, through the sans-I/O protocol objects.
"""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import connect

from edgeoffload._ort import make_session, run
from edgeoffload.core import codec as codec_mod
from edgeoffload.core.costmodel import ComputeModel
from edgeoffload.core.noise import DEFAULT_PROTOCOL, RUNTIME_PROTOCOLS
from edgeoffload.keys import KeyPair
from edgeoffload.lab.demo import measure_requests
from edgeoffload.lab.harness import ThrowawayKeys, spawn_server
from edgeoffload.lab.stats import (
    Environment,
    Record,
    environment,
    interleaved_ms,
    median,
    percentile,
)
from edgeoffload.protocol.connection import ClientConnection, HostedBundle, ReplayGuard
from edgeoffload.protocol.connection import ServerConnection as ProtocolServer
from edgeoffload.protocol.events import RunRequest
from edgeoffload.protocol.tensors import decode_checked
from edgeoffload.types import TensorSpec

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


# -- cost accuracy -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CutTiming(Record):
    """Predicted and measured head/tail time at one cut."""

    cut: str
    after: str
    predicted_head_ms: float
    measured_head_ms: float
    predicted_tail_ms: float
    measured_tail_ms: float


@dataclass(frozen=True)
class Agreement(Record):
    """How well predictions agree with measurements over all cuts."""

    spearman: float
    median_relative_error: float
    max_relative_error: float

    @classmethod
    def of(cls, predicted: list[float], measured: list[float]) -> Agreement:
        rel = [abs(p - m) / m for p, m in zip(predicted, measured, strict=True) if m > 0]
        return cls(
            spearman=round(spearman(predicted, measured), 4),
            median_relative_error=round(median(rel), 4),
            max_relative_error=round(max(rel), 4) if rel else float("nan"),
        )


@dataclass(frozen=True)
class CostAccuracyResult(Record):
    benchmark: str = field(default="cost-accuracy", init=False)
    model: str
    nodes: int
    threads: int
    runs: int
    single_tensor_cuts: int
    profile_seconds: float
    head: Agreement
    tail: Agreement
    environment: Environment
    rows: tuple[CutTiming, ...]


def cost_accuracy(
    model: Any,
    *,
    threads: int = 1,
    runs: int = 15,
    dims: dict[str, int] | None = None,
    progress: Progress | None = None,
) -> CostAccuracyResult:
    """Predicted vs measured head/tail time at every single-tensor cut of ``model``."""
    from edgeoffload.split.analysis import Analysis  # needs onnx (heavy)

    started = time.perf_counter()
    analysis = Analysis.of(model, dims=dims)
    profile = analysis.profile(threads=threads, runs=runs)
    profile_s = time.perf_counter() - started
    compute = ComputeModel(profile, analysis.node_order)
    n = len(analysis.node_order)
    cuts = [c for c in analysis.cuts if 0 < c.index < n and len(c.tensors) == 1]
    rows: list[CutTiming] = []
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
        head_ms, tail_ms = interleaved_ms(
            [
                functools.partial(run, head, head_feed),
                functools.partial(run, tail, tail_feed),
            ],
            runs=runs,
        )
        rows.append(
            CutTiming(
                cut=cut.id,
                after=cut.after,
                predicted_head_ms=compute.head_ms(cut.index),
                measured_head_ms=head_ms,
                predicted_tail_ms=compute.tail_ms(cut.index),
                measured_tail_ms=tail_ms,
            )
        )
    return CostAccuracyResult(
        model=analysis.source_name,
        nodes=n,
        threads=threads,
        runs=runs,
        single_tensor_cuts=len(rows),
        profile_seconds=round(profile_s, 2),
        head=Agreement.of([r.predicted_head_ms for r in rows], [r.measured_head_ms for r in rows]),
        tail=Agreement.of([r.predicted_tail_ms for r in rows], [r.measured_tail_ms for r in rows]),
        environment=environment(),
        rows=tuple(rows),
    )


# -- offload overhead ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OverheadRow(Record):
    """One crossing size: end to end, compute, and the rest (overhead), median ms."""

    crossing_bytes: int
    requests: int
    median_total_ms: float
    p90_total_ms: float
    head_ms: float
    tail_ms: float
    median_overhead_ms: float
    median_encode_ms: float
    median_network_ms: float
    median_server_ms: float
    median_decode_ms: float
    raw_websocket_round_trip_ms: float


@dataclass(frozen=True)
class OverheadResult(Record):
    benchmark: str = field(default="offload-overhead", init=False)
    codec: str
    protocol: str
    server: str
    environment: Environment
    rows: tuple[OverheadRow, ...]


def _size_model(n_floats: int) -> Any:
    """x[n] -> Relu (head) | Neg -> ReduceSum (tail): the cut carries exactly n floats."""
    import onnx  # heavy
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
) -> OverheadResult:
    """Per-request framework overhead on loopback: end to end minus head and tail compute.

    The edge server runs in its own process (``edgeoffload serve``), as in deployment, and
    the device client in this one. Head and tail compute are measured by timing their
    onnxruntime sessions directly, in the same run, on the same inputs; everything else
    (encode, encrypt, websocket, server scheduling, decrypt, decode, result) is overhead.
    """
    from edgeoffload.split.analysis import Analysis  # needs onnx (heavy)
    from edgeoffload.split.splitter import split_model  # needs onnx (heavy)

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
            head_ms, tail_ms = interleaved_ms(
                [functools.partial(run, head, inputs[0]), functools.partial(run, tail, crossing)],
                runs=requests,
            )
            keys = ThrowawayKeys.create(root / "keys")
            with spawn_server([bundle.path], keys) as server:
                measured = asyncio.run(
                    measure_requests(
                        bundle,
                        inputs,
                        url=server.url,
                        keys=keys,
                        protocol=protocol or DEFAULT_PROTOCOL,
                        warmup=3,
                    )
                )

        floor_ms = _raw_websocket_round_trip_ms(size, requests)
        totals = [t.total_ms for t in measured.timings]
        rows.append(
            OverheadRow(
                crossing_bytes=size,
                requests=len(totals),
                median_total_ms=round(measured.median("total_ms"), 4),
                p90_total_ms=round(percentile(totals, 90), 4),
                head_ms=round(head_ms, 4),
                tail_ms=round(tail_ms, 4),
                median_overhead_ms=round(median(totals) - head_ms - tail_ms, 4),
                median_encode_ms=round(measured.median("encode_ms"), 4),
                median_network_ms=round(measured.median("network_ms"), 4),
                median_server_ms=round(measured.median("server_ms"), 4),
                median_decode_ms=round(measured.median("decode_ms"), 4),
                raw_websocket_round_trip_ms=round(floor_ms, 4),
            )
        )
    return OverheadResult(
        codec=codec,
        protocol=protocol or "default",
        server="separate process (edgeoffload serve), 127.0.0.1",
        environment=environment(),
        rows=tuple(rows),
    )


# A plain websockets echo server: its first stdout line is its port number, nothing else.
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
            return median(times)

        return asyncio.run(measure())
    finally:
        proc.kill()
        proc.wait(10)


# -- pipeline throughput -------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineRow(Record):
    """One Noise suite and codec: each side's time for one tensor, and GB/s."""

    suite: str
    codec: str
    tensor_bytes: int
    device_encode_encrypt_ms: float
    server_decrypt_decode_ms: float
    round_trip_gb_per_s: float
    device_gb_per_s: float
    server_gb_per_s: float


@dataclass(frozen=True)
class PipelineThroughputResult(Record):
    benchmark: str = field(default="pipeline-throughput", init=False)
    environment: Environment
    rows: tuple[PipelineRow, ...]


def pipeline_throughput(size: int = 4 << 20, *, repeats: int = 20) -> PipelineThroughputResult:
    """encode + encrypt + decrypt + decode of one tensor, GB/s, per Noise suite and codec.

    Drives the real sans-I/O connections: ``ClientConnection.send_run`` (codec encode,
    msgpack framing, Transport encryption) on one side and ``ServerConnection.receive`` plus
    ``decode_checked`` (decryption, strict unpack, byte-length checks, codec decode) on the
    other — everything a request does except the socket.
    """
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
                decode_checked(event.tensors, (spec,), _constant(codec.name), max_bytes=4 * size)
                end = time.perf_counter()
                device_ms.append((middle - start) * 1e3)
                server_ms.append((end - middle) * 1e3)
            dev, srv = median(device_ms), median(server_ms)
            rows.append(
                PipelineRow(
                    suite=suite.removeprefix("Noise_IK_25519_"),
                    codec=codec_name,
                    tensor_bytes=array.nbytes,
                    device_encode_encrypt_ms=round(dev, 3),
                    server_decrypt_decode_ms=round(srv, 3),
                    round_trip_gb_per_s=round(array.nbytes / (dev + srv) / 1e6, 3),
                    device_gb_per_s=round(array.nbytes / dev / 1e6, 3),
                    server_gb_per_s=round(array.nbytes / srv / 1e6, 3),
                )
            )
    return PipelineThroughputResult(environment=environment(), rows=tuple(rows))


def _constant(name: str) -> Callable[[str], str]:
    """A ``codec_for`` that answers ``name`` whatever the dtype."""
    return lambda _dtype: name
