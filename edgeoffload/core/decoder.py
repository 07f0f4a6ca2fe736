"""Decoder LLMs: which graph inputs/outputs play which role, and the KV cache as state.

A decoder exported with past key values (optimum's ``text-generation-with-past``) takes
``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.{i}.{key,value}`` and
returns ``logits`` and ``present.{i}.{key,value}``. Each present tensor is fed back as the past
input of the next call: that pair is *state*. When the model is split at a block boundary, the
head keeps the state of its layers on the device and the tail keeps the rest on the server;
only the residual stream (plus the rotary tables and the mask built near layer 0) crosses.

Light by design (the device path): numpy + the stdlib; no onnx import.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeoffload._ort import run
from edgeoffload.errors import GraphError, SessionError
from edgeoffload.types import TensorSpec

# -- the exporters' names (optimum, transformers): the one table every module reads ---------

INPUT_IDS = ("input_ids",)
ATTENTION_MASK = ("attention_mask",)
POSITION_IDS = ("position_ids",)
LOGITS = ("logits",)
# KV-cache state pairs: a past input (groups: layer index, "key" or "value") and the template
# of the present output fed back as that input on the next call.
STATE_NAMING: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"past_key_values\.(\d+)\.(key|value)"), "present.{0}.{1}"),
    (re.compile(r"past_key_values_(\d+)_(key|value)"), "present_{0}_{1}"),
    (re.compile(r"past\.(\d+)\.(key|value)"), "present.{0}.{1}"),
)
# The block index in a node's layer label: /model/layers.3/..., /transformer/h.3/...
BLOCK_LABEL = re.compile(r"(?:^|/)(?:layers|layer|h|blocks|block)\.(\d+)$")


def pick_name(names: Sequence[str], role: Sequence[str]) -> str | None:
    """The first of ``names`` that the table gives ``role`` (e.g. :data:`LOGITS`), or None."""
    return next((n for n in names if n in role), None)


def present_name(past: str) -> str | None:
    """The present output an exporter pairs with the past input ``past``; None if not a past."""
    for pattern, template in STATE_NAMING:
        match = pattern.fullmatch(past)
        if match:
            return template.format(*match.groups())
    return None


def state_pairs(inputs: Sequence[str], outputs: Sequence[str]) -> dict[str, str]:
    """KV-cache state pairs (``past_key_values.3.key`` -> ``present.3.key``) by export naming:
    every past input whose present output the graph has."""
    present = set(outputs)
    pairs: dict[str, str] = {}
    for name in inputs:
        out = present_name(name)
        if out is not None and out in present:
            pairs[name] = out
    return pairs


def state_layer(past: str) -> int | None:
    """The layer index of a past input (``past_key_values.3.key`` -> 3); None if not a past."""
    for pattern, _ in STATE_NAMING:
        match = pattern.fullmatch(past)
        if match:
            return int(match.group(1))
    return None


@dataclass(frozen=True)
class DecoderLayout:
    """The roles of a decoder's graph inputs/outputs and the shapes of its KV state."""

    input_ids: str
    attention_mask: str | None
    position_ids: str | None
    logits: str
    vocab_size: int
    state: tuple[tuple[str, str], ...]  # (past input, present output), in graph-input order
    state_specs: tuple[TensorSpec, ...]  # of the past inputs, same order

    @classmethod
    def of(
        cls,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        state: Mapping[str, str],
    ) -> DecoderLayout:
        """Find the roles by the exporters' names; GraphError when this is not a decoder."""
        in_names = [s.name for s in inputs]
        out_names = [s.name for s in outputs]
        ids = pick_name(in_names, INPUT_IDS)
        logits = pick_name(out_names, LOGITS)
        if ids is None or logits is None or not state:
            raise GraphError(
                "not a decoder with KV cache: expected input_ids, logits and "
                "past_key_values.* / present.* pairs",
                hint="export with task text-generation-with-past (edgeoffload export --task ...)",
            )
        logits_spec = next(s for s in outputs if s.name == logits)
        vocab = logits_spec.shape[-1] if logits_spec.shape else None
        if not isinstance(vocab, int):
            raise GraphError(f"the logits output has no fixed vocabulary size: {logits_spec}")
        by_name = {s.name: s for s in inputs}
        pairs = tuple((i, state[i]) for i in in_names if i in state)
        return cls(
            input_ids=ids,
            attention_mask=pick_name(in_names, ATTENTION_MASK),
            position_ids=pick_name(in_names, POSITION_IDS),
            logits=logits,
            vocab_size=vocab,
            state=pairs,
            state_specs=tuple(by_name[i] for i, _ in pairs),
        )

    @property
    def num_layers(self) -> int:
        return len({state_layer(i) for i, _ in self.state})

    def token_feed(self, token_ids: Sequence[int], start: int) -> dict[str, np.ndarray]:
        """The non-state inputs for ``token_ids`` at positions ``start, start + 1, ...``."""
        n = len(token_ids)
        feed = {self.input_ids: np.asarray([token_ids], dtype=np.int64)}
        if self.attention_mask is not None:
            feed[self.attention_mask] = np.ones((1, start + n), dtype=np.int64)
        if self.position_ids is not None:
            feed[self.position_ids] = np.arange(start, start + n, dtype=np.int64)[None, :]
        return feed

    def kv_bytes_per_token(self, names: Sequence[str] | None = None) -> int:
        """Bytes of KV cache one token adds (all state inputs, or those named)."""
        wanted = set(names) if names is not None else None
        total = 0
        for spec in self.state_specs:
            if wanted is not None and spec.name not in wanted:
                continue
            axis = past_axis(spec)
            per = spec.itemsize
            for j, dim in enumerate(spec.shape):
                if j != axis and isinstance(dim, int):
                    per *= dim
            total += per
        return total


def past_axis(spec: TensorSpec) -> int:
    """The sequence axis of a KV tensor: the symbolic dim named like the past length."""
    for j, dim in enumerate(spec.shape):
        if isinstance(dim, str) and ("past" in dim or "sequence" in dim):
            return j
    return len(spec.shape) - 2  # [batch, heads, seq, head_dim]


def block_of(layer_label: str) -> int | None:
    """Block index of a layer label (``model/layers.3`` -> 3), None for non-block labels."""
    match = BLOCK_LABEL.search(layer_label)
    return int(match.group(1)) if match else None


class KVState:
    """One side's KV cache for one sequence: arrays fed back as the part's past inputs.

    Args:
        pairs: (past input, present output) of this side's layers.
        specs: the past inputs' specs (dtype, shape with a symbolic past axis).
        max_tokens: refuse to grow past this many positions (the KV budget of a session).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        specs: Mapping[str, TensorSpec],
        *,
        max_tokens: int | None = None,
    ) -> None:
        self.pairs = tuple(pairs)
        self.max_tokens = max_tokens
        self.length = 0
        # True while the arrays are views of a batched step's presents (edge.stepbatch):
        # :meth:`compact` then makes them this state's own.
        self.borrowed = False
        self.arrays: dict[str, np.ndarray] = {}
        self._axes: dict[str, int] = {}
        for name, _ in self.pairs:
            spec = specs[name]
            axis = past_axis(spec)
            shape = [
                0 if j == axis else (d if isinstance(d, int) else 1)
                for j, d in enumerate(spec.shape)
            ]
            self._axes[name] = axis
            self.arrays[name] = np.zeros(shape, dtype=np.dtype(spec.dtype))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (a conversation rolled back to a prefix)."""
        if not 0 <= length <= self.length:
            raise SessionError(f"cannot truncate {self.length} positions to {length}")
        for name, array in self.arrays.items():
            index: list[slice] = [slice(None)] * array.ndim
            index[self._axes[name]] = slice(0, length)
            self.arrays[name] = array[tuple(index)].copy()
        self.length = length
        self.borrowed = False

    def axis(self, name: str) -> int:
        """The sequence axis of past input ``name``."""
        return self._axes[name]

    def check_room(self, new_tokens: int) -> None:
        if self.max_tokens is not None and self.length + new_tokens > self.max_tokens:
            raise SessionError(
                f"the KV cache would hold {self.length + new_tokens} positions, over the "
                f"budget of {self.max_tokens}",
                hint="start a new conversation or raise the server's max context",
            )

    def run(self, session: Any, feed: Mapping[str, np.ndarray], new_tokens: int) -> dict[str, Any]:
        """Run ``session`` with this state; keep the presents, return the other outputs."""
        self.check_room(new_tokens)
        outputs = run(session, {**feed, **self.arrays})
        presents = {name: outputs.pop(out) for name, out in self.pairs}
        self.accept(presents, new_tokens)
        return outputs

    def check_presents(self, presents: Mapping[str, np.ndarray], new_tokens: int) -> None:
        """SessionError unless ``presents`` (by past input) hold ``new_tokens`` more positions."""
        for name, out in self.pairs:
            axis = self._axes[name]
            size = presents[name].shape[axis]
            if size != self.length + new_tokens:
                raise SessionError(
                    f"{out} has {size} positions after a call that should "
                    f"leave {self.length + new_tokens}"
                )

    def accept(
        self, presents: Mapping[str, np.ndarray], new_tokens: int, *, borrowed: bool = False
    ) -> None:
        """Keep ``presents`` as the state after ``new_tokens`` more positions (all or nothing);
        ``borrowed``: they are views of a larger array (see :meth:`compact`)."""
        self.check_presents(presents, new_tokens)
        self.arrays.update(presents)
        self.length += new_tokens
        self.borrowed = borrowed

    def place(self, name: str, batch: np.ndarray, row: int) -> None:
        """Copy past input ``name`` into row ``row`` of ``batch``, right-aligned on the sequence
        axis (batched decode steps: every row's newest position lands at the same index; the
        attention mask hides what is left of it)."""
        axis = self._axes[name]
        index: list[slice | int] = [slice(None)] * batch.ndim
        index[0] = slice(row, row + 1)
        index[axis] = slice(batch.shape[axis] - self.length, None)
        batch[tuple(index)] = self.arrays[name]

    def row_of(self, present: np.ndarray, name: str, row: int, new_tokens: int) -> np.ndarray:
        """Row ``row`` of a batched, right-aligned present: this state's positions only. A
        view of the batch's array, not a copy (the next batched step copies it into its own
        batch anyway): accept it with ``borrowed=True``; :meth:`compact` makes it this
        state's own."""
        axis = self._axes[name]
        keep = self.length + new_tokens
        index: list[slice | int] = [slice(None)] * present.ndim
        index[0] = slice(row, row + 1)
        index[axis] = slice(present.shape[axis] - keep, None)
        return present[tuple(index)]

    def compact(self) -> None:
        """Own every array (copy borrowed views), so that this state alone does not keep a
        batched step's whole array alive."""
        if self.borrowed:
            self.arrays = {n: a.copy() for n, a in self.arrays.items()}
            self.borrowed = False


def select_next(logits: np.ndarray) -> np.ndarray:
    """The last position's logits as a float vector (what sampling looks at)."""
    arr = np.asarray(logits)
    if arr.ndim != 3 or arr.shape[0] != 1 or arr.shape[1] == 0:
        raise SessionError(f"logits have shape {list(arr.shape)}, expected [1, n, vocab]")
    return np.asarray(arr[0, -1], dtype=np.float32)
