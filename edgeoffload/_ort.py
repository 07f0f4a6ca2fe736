"""onnxruntime helpers shared by the splitter, the profiler and the runtime.

Only ``onnxruntime`` and ``numpy`` are imported here (never onnx), so the device path can use
it; the probe run that needs onnx lives in :mod:`edgeoffload.split.analysis`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edgeoffload.errors import GraphError


def _ort() -> Any:
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # errors only: warnings are not actionable
    return onnxruntime


def session_options(
    *, threads: int = 1, optimize: bool = True, profile_prefix: str | None = None
) -> Any:
    """Options used everywhere, so that profiled, verified and served sessions agree.

    ``threads`` sets intra-op parallelism; inter-op parallelism stays at 1 (sequential
    execution) so that a device profile measured with N threads means N cores.
    """
    ort = _ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def make_session(
    model: Any,
    *,
    threads: int = 1,
    optimize: bool = True,
    profile_prefix: str | None = None,
    providers: list[str] | None = None,
) -> Any:
    """An InferenceSession from a ModelProto, serialized bytes or a path."""
    ort = _ort()
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif not isinstance(model, bytes | bytearray):
        model = str(model)
    so = session_options(threads=threads, optimize=optimize, profile_prefix=profile_prefix)
    try:
        return ort.InferenceSession(
            model, sess_options=so, providers=providers or ["CPUExecutionProvider"]
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphError(f"onnxruntime cannot load the model: {first}") from None


def run(session: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a session and return its outputs by name."""
    names = [o.name for o in session.get_outputs()]
    feed = {i.name: inputs[i.name] for i in session.get_inputs()}
    return dict(zip(names, session.run(names, feed), strict=True))


def median_ms(fn: Callable[[], object], *, runs: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
