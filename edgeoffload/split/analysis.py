"""Analyse a model for splitting: its cuts, a probe run, profiles and the cost-model plan.

``Analysis.of`` loads the model, runs it once with every intermediate tensor exposed (the
probe: real shapes where shape inference has none, and sample activations for the codecs),
and lists every cut; ``plan`` prices the cuts with device/server profiles and a link::

    from edgeoffload.split.analysis import Analysis
    from edgeoffload.split.splitter import split_model
    analysis = Analysis.of("model.onnx", dims={"batch": 1})
    report = analysis.plan(device=device, server=server, link=parse_link("wifi"))
    bundle = split_model(analysis, report.best.cut, "out/", codec=report.best.codec)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edgeoffload._ort import make_session, run
from edgeoffload.core import codec as codec_mod
from edgeoffload.core.costmodel import AUTO_CODECS, Constraints, PlanReport, evaluate
from edgeoffload.device.runtime import check_inputs
from edgeoffload.errors import ProfileError, UsageError
from edgeoffload.split.graph import ModelGraph
from edgeoffload.split.loading import load_model
from edgeoffload.split.profiler import profile_model
from edgeoffload.types import CutPoint, DeviceProfile, LinkProfile

Progress = Callable[[str, float], None]

# Decoders are analysed for one decode step (the repeated, latency-bound call) at this context.
DECODE_DIMS = {"sequence_length": 1, "past_sequence_length": 128}


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
        model: str | Path | onnx.ModelProto,
        *,
        dims: Mapping[str, int] | None = None,
        inputs: Mapping[str, np.ndarray] | None = None,
        seed: int = 0,
    ) -> Analysis:
        loaded = load_model(model)
        graph = loaded.graph(dims=dims)
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
        return cls(graph, loaded.name, feed, activations, graph.cuts(), reference)

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


def probe(
    model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], *, serialized: bytes | None = None
) -> dict[str, np.ndarray]:
    """Run ``model`` once with every intermediate tensor exposed; returns all of them.

    The copy runs unoptimised so that every tensor of the original graph still exists.
    """
    existing = {o.name for o in model.graph.output}
    graph_inputs = {i.name for i in model.graph.input}
    extra = onnx.ModelProto()
    for node in model.graph.node:
        for out in node.output:
            if out and out not in existing and out not in graph_inputs:
                extra.graph.output.append(onnx.ValueInfoProto(name=out))
                existing.add(out)
    # Protobuf merges concatenated messages (repeated fields append): the model's bytes plus a
    # message holding only the extra outputs parse as the model with those outputs, without
    # copying or re-serialising the weights.
    data = serialized if serialized is not None else model.SerializeToString()
    session = make_session(data + extra.SerializeToString(), optimize=False)
    result = run(session, inputs)
    result.update({k: np.asarray(v) for k, v in inputs.items()})
    return result
