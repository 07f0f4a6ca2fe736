"""The edge server: hosts bundles' tails and answers devices over the encrypted protocol.

One asyncio event loop owns the sockets (websockets.asyncio); tails run in a bounded thread
pool of onnxruntime sessions (ORT releases the GIL while it computes). Safety defaults:
binds 127.0.0.1, admits only allow-listed device keys, ``compression=None`` (ciphertext does
not compress, and no decompression-bomb surface), ``max_size`` derived from the largest
declared crossing tensor, timeouts on handshakes and silent peers, a hard bound on in-flight
requests (beyond it the answer is ``overloaded``, never an unbounded queue), ``GET /healthz``
over plain HTTP, and a graceful drain on shutdown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from edgeoffload._ort import make_session, run
from edgeoffload.bundle import Bundle
from edgeoffload.core import codec as codec_mod
from edgeoffload.core.decoder import DecoderLayout, KVState, select_next
from edgeoffload.core.sampling import SamplingParams, sample_token
from edgeoffload.edge.allowlist import AllowList
from edgeoffload.edge.metrics import LiveState, ServerStats
from edgeoffload.edge.peer import Peer
from edgeoffload.edge.sessions import Session, SessionStore
from edgeoffload.errors import (
    AuthenticationFailed,
    EdgeOffloadError,
    PayloadError,
    ProtocolError,
    SamplingError,
    ServerBusy,
    SessionError,
    SessionLost,
    UsageError,
)
from edgeoffload.keys import KeyPair
from edgeoffload.protocol._state import check_feed, grant_max_tokens
from edgeoffload.protocol.connection import (
    CLOSE_AUTH,
    CLOSE_PROTOCOL,
    CLOSE_SHUTDOWN,
    CLOSE_VERSION,
    HostedBundle,
    ReplayGuard,
)
from edgeoffload.protocol.connection import ServerConnection as ProtocolConnection
from edgeoffload.protocol.events import (
    CloseRequested,
    ErrorReply,
    Event,
    HandshakeComplete,
    InvalidRequest,
    Ping,
    RunRequest,
    SessionEnd,
    SessionFeed,
    SessionOpen,
    StatusRequest,
)
from edgeoffload.protocol.load import BundleLoad, ServerLoad
from edgeoffload.protocol.tensors import decode_checked
from edgeoffload.protocol.wire import truncate_utf8

log = logging.getLogger("edgeoffload.edge.server")

MIN_MAX_MESSAGE = 1 << 20
# Tails that take less than this run on the event loop itself when nothing else is in flight:
# a round trip through the worker pool costs ~0.1-0.3 ms, more than such a tail.
INLINE_TAIL_MS = 0.5
WRITE_LIMIT = 1 << 22  # see device.link.WRITE_LIMIT
CHUNK_OVERHEAD = 16 / 65535
# Decoder bundles are split at one decode step; their messages may carry a whole prompt or a
# replay of a lost session: room for this many positions' crossing tensors.
DECODER_MESSAGE_TOKENS = 2048
DECODER_MESSAGE_BYTES = 8 << 20  # -> a 16 MiB message limit (devices split longer prompts)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    threads: int = 1  # intra-op threads per tail session run
    workers: int = 0  # concurrent tail runs; 0 = number of CPUs
    max_inflight: int = 0  # requests accepted at once (running + queued); 0 = 4 x workers
    handshake_timeout: float = 5.0
    idle_timeout: float = 120.0
    request_timeout: float = 60.0
    drain_timeout: float = 30.0
    # Generation sessions (decoder bundles): tail KV caches kept per conversation.
    kv_budget: int = 1 << 30  # bytes of KV cache for all sessions together (LRU eviction)
    session_ttl: float = 600.0  # seconds a session may stay unused
    max_context: int = 4096  # positions one session may hold


@dataclass
class _Hosted:
    bundle: Bundle
    info: HostedBundle
    session: Any
    codec: codec_mod.CodecSpec
    max_tensor_bytes: int
    tail_ms: float = float("inf")  # moving average of decode + tail time
    runs: int = 0
    inflight: int = 0  # this bundle's requests admitted and not answered
    decoder: DecoderLayout | None = None  # set for decoder bundles (served as sessions)
    tail_state: tuple[tuple[str, str], ...] = ()  # the tail's KV pairs

    def new_kv(self, max_tokens: int) -> KVState:
        assert self.decoder is not None
        specs = {s.name: s for s in self.decoder.state_specs}
        return KVState(self.tail_state, specs, max_tokens=max_tokens)

    @property
    def kv_bytes_per_token(self) -> int:
        assert self.decoder is not None
        return self.decoder.kv_bytes_per_token([i for i, _ in self.tail_state])


def _respond(
    connection: ServerConnection, status: HTTPStatus, body: str, content_type: str
) -> Response:
    response = connection.respond(status, body)
    del response.headers["Content-Type"]  # respond() set text/plain; replace, not add
    response.headers["Content-Type"] = content_type
    return response


def _request_kind(event: Event) -> str | None:
    """The kind a device message is counted as (None: not a request, e.g. a close)."""
    if isinstance(event, RunRequest):
        return "run"
    if isinstance(event, SessionOpen):
        return "open"
    if isinstance(event, SessionFeed):
        return event.kind  # prefill or step
    if isinstance(event, SessionEnd):
        return "end"
    if isinstance(event, Ping):
        return "ping"
    if isinstance(event, InvalidRequest):
        return "invalid"
    return None


def _declared_bytes(bundle: Bundle) -> int:
    """Bytes of the crossing tensors at the bundle's split-time dims (x2 for other dims)."""
    total = 0
    dims = bundle.manifest.dims
    for spec in bundle.manifest.crossing:
        size = spec.nbytes(dims)
        total += size if size is not None else 0
    return total


class EdgeServer:
    """Serve the tails of ``bundles`` to allow-listed devices."""

    def __init__(
        self,
        bundles: Sequence[Bundle],
        *,
        identity: KeyPair,
        allow: AllowList,
        config: ServerConfig | None = None,
    ) -> None:
        self.config = config or ServerConfig()
        self.identity = identity
        self.allow = allow
        self.stats = ServerStats()
        cpus = os.cpu_count() or 1
        self.workers = self.config.workers or cpus
        self.max_inflight = self.config.max_inflight or 4 * self.workers
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="edgeoffload-tail")
        self._hosted: dict[str, _Hosted] = {}
        self.bundles: dict[str, HostedBundle] = {}
        for bundle in bundles:
            self.add_bundle(bundle)
        largest = max((h.max_tensor_bytes for h in self._hosted.values()), default=0)
        # Room for the declared tensors twice over (other symbolic dims), framing and tags.
        self.max_message = max(
            MIN_MAX_MESSAGE, math.ceil(2 * largest * (1 + CHUNK_OVERHEAD)) + 65536
        )
        self._replay = ReplayGuard()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._server: Server | None = None
        self._closing = False
        self._static = identity
        self.sessions = SessionStore(
            ttl=self.config.session_ttl, budget_bytes=self.config.kv_budget
        )
        self.clock: Callable[[], float] = time.monotonic
        self.stats.watch(
            LiveState(
                inflight=lambda: self._inflight,
                max_inflight=lambda: self.max_inflight,
                connections_open=lambda: len(self._server.connections) if self._server else 0,
                sessions=lambda: len(self.sessions),
                kv_bytes=lambda: self.sessions.nbytes,
                draining=lambda: int(self._closing),
            )
        )

    def add_bundle(self, bundle: Bundle) -> None:
        manifest = bundle.manifest
        if bundle.tail_path is None:
            raise UsageError(
                f"bundle {bundle.path} is all-local (no tail): nothing to serve",
                hint="split with a cut that leaves work for the server",
            )
        session = make_session(bundle.tail_path, threads=self.config.threads)
        info = HostedBundle(manifest.identity, manifest.version)
        hosted = _Hosted(
            bundle,
            info,
            session,
            codec_mod.CodecSpec.parse(manifest.codec),
            max(_declared_bytes(bundle), 1),
        )
        if manifest.state:
            state = {e["input"]: e["output"] for e in manifest.state}
            hosted.decoder = DecoderLayout.of(manifest.graph_inputs, manifest.graph_outputs, state)
            hosted.tail_state = tuple(
                (e["input"], e["output"]) for e in manifest.state if e["side"] == "server"
            )
            # A prompt's prefill (or a replay) carries many positions in one message; the
            # crossing specs' sequence dims are symbolic, so the declared size is a floor.
            hosted.max_tensor_bytes = max(
                hosted.max_tensor_bytes * DECODER_MESSAGE_TOKENS, DECODER_MESSAGE_BYTES
            )
        self._hosted[manifest.version] = hosted
        self.bundles[manifest.version] = info
        log.info("hosting %s version %s from %s", manifest.identity, manifest.version, bundle.path)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            compression=None,
            max_size=self.max_message,
            max_queue=4,
            process_request=self._process_request,
            open_timeout=self.config.handshake_timeout,
            ping_interval=20,
            ping_timeout=20,
            close_timeout=5,
            write_limit=WRITE_LIMIT,
        )
        log.info("listening on %s:%d", self.config.host, self.port)

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        sock = next(iter(self._server.sockets))
        return int(sock.getsockname()[1])

    async def shutdown(self) -> None:
        """Drain: refuse new work, let in-flight requests finish (bounded), then close everyone.

        The socket keeps listening while draining, so that /readyz and /healthz can say so
        (new websocket upgrades get 503, new requests on open connections ``shutting_down``).
        """
        if self._server is None:
            return
        self._closing = True
        try:
            await asyncio.wait_for(self._idle.wait(), self.config.drain_timeout)
        except asyncio.TimeoutError:
            log.warning("drain timeout: %d request(s) still running", self._inflight)
        self._server.close(close_connections=False)
        for conn in list(self._server.connections):
            await conn.close(CLOSE_SHUTDOWN, "server shutting down")
        await self._server.wait_closed()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.wait_closed()

    # -- HTTP ------------------------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Plain-HTTP endpoints beside the websocket: /healthz (alive, with load), /readyz
        (503 while draining, so a load balancer stops sending devices), /metrics
        (Prometheus). A websocket upgrade while draining is refused with 503."""
        if request.path == "/healthz":
            return _respond(
                connection,
                HTTPStatus.OK,
                json.dumps(
                    {
                        "status": "draining" if self._closing else "ok",
                        "bundles": sorted(h.version for h in self.bundles.values()),
                        "inflight": self._inflight,
                        "max_inflight": self.max_inflight,
                    }
                )
                + "\n",
                "application/json",
            )
        if request.path == "/readyz":
            status = HTTPStatus.SERVICE_UNAVAILABLE if self._closing else HTTPStatus.OK
            body = {"ready": not self._closing, "status": "draining" if self._closing else "ok"}
            return _respond(connection, status, json.dumps(body) + "\n", "application/json")
        if request.path == "/metrics":
            data, content_type = self.stats.exposition()
            return _respond(connection, HTTPStatus.OK, data.decode(), content_type)
        if self._closing:
            return _respond(connection, HTTPStatus.SERVICE_UNAVAILABLE, "draining\n", "text/plain")
        return None

    # -- one device ------------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        self.stats.connection()
        peer = Peer(
            ws,
            ProtocolConnection(
                static=self._static,
                is_allowed=self.allow.allows,
                bundles=self.bundles,
                replay_guard=self._replay,
                max_message=self.max_message,
            ),
            count_error=self.stats.error,
        )
        try:
            greeting = await peer.handshake(self.config.handshake_timeout)
            if greeting is None:
                return
            if isinstance(greeting, ErrorReply):
                self.stats.handshake("version")
                await peer.close(CLOSE_VERSION, greeting.code)
                return
            assert isinstance(greeting, HandshakeComplete)
            self.stats.handshake("ok")
            hosted = self._hosted[greeting.version]
            del greeting  # an idle connection should not keep its handshake alive
            while True:
                events = await peer.receive(self.config.idle_timeout)
                if events is None or not await self._dispatch(peer, hosted, events):
                    return
                del events  # nor its last request's plaintext (measured: ~0.6 MiB per connection)
        except AuthenticationFailed:
            if peer.connection.transport is None:
                self.stats.handshake("auth")
            self.stats.error("auth")
            await peer.close(CLOSE_AUTH, "authentication failed")
        except ProtocolError as exc:
            self.stats.error("protocol")
            log.info("protocol error from %s: %s", ws.remote_address, exc)
            await peer.close(CLOSE_PROTOCOL, truncate_utf8(str(exc), 120))  # reasons <= 123 B
        except asyncio.TimeoutError:
            self.stats.error("timeout")
            await peer.close(CLOSE_PROTOCOL, "timeout")
        except ConnectionClosed:
            pass
        finally:
            await peer.finish()

    async def _dispatch(self, peer: Peer, hosted: _Hosted, events: list[Event]) -> bool:
        """Handle the events of one transport message; False when the device closed."""
        for event in events:
            kind = _request_kind(event)
            if kind is not None:
                self.stats.request(hosted.info.version, kind)
            if isinstance(event, RunRequest) and hosted.decoder is not None:
                await peer.reply_error(
                    event.request_id,
                    "session",
                    "this bundle is a decoder: generate through a session (open/prefill/step)",
                )
            elif isinstance(event, RunRequest):
                peer.spawn(self._serve_request(peer, hosted, event))
            elif isinstance(event, SessionOpen | SessionEnd | SessionFeed):
                peer.spawn(self._serve_session(peer, hosted, event))
            elif isinstance(event, InvalidRequest):
                await peer.reply_error(event.request_id, "payload", event.message)
            elif isinstance(event, Ping):
                await peer.send(ProtocolConnection.send_pong, event.request_id, event.payload)
            elif isinstance(event, StatusRequest):
                await peer.send(
                    ProtocolConnection.send_status,
                    event.request_id,
                    self.load(hosted),
                    self.bundle_loads(),
                )
            elif isinstance(event, CloseRequested):
                await peer.close()
                return False
        return True

    def load(self, hosted: _Hosted, *, answering: int = 0) -> ServerLoad:
        """This server's load report (PROTOCOL.md §14.2) for a reply on ``hosted``'s
        connection; ``answering`` requests (the one the reply answers) are not counted."""
        inflight = max(0, self._inflight - answering)
        return ServerLoad(
            inflight=inflight,
            queued=max(0, inflight - self.workers),
            workers=self.workers,
            kv_free=max(0, self.sessions.budget_bytes - self.sessions.nbytes),
            draining=self._closing,
            tail_ms=hosted.tail_ms if hosted.runs else None,
        )

    def bundle_loads(self) -> list[BundleLoad]:
        return [
            BundleLoad(h.info.identity, h.info.version, h.inflight, h.tail_ms if h.runs else None)
            for h in self._hosted.values()
        ]

    async def _admit(self, peer: Peer, hosted: _Hosted, request_id: int) -> bool:
        """Count a request in, or answer ``shutting_down`` / ``overloaded`` (never queue it)."""
        self.stats.admission()
        if self._closing:
            await peer.reply_error(request_id, "shutting_down", "server is shutting down")
            return False
        if self._inflight >= self.max_inflight:
            await peer.reply_error(request_id, "overloaded", f"{self._inflight} requests in flight")
            return False
        self._inflight += 1
        hosted.inflight += 1
        self._idle.clear()
        return True

    def _release(self, hosted: _Hosted) -> None:
        self._inflight -= 1
        hosted.inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    async def _serve_request(self, peer: Peer, hosted: _Hosted, request: RunRequest) -> None:
        rid = request.request_id
        if not await self._admit(peer, hosted, rid):
            return
        try:
            started = time.perf_counter()
            if hosted.tail_ms < INLINE_TAIL_MS and self._inflight == 1:
                # A tail this short costs less than the hop to a worker thread and back.
                outputs, tail_s = self._run_tail(hosted, request)
            else:
                loop = asyncio.get_running_loop()
                outputs, tail_s = await asyncio.wait_for(
                    loop.run_in_executor(self._executor, self._run_tail, hosted, request),
                    self.config.request_timeout,
                )
            server_ms = (time.perf_counter() - started) * 1e3
            hosted.tail_ms = 0.8 * hosted.tail_ms + 0.2 * server_ms if hosted.runs else server_ms
            hosted.runs += 1
            encoded = [
                (name, codec_mod.encode(a, codec_mod.CodecSpec())) for name, a in outputs.items()
            ]
            await peer.send(
                ProtocolConnection.send_result,
                rid,
                encoded,
                server_ms,
                self.load(hosted, answering=1),
            )
            self.stats.result(
                hosted.info.version, tail_s=tail_s, total_s=time.perf_counter() - started
            )
        except PayloadError as exc:
            await peer.reply_error(rid, "payload", exc.message)
        except asyncio.TimeoutError:
            await peer.reply_error(rid, "timeout", "the tail did not finish in time")
        except ConnectionClosed:
            pass
        except EdgeOffloadError as exc:
            await peer.reply_error(rid, "internal", exc.message)
        except Exception:  # an ORT failure must not take the server down
            log.exception("tail failed for request %d", rid)
            await peer.reply_error(rid, "internal", "the tail failed on the server")
        finally:
            self._release(hosted)

    # -- generation sessions ---------------------------------------------------------------------

    async def _serve_session(
        self, peer: Peer, hosted: _Hosted, event: SessionOpen | SessionEnd | SessionFeed
    ) -> None:
        """Open, feed or end a session; every failure is an error reply for this request only."""
        rid = event.request_id
        owner = peer.public_key
        version = hosted.info.version
        try:
            if hosted.decoder is None:
                raise SessionError("this bundle is not a decoder: it has no sessions")
            if isinstance(event, SessionOpen):
                params = SamplingParams.from_dict(event.sampling)
                granted = grant_max_tokens(event.max_tokens, self.config.max_context)
                opened = self.sessions.open(
                    owner=owner,
                    version=version,
                    sampling=params,
                    make_kv=lambda: hosted.new_kv(granted),
                    now=self.clock(),
                )
                await peer.send(ProtocolConnection.send_opened, rid, opened.session_id, granted)
                return
            if isinstance(event, SessionEnd):
                self.sessions.close(event.session, owner=owner, version=version, now=self.clock())
                await peer.send(ProtocolConnection.send_ended, rid, event.session)
                return
            await self._serve_feed(peer, hosted, event)
        except SessionLost as exc:
            await peer.reply_error(rid, "session_lost", exc.message)
        except (SessionError, SamplingError) as exc:
            await peer.reply_error(rid, "session", exc.message)
        except PayloadError as exc:
            await peer.reply_error(rid, "payload", exc.message)
        except ServerBusy as exc:
            await peer.reply_error(rid, "overloaded", exc.message)
        except ConnectionClosed:
            pass

    async def _serve_feed(self, peer: Peer, hosted: _Hosted, event: SessionFeed) -> None:
        rid = event.request_id
        session = self.sessions.get(
            event.session, owner=peer.public_key, version=hosted.info.version, now=self.clock()
        )
        check_feed(event.kind, event.session, event.pos, length=session.length, busy=session.busy)
        new_tokens = sum(c.n for c in event.chunks)
        session.kv.check_room(new_tokens)
        growth = new_tokens * hosted.kv_bytes_per_token
        if session.kv.nbytes + growth > self.sessions.budget_bytes:
            self.sessions.make_room(session, growth)  # raises: alone over the budget
        if not await self._admit(peer, hosted, rid):
            return
        session.busy = True
        try:
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            token, saved, tail_s = await asyncio.wait_for(
                loop.run_in_executor(self._executor, self._run_feed, hosted, session, event),
                self.config.request_timeout,
            )
            try:  # evict others only for growth that really happened
                self.sessions.make_room(session, 0)
            except BaseException:
                session.kv.arrays, session.kv.length = saved
                raise
            server_ms = (time.perf_counter() - started) * 1e3
            await peer.send(
                ProtocolConnection.send_token,
                rid,
                session.session_id,
                session.length,
                token,
                server_ms,
                self.load(hosted, answering=1),
            )
            self.stats.result(
                hosted.info.version, tail_s=tail_s, total_s=time.perf_counter() - started
            )
        except asyncio.TimeoutError:
            # The worker may still finish and grow the cache: the session is not trustworthy.
            self.sessions.drop(session.session_id)
            await peer.reply_error(rid, "timeout", "the tail did not finish in time")
        except (SessionError, PayloadError, SamplingError, ServerBusy):
            raise
        except EdgeOffloadError as exc:
            await peer.reply_error(rid, "internal", exc.message)
        except Exception:  # an ORT failure must not take the server down
            log.exception("tail failed for session %d", session.session_id)
            self.sessions.drop(session.session_id)
            await peer.reply_error(rid, "internal", "the tail failed on the server")
        finally:
            session.busy = False
            session.last_used = self.clock()
            self._release(hosted)

    def _run_feed(
        self, hosted: _Hosted, session: Session, event: SessionFeed
    ) -> tuple[int, Any, float]:
        """Run the tail over every chunk (all or nothing), then sample the next token; also
        the seconds it took."""
        assert hosted.decoder is not None
        started = time.perf_counter()
        kv = session.kv
        saved = (dict(kv.arrays), kv.length)
        try:
            outputs: dict[str, Any] = {}
            for chunk in event.chunks:
                feed = self._decode(hosted, chunk.tensors)
                outputs = kv.run(hosted.session, feed, chunk.n)
            logits = select_next(outputs[hosted.decoder.logits])
            token = sample_token(logits, session.sampling, kv.length)
            return token, saved, time.perf_counter() - started
        except BaseException:
            kv.arrays, kv.length = saved  # a failed feed leaves the session as it was
            raise

    def _run_tail(
        self, hosted: _Hosted, request: RunRequest
    ) -> tuple[dict[str, np.ndarray], float]:
        """Decode the request's tensors and run the tail; also the seconds it took."""
        started = time.perf_counter()
        outputs = run(hosted.session, self._decode(hosted, request.tensors))
        return outputs, time.perf_counter() - started

    def _decode(
        self, hosted: _Hosted, tensors: Sequence[tuple[str, codec_mod.EncodedTensor]]
    ) -> dict[str, np.ndarray]:
        """The device's crossing tensors, checked against the bundle's declaration, decoded."""
        return decode_checked(
            tensors,
            hosted.bundle.manifest.crossing,
            lambda dtype: codec_mod.codec_for_dtype(hosted.codec, dtype).name,
            max_bytes=self.max_message,
        )
