"""Summary statistics, interleaved timing and the machine description shared by every benchmark.

Benchmarks report medians and percentiles of repeated runs, next to a baseline measured in the
same run, and say which machine and versions produced them (:func:`environment`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime


class Record:
    """Mixin for the frozen result dataclasses: ``to_dict()`` is the JSON written to disk."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]


def median(values: Sequence[float]) -> float:
    """The median, or NaN for no values."""
    return float(statistics.median(values)) if len(values) else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation), or NaN for no values."""
    return float(np.percentile(values, q)) if len(values) else math.nan


def rounded(value: float, digits: int = 3) -> float:
    return round(float(value), digits)


@dataclass(frozen=True)
class Spread(Record):
    """Median with the smallest and largest value (few runs: all of them matter)."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float], digits: int = 3) -> Spread:
        return cls(
            rounded(median(values), digits),
            rounded(min(values), digits),
            rounded(max(values), digits),
        )

    def __str__(self) -> str:
        return f"{self.median:.2f} [{self.min:.2f}-{self.max:.2f}]"


@dataclass(frozen=True)
class Percentiles(Record):
    """Median with the 10th and 90th percentiles (many runs)."""

    median: float
    p10: float
    p90: float

    @classmethod
    def of(cls, values: Sequence[float], digits: int = 3) -> Percentiles:
        return cls(
            rounded(median(values), digits),
            rounded(percentile(values, 10), digits),
            rounded(percentile(values, 90), digits),
        )


def elapsed_ms(started: float) -> float:
    """Milliseconds since ``started`` (a :func:`time.perf_counter` reading)."""
    return (time.perf_counter() - started) * 1e3


def repeated_ms(fn: Callable[[], object], *, runs: int) -> list[float]:
    """Wall time of ``runs`` calls of ``fn`` (after one untimed warm-up call), in ms."""
    fn()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append(elapsed_ms(started))
    return samples


def interleaved_ms(fns: Sequence[Callable[[], object]], *, runs: int) -> list[float]:
    """Median ms of each function, timed round-robin so that load drift hits all alike."""
    for fn in fns:
        fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            started = time.perf_counter()
            fn()
            samples[i].append(elapsed_ms(started))
    return [median(s) for s in samples]


@dataclass(frozen=True)
class Environment(Record):
    """The machine and the versions a result was measured with."""

    python: str
    platform: str
    processor: str
    cpus: int
    onnxruntime: str
    numpy: str


def environment() -> Environment:
    return Environment(
        python=sys.version.split()[0],
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpus=os.cpu_count() or 1,
        onnxruntime=onnxruntime.__version__,
        numpy=np.__version__,
    )
