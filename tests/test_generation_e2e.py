"""Split LLM generation end to end: device head + KV cache -> encrypted websocket -> tail + KV.

Real EdgeServer on 127.0.0.1 (port 0) in this process (one test also runs it as a separate
process and SIGKILLs it), real OffloadClient, real Noise crypto, real onnxruntime, tiny
random-weight Llama and GPT-2 decoders exported with past key values (tests/conftest.py).

The oracle is the *unsplit* exported model run on this machine with its whole KV cache
(:class:`Reference`): the split generation must give exactly its tokens, greedy and sampled
(sampling draws are a pure function of ``(seed, position)``, PROTOCOL.md §12), including after
the server lost the session and the device rebuilt it by replay, and after a local fallback.
Hostile session messages get typed errors while an honest generation on the same server goes
on untouched. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from edgeoffload._ort import make_session
from edgeoffload.bundle import Bundle
from edgeoffload.core.codec import EncodedTensor
from edgeoffload.core.decoder import DecoderLayout, KVState, select_next
from edgeoffload.core.sampling import SamplingParams, sample_token
from edgeoffload.device.blocking import BlockingOffloadClient
from edgeoffload.device.client import OffloadClient
from edgeoffload.device.generate import DecoderDevice, GeneratedToken, Generation
from edgeoffload.device.runtime import DeviceRuntime
from edgeoffload.edge.allowlist import AllowList
from edgeoffload.edge.server import EdgeServer, ServerConfig
from edgeoffload.errors import (
    LocalProtocolError,
    OffloadUnavailable,
    PayloadError,
    SessionError,
    SessionLost,
    UsageError,
)
from edgeoffload.lab.harness import ThrowawayKeys, spawn_server
from edgeoffload.protocol.connection import CLOSE_PROTOCOL
from edgeoffload.protocol.connection import ClientConnection as ProtocolClient
from edgeoffload.protocol.events import Chunk, ErrorReply, HandshakeComplete, Pong
from edgeoffload.protocol.tensors import encode_tensors
from edgeoffload.protocol.wire import pack
from edgeoffload.split.loading import load_model

STEP = 10.0  # seconds: bound on any single await
TEST_TIMEOUT = 60.0  # seconds: bound on one whole test coroutine
NEW_TOKENS = 40
PROMPTS = ([5, 17, 42, 99, 3], [200], list(range(40, 60)))
SAMPLED = {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 7}
TEXT_PROMPT = "Hello! How are you today?"


def run_async(coro: Awaitable[Any], timeout: float = TEST_TIMEOUT) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


# -- the oracle: the unsplit model -------------------------------------------------------------


class Reference:
    """The exported model, unsplit, with its whole KV cache on this side.

    Greedy is ``argmax``; sampling draws the token of the call that leaves the cache at length
    ``L`` with position ``L`` (what the server does, PROTOCOL.md §12.6). Generation stops before
    an end-of-sequence token, as ``OffloadClient.generate`` does.
    """

    def __init__(self, folder: Path) -> None:
        model = folder / "model.onnx"
        graph = load_model(model).graph()
        outputs = [graph.tensor_spec(o) for o in graph.output_names]
        self.layout = DecoderLayout.of(graph.inputs, outputs, graph.state)
        self.session = make_session(model, threads=1)
        config = json.loads((folder / "generation_config.json").read_text())
        eos = config["eos_token_id"]
        self.eos = set(eos) if isinstance(eos, list) else {eos}
        self._cache: dict[Any, list[int]] = {}

    def generate(self, prompt: list[int], n: int = NEW_TOKENS, **sampling: Any) -> list[int]:
        key = (tuple(prompt), n, tuple(sorted(sampling.items())))
        if key not in self._cache:
            params = SamplingParams(**sampling)
            specs = {s.name: s for s in self.layout.state_specs}
            kv = KVState(self.layout.state, specs)
            feed, out = list(prompt), []
            for _ in range(n):
                outputs = kv.run(self.session, self.layout.token_feed(feed, kv.length), len(feed))
                logits = select_next(outputs[self.layout.logits])
                if params.greedy:
                    token = int(np.argmax(logits))
                else:
                    token = sample_token(logits, params, kv.length)
                if token in self.eos:
                    break
                out.append(token)
                feed = [token]
            self._cache[key] = out
        return list(self._cache[key])


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tiny_gpt2_dir) -> dict[str, Reference]:
    return {"llama": Reference(tiny_llama_dir), "gpt2": Reference(tiny_gpt2_dir)}


# -- servers, clients, streams -------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    keys = ThrowawayKeys.create(
        tmp_path_factory.mktemp("generation-keys"), devices=("device", "other-device")
    )
    return SimpleNamespace(
        throwaway=keys,
        server=keys.server,
        device=keys.devices["device"],
        other=keys.devices["other-device"],
        allow=keys.allow_file,
    )


def new_server(bundles: list[Bundle], keys: SimpleNamespace, **config: Any) -> EdgeServer:
    config.setdefault("port", 0)
    config.setdefault("drain_timeout", 2.0)
    return EdgeServer(
        bundles,
        identity=keys.server,
        allow=AllowList(keys.allow),
        config=ServerConfig(host="127.0.0.1", **config),
    )


@contextlib.asynccontextmanager
async def serving(
    bundles: list[Bundle], keys: SimpleNamespace, **config: Any
) -> AsyncIterator[EdgeServer]:
    server = new_server(bundles, keys, **config)
    await asyncio.wait_for(server.start(), STEP)
    try:
        yield server
    finally:
        await asyncio.wait_for(server.shutdown(), STEP)


def make_client(
    bundle: Bundle,
    port: int,
    keys: SimpleNamespace,
    *,
    identity: Any = None,
    fallback: str = "error",
    timeout: float = STEP,
) -> OffloadClient:
    return OffloadClient(
        bundle,
        server=f"ws://127.0.0.1:{port}",
        server_key=keys.server.public,
        identity=identity or keys.device,
        fallback=fallback,
        timeout=timeout,
        connect_timeout=2.0,
    )


async def collect(
    stream: Generation,
    on_token: Callable[[int], Awaitable[None]] | None = None,
    items: list[GeneratedToken] | None = None,
) -> list[GeneratedToken]:
    """Every item of a generation stream, each bounded; ``on_token(k)`` runs after the k-th
    generated token, while the stream is suspended (the device is between two tokens).
    Items are appended to ``items`` as they come (kept when the stream raises)."""
    items = [] if items is None else items
    count = 0
    try:
        while True:
            try:
                item = await asyncio.wait_for(anext(stream), STEP)
            except StopAsyncIteration:
                break
            items.append(item)
            if item.token_id >= 0:
                count += 1
                if on_token is not None:
                    await on_token(count)
    finally:
        await asyncio.wait_for(stream.aclose(), STEP)
    return items


def ids(items: list[GeneratedToken]) -> list[int]:
    """Generated token ids (the stream may end with a text-only flush item, id -1)."""
    return [t.token_id for t in items if t.token_id >= 0]


def only_session_id(server: EdgeServer) -> int:
    # SessionStore has no public listing; the test needs the id to drop it "from outside".
    (session_id,) = list(server.sessions._sessions)
    return session_id


def tail_kv_bytes_per_token(bundle: Bundle) -> int:
    manifest = bundle.manifest
    state = {e["input"]: e["output"] for e in manifest.state}
    layout = DecoderLayout.of(manifest.graph_inputs, manifest.graph_outputs, state)
    return layout.kv_bytes_per_token([e["input"] for e in manifest.state if e["side"] == "server"])


# -- a: greedy and sampled tokens equal the unsplit model's ---------------------------------------


@pytest.mark.parametrize("head_layers", [1, 2])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_split_generation_gives_the_unsplit_models_tokens(
    kind, head_layers, tiny_decoder_bundle, reference, keys
):
    bundle = tiny_decoder_bundle(kind, head_layers)
    ref = reference[kind]

    async def main():
        async with serving([bundle], keys) as server:
            client = make_client(bundle, server.port, keys)
            async with client:
                for prompt in PROMPTS:
                    stream = client.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS)
                    items = await collect(stream)
                    expected = ref.generate(prompt)
                    assert ids(items) == expected, prompt
                    stats = stream.stats
                    assert stats.prompt_tokens == len(prompt)
                    assert stats.generated_tokens == len(expected)
                    assert stats.finish_reason == ("length" if len(expected) == 40 else "eos")
                    assert stats.recoveries == 0 and stats.fallback_reason == ""
                    assert all(t.offloaded for t in items)
                    assert [t.index for t in items if t.token_id >= 0] == list(range(len(expected)))
                # Sampled: varied tokens, so a wrong position or cache shows at once.
                prompt = PROMPTS[0]
                items = await collect(
                    client.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, **SAMPLED)
                )
                assert ids(items) == ref.generate(prompt, **SAMPLED)
                assert len(set(ids(items))) >= 10
            assert len(server.sessions) == 0  # every generation ended its session
            assert server.stats.errors == {}

    run_async(main())


def test_text_prompt_with_chat_template(tiny_llama_dir, tiny_llama_bundle, reference, keys):
    """The bundle's tokenizer and chat template give the prompt transformers gives."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    chat = [{"role": "user", "content": TEXT_PROMPT}]
    chat_ids = list(hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True))
    plain_ids = hf(TEXT_PROMPT)["input_ids"]
    assert chat_ids[: len(plain_ids)] != plain_ids  # the template is really applied
    ref = reference["llama"]

    async def main():
        async with serving([tiny_llama_bundle], keys) as server:
            client = make_client(tiny_llama_bundle, server.port, keys)
            async with client:
                results = {}
                for label, kwargs in {
                    "chat": {"prompt": TEXT_PROMPT},
                    "messages": {"messages": chat},
                    "plain": {"prompt": TEXT_PROMPT, "chat": False},
                }.items():
                    stream = client.generate(max_new_tokens=32, **kwargs)
                    items = await collect(stream)
                    results[label] = (items, stream.stats.prompt_tokens)
                return results

    results = run_async(main())
    for label, prompt in (("chat", chat_ids), ("messages", chat_ids), ("plain", plain_ids)):
        items, prompt_tokens = results[label]
        assert prompt_tokens == len(prompt), label
        expected = ref.generate(prompt, 32)
        assert ids(items) == expected, label
        # The streamed pieces are the text of the generated ids.
        text = "".join(t.text for t in items)
        assert text == hf.decode(expected, skip_special_tokens=True), label


def test_blocking_client_generate(tiny_gpt2_bundle, reference, keys):
    """BlockingOffloadClient.generate: a plain iterator, for apps without an event loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = new_server([tiny_gpt2_bundle], keys)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(STEP)
    try:
        with BlockingOffloadClient(
            tiny_gpt2_bundle,
            server=f"ws://127.0.0.1:{server.port}",
            server_key=keys.server.public,
            identity=keys.device,
            fallback="error",
            timeout=STEP,
        ) as client:
            prompt = PROMPTS[1]
            got = [t.token_id for t in client.generate(input_ids=prompt, max_new_tokens=32)]
            assert [t for t in got if t >= 0] == reference["gpt2"].generate(prompt, 32)
            # Leaving early ends the session on the server too.
            stream = client.generate(input_ids=prompt, max_new_tokens=32, **SAMPLED)
            first = [next(stream) for _ in range(5)]
            stream.close()
            assert [t.token_id for t in first] == reference["gpt2"].generate(prompt, 32, **SAMPLED)[
                :5
            ]
        assert len(server.sessions) == 0
    finally:
        asyncio.run_coroutine_threadsafe(server.shutdown(), loop).result(STEP)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


# -- b: sampling -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sampling_is_reproducible_and_depends_on_the_seed(
    kind, tiny_decoder_bundle, reference, keys
):
    bundle = tiny_decoder_bundle(kind, 2)
    prompt = PROMPTS[0]

    async def main():
        async with serving([bundle], keys) as server:
            client = make_client(bundle, server.port, keys)
            async with client:
                runs = []
                for seed in (7, 7, 8):
                    params = dict(SAMPLED, seed=seed)
                    runs.append(
                        ids(
                            await collect(
                                client.generate(
                                    input_ids=prompt, max_new_tokens=NEW_TOKENS, **params
                                )
                            )
                        )
                    )
                return runs

    first, again, other_seed = run_async(main())
    assert first == again
    assert first != other_seed
    assert first == reference[kind].generate(prompt, **SAMPLED)
    assert other_seed == reference[kind].generate(prompt, **dict(SAMPLED, seed=8))
    greedy = reference[kind].generate(prompt)
    assert first != greedy and len(set(first)) >= 10  # these settings really sample


# -- c: recovery -----------------------------------------------------------------------------------


def test_evicted_or_expired_session_is_rebuilt_by_replay(tiny_llama_bundle, reference, keys):
    """Dropped twice mid-reply, then expired by a clock jump: the same tokens, all offloaded."""
    prompt = PROMPTS[0]
    expected = reference["llama"].generate(prompt, **SAMPLED)

    async def main():
        async with serving([tiny_llama_bundle], keys) as server:
            client = make_client(tiny_llama_bundle, server.port, keys)

            async def interfere(k: int) -> None:
                if k in (5, 20):
                    server.sessions.drop(only_session_id(server))
                elif k == 30:  # the session outlives its TTL: expired at its next use
                    server.clock = lambda: time.monotonic() + 10 * server.config.session_ttl

            async with client:
                stream = client.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, **SAMPLED)
                items = await collect(stream, interfere)
                return items, stream.stats, server.sessions.expired

    items, stats, expired = run_async(main())
    assert ids(items) == expected
    assert stats.recoveries == 3 and stats.fallback_reason == ""
    assert expired >= 1
    assert all(t.offloaded for t in items)


def test_kv_budget_eviction_between_two_concurrent_devices(tiny_llama_bundle, reference, keys):
    """Room for one reply's cache, not two: they evict each other and both still come out right."""
    per_token = tail_kv_bytes_per_token(tiny_llama_bundle)
    prompts = (PROMPTS[0], PROMPTS[2])
    budget = per_token * (len(prompts[1]) + 40 + 8)  # the longer reply fits alone

    async def main():
        async with serving([tiny_llama_bundle], keys, kv_budget=budget) as server:
            clients = [
                make_client(tiny_llama_bundle, server.port, keys, identity=identity)
                for identity in (keys.device, keys.other)
            ]
            async with clients[0], clients[1]:
                streams = [
                    c.generate(input_ids=p, max_new_tokens=NEW_TOKENS, **SAMPLED)
                    for c, p in zip(clients, prompts, strict=True)
                ]
                outputs = await asyncio.gather(*(collect(stream) for stream in streams))
                stats = [stream.stats for stream in streams]
            return outputs, stats, server.sessions.evicted

    outputs, stats, evicted = run_async(main())
    for items, prompt in zip(outputs, prompts, strict=True):
        assert ids(items) == reference["llama"].generate(prompt, **SAMPLED)
        assert all(t.offloaded for t in items)
    assert evicted >= 1
    assert sum(s.recoveries for s in stats) >= 1


def test_server_restart_mid_generation(tiny_gpt2_bundle, reference, keys):
    """The server stops, comes back on the same port with the same keys: same tokens."""
    prompt = PROMPTS[0]

    async def main():
        first = new_server([tiny_gpt2_bundle], keys)
        await asyncio.wait_for(first.start(), STEP)
        port = first.port
        servers = [first]

        async def restart() -> None:
            await asyncio.sleep(0.3)  # the device finds no server for a while and retries
            second = new_server([tiny_gpt2_bundle], keys, port=port)
            await asyncio.wait_for(second.start(), STEP)
            servers.append(second)

        tasks = []

        async def interfere(k: int) -> None:
            if k == 12:
                await asyncio.wait_for(first.shutdown(), STEP)
                tasks.append(asyncio.create_task(restart()))

        client = make_client(tiny_gpt2_bundle, port, keys)
        try:
            async with client:
                stream = client.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, **SAMPLED)
                items = await collect(stream, interfere)
            await asyncio.wait_for(asyncio.gather(*tasks), STEP)
            return items, stream.stats, servers[-1].stats.results
        finally:
            for server in servers[1:]:
                await asyncio.wait_for(server.shutdown(), STEP)

    items, stats, second_results = run_async(main())
    assert ids(items) == reference["gpt2"].generate(prompt, **SAMPLED)
    assert stats.recoveries >= 1 and stats.fallback_reason == ""
    assert all(t.offloaded for t in items)
    assert second_results >= 40 - 12  # the rest of the reply came from the new server


@pytest.mark.parametrize("fallback", ["local", "error"])
def test_server_gone_for_good(fallback, tiny_llama_bundle, reference, keys):
    """No server comes back: the reply finishes on the device, or fails within the timeout."""
    prompt = PROMPTS[0]
    timeout = 2.0
    kill_after = 10

    async def main():
        server = new_server([tiny_llama_bundle], keys)
        await asyncio.wait_for(server.start(), STEP)
        killed_at: list[float] = []

        async def interfere(k: int) -> None:
            if k == kill_after:
                await asyncio.wait_for(server.shutdown(), STEP)
                killed_at.append(time.monotonic())

        client = make_client(
            tiny_llama_bundle, server.port, keys, fallback=fallback, timeout=timeout
        )
        items: list[GeneratedToken] = []
        error = None
        async with client:
            stream = client.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, **SAMPLED)
            try:
                await collect(stream, interfere, items)
            except OffloadUnavailable as exc:
                error = exc
        return items, error, time.monotonic() - killed_at[0], stream.stats

    items, error, elapsed, stats = run_async(main())
    expected = reference["llama"].generate(prompt, **SAMPLED)
    assert elapsed < timeout + 3.0, "bounded by the client's timeout"
    assert stats.recoveries >= 1
    got = ids(items)
    if fallback == "local":
        assert error is None
        assert got == expected
        assert stats.fallback_reason
        offloaded = [t.offloaded for t in items if t.token_id >= 0]
        assert offloaded == [True] * kill_after + [False] * (len(got) - kill_after)
    else:
        assert isinstance(error, OffloadUnavailable)
        assert got == expected[:kill_after]


def test_server_process_killed_mid_generation(tiny_llama_bundle, reference, keys):
    """`edgeoffload serve` in its own process, SIGKILLed between two tokens."""
    server = spawn_server([tiny_llama_bundle.path], keys.throwaway)
    proc, port = server.process, server.port
    prompt = PROMPTS[2]
    try:

        async def main():
            async def interfere(k: int) -> None:
                if k == 8:
                    os.kill(proc.pid, signal.SIGKILL)

            client = make_client(tiny_llama_bundle, port, keys, fallback="local", timeout=2.0)
            async with client:
                stream = client.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS, **SAMPLED)
                items = await collect(stream, interfere)
            return items, stream.stats

        items, stats = run_async(main())
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait(10)
    assert ids(items) == reference["llama"].generate(prompt, **SAMPLED)
    assert stats.fallback_reason
    offloaded = [t.offloaded for t in items if t.token_id >= 0]
    assert offloaded[:8] == [True] * 8 and not any(offloaded[8:])


def test_context_limit_of_the_server_ends_the_reply(tiny_llama_bundle, reference, keys):
    prompt = PROMPTS[0]

    async def main():
        async with serving([tiny_llama_bundle], keys, max_context=16) as server:
            client = make_client(tiny_llama_bundle, server.port, keys)
            async with client:
                stream = client.generate(input_ids=prompt, max_new_tokens=NEW_TOKENS)
                items = await collect(stream)
                stats = stream.stats
                with pytest.raises(SessionError) as info:  # longer than the server allows
                    await collect(client.generate(input_ids=list(range(3, 23))))
                assert type(info.value) is SessionError and "16" in str(info.value)
                assert len(server.sessions) == 0
                return items, stats

    items, stats = run_async(main())
    # The server grants 16 positions: the prompt's 5, then one per step; the last token
    # sampled needs no position of its own.
    expected = reference["llama"].generate(prompt)[: 16 - len(prompt) + 1]
    assert ids(items) == expected
    assert stats.finish_reason == ("context" if len(expected) == 12 else "eos")


# -- d: hostile and malformed session messages -----------------------------------------------------


def _lying_steps(chunk: Chunk) -> dict[str, list[tuple[str, EncodedTensor]]]:
    """Tensors of a one-token step that do not match the bundle's crossing specs."""
    tensors = list(chunk.tensors)
    hidden_index, (hidden_name, hidden) = next(
        (i, (n, t)) for i, (n, t) in enumerate(tensors) if t.dtype == "float32"
    )
    data = bytes(hidden.data)

    def with_hidden(t: EncodedTensor) -> list[tuple[str, EncodedTensor]]:
        out = list(tensors)
        out[hidden_index] = (hidden_name, t)
        return out

    as64 = np.frombuffer(data, dtype="<f4").astype("<f8").tobytes()
    narrower = (*hidden.shape[:-1], hidden.shape[-1] - 1)
    return {
        "missing-tensor": tensors[:hidden_index] + tensors[hidden_index + 1 :],
        "extra-tensor": [*tensors, ("extra", hidden)],
        "renamed-tensor": [
            ("not-" + n if i == hidden_index else n, t) for i, (n, t) in enumerate(tensors)
        ],
        "float64-for-float32": with_hidden(replace(hidden, dtype="float64", data=as64)),
        "wrong-fixed-dim": with_hidden(replace(hidden, shape=narrower, data=data[:-4])),
        "short-data": with_hidden(replace(hidden, data=data[:-1])),
        "wrong-codec": with_hidden(replace(hidden, codec="fp16", data=data[: len(data) // 2])),
    }


def test_hostile_session_messages_get_typed_errors(tiny_llama_bundle, reference, keys):
    """Each hostile message gets its typed error; the attacker's connection keeps working and
    an honest reply on the same server comes out right without any recovery."""
    per_token = tail_kv_bytes_per_token(tiny_llama_bundle)
    honest_prompt = PROMPTS[0]
    prompt = [7, 8, 9]
    first_token = reference["llama"].generate(prompt, 2)

    async def main():
        async with serving(
            [tiny_llama_bundle], keys, max_context=256, kv_budget=200 * per_token
        ) as server:
            honest = make_client(tiny_llama_bundle, server.port, keys)
            victim = make_client(tiny_llama_bundle, server.port, keys)
            attacker = make_client(tiny_llama_bundle, server.port, keys, identity=keys.other)
            async with honest, victim, attacker:
                # Raw links: these calls name the server's own session ids.
                victim_link, attacker_link = victim.links[0], attacker.links[0]
                # Honest generation, running during the whole attack; it starts slowly.
                slow = asyncio.Event()

                async def pace(k: int) -> None:
                    if k == 3:
                        await asyncio.wait_for(slow.wait(), STEP)

                honest_stream = honest.generate(
                    input_ids=honest_prompt, max_new_tokens=NEW_TOKENS, **SAMPLED
                )
                honest_task = asyncio.create_task(collect(honest_stream, pace))

                async def expect(error: type[Exception], call: Awaitable[Any]) -> Exception:
                    with pytest.raises(error) as info:
                        await asyncio.wait_for(call, STEP)
                    assert attacker_link.connected, f"{error.__name__}: the connection was dropped"
                    return info.value

                # The victim: another device's session, mid-conversation.
                v_device = DecoderDevice(victim.runtime)
                v_session, _ = await victim_link.open_session({}, 64)
                token, _, _ = await victim_link.feed_session(
                    "prefill", v_session, 0, [v_device.head(prompt)]
                )
                assert token.token == first_token[0] and token.pos == len(prompt)

                device = DecoderDevice(attacker.runtime)
                step = device.head([first_token[0]])  # a well-formed one-token chunk

                # Sessions that are not the attacker's: lost, exactly like unknown ones.
                await expect(SessionLost, attacker_link.feed_session("step", 12345, 3, [step]))
                await expect(SessionLost, attacker_link.feed_session("step", v_session, 3, [step]))
                await expect(SessionLost, attacker_link.end_session(v_session))

                # Bad opens.
                for sampling in ({"temperature": -1.0}, {"top_p": 0.0}, {"bogus": 1}):
                    exc = await expect(SessionError, attacker_link.open_session(sampling, 64))
                    assert type(exc) is SessionError
                await expect(SessionError, attacker_link.open_session({}, 0))
                _, granted = await attacker_link.open_session({}, 10**9)
                assert granted == 256  # capped at the server's max_context

                session, granted = await attacker_link.open_session({}, 64)
                assert granted == 64
                fresh = DecoderDevice(attacker.runtime)
                chunk = fresh.head(prompt)
                exc = await expect(
                    SessionError, attacker_link.feed_session("step", session, 0, [step])
                )
                assert type(exc) is SessionError and "before any prefill" in str(exc)
                exc = await expect(
                    SessionError, attacker_link.feed_session("prefill", session, 2, [chunk])
                )
                assert type(exc) is SessionError and "position" in str(exc)
                # A chunk whose n does not match its tensors; the session stays as it was.
                for n in (len(prompt) + 1, len(prompt) - 1):
                    exc = await expect(
                        SessionError,
                        attacker_link.feed_session(
                            "prefill", session, 0, [Chunk(n, chunk.tensors)]
                        ),
                    )
                    assert type(exc) is SessionError
                # Tensors that do not match the crossing specs.
                for label, tensors in _lying_steps(chunk).items():
                    lie = Chunk(len(prompt), tuple(tensors))
                    exc = await expect(
                        PayloadError, attacker_link.feed_session("prefill", session, 0, [lie])
                    )
                    assert label and exc
                # Now the honest prefill on the same session and connection.
                token, _, _ = await attacker_link.feed_session("prefill", session, 0, [chunk])
                assert (token.pos, token.token) == (len(prompt), first_token[0])
                # Position jumps, backwards and forwards; a step that repeats a position.
                nxt = fresh.head([first_token[0]])
                for pos in (0, len(prompt) - 1, len(prompt) + 1, 1000):
                    exc = await expect(
                        SessionError, attacker_link.feed_session("step", session, pos, [nxt])
                    )
                    assert type(exc) is SessionError
                # Two steps at once on one session: one of them is refused.
                both = await asyncio.wait_for(
                    asyncio.gather(
                        attacker_link.feed_session("step", session, len(prompt), [nxt]),
                        attacker_link.feed_session("step", session, len(prompt), [nxt]),
                        return_exceptions=True,
                    ),
                    STEP,
                )
                refused = [r for r in both if isinstance(r, Exception)]
                answered = [r for r in both if not isinstance(r, Exception)]
                assert len(refused) == 1 and type(refused[0]) is SessionError, both
                assert answered[0][0].token == first_token[1]
                # Past the session's own max_tokens, and past the server's KV budget.
                exc = await expect(
                    SessionError,
                    attacker_link.feed_session(
                        "prefill", session, len(prompt) + 1, [fresh.head(list(range(3, 64)))]
                    ),
                )
                assert type(exc) is SessionError and "budget" in str(exc)
                big, granted = await attacker_link.open_session({}, 256)
                long_prompt = [int(t) for t in np.arange(210) % 300 + 3]
                exc = await expect(
                    SessionError,
                    attacker_link.feed_session(
                        "prefill", big, 0, [DecoderDevice(attacker.runtime).head(long_prompt)]
                    ),
                )
                assert type(exc) is SessionError and "budget" in str(exc)
                # Ended sessions are gone.
                await attacker_link.end_session(session)
                await expect(SessionLost, attacker_link.end_session(session))
                await expect(
                    SessionLost, attacker_link.feed_session("step", session, len(prompt) + 1, [nxt])
                )

                # The attacker's connection still works for honest work.
                assert await asyncio.wait_for(attacker.ping(), STEP) > 0
                mine = await collect(attacker.generate(input_ids=prompt, max_new_tokens=8))
                assert ids(mine) == reference["llama"].generate(prompt, 8)
                # The victim's session was not touched by any of it.
                token, _, _ = await victim_link.feed_session(
                    "step", v_session, len(prompt), [v_device.head([first_token[0]])]
                )
                assert token.token == first_token[1]
                await victim_link.end_session(v_session)

                slow.set()
                items = await asyncio.wait_for(honest_task, 30)
                return items, honest_stream.stats, server.sessions.evicted

    items, stats, evicted = run_async(main())
    assert ids(items) == reference["llama"].generate(honest_prompt, **SAMPLED)
    assert stats.recoveries == 0
    assert evicted == 0


def test_a_refused_feed_evicts_nobody(tiny_llama_bundle, keys):
    """The KV budget makes room only for growth that really happens.

    A feed that claims many positions but is refused (its tensors hold fewer positions, or
    they do not match the bundle) must not evict other devices' idle sessions on the way.
    """
    per_token = tail_kv_bytes_per_token(tiny_llama_bundle)
    prompt = [7, 8, 9]

    async def main():
        async with serving(
            [tiny_llama_bundle], keys, max_context=256, kv_budget=40 * per_token
        ) as server:
            victim = make_client(tiny_llama_bundle, server.port, keys)
            attacker = make_client(tiny_llama_bundle, server.port, keys, identity=keys.other)
            async with victim, attacker:
                v_device = DecoderDevice(victim.runtime)
                v_session, _ = await victim.open_session({}, 64)
                await victim.feed_session("prefill", v_session, 0, [v_device.head(prompt * 6)])
                session, _ = await attacker.open_session({}, 64)
                chunk = DecoderDevice(attacker.runtime).head(prompt)
                with pytest.raises(SessionError):  # claims 30 positions, carries 3
                    await attacker.feed_session("prefill", session, 0, [Chunk(30, chunk.tensors)])
                missing = _lying_steps(chunk)["missing-tensor"]
                with pytest.raises(PayloadError):  # claims 30 positions, carries a lie
                    await attacker.feed_session("prefill", session, 0, [Chunk(30, tuple(missing))])
                evicted = server.sessions.evicted
                try:  # the victim's session should still be there
                    token, _, _ = await victim.feed_session(
                        "step", v_session, 18, [v_device.head([5])]
                    )
                except SessionLost as exc:
                    return evicted, exc
                return evicted, token

    evicted, token = run_async(main())
    assert evicted == 0, f"a refused feed evicted {evicted} other session(s)"
    assert not isinstance(token, Exception) and token.pos == 19


def test_a_feed_that_cannot_be_sampled_leaves_the_session_unchanged(
    tiny_llama_bundle, reference, keys
):
    """All or nothing (PROTOCOL.md §12.4): residual-stream values that make the logits NaN get
    an error, and the session still holds what it held before, so the right feed works."""
    prompt = [7, 8, 9]
    first_token = reference["llama"].generate(prompt, 1)

    async def main():
        async with serving([tiny_llama_bundle], keys) as server:
            client = make_client(tiny_llama_bundle, server.port, keys)
            async with client:
                session, _ = await client.open_session({}, 64)
                chunk = DecoderDevice(client.runtime).head(prompt)
                tensors = list(chunk.tensors)
                index = max(range(len(tensors)), key=lambda i: tensors[i][1].shape[-1])
                name, hidden = tensors[index]
                nan = np.full(hidden.shape, np.nan, dtype=np.float32).tobytes()
                tensors[index] = (name, replace(hidden, data=nan))
                with pytest.raises(SessionError) as info:
                    await asyncio.wait_for(
                        client.feed_session(
                            "prefill", session, 0, [Chunk(len(prompt), tuple(tensors))]
                        ),
                        STEP,
                    )
                assert type(info.value) is SessionError
                token, _, _ = await asyncio.wait_for(
                    client.feed_session("prefill", session, 0, [chunk]), STEP
                )
                return token

    token = run_async(main())
    assert (token.pos, token.token) == (len(prompt), first_token[0])


def test_a_feed_refused_before_sending_leaves_no_orphan_reply_future(tiny_llama_bundle, keys):
    """A feed the client refuses to send (a step of two positions, a message over the server's
    limit) raises at once and leaves nothing waiting for a reply that never comes (which
    would surface later as "Future exception was never retrieved")."""
    import gc

    async def main():
        loop = asyncio.get_running_loop()
        unhandled: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
        async with serving([tiny_llama_bundle], keys) as server:
            client = make_client(tiny_llama_bundle, server.port, keys)
            async with client:
                session, _ = await client.open_session({}, 64)
                chunk = DecoderDevice(client.runtime).head([7, 8])
                with pytest.raises(LocalProtocolError):
                    await client.feed_session("step", session, 0, [chunk])
                limit = client.max_request_bytes
                assert limit is not None
                big = EncodedTensor("float32", (limit // 4 + 1,), "none", bytes(limit + 4))
                with pytest.raises(PayloadError):
                    await client.feed_session("prefill", session, 0, [Chunk(1, (("x", big),))])
                token, _, _ = await client.feed_session("prefill", session, 0, [chunk])
                assert token.pos == 2
        gc.collect()
        await asyncio.sleep(0)
        return [c.get("message") for c in unhandled]

    assert run_async(main()) == []


def test_a_message_over_the_servers_limit_is_refused_by_the_client(tiny_llama_bundle, keys):
    """The client's size check counts what goes on the wire (framing and AEAD tags too): a feed
    whose tensors alone are exactly the server's ``max_message`` is refused locally with
    PayloadError, instead of reaching the server's websocket limit (close 1009), which would
    drop the connection and everything in flight on it."""

    async def main():
        async with serving([tiny_llama_bundle], keys) as server:
            client = make_client(tiny_llama_bundle, server.port, keys)
            async with client:
                session, _ = await client.open_session({}, 64)
                limit = client.max_request_bytes
                assert limit is not None
                big = EncodedTensor("float32", (limit // 4,), "none", bytes(limit))
                with pytest.raises(PayloadError):
                    await asyncio.wait_for(
                        client.feed_session("prefill", session, 0, [Chunk(1, (("x", big),))]),
                        STEP,
                    )
                assert client.connected

    run_async(main())


async def raw_connection(server: EdgeServer, bundle: Bundle, keys: SimpleNamespace):
    """A websocket with a completed handshake, driven by the sans-I/O protocol client."""
    manifest = bundle.manifest
    conn = ProtocolClient(
        static=keys.device,
        server_public=keys.server.public,
        bundle=manifest.identity,
        version=manifest.version,
        time_ns=time.time_ns(),
    )
    conn.start()
    ws = await asyncio.wait_for(
        connect(f"ws://127.0.0.1:{server.port}", compression=None, proxy=None), STEP
    )
    for data in conn.data_to_send():
        await ws.send(data)
    (event,) = conn.receive(await asyncio.wait_for(ws.recv(), STEP))
    assert isinstance(event, HandshakeComplete)
    return ws, conn


async def exchange(ws: Any, conn: ProtocolClient, replies: int = 1) -> list[Any]:
    for data in conn.data_to_send():
        await ws.send(data)
    return [conn.receive(await asyncio.wait_for(ws.recv(), STEP))[0] for _ in range(replies)]


def test_forged_session_messages_close_the_connection(tiny_llama_bundle, reference, keys):
    """Malformed session messages (wrong types, impossible values, a server's message) are
    protocol errors: close 4400. The server goes on serving others."""
    chunk = DecoderDevice(DeviceRuntime(tiny_llama_bundle)).head([7, 8, 9])
    tensors = encode_tensors(chunk.tensors)
    feed = {"id": 1, "session": 7, "pos": 0}
    forged = {
        "negative-pos": {"t": "step", **feed, "pos": -1, "tensors": tensors},
        "bool-session": {"t": "step", **feed, "session": True, "tensors": tensors},
        "huge-session": {"t": "end", "id": 1, "session": 2**64 - 1},
        "no-chunks": {"t": "prefill", **feed, "chunks": []},
        "zero-n": {"t": "prefill", **feed, "chunks": [{"n": 0, "tensors": tensors}]},
        "chunk-not-a-map": {"t": "prefill", **feed, "chunks": [3]},
        "chunk-extra-field": {
            "t": "prefill",
            **feed,
            "chunks": [{"n": 3, "tensors": tensors, "pos": 0}],
        },
        "step-with-chunks": {"t": "step", **feed, "chunks": [{"n": 1, "tensors": tensors}]},
        "open-without-sampling": {"t": "open", "id": 1, "max_tokens": 8},
        "sampling-not-a-map": {"t": "open", "id": 1, "sampling": [], "max_tokens": 8},
        "server-message": {"t": "token", **feed, "token": 2, "server_ms": 1.0},
    }

    async def main():
        async with serving([tiny_llama_bundle], keys) as server:
            for name, message in forged.items():
                ws, conn = await raw_connection(server, tiny_llama_bundle, keys)
                assert conn.transport is not None
                await ws.send(conn.transport.encrypt(pack(message)))
                with pytest.raises(ConnectionClosed) as info:
                    await asyncio.wait_for(ws.recv(), STEP)
                assert info.value.rcvd is not None, name
                assert info.value.rcvd.code == CLOSE_PROTOCOL, (name, info.value.rcvd)
            # Well-formed messages about an unknown session: an error reply, no close.
            ws, conn = await raw_connection(server, tiny_llama_bundle, keys)
            conn.send_end(5, 99)
            conn.send_feed(6, "prefill", 99, 0, [chunk])
            conn.send_ping(7, b"x")
            events = await exchange(ws, conn, 3)
            assert [(type(e), e.request_id) for e in events] == [
                (ErrorReply, 5),
                (ErrorReply, 6),
                (Pong, 7),
            ]
            assert events[0].code == events[1].code == "session_lost"
            await ws.close()
            client = make_client(tiny_llama_bundle, server.port, keys)
            async with client:
                items = await collect(client.generate(input_ids=PROMPTS[0], max_new_tokens=8))
            assert ids(items) == reference["llama"].generate(PROMPTS[0], 8)

    run_async(main())


# -- e: run() against a decoder bundle -------------------------------------------------------------


def test_run_request_against_a_decoder_bundle_gets_a_session_error(tiny_llama_bundle, keys):
    """On the wire: a decoder is served through sessions only; `run` gets an error reply with
    code "session" and the connection stays open."""
    chunk = DecoderDevice(DeviceRuntime(tiny_llama_bundle)).head([7, 8, 9])

    async def main():
        async with serving([tiny_llama_bundle], keys) as server:
            ws, conn = await raw_connection(server, tiny_llama_bundle, keys)
            conn.send_run(11, list(chunk.tensors))
            conn.send_ping(12, b"")
            reply, pong = await exchange(ws, conn, 2)
            assert isinstance(reply, ErrorReply) and reply.request_id == 11
            assert reply.code == "session"
            assert "decoder" in reply.message and "session" in reply.message
            assert isinstance(pong, Pong)
            await ws.close()

    run_async(main())


@pytest.mark.parametrize("fallback", ["error", "local"])
def test_client_run_on_a_decoder_bundle_fails_clearly(fallback, tiny_llama_bundle, keys):
    """OffloadClient.run on a decoder bundle: a typed error that says to use generate(), with
    either fallback policy, not hidden behind a retry, a fallback or a KeyError."""

    async def main():
        async with serving([tiny_llama_bundle], keys) as server:
            client = make_client(tiny_llama_bundle, server.port, keys, fallback=fallback)
            async with client:
                with pytest.raises((UsageError, SessionError)) as info:
                    await asyncio.wait_for(client.run(_decoder_inputs(client)), STEP)
                message = f"{info.value.message} {info.value.hint or ''}"
                assert "decoder" in message and "generate" in message, message
            assert server.stats.connections <= 1  # no retry on a fresh connection

    run_async(main())


def _decoder_inputs(client: OffloadClient) -> dict[str, np.ndarray]:
    """Valid inputs of the whole decoder graph: three tokens, an empty cache."""
    layout = DecoderDevice(client.runtime).layout
    inputs = layout.token_feed([7, 8, 9], 0)
    for spec in layout.state_specs:
        shape = [0 if isinstance(d, str) and "past" in d else d for d in spec.shape]
        inputs[spec.name] = np.zeros([1 if isinstance(d, str) else d for d in shape], np.float32)
    return inputs


# -- a prompt too large for one message ----------------------------------------------------------


def test_a_prompt_larger_than_one_message_is_prefilled_in_chunks(
    tiny_llama_bundle, reference, keys
):
    """The server's message limit is lowered (as a small deployment would) so that a 300-token
    prompt's crossing tensors (183 KB, most of it the 300 x 300 mask) do not fit one message: the
    device runs its head over fewer positions at a time and sends several prefills."""
    ref = reference["llama"]
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, 384, 300)]

    async def main():
        server = new_server([tiny_llama_bundle], keys)
        server.max_message = 128 * 1024  # the limit announced in the handshake and enforced
        await asyncio.wait_for(server.start(), STEP)
        try:
            client = make_client(tiny_llama_bundle, server.port, keys)
            async with client:
                stream = client.generate(input_ids=prompt, max_new_tokens=16)
                items = await collect(stream)
                stats = stream.stats
                assert stats.recoveries == 0
                device_chunks = stats.bytes_up - sum(stats.step_bytes)
                assert device_chunks > server.max_message  # it did not fit one message
                assert server.stats.errors == {}
                return ids(items)
        finally:
            await asyncio.wait_for(server.shutdown(), STEP)

    got = run_async(main())
    # A chunked prefill runs other matrix shapes than one prefill; the tokens still agree here.
    assert got == ref.generate(prompt, n=16)
