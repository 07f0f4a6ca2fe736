"""Split a model at a cut, check both parts, verify them and write the bundle.

The step after planning (:mod:`edgeoffload.split.analysis`): :func:`split_model` extracts the
head and tail, runs the ONNX checker on each, verifies tail(head(x)) against the full model
(:mod:`edgeoffload.split.verify`) and writes the parts with a manifest pinned by sha256.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edgeoffload import __version__
from edgeoffload.bundle import HEAD, TAIL, Bundle, sha256_bytes, sha256_file, write_bundle
from edgeoffload.core import codec as codec_mod
from edgeoffload.core.costmodel import PlanReport
from edgeoffload.errors import GraphError, ManifestError
from edgeoffload.manifest import Manifest, PartInfo, safe_relative
from edgeoffload.split.analysis import Analysis
from edgeoffload.split.graph import ModelGraph
from edgeoffload.split.verify import verify_parts
from edgeoffload.split.weights import WeightScheme, quantize_model, weights_record
from edgeoffload.types import CutPoint

# Measures quantised parts (serialised head, tail; None: empty side) -> the manifest's
# quality record; raises to refuse the bundle (see edgeoffload.split.quality).
QualityHook = Callable[[bytes | None, bytes | None], Mapping[str, Any]]


def _part(name: str, model: Any, graph: ModelGraph, data: bytes) -> tuple[PartInfo, bytes]:
    inputs = tuple(graph.tensor_spec(i.name) for i in model.graph.input)
    outputs = tuple(graph.tensor_spec(o.name) for o in model.graph.output)
    return PartInfo(name, sha256_bytes(data), inputs, outputs), data


def _stored(model: Any, data: bytes, scheme: WeightScheme) -> tuple[Any, bytes, dict[str, Any]]:
    """A verified part with its weights stored as ``scheme`` says: (model, bytes, record)."""
    if scheme.kind != "fp32":
        model = quantize_model(model, scheme)
        data = model.SerializeToString()
    return model, data, weights_record(model, scheme)


def check_part(model: Any, what: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphError(f"the {what} part fails the ONNX checker: {first}") from None


def split_model(
    analysis: Analysis,
    cut: CutPoint,
    out_dir: str | Path,
    *,
    codec: str = "none",
    report: PlanReport | None = None,
    verify_samples: int = 2,
    extra_files: Mapping[str, Path] | None = None,
    predicted: Mapping[str, Any] | None = None,
    head_weights: WeightScheme | None = None,
    tail_weights: WeightScheme | None = None,
    quality: QualityHook | None = None,
) -> Bundle:
    """Split at ``cut``, check both parts, verify them on samples, write the bundle.

    ``head_weights`` / ``tail_weights`` (default fp32: as cut) store each part's weights
    quantised. The split is verified exact on the fp32 parts first; each part is quantised
    after (:mod:`edgeoffload.split.weights`), and ``quality`` measures the quantised parts
    before anything is written.
    """
    for rel in extra_files or {}:
        if not safe_relative(rel):
            raise ManifestError(f"extra file {rel!r} is not a safe bundle-relative path")
    graph = analysis.graph
    head_model, tail_model = graph.split(cut)
    # Serialised once: the checker, the verification sessions and the bundle all use the bytes.
    head_bytes = head_model.SerializeToString() if head_model is not None else None
    tail_bytes = tail_model.SerializeToString() if tail_model is not None else None
    if head_bytes is not None:
        check_part(head_bytes, "head")
    if tail_bytes is not None:
        check_part(tail_bytes, "tail")
    samples = [analysis.inputs] + [graph.sample_inputs(seed=s) for s in range(1, verify_samples)]
    verification = verify_parts(graph, cut, head_bytes, tail_bytes, samples, codec=codec)
    head_scheme, tail_scheme = head_weights or WeightScheme(), tail_weights or WeightScheme()
    quantised = head_scheme.kind != "fp32" or tail_scheme.kind != "fp32"
    weights: dict[str, Any] = {}
    if head_model is not None and head_bytes is not None:
        head_model, head_bytes, weights["head"] = _stored(head_model, head_bytes, head_scheme)
    if tail_model is not None and tail_bytes is not None:
        tail_model, tail_bytes, weights["tail"] = _stored(tail_model, tail_bytes, tail_scheme)
    quality_record = dict(quality(head_bytes, tail_bytes)) if quality and quantised else {}
    head_reads = set(graph.state_inputs_of(range(cut.index)))
    state = tuple(
        {"side": "device" if name in head_reads else "server", "input": name, "output": out}
        for name, out in graph.state.items()
    )
    files: dict[str, str] = {}
    out_path = Path(out_dir)
    for rel, src in (extra_files or {}).items():
        target = out_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        files[rel] = sha256_file(target)
    head_info = head_data = tail_info = tail_data = None
    if head_model is not None and head_bytes is not None:
        head_info, head_data = _part(HEAD, head_model, graph, head_bytes)
    if tail_model is not None and tail_bytes is not None:
        tail_info, tail_data = _part(TAIL, tail_model, graph, tail_bytes)
    graph_inputs = {spec.name for spec in graph.inputs}
    predictions: dict[str, Any] = dict(predicted or {})
    if report is not None:
        chosen = next((p for p in report.plans if p.cut.index == cut.index), None)
        predictions = report.to_dict()
        if chosen is not None:
            predictions["chosen"] = chosen.to_dict()
    manifest = Manifest(
        source_sha256=graph.sha256,
        source_name=analysis.source_name,
        cut_id=cut.id,
        cut_after=cut.after,
        crossing=cut.tensors,
        passthrough=tuple(t.name for t in cut.tensors if t.name in graph_inputs),
        graph_inputs=tuple(graph.inputs),
        graph_outputs=tuple(graph.tensor_spec(o) for o in graph.output_names),
        head=head_info,
        tail=tail_info,
        codec=codec_mod.CodecSpec.parse(codec).name,
        dims=dict(graph.dims),
        state=state,
        files=files,
        predicted=predictions,
        verification=verification.to_dict(),
        created_by=f"edgeoffload {__version__}",
        weights=weights if quantised else {},  # absent: fp32 as cut (older bundles too)
        quality=quality_record,
    )
    return write_bundle(out_dir, manifest, head=head_data, tail=tail_data)
