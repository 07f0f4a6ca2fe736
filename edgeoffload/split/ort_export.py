"""ORT-format parts for mobile and web runtimes: ``edgeoffload export-ort BUNDLE``.

:func:`export_ort` converts a bundle's ``head.onnx`` and ``tail.onnx`` to onnxruntime's
flatbuffer format (``head.ort``, ``tail.ort``) the way onnxruntime's own converter
(``python -m onnxruntime.tools.convert_onnx_models_to_ort``, "Fixed" optimization style) does:
an InferenceSession on the CPU execution provider saves the graph after optimizing it at one
level. It writes ``required_operators.config`` for a reduced onnxruntime build
(``build.sh --minimal_build --include_ops_by_config``) from the converted files, with
onnxruntime's ``create_config_from_models``.

Before the manifest records them, every ``.ort`` part is run on sample inputs next to its
``.onnx`` part at the same optimization level, and the outputs must be bit-identical
(``np.array_equal``); otherwise nothing is recorded (VerificationError). The manifest's ``ort``
section pins the sha256 of each new file and of the ``.onnx`` it came from; the bundle version
does not change (a different encoding of the same parts).

The default level, "disable", saves the graph as split and verified, so ``head.ort`` computes
exactly what ``head.onnx`` computes without optimizations, and the operator list names the head's
own operators. "basic" (constant folding, redundant-node removal, EP-independent fusions) is
portable to every execution provider too (NNAPI, CoreML, XNNPACK, WebGPU, wasm) and runs faster;
"extended" and "all" add CPU-only fused kernels (com.microsoft domain), for CPU-only targets.
onnxruntime does not optimize an ``.ort`` again when it loads it, so the level chosen here is
what runs on the device. onnxruntime 1.32 writes the kernel table in an unstable order, so two
exports of one bundle have different bytes (and hashes) but identical outputs and operator lists.

Only onnxruntime (with its tools and flatbuffers) and numpy; no onnx.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edgeoffload._ort import make_session, run, session_options
from edgeoffload.bundle import (
    HEAD_ORT,
    ORT_CONFIG,
    TAIL_ORT,
    Bundle,
    load_bundle,
    sha256_file,
    write_manifest,
)
from edgeoffload.device.runtime import check_inputs
from edgeoffload.errors import ConversionError, GraphError, UsageError, VerificationError
from edgeoffload.manifest import ORT_OPTIMIZATIONS, OrtFile, OrtInfo, PartInfo
from edgeoffload.types import TensorSpec, dim_terms, sample_array

log = logging.getLogger("edgeoffload.split.ort_export")

DEFAULT_OPTIMIZATION = "disable"
_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def _ort() -> Any:
    import onnxruntime

    return onnxruntime


def _options(optimization: str, save_to: Path | None = None) -> tuple[Any, list[str] | None]:
    """Session options and disabled optimizers for ``optimization``, as the converter sets them."""
    ort = _ort()
    so = session_options(threads=1)
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[optimization])
    # What convert_onnx_models_to_ort sets for targets other than ARM: keep int8 QDQ as it is.
    so.add_session_config_entry("session.qdqisint8allowed", "0")
    if save_to is not None:
        so.optimized_model_filepath = str(save_to)
        so.add_session_config_entry("session.save_model_format", "ORT")
    # NCHWc is an x86 layout: the converter leaves it out so the file runs on ARM devices too.
    disabled = ["NchwcTransformer"] if optimization == "all" else None
    return so, disabled


def _session(model: Path, optimization: str, save_to: Path | None = None) -> Any:
    so, disabled = _options(optimization, save_to)
    return _ort().InferenceSession(
        str(model),
        sess_options=so,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=disabled,
    )


def convert_part(src: Path, dst: Path, *, optimization: str = DEFAULT_OPTIMIZATION) -> None:
    """Write ``src`` (.onnx) as an ORT-format model ``dst``, optimized at ``optimization``."""
    try:
        _session(src, optimization, save_to=dst)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(
            f"onnxruntime cannot convert {src.name} to ORT format: {first}"
        ) from None
    if not dst.is_file():
        raise ConversionError(f"onnxruntime wrote no ORT-format model for {src.name}")


def write_operator_config(models: list[Path], output: Path, *, header: str) -> list[str]:
    """``required_operators.config`` for ``models`` (.ort files); returns its operator lines.

    onnxruntime's generator names each model by its path; the file written here names them by
    bundle file name instead, so that the same bundle gives the same file anywhere.
    """
    import onnxruntime.tools.ort_format_model as ort_format_model

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        generated = Path(tmp) / ORT_CONFIG
        ort_format_model.create_config_from_models(models, generated, False)
        lines = [ln for ln in generated.read_text().splitlines() if ln and not ln.startswith("#")]
    comments = [f"# {header}", *(f"# - {m.name}" for m in models)]
    output.write_text("\n".join([*comments, *lines]) + "\n")
    return lines


def parse_operator_config(path: Path) -> dict[str, dict[int, set[str]]]:
    """domain -> opset -> operators, with onnxruntime's own config parser."""
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    required, _ = parse_config(str(path))
    return {
        domain: {int(opset): set(ops) for opset, ops in opsets.items()}
        for domain, opsets in required.items()
    }


def sample_inputs(
    specs: tuple[TensorSpec, ...], dims: Mapping[str, int], *, seed: int
) -> dict[str, np.ndarray]:
    """Deterministic inputs of the declared shapes (unknown symbolic dims are 1).

    The same rule as the splitter's samples (:func:`edgeoffload.types.sample_array`).
    """
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = tuple(
            d
            if isinstance(d, int)
            else sum(int(t) if t.isdigit() else dims.get(t, 1) for t in dim_terms(d))
            for d in spec.shape
        )
        try:
            dtype = np.dtype(spec.dtype)
        except TypeError:
            raise UsageError(
                f"input {spec.name!r} has dtype {spec.dtype}, which numpy cannot make samples of",
                hint="give sample inputs with --input FILE.npz",
            ) from None
        arrays[spec.name] = sample_array(spec.name, dtype, shape, rng)
    return arrays


def _compare(
    what: str,
    part: PartInfo,
    onnx_path: Path,
    ort_path: Path,
    values: dict[str, np.ndarray],
    *,
    optimization: str,
    dims: Mapping[str, int],
    seed: int,
) -> dict[str, np.ndarray]:
    """Run both encodings of a part on the same inputs; outputs must be bit-identical."""
    missing = tuple(s for s in part.inputs if s.name not in values)
    values = {**sample_inputs(missing, dims, seed=seed), **values}
    try:
        expected = run(_session(onnx_path, optimization), values)
        got = run(make_session(ort_path), values)  # as the device runtime loads it
    except GraphError:
        raise
    except Exception as exc:  # onnxruntime's own errors: a sample it cannot run
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VerificationError(
            f"cannot compare {ort_path.name} with {onnx_path.name}: running a sample failed: "
            f"{first}",
            hint="give sample inputs with --input FILE.npz",
        ) from None
    for name, want in expected.items():
        have = got.get(name)
        if have is None or have.shape != want.shape or have.dtype != want.dtype:
            raise VerificationError(f"{ort_path.name}: output {name!r} differs in shape or dtype")
        if not np.array_equal(have, want, equal_nan=want.dtype.kind in "fc"):
            worst = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64))))
            raise VerificationError(
                f"{ort_path.name}: output {name!r} differs from {onnx_path.name} "
                f"(max abs difference {worst:.3g}) at optimization {optimization!r}",
                hint="export with --optimization disable",
            )
    log.info("%s: %s and %s agree on %d output(s)", what, ort_path.name, onnx_path.name, len(got))
    return {**values, **expected}


def export_ort(
    bundle: Bundle | str | Path,
    *,
    optimization: str = DEFAULT_OPTIMIZATION,
    tail: bool = True,
    inputs: list[Mapping[str, np.ndarray]] | None = None,
    samples: int = 2,
) -> Bundle:
    """Write ORT-format parts and the operator list into ``bundle``, check them, pin them.

    Args:
        bundle: a bundle (verified again here) or its folder.
        optimization: graph optimization level saved in the files (see the module docstring).
        tail: also convert the tail (the device's local fallback; a mobile client needs it
            only when it runs the whole model itself).
        inputs: sample inputs of the model (one mapping per sample); by default ``samples``
            generated from the declared shapes and the manifest's dims.
        samples: how many generated samples to compare on when ``inputs`` is not given.

    Returns:
        The bundle, reloaded and verified with its new manifest.
    """
    if optimization not in ORT_OPTIMIZATIONS:
        raise UsageError(f"optimization {optimization!r} is not one of {ORT_OPTIMIZATIONS}")
    loaded = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    loaded = load_bundle(loaded.path)  # the files on disk now, hashes checked
    manifest, folder = loaded.manifest, loaded.path
    parts = [("head", manifest.head, HEAD_ORT)]
    if tail:
        parts.append(("tail", manifest.tail, TAIL_ORT))
    todo = [(what, info, name) for what, info, name in parts if info is not None]
    if not todo:
        raise UsageError(f"{folder}: the bundle has no part to convert (all-remote, and no tail)")
    feeds = (
        [check_inputs(x, manifest.graph_inputs, manifest.dims) for x in inputs]
        if inputs
        else [sample_inputs(manifest.graph_inputs, manifest.dims, seed=s) for s in range(samples)]
    )
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export-ort-") as tmp:
        staged = Path(tmp)
        for _, info, name in todo:
            convert_part(folder / info.file, staged / name, optimization=optimization)
        for seed, feed in enumerate(feeds):
            values = dict(feed)
            for what, info, name in todo:
                values = _compare(
                    what,
                    info,
                    folder / info.file,
                    staged / name,
                    values,
                    optimization=optimization,
                    dims=manifest.dims,
                    seed=seed,
                )
        version = _ort().__version__
        header = f"edgeoffload export-ort: onnxruntime {version}, optimization {optimization}"
        lines = write_operator_config(
            [staged / name for _, _, name in todo], staged / ORT_CONFIG, header=header
        )
        # Drop the old ort section first: every state on disk is then a loadable bundle.
        if manifest.ort is not None:
            write_manifest(folder, replace(manifest, ort=None))
        files = {}
        for what, info, name in todo:
            os.replace(staged / name, folder / name)
            files[what] = OrtFile(name, sha256_file(folder / name), converted_from=info.sha256)
        os.replace(staged / ORT_CONFIG, folder / ORT_CONFIG)
    for what, name in (("head", HEAD_ORT), ("tail", TAIL_ORT)):
        if what not in files and (folder / name).exists():
            (folder / name).unlink()  # a tail.ort of an earlier export with the tail
    ort_info = OrtInfo(
        optimization=optimization,
        onnxruntime=version,
        head=files.get("head"),
        tail=files.get("tail"),
        required_operators=OrtFile(ORT_CONFIG, sha256_file(folder / ORT_CONFIG)),
        check={
            "samples": len(feeds),
            "inputs": "given" if inputs else "generated",
            "compared_with": f"the .onnx parts at optimization {optimization}",
            "identical": True,
            "operator_lines": len(lines),
        },
    )
    write_manifest(folder, replace(manifest, ort=ort_info))
    return load_bundle(folder)
