"""A userspace link emulator: an asyncio TCP proxy that shapes traffic like a real link.

The benchmark lab puts a :class:`LinkEmulator` between the device client and the edge server so
that an offload run sees the rate, delay, jitter and loss of a phone's link on one machine,
without root and without ``tc``/``netem`` (netem is not available on this machine class)::

    shape = LinkShape.from_link(LINK_PRESETS["lte"], jitter_ms=5.0)
    async with LinkEmulator("127.0.0.1", server_port, shape) as emu:
        ...  # point the device client at 127.0.0.1:emu.port instead of the server

Model
=====

Each TCP connection accepted on the listening port gets its own connection to the target, and
each of its two directions (``up``: device -> server, ``down``: server -> device) is an
independent **pipe** with its own rate (``up_bps`` / ``down_bps``), the same one-way delay, and
its own random stream. Bytes read from the source are cut into segments of at most
``segment_bytes`` (one ``recv`` is one segment). For segment *k* of a direction:

* serialisation (a FIFO link of the given rate)::

      ser_k = max(arrival_k, ser_{k-1}) + len_k * 8 / rate

* delivery (propagation, jitter, loss; in order, as TCP delivers)::

      deliver_k = max(deliver_{k-1}, ser_k + delay + U(0, jitter) [+ loss_penalty if lost])

Delivery is scheduled on the event loop's timers (``loop.call_at``), so many segments are in
flight at once: a message's latency is its serialisation time plus one delay, and a message sent
right after another waits only for the first one's serialisation, not for its delay (a pipe, not a
stop-and-wait channel). A 1-byte request/response therefore takes ``2 x delay_ms`` plus
serialisation, and a bulk transfer runs at the link rate whatever the delay.

Loss is TCP-like: bytes are never dropped; a "lost" segment (probability ``loss``) arrives
``loss_penalty_ms`` late, as after a retransmission timeout, and every later segment of that
direction queues behind it (head-of-line blocking). Jitter and loss come from a
``random.Random`` seeded with ``f"{seed}:{connection_index}:{direction}"``: every run with the
same seed and the same segmentation sees the same delays and losses, and concurrent connections
do not perturb each other's random streams. The jitter draw and the loss draw are both taken for
every segment, so changing one parameter does not shift the other's sequence.

A segment is delivered whole, so the end of a message that shares a segment with the start of
the next one arrives when that segment does: message completion times are quantised to one
segment's serialisation time (``segment_bytes * 8 / rate``: 16 ms for 16 KiB at 8 Mbit/s, 119 ms
at the 3G preset's 1.1 Mbit/s uplink). Pick a smaller ``segment_bytes`` (a few KiB) on slow links
when that matters; each segment costs a little CPU.

What is not modelled: connection set-up (the device's ``connect`` completes locally, with no
handshake RTT), the TCP congestion window (slow start, AIMD), and any cross traffic. A FIN travels
like a zero-length segment (after the data queued before it, one delay later, no jitter/loss).

Backpressure and lifetime
=========================

At most ``max_buffer`` bytes (plus one segment) wait in the emulator's queue of one direction:
above that, the emulator stops reading from the source (``pause_reading``), so the sender's TCP
window closes exactly as behind a slow real link; it resumes once the queue has drained to half.
If the receiver does not read, the emulator stops writing to it (its transport signalled
``pause_writing``), the queue fills, and the source is paused in turn. ``stats["peak_buffered"]``
records the largest queue seen, for tests and benchmarks that want to check memory stays bounded.

A half-close (EOF) is forwarded once the data queued before it has been delivered; the proxied
connection is closed when both directions have ended. An error (reset) on one side closes the
other at once, discarding what was queued. :meth:`LinkEmulator.close` stops listening, cancels
every timer and pending connect, and aborts every proxied connection; no task is left behind.

Only the delivery times are emulated; the bytes themselves are forwarded unchanged.

Accuracy
========

Timers are armed 0.5 ms early because epoll rounds its timeout up to whole milliseconds. On a
2-core Linux VM (client, emulator and server in one asyncio process) the median small-message
RTT came out within -0.7 / +1.5 ms of ``2 x delay_ms`` (4.3-5.3 ms for the wifi preset's 5 ms,
40.8-41.4 ms for 40 ms, 201.1-201.5 ms for 200 ms; sub-millisecond delays such as the ethernet
preset's are below that resolution), and a 1 MB bulk transfer within 1 % of its serialisation time
at 8 Mbit/s and 2-4 % at 100 Mbit/s. Gigabit rates are CPU-bound in Python: 10 MB at 1 Gbit/s
took ~25-40 % longer than the model says in that single-process setup. Under heavy CPU
contention a delivery can be late by the scheduler's latency (tens of ms); it is never early by
more than 0.6 ms.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

from edgeoffload.errors import UsageError
from edgeoffload.types import LinkProfile

log = logging.getLogger("edgeoffload.lab.linkemu")

_EARLY_S = 0.0005
"""Timers are armed this much before a segment is due, and segments due within this much (plus
a little) are delivered when a timer fires. The selector rounds its timeout up to whole
milliseconds (epoll), so a timer armed exactly on time fires 0.5 ms late on average; armed early,
its error is centred on zero (within about +-0.5 ms)."""
_SLACK_S = _EARLY_S + 0.0001

_STAT_KEYS = (
    "bytes_up",
    "bytes_down",
    "segments_up",
    "segments_down",
    "lost_up",
    "lost_down",
    "connections",
    "active_connections",
    "peak_buffered",
)


def _check_number(name: str, value: float, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UsageError(f"link shape: {name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        bound = "positive" if positive else "non-negative"
        raise UsageError(f"link shape: {name} must be {bound}, got {value!r}")


@dataclass(frozen=True)
class LinkShape:
    """What the emulated link does to each direction of a TCP connection.

    Attributes:
        up_bps: device -> server rate, bits per second.
        down_bps: server -> device rate, bits per second.
        delay_ms: one-way propagation delay (RTT = 2 x delay_ms + serialisation).
        jitter_ms: extra per-segment delay, uniform in [0, jitter_ms]; order is kept.
        loss: probability that a segment is "lost", i.e. arrives ``loss_penalty_ms`` late.
        loss_penalty_ms: extra delay of a lost segment (an RTO-like retransmission).
        segment_bytes: the largest segment (and read) size.
    """

    up_bps: float
    down_bps: float
    delay_ms: float
    jitter_ms: float = 0.0
    loss: float = 0.0
    loss_penalty_ms: float = 200.0
    segment_bytes: int = 16384

    def __post_init__(self) -> None:
        _check_number("up_bps", self.up_bps, positive=True)
        _check_number("down_bps", self.down_bps, positive=True)
        _check_number("delay_ms", self.delay_ms)
        _check_number("jitter_ms", self.jitter_ms)
        _check_number("loss", self.loss)
        if self.loss > 1:
            raise UsageError(f"link shape: loss is a probability in [0, 1], got {self.loss!r}")
        _check_number("loss_penalty_ms", self.loss_penalty_ms)
        if (
            isinstance(self.segment_bytes, bool)
            or not isinstance(self.segment_bytes, int)
            or self.segment_bytes < 1
        ):
            raise UsageError(
                f"link shape: segment_bytes must be a positive integer, got {self.segment_bytes!r}"
            )

    @classmethod
    def from_link(
        cls,
        link: LinkProfile,
        *,
        jitter_ms: float = 0.0,
        loss: float = 0.0,
        loss_penalty_ms: float = 200.0,
        segment_bytes: int | None = None,
    ) -> LinkShape:
        """The shape of a :class:`LinkProfile`: its rates, and half its RTT as one-way delay.

        Without ``segment_bytes``, segments last about 1 ms on the slower direction (at least
        an Ethernet frame, at most 64 KiB): a message then arrives at most ~1 ms (one frame on
        3G) after its last byte was serialised, and fast links do not cost one Python timer
        per 1500 bytes.
        """
        if segment_bytes is None:
            per_ms = int(min(link.up_bps, link.down_bps) / 8 / 1000)
            segment_bytes = max(1500, min(65536, per_ms))
        return cls(
            up_bps=link.up_bps,
            down_bps=link.down_bps,
            delay_ms=link.rtt_ms / 2.0,
            jitter_ms=jitter_ms,
            loss=loss,
            loss_penalty_ms=loss_penalty_ms,
            segment_bytes=segment_bytes,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "up_bps": self.up_bps,
            "down_bps": self.down_bps,
            "delay_ms": self.delay_ms,
            "jitter_ms": self.jitter_ms,
            "loss": self.loss,
            "loss_penalty_ms": self.loss_penalty_ms,
            "segment_bytes": self.segment_bytes,
        }


class LinkSchedule:
    """The timing model of one direction, pure: arrival times in, delivery times out.

    Times are in seconds on any monotonic clock (the emulator uses ``loop.time()``).
    """

    def __init__(
        self,
        rate_bps: float,
        delay_ms: float,
        *,
        jitter_ms: float = 0.0,
        loss: float = 0.0,
        loss_penalty_ms: float = 200.0,
        rng: random.Random | None = None,
    ) -> None:
        self._rate = float(rate_bps)
        self._delay = delay_ms / 1000.0
        self._jitter = jitter_ms / 1000.0
        self._loss = loss
        self._penalty = loss_penalty_ms / 1000.0
        self._rng = rng if rng is not None else random.Random(0)
        self._ser = -math.inf
        self._deliver = -math.inf

    def segment(self, arrival: float, nbytes: int) -> tuple[float, bool]:
        """Delivery time of ``nbytes`` read at ``arrival``, and whether the segment was lost."""
        jitter = self._rng.random() * self._jitter
        lost = self._rng.random() < self._loss
        self._ser = max(arrival, self._ser) + nbytes * 8.0 / self._rate
        own = self._ser + self._delay + jitter + (self._penalty if lost else 0.0)
        self._deliver = max(self._deliver, own)
        return self._deliver, lost

    def fin(self, arrival: float) -> float:
        """When an end-of-stream read at ``arrival`` is delivered (after all data before it)."""
        self._ser = max(arrival, self._ser)
        self._deliver = max(self._deliver, self._ser + self._delay)
        return self._deliver


class _Side(asyncio.BufferedProtocol):
    """One socket of a proxied connection (the device's or the server's)."""

    def __init__(self, conn: _Connection, name: str, segment_bytes: int) -> None:
        self.conn = conn
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self.lost = False
        self._buffer = bytearray(segment_bytes)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.conn.side_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.from_side(self).on_data(bytes(memoryview(self._buffer)[:nbytes]))

    def eof_received(self) -> bool:
        self.conn.from_side(self).on_eof()
        return True  # keep the transport open: the other direction may still be sending

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.conn.side_lost(self, exc)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.conn.to_side(self).on_writable()


@dataclass
class _Item:
    when: float
    data: bytes | None  # None: end of stream
    lost: bool = False


class _Direction:
    """One direction of one connection: a queue of segments with delivery times."""

    def __init__(
        self,
        emu: LinkEmulator,
        src: _Side,
        dst: _Side,
        schedule: LinkSchedule,
        suffix: str,
    ) -> None:
        self.emu = emu
        self.src = src
        self.dst = dst
        self.schedule = schedule
        self.suffix = suffix
        self.queue: deque[_Item] = deque()
        self.queued = 0
        self.finished = False
        self._eof_queued = False
        self._reading_paused = False
        self._timer: asyncio.TimerHandle | None = None

    def on_data(self, data: bytes) -> None:
        if self.finished or self._eof_queued:
            return
        loop = self.emu.loop
        when, lost = self.schedule.segment(loop.time(), len(data))
        self.queue.append(_Item(when, data, lost))
        self.queued += len(data)
        stats = self.emu.stats
        stats["peak_buffered"] = max(stats["peak_buffered"], self.queued)
        if self.queued >= self.emu.max_buffer and not self._reading_paused:
            self._set_reading(False)
        self._arm()

    def on_eof(self) -> None:
        if self.finished or self._eof_queued:
            return
        self._eof_queued = True
        self.queue.append(_Item(self.schedule.fin(self.emu.loop.time()), None))
        self._arm()

    def on_writable(self) -> None:
        if self._timer is None:
            self._deliver_due()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.queue.clear()
        self.queued = 0
        self.finished = True

    def _set_reading(self, on: bool) -> None:
        transport = self.src.transport
        if transport is None or transport.is_closing():
            return
        self._reading_paused = not on
        if on:
            transport.resume_reading()
        else:
            transport.pause_reading()

    def _arm(self) -> None:
        if self._timer is None and self.queue and not self.dst.write_paused and not self.finished:
            self._timer = self.emu.loop.call_at(self.queue[0].when - _EARLY_S, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._deliver_due()

    def _deliver_due(self) -> None:
        if self.finished:
            return
        transport = self.dst.transport
        if transport is None or transport.is_closing():
            self.cancel()
            self.src.conn.maybe_finish()
            return
        horizon = self.emu.loop.time() + _SLACK_S
        stats = self.emu.stats
        while self.queue and self.queue[0].when <= horizon and not self.dst.write_paused:
            item = self.queue.popleft()
            if item.data is None:
                if transport.can_write_eof():
                    transport.write_eof()
                self.finished = True
                self.src.conn.maybe_finish()
                return
            self.queued -= len(item.data)
            transport.write(item.data)
            stats["bytes_" + self.suffix] += len(item.data)
            stats["segments_" + self.suffix] += 1
            if item.lost:
                stats["lost_" + self.suffix] += 1
        if self._reading_paused and self.queued <= self.emu.max_buffer // 2:
            self._set_reading(True)
        self._arm()


class _Connection:
    """A proxied connection: the device's socket, the server's socket, two directions."""

    def __init__(self, emu: LinkEmulator, index: int) -> None:
        self.emu = emu
        self.index = index
        seg = emu.shape.segment_bytes
        self.client = _Side(self, "client", seg)
        self.server = _Side(self, "server", seg)
        shape = emu.shape

        def schedule(rate: float, direction: str) -> LinkSchedule:
            rng = random.Random(f"{emu.seed}:{index}:{direction}")
            return LinkSchedule(
                rate,
                shape.delay_ms,
                jitter_ms=shape.jitter_ms,
                loss=shape.loss,
                loss_penalty_ms=shape.loss_penalty_ms,
                rng=rng,
            )

        self.up = _Direction(emu, self.client, self.server, schedule(shape.up_bps, "up"), "up")
        self.down = _Direction(
            emu, self.server, self.client, schedule(shape.down_bps, "down"), "down"
        )
        self.closed = False
        self._connect_task: asyncio.Task[None] | None = None

    def from_side(self, side: _Side) -> _Direction:
        return self.up if side is self.client else self.down

    def to_side(self, side: _Side) -> _Direction:
        return self.down if side is self.client else self.up

    def side_made(self, side: _Side) -> None:
        if side is not self.client:
            return
        assert side.transport is not None
        side.transport.pause_reading()  # until the server side is connected
        self.emu.stats["connections"] += 1
        self.emu.stats["active_connections"] += 1
        self.emu.conns.add(self)
        if self.emu.closing:
            self.abort()
            return
        task = self.emu.loop.create_task(self._connect())
        self._connect_task = task
        self.emu.tasks.add(task)
        task.add_done_callback(self.emu.tasks.discard)

    async def _connect(self) -> None:
        emu = self.emu
        try:
            await emu.loop.create_connection(lambda: self.server, emu.target_host, emu.target_port)
        except OSError as exc:
            log.info("link emulator: cannot reach %s:%s: %s", emu.target_host, emu.target_port, exc)
            self.server.lost = True
            self.abort()
            return
        if self.closed:
            self.abort()
            return
        transport = self.client.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        if exc is not None:
            log.debug("link emulator: %s side failed: %s", side.name, exc)
            self.abort()
        elif not self.closed:
            # The socket is gone: what it sent still travels; nothing more can reach it.
            self.from_side(side).on_eof()
            self.to_side(side).cancel()
            self.maybe_finish()
        self._maybe_forget()

    def maybe_finish(self) -> None:
        if self.up.finished and self.down.finished and not self.closed:
            self.closed = True
            for side in (self.client, self.server):
                if side.transport is not None and not side.transport.is_closing():
                    side.transport.close()
            self._maybe_forget()

    def abort(self) -> None:
        self.closed = True
        self.up.cancel()
        self.down.cancel()
        if self._connect_task is not None and not self._connect_task.done():
            if self._connect_task is not asyncio.current_task():
                self._connect_task.cancel()
            if self.server.transport is None:
                self.server.lost = True
        for side in (self.client, self.server):
            if side.transport is None:
                side.lost = True
            elif not side.transport.is_closing():
                side.transport.abort()
        self._maybe_forget()

    def _maybe_forget(self) -> None:
        server_gone = self.server.lost or (
            self.server.transport is None
            and (self._connect_task is None or self._connect_task.done())
        )
        if self.client.lost and server_gone and self in self.emu.conns:
            self.emu.conns.discard(self)
            self.emu.stats["active_connections"] -= 1


class LinkEmulator:
    """A TCP proxy on ``listen_host:listen_port`` that forwards to the target through a shaped link.

    Args:
        target_host: the server the proxy connects each accepted connection to.
        target_port: its port.
        shape: rates, delay, jitter and loss (see the module docstring for the model).
        listen_host: where to listen; 127.0.0.1 by default.
        listen_port: 0 picks a free port (read it from :attr:`port` after :meth:`start`).
        seed: seeds jitter and loss, per connection and direction, for reproducible runs.
        max_buffer: bytes queued per direction before the emulator stops reading the source.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        shape: LinkShape,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        seed: int = 0,
        max_buffer: int = 8 << 20,
    ) -> None:
        if isinstance(max_buffer, bool) or not isinstance(max_buffer, int) or max_buffer < 1:
            raise UsageError(f"max_buffer must be a positive integer, got {max_buffer!r}")
        self.target_host = target_host
        self.target_port = target_port
        self.shape = shape
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.seed = seed
        self.max_buffer = max_buffer
        self.stats: dict[str, int] = dict.fromkeys(_STAT_KEYS, 0)
        self.conns: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._port: int | None = None
        self._next_index = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise UsageError("the link emulator is not started", hint="await emulator.start()")
        return self._loop

    @property
    def port(self) -> int:
        """The port the emulator listens on (known after :meth:`start`)."""
        if self._port is None:
            raise UsageError("the link emulator is not started", hint="await emulator.start()")
        return self._port

    async def start(self) -> None:
        if self._server is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(
            self._new_connection, self.listen_host, self.listen_port
        )
        self._port = int(self._server.sockets[0].getsockname()[1])
        log.info(
            "link emulator on %s:%s -> %s:%s (%s)",
            self.listen_host,
            self._port,
            self.target_host,
            self.target_port,
            self.shape,
        )

    def _new_connection(self) -> _Side:
        conn = _Connection(self, self._next_index)
        self._next_index += 1
        return conn.client

    async def close(self) -> None:
        """Stop listening, cancel every timer and pending connect, abort every connection."""
        if self.closing:
            return
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            conn.abort()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        # Aborted transports report connection_lost on the next loop iterations.
        for _ in range(100):
            if not self.conns:
                break
            await asyncio.sleep(0)

    async def __aenter__(self) -> LinkEmulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
