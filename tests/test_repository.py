"""The edge server's model repository: ``DIR/<model>/<version>/``, loaded, served and drained live.

Pure parts first (policy parsing, the desired set, numeric ordering, scanning and the tree's
fingerprint), then a real EdgeServer on 127.0.0.1 (port 0) in this process, or as a process
(``spawn_server``) for SIGHUP, with real devices, keys, crypto and onnxruntime. The versions are
two splits of the zoo ResNet with different weight seeds, so a device answered by the wrong
version would see different logits. Every wait and loop is bounded; the assertions are on
counts and orderings, never on wall-clock bounds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeoffload.bundle import Bundle, load_bundle
from edgeoffload.device.client import OffloadClient
from edgeoffload.device.runtime import DeviceRuntime
from edgeoffload.edge.allowlist import AllowList
from edgeoffload.edge.repository import (
    DEFAULT_POLICY,
    ModelRepository,
    VersionPolicy,
    desired_versions,
    version_numbers,
)
from edgeoffload.edge.server import EdgeServer, ServerConfig
from edgeoffload.errors import EdgeOffloadError, UsageError
from edgeoffload.lab.harness import ThrowawayKeys, spawn_server
from edgeoffload.split import zoo
from edgeoffload.split.analysis import Analysis
from edgeoffload.split.splitter import split_model

STEP = 15.0  # seconds: bound on any single wait
TEST_TIMEOUT = 90.0


def run_async(coro: Awaitable[Any], timeout: float = TEST_TIMEOUT) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


# -- pure: policies, the desired set, ordering ----------------------------------------------------


def test_policy_parsing() -> None:
    assert VersionPolicy.parse({"policy": "latest"}) == VersionPolicy("latest", count=1)
    assert VersionPolicy.parse({"policy": "latest", "count": 3}).count == 3
    pinned = VersionPolicy.parse({"policy": "pinned", "versions": [4, 3, 4]})
    assert pinned == VersionPolicy("pinned", versions=(3, 4))
    assert VersionPolicy("latest", count=1) == DEFAULT_POLICY
    for bad in (
        [],
        {"policy": "newest"},
        {"policy": "latest", "count": 0},
        {"policy": "latest", "count": "2"},
        {"policy": "latest", "count": True},
        {"policy": "latest", "count": 1, "extra": 1},
        {"policy": "pinned"},
        {"policy": "pinned", "versions": []},
        {"policy": "pinned", "versions": [0]},
        {"policy": "pinned", "versions": [1.5]},
        {"policy": "pinned", "versions": "3"},
    ):
        with pytest.raises(UsageError):
            VersionPolicy.parse(bad)


def test_version_numbers_are_ordered_numerically_and_triton_names_only() -> None:
    names = ["9", "10", "2", "010", "0", "-1", "v3", "1.5", ".7", "11"]
    assert version_numbers(names) == [2, 9, 10, 11]
    assert VersionPolicy("latest", count=1).select([9, 10, 2]) == {10}
    assert VersionPolicy("latest", count=2).select([9, 10, 2]) == {9, 10}
    assert VersionPolicy("latest", count=5).select([9, 10]) == {9, 10}
    assert VersionPolicy("pinned", versions=(2, 7)).select([1, 2, 3]) == {2}


def test_desired_set() -> None:
    latest1, latest2 = VersionPolicy("latest", count=1), VersionPolicy("latest", count=2)
    assert desired_versions(latest1, [1, 2, 3]) == {3}
    assert desired_versions(latest2, [1, 2, 3]) == {2, 3}
    # A refused newest version: latest N falls back to the ones that load.
    assert desired_versions(latest1, [1, 2, 3], failed=[3], serving=[2]) == {2}
    assert desired_versions(latest2, [1, 2, 3], failed=[3], serving=[2]) == {1, 2}
    # A pinned typo or a refused pinned version keeps what serves; never an empty model.
    pinned9 = VersionPolicy("pinned", versions=(9,))
    assert desired_versions(pinned9, [1, 2], serving=[2]) == {2}
    pinned3 = VersionPolicy("pinned", versions=(3,))
    assert desired_versions(pinned3, [2, 3], failed=[3], serving=[2]) == {2}
    # Every version folder deleted: nothing is kept (deliberate).
    assert desired_versions(latest1, [], serving=[2]) == frozenset()


def _fake_version(folder: Path, text: str = "{}") -> None:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(text)


def test_scan_and_fingerprint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "repo"
    for n in ("1", "2", "10"):
        _fake_version(root / "resnet" / n)
    (root / "resnet" / "3").mkdir()  # no manifest yet (being copied): not present
    (root / "resnet" / "notes").mkdir()
    (root / "resnet" / "README").write_text("ignored")
    _fake_version(root / ".hidden" / "1")
    _fake_version(root / "encoder" / "4")
    (root / "encoder" / "policy.json").write_text('{"policy": "pinned", "versions": [4]}')
    (root / "loose-file").write_text("ignored")
    repo = ModelRepository(root)
    state = repo.scan()
    assert state.problem is None
    assert sorted(state.models) == ["encoder", "resnet"]
    resnet = state.models["resnet"]
    assert resnet.numbers == (1, 2, 10)
    assert resnet.policy == DEFAULT_POLICY
    assert resnet.desired() == {10}
    assert state.models["encoder"].desired() == {4}

    fp = repo.fingerprint()
    assert repo.fingerprint() == fp  # stable while nothing changes
    (root / "resnet" / "3" / "manifest.json").write_text("{}")
    fp2 = repo.fingerprint()
    assert fp2 != fp
    (root / "resnet" / "3" / "tail.onnx").write_bytes(b"x")  # a part of a version changed
    fp3 = repo.fingerprint()
    assert fp3 != fp2
    (root / "resnet" / "policy.json").write_text('{"policy": "latest", "count": 2}')
    assert repo.fingerprint() != fp3
    assert repo.scan().models["resnet"].desired() == {3, 10}

    # Malformed policy: logged once, the model keeps what it has (desired None).
    (root / "resnet" / "policy.json").write_text('{"policy": "latest", "count": -1}')
    with caplog.at_level(logging.ERROR, logger="edgeoffload.edge.repository"):
        for _ in range(3):
            bad = repo.scan().models["resnet"]
            assert bad.policy is None and bad.desired(serving=[2]) is None
    assert len([r for r in caplog.records if "count" in r.getMessage()]) == 1
    (root / "resnet" / "policy.json").write_text("not json")
    assert repo.scan().models["resnet"].policy is None

    # An unreadable root is a problem, not a crash; a missing one refuses to start.
    gone = ModelRepository(tmp_path / "missing")
    assert gone.scan().problem is not None
    with pytest.raises(UsageError):
        gone.check_root()


# -- fixtures: keys, two versions of one model ----------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayKeys:
    return ThrowawayKeys.create(tmp_path_factory.mktemp("keys"), devices=("dev-a", "dev-b"))


def _resnet_bundle(seed: int, out: Path) -> Bundle:
    analysis = Analysis.of(zoo.build("resnet", seed=seed))
    n = len(analysis.graph.nodes)
    interior = [c for c in analysis.cuts if 0 < c.index < n]
    return split_model(analysis, interior[len(interior) // 2], out, codec="none")


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Bundle]:
    """Version 1 and 2 of "resnet": the same architecture, weights from seeds 1 and 2."""
    root = tmp_path_factory.mktemp("resnet-versions")
    out = {n: _resnet_bundle(n, root / f"v{n}") for n in (1, 2)}
    assert out[1].manifest.version != out[2].manifest.version
    return out


@pytest.fixture(scope="module")
def sample() -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(3).standard_normal((1, 3, 224, 224), np.float32)}


@pytest.fixture(scope="module")
def expected(versions: dict[int, Bundle], sample: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    out = {n: DeviceRuntime(b).run_local(sample)["logits"] for n, b in versions.items()}
    assert not np.array_equal(out[1], out[2])
    return out


def publish(bundle: Bundle, repo: Path, model: str, number: int) -> Path:
    """Copy a bundle beside the tree, then rename it into place (how to publish atomically)."""
    staging = repo / f".incoming-{model}-{number}"
    shutil.copytree(bundle.path, staging)
    (repo / model).mkdir(parents=True, exist_ok=True)
    target = repo / model / str(number)
    os.rename(staging, target)
    return target


def write_policy(repo: Path, model: str, policy: dict[str, Any] | str) -> None:
    text = policy if isinstance(policy, str) else json.dumps(policy)
    tmp = repo / model / ".policy.tmp"
    tmp.write_text(text)
    os.replace(tmp, repo / model / "policy.json")


def make_server(repo: Path, keys: ThrowawayKeys, *, interval: float = 3600.0, **kw: Any):
    return EdgeServer(
        [],
        identity=keys.server,
        allow=AllowList(keys.allow_file),
        config=ServerConfig(port=0, workers=2, repository_interval=interval, **kw),
        repository=repo,
    )


def client(bundle: Bundle, port: int, keys: ThrowawayKeys, device: int = 0) -> OffloadClient:
    identity = keys.device if device == 0 else keys.devices[list(keys.devices)[device]]
    return OffloadClient(
        bundle,
        server=f"ws://127.0.0.1:{port}",
        server_key=keys.server.public,
        identity=identity,
        fallback="error",
        retries=0,
    )


async def until(check: Callable[[], bool], what: str, timeout: float = STEP) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)


def state_of(server: EdgeServer, model: str, number: int) -> str | None:
    for v in server.hosted_versions():
        if v.model == model and v.number == number:
            return v.state
    return None


class Looper:
    """A device that runs requests on one connection until stopped (bounded), and checks
    every answer against its version's local result."""

    def __init__(self, c: OffloadClient, sample: dict[str, np.ndarray], want: np.ndarray):
        self.client, self.sample, self.want = c, sample, want
        self.answered = 0
        self.failures: list[BaseException] = []
        self.stop = asyncio.Event()
        self.marks: dict[str, int] = {}  # event -> answers seen when it happened

    async def run(self, limit: int = 2000) -> None:
        async with self.client:
            for _ in range(limit):
                if self.stop.is_set():
                    break
                try:
                    got = await self.client.run(self.sample)
                    np.testing.assert_array_equal(got["logits"], self.want)
                    assert self.client.last_timing is not None
                    assert self.client.last_timing.offloaded
                except (EdgeOffloadError, AssertionError) as exc:
                    self.failures.append(exc)
                    break
                self.answered += 1

    def mark(self, name: str) -> None:
        self.marks[name] = self.answered


# -- a live server -------------------------------------------------------------------------------


def test_new_version_loads_while_the_old_serves_then_the_old_drains(
    tmp_path: Path, keys: ThrowawayKeys, versions: dict[int, Bundle], sample, expected
) -> None:
    """The watcher (file changes, 0.1 s polls): v2 appears while a device loops on v1; v1
    keeps being answered, a v2 device is served; latest 1 drains v1, which is unloaded only
    once its device has gone, with no v1 request failed."""
    repo = tmp_path / "repo"
    publish(versions[1], repo, "resnet", 1)
    write_policy(repo, "resnet", {"policy": "latest", "count": 2})
    v1, v2 = versions[1].manifest.version, versions[2].manifest.version

    async def main() -> None:
        server = make_server(repo, keys, interval=0.1)
        await server.start()
        try:
            assert list(server.bundles) == [v1]
            looper = Looper(client(versions[1], server.port, keys), sample, expected[1])
            task = asyncio.create_task(looper.run())
            await until(lambda: looper.answered >= 3 or task.done(), "v1 answers")
            publish(versions[2], repo, "resnet", 2)
            await until(lambda: v2 in server.bundles, "v2 loaded by the watcher")
            looper.mark("v2 loaded")
            assert v1 in server.bundles  # latest 2: both serve
            async with client(versions[2], server.port, keys, device=1) as c2:
                got = await c2.run(sample)
                np.testing.assert_array_equal(got["logits"], expected[2])
            latest = server.latest_for(v1)
            assert latest is not None and latest.version == v2 and latest.number == 2
            assert server.latest_for(v2) is None

            write_policy(repo, "resnet", {"policy": "latest", "count": 1})
            await until(lambda: state_of(server, "resnet", 1) == "draining", "v1 draining")
            looper.mark("v1 draining")
            assert v1 not in server.bundles and v2 in server.bundles
            # The v1 device goes on being answered while v1 drains, on v1.
            before = looper.answered
            await until(lambda: looper.answered >= before + 3 or task.done(), "draining answers")
            assert state_of(server, "resnet", 1) == "draining"  # its device is still there
            (view,) = [v for v in server.hosted_versions() if v.number == 1]
            assert view.connections == 1 and view.path == repo / "resnet" / "1"
            # A new device on v1 is refused: a draining version takes no new handshake.
            with pytest.raises(EdgeOffloadError):
                async with client(versions[1], server.port, keys, device=1) as late:
                    await late.run(sample)
            looper.stop.set()
            await asyncio.wait_for(task, STEP)
            await until(lambda: state_of(server, "resnet", 1) is None, "v1 unloaded")
            assert looper.failures == []
            assert looper.marks["v2 loaded"] >= 3
            assert looper.answered > looper.marks["v1 draining"] >= looper.marks["v2 loaded"]
            assert server.stats.bundles_loaded == 2 and server.stats.bundles_unloaded == 1
            assert [v.version for v in server.hosted_versions()] == [v2]
            metrics, _ = server.stats.exposition()
            assert b"edgeoffload_bundle_unloaded_total{" in metrics
            assert b"edgeoffload_bundles_serving 1.0" in metrics
            assert server.stats.errors.get("internal") is None
        finally:
            await server.shutdown()

    run_async(main())


def test_drain_waits_for_the_request_in_flight(
    tmp_path: Path, keys: ThrowawayKeys, versions: dict[int, Bundle], sample, expected
) -> None:
    """A version leaves the policy while one of its requests runs: it is unloaded after that
    request's answer and the device's goodbye, not before."""
    repo = tmp_path / "repo"
    publish(versions[1], repo, "resnet", 1)
    v1 = versions[1].manifest.version
    order: list[str] = []

    async def main() -> None:
        server = make_server(repo, keys)
        await server.start()
        unload = server._maybe_unload

        def spy(hosted: Any) -> None:
            unload(hosted)
            if hosted.info.version == v1 and v1 not in server._hosted and "unloaded" not in order:
                order.append("unloaded")

        server._maybe_unload = spy  # type: ignore[method-assign]
        # Hold the tail run on its worker until the drain has begun (then run it for real).
        entered, gate = threading.Event(), threading.Event()
        real_tail = server._run_tail

        def gated_tail(hosted: Any, request: Any) -> Any:
            entered.set()
            gate.wait(STEP)
            return real_tail(hosted, request)

        server._run_tail = gated_tail  # type: ignore[method-assign]
        try:
            async with client(versions[1], server.port, keys) as c:
                request = asyncio.create_task(c.run(sample))
                await until(entered.is_set, "request in flight")
                publish(versions[2], repo, "resnet", 2)
                await server.sync()  # latest 1: v1 drains with the request in flight
                (view,) = [v for v in server.hosted_versions() if v.number == 1]
                assert (view.state, view.inflight) == ("draining", 1)
                gate.set()
                got = await asyncio.wait_for(request, STEP)
                order.append("answered")
                np.testing.assert_array_equal(got["logits"], expected[1])
                assert state_of(server, "resnet", 1) == "draining"  # the connection holds it
                order.append("closing")
            await until(lambda: state_of(server, "resnet", 1) is None, "v1 unloaded")
            assert order == ["answered", "closing", "unloaded"]
            assert server.stats.errors == {}
        finally:
            await server.shutdown()

    run_async(main())


def test_corrupt_version_is_refused_and_the_old_keeps_serving(
    tmp_path: Path,
    keys: ThrowawayKeys,
    versions: dict[int, Bundle],
    sample,
    expected,
    caplog: pytest.LogCaptureFixture,
) -> None:
    repo = tmp_path / "repo"
    publish(versions[1], repo, "resnet", 1)
    v1, v2 = versions[1].manifest.version, versions[2].manifest.version

    async def main() -> None:
        server = make_server(repo, keys)
        await server.start()
        try:
            target = publish(versions[2], repo, "resnet", 2)
            tail = target / "tail.onnx"
            good = tail.read_bytes()
            data = bytearray(good)
            data[len(data) // 2] ^= 0x01
            tail.write_bytes(bytes(data))
            with caplog.at_level(logging.ERROR, logger="edgeoffload.edge.server"):
                await server.sync()
                await server.sync()  # unchanged files: not retried, not logged again
            refused = [r for r in caplog.records if "refused" in r.getMessage()]
            assert len(refused) == 1 and "ManifestError" in refused[0].getMessage()
            assert server.stats.bundles_refused == 1
            assert list(server.bundles) == [v1]
            assert state_of(server, "resnet", 1) == "serving"
            async with client(versions[1], server.port, keys) as c:
                np.testing.assert_array_equal((await c.run(sample))["logits"], expected[1])
                # Restoring the file changes the folder's fingerprint: retried, loaded.
                tail.write_bytes(good)
                os.utime(tail, ns=(time.time_ns(), time.time_ns() + 1_000_000))
                await server.sync()
                assert list(server.bundles) == [v2]
                assert state_of(server, "resnet", 1) == "draining"
                np.testing.assert_array_equal((await c.run(sample))["logits"], expected[1])
            await until(lambda: state_of(server, "resnet", 1) is None, "v1 unloaded")
            assert server.stats.errors == {}
        finally:
            await server.shutdown()

    run_async(main())


def test_malformed_policy_keeps_what_serves_and_pinned_and_undrain(
    tmp_path: Path, keys: ThrowawayKeys, versions: dict[int, Bundle], sample, expected
) -> None:
    repo = tmp_path / "repo"
    publish(versions[1], repo, "resnet", 1)
    publish(versions[2], repo, "resnet", 2)
    write_policy(repo, "resnet", {"policy": "pinned", "versions": [1]})
    v1, v2 = versions[1].manifest.version, versions[2].manifest.version

    async def main() -> None:
        server = make_server(repo, keys)
        await server.start()
        try:
            assert list(server.bundles) == [v1]
            write_policy(repo, "resnet", '{"policy": "pinned", "versions": [2,')  # a typo
            await server.sync()
            assert list(server.bundles) == [v1]
            write_policy(repo, "resnet", {"policy": "pinned", "versions": [7]})  # absent
            await server.sync()
            assert list(server.bundles) == [v1]
            async with client(versions[1], server.port, keys) as c:
                await c.run(sample)  # connected: its connection holds v1 while it drains
                write_policy(repo, "resnet", {"policy": "pinned", "versions": [2]})
                await server.sync()
                assert list(server.bundles) == [v2]
                assert state_of(server, "resnet", 1) == "draining"
                loaded = server.stats.bundles_loaded
                # Wanted again while draining: back to serving, without a reload.
                write_policy(repo, "resnet", {"policy": "pinned", "versions": [1, 2]})
                await server.sync()
                assert sorted(server.bundles) == sorted([v1, v2])
                assert state_of(server, "resnet", 1) == "serving"
                assert server.stats.bundles_loaded == loaded
                np.testing.assert_array_equal((await c.run(sample))["logits"], expected[1])
            assert server.stats.bundles_unloaded == 0
            # Deleting the model folder drains everything of it; /readyz then says not ready.
            shutil.rmtree(repo / "resnet")
            await server.sync()
            await until(lambda: not server.hosted_versions(), "all unloaded")
            assert server.bundles == {}
        finally:
            await server.shutdown()

    run_async(main())


def test_removing_a_version_folder_never_breaks_a_request_in_flight(
    tmp_path: Path, keys: ThrowawayKeys, versions: dict[int, Bundle], sample, expected
) -> None:
    repo = tmp_path / "repo"
    publish(versions[1], repo, "resnet", 1)
    publish(versions[2], repo, "resnet", 2)
    write_policy(repo, "resnet", {"policy": "latest", "count": 2})

    async def main() -> None:
        server = make_server(repo, keys, interval=0.05)
        await server.start()
        try:
            assert len(server.bundles) == 2
            loopers = [
                Looper(client(versions[n], server.port, keys, device=n - 1), sample, expected[n])
                for n in (1, 2)
            ]
            tasks = [asyncio.create_task(lp.run()) for lp in loopers]
            await until(lambda: all(lp.answered >= 2 for lp in loopers), "both answered")
            shutil.rmtree(repo / "resnet" / "1")  # files gone under a version serving
            await until(lambda: state_of(server, "resnet", 1) == "draining", "v1 draining")
            before = loopers[0].answered
            await until(lambda: loopers[0].answered >= before + 3, "v1 served from memory")
            for lp in loopers:
                lp.stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), STEP)
            await until(lambda: state_of(server, "resnet", 1) is None, "v1 unloaded")
            assert [lp.failures for lp in loopers] == [[], []]
            assert state_of(server, "resnet", 2) == "serving"
        finally:
            await server.shutdown()

    run_async(main())


def test_readyz_needs_a_serving_version(tmp_path: Path, keys: ThrowawayKeys, versions) -> None:
    import urllib.error
    import urllib.request

    def readyz(port: int) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    repo = tmp_path / "repo"
    repo.mkdir()

    async def main() -> None:
        server = make_server(repo, keys)
        await server.start()
        try:
            assert await asyncio.to_thread(readyz, server.port) == 503
            publish(versions[1], repo, "resnet", 1)
            await server.sync()
            assert await asyncio.to_thread(readyz, server.port) == 200
        finally:
            await server.shutdown()

    run_async(main())
    with pytest.raises(UsageError):
        make_server(tmp_path / "missing", keys)


def test_sighup_syncs_the_repository(
    tmp_path: Path, keys: ThrowawayKeys, versions: dict[int, Bundle], sample, expected
) -> None:
    """``serve --repository`` as a process with a poll interval of an hour: only SIGHUP makes
    it see version 2."""
    repo = tmp_path / "repo"
    publish(versions[1], repo, "resnet", 1)
    write_policy(repo, "resnet", {"policy": "latest", "count": 2})
    server = spawn_server([], keys, extra_args=["--repository", str(repo)])
    try:

        async def run_on(n: int) -> np.ndarray:
            async with client(versions[n], server.port, keys) as c:
                return (await c.run(sample))["logits"]

        np.testing.assert_array_equal(run_async(run_on(1)), expected[1])
        publish(versions[2], repo, "resnet", 2)
        with pytest.raises(EdgeOffloadError):
            run_async(run_on(2))
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + STEP
        while True:
            try:
                got = run_async(run_on(2))
                break
            except EdgeOffloadError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        np.testing.assert_array_equal(got, expected[2])
        np.testing.assert_array_equal(run_async(run_on(1)), expected[1])
    finally:
        server.stop()


# -- generation sessions ---------------------------------------------------------------------------


def test_a_generation_keeps_its_version_until_it_ends(
    tmp_path: Path, keys: ThrowawayKeys, tiny_decoder_bundle
) -> None:
    first, second = tiny_decoder_bundle("llama", 2), tiny_decoder_bundle("llama", 1)
    assert first.manifest.version != second.manifest.version
    repo = tmp_path / "repo"
    publish(first, repo, "llama", 1)
    v1 = first.manifest.version
    prompt = [5, 17, 42, 99, 3]
    tokens = 24

    async def generate(server: EdgeServer, on_token: Callable[[int], Awaitable[None]] | None):
        c = client(first, server.port, keys)
        out = []
        async with c:
            stream = c.generate(input_ids=prompt, max_new_tokens=tokens)
            try:
                async for item in stream:
                    if item.token_id >= 0:
                        out.append(item.token_id)
                        if on_token is not None:
                            await on_token(len(out))
            finally:
                await asyncio.wait_for(stream.aclose(), STEP)
            assert stream.stats.recoveries == 0 and stream.stats.fallback_reason == ""
        return out

    async def main() -> None:
        server = make_server(repo, keys)
        await server.start()
        seen: dict[str, Any] = {}
        try:
            reference = await generate(server, None)

            async def on_token(count: int) -> None:
                if count == 5:  # mid-generation: v2 arrives, latest 1 drains v1
                    publish(second, repo, "llama", 2)
                    await server.sync()
                    (view,) = [v for v in server.hosted_versions() if v.number == 1]
                    seen["at 5"] = (view.state, view.sessions)
                if count == 10:
                    seen["at 10"] = state_of(server, "llama", 1)

            got = await generate(server, on_token)
            assert got == reference and len(got) >= 10
            assert seen == {"at 5": ("draining", 1), "at 10": "draining"}
            await until(lambda: state_of(server, "llama", 1) is None, "v1 unloaded")
            assert server.stats.bundles_unloaded == 1
            assert v1 not in server.bundles and len(server.sessions) == 0
            assert server.stats.errors == {}
        finally:
            await server.shutdown()

    run_async(main())


def test_command_line_bundles_are_not_touched_by_the_repository(
    tmp_path: Path, keys: ThrowawayKeys, versions: dict[int, Bundle]
) -> None:
    repo = tmp_path / "repo"
    publish(versions[2], repo, "resnet", 1)
    given = load_bundle(versions[1].path)

    async def main() -> None:
        server = EdgeServer(
            [given],
            identity=keys.server,
            allow=AllowList(keys.allow_file),
            config=ServerConfig(port=0, repository_interval=3600),
            repository=repo,
        )
        await server.start()
        try:
            views = {v.version: v for v in server.hosted_versions()}
            assert views[given.manifest.version].model is None
            assert views[versions[2].manifest.version].model == "resnet"
            assert server.latest_for(given.manifest.version) is None
            shutil.rmtree(repo / "resnet")
            await server.sync()
            assert list(server.bundles) == [given.manifest.version]
        finally:
            await server.shutdown()

    run_async(main())


def test_drain_timeout_retires_idle_connections_and_rollback_offer(
    tmp_path: Path, keys: ThrowawayKeys, versions: dict[int, Bundle], sample, expected
) -> None:
    """A connection that stays open on a draining version past ``version_drain_timeout`` is
    closed, then the version unloads; a rollback (pinned to the older number) offers the
    older version to holders of the draining newer one."""
    repo = tmp_path / "repo"
    publish(versions[1], repo, "resnet", 1)
    publish(versions[2], repo, "resnet", 2)
    v1, v2 = versions[1].manifest.version, versions[2].manifest.version

    async def main() -> None:
        server = make_server(repo, keys, version_drain_timeout=0.3)
        await server.start()
        try:
            assert list(server.bundles) == [v2]  # default policy: latest 1
            async with client(versions[2], server.port, keys) as c:
                np.testing.assert_array_equal((await c.run(sample))["logits"], expected[2])
                write_policy(repo, "resnet", {"policy": "pinned", "versions": [1]})
                await server.sync()  # a rollback
                assert list(server.bundles) == [v1]
                offer = server.latest_for(v2)
                assert offer is not None and offer.version == v1 and offer.number == 1
                assert server.latest_for(v1) is None
                # The idle v2 connection is retired after the drain timeout.
                await until(lambda: state_of(server, "resnet", 2) is None, "v2 retired")
                with pytest.raises(EdgeOffloadError):
                    await c.run(sample)  # reconnecting on v2 is refused: it is gone
            assert server.stats.bundles_unloaded == 1
        finally:
            await server.shutdown()

    run_async(main())


def test_serve_needs_bundles_or_a_repository(tmp_path: Path, keys: ThrowawayKeys) -> None:
    from edgeoffload.cli import main

    base = ["serve", "--key", str(keys.server_dir), "--allow", str(keys.allow_file)]
    assert main(base) == 2  # nothing to serve: a usage error, before anything starts
    assert main([*base, "--repository", str(tmp_path / "missing")]) == 2


def test_with_trusted_publishers_an_unsigned_version_is_refused(
    tmp_path: Path, keys: ThrowawayKeys, versions: dict[int, Bundle], caplog
) -> None:
    repo = tmp_path / "repo"
    publish(versions[1], repo, "resnet", 1)

    async def main() -> None:
        server = EdgeServer(
            [],
            identity=keys.server,
            allow=AllowList(keys.allow_file),
            config=ServerConfig(port=0, repository_interval=3600),
            repository=repo,
            trusted=(),  # trusts nobody: every version must be refused
        )
        with caplog.at_level(logging.ERROR, logger="edgeoffload.edge.server"):
            await server.start()
        try:
            assert server.bundles == {} and server.stats.bundles_refused == 1
            assert any("resnet version 1 refused" in r.getMessage() for r in caplog.records)
        finally:
            await server.shutdown()

    run_async(main())
