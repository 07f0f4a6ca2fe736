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
"""

from __future__ import annotations

import asyncio
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
from edgeoffload.device.generate import Generation
from edgeoffload.device.link import ServerLink
from edgeoffload.device.pool import EdgeEndpoint, EdgePool, NoServerAnswered
from edgeoffload.device.runtime import DeviceRuntime
from edgeoffload.errors import OffloadUnavailable, UsageError
from edgeoffload.keys import KeyPair
from edgeoffload.protocol.events import Chunk, TokenResult
from edgeoffload.types import LinkProfile

log = logging.getLogger("edgeoffload.device.client")

# Heads faster than this run on the event loop instead of a worker thread (the hop costs
# ~0.1-0.3 ms; blocking the loop for less than that is harmless).
INLINE_HEAD_MS = 0.5
FALLBACKS = ("local", "error")


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
    ) -> None:
        if fallback not in FALLBACKS:
            raise UsageError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        if (server is None) != (server_key is None):
            raise UsageError("give server and server_key together")
        endpoints = list(servers)
        if server is not None and server_key is not None:
            if endpoints:
                raise UsageError("give either server/server_key or servers, not both")
            endpoints = [EdgeEndpoint(server, server_key)]
        if not endpoints:
            raise UsageError("give an edge server (server and server_key) or several (servers)")
        self.runtime = DeviceRuntime(bundle, threads=threads)
        self.manifest = self.runtime.manifest
        self.fallback = fallback
        self.timeout = timeout
        self.retries = max(0, retries)
        self.last_timing: RequestTiming | None = None
        self._head_ms = float("inf")  # last head time: short heads run on the event loop
        outputs = sum(s.nbytes(self.manifest.dims) or 0 for s in self.manifest.graph_outputs)
        self.pool = EdgePool(
            endpoints,
            identity=identity,
            manifest=self.manifest,
            max_message=max(1 << 20, 4 * outputs + 65536),
            connect_timeout=connect_timeout,
            protocol=protocol,
            clock=clock,
            rng=rng,
        )

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
        await self.pool.close()

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
        try:
            done = await self.pool.run(
                encoded,
                deadline=time.monotonic() + self.timeout,
                max_attempts=1 + self.retries,
            )
        except NoServerAnswered as exc:
            return await self._fall_back(
                crossing, head_ms, codec_ms, started, str(exc), exc.attempts
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
                reason, hint="use fallback='local' to run the tail on the device instead"
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
