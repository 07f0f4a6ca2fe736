"""The TypeScript client (mobile_bridge/ts) against the real Python edge server.

One ``edgeoffload serve`` process on 127.0.0.1 hosts a bundle of every zoo model (each with
another codec); the TS client runs each end to end from Node (its head in onnxruntime-node) and
must return exactly what the Python client gets from the same server for the same inputs (the
codecs are deterministic, so even lossy ones give bit-identical tails). Then the attacks: a
wrong pinned server key, a frame altered on the way (a relay that flips one bit) and a bundle
version the server does not host each give the typed JS error, and the server keeps serving.

Needs node and ``npm ci`` in mobile_bridge/ts; skipped without them unless
EDGEOFFLOAD_REQUIRE_NODE=1 (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from edgeoffload.bundle import load_bundle
from edgeoffload.device.blocking import BlockingOffloadClient
from edgeoffload.device.runtime import DeviceRuntime
from edgeoffload.keys import encode_public, generate_identity
from edgeoffload.lab import tsclient
from edgeoffload.lab.harness import ThrowawayKeys, spawn_server
from edgeoffload.split.splitter import split_model

# (zoo model, codec): every model, and between them every quantisation and both compressions.
BUNDLES = [("resnet", "none"), ("mobilenetv2", "fp16+zstd"), ("encoder", "int8+lz4")]


@pytest.fixture(scope="module")
def ts_package() -> Path:
    reason = tsclient.ts_ready()
    if reason is not None:
        if os.environ.get("EDGEOFFLOAD_REQUIRE_NODE") == "1":
            pytest.fail(f"EDGEOFFLOAD_REQUIRE_NODE=1, but {reason}")
        pytest.skip(reason)
    tsclient.build()
    return tsclient.TS_PACKAGE


def _interior_cut(analysis, fraction: float):
    n = len(analysis.graph.nodes)
    interior = [c for c in analysis.cuts if 0 < c.index < n]
    return interior[int(len(interior) * fraction)]


@pytest.fixture(scope="module")
def bundles(zoo_analyses, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ts-bundles")
    return {
        model: split_model(
            zoo_analyses[model], _interior_cut(zoo_analyses[model], 0.4), root / model, codec=codec
        ).path
        for model, codec in BUNDLES
    }


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> ThrowawayKeys:
    return ThrowawayKeys.create(tmp_path_factory.mktemp("ts-keys"))


@pytest.fixture(scope="module")
def server(bundles, keys) -> Iterator:
    with spawn_server(list(bundles.values()), keys, workers=1) as process:
        yield process


@pytest.fixture(scope="module")
def samples(zoo_analyses) -> dict[str, dict[str, np.ndarray]]:
    return {model: zoo_analyses[model].graph.sample_inputs(seed=7) for model, _ in BUNDLES}


def _python_answer(bundle: Path, inputs, server, keys) -> dict[str, np.ndarray]:
    with BlockingOffloadClient(
        bundle,
        server=server.url,
        server_key=keys.server.public,
        identity=keys.device,
        fallback="error",
        timeout=30.0,
    ) as client:
        outputs = client.run(inputs)
        assert client.last_timing is not None and client.last_timing.offloaded
        return outputs


def _case(name: str, bundle: Path, server_url: str, key: bytes, inputs, **kw) -> tsclient.TsCase:
    return tsclient.TsCase(name, bundle, server_url, encode_public(key), inputs, **kw)


def test_every_zoo_bundle_gives_the_python_answer(
    ts_package, bundles, samples, server, keys, tmp_path
) -> None:
    cases = [
        _case(model, bundles[model], server.url, keys.server.public, samples[model])
        for model, _ in BUNDLES
    ]
    results = tsclient.run_cases(cases, keys.device_dir() / "private.key", tmp_path)
    for (model, codec), result in zip(BUNDLES, results, strict=True):
        assert result.ok, f"{model}: {result.error_type}: {result.error_message}"
        timing = result.timings[0]
        assert timing["offloaded"] is True and timing["wireBytes"] > 0, timing
        expected = _python_answer(bundles[model], samples[model], server, keys)
        assert set(result.outputs) == set(expected)
        for name, value in expected.items():
            assert result.outputs[name].dtype == value.dtype
            np.testing.assert_array_equal(result.outputs[name], value, err_msg=f"{model} {codec}")
        if codec == "none":  # lossless: also the device's own head + tail, bit for bit
            local = DeviceRuntime(bundles[model]).run_local(samples[model])
            for name, value in local.items():
                np.testing.assert_array_equal(result.outputs[name], value)


class TamperingRelay:
    """A websocket relay on 127.0.0.1 that flips one bit of the first server message after
    the handshake (what an attacker on the path could do); everything else passes through."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.flipped = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    async def _relay(self, device) -> None:
        async with connect(self.upstream, compression=None, max_size=None, proxy=None) as server:

            async def up() -> None:
                async for message in device:
                    await server.send(message)

            async def down() -> None:
                seen = 0
                async for message in server:
                    seen += 1
                    if seen == 2:  # the welcome is 1; 2 is the first transport message
                        message = bytearray(message)
                        message[-1] ^= 0x01
                        message = bytes(message)
                        self.flipped += 1
                    await device.send(message)

            tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            except ConnectionClosed:
                pass
            finally:
                for task in tasks:
                    task.cancel()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._stop = self._loop.create_future()
            async with serve(self._relay, "127.0.0.1", 0, compression=None, max_size=None) as s:
                self.port = s.sockets[0].getsockname()[1]
                self._ready.set()
                await self._stop

        self._loop.run_until_complete(main())

    def __enter__(self) -> TamperingRelay:
        self._thread.start()
        assert self._ready.wait(10), "relay did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(lambda: self._stop and self._stop.set_result(None))
        self._thread.join(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_attacks_give_typed_errors_and_the_server_keeps_serving(
    ts_package, bundles, samples, server, keys, zoo_analyses, tmp_path
) -> None:
    model = "resnet"
    stranger = generate_identity(tmp_path / "stranger")
    # Same model and cut, another codec: the server knows the identity, not this version.
    other_version = split_model(
        zoo_analyses[model], _interior_cut(zoo_analyses[model], 0.4), tmp_path / "v2", codec="fp16"
    ).path
    expected = _python_answer(bundles[model], samples[model], server, keys)
    with TamperingRelay(server.url.replace("ws://", "ws://", 1)) as relay:
        relay_url = f"ws://127.0.0.1:{relay.port}"
        cases = [
            _case("wrong-key", bundles[model], server.url, stranger.public, samples[model]),
            _case("tampered", bundles[model], relay_url, keys.server.public, samples[model]),
            _case("version", other_version, server.url, keys.server.public, samples[model]),
            _case("after", bundles[model], server.url, keys.server.public, samples[model]),
        ]
        wrong_key, tampered, version, after = tsclient.run_cases(
            cases, keys.device_dir() / "private.key", tmp_path / "ts"
        )
        assert relay.flipped == 1
    assert (wrong_key.ok, wrong_key.error_type) == (False, "AuthenticationFailed"), wrong_key
    assert (tampered.ok, tampered.error_type) == (False, "AuthenticationFailed"), tampered
    assert (version.ok, version.error_type) == (False, "VersionMismatch"), version
    assert after.ok, after.error_message
    for name, value in expected.items():
        np.testing.assert_array_equal(after.outputs[name], value)
    assert server.process.poll() is None


def test_falls_back_to_the_local_tail_only_when_asked(
    ts_package, bundles, samples, keys, tmp_path
) -> None:
    model = "resnet"
    nobody = f"ws://127.0.0.1:{_free_port()}"  # nothing listens there
    cases = [
        _case(
            "local", bundles[model], nobody, keys.server.public, samples[model], fallback="local"
        ),
        _case("error", bundles[model], nobody, keys.server.public, samples[model]),
    ]
    local, error = tsclient.run_cases(cases, keys.device_dir() / "private.key", tmp_path)
    assert local.ok, local.error_message
    assert local.timings[0]["offloaded"] is False and local.timings[0]["fallbackReason"]
    reference = DeviceRuntime(bundles[model]).run_local(samples[model])
    for name, value in reference.items():
        np.testing.assert_array_equal(local.outputs[name], value)
    assert (error.ok, error.error_type) == (False, "OffloadUnavailable"), error


def test_ort_heads_load_in_node_with_the_onnx_heads_outputs(
    ts_package, bundles, samples, keys, tmp_path
) -> None:
    """``export-ort`` heads: Node runs head.ort and gives exactly what head.onnx gives at the
    level the .ort was saved at, and exactly what Python's onnxruntime gives on head.ort."""
    from edgeoffload.split.ort_export import export_ort

    model = "resnet"
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles[model], bundle)
    export_ort(bundle)
    loaded = load_bundle(bundle)
    assert loaded.manifest.ort is not None and loaded.manifest.ort.head is not None
    level = {"disable": "disabled"}.get(
        loaded.manifest.ort.optimization, loaded.manifest.ort.optimization
    )
    inputs = samples[model]
    key = encode_public(keys.server.public)
    cases = [
        tsclient.TsCase("ort", bundle, "", key, inputs, model_format="ort", head_only=True),
        tsclient.TsCase(
            "onnx", bundle, "", key, inputs, model_format="onnx", optimization=level, head_only=True
        ),
    ]
    ort_head, onnx_head = tsclient.run_cases(
        cases, keys.device_dir() / "private.key", tmp_path / "ts"
    )
    assert ort_head.ok and onnx_head.ok, (ort_head.error_message, onnx_head.error_message)
    python_ort = DeviceRuntime(bundle, model_format="ort").run_head(inputs)
    crossing = {t.name for t in loaded.manifest.crossing}
    assert set(ort_head.outputs) == set(onnx_head.outputs) == crossing
    for name in crossing:
        np.testing.assert_array_equal(ort_head.outputs[name], onnx_head.outputs[name])
        np.testing.assert_array_equal(ort_head.outputs[name], python_ort[name])
