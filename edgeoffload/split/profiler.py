"""Measure how long a model's parts take on this machine (an I/O adapter: it runs things).

Method (documented in README.md, "How profiling works"):

1. **Per-node kernel times.** The model runs in onnxruntime with graph optimisations *off*
   and ORT's profiler on, so every original node keeps its name and gets its own time; the
   median over ``runs`` runs (after warm-up) is kept per node. These raw times rank the cuts
   well but their sums overestimate real sessions: ORT fuses Conv+BN+activation, MatMul+Add
   etc. when optimisations are on, and each session run has a fixed overhead.
2. **Calibration.** Real, optimised head sessions are cut at eight points spread over the
   model (by cumulative raw time) and timed round-robin with the same thread count, plus the
   full model and an empty (Identity) session for the per-run overhead. The pairs (raw prefix sum,
   measured wall time) form a monotone piecewise-linear curve that the cost model uses to
   turn any head's raw sum into a predicted wall time.
3. **Codec rates.** Each codec encodes and decodes the model's largest activations; raw bytes
   per second are stored per direction and codec (``encode:fp16+zstd``, ``decode:...``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from edgeoffload._ort import make_session, median_ms, run
from edgeoffload.core import codec as codec_mod
from edgeoffload.errors import ProfileError
from edgeoffload.split.graph import ModelGraph
from edgeoffload.types import CalibrationPoint, CutPoint, DeviceProfile, PowerModel

log = logging.getLogger("edgeoffload.split.profiler")

Progress = Callable[[str, float], None]  # (what, fraction done)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.system()} {platform.machine()} {cpu} {os.cpu_count()} cpus".strip()


def node_times(
    graph: ModelGraph, inputs: Mapping[str, np.ndarray], *, threads: int, runs: int
) -> dict[str, float]:
    """Median per-node kernel time (ms) with optimisations off, keyed by node name."""
    with tempfile.TemporaryDirectory(prefix="edgeoffload-prof-") as tmp:
        session = make_session(
            graph.serialized(),
            threads=threads,
            optimize=False,
            profile_prefix=str(Path(tmp) / "p"),
        )
        warmup = 2
        for _ in range(warmup + runs):
            run(session, inputs)
        trace = Path(session.end_profiling())
        events = json.loads(trace.read_text())
    samples: dict[str, list[tuple[int, float]]] = {}
    for event in events:
        if event.get("cat") != "Node":
            continue
        name = str(event.get("name", ""))
        if not name.endswith("_kernel_time"):
            continue
        node = name[: -len("_kernel_time")]
        samples.setdefault(node, []).append((int(event.get("ts", 0)), float(event["dur"]) / 1e3))
    times: dict[str, float] = {}
    for node in graph.nodes:
        observed = sorted(samples.get(node.name, []))
        kept = [dur for _, dur in observed[-runs:]]  # drop the warm-up runs
        times[node.name] = statistics.median(kept) if kept else 0.0
    return times


def _calibration_cuts(cuts: Sequence[CutPoint], prefix: list[float], count: int) -> list[int]:
    total = prefix[-1]
    n = len(prefix) - 1
    interior = [c.index for c in cuts if 0 < c.index < n]
    if not interior or total <= 0:
        return []
    chosen: list[int] = []
    for q in range(1, count + 1):
        target = total * q / (count + 1)
        best = min(interior, key=lambda k: abs(prefix[k] - target))
        if best not in chosen:
            chosen.append(best)
    return sorted(chosen)


def _identity_overhead_ms(inputs: Mapping[str, np.ndarray], threads: int, runs: int) -> float:
    import onnx
    from onnx import helper

    name, array = next(iter(inputs.items()))
    elem = helper.np_dtype_to_tensor_dtype(array.dtype)
    graph = helper.make_graph(
        [helper.make_node("Identity", [name], ["out"], name="identity")],
        "overhead",
        [helper.make_tensor_value_info(name, elem, list(array.shape))],
        [helper.make_tensor_value_info("out", elem, list(array.shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    session = make_session(model, threads=threads)
    return median_ms(lambda: run(session, {name: array}), runs=runs * 5)


def calibrate(
    graph: ModelGraph,
    inputs: Mapping[str, np.ndarray],
    node_ms: Mapping[str, float],
    *,
    threads: int,
    runs: int,
    points: int = 8,
    cuts: Sequence[CutPoint] | None = None,
    progress: Progress | None = None,
) -> tuple[CalibrationPoint, ...]:
    """Real timings of optimised head sessions against raw per-node sums."""
    prefix = [0.0]
    for node in graph.nodes:
        prefix.append(prefix[-1] + node_ms[node.name])
    cuts = list(cuts) if cuts is not None else graph.cuts()
    by_index = {c.index: c for c in cuts}
    n = len(graph.nodes)
    chosen = [*_calibration_cuts(cuts, prefix, points), n]
    sessions = []
    for step, k in enumerate(chosen):
        if progress:
            progress(f"building head session {step + 1}/{len(chosen)}", step / len(chosen))
        head, _ = graph.split(by_index[k])
        assert head is not None
        session = make_session(head, threads=threads)
        feed = {i.name: inputs[i.name] for i in session.get_inputs()}
        sessions.append((k, session, feed))
    # Round-robin: every session gets one run per round, so drift in machine load (other
    # processes, frequency changes) hits every calibration point alike.
    samples: list[list[float]] = [[] for _ in sessions]
    for _ in range(2):
        for _, session, feed in sessions:
            run(session, feed)
    for round_ in range(runs):
        if progress:
            progress("timing head sessions", round_ / runs)
        for i, (_, session, feed) in enumerate(sessions):
            start = time.perf_counter()
            run(session, feed)
            samples[i].append((time.perf_counter() - start) * 1e3)
    measured: list[CalibrationPoint] = [
        CalibrationPoint(0.0, _identity_overhead_ms(inputs, threads, runs))
    ]
    measured += [
        CalibrationPoint(prefix[k], statistics.median(times))
        for (k, _, _), times in zip(sessions, samples, strict=True)
    ]
    # Noise can make a longer head look faster; the curve must be monotone.
    monotone: list[CalibrationPoint] = []
    best = 0.0
    for point in sorted(measured, key=lambda p: p.raw_ms):
        best = max(best, point.measured_ms)
        monotone.append(CalibrationPoint(round(point.raw_ms, 6), round(best, 6)))
    return tuple(monotone)


def codec_rates(
    arrays: Sequence[np.ndarray], codecs: Sequence[str], *, repeats: int = 3
) -> dict[str, float]:
    """Bytes per second (of raw tensor bytes) to encode and to decode, per codec.

    Keys are ``encode:<codec>`` and ``decode:<codec>``; the best of ``repeats`` passes.
    """
    rates: dict[str, float] = {}
    total = sum(a.nbytes for a in arrays)
    if total == 0:
        return rates
    for name in codecs:
        spec = codec_mod.CodecSpec.parse(name)
        usable = list(arrays)
        if spec.quant.startswith("int8"):
            # int8 refuses tensors with inf/NaN (an attention mask's -inf): rate the others.
            usable = [a for a in arrays if a.dtype.kind != "f" or np.isfinite(a).all()]
        total = sum(a.nbytes for a in usable)
        if total == 0:
            continue
        best_encode = best_decode = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            encoded = [
                codec_mod.encode(a, codec_mod.codec_for_dtype(spec, a.dtype.name)) for a in usable
            ]
            middle = time.perf_counter()
            for item in encoded:
                codec_mod.decode(item)
            end = time.perf_counter()
            best_encode = min(best_encode, middle - start)
            best_decode = min(best_decode, end - middle)
        rates[f"encode:{spec.name}"] = total / max(best_encode, 1e-9)
        rates[f"decode:{spec.name}"] = total / max(best_decode, 1e-9)
    return rates


def channel_rates(size: int = 1 << 20, repeats: int = 5) -> dict[str, float]:
    """Bytes/s of the secure channel: msgpack framing + Noise encryption (device side) and
    decryption + strict unpack (server side), for a ``size``-byte tensor payload."""
    from edgeoffload.core.noise import DEFAULT_PROTOCOL, HandshakeState
    from edgeoffload.keys import KeyPair
    from edgeoffload.protocol.wire import pack_parts, unpack

    server = KeyPair.generate()
    initiator = HandshakeState(
        DEFAULT_PROTOCOL, initiator=True, s=KeyPair.generate(), rs=server.public
    )
    responder = HandshakeState(DEFAULT_PROTOCOL, initiator=False, s=server)
    responder.read_message(initiator.write_message())
    initiator.read_message(responder.write_message())
    send, receive = initiator.transport(), responder.transport()
    payload = {"t": "run", "id": 1, "tensors": [{"name": "x", "data": bytes(size)}]}
    best_encrypt = best_decrypt = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        wire = send.encrypt_parts(pack_parts(payload))
        middle = time.perf_counter()
        unpack(receive.decrypt(wire), max_bin=2 * size)
        best_encrypt = min(best_encrypt, middle - start)
        best_decrypt = min(best_decrypt, time.perf_counter() - middle)
    return {
        "encrypt:transport": size / max(best_encrypt, 1e-9),
        "decrypt:transport": size / max(best_decrypt, 1e-9),
        "both:websocket": websocket_rate(size),
    }


def websocket_rate(size: int = 1 << 20, repeats: int = 5) -> float:
    """Bytes/s of websockets itself (framing, masking, socket I/O, parsing), both ends in this
    process over 127.0.0.1 — the per-byte cost the secure channel adds on top of the crypto
    (about as much again as the crypto here, so it matters on fast links)."""
    import asyncio

    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    async def measure() -> float:
        async def handler(ws: Any) -> None:
            async for _ in ws:
                await ws.send(b"k")

        payload = bytes(size)
        async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            async with connect(
                f"ws://127.0.0.1:{port}", compression=None, max_size=None, proxy=None
            ) as ws:
                small = large = float("inf")
                for _ in range(repeats):
                    start = time.perf_counter()
                    await ws.send(b"k")
                    await ws.recv()
                    middle = time.perf_counter()
                    await ws.send(payload)
                    await ws.recv()
                    small = min(small, middle - start)
                    large = min(large, time.perf_counter() - middle)
        return size / max(large - small, 1e-9)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(measure())
    # Called from async code (a notebook, an app's event loop): measure on a thread of its own.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, measure()).result()


def largest_activations(
    activations: Mapping[str, np.ndarray], graph: ModelGraph, count: int = 8
) -> list[np.ndarray]:
    candidates = [
        activations[t] for t in graph.producer if t in activations and activations[t].size > 0
    ]
    candidates.sort(key=lambda a: a.nbytes, reverse=True)
    return candidates[:count]


def profile_model(
    graph: ModelGraph,
    *,
    inputs: Mapping[str, np.ndarray],
    activations: Mapping[str, np.ndarray] | None = None,
    threads: int = 1,
    runs: int = 10,
    name: str = "this-machine",
    codecs: Sequence[str] = ("none", "zstd", "lz4", "fp16", "fp16+zstd", "int8", "int8+zstd"),
    power: PowerModel | None = None,
    progress: Progress | None = None,
) -> DeviceProfile:
    """Measure ``graph`` on this machine with ``threads`` intra-op threads."""
    if threads < 1:
        raise ProfileError(f"threads must be >= 1, got {threads}")
    if runs < 1:
        raise ProfileError(f"runs must be >= 1, got {runs}")
    if progress:
        progress("per-node kernel times", 0.0)
    node_ms = node_times(graph, inputs, threads=threads, runs=runs)
    calibration = calibrate(
        graph,
        inputs,
        node_ms,
        threads=threads,
        runs=runs,
        progress=(lambda what, f: progress(what, 0.2 + 0.7 * f)) if progress else None,
    )
    rates: dict[str, float] = {}
    if activations:
        if progress:
            progress("codec rates", 0.9)
        rates = codec_rates(largest_activations(activations, graph), codecs)
        rates.update(channel_rates())
    if progress:
        progress("done", 1.0)
    return DeviceProfile(
        name=name,
        model_sha256=graph.sha256,
        threads=threads,
        node_ms={k: round(v, 6) for k, v in node_ms.items()},
        calibration=calibration,
        power=power or PowerModel(),
        codec_bps={k: round(v, 1) for k, v in rates.items()},
        machine=machine_description(),
    )


def save_profile(profile: DeviceProfile, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(profile.to_dict(), indent=1, sort_keys=False) + "\n")
    return path


def load_profile(path: str | Path) -> DeviceProfile:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"{path}: not a JSON profile ({exc})") from None
    try:
        return DeviceProfile.from_dict(data)
    except ProfileError as exc:
        raise ProfileError(f"{path}: {exc.message}", hint=exc.hint) from None
