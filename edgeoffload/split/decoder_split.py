"""Analyse, plan and split decoder LLMs (models with a KV cache) at block boundaries.

A decoder is analysed twice: for one decode step (the per-token request) and for the prompt's
prefill, because the two phases cost differently and the choice of cut depends on how many
tokens are generated per prompt (:mod:`edgeoffload.core.gencost`). Splitting reuses the one-shot
machinery (:func:`split_model`); the halves are verified by greedy decoding with each side
feeding its own KV cache back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeoffload.bundle import Bundle
from edgeoffload.core.costmodel import Constraints
from edgeoffload.core.decoder import DecoderLayout, block_of
from edgeoffload.core.gencost import (
    GenerationPlan,
    GenerationReport,
    GenerationWorkload,
    PhaseInputs,
    plan_generation,
)
from edgeoffload.errors import GraphError, QualityError, UsageError
from edgeoffload.split.analysis import Analysis
from edgeoffload.split.quality import check_quality, measure_quality
from edgeoffload.split.splitter import split_model
from edgeoffload.split.weights import WeightScheme, priced_cuts
from edgeoffload.types import CutPoint, DeviceProfile, LinkProfile

# Files of a Hugging Face / optimum export folder that the device needs to generate text.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "config.json",
    "chat_template.jinja",
)

Profiler = Callable[[Analysis], tuple[DeviceProfile, DeviceProfile]]


def block_cuts(analysis: Analysis) -> dict[int, CutPoint]:
    """Cuts at decoder block boundaries: number of blocks in the head -> cut.

    0 is all-remote (the device sends token ids); a block's end is the cut after the last node
    of that block.
    """
    out: dict[int, CutPoint] = {0: analysis.cuts[0]} if analysis.cuts[0].index == 0 else {}
    for cut in analysis.cuts:
        block = block_of(cut.layer) if cut.index > 0 else None
        if block is not None and cut.boundary:
            out[block + 1] = cut
    return out


def tokenizer_files(model_path: str | Path) -> dict[str, Path]:
    """The tokenizer/config files next to an exported decoder, as bundle-relative names."""
    folder = Path(model_path).parent
    return {
        f"tokenizer/{name}": folder / name for name in TOKENIZER_FILES if (folder / name).is_file()
    }


def layout_of(analysis: Analysis) -> DecoderLayout:
    graph = analysis.graph
    if not graph.state:
        raise GraphError(
            f"{analysis.source_name}: not a decoder with KV cache (no past_key_values/present)",
            hint="export it with task text-generation-with-past (edgeoffload export)",
        )
    outputs = [graph.tensor_spec(o) for o in graph.output_names]
    return DecoderLayout.of(graph.inputs, outputs, graph.state)


@dataclass
class DecoderAnalysis:
    """A decoder analysed for its two phases at a given workload."""

    step: Analysis
    prefill: Analysis
    layout: DecoderLayout
    blocks: dict[int, CutPoint]
    workload: GenerationWorkload

    @classmethod
    def of(
        cls, model: str | Path, *, workload: GenerationWorkload | None = None
    ) -> DecoderAnalysis:
        workload = workload or GenerationWorkload()
        # A step is priced in the middle of the reply, where the past is half generated.
        past = workload.prompt_tokens + workload.new_tokens // 2
        step = Analysis.of(model, dims={"sequence_length": 1, "past_sequence_length": past})
        layout = layout_of(step)
        prefill = Analysis.of(
            model,
            dims={"sequence_length": workload.prompt_tokens, "past_sequence_length": 0},
        )
        blocks = block_cuts(step)
        if len(blocks) < 2:
            raise GraphError(
                f"{step.source_name}: no cut between decoder blocks was found",
                hint="node names must carry the block (e.g. /model/layers.3/...)",
            )
        return cls(step, prefill, layout, blocks, workload)

    def head_state(self) -> dict[int, list[str]]:
        """Blocks in the head -> the KV inputs the device keeps for them."""
        graph = self.step.graph
        return {k: graph.state_inputs_of(range(c.index)) for k, c in self.blocks.items()}

    def plan(
        self,
        *,
        profiles: Profiler,
        link: LinkProfile,
        codec: str = "none",
        constraints: Constraints | None = None,
        head_weights: WeightScheme | None = None,
    ) -> GenerationReport:
        """Price every block cut; ``profiles(analysis)`` gives (device, server) for a phase.

        ``head_weights``: the head's weights are priced as stored under that scheme (device
        memory only: the times come from profiles of the fp32 model).
        """
        scheme = head_weights or WeightScheme()
        phases = {}
        for name, analysis in (("prefill", self.prefill), ("step", self.step)):
            device, server = profiles(analysis)
            phases[name] = PhaseInputs(
                priced_cuts(analysis.graph, analysis.cuts, scheme),
                analysis.node_order,
                device,
                server,
                analysis.wire_bytes([codec]),
            )
        return plan_generation(
            prefill=phases["prefill"],
            step=phases["step"],
            block_cuts=self.priced_blocks(scheme),
            layout=self.layout,
            head_state=self.head_state(),
            link=link,
            workload=self.workload,
            codec=codec,
            constraints=constraints,
        )

    def priced_blocks(self, scheme: WeightScheme) -> dict[int, CutPoint]:
        """:attr:`blocks` with the head's weights priced under ``scheme``."""
        cuts = priced_cuts(self.step.graph, list(self.blocks.values()), scheme)
        return dict(zip(self.blocks, cuts, strict=True))

    def device_plans(self, scheme: WeightScheme) -> list[tuple[int | None, CutPoint, int]]:
        """(blocks on the device or None for all-local, cut priced under ``scheme``, device
        memory of that plan: head weights, peak activations, KV cache at the full context)."""
        state = self.head_state()
        context = self.workload.context
        plans: list[tuple[int | None, CutPoint, int]] = [
            (k, c, c.device_memory_bytes + self.layout.kv_bytes_per_token(state[k]) * context)
            for k, c in self.priced_blocks(scheme).items()
        ]
        local = priced_cuts(self.step.graph, [self.step.cuts[-1]], scheme)[0]
        kv = self.layout.kv_bytes_per_token() * context
        plans.append((None, local, local.device_memory_bytes + kv))
        return plans

    def lighter_weights_hint(
        self, constraints: Constraints, current: WeightScheme, head_layers: int | None = None
    ) -> str | None:
        """When a device-memory limit is missed, which lighter head weights would meet it:
        a sentence for an error hint, or None. ``head_layers``: only that plan."""
        limit = constraints.max_device_memory
        if limit is None:
            return None
        most = self.layout.num_layers + 1
        for kind in ("int8", "int4"):
            if WeightScheme(kind).bits >= current.bits:
                continue
            scheme = WeightScheme(kind, current.block, current.symmetric)
            fits = [
                (most if k is None else k, k, size)
                for k, cut, size in self.device_plans(scheme)
                if size <= limit
                and not constraints.check(cut)
                and k != 0  # all-remote has no head to quantise
                and (head_layers is None or k == head_layers)
            ]
            if fits:
                _, blocks, size = max(fits)
                where = "all-local" if blocks is None else f"{blocks} blocks on the device"
                return (
                    f"with --head-weights {kind} the head fits: {where} needs "
                    f"{size / 2**20:.1f} MiB"
                )
        return None


def decoder_codec(codec: str) -> tuple[str, list[str]]:
    """The codec a decoder is split with when ``codec`` is asked for, and notes for the user.

    "auto" means "none": a lossy codec would change the generated tokens.
    """
    if codec == "auto":
        return "none", []
    if codec != "none":
        return codec, [f"codec {codec}: tokens may differ from the unsplit model"]
    return codec, []


def choose_decoder_plan(
    report: GenerationReport, head_layers: int | None
) -> tuple[GenerationPlan, list[str]]:
    """The plan to split at, and notes: the report's best, unless ``head_layers`` forces one
    (the plan with that many blocks on the device, feasible or not)."""
    if head_layers is None:
        return report.best, []
    check_head_layers(head_layers, [p.head_layers for p in report.plans])
    forced = next(p for p in report.plans if p.head_layers == head_layers)
    return forced, [f"cut forced with --head-layers {head_layers}"]


def check_head_layers(head_layers: int | None, blocks: Iterable[int | None]) -> None:
    """Reject a ``--head-layers`` that is not one of the decoder's block cuts."""
    choices = sorted(b for b in blocks if b is not None)
    if head_layers is not None and head_layers not in choices:
        raise UsageError(f"--head-layers {head_layers}: choose one of {choices}")


def split_decoder(
    model: str | Path,
    out_dir: str | Path,
    *,
    head_layers: int | None,
    codec: str = "none",
    report: GenerationReport | None = None,
    analysis: Analysis | None = None,
    head_weights: WeightScheme | None = None,
    tail_weights: WeightScheme | None = None,
    max_quality_loss: float | None = None,
    quality_settings: Mapping[str, int] | None = None,
    threads: int = 1,
) -> Bundle:
    """Split a decoder ONNX (with past key values) after ``head_layers`` blocks (None: keep
    the whole model on the device). The bundle ships the tokenizer files found next to the
    model (under ``tokenizer/``).

    With quantised ``head_weights`` / ``tail_weights`` the parts are quantised after the cut
    and measured against the fp32 model (:func:`measure_quality`; ``quality_settings`` may
    set its ``prompts``, ``prompt_tokens``, ``new_tokens``, ``window``); the report goes into
    the manifest, and ``max_quality_loss`` refuses a bundle over that agreement loss
    (:class:`~edgeoffload.errors.QualityError`, nothing written).
    """
    analysis = analysis or Analysis.of(model)
    layout_of(analysis)
    if head_layers is None:
        cut = analysis.cuts[-1]
    else:
        cuts = block_cuts(analysis)
        if head_layers not in cuts:
            raise UsageError(
                f"--head-layers {head_layers}: the model has cuts after "
                f"{', '.join(map(str, sorted(cuts)))} blocks"
            )
        cut = cuts[head_layers]
    tokenizer = Path(model).parent

    def quality(head: bytes | None, tail: bytes | None) -> dict[str, Any]:
        if not (tokenizer / "tokenizer.json").is_file():
            raise QualityError(
                f"no tokenizer next to {model}: the quality of quantised weights cannot be "
                "measured",
                hint="split an export folder with its tokenizer.json, or keep fp32 weights",
            )
        measured = measure_quality(
            analysis.graph, head, tail, tokenizer, threads=threads, **(quality_settings or {})
        )
        check_quality(measured, max_quality_loss)
        return measured.to_dict()

    return split_model(
        analysis,
        cut,
        out_dir,
        codec=codec,
        extra_files=tokenizer_files(model),
        predicted=report.to_dict() if report is not None else None,
        head_weights=head_weights,
        tail_weights=tail_weights,
        quality=quality,
    )


def describe(report: GenerationReport) -> list[dict[str, Any]]:
    """Rows for a table of the candidates (used by the CLI)."""
    return [p.to_dict() for p in report.plans]
