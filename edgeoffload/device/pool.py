"""The device's edge servers: one warm link each, a router choosing per request, failover.

:class:`EdgePool` holds a :class:`~edgeoffload.device.link.ServerLink` per server (each with
its pinned public key) and a :class:`~edgeoffload.device.routing.Router`. For every request
it asks the router for the server predicted to answer first, sends it there and feeds what
came back (network and tail times, the server's load report) into the router. When that
server fails — unreachable, connection lost, timed out, ``overloaded``, draining, or lying
(wrong key, malformed load report, a reply to a request it was not asked) — it is backed off
and the request goes, with the same id, to a server it has not tried: never twice to one
server — except a server that was only full: ``overloaded`` with a retry-after means the
request did not run, so once every server has been tried it is sent again to the one that
asked to be retried soonest, after that wait (jittered, doubling), while the deadline
allows. A server backed off is probed in the background about once a second, so a
restarted server is back in rotation within a second or two of answering again.

Nothing is hidden: when no server answers, :meth:`EdgePool.run` raises
:class:`NoServerAnswered` with every server's reason, and the caller applies its fallback
policy; when every server refused this device's key or bundle, the deployment is wrong and
that error is raised instead. Generation sessions live on one server each; the pool maps its
own session handles to (server, server session id), so a session rebuilt elsewhere after a
failure (:mod:`edgeoffload.device.generate`) gets a new handle and nothing mixes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeoffload.core import codec as codec_mod
from edgeoffload.core.noise import DEFAULT_PROTOCOL
from edgeoffload.device.link import ServerLink
from edgeoffload.device.routing import Router
from edgeoffload.errors import (
    AuthenticationFailed,
    LocalProtocolError,
    OffloadUnavailable,
    Overloaded,
    PayloadError,
    ProtocolError,
    RemoteProtocolError,
    ServerBusy,
    SessionError,
    SessionLost,
    UsageError,
    VersionMismatch,
)
from edgeoffload.keys import KeyPair
from edgeoffload.manifest import Manifest
from edgeoffload.protocol.events import Chunk, RunResult, TokenResult
from edgeoffload.protocol.tensors import decode_checked

log = logging.getLogger("edgeoffload.device.pool")

PROBE_INTERVAL_S = 1.0  # how often a backed-off server is probed
PROBE_TIMEOUT_S = 2.0
MAX_OVERLOADED_WAITS = 64  # retries of one request after "overloaded" (the deadline bounds them)
OVERLOADED_MARGIN_S = 0.05  # a retry needs at least this long left before the deadline
# A failure quicker than this was a refusal or a refused connection, not a hang: the server
# may still be tried when every server is backed off (Router.choose).
FAST_FAILURE_S = 0.25


@dataclass(frozen=True)
class EdgeEndpoint:
    """An edge server this device may use: its websocket URL and its pinned public key."""

    url: str
    key: bytes


@dataclass(frozen=True)
class Offloaded:
    """One request answered by a server, with where its time went (ms)."""

    outputs: dict[str, np.ndarray]
    server: str
    encrypt_ms: float
    wire_bytes: int
    network_ms: float
    server_ms: float
    decode_ms: float
    attempts: int


class NoServerAnswered(OffloadUnavailable):
    """Every server the request could go to failed, or none was available."""

    def __init__(self, reasons: Sequence[tuple[str, Exception]], attempts: int) -> None:
        detail = "; ".join(f"{url}: {exc}" for url, exc in reasons) or "all servers backed off"
        super().__init__(f"no edge server answered ({detail})")
        self.reasons = list(reasons)
        self.attempts = attempts


class EdgePool:
    """Several edge servers for one bundle (see the module docstring)."""

    def __init__(
        self,
        endpoints: Sequence[EdgeEndpoint],
        *,
        identity: KeyPair,
        manifest: Manifest,
        max_message: int,
        connect_timeout: float = 3.0,
        protocol: str = DEFAULT_PROTOCOL,
        clock: Callable[[], int] = time.time_ns,
        rng: random.Random | None = None,
        updates: bool = False,
    ) -> None:
        urls = [e.url for e in endpoints]
        if not urls or len(set(urls)) != len(urls):
            raise UsageError("give at least one edge server, each URL once")
        self.manifest = manifest
        self.max_message = max_message
        self.ids = itertools.count(1)  # one id space for every server: retries keep their id
        self.links = {
            e.url: ServerLink(
                e.url,
                e.key,
                identity=identity,
                manifest=manifest,
                max_message=max_message,
                connect_timeout=connect_timeout,
                protocol=protocol,
                clock=clock,
                ids=self.ids,
                updates=updates,
            )
            for e in endpoints
        }
        self.router = Router(urls, rng=rng or random.Random())
        self.now: Callable[[], float] = time.monotonic
        self._sessions: dict[int, tuple[str, int]] = {}
        self._session_handles = itertools.count(1)
        self._next_probe: dict[str, float] = {}
        self._probes: set[asyncio.Task[None]] = set()

    # -- connections ---------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open a connection to every server at once; fails only when none can be opened
        (raising what the first server said, an authentication error before any other)."""
        since = self.now()
        results = await asyncio.gather(
            *(link.connect() for link in self.links.values()), return_exceptions=True
        )
        errors: list[tuple[str, Exception]] = []
        for url, result in zip(self.links, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                self._failed(url, result, since=since)
                errors.append((url, result))
        if len(errors) == len(self.links):
            raise _deployment_error(errors) or errors[0][1]

    @property
    def connected(self) -> bool:
        return any(link.connected for link in self.links.values())

    @property
    def max_request_bytes(self) -> int | None:
        """The smallest message limit of the connected servers (None before any)."""
        limits = [link.max_request_bytes for link in self.links.values()]
        known = [limit for limit in limits if limit is not None]
        return min(known) if known else None

    async def close(self) -> None:
        for task in list(self._probes):
            task.cancel()
        await asyncio.gather(*self._probes, return_exceptions=True)
        await asyncio.gather(*(link.close() for link in self.links.values()))

    async def reset(self) -> None:
        """Drop every connection; the next request opens fresh ones."""
        await asyncio.gather(*(link.drop() for link in self.links.values()))

    def _failed(self, url: str, exc: Exception, *, since: float | None = None) -> None:
        """Back ``url`` off; ``since``: when the failed attempt started (now() time)."""
        now = self.now()
        self.links[url].last_error = str(exc)
        fast = since is not None and now - since < FAST_FAILURE_S
        self.router.failed(url, now=now, fast=fast)
        self._next_probe[url] = self.now() + PROBE_INTERVAL_S

    def _probe_due(self) -> None:
        """Start a probe of every backed-off server whose probe time has come."""
        now = self.now()
        for url in self.router.backed_off(now=now):
            if self._next_probe.get(url, 0.0) > now:
                continue
            self._next_probe[url] = now + PROBE_INTERVAL_S
            task = asyncio.create_task(self._probe(url))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)

    async def _probe(self, url: str) -> None:
        link = self.links[url]
        try:
            await asyncio.wait_for(link.ping(timeout=PROBE_TIMEOUT_S), PROBE_TIMEOUT_S)
        except (OffloadUnavailable, ProtocolError, asyncio.TimeoutError) as exc:
            link.last_error = str(exc)
            await link.drop()
            return
        log.info("%s answers again: back in rotation", url)
        self.router.recovered(url)

    # -- one-shot requests ---------------------------------------------------------------------

    async def run(
        self,
        encoded: Sequence[tuple[str, codec_mod.EncodedTensor]],
        *,
        deadline: float,
        max_attempts: int,
    ) -> Offloaded:
        """Run the tail on ``encoded`` on the best server, failing over (see the module
        docstring); ``deadline`` is a ``time.monotonic()`` value."""
        request_id = next(self.ids)
        nbytes = sum(t.wire_bytes for _, t in encoded)
        tried: list[str] = []
        reasons: list[tuple[str, Exception]] = []
        attempts = 0
        busy: dict[str, float] = {}  # servers that said "overloaded": their retry-after (s)
        waits = 0
        retry: str | None = None
        while True:
            self._probe_due()
            url = None
            if retry is not None:
                url, retry = retry, None
            elif len(tried) < max_attempts:
                url = self.router.choose(nbytes, now=self.now(), exclude=tried)
            if url is None:
                # Every server tried: the one that was only full and said when to come back
                # soonest gets the request again after that (jittered), while the deadline
                # allows.
                pause = self._retry_pause(busy, waits, deadline)
                if pause is None:
                    break
                await asyncio.sleep(pause)
                waits += 1
                retry = min(busy, key=lambda u: busy[u])
                busy.clear()
                continue
            if url not in tried:
                tried.append(url)
            attempts += 1
            remaining = deadline - self.now()
            if remaining <= 0:
                reasons.append((url, OffloadUnavailable("the request's deadline passed")))
                break
            self.router.started(url)
            since = self.now()
            try:
                result = await asyncio.wait_for(
                    self._attempt(self.links[url], request_id, encoded), remaining
                )
            except (PayloadError, SessionError, LocalProtocolError):
                # Our request was refused for what it is: no other server would take it.
                self.router.cancelled(url)
                raise
            except asyncio.TimeoutError:
                await self.links[url].drop()  # the answer may still come: not on this socket
                exc = OffloadUnavailable(f"no answer within the {remaining:.3g} s left")
                self._failed(url, exc)
                reasons.append((url, exc))
                break
            except (OffloadUnavailable, ProtocolError, VersionMismatch) as exc:
                if isinstance(exc, ProtocolError | VersionMismatch):
                    log.warning("edge server %s: %s", url, exc)
                if not isinstance(exc, ServerBusy):
                    await self.links[url].drop()
                if isinstance(exc, Overloaded) and exc.retry_after is not None:
                    busy[url] = exc.retry_after
                self._failed(url, exc, since=since)
                reasons.append((url, exc))
                continue
            self.router.succeeded(url, network_ms=result.network_ms, server_ms=result.server_ms)
            load = self.links[url].last_load
            if load is not None:
                self.router.reported(url, load)
            return dataclasses.replace(result, attempts=attempts)
        deployment = _deployment_error(reasons)
        if deployment is not None and len(reasons) == len(self.links):
            raise deployment
        raise NoServerAnswered(reasons, attempts)

    def _retry_pause(self, busy: Mapping[str, float], waits: int, deadline: float) -> float | None:
        """Seconds to wait before retrying the servers that answered ``overloaded``: their
        shortest retry-after, doubled per earlier wait (at most 8-fold), times a random factor
        in [0.5, 1.5] (so refused devices do not come back in step); None when there is
        nothing to retry or the pause would not leave room before ``deadline``."""
        if not busy or waits >= MAX_OVERLOADED_WAITS:
            return None
        pause = min(busy.values()) * float(2 ** min(waits, 3)) * random.uniform(0.5, 1.5)
        if self.now() + pause >= deadline - OVERLOADED_MARGIN_S:
            return None
        return pause

    async def _attempt(
        self,
        link: ServerLink,
        request_id: int,
        encoded: Sequence[tuple[str, codec_mod.EncodedTensor]],
    ) -> Offloaded:
        """One server's try. A connection that turns out dead when reused (the server
        restarted, or closed it as idle) is reopened once: the request never reached a live
        server on it, so this is not a second attempt."""
        for fresh in (False, True):
            sent = await link.send(lambda c: c.send_run(request_id, encoded), request_id, RunResult)
            try:
                answer = await sent.future
                break
            except ServerBusy:
                raise
            except OffloadUnavailable:
                await link.drop()
                if fresh or not sent.reused:
                    raise
            finally:
                link.forget(request_id)
        event = answer.event
        assert isinstance(event, RunResult)
        decode_start = time.perf_counter()
        try:
            outputs = decode_checked(
                event.tensors,
                self.manifest.graph_outputs,
                lambda dtype: "none",
                max_bytes=self.max_message,
                allow_empty=True,  # a model's output may be empty (no detections)
            )
        except PayloadError as exc:  # the server's answer, not our request, is malformed
            raise RemoteProtocolError(f"{link.url} returned {exc.message}") from None
        decode_ms = answer.decrypt_ms + (time.perf_counter() - decode_start) * 1e3
        return Offloaded(
            outputs=outputs,
            server=link.url,
            encrypt_ms=sent.encrypt_ms,
            wire_bytes=sent.wire_bytes,
            network_ms=max(0.0, (answer.received - sent.sent_at) * 1e3 - event.server_ms),
            server_ms=event.server_ms,
            decode_ms=decode_ms,
            attempts=1,
        )

    # -- generation sessions -------------------------------------------------------------------

    async def open_session(
        self, sampling: Mapping[str, Any], max_tokens: int, *, timeout: float
    ) -> tuple[int, int]:
        """Open a session on the best server that answers: (pool handle, positions granted)."""
        tried: list[str] = []
        reasons: list[tuple[str, Exception]] = []
        self._probe_due()
        while (url := self.router.choose(0, now=self.now(), exclude=tried)) is not None:
            tried.append(url)
            since = self.now()
            try:
                session, granted = await self.links[url].open_session(
                    sampling, max_tokens, timeout=timeout
                )
            except (SessionError, PayloadError, LocalProtocolError):
                raise  # the request itself (e.g. its sampling settings) was refused
            except (OffloadUnavailable, ProtocolError, VersionMismatch) as exc:
                await self._session_failed(url, exc, since)
                reasons.append((url, exc))
                continue
            handle = next(self._session_handles)
            self._sessions[handle] = (url, session)
            return handle, granted
        deployment = _deployment_error(reasons)
        if deployment is not None and len(reasons) == len(self.links):
            raise deployment
        raise NoServerAnswered(reasons, len(tried))

    def session_server(self, handle: int) -> str:
        """The server holding the session ``handle`` (SessionLost once it is gone)."""
        entry = self._sessions.get(handle)
        if entry is None:
            raise SessionLost(f"session {handle} is not open on any server")
        return entry[0]

    async def feed_session(
        self, handle: int, kind: str, pos: int, chunks: list[Chunk], *, timeout: float
    ) -> tuple[TokenResult, int, float]:
        """A prefill or step on the session's server: (token, request bytes, round trip ms)."""
        url = self.session_server(handle)
        _, session = self._sessions[handle]
        link = self.links[url]
        self.router.started(url)
        since = self.now()
        try:
            event, wire, rtt_ms = await link.feed_session(
                kind, session, pos, chunks, timeout=timeout
            )
        except SessionLost:
            self.router.cancelled(url)
            self._sessions.pop(handle, None)
            raise
        except (SessionError, PayloadError, LocalProtocolError):
            self.router.cancelled(url)  # this feed was refused; the session is as it was
            raise
        except (OffloadUnavailable, ProtocolError) as exc:
            await self._session_failed(url, exc, since)
            self._sessions.pop(handle, None)
            raise
        except BaseException:
            self.router.cancelled(url)
            raise
        self.router.succeeded(
            url, network_ms=max(0.0, rtt_ms - event.server_ms), server_ms=event.server_ms
        )
        if event.load is not None:
            self.router.reported(url, event.load)
        return event, wire, rtt_ms

    async def end_session(self, handle: int, *, timeout: float) -> None:
        entry = self._sessions.pop(handle, None)
        if entry is None:
            return
        url, session = entry
        await self.links[url].end_session(session, timeout=timeout)

    async def _session_failed(self, url: str, exc: Exception, since: float) -> None:
        """A session call failed on ``url``: drop the link unless the server only said it
        is busy, and back the server off so a rebuilt session goes elsewhere."""
        if isinstance(exc, ProtocolError | VersionMismatch):
            log.warning("edge server %s: %s", url, exc)
        if not isinstance(exc, ServerBusy):
            await self.links[url].drop()
        self._failed(url, exc, since=since)


def _deployment_error(reasons: Sequence[tuple[str, Exception]]) -> Exception | None:
    """When every reason is a refused key or bundle, the first of them (a wrong deployment
    is never hidden behind a fallback)."""
    if reasons and all(isinstance(e, AuthenticationFailed | VersionMismatch) for _, e in reasons):
        return reasons[0][1]
    return None
