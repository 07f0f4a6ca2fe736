"""The cost model for generation: time to first token, time per token, device memory.

A decoder split is used twice per reply: once for the prompt (prefill: many positions, one
request) and once per generated token (a decode step: one position, a small request, a full
round trip). The same per-node profiles, link and codec rates as for one-shot models price
both; they are combined for a given workload::

    total = TTFT + (new_tokens - 1) * TPOT

The reply from the server is one sampled token, not the logits, so the downlink is tiny. The
device keeps the KV cache of its blocks: at the largest context (prompt + new tokens) that is
``kv_bytes_per_token(head layers) * context`` on top of the head's weights and activations.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgeoffload.core.costmodel import Constraints, CostBreakdown, PlanReport, evaluate
from edgeoffload.core.decoder import DecoderLayout
from edgeoffload.errors import PlanError
from edgeoffload.types import CutPoint, DeviceProfile, LinkProfile

TOKEN_REPLY_BYTES = 64  # a msgpack "token" reply before encryption/framing


@dataclass(frozen=True)
class GenerationWorkload:
    prompt_tokens: int = 128
    new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.new_tokens < 1:
            raise PlanError("prompt and generation lengths must be at least 1 token")

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.new_tokens


@dataclass(frozen=True)
class GenerationPlan:
    """One place to cut the decoder, priced for a workload."""

    head_layers: int | None  # blocks on the device (None: all-local, the whole model)
    cut: CutPoint
    prefill: CostBreakdown
    step: CostBreakdown
    kv_device_bytes: int  # the head's KV cache at the workload's full context
    workload: GenerationWorkload
    feasible: bool = True
    why_infeasible: str = ""

    @property
    def ttft_ms(self) -> float:
        return self.prefill.total_ms

    @property
    def tpot_ms(self) -> float:
        return self.step.total_ms

    @property
    def total_ms(self) -> float:
        return self.ttft_ms + (self.workload.new_tokens - 1) * self.tpot_ms

    @property
    def device_memory_bytes(self) -> int:
        return self.cut.device_memory_bytes + self.kv_device_bytes

    @property
    def label(self) -> str:
        if self.head_layers is None:
            return "all-local"
        if self.head_layers == 0:
            return "all-remote"
        return f"{self.head_layers} block{'s' if self.head_layers > 1 else ''} on the device"

    def to_dict(self) -> dict[str, Any]:
        return {
            "cut": self.cut.id,
            "head_layers": self.head_layers,
            "label": self.label,
            "ttft_ms": round(self.ttft_ms, 3),
            "tpot_ms": round(self.tpot_ms, 3),
            "total_ms": round(self.total_ms, 3),
            "decode_tokens_per_s": round(1e3 / self.tpot_ms, 2) if self.tpot_ms > 0 else None,
            "step_wire_bytes": self.step.wire_bytes,
            "prefill_wire_bytes": self.prefill.wire_bytes,
            "device_memory_bytes": self.device_memory_bytes,
            "kv_device_bytes": self.kv_device_bytes,
            "prefill": self.prefill.to_dict(),
            "step": self.step.to_dict(),
            "feasible": self.feasible,
            "why_infeasible": self.why_infeasible,
        }


@dataclass(frozen=True)
class GenerationReport:
    workload: GenerationWorkload
    best: GenerationPlan
    plans: tuple[GenerationPlan, ...]
    link: LinkProfile

    @property
    def all_local(self) -> GenerationPlan:
        return next(p for p in self.plans if p.head_layers is None)

    @property
    def all_remote(self) -> GenerationPlan:
        return next(p for p in self.plans if p.head_layers == 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "objective": "latency",
            "workload": {
                "prompt_tokens": self.workload.prompt_tokens,
                "new_tokens": self.workload.new_tokens,
            },
            "link": self.link.to_dict(),
            "best": self.best.to_dict(),
            "plans": [p.to_dict() for p in self.plans],
        }


@dataclass(frozen=True)
class PhaseInputs:
    """What :func:`evaluate` needs for one phase (prefill or decode step) of one model."""

    cuts: Sequence[CutPoint]
    node_order: Sequence[str]
    device: DeviceProfile
    server: DeviceProfile
    wire_bytes: Mapping[str, Mapping[str, int]]


def plan_generation(
    *,
    prefill: PhaseInputs,
    step: PhaseInputs,
    block_cuts: Mapping[int, CutPoint],
    layout: DecoderLayout,
    head_state: Mapping[int, Sequence[str]],
    link: LinkProfile,
    workload: GenerationWorkload,
    codec: str = "none",
    constraints: Constraints | None = None,
) -> GenerationReport:
    """Price every block cut (plus all-local) for ``workload``; the fastest feasible wins.

    Args:
        prefill / step: the two phases, measured on the same model (same cut indices).
        block_cuts: blocks in the head -> cut (0 = all-remote), from the decode-step analysis.
        head_state: blocks in the head -> the state inputs (KV) the head keeps.
        codec: one codec for both phases (lossy codecs change the tokens; "none" by default).
    """
    constraints = constraints or Constraints()
    reports: dict[str, PlanReport] = {}
    for name, phase in (("prefill", prefill), ("step", step)):
        reports[name] = evaluate(
            phase.cuts,
            phase.node_order,
            device=phase.device,
            server=phase.server,
            link=link,
            wire_bytes=phase.wire_bytes,
            output_bytes=TOKEN_REPLY_BYTES,
            codecs=(codec,),
        )
    by_index = {name: {p.cut.index: p for p in report.plans} for name, report in reports.items()}
    n = len(step.node_order)
    candidates: list[tuple[int | None, CutPoint]] = [(k, c) for k, c in sorted(block_cuts.items())]
    all_local_cut = next(c for c in step.cuts if c.index == n)
    candidates.append((None, all_local_cut))
    plans = []
    for head_layers, cut in candidates:
        if cut.index not in by_index["prefill"]:
            raise PlanError(f"cut {cut.id} is missing from the prefill analysis")
        kv_names = (
            [s.name for s in layout.state_specs]
            if head_layers is None
            else list(head_state.get(head_layers, ()))
        )
        kv_bytes = layout.kv_bytes_per_token(kv_names) * workload.context
        plan = GenerationPlan(
            head_layers,
            cut,
            by_index["prefill"][cut.index].cost,
            by_index["step"][cut.index].cost,
            kv_bytes,
            workload,
        )
        why = constraints.check(cut)
        limit = constraints.max_device_memory
        if not why and limit is not None and plan.device_memory_bytes > limit:
            why = (
                f"needs {plan.device_memory_bytes / 2**20:.1f} MiB on the device with its KV "
                f"cache at {workload.context} positions > limit {limit / 2**20:.1f} MiB"
            )
        if why:
            plan = GenerationPlan(
                head_layers, cut, plan.prefill, plan.step, kv_bytes, workload, False, why
            )
        plans.append(plan)
    feasible = [p for p in plans if p.feasible]
    if not feasible:
        smallest = min(plans, key=lambda p: p.device_memory_bytes)
        raise PlanError(
            "no cut of the decoder satisfies the constraints: " + plans[-1].why_infeasible,
            hint=f"the smallest device footprint is {smallest.device_memory_bytes / 2**20:.1f} "
            f"MiB ({smallest.label}); raise --max-device-memory or shorten the context",
        )
    # On a tie, keep more on the device (fewer bytes and less of the prompt leave it).
    most = layout.num_layers + 1
    best = min(
        feasible,
        key=lambda p: (p.total_ms, -(most if p.head_layers is None else p.head_layers)),
    )
    return GenerationReport(workload, best, tuple(plans), link)
