"""Dynamic batching on the edge server: collect, run once as a batch, split the results.

:class:`Batcher` is the scheduler; what a batch *is* comes from a :class:`BatchRunner`.
:class:`StackedRuns` batches stateless tails: requests for one hosted bundle whose arrays have
the same non-leading shapes and dtypes are stacked along the leading (batch) axis and run as one
onnxruntime call; the outputs are split back by row. Only tails whose graph inputs and outputs
all share one symbolic leading dim are batched (:meth:`StackedRuns.eligible`). Decode steps of
generation sessions have their own runner (edge.stepbatch).

Scheduling is continuous batching: at most ``slots`` batches run at once (the server's worker
count). An item that finds a slot free starts at once (a lone request is never delayed);
items that arrive while the slots are busy accumulate and leave together when a slot frees,
up to ``max_batch`` rows. When a slot is free but other batches are running, the batcher may
hold a small batch for ``delay`` seconds to let it grow: ``delay`` is tuned to a quarter of the
last batch's measured time and never exceeds the configured bound ``max_delay``; with nothing
running it is 0.

Batching changes results only by what onnxruntime itself does between batch sizes (different
kernels or blockings for other shapes): measured in tests/test_batcher.py and README.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from edgeoffload._ort import run
from edgeoffload.errors import PayloadError

DELAY_FRACTION = 0.25  # of the last batch's tail time: how long a small batch may wait to grow

Arrays = dict[str, np.ndarray]
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


class BatchRunner(Protocol[ItemT, ResultT]):
    """What a batch of items is: which items may share one, and how one runs."""

    def key(self, item: ItemT) -> Hashable:
        """Items with equal keys may run in one batch."""
        ...

    def rows(self, item: ItemT) -> int:
        """Rows ``item`` adds to a batch; PayloadError when it cannot be batched at all."""
        ...

    def run(self, items: list[ItemT]) -> list[ResultT]:
        """On a worker thread: run ``items`` as one batch; one result per item, in order."""
        ...


@dataclass(eq=False)  # compared by identity (list.remove): arrays have no truth value
class _Pending(Generic[ItemT, ResultT]):
    item: ItemT
    key: Hashable
    rows: int
    future: asyncio.Future[ResultT]
    since: float


@dataclass
class BatchStats:
    """What the batcher did: batches by size (in requests) and by rows."""

    sizes: Counter[int] = field(default_factory=Counter)
    batches: int = 0

    @property
    def largest(self) -> int:
        return max(self.sizes, default=0)


def _compat_key(arrays: Mapping[str, np.ndarray]) -> tuple[Any, ...]:
    return tuple((n, a.shape[1:], a.dtype.str) for n, a in sorted(arrays.items()))


class StackedRuns:
    """Stateless runs of one tail ``session`` stacked along the leading axis.

    ``session``: an onnxruntime InferenceSession whose inputs and outputs share a symbolic
    leading dim (check with :meth:`eligible`).
    """

    def __init__(self, session: Any) -> None:
        self.session = session

    @staticmethod
    def eligible(session: Any) -> bool:
        """True when every input and output has the same symbolic (named) leading dim."""
        leads = {
            (v.shape[0] if v.shape else None)
            for v in [*session.get_inputs(), *session.get_outputs()]
        }
        if len(leads) != 1:
            return False
        lead = next(iter(leads))
        return isinstance(lead, str) and bool(lead)

    def key(self, item: Arrays) -> Hashable:
        return _compat_key(item)

    def rows(self, item: Arrays) -> int:
        if any(a.ndim == 0 for a in item.values()):
            raise PayloadError("a batched tail's inputs need a leading batch axis")
        rows = {int(a.shape[0]) for a in item.values()}
        if len(rows) != 1:
            raise PayloadError("the crossing tensors disagree on the batch size")
        return rows.pop()

    def run(self, items: list[Arrays]) -> list[Arrays]:
        """Stack the items, run once, split the outputs back by row."""
        if len(items) == 1:
            return [run(self.session, items[0])]
        names = list(items[0])
        stacked = {n: np.concatenate([item[n] for item in items], axis=0) for n in names}
        outputs = run(self.session, stacked)
        counts = [self.rows(item) for item in items]
        total = sum(counts)
        bounds = np.cumsum(counts)[:-1]
        split: list[Arrays] = [{} for _ in items]
        for name, value in outputs.items():
            if value.ndim == 0 or value.shape[0] != total:
                raise PayloadError(f"tail output {name} does not keep the batch axis")
            for i, part in enumerate(np.split(value, bounds, axis=0)):
                split[i][name] = np.ascontiguousarray(part)
        return split


class Batcher(Generic[ItemT, ResultT]):
    """Batch the items of one ``runner`` (see the module docstring).

    Args:
        runner: what a batch is (:class:`StackedRuns`, edge.stepbatch.StepRuns).
        executor: where the batched runs go (the server's worker pool).
        slots: batches that may run at once.
        max_batch: rows one batch may hold (a request larger than this runs alone).
        max_delay: seconds a request may be held to grow a batch, at most.
        on_batch: called with (requests, rows) for every batch run (metrics).
    """

    def __init__(
        self,
        runner: BatchRunner[ItemT, ResultT],
        executor: Executor,
        *,
        slots: int,
        max_batch: int,
        max_delay: float,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self.runner = runner
        self.executor = executor
        self.slots = max(1, slots)
        self.max_batch = max(1, max_batch)
        self.max_delay = max(0.0, max_delay)
        self.on_batch = on_batch
        self.running = 0
        self.last_batch_s = 0.0
        self.stats = BatchStats()
        self._pending: list[_Pending[ItemT, ResultT]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def delay(self) -> float:
        """How long a small batch may wait for company now: 0 with nothing running."""
        if self.running == 0:
            return 0.0
        return min(self.max_delay, DELAY_FRACTION * self.last_batch_s)

    async def run(self, item: ItemT) -> ResultT:
        """Run ``item`` (maybe batched with others); its result."""
        loop = asyncio.get_running_loop()
        pending: _Pending[ItemT, ResultT] = _Pending(
            item, self.runner.key(item), self.runner.rows(item), loop.create_future(), loop.time()
        )
        self._pending.append(pending)
        self._dispatch()
        try:
            return await asyncio.shield(pending.future)
        except asyncio.CancelledError:
            if pending in self._pending:
                self._pending.remove(pending)
            raise

    def _dispatch(self) -> None:
        """Start batches while a slot is free and something is ready to leave."""
        loop = asyncio.get_running_loop()
        while self._pending and self.running < self.slots:
            oldest = self._pending[0]
            group = self._group(oldest)
            rows = sum(p.rows for p in group)
            wait = oldest.since + self.delay - loop.time()
            if rows < self.max_batch and wait > 0:
                if self._timer is None:
                    self._timer = loop.call_later(wait, self._on_timer)
                return
            for p in group:
                self._pending.remove(p)
            self.running += 1
            task = loop.create_task(self._run_batch(group))
            self._tasks.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self._tasks.discard)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _group(self, oldest: _Pending[ItemT, ResultT]) -> list[_Pending[ItemT, ResultT]]:
        """The oldest request and the compatible ones after it, up to max_batch rows."""
        group = [oldest]
        rows = oldest.rows
        for p in self._pending[1:]:
            if p.key == oldest.key and rows + p.rows <= self.max_batch:
                group.append(p)
                rows += p.rows
        return group

    async def _run_batch(self, group: list[_Pending[ItemT, ResultT]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            started = time.perf_counter()
            items = [p.item for p in group]
            outputs = await loop.run_in_executor(self.executor, self.runner.run, items)
            self.last_batch_s = time.perf_counter() - started
            self.stats.batches += 1
            self.stats.sizes[len(group)] += 1
            if self.on_batch is not None:
                self.on_batch(len(group), sum(p.rows for p in group))
            for p, out in zip(group, outputs, strict=True):
                if not p.future.done():
                    p.future.set_result(out)
        except BaseException as exc:
            for p in group:
                if not p.future.done():
                    p.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self.running -= 1
            self._dispatch()
