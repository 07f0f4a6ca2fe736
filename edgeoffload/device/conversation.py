"""Multi-turn chat that prefills only what is new: both KV caches live from turn to turn.

A stateless chat client sends the whole conversation again at every turn, so the n-th turn's
time to first token grows with everything said before. A :class:`Conversation` keeps its
:class:`~edgeoffload.device.generate.DecoderDevice` (the head's KV cache and the chunks it
sent) and its server session open between turns; each turn renders the chat template over the
whole conversation, as a stateless client would, and prefills only the tokens past what both
caches hold already. The protocol needs nothing new: a prefill at position ``pos > 0`` of an
open session is what a chunked prompt sends anyway (PROTOCOL.md §12).

Token identity with a full re-prefill of the conversation is by construction: the positions
kept are a prefix of the new turn's token ids, compared id by id. Where the re-rendered
conversation differs from what the caches hold (a reply re-tokenized into other ids, a
template that rewrites earlier turns), both caches roll back to the last chunk boundary before
the first difference: the device truncates its head cache and chunk history, and the server
gets a new session rebuilt by replaying the kept chunks (the tail runs exactly the calls it ran
before). A lost session (evicted, expired, the server restarted) is rebuilt the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from edgeoffload.core.sampling import SamplingParams
from edgeoffload.device.channel import SessionChannel
from edgeoffload.device.generate import DecoderDevice, Generation, load_tokenizer
from edgeoffload.errors import UsageError

log = logging.getLogger("edgeoffload.device.conversation")

DEFAULT_CONTEXT = 2048  # positions the conversation's server session asks for


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Conversation:
    """A chat with one decoder bundle whose caches persist between turns.

    Created by :meth:`OffloadClient.conversation`. ``say(text)`` adds a user message and
    returns the reply's stream (a :class:`~edgeoffload.device.generate.Generation`); the
    reply's text joins :attr:`messages` when the stream ends. One turn at a time. ``close()``
    ends the server's session (the client's close does too, by closing the connection).

    Args:
        channel: where sessions are opened (the client, pinned to one bundle version).
        system: an optional system message, first in :attr:`messages`.
        max_context: positions the whole conversation may hold (asked of the server once).
        sampling: the sampling of every reply (a session's sampling is fixed when opened).
        on_close: called once by :meth:`close` (the client's hold on the bundle version).
    """

    def __init__(
        self,
        channel: SessionChannel,
        *,
        system: str | None = None,
        max_context: int = DEFAULT_CONTEXT,
        sampling: SamplingParams | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        tokenizer = load_tokenizer(channel.runtime)
        if tokenizer is None or not tokenizer.has_chat_template:
            raise UsageError(
                "a conversation needs a bundle whose tokenizer has a chat template",
                hint="use generate(input_ids=...) and keep the history yourself",
            )
        if max_context < 2:
            raise UsageError(f"max_context must be at least 2 positions, not {max_context}")
        self.channel = channel
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.sampling = sampling or SamplingParams()
        self.messages: list[dict[str, str]] = (
            [{"role": "system", "content": system}] if system is not None else []
        )
        self.device = DecoderDevice(channel.runtime)
        self.fed: list[int] = []  # the ids both caches hold, position by position
        self.session: int | None = None
        self.rollbacks = 0  # turns that had to roll the caches back (see the module docstring)
        self._turn: Generation | None = None
        self._stale: list[int] = []  # sessions dropped by a rollback, not yet ended
        self._on_close = on_close
        self._tasks: set[asyncio.Task[None]] = set()

    def say(self, text: str, *, max_new_tokens: int = 256, stop: Sequence[str] = ()) -> Generation:
        """Add ``text`` as the user's message; the reply's stream."""
        if self._turn is not None:
            raise UsageError("the previous reply is still streaming: finish or aclose() it")
        messages = [*self.messages, {"role": "user", "content": text}]
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = list(self.tokenizer.encode(rendered, add_special_tokens=False))
        if len(ids) >= self.max_context:
            raise UsageError(
                f"the conversation has {len(ids)} tokens; it may hold {self.max_context}",
                hint="start a new conversation, or open it with a larger max_context",
            )
        self._keep_prefix(ids)
        self.messages = messages
        turn = Generation(
            self.channel,
            on_finish=self._finished,
            prompt=None,
            input_ids=ids,
            messages=None,
            max_new_tokens=max_new_tokens,
            sampling=self.sampling,
            stop=tuple(stop),
            chat=None,
            device=self.device,
            session=self.session,
            context=self.max_context,
            keep_session=True,
        )
        self._turn = turn
        return turn

    def _keep_prefix(self, ids: list[int]) -> None:
        """Roll both caches back to what the new turn's ids start with (at a chunk boundary,
        and short of the end: a turn prefills at least one position)."""
        keep = self.device.boundary(min(common_prefix(self.fed, ids), len(ids) - 1))
        if keep == len(self.fed):
            return
        log.info("conversation: keeping %d of %d positions", keep, len(self.fed))
        self.rollbacks += 1
        self.device.rollback(keep)
        del self.fed[keep:]
        self._forget_session()

    def _finished(self) -> None:
        """The turn's stream ended: remember what the caches hold and the reply's text."""
        turn = self._turn
        assert turn is not None
        self._turn = None
        self.session = turn.session
        # The last sampled token is not in the caches (a reply ends before feeding it).
        fed_reply = self.device.position - len(turn.prompt_ids)
        self.fed = list(turn.prompt_ids) + turn.tokens[:fed_reply]
        reply = self.tokenizer.decode(turn.tokens, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": reply})

    def _forget_session(self) -> None:
        """Drop the server's session: the next turn opens one and replays the kept chunks;
        the old one is ended in the background (or by :meth:`close`)."""
        if self.session is None:
            return
        stale, self.session = self.session, None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._stale.append(stale)
            return
        task = loop.create_task(self._end(stale))
        self._tasks.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._tasks.discard)

    async def _end(self, session: int) -> None:
        with contextlib.suppress(Exception):  # a lost goodbye changes nothing
            await self.channel.end_session(session)

    async def close(self) -> None:
        """End the server's session(s) of this conversation."""
        if self._turn is not None:
            await self._turn.aclose()
        sessions = [*self._stale, *([self.session] if self.session is not None else [])]
        self._stale.clear()
        self.session = None
        await asyncio.gather(*self._tasks, *(self._end(s) for s in sessions))
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
