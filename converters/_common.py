"""Helpers shared by the exporters: lazy imports, offline mode, output comparison.

Nothing here imports torch, transformers or optimum at module import time; the exporters call
:func:`require` inside their functions so that ``import edgeoffload.converters`` stays light.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from edgeoffload.errors import ConversionError

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime

logger = logging.getLogger("edgeoffload.converters")

INSTALL_HINT = "pip install 'edgeoffload[convert]'"

# The distribution that provides each top-level module we import lazily, for error messages.
_DISTRIBUTION = {
    "torch": "torch",
    "transformers": "transformers",
    "optimum": "optimum / optimum-onnx",
    "onnxscript": "onnxscript",
    "tokenizers": "tokenizers",
}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise a ConversionError that says how to install it.

    Args:
        module: dotted module name, e.g. ``"optimum.exporters.onnx"``.
        purpose: what needs it, used in the message (e.g. ``"exporting a PyTorch module"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        dist = _DISTRIBUTION.get(top, top)
        raise ConversionError(
            f"{purpose} needs the Python package {dist!r}, which is not installed "
            f"or failed to import ({exc})",
            hint=INSTALL_HINT,
        ) from exc


def force_offline() -> None:
    """Make Hugging Face libraries never reach for a model hub.

    huggingface_hub reads these variables when it is first imported, so this must run before the
    first import of transformers/optimum; the exporters additionally pass
    ``local_files_only=True`` everywhere, which holds even when the hub library was imported
    earlier by someone else.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def ort_session(path: Path) -> onnxruntime.InferenceSession:
    """Open an onnxruntime CPU session on ``path``, turning load failures into ConversionError."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own non-exported exception types
        raise ConversionError(
            f"onnxruntime cannot load the exported model {path}: {exc}",
            hint="the exporter produced an invalid graph; try another opset",
        ) from exc


def max_abs_diff(expected: np.ndarray, actual: np.ndarray) -> float:
    """Largest absolute difference, ignoring positions where both sides are the same NaN/inf."""
    import numpy as np

    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - e)
    same = (a == e) | (np.isnan(a) & np.isnan(e))
    diff = np.where(same, 0.0, diff)
    return float(np.max(diff)) if diff.size else 0.0


def check_close(
    name: str,
    expected: np.ndarray,
    actual: np.ndarray,
    *,
    rtol: float,
    atol: float,
    against: str,
    context: str = "",
) -> float:
    """Check ``|actual - expected| <= atol + rtol * |expected|`` elementwise.

    Returns:
        The maximum absolute difference (for logging and reports).

    Raises:
        ConversionError: naming the output, the max abs difference and the tolerance.
    """
    import numpy as np

    expected = np.asarray(expected)
    actual = np.asarray(actual)
    if expected.shape != actual.shape:
        raise ConversionError(
            f"exported output {name!r} has shape {tuple(actual.shape)} but {against} gives "
            f"{tuple(expected.shape)}{context}",
            hint="check input_names/output_names and dynamic_axes",
        )
    diff = max_abs_diff(expected, actual)
    ok = np.isclose(
        actual.astype(np.float64),
        expected.astype(np.float64),
        rtol=rtol,
        atol=atol,
        equal_nan=True,
    )
    if not bool(np.all(ok)):
        bad = int(ok.size - np.count_nonzero(ok))
        raise ConversionError(
            f"exported output {name!r} does not match {against}: max abs difference {diff:.3g} "
            f"({bad} of {ok.size} elements outside rtol={rtol:g}, atol={atol:g}){context}",
            hint="the ONNX graph computes something else than the model; see the message",
        )
    return diff


def describe_exception(exc: BaseException) -> str:
    """One line ``Type: message`` (first line of the message only)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def as_list(value: Sequence[Any] | None) -> list[Any]:
    """``None`` -> ``[]``, any sequence -> list."""
    return [] if value is None else list(value)
