"""The edgeoffload wire protocol, sans-I/O (specified in mobile_bridge/PROTOCOL.md).

Connections are byte-in / events-out state machines: feed every websocket message to
``receive(data) -> list[Event]``, send whatever ``data_to_send()`` returns, and call the
``send_*`` methods to queue messages. No sockets, clocks or randomness live here (time and
ephemeral keys are passed in), so tests and golden vectors drive it directly.

One websocket binary message is the unit. The first client message is a cleartext msgpack
envelope carrying Noise IK message 1; the server answers with message 2; every later message
is a Noise transport ciphertext (see :class:`edgeoffload.core.noise.Transport`) of one msgpack map.
The protocol version, the Noise suite and the bundle identity (model hash + cut) are bound into
the Noise prologue, so an envelope that lies about them fails authentication.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from edgeoffload import __version__
from edgeoffload.core.codec import ALLOWED_DTYPES, EncodedTensor
from edgeoffload.core.noise import DEFAULT_PROTOCOL, RUNTIME_PROTOCOLS, HandshakeState, Transport
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
from edgeoffload.types import TensorSpec, match_specs

PROTOCOL_VERSION = 1
DEFAULT_AGENT = f"edgeoffload/{__version__}"
PROLOGUE_PREFIX = b"edgeoffload/1\x00"

# Decoding limits (PROTOCOL.md §4). Tensor payloads are bounded by the connection's
# max_message; everything else is small.
MAX_STR = 4096
MAX_ARRAY = 4096
MAX_MAP = 64
MAX_TENSORS = 1024
MAX_DIMS = 32
MAX_REQUEST_ID = 2**63 - 1

# websocket close codes (PROTOCOL.md §9): 4000-4999 are for applications.
CLOSE_AUTH = 4401  # opaque: handshake failed, unknown device key, replay, bad ciphertext
CLOSE_PROTOCOL = 4400  # authenticated peer broke the protocol
CLOSE_VERSION = 4409  # bundle not hosted / version mismatch (after authentication)
CLOSE_SHUTDOWN = 4503  # server is shutting down

# Error codes carried in "error" messages (PROTOCOL.md §9).
ERROR_CODES = (
    "overloaded",
    "payload",
    "protocol",
    "timeout",
    "internal",
    "unknown_bundle",
    "version_mismatch",
    "shutting_down",
    "session",
    "session_lost",
)
SESSION_KINDS = ("prefill", "step")
MAX_CHUNKS = 4096  # chunks in one prefill message (a replay after a lost session)


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    IDLE = "idle"  # client: nothing sent yet
    AWAIT_HELLO = "await-hello"  # server: waiting for handshake message 1
    HANDSHAKE_SENT = "handshake-sent"  # client: message 1 sent, waiting for message 2
    READY = "ready"  # transport established: requests, results, pings
    CLOSED = "closed"


# The whole transition table (PROTOCOL.md §3). Anything not listed is a protocol error.
TRANSITIONS: dict[tuple[Role, State, str], State] = {
    (Role.CLIENT, State.IDLE, "send:hello"): State.HANDSHAKE_SENT,
    (Role.CLIENT, State.HANDSHAKE_SENT, "recv:welcome"): State.READY,
    (Role.CLIENT, State.HANDSHAKE_SENT, "recv:refused"): State.CLOSED,
    (Role.CLIENT, State.READY, "send:run"): State.READY,
    (Role.CLIENT, State.READY, "send:ping"): State.READY,
    (Role.CLIENT, State.READY, "send:open"): State.READY,
    (Role.CLIENT, State.READY, "send:prefill"): State.READY,
    (Role.CLIENT, State.READY, "send:step"): State.READY,
    (Role.CLIENT, State.READY, "send:end"): State.READY,
    (Role.CLIENT, State.READY, "recv:opened"): State.READY,
    (Role.CLIENT, State.READY, "recv:token"): State.READY,
    (Role.CLIENT, State.READY, "recv:ended"): State.READY,
    (Role.CLIENT, State.READY, "recv:result"): State.READY,
    (Role.CLIENT, State.READY, "recv:error"): State.READY,
    (Role.CLIENT, State.READY, "recv:pong"): State.READY,
    (Role.CLIENT, State.READY, "send:close"): State.CLOSED,
    (Role.CLIENT, State.READY, "recv:close"): State.CLOSED,
    (Role.SERVER, State.AWAIT_HELLO, "recv:hello"): State.READY,
    (Role.SERVER, State.AWAIT_HELLO, "send:refused"): State.CLOSED,
    (Role.SERVER, State.READY, "recv:run"): State.READY,
    (Role.SERVER, State.READY, "recv:ping"): State.READY,
    (Role.SERVER, State.READY, "recv:open"): State.READY,
    (Role.SERVER, State.READY, "recv:prefill"): State.READY,
    (Role.SERVER, State.READY, "recv:step"): State.READY,
    (Role.SERVER, State.READY, "recv:end"): State.READY,
    (Role.SERVER, State.READY, "send:opened"): State.READY,
    (Role.SERVER, State.READY, "send:token"): State.READY,
    (Role.SERVER, State.READY, "send:ended"): State.READY,
    (Role.SERVER, State.READY, "send:result"): State.READY,
    (Role.SERVER, State.READY, "send:error"): State.READY,
    (Role.SERVER, State.READY, "send:pong"): State.READY,
    (Role.SERVER, State.READY, "send:close"): State.CLOSED,
    (Role.SERVER, State.READY, "recv:close"): State.CLOSED,
}


# -- events -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """Base class of what ``receive`` reports."""


@dataclass(frozen=True)
class HandshakeComplete(Event):
    peer_public: bytes  # the peer's static key (the server learns the device's here)
    bundle: str  # bundle identity
    version: str  # bundle version of the peer
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunRequest(Event):
    request_id: int
    tensors: tuple[tuple[str, EncodedTensor], ...]


@dataclass(frozen=True)
class InvalidRequest(Event):
    """A run request whose tensors are malformed; it gets a "payload" error reply."""

    request_id: int
    message: str


@dataclass(frozen=True)
class RunResult(Event):
    request_id: int
    tensors: tuple[tuple[str, EncodedTensor], ...]
    server_ms: float


@dataclass(frozen=True)
class ErrorReply(Event):
    request_id: int | None
    code: str
    message: str

    def to_exception(self) -> Exception:
        if self.code == "overloaded":
            return Overloaded(f"edge server overloaded: {self.message}")
        if self.code == "payload":
            return PayloadError(f"edge server rejected the tensors: {self.message}")
        if self.code in ("unknown_bundle", "version_mismatch"):
            return VersionMismatch(self.message)
        if self.code == "session_lost":
            return SessionLost(f"edge server lost the session: {self.message}")
        if self.code == "session":
            return SessionError(f"edge server refused the session message: {self.message}")
        if self.code in ("timeout", "shutting_down", "internal"):
            # The server could not answer this time: the client may retry or fall back.
            return ServerBusy(f"edge server could not answer ({self.code}): {self.message}")
        return RemoteProtocolError(f"edge server error ({self.code}): {self.message}")


@dataclass(frozen=True)
class SessionOpen(Event):
    """Open a generation session: tail KV cache on the server, sampling settings."""

    request_id: int
    sampling: dict[str, Any]
    max_tokens: int


@dataclass(frozen=True)
class Chunk:
    """``n`` new positions and the crossing tensors the head produced for them."""

    n: int
    tensors: tuple[tuple[str, EncodedTensor], ...]


@dataclass(frozen=True)
class SessionFeed(Event):
    """Prefill (one or more chunks) or one decode step at position ``pos``."""

    request_id: int
    kind: str  # "prefill" or "step"
    session: int
    pos: int
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class SessionEnd(Event):
    request_id: int
    session: int


@dataclass(frozen=True)
class SessionOpened(Event):
    request_id: int
    session: int
    max_tokens: int


@dataclass(frozen=True)
class TokenResult(Event):
    """The token sampled after a prefill or step; ``pos`` is the session length now."""

    request_id: int
    session: int
    pos: int
    token: int
    server_ms: float


@dataclass(frozen=True)
class SessionEnded(Event):
    request_id: int
    session: int


@dataclass(frozen=True)
class Ping(Event):
    request_id: int
    payload: bytes


@dataclass(frozen=True)
class Pong(Event):
    request_id: int
    payload: bytes


@dataclass(frozen=True)
class CloseRequested(Event):
    reason: str


# -- strict msgpack -------------------------------------------------------------------------------


def truncate_utf8(text: str, limit: int = MAX_STR) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (peers count bytes, not characters)."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", errors="ignore")


def _pairs_no_duplicates(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result: dict[Any, Any] = {}
    for key, value in pairs:
        if key in result:
            raise RemoteProtocolError(f"duplicate key {key!r} in a message map")
        result[key] = value
    return result


def _ext_forbidden(code: int, data: bytes) -> Any:
    raise RemoteProtocolError(f"msgpack extension type {code} is not allowed")


def unpack(data: bytes | bytearray | memoryview, *, max_bin: int) -> dict[str, Any]:
    """Decode one message map with strict limits; any violation is a RemoteProtocolError."""
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            object_pairs_hook=_pairs_no_duplicates,
            ext_hook=_ext_forbidden,
            max_bin_len=max_bin,
            max_str_len=MAX_STR,
            max_array_len=MAX_ARRAY,
            max_map_len=MAX_MAP,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except (
        ValueError,
        TypeError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
        UnicodeDecodeError,
    ) as exc:
        raise RemoteProtocolError(f"malformed msgpack message ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError("a message must be a msgpack map")
    return obj


def pack(obj: Mapping[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


ZERO_COPY_BIN = 1 << 14  # bytes-like values at least this big are not copied by pack_parts
_PACKER = msgpack.Packer(use_bin_type=True)


def pack_parts(obj: Any) -> list[bytes | bytearray | memoryview]:
    """The msgpack encoding of ``obj`` as a list of buffers whose concatenation equals
    ``pack(obj)`` byte for byte; large bytes-like values are referenced, not copied.

    Tensor payloads (megabytes) then go from the array's memory straight into encryption
    (:meth:`edgeoffload.core.noise.Transport.encrypt_parts`) instead of being copied into a
    msgpack buffer first.
    """
    parts: list[bytes | bytearray | memoryview] = []
    small = bytearray()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            small.extend(_PACKER.pack_map_header(len(value)))
            for key, item in value.items():
                small.extend(_PACKER.pack(key))
                walk(item)
        elif isinstance(value, list | tuple):
            small.extend(_PACKER.pack_array_header(len(value)))
            for item in value:
                walk(item)
        elif isinstance(value, bytes | bytearray | memoryview):
            size = value.nbytes if isinstance(value, memoryview) else len(value)
            if size < ZERO_COPY_BIN:
                small.extend(_PACKER.pack(bytes(value)))
                return
            # bin 16 / bin 32 headers, exactly as msgpack writes them for these sizes
            small.extend(
                struct.pack(">BH", 0xC5, size) if size < 1 << 16 else struct.pack(">BI", 0xC6, size)
            )
            parts.append(bytes(small))
            small.clear()
            parts.append(value)
        else:
            small.extend(_PACKER.pack(value))

    walk(obj)
    if small or not parts:
        parts.append(bytes(small))
    return parts


class _Message:
    """Typed, strict accessors over a decoded map (unknown keys are an error)."""

    def __init__(self, data: dict[str, Any], what: str) -> None:
        self.data = data
        self.what = what
        self.seen: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if optional:
                return None
            raise RemoteProtocolError(f"{self.what}: missing field {key!r}")
        value = self.data[key]
        if isinstance(value, bool) and kind is int:
            raise RemoteProtocolError(f"{self.what}: field {key!r} must be an integer")
        if not isinstance(value, kind):
            raise RemoteProtocolError(f"{self.what}: field {key!r} has the wrong type")
        return value

    def request_id(self, key: str = "id") -> int:
        value = self.get(key, int)
        if not 0 <= value <= MAX_REQUEST_ID:
            raise RemoteProtocolError(f"{self.what}: request id out of range")
        return int(value)

    def done(self) -> None:
        extra = set(self.data) - self.seen
        if extra:
            raise RemoteProtocolError(f"{self.what}: unknown field(s) {sorted(map(str, extra))}")


def encode_tensors(tensors: Sequence[tuple[str, EncodedTensor]]) -> list[dict[str, Any]]:
    """Tensor maps for a message; "data" comes last so that pack_parts can stream it."""
    items = []
    for name, t in tensors:
        item: dict[str, Any] = {
            "name": name,
            "dtype": t.dtype,
            "shape": list(t.shape),
            "codec": t.codec,
        }
        if t.scales:
            item["scales"] = t.scales
        item["data"] = t.data
        items.append(item)
    return items


def decode_tensors(raw: Any, what: str) -> tuple[tuple[str, EncodedTensor], ...]:
    """Structural checks only; byte lengths are checked by codec.decode and the manifest."""
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise RemoteProtocolError(f"{what}: 'tensors' must be a list of at most {MAX_TENSORS}")
    out: list[tuple[str, EncodedTensor]] = []
    names: set[str] = set()
    for entry in raw:
        if not isinstance(entry, dict):
            raise RemoteProtocolError(f"{what}: each tensor must be a map")
        m = _Message(entry, f"{what} tensor")
        name = m.get("name", str)
        dtype = m.get("dtype", str)
        shape = m.get("shape", list)
        codec = m.get("codec", str)
        data = m.get("data", bytes)
        scales = m.get("scales", bytes, optional=True) or b""
        m.done()
        if name in names:
            raise PayloadError(f"tensor {name!r} appears twice")
        names.add(name)
        if dtype not in ALLOWED_DTYPES:
            raise PayloadError(f"tensor {name!r}: dtype {dtype!r} is not allowed")
        if len(shape) > MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape):
            raise PayloadError(f"tensor {name!r}: shape must be at most {MAX_DIMS} ints >= 0")
        out.append((name, EncodedTensor(dtype, tuple(shape), codec, data, scales)))
    return tuple(out)


def check_against_specs(
    tensors: Sequence[tuple[str, EncodedTensor]],
    specs: Sequence[TensorSpec],
    *,
    codec_for: Callable[[str], str],
    fixed_dims: Mapping[str, int] | None = None,
) -> None:
    """The tensors must be exactly the declared ones, with matching dtype, shape and codec.

    Symbolic dims must agree across tensors (every ``batch`` has one value); dims named in
    ``fixed_dims`` must equal that value. Byte lengths are then checked by ``codec.decode``.
    """
    match_specs(
        [(name, t.dtype, t.shape) for name, t in tensors],
        specs,
        error=PayloadError,
        fixed_dims=fixed_dims,
    )
    for name, t in tensors:
        wanted = codec_for(t.dtype)
        if t.codec != wanted:
            raise PayloadError(f"tensor {name!r}: codec {t.codec!r}, the bundle uses {wanted!r}")


# -- TAI64N timestamps (handshake replay protection, as WireGuard) ------------------------------


def _count(value: int) -> int:
    """A non-negative count or position (bool is not an int here)."""
    if isinstance(value, bool) or not 0 <= value <= MAX_REQUEST_ID:
        raise RemoteProtocolError(f"{value!r} is not a valid count")
    return value


def _decode_chunks(raw: list[Any]) -> tuple[Chunk, ...]:
    if not 1 <= len(raw) <= MAX_CHUNKS:
        raise RemoteProtocolError(f"a prefill carries 1..{MAX_CHUNKS} chunks, not {len(raw)}")
    chunks = []
    for item in raw:
        if not isinstance(item, dict):
            raise RemoteProtocolError("a prefill chunk must be a map")
        c = _Message(item, "prefill chunk")
        n = _count(c.get("n", int))
        if n == 0:
            raise RemoteProtocolError("a prefill chunk must carry at least one position")
        tensors = decode_tensors(c.get("tensors", list), "prefill")
        c.done()
        chunks.append(Chunk(n, tensors))
    return tuple(chunks)


def _milliseconds(value: Any) -> float:
    if isinstance(value, bool) or not 0 <= value < 1e9:
        raise RemoteProtocolError("server_ms must be a non-negative number")
    return float(value)


def tai64n(time_ns: int) -> bytes:
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    return struct.pack(">QI", 2**62 + seconds, nanos)


class ReplayGuard:
    """Per device key, the newest handshake timestamp seen: older or equal ones are replays."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self._latest: dict[bytes, bytes] = {}
        self._max_keys = max_keys

    def accept(self, peer: bytes, timestamp: bytes) -> bool:
        last = self._latest.get(peer)
        if last is not None and timestamp <= last:
            return False
        if last is None and len(self._latest) >= self._max_keys:
            self._latest.pop(next(iter(self._latest)))
        self._latest[peer] = timestamp
        return True


def prologue(protocol: str, bundle: str) -> bytes:
    return PROLOGUE_PREFIX + protocol.encode() + b"\x00" + bundle.encode()


# -- connections -------------------------------------------------------------------------------


class _Connection:
    role: Role

    def __init__(self, *, max_message: int, agent: str = DEFAULT_AGENT) -> None:
        self.agent = truncate_utf8(agent, 256)
        self.peer_max_message: int | None = None
        self.state = State.IDLE if self.role is Role.CLIENT else State.AWAIT_HELLO
        self.max_message = max_message
        self._outgoing: list[bytes | bytearray] = []
        self._transport: Transport | None = None

    def _transition(self, action: str) -> None:
        key = (self.role, self.state, action)
        if key not in TRANSITIONS:
            error = LocalProtocolError if action.startswith("send:") else RemoteProtocolError
            raise error(f"{action.split(':')[1]!r} is not allowed in state {self.state.value}")
        self.state = TRANSITIONS[key]

    def data_to_send(self) -> list[bytes | bytearray]:
        """Websocket binary messages to send, in order."""
        out, self._outgoing = self._outgoing, []
        return out

    def _send_encrypted(self, action: str, message: dict[str, Any], *, what: str = "") -> None:
        parts = pack_parts(message)
        if what and self.peer_max_message is not None:
            size = sum(memoryview(p).nbytes for p in parts)
            wire = size + 16 * (size // 65519 + 1)  # AEAD tags, PROTOCOL.md section 6
            if wire > self.peer_max_message:
                raise PayloadError(
                    f"{what} of {wire} bytes exceeds the server's limit of {self.peer_max_message}",
                    hint="send fewer positions per prefill message",
                )
        self._transition(action)
        assert self._transport is not None
        self._outgoing.append(self._transport.encrypt_parts(parts))

    def _decrypt(self, data: bytes | bytearray) -> dict[str, Any]:
        assert self._transport is not None
        if len(data) > self.max_message:
            raise RemoteProtocolError(f"message of {len(data)} bytes exceeds {self.max_message}")
        try:
            plaintext = self._transport.decrypt(data)
        except AuthenticationFailed:
            self.state = State.CLOSED
            raise
        return unpack(plaintext, max_bin=self.max_message)

    def send_close(self, reason: str = "") -> None:
        self._send_encrypted("send:close", {"t": "close", "reason": truncate_utf8(reason)})

    @property
    def transport(self) -> Transport | None:
        return self._transport


class ClientConnection(_Connection):
    """The device's side."""

    role = Role.CLIENT

    def __init__(
        self,
        *,
        static: KeyPair,
        server_public: bytes,
        bundle: str,
        version: str,
        time_ns: int,
        protocol: str = DEFAULT_PROTOCOL,
        ephemeral: KeyPair | None = None,
        agent: str = DEFAULT_AGENT,
        max_message: int = 1 << 26,
    ) -> None:
        if protocol not in RUNTIME_PROTOCOLS:
            raise LocalProtocolError(f"unsupported Noise protocol {protocol!r}")
        super().__init__(max_message=max_message, agent=agent)
        self.bundle = bundle
        self.version = version
        self.protocol = protocol
        self._hs = HandshakeState(
            protocol,
            initiator=True,
            prologue=prologue(protocol, bundle),
            s=static,
            e=ephemeral,
            rs=server_public,
        )
        self._time_ns = time_ns

    def start(self) -> None:
        """Queue handshake message 1."""
        self._transition("send:hello")
        payload = pack(
            {
                "ts": tai64n(self._time_ns),
                "version": self.version,
                "agent": self.agent,
            }
        )
        envelope = {
            "v": PROTOCOL_VERSION,
            "proto": self.protocol,
            "bundle": self.bundle,
            "noise": self._hs.write_message(payload),
        }
        self._outgoing.append(pack(envelope))

    def receive(self, data: bytes | bytearray) -> list[Event]:
        if self.state is State.HANDSHAKE_SENT:
            return [self._receive_welcome(data)]
        if self.state is not State.READY:
            raise LocalProtocolError(f"cannot receive in state {self.state.value}")
        m = _Message(self._decrypt(data), "server message")
        kind = m.get("t", str)
        event: Event
        if kind == "result":
            event = RunResult(
                m.request_id(),
                decode_tensors(m.get("tensors", list), "result"),
                _milliseconds(m.get("server_ms", (int, float))),
            )
        elif kind == "error":
            rid = m.request_id() if "id" in m.data else None
            code = m.get("code", str)
            event = ErrorReply(
                rid, code if code in ERROR_CODES else "internal", m.get("message", str)
            )
        elif kind == "pong":
            event = Pong(m.request_id(), m.get("pad", bytes))
        elif kind == "opened":
            event = SessionOpened(
                m.request_id(), m.request_id("session"), _count(m.get("max_tokens", int))
            )
        elif kind == "token":
            event = TokenResult(
                m.request_id(),
                m.request_id("session"),
                _count(m.get("pos", int)),
                _count(m.get("token", int)),
                _milliseconds(m.get("server_ms", (int, float))),
            )
        elif kind == "ended":
            event = SessionEnded(m.request_id(), m.request_id("session"))
        elif kind == "close":
            event = CloseRequested(m.get("reason", str))
        else:
            raise RemoteProtocolError(f"unknown server message type {kind!r}")
        m.done()
        # The state changes only for a message that was entirely valid (PROTOCOL.md §3).
        self._transition(f"recv:{kind}")
        return [event]

    def _receive_welcome(self, data: bytes | bytearray) -> Event:
        envelope = _Message(unpack(data, max_bin=4096), "handshake reply")
        if envelope.get("v", int) != PROTOCOL_VERSION:
            raise RemoteProtocolError("server speaks another protocol version")
        noise_msg = envelope.get("noise", bytes)
        envelope.done()
        payload = self._hs.read_message(noise_msg)
        reply = _Message(unpack(payload, max_bin=4096), "handshake reply payload")
        ok = reply.get("ok", bool)
        server_version = reply.get("version", str, optional=True)
        if not ok:
            code = reply.get("code", str)
            message = reply.get("message", str)
            reply.done()
            self._transition("recv:refused")
            if code in ("version_mismatch", "unknown_bundle"):
                raise VersionMismatch(
                    f"device bundle {self.version} ({self.bundle}) is not served: {message}"
                    + (f"; the server has version {server_version}" if server_version else ""),
                    hint="deploy the same bundle (same edgeoffload split output) on both sides",
                )
            raise RemoteProtocolError(f"server refused the session ({code}): {message}")
        max_message = reply.get("max_message", int)
        agent = reply.get("agent", str)
        reply.done()
        self._transition("recv:welcome")
        self._transport = self._hs.transport()
        # What the server accepts; our own receive limit stays ours (results can be larger
        # than requests, e.g. logits).
        self.peer_max_message = max_message
        assert self._hs.remote_static is not None
        return HandshakeComplete(
            self._hs.remote_static,
            self.bundle,
            server_version or "",
            {"max_message": max_message, "agent": agent},
        )

    def send_run(self, request_id: int, tensors: Sequence[tuple[str, EncodedTensor]]) -> None:
        """Queue a run request; refuses one the server announced it would not accept."""
        size = sum(t.wire_bytes for _, t in tensors)
        if self.peer_max_message is not None and size > self.peer_max_message:
            raise PayloadError(
                f"request of {size} bytes exceeds the server's limit of {self.peer_max_message}",
                hint="the server sizes its limit from the bundle's declared tensors",
            )
        self._send_encrypted(
            "send:run",
            {"t": "run", "id": request_id, "tensors": encode_tensors(tensors)},
            what="request",
        )

    def send_ping(self, request_id: int, pad: bytes = b"") -> None:
        self._send_encrypted("send:ping", {"t": "ping", "id": request_id, "pad": pad})

    def send_open(self, request_id: int, sampling: Mapping[str, Any], max_tokens: int) -> None:
        self._send_encrypted(
            "send:open",
            {"t": "open", "id": request_id, "sampling": dict(sampling), "max_tokens": max_tokens},
        )

    def send_feed(
        self, request_id: int, kind: str, session: int, pos: int, chunks: Sequence[Chunk]
    ) -> None:
        """Queue a prefill (any number of chunks) or a step (exactly one chunk of one token)."""
        if kind not in SESSION_KINDS:
            raise LocalProtocolError(f"unknown session message {kind!r}")
        if kind == "step" and (len(chunks) != 1 or chunks[0].n != 1):
            raise LocalProtocolError("a step carries exactly one position")
        size = sum(t.wire_bytes for c in chunks for _, t in c.tensors)
        if self.peer_max_message is not None and size > self.peer_max_message:
            raise PayloadError(
                f"{kind} of {size} bytes exceeds the server's limit of {self.peer_max_message}",
                hint="send the prompt in several prefill messages",
            )
        body: dict[str, Any] = {"t": kind, "id": request_id, "session": session, "pos": pos}
        if kind == "step":
            body["tensors"] = encode_tensors(chunks[0].tensors)
        else:
            body["chunks"] = [{"n": c.n, "tensors": encode_tensors(c.tensors)} for c in chunks]
        self._send_encrypted(f"send:{kind}", body, what=kind)

    def send_end(self, request_id: int, session: int) -> None:
        self._send_encrypted("send:end", {"t": "end", "id": request_id, "session": session})


@dataclass(frozen=True)
class HostedBundle:
    """What the server needs to know about a bundle it hosts."""

    identity: str
    version: str


class ServerConnection(_Connection):
    """The edge server's side of one device connection."""

    role = Role.SERVER

    def __init__(
        self,
        *,
        static: KeyPair,
        is_allowed: Callable[[bytes], bool],
        bundles: Mapping[str, HostedBundle],
        replay_guard: ReplayGuard,
        max_message: int,
        ephemeral: KeyPair | None = None,
        agent: str = DEFAULT_AGENT,
    ) -> None:
        super().__init__(max_message=max_message, agent=agent)
        self._static = static
        self._is_allowed = is_allowed
        # version -> hosted bundle: several versions of one model may be hosted during an
        # update, and the server may change the mapping while it runs.
        self._bundles = bundles
        self._replay = replay_guard
        self._ephemeral = ephemeral
        self.peer_public: bytes | None = None
        self.bundle: HostedBundle | None = None

    def receive(self, data: bytes | bytearray) -> list[Event]:
        if self.state is State.AWAIT_HELLO:
            return [self._receive_hello(data)]
        if self.state is not State.READY:
            raise LocalProtocolError(f"cannot receive in state {self.state.value}")
        m = _Message(self._decrypt(data), "device message")
        kind = m.get("t", str)
        event: Event
        if kind == "run":
            rid = m.request_id()
            try:
                event = RunRequest(rid, decode_tensors(m.get("tensors", list), "request"))
            except PayloadError as exc:
                # The message is well-formed but its tensors lie: answer this request with a
                # payload error and keep the connection (the transport is intact).
                event = InvalidRequest(rid, exc.message)
        elif kind == "ping":
            event = Ping(m.request_id(), m.get("pad", bytes))
        elif kind == "open":
            event = SessionOpen(
                m.request_id(), m.get("sampling", dict), _count(m.get("max_tokens", int))
            )
        elif kind in SESSION_KINDS:
            rid = m.request_id()
            session, pos = m.request_id("session"), _count(m.get("pos", int))
            try:
                if kind == "step":
                    chunks: tuple[Chunk, ...] = (
                        Chunk(1, decode_tensors(m.get("tensors", list), "step")),
                    )
                else:
                    chunks = _decode_chunks(m.get("chunks", list))
                event = SessionFeed(rid, kind, session, pos, chunks)
            except PayloadError as exc:
                event = InvalidRequest(rid, exc.message)
        elif kind == "end":
            event = SessionEnd(m.request_id(), m.request_id("session"))
        elif kind == "close":
            event = CloseRequested(m.get("reason", str))
        else:
            raise RemoteProtocolError(f"unknown device message type {kind!r}")
        m.done()
        self._transition(f"recv:{kind}")  # only for an entirely valid message (§3)
        return [event]

    def _receive_hello(self, data: bytes | bytearray) -> Event:
        """Handshake message 1; any failure closes this connection for good."""
        try:
            return self._accept_hello(data)
        except BaseException:
            self.state = State.CLOSED
            raise

    def _accept_hello(self, data: bytes | bytearray) -> Event:
        """Every authentication failure is the same opaque error."""
        envelope = _Message(unpack(data, max_bin=4096), "handshake")
        if envelope.get("v", int) != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"protocol version must be {PROTOCOL_VERSION}")
        protocol = envelope.get("proto", str)
        bundle = envelope.get("bundle", str)
        noise_msg = envelope.get("noise", bytes)
        envelope.done()
        if protocol not in RUNTIME_PROTOCOLS:
            raise RemoteProtocolError("unsupported Noise protocol")
        hs = HandshakeState(
            protocol,
            initiator=False,
            prologue=prologue(protocol, bundle),
            s=self._static,
            e=self._ephemeral,
        )
        payload = hs.read_message(noise_msg)  # AuthenticationFailed on any tampering
        peer = hs.remote_static
        # Check the key before looking at the payload: an unknown device learns nothing, not
        # even whether its payload was well-formed.
        if peer is None or not self._is_allowed(peer):
            raise AuthenticationFailed()
        hello = _Message(unpack(payload, max_bin=64), "handshake payload")
        timestamp = hello.get("ts", bytes)
        version = hello.get("version", str)
        hello.get("agent", str)
        hello.done()
        if len(timestamp) != 12 or not self._replay.accept(peer, timestamp):
            raise AuthenticationFailed()
        self.peer_public = peer
        hosted = self._bundles.get(version)
        if hosted is None or hosted.identity != bundle:
            # The peer is authenticated and allowed: it may learn what this server hosts.
            same_model = [b.version for b in self._bundles.values() if b.identity == bundle]
            if same_model:
                code = "version_mismatch"
                message = (
                    f"device bundle {version} is not hosted; this server has "
                    f"{', '.join(same_model[:8])} for this model and cut"
                )
            else:
                code = "unknown_bundle"
                served = ", ".join(
                    f"{b.identity[:16]}…@{b.version}" for b in list(self._bundles.values())[:8]
                )
                message = f"this server hosts no bundle {bundle[:16]}…; it hosts {served or 'none'}"
            reply: dict[str, Any] = {"ok": False, "code": code, "message": message}
            if same_model:
                reply["version"] = same_model[0]
            self._transition("send:refused")
            self._outgoing.append(
                pack({"v": PROTOCOL_VERSION, "noise": hs.write_message(pack(reply))})
            )
            return ErrorReply(None, code, message)
        reply = {
            "ok": True,
            "version": hosted.version,
            "max_message": self.max_message,
            "agent": self.agent,
        }
        self._outgoing.append(pack({"v": PROTOCOL_VERSION, "noise": hs.write_message(pack(reply))}))
        self._transition("recv:hello")
        self._transport = hs.transport()
        self.bundle = hosted
        return HandshakeComplete(peer, bundle, version)

    def send_result(
        self, request_id: int, tensors: Sequence[tuple[str, EncodedTensor]], server_ms: float
    ) -> None:
        self._send_encrypted(
            "send:result",
            {
                "t": "result",
                "id": request_id,
                "tensors": encode_tensors(tensors),
                "server_ms": float(server_ms),
            },
        )

    def send_error(self, request_id: int | None, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            raise LocalProtocolError(f"unknown error code {code!r}")
        body: dict[str, Any] = {"t": "error", "code": code, "message": truncate_utf8(message)}
        if request_id is not None:
            body["id"] = request_id
        self._send_encrypted("send:error", body)

    def send_pong(self, request_id: int, pad: bytes = b"") -> None:
        self._send_encrypted("send:pong", {"t": "pong", "id": request_id, "pad": pad})

    def send_opened(self, request_id: int, session: int, max_tokens: int) -> None:
        self._send_encrypted(
            "send:opened",
            {"t": "opened", "id": request_id, "session": session, "max_tokens": max_tokens},
        )

    def send_token(
        self, request_id: int, session: int, pos: int, token: int, server_ms: float
    ) -> None:
        self._send_encrypted(
            "send:token",
            {
                "t": "token",
                "id": request_id,
                "session": session,
                "pos": pos,
                "token": token,
                "server_ms": float(server_ms),
            },
        )

    def send_ended(self, request_id: int, session: int) -> None:
        self._send_encrypted("send:ended", {"t": "ended", "id": request_id, "session": session})
