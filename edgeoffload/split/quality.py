"""What quantised weights cost in quality: measured against the fp32 model on a shipped text.

Two figures, both on ``data/genesis-kjv.txt`` (public domain, see ``data/README.md``):

* **teacher-forced top-1 agreement**: for each of :data:`PROMPTS` prompts taken from the text
  at fixed offsets, the fp32 model continues greedily for :data:`NEW_TOKENS` tokens; prompt and
  continuation are then fed to both models in one call (teacher forcing: every position sees
  the same prefix, so one early disagreement does not derail the rest), and we count the
  positions where the two models' argmax agree. 1.0 means the quantised split would have
  picked the fp32 token at every position of these continuations.
* **perplexity** of both models over the whole text, in windows of :data:`WINDOW` tokens.

The quantised side runs as the bundle will: head then tail, each an onnxruntime session of
the quantised part. :class:`QualityReport` is recorded in the manifest; ``--max-quality-loss``
refuses a bundle whose agreement loss (1 - agreement) is over the bound (:class:`QualityError`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeoffload._ort import make_session
from edgeoffload.core.decoder import DecoderLayout, KVState
from edgeoffload.device.tokenizer import TextTokenizer
from edgeoffload.errors import QualityError
from edgeoffload.split.graph import ModelGraph

TEXT = Path(__file__).parent / "data" / "genesis-kjv.txt"
PROMPTS = 20
PROMPT_TOKENS = 16
NEW_TOKENS = 64
WINDOW = 256


@dataclass(frozen=True)
class QualityReport:
    """Quantised split vs the fp32 model (see the module docstring)."""

    agreement: float  # teacher-forced top-1 agreement, 0..1
    positions: int  # positions compared (prompts x new tokens)
    prompts: int
    prompt_tokens: int
    new_tokens: int
    perplexity: float  # of the quantised split
    perplexity_fp32: float
    text: str  # file name of the text
    text_sha256: str
    text_tokens: int
    window: int

    @property
    def agreement_loss(self) -> float:
        return 1.0 - self.agreement

    @property
    def perplexity_change(self) -> float:
        """Relative change of perplexity (0.05 = 5 % higher than fp32)."""
        return self.perplexity / self.perplexity_fp32 - 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": "fp32 model, unsplit",
            "agreement": round(self.agreement, 6),
            "agreement_loss": round(self.agreement_loss, 6),
            "positions": self.positions,
            "prompts": self.prompts,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "perplexity": round(self.perplexity, 4),
            "perplexity_fp32": round(self.perplexity_fp32, 4),
            "perplexity_change": round(self.perplexity_change, 6),
            "text": {"file": self.text, "sha256": self.text_sha256, "tokens": self.text_tokens},
            "window": self.window,
        }


class PartsDecoder:
    """Sessions (the full model, or head then tail) run as one decoder over token ids."""

    def __init__(self, sessions: Sequence[Any], graph: ModelGraph, layout: DecoderLayout) -> None:
        self.sessions = list(sessions)
        self.layout = layout
        self.specs = {s.name: s for s in graph.inputs}
        self.pairs = [
            [(i, o) for i, o in graph.state.items() if i in {x.name for x in s.get_inputs()}]
            for s in self.sessions
        ]

    def start(self) -> list[KVState]:
        return [KVState(pairs, self.specs) for pairs in self.pairs]

    def forward(self, states: list[KVState], ids: Sequence[int]) -> np.ndarray:
        """Logits [n, vocab] for ``ids`` after what ``states`` hold (which they then keep)."""
        values: dict[str, Any] = dict(self.layout.token_feed(ids, states[0].length))
        for session, state in zip(self.sessions, states, strict=True):
            wanted = [i.name for i in session.get_inputs() if i.name not in state.arrays]
            values.update(state.run(session, {n: values[n] for n in wanted}, len(ids)))
        logits: np.ndarray = np.asarray(values[self.layout.logits])[0]
        return logits

    def greedy(self, prompt: Sequence[int], steps: int) -> list[int]:
        states = self.start()
        logits = self.forward(states, prompt)
        out = [int(np.argmax(logits[-1]))]
        while len(out) < steps:
            out.append(int(np.argmax(self.forward(states, out[-1:])[-1])))
        return out

    def nll(self, ids: Sequence[int], window: int) -> tuple[float, int]:
        """Summed negative log-likelihood of each token given the window before it."""
        total, count = 0.0, 0
        for start in range(0, len(ids) - 1, window):
            chunk = list(ids[start : start + window])
            if len(chunk) < 2:
                break
            logits = self.forward(self.start(), chunk).astype(np.float64)
            peak = logits.max(axis=-1, keepdims=True)
            logp = logits - peak - np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True))
            targets = np.asarray(chunk[1:])
            total -= float(logp[np.arange(len(targets)), targets].sum())
            count += len(targets)
        return total, count


def text_ids(tokenizer: TextTokenizer) -> list[int]:
    return tokenizer.encode(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)


def prompt_offsets(n_ids: int, prompts: int, prompt_tokens: int) -> list[int]:
    """Fixed, evenly spaced start offsets of the prompts in the text's tokens."""
    span = max(1, n_ids - prompt_tokens)
    return [i * span // prompts for i in range(prompts)]


def measure_quality(
    graph: ModelGraph,
    head: bytes | None,
    tail: bytes | None,
    tokenizer_dir: Path,
    *,
    prompts: int = PROMPTS,
    prompt_tokens: int = PROMPT_TOKENS,
    new_tokens: int = NEW_TOKENS,
    window: int = WINDOW,
    threads: int = 1,
) -> QualityReport:
    """Measure a quantised split (``head``/``tail``: serialised parts, None for an empty
    side) against ``graph``, the fp32 model it was cut from."""
    layout = DecoderLayout.of(
        graph.inputs, [graph.tensor_spec(o) for o in graph.output_names], graph.state
    )
    tokenizer = TextTokenizer.from_dir(tokenizer_dir)
    ids = text_ids(tokenizer)
    if len(ids) < prompt_tokens + 2:
        raise QualityError(f"the quality text has only {len(ids)} tokens for this tokenizer")
    reference = PartsDecoder([make_session(graph.serialized(), threads=threads)], graph, layout)
    parts = [make_session(p, threads=threads) for p in (head, tail) if p is not None]
    quantised = PartsDecoder(parts, graph, layout)
    agree = positions = 0
    for offset in prompt_offsets(len(ids), prompts, prompt_tokens):
        prompt = ids[offset : offset + prompt_tokens]
        continuation = reference.greedy(prompt, new_tokens)
        forced = prompt + continuation[:-1]
        # Both models see the same teacher-forced input; compare from the prompt's last token.
        want = reference.forward(reference.start(), forced)[len(prompt) - 1 :].argmax(-1)
        got = quantised.forward(quantised.start(), forced)[len(prompt) - 1 :].argmax(-1)
        agree += int((want == got).sum())
        positions += len(want)
    ref_nll, count = reference.nll(ids, window)
    q_nll, _ = quantised.nll(ids, window)
    return QualityReport(
        agreement=agree / positions,
        positions=positions,
        prompts=prompts,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        perplexity=math.exp(q_nll / count),
        perplexity_fp32=math.exp(ref_nll / count),
        text=TEXT.name,
        text_sha256=hashlib.sha256(TEXT.read_bytes()).hexdigest(),
        text_tokens=len(ids),
        window=window,
    )


def check_quality(report: QualityReport, max_loss: float | None) -> None:
    """Refuse a bundle whose agreement loss is over ``max_loss`` (None: no bound)."""
    if max_loss is None or report.agreement_loss <= max_loss:
        return
    raise QualityError(
        f"quantised weights lose {report.agreement_loss:.1%} top-1 agreement with fp32 "
        f"({report.agreement:.1%} over {report.positions} positions), over "
        f"--max-quality-loss {max_loss:g}",
        hint="use more bits (--head-weights/--tail-weights int8 or fp32), a smaller "
        "--weights-block, or raise --max-quality-loss",
    )
