"""Split generation on the device: the head and its KV cache here, the tail's on the server.

Per token the device runs its decoder blocks for the new position, sends what crosses the cut
(the residual stream, the rotary tables and the mask row: a few KB) and gets back the token
the server sampled. The server samples, so the logits (vocabulary-sized) never cross.

Every chunk sent is kept (a few KB per token). When the server loses the session (evicted,
expired, restarted, or the connection died), the device opens a new one and replays the
recorded chunks: the tail runs exactly the calls it ran before, on exactly the same inputs, so
the rebuilt cache and the next token are bit-identical; sampling draws are a pure function of
(seed, position), so sampled replies survive recovery too. If no server answers within the
client's timeout and ``fallback="local"``, the device replays the chunks into its own copy of
the tail and finishes the reply itself.

A :class:`Generation` talks to the server through a
:class:`~edgeoffload.device.channel.SessionChannel` (what
:class:`~edgeoffload.device.client.OffloadClient` implements) and is itself the stream that
``OffloadClient.generate`` returns: an async iterator of :class:`GeneratedToken` whose
``stats`` say where the reply's time and bytes went.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeoffload.core import codec as codec_mod
from edgeoffload.core.decoder import DecoderLayout, KVState, select_next
from edgeoffload.core.sampling import SamplingParams, sample_token
from edgeoffload.device.channel import SessionChannel
from edgeoffload.device.runtime import DeviceRuntime
from edgeoffload.device.tokenizer import StreamDecoder, TextTokenizer
from edgeoffload.errors import (
    AuthenticationFailed,
    OffloadUnavailable,
    PayloadError,
    ProtocolError,
    SessionError,
    SessionLost,
    UsageError,
    VersionMismatch,
)
from edgeoffload.protocol.events import Chunk
from edgeoffload.protocol.wire import MAX_CHUNKS

log = logging.getLogger("edgeoffload.device.generate")

TOKENIZER_DIR = "tokenizer"  # inside a decoder bundle
REPLAY_MARGIN = 65536  # bytes kept free in each replay message for framing
RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8)  # between recovery attempts (then the last, again)
INLINE_HEAD_MS = 2.0  # heads faster than this run on the event loop (the thread hop costs)


@dataclass(frozen=True)
class GeneratedToken:
    """One generated token as it streams.

    The last item of a stream may carry ``token_id == -1``: text held back until the end (the
    tail of a multi-byte character or of a clean-up window), not a token.
    """

    token_id: int
    text: str  # the text this token completes ("" while a multi-byte character is partial)
    index: int  # 0 for the first generated token
    offloaded: bool  # False once the reply is finished on the device (local fallback)


@dataclass
class GenerationStats:
    """Where a generation's time and bytes went (milliseconds, bytes)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_ms: float = 0.0  # prompt in -> first token out
    step_ms: list[float] = field(default_factory=list)  # each later token
    head_ms: float = 0.0
    bytes_up: int = 0  # ciphertext sent for prefill/steps (replays included)
    step_bytes: list[int] = field(default_factory=list)
    reused_tokens: int = 0  # a conversation's positions already in both caches (not prefilled)
    recoveries: int = 0
    fallback_reason: str = ""
    finish_reason: str = ""  # eos, stop, length, context

    @property
    def decode_tokens_per_s(self) -> float:
        total = sum(self.step_ms)
        return 1e3 * len(self.step_ms) / total if total > 0 else 0.0

    @property
    def median_step_ms(self) -> float | None:
        """The middle step time (the upper one of an even count); None before any step."""
        steps = sorted(self.step_ms)
        return steps[len(steps) // 2] if steps else None

    @property
    def median_step_bytes(self) -> int | None:
        """Bytes sent for the middle step (the upper one of an even count)."""
        sizes = sorted(self.step_bytes)
        return sizes[len(sizes) // 2] if sizes else None

    def to_dict(self) -> dict[str, int | float | str | None]:
        """A JSON summary (rounded; the step lists reduced to their medians)."""
        median_step_ms = self.median_step_ms
        return {
            "prompt_tokens": self.prompt_tokens,
            "reused_tokens": self.reused_tokens,
            "generated_tokens": self.generated_tokens,
            "ttft_ms": round(self.ttft_ms, 3),
            "median_step_ms": round(median_step_ms, 3) if median_step_ms is not None else None,
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "head_ms": round(self.head_ms, 3),
            "bytes_up": self.bytes_up,
            "median_step_bytes": self.median_step_bytes,
            "recoveries": self.recoveries,
            "fallback_reason": self.fallback_reason,
            "finish_reason": self.finish_reason,
        }


def load_tokenizer(runtime: DeviceRuntime) -> TextTokenizer | None:
    """The tokenizer shipped in the bundle, if any."""
    folder = runtime.bundle.path / TOKENIZER_DIR
    if not (folder / "tokenizer.json").is_file():
        return None
    return TextTokenizer.from_dir(folder)


@dataclass(frozen=True)
class HeadSnapshot:
    """The head's state at one point, to roll back :meth:`DecoderDevice.head` calls."""

    kv_arrays: dict[str, np.ndarray]
    kv_length: int
    position: int
    chunks: int  # length of the recorded history


class DecoderDevice:
    """The device's half of one generation: head session + KV cache + the chunks it sent."""

    def __init__(self, runtime: DeviceRuntime) -> None:
        manifest = runtime.manifest
        if not manifest.state:
            raise UsageError(
                f"bundle {runtime.bundle.path} is not a decoder (no KV-cache state)",
                hint="generate() needs a decoder split: edgeoffload split MODEL_DIR_OR_ONNX",
            )
        state = {e["input"]: e["output"] for e in manifest.state}
        self.runtime = runtime
        self.layout = DecoderLayout.of(manifest.graph_inputs, manifest.graph_outputs, state)
        specs = {s.name: s for s in self.layout.state_specs}
        pairs = {
            side: [(e["input"], e["output"]) for e in manifest.state if e["side"] == side]
            for side in ("device", "server")
        }
        self.head_kv = KVState(pairs["device"], specs)
        self._tail_pairs = pairs["server"]
        self._specs = specs
        self.local_kv: KVState | None = None
        self._local_chunks = 0  # chunks of the history already run by the local tail
        self.last_logits: np.ndarray | None = None
        self.position = 0  # positions the head has processed
        self.history: list[Chunk] = []

    def head(self, token_ids: list[int]) -> Chunk:
        """Run the head over new tokens; the crossing tensors, encoded, as a recorded chunk."""
        manifest = self.runtime.manifest
        n = len(token_ids)
        feed = self.layout.token_feed(token_ids, self.position)
        session = self.runtime.head_session
        produced = self.head_kv.run(session, feed, n) if session is not None else {}
        for name in manifest.passthrough:
            produced[name] = feed[name]
        if manifest.tail is None:  # all-local bundle: the head is the whole model
            self.last_logits = produced[self.layout.logits]
        crossing = {t.name: produced[t.name] for t in manifest.crossing}
        chunk = Chunk(n, tuple(self.runtime.encode(crossing)))
        self.position += n
        self.history.append(chunk)
        return chunk

    def snapshot(self) -> HeadSnapshot:
        return HeadSnapshot(
            dict(self.head_kv.arrays), self.head_kv.length, self.position, len(self.history)
        )

    def restore(self, saved: HeadSnapshot) -> None:
        """Undo :meth:`head` calls made since :meth:`snapshot`."""
        self.head_kv.arrays = dict(saved.kv_arrays)
        self.head_kv.length = saved.kv_length
        self.position = saved.position
        del self.history[saved.chunks :]

    def boundary(self, position: int) -> int:
        """The last chunk boundary at or before ``position``: how far the caches can be rolled
        back without re-running a chunk (a prompt chunk is all or nothing)."""
        done = 0
        for chunk in self.history:
            if done + chunk.n > position:
                break
            done += chunk.n
        return done

    def rollback(self, position: int) -> None:
        """Forget everything from ``position`` (a :meth:`boundary`) on: the head's cache, the
        chunks, and the local tail's cache (rebuilt from the chunks if it is needed again)."""
        if self.boundary(position) != position:
            raise UsageError(f"position {position} is inside a chunk: roll back to a boundary")
        done, keep = 0, 0
        while done < position:
            done += self.history[keep].n
            keep += 1
        del self.history[keep:]
        self.head_kv.truncate(position)
        self.position = position
        self.local_kv = None
        self._local_chunks = 0

    def local_token(self, params: SamplingParams) -> int:
        """Run the chunks the device's own copy of the tail has not seen yet (all of them the
        first time: a reply finished on the device rebuilds the tail's cache from the
        history); the token it samples."""
        if self.runtime.manifest.tail is None:
            assert self.last_logits is not None, "head() first"
            return sample_token(select_next(self.last_logits), params, self.head_kv.length)
        if self.local_kv is None:
            self.local_kv = KVState(self._tail_pairs, self._specs)
            self._local_chunks = 0
        session = self.runtime.tail_session()
        outputs: dict[str, Any] = {}
        for chunk in self.history[self._local_chunks :]:
            feed = {
                name: np.asarray(codec_mod.decode(encoded, max_bytes=1 << 31))
                for name, encoded in chunk.tensors
            }
            outputs = self.local_kv.run(session, feed, chunk.n)
            self._local_chunks += 1
        if not outputs:
            raise UsageError("local_token() without a new chunk: run head() first")
        logits = select_next(outputs[self.layout.logits])
        return sample_token(logits, params, self.local_kv.length)


class Generation:
    """One streamed reply: an async iterator of :class:`GeneratedToken`, with its ``stats``.

    Created by :meth:`OffloadClient.generate`; the prompt is checked and tokenized here, the
    server is first contacted when the first token is asked for. ``stats`` fill in as the
    reply streams and are complete once it ends. Leaving early: ``await stream.aclose()``
    ends the server's session.
    """

    def __init__(
        self,
        channel: SessionChannel,
        *,
        on_finish: Callable[[], None] | None = None,
        prompt: str | None,
        input_ids: list[int] | None,
        messages: list[dict[str, str]] | None,
        max_new_tokens: int,
        sampling: SamplingParams,
        stop: tuple[str, ...],
        chat: bool | None,
        device: DecoderDevice | None = None,
        session: int | None = None,
        context: int | None = None,
        keep_session: bool = False,
    ) -> None:
        """``device``, ``session``, ``context`` and ``keep_session`` continue a conversation
        (edgeoffload.device.conversation): the prompt is then the whole conversation, of which
        the device (and the server's ``session``) already hold the first ``device.position``
        tokens; only the rest is prefilled, and the session stays open at the end."""
        if sum(x is not None for x in (prompt, input_ids, messages)) != 1:
            raise UsageError("give exactly one of prompt, messages or input_ids")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
        self.channel = channel
        self.runtime = channel.runtime
        self._on_finish = on_finish  # the client's hold on this generation's version
        self.params = sampling
        self.max_new_tokens = max_new_tokens
        self.stop = stop
        self.tokenizer = load_tokenizer(self.runtime)
        self.prompt_ids = self._prompt_ids(prompt, input_ids, messages, chat)
        self.device = device if device is not None else DecoderDevice(self.runtime)
        if self.device.position >= len(self.prompt_ids):
            raise UsageError("a conversation's new turn must add tokens to what the device holds")
        self.stats = GenerationStats(
            prompt_tokens=len(self.prompt_ids), reused_tokens=self.device.position
        )
        self.session = session
        self.keep_session = keep_session
        self.context = context if context is not None else len(self.prompt_ids) + max_new_tokens
        self.tokens: list[int] = []  # generated so far (what the stream yielded)
        # An all-local bundle (the cost model's choice on a slow link) needs no server.
        self.local = self.runtime.manifest.tail is None
        self._last_head_ms = float("inf")  # short single-token heads run on the event loop
        self._tokens = self._stream()

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> GeneratedToken:
        return await self._tokens.__anext__()

    async def aclose(self) -> None:
        """Stop the reply here; ends the server's session if one is open."""
        await self._tokens.aclose()

    def _prompt_ids(
        self,
        prompt: str | None,
        input_ids: list[int] | None,
        messages: list[dict[str, str]] | None,
        chat: bool | None,
    ) -> list[int]:
        if input_ids is not None:
            ids = [int(t) for t in input_ids]
            vocab = DecoderDevice(self.runtime).layout.vocab_size
            if not ids or not all(0 <= t < vocab for t in ids):
                raise UsageError(f"input_ids must be a non-empty list of token ids < {vocab}")
            return ids
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise UsageError(
                "this bundle has no tokenizer: pass input_ids",
                hint="split a model folder that has tokenizer.json to ship one in the bundle",
            )
        if messages is None and (chat is False or not tokenizer.has_chat_template):
            assert prompt is not None
            ids = list(tokenizer.encode(prompt))
        else:
            if not tokenizer.has_chat_template:
                raise UsageError("messages need a chat template, and this tokenizer has none")
            chat_messages = (
                messages if messages is not None else [{"role": "user", "content": prompt or ""}]
            )
            text = tokenizer.apply_chat_template(chat_messages, add_generation_prompt=True)
            ids = list(tokenizer.encode(text, add_special_tokens=False))
        if not ids:
            raise UsageError("the prompt encodes to no tokens")
        return ids

    # -- the stream ---------------------------------------------------------------------------

    async def _stream(self) -> AsyncGenerator[GeneratedToken, None]:
        device = self.device
        decoder = StreamDecoder(self.tokenizer) if self.tokenizer is not None else None
        eos = self._eos_ids()
        started = time.perf_counter()
        text = ""
        try:
            token = await self._prefill(device)
            self.stats.ttft_ms = (time.perf_counter() - started) * 1e3
            for index in range(self.max_new_tokens):
                if token in eos:
                    self.stats.finish_reason = "eos"
                    break
                piece = decoder.push(token) if decoder is not None else ""
                text += piece
                hit = next((s for s in self.stop if s and s in text), None)
                if hit is not None:
                    keep = len(piece) - (len(text) - text.index(hit))
                    self.stats.generated_tokens += 1
                    self.tokens.append(token)
                    yield GeneratedToken(token, piece[: max(keep, 0)], index, not self.local)
                    self.stats.finish_reason = "stop"
                    break
                self.stats.generated_tokens += 1
                self.tokens.append(token)
                yield GeneratedToken(token, piece, index, not self.local)
                if index + 1 == self.max_new_tokens:
                    self.stats.finish_reason = "length"
                    break
                if device.position + 1 > self.context:
                    self.stats.finish_reason = "context"
                    break
                step_start = time.perf_counter()
                chunk = await self._head(device, [token])
                token = await self._token(device, "step", chunk)
                self.stats.step_ms.append((time.perf_counter() - step_start) * 1e3)
            if decoder is not None and self.stats.finish_reason != "stop":
                rest = decoder.flush()
                if rest:
                    yield GeneratedToken(-1, rest, self.stats.generated_tokens, not self.local)
        finally:
            try:
                await self._end()
            finally:
                if self._on_finish is not None:
                    self._on_finish()

    def _eos_ids(self) -> frozenset[int]:
        """End-of-sequence ids: the tokenizer's, else the bundle's generation config's."""
        if self.tokenizer is not None:
            return self.tokenizer.eos_token_ids
        config = self.runtime.bundle.path / TOKENIZER_DIR / "generation_config.json"
        try:
            eos = json.loads(config.read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            return frozenset()
        values = eos if isinstance(eos, list) else [eos]
        return frozenset(v for v in values if isinstance(v, int))

    async def _prefill(self, device: DecoderDevice) -> int:
        """The prompt through the head and the tail; a prompt too large for one message goes
        in several chunks (the head is re-run on fewer positions, its cache rolled back)."""
        limit = await self._request_limit()
        ids = self.prompt_ids
        done = device.position  # a conversation's earlier turns are in both caches already
        token = -1
        while done < len(ids):
            n = len(ids) - done
            while True:
                saved = device.snapshot()
                chunk = await self._head(device, ids[done : done + n])
                if _chunk_bytes(chunk) <= limit or n == 1:
                    break
                device.restore(saved)
                n = max(1, n // 2)
            token = await self._token(device, "prefill", chunk)
            done += n
        return token

    async def _request_limit(self) -> float:
        if self.local:
            return float("inf")
        with contextlib.suppress(OffloadUnavailable, ProtocolError):
            await self.channel.connect()  # a failure is reported by the first feed (recovery)
        return (self.channel.max_request_bytes or (1 << 20)) - REPLAY_MARGIN

    async def _head(self, device: DecoderDevice, token_ids: list[int]) -> Chunk:
        started = time.perf_counter()
        if len(token_ids) == 1 and self._last_head_ms < INLINE_HEAD_MS:
            chunk = device.head(token_ids)
        else:
            chunk = await asyncio.to_thread(device.head, token_ids)
        self._last_head_ms = (time.perf_counter() - started) * 1e3
        self.stats.head_ms += self._last_head_ms
        return chunk

    async def _token(self, device: DecoderDevice, kind: str, chunk: Chunk) -> int:
        if self.local:
            return await asyncio.to_thread(device.local_token, self.params)
        try:
            if self.session is None:
                await self._open()
                if len(device.history) > 1 and kind == "prefill":
                    # A conversation whose earlier turns this new session has not seen
                    # (rolled back, or finished locally before): all of them, this one last.
                    return await self._replay(device)
            assert self.session is not None
            event, wire, _ = await self.channel.feed_session(
                kind, self.session, device.position - chunk.n, [chunk]
            )
            self.stats.bytes_up += wire
            if kind == "step":
                self.stats.step_bytes.append(wire)
            return event.token
        except (AuthenticationFailed, VersionMismatch, PayloadError):
            raise
        except SessionLost as exc:
            return await self._recover(device, str(exc))
        except SessionError:
            raise
        except (OffloadUnavailable, ProtocolError) as exc:
            return await self._recover(device, str(exc))

    async def _open(self) -> None:
        self.session, granted = await self.channel.open_session(self.params.to_dict(), self.context)
        if granted < self.context:
            log.info("server grants %d positions of the %d asked", granted, self.context)
            self.context = granted
            if len(self.prompt_ids) > granted:
                raise SessionError(
                    f"the prompt has {len(self.prompt_ids)} tokens; the server allows {granted}"
                )

    async def _recover(self, device: DecoderDevice, reason: str) -> int:
        """Rebuild the server's session from the recorded chunks, or finish locally."""
        log.info("session lost (%s): rebuilding it from %d chunks", reason, len(device.history))
        self.stats.recoveries += 1
        deadline = time.monotonic() + self.channel.timeout
        attempt = 0
        while time.monotonic() < deadline:
            self.session = None
            try:
                await self._open()
                return await self._replay(device)
            except (AuthenticationFailed, VersionMismatch, PayloadError):
                raise
            except SessionLost as exc:  # e.g. evicted again under memory pressure
                reason = str(exc)
            except SessionError:
                raise
            except (OffloadUnavailable, ProtocolError) as exc:  # Overloaded is one of these
                reason = str(exc)  # the channel backed that server off: the next open goes
                # to another server, or to this one once it answers again
            delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
            attempt += 1
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        if self.channel.fallback != "local" or not self.runtime.has_tail:
            raise OffloadUnavailable(
                f"the edge server could not rebuild the session ({reason})",
                hint="use fallback='local' to finish replies on the device",
            )
        log.info("finishing the reply on the device: %s", reason)
        self.stats.fallback_reason = reason
        self.local = True
        self.session = None
        return await asyncio.to_thread(device.local_token, self.params)

    async def _replay(self, device: DecoderDevice) -> int:
        """Send every recorded chunk again, in as few prefill messages as fit."""
        assert self.session is not None
        limit = (self.channel.max_request_bytes or (1 << 20)) - REPLAY_MARGIN
        batch: list[Chunk] = []
        size = 0
        pos = 0
        token = -1
        history = list(device.history)
        for i, chunk in enumerate(history):
            batch.append(chunk)
            size += _chunk_bytes(chunk)
            last = i + 1 == len(history)
            next_bytes = _chunk_bytes(history[i + 1]) if not last else 0
            if last or size + next_bytes > limit or len(batch) == MAX_CHUNKS:
                event, wire, _ = await self.channel.feed_session(
                    "prefill", self.session, pos, batch
                )
                self.stats.bytes_up += wire
                pos += sum(c.n for c in batch)
                token = event.token
                batch, size = [], 0
        return token

    async def _end(self) -> None:
        if self.keep_session or self.session is None or not self.channel.connected:
            return
        try:
            await self.channel.end_session(self.session)
        except Exception as exc:  # the reply is complete; a lost goodbye changes nothing
            log.debug("ending session %d: %s", self.session, exc)
        self.session = None


def _chunk_bytes(chunk: Chunk) -> int:
    return sum(t.wire_bytes for _, t in chunk.tensors)
