"""Dynamic batching of stateless tails (edge.batcher): stacking, splitting, compatibility,
the delay bound, and a real server batching 16 real devices' requests.

onnxruntime is real throughout; no wall-clock assertions (orderings and counts only).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeoffload._ort import make_session, run
from edgeoffload.device.client import OffloadClient
from edgeoffload.device.runtime import DeviceRuntime
from edgeoffload.edge.allowlist import AllowList
from edgeoffload.edge.batcher import Batcher, StackedRuns
from edgeoffload.edge.server import EdgeServer, ServerConfig
from edgeoffload.lab.harness import ThrowawayKeys
from edgeoffload.split.splitter import split_model

# Largest relative difference (max |a - b| / max |b|) batching may introduce: onnxruntime's
# CPU kernels pick other blockings for other batch sizes (GEMM/conv accumulation order), so
# batch N and batch 1 of the same rows may differ by a few float32 ulps. Measured on the zoo
# MobileNetV2 tails (x86-64, one intra-op thread): bit-identical for batch 2, 8 and 16; the
# bound leaves room for other CPUs (README "Dynamic batching").
BATCH_TOLERANCE = 1e-5


def run_async(coro, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def _model(batch: str | int = "n") -> onnx.ModelProto:
    """Y = relu(X @ W) + Z, X [n, 8], Z [n, 4] (one symbolic leading dim everywhere)."""
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W"], ["xw"]),
            helper.make_node("Relu", ["xw"], ["r"]),
            helper.make_node("Add", ["r", "Z"], ["Y"]),
        ],
        "tiny",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, 8]),
            helper.make_tensor_value_info("Z", TensorProto.FLOAT, [batch, 4]),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor("W", TensorProto.FLOAT, w.shape, w.ravel())],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feed(seed: int, rows: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "X": rng.standard_normal((rows, 8)).astype(np.float32),
        "Z": rng.standard_normal((rows, 4)).astype(np.float32),
    }


def test_eligible_only_with_one_symbolic_leading_dim() -> None:
    assert StackedRuns.eligible(make_session(_model("n")))
    assert not StackedRuns.eligible(make_session(_model(1)))


def test_stacked_results_split_back_per_request() -> None:
    session = make_session(_model())

    async def main() -> tuple[list[dict[str, np.ndarray]], Batcher]:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(StackedRuns(session), pool, slots=1, max_batch=16, max_delay=0.002)
            feeds = [_feed(i, rows=1 + i % 3) for i in range(9)]
            outs = await asyncio.gather(*(batcher.run(f) for f in feeds))
            return [dict(o) for o in outs], batcher

    outs, batcher = run_async(main())
    for i, out in enumerate(outs):
        expected = run(session, _feed(i, rows=1 + i % 3))
        np.testing.assert_allclose(out["Y"], expected["Y"], rtol=BATCH_TOLERANCE, atol=1e-6)
        assert out["Y"].shape == expected["Y"].shape
    # The first request found the slot free and ran alone at once; the rest waited together.
    assert batcher.stats.sizes[1] >= 1
    assert batcher.stats.largest > 1
    assert sum(n * c for n, c in batcher.stats.sizes.items()) == 9


def test_incompatible_shapes_never_share_a_batch() -> None:
    session = make_session(_model())
    recorded: list[int] = []

    def bad(seed: int) -> dict[str, np.ndarray]:
        feed = _feed(seed)
        feed["X"] = feed["X"].astype(np.float64)  # other dtype: its own batch (ORT refuses it)
        return feed

    async def main() -> list[object]:
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher(
                StackedRuns(session),
                pool,
                slots=1,
                max_batch=16,
                max_delay=0.002,
                on_batch=lambda n, _rows: recorded.append(n),
            )
            feeds = [_feed(0), _feed(1), bad(2), _feed(3), bad(4)]
            return await asyncio.gather(*(batcher.run(f) for f in feeds), return_exceptions=True)

    outs = run_async(main())
    # The well-formed requests all got their own correct rows; the float64 ones failed together
    # without taking the others down.
    for i in (0, 1, 3):
        out = outs[i]
        assert isinstance(out, dict)
        np.testing.assert_allclose(out["Y"], run(session, _feed(i))["Y"], rtol=BATCH_TOLERANCE)
    assert isinstance(outs[2], Exception) and isinstance(outs[4], Exception)
    assert sorted(recorded) == [1, 2]  # [0] alone, then [1, 3] (the float64 pair never ran ok)


def test_max_batch_bounds_rows_and_a_lone_request_is_not_delayed() -> None:
    session = make_session(_model())

    async def main() -> Batcher:
        with ThreadPoolExecutor(1) as pool:
            # A huge bound: a lone request must still start at once (delay 0 when idle).
            batcher = Batcher(StackedRuns(session), pool, slots=1, max_batch=4, max_delay=3600.0)
            assert batcher.delay == 0.0
            await batcher.run(_feed(0))
            assert batcher.stats.sizes == {1: 1}
            await asyncio.gather(*(batcher.run(_feed(i)) for i in range(13)))
            return batcher

    batcher = run_async(main(), timeout=30)
    assert batcher.stats.largest <= 4
    assert batcher.delay <= batcher.max_delay


def test_delay_is_tuned_and_bounded() -> None:
    batcher = Batcher(
        StackedRuns(object()), ThreadPoolExecutor(1), slots=2, max_batch=8, max_delay=0.002
    )
    batcher.last_batch_s = 0.004
    assert batcher.delay == 0.0  # nothing running: never hold a request
    batcher.running = 1
    assert batcher.delay == pytest.approx(0.001)  # a quarter of the last batch
    batcher.last_batch_s = 1.0
    assert batcher.delay == 0.002  # never above the bound


def test_onnxruntime_batch_differences_are_within_the_documented_bound(zoo_analyses) -> None:
    """Measure what ORT itself changes between batch 1 and batch N on a real zoo tail."""
    analysis = zoo_analyses["mobilenetv2"]
    n = len(analysis.graph.nodes)
    cut = [c for c in analysis.cuts if 0 < c.index < n][len(analysis.cuts) // 8]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        bundle = split_model(analysis, cut, Path(tmp) / "b", codec="none")
        head, tail = make_session(bundle.head_path), make_session(bundle.tail_path)
        crossings = [run(head, analysis.graph.sample_inputs(seed=s)) for s in range(8)]
        singles = [run(tail, c) for c in crossings]
        stacked = {k: np.concatenate([c[k] for c in crossings]) for k in crossings[0]}
        batched = run(tail, stacked)
    worst = 0.0
    for name, value in batched.items():
        for i, single in enumerate(singles):
            ref = single[name]
            scale = float(np.max(np.abs(ref))) or 1.0
            worst = max(worst, float(np.max(np.abs(value[i : i + 1] - ref))) / scale)
    assert worst <= BATCH_TOLERANCE, worst


def test_server_batches_sixteen_real_devices(zoo_analyses, tmp_path) -> None:
    analysis = zoo_analyses["mobilenetv2"]
    n = len(analysis.graph.nodes)
    interior = [c for c in analysis.cuts if 0 < c.index < n]
    bundle = split_model(analysis, interior[len(interior) // 2], tmp_path / "b", codec="none")
    names = [f"device-{i}" for i in range(16)]
    keys = ThrowawayKeys.create(tmp_path / "keys", devices=names)
    samples = [analysis.graph.sample_inputs(seed=100 + i) for i in range(16)]
    local = DeviceRuntime(bundle)
    expected = [local.run_local(s) for s in samples]

    async def scenario() -> tuple[list[list[dict[str, np.ndarray]]], EdgeServer]:
        server = EdgeServer(
            [bundle],
            identity=keys.server,
            allow=AllowList(keys.allow_file),
            config=ServerConfig(port=0, workers=2, batch_max=8),
        )
        await server.start()
        try:
            (hosted,) = server._hosted.values()
            assert hosted.batcher is not None
            clients = [
                OffloadClient(
                    bundle,
                    server=f"ws://127.0.0.1:{server.port}",
                    server_key=keys.server.public,
                    identity=keys.devices[name],
                    fallback="error",
                )
                for name in names
            ]

            async def device(i: int) -> list[dict[str, np.ndarray]]:
                async with clients[i] as client:
                    outs = []
                    for _ in range(3):
                        outs.append(await client.run(samples[i]))
                        assert client.last_timing is not None and client.last_timing.offloaded
                    return outs

            results = await asyncio.gather(*(device(i) for i in range(16)))
        finally:
            await server.shutdown()
        return list(results), server

    results, server = run_async(scenario(), timeout=120)
    assert server.stats.results == 48
    assert sum(k * v for k, v in server.stats.batch_sizes.items()) == 48
    assert max(server.stats.batch_sizes) > 1, server.stats.batch_sizes  # batching happened
    exposition = server.stats.exposition()[0].decode()
    assert "edgeoffload_batch_requests_count" in exposition
    for i, outs in enumerate(results):
        for got in outs:
            for name, ref in expected[i].items():
                scale = float(np.max(np.abs(ref))) or 1.0
                assert float(np.max(np.abs(got[name] - ref))) / scale <= BATCH_TOLERANCE
