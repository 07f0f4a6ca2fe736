"""Fair admission of device requests to the edge server's tail workers.

At most ``workers`` tails run at once. A request that finds them busy waits in a bounded
queue; when a worker frees up, the waiting request with the smallest *start tag* runs next
(start-time fair queueing, Goyal, Vin and Cheng 1996): every device has a virtual finish tag,
a request's start tag is ``max(V, finish[device])`` and it moves the device's finish tag on by
the request's cost in milliseconds; ``V`` is the start tag of the request granted last. A
device that sent a lot recently therefore waits behind one that did not, whatever the message
count. Costs are estimates when the request queues (the bundle's recent tail time, scaled by
the request's declared size) and corrected by the measured time when it finishes, so work is
charged for what it really took: a 156-byte frame that decodes to a full tensor costs a full
tail.

Bounds: a device has at most ``per_device`` requests admitted (running or waiting; the
allow-list's ``quota=`` overrides it per key) — the server does not read a device's next
message while it is at that limit (:meth:`FairAdmission.wait_for_room`), and a request over it
(several connections of one key) is refused. At most ``max_waiting`` requests, holding at
most ``max_waiting_bytes`` of messages, wait in total (the byte bound keeps a queue of large
decoder prompts from holding gigabytes); a request that waited ``queue_wait`` seconds is
refused. Each refusal is an :class:`~edgeoffload.errors.Overloaded` with a retry-after hint.

Written here because no library schedules asyncio futures by per-flow tags with cancellation
(``asyncio.PriorityQueue`` has neither flows nor removal); it is ~150 lines with no I/O, so it
is tested directly.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import Counter
from dataclasses import dataclass, field

from edgeoffload.errors import Overloaded, UsageError

MIN_RETRY_S = 0.01
MAX_RETRY_S = 5.0


@dataclass(order=True)
class _Waiter:
    start: float
    seq: int
    device: bytes = field(compare=False)
    cost: float = field(compare=False)
    nbytes: int = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)
    gone: bool = field(default=False, compare=False)  # timed out or cancelled: skip it


@dataclass
class Grant:
    """One admitted request: hand it back with :meth:`FairAdmission.release`."""

    device: bytes
    cost: float  # the estimate it was charged, in ms
    waited_s: float


class FairAdmission:
    """Start-time fair queueing of requests over ``workers`` slots (see the module docstring).

    Args:
        workers: requests that may run at once.
        max_waiting: requests that may wait for a slot, all devices together.
        per_device: requests one device may have admitted (running + waiting) by default.
        queue_wait: seconds a request may wait before it is refused.
        max_waiting_bytes: message bytes the waiting requests may hold together (one request
            always may wait, whatever its size, when none does).
    """

    def __init__(
        self,
        *,
        workers: int,
        max_waiting: int,
        per_device: int,
        queue_wait: float,
        max_waiting_bytes: int = 1 << 62,
    ) -> None:
        if (
            workers < 1
            or max_waiting < 0
            or per_device < 1
            or not queue_wait > 0
            or max_waiting_bytes < 0
        ):
            raise UsageError(
                "admission needs workers >= 1, max_waiting >= 0, per_device >= 1, "
                f"queue_wait > 0 and max_waiting_bytes >= 0 (got {workers}, {max_waiting}, "
                f"{per_device}, {queue_wait}, {max_waiting_bytes})"
            )
        self.max_waiting_bytes = max_waiting_bytes
        self.waiting_bytes = 0
        self.workers = workers
        self.max_waiting = max_waiting
        self.per_device = per_device
        self.queue_wait = queue_wait
        self.running = 0
        self.waiting = 0
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()
        self._vtime = 0.0
        self._finish: dict[bytes, float] = {}
        self._admitted: Counter[bytes] = Counter()
        self._room: dict[bytes, asyncio.Event] = {}  # devices waiting to drop under their limit
        self._waiting_cost = 0.0
        self._running_cost = 0.0
        self.refused: Counter[str] = Counter()  # why requests were refused (for metrics/tests)

    @property
    def admitted(self) -> int:
        """Requests running or waiting."""
        return self.running + self.waiting

    def admitted_for(self, device: bytes) -> int:
        return self._admitted[device]

    async def acquire(
        self, device: bytes, cost_ms: float, *, limit: int | None = None, nbytes: int = 0
    ) -> Grant:
        """Wait for a slot for one request of ``device`` costing about ``cost_ms``, whose
        message holds ``nbytes`` while it waits.

        Raises:
            Overloaded: the device is at its limit, the queue is full, or the wait ran out.
        """
        cost = max(float(cost_ms), 1e-3)
        cap = limit or self.per_device
        if self._admitted[device] >= cap:
            self.refused["device_limit"] += 1
            raise Overloaded(
                f"this device already has {cap} requests in flight",
                retry_after=self._retry_after(self._admitted[device] * cost),
            )
        start = max(self._vtime, self._finish.get(device, 0.0))
        self._finish[device] = start + cost
        self._admitted[device] += 1
        if self.running < self.workers and self.waiting == 0:
            self.running += 1
            self._running_cost += cost
            self._vtime = start
            return Grant(device, cost, 0.0)
        too_big = self.waiting and self.waiting_bytes + nbytes > self.max_waiting_bytes
        if self.waiting >= self.max_waiting or too_big:
            self._undo(device, cost)
            self.refused["queue_full"] += 1
            raise Overloaded(
                f"{self.waiting} requests already wait for a worker",
                retry_after=self._retry_after(self._running_cost + self._waiting_cost),
            )
        loop = asyncio.get_running_loop()
        waiter = _Waiter(start, next(self._seq), device, cost, nbytes, loop.create_future())
        heapq.heappush(self._queue, waiter)
        self.waiting += 1
        self.waiting_bytes += nbytes
        self._waiting_cost += cost
        queued_at = loop.time()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.queue_wait)
        except BaseException as exc:
            if waiter.future.done() and not waiter.future.cancelled():
                # Granted just as the wait ended: the slot is ours, hand it on.
                self.release(Grant(device, cost, 0.0), actual_ms=0.0)
            else:
                waiter.gone = True
                if len(self._queue) > 2 * self.waiting + 64:  # drop the dead entries
                    self._queue = [w for w in self._queue if not w.gone]
                    heapq.heapify(self._queue)
                self.waiting -= 1
                self.waiting_bytes -= nbytes
                self._waiting_cost -= cost
                self._undo(device, cost)
            if isinstance(exc, asyncio.TimeoutError):
                self.refused["queue_wait"] += 1
                raise Overloaded(
                    f"no worker was free within {self.queue_wait:g} s",
                    retry_after=self._retry_after(self._running_cost + self._waiting_cost),
                ) from None
            raise
        return Grant(device, cost, loop.time() - queued_at)

    def release(self, grant: Grant, *, actual_ms: float | None = None) -> None:
        """The request finished (or failed): free its slot and grant the next waiter.

        ``actual_ms``, when measured, replaces the estimate in the device's finish tag.
        """
        self.running -= 1
        self._running_cost = max(0.0, self._running_cost - grant.cost)
        device = grant.device
        if actual_ms is not None and device in self._finish:
            self._finish[device] += max(actual_ms, 1e-3) - grant.cost
        if self._decrement(device) and self._finish.get(device, 0.0) <= self._vtime:
            self._finish.pop(device, None)  # nothing admitted, nothing owed: forget it
        self._grant_next()

    async def wait_for_room(self, device: bytes, *, limit: int | None = None) -> None:
        """Return once ``device`` is under its limit of admitted requests.

        The server awaits this before it reads a device's next message: a device at its
        limit is slowed by TCP back-pressure instead of being answered ``overloaded`` for
        every extra request (each of which the server would still have to decrypt and parse).
        """
        cap = limit or self.per_device
        while self._admitted[device] >= cap:
            await self._room.setdefault(device, asyncio.Event()).wait()

    def _grant_next(self) -> None:
        while self._queue and self.running < self.workers:
            waiter = heapq.heappop(self._queue)
            if waiter.gone:
                continue
            self.waiting -= 1
            self.waiting_bytes -= waiter.nbytes
            self._waiting_cost -= waiter.cost
            self.running += 1
            self._running_cost += waiter.cost
            self._vtime = max(self._vtime, waiter.start)
            waiter.future.set_result(None)

    def _undo(self, device: bytes, cost: float) -> None:
        """Take back a request that was never granted."""
        self._finish[device] -= cost
        self._decrement(device)

    def _decrement(self, device: bytes) -> bool:
        """One request of ``device`` fewer admitted; True when it has none left."""
        self._admitted[device] -= 1
        room = self._room.pop(device, None)
        if room is not None:
            room.set()  # wait_for_room re-checks
        if self._admitted[device] <= 0:
            del self._admitted[device]
            return True
        return False

    def _retry_after(self, queued_ms: float) -> float:
        """Seconds until ``queued_ms`` of work ahead has drained over the workers."""
        return min(MAX_RETRY_S, max(MIN_RETRY_S, queued_ms / 1e3 / self.workers))
