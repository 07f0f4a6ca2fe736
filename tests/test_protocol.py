"""Unit and property tests of the sans-I/O wire protocol (edgeoffload.protocol.connection).

No sockets: a ClientConnection and a ServerConnection are driven against each other in memory by
handing ``data_to_send()`` of one side to ``receive()`` of the other. Keys, ephemeral keys and
time are fixed, so every run is deterministic.
"""

from __future__ import annotations

import contextlib
import itertools

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeoffload import __version__
from edgeoffload.core import codec as codec_mod
from edgeoffload.core import noise as noise_mod
from edgeoffload.core.noise import DEFAULT_PROTOCOL, RUNTIME_PROTOCOLS
from edgeoffload.errors import (
    AuthenticationFailed,
    LocalProtocolError,
    Overloaded,
    PayloadError,
    ProtocolError,
    RemoteProtocolError,
    ServerBusy,
    SessionError,
    SessionLost,
    VersionMismatch,
)
from edgeoffload.keys import KeyPair
from edgeoffload.protocol._state import TRANSITIONS, Role, State
from edgeoffload.protocol.connection import (
    ERROR_CODES,
    MAC1_BYTES,
    MAC1_LABEL,
    MAX_HELLO_BYTES,
    MAX_RETRY_MS,
    PROTOCOL_VERSION,
    ClientConnection,
    HostedBundle,
    ReplayGuard,
    ServerConnection,
    mac1,
    mac1_key,
    prologue,
    tai64n,
)
from edgeoffload.protocol.events import (
    Chunk,
    CloseRequested,
    ErrorReply,
    Event,
    HandshakeComplete,
    InvalidRequest,
    Ping,
    Pong,
    RunRequest,
    RunResult,
)
from edgeoffload.protocol.load import ServerLoad
from edgeoffload.protocol.tensors import check_against_specs, decode_checked, decode_tensors
from edgeoffload.protocol.updates import FetchRefused
from edgeoffload.protocol.wire import (
    MAX_ARRAY,
    MAX_DIMS,
    MAX_MAP,
    MAX_STR,
    MAX_TENSORS,
    pack,
    unpack,
)
from edgeoffload.types import TensorSpec

CLIENT_STATIC = KeyPair.from_private(bytes(range(1, 33)))
SERVER_STATIC = KeyPair.from_private(bytes(range(101, 133)))
OTHER_STATIC = KeyPair.from_private(bytes(range(201, 233)))
CLIENT_EPHEMERAL = KeyPair.from_private(bytes([0x11] * 32))
SERVER_EPHEMERAL = KeyPair.from_private(bytes([0x22] * 32))
T0 = 1_767_225_600_123_456_789
BUNDLE = "83e3c0620000000000000000000000000000000000000000000000000000020ae:c3"
VERSION = "0123456789abcdef"
OTHER_VERSION = "fedcba9876543210"
MAX_MESSAGE = 1 << 22
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- helpers -------------------------------------------------------------------------------------


def make_client(
    *,
    bundle: str = BUNDLE,
    version: str = VERSION,
    time_ns: int = T0,
    static: KeyPair = CLIENT_STATIC,
    server_public: bytes = SERVER_STATIC.public,
    protocol: str = DEFAULT_PROTOCOL,
    ephemeral: KeyPair | None = CLIENT_EPHEMERAL,
    features: tuple[str, ...] = (),
) -> ClientConnection:
    return ClientConnection(
        static=static,
        server_public=server_public,
        bundle=bundle,
        version=version,
        time_ns=time_ns,
        protocol=protocol,
        ephemeral=ephemeral,
        features=features,
    )


def make_server(
    *,
    bundles: dict[str, HostedBundle] | None = None,
    guard: ReplayGuard | None = None,
    allowed: tuple[bytes, ...] = (CLIENT_STATIC.public,),
    max_message: int = MAX_MESSAGE,
) -> ServerConnection:
    return ServerConnection(
        static=SERVER_STATIC,
        is_allowed=lambda key: key in allowed,
        bundles=bundles if bundles is not None else {VERSION: HostedBundle(BUNDLE, VERSION)},
        replay_guard=guard if guard is not None else ReplayGuard(),
        max_message=max_message,
        ephemeral=SERVER_EPHEMERAL,
    )


def one_message(conn: ClientConnection | ServerConnection) -> bytes:
    out = conn.data_to_send()
    assert len(out) == 1
    return bytes(out[0])


def deliver(src: ClientConnection | ServerConnection, dst) -> list[Event]:
    events: list[Event] = []
    for data in src.data_to_send():
        events.extend(dst.receive(bytes(data)))
    return events


def handshake(client: ClientConnection, server: ServerConnection) -> tuple[Event, Event]:
    client.start()
    (server_event,) = deliver(client, server)
    (client_event,) = deliver(server, client)
    return client_event, server_event


def connected(**server_kwargs) -> tuple[ClientConnection, ServerConnection]:
    client, server = make_client(), make_server(**server_kwargs)
    handshake(client, server)
    assert client.state is State.READY and server.state is State.READY
    return client, server


def sample_tensors() -> list[tuple[str, codec_mod.EncodedTensor]]:
    rng = np.random.default_rng(0)
    big = rng.standard_normal(300_000).astype(np.float32)  # 1.2 MB: many transport chunks
    return [
        ("x", codec_mod.encode(rng.standard_normal((2, 3)).astype(np.float32), _spec("none"))),
        ("h", codec_mod.encode(rng.standard_normal((1, 8, 4)).astype(np.float32), _spec("fp16"))),
        ("q", codec_mod.encode(rng.standard_normal((1, 4, 3)).astype(np.float32), _spec("int8c"))),
        ("mask", codec_mod.encode(np.ones((1, 16), dtype=np.int64), _spec("zstd"))),
        ("big", codec_mod.encode(big, _spec("none"))),
        ("empty", codec_mod.encode(np.zeros((0, 5), dtype=np.float32), _spec("lz4"))),
    ]


def _spec(text: str) -> codec_mod.CodecSpec:
    return codec_mod.CodecSpec.parse(text)


def same_tensors(got, sent) -> None:
    assert [name for name, _ in got] == [name for name, _ in sent]
    for (_, a), (_, b) in zip(got, sent, strict=True):
        assert (a.dtype, a.shape, a.codec) == (b.dtype, b.shape, b.codec)
        assert bytes(a.data) == bytes(b.data)
        assert bytes(a.scales) == bytes(b.scales)


def forge(sender: ClientConnection | ServerConnection, message: dict) -> bytes:
    """Any plaintext map encrypted with ``sender``'s real transport (bypassing its send_*)."""
    return bytes(sender.transport.encrypt(pack(message)))


# -- a full session ------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", RUNTIME_PROTOCOLS)
def test_full_session(protocol):
    client = make_client(protocol=protocol)
    server = make_server()
    assert client.state is State.IDLE and server.state is State.AWAIT_HELLO
    client_event, server_event = handshake(client, server)

    assert server_event == HandshakeComplete(CLIENT_STATIC.public, BUNDLE, VERSION)
    assert isinstance(client_event, HandshakeComplete)
    assert client_event.peer_public == SERVER_STATIC.public
    assert (client_event.bundle, client_event.version) == (BUNDLE, VERSION)
    assert client_event.info == {"max_message": MAX_MESSAGE, "agent": f"edgeoffload/{__version__}"}
    assert client.peer_max_message == MAX_MESSAGE  # what the server accepts
    assert client.max_message == 1 << 26  # our own receive limit is unchanged
    assert server.peer_public == CLIENT_STATIC.public
    assert server.bundle == HostedBundle(BUNDLE, VERSION)
    assert client.state is State.READY and server.state is State.READY

    # run -> RunRequest with the same tensors (one websocket message, many transport chunks)
    tensors = sample_tensors()
    client.send_run(1, tensors)
    (request,) = deliver(client, server)
    assert isinstance(request, RunRequest) and request.request_id == 1
    same_tensors(request.tensors, tensors)
    decoded = dict(request.tensors)
    np.testing.assert_array_equal(
        codec_mod.decode(decoded["big"]), codec_mod.decode(dict(tensors)["big"])
    )

    # result -> RunResult
    outputs = [("logits", codec_mod.encode(np.arange(10, dtype=np.float32), _spec("none")))]
    server.send_result(1, outputs, server_ms=2.5)
    (result,) = deliver(server, client)
    assert isinstance(result, RunResult)
    assert (result.request_id, result.server_ms) == (1, 2.5)
    same_tensors(result.tensors, outputs)

    # ping / pong with a pad
    pad = bytes(range(256)) * 4
    client.send_ping(7, pad)
    assert deliver(client, server) == [Ping(7, pad)]
    server.send_pong(7, pad)
    assert deliver(server, client) == [Pong(7, pad)]
    client.send_ping(8)
    assert deliver(client, server) == [Ping(8, b"")]

    # close from the device
    client.send_close("bye")
    assert client.state is State.CLOSED
    assert deliver(client, server) == [CloseRequested("bye")]
    assert server.state is State.CLOSED


EXPECTED_EXCEPTION = {
    "overloaded": Overloaded,
    "payload": PayloadError,
    "protocol": RemoteProtocolError,
    "timeout": ServerBusy,
    "internal": ServerBusy,
    "unknown_bundle": VersionMismatch,
    "version_mismatch": VersionMismatch,
    "shutting_down": ServerBusy,
    "session": SessionError,
    "session_lost": SessionLost,
    "duplicate_id": RemoteProtocolError,
    "fetch": FetchRefused,  # §16.3: the updater turns it into an UpdateError
}


def test_every_error_code_maps_to_its_exception():
    assert set(EXPECTED_EXCEPTION) == set(ERROR_CODES)
    client, server = connected()
    for rid, code in enumerate(ERROR_CODES):
        server.send_error(rid, code, f"message for {code}")
        (reply,) = deliver(server, client)
        assert reply == ErrorReply(rid, code, f"message for {code}")
        exc = reply.to_exception()
        assert type(exc) is EXPECTED_EXCEPTION[code], code
        assert f"message for {code}" in str(exc)
    server.send_error(None, "overloaded", "no id")
    assert deliver(server, client) == [ErrorReply(None, "overloaded", "no id")]
    assert client.state is State.READY and server.state is State.READY


def test_unknown_error_code_is_refused_by_sender_and_mapped_by_receiver():
    client, server = connected()
    with pytest.raises(LocalProtocolError):
        server.send_error(1, "teapot", "x")
    assert server.data_to_send() == []
    forged = forge(server, {"t": "error", "code": "teapot", "message": "m", "id": 3})
    (reply,) = client.receive(forged)
    assert reply == ErrorReply(3, "internal", "m")


def test_long_error_message_is_truncated_to_max_str():
    client, server = connected()
    server.send_error(1, "internal", "x" * (3 * MAX_STR))
    (reply,) = deliver(server, client)
    assert reply.message == "x" * MAX_STR


def test_non_ascii_error_message_is_truncated_to_max_str_bytes():
    client, server = connected()
    server.send_error(1, "internal", "é" * MAX_STR)
    (reply,) = deliver(server, client)
    assert reply.message == "é" * (MAX_STR // 2)
    client.send_close("ü" * MAX_STR)
    (event,) = deliver(client, server)
    assert event == CloseRequested("ü" * (MAX_STR // 2))


@pytest.mark.parametrize("server_ms", [-1.0, float("nan"), float("inf"), 1e12, True])
def test_result_with_a_bad_server_ms_is_a_remote_error(server_ms):
    client, server = connected()
    forged = forge(server, {"t": "result", "id": 1, "tensors": [], "server_ms": server_ms})
    with pytest.raises(RemoteProtocolError):
        client.receive(forged)


@pytest.mark.parametrize("rid", [-1, 2**63, True])
def test_error_with_a_bad_id_is_a_remote_error(rid):
    client, server = connected()
    forged = forge(server, {"t": "error", "code": "internal", "message": "m", "id": rid})
    with pytest.raises(RemoteProtocolError):
        client.receive(forged)


def test_request_larger_than_the_server_limit_is_refused_locally():
    client, server = connected(max_message=4096)
    tensors = [("x", codec_mod.encode(np.zeros(2048, dtype=np.float32), _spec("none")))]
    with pytest.raises(PayloadError, match="4096"):
        client.send_run(1, tensors)
    assert client.state is State.READY and client.data_to_send() == []
    client.send_ping(1)  # the nonce did not move: the session goes on
    assert deliver(client, server) == [Ping(1, b"")]


@pytest.mark.parametrize("side", ["server", "client"])
@pytest.mark.parametrize(
    "message",
    [{"t": "close"}, {"t": "close", "reason": 1}, {"t": "close", "reason": "", "x": 1}],
    ids=["no-reason", "int-reason", "extra-field"],
)
def test_malformed_close_leaves_the_state_unchanged(side, message):
    client, server = connected()
    receiver, sender = (server, client) if side == "server" else (client, server)
    with pytest.raises(RemoteProtocolError):
        receiver.receive(forge(sender, message))
    assert receiver.state is State.READY


def test_server_close():
    client, server = connected()
    server.send_close("maintenance")
    assert server.state is State.CLOSED
    assert deliver(server, client) == [CloseRequested("maintenance")]
    assert client.state is State.CLOSED


def test_pipelined_requests_keep_order():
    client, server = connected()
    tensors = sample_tensors()[:2]
    for rid in (5, 3, 9):
        client.send_run(rid, tensors)
    events = deliver(client, server)
    assert [e.request_id for e in events] == [5, 3, 9]


# -- the transition table ------------------------------------------------------------------------

LOAD = ServerLoad(inflight=2, queued=1, workers=1, kv_free=1 << 20, draining=False, tail_ms=3.5)
RUN_TENSORS = [("x", codec_mod.encode(np.zeros((1, 2), dtype=np.float32), _spec("none")))]

CLIENT_SENDS = {
    "send:hello": lambda c: c.start(),
    "send:run": lambda c: c.send_run(1, RUN_TENSORS),
    "send:ping": lambda c: c.send_ping(1, b"p"),
    "send:close": lambda c: c.send_close("bye"),
    "send:open": lambda c: c.send_open(1, {"temperature": 0.0}, 64),
    "send:prefill": lambda c: c.send_feed(1, "prefill", 7, 0, [Chunk(2, RUN_TENSORS)]),
    "send:step": lambda c: c.send_feed(1, "step", 7, 2, [Chunk(1, RUN_TENSORS)]),
    "send:end": lambda c: c.send_end(1, 7),
    "send:status": lambda c: c.send_status(1),
    "send:fetch": lambda c: c.send_fetch(1, "0123456789abcdef", "manifest.json", 0, 10),
}
SERVER_SENDS = {
    "send:result": lambda s: s.send_result(1, RUN_TENSORS, 1.0),
    "send:error": lambda s: s.send_error(1, "internal", "x"),
    "send:pong": lambda s: s.send_pong(1, b"p"),
    "send:close": lambda s: s.send_close("bye"),
    "send:opened": lambda s: s.send_opened(1, 7, 64),
    "send:token": lambda s: s.send_token(1, 7, 3, 42, 1.0),
    "send:ended": lambda s: s.send_ended(1, 7),
    "send:status": lambda s: s.send_status(1, LOAD, []),
    "send:file": lambda s: s.send_file(1, b"0123456789", 20),
}
# One valid plaintext of every transport message type, from either side.
TRANSPORT_MESSAGES = {
    "run": {"t": "run", "id": 1, "tensors": []},
    "ping": {"t": "ping", "id": 1, "pad": b""},
    "close": {"t": "close", "reason": "r"},
    "result": {"t": "result", "id": 1, "tensors": [], "server_ms": 1.0},
    "error": {"t": "error", "code": "internal", "message": "m", "id": 1},
    "pong": {"t": "pong", "id": 1, "pad": b""},
    "open": {"t": "open", "id": 1, "sampling": {}, "max_tokens": 64},
    "prefill": {
        "t": "prefill",
        "id": 1,
        "session": 7,
        "pos": 0,
        "chunks": [{"n": 2, "tensors": []}],
    },
    "step": {"t": "step", "id": 1, "session": 7, "pos": 2, "tensors": []},
    "end": {"t": "end", "id": 1, "session": 7},
    "opened": {"t": "opened", "id": 1, "session": 7, "max_tokens": 64},
    "token": {"t": "token", "id": 1, "session": 7, "pos": 3, "token": 42, "server_ms": 1.0},
    "ended": {"t": "ended", "id": 1, "session": 7},
    "status": {"t": "status", "id": 1},
    "fetch": {
        "t": "fetch",
        "id": 1,
        "version": "0123456789abcdef",
        "file": "manifest.json",
        "offset": 0,
        "length": 10,
    },
    "file": {"t": "file", "id": 1, "data": b"0123456789", "size": 20},
}
# The server's answer to "status" has the same type name and more fields.
SERVER_STATUS = {"t": "status", "id": 1, "load": LOAD.to_wire(), "bundles": []}


def client_in(state: State) -> tuple[ClientConnection, ServerConnection]:
    """A client in ``state`` and the server it talks to (with the §14 features)."""
    client, server = make_client(features=("load", "update")), make_server()
    if state is State.IDLE:
        return client, server
    client.start()
    if state is State.HANDSHAKE_SENT:
        client.data_to_send()
        return client, server
    deliver(client, server)
    deliver(server, client)
    if state is State.CLOSED:
        client.send_close()
        client.data_to_send()
    assert client.state is state
    return client, server


def server_in(state: State) -> tuple[ServerConnection, ClientConnection]:
    """A server in ``state`` and the client it talks to (with the §14 features)."""
    client, server = make_client(features=("load", "update")), make_server()
    if state is State.AWAIT_HELLO:
        return server, client
    client.start()
    deliver(client, server)
    deliver(server, client)
    if state is State.CLOSED:
        server.send_close()
        server.data_to_send()
    assert server.state is state
    return server, client


CLIENT_STATES = (State.IDLE, State.HANDSHAKE_SENT, State.READY, State.CLOSED)
SERVER_STATES = (State.AWAIT_HELLO, State.READY, State.CLOSED)


def _try_send(conn, action: str, send, observed: dict) -> None:
    role, before = conn.role, conn.state
    key = (role, before, action)
    if key in TRANSITIONS:
        send(conn)
        assert len(conn.data_to_send()) == 1, key
        observed[key] = conn.state
    else:
        with pytest.raises(LocalProtocolError):
            send(conn)
        assert conn.state is before, key
        assert conn.data_to_send() == [], key


def _try_receive(conn, sender, kind: str, observed: dict) -> None:
    role, before = conn.role, conn.state
    key = (role, before, f"recv:{kind}")
    if before is not State.READY:
        # Outside "ready" there is no transport to carry these messages.
        assert key not in TRANSITIONS
        with pytest.raises(LocalProtocolError):
            conn.receive(b"\x00" * 64)
        return
    plain = TRANSPORT_MESSAGES[kind]
    if kind == "status" and role is Role.CLIENT:
        plain = SERVER_STATUS
    if kind == "file" and role is Role.CLIENT:  # a file reply answers a pending fetch (§16.3)
        conn.send_fetch(1, "0123456789abcdef", "manifest.json", 0, 10)
        conn.data_to_send()
    data = forge(sender, plain)
    if key in TRANSITIONS:
        events = conn.receive(data)
        assert len(events) == 1, key
        observed[key] = conn.state
    else:
        with pytest.raises(RemoteProtocolError):
            conn.receive(data)
        assert conn.state is before, key


def test_transitions_table_is_exactly_what_the_code_enforces():
    observed: dict[tuple[Role, State, str], State] = {}
    for state, action in itertools.product(CLIENT_STATES, CLIENT_SENDS):
        client, _ = client_in(state)
        _try_send(client, action, CLIENT_SENDS[action], observed)
    for state, action in itertools.product(SERVER_STATES, SERVER_SENDS):
        server, _ = server_in(state)
        _try_send(server, action, SERVER_SENDS[action], observed)
    for state, kind in itertools.product(CLIENT_STATES, TRANSPORT_MESSAGES):
        if state is State.HANDSHAKE_SENT:
            continue  # message 2 is covered below
        client, server = client_in(state)
        _try_receive(client, server, kind, observed)
    for state, kind in itertools.product(SERVER_STATES, TRANSPORT_MESSAGES):
        if state is State.AWAIT_HELLO:
            continue  # message 1 is covered below
        server, client = server_in(state)
        _try_receive(server, client, kind, observed)

    # The handshake rows: hello, welcome, refusal.
    client, server = make_client(), make_server()
    client.start()
    server.receive(one_message(client))
    observed[(Role.SERVER, State.AWAIT_HELLO, "recv:hello")] = server.state
    client.receive(one_message(server))
    observed[(Role.CLIENT, State.HANDSHAKE_SENT, "recv:welcome")] = client.state
    client, server = make_client(), make_server(bundles={})
    client.start()
    server.receive(one_message(client))
    observed[(Role.SERVER, State.AWAIT_HELLO, "send:refused")] = server.state
    with pytest.raises(VersionMismatch):
        client.receive(one_message(server))
    observed[(Role.CLIENT, State.HANDSHAKE_SENT, "recv:refused")] = client.state

    assert observed == TRANSITIONS


def test_send_before_handshake_is_a_local_error():
    client = make_client()
    for send in (CLIENT_SENDS["send:run"], CLIENT_SENDS["send:ping"], CLIENT_SENDS["send:close"]):
        with pytest.raises(LocalProtocolError, match="not allowed in state idle"):
            send(client)
    assert client.state is State.IDLE and client.data_to_send() == []
    server = make_server()
    for send in SERVER_SENDS.values():
        with pytest.raises(LocalProtocolError, match="await-hello"):
            send(server)
    assert server.data_to_send() == []


def test_client_cannot_start_twice():
    client = make_client()
    client.start()
    with pytest.raises(LocalProtocolError):
        client.start()
    assert len(client.data_to_send()) == 1


@pytest.mark.parametrize("kind", ["result", "error", "pong"])
def test_server_receiving_a_server_message_is_a_remote_error(kind):
    client, server = connected()
    with pytest.raises(RemoteProtocolError, match="unknown device message type"):
        server.receive(forge(client, TRANSPORT_MESSAGES[kind]))
    # Other errors leave the state (and the transport) as they were (PROTOCOL.md section 3).
    assert server.state is State.READY
    client.send_ping(2)
    assert deliver(client, server) == [Ping(2, b"")]


@pytest.mark.parametrize("kind", ["run", "ping"])
def test_client_receiving_a_device_message_is_a_remote_error(kind):
    client, server = connected()
    with pytest.raises(RemoteProtocolError, match="unknown server message type"):
        client.receive(forge(server, TRANSPORT_MESSAGES[kind]))


def test_receive_after_close_is_refused():
    client, server = connected()
    client.send_close()
    closing = one_message(client)
    server.receive(closing)
    with pytest.raises(LocalProtocolError):
        server.receive(closing)
    with pytest.raises(LocalProtocolError):
        client.receive(b"\x00" * 32)
    for send in SERVER_SENDS.values():
        with pytest.raises(LocalProtocolError):
            send(server)


def test_receive_before_start_is_refused():
    with pytest.raises(LocalProtocolError):
        make_client().receive(b"\x80")


def test_decryption_failure_closes_the_connection():
    client, server = connected()
    client.send_ping(1)
    data = bytearray(one_message(client))
    data[-1] ^= 1
    with pytest.raises(AuthenticationFailed):
        server.receive(bytes(data))
    assert server.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        server.receive(bytes(data))


def test_replayed_transport_message_fails_authentication():
    client, server = connected()
    client.send_ping(1)
    data = one_message(client)
    assert server.receive(data) == [Ping(1, b"")]
    with pytest.raises(AuthenticationFailed):
        server.receive(data)
    assert server.state is State.CLOSED


def test_ciphertext_longer_than_max_message_is_refused_before_decryption():
    client, server = connected(max_message=4096)
    client.send_ping(1, b"x" * 5000)
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        server.receive(one_message(client))


# -- handshake refusals and authentication -------------------------------------------------------


def _hello(client: ClientConnection | None = None) -> bytes:
    client = client or make_client()
    client.start()
    return one_message(client)


def test_unknown_bundle_is_refused_with_an_encrypted_reply():
    client = make_client()
    server = make_server(bundles={OTHER_VERSION: HostedBundle("other-model:c9", OTHER_VERSION)})
    client.start()
    (event,) = deliver(client, server)
    assert isinstance(event, ErrorReply)
    assert (event.request_id, event.code) == (None, "unknown_bundle")
    assert OTHER_VERSION in event.message
    assert server.state is State.CLOSED
    assert server.transport is None
    reply = one_message(server)
    envelope = unpack(reply, max_bin=4096)
    assert set(envelope) == {"v", "noise"} and envelope["v"] == PROTOCOL_VERSION
    assert b"unknown_bundle" not in reply and OTHER_VERSION.encode() not in reply
    with pytest.raises(VersionMismatch) as info:
        client.receive(reply)
    assert VERSION in info.value.message and OTHER_VERSION in info.value.message
    assert client.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        client.send_ping(1)


def test_other_version_of_the_same_bundle_is_a_version_mismatch():
    client = make_client()
    server = make_server(bundles={OTHER_VERSION: HostedBundle(BUNDLE, OTHER_VERSION)})
    client.start()
    (event,) = deliver(client, server)
    assert event.code == "version_mismatch" and OTHER_VERSION in event.message
    reply = one_message(server)
    assert b"version_mismatch" not in reply
    with pytest.raises(VersionMismatch) as info:
        client.receive(reply)
    message = info.value.message
    assert VERSION in message and OTHER_VERSION in message and BUNDLE in message
    assert info.value.hint


def test_hosted_version_with_another_identity_is_refused():
    server = make_server(bundles={VERSION: HostedBundle("other-model:c9", VERSION)})
    (event,) = server.receive(_hello())
    assert isinstance(event, ErrorReply) and event.code == "unknown_bundle"


def test_server_picks_the_requested_version_among_several():
    bundles = {
        OTHER_VERSION: HostedBundle(BUNDLE, OTHER_VERSION),
        VERSION: HostedBundle(BUNDLE, VERSION),
    }
    client, server = make_client(), make_server(bundles=bundles)
    client_event, _ = handshake(client, server)
    assert client_event.version == VERSION and server.bundle == bundles[VERSION]


def test_device_not_allowed_is_opaque_and_silent():
    server = make_server(allowed=(OTHER_STATIC.public,))
    with pytest.raises(AuthenticationFailed) as info:
        server.receive(_hello())
    assert str(info.value) == "authentication failed"
    assert server.data_to_send() == []
    assert server.state is State.CLOSED and server.peer_public is None


def test_wrong_pinned_server_key_fails_authentication():
    server = make_server()
    with pytest.raises(AuthenticationFailed):
        server.receive(_hello(make_client(server_public=OTHER_STATIC.public)))
    assert server.data_to_send() == []


def test_replayed_hello_is_refused_by_a_server_sharing_the_guard():
    guard = ReplayGuard()
    hello = _hello()
    (event,) = make_server(guard=guard).receive(hello)
    assert isinstance(event, HandshakeComplete)
    second = make_server(guard=guard)
    with pytest.raises(AuthenticationFailed):
        second.receive(hello)
    assert second.data_to_send() == [] and second.state is State.CLOSED


def test_refused_hello_still_records_its_timestamp():
    guard = ReplayGuard()
    hello = _hello()
    (event,) = make_server(guard=guard, bundles={}).receive(hello)
    assert isinstance(event, ErrorReply)
    with pytest.raises(AuthenticationFailed):
        make_server(guard=guard).receive(hello)


@pytest.mark.parametrize("delta", [-1, 0, -(10**9)])
def test_older_or_equal_timestamp_is_refused(delta):
    guard = ReplayGuard()
    make_server(guard=guard).receive(_hello(make_client(time_ns=T0)))
    # a fresh client (another ephemeral key): only the timestamp is stale
    late = make_client(time_ns=T0 + delta, ephemeral=None)
    with pytest.raises(AuthenticationFailed):
        make_server(guard=guard).receive(_hello(late))


def test_newer_timestamp_is_accepted():
    guard = ReplayGuard()
    make_server(guard=guard).receive(_hello(make_client(time_ns=T0)))
    (event,) = make_server(guard=guard).receive(_hello(make_client(time_ns=T0 + 1)))
    assert isinstance(event, HandshakeComplete)


def _tampered(**changes) -> bytes:
    envelope = unpack(_hello(), max_bin=4096)
    envelope.update(changes)
    return pack(envelope)


@pytest.mark.parametrize(
    "changes",
    [
        {"bundle": BUNDLE[:-1] + "4"},
        {"bundle": ""},
        {"proto": RUNTIME_PROTOCOLS[1]},
    ],
    ids=["bundle", "empty-bundle", "proto"],
)
def test_tampered_envelope_fails_authentication(changes):
    server = make_server()
    with pytest.raises(AuthenticationFailed) as info:
        server.receive(_tampered(**changes))
    assert str(info.value) == "authentication failed"
    assert server.data_to_send() == []


def test_flipped_noise_bit_fails_authentication():
    envelope = unpack(_hello(), max_bin=4096)
    for position in (0, 40, len(envelope["noise"]) - 1):
        noise = bytearray(envelope["noise"])
        noise[position] ^= 0x80
        with pytest.raises(AuthenticationFailed):
            make_server().receive(pack(dict(envelope, noise=bytes(noise))))


@pytest.mark.parametrize("v", [0, 2, True, "1", 1.0, None])
def test_wrong_protocol_version_is_a_remote_error(v):
    with pytest.raises(RemoteProtocolError):
        make_server().receive(_tampered(v=v))


@pytest.mark.parametrize(
    "proto",
    ["Noise_XX_25519_ChaChaPoly_BLAKE2s", "Noise_IK_25519_ChaChaPoly_SHA256", "", "ü"],
)
def test_unsupported_noise_protocol_is_a_remote_error(proto):
    with pytest.raises(RemoteProtocolError, match="unsupported Noise protocol"):
        make_server().receive(_tampered(proto=proto))


def test_client_refuses_an_unsupported_protocol():
    with pytest.raises(LocalProtocolError):
        make_client(protocol="Noise_XX_25519_ChaChaPoly_BLAKE2s")


@pytest.mark.parametrize("field", ["v", "proto", "bundle", "noise"])
def test_envelope_missing_field_is_a_remote_error(field):
    envelope = unpack(_hello(), max_bin=4096)
    del envelope[field]
    with pytest.raises(RemoteProtocolError, match="missing field"):
        make_server().receive(pack(envelope))


def test_envelope_extra_field_is_a_remote_error():
    with pytest.raises(RemoteProtocolError, match="unknown field"):
        make_server().receive(_tampered(admin=True))


def test_client_checks_the_welcome_strictly():
    client, server = make_client(), make_server()
    client.start()
    deliver(client, server)
    welcome = unpack(one_message(server), max_bin=4096)
    with pytest.raises(RemoteProtocolError):
        client.receive(pack(dict(welcome, v=2)))
    with pytest.raises(RemoteProtocolError, match="unknown field"):
        client.receive(pack(dict(welcome, extra=1)))
    noise = bytearray(welcome["noise"])
    noise[-1] ^= 1
    with pytest.raises(AuthenticationFailed):
        client.receive(pack(dict(welcome, noise=bytes(noise))))


# -- mac1: the cheap check before any Diffie-Hellman (PROTOCOL.md §5.3) -----------------------


@pytest.fixture
def noise_calls(monkeypatch) -> dict[str, int]:
    """Counts X25519 operations and Noise message reads from here on.

    Wraps the Noise module's collaborators (not the check under test), so a test can tell
    whether a hello reached the expensive part of the handshake at all.
    """
    calls = {"dh": 0, "read_message": 0}
    real_dh, real_read = noise_mod._dh, noise_mod.HandshakeState.read_message

    def counting_dh(private: bytes, public: bytes) -> bytes:
        calls["dh"] += 1
        return real_dh(private, public)

    def counting_read(self, message: bytes) -> bytes:
        calls["read_message"] += 1
        return real_read(self, message)

    monkeypatch.setattr(noise_mod, "_dh", counting_dh)
    monkeypatch.setattr(noise_mod.HandshakeState, "read_message", counting_read)
    return calls


def _spec_mac1(server_public: bytes, envelope: dict) -> bytes:
    """mac1 as PROTOCOL.md §5.3 writes it, with hashlib directly."""
    import hashlib

    key = hashlib.blake2s(b"edgeoffload mac1" + server_public).digest()
    data = prologue(envelope["proto"], envelope["bundle"]) + envelope["noise"]
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def test_hello_carries_the_mac1_of_the_spec():
    envelope = unpack(_hello(), max_bin=4096)
    assert list(envelope) == ["v", "proto", "bundle", "noise", "mac1"]
    assert len(envelope["mac1"]) == MAC1_BYTES == 16
    assert MAC1_LABEL == b"edgeoffload mac1"
    assert envelope["mac1"] == _spec_mac1(SERVER_STATIC.public, envelope)
    assert mac1_key(SERVER_STATIC.public) == mac1_key(bytes(SERVER_STATIC.public))  # cached
    pro = prologue(envelope["proto"], envelope["bundle"])
    assert mac1(mac1_key(SERVER_STATIC.public), pro, envelope["noise"]) == envelope["mac1"]


def _flip_bit(data: bytes, index: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


def _without_mac1() -> bytes:
    envelope = unpack(_hello(), max_bin=4096)
    del envelope["mac1"]
    return pack(envelope)


def _mac1_cases() -> dict[str, bytes]:
    envelope = unpack(_hello(), max_bin=4096)
    tag = envelope["mac1"]
    other_server = _spec_mac1(OTHER_STATIC.public, envelope)
    cases = {
        "missing": _without_mac1(),
        "nil": pack(dict(envelope, mac1=None)),
        "as-str": pack(dict(envelope, mac1=tag.hex())),
        "short": pack(dict(envelope, mac1=tag[:15])),
        "long": pack(dict(envelope, mac1=tag + b"\x00")),
        "empty": pack(dict(envelope, mac1=b"")),
        "another-server-key": pack(dict(envelope, mac1=other_server)),
        # a hello built by a device that pinned another key: mac1 and Noise both for that key
        "device-pinned-another-key": _hello(make_client(server_public=OTHER_STATIC.public)),
        # the mac1 covers every byte of the Noise message, so tampering is caught before DH
        "noise-bit": pack(dict(envelope, noise=_flip_bit(envelope["noise"], 40))),
        "empty-noise": pack(dict(envelope, noise=b"")),
        "bundle": pack(dict(envelope, bundle=BUNDLE[:-1] + "4")),
        "proto": pack(dict(envelope, proto=RUNTIME_PROTOCOLS[1])),
    }
    for bit in range(8):
        cases[f"mac1-bit{bit}"] = pack(dict(envelope, mac1=_flip_bit(tag, bit % MAC1_BYTES, bit)))
    return cases


MAC1_CASES = _mac1_cases()


@pytest.mark.parametrize("name", list(MAC1_CASES))
def test_bad_mac1_fails_authentication_before_any_diffie_hellman(name, noise_calls):
    server = make_server()
    with pytest.raises(AuthenticationFailed) as info:
        server.receive(MAC1_CASES[name])
    assert str(info.value) == "authentication failed"  # opaque, as every other auth failure
    assert noise_calls == {"dh": 0, "read_message": 0}
    assert server.data_to_send() == [] and server.state is State.CLOSED
    assert server.peer_public is None


def test_valid_hello_still_completes_and_does_its_diffie_hellmans(noise_calls):
    hello = _hello()  # built before counting: the device's own DHs are not the server's
    noise_calls.update(dh=0, read_message=0)
    server = make_server()
    (event,) = server.receive(hello)
    assert isinstance(event, HandshakeComplete) and server.state is State.READY
    # IK message 1 costs the responder es and ss; message 2 (written here) ee and se.
    assert noise_calls == {"dh": 4, "read_message": 1}


def test_bad_mac1_does_not_burn_the_timestamp():
    guard = ReplayGuard()
    hello = _hello()
    envelope = unpack(hello, max_bin=4096)
    forged = pack(dict(envelope, mac1=_flip_bit(envelope["mac1"], 0)))
    with pytest.raises(AuthenticationFailed):
        make_server(guard=guard).receive(forged)
    (event,) = make_server(guard=guard).receive(hello)
    assert isinstance(event, HandshakeComplete)


def test_mac1_does_not_hide_a_wrong_version_or_a_malformed_envelope(noise_calls):
    # v is checked by value (RemoteProtocolError, 4400) and unknown fields are a protocol error.
    wrong_version, extra_field = _tampered(v=2), _tampered(extra=1)
    noise_calls.update(dh=0)  # building the hellos cost the device its DHs
    with pytest.raises(RemoteProtocolError, match="protocol version"):
        make_server().receive(wrong_version)
    with pytest.raises(RemoteProtocolError, match="unknown field"):
        make_server().receive(extra_field)
    assert noise_calls == {"dh": 0, "read_message": 0}


def test_first_message_longer_than_max_hello_bytes_is_refused_before_decoding(
    noise_calls, monkeypatch
):
    import edgeoffload.protocol.connection as connection_mod

    decoded = []
    real_unpack = connection_mod.unpack
    monkeypatch.setattr(
        connection_mod,
        "unpack",
        lambda data, **kw: decoded.append(len(data)) or real_unpack(data, **kw),
    )
    too_long = _hello() + bytes(MAX_HELLO_BYTES)  # a valid hello followed by padding
    noise_calls.update(dh=0)  # building the hello cost the device its DHs
    for data in (too_long, bytes(MAX_HELLO_BYTES + 1), b"\x85" * (MAX_HELLO_BYTES + 1)):
        server = make_server()
        with pytest.raises(RemoteProtocolError, match=f"exceeds {MAX_HELLO_BYTES}"):
            server.receive(data)
        assert server.state is State.CLOSED and server.data_to_send() == []
    assert decoded == [] and noise_calls["dh"] == 0
    # At the limit the size passes and the bytes are decoded (and refused as garbage).
    with pytest.raises(RemoteProtocolError, match=r"malformed|map"):
        make_server().receive(bytes(MAX_HELLO_BYTES))
    assert decoded == [MAX_HELLO_BYTES]


def test_max_hello_bytes_leaves_room_for_any_reference_hello():
    long_bundle = "f" * 64 + ":" + "c" * 200
    hello = _hello(make_client(bundle=long_bundle, features=tuple(f"f{i}" for i in range(16))))
    assert len(hello) < MAX_HELLO_BYTES // 4


# -- retry_ms on overloaded (PROTOCOL.md §7) -----------------------------------------------------


@pytest.mark.parametrize("retry_ms", [0, 1, 250, MAX_RETRY_MS])
def test_retry_ms_round_trips_and_becomes_retry_after(retry_ms):
    client, server = connected()
    server.send_error(5, "overloaded", "busy", retry_ms=retry_ms)
    (reply,) = deliver(server, client)
    assert reply == ErrorReply(5, "overloaded", "busy", retry_ms)
    exc = reply.to_exception()
    assert type(exc) is Overloaded
    assert exc.retry_after == retry_ms / 1000
    assert client.state is State.READY


def test_overloaded_without_retry_ms_has_no_retry_after():
    client, server = connected()
    server.send_error(5, "overloaded", "busy")
    (reply,) = deliver(server, client)
    assert reply.retry_ms is None and reply.to_exception().retry_after is None


def test_retry_ms_is_written_last():
    client, server = connected()
    server.send_error(5, "overloaded", "busy", retry_ms=250)
    plaintext = client.transport.decrypt(one_message(server))
    assert list(unpack(plaintext, max_bin=64)) == ["t", "code", "message", "id", "retry_ms"]


@pytest.mark.parametrize(
    "retry_ms", [-1, MAX_RETRY_MS + 1, 2**64 - 1, -(2**63), 1.5, 250.0, True, False, "250", None]
)
def test_bad_retry_ms_is_a_protocol_error_at_the_client(retry_ms):
    client, server = connected()
    forged = forge(
        server, {"t": "error", "code": "overloaded", "message": "m", "id": 1, "retry_ms": retry_ms}
    )
    with pytest.raises(RemoteProtocolError, match="retry_ms"):
        client.receive(forged)


@pytest.mark.parametrize("code", [c for c in ERROR_CODES if c != "overloaded"] + ["teapot"])
def test_retry_ms_with_another_code_is_a_protocol_error_at_the_client(code):
    client, server = connected()
    forged = forge(server, {"t": "error", "code": code, "message": "m", "retry_ms": 10})
    with pytest.raises(RemoteProtocolError, match="retry_ms"):
        client.receive(forged)


@pytest.mark.parametrize(
    ("code", "retry_ms"),
    [("overloaded", -1), ("overloaded", MAX_RETRY_MS + 1), ("overloaded", 1.5),
     ("overloaded", True), ("internal", 10), ("shutting_down", 0)],
)  # fmt: skip
def test_server_refuses_to_send_a_bad_retry_ms(code, retry_ms):
    _, server = connected()
    with pytest.raises(LocalProtocolError, match="retry_ms"):
        server.send_error(1, code, "m", retry_ms=retry_ms)
    assert server.data_to_send() == [] and server.state is State.READY


# -- strict msgpack ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"\x82\xa1a\x01\xa1a\x02",  # {"a": 1, "a": 2}
        b"\x81\xa1m\x82\xa1b\x01\xa1b\x02",  # duplicate key one level down
        b"\x81\xa1l\x91\x82\xa1c\x01\xa1c\x01",  # duplicate key inside a list
    ],
    ids=["top", "nested", "in-list"],
)
def test_unpack_rejects_duplicate_keys(data):
    with pytest.raises(RemoteProtocolError):
        unpack(data, max_bin=100)


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb({"a": msgpack.ExtType(5, b"xy")}),
        msgpack.packb({"a": msgpack.ExtType(0, b"")}),
        msgpack.packb({"a": msgpack.Timestamp(1, 0)}),
        b"\x81\xa1a\xd6\xff\x00\x00\x00\x00",  # fixext 4, type -1 (timestamp 32)
        b"\x81\xa1a\xc7\x00\xff",  # ext 8, type -1, empty
        b"\x81\xa1a\xc7\x00\x05",  # ext 8, type 5, empty
    ],
    ids=["ext5", "ext0-empty", "timestamp", "fixext-1", "ext8-1-empty", "ext8-5-empty"],
)
def test_unpack_rejects_extension_types(data):
    with pytest.raises(RemoteProtocolError):
        unpack(data, max_bin=100)


@pytest.mark.parametrize("value", [[1, 2], 1, "s", None, b"b", 1.5, True])
def test_unpack_requires_a_map(value):
    with pytest.raises(RemoteProtocolError, match="map"):
        unpack(msgpack.packb(value, use_bin_type=True), max_bin=100)


@pytest.mark.parametrize(
    ("ok", "too_big"),
    [
        ({"s": "x" * MAX_STR}, {"s": "x" * (MAX_STR + 1)}),
        ({"s": "é" * (MAX_STR // 2)}, {"s": "é" * (MAX_STR // 2 + 1)}),  # UTF-8 bytes count
        ({"a": [0] * MAX_ARRAY}, {"a": [0] * (MAX_ARRAY + 1)}),
        ({str(i): i for i in range(MAX_MAP)}, {str(i): i for i in range(MAX_MAP + 1)}),
        (
            {"m": {str(i): i for i in range(MAX_MAP)}},
            {"m": {str(i): i for i in range(MAX_MAP + 1)}},
        ),
        ({"b": b"x" * 100}, {"b": b"x" * 101}),
    ],
    ids=["str", "utf8-str", "array", "map", "nested-map", "bin"],
)
def test_unpack_limits(ok, too_big):
    assert unpack(pack(ok), max_bin=100) == ok
    with pytest.raises(RemoteProtocolError):
        unpack(pack(too_big), max_bin=100)


@pytest.mark.parametrize(
    "data",
    [
        pack({"a": 1}) + b"\x00",  # trailing data
        pack({"a": 1})[:-1],  # truncated
        b"",
        b"\x81\xa1a\xa2\xff\xfe",  # invalid UTF-8 value
        b"\x81\xa2\xc3\x28\x01",  # invalid UTF-8 key
        b"\x81\x01\x02",  # int key
        b"\x81\x80\x01",  # map as key
        b"\xc1",  # never-used byte
        b"\x91" * 5000 + b"\x80",  # deep nesting
    ],
    ids=[
        "trailing",
        "truncated",
        "empty",
        "utf8-value",
        "utf8-key",
        "int-key",
        "map-key",
        "c1",
        "deep",
    ],
)
def test_unpack_rejects_malformed_input(data):
    with pytest.raises(RemoteProtocolError):
        unpack(data, max_bin=100)


@FUZZ
@given(st.binary(max_size=2000))
def test_unpack_arbitrary_bytes_raises_only_remote_protocol_error(data):
    try:
        result = unpack(data, max_bin=512)
    except RemoteProtocolError:
        return
    assert isinstance(result, dict)


# -- fuzzing the server --------------------------------------------------------------------------

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.binary(max_size=24)
)
anything = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)
tensor_map = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "y", ""]) | anything,
        "dtype": st.sampled_from([*codec_mod.ALLOWED_DTYPES, "complex64", "object"]) | anything,
        "shape": st.lists(
            st.integers(min_value=-3, max_value=2**64 - 1) | st.booleans() | st.just(2),
            max_size=MAX_DIMS + 2,
        )
        | anything,
        "codec": st.sampled_from(["none", "fp16", "int8", "int8c", "zstd", "fp16+lz4", "x"])
        | anything,
        "data": st.binary(max_size=64) | anything,
    },
    optional={"scales": st.binary(max_size=16) | anything, "extra": anything},
)
run_message = st.fixed_dictionaries(
    {
        "t": st.just("run"),
        "id": st.integers(min_value=-2, max_value=2**64 - 1) | anything,
        "tensors": st.lists(tensor_map | anything, max_size=4) | anything,
    },
    optional={"extra": anything},
)
typed_message = st.fixed_dictionaries(
    {"t": st.sampled_from(["run", "ping", "close", "result", "error", "pong", "hello", ""])},
    optional={
        "id": st.integers(min_value=-2, max_value=2**64 - 1) | anything,
        "pad": st.binary(max_size=16) | anything,
        "reason": st.text(max_size=8) | anything,
        "tensors": anything,
        "extra": anything,
    },
)
any_map = st.dictionaries(st.text(max_size=8), anything, max_size=6)

SPECS = (TensorSpec("x", "float32", ("batch", 2)), TensorSpec("y", "int64", ("batch",)))


@FUZZ
@given(st.binary(max_size=2000))
def test_server_first_message_arbitrary_bytes(data):
    server = make_server()
    with contextlib.suppress(RemoteProtocolError, AuthenticationFailed):
        server.receive(data)
    assert server.data_to_send() == []


@FUZZ
@given(
    st.fixed_dictionaries(
        {
            "v": st.just(1) | anything,
            "proto": st.sampled_from(RUNTIME_PROTOCOLS) | anything,
            "bundle": st.just(BUNDLE) | anything,
            "noise": st.binary(max_size=200) | anything,
        },
        optional={"mac1": st.binary(min_size=16, max_size=16) | anything, "extra": anything},
    )
)
def test_server_first_message_random_envelopes(envelope):
    server = make_server()
    with pytest.raises((RemoteProtocolError, AuthenticationFailed)):
        server.receive(pack(envelope))
    assert server.data_to_send() == []


@FUZZ
@given(st.binary(max_size=2000))
def test_server_after_handshake_arbitrary_bytes(data):
    _, server = connected()
    with pytest.raises(ProtocolError) as info:
        server.receive(data)
    assert isinstance(info.value, (RemoteProtocolError, AuthenticationFailed))


@FUZZ
@given(run_message | typed_message | any_map)
def test_server_well_formed_encrypted_maps(message):
    client, server = connected()
    try:
        events = server.receive(forge(client, message))
    except ProtocolError:
        # RemoteProtocolError (malformed) or PayloadError (a ProtocolError too). A malformed
        # "close" also closes (see test_malformed_close_leaves_the_state_unchanged).
        assert server.state is State.READY or message.get("t") == "close"
        return
    (event,) = events
    assert isinstance(event, RunRequest | InvalidRequest | Ping | CloseRequested)
    if isinstance(event, RunRequest):
        names = [name for name, _ in event.tensors]
        assert len(set(names)) == len(names)
        for _, tensor in event.tensors:
            assert tensor.dtype in codec_mod.ALLOWED_DTYPES
            assert len(tensor.shape) <= MAX_DIMS
            assert all(type(d) is int and d >= 0 for d in tensor.shape)
        # what the server does next must fail only with PayloadError
        with contextlib.suppress(PayloadError):
            decode_checked(event.tensors, SPECS, lambda dtype: "none", max_bytes=1 << 20)


@FUZZ
@given(st.lists(tensor_map, min_size=1, max_size=3))
def test_decode_tensors_and_decode_checked_raise_only_protocol_errors(raw):
    with contextlib.suppress(ProtocolError):
        tensors = decode_tensors(raw, "request")
        decode_checked(tensors, SPECS, lambda dtype: "none", max_bytes=1 << 20)


# -- decode_tensors and check_against_specs ------------------------------------------------------


def _raw(name="x", dtype="float32", shape=(1, 2), codec="none", data=b"\x00" * 8, **extra):
    item = {"name": name, "dtype": dtype, "shape": list(shape), "codec": codec, "data": data}
    item.update(extra)
    return item


def test_decode_tensors_accepts_valid_entries():
    (pair,) = decode_tensors([_raw(scales=b"\x00" * 4, codec="int8")], "request")
    name, tensor = pair
    assert name == "x"
    assert tensor == codec_mod.EncodedTensor("float32", (1, 2), "int8", b"\x00" * 8, b"\x00" * 4)
    assert decode_tensors([], "request") == ()


@pytest.mark.parametrize(
    "raw",
    [
        {"x": 1},
        "tensors",
        [_raw()] * (MAX_TENSORS + 1),
        [1],
        [_raw(extra=1)],
        [{k: v for k, v in _raw().items() if k != "data"}],
        [_raw(data="text")],
        [_raw(name=1)],
        [_raw(scales="s")],
        [_raw(codec=None)],
    ],
    ids=[
        "map",
        "str",
        "too-many",
        "not-a-map",
        "extra-field",
        "missing-field",
        "data-str",
        "name-int",
        "scales-str",
        "codec-nil",
    ],
)
def test_decode_tensors_structure_errors_are_remote_errors(raw):
    with pytest.raises(RemoteProtocolError):
        decode_tensors(raw, "request")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ([_raw(), _raw()], "twice"),
        ([_raw(dtype="complex64")], "not allowed"),
        ([_raw(dtype="object")], "not allowed"),
        ([_raw(shape=(1, -1))], "shape"),
        ([_raw(shape=(True, 2))], "shape"),
        ([_raw(shape=(1.0, 2))], "shape"),
        ([_raw(shape=(1,) * (MAX_DIMS + 1))], "shape"),
    ],
    ids=["duplicate", "complex", "object", "negative", "bool", "float", "too-many-dims"],
)
def test_decode_tensors_payload_lies_are_payload_errors(raw, match):
    with pytest.raises(PayloadError, match=match):
        decode_tensors(raw, "request")


def test_decode_tensors_allows_max_dims():
    ((_, tensor),) = decode_tensors([_raw(shape=(1,) * MAX_DIMS)], "request")
    assert tensor.shape == (1,) * MAX_DIMS


def test_invalid_run_request_keeps_the_connection():
    client, server = connected()
    bad = {"t": "run", "id": 4, "tensors": [_raw(), _raw()]}
    (event,) = server.receive(forge(client, bad))
    assert isinstance(event, InvalidRequest) and event.request_id == 4
    assert "twice" in event.message
    assert server.state is State.READY
    server.send_error(4, "payload", event.message)
    (reply,) = deliver(server, client)
    assert isinstance(reply.to_exception(), PayloadError)


def _enc(dtype: str, shape: tuple[int, ...], codec: str = "none") -> codec_mod.EncodedTensor:
    return codec_mod.EncodedTensor(dtype, shape, codec, b"")


CHECK_SPECS = (
    TensorSpec("a", "float32", ("batch", 3)),
    TensorSpec("b", "int64", ("batch", "seq")),
)
FP16 = _spec("fp16")


def _codec_for(dtype: str) -> str:
    return codec_mod.codec_for_dtype(FP16, dtype).name


def _check(tensors, *, fixed_dims=None):
    check_against_specs(tensors, CHECK_SPECS, codec_for=_codec_for, fixed_dims=fixed_dims)


def test_check_against_specs_accepts_consistent_tensors_in_any_order():
    _check([("b", _enc("int64", (2, 7))), ("a", _enc("float32", (2, 3), "fp16"))])
    _check(
        [("a", _enc("float32", (1, 3), "fp16")), ("b", _enc("int64", (1, 5)))],
        fixed_dims={"batch": 1},
    )


@pytest.mark.parametrize(
    ("tensors", "fixed", "match"),
    [
        ([("a", _enc("float32", (1, 3), "fp16"))], None, r"missing \['b'\]"),
        (
            [
                ("a", _enc("float32", (1, 3), "fp16")),
                ("b", _enc("int64", (1, 2))),
                ("c", _enc("int64", (1,))),
            ],
            None,
            r"unexpected \['c'\]",
        ),
        ([("a", _enc("float64", (1, 3), "fp16")), ("b", _enc("int64", (1, 2)))], None, "dtype"),
        ([("a", _enc("float32", (1, 3, 1), "fp16")), ("b", _enc("int64", (1, 2)))], None, "rank"),
        ([("a", _enc("float32", (1, 4), "fp16")), ("b", _enc("int64", (1, 2)))], None, "shape"),
        (
            [("a", _enc("float32", (1, 3), "fp16")), ("b", _enc("int64", (2, 2)))],
            None,
            "'batch' is 2 here but 1 elsewhere",
        ),
        (
            [("a", _enc("float32", (2, 3), "fp16")), ("b", _enc("int64", (2, 2)))],
            {"batch": 1},
            "'batch'",
        ),
        (
            [("a", _enc("float32", (1, 3), "fp16")), ("b", _enc("int64", (1, 2)))],
            {"seq": 3},
            "'seq'",
        ),
        ([("a", _enc("float32", (1, 3), "none")), ("b", _enc("int64", (1, 2)))], None, "codec"),
        (
            [("a", _enc("float32", (1, 3), "fp16")), ("b", _enc("int64", (1, 2), "fp16"))],
            None,
            "codec",
        ),
    ],
    ids=[
        "missing",
        "extra",
        "dtype",
        "rank",
        "fixed-int-dim",
        "symbolic-inconsistent",
        "fixed-dims",
        "fixed-dims-seq",
        "codec-float",
        "codec-int",
    ],
)
def test_check_against_specs_rejects(tensors, fixed, match):
    with pytest.raises(PayloadError, match=match):
        _check(tensors, fixed_dims=fixed)


def test_check_against_specs_rejects_duplicate_names():
    tensors = [
        ("a", _enc("float32", (1, 3), "fp16")),
        ("a", _enc("float32", (1, 3), "fp16")),
        ("b", _enc("int64", (1, 2))),
    ]
    with pytest.raises(PayloadError):
        _check(tensors)


# -- TAI64N and the replay guard -----------------------------------------------------------------


def test_tai64n_known_value():
    assert tai64n(T0) == bytes.fromhex("400000006955b900075bcd15")
    assert tai64n(0) == bytes.fromhex("400000000000000000000000")


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**62), st.integers(0, 2**62))
def test_tai64n_orders_bytewise_like_time(a, b):
    ta, tb = tai64n(a), tai64n(b)
    assert len(ta) == len(tb) == 12
    assert (ta < tb) == (a < b) and (ta == tb) == (a == b)


def test_replay_guard_accepts_only_newer_timestamps_per_key():
    guard = ReplayGuard()
    k1, k2 = b"1" * 32, b"2" * 32
    assert guard.accept(k1, tai64n(100))
    assert not guard.accept(k1, tai64n(100))  # replay
    assert not guard.accept(k1, tai64n(99))  # older
    assert guard.accept(k2, tai64n(50))  # keys are independent
    assert guard.accept(k1, tai64n(101))
    assert not guard.accept(k1, tai64n(100))  # the refused ones did not lower the mark


def test_replay_guard_evicts_oldest_inserted_key_at_max_keys():
    guard = ReplayGuard(max_keys=3)
    keys = [bytes([i]) * 32 for i in range(4)]
    for key in keys[:3]:
        assert guard.accept(key, tai64n(10))
    assert guard.accept(keys[0], tai64n(11))  # an update does not refresh insertion order
    assert guard.accept(keys[3], tai64n(10))  # evicts keys[0]
    assert guard.accept(keys[0], tai64n(11))  # forgotten: documented consequence of the bound
    # keys[0] came back and evicted keys[1]; keys[2] and keys[3] are still remembered
    assert not guard.accept(keys[2], tai64n(10))
    assert not guard.accept(keys[3], tai64n(10))
    assert guard.accept(keys[1], tai64n(10))


def test_replay_guard_memory_is_bounded():
    guard = ReplayGuard(max_keys=16)
    for i in range(1000):
        assert guard.accept(i.to_bytes(32, "big"), tai64n(i))
    assert len(guard._latest) == 16
