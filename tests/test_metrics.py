"""The edge server's /metrics, /readyz and drain, on a real server on 127.0.0.1 with real keys.

/metrics is parsed with prometheus_client's own parser and its counters are checked against the
requests these tests sent; /readyz must turn 503 while the server drains, and a new device is
refused then while the requests already admitted still finish with the right answers.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from edgeoffload.device.client import OffloadClient
from edgeoffload.device.runtime import DeviceRuntime
from edgeoffload.edge.allowlist import AllowList
from edgeoffload.edge.server import EdgeServer, ServerConfig
from edgeoffload.errors import AuthenticationFailed, OffloadUnavailable
from edgeoffload.keys import generate_identity
from edgeoffload.lab.harness import ThrowawayKeys
from edgeoffload.split import zoo
from edgeoffload.split.analysis import Analysis
from edgeoffload.split.splitter import split_model


def run_async(coro: Any, timeout: float = 120.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayKeys:
    return ThrowawayKeys.create(tmp_path_factory.mktemp("metrics-keys"), devices=("device",))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A ResNet at 448x448 cut after its first node: the tail is heavy enough that requests
    queued behind one worker are still in flight while the server drains."""
    analysis = Analysis.of(zoo.build_resnet(resolution=448))
    return split_model(analysis, analysis.cuts[1], tmp_path_factory.mktemp("metrics") / "b")


def _inputs(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.standard_normal((1, 3, 448, 448), np.float32)}


def _client(bundle: Any, server: EdgeServer, keys: ThrowawayKeys, **options: Any) -> OffloadClient:
    return OffloadClient(
        bundle,
        server=f"ws://127.0.0.1:{server.port}",
        server_key=keys.server.public,
        identity=options.pop("identity", keys.device),
        fallback="error",
        timeout=60.0,
        **options,
    )


async def _start_server(bundle: Any, keys: ThrowawayKeys) -> EdgeServer:
    """An edge server on 127.0.0.1 with one worker, so that requests queue behind it."""
    server = EdgeServer(
        [bundle],
        identity=keys.server,
        allow=AllowList(keys.allow_file),
        config=ServerConfig(port=0, workers=1),
    )
    await server.start()
    return server


def _get(port: int, path: str) -> tuple[int, str, str]:
    """Status, content type and body of a plain GET (errors included)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, by (sample name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_what_the_devices_sent(bundle: Any, keys: ThrowawayKeys, tmp_path) -> None:
    stranger = generate_identity(tmp_path / "stranger")  # not in the allow-list
    version = bundle.manifest.version

    async def scenario() -> tuple[str, str, int]:
        server = await _start_server(bundle, keys)
        try:
            async with _client(bundle, server, keys) as client:
                for seed in range(3):
                    await client.run(_inputs(seed))
            with pytest.raises(AuthenticationFailed):
                async with _client(bundle, server, keys, identity=stranger) as intruder:
                    await intruder.connect()
            status, content_type, text = await asyncio.to_thread(_get, server.port, "/metrics")
        finally:
            await server.shutdown()
        assert status == 200
        return content_type, text, server.stats.results

    content_type, text, results = run_async(scenario())
    assert content_type == CONTENT_TYPE_LATEST  # Prometheus text format
    samples = _samples(text)

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    assert results == 3
    assert value("edgeoffload_requests_total", bundle=version, kind="run") == 3
    assert value("edgeoffload_results_total", bundle=version) == 3
    assert value("edgeoffload_connections_total") == 2
    assert value("edgeoffload_handshakes_total", result="ok") == 1
    assert value("edgeoffload_handshakes_total", result="auth") == 1
    assert value("edgeoffload_errors_total", code="auth") == 1
    for stage in ("tail", "total"):
        assert value("edgeoffload_request_seconds_count", bundle=version, stage=stage) == 3
        assert value("edgeoffload_request_seconds_sum", bundle=version, stage=stage) > 0
    tail_sum = value("edgeoffload_request_seconds_sum", bundle=version, stage="tail")
    assert value("edgeoffload_request_seconds_sum", bundle=version, stage="total") >= tail_sum
    assert value("edgeoffload_inflight_requests") == 0
    assert value("edgeoffload_max_inflight_requests") == 64  # 64 x one worker
    assert value("edgeoffload_draining") == 0
    assert value("edgeoffload_sessions") == 0 and value("edgeoffload_kv_bytes") == 0
    # Labels carry bundle versions, kinds, stages, codes and outcomes: never a key.
    label_values = {v for (_, labels) in samples for _, v in labels}
    for key in (keys.server.public, keys.device.public, stranger.public):
        assert not any(key.hex() in v or key.hex()[:16] in v for v in label_values)


def test_readyz_turns_false_while_draining(bundle: Any, keys: ThrowawayKeys) -> None:
    async def scenario() -> dict[str, Any]:
        server = await _start_server(bundle, keys)
        seen: dict[str, Any] = {
            "ready_before": await asyncio.to_thread(_get, server.port, "/readyz")
        }
        async with _client(bundle, server, keys) as client:
            await client.connect()
            tasks = [asyncio.create_task(client.run(_inputs(seed))) for seed in range(3)]
            for _ in range(2000):  # until the server has the requests in flight (bounded)
                if server.stats.requests == 3:
                    break
                await asyncio.sleep(0.005)
            drain = asyncio.create_task(server.shutdown())
            await asyncio.sleep(0)  # the drain has begun: new work is refused from here on
            seen["ready_draining"] = await asyncio.to_thread(_get, server.port, "/readyz")
            seen["metrics_draining"] = await asyncio.to_thread(_get, server.port, "/metrics")
            with pytest.raises(OffloadUnavailable):
                async with _client(bundle, server, keys, retries=0) as late:
                    await late.connect()
            seen["results"] = await asyncio.gather(*tasks)
            await drain
        return seen

    seen = run_async(scenario())
    status, content_type, body = seen["ready_before"]
    assert (status, content_type, json.loads(body)) == (
        200,
        "application/json",
        {"ready": True, "status": "ok"},
    )
    status, _, body = seen["ready_draining"]
    assert status == 503 and json.loads(body) == {"ready": False, "status": "draining"}
    samples = _samples(seen["metrics_draining"][2])
    assert samples[("edgeoffload_draining", frozenset())] == 1
    assert samples[("edgeoffload_inflight_requests", frozenset())] >= 1
    runtime = DeviceRuntime(bundle)
    for seed, outputs in enumerate(seen["results"]):  # admitted before the drain: all answered
        np.testing.assert_array_equal(outputs["logits"], runtime.run_local(_inputs(seed))["logits"])
