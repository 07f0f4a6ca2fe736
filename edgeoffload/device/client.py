"""The device side: run the head, send the crossing tensors encrypted, get the tail's answer.

``OffloadClient`` is asyncio (:class:`~edgeoffload.device.blocking.BlockingOffloadClient`
wraps it for apps without an event loop). It keeps one connection open and reuses it, times
out every step, retry a failed request once on a fresh connection with the same request
id (tails are deterministic functions of their inputs, so a retried request that the server
already ran gives the same answer), and then apply the fallback policy:

* ``fallback="local"`` (default): the device runs the tail itself (the bundle carries it) when
  the server is unreachable, too slow, overloaded or shutting down.
* ``fallback="error"``: raise :class:`~edgeoffload.errors.OffloadUnavailable`.

Authentication failures and version mismatches are never hidden behind a fallback: they mean
the deployment is wrong (or under attack) and raise their typed errors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection as WsConnection
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from edgeoffload.bundle import Bundle
from edgeoffload.core import codec as codec_mod
from edgeoffload.core.noise import DEFAULT_PROTOCOL
from edgeoffload.core.sampling import SamplingParams
from edgeoffload.device.generate import Generation
from edgeoffload.device.runtime import DeviceRuntime
from edgeoffload.errors import (
    AuthenticationFailed,
    EdgeOffloadError,
    OffloadUnavailable,
    Overloaded,
    PayloadError,
    ProtocolError,
    ServerBusy,
    UsageError,
    VersionMismatch,
)
from edgeoffload.keys import KeyPair
from edgeoffload.protocol.connection import CLOSE_AUTH, CLOSE_VERSION, ClientConnection
from edgeoffload.protocol.events import (
    Chunk,
    CloseRequested,
    ErrorReply,
    HandshakeComplete,
    Pong,
    RunResult,
    SessionEnded,
    SessionOpened,
    TokenResult,
)
from edgeoffload.protocol.tensors import decode_checked
from edgeoffload.types import LinkProfile

log = logging.getLogger("edgeoffload.device.client")

# Heads faster than this run on the event loop instead of a worker thread (the hop costs
# ~0.1-0.3 ms; blocking the loop for less than that is harmless).
INLINE_HEAD_MS = 0.5
# websockets' send() waits for its write buffer to drain below this; the 32 KiB default
# adds waits to every large request (measured: 256 KiB round trip 0.87 -> 0.57 ms).
WRITE_LIMIT = 1 << 22

FALLBACKS = ("local", "error")
# Events that answer one pending request by its id.
REPLIES = (RunResult, Pong, SessionOpened, TokenResult, SessionEnded)


@dataclass(frozen=True, kw_only=True)
class RequestTiming:
    """Where one request's time went (milliseconds).

    Offloaded, ``head + encode + network + server + decode`` make up the total. When the tail
    ran on the device instead (``offloaded=False``: the local fallback, or an all-local
    bundle), it is ``head + encode + network + local_tail``, with ``network`` the time lost
    trying the server and ``server`` and ``decode`` zero.
    """

    head_ms: float
    encode_ms: float  # codec encode + encryption on the device
    network_ms: float  # send -> result received, minus the server's own time
    server_ms: float  # tail on the server (decode + run), as the server measured it
    decode_ms: float  # decryption + codec decode of the result on the device
    local_tail_ms: float  # tail on the device (the local fallback)
    total_ms: float
    wire_bytes: int  # request bytes sent (ciphertext) by the request that was answered
    offloaded: bool
    fallback_reason: str = ""  # why the tail ran on the device
    attempts: int = 1  # requests sent to the server, retries included

    @property
    def tail_ms(self) -> float:
        """The tail, wherever it ran (on the server as the server measured it)."""
        return self.server_ms if self.offloaded else self.local_tail_ms

    def to_dict(self) -> dict[str, float | int | bool | str]:
        """A JSON object of the fields, times rounded to 0.1 us."""
        return {
            name: round(value, 4) if isinstance(value, float) else value
            for name, value in dataclasses.asdict(self).items()
        }


class _Link:
    """Live link measurements on the current connection."""

    def __init__(self) -> None:
        self.rtts: list[float] = []
        self.up_bps: float | None = None
        self.down_bps: float | None = None

    def add_rtt(self, ms: float) -> None:
        self.rtts = [*self.rtts[-31:], ms]

    @property
    def rtt_ms(self) -> float | None:
        return statistics.median(self.rtts) if self.rtts else None


class OffloadClient:
    """Offload a bundle's tail to an edge server (asyncio)."""

    def __init__(
        self,
        bundle: Bundle | str | Path,
        *,
        server: str,
        server_key: bytes,
        identity: KeyPair,
        fallback: str = "local",
        timeout: float = 10.0,
        connect_timeout: float = 3.0,
        retries: int = 1,
        protocol: str = DEFAULT_PROTOCOL,
        threads: int = 1,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if fallback not in FALLBACKS:
            raise UsageError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        if not server.startswith(("ws://", "wss://")):
            raise UsageError(f"server must be a ws:// or wss:// URL, got {server!r}")
        if len(server_key) != 32:
            raise UsageError("server_key must be a 32-byte X25519 public key")
        self.runtime = DeviceRuntime(bundle, threads=threads)
        self.manifest = self.runtime.manifest
        self.server = server
        self.server_key = server_key
        self.static = identity
        self.fallback = fallback
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = max(0, retries)
        self.protocol = protocol
        self.clock = clock
        self.link = _Link()
        self.last_timing: RequestTiming | None = None
        self._ids = itertools.count(1)
        self._ws: WsConnection | None = None
        self._conn: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._send_lock = asyncio.Lock()
        self._connect_lock = asyncio.Lock()
        self.server_version: str | None = None
        self._head_ms = float("inf")  # last head time: short heads run on the event loop
        outputs = sum(s.nbytes(self.manifest.dims) or 0 for s in self.manifest.graph_outputs)
        self._max_message = max(1 << 20, 4 * outputs + 65536)

    # -- connection ----------------------------------------------------------------------------

    async def __aenter__(self) -> OffloadClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._conn is not None

    async def connect(self) -> None:
        """Open the connection and run the handshake (no-op when already connected)."""
        async with self._connect_lock:
            if self.connected:
                return
            await self._open()

    async def _open(self) -> None:
        try:
            ws = await asyncio.wait_for(
                connect(
                    self.server,
                    compression=None,
                    max_size=self._max_message,
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
                f"cannot reach {self.server}: {exc or type(exc).__name__}"
            ) from None
        except InvalidURI as exc:
            raise UsageError(f"bad server URL {self.server!r}: {exc}") from None
        conn = ClientConnection(
            static=self.static,
            server_public=self.server_key,
            bundle=self.manifest.identity,
            version=self.manifest.version,
            time_ns=self.clock(),
            protocol=self.protocol,
            max_message=self._max_message,
        )
        conn.start()
        try:
            for data in conn.data_to_send():
                await ws.send(data)
            reply = await asyncio.wait_for(ws.recv(), self.connect_timeout)
            if not isinstance(reply, bytes):
                raise ProtocolError("server sent a text message")
            events = conn.receive(reply)
        except ConnectionClosed as exc:
            await ws.close()
            code = exc.rcvd.code if exc.rcvd else None
            if code == CLOSE_AUTH:
                raise AuthenticationFailed(
                    "the edge server rejected the handshake",
                    hint="check that this device's key is in the server's allow-list and that "
                    "--server-key is the server's public key",
                ) from None
            raise OffloadUnavailable(f"connection closed during the handshake ({code})") from None
        except asyncio.TimeoutError:
            await ws.close()
            raise OffloadUnavailable(
                "the edge server did not answer the handshake in time"
            ) from None
        except AuthenticationFailed:
            await ws.close()
            raise AuthenticationFailed(
                "the edge server's handshake reply failed authentication",
                hint="--server-key must be the public key of the server you connect to",
            ) from None
        except EdgeOffloadError:
            await ws.close(CLOSE_VERSION)
            raise
        event = events[0]
        assert isinstance(event, HandshakeComplete)
        self.server_version = event.version
        self._ws, self._conn = ws, conn
        self._reader = asyncio.create_task(self._read_loop(ws, conn))

    async def _read_loop(self, ws: WsConnection, conn: ClientConnection) -> None:
        error: Exception = OffloadUnavailable("connection to the edge server lost")
        try:
            async for data in ws:
                if not isinstance(data, bytes):
                    raise ProtocolError("server sent a text message")
                received = time.perf_counter()
                for event in conn.receive(data):
                    decrypt_ms = (time.perf_counter() - received) * 1e3
                    if isinstance(
                        event, RunResult | Pong | SessionOpened | TokenResult | SessionEnded
                    ):
                        future = self._pending.pop(event.request_id, None)
                        if future is not None and not future.done():
                            future.set_result((event, received, decrypt_ms))
                    elif isinstance(event, ErrorReply):
                        future = self._pending.pop(event.request_id or -1, None)
                        if future is not None and not future.done():
                            future.set_exception(event.to_exception())
                    elif isinstance(event, CloseRequested):
                        return
        except ConnectionClosed:
            pass
        except (ProtocolError, AuthenticationFailed) as exc:
            log.warning("closing connection: %s", exc)
            error = exc
        finally:
            if self._ws is ws:
                self._ws = self._conn = None
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()
            await ws.close()

    async def _drop(self) -> None:
        """Forget the current connection without waiting on a peer that may be dead."""
        ws, self._ws, self._conn = self._ws, None, None
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if ws is not None:
            try:
                await asyncio.wait_for(ws.close(), 0.5)
            except (asyncio.TimeoutError, ConnectionClosed, OSError):
                ws.transport.abort()  # a stopped peer would hold a graceful close for long

    async def reset_connection(self) -> None:
        """Drop the connection; the next request opens a fresh one."""
        await self._drop()

    async def close(self) -> None:
        if self._ws is not None and self._conn is not None:
            try:
                async with self._send_lock:
                    self._conn.send_close()
                    for data in self._conn.data_to_send():
                        await self._ws.send(data)
            except (ConnectionClosed, ProtocolError):
                pass
        await self._drop()

    # -- requests ------------------------------------------------------------------------------

    async def _send(
        self, build: Callable[[ClientConnection], None], request_id: int
    ) -> tuple[asyncio.Future[Any], float, int, float]:
        """Queue a message, send it; returns (reply future, encrypt ms, bytes sent, send time)."""
        await self.connect()
        assert self._ws is not None and self._conn is not None
        ws, conn = self._ws, self._conn
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
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
                f"connection to the edge server lost while sending ({exc})"
            ) from None
        except BaseException:  # refused before sending (PayloadError, LocalProtocolError)
            self._pending.pop(request_id, None)
            future.cancel()
            raise
        return future, encrypt_ms, sum(len(m) for m in messages), sent_at

    async def ping(self, pad: int = 0) -> float:
        """Round-trip time in ms of an encrypted ping carrying ``pad`` bytes each way."""
        request_id = next(self._ids)
        payload = bytes(pad)
        future, _, _, sent_at = await self._send(
            lambda c: c.send_ping(request_id, payload), request_id
        )
        try:
            _, received, _ = await asyncio.wait_for(future, self.timeout)
        finally:
            self._pending.pop(request_id, None)
        ms: float = (received - sent_at) * 1e3
        if pad == 0:
            self.link.add_rtt(ms)
        return ms

    async def measure_link(self, *, probe_bytes: int = 256 * 1024, rounds: int = 3) -> LinkProfile:
        """RTT from empty pings, throughput from pings that carry ``probe_bytes`` each way."""
        rtts = [await self.ping() for _ in range(rounds)]
        loaded = [await self.ping(probe_bytes) for _ in range(rounds)]
        rtt = statistics.median(rtts)
        extra_s = max(statistics.median(loaded) - rtt, 1e-3) / 1e3
        bps = 2 * probe_bytes * 8 / extra_s  # both directions carried the pad
        self.link.up_bps = self.link.down_bps = bps
        return self.link_profile()

    def link_profile(self) -> LinkProfile:
        """The link as measured on the live connection (for the cost model)."""
        rtt = self.link.rtt_ms
        if rtt is None:
            raise UsageError("no measurement yet: call ping() or measure_link() first")
        up = self.link.up_bps or 1e9
        down = self.link.down_bps or up
        return LinkProfile("measured", up, down, rtt, f"measured on {self.server}")

    async def run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The model's outputs for ``inputs``: head here, tail on the server (or the fallback)."""
        if self.manifest.state:
            raise UsageError(
                f"bundle {self.runtime.bundle.path} is a decoder with a KV cache: run() does "
                "not apply",
                hint="use generate() (or open_session/feed_session) for decoder bundles",
            )
        started = time.perf_counter()
        arrays = self.runtime.check_inputs(inputs)
        if self._head_ms < INLINE_HEAD_MS:  # cheaper than a hop to a worker thread
            crossing = self.runtime.run_head(arrays)
        else:
            crossing = await asyncio.to_thread(self.runtime.run_head, arrays)
        head_ms = (time.perf_counter() - started) * 1e3
        self._head_ms = head_ms
        if self.manifest.tail is None:  # all-local bundle
            self.last_timing = RequestTiming(
                head_ms=head_ms,
                encode_ms=0.0,
                network_ms=0.0,
                server_ms=0.0,
                decode_ms=0.0,
                local_tail_ms=0.0,  # the head is the whole model
                total_ms=head_ms,
                wire_bytes=0,
                offloaded=False,
                fallback_reason="all-local",
            )
            return crossing
        encode_start = time.perf_counter()
        encoded = self.runtime.encode(crossing)
        codec_ms = (time.perf_counter() - encode_start) * 1e3
        request_id = next(self._ids)
        deadline = time.monotonic() + self.timeout
        reason = ""
        attempts = 0
        for attempt in range(1 + self.retries):
            attempts = attempt + 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = "timeout"
                break
            try:
                outputs, timing = await asyncio.wait_for(
                    self._offload(request_id, encoded), remaining
                )
            except (AuthenticationFailed, VersionMismatch, PayloadError):
                raise
            except Overloaded as exc:
                reason = f"overloaded: {exc}"
                break  # retrying an overloaded server makes it worse
            except ServerBusy as exc:
                reason = str(exc)
                continue  # the connection is fine (other requests may be in flight on it)
            except OffloadUnavailable as exc:
                reason = str(exc)
                await self._drop()
                continue
            except asyncio.TimeoutError:
                reason = f"no answer within {self.timeout:g} s"
                await self._drop()
                break
            except ProtocolError as exc:
                reason = f"protocol error: {exc}"
                await self._drop()
                continue
            encrypt_ms, wire, network_ms, server_ms, decode_ms = timing
            total = (time.perf_counter() - started) * 1e3
            self.last_timing = RequestTiming(
                head_ms=head_ms,
                encode_ms=codec_ms + encrypt_ms,
                network_ms=network_ms,
                server_ms=server_ms,
                decode_ms=decode_ms,
                local_tail_ms=0.0,
                total_ms=total,
                wire_bytes=wire,
                offloaded=True,
                attempts=attempts,
            )
            return outputs
        return await self._fall_back(crossing, head_ms, codec_ms, started, reason, attempts)

    async def _offload(
        self, request_id: int, encoded: list[tuple[str, codec_mod.EncodedTensor]]
    ) -> tuple[dict[str, np.ndarray], tuple[float, int, float, float, float]]:
        future, encrypt_ms, wire, sent_at = await self._send(
            lambda c: c.send_run(request_id, encoded), request_id
        )
        try:
            event, received, decrypt_ms = await future
        finally:
            self._pending.pop(request_id, None)  # also when cancelled by the request timeout
        assert isinstance(event, RunResult)
        decode_start = time.perf_counter()
        outputs = decode_checked(
            event.tensors,
            self.manifest.graph_outputs,
            lambda dtype: "none",
            max_bytes=self._max_message,
        )
        decode_ms = decrypt_ms + (time.perf_counter() - decode_start) * 1e3
        network_ms = max(0.0, (received - sent_at) * 1e3 - event.server_ms)
        return outputs, (encrypt_ms, wire, network_ms, event.server_ms, decode_ms)

    # -- generation sessions (decoder bundles) -------------------------------------------------

    async def _session_call(
        self, build: Callable[[ClientConnection], None], request_id: int
    ) -> tuple[Any, int, float]:
        """Send one session message, await its reply: (event, bytes sent, round trip ms)."""
        future, _, wire, sent_at = await self._send(build, request_id)
        try:
            event, received, _ = await asyncio.wait_for(future, self.timeout)
        except asyncio.TimeoutError:
            await self._drop()  # the reply may still come: never mix it up with a later one
            raise OffloadUnavailable(f"no answer within {self.timeout:g} s") from None
        finally:
            self._pending.pop(request_id, None)
        return event, wire, (received - sent_at) * 1e3

    async def open_session(self, sampling: Mapping[str, Any], max_tokens: int) -> tuple[int, int]:
        """Open a generation session on the server: (session id, positions granted)."""
        request_id = next(self._ids)
        event, _, _ = await self._session_call(
            lambda c: c.send_open(request_id, sampling, max_tokens), request_id
        )
        assert isinstance(event, SessionOpened)
        return event.session, event.max_tokens

    async def feed_session(
        self, kind: str, session: int, pos: int, chunks: list[Chunk]
    ) -> tuple[TokenResult, int, float]:
        """A prefill or step: (the sampled token, request bytes, round trip ms)."""
        request_id = next(self._ids)
        event, wire, rtt_ms = await self._session_call(
            lambda c: c.send_feed(request_id, kind, session, pos, chunks), request_id
        )
        assert isinstance(event, TokenResult)
        return event, wire, rtt_ms

    async def end_session(self, session: int) -> None:
        request_id = next(self._ids)
        await self._session_call(lambda c: c.send_end(request_id, session), request_id)

    @property
    def max_request_bytes(self) -> int | None:
        """What the server said it accepts in one message (known once connected)."""
        return self._conn.peer_max_message if self._conn is not None else None

    def generate(
        self,
        prompt: str | None = None,
        *,
        input_ids: list[int] | None = None,
        messages: list[dict[str, str]] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: tuple[str, ...] | list[str] = (),
        chat: bool | None = None,
    ) -> Generation:
        """Stream generated tokens: a :class:`~edgeoffload.device.generate.Generation`, an
        async iterator of :class:`~edgeoffload.device.generate.GeneratedToken` whose ``stats``
        (:class:`~edgeoffload.device.generate.GenerationStats`) describe the reply.

        Give a ``prompt`` (the chat template is applied when the tokenizer has one, unless
        ``chat=False``), ``messages`` (a chat), or ``input_ids``. The head runs here and keeps
        its KV cache; the server keeps the tail's. A lost session (evicted, server restarted,
        connection lost) is rebuilt from this device's own history without changing a token;
        when no server can answer, ``fallback="local"`` finishes the reply on the device.
        """
        return Generation(
            self,
            prompt=prompt,
            input_ids=input_ids,
            messages=messages,
            max_new_tokens=max_new_tokens,
            sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
            stop=tuple(stop),
            chat=chat,
        )

    async def _fall_back(
        self,
        crossing: dict[str, np.ndarray],
        head_ms: float,
        codec_ms: float,
        started: float,
        reason: str,
        attempts: int,
    ) -> dict[str, np.ndarray]:
        if self.fallback == "error":
            raise OffloadUnavailable(
                f"the edge server could not answer ({reason})",
                hint="use fallback='local' to run the tail on the device instead",
            )
        log.info("falling back to local execution: %s", reason)
        tail_start = time.perf_counter()
        outputs = await asyncio.to_thread(self.runtime.run_tail_locally, crossing)
        tail_ms = (time.perf_counter() - tail_start) * 1e3
        total = (time.perf_counter() - started) * 1e3
        self.last_timing = RequestTiming(
            head_ms=head_ms,
            encode_ms=codec_ms,
            network_ms=total - head_ms - codec_ms - tail_ms,  # spent on the failed attempts
            server_ms=0.0,
            decode_ms=0.0,
            local_tail_ms=tail_ms,
            total_ms=total,
            wire_bytes=0,
            offloaded=False,
            fallback_reason=reason,
            attempts=attempts,
        )
        return outputs
