"""Devices that update their head (PROTOCOL.md §16).

First the sans-I/O protocol: the ``"update"`` feature, the offer in the welcome and in
``status``, ``fetch``/``file`` and their bounds, and that without the feature nothing new is on
the wire. Then the golden vectors' ``update`` entries. Then a real EdgeServer on 127.0.0.1
serving a model repository with two versions of the zoo ResNet (weights from seeds 1 and 2,
split at the same cut, both signed by one publisher), and real devices: ``auto`` downloads v2
and its next request is answered by v2; a download cut off resumes; a flipped byte, a
truncated file and an unknown publisher are refused with a typed error while the device goes
on with v1; ``pinned`` never downloads; ``notify`` only records. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeoffload.bundle import Bundle
from edgeoffload.device.client import OffloadClient, _PinnedChannel
from edgeoffload.device.runtime import DeviceRuntime
from edgeoffload.device.updates import (
    BundleStore,
    UpdateCorrupt,
    UpdateError,
    verify_device_bundle,
)
from edgeoffload.edge.allowlist import AllowList
from edgeoffload.edge.server import EdgeServer, ServerConfig
from edgeoffload.edge.updates import UpdateService
from edgeoffload.errors import (
    LocalProtocolError,
    OffloadUnavailable,
    RemoteProtocolError,
    UnknownPublisher,
    UsageError,
)
from edgeoffload.keys import KeyPair
from edgeoffload.lab.harness import ThrowawayKeys
from edgeoffload.protocol.connection import (
    ClientConnection,
    HostedBundle,
    ReplayGuard,
    ServerConnection,
)
from edgeoffload.protocol.events import (
    ErrorReply,
    FetchRequest,
    FileData,
    HandshakeComplete,
    StatusReply,
    StatusRequest,
)
from edgeoffload.protocol.load import ServerLoad
from edgeoffload.protocol.updates import MAX_FETCH, FetchRefused, UpdateOffer
from edgeoffload.protocol.wire import pack
from edgeoffload.signing import generate_publisher, sign_bundle
from edgeoffload.split import zoo
from edgeoffload.split.analysis import Analysis
from edgeoffload.split.splitter import split_model

CLIENT = KeyPair.from_private(bytes(range(1, 33)))
SERVER = KeyPair.from_private(bytes(range(101, 133)))
T0 = 1_767_225_600_123_456_789
BUNDLE = "83e3c0620000000000000000000000000000000000000000000000000000020ae:c3"
V1, V2 = "0123456789abcdef", "fedcba9876543210"
NEW_BUNDLE = "9999c0620000000000000000000000000000000000000000000000000000020ae:c3"
OFFER = UpdateOffer(V2, NEW_BUNDLE, "resnet", 2)
LOAD = ServerLoad(inflight=0, queued=0, workers=1, kv_free=0, draining=False)


# -- sans-I/O ------------------------------------------------------------------------------------


def pair(
    features: tuple[str, ...] = ("load", "update"), offer: UpdateOffer | None = OFFER
) -> tuple[ClientConnection, ServerConnection, HandshakeComplete]:
    client = ClientConnection(
        static=CLIENT,
        server_public=SERVER.public,
        bundle=BUNDLE,
        version=V1,
        time_ns=T0,
        ephemeral=KeyPair.from_private(bytes([0x11] * 32)),
        features=features,
    )
    server = ServerConnection(
        static=SERVER,
        is_allowed=lambda key: key == CLIENT.public,
        bundles={V1: HostedBundle(BUNDLE, V1)},
        replay_guard=ReplayGuard(),
        max_message=1 << 22,
        ephemeral=KeyPair.from_private(bytes([0x22] * 32)),
        offers=lambda version, device: offer if version == V1 else None,
    )
    client.start()
    deliver(client, server)
    (welcome,) = deliver(server, client)
    assert isinstance(welcome, HandshakeComplete)
    return client, server, welcome


def deliver(src: ClientConnection | ServerConnection, dst: Any) -> list[Any]:
    events: list[Any] = []
    for data in src.data_to_send():
        events.extend(dst.receive(bytes(data)))
    return events


def forge(sender: ClientConnection | ServerConnection, message: dict[str, Any]) -> bytes:
    assert sender.transport is not None
    return bytes(sender.transport.encrypt(pack(message)))


def test_welcome_carries_the_offer_only_under_the_feature() -> None:
    client, server, welcome = pair()
    assert client.features == server.features == ("load", "update")
    assert welcome.update == OFFER
    # Without "update" (a device that asked for "load" only, or nothing): the v1 bytes.
    for features in (("load",), ()):
        client, server, welcome = pair(features)
        assert welcome.update is None and "update" not in server.features
        with pytest.raises(LocalProtocolError):
            client.send_fetch(1, V2, "manifest.json", 0, 10)
        assert client.data_to_send() == []
        with pytest.raises(RemoteProtocolError):
            server.receive(forge(client, fetch_body()))
    # No newer version: no field.
    _, _, welcome = pair(offer=None)
    assert welcome.update is None


def test_welcome_without_the_feature_is_byte_identical_to_a_server_without_offers() -> None:
    a, _, _ = pair(("load",))
    b_client, _, _ = pair(("load",), offer=None)
    # Same keys, clock and ephemerals: the same transport keys, so the same bytes after.
    a.send_ping(1, b"x")
    b_client.send_ping(1, b"x")
    assert a.data_to_send() == b_client.data_to_send()


def fetch_body(**override: Any) -> dict[str, Any]:
    body = {"t": "fetch", "id": 5, "version": V2, "file": "manifest.json", "offset": 0}
    body["length"] = 100
    body.update(override)
    return body


def test_fetch_and_file_round_trip_and_status_offer() -> None:
    client, server, _ = pair()
    client.send_fetch(5, V2, "head.onnx", 64, 100)
    (req,) = deliver(client, server)
    assert req == FetchRequest(5, V2, "head.onnx", 64, 100)
    server.send_file(5, b"a" * 100, 1000)
    (reply,) = deliver(server, client)
    assert reply == FileData(5, b"a" * 100, 1000)
    # The last piece may be short; an empty piece at the very end is fine.
    client.send_fetch(6, V2, "head.onnx", 990, 100)
    deliver(client, server)
    server.send_file(6, b"z" * 10, 1000)
    assert deliver(server, client) == [FileData(6, b"z" * 10, 1000)]
    client.send_status(7)
    (status,) = deliver(client, server)
    assert status == StatusRequest(7)
    server.send_status(7, LOAD, [])
    (answer,) = deliver(server, client)
    assert isinstance(answer, StatusReply) and answer.update == OFFER


@pytest.mark.parametrize(
    "override",
    [
        {"length": 0},
        {"length": MAX_FETCH + 1},
        {"length": True},
        {"offset": -1},
        {"offset": 2**62 + 1},
        {"file": ""},
        {"file": "x" * 256},
        {"version": 7},
        {"extra": 1},
    ],
)
def test_malformed_fetch_is_a_protocol_error(override: dict[str, Any]) -> None:
    client, server, _ = pair()
    with pytest.raises(RemoteProtocolError):
        server.receive(forge(client, fetch_body(**override)))
    client, server, _ = pair()
    body = fetch_body()
    del body["offset"]
    with pytest.raises(RemoteProtocolError):
        server.receive(forge(client, body))


def test_client_refuses_to_send_a_fetch_out_of_bounds() -> None:
    client, _, _ = pair()
    for offset, length in ((0, 0), (0, MAX_FETCH + 1), (-1, 10)):
        with pytest.raises(LocalProtocolError):
            client.send_fetch(1, V2, "head.onnx", offset, length)
    with pytest.raises(LocalProtocolError):
        client.send_fetch(1, V2, "", 0, 10)
    assert client.data_to_send() == []


@pytest.mark.parametrize(
    "body",
    [
        {"t": "file", "id": 5, "data": b"a" * 101, "size": 1000},  # more than asked
        {"t": "file", "id": 5, "data": b"a" * 100, "size": 50},  # past the size
        {"t": "file", "id": 5, "data": b"a" * 50, "size": 1000},  # short before the end
        {"t": "file", "id": 9, "data": b"a" * 100, "size": 1000},  # answers no fetch
        {"t": "file", "id": 5, "data": "text", "size": 1000},  # str, not bin
        {"t": "file", "id": 5, "data": b"a" * 100, "size": -1},
        {"t": "file", "id": 5, "data": b"a" * 100, "size": 1000, "x": 1},
    ],
)
def test_file_reply_is_checked_against_its_fetch(body: dict[str, Any]) -> None:
    client, server, _ = pair()
    client.send_fetch(5, V2, "head.onnx", 0, 100)
    client.data_to_send()
    with pytest.raises(RemoteProtocolError):
        client.receive(forge(server, body))


def test_a_file_reply_answers_one_fetch_once_and_errors_free_it() -> None:
    client, server, _ = pair()
    client.send_fetch(5, V2, "head.onnx", 0, 100)
    deliver(client, server)
    server.send_file(5, b"a" * 100, 100)
    deliver(server, client)
    with pytest.raises(RemoteProtocolError):  # the same reply again
        client.receive(forge(server, {"t": "file", "id": 5, "data": b"", "size": 100}))
    client, server, _ = pair()
    client.send_fetch(5, V2, "tail.onnx", 0, 100)
    deliver(client, server)
    server.send_error(5, "fetch", "not fetchable")
    (error,) = deliver(server, client)
    assert isinstance(error, ErrorReply) and isinstance(error.to_exception(), FetchRefused)
    client.send_fetch(5, V2, "head.onnx", 0, 100)  # the id is free again


@pytest.mark.parametrize(
    "offer",
    [
        {"version": V2, "identity": NEW_BUNDLE, "model": "m"},  # no number
        {"version": V2, "identity": NEW_BUNDLE, "model": "m", "number": True},
        {"version": "", "identity": NEW_BUNDLE, "model": "m", "number": 2},
        {"version": V2, "identity": NEW_BUNDLE, "model": "m", "number": -1},
        {"version": V2, "identity": NEW_BUNDLE, "model": "m", "number": 2, "x": 0},
        {"version": V1, "identity": BUNDLE, "model": "m", "number": 2},  # its own version
        "v2",
    ],
)
def test_malformed_offer_in_status_is_a_protocol_error(offer: Any) -> None:
    client, server, _ = pair()
    client.send_status(3)
    deliver(client, server)
    body = {"t": "status", "id": 3, "load": LOAD.to_wire(), "bundles": [], "update": offer}
    with pytest.raises(RemoteProtocolError):
        client.receive(forge(server, body))


def test_offer_in_status_without_the_feature_is_a_protocol_error() -> None:
    client, server, _ = pair(("load",))
    client.send_status(3)
    deliver(client, server)
    body = {"t": "status", "id": 3, "load": LOAD.to_wire(), "bundles": []}
    body["update"] = OFFER.to_wire()
    with pytest.raises(RemoteProtocolError):
        client.receive(forge(server, body))
    with pytest.raises(RemoteProtocolError):  # nor a file reply
        client.receive(forge(server, {"t": "file", "id": 3, "data": b"", "size": 0}))


# -- golden vectors ------------------------------------------------------------------------------

VECTORS = json.loads(
    (Path(__file__).resolve().parents[1] / "mobile_bridge/vectors/protocol-v1.json").read_text()
)


def test_golden_vectors_have_the_update_exchange() -> None:
    for suite in VECTORS["suites"]:
        update = suite["update"]
        welcome = update["message2"]["payload"]
        assert welcome["features"] == ["load", "update"]
        assert welcome["update"] == update["offer"]
        assert list(welcome["update"]) == ["version", "identity", "model", "number"]
        assert update["message1"]["payload"]["features"] == ["load", "update"]
        messages = [m["message"] for m in update["messages"]]
        assert [m["t"] for m in messages] == ["fetch", "file", "fetch", "file", "status", "status"]
        assert list(messages[0]) == ["t", "id", "version", "file", "offset", "length"]
        assert list(messages[1]) == ["t", "id", "data", "size"]
        assert messages[5]["update"] == update["offer"]
        # The connections without the feature are untouched: no offer in their welcomes.
        assert "update" not in suite["load"]["message2"]["payload"]
        assert "update" not in suite["handshake"]["message2"]["payload"]


# -- a live server, real devices -----------------------------------------------------------------

STEP = 20.0
TEST_TIMEOUT = 120.0


def run_async(coro: Awaitable[Any], timeout: float = TEST_TIMEOUT) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(check: Callable[[], bool], what: str, timeout: float = STEP) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayKeys:
    return ThrowawayKeys.create(tmp_path_factory.mktemp("keys"), devices=("dev-a",))


@pytest.fixture(scope="module")
def publishers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("publishers")
    return {name: generate_publisher(root / name) for name in ("good", "stranger")}


def _resnet_bundle(seed: int, out: Path) -> Bundle:
    analysis = Analysis.of(zoo.build("resnet", seed=seed))
    n = len(analysis.graph.nodes)
    interior = [c for c in analysis.cuts if 0 < c.index < n]
    return split_model(analysis, interior[len(interior) // 2], out, codec="none")


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory, publishers: dict[str, Any]):
    """v1 and v2 of "resnet" signed by the trusted publisher; v2 also signed by a stranger."""
    root = tmp_path_factory.mktemp("resnet")
    out = {n: _resnet_bundle(n, root / f"v{n}") for n in (1, 2)}
    for bundle in out.values():
        sign_bundle(bundle.path, publishers["good"])
    stranger = root / "v2-stranger"
    shutil.copytree(out[2].path, stranger)
    sign_bundle(stranger, publishers["stranger"])
    return {**out, "stranger": Bundle(stranger, out[2].manifest)}


@pytest.fixture(scope="module")
def sample() -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(3).standard_normal((1, 3, 224, 224), np.float32)}


@pytest.fixture(scope="module")
def expected(versions: dict[Any, Bundle], sample: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    """Each version's logits, head and tail on this machine (the full model of that version)."""
    out = {n: DeviceRuntime(versions[n]).run_local(sample)["logits"] for n in (1, 2)}
    assert not np.array_equal(out[1], out[2])
    return out


def repository(tmp: Path, v1: Bundle, v2: Bundle) -> Path:
    repo = tmp / "repo"
    for number, bundle in ((1, v1), (2, v2)):
        shutil.copytree(bundle.path, repo / ".staging")
        (repo / "resnet").mkdir(parents=True, exist_ok=True)
        os.rename(repo / ".staging", repo / "resnet" / str(number))
    (repo / "resnet" / "policy.json").write_text('{"policy": "latest", "count": 2}')
    return repo


def server_for(repo: Path, keys: ThrowawayKeys) -> EdgeServer:
    return EdgeServer(
        [],
        identity=keys.server,
        allow=AllowList(keys.allow_file),
        config=ServerConfig(port=0, workers=2, repository_interval=3600.0),
        repository=repo,
    )


def device(
    bundle: Bundle, port: int, keys: ThrowawayKeys, store: Path | None, trusted: Any, **kw: Any
) -> OffloadClient:
    options: dict[str, Any] = {
        "update": "auto",
        "store": store,
        "trusted_publishers": trusted,
        "update_retry": (0.05, 0.2),
        "update_chunk": 64 << 10,
    }
    options.update(kw)
    return OffloadClient(
        bundle,
        server=f"ws://127.0.0.1:{port}",
        server_key=keys.server.public,
        identity=keys.device,
        fallback="error",
        retries=0,
        **options,
    )


class Recording(UpdateService):
    """The real service, recording every fetch (file, offset, bytes served)."""

    def __init__(self, server: Any) -> None:
        super().__init__(server)
        self.served: list[tuple[str, int, int]] = []

    def read(self, folder: Path, name: str, offset: int, length: int) -> tuple[bytes, int]:
        data, size = super().read(folder, name, offset, length)
        self.served.append((name, offset, len(data)))
        return data, size


async def run_until_switched(
    client: OffloadClient, sample: dict[str, np.ndarray], want: dict[int, np.ndarray], new: str
) -> int:
    """Run requests (each answered by the version it started on) until the client switched;
    the number of requests answered by v1."""
    on_v1 = 0
    deadline = time.monotonic() + STEP
    while client.version != new:
        assert time.monotonic() < deadline, f"no switch: {client.update_error!r}"
        got = await client.run(sample)
        np.testing.assert_array_equal(got["logits"], want[1])
        on_v1 += 1
        await asyncio.sleep(0.01)
    return on_v1


def test_auto_downloads_v2_and_the_next_request_is_served_by_v2(
    tmp_path: Path, keys, versions, publishers, sample, expected
) -> None:
    repo = repository(tmp_path, versions[1], versions[2])
    store = tmp_path / "store"
    v1, v2 = versions[1].manifest.version, versions[2].manifest.version

    async def main() -> None:
        server = server_for(repo, keys)
        server.updates = service = Recording(server)
        await server.start()
        try:
            c = device(versions[1], server.port, keys, store, [publishers["good"].public])
            async with c:
                assert await c.run(sample) is not None
                assert c.update_available == UpdateOffer(
                    v2, versions[2].manifest.identity, "resnet", 2
                )
                assert await run_until_switched(c, sample, expected, v2) >= 1
                got = await c.run(sample)
                np.testing.assert_array_equal(got["logits"], expected[2])
                assert c.last_timing is not None and c.last_timing.offloaded
                assert c.links[0].server_version == v2  # a new connection, bound to v2
                assert c.update_available is None  # v2 is the newest
            # Only the manifest, the signature and the head were fetched, in bounded pieces.
            head = versions[2].manifest.head
            assert head is not None
            names = {name for name, _, _ in service.served}
            assert names == {"manifest.json", "signature.json", head.file}
            assert all(n <= 64 << 10 for _, _, n in service.served)
            assert (
                sum(n for name, _, n in service.served if name == head.file)
                == (versions[2].path / head.file).stat().st_size
            )
            # The store holds v2 (current), no tail, nothing partial.
            s = BundleStore(store)
            assert s.current() == v2 and s.versions() == [v2]
            assert not (store / v2 / "tail.onnx").exists()
            assert not any((store / ".partial").iterdir())
            verify_device_bundle(store / v2, [publishers["good"].public])
            # A device restarted with its old bundle runs the stored version.
            again = device(versions[1], server.port, keys, store, [publishers["good"].public])
            async with again:
                assert again.version == v2 and not again.runtime.has_tail
                got = await again.run(sample)
                np.testing.assert_array_equal(got["logits"], expected[2])
        finally:
            await server.shutdown()
        assert v1 != v2

    run_async(main())


def test_a_cut_off_download_resumes_where_it_stopped(
    tmp_path: Path, keys, versions, publishers, sample, expected
) -> None:
    repo = repository(tmp_path, versions[1], versions[2])
    store = tmp_path / "store"
    v2 = versions[2].manifest.version
    head = versions[2].manifest.head
    assert head is not None
    head_size = (versions[2].path / head.file).stat().st_size
    assert head_size > 3 * (64 << 10), "the head must take several pieces"

    class CutOnce(Recording):
        """Kills the device's connection after the third piece of the head, once."""

        cut = False

        async def serve_fetch(self, peer: Any, event: FetchRequest) -> None:
            pieces = sum(1 for name, _, _ in self.served if name == head.file)
            if event.file == head.file and pieces == 3 and not self.cut:
                self.cut = True
                peer.ws.transport.abort()
                return
            await super().serve_fetch(peer, event)

    async def main() -> None:
        server = server_for(repo, keys)
        server.updates = service = CutOnce(server)
        await server.start()
        try:
            c = device(versions[1], server.port, keys, store, [publishers["good"].public])
            async with c:
                await run_until_switched(c, sample, expected, v2)
                np.testing.assert_array_equal((await c.run(sample))["logits"], expected[2])
        finally:
            await server.shutdown()
        assert service.cut
        offsets = [off for name, off, _ in service.served if name == head.file]
        assert offsets[3] == 3 * (64 << 10)  # the next try continued, it did not start over
        assert sum(n for name, _, n in service.served if name == head.file) == head_size

    run_async(main())


def _refused_update(
    tmp_path: Path,
    keys: ThrowawayKeys,
    versions: dict[Any, Bundle],
    trusted: list[bytes],
    sample: dict[str, np.ndarray],
    expected: dict[int, np.ndarray],
    service_class: type[UpdateService],
    v2: Bundle | None = None,
) -> tuple[OffloadClient, list[BaseException], Recording]:
    """A device on v1 whose update keeps being refused: its errors, while v1 answers."""
    repo = repository(tmp_path, versions[1], v2 or versions[2])
    store = tmp_path / "store"
    errors: list[BaseException] = []

    async def main() -> tuple[OffloadClient, Recording]:
        server = server_for(repo, keys)
        server.updates = service = service_class(server)
        await server.start()
        try:
            c = device(versions[1], server.port, keys, store, trusted)
            async with c:
                deadline = time.monotonic() + STEP
                while len(errors) < 3:  # three tries, each refused, v1 answering throughout
                    assert time.monotonic() < deadline, "the update was not tried three times"
                    got = await c.run(sample)
                    np.testing.assert_array_equal(got["logits"], expected[1])
                    assert c.version == versions[1].manifest.version
                    last = c.update_error
                    if last is not None and (not errors or last is not errors[-1]):
                        errors.append(last)
                    await asyncio.sleep(0.01)
                assert BundleStore(store).versions() == []  # nothing installed
            return c, service
        finally:
            await server.shutdown()

    c, service = run_async(main())
    assert isinstance(service, Recording)
    return c, errors, service


def test_a_flipped_byte_in_one_chunk_is_refused_and_v1_keeps_answering(
    tmp_path: Path, keys, versions, publishers, sample, expected
) -> None:
    head = versions[2].manifest.head
    assert head is not None

    class Flipping(Recording):
        def read(self, folder: Path, name: str, offset: int, length: int) -> tuple[bytes, int]:
            data, size = super().read(folder, name, offset, length)
            if name == head.file and offset == 64 << 10:  # the second piece, one bit
                data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
            return data, size

    _, errors, _ = _refused_update(
        tmp_path, keys, versions, [publishers["good"].public], sample, expected, Flipping
    )
    assert all(isinstance(e, UpdateCorrupt) for e in errors), errors
    assert "sha256" in str(errors[0])


def test_a_truncated_download_is_refused(
    tmp_path: Path, keys, versions, publishers, sample, expected
) -> None:
    head = versions[2].manifest.head
    assert head is not None

    class Truncating(Recording):
        """Serves the head as if it ended 1000 bytes early."""

        def read(self, folder: Path, name: str, offset: int, length: int) -> tuple[bytes, int]:
            data, size = super().read(folder, name, offset, length)
            if name != head.file:
                return data, size
            short = size - 1000
            return data[: max(0, short - offset)], short

    _, errors, _ = _refused_update(
        tmp_path, keys, versions, [publishers["good"].public], sample, expected, Truncating
    )
    assert all(isinstance(e, UpdateCorrupt) for e in errors), errors


def test_a_bundle_signed_by_an_unknown_publisher_is_refused_before_the_head_is_fetched(
    tmp_path: Path, keys, versions, publishers, sample, expected
) -> None:
    _, errors, service = _refused_update(
        tmp_path,
        keys,
        versions,
        [publishers["good"].public],
        sample,
        expected,
        Recording,
        v2=versions["stranger"],
    )
    assert all(isinstance(e, UnknownPublisher) for e in errors), errors
    head = versions[2].manifest.head
    assert head is not None
    assert not any(name == head.file for name, _, _ in service.served)


def test_pinned_never_downloads_and_notify_only_records(
    tmp_path: Path, keys, versions, publishers, sample, expected
) -> None:
    repo = repository(tmp_path, versions[1], versions[2])
    v2 = versions[2].manifest.version

    async def main() -> None:
        server = server_for(repo, keys)
        server.updates = service = Recording(server)
        await server.start()
        try:
            pinned = device(versions[1], server.port, keys, tmp_path / "p", None, update="pinned")
            async with pinned:
                for _ in range(5):
                    got = await pinned.run(sample)
                    np.testing.assert_array_equal(got["logits"], expected[1])
                assert "update" not in pinned.links[0].features  # not even asked for
                assert pinned.update_available is None
                with pytest.raises(UsageError):
                    await pinned.update_now()
            notify = device(
                versions[1],
                server.port,
                keys,
                tmp_path / "n",
                [publishers["good"].public],
                update="notify",
            )
            async with notify:
                for _ in range(5):
                    got = await notify.run(sample)
                    np.testing.assert_array_equal(got["logits"], expected[1])
                    await asyncio.sleep(0.02)
                assert notify.update_available is not None
                assert notify.update_available.version == v2
                assert notify.update_available.number == 2
                assert service.served == []  # nothing downloaded by either device
                # The app decides: update_now downloads, verifies and switches.
                assert await notify.update_now() == v2
                np.testing.assert_array_equal((await notify.run(sample))["logits"], expected[2])
        finally:
            await server.shutdown()
        assert not (tmp_path / "p").exists()

    run_async(main())


def test_status_tells_a_long_lived_connection_of_a_rollout(
    tmp_path: Path, keys, versions, publishers, sample, expected
) -> None:
    """v2 is published while the device is connected on v1: a status check finds it."""
    repo = tmp_path / "repo"
    shutil.copytree(versions[1].path, repo / "resnet" / "1")
    (repo / "resnet" / "policy.json").write_text('{"policy": "latest", "count": 2}')
    v2 = versions[2].manifest.version

    async def main() -> None:
        server = server_for(repo, keys)
        await server.start()
        try:
            c = device(
                versions[1],
                server.port,
                keys,
                tmp_path / "store",
                [publishers["good"].public],
                update="notify",
            )
            async with c:
                await c.run(sample)
                assert c.update_available is None
                shutil.copytree(versions[2].path, repo / ".staging")
                os.rename(repo / ".staging", repo / "resnet" / "2")
                await server.sync()
                await until(
                    lambda: server.latest_for(versions[1].manifest.version) is not None, "v2"
                )
                offer = await c.check_updates()
                assert offer is not None and offer.version == v2
                assert c.links[0].connected  # the same connection learned it
        finally:
            await server.shutdown()

    run_async(main())


def test_auto_update_needs_trusted_publishers_and_a_store(tmp_path: Path, keys, versions) -> None:
    common = {
        "server": "ws://127.0.0.1:1",
        "server_key": keys.server.public,
        "identity": keys.device,
    }
    with pytest.raises(UsageError):
        OffloadClient(versions[1], update="auto", store=tmp_path, **common)
    with pytest.raises(UsageError):
        OffloadClient(versions[1], update="auto", trusted_publishers=[b"\x01" * 32], **common)
    with pytest.raises(UsageError):
        OffloadClient(versions[1], update="sometimes", **common)
    OffloadClient(versions[1], update="auto", store=tmp_path, trust_unsigned=True, **common)


def test_a_generation_keeps_the_version_it_started_on(
    tmp_path: Path, keys, versions, publishers, sample, expected
) -> None:
    """The client switches; a channel taken before (what a running generation holds) keeps
    the old runtime and connections, which are closed only once it is released."""
    repo = repository(tmp_path, versions[1], versions[2])
    v1, v2 = versions[1].manifest.version, versions[2].manifest.version

    async def main() -> None:
        server = server_for(repo, keys)
        await server.start()
        try:
            c = device(
                versions[1],
                server.port,
                keys,
                tmp_path / "store",
                [publishers["good"].public],
                update="notify",
            )
            async with c:
                await c.run(sample)
                held = _PinnedChannel(c, c._current)  # as generate() takes it
                old_pool = c.pool
                assert await c.update_now() == v2
                assert c.version == v2 and held.runtime.manifest.version == v1
                await held.connect()
                assert held.connected and old_pool.connected  # still alive for it
                np.testing.assert_array_equal((await c.run(sample))["logits"], expected[2])
                held.release()
                await until(lambda: not old_pool.connected, "the old connections closed")
        finally:
            await server.shutdown()

    run_async(main())


def test_store_cleanup_keeps_current_and_previous(tmp_path: Path) -> None:
    store = BundleStore(tmp_path)
    for v in ("aa", "bb", "cc"):
        (tmp_path / v).mkdir()
        (tmp_path / v / "manifest.json").write_text("{}")
    (tmp_path / ".partial" / "dd").mkdir(parents=True)
    store.set_current("cc")
    assert store.current() == "cc"
    assert store.cleanup(keep=["cc", "bb"]) == ["aa"]
    assert store.versions() == ["bb", "cc"] and not (tmp_path / ".partial" / "dd").exists()
    with pytest.raises(UpdateError):
        store.path("../etc")


def test_device_without_a_tail_cannot_fall_back(tmp_path: Path, versions, publishers) -> None:
    """A device bundle (manifest, signature, head) verifies, and has no local fallback."""
    folder = tmp_path / "headonly"
    folder.mkdir()
    head = versions[2].manifest.head
    assert head is not None
    for name in ("manifest.json", "signature.json", head.file):
        shutil.copy(versions[2].path / name, folder / name)
    bundle = verify_device_bundle(folder, [publishers["good"].public])
    assert bundle.publisher == publishers["good"].public
    runtime = DeviceRuntime(bundle)
    assert not runtime.has_tail
    with pytest.raises(OffloadUnavailable):
        runtime.run_tail_locally({})
    with pytest.raises(UnknownPublisher):
        verify_device_bundle(folder, [publishers["stranger"].public])
    (folder / head.file).write_bytes(b"x" + (folder / head.file).read_bytes()[1:])
    with pytest.raises(UpdateCorrupt):
        verify_device_bundle(folder, [publishers["good"].public])


def _steps(server: EdgeServer, version: str) -> float:
    value = server.stats.registry.get_sample_value(
        "edgeoffload_requests_total", {"bundle": version, "kind": "step"}
    )
    return value or 0.0


def test_a_running_generation_finishes_on_its_version_the_next_uses_the_new(
    tmp_path: Path, keys, publishers, tiny_decoder_bundle
) -> None:
    """Two versions of the tiny Llama (cut after 2 and after 1 of its 4 blocks: the same
    interface). The switch happens after the 5th token of a generation: it finishes on v1,
    token for token as without a switch; the next generation runs on v2."""
    first, second = tiny_decoder_bundle("llama", 2), tiny_decoder_bundle("llama", 1)
    signed = {}
    for n, bundle in ((1, first), (2, second)):
        copy = tmp_path / f"llama-v{n}"
        shutil.copytree(bundle.path, copy)
        sign_bundle(copy, publishers["good"])
        signed[n] = Bundle(copy, bundle.manifest)
    repo = tmp_path / "repo"
    for n in (1, 2):
        shutil.copytree(signed[n].path, repo / "llama" / str(n))
    (repo / "llama" / "policy.json").write_text('{"policy": "latest", "count": 2}')
    v1, v2 = first.manifest.version, second.manifest.version
    prompt, tokens = [5, 17, 42, 99, 3], 16

    async def generate(c: OffloadClient, at: int = 0, then: Any = None) -> tuple[list[int], str]:
        out: list[int] = []
        stream = c.generate(input_ids=prompt, max_new_tokens=tokens)
        try:
            async for item in stream:
                if item.token_id >= 0:
                    out.append(item.token_id)
                    if len(out) == at:
                        await then()
        finally:
            await asyncio.wait_for(stream.aclose(), STEP)
        assert stream.stats.recoveries == 0 and stream.stats.fallback_reason == ""
        return out, stream.runtime.manifest.version

    async def main() -> None:
        server = server_for(repo, keys)
        await server.start()
        try:
            c = device(
                signed[1], server.port, keys, tmp_path / "store", [publishers["good"].public]
            )
            c.update_policy = "notify"  # the test decides when to switch
            async with c:
                reference, on = await generate(c)
                assert on == v1 and c.update_available is not None
                steps_before = _steps(server, v1)

                async def switch() -> None:
                    assert await c.update_now() == v2
                    assert c.version == v2

                got, on = await generate(c, at=5, then=switch)
                assert got == reference and on == v1
                assert _steps(server, v1) - steps_before == len(got) - 1  # all on v1
                again, on = await generate(c)
                assert on == v2 and _steps(server, v2) == len(again) - 1
                assert c.links[0].server_version == v2
                # The tokenizer files came along from v1 (same sha256), not over the wire.
                store = tmp_path / "store" / v2
                assert all((store / rel).is_file() for rel in second.manifest.files)
        finally:
            await server.shutdown()

    run_async(main(), timeout=300.0)
