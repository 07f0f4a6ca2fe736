"""End to end over real sockets: device client -> encrypted websocket -> edge server -> tail.

Servers bind 127.0.0.1 only; keys, crypto and onnxruntime are real. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from edgeoffload.device.blocking import BlockingOffloadClient
from edgeoffload.device.client import OffloadClient
from edgeoffload.device.runtime import DeviceRuntime
from edgeoffload.edge.allowlist import AllowList
from edgeoffload.edge.server import EdgeServer, ServerConfig
from edgeoffload.errors import OffloadUnavailable
from edgeoffload.lab.harness import ThrowawayKeys, spawn_server
from edgeoffload.split import zoo
from edgeoffload.split.analysis import Analysis
from edgeoffload.split.splitter import split_model
from edgeoffload.split.verify import CODEC_TOLERANCE


def run_async(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return ThrowawayKeys.create(tmp_path_factory.mktemp("keys"), devices=("test-device",))


def _middle_cut(analysis: Analysis):
    n = len(analysis.graph.nodes)
    interior = [c for c in analysis.cuts if 0 < c.index < n]
    return interior[len(interior) // 2]


@pytest.fixture(scope="module")
def bundles(zoo_analyses, tmp_path_factory):
    """For every zoo model: a mid-model split with codecs none, fp16 and int8."""
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for name, analysis in zoo_analyses.items():
        cut = _middle_cut(analysis)
        for codec in ("none", "fp16", "int8"):
            out[name, codec] = split_model(analysis, cut, root / f"{name}-{codec}", codec=codec)
    return out


async def _offload_all(bundles_list, keys, inputs_for):
    server = EdgeServer(
        bundles_list,
        identity=keys.server,
        allow=AllowList(keys.allow_file),
        config=ServerConfig(port=0, workers=2),
    )
    await server.start()
    results = {}
    try:
        for bundle in bundles_list:
            client = OffloadClient(
                bundle,
                server=f"ws://127.0.0.1:{server.port}",
                server_key=keys.server.public,
                identity=keys.device,
                fallback="error",
            )
            async with client:
                outs = []
                for inputs in inputs_for(bundle):
                    outs.append(await client.run(inputs))
                    assert client.last_timing is not None and client.last_timing.offloaded
                results[str(bundle.path)] = outs
    finally:
        await server.shutdown()
    return results, server.stats


def test_every_zoo_model_offloads_correctly(zoo_analyses, bundles, keys):
    samples = {
        name: [a.graph.sample_inputs(seed=s) for s in (11, 12)] for name, a in zoo_analyses.items()
    }
    by_path = {str(b.path): name for (name, _), b in bundles.items()}
    results, stats = run_async(
        _offload_all(list(bundles.values()), keys, lambda b: samples[by_path[str(b.path)]])
    )
    assert stats.results == 2 * len(bundles)
    for (name, codec), bundle in bundles.items():
        analysis = zoo_analyses[name]
        local = DeviceRuntime(bundle)
        for inputs, got in zip(samples[name], results[str(bundle.path)], strict=True):
            full = analysis.graph.model
            from edgeoffload._ort import make_session, run

            expected = run(make_session(full, optimize=False), inputs)
            for out_name, ref in expected.items():
                scale = float(np.max(np.abs(ref))) or 1.0
                rel = float(np.max(np.abs(got[out_name] - ref))) / scale
                if codec == "none":
                    # Lossless transport: bit-identical to head+tail run on the device, and
                    # equal to the unsplit model up to ORT's fusion differences at the cut.
                    np.testing.assert_array_equal(got[out_name], local.run_local(inputs)[out_name])
                    assert rel <= 1e-5, (name, rel)
                else:
                    assert rel <= CODEC_TOLERANCE[codec], (name, codec, rel)


def test_blocking_client_and_link_measurement(bundles, keys):
    bundle = bundles["resnet", "none"]

    async def scenario():
        server = EdgeServer(
            [bundle],
            identity=keys.server,
            allow=AllowList(keys.allow_file),
            config=ServerConfig(port=0),
        )
        await server.start()
        return server

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(scenario())
    import threading

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        inputs = {"input": np.random.default_rng(5).standard_normal((1, 3, 224, 224), np.float32)}
        with BlockingOffloadClient(
            bundle,
            server=f"ws://127.0.0.1:{server.port}",
            server_key=keys.server.public,
            identity=keys.device,
            fallback="error",
        ) as client:
            first = client.run(inputs)
            second = client.run(inputs)  # same connection, reused
            np.testing.assert_array_equal(first["logits"], second["logits"])
            local = DeviceRuntime(bundle).run_local(inputs)
            np.testing.assert_array_equal(first["logits"], local["logits"])
            link = client.measure_link(probe_bytes=64 * 1024, rounds=2)
            assert link.rtt_ms > 0 and link.up_bps > 0
            assert client.last_timing is not None and client.last_timing.wire_bytes > 0
        assert server.stats.connections == 1
    finally:
        asyncio.run_coroutine_threadsafe(server.shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


# -- the server as a separate process: kill / stop / drain ---------------------------------------


def _client(bundle, port, keys, **options) -> OffloadClient:
    return OffloadClient(
        bundle,
        server=f"ws://127.0.0.1:{port}",
        server_key=keys.server.public,
        identity=keys.device,
        **options,
    )


def _start_server_process(bundle_dirs, keys, *extra) -> tuple[subprocess.Popen, int]:
    server = spawn_server(bundle_dirs, keys, extra_args=extra)
    return server.process, server.port


@pytest.fixture(scope="module")
def heavy_bundle(tmp_path_factory):
    """A tail heavy enough (ResNet at 448x448) that a request is in flight for a while."""
    model = zoo.build_resnet(resolution=448)
    analysis = Analysis.of(model)
    return split_model(analysis, analysis.cuts[1], tmp_path_factory.mktemp("heavy") / "b")


def _heavy_inputs(seed=0):
    return {"input": np.random.default_rng(seed).standard_normal((1, 3, 448, 448), np.float32)}


@pytest.mark.parametrize("fallback", ["local", "error"])
def test_server_killed_mid_request(heavy_bundle, keys, fallback):
    proc, port = _start_server_process([heavy_bundle.path], keys)
    timeout = 5.0
    try:

        async def scenario():
            client = _client(heavy_bundle, port, keys, fallback=fallback, timeout=timeout)
            async with client:
                await client.connect()
                os.kill(proc.pid, signal.SIGSTOP)  # the request will reach a frozen server...
                task = asyncio.create_task(client.run(_heavy_inputs()))
                await asyncio.sleep(0.3)
                os.kill(proc.pid, signal.SIGKILL)  # ...which then dies with it in flight
                started = time.monotonic()
                try:
                    return await task, time.monotonic() - started, client.last_timing
                except OffloadUnavailable as exc:
                    return exc, time.monotonic() - started, client.last_timing

        result, elapsed, timing = run_async(scenario(), 30)
    finally:
        proc.kill()
        proc.wait(10)
    assert elapsed < timeout + 2.0, "no hang: bounded by the request timeout"
    if fallback == "local":
        assert isinstance(result, dict)
        expected = DeviceRuntime(heavy_bundle).run_local(_heavy_inputs())
        np.testing.assert_array_equal(result["logits"], expected["logits"])
        assert timing is not None and not timing.offloaded and timing.fallback_reason
    else:
        assert isinstance(result, OffloadUnavailable)


def test_silent_server_times_out(heavy_bundle, keys):
    proc, port = _start_server_process([heavy_bundle.path], keys)
    try:

        async def scenario():
            client = _client(heavy_bundle, port, keys, fallback="error", timeout=1.5)
            async with client:
                await client.connect()
                os.kill(proc.pid, signal.SIGSTOP)  # alive but never answers
                started = time.monotonic()
                with pytest.raises(OffloadUnavailable):
                    await client.run(_heavy_inputs())
                return time.monotonic() - started

        elapsed = run_async(scenario(), 30)
    finally:
        proc.kill()
        proc.wait(10)
    assert elapsed < 1.5 + 1.0


def test_sigterm_drains_in_flight_requests(heavy_bundle, keys):
    proc, port = _start_server_process([heavy_bundle.path], keys, "--workers", "1")
    try:

        async def scenario():
            client = _client(heavy_bundle, port, keys, fallback="error", timeout=30)
            async with client:
                await client.connect()
                tasks = [asyncio.create_task(client.run(_heavy_inputs(i))) for i in range(3)]
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # wait until the server has work in flight
                    if await asyncio.to_thread(_inflight, port) >= 1:
                        break
                    await asyncio.sleep(0.005)
                os.kill(proc.pid, signal.SIGTERM)
                return await asyncio.gather(*tasks, return_exceptions=True)

        results = run_async(scenario(), 60)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    completed = [r for r in results if isinstance(r, dict)]
    assert completed, f"in-flight requests must finish: {results}"
    runtime = DeviceRuntime(heavy_bundle)
    for i, result in enumerate(results):
        if isinstance(result, dict):
            expected = runtime.run_local(_heavy_inputs(i))["logits"]
            np.testing.assert_array_equal(result["logits"], expected)
        else:  # requests that arrived after SIGTERM get a clear refusal, not a wrong answer
            assert isinstance(result, OffloadUnavailable)


def _inflight(port: int) -> float:
    """The server's in-flight gauge, from /metrics (/healthz says only up/ready)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("edgeoffload_inflight_requests "):
                return float(line.split()[1])
    raise AssertionError("no edgeoffload_inflight_requests gauge on /metrics")


def _healthz(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        assert response.status == 200
        return json.loads(response.read())


def test_cli_run_against_cli_serve(bundles, keys, tmp_path):
    bundle = bundles["encoder", "fp16"]
    proc, port = _start_server_process([bundle.path], keys)
    try:
        inputs = {
            "input_ids": np.arange(32, dtype=np.int64).reshape(1, 32) % 97,
            "attention_mask": np.ones((1, 32), dtype=np.int64),
        }
        np.savez(tmp_path / "in.npz", **inputs)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "edgeoffload.cli",
                "run",
                str(bundle.path),
                "--server",
                f"ws://127.0.0.1:{port}",
                "--server-key",
                str(keys.server_dir),
                "--key",
                str(keys.device_dir()),
                "--input",
                str(tmp_path / "in.npz"),
                "-o",
                str(tmp_path / "out.npz"),
                "--fallback",
                "error",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert "offloaded" in result.stdout
        got = np.load(tmp_path / "out.npz")["last_hidden_state"]
        expected = DeviceRuntime(bundle).run_local(inputs)["last_hidden_state"]
        bound = CODEC_TOLERANCE["fp16"] * float(np.max(np.abs(expected)))
        assert float(np.max(np.abs(got - expected))) <= bound
        assert _healthz(port)["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
