"""Security suite: attacks on a real edge server over real sockets, real crypto, real ORT.

Every test starts an :class:`EdgeServer` bound to 127.0.0.1 (port 0), attacks it through a raw
websocket driven by the sans-I/O :class:`ClientConnection` (or through a misconfigured
:class:`OffloadClient`), checks that the attack is rejected with the documented typed error or
close code, and then checks that the SAME server still serves an honest device correctly:
bit-exact (codec none) against ``DeviceRuntime.run_local`` on the same bundle.

No pytest-asyncio: each test runs one coroutine with ``asyncio.run`` under a hard timeout, and
every wait inside is bounded too.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection as WsConnection
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from edgeoffload.bundle import Bundle
from edgeoffload.core.codec import EncodedTensor
from edgeoffload.device.client import OffloadClient
from edgeoffload.device.runtime import DeviceRuntime
from edgeoffload.edge.allowlist import AllowList
from edgeoffload.edge.server import EdgeServer, ServerConfig
from edgeoffload.errors import (
    AuthenticationFailed,
    VersionMismatch,
)
from edgeoffload.keys import KeyPair, encode_public, generate_identity
from edgeoffload.protocol.connection import (
    CLOSE_AUTH,
    CLOSE_PROTOCOL,
    CLOSE_VERSION,
    ClientConnection,
)
from edgeoffload.protocol.events import ErrorReply, HandshakeComplete, Pong, RunResult
from edgeoffload.protocol.tensors import encode_tensors
from edgeoffload.protocol.wire import pack
from edgeoffload.split import zoo
from edgeoffload.split.analysis import Analysis
from edgeoffload.split.splitter import split_model

CLOSE_TOO_BIG = 1009  # websockets: message too big
STEP = 5.0  # seconds: bound on any single network step
TEST_TIMEOUT = 30.0  # seconds: bound on one whole test coroutine


# -- shared fixtures -------------------------------------------------------------------------------


@dataclass
class Env:
    server_id: KeyPair
    device_id: KeyPair
    stranger_id: KeyPair  # a valid key pair that is NOT in the allow-list
    allow_file: Path
    main: Bundle  # resnet, cut c68 (one float32[batch, 256] tensor crosses), codec none
    other_codec: Bundle  # same model and cut, codec fp16
    other_cut: Bundle  # resnet, cut c67
    other_model: Bundle  # mobilenetv2, early cut c3: the tail is the heavy part
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]  # main bundle, head + tail locally
    heavy_inputs: list[dict[str, np.ndarray]]
    heavy_expected: list[dict[str, np.ndarray]]


def _image(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return build_env(tmp_path_factory.mktemp("security"))


def build_env(root: Path) -> Env:
    """Keys, the allow-list and the bundles of the suite, under ``root``."""
    resnet = Analysis.of(zoo.build("resnet"))
    mobilenet = Analysis.of(zoo.build("mobilenetv2"))
    main = split_model(resnet, resnet.cuts[68], root / "resnet-c68-none", codec="none")
    other_codec = split_model(resnet, resnet.cuts[68], root / "resnet-c68-fp16", codec="fp16")
    other_cut = split_model(resnet, resnet.cuts[67], root / "resnet-c67-none", codec="none")
    other_model = split_model(mobilenet, mobilenet.cuts[3], root / "mnv2-c3-none", codec="none")
    assert main.manifest.identity == other_codec.manifest.identity
    assert main.manifest.version != other_codec.manifest.version
    assert main.manifest.identity != other_cut.manifest.identity

    server_id = generate_identity(root / "keys" / "server")
    device_id = generate_identity(root / "keys" / "device")
    stranger_id = generate_identity(root / "keys" / "stranger")
    allow_file = root / "authorized_keys"
    allow_file.write_text(f"# test allow-list\n{encode_public(device_id.public)} device\n")

    inputs = _image(1)
    expected = DeviceRuntime(main).run_local(inputs)
    heavy_runtime = DeviceRuntime(other_model)
    heavy_inputs = [_image(100 + i) for i in range(8)]
    heavy_expected = [heavy_runtime.run_local(x) for x in heavy_inputs]
    return Env(
        server_id,
        device_id,
        stranger_id,
        allow_file,
        main,
        other_codec,
        other_cut,
        other_model,
        inputs,
        expected,
        heavy_inputs,
        heavy_expected,
    )


def run_async(coro_fn: Callable[[], Awaitable[Any]], timeout: float = TEST_TIMEOUT) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def serving(
    env: Env, bundles: list[Bundle] | None = None, *, allow: Path | None = None, **config: Any
) -> AsyncIterator[EdgeServer]:
    config.setdefault("drain_timeout", 2.0)
    server = EdgeServer(
        bundles if bundles is not None else [env.main],
        identity=env.server_id,
        allow=AllowList(allow or env.allow_file),
        config=ServerConfig(host="127.0.0.1", port=0, **config),
    )
    await server.start()
    try:
        yield server
    finally:
        await asyncio.wait_for(server.shutdown(), 10)


def url(server: EdgeServer) -> str:
    return f"ws://127.0.0.1:{server.port}"


def assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    for name, ref in expected.items():
        assert got[name].dtype == ref.dtype
        assert got[name].shape == ref.shape
        np.testing.assert_array_equal(got[name], ref)


def make_client(
    env: Env,
    server: EdgeServer,
    *,
    bundle: Bundle | None = None,
    identity: KeyPair | None = None,
    server_key: bytes | None = None,
    fallback: str = "error",
    timeout: float = 10.0,
) -> OffloadClient:
    return OffloadClient(
        bundle or env.main,
        server=url(server),
        server_key=server_key if server_key is not None else env.server_id.public,
        identity=identity or env.device_id,
        fallback=fallback,
        timeout=timeout,
        connect_timeout=STEP,
    )


async def assert_honest(env: Env, server: EdgeServer) -> None:
    """A fresh, honest client on the same server gets the exact local answer, offloaded."""
    results_before = server.stats.results
    client = make_client(env, server)
    async with client:
        got = await asyncio.wait_for(client.run(env.inputs), 15)
    assert client.last_timing is not None and client.last_timing.offloaded
    assert_same(got, env.expected)
    assert server.stats.results == results_before + 1


def new_conn(
    env: Env, *, bundle: Bundle | None = None, time_ns: int | None = None
) -> ClientConnection:
    manifest = (bundle or env.main).manifest
    return ClientConnection(
        static=env.device_id,
        server_public=env.server_id.public,
        bundle=manifest.identity,
        version=manifest.version,
        time_ns=time.time_ns() if time_ns is None else time_ns,
    )


async def ws_connect(server: EdgeServer) -> WsConnection:
    return await asyncio.wait_for(
        connect(url(server), compression=None, max_size=1 << 26, proxy=None, open_timeout=STEP),
        STEP,
    )


async def raw_session(env: Env, server: EdgeServer) -> tuple[WsConnection, ClientConnection]:
    """A raw websocket with a completed handshake, driven by the sans-I/O client."""
    conn = new_conn(env)
    conn.start()
    ws = await ws_connect(server)
    for data in conn.data_to_send():
        await ws.send(data)
    reply = await asyncio.wait_for(ws.recv(), STEP)
    assert isinstance(reply, bytes)
    (event,) = conn.receive(reply)
    assert isinstance(event, HandshakeComplete)
    return ws, conn


async def expect_close(ws: WsConnection, code: int, timeout: float = STEP) -> list[Any]:
    """Read until the server closes; assert its close code; return what it sent before."""
    received: list[Any] = []
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed) as info:
        for _ in range(100):
            received.append(await asyncio.wait_for(ws.recv(), max(deadline - time.monotonic(), 0)))
    assert info.value.rcvd is not None, f"no close frame received (sent: {info.value.sent})"
    assert info.value.rcvd.code == code, info.value.rcvd
    return received


def honest_tensors(env: Env) -> list[tuple[str, EncodedTensor]]:
    runtime = DeviceRuntime(env.main)
    return runtime.encode(runtime.run_head(runtime.check_inputs(env.inputs)))


async def send_and_receive(
    ws: WsConnection, conn: ClientConnection, build: Callable[[ClientConnection], None]
) -> Any:
    build(conn)
    for data in conn.data_to_send():
        await ws.send(data)
    reply = await asyncio.wait_for(ws.recv(), STEP)
    assert isinstance(reply, bytes)
    (event,) = conn.receive(reply)
    return event


def decode_result(env: Env, event: RunResult) -> dict[str, np.ndarray]:
    from edgeoffload.core.codec import decode

    return {name: np.array(decode(t)) for name, t in event.tensors}


# -- 1, 2: authentication --------------------------------------------------------------------------


def test_unknown_device_key_is_rejected(env: Env) -> None:
    async def main() -> None:
        async with serving(env) as server:
            stranger = make_client(env, server, identity=env.stranger_id)
            with pytest.raises(AuthenticationFailed):
                await asyncio.wait_for(stranger.run(env.inputs), 15)
            await stranger.close()
            assert server.stats.handshakes_rejected == 1
            assert server.stats.errors.get("auth") == 1
            assert server.stats.handshakes_ok == 0
            # Even the local fallback does not hide an authentication failure.
            stranger = make_client(env, server, identity=env.stranger_id, fallback="local")
            with pytest.raises(AuthenticationFailed):
                await asyncio.wait_for(stranger.run(env.inputs), 15)
            await stranger.close()
            assert server.stats.handshakes_rejected == 2
            # An unknown device learns nothing about the hosted bundles: with a mismatched
            # bundle it still gets the opaque AuthenticationFailed, not a VersionMismatch.
            stranger = make_client(env, server, bundle=env.other_cut, identity=env.stranger_id)
            with pytest.raises(AuthenticationFailed) as info:
                await asyncio.wait_for(stranger.connect(), 15)
            await stranger.close()
            assert env.main.manifest.version not in str(info.value)
            assert server.stats.handshakes_rejected == 3
            await assert_honest(env, server)

    run_async(main)


def test_wrong_pinned_server_key_is_rejected(env: Env) -> None:
    async def main() -> None:
        async with serving(env) as server:
            wrong = make_client(env, server, server_key=env.stranger_id.public)
            with pytest.raises(AuthenticationFailed):
                await asyncio.wait_for(wrong.run(env.inputs), 15)
            await wrong.close()
            assert server.stats.handshakes_rejected == 1
            assert server.stats.handshakes_ok == 0
            await assert_honest(env, server)

    run_async(main)


# -- 3: replayed handshake -------------------------------------------------------------------------


def test_replayed_handshake_is_rejected(env: Env) -> None:
    async def main() -> None:
        async with serving(env) as server:
            conn = new_conn(env)
            conn.start()
            (message1,) = conn.data_to_send()
            # Honest use of message 1: the server answers with message 2 and serves requests.
            ws1 = await ws_connect(server)
            await ws1.send(message1)
            (event,) = conn.receive(await asyncio.wait_for(ws1.recv(), STEP))
            assert isinstance(event, HandshakeComplete)
            assert server.stats.handshakes_ok == 1

            # Replay the identical bytes while the first session is still open...
            ws2 = await ws_connect(server)
            await ws2.send(message1)
            assert await expect_close(ws2, CLOSE_AUTH) == []  # no message 2
            assert server.stats.handshakes_rejected == 1
            # ...the honest session is unaffected...
            result = await send_and_receive(ws1, conn, lambda c: c.send_run(7, honest_tensors(env)))
            assert isinstance(result, RunResult) and result.request_id == 7
            assert_same(decode_result(env, result), env.expected)
            await ws1.close()
            # ...and replaying it after that session has ended is refused as well.
            ws3 = await ws_connect(server)
            await ws3.send(message1)
            assert await expect_close(ws3, CLOSE_AUTH) == []
            assert server.stats.handshakes_rejected == 2
            assert server.stats.handshakes_ok == 1
            await assert_honest(env, server)

    run_async(main)


def test_older_handshake_timestamp_is_rejected(env: Env) -> None:
    """A fresh handshake carrying a timestamp older than the last accepted one is a replay."""

    async def main() -> None:
        async with serving(env) as server:
            await assert_honest(env, server)
            conn = new_conn(env, time_ns=time.time_ns() - 60 * 10**9)
            conn.start()
            ws = await ws_connect(server)
            for data in conn.data_to_send():
                await ws.send(data)
            assert await expect_close(ws, CLOSE_AUTH) == []
            await assert_honest(env, server)

    run_async(main)


# -- 4, 5: transport replay, reordering, bit flips -------------------------------------------------


def test_replayed_transport_message_kills_the_session(env: Env) -> None:
    async def main() -> None:
        async with serving(env) as server:
            ws, conn = await raw_session(env, server)
            conn.send_run(1, honest_tensors(env))
            (message,) = conn.data_to_send()
            await ws.send(message)
            (event,) = conn.receive(await asyncio.wait_for(ws.recv(), STEP))
            assert isinstance(event, RunResult)
            assert_same(decode_result(env, event), env.expected)
            await ws.send(message)  # the very same ciphertext again
            assert await expect_close(ws, CLOSE_AUTH) == []
            assert server.stats.results == 1
            await assert_honest(env, server)

    run_async(main)


def test_reordered_transport_messages_kill_the_session(env: Env) -> None:
    async def main() -> None:
        async with serving(env) as server:
            ws, conn = await raw_session(env, server)
            tensors = honest_tensors(env)
            conn.send_run(1, tensors)
            conn.send_run(2, tensors)
            first, second = conn.data_to_send()
            await ws.send(second)
            await ws.send(first)
            assert await expect_close(ws, CLOSE_AUTH) == []  # neither request was answered
            assert server.stats.requests == 0
            await assert_honest(env, server)

    run_async(main)


def _flip(data: bytes, index: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


def test_flipped_bit_in_transport_message_kills_the_session(env: Env) -> None:
    async def main() -> None:
        async with serving(env) as server:
            for position in ("first", "middle", "tag"):
                ws, conn = await raw_session(env, server)
                # A ping first: the session demonstrably works before the attack.
                pong = await send_and_receive(ws, conn, lambda c: c.send_ping(1, b"x"))
                assert isinstance(pong, Pong) and pong.payload == b"x"
                conn.send_run(2, honest_tensors(env))
                (message,) = conn.data_to_send()
                index = {"first": 0, "middle": len(message) // 2, "tag": len(message) - 1}
                await ws.send(_flip(message, index[position], 3))
                assert await expect_close(ws, CLOSE_AUTH) == [], position
            assert server.stats.requests == 0
            await assert_honest(env, server)

    run_async(main)


def test_flipped_bit_in_handshake_message_is_rejected(env: Env) -> None:
    async def main() -> None:
        async with serving(env) as server:
            conn = new_conn(env)
            conn.start()
            (message1,) = conn.data_to_send()
            envelope = msgpack.unpackb(message1, raw=False)
            noise_msg = envelope["noise"]
            # Positions inside the Noise message: ephemeral key, encrypted static key, its tag,
            # the encrypted payload (timestamp, version) and the final tag.
            targets = [0, 31, 40, 32 + 48 - 1, 32 + 48 + 3, len(noise_msg) - 1]
            for index in targets:
                forged = dict(envelope, noise=_flip(noise_msg, index, 5))
                ws = await ws_connect(server)
                await ws.send(pack(forged))
                assert await expect_close(ws, CLOSE_AUTH) == [], index
            # The bundle identity is bound into the prologue: lying about it fails as well.
            bundle = envelope["bundle"]
            forged = dict(envelope, bundle=bundle[:-1] + ("8" if bundle[-1] != "8" else "9"))
            ws = await ws_connect(server)
            await ws.send(pack(forged))
            assert await expect_close(ws, CLOSE_AUTH) == []
            # A bit flipped in the raw bytes of the Noise field of the original message.
            offset = message1.index(noise_msg)
            ws = await ws_connect(server)
            await ws.send(_flip(message1, offset + len(noise_msg) // 2, 0))
            assert await expect_close(ws, CLOSE_AUTH) == []
            assert server.stats.handshakes_ok == 0
            assert server.stats.handshakes_rejected == len(targets) + 2
            # None of the forgeries burned the untouched original's timestamp.
            ws = await ws_connect(server)
            await ws.send(message1)
            (event,) = conn.receive(await asyncio.wait_for(ws.recv(), STEP))
            assert isinstance(event, HandshakeComplete)
            await ws.close()
            await assert_honest(env, server)

    run_async(main)


# -- 6: version mismatch ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["other_codec", "other_cut", "other_model"])
def test_bundle_version_mismatch(env: Env, which: str) -> None:
    device_bundle: Bundle = getattr(env, which)

    async def main() -> None:
        async with serving(env) as server:
            client = make_client(env, server, bundle=device_bundle, fallback="local")
            with pytest.raises(VersionMismatch) as info:
                await asyncio.wait_for(client.run(env.heavy_inputs[0]), 15)
            await client.close()
            message = str(info.value)
            assert device_bundle.manifest.version in message
            assert env.main.manifest.version in message
            assert server.stats.handshakes_rejected == 1
            # The raw exchange: an authenticated refusal, then close code 4409.
            conn = new_conn(env, bundle=device_bundle)
            conn.start()
            ws = await ws_connect(server)
            for data in conn.data_to_send():
                await ws.send(data)
            (refusal,) = await expect_close(ws, CLOSE_VERSION)
            with pytest.raises(VersionMismatch):
                conn.receive(refusal)
            await assert_honest(env, server)

    run_async(main)


# -- 7: oversized messages -------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["handshake", "transport"])
def test_oversized_message_is_refused(env: Env, when: str) -> None:
    async def main() -> None:
        async with serving(env) as server:
            size = server.max_message + 1
            if when == "handshake":
                ws = await ws_connect(server)
            else:
                ws, _ = await raw_session(env, server)
            with contextlib.suppress(ConnectionClosed):
                await asyncio.wait_for(ws.send(bytes(size)), STEP)
            await expect_close(ws, CLOSE_TOO_BIG)
            # A message of exactly max_message bytes is not refused by the size limit
            # (it then fails authentication: it is all zeros).
            ws, _ = await raw_session(env, server)
            await asyncio.wait_for(ws.send(bytes(server.max_message)), STEP)
            await expect_close(ws, CLOSE_AUTH)
            await assert_honest(env, server)

    run_async(main)


# -- 8, 10: malformed plaintext, text frames -------------------------------------------------------


def _dup_keys_map() -> bytes:
    # {"t": "ping", "id": 1, "pad": b"", "t": "ping"} written by hand: packb cannot repeat a key.
    return (
        b"\x84"
        + msgpack.packb("t")
        + msgpack.packb("ping")
        + msgpack.packb("id")
        + msgpack.packb(1)
        + msgpack.packb("pad")
        + msgpack.packb(b"", use_bin_type=True)
        + msgpack.packb("t")
        + msgpack.packb("ping")
    )


def _malformed_plaintexts(env: Env) -> dict[str, bytes]:
    tensor = encode_tensors(honest_tensors(env))
    return {
        "garbage": b"\xc1\xff\x00garbage that is not msgpack",
        "truncated": pack({"t": "ping", "id": 1, "pad": b""})[:-2],
        "trailing": pack({"t": "ping", "id": 1, "pad": b""}) + b"\x00",
        "not-a-map": msgpack.packb(["t", "ping"]),
        "empty": b"",
        "duplicate-keys": _dup_keys_map(),
        "ext-type": msgpack.packb({"t": "ping", "id": msgpack.ExtType(5, b"\x01"), "pad": b""}),
        "ext-in-tensor": msgpack.packb(
            {"t": "run", "id": 3, "tensors": [dict(tensor[0], data=msgpack.ExtType(1, b"x"))]},
            use_bin_type=True,
        ),
        "unknown-field": pack({"t": "ping", "id": 1, "pad": b"", "admin": True}),
        "unknown-tensor-field": pack({"t": "run", "id": 3, "tensors": [dict(tensor[0], offset=8)]}),
        "unknown-type": pack({"t": "result", "id": 1, "tensors": [], "server_ms": 1.0}),
        "missing-id": pack({"t": "run", "tensors": tensor}),
        "bool-id": pack({"t": "run", "id": True, "tensors": tensor}),
        "negative-id": pack({"t": "run", "id": -1, "tensors": tensor}),
        "int-keys": msgpack.packb({1: "ping"}),
        "deep-nesting": b"\x91" * 2000 + b"\xc0",
    }


def test_malformed_msgpack_in_valid_ciphertext_closes_4400(env: Env) -> None:
    async def main() -> None:
        async with serving(env) as server:
            for name, plaintext in _malformed_plaintexts(env).items():
                ws, conn = await raw_session(env, server)
                assert conn.transport is not None
                await ws.send(conn.transport.encrypt(plaintext))
                assert await expect_close(ws, CLOSE_PROTOCOL) == [], name
            assert server.stats.requests == 0
            await assert_honest(env, server)

    run_async(main)


def test_malformed_handshake_envelope_is_rejected(env: Env) -> None:
    async def main() -> None:
        async with serving(env) as server:
            conn = new_conn(env)
            conn.start()
            (message1,) = conn.data_to_send()
            envelope = msgpack.unpackb(message1, raw=False)
            bad = {
                "garbage": b"\xc1 not msgpack",
                "extra-field": pack(dict(envelope, extra=1)),
                "version-2": pack(dict(envelope, v=2)),
                "unknown-suite": pack(dict(envelope, proto="Noise_NN_25519_AESGCM_SHA256")),
                "noise-as-str": pack(dict(envelope, noise="x")),
                "empty-noise": pack(dict(envelope, noise=b"")),
            }
            for name, data in bad.items():
                ws = await ws_connect(server)
                await ws.send(data)
                code = CLOSE_AUTH if name == "empty-noise" else CLOSE_PROTOCOL
                assert await expect_close(ws, code) == [], name
            assert server.stats.handshakes_ok == 0
            await assert_honest(env, server)

    run_async(main)


def test_text_message_closes_4400(env: Env) -> None:
    async def main() -> None:
        async with serving(env) as server:
            ws = await ws_connect(server)  # as the very first message
            await ws.send("hello")
            assert await expect_close(ws, CLOSE_PROTOCOL) == []
            ws, _ = await raw_session(env, server)  # after the handshake
            await ws.send('{"t": "run"}')
            assert await expect_close(ws, CLOSE_PROTOCOL) == []
            await assert_honest(env, server)

    run_async(main)


# -- 9: tensors that lie ---------------------------------------------------------------------------


def _lies(env: Env) -> dict[str, list[tuple[str, EncodedTensor]]]:
    ((name, t),) = honest_tensors(env)
    assert t.dtype == "float32" and t.shape == (1, 256) and t.codec == "none"
    data = bytes(t.data)  # the codec may hand out a memoryview
    as64 = np.frombuffer(data, dtype="<f4").astype("<f8").tobytes()
    return {
        "float64-for-float32": [(name, EncodedTensor("float64", t.shape, "none", as64))],
        "float64-label-float32-bytes": [(name, EncodedTensor("float64", (1, 128), "none", data))],
        "int32-label": [(name, EncodedTensor("int32", t.shape, "none", data))],
        "wrong-shape": [(name, EncodedTensor("float32", (1, 255), "none", data[:-4]))],
        "transposed": [(name, EncodedTensor("float32", (256, 1), "none", data))],
        "wrong-rank": [(name, EncodedTensor("float32", (1, 16, 16), "none", data))],
        "short-data": [(name, EncodedTensor("float32", t.shape, "none", data[:-1]))],
        "long-data": [(name, EncodedTensor("float32", t.shape, "none", data + b"\x00" * 4))],
        "empty-data": [(name, EncodedTensor("float32", t.shape, "none", b""))],
        "huge-shape": [(name, EncodedTensor("float32", (1 << 40, 256), "none", data))],
        "missing-tensor": [],
        "extra-tensor": [(name, t), ("extra", t)],
        "renamed-tensor": [("not-" + name, t)],
        "wrong-codec": [(name, EncodedTensor("float32", t.shape, "fp16", data[:512]))],
        "unknown-codec": [(name, EncodedTensor("float32", t.shape, "rot13", data))],
        "zstd-bomb-codec": [(name, EncodedTensor("float32", t.shape, "zstd", b"\x28\xb5\x2f\xfd"))],
        "scales-on-none": [(name, EncodedTensor("float32", t.shape, "none", data, b"\0" * 4))],
    }


def test_lying_tensors_get_payload_errors_and_the_connection_survives(env: Env) -> None:
    async def main() -> None:
        async with serving(env) as server:
            ws, conn = await raw_session(env, server)
            honest = honest_tensors(env)
            request_id = 100
            for name, tensors in _lies(env).items():
                request_id += 1
                event = await send_and_receive(
                    ws, conn, lambda c, t=tensors, r=request_id: c.send_run(r, t)
                )
                assert isinstance(event, ErrorReply), (name, event)
                assert event.code == "payload", (name, event)
                assert event.request_id == request_id
                # The same connection keeps working for the next honest request.
                request_id += 1
                event = await send_and_receive(
                    ws, conn, lambda c, r=request_id: c.send_run(r, honest)
                )
                assert isinstance(event, RunResult), (name, event)
                assert event.request_id == request_id
                assert_same(decode_result(env, event), env.expected)
            assert server.stats.errors.get("payload") == len(_lies(env))
            await ws.close()
            await assert_honest(env, server)

    run_async(main)


@pytest.mark.parametrize("lie", ["duplicate-name", "disallowed-dtype", "negative-dim"])
def test_structurally_lying_tensors_get_payload_errors(env: Env, lie: str) -> None:
    ((name, t),) = honest_tensors(env)
    tensors = {
        "duplicate-name": [(name, t), (name, t)],
        "disallowed-dtype": [(name, EncodedTensor("complex64", (1, 128), "none", t.data))],
        "negative-dim": [(name, EncodedTensor("float32", (-1, 256), "none", t.data))],
    }[lie]

    async def main() -> None:
        async with serving(env) as server:
            ws, conn = await raw_session(env, server)
            try:
                event = await send_and_receive(ws, conn, lambda c: c.send_run(1, tensors))
            except ConnectionClosed as exc:
                raise AssertionError(f"connection closed: {exc.rcvd}") from None
            assert isinstance(event, ErrorReply) and event.code == "payload"
            event = await send_and_receive(ws, conn, lambda c: c.send_run(2, honest_tensors(env)))
            assert isinstance(event, RunResult)
            await ws.close()

    run_async(main)


# -- 11: silent peers ------------------------------------------------------------------------------


def test_silent_clients_are_closed_after_the_timeouts(env: Env) -> None:
    async def main() -> None:
        async with serving(env, handshake_timeout=0.5, idle_timeout=0.5) as server:
            # A websocket that never sends handshake message 1.
            ws = await ws_connect(server)
            started = time.monotonic()
            assert await expect_close(ws, CLOSE_PROTOCOL, timeout=5) == []
            assert time.monotonic() - started < 3
            # A TCP connection that never even sends the HTTP upgrade request.
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", server.port), STEP
            )
            started = time.monotonic()
            try:
                data = await asyncio.wait_for(reader.read(65536), 5)
                while data:  # an error response may precede EOF; bounded by the wait_for
                    data = await asyncio.wait_for(reader.read(65536), 5)
            finally:
                writer.close()
            assert time.monotonic() - started < 3
            # A device that completes the handshake and then says nothing.
            ws, _ = await raw_session(env, server)
            started = time.monotonic()
            assert await expect_close(ws, CLOSE_PROTOCOL, timeout=5) == []
            assert time.monotonic() - started < 3
            await assert_honest(env, server)

    run_async(main)


# -- 12: health check ------------------------------------------------------------------------------


def _http_get(port: int, path: str) -> tuple[int, str, bytes]:
    status, headers, body = _http_get_all(port, path)
    return status, ", ".join(v for k, v in headers if k.lower() == "content-type"), body


def _http_get_all(port: int, path: str) -> tuple[int, list[tuple[str, str]], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=STEP)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        conn.close()


def test_healthz_over_plain_http(env: Env) -> None:
    async def main() -> None:
        async with serving(env) as server:
            status, content_type, body = await asyncio.wait_for(
                asyncio.to_thread(_http_get, server.port, "/healthz"), STEP + 1
            )
            assert status == 200
            assert "application/json" in content_type
            health = json.loads(body)
            # Unauthenticated: up/ready only, no load or bundle list for anyone who asks.
            assert health == {"ready": True, "status": "ok"}
            # Any other plain HTTP request is not a websocket upgrade: refused, server fine.
            status, _, _ = await asyncio.wait_for(
                asyncio.to_thread(_http_get, server.port, "/"), STEP + 1
            )
            assert status >= 400
            await assert_honest(env, server)

    run_async(main)


def test_healthz_has_one_json_content_type(env: Env) -> None:
    async def main() -> None:
        async with serving(env) as server:
            status, headers, _ = await asyncio.wait_for(
                asyncio.to_thread(_http_get_all, server.port, "/healthz"), STEP + 1
            )
            assert status == 200
            content_types = [v for k, v in headers if k.lower() == "content-type"]
            assert content_types == ["application/json"]

    run_async(main)


# -- overload --------------------------------------------------------------------------------------


def test_overloaded_server_refuses_with_retry_after_and_clients_retry(env: Env) -> None:
    """A full server refuses at once (no unbounded queue) with a retry-after; clients wait
    that long, jittered, and retry inside their timeout: every answer correct, every
    refusal accounted for as a retry."""

    async def main() -> None:
        async with serving(env, [env.other_model], workers=1, max_inflight=1) as server:
            clients = [
                make_client(env, server, bundle=env.other_model, timeout=20)
                for _ in env.heavy_inputs
            ]
            try:
                await asyncio.wait_for(asyncio.gather(*(c.connect() for c in clients)), 10)
                outcomes = await asyncio.wait_for(
                    asyncio.gather(
                        *(c.run(x) for c, x in zip(clients, env.heavy_inputs, strict=True))
                    ),
                    25,
                )
                for outcome, expected in zip(outcomes, env.heavy_expected, strict=True):
                    assert_same(outcome, expected)
                refused = server.stats.errors.get("overloaded", 0)
                assert refused > 0, "a burst of concurrent requests on one slot was not refused"
                retries = 0
                for c in clients:
                    assert c.last_timing is not None and c.last_timing.offloaded
                    retries += c.last_timing.attempts - 1
                assert retries == refused  # every refusal was retried, none lost
                assert server.admission.refused["queue_full"] == refused
                # After the burst: no leaked in-flight slot.
                assert server._inflight == 0 and server.admission.admitted == 0
            finally:
                for c in clients:
                    await asyncio.wait_for(c.close(), STEP)

    run_async(main, timeout=50)
