"""Several edge servers behind one device: routing, failover, load reports, hostile servers.

Real servers (in-process EdgeServer, or `edgeoffload serve` processes killed for real), real
Noise channels, real onnxruntime; answers are compared bit for bit with the device running
head and tail itself (codec none).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeoffload.device.client import OffloadClient
from edgeoffload.device.pool import EdgeEndpoint
from edgeoffload.device.runtime import DeviceRuntime
from edgeoffload.edge.allowlist import AllowList
from edgeoffload.edge.server import EdgeServer, ServerConfig
from edgeoffload.errors import AuthenticationFailed, OffloadUnavailable
from edgeoffload.keys import encode_public
from edgeoffload.lab.harness import ThrowawayKeys, spawn_server
from edgeoffload.protocol.events import RunRequest
from edgeoffload.protocol.load import ServerLoad
from edgeoffload.split.splitter import split_model

STEP = 20.0


def run_async(coro, timeout: float = 90.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def fleet_keys(tmp_path_factory):
    """Three server identities that all allow the same device."""
    first = ThrowawayKeys.create(tmp_path_factory.mktemp("fleet-keys"), devices=("device",))
    return [first, first.another_server("server-b"), first.another_server("server-c")]


@pytest.fixture(scope="module")
def bundle(zoo_analyses, tmp_path_factory):
    analysis = zoo_analyses["mobilenetv2"]
    n = len(analysis.graph.nodes)
    interior = [c for c in analysis.cuts if 0 < c.index < n]
    return split_model(analysis, interior[len(interior) // 3], tmp_path_factory.mktemp("fleet"))


@pytest.fixture(scope="module")
def samples(zoo_analyses, bundle):
    inputs = [zoo_analyses["mobilenetv2"].graph.sample_inputs(seed=s) for s in range(4)]
    local = DeviceRuntime(bundle)
    return [(x, local.run_local(x)) for x in inputs]


def assert_same(got, expected):
    assert set(got) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)


class GarbageLoadServer(EdgeServer):
    """Answers correctly but reports an impossible load (more queued than in flight)."""

    def load(self, hosted, *, answering: int = 0) -> ServerLoad:
        return ServerLoad(inflight=1, queued=5, workers=1, kv_free=0, draining=False)


class WrongIdServer(EdgeServer):
    """Answers every request under another request's id."""

    async def _serve_request(self, peer, hosted, request: RunRequest) -> None:
        await super()._serve_request(
            peer, hosted, RunRequest(request.request_id + 1000, request.tensors)
        )


def _server(keys: ThrowawayKeys, bundle, cls: type[EdgeServer] = EdgeServer, **config):
    return cls(
        [bundle],
        identity=keys.server,
        allow=AllowList(keys.allow_file),
        config=ServerConfig(host="127.0.0.1", port=0, drain_timeout=2.0, **config),
    )


def _client(bundle, keys: ThrowawayKeys, endpoints, **options) -> OffloadClient:
    options.setdefault("fallback", "error")
    options.setdefault("timeout", STEP)
    return OffloadClient(
        bundle, identity=keys.device, servers=endpoints, connect_timeout=2.0, **options
    )


def _endpoint(server: EdgeServer, keys: ThrowawayKeys) -> EdgeEndpoint:
    return EdgeEndpoint(f"ws://127.0.0.1:{server.port}", keys.server.public)


def test_requests_go_to_every_server_and_come_back_right(bundle, fleet_keys, samples):
    async def main():
        servers = [_server(k, bundle, workers=2) for k in fleet_keys[:2]]
        for server in servers:
            await server.start()
        try:
            endpoints = [_endpoint(s, k) for s, k in zip(servers, fleet_keys, strict=False)]
            async with _client(bundle, fleet_keys[0], endpoints) as client:
                answered = []
                for _round in range(3):
                    for inputs, expected in samples:
                        assert_same(await client.run(inputs), expected)
                        timing = client.last_timing
                        assert timing is not None and timing.offloaded and timing.attempts == 1
                        answered.append(timing.server)
                loads = [link.last_load for link in client.links]
                status = await client.links[0].status()
            return answered, loads, status, [s.stats.results for s in servers], endpoints
        finally:
            for server in servers:
                await server.shutdown()

    answered, loads, status, results, endpoints = run_async(main())
    # Both were measured (unmeasured servers go first), and both did work.
    assert {e.url for e in endpoints} == set(answered)
    assert sum(results) == len(answered) == 12 and min(results) >= 1
    for load in loads:
        assert load is not None and load.workers == 2 and not load.draining
        assert load.tail_ms is not None and load.tail_ms > 0
    assert status.load.workers == 2 and status.load.inflight == 0
    assert [(b.identity, b.version) for b in status.bundles] == [
        (bundle.manifest.identity, bundle.manifest.version)
    ]


def test_untrusted_unreachable_and_lying_servers_are_skipped(bundle, fleet_keys, samples):
    """Each bad server fails its request over to the honest one; every answer is right."""

    async def main():
        honest = _server(fleet_keys[0], bundle)
        garbage = _server(fleet_keys[1], bundle, GarbageLoadServer)
        wrong_id = _server(fleet_keys[2], bundle, WrongIdServer)
        impostor = _server(fleet_keys[2], bundle)  # serves with C's key, pinned as B's
        for server in (honest, garbage, wrong_id, impostor):
            await server.start()
        dead = _server(fleet_keys[0], bundle)
        await dead.start()
        dead_port = dead.port
        await dead.shutdown()  # nothing listens there any more
        try:
            endpoints = [
                EdgeEndpoint(f"ws://127.0.0.1:{impostor.port}", fleet_keys[1].server.public),
                EdgeEndpoint(f"ws://127.0.0.1:{dead_port}", fleet_keys[0].server.public),
                _endpoint(garbage, fleet_keys[1]),
                _endpoint(wrong_id, fleet_keys[2]),
                _endpoint(honest, fleet_keys[0]),
            ]
            async with _client(bundle, fleet_keys[0], endpoints, retries=4) as client:
                served = []
                for inputs, expected in samples * 2:
                    assert_same(await client.run(inputs), expected)
                    assert client.last_timing is not None
                    served.append(client.last_timing.server)
                errors = {link.url: link.last_error for link in client.links}
            return served, errors, endpoints
        finally:
            for server in (honest, garbage, wrong_id, impostor):
                await server.shutdown()

    served, errors, endpoints = run_async(main())
    impostor, dead, garbage, wrong_id, honest = (e.url for e in endpoints)
    assert set(served) == {honest}
    assert "rejected the handshake" in errors[impostor]
    assert "cannot reach" in errors[dead]
    assert "load report" in errors[garbage]
    assert "not a request of this kind pending" in errors[wrong_id]


def test_only_untrusted_servers_is_an_authentication_error_not_a_fallback(
    bundle, fleet_keys, samples
):
    async def main():
        server = _server(fleet_keys[0], bundle)
        await server.start()
        try:
            wrong = [EdgeEndpoint(f"ws://127.0.0.1:{server.port}", fleet_keys[1].server.public)]
            async with _client(bundle, fleet_keys[0], wrong, fallback="local") as client:
                with pytest.raises(AuthenticationFailed):
                    await client.run(samples[0][0])
        finally:
            await server.shutdown()

    run_async(main())


def test_a_killed_server_fails_over_and_a_restarted_one_comes_back(bundle, fleet_keys, samples):
    """SIGSTOP then SIGKILL a server with a request on it: that request is answered by the
    other server (same id, never twice to one server); after a restart on the same port the
    first server is probed back into rotation."""
    a = spawn_server([bundle.path], fleet_keys[0])
    b = spawn_server([bundle.path], fleet_keys[1])
    restarted = None
    try:
        endpoints = [EdgeEndpoint(a.url, fleet_keys[0].server.public)]
        endpoints.append(EdgeEndpoint(b.url, fleet_keys[1].server.public))

        async def main():
            nonlocal restarted
            async with _client(bundle, fleet_keys[0], endpoints) as client:
                for inputs, expected in samples:  # both measured
                    assert_same(await client.run(inputs), expected)
                os.kill(a.pid, signal.SIGSTOP)
                tasks = []
                for _burst in range(5):  # bursts load b until one request waits on a
                    for inputs, expected in samples:
                        tasks.append((asyncio.create_task(client.run(inputs)), expected))
                    await asyncio.sleep(0.2)
                    if client.pool.router.servers[a.url].in_flight:
                        break
                assert client.pool.router.servers[a.url].in_flight, "nothing went to a"
                os.kill(a.pid, signal.SIGKILL)
                for task, expected in tasks:  # fallback="error": answered by a server
                    assert_same(await asyncio.wait_for(task, STEP), expected)
                a_error = client.links[0].last_error
                a.process.wait(10)
                # While a is dead, everything goes to b; then a comes back on its port.
                assert_same(await client.run(samples[0][0]), samples[0][1])
                assert client.last_timing is not None and client.last_timing.server == b.url
                restarted = spawn_server([bundle.path], fleet_keys[0], port=a.port)
                back = False
                for _burst in range(30):  # bounded: bursts over at least 3 s of probing
                    outs = await asyncio.gather(*(client.run(x) for x, _ in samples))
                    for got, (_, expected) in zip(outs, samples, strict=True):
                        assert_same(got, expected)
                    if _results(restarted.port) > 0:
                        back = True
                        break
                    await asyncio.sleep(0.1)
                return back, a_error

        back, a_error = run_async(main(), 120)
        assert a_error, "the request on the killed server did not fail there"
        assert back, "the restarted server never got a request again"
    finally:
        for server in (a, b, restarted):
            if server is not None:
                _kill(server)


def _results(port: int) -> float:
    """Results the server at ``port`` has answered, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "edgeoffload_results"
        for sample in family.samples
        if sample.name == "edgeoffload_results_total"
    )


def _kill(server) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(server.pid, signal.SIGCONT)
    server.process.kill()
    server.process.wait(10)


def test_failover_counts_one_attempt_per_server(bundle, fleet_keys, samples):
    """Two dead servers and one live: the request tries each at most once and is answered."""

    async def main():
        live = _server(fleet_keys[0], bundle)
        await live.start()
        dead = []
        for keys in fleet_keys[1:]:
            server = _server(keys, bundle)
            await server.start()
            dead.append((server.port, keys))
            await server.shutdown()
        try:
            endpoints = [EdgeEndpoint(f"ws://127.0.0.1:{p}", k.server.public) for p, k in dead]
            endpoints.append(_endpoint(live, fleet_keys[0]))
            async with _client(bundle, fleet_keys[0], endpoints, retries=5) as client:
                outcomes = []
                for inputs, expected in samples:
                    assert_same(await client.run(inputs), expected)
                    assert client.last_timing is not None
                    outcomes.append((client.last_timing.attempts, client.last_timing.server))
            with pytest.raises(OffloadUnavailable):  # retries=0 and only dead servers
                async with _client(bundle, fleet_keys[0], endpoints[:2], retries=0) as lone:
                    await lone.run(samples[0][0])
            return outcomes, endpoints[-1].url
        finally:
            await live.shutdown()

    outcomes, live_url = run_async(main())
    assert all(server == live_url for _, server in outcomes)
    assert all(1 <= attempts <= 3 for attempts, _ in outcomes)
    assert outcomes[0][0] >= 1


def test_a_generation_survives_the_death_of_its_server(tiny_llama_bundle, fleet_keys):
    """SIGKILL the server holding the session mid-reply: the device rebuilds the session on
    the other server by replay and the reply has exactly the tokens of an uninterrupted one."""
    prompt, new_tokens, kill_after = [5, 6, 7, 8], 16, 5
    servers = [spawn_server([tiny_llama_bundle.path], k) for k in fleet_keys[:2]]
    try:
        endpoints = [
            EdgeEndpoint(s.url, k.server.public) for s, k in zip(servers, fleet_keys, strict=False)
        ]

        async def main():
            async with _client(tiny_llama_bundle, fleet_keys[0], endpoints) as client:
                stream = client.generate(input_ids=prompt, max_new_tokens=new_tokens)
                expected = [t.token_id async for t in stream if t.token_id >= 0]
                assert stream.stats.recoveries == 0
                stream = client.generate(input_ids=prompt, max_new_tokens=new_tokens)
                got, killed = [], None
                async for item in stream:
                    if item.token_id >= 0:
                        got.append(item.token_id)
                    if len(got) == kill_after:
                        assert stream.session is not None
                        killed = client.pool.session_server(stream.session)
                        victim = next(s for s in servers if s.url == killed)
                        victim.process.kill()
                        victim.process.wait(10)
                return expected, got, stream.stats, killed

        expected, got, stats, killed = run_async(main(), 120)
    finally:
        for server in servers:
            _kill(server)
    assert len(expected) == new_tokens
    assert got == expected
    assert killed is not None and stats.recoveries >= 1 and stats.fallback_reason == ""


def test_cli_run_and_fleet_status_with_several_servers(bundle, fleet_keys, samples, tmp_path):

    a = spawn_server([bundle.path], fleet_keys[0])
    b = spawn_server([bundle.path], fleet_keys[1])
    try:
        _kill(b)  # a known server that is down
        fleet = tmp_path / "fleet.txt"
        fleet.write_text(
            "# two servers\n"
            f"{a.url} {encode_public(fleet_keys[0].server.public)}\n"
            f"{b.url} {fleet_keys[1].server_dir}\n"
        )
        base = [sys.executable, "-m", "edgeoffload.cli"]
        key = ["--key", str(fleet_keys[0].device_dir())]
        status = subprocess.run(
            [*base, "fleet", "status", str(bundle.path), *key, "--fleet", str(fleet), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        rows = {row["url"]: row for row in _json_objects(status.stdout)}
        assert rows[a.url]["state"] == "ok" and rows[a.url]["workers"] >= 1
        assert rows[a.url]["bundles"] == [bundle.manifest.version]
        assert rows[b.url]["state"].startswith("error: cannot reach")

        inputs, expected = samples[0]
        np.savez(tmp_path / "in.npz", **inputs)
        servers = [
            "--server",
            f"{b.url}={fleet_keys[1].server_dir}",
            "--server",
            f"{a.url}={fleet_keys[0].server_dir}",
        ]
        run = subprocess.run(
            [*base, "run", str(bundle.path), *key, *servers, "--fallback", "error",
             "--input", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz")],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        got = dict(np.load(tmp_path / "out.npz"))
        assert_same(got, expected)
        lone = subprocess.run(
            [*base, "run", str(bundle.path), *key, "--server", a.url, "--server", b.url,
             "--server-key", str(fleet_keys[0].server_dir),
             "--input", str(tmp_path / "in.npz"), "-o", str(tmp_path / "x.npz")],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
        assert lone.returncode == 2 and "URL=KEY" in lone.stderr
    finally:
        _kill(a)
        _kill(b)


def _json_objects(text: str):
    """The JSON objects printed one after another (rich pretty-prints each)."""
    decoder = json.JSONDecoder()
    index = 0
    text = text.strip()
    while index < len(text):
        obj, end = decoder.raw_decode(text, index)
        yield obj
        index = end
        while index < len(text) and text[index].isspace():
            index += 1
