"""One device connection on the edge server: its websocket, protocol state and tasks.

A :class:`Peer` owns the websocket, the sans-I/O :class:`ServerConnection`, the lock that keeps
each queued message and its bytes together on the socket, and the tasks serving the device's
requests. Every message goes out through :meth:`Peer.send`, e.g.
``await peer.send(ServerConnection.send_pong, request_id, pad)``, so requests answered
concurrently never interleave their frames. The server decides what to answer; the peer only
carries it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec

from websockets.asyncio.server import ServerConnection as WebSocket
from websockets.exceptions import ConnectionClosed

from edgeoffload.protocol.connection import CLOSE_PROTOCOL, ServerConnection
from edgeoffload.protocol.events import Event

Args = ParamSpec("Args")

# Answered request ids a connection remembers (one result per id); ids not above the largest
# one forgotten are refused too. Small: a few KiB per connection, and devices use increasing
# ids with a handful in flight (PROTOCOL.md §7).
ANSWERED_IDS = 64


class Peer:
    """The websocket and protocol connection of one device.

    Args:
        ws: the accepted websocket.
        connection: the protocol state machine for it.
        count_error: called with the code of every error reply (the server's statistics).
    """

    def __init__(
        self, ws: WebSocket, connection: ServerConnection, count_error: Callable[[str], None]
    ) -> None:
        self.ws = ws
        self.connection = connection
        self._count_error = count_error
        self._send_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.generation = -1  # the allow-list generation this key was last checked against
        self._running_ids: set[int] = set()
        self._answered_ids: OrderedDict[int, None] = OrderedDict()
        self._floor = 0  # ids below it were answered, or are older than the window

    def claim(self, request_id: int) -> bool:
        """Start serving ``request_id``; False when it is already being served, was answered
        with a result (one result per id; a retry after an error is fine) or is not above
        the largest answered id the connection has forgotten."""
        if (
            request_id < self._floor
            or request_id in self._running_ids
            or request_id in self._answered_ids
        ):
            return False
        self._running_ids.add(request_id)
        return True

    def settle(self, request_id: int, *, answered: bool) -> None:
        """``request_id`` is done; ``answered``: with a result (then remembered, bounded)."""
        self._running_ids.discard(request_id)
        if answered:
            self._answered_ids[request_id] = None
            if len(self._answered_ids) > ANSWERED_IDS:
                forgotten, _ = self._answered_ids.popitem(last=False)
                self._floor = max(self._floor, forgotten + 1)

    @property
    def public_key(self) -> bytes:
        """The device's static key (empty before the handshake)."""
        return self.connection.peer_public or b""

    async def handshake(self, timeout: float) -> Event | None:
        """Read handshake message 1 and send the connection's answer to it.

        The event is HandshakeComplete, or ErrorReply for a bundle this server does not host;
        None when the device sent text (the websocket is then closed).
        """
        events = await self.receive(timeout)
        if events is None:
            return None
        async with self._send_lock:
            await self._flush()  # message 2, or the refusal
        return events[0]

    async def receive(self, timeout: float) -> list[Event] | None:
        """The events of the device's next message; None when it sent text (then closed)."""
        data = await asyncio.wait_for(self.ws.recv(), timeout)
        if not isinstance(data, bytes):
            await self.ws.close(CLOSE_PROTOCOL, "binary messages only")
            return None
        return self.connection.receive(data)

    async def send(
        self,
        queue: Callable[Concatenate[ServerConnection, Args], None],
        *args: Args.args,
        **kwargs: Args.kwargs,
    ) -> None:
        """Queue a message with ``queue(connection, *args)`` (a ``ServerConnection.send_*``
        method) and send its bytes, all before any other message's."""
        async with self._send_lock:
            queue(self.connection, *args, **kwargs)
            await self._flush()

    async def _flush(self) -> None:
        for out in self.connection.data_to_send():
            await self.ws.send(out)

    async def reply_error(
        self, request_id: int, code: str, message: str, *, retry_ms: int | None = None
    ) -> None:
        """Answer one request with an error; a device that already left gets nothing."""
        self._count_error(code)
        with contextlib.suppress(ConnectionClosed):
            await self.send(
                ServerConnection.send_error, request_id, code, message, retry_ms=retry_ms
            )

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code, reason)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` concurrently with reading; :meth:`finish` waits for it."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def finish(self) -> None:
        """Wait for every request still being served (their failures are theirs)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
