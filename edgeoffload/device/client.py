"""The device side: run the head, send the crossing tensors encrypted, get the tail's answer.

``OffloadClient`` is asyncio (:class:`~edgeoffload.device.blocking.BlockingOffloadClient`
wraps it for apps without an event loop). It keeps a warm authenticated connection to each of
its edge servers (:mod:`edgeoffload.device.link`), sends every request to the one predicted to
answer first and fails over to another with the same request id (:mod:`edgeoffload.device.pool`;
tails are deterministic functions of their inputs, so a retried request that a server already
ran gives the same answer), times out every step, and then applies the fallback policy:

* ``fallback="local"`` (default): the device runs the tail itself (the bundle carries it) when
  no server is reachable, fast enough, or free (overloaded, shutting down).
* ``fallback="error"``: raise :class:`~edgeoffload.errors.OffloadUnavailable`.

Authentication failures and version mismatches are never hidden behind a fallback: when every
server refuses this device's key or bundle, the deployment is wrong (or under attack) and the
typed error is raised. (With several servers, one that fails authentication is backed off and
the others serve; its error is in ``client.links[i].last_error``.)

Head updates (PROTOCOL.md §16, :mod:`edgeoffload.device.updates`), by ``update=``:

* ``"pinned"`` (default): the device runs the bundle it was given; it does not even ask for
  the ``"update"`` feature, so servers see the bytes of a device that knows no updates.
* ``"notify"``: the server's offer of a newer version is recorded
  (``client.update_available``); nothing is downloaded unless the app calls
  :meth:`OffloadClient.update_now`.
* ``"auto"``: the offer is downloaded in the background into ``store`` (verified against
  ``trusted_publishers``), and the client switches at a request boundary: the next ``run()``
  and the next ``generate()`` use the new head and manifest, on new connections that bind the
  new bundle identity and version. A generation already running finishes on the version it
  started with (its runtime and connections stay alive until it ends). A failed download
  leaves the device on its version and is retried with a bounded back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeoffload.bundle import Bundle
from edgeoffload.core.noise import DEFAULT_PROTOCOL
from edgeoffload.core.sampling import SamplingParams
from edgeoffload.device.conversation import DEFAULT_CONTEXT, Conversation
from edgeoffload.device.generate import Generation
from edgeoffload.device.link import ServerLink
from edgeoffload.device.pool import EdgeEndpoint, EdgePool, NoServerAnswered
from edgeoffload.device.runtime import DeviceRuntime
from edgeoffload.device.updates import (
    DEFAULT_CHUNK,
    UPDATE_POLICIES,
    BundleStore,
    Updater,
    check_trust,
    same_interface,
    verify_device_bundle,
)
from edgeoffload.errors import EdgeOffloadError, OffloadUnavailable, UsageError
from edgeoffload.keys import KeyPair
from edgeoffload.manifest import Manifest
from edgeoffload.protocol.events import Chunk, TokenResult
from edgeoffload.protocol.updates import UpdateOffer
from edgeoffload.types import LinkProfile

log = logging.getLogger("edgeoffload.device.client")

# Heads faster than this run on the event loop instead of a worker thread (the hop costs
# ~0.1-0.3 ms; blocking the loop for less than that is harmless).
INLINE_HEAD_MS = 0.5
FALLBACKS = ("local", "error")
UPDATE_RETRY = (1.0, 300.0)  # seconds: first and longest wait after a failed update


class _Version:
    """One bundle version in use: its runtime, its pool, and who still uses them."""

    def __init__(self, runtime: DeviceRuntime, pool: EdgePool) -> None:
        self.runtime = runtime
        self.pool = pool
        self.users = 0  # run() calls and generations in progress on it


class _PinnedChannel:
    """A generation's connection: the version it started on, whatever the client switched
    to since (PROTOCOL.md §16: a running session finishes on its version)."""

    def __init__(self, client: OffloadClient, version: _Version) -> None:
        self._client = client
        self._version = version
        version.users += 1
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._version.users -= 1
            self._client._retire_unused()

    @property
    def runtime(self) -> DeviceRuntime:
        return self._version.runtime

    @property
    def timeout(self) -> float:
        return self._client.timeout

    @property
    def fallback(self) -> str:
        return self._client.fallback

    @property
    def connected(self) -> bool:
        return self._version.pool.connected

    @property
    def max_request_bytes(self) -> int | None:
        return self._version.pool.max_request_bytes

    async def connect(self) -> None:
        await self._version.pool.connect()

    async def open_session(self, sampling: Mapping[str, Any], max_tokens: int) -> tuple[int, int]:
        return await self._version.pool.open_session(
            sampling, max_tokens, timeout=self._client.timeout
        )

    async def feed_session(
        self, kind: str, session: int, pos: int, chunks: list[Chunk]
    ) -> tuple[TokenResult, int, float]:
        return await self._version.pool.feed_session(
            session, kind, pos, chunks, timeout=self._client.timeout
        )

    async def end_session(self, session: int) -> None:
        await self._version.pool.end_session(session, timeout=self._client.timeout)


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
    attempts: int = 1  # servers the request was sent to, failovers included
    server: str = ""  # the server that answered ("" when the tail ran here)
    version: str = ""  # the bundle version the request ran on (it may switch after, §16)

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


class OffloadClient:
    """Offload a bundle's tail to one edge server, or to the best of several (asyncio).

    Give one server with ``server`` and ``server_key``, or several with ``servers`` (each an
    :class:`~edgeoffload.device.pool.EdgeEndpoint`: URL and pinned public key). Every request
    goes to the server predicted to answer first (:mod:`edgeoffload.device.routing`) and fails
    over to another one (same request id, never twice to one server) before the fallback
    policy applies.
    """

    def __init__(
        self,
        bundle: Bundle | str | Path,
        *,
        identity: KeyPair,
        server: str | None = None,
        server_key: bytes | None = None,
        servers: Sequence[EdgeEndpoint] = (),
        fallback: str = "local",
        timeout: float = 10.0,
        connect_timeout: float = 3.0,
        retries: int = 1,
        protocol: str = DEFAULT_PROTOCOL,
        threads: int = 1,
        clock: Callable[[], int] = time.time_ns,
        rng: random.Random | None = None,
        update: str = "pinned",
        store: str | Path | None = None,
        trusted_publishers: Sequence[bytes] | None = None,
        trust_unsigned: bool = False,
        update_check: float = 600.0,
        update_retry: tuple[float, float] = UPDATE_RETRY,
        update_chunk: int = DEFAULT_CHUNK,
    ) -> None:
        """See the class docstring; the update options (``update``, ``store``,
        ``trusted_publishers``, ``trust_unsigned``) are in the module docstring.
        ``update_check``: seconds between ``status`` requests that look for a newer version on
        long-lived connections; ``update_retry``: the first and the longest wait after a
        failed update; ``update_chunk``: bytes per ``fetch``."""
        if fallback not in FALLBACKS:
            raise UsageError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        if update not in UPDATE_POLICIES:
            raise UsageError(f"update must be one of {UPDATE_POLICIES}, got {update!r}")
        if (server is None) != (server_key is None):
            raise UsageError("give server and server_key together")
        endpoints = list(servers)
        if server is not None and server_key is not None:
            if endpoints:
                raise UsageError("give either server/server_key or servers, not both")
            endpoints = [EdgeEndpoint(server, server_key)]
        if not endpoints:
            raise UsageError("give an edge server (server and server_key) or several (servers)")
        self.update_policy = update
        self.store: BundleStore | None = None
        self._updater: Updater | None = None
        if update != "pinned" and store is not None:
            keys = check_trust(trusted_publishers, trust_unsigned)
            self.store = BundleStore(store)
            self._updater = Updater(
                self.store, trusted=keys, trust_unsigned=trust_unsigned, chunk_bytes=update_chunk
            )
        elif update == "auto":
            raise UsageError(
                'update="auto" needs a store folder for the downloaded versions',
                hint="pass store=PATH (and trusted_publishers)",
            )
        self._threads = threads
        runtime = DeviceRuntime(bundle, threads=threads)
        stored = self._stored_bundle(runtime.manifest)
        if stored is not None:
            runtime = DeviceRuntime(stored, threads=threads)
        self.fallback = fallback
        self.timeout = timeout
        self.retries = max(0, retries)
        self.last_timing: RequestTiming | None = None
        self._head_ms = float("inf")  # last head time: short heads run on the event loop
        self._pool_options: dict[str, Any] = {
            "identity": identity,
            "connect_timeout": connect_timeout,
            "protocol": protocol,
            "clock": clock,
            "rng": rng,
            "updates": update != "pinned",
        }
        self._endpoints = endpoints
        self._current = _Version(runtime, self._make_pool(runtime.manifest))
        self._retired: list[_Version] = []
        # Updates (§16): the last failure, and when the next try may start.
        self.update_error: Exception | None = None
        self.update_check = update_check
        self._update_retry = update_retry
        self._update_failures = 0
        self._next_update = 0.0
        self._next_check = time.monotonic() + update_check
        self._update_task: asyncio.Task[None] | None = None
        self._check_task: asyncio.Task[Any] | None = None
        self.switches = 0  # versions switched to since the client was made
        self._update_lock = asyncio.Lock()

    def _make_pool(self, manifest: Manifest) -> EdgePool:
        outputs = sum(s.nbytes(manifest.dims) or 0 for s in manifest.graph_outputs)
        return EdgePool(
            self._endpoints,
            manifest=manifest,
            max_message=max(1 << 20, 4 * outputs + 65536),
            **self._pool_options,
        )

    def _stored_bundle(self, given: Manifest) -> Bundle | None:
        """The store's current version when it can replace ``given`` (a device restarted
        after an update); None to run the bundle the app gave."""
        if self.store is None or self._updater is None:
            return None
        version = self.store.current()
        if version is None or version == given.version:
            return None
        try:
            bundle = verify_device_bundle(
                self.store.path(version),
                self._updater.trusted,
                trust_unsigned=self._updater.trust_unsigned,
            )
        except EdgeOffloadError as exc:
            log.warning("stored version %s is not usable (%s): running %s", version, exc, given)
            return None
        if not same_interface(given, bundle.manifest):
            log.warning("stored version %s is another model: running %s", version, given.version)
            return None
        log.info("running stored version %s instead of %s", version, given.version)
        return bundle

    # -- the version in use ----------------------------------------------------------------------

    @property
    def runtime(self) -> DeviceRuntime:
        """The runtime of the version new requests use."""
        return self._current.runtime

    @property
    def manifest(self) -> Manifest:
        return self._current.runtime.manifest

    @property
    def pool(self) -> EdgePool:
        return self._current.pool

    @property
    def version(self) -> str:
        """The bundle version new requests use."""
        return self.manifest.version

    @property
    def update_available(self) -> UpdateOffer | None:
        """The newest version the servers offer for this device's model (§16.1), None when
        none is newer (``update="pinned"``: always None)."""
        offers = [link.offer for link in self.pool.links.values() if link.offer is not None]
        offers = [o for o in offers if o.version != self.version]
        return max(offers, key=lambda o: o.number, default=None)

    # -- connection ----------------------------------------------------------------------------

    async def __aenter__(self) -> OffloadClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def links(self) -> list[ServerLink]:
        """One per edge server, in the order given."""
        return list(self.pool.links.values())

    @property
    def connected(self) -> bool:
        return self.pool.connected

    @property
    def server_version(self) -> str | None:
        """The bundle version the (first connected) server hosts."""
        return next((link.server_version for link in self.links if link.connected), None)

    async def connect(self) -> None:
        """Connect to every server (fails only if none can be reached)."""
        await self.pool.connect()

    async def reset_connection(self) -> None:
        """Drop every connection; the next request opens fresh ones."""
        await self.pool.reset()

    async def close(self) -> None:
        for task in (self._update_task, self._check_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        versions, self._retired = [self._current, *self._retired], []
        await asyncio.gather(*(v.pool.close() for v in versions))

    def _link(self) -> ServerLink:
        """The only server (link measurement and ping need one)."""
        if len(self.pool.links) != 1:
            raise UsageError("this client has several servers: measure each link (client.links[i])")
        return self.links[0]

    async def ping(self, pad: int = 0) -> float:
        """Round-trip time in ms of an encrypted ping carrying ``pad`` bytes each way."""
        return await self._link().ping(pad, timeout=self.timeout)

    async def measure_link(self, *, probe_bytes: int = 256 * 1024, rounds: int = 3) -> LinkProfile:
        """RTT from empty pings, throughput from pings that carry ``probe_bytes`` each way;
        with several servers, every link is measured and the first one returned."""
        profiles = []
        for link in self.links:
            profile = await link.measure(probe_bytes=probe_bytes, rounds=rounds)
            self.pool.router.measured_link(link.url, profile)
            profiles.append(profile)
        return profiles[0]

    def link_profile(self) -> LinkProfile:
        """The link as measured on the live connection (for the cost model)."""
        return self._link().profile()

    async def run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The model's outputs for ``inputs``: head here, tail on the server (or the fallback)."""
        if self.manifest.state:
            raise UsageError(
                f"bundle {self.runtime.bundle.path} is a decoder with a KV cache: run() does "
                "not apply",
                hint="use generate() (or open_session/feed_session) for decoder bundles",
            )
        self._request_boundary()
        version = self._current  # this request runs on it to the end, whatever comes next
        version.users += 1
        try:
            return await self._run(version, inputs)
        finally:
            version.users -= 1
            self._retire_unused()

    async def _run(self, version: _Version, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        runtime, pool = version.runtime, version.pool
        started = time.perf_counter()
        arrays = runtime.check_inputs(inputs)
        if self._head_ms < INLINE_HEAD_MS:  # cheaper than a hop to a worker thread
            crossing = runtime.run_head(arrays)
        else:
            crossing = await asyncio.to_thread(runtime.run_head, arrays)
        head_ms = (time.perf_counter() - started) * 1e3
        self._head_ms = head_ms
        if runtime.manifest.tail is None:  # all-local bundle
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
                version=runtime.manifest.version,
            )
            return crossing
        encode_start = time.perf_counter()
        encoded = runtime.encode(crossing)
        codec_ms = (time.perf_counter() - encode_start) * 1e3
        try:
            done = await pool.run(
                encoded,
                deadline=time.monotonic() + self.timeout,
                max_attempts=1 + self.retries,
            )
        except NoServerAnswered as exc:
            return await self._fall_back(
                runtime, crossing, head_ms, codec_ms, started, str(exc), exc.attempts
            )
        self.last_timing = RequestTiming(
            head_ms=head_ms,
            encode_ms=codec_ms + done.encrypt_ms,
            network_ms=done.network_ms,
            server_ms=done.server_ms,
            decode_ms=done.decode_ms,
            local_tail_ms=0.0,
            total_ms=(time.perf_counter() - started) * 1e3,
            wire_bytes=done.wire_bytes,
            offloaded=True,
            attempts=done.attempts,
            server=done.server,
            version=runtime.manifest.version,
        )
        return done.outputs

    # -- generation sessions (decoder bundles) -------------------------------------------------

    async def open_session(self, sampling: Mapping[str, Any], max_tokens: int) -> tuple[int, int]:
        """Open a generation session on the best server: (session handle, positions granted)."""
        return await self.pool.open_session(sampling, max_tokens, timeout=self.timeout)

    async def feed_session(
        self, kind: str, session: int, pos: int, chunks: list[Chunk]
    ) -> tuple[TokenResult, int, float]:
        """A prefill or step: (the sampled token, request bytes, round trip ms)."""
        return await self.pool.feed_session(session, kind, pos, chunks, timeout=self.timeout)

    async def end_session(self, session: int) -> None:
        await self.pool.end_session(session, timeout=self.timeout)

    @property
    def max_request_bytes(self) -> int | None:
        """What the servers accept in one message (the smallest; known once connected)."""
        return self.pool.max_request_bytes

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
        self._request_boundary()
        channel = _PinnedChannel(self, self._current)  # it finishes on this version
        return Generation(
            channel,
            on_finish=channel.release,
            prompt=prompt,
            input_ids=input_ids,
            messages=messages,
            max_new_tokens=max_new_tokens,
            sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
            stop=tuple(stop),
            chat=chat,
        )

    def conversation(
        self,
        *,
        system: str | None = None,
        max_context: int = DEFAULT_CONTEXT,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> Conversation:
        """A multi-turn chat (:class:`~edgeoffload.device.conversation.Conversation`) whose
        KV caches, here and on the server, live from turn to turn: ``conversation.say(text)``
        streams a reply and prefills only the new turn's tokens; the replies are those of a
        full re-prefill of the conversation. ``max_context`` positions are asked of the
        server once, for the whole conversation."""
        self._request_boundary()
        channel = _PinnedChannel(self, self._current)  # the conversation stays on this version
        return Conversation(
            channel,
            system=system,
            max_context=max_context,
            sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
            on_close=channel.release,
        )

    async def _fall_back(
        self,
        runtime: DeviceRuntime,
        crossing: dict[str, np.ndarray],
        head_ms: float,
        codec_ms: float,
        started: float,
        reason: str,
        attempts: int,
    ) -> dict[str, np.ndarray]:
        if self.fallback == "error":
            raise OffloadUnavailable(
                reason, hint="use fallback='local' to run the tail on the device instead"
            )
        if not runtime.has_tail:  # an updated device bundle: the tail is the server's (§16)
            raise OffloadUnavailable(
                f"{reason}; this version's tail is not on the device",
                hint="a device bundle installed by an update has no local fallback",
            )
        log.info("falling back to local execution: %s", reason)
        tail_start = time.perf_counter()
        outputs = await asyncio.to_thread(runtime.run_tail_locally, crossing)
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
            version=runtime.manifest.version,
        )
        return outputs

    # -- head updates (PROTOCOL.md §16) ----------------------------------------------------------

    def _retire_unused(self) -> None:
        """Close the connections of versions switched away from that nobody uses any more."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # e.g. a generation collected after its loop closed
            return
        for old in [v for v in self._retired if v.users <= 0]:
            self._retired.remove(old)
            task = loop.create_task(old.pool.close())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _request_boundary(self) -> None:
        """Before a request: start a download of the offered version (``auto``) or a check
        for a newer one, in the background; neither delays the request."""
        if self.update_policy == "pinned":
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        now = time.monotonic()
        if self.update_policy == "auto" and self.update_available is not None:
            idle = self._update_task is None or self._update_task.done()
            if idle and now >= self._next_update:
                self._update_task = asyncio.create_task(self._update_in_background())
        if now >= self._next_check and (self._check_task is None or self._check_task.done()):
            self._next_check = now + self.update_check
            self._check_task = asyncio.create_task(self.check_updates())

    async def check_updates(self) -> UpdateOffer | None:
        """Ask every connected server for its status (§14.3), which carries its newest
        version of this model (§16.1); the newest offer."""
        for link in list(self.pool.links.values()):
            if link.connected:
                with contextlib.suppress(EdgeOffloadError):
                    await link.status(timeout=self.timeout)
        return self.update_available

    async def _update_in_background(self) -> None:
        try:
            await self.update_now()
        except EdgeOffloadError:
            pass  # recorded in update_error; retried after the back-off
        except Exception:  # never let a background download take the client down
            log.exception("update failed")

    async def update_now(self) -> str | None:
        """Download and verify the offered version now, and switch to it: requests (and
        generations) that started before go on with the old version, later ones use the new
        one. The version switched to, or None when nothing is offered.

        Raises what the download raised (UpdateError, SignatureError, OffloadUnavailable...);
        the device stays on its version and the failure is in ``update_error``.
        """
        if self._updater is None:
            raise UsageError(
                "this client does not install updates",
                hint='create it with update="notify" or "auto", a store and trusted_publishers',
            )
        async with self._update_lock:  # one download at a time (auto and the app)
            return await self._update_locked()

    async def _update_locked(self) -> str | None:
        assert self._updater is not None
        offer = self.update_available
        if offer is None:
            return None
        link = next(lk for lk in self.pool.links.values() if lk.offer == offer)

        async def fetch(version: str, file: str, offset: int, length: int) -> tuple[bytes, int]:
            return await link.fetch(version, file, offset, length, timeout=self.timeout)

        try:
            bundle = await self._updater.download(fetch, offer, self.runtime.bundle)
        except Exception as exc:
            self.update_error = exc
            self._update_failures += 1
            first, longest = self._update_retry
            wait = min(longest, first * 2 ** (self._update_failures - 1))
            self._next_update = time.monotonic() + wait * random.uniform(0.5, 1.0)
            log.warning("update to %s failed (%s): next try in %.3g s", offer.version, exc, wait)
            raise
        self.update_error = None
        self._update_failures = 0
        await self._switch(bundle)
        return offer.version

    async def _switch(self, bundle: Bundle) -> None:
        """Make ``bundle`` the version of new requests; the old one lives on while used."""
        runtime = await asyncio.to_thread(DeviceRuntime, bundle, threads=self._threads)
        old, self._current = self._current, _Version(runtime, self._make_pool(runtime.manifest))
        self._retired.append(old)
        self.switches += 1
        previous = old.runtime.manifest.version
        if self.store is not None:
            self.store.set_current(runtime.manifest.version)
            removed = self.store.cleanup(keep=[runtime.manifest.version, previous])
            if removed:
                log.info("removed old versions %s", ", ".join(removed))
        log.info("switched from version %s to %s", previous, runtime.manifest.version)
        self._retire_unused()
