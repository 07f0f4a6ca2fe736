"""The edgeoffload wire protocol, sans-I/O (specified in mobile_bridge/PROTOCOL.md).

Connections are byte-in / events-out state machines: feed every websocket message to
``receive(data) -> list[Event]``, send whatever ``data_to_send()`` returns, and call the
``send_*`` methods to queue messages. No sockets, clocks or randomness live here (time and
ephemeral keys are passed in), so tests and golden vectors drive it directly.

The pieces live beside this module: strict msgpack in :mod:`~edgeoffload.protocol.wire`, the
tensor schema in :mod:`~edgeoffload.protocol.tensors`, the events in
:mod:`~edgeoffload.protocol.events` and the state rules in :mod:`edgeoffload.protocol._state`.

One websocket binary message is the unit. The first client message is a cleartext msgpack
envelope carrying Noise IK message 1 and a ``mac1`` (a keyed BLAKE2s of the prologue and the
Noise message under a key derived from the server's static public key, as WireGuard's mac1), which
the server checks before any Diffie-Hellman; the server answers with message 2; every later message
is a Noise transport ciphertext (see :class:`edgeoffload.core.noise.Transport`) of one msgpack map.
The protocol version, the Noise suite and the bundle identity (model hash + cut) are bound into
the Noise prologue, so an envelope that lies about them fails authentication.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgeoffload import __version__
from edgeoffload.core.codec import EncodedTensor
from edgeoffload.core.noise import DEFAULT_PROTOCOL, RUNTIME_PROTOCOLS, HandshakeState, Transport
from edgeoffload.errors import (
    AuthenticationFailed,
    LocalProtocolError,
    PayloadError,
    RemoteProtocolError,
    VersionMismatch,
)
from edgeoffload.keys import KeyPair
from edgeoffload.protocol._state import Role, State, next_state
from edgeoffload.protocol.events import (
    Chunk,
    CloseRequested,
    ErrorReply,
    Event,
    FetchRequest,
    FileData,
    HandshakeComplete,
    InvalidRequest,
    Ping,
    Pong,
    RunRequest,
    RunResult,
    SessionEnd,
    SessionEnded,
    SessionFeed,
    SessionOpen,
    SessionOpened,
    StatusReply,
    StatusRequest,
    TokenResult,
)
from edgeoffload.protocol.load import (
    FEATURE_LOAD,
    FEATURE_UPDATE,
    KNOWN_FEATURES,
    BundleLoad,
    ServerLoad,
    bundles_from_wire,
    check_features,
)
from edgeoffload.protocol.tensors import decode_tensors, encode_tensors
from edgeoffload.protocol.updates import (
    MAX_FETCH,
    MAX_FILE_SIZE,
    UpdateOffer,
    check_fetch_range,
    check_file_name,
    check_file_reply,
)
from edgeoffload.protocol.wire import (
    MAX_CHUNKS,
    MAX_REQUEST_ID,
    StrictMap,
    pack,
    pack_parts,
    truncate_utf8,
    unpack,
)

PROTOCOL_VERSION = 1
DEFAULT_AGENT = f"edgeoffload/{__version__}"
PROLOGUE_PREFIX = b"edgeoffload/1\x00"

# mac1 of the hello (PROTOCOL.md §5.3): BLAKE2s-128 keyed with BLAKE2s-256(MAC1_LABEL || server
# static public key), over prologue || noise. A filter, not authentication (the key is public).
MAC1_LABEL = b"edgeoffload mac1"
MAC1_BYTES = 16
# The largest first message (the hello envelope) a server decodes: it is checked before any
# parsing, and is the server's websocket max_size until the handshake is done (PROTOCOL.md §10).
MAX_HELLO_BYTES = 8192

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
    "duplicate_id",
    "fetch",  # §16.3: not a fetchable file of a version offered to this connection
)
SESSION_KINDS = ("prefill", "step")
MAX_RETRY_MS = 60_000  # the largest retry_ms of an "overloaded" error (PROTOCOL.md §7)


# -- field checks ----------------------------------------------------------------------------------


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
        c = StrictMap(item, "prefill chunk")
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


# -- TAI64N timestamps (handshake replay protection, as WireGuard) ------------------------------


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


@functools.lru_cache(maxsize=64)
def mac1_key(server_public: bytes) -> bytes:
    """The mac1 key for a server: BLAKE2s-256(MAC1_LABEL || server static public key)."""
    return hashlib.blake2s(MAC1_LABEL + bytes(server_public)).digest()


def mac1(key: bytes, prologue_bytes: bytes, noise: bytes | bytearray) -> bytes:
    """mac1 of a hello: BLAKE2s-128 keyed with :func:`mac1_key`, over prologue || noise."""
    h = hashlib.blake2s(prologue_bytes, digest_size=MAC1_BYTES, key=key)
    h.update(noise)
    return h.digest()


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
        # Features both sides agreed on in the handshake (§14.1); empty for a plain v1 peer.
        self.features: tuple[str, ...] = ()

    def _require(self, feature: str, kind: str, *, received: bool) -> None:
        """``kind`` exists only on connections that negotiated ``feature``: sending it
        otherwise is our mistake, receiving it the peer's."""
        if feature not in self.features:
            error = RemoteProtocolError if received else LocalProtocolError
            raise error(f"{kind!r} needs the {feature!r} feature, not negotiated (§14.1)")

    def _transition(self, action: str) -> None:
        self.state = next_state(self.role, self.state, action)

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
        features: Sequence[str] = (),
    ) -> None:
        if protocol not in RUNTIME_PROTOCOLS:
            raise LocalProtocolError(f"unsupported Noise protocol {protocol!r}")
        super().__init__(max_message=max_message, agent=agent)
        self.bundle = bundle
        self.version = version
        self.protocol = protocol
        # Asked for in the hello; ``features`` becomes what the server granted (§14.1).
        self.requested_features = check_features(list(features), "features")
        self._prologue = prologue(protocol, bundle)
        self._hs = HandshakeState(
            protocol,
            initiator=True,
            prologue=self._prologue,
            s=static,
            e=ephemeral,
            rs=server_public,
        )
        self._mac1_key = mac1_key(bytes(server_public))
        self._time_ns = time_ns
        # fetches sent and not answered: id -> (offset, length), to check each file reply
        self._fetches: dict[int, tuple[int, int]] = {}

    def start(self) -> None:
        """Queue handshake message 1."""
        self._transition("send:hello")
        hello: dict[str, Any] = {
            "ts": tai64n(self._time_ns),
            "version": self.version,
            "agent": self.agent,
        }
        if self.requested_features:  # a v1 peer without §14 never sees the field
            hello["features"] = list(self.requested_features)
        noise_msg = self._hs.write_message(pack(hello))
        envelope = {
            "v": PROTOCOL_VERSION,
            "proto": self.protocol,
            "bundle": self.bundle,
            "noise": noise_msg,
            "mac1": mac1(self._mac1_key, self._prologue, noise_msg),
        }
        self._outgoing.append(pack(envelope))

    def receive(self, data: bytes | bytearray) -> list[Event]:
        if self.state is State.HANDSHAKE_SENT:
            return [self._receive_welcome(data)]
        if self.state is not State.READY:
            raise LocalProtocolError(f"cannot receive in state {self.state.value}")
        m = StrictMap(self._decrypt(data), "server message")
        kind = m.get("t", str)
        event: Event
        if kind == "result":
            event = RunResult(
                m.request_id(),
                decode_tensors(m.get("tensors", list), "result"),
                _milliseconds(m.get("server_ms", (int, float))),
                self._load(m),
            )
        elif kind == "error":
            rid = m.request_id() if "id" in m.data else None
            code = m.get("code", str)
            retry_ms = m.get("retry_ms", int, optional=True)
            if retry_ms is not None:
                if code != "overloaded":
                    raise RemoteProtocolError("retry_ms is only sent with code 'overloaded'")
                if not 0 <= retry_ms <= MAX_RETRY_MS:
                    raise RemoteProtocolError(f"retry_ms must be in 0..{MAX_RETRY_MS}")
            event = ErrorReply(
                rid, code if code in ERROR_CODES else "internal", m.get("message", str), retry_ms
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
                self._load(m),
            )
        elif kind == "status":
            self._require(FEATURE_LOAD, kind, received=True)
            event = StatusReply(
                m.request_id(),
                ServerLoad.from_wire(m.get("load", dict)),
                bundles_from_wire(m.get("bundles", list)),
                self._offer(m),
            )
        elif kind == "file":
            self._require(FEATURE_UPDATE, kind, received=True)
            rid = m.request_id()
            piece, size = m.get("data", bytes), m.get("size", int)
            asked = self._fetches.get(rid)
            if asked is None:
                raise RemoteProtocolError(f"file reply {rid} answers no fetch of this connection")
            check_file_reply(asked[0], asked[1], len(piece), size)
            event = FileData(rid, piece, size)
        elif kind == "ended":
            event = SessionEnded(m.request_id(), m.request_id("session"))
        elif kind == "close":
            event = CloseRequested(m.get("reason", str))
        else:
            raise RemoteProtocolError(f"unknown server message type {kind!r}")
        m.done()
        # The state changes only for a message that was entirely valid (PROTOCOL.md §3).
        self._transition(f"recv:{kind}")
        if isinstance(event, FileData | ErrorReply) and event.request_id is not None:
            self._fetches.pop(event.request_id, None)  # answered: its id may be fetched again
        return [event]

    def _offer(self, m: StrictMap) -> UpdateOffer | None:
        """A welcome's or status reply's optional update offer (§16.1): only under "update",
        and never for the version this connection already runs."""
        raw = m.get("update", dict, optional=True)
        if raw is None:
            return None
        self._require(FEATURE_UPDATE, "update", received=True)
        offer = UpdateOffer.from_wire(raw)
        if offer.version == self.version:
            raise RemoteProtocolError("update offer: the version this device already runs")
        return offer

    def _receive_welcome(self, data: bytes | bytearray) -> Event:
        envelope = StrictMap(unpack(data, max_bin=4096), "handshake reply")
        if envelope.get("v", int) != PROTOCOL_VERSION:
            raise RemoteProtocolError("server speaks another protocol version")
        noise_msg = envelope.get("noise", bytes)
        envelope.done()
        payload = self._hs.read_message(noise_msg)
        reply = StrictMap(unpack(payload, max_bin=4096), "handshake reply payload")
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
        granted = reply.get("features", list, optional=True)
        if granted is not None:
            features = check_features(granted, "welcome")
            if not set(features) <= set(self.requested_features):
                raise RemoteProtocolError("server granted a feature this device did not ask for")
            self.features = features
        offer = self._offer(reply)
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
            offer,
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

    def send_status(self, request_id: int) -> None:
        """Ask for the server's load (§14.3): needs the "load" feature."""
        self._require(FEATURE_LOAD, "status", received=False)
        self._send_encrypted("send:status", {"t": "status", "id": request_id})

    def send_fetch(
        self, request_id: int, version: str, file: str, offset: int, length: int
    ) -> None:
        """Ask for ``length`` bytes at ``offset`` of ``file`` of bundle ``version`` (§16.3):
        needs the "update" feature; the reply is checked against this request."""
        self._require(FEATURE_UPDATE, "fetch", received=False)
        try:
            check_file_name(file, "fetch")
            check_fetch_range(offset, length, "fetch")
        except RemoteProtocolError as exc:
            raise LocalProtocolError(exc.message) from None
        if request_id in self._fetches:
            raise LocalProtocolError(f"fetch {request_id} is already pending")
        body = {
            "t": "fetch",
            "id": request_id,
            "version": version,
            "file": file,
            "offset": offset,
            "length": length,
        }
        self._send_encrypted("send:fetch", body)
        self._fetches[request_id] = (offset, length)

    def _load(self, m: StrictMap) -> ServerLoad | None:
        """A reply's optional load report; only a server that granted "load" may send one."""
        raw = m.get("load", dict, optional=True)
        if raw is None:
            return None
        self._require(FEATURE_LOAD, "load", received=True)
        return ServerLoad.from_wire(raw)


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
        offers: Callable[[str, bytes], UpdateOffer | None] | None = None,
    ) -> None:
        super().__init__(max_message=max_message, agent=agent)
        # (version, device key) -> the version this device should move to, offered under
        # "update" (§16); per device, because a rollout offers it to a share of devices first
        self._offers = offers
        self._static = static
        self._is_allowed = is_allowed
        # version -> hosted bundle: several versions of one model may be hosted during an
        # update, and the server may change the mapping while it runs.
        self._bundles = bundles
        self._replay = replay_guard
        self._ephemeral = ephemeral
        # Keyed once per connection; each hello then costs one copy() and two update()s.
        self._mac1 = hashlib.blake2s(digest_size=MAC1_BYTES, key=mac1_key(static.public))
        self.peer_public: bytes | None = None
        self.bundle: HostedBundle | None = None

    def receive(self, data: bytes | bytearray) -> list[Event]:
        if self.state is State.AWAIT_HELLO:
            return [self._receive_hello(data)]
        if self.state is not State.READY:
            raise LocalProtocolError(f"cannot receive in state {self.state.value}")
        m = StrictMap(self._decrypt(data), "device message")
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
        elif kind == "status":
            self._require(FEATURE_LOAD, kind, received=True)
            event = StatusRequest(m.request_id())
        elif kind == "fetch":
            self._require(FEATURE_UPDATE, kind, received=True)
            rid = m.request_id()
            version = m.get("version", str)
            file = check_file_name(m.get("file", str), "fetch")
            offset, length = m.get("offset", int), m.get("length", int)
            check_fetch_range(offset, length, "fetch")
            event = FetchRequest(rid, version, file, offset, length)
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
        """Every authentication failure is the same opaque error.

        The order is that of PROTOCOL.md §5.3: the size, the envelope, mac1 (a keyed hash,
        microseconds), and only then the Noise message (Diffie-Hellman, the expensive part).
        """
        if len(data) > MAX_HELLO_BYTES:
            raise RemoteProtocolError(
                f"handshake message of {len(data)} bytes exceeds {MAX_HELLO_BYTES}"
            )
        envelope = StrictMap(unpack(data, max_bin=4096), "handshake")
        if envelope.get("v", int) != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"protocol version must be {PROTOCOL_VERSION}")
        protocol = envelope.get("proto", str)
        bundle = envelope.get("bundle", str)
        noise_msg = envelope.get("noise", bytes)
        # Absent or mistyped is an authentication failure, like a wrong value (§5.3).
        tag = envelope.get("mac1", object, optional=True)
        envelope.done()
        if protocol not in RUNTIME_PROTOCOLS:
            raise RemoteProtocolError("unsupported Noise protocol")
        pro = prologue(protocol, bundle)
        expected = self._mac1.copy()
        expected.update(pro)
        expected.update(noise_msg)
        if not isinstance(tag, bytes) or not hmac.compare_digest(tag, expected.digest()):
            raise AuthenticationFailed()
        hs = HandshakeState(
            protocol,
            initiator=False,
            prologue=pro,
            s=self._static,
            e=self._ephemeral,
        )
        payload = hs.read_message(noise_msg)  # AuthenticationFailed on any tampering
        peer = hs.remote_static
        # Check the key before looking at the payload: an unknown device learns nothing, not
        # even whether its payload was well-formed.
        if peer is None or not self._is_allowed(peer):
            raise AuthenticationFailed()
        hello = StrictMap(unpack(payload, max_bin=64), "handshake payload")
        timestamp = hello.get("ts", bytes)
        version = hello.get("version", str)
        hello.get("agent", str)
        asked = hello.get("features", list, optional=True)
        hello.done()
        asked_features = None if asked is None else check_features(asked, "hello")
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
        if asked_features is not None:  # answer in kind: a device that did not ask gets v1
            self.features = tuple(f for f in asked_features if f in KNOWN_FEATURES)
            reply["features"] = list(self.features)
        offer = self.offer(hosted.version)
        if offer is not None:
            reply["update"] = offer.to_wire()
        self._outgoing.append(pack({"v": PROTOCOL_VERSION, "noise": hs.write_message(pack(reply))}))
        self._transition("recv:hello")
        self._transport = hs.transport()
        self.bundle = hosted
        return HandshakeComplete(peer, bundle, version)

    def send_result(
        self,
        request_id: int,
        tensors: Sequence[tuple[str, EncodedTensor]],
        server_ms: float,
        load: ServerLoad | None = None,
    ) -> None:
        """Queue a result; ``load`` goes out only if the device negotiated "load" (§14)."""
        body = {
            "t": "result",
            "id": request_id,
            "tensors": encode_tensors(tensors),
            "server_ms": float(server_ms),
        }
        self._send_encrypted("send:result", self._with_load(body, load))

    def _with_load(self, body: dict[str, Any], load: ServerLoad | None) -> dict[str, Any]:
        if load is not None and FEATURE_LOAD in self.features:
            body["load"] = load.to_wire()
        return body

    def offer(self, version: str) -> UpdateOffer | None:
        """The update to offer a device on ``version``: None unless "update" is in force and
        the server serves a newer version of its model (§16.1)."""
        if FEATURE_UPDATE not in self.features or self._offers is None:
            return None
        offer = self._offers(version, self.peer_public or b"")
        return offer if offer is not None and offer.version != version else None

    def send_status(self, request_id: int, load: ServerLoad, bundles: Sequence[BundleLoad]) -> None:
        """Answer a ``status`` request (§14.3), with the update offer under "update" (§16.1)."""
        body: dict[str, Any] = {
            "t": "status",
            "id": request_id,
            "load": load.to_wire(),
            "bundles": [b.to_wire() for b in bundles],
        }
        offer = self.offer(self.bundle.version) if self.bundle is not None else None
        if offer is not None:
            body["update"] = offer.to_wire()
        self._send_encrypted("send:status", body)

    def send_file(self, request_id: int, data: bytes, size: int) -> None:
        """Answer a ``fetch`` (§16.3): ``data`` at the fetch's offset, ``size`` the file's."""
        if len(data) > MAX_FETCH or not 0 <= size <= MAX_FILE_SIZE:
            raise LocalProtocolError("a file reply carries at most MAX_FETCH bytes of a file")
        self._send_encrypted(
            "send:file", {"t": "file", "id": request_id, "data": data, "size": size}
        )

    def send_error(
        self, request_id: int | None, code: str, message: str, *, retry_ms: int | None = None
    ) -> None:
        """Queue an error; ``retry_ms`` (``overloaded`` only) tells the device when to retry."""
        if code not in ERROR_CODES:
            raise LocalProtocolError(f"unknown error code {code!r}")
        body: dict[str, Any] = {"t": "error", "code": code, "message": truncate_utf8(message)}
        if request_id is not None:
            body["id"] = request_id
        if retry_ms is not None:
            if code != "overloaded":
                raise LocalProtocolError("retry_ms goes only with code 'overloaded'")
            if isinstance(retry_ms, bool) or not isinstance(retry_ms, int):
                raise LocalProtocolError("retry_ms must be an integer number of milliseconds")
            if not 0 <= retry_ms <= MAX_RETRY_MS:
                raise LocalProtocolError(f"retry_ms must be in 0..{MAX_RETRY_MS}, not {retry_ms}")
            body["retry_ms"] = retry_ms
        self._send_encrypted("send:error", body)

    def send_pong(self, request_id: int, pad: bytes = b"") -> None:
        self._send_encrypted("send:pong", {"t": "pong", "id": request_id, "pad": pad})

    def send_opened(self, request_id: int, session: int, max_tokens: int) -> None:
        self._send_encrypted(
            "send:opened",
            {"t": "opened", "id": request_id, "session": session, "max_tokens": max_tokens},
        )

    def send_token(
        self,
        request_id: int,
        session: int,
        pos: int,
        token: int,
        server_ms: float,
        load: ServerLoad | None = None,
    ) -> None:
        body = {
            "t": "token",
            "id": request_id,
            "session": session,
            "pos": pos,
            "token": token,
            "server_ms": float(server_ms),
        }
        self._send_encrypted("send:token", self._with_load(body, load))

    def send_ended(self, request_id: int, session: int) -> None:
        self._send_encrypted("send:ended", {"t": "ended", "id": request_id, "session": session})
