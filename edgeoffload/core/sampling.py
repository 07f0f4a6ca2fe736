"""Deterministic next-token sampling from a logits vector.

Pure core: no I/O, no clocks, and no carried random state. The token drawn at a position is a
pure function of ``(logits, params, position)``: the random generator is built afresh for every
call as ``np.random.default_rng([params.seed, position])``. That is what makes generation
replayable: after a server restart (or on another machine) the device can rebuild the session
from its token history and a replay draws exactly the same tokens.

The pipeline is that of Hugging Face ``generate(do_sample=True)`` with the temperature, top-k
and top-p warpers, in that order:

1. ``temperature == 0``: greedy, ``argmax`` (the first maximum on ties, like torch).
2. temperature scaling ``logits / temperature``.
3. top-k (``top_k > 0``): keep every token whose scaled logit is ``>=`` the k-th largest one, so
   tokens tied with the k-th are all kept (``TopKLogitsWarper`` semantics).
4. top-p (``top_p < 1``): softmax over the survivors, then keep the smallest set of most likely
   tokens whose cumulative probability reaches ``top_p``; a token is kept when the mass of the
   tokens ranked before it (by probability, ties by lower token id) is ``< top_p``. The most
   likely token is always kept (``TopPLogitsWarper`` with ``min_tokens_to_keep=1``). The
   arithmetic is float64 where transformers uses the model's float32, so the kept sets differ
   only where a boundary falls within float32 rounding of ``top_p``.
5. softmax in float64 over the survivors, then one uniform draw ``u`` in ``[0, 1)`` and
   ``searchsorted`` on their cumulative distribution, in ascending token-id order.

Step 5 uses a single ``Generator.random()`` draw rather than ``Generator.choice``: the stream of
``random()`` for a seeded PCG64 has been stable since numpy 1.17, and inverse-CDF lookup does not
depend on how a numpy version implements ``choice``. Summing in token-id order (not in sorted
order) makes the draw independent of the sort algorithm too.

Logits may hold ``-inf`` (the conventional "never sample this token" mask of logits processors);
NaN, ``+inf`` or every token at ``-inf`` raise :class:`~edgeoffload.errors.SamplingError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt

from edgeoffload.errors import SamplingError
from edgeoffload.types import fields

MAX_SEED = 2**63 - 1
"""Largest accepted seed (seeds are non-negative and fit a signed 64-bit integer)."""

MAX_POSITION = 2**32 - 1
"""Largest accepted position.

numpy's ``SeedSequence`` turns each integer into as many 32-bit words as it needs and
concatenates them, so ``[seed, position]`` is an injective key only while the position fits one
word; four billion tokens is far beyond any context length.
"""

_HINT = "see SamplingParams: temperature >= 0, top_k >= 0, 0 < top_p <= 1, 0 <= seed < 2**63"


def _is_int(value: object) -> TypeGuard[int | np.integer[Any]]:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_number(value: object) -> TypeGuard[int | float | np.integer[Any] | np.floating[Any]]:
    return _is_int(value) or isinstance(value, float | np.floating)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token; the defaults are greedy decoding.

    Attributes:
        temperature: ``0`` means greedy (argmax); otherwise logits are divided by it.
        top_k: keep only the ``top_k`` most likely tokens (plus ties); ``0`` disables it.
        top_p: nucleus sampling threshold in ``(0, 1]``; ``1`` disables it.
        seed: with the position, the only source of randomness; ``0 <= seed < 2**63``.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        temperature, top_p = self.temperature, self.top_p
        if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
            raise SamplingError(
                f"temperature must be a finite number >= 0, got {temperature!r}", hint=_HINT
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0, got {self.top_k!r}", hint=_HINT)
        if not _is_number(top_p) or not (0.0 < top_p <= 1.0):
            raise SamplingError(f"top_p must be a number in (0, 1], got {top_p!r}", hint=_HINT)
        if not _is_int(self.seed) or not (0 <= self.seed <= MAX_SEED):
            raise SamplingError(
                f"seed must be an integer in [0, 2**63), got {self.seed!r}", hint=_HINT
            )
        # Normalise numpy scalars and ints so that equal parameters compare and hash equal
        # and to_dict() always yields plain JSON types.
        object.__setattr__(self, "temperature", float(temperature))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "top_p", float(top_p))
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def greedy(self) -> bool:
        """True when decoding is deterministic argmax (``temperature == 0``)."""
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: object) -> SamplingParams:
        """Parse a JSON object; absent keys take their defaults, unknown keys are rejected.

        Raises:
            SamplingError: not an object, an unknown key, a wrong type or a value out of range.
        """
        f = fields(data, "sampling params", SamplingError)
        temperature = f.number("temperature", 0.0)
        top_k = f.integer("top_k", 0)
        top_p = f.number("top_p", 1.0, positive=True)
        seed = f.integer("seed", 0)
        f.done()
        return cls(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


def _checked_logits(logits: object) -> tuple[npt.NDArray[np.float64], bool]:
    """The logits as float64 and whether all of them are finite (none masked with -inf)."""
    if not isinstance(logits, np.ndarray):
        raise SamplingError(f"logits must be a numpy array, got {type(logits).__name__}")
    if logits.ndim != 1 or logits.size == 0:
        raise SamplingError(
            f"logits must have shape [vocab] with vocab >= 1, got shape {logits.shape}",
            hint="pass the logits of the last position only, e.g. logits[0, -1]",
        )
    if not np.issubdtype(logits.dtype, np.floating):
        raise SamplingError(f"logits must be floating point, got dtype {logits.dtype}")
    # float16/float32 -> float64 is exact, so every later step sees the model's values.
    values = logits.astype(np.float64, copy=False)
    if np.isfinite(values).all():  # the common case: one cheap pass
        return values, True
    if np.isnan(values).any() or np.isposinf(values).any():
        raise SamplingError(
            "logits contain NaN or +inf",
            hint="the model produced non-finite outputs: check the inputs, the KV cache and "
            "the numeric precision of the model",
        )
    if np.isneginf(values).all():
        raise SamplingError("every logit is -inf: no token can be sampled")
    return values, False


def _check_position(position: object) -> int:
    value = int(position) if _is_int(position) else -1
    if not 0 <= value <= MAX_POSITION:
        raise SamplingError(
            f"position must be an integer in [0, 2**32), got {position!r}",
            hint="pass the index in the sequence of the token being generated",
        )
    return value


_NUCLEUS_FIRST_GUESS = 256
"""How many top tokens the nucleus search sorts first (the nucleus is rarely larger)."""


def _nucleus(
    scores: npt.NDArray[np.float64], probs: npt.NDArray[np.float64], top_p: float
) -> npt.NDArray[np.intp]:
    """Positions (ascending) of the nucleus of ``probs``; ``scores`` orders them.

    Sorting a 150k vocabulary costs ~20 ms, so only the tokens scoring at least the k-th best
    are sorted, k growing until their mass reaches ``top_p``. Those tokens (ties included) are
    exactly the head of the full descending order, and their running sum is bit-identical to
    that of a full sort, so the result does not depend on where the search stopped.
    """
    size = scores.size
    k = _NUCLEUS_FIRST_GUESS
    while True:
        if k < size:
            kth = np.partition(scores, size - k)[size - k]
            head = np.flatnonzero(scores >= kth)
        else:
            head = np.arange(size)
        # head is ascending, so a stable sort on -score breaks ties by the lower position.
        order = head[np.argsort(-scores[head], kind="stable")]
        cumulative = np.cumsum(probs[order])
        if k >= size or cumulative[-1] >= top_p:
            break
        k *= 8
    # Keep a token while the mass strictly before it is < top_p: the smallest head whose
    # mass reaches top_p, and always the first token.
    mass_before = np.concatenate(([0.0], cumulative[:-1]))
    return np.sort(order[mass_before < top_p])


def _weights(
    values: npt.NDArray[np.float64], all_finite: bool, params: SamplingParams
) -> tuple[npt.NDArray[np.intp] | None, npt.NDArray[np.float64]]:
    """Unnormalised weights of the surviving tokens, in ascending token-id order.

    The ids are None when every token survives (the weights then cover the whole vocabulary),
    which spares two gathers over the vocabulary on the plain temperature path.
    """
    ids: npt.NDArray[np.intp] | None = None
    if not all_finite:
        ids = np.flatnonzero(values > -np.inf)
        values = values[ids]

    # Top-k on the model's own values: after the shift below, 1 + 3e-28 and 1 would tie.
    if 0 < params.top_k < values.size:
        kth = np.partition(values, values.size - params.top_k)[values.size - params.top_k]
        keep = np.flatnonzero(values >= kth)  # >=: tokens tied with the k-th all survive
        ids = keep if ids is None else ids[keep]
        values = values[keep]

    # Shift before dividing: softmax is shift-invariant, and a tiny temperature then yields
    # -inf (weight 0) instead of inf - inf = NaN.
    scores = values - values.max()
    scores /= params.temperature

    weights = np.exp(scores)  # the best token has score 0, hence weight 1
    if params.top_p < 1.0 and scores.size > 1:
        # Ordered by the model's values too: the shift can turn near-equal logits into ties.
        kept = _nucleus(values, weights / weights.sum(), params.top_p)
        ids = kept if ids is None else ids[kept]
        weights = weights[kept]
    return ids, weights


def filtered_distribution(
    logits: npt.NDArray[np.floating[Any]], params: SamplingParams
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """The tokens :func:`sample_token` can return and their probabilities.

    Returns:
        ``(token_ids, probs)``: the surviving token ids in ascending order and their float64
        probabilities (each ``> 0``, summing to 1). Greedy gives ``([argmax], [1.0])``.

    Raises:
        SamplingError: the logits are not a 1-D float array, or hold NaN / +inf / only -inf.
    """
    values, all_finite = _checked_logits(logits)
    if params.greedy:
        return np.array([int(np.argmax(values))], dtype=np.int64), np.ones(1, dtype=np.float64)
    ids, weights = _weights(values, all_finite, params)
    # exp() underflows to 0 for far-away tokens (or under a tiny temperature); they can never
    # be drawn, so they are not part of the support.
    nonzero = np.flatnonzero(weights > 0.0)
    token_ids = (nonzero if ids is None else ids[nonzero]).astype(np.int64)
    probs = weights[nonzero]
    return token_ids, probs / probs.sum()


def sample_token(
    logits: npt.NDArray[np.floating[Any]], params: SamplingParams, position: int
) -> int:
    """Pick the next token id; a pure function of ``(logits, params, position)``.

    Args:
        logits: shape ``[vocab]``, float (float32 from the model); ``-inf`` masks a token.
        params: the sampling parameters.
        position: the sequence index of the token being generated (``0 <= position < 2**32``);
            with ``params.seed`` it seeds the generator used for this draw only.

    Raises:
        SamplingError: bad logits (see :func:`filtered_distribution`) or a bad position.
    """
    position = _check_position(position)
    values, all_finite = _checked_logits(logits)
    if params.greedy:
        return int(np.argmax(values))
    ids, weights = _weights(values, all_finite, params)
    if weights.size == 1:
        return int(0 if ids is None else ids[0])
    cdf = np.cumsum(weights)
    u = np.random.default_rng([params.seed, position]).random()
    # side="right" finds the first token whose cumulative weight exceeds u * total, so a token
    # is picked with probability exactly its share of [0, total) and a zero-weight token never.
    index = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    if index == cdf.size:
        # u * total rounded up to total (u within 2**-53 of 1): take the last token that has
        # any weight.
        index = int(np.searchsorted(cdf, cdf[-1], side="left"))
    return int(index if ids is None else ids[index])
