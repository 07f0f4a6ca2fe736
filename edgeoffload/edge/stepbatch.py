"""Batched decode steps: the generation sessions of one decoder tail step together.

One decode step of one session is a one-position call of the tail with that session's KV cache:
at batch 1 the tail's weights are read from memory for a single row, so a server that steps
many devices' sessions one by one spends most of its time re-reading the same weights. Here the
steps waiting at the same moment run as one call (scheduled by edge.batcher's continuous
:class:`~edgeoffload.edge.batcher.Batcher`), and each session gets exactly its own row back.

Sessions hold caches of different lengths, so the batch is padded, which is exact for the
attention: every session's cache is left-padded with zeros to the longest one, and the crossing
attention mask (the tail input whose last dim counts the positions attended to) is left-padded
with "do not attend" (False, 0, or the dtype's lowest value for additive float masks). The
masked scores get a zero weight after the softmax, so the padding adds nothing; the newest
position is the last index in every row, and each session keeps only its own positions of the
presents. The other crossing inputs (the residual stream, the rotary tables computed on the
device from each session's own positions) are stacked along the batch axis.

What changes is only what onnxruntime does differently for a larger matrix (other kernel
blockings): the logits move by float rounding, and :meth:`StepRuns.check` measures that on the
hosted tail before the server uses batched steps at all (refused, with the reason logged, when a
padded row differs from a lone step by more than :data:`TOLERANCE`). Tokens are sampled from
each row as from a lone step: tests/test_stepbatch.py and benchmarks/llm_batching.py check that
every session's tokens equal a lone run's.

Tails whose crossing includes a rank-0 value (GPT-2 exports pass shape scalars across the cut)
or anything without a leading batch axis are not batched: a scalar may encode a length, which
padding would make wrong.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeoffload._ort import run
from edgeoffload.core.decoder import KVState, select_next
from edgeoffload.core.sampling import SamplingParams, sample_token
from edgeoffload.errors import PayloadError
from edgeoffload.types import TensorSpec

# Largest |batched - lone| a padded row may show, relative to the lone output's largest
# magnitude, for the tail to be stepped in batches (float32 rounding is ~1e-7 relative; a
# wrong mask or padding is off by O(1)).
TOLERANCE = 1e-4


@dataclass(eq=False)
class Step:
    """One session's decode step: its cache, the decoded crossing tensors, its sampling."""

    kv: KVState
    feed: dict[str, np.ndarray]
    sampling: SamplingParams


def _mask_pad(dtype: np.dtype[Any]) -> Any:
    """The "do not attend" value of a mask of ``dtype``."""
    if dtype == np.bool_:
        return False
    if np.issubdtype(dtype, np.floating):
        return np.finfo(dtype).min  # additive masks: the lowest value, as the exporters use
    return 0  # integer attention masks: 0 = padding


@dataclass(frozen=True)
class StepLayout:
    """Which crossing inputs are stacked and which are masks padded on their last axis."""

    stacked: tuple[str, ...]
    masks: tuple[str, ...]

    @classmethod
    def of(
        cls, crossing: Sequence[TensorSpec], state_specs: Sequence[TensorSpec]
    ) -> StepLayout | str:
        """The layout of a tail with these crossing inputs and KV specs; or why it has none."""
        stacked: list[str] = []
        masks: list[str] = []
        for spec in crossing:
            if not spec.shape:
                return f"crossing input {spec.name} is a scalar (it may encode a length)"
            if not isinstance(spec.shape[0], str):
                return f"crossing input {spec.name} has no symbolic batch axis"
            if len(spec.shape) > 1 and isinstance(spec.shape[-1], str):
                masks.append(spec.name)  # its last dim counts positions: past + new
            else:
                stacked.append(spec.name)
        for spec in state_specs:
            if not spec.shape or not isinstance(spec.shape[0], str):
                return f"KV input {spec.name} has no symbolic batch axis"
        if not masks:
            return "no crossing attention mask (an input whose last dim counts positions)"
        return cls(tuple(stacked), tuple(masks))


class StepRuns:
    """Decode steps of many sessions of one decoder tail ``session`` as one call.

    Args:
        session: the tail's onnxruntime session.
        layout: its :class:`StepLayout`.
        pairs: the tail's KV (past input, present output) pairs.
        logits: the logits output's name.
    """

    def __init__(
        self,
        session: Any,
        layout: StepLayout,
        pairs: Sequence[tuple[str, str]],
        logits: str,
    ) -> None:
        self.session = session
        self.layout = layout
        self.pairs = tuple(pairs)
        self.logits = logits

    def key(self, item: Step) -> Hashable:
        """Steps may share a batch when everything but the positions has the same shape."""
        stacked = tuple(
            (n, item.feed[n].shape[1:], item.feed[n].dtype.str) for n in self.layout.stacked
        )
        masks = tuple(
            (n, item.feed[n].shape[1:-1], item.feed[n].dtype.str) for n in self.layout.masks
        )
        return stacked, masks

    def rows(self, item: Step) -> int:
        """1; PayloadError when the step is not one position over its session's cache."""
        for name in (*self.layout.stacked, *self.layout.masks):
            if item.feed[name].shape[0] != 1:
                raise PayloadError(f"{name}: a decode step carries one sequence")
        for name in self.layout.masks:
            if item.feed[name].shape[-1] != item.kv.length + 1:
                raise PayloadError(
                    f"{name} covers {item.feed[name].shape[-1]} positions; the session holds "
                    f"{item.kv.length}, so a step attends to {item.kv.length + 1}"
                )
        return 1

    def forward(self, items: Sequence[Step]) -> list[dict[str, np.ndarray]]:
        """Run the steps as one padded call; per item its presents (by past input, its own
        positions only) and its other outputs. Touches no state."""
        longest = max(item.kv.length for item in items)
        feed: dict[str, np.ndarray] = {}
        for name in self.layout.stacked:
            feed[name] = np.concatenate([item.feed[name] for item in items], axis=0)
        for name in self.layout.masks:
            first = items[0].feed[name]
            masks = np.full(
                (len(items), *first.shape[1:-1], longest + 1), _mask_pad(first.dtype), first.dtype
            )
            for row, item in enumerate(items):
                mask = item.feed[name]
                masks[row : row + 1, ..., masks.shape[-1] - mask.shape[-1] :] = mask
            feed[name] = masks
        # Each cache is copied once, straight into its row of the batch (zeros elsewhere).
        for past, _ in self.pairs:
            first = items[0].kv.arrays[past]
            shape = list(first.shape)
            shape[0] = len(items)
            shape[items[0].kv.axis(past)] = longest
            caches = np.zeros(shape, first.dtype)
            for row, item in enumerate(items):
                item.kv.place(past, caches, row)
            feed[past] = caches
        outputs = run(self.session, feed)
        results: list[dict[str, np.ndarray]] = []
        for row, item in enumerate(items):
            result = {
                past: item.kv.row_of(outputs[present], past, row, 1) for past, present in self.pairs
            }
            result[self.logits] = outputs[self.logits][row : row + 1]
            results.append(result)
        return results

    def run(self, items: list[Step]) -> list[int]:
        """Step every item's session by one position; the tokens sampled for them. All or
        nothing: a failure leaves every session as it was.

        Each session keeps a view of its row of the batch's presents instead of a copy (the
        copy would double the bytes moved per step; the next step copies the row into its
        batch anyway): its state is *borrowed* until its next step, or until the server
        compacts the caches of sessions that stopped stepping (SessionStore.compact_idle), so
        that an idle session does not keep a whole batch's array alive.
        """
        for item in items:
            item.kv.check_room(1)
        results = self.forward(items)
        for item, result in zip(items, results, strict=True):
            item.kv.check_presents(result, 1)
        tokens = []
        for item, result in zip(items, results, strict=True):
            item.kv.accept({past: result[past] for past, _ in self.pairs}, 1, borrowed=True)
            logits = select_next(result[self.logits])
            tokens.append(sample_token(logits, item.sampling, item.kv.length))
        return tokens

    def check(
        self, state_specs: Mapping[str, TensorSpec], crossing: Sequence[TensorSpec]
    ) -> str | None:
        """Compare padded batched steps with lone steps on synthetic inputs (fixed seed); None
        when they agree within :data:`TOLERANCE`, else what differs."""
        rng = np.random.default_rng(0)
        specs = {s.name: s for s in crossing}
        items = []
        for length in (3, 8):
            kv = KVState(self.pairs, state_specs)
            kv.arrays = {
                name: rng.standard_normal(
                    _concrete(state_specs[name].shape, length, kv_axis=kv.axis(name)),
                ).astype(a.dtype)
                for name, a in kv.arrays.items()
            }
            kv.length = length
            feed = {}
            for name in self.layout.stacked:
                shape = _concrete(specs[name].shape, 1)
                dtype = np.dtype(specs[name].dtype)
                feed[name] = (
                    rng.standard_normal(shape).astype(dtype)
                    if np.issubdtype(dtype, np.floating)
                    else np.zeros(shape, dtype)
                )
            for name in self.layout.masks:
                shape = _concrete(specs[name].shape, 1)
                shape[-1] = length + 1
                dtype = np.dtype(specs[name].dtype)
                attend = (
                    np.zeros(shape, dtype)
                    if np.issubdtype(dtype, np.floating)
                    else np.ones(shape, dtype)
                )
                feed[name] = attend
            items.append(Step(kv, feed, SamplingParams()))
        try:
            lone = [self.forward([item])[0] for item in items]
            batched = self.forward(items)
        except Exception as exc:  # an ORT shape error: this tail cannot take padded batches
            return f"a padded batch does not run: {exc}"
        for alone, together in zip(lone, batched, strict=True):
            for name, value in alone.items():
                other = together[name]
                if other.shape != value.shape:
                    return f"{name}: shape {list(other.shape)} batched, {list(value.shape)} alone"
                scale = max(float(np.max(np.abs(value))), 1e-6)
                error = float(np.max(np.abs(other - value))) / scale
                if not error <= TOLERANCE:
                    return f"{name} differs by {error:.2e} (relative) between batched and lone"
        return None


def _concrete(
    shape: Sequence[int | str | None], length: int, *, kv_axis: int | None = None
) -> list[int]:
    """A synthetic shape: batch 1, ``length`` on the KV axis, 1 for other symbolic dims."""
    out = []
    for j, dim in enumerate(shape):
        if j == kv_axis:
            out.append(length)
        elif isinstance(dim, int):
            out.append(dim)
        else:
            out.append(1)
    return out
