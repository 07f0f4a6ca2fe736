"""What a generation needs from its connection to the edge server.

:class:`~edgeoffload.device.generate.Generation` is typed against :class:`SessionChannel`, not
against :class:`~edgeoffload.device.client.OffloadClient` (which implements it), so that the
generation logic does not depend on the websocket client and the client can build generations
without an import cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from edgeoffload.device.runtime import DeviceRuntime
from edgeoffload.protocol.events import Chunk, TokenResult


class SessionChannel(Protocol):
    """A connection that hosts generation sessions on the server (see OffloadClient)."""

    @property
    def runtime(self) -> DeviceRuntime:
        """The device's half of the bundle: head, codec, local tail."""
        ...

    @property
    def timeout(self) -> float:
        """Seconds a request may take; also the time allowed to rebuild a lost session."""
        ...

    @property
    def fallback(self) -> str:
        """``"local"`` (finish replies on the device) or ``"error"``."""
        ...

    @property
    def connected(self) -> bool: ...

    @property
    def max_request_bytes(self) -> int | None:
        """What the server accepts in one message (None until connected)."""
        ...

    async def connect(self) -> None: ...

    async def open_session(self, sampling: Mapping[str, Any], max_tokens: int) -> tuple[int, int]:
        """Open a session on a server that answers: (session handle, positions granted).

        A failed session call drops its connection and backs its server off, so the next
        open (the generation rebuilding its session) goes to another server, or to the same
        one once it answers again."""
        ...

    async def feed_session(
        self, kind: str, session: int, pos: int, chunks: list[Chunk]
    ) -> tuple[TokenResult, int, float]:
        """A prefill or step: (the sampled token, request bytes, round trip ms)."""
        ...

    async def end_session(self, session: int) -> None: ...
