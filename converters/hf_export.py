"""Export a local Hugging Face model folder to ONNX with optimum-onnx, then validate it ourselves.

The export is delegated to ``optimum.exporters.onnx.main_export`` (optimum-onnx 0.1.0, which
uses the legacy TorchScript ``torch.onnx.export`` internally), always offline and on CPU. We
switch off optimum's own validation (it feeds random dummy inputs) and instead check what a user
cares about: the exported graph and transformers give the same main output for real tokenised
text.

Validation tolerance: the main output (``last_hidden_state`` for encoders, ``logits`` for
decoders) must satisfy ``|ort - torch| <= ATOL + RTOL * |torch|`` elementwise with
``ATOL = 1e-4`` and ``RTOL = 1e-3``. Both runtimes compute in float32 but fuse and order the
reductions differently (layer norm, softmax, GEMM accumulation); optimum's own default ``atol``
for BERT-like models is also 1e-4. all-MiniLM-L6-v2 stays around 1e-6 here, far inside it; the
relative part keeps large LLM logits (magnitude 10-30) from failing on rounding alone.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeoffload.errors import ConversionError

from ._common import (
    INSTALL_HINT,
    check_close,
    describe_exception,
    force_offline,
    ort_session,
    require,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "ATOL",
    "MAIN_ONNX_NAMES",
    "RTOL",
    "SAMPLE_TEXT",
    "export_hf",
    "resolve_task",
    "validate_hf_export",
]

logger = logging.getLogger("edgeoffload.converters.hf_export")

ATOL = 1e-4
RTOL = 1e-3

SAMPLE_TEXT = "Edge offloading splits a neural network between a phone and a nearby server."

# What optimum writes, most useful first: single-model tasks and decoders with past produce
# model.onnx; older layouts of decoders and encoder-decoders produce several files.
MAIN_ONNX_NAMES = (
    "model.onnx",
    "decoder_model_merged.onnx",
    "decoder_model.onnx",
    "encoder_model.onnx",
)

_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")

_NP_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}


def export_hf(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    task: str = "auto",
    opset: int | None = None,
    validate: bool = True,
) -> Path:
    """Export the Hugging Face model in ``model_dir`` to ONNX files in ``out_dir``.

    Args:
        model_dir: a local folder with ``config.json`` and weights (safetensors or .bin),
            e.g. what ``save_pretrained`` writes. Nothing is downloaded.
        out_dir: folder for the ONNX file(s); optimum also copies config and tokenizer files.
        task: an optimum task name (``"feature-extraction"``, ``"text-generation-with-past"``,
            ...) or ``"auto"`` to infer it from the config (decoders then get ``-with-past``).
        opset: ONNX opset; ``None`` uses optimum's default for the architecture.
        validate: run the export in onnxruntime and the model in transformers on the same
            tokenised sample text and compare the main output (see the module docstring).

    Returns:
        The path of the main ``.onnx`` file.

    Raises:
        ConversionError: not a model folder, a missing package, an export failure, or a
            validation mismatch.
    """
    src = Path(model_dir)
    out = Path(out_dir)
    _check_model_dir(src)
    force_offline()
    optimum_onnx = require("optimum.exporters.onnx", "exporting a Hugging Face model")
    require("torch", "exporting a Hugging Face model")

    task = resolve_task(src, task)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        optimum_onnx.main_export(
            str(src),
            output=out,
            task=task,
            opset=opset,
            device="cpu",
            framework="pt",
            local_files_only=True,
            # A sentence-transformers folder (modules.json) would otherwise be exported through
            # sentence_transformers when that is installed, with other outputs; we validate
            # against plain transformers, so export the transformers model always.
            library_name="transformers",
            do_validation=False,
        )
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(
            f"optimum could not export {src} for task {task!r}: {describe_exception(exc)}",
            hint="check that task is an optimum task this architecture supports "
            "(e.g. 'feature-extraction', 'text-generation-with-past'); the exporter comes "
            f"with {INSTALL_HINT}",
        ) from exc
    main = _main_onnx(out)
    logger.info("optimum exported %s to %s in %.1f s", src, main, time.perf_counter() - started)
    if validate:
        diff = validate_hf_export(src, main, task=task)
        logger.info("validated %s: max abs difference %.3g", main, diff)
    return main


def resolve_task(model_dir: str | os.PathLike[str], task: str = "auto") -> str:
    """The optimum task to export ``model_dir`` for.

    optimum-onnx 0.1.0 cannot infer the task of a *local* folder ("Cannot infer the task from a
    local directory yet"), so for ``task="auto"`` we do what it does for hub models: map
    ``config.architectures[0]`` to a task, and prefer ``<task>-with-past`` (KV cache inputs and
    outputs) when the ONNX exporter supports it for this model type. Other values pass through.

    Raises:
        ConversionError: when the config names no usable architecture or the model type has no
            ONNX export in optimum.
    """
    if task != "auto":
        return task
    src = Path(model_dir)
    _check_model_dir(src)
    force_offline()
    transformers = require("transformers", "exporting a Hugging Face model")
    tasks = require("optimum.exporters.tasks", "exporting a Hugging Face model")
    # Importing model_configs registers the ONNX configs with the TasksManager; until then it
    # knows no model type (optimum.exporters.onnx loads it lazily).
    require("optimum.exporters.onnx.model_configs", "exporting a Hugging Face model")
    manager = tasks.TasksManager
    try:
        config = json.loads((src / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(
            f"cannot read {src / 'config.json'}: {exc}", hint="the model folder is damaged"
        ) from exc
    architectures = config.get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise ConversionError(
            f"cannot infer the task of {src}: its config.json names no known architecture "
            f"({architectures or 'none'})",
            hint="pass task=..., e.g. 'feature-extraction' or 'text-generation-with-past'",
        )
    try:
        inferred = str(manager.infer_task_from_model(model_class, library_name="transformers"))
        supported = manager.get_supported_tasks_for_model_type(
            config.get("model_type", ""), "onnx", library_name="transformers"
        )
    except Exception as exc:
        raise ConversionError(
            f"optimum has no ONNX export for {src} ({architectures[0]}, model type "
            f"{config.get('model_type')!r}): {describe_exception(exc)}",
            hint="export it with export_torch, or pass a task optimum supports",
        ) from exc
    if f"{inferred}-with-past" in supported:
        inferred = f"{inferred}-with-past"
    logger.info("inferred task %s for %s", inferred, src)
    return inferred


def validate_hf_export(model_dir: Path, onnx_path: Path, *, task: str = "auto") -> float:
    """Compare the main output of ``onnx_path`` with transformers on :data:`SAMPLE_TEXT`.

    Inputs the tokenizer does not produce are synthesised the way a first generation step
    would: ``position_ids`` count from 0, ``past_key_values.*`` are empty (length 0), missing
    ``attention_mask``/``token_type_ids`` are ones/zeros.

    Returns:
        The maximum absolute difference of the main output.

    Raises:
        ConversionError: when the outputs differ beyond tolerance or the model cannot be run.
    """
    import numpy as np

    force_offline()
    torch = require("torch", "validating a Hugging Face export")
    transformers = require("transformers", "validating a Hugging Face export")
    tasks_manager = require("optimum.exporters.tasks", "validating a Hugging Face export")

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(model_dir), local_files_only=True
        )
    except Exception as exc:
        raise ConversionError(
            f"cannot load the tokenizer of {model_dir} to validate the export: "
            f"{describe_exception(exc)}",
            hint="add the tokenizer files to the folder, or pass validate=False",
        ) from exc
    encoded = {k: np.asarray(v) for k, v in tokenizer(SAMPLE_TEXT, return_tensors="np").items()}

    session = ort_session(onnx_path)
    feed = _build_feed(session, encoded, onnx_path)
    main_name = session.get_outputs()[0].name
    try:
        got = session.run([main_name], feed)[0]
    except Exception as exc:
        raise ConversionError(
            f"onnxruntime failed to run {onnx_path} on tokenised text: {describe_exception(exc)}",
            hint="the export is unusable; try another opset or task",
        ) from exc

    model = _load_reference(tasks_manager, model_dir, resolve_task(model_dir, task))
    if onnx_path.name.startswith("encoder") and hasattr(model, "get_encoder"):
        model = model.get_encoder()
    torch_inputs = {
        name: torch.from_numpy(np.ascontiguousarray(value))
        for name, value in feed.items()
        if name in ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    }
    try:
        with torch.no_grad():
            reference = model(**torch_inputs)
    except Exception as exc:
        raise ConversionError(
            f"transformers failed to run {model_dir} on tokenised text: {describe_exception(exc)}",
            hint="pass validate=False to skip the comparison",
        ) from exc
    want = _pick_output(reference, main_name)
    return check_close(
        main_name,
        want.detach().float().cpu().numpy(),
        got,
        rtol=RTOL,
        atol=ATOL,
        against=f"transformers on the sample text ({model_dir})",
    )


def _check_model_dir(src: Path) -> None:
    if not src.is_dir():
        raise ConversionError(
            f"{src} is not a directory",
            hint="pass a local Hugging Face model folder (config.json + weights)",
        )
    if not (src / "config.json").is_file():
        raise ConversionError(
            f"{src} is not a Hugging Face model folder: it has no config.json",
            hint="pass the folder written by save_pretrained (config.json + weights)",
        )
    if not any(any(src.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise ConversionError(
            f"{src} has a config.json but no weights (*.safetensors or *.bin)",
            hint="copy the weight files into the folder; nothing is downloaded",
        )


def _main_onnx(out: Path) -> Path:
    for name in MAIN_ONNX_NAMES:
        if (out / name).is_file():
            return out / name
    found = sorted(out.glob("*.onnx"))
    if not found:
        raise ConversionError(
            f"optimum finished but wrote no .onnx file into {out}",
            hint="check the task name and the optimum-onnx version",
        )
    return found[0]


def _build_feed(session: Any, encoded: dict[str, np.ndarray], path: Path) -> dict[str, Any]:
    import numpy as np

    ids = encoded["input_ids"].astype(np.int64)
    batch, seq = ids.shape
    feed: dict[str, Any] = {}
    for spec in session.get_inputs():
        name = spec.name
        dtype = _NP_DTYPES.get(spec.type)
        if name in encoded:
            value = encoded[name].astype(dtype or np.int64)
        elif name == "attention_mask":
            value = np.ones((batch, seq), dtype=np.int64)
        elif name == "token_type_ids":
            value = np.zeros((batch, seq), dtype=np.int64)
        elif name == "position_ids":
            value = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        elif name == "use_cache_branch":
            value = np.array([False])
        elif name.startswith(("past_key_values", "past_")) and dtype is not None:
            # Empty cache: batch dims become the batch size, every other symbolic dim (the past
            # sequence length) becomes 0; static dims (heads, head size) are kept.
            shape = []
            for dim in spec.shape:
                if isinstance(dim, int):
                    shape.append(dim)
                elif dim is not None and "batch" in str(dim):
                    shape.append(batch)
                else:
                    shape.append(0)
            value = np.zeros(shape, dtype=dtype)
        else:
            raise ConversionError(
                f"cannot build a validation input for {name!r} of {path}",
                hint="pass validate=False and validate this export yourself",
            )
        feed[name] = value
    return feed


def _load_reference(tasks_manager: Any, model_dir: Path, task: str) -> Any:
    base_task = task.replace("-with-past", "")
    try:
        model = tasks_manager.TasksManager.get_model_from_task(
            base_task,
            str(model_dir),
            framework="pt",
            library_name="transformers",
            device="cpu",
            local_files_only=True,
        )
    except Exception as exc:
        raise ConversionError(
            f"transformers could not load {model_dir} for task {task!r}: {describe_exception(exc)}",
            hint="pass validate=False to skip the comparison",
        ) from exc
    model.eval()
    return model


def _pick_output(reference: Any, name: str) -> Any:
    """The transformers output named like the ONNX output, else its first output."""
    if hasattr(reference, "keys") and name in reference:
        return reference[name]
    if isinstance(reference, (tuple, list)):
        return reference[0]
    try:
        return reference[0]
    except Exception as exc:
        raise ConversionError(
            f"transformers returned no output comparable to {name!r}",
            hint="pass validate=False to skip the comparison",
        ) from exc
