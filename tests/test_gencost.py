"""Tests for edgeoffload.core.gencost: pricing decoder splits for a reply (TTFT, time per token,
device memory with the KV cache), on hand-built cuts and profiles, then on a real tiny Llama.

The synthetic decoder has four compute nodes ``embed, layers.0, layers.1, lm_head`` and two
blocks; its KV cache is two layers of key/value ``[1, 2, past, 8]`` float32 (64 bytes per
tensor per token, 256 bytes per token in all). Profiles have no calibration points, so a
head's time is the plain sum of its nodes' times (see costmodel.ComputeModel).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from edgeoffload.core.costmodel import REQUEST_OVERHEAD_MS, Constraints
from edgeoffload.core.decoder import DecoderLayout
from edgeoffload.core.gencost import (
    TOKEN_REPLY_BYTES,
    GenerationWorkload,
    PhaseInputs,
    plan_generation,
)
from edgeoffload.errors import PlanError
from edgeoffload.types import CutPoint, DeviceProfile, LinkProfile, TensorSpec

NODES = ("embed", "layers.0", "layers.1", "lm_head")
HIDDEN = 16  # float32 residual: 64 bytes per position
PAST = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
KV_PER_TOKEN = 4 * 2 * 8 * 4  # four tensors of [1, 2, past, 8] float32

FAST = LinkProfile("fast", up_bps=1e10, down_bps=1e10, rtt_ms=0.01)
SLOW = LinkProfile("slow", up_bps=1e3, down_bps=1e3, rtt_ms=500.0)


def _layout() -> DecoderLayout:
    inputs = [
        TensorSpec("input_ids", "int64", (1, "sequence_length")),
        TensorSpec("attention_mask", "int64", (1, "past_sequence_length + sequence_length")),
        *(TensorSpec(p, "float32", (1, 2, "past_sequence_length", 8)) for p in PAST),
    ]
    outputs = [
        TensorSpec("logits", "float32", (1, "sequence_length", 100)),
        *(
            TensorSpec(p.replace("past_key_values", "present"), "float32", (1, 2, "total", 8))
            for p in PAST
        ),
    ]
    state = {p: p.replace("past_key_values", "present") for p in PAST}
    return DecoderLayout.of(inputs, outputs, state)


def _cut(index: int, tensors: Sequence[tuple[str, int]], memory: int) -> CutPoint:
    return CutPoint(
        index=index,
        after=NODES[index - 1] if index else "",
        layer=NODES[index - 1] if index else "",
        boundary=True,
        tensors=tuple(TensorSpec(name, "float32", (nbytes // 4,)) for name, nbytes in tensors),
        nbytes=sum(nbytes for _, nbytes in tensors),
        head_weight_bytes=memory,
        head_peak_bytes=0,
        head_depth=index,
    )


def _phase_cuts(positions: int, memory: Sequence[int] = (0, 10, 20, 30, 40)) -> list[CutPoint]:
    """c0 sends ids + mask, c1..c3 the residual stream (and the mask), c4 is all-local."""
    ids = ("input_ids", 8 * positions)
    mask = ("attention_mask", 8 * positions)
    residual = HIDDEN * 4 * positions
    return [
        _cut(0, [ids, mask], memory[0]),
        _cut(1, [("h_embed", residual), mask], memory[1]),
        _cut(2, [("h_0", residual), mask], memory[2]),
        _cut(3, [("h_1", residual), mask], memory[3]),
        _cut(4, [], memory[4]),
    ]


def _profile(name: str, node_ms: Mapping[str, float]) -> DeviceProfile:
    return DeviceProfile(
        name=name,
        model_sha256="0" * 64,
        threads=1,
        node_ms=dict(node_ms),
        calibration=(),
    )


def _phase(
    positions: int,
    device_ms: Mapping[str, float],
    server_ms: Mapping[str, float],
    memory: Sequence[int] = (0, 10, 20, 30, 40),
) -> PhaseInputs:
    cuts = _phase_cuts(positions, memory)
    wire = {t.name: {"none": t.nbytes() or 0} for c in cuts for t in c.tensors}
    return PhaseInputs(
        cuts,
        NODES,
        _profile("device", device_ms),
        _profile("server", server_ms),
        wire,
    )


def _ms(embed: float, b0: float, b1: float, head: float) -> dict[str, float]:
    return dict(zip(NODES, (embed, b0, b1, head), strict=True))


# A phone 10x slower than the server; the prefill costs 8x the step.
DEVICE_STEP = _ms(1.0, 10.0, 10.0, 5.0)
SERVER_STEP = _ms(0.1, 1.0, 1.0, 0.5)


def _plan(
    *,
    link: LinkProfile = FAST,
    workload: GenerationWorkload | None = None,
    device_step: Mapping[str, float] = DEVICE_STEP,
    server_step: Mapping[str, float] = SERVER_STEP,
    constraints: Constraints | None = None,
    memory: Sequence[int] = (0, 10, 20, 30, 40),
    prefill_cuts: list[CutPoint] | None = None,
):
    workload = workload or GenerationWorkload(prompt_tokens=8, new_tokens=5)
    p = workload.prompt_tokens
    prefill = _phase(
        p,
        {k: 8 * v for k, v in device_step.items()},
        {k: 8 * v for k, v in server_step.items()},
        memory,
    )
    if prefill_cuts is not None:
        prefill = PhaseInputs(
            prefill_cuts, NODES, prefill.device, prefill.server, prefill.wire_bytes
        )
    step = _phase(1, device_step, server_step, memory)
    blocks = {0: step.cuts[0], 1: step.cuts[2], 2: step.cuts[3]}
    head_state = {0: [], 1: PAST[:2], 2: PAST}
    return plan_generation(
        prefill=prefill,
        step=step,
        block_cuts=blocks,
        layout=_layout(),
        head_state=head_state,
        link=link,
        workload=workload,
        constraints=constraints,
    )


def _by_layers(report):
    return {p.head_layers: p for p in report.plans}


# -- the workload ------------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "new"), [(0, 5), (5, 0), (0, 0), (-1, 3)])
def test_workload_needs_at_least_one_token_each(prompt: int, new: int) -> None:
    with pytest.raises(PlanError, match="at least 1 token"):
        GenerationWorkload(prompt_tokens=prompt, new_tokens=new)


def test_workload_context() -> None:
    assert GenerationWorkload(prompt_tokens=100, new_tokens=28).context == 128
    assert GenerationWorkload().context == 128 + 64


# -- the candidates ------------------------------------------------------------------------------


def test_every_block_cut_and_all_local_are_priced() -> None:
    report = _plan()
    assert [p.head_layers for p in report.plans] == [0, 1, 2, None]
    assert [p.cut.index for p in report.plans] == [0, 2, 3, 4]
    labels = [p.label for p in report.plans]
    assert labels[0] == "all-remote" and labels[-1] == "all-local"
    assert labels[1].startswith("1 block") and labels[2] == "2 blocks on the device"
    assert report.all_local.head_layers is None and report.all_remote.head_layers == 0
    assert report.best in report.plans
    data = report.to_dict()
    assert data["workload"] == {"prompt_tokens": 8, "new_tokens": 5}
    assert [p["head_layers"] for p in data["plans"]] == [0, 1, 2, None]
    for plan in data["plans"]:
        assert {"ttft_ms", "tpot_ms", "total_ms", "device_memory_bytes", "kv_device_bytes"} <= set(
            plan
        )
    assert data["best"] == report.best.to_dict()


def test_total_is_ttft_plus_the_other_tokens_at_tpot() -> None:
    for workload in (GenerationWorkload(8, 1), GenerationWorkload(8, 5), GenerationWorkload(8, 64)):
        report = _plan(workload=workload)
        for plan in report.plans:
            assert plan.ttft_ms == plan.prefill.total_ms
            assert plan.tpot_ms == plan.step.total_ms
            expected = plan.ttft_ms + (workload.new_tokens - 1) * plan.tpot_ms
            assert plan.total_ms == pytest.approx(expected, rel=1e-12)
            assert plan.to_dict()["total_ms"] == round(expected, 3)
        assert report.best.total_ms == min(p.total_ms for p in report.plans)


def test_all_local_costs_the_device_alone() -> None:
    report = _plan()
    local = report.all_local
    assert local.ttft_ms == pytest.approx(8 * sum(DEVICE_STEP.values()))
    assert local.tpot_ms == pytest.approx(sum(DEVICE_STEP.values()))
    assert local.step.wire_bytes == 0 and local.prefill.wire_bytes == 0
    assert local.to_dict()["decode_tokens_per_s"] == round(1e3 / local.tpot_ms, 2)


def test_a_step_sends_one_position_and_gets_one_token_back() -> None:
    """Uplink: the crossing tensors for one position; downlink: a token, not the logits."""
    link = LinkProfile("asym", up_bps=8e6, down_bps=8e3, rtt_ms=3.0)
    plan = _by_layers(_plan(link=link))[1]
    step_wire = HIDDEN * 4 + 8  # residual + mask row
    assert plan.step.wire_bytes == step_wire
    assert plan.prefill.wire_bytes == 8 * step_wire
    up_ms = step_wire * 8 / link.up_bps * 1e3
    down_ms = TOKEN_REPLY_BYTES * 8 / link.down_bps * 1e3
    assert plan.step.network_ms == pytest.approx(link.rtt_ms + up_ms + down_ms)
    # The device runs embed + block 0, the server block 1 + the LM head.
    assert plan.step.device_ms == pytest.approx(1.0 + 10.0)
    assert plan.step.server_ms == pytest.approx(1.0 + 0.5)
    assert plan.step.encode_ms >= REQUEST_OVERHEAD_MS / 2


# -- choosing ------------------------------------------------------------------------------------


def test_a_fast_link_favours_offloading() -> None:
    report = _plan(link=FAST)
    assert report.best.head_layers == 0  # the server is 10x faster and the link is free
    assert report.best.total_ms < report.all_local.total_ms / 5


def test_a_very_slow_link_favours_all_local() -> None:
    report = _plan(link=SLOW)
    assert report.best.head_layers is None
    assert report.best is report.all_local
    for plan in report.plans:
        if plan.head_layers is not None:
            assert plan.tpot_ms > SLOW.rtt_ms  # every token pays a round trip


def test_long_replies_favour_the_cheaper_step() -> None:
    """Offloading makes the prompt cheap but every step pays the RTT: with a far server one
    token goes remote and a long reply stays local."""
    link = LinkProfile("far", up_bps=1e9, down_bps=1e9, rtt_ms=60.0)
    device = _ms(1.0, 20.0, 20.0, 4.0)  # a step: 45 ms here; the prompt: 360 ms
    server = _ms(0.0, 0.5, 0.5, 0.5)
    one = _plan(
        link=link, workload=GenerationWorkload(8, 1), device_step=device, server_step=server
    )
    assert one.best.head_layers == 0
    assert one.all_remote.ttft_ms < one.all_local.ttft_ms
    many = _plan(
        link=link, workload=GenerationWorkload(8, 200), device_step=device, server_step=server
    )
    assert many.best.head_layers is None
    assert many.all_local.tpot_ms < many.all_remote.tpot_ms


def test_ties_keep_more_blocks_on_the_device() -> None:
    """Block 1 costs nothing anywhere and c2, c3 send the same bytes: 1 and 2 blocks tie."""
    device = _ms(0.0, 1.0, 0.0, 100.0)  # the LM head is slow here: all-local loses
    server = _ms(0.0, 100.0, 0.0, 1.0)  # block 0 is slow there: all-remote loses
    report = _plan(device_step=device, server_step=server)
    plans = _by_layers(report)
    assert plans[1].total_ms == plans[2].total_ms
    assert plans[1].total_ms < min(plans[0].total_ms, plans[None].total_ms)
    assert report.best.head_layers == 2


# -- device memory: the KV cache at the full context ---------------------------------------------


def test_device_memory_includes_the_kv_cache_at_the_full_context() -> None:
    layout = _layout()
    assert layout.kv_bytes_per_token() == KV_PER_TOKEN
    assert layout.num_layers == 2
    workload = GenerationWorkload(prompt_tokens=100, new_tokens=28)
    plans = _by_layers(_plan(workload=workload))
    per_layer = KV_PER_TOKEN // 2
    expected_kv = {0: 0, 1: per_layer * 128, 2: 2 * per_layer * 128, None: KV_PER_TOKEN * 128}
    for head_layers, plan in plans.items():
        assert plan.kv_device_bytes == expected_kv[head_layers], head_layers
        assert plan.device_memory_bytes == plan.cut.device_memory_bytes + plan.kv_device_bytes
        assert plan.to_dict()["device_memory_bytes"] == plan.device_memory_bytes


def test_max_device_memory_counts_the_kv_cache() -> None:
    """The limit admits every cut's weights, but not all-local's or 2 blocks' KV cache."""
    workload = GenerationWorkload(prompt_tokens=1000, new_tokens=1000)  # 2000 positions
    memory = (0, 100_000, 100_000, 200_000, 300_000)
    limit = 400_000
    # Without the cache all fit; with it: 0 -> 0, 1 -> 100k + 256k, 2 -> 200k + 512k, local 812k.
    report = _plan(
        link=SLOW,
        workload=workload,
        memory=memory,
        constraints=Constraints(max_device_memory=limit),
    )
    plans = _by_layers(report)
    assert [plans[k].feasible for k in (0, 1, 2, None)] == [True, True, False, False]
    for k in (2, None):
        assert plans[k].cut.device_memory_bytes <= limit
        assert "KV cache at 2000 positions" in plans[k].why_infeasible
        assert plans[k].to_dict()["feasible"] is False
    assert report.best.feasible and report.best.head_layers in (0, 1)
    unconstrained = _plan(link=SLOW, workload=workload, memory=memory)
    assert unconstrained.best.head_layers is None  # the limit is what moved the choice


def test_max_device_memory_that_nothing_fits_is_a_plan_error() -> None:
    memory = (50, 100, 100, 200, 300)
    with pytest.raises(PlanError, match="no cut of the decoder") as info:
        _plan(memory=memory, constraints=Constraints(max_device_memory=10))
    assert "all-remote" in (info.value.hint or "")


def test_min_head_depth_applies_to_decoder_cuts() -> None:
    report = _plan(link=FAST, constraints=Constraints(min_head_depth=3))
    plans = _by_layers(report)
    assert [plans[k].feasible for k in (0, 1, 2, None)] == [False, False, True, True]
    assert report.best.head_layers in (2, None)


def test_a_block_cut_missing_from_the_prefill_is_an_error() -> None:
    prefill_cuts = [c for c in _phase_cuts(8) if c.index != 3]
    with pytest.raises(PlanError, match="c3"):
        _plan(prefill_cuts=prefill_cuts)


# -- the real tiny Llama ---------------------------------------------------------------------------


def test_plan_of_a_real_decoder_covers_every_block_cut(tiny_llama_dir) -> None:
    from edgeoffload.core.presets import parse_link
    from edgeoffload.split.decoder_split import DecoderAnalysis

    workload = GenerationWorkload(prompt_tokens=16, new_tokens=8)
    analysis = DecoderAnalysis.of(tiny_llama_dir / "model.onnx", workload=workload)
    assert analysis.step.graph.dims["sequence_length"] == 1
    assert analysis.step.graph.dims["past_sequence_length"] == 16 + 4  # mid-reply
    assert analysis.prefill.graph.dims["sequence_length"] == 16
    assert analysis.prefill.graph.dims["past_sequence_length"] == 0
    profiled: list[int] = []

    def profiles(phase):
        measured = phase.profile(threads=1, runs=3)
        profiled.append(phase.graph.dims["sequence_length"])
        return measured.with_slowdown(2.0, name="phone"), measured

    report = analysis.plan(profiles=profiles, link=parse_link("wifi"))
    assert sorted(profiled) == [1, 16]  # both phases measured
    layers = analysis.layout.num_layers
    assert [p.head_layers for p in report.plans] == [*range(layers + 1), None]
    for plan in report.plans:
        if plan.head_layers is not None:
            assert plan.cut is analysis.blocks[plan.head_layers]
        assert plan.feasible
        assert plan.ttft_ms > 0 and plan.tpot_ms > 0
        assert plan.total_ms == pytest.approx(plan.ttft_ms + 7 * plan.tpot_ms)
        if plan.head_layers is not None:
            # The prompt's 16 positions cross once; each step sends one.
            assert 0 < plan.step.wire_bytes < plan.prefill.wire_bytes
    kv = [p.kv_device_bytes for p in report.plans]
    assert kv[0] == 0 and kv == sorted(kv)
    assert report.all_local.kv_device_bytes == analysis.layout.kv_bytes_per_token() * 24
    assert report.best.total_ms == min(p.total_ms for p in report.plans)
    assert report.to_dict()["best"]["cut"] == report.best.cut.id
