"""One device's authenticated connection to one edge server, kept warm and reused.

A :class:`ServerLink` owns the websocket and the sans-I/O
:class:`~edgeoffload.protocol.connection.ClientConnection` for one server whose public key the
device pins. It opens the connection on demand (Noise IK handshake, asking for the ``"load"``
feature of PROTOCOL.md §14.1 and retrying once without it against an older server), sends
requests, matches every reply to its request by id *and* kind, and measures the link (RTT,
throughput) and what the server reports (tail time, load). It decides nothing: which server
gets a request, retries and fallbacks are the caller's
(:class:`~edgeoffload.device.client.OffloadClient` with its
:class:`~edgeoffload.device.routing.Router`).

A server that answers a request this device never sent, or with the wrong kind of reply, is
lying or broken: that is a :class:`~edgeoffload.errors.ProtocolError` and the connection is
dropped, failing everything pending on it, so nothing can be matched to the wrong request.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection as WsConnection
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from edgeoffload.core.noise import DEFAULT_PROTOCOL
from edgeoffload.errors import (
    AuthenticationFailed,
    EdgeOffloadError,
    OffloadUnavailable,
    ProtocolError,
    RemoteProtocolError,
    UsageError,
)
from edgeoffload.keys import KeyPair, fingerprint
from edgeoffload.manifest import Manifest
from edgeoffload.protocol.connection import (
    CLOSE_AUTH,
    CLOSE_PROTOCOL,
    CLOSE_VERSION,
    ClientConnection,
)
from edgeoffload.protocol.events import (
    Chunk,
    CloseRequested,
    ErrorReply,
    Event,
    FileData,
    HandshakeComplete,
    Pong,
    RunResult,
    SessionEnded,
    SessionOpened,
    StatusReply,
    TokenResult,
)
from edgeoffload.protocol.load import FEATURE_LOAD, FEATURE_UPDATE, ServerLoad
from edgeoffload.protocol.updates import UpdateOffer
from edgeoffload.types import LinkProfile

log = logging.getLogger("edgeoffload.device.link")

# websockets' send() waits for its write buffer to drain below this; the 32 KiB default
# adds waits to every large request (measured: 256 KiB round trip 0.87 -> 0.57 ms).
WRITE_LIMIT = 1 << 22
FEATURES = (FEATURE_LOAD,)
UPDATE_FEATURES = (FEATURE_LOAD, FEATURE_UPDATE)  # a device that takes updates (§16)

Reply = RunResult | Pong | SessionOpened | TokenResult | SessionEnded | StatusReply | FileData


@dataclass(frozen=True)
class Answer:
    """A reply and when it came: perf_counter seconds, and the ms spent decrypting it."""

    event: Any
    received: float
    decrypt_ms: float


@dataclass(frozen=True)
class Sent:
    """A request on its way: the reply's future and what sending it cost."""

    future: asyncio.Future[Answer]
    encrypt_ms: float
    wire_bytes: int
    sent_at: float  # perf_counter seconds
    reused: bool  # sent on a connection opened before this request (it may have been stale)


class _FeaturesRefused(OffloadUnavailable):
    """The server closed with 4400 on a hello that asked for features (older than §14)."""


class _Measurements:
    """Live link measurements to one server."""

    def __init__(self) -> None:
        self.rtts: list[float] = []
        self.up_bps: float | None = None
        self.down_bps: float | None = None

    def add_rtt(self, ms: float) -> None:
        self.rtts = [*self.rtts[-31:], ms]

    @property
    def rtt_ms(self) -> float | None:
        return statistics.median(self.rtts) if self.rtts else None


class ServerLink:
    """The connection to the edge server at ``url`` whose static key is ``server_key``."""

    def __init__(
        self,
        url: str,
        server_key: bytes,
        *,
        identity: KeyPair,
        manifest: Manifest,
        max_message: int,
        connect_timeout: float = 3.0,
        protocol: str = DEFAULT_PROTOCOL,
        clock: Callable[[], int] = time.time_ns,
        ids: itertools.count[int] | None = None,
        updates: bool = False,
    ) -> None:
        """``updates``: ask for the "update" feature (§16) and keep the server's offer."""
        if not url.startswith(("ws://", "wss://")):
            raise UsageError(f"server must be a ws:// or wss:// URL, got {url!r}")
        if len(server_key) != 32:
            raise UsageError(f"the key of {url} must be a 32-byte X25519 public key")
        self.url = url
        self.server_key = server_key
        self.fingerprint = fingerprint(server_key)
        self.manifest = manifest
        self.static = identity
        self.connect_timeout = connect_timeout
        self.protocol = protocol
        self.clock = clock
        self.max_message = max_message
        self.ids = ids if ids is not None else itertools.count(1)
        self.measurements = _Measurements()
        self.server_version: str | None = None
        self.last_load: ServerLoad | None = None
        self.last_error: str = ""
        # The newest version of this device's model the server serves (§16.1), from the
        # welcome and status replies; None when it offers nothing.
        self.offer: UpdateOffer | None = None
        # () once this server refused them (older than §14)
        self._features: tuple[str, ...] = UPDATE_FEATURES if updates else FEATURES
        self._ws: WsConnection | None = None
        self._conn: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, tuple[asyncio.Future[Answer], type[Event]]] = {}
        self._abandoned: collections.deque[int] = collections.deque(maxlen=1024)
        self._send_lock = asyncio.Lock()
        self._connect_lock = asyncio.Lock()

    # -- connection ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._conn is not None

    @property
    def features(self) -> tuple[str, ...]:
        """What the server granted on the current connection (§14.1)."""
        return self._conn.features if self._conn is not None else ()

    @property
    def max_request_bytes(self) -> int | None:
        """What the server said it accepts in one message (known once connected)."""
        return self._conn.peer_max_message if self._conn is not None else None

    async def connect(self) -> None:
        """Open the connection and run the handshake (no-op when already connected)."""
        async with self._connect_lock:
            if self.connected:
                return
            try:
                await self._open()
            except _FeaturesRefused:
                # A server older than §14 rejects the hello's unknown `features` field (4400,
                # before it records the timestamp): talk plain v1 to it from now on.
                log.info("%s does not know protocol features: connecting without", self.url)
                self._features = ()
                await self._open()

    async def _open(self) -> None:
        try:
            ws = await asyncio.wait_for(
                connect(
                    self.url,
                    compression=None,
                    max_size=self.max_message,
                    open_timeout=self.connect_timeout,
                    proxy=None,
                    ping_interval=20,
                    ping_timeout=20,
                    close_timeout=2,
                    write_limit=WRITE_LIMIT,
                ),
                self.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError, InvalidHandshake) as exc:
            raise OffloadUnavailable(
                f"cannot reach {self.url}: {exc or type(exc).__name__}"
            ) from None
        except InvalidURI as exc:
            raise UsageError(f"bad server URL {self.url!r}: {exc}") from None
        conn = ClientConnection(
            static=self.static,
            server_public=self.server_key,
            bundle=self.manifest.identity,
            version=self.manifest.version,
            time_ns=self.clock(),
            protocol=self.protocol,
            max_message=self.max_message,
            features=self._features,
        )
        conn.start()
        try:
            for data in conn.data_to_send():
                await ws.send(data)
            reply = await asyncio.wait_for(ws.recv(), self.connect_timeout)
            if not isinstance(reply, bytes):
                raise RemoteProtocolError("server sent a text message")
            events = conn.receive(reply)
        except ConnectionClosed as exc:
            await ws.close()
            code = exc.rcvd.code if exc.rcvd else None
            if code == CLOSE_AUTH:
                raise AuthenticationFailed(
                    f"the edge server {self.url} rejected the handshake",
                    hint="check that this device's key is in the server's allow-list and that "
                    "the server key you pinned is that server's public key",
                ) from None
            if code == CLOSE_PROTOCOL and self._features:
                raise _FeaturesRefused(f"{self.url} refused the hello's features") from None
            raise OffloadUnavailable(
                f"{self.url} closed the connection during the handshake ({code})"
            ) from None
        except asyncio.TimeoutError:
            await ws.close()
            raise OffloadUnavailable(f"{self.url} did not answer the handshake in time") from None
        except AuthenticationFailed:
            await ws.close()
            raise AuthenticationFailed(
                f"the handshake reply of {self.url} failed authentication",
                hint="the pinned server key must be the public key of the server you connect to",
            ) from None
        except EdgeOffloadError:
            await ws.close(CLOSE_VERSION)
            raise
        event = events[0]
        assert isinstance(event, HandshakeComplete)
        self.server_version = event.version
        self.offer = event.update
        self._ws, self._conn = ws, conn
        self._reader = asyncio.create_task(self._read_loop(ws, conn))

    async def _read_loop(self, ws: WsConnection, conn: ClientConnection) -> None:
        error: Exception = OffloadUnavailable(f"connection to {self.url} lost")
        try:
            async for data in ws:
                if not isinstance(data, bytes):
                    raise RemoteProtocolError("server sent a text message")
                received = time.perf_counter()
                for event in conn.receive(data):
                    decrypt_ms = (time.perf_counter() - received) * 1e3
                    if isinstance(event, CloseRequested):
                        return
                    self._deliver(event, Answer(event, received, decrypt_ms))
        except ConnectionClosed:
            pass
        except (ProtocolError, AuthenticationFailed) as exc:
            log.warning("closing the connection to %s: %s", self.url, exc)
            self.last_error = str(exc)
            error = exc
        finally:
            if self._ws is ws:
                self._ws = self._conn = None
            for future, _ in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()
            await ws.close()

    def _deliver(self, event: Event, answer: Answer) -> None:
        """Resolve the request ``event`` answers; a reply to nothing we asked is a lie."""
        if isinstance(event, ErrorReply):
            rid = event.request_id
            entry = self._pending.pop(rid, None) if rid is not None else None
            if entry is not None and not entry[0].done():
                entry[0].set_exception(event.to_exception())
            return  # an error for no request (or a late one) harms nobody
        request_id: int = getattr(event, "request_id", -1)
        entry = self._pending.get(request_id)
        if entry is None and request_id in self._abandoned:
            return  # the answer to a request given up on (its deadline passed)
        if entry is None or not isinstance(event, entry[1]):
            raise RemoteProtocolError(
                f"{self.url} sent a {type(event).__name__} for request {request_id}, which "
                "is not a request of this kind pending on this connection"
            )
        del self._pending[request_id]
        if isinstance(event, RunResult | TokenResult | StatusReply) and event.load is not None:
            self.last_load = event.load
        if isinstance(event, StatusReply) and FEATURE_UPDATE in self.features:
            self.offer = event.update
        if not entry[0].done():
            entry[0].set_result(answer)

    async def drop(self) -> None:
        """Forget the connection without waiting on a peer that may be dead."""
        ws, self._ws, self._conn = self._ws, None, None
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if ws is not None:
            try:
                await asyncio.wait_for(ws.close(), 0.5)
            except (asyncio.TimeoutError, ConnectionClosed, OSError):
                ws.transport.abort()  # a stopped peer would hold a graceful close for long

    async def close(self) -> None:
        if self._ws is not None and self._conn is not None:
            try:
                async with self._send_lock:
                    self._conn.send_close()
                    for data in self._conn.data_to_send():
                        await self._ws.send(data)
            except (ConnectionClosed, ProtocolError):
                pass
        await self.drop()

    # -- requests ------------------------------------------------------------------------------

    async def send(
        self, build: Callable[[ClientConnection], None], request_id: int, reply: type[Event]
    ) -> Sent:
        """Queue one message (``build(connection)``) and send it; its ``reply`` is awaited
        through the returned future."""
        reused = self.connected
        await self.connect()
        assert self._ws is not None and self._conn is not None
        ws, conn = self._ws, self._conn
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, reply)
        try:
            async with self._send_lock:
                started = time.perf_counter()
                build(conn)
                messages = conn.data_to_send()
                encrypt_ms = (time.perf_counter() - started) * 1e3
                sent_at = time.perf_counter()
                for data in messages:
                    await ws.send(data)
        except (ConnectionClosed, OSError) as exc:
            self._pending.pop(request_id, None)
            future.cancel()
            raise OffloadUnavailable(
                f"connection to {self.url} lost while sending ({exc})"
            ) from None
        except BaseException:  # refused before sending (PayloadError, LocalProtocolError)
            self._pending.pop(request_id, None)
            future.cancel()
            raise
        return Sent(future, encrypt_ms, sum(len(m) for m in messages), sent_at, reused)

    def forget(self, request_id: int) -> None:
        """Stop waiting for ``request_id``; a late answer to it is then dropped quietly."""
        if self._pending.pop(request_id, None) is not None:
            self._abandoned.append(request_id)

    async def call(
        self,
        build: Callable[[ClientConnection, int], None],
        reply: type[Event],
        timeout: float,
    ) -> tuple[Any, Sent, Answer]:
        """Send one message (``build(connection, request_id)``), await its reply within
        ``timeout`` seconds: (the reply event, how it was sent, when it came).

        A timeout drops the connection: the reply may still come, and must never be taken for
        the answer to a later request.
        """
        request_id = next(self.ids)
        sent = await self.send(lambda c: build(c, request_id), request_id, reply)
        try:
            answer = await asyncio.wait_for(sent.future, timeout)
        except asyncio.TimeoutError:
            await self.drop()
            raise OffloadUnavailable(f"{self.url}: no answer within {timeout:g} s") from None
        finally:
            self.forget(request_id)
        return answer.event, sent, answer

    async def ping(self, pad: int = 0, *, timeout: float = 10.0) -> float:
        """Round-trip time in ms of an encrypted ping carrying ``pad`` bytes each way."""
        payload = bytes(pad)
        _, sent, answer = await self.call(lambda c, rid: c.send_ping(rid, payload), Pong, timeout)
        ms = (answer.received - sent.sent_at) * 1e3
        if pad == 0:
            self.measurements.add_rtt(ms)
        return ms

    async def measure(self, *, probe_bytes: int = 256 * 1024, rounds: int = 3) -> LinkProfile:
        """RTT from empty pings, throughput from pings that carry ``probe_bytes`` each way."""
        rtts = [await self.ping() for _ in range(rounds)]
        loaded = [await self.ping(probe_bytes) for _ in range(rounds)]
        rtt = statistics.median(rtts)
        extra_s = max(statistics.median(loaded) - rtt, 1e-3) / 1e3
        bps = 2 * probe_bytes * 8 / extra_s  # both directions carried the pad
        self.measurements.up_bps = self.measurements.down_bps = bps
        return self.profile()

    def profile(self) -> LinkProfile:
        """The link as measured on the live connection (for the cost model and the router)."""
        rtt = self.measurements.rtt_ms
        if rtt is None:
            raise UsageError(f"no measurement of {self.url} yet: ping or measure it first")
        up = self.measurements.up_bps or 1e9
        down = self.measurements.down_bps or up
        return LinkProfile("measured", up, down, rtt, f"measured on {self.url}")

    # -- generation sessions (PROTOCOL.md §12), by the server's own session ids ---------------

    async def open_session(
        self, sampling: Mapping[str, Any], max_tokens: int, *, timeout: float = 10.0
    ) -> tuple[int, int]:
        """Open a session on this server: (its session id, positions granted)."""
        event, _, _ = await self.call(
            lambda c, rid: c.send_open(rid, sampling, max_tokens), SessionOpened, timeout
        )
        assert isinstance(event, SessionOpened)
        return event.session, event.max_tokens

    async def feed_session(
        self, kind: str, session: int, pos: int, chunks: list[Chunk], *, timeout: float = 10.0
    ) -> tuple[TokenResult, int, float]:
        """A prefill or step: (the sampled token, request bytes, round trip ms)."""
        event, sent, answer = await self.call(
            lambda c, rid: c.send_feed(rid, kind, session, pos, chunks), TokenResult, timeout
        )
        assert isinstance(event, TokenResult)
        return event, sent.wire_bytes, (answer.received - sent.sent_at) * 1e3

    async def end_session(self, session: int, *, timeout: float = 10.0) -> None:
        await self.call(lambda c, rid: c.send_end(rid, session), SessionEnded, timeout)

    async def status(self, *, timeout: float = 10.0) -> StatusReply:
        """The server's load and hosted bundles (§14.3); needs a server that knows §14."""
        await self.connect()
        if FEATURE_LOAD not in self.features:
            raise UsageError(f"{self.url} does not report its load (older than protocol §14)")
        event, _, _ = await self.call(lambda c, rid: c.send_status(rid), StatusReply, timeout)
        assert isinstance(event, StatusReply)
        return event

    # -- head updates (PROTOCOL.md §16) --------------------------------------------------------

    async def fetch(
        self, version: str, file: str, offset: int, length: int, *, timeout: float = 10.0
    ) -> tuple[bytes, int]:
        """``length`` bytes at ``offset`` of ``file`` of bundle ``version``, and the file's
        size (FetchRefused when the server will not serve it)."""
        await self.connect()
        if FEATURE_UPDATE not in self.features:
            raise UsageError(f"{self.url} does not serve updates (older than protocol §16)")
        # Our own receive limit bounds the reply: data plus its framing.
        length = max(1, min(length, self.max_message - 65536))
        event, _, _ = await self.call(
            lambda c, rid: c.send_fetch(rid, version, file, offset, length), FileData, timeout
        )
        assert isinstance(event, FileData)
        return event.data, event.size
