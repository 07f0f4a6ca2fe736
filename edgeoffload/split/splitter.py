"""Analyse a model, plan its cut, split it, verify the halves and write the bundle.

This is the orchestration behind ``edgeoffload cuts`` and ``edgeoffload split``; every step
is also usable on its own from Python::

    from edgeoffload.split.splitter import Analysis, split_model
    analysis = Analysis.of("model.onnx", dims={"batch": 1})
    report = analysis.plan(link=parse_link("wifi"))
    bundle = split_model(analysis, report.best.cut, "out/", codec=report.best.codec)
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeoffload import __version__
from edgeoffload._ort import make_session, probe, run
from edgeoffload.bundle import HEAD, TAIL, Bundle, sha256_bytes, sha256_file, write_bundle
from edgeoffload.core import codec as codec_mod
from edgeoffload.core.costmodel import AUTO_CODECS, Constraints, PlanReport, evaluate
from edgeoffload.core.decoder import DecoderLayout, KVState
from edgeoffload.device.runtime import check_inputs
from edgeoffload.errors import GraphError, ManifestError, UsageError, VerificationError
from edgeoffload.manifest import Manifest, PartInfo, safe_relative
from edgeoffload.split.graph import ModelGraph
from edgeoffload.split.profiler import profile_model
from edgeoffload.types import CutPoint, DeviceProfile, LinkProfile, TensorSpec

log = logging.getLogger("edgeoffload.split.splitter")

Progress = Callable[[str, float], None]

# Decoders are analysed for one decode step (the repeated, latency-bound call) at this context.
DECODE_DIMS = {"sequence_length": 1, "past_sequence_length": 128}
# Generation check of a decoder split: a prompt of this many tokens, then greedy steps.
VERIFY_PROMPT_TOKENS = 7
VERIFY_STEPS = 4

# Split verification (codec "none"): the halves run the same kernels on the same values as
# the full model, so fp32 results are normally bit-identical; the tolerance only absorbs
# kernel choices ORT may make differently for a sub-graph.
SPLIT_RTOL = 1e-5
SPLIT_ATOL = 1e-6
# With a lossy codec the outputs move by the quantisation noise the tail propagates; the
# worst deviation relative to the output's range must stay under these bounds.
CODEC_TOLERANCE = {"none": 1e-5, "fp16": 1e-2, "int8": 5e-2, "int8c": 5e-2}


@dataclass
class Analysis:
    """A model with its cuts, sample activations and codec-measured crossing sizes."""

    graph: ModelGraph
    source_name: str
    inputs: dict[str, np.ndarray]
    activations: dict[str, np.ndarray]
    cuts: list[CutPoint]
    reference: dict[str, np.ndarray]  # full-model outputs on ``inputs``

    @classmethod
    def of(
        cls,
        model: str | Path | Any,
        *,
        dims: Mapping[str, int] | None = None,
        inputs: Mapping[str, np.ndarray] | None = None,
        seed: int = 0,
    ) -> Analysis:
        if isinstance(model, str | Path):
            graph = ModelGraph.load(model, dims=dims)
            name = Path(model).name
        else:
            graph = ModelGraph.from_model(model, dims=dims)
            name = graph.model.graph.name or "model"
        if graph.state:
            # A decoder: sizes are those of one decode step at a typical context length.
            known = {t for s in graph.inputs for d in s.shape if isinstance(d, str) for t in [d]}
            for dim, value in DECODE_DIMS.items():
                if dim in known:
                    graph.dims.setdefault(dim, value)
        feed = dict(inputs) if inputs is not None else graph.sample_inputs(seed=seed)
        feed = check_inputs(feed, tuple(graph.inputs), graph.dims)
        activations = probe(graph.model, feed, serialized=graph.serialized())
        graph.set_probe(activations)
        reference = {o: activations[o] for o in graph.output_names}
        return cls(graph, name, feed, activations, graph.cuts(), reference)

    @property
    def node_order(self) -> list[str]:
        return [n.name for n in self.graph.nodes]

    def crossing_tensors(self) -> list[str]:
        seen: dict[str, None] = {}
        for cut in self.cuts:
            for t in cut.tensors:
                seen[t.name] = None
        return list(seen)

    def wire_bytes(self, codecs: Sequence[str]) -> dict[str, dict[str, int]]:
        """Encoded size of every crossing tensor's sample activation under each codec."""
        sizes: dict[str, dict[str, int]] = {}
        specs = [codec_mod.CodecSpec.parse(c) for c in codecs]
        for name in self.crossing_tensors():
            array = self.activations[name]
            sizes[name] = {
                spec.name: codec_mod.encode(
                    array, codec_mod.codec_for_dtype(spec, array.dtype.name)
                ).wire_bytes
                for spec in specs
            }
        return sizes

    def profile(
        self,
        *,
        threads: int = 1,
        runs: int = 10,
        name: str = "this-machine",
        progress: Progress | None = None,
    ) -> DeviceProfile:
        return profile_model(
            self.graph,
            inputs=self.inputs,
            activations=self.activations,
            threads=threads,
            runs=runs,
            name=name,
            progress=progress,
        )

    def plan(
        self,
        *,
        device: DeviceProfile,
        server: DeviceProfile,
        link: LinkProfile,
        codec: str = "auto",
        objective: str = "latency",
        constraints: Constraints | None = None,
    ) -> PlanReport:
        codecs = resolve_codecs(codec)
        for profile in (device, server):
            if profile.model_sha256 != self.graph.sha256:
                from edgeoffload.errors import ProfileError

                raise ProfileError(
                    f"profile {profile.name!r} was measured on model "
                    f"{profile.model_sha256[:12]}…, not this one ({self.graph.sha256[:12]}…)",
                    hint="measure it with: edgeoffload profile MODEL -o profile.json",
                )
        return evaluate(
            self.cuts,
            self.node_order,
            device=device,
            server=server,
            link=link,
            wire_bytes=self.wire_bytes(codecs),
            output_bytes=self.graph.output_bytes(),
            codecs=codecs,
            objective=objective,
            constraints=constraints,
        )


def resolve_codecs(codec: str) -> list[str]:
    if codec == "auto":
        return list(AUTO_CODECS)
    try:
        return [codec_mod.CodecSpec.parse(codec).name]
    except UsageError:
        raise UsageError(
            f"unknown codec {codec!r}",
            hint="use auto, none, zstd, lz4, fp16, int8, int8c, optionally +zstd/+lz4",
        ) from None


@dataclass(frozen=True)
class Verification:
    exact: bool
    max_abs_error: dict[str, float]
    codec: str
    codec_max_rel_error: dict[str, float]
    generation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {
            "exact": self.exact,
            "max_abs_error": self.max_abs_error,
            "codec": self.codec,
            "codec_max_rel_error": self.codec_max_rel_error,
            "split_rtol": SPLIT_RTOL,
            "split_atol": SPLIT_ATOL,
        }
        if self.generation is not None:
            data["generation"] = self.generation
        return data


def run_split(
    head: Any | None,
    tail: Any | None,
    inputs: Mapping[str, np.ndarray],
    passthrough: Sequence[str],
    *,
    codec: str = "none",
) -> dict[str, np.ndarray]:
    """tail(codec(head(x))) with real onnxruntime sessions (head/tail: sessions or None)."""
    crossing: dict[str, np.ndarray] = {name: inputs[name] for name in passthrough}
    head_outputs = run(head, inputs) if head is not None else {}
    crossing.update(head_outputs)
    if tail is None:
        return crossing
    spec = codec_mod.CodecSpec.parse(codec)
    received = {
        name: np.asarray(
            codec_mod.decode(codec_mod.encode(a, codec_mod.codec_for_dtype(spec, a.dtype.name)))
        )
        for name, a in crossing.items()
    }
    # The tail's own state inputs (its KV cache) come from ``inputs``, not over the wire; the
    # head's state outputs stay on the device and are outputs of the split model too.
    return {**head_outputs, **run(tail, {**inputs, **received})}


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return math.inf
    if a.size == 0:
        return 0.0
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(np.nanmax(diff)) if not np.isnan(diff).all() else math.inf


def verify_split(
    graph: ModelGraph,
    cut: CutPoint,
    head_model: Any | None,
    tail_model: Any | None,
    inputs_list: Sequence[Mapping[str, np.ndarray]],
    *,
    codec: str = "none",
    threads: int = 1,
    full: Any | None = None,
) -> Verification:
    """Check tail(head(x)) against the full model on every sample; raise on mismatch.

    The parts (and ``full``) may be models, bytes or already-made unoptimised sessions.
    """
    full = full or _session(graph.serialized(), threads)
    head = _session(head_model, threads) if head_model is not None else None
    tail = _session(tail_model, threads) if tail_model is not None else None
    passthrough = [t.name for t in cut.tensors if t.name in {i.name for i in graph.inputs}]
    errors: dict[str, float] = {}
    codec_errors: dict[str, float] = {}
    exact = True
    codec_name = codec_mod.CodecSpec.parse(codec).name
    quant = codec_mod.CodecSpec.parse(codec).quant
    for inputs in inputs_list:
        expected = run(full, inputs)
        got = run_split(head, tail, inputs, passthrough)
        for name, ref in expected.items():
            if name not in got:
                raise VerificationError(f"split at {cut.id} does not produce output {name!r}")
            out = got[name]
            err = _max_abs(out, ref)
            errors[name] = max(errors.get(name, 0.0), err)
            exact = exact and out.shape == ref.shape and np.array_equal(out, ref, equal_nan=True)
            if ref.dtype.kind in "fc":
                bound = SPLIT_ATOL + SPLIT_RTOL * float(np.max(np.abs(ref), initial=0.0))
            else:
                bound = 0.0
            if not err <= bound:
                raise VerificationError(
                    f"split at {cut.id} ({cut.describe()}) changes output {name!r}: "
                    f"max |diff| = {err:.3g} > tolerance {bound:.3g}",
                    hint="please report this model; try another cut with --cut",
                )
        if codec_name != "none" and tail is not None:
            lossy = run_split(head, tail, inputs, passthrough, codec=codec_name)
            for name, ref in expected.items():
                if ref.dtype.kind not in "fc":
                    if not np.array_equal(lossy[name], ref):
                        raise VerificationError(
                            f"codec {codec_name} changes integer output {name!r}"
                        )
                    continue
                scale = float(np.max(np.abs(ref), initial=0.0)) or 1.0
                rel = _max_abs(lossy[name], ref) / scale
                codec_errors[name] = max(codec_errors.get(name, 0.0), rel)
                limit = CODEC_TOLERANCE.get(quant, 1e-5)
                if not rel <= limit:
                    raise VerificationError(
                        f"codec {codec_name} moves output {name!r} by {rel:.3g} of its range "
                        f"at {cut.id} (limit {limit:g})",
                        hint="use a lossless codec (--codec none/zstd) or fp16",
                    )
    return Verification(exact, errors, codec_name, codec_errors)


def verify_generation(
    graph: ModelGraph,
    head_model: Any | None,
    tail_model: Any | None,
    *,
    threads: int = 1,
    seed: int = 0,
    full: Any | None = None,
) -> dict[str, Any]:
    """Greedy-decode with the full model and with head+tail, each side feeding its own KV
    cache back; the logits of every call must agree and the tokens must be identical."""
    layout = DecoderLayout.of(
        graph.inputs, [graph.tensor_spec(o) for o in graph.output_names], graph.state
    )
    specs = {s.name: s for s in graph.inputs}
    full = full or _session(graph.serialized(), threads)
    sessions = [_session(m, threads) for m in (head_model, tail_model) if m is not None]
    parts = [(session, _state_pairs(session, graph)) for session in sessions]
    full_state = KVState(layout.state, specs)
    split_states = [KVState(pairs, specs) for _, pairs in parts]
    rng = np.random.default_rng(seed)
    tokens = [int(t) for t in rng.integers(0, layout.vocab_size, VERIFY_PROMPT_TOKENS)]
    feed_ids = list(tokens)
    worst = 0.0
    exact = True
    for _ in range(VERIFY_STEPS):
        feed = layout.token_feed(feed_ids, full_state.length)
        expected = full_state.run(full, feed, len(feed_ids))[layout.logits]
        values: dict[str, np.ndarray] = dict(feed)
        for (session, _), state in zip(parts, split_states, strict=True):
            wanted = [i.name for i in session.get_inputs() if i.name not in state.arrays]
            values.update(state.run(session, {n: values[n] for n in wanted}, len(feed_ids)))
        got = values[layout.logits]
        err = _max_abs(got, expected)
        bound = SPLIT_ATOL + SPLIT_RTOL * float(np.max(np.abs(expected), initial=0.0))
        if not err <= bound:
            raise VerificationError(
                f"the split decoder's logits differ from the full model's at position "
                f"{full_state.length - 1}: max |diff| = {err:.3g} > {bound:.3g}",
                hint="please report this model; try another cut with --cut",
            )
        worst = max(worst, err)
        exact = exact and np.array_equal(got, expected)
        if int(np.argmax(got[0, -1])) != int(np.argmax(expected[0, -1])):
            raise VerificationError("the split decoder picks another greedy token")
        feed_ids = [int(np.argmax(expected[0, -1]))]
        tokens.extend(feed_ids)
    return {
        "exact": exact,
        "max_abs_logit_error": worst,
        "prompt_tokens": VERIFY_PROMPT_TOKENS,
        "steps": VERIFY_STEPS,
    }


def _session(model: Any, threads: int) -> Any:
    """An unoptimised session for verification (a session given is used as it is)."""
    if hasattr(model, "get_inputs"):
        return model
    return make_session(model, threads=threads, optimize=False)


def _state_pairs(session: Any, graph: ModelGraph) -> list[tuple[str, str]]:
    names = {i.name for i in session.get_inputs()}
    return [(i, o) for i, o in graph.state.items() if i in names]


def _part(name: str, model: Any, graph: ModelGraph, data: bytes) -> tuple[PartInfo, bytes]:
    inputs = tuple(graph.tensor_spec(i.name) for i in model.graph.input)
    outputs = tuple(graph.tensor_spec(o.name) for o in model.graph.output)
    return PartInfo(name, sha256_bytes(data), inputs, outputs), data


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
) -> Bundle:
    """Split at ``cut``, check both parts, verify them on samples, write the bundle."""
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
    full = _session(graph.serialized(), 1)
    head = _session(head_bytes, 1) if head_bytes is not None else None
    tail = _session(tail_bytes, 1) if tail_bytes is not None else None
    verification = verify_split(graph, cut, head, tail, samples, codec=codec, full=full)
    state: tuple[dict[str, str], ...] = ()
    if graph.state:
        generation = verify_generation(graph, head, tail, full=full)
        verification = Verification(
            verification.exact and generation["exact"],
            verification.max_abs_error,
            verification.codec,
            verification.codec_max_rel_error,
            generation,
        )
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
    )
    return write_bundle(out_dir, manifest, head=head_data, tail=tail_data)


def spec_list(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(f"{s.name} {s.dtype}{list(s.shape)}" for s in specs)
