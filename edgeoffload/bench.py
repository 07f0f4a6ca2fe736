"""Benchmarks behind ``edgeoffload bench`` and ``benchmarks/`` (they measure; tests check).

``cost_accuracy``: how well the profile + calibration predict the wall time of real head and
tail sessions, over every single-tensor cut of a model. Predicted and measured times use the
same thread count; the result has Spearman's rank correlation and the median relative error.
"""

from __future__ import annotations

import functools
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .costmodel import ComputeModel
from .ortutil import make_session, run

Progress = Callable[[str, float], None]


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(values: list[float]) -> np.ndarray:
        order = np.argsort(values, kind="stable")
        ranked = np.empty(len(values), dtype=np.float64)
        sorted_values = np.asarray(values)[order]
        i = 0
        while i < len(values):
            j = i
            while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
                j += 1
            ranked[order[i : j + 1]] = (i + j) / 2.0
            i = j + 1
        return ranked

    if len(a) < 2:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def _interleaved_ms(fns: list[Callable[[], object]], *, runs: int) -> list[float]:
    """Median ms of each function, timed round-robin so load drift hits all alike."""
    for fn in fns:
        fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            samples[i].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(s) for s in samples]


def environment() -> dict[str, Any]:
    import onnxruntime

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def cost_accuracy(
    model: Any,
    *,
    threads: int = 1,
    runs: int = 15,
    dims: dict[str, int] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Predicted vs measured head/tail time at every single-tensor cut of ``model``."""
    from .splitter import Analysis

    started = time.perf_counter()
    analysis = Analysis.of(model, dims=dims)
    profile = analysis.profile(threads=threads, runs=runs)
    profile_s = time.perf_counter() - started
    compute = ComputeModel(profile, analysis.node_order)
    n = len(analysis.node_order)
    cuts = [c for c in analysis.cuts if 0 < c.index < n and len(c.tensors) == 1]
    rows: list[dict[str, Any]] = []
    for i, cut in enumerate(cuts):
        if progress:
            progress(f"timing {cut.id}", i / max(1, len(cuts)))
        head_model, tail_model = analysis.graph.split(cut)
        head = make_session(head_model, threads=threads)
        tail = make_session(tail_model, threads=threads)
        head_feed = {x.name: analysis.inputs[x.name] for x in head.get_inputs()}
        crossing = run(head, head_feed)
        crossing.update({k: analysis.inputs[k] for k in analysis.inputs})
        tail_feed = {x.name: crossing[x.name] for x in tail.get_inputs()}
        head_ms, tail_ms = _interleaved_ms(
            [
                functools.partial(run, head, head_feed),
                functools.partial(run, tail, tail_feed),
            ],
            runs=runs,
        )
        rows.append(
            {
                "cut": cut.id,
                "after": cut.after,
                "predicted_head_ms": compute.head_ms(cut.index),
                "measured_head_ms": head_ms,
                "predicted_tail_ms": compute.tail_ms(cut.index),
                "measured_tail_ms": tail_ms,
            }
        )

    def summary(kind: str) -> dict[str, float]:
        predicted = [r[f"predicted_{kind}_ms"] for r in rows]
        measured = [r[f"measured_{kind}_ms"] for r in rows]
        rel = [abs(p - m) / m for p, m in zip(predicted, measured, strict=True) if m > 0]
        return {
            "spearman": round(spearman(predicted, measured), 4),
            "median_relative_error": round(statistics.median(rel), 4) if rel else float("nan"),
            "max_relative_error": round(max(rel), 4) if rel else float("nan"),
        }

    return {
        "benchmark": "cost-accuracy",
        "model": analysis.source_name,
        "nodes": n,
        "threads": threads,
        "runs": runs,
        "single_tensor_cuts": len(rows),
        "profile_seconds": round(profile_s, 2),
        "head": summary("head"),
        "tail": summary("tail"),
        "environment": environment(),
        "rows": rows,
    }
