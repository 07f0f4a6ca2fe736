"""The device client for apps without an event loop: every call blocks until it is done.

:class:`BlockingOffloadClient` runs an :class:`~edgeoffload.device.client.OffloadClient` on a
private event loop in a daemon thread and waits for each call; :class:`BlockingGeneration` is
its streamed reply, a plain iterator.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Generator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from edgeoffload.bundle import Bundle
from edgeoffload.core.noise import DEFAULT_PROTOCOL
from edgeoffload.device.client import OffloadClient, RequestTiming
from edgeoffload.device.generate import GeneratedToken, Generation, GenerationStats
from edgeoffload.device.pool import EdgeEndpoint
from edgeoffload.keys import KeyPair
from edgeoffload.protocol.updates import UpdateOffer
from edgeoffload.types import LinkProfile

T = TypeVar("T")


class BlockingOffloadClient:
    """:class:`OffloadClient` for apps with no event loop (the same arguments and behaviour)."""

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
        update: str = "pinned",
        store: str | Path | None = None,
        trusted_publishers: Sequence[bytes] | None = None,
        trust_unsigned: bool = False,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="edgeoffload-client"
        )
        self._thread.start()

        async def make() -> OffloadClient:  # on the loop: the client's locks belong to it
            return OffloadClient(
                bundle,
                server=server,
                server_key=server_key,
                servers=servers,
                identity=identity,
                fallback=fallback,
                timeout=timeout,
                connect_timeout=connect_timeout,
                retries=retries,
                protocol=protocol,
                threads=threads,
                clock=clock,
                update=update,
                store=store,
                trusted_publishers=trusted_publishers,
                trust_unsigned=trust_unsigned,
            )

        try:
            self._client = self._call(make())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def last_timing(self) -> RequestTiming | None:
        """Where the last :meth:`run`'s time went."""
        return self._client.last_timing

    def connect(self) -> None:
        self._call(self._client.connect())

    @property
    def version(self) -> str:
        """The bundle version new requests use (PROTOCOL.md §16)."""
        return self._client.version

    @property
    def update_available(self) -> UpdateOffer | None:
        """:attr:`OffloadClient.update_available`."""
        return self._client.update_available

    def update_now(self) -> str | None:
        """:meth:`OffloadClient.update_now`."""
        return self._call(self._client.update_now())

    def run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """:meth:`OffloadClient.run`."""
        return self._call(self._client.run(inputs))

    def ping(self, pad: int = 0) -> float:
        """:meth:`OffloadClient.ping`."""
        return self._call(self._client.ping(pad))

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
    ) -> BlockingGeneration:
        """:meth:`OffloadClient.generate` as a plain iterator (each step blocks)."""

        async def make() -> Generation:
            return self._client.generate(
                prompt,
                input_ids=input_ids,
                messages=messages,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                stop=stop,
                chat=chat,
            )

        return BlockingGeneration(self._call(make()), self._call)

    def measure_link(self, *, probe_bytes: int = 256 * 1024, rounds: int = 3) -> LinkProfile:
        """:meth:`OffloadClient.measure_link`."""
        return self._call(self._client.measure_link(probe_bytes=probe_bytes, rounds=rounds))

    def close(self) -> None:
        """Close the connection and stop the client's thread (idempotent)."""
        if self._loop.is_closed():
            return
        try:
            self._call(self._client.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> BlockingOffloadClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlockingGeneration:
    """A :class:`~edgeoffload.device.generate.Generation` as a plain iterator of tokens.

    ``stats`` fill in as the reply streams. Leaving early: :meth:`close` (or ``with``) ends
    the server's session.
    """

    def __init__(self, stream: Generation, call: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
        self._stream = stream
        self._call = call
        # A generator, so that dropping an unfinished iteration still closes the stream.
        self._tokens = self._iterate()

    @property
    def stats(self) -> GenerationStats:
        return self._stream.stats

    def __iter__(self) -> BlockingGeneration:
        return self

    def __next__(self) -> GeneratedToken:
        return next(self._tokens)

    def close(self) -> None:
        self._tokens.close()

    def __enter__(self) -> BlockingGeneration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _iterate(self) -> Generator[GeneratedToken, None, None]:
        try:
            while True:
                try:
                    token: GeneratedToken = self._call(self._stream.__anext__())
                except StopAsyncIteration:
                    return
                yield token
        finally:
            self._call(self._stream.aclose())
