"""Batched decode steps (edge.stepbatch): concurrent sessions step together, tokens unchanged.

The oracle is the unsplit tiny Llama run alone with its whole KV cache (test_generation_e2e's
:class:`Reference`). Sessions of different lengths stepping in one padded call must each get
exactly the tokens of a lone run, greedy and sampled, through a real EdgeServer with real
devices (Noise, websockets, onnxruntime). The hosting-time check must refuse a tail whose padded
batches are not exact (shown by breaking the mask padding on purpose), and GPT-2's scalar
crossing keeps its steps one by one.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from test_generation_e2e import (  # the generation suite's oracle, keys and servers
    NEW_TOKENS,
    SAMPLED,
    collect,
    ids,
    keys,  # noqa: F401  (a fixture)
    make_client,
    reference,  # noqa: F401  (a fixture)
    run_async,
    serving,
)

from edgeoffload._ort import make_session
from edgeoffload.bundle import Bundle
from edgeoffload.core.decoder import DecoderLayout, KVState
from edgeoffload.core.sampling import SamplingParams
from edgeoffload.edge import stepbatch
from edgeoffload.edge.sessions import SessionStore
from edgeoffload.edge.stepbatch import Step, StepLayout, StepRuns
from edgeoffload.errors import PayloadError

# Different lengths, so that every batched step pads somebody.
PROMPTS = ([5, 17, 42, 99, 3], [200], list(range(40, 60)), [7, 7, 7], [300, 12, 9, 1, 2, 3, 4])


def _runs(bundle: Bundle) -> tuple[StepRuns, dict, DecoderLayout]:
    manifest = bundle.manifest
    state = {e["input"]: e["output"] for e in manifest.state}
    layout = DecoderLayout.of(manifest.graph_inputs, manifest.graph_outputs, state)
    tail = tuple((e["input"], e["output"]) for e in manifest.state if e["side"] == "server")
    specs = {s.name: s for s in layout.state_specs}
    step_layout = StepLayout.of(manifest.crossing, [specs[p] for p, _ in tail])
    assert isinstance(step_layout, StepLayout), step_layout
    session = make_session(bundle.tail_path, threads=1)
    return StepRuns(session, step_layout, tail, layout.logits), specs, layout


def test_the_llama_tail_pads_exactly_and_gpt2_is_refused(tiny_llama_bundle, tiny_gpt2_bundle):
    runs, specs, _ = _runs(tiny_llama_bundle)
    assert runs.layout.masks and len(runs.layout.stacked) == 3  # hidden state + rotary tables
    assert runs.check(specs, tiny_llama_bundle.manifest.crossing) is None
    manifest = tiny_gpt2_bundle.manifest
    why = StepLayout.of(manifest.crossing, [])
    assert isinstance(why, str) and "scalar" in why


def test_the_check_catches_padding_that_is_not_masked(tiny_llama_bundle, monkeypatch):
    runs, specs, _ = _runs(tiny_llama_bundle)
    monkeypatch.setattr(stepbatch, "_mask_pad", lambda dtype: True)  # attend to the padding
    why = runs.check(specs, tiny_llama_bundle.manifest.crossing)
    assert why is not None and "differs" in why


def test_a_step_whose_mask_does_not_match_its_cache_is_a_payload_error(tiny_llama_bundle):
    runs, specs, _ = _runs(tiny_llama_bundle)
    kv = KVState(runs.pairs, specs)
    mask_name = runs.layout.masks[0]
    feed = {name: np.zeros([1, 1, 64], np.float32) for name in runs.layout.stacked}
    feed[mask_name] = np.ones([1, 1, 1, 5], bool)  # 5 positions, the cache holds 0
    with pytest.raises(PayloadError, match="covers 5 positions"):
        runs.rows(Step(kv, feed, SamplingParams()))


@pytest.mark.parametrize("sampling", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_concurrent_sessions_step_together_and_keep_a_lone_runs_tokens(
    sampling,
    tiny_llama_bundle,
    reference,  # noqa: F811  (the imported fixture)
    keys,  # noqa: F811  (the imported fixture)
):
    ref = reference["llama"]

    async def main():
        # One device key for every client: its quota must admit them all at once.
        config = {"batch_max": 8, "workers": 1, "per_device": len(PROMPTS)}
        async with serving([tiny_llama_bundle], keys, **config) as server:
            hosted = server._hosted[tiny_llama_bundle.manifest.version]
            assert hosted.steps is not None  # the check passed at hosting
            clients = [make_client(tiny_llama_bundle, server.port, keys) for _ in PROMPTS]
            for client in clients:
                await client.__aenter__()
            try:
                streams = [
                    c.generate(input_ids=p, max_new_tokens=NEW_TOKENS, **sampling)
                    for c, p in zip(clients, PROMPTS, strict=True)
                ]
                outputs = await asyncio.gather(*(collect(s) for s in streams))
            finally:
                for client in clients:
                    await client.__aexit__(None, None, None)
            assert server.stats.errors == {}
            return outputs, hosted.steps.stats

    outputs, stats = run_async(main(), timeout=120)
    for items, prompt in zip(outputs, PROMPTS, strict=True):
        assert ids(items) == ref.generate(prompt, **sampling), prompt
        assert all(t.offloaded for t in items)
    assert stats.largest > 1  # steps really ran together
    # The prefill samples the first token; every later one, and an end of sequence, is a step.
    expected_steps = sum(len(ids(items)) - 1 + (len(ids(items)) < NEW_TOKENS) for items in outputs)
    assert sum(n * count for n, count in stats.sizes.items()) == expected_steps


def test_stepped_sessions_borrow_the_batch_until_compacted(tiny_llama_bundle):
    """After a batched step each cache is a view of the batch's presents (no second copy);
    the store compacts idle ones to their own arrays, never a busy one, values unchanged."""
    runs, specs, _ = _runs(tiny_llama_bundle)
    rng = np.random.default_rng(1)
    steps = []
    for length in (2, 6):
        kv = KVState(runs.pairs, specs)
        kv.arrays = {
            name: rng.standard_normal([1, a.shape[1], length, a.shape[3]]).astype(np.float32)
            for name, a in kv.arrays.items()
        }
        kv.length = length
        feed = {
            name: rng.standard_normal([1, 1, 1, 16] if "Unsqueeze" in name else [1, 1, 64]).astype(
                np.float32
            )
            for name in runs.layout.stacked
        }
        feed[runs.layout.masks[0]] = np.ones([1, 1, 1, length + 1], bool)
        steps.append(Step(kv, feed, SamplingParams()))
    runs.run(steps)
    assert all(s.kv.borrowed and s.kv.length in (3, 7) for s in steps)
    bases = {id(next(iter(s.kv.arrays.values())).base) for s in steps}
    assert len(bases) == 1  # both rows are views of one batched present

    store = SessionStore()
    sessions = [
        store.open(
            owner=b"d", version="v", sampling=SamplingParams(), make_kv=lambda s=s: s.kv, now=0
        )
        for s in steps
    ]
    sessions[1].busy = True
    before = {n: a.copy() for n, a in steps[0].kv.arrays.items()}
    assert store.compact_idle(now=1.0, idle=0.5) == 1  # the busy one is left alone
    assert not steps[0].kv.borrowed and steps[1].kv.borrowed
    for name, array in steps[0].kv.arrays.items():
        assert array.flags.owndata
        np.testing.assert_array_equal(array, before[name])
