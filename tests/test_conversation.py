"""Multi-turn chat with both KV caches kept between turns (device.conversation).

The oracle is a full re-prefill: the unsplit tiny Llama (test_generation_e2e's Reference) run
from scratch on each turn's whole conversation, rendered by the chat template as a stateless
client would. Every turn's reply must be exactly its tokens, while the device prefills only the
new turn (``reused_tokens`` counts what was kept) on the same server session. Then the hard
ways: a rolled-back conversation (the re-rendered history differs from the caches), a session
the server lost between turns, and a server that died for good with local fallback. Real
EdgeServer on 127.0.0.1, real Noise, real onnxruntime.
"""

from __future__ import annotations

import asyncio

import pytest
from test_generation_e2e import (  # the generation suite's oracle, keys and servers
    SAMPLED,
    collect,
    ids,
    keys,  # noqa: F401  (a fixture)
    make_client,
    reference,  # noqa: F401  (a fixture)
    run_async,
    serving,
)

from edgeoffload.device.conversation import common_prefix
from edgeoffload.device.tokenizer import TextTokenizer
from edgeoffload.errors import UsageError

TURNS = ("Hello! How are you today?", "Tell me more.", "And then what happened next?")
NEW_TOKENS = 24


def _rendered(tokenizer: TextTokenizer, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2


@pytest.mark.parametrize("sampling", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_each_turn_prefills_only_what_is_new_and_equals_a_full_re_prefill(
    sampling,
    tiny_llama_bundle,
    reference,  # noqa: F811  (the imported fixture)
    keys,  # noqa: F811  (the imported fixture)
):
    ref = reference["llama"]
    tokenizer = TextTokenizer.from_dir(tiny_llama_bundle.path / "tokenizer")

    async def main():
        async with serving([tiny_llama_bundle], keys) as server:
            client = make_client(tiny_llama_bundle, server.port, keys)
            async with client:
                chat = client.conversation(system="You are terse.", max_context=512, **sampling)
                turns = []
                for text in TURNS:
                    messages = [*chat.messages, {"role": "user", "content": text}]
                    expected_prompt = _rendered(tokenizer, messages)
                    stream = chat.say(text, max_new_tokens=NEW_TOKENS)
                    items = await collect(stream)
                    turns.append((expected_prompt, ids(items), stream.stats, chat.session))
                    assert len(server.sessions) == 1  # one session for the whole chat
                await chat.close()
                assert len(server.sessions) == 0
            return turns, chat.rollbacks, server.stats.errors

    turns, rollbacks, errors = run_async(main())
    assert errors == {}
    sessions = {session for *_, session in turns}
    assert len(sessions) == 1 or rollbacks > 0
    for i, (prompt, reply, stats, _) in enumerate(turns):
        assert reply == ref.generate(prompt, NEW_TOKENS, **sampling), f"turn {i}"
        assert stats.prompt_tokens == len(prompt)
        if i == 0:
            assert stats.reused_tokens == 0
        elif rollbacks == 0:
            # Everything said before stayed in both caches: only the new turn was prefilled.
            previous_prompt, previous_reply, *_ = turns[i - 1]
            kept = len(previous_prompt) + len(previous_reply) - (len(previous_reply) == NEW_TOKENS)
            assert stats.reused_tokens == kept
            assert stats.reused_tokens > len(prompt) // 2


def test_a_conversation_that_differs_from_its_caches_rolls_back(
    tiny_llama_bundle,
    reference,  # noqa: F811  (the imported fixture)
    keys,  # noqa: F811  (the imported fixture)
):
    """Rewrite the first reply in the history (as an app editing it would): the caches keep
    the common prefix only, the server session is rebuilt, and the reply is still exact."""
    ref = reference["llama"]
    tokenizer = TextTokenizer.from_dir(tiny_llama_bundle.path / "tokenizer")

    async def main():
        async with serving([tiny_llama_bundle], keys) as server:
            client = make_client(tiny_llama_bundle, server.port, keys)
            async with client:
                chat = client.conversation(max_context=512)
                await collect(chat.say(TURNS[0], max_new_tokens=NEW_TOKENS))
                first_session = chat.session
                chat.messages[-1]["content"] = "Fine, thanks."  # not what the model said
                expected_prompt = _rendered(
                    tokenizer, [*chat.messages, {"role": "user", "content": TURNS[1]}]
                )
                stream = chat.say(TURNS[1], max_new_tokens=NEW_TOKENS)
                items = await collect(stream)
                result = (expected_prompt, ids(items), stream.stats, chat.rollbacks)
                second_session = chat.session
                await chat.close()
                await asyncio.sleep(0)  # the dropped session's goodbye has been sent
                return result, first_session, second_session, len(server.sessions)

    (prompt, reply, stats, rollbacks), first, second, left = run_async(main())
    assert rollbacks == 1 and first != second
    assert reply == ref.generate(prompt, NEW_TOKENS)
    assert 0 < stats.reused_tokens < len(prompt)
    assert left == 0  # the dropped session was ended, not left to expire


def test_a_session_lost_between_turns_is_rebuilt_and_the_reply_is_exact(
    tiny_llama_bundle,
    reference,  # noqa: F811  (the imported fixture)
    keys,  # noqa: F811  (the imported fixture)
):
    ref = reference["llama"]
    tokenizer = TextTokenizer.from_dir(tiny_llama_bundle.path / "tokenizer")

    async def main():
        async with serving([tiny_llama_bundle], keys) as server:
            client = make_client(tiny_llama_bundle, server.port, keys)
            async with client:
                chat = client.conversation(max_context=512)
                await collect(chat.say(TURNS[0], max_new_tokens=NEW_TOKENS))
                assert server.sessions.drop_owner(keys.device.public) == 1  # evicted meanwhile
                messages = [*chat.messages, {"role": "user", "content": TURNS[1]}]
                stream = chat.say(TURNS[1], max_new_tokens=NEW_TOKENS)
                items = await collect(stream)
                await chat.close()
                return _rendered(tokenizer, messages), ids(items), stream.stats

    prompt, reply, stats = run_async(main())
    assert reply == ref.generate(prompt, NEW_TOKENS)
    assert stats.recoveries == 1


def test_one_turn_at_a_time_and_a_bundle_without_chat_template_is_refused(
    tiny_llama_bundle,
    tiny_gpt2_bundle,
    keys,  # noqa: F811  (the imported fixture)
):
    async def main():
        async with serving([tiny_llama_bundle], keys) as server:
            client = make_client(tiny_llama_bundle, server.port, keys)
            async with client:
                chat = client.conversation(max_context=512)
                stream = chat.say(TURNS[0], max_new_tokens=4)
                with pytest.raises(UsageError, match="still streaming"):
                    chat.say(TURNS[1])
                await collect(stream)
                with pytest.raises(UsageError, match="may hold"):
                    chat.say("word " * 600)
                await chat.close()

    run_async(main())
    gpt2 = TextTokenizer.from_dir(tiny_gpt2_bundle.path / "tokenizer")
    if not gpt2.has_chat_template:
        client = make_client(tiny_gpt2_bundle, 1, keys)
        with pytest.raises(UsageError, match="chat template"):
            client.conversation()
