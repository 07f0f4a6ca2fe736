"""Check that a split computes what the full model computes: tail(head(x)) == model(x).

Both halves run in real onnxruntime sessions on sample inputs. Without a codec the outputs
must agree to within kernel-choice noise (:data:`SPLIT_RTOL`, :data:`SPLIT_ATOL`); with a lossy
codec, to within the codec's bound (:data:`CODEC_TOLERANCE`). A decoder is also checked by
greedy generation, each side feeding its own KV cache back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edgeoffload._ort import make_session, run
from edgeoffload.core import codec as codec_mod
from edgeoffload.core.decoder import DecoderLayout, KVState
from edgeoffload.errors import VerificationError
from edgeoffload.split.graph import ModelGraph
from edgeoffload.types import CutPoint

# Generation check of a decoder split: a prompt of this many tokens, then greedy steps.
VERIFY_PROMPT_TOKENS = 7
VERIFY_STEPS = 4

# Split verification (codec "none"): the halves run the same kernels on the same values as
# the full model, so fp32 results are normally bit-identical; the tolerance only absorbs
# kernel choices ORT may make differently for a sub-graph.
SPLIT_RTOL = 1e-5
SPLIT_ATOL = 1e-6
# With a lossy codec the outputs move by the quantisation noise the tail propagates; the
# worst deviation relative to the output's range must stay under these bounds.
CODEC_TOLERANCE = {"none": 1e-5, "fp16": 1e-2, "int8": 5e-2, "int8c": 5e-2}


@dataclass(frozen=True)
class Verification:
    exact: bool
    max_abs_error: dict[str, float]
    codec: str
    codec_max_rel_error: dict[str, float]
    generation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {
            "exact": self.exact,
            "max_abs_error": self.max_abs_error,
            "codec": self.codec,
            "codec_max_rel_error": self.codec_max_rel_error,
            "split_rtol": SPLIT_RTOL,
            "split_atol": SPLIT_ATOL,
        }
        if self.generation is not None:
            data["generation"] = self.generation
        return data


def run_split(
    head: Any | None,
    tail: Any | None,
    inputs: Mapping[str, np.ndarray],
    passthrough: Sequence[str],
    *,
    codec: str = "none",
) -> dict[str, np.ndarray]:
    """tail(codec(head(x))) with real onnxruntime sessions (head/tail: sessions or None)."""
    crossing: dict[str, np.ndarray] = {name: inputs[name] for name in passthrough}
    head_outputs = run(head, inputs) if head is not None else {}
    crossing.update(head_outputs)
    if tail is None:
        return crossing
    spec = codec_mod.CodecSpec.parse(codec)
    received = {
        name: np.asarray(
            codec_mod.decode(codec_mod.encode(a, codec_mod.codec_for_dtype(spec, a.dtype.name)))
        )
        for name, a in crossing.items()
    }
    # The tail's own state inputs (its KV cache) come from ``inputs``, not over the wire; the
    # head's state outputs stay on the device and are outputs of the split model too.
    return {**head_outputs, **run(tail, {**inputs, **received})}


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return math.inf
    if a.size == 0:
        return 0.0
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(np.nanmax(diff)) if not np.isnan(diff).all() else math.inf


def verify_split(
    graph: ModelGraph,
    cut: CutPoint,
    head_model: Any | None,
    tail_model: Any | None,
    inputs_list: Sequence[Mapping[str, np.ndarray]],
    *,
    codec: str = "none",
    threads: int = 1,
    full: Any | None = None,
) -> Verification:
    """Check tail(head(x)) against the full model on every sample; raise on mismatch.

    The parts (and ``full``) may be models, bytes or already-made unoptimised sessions.
    """
    full = full or session_for(graph.serialized(), threads)
    head = session_for(head_model, threads) if head_model is not None else None
    tail = session_for(tail_model, threads) if tail_model is not None else None
    passthrough = [t.name for t in cut.tensors if t.name in {i.name for i in graph.inputs}]
    errors: dict[str, float] = {}
    codec_errors: dict[str, float] = {}
    exact = True
    codec_name = codec_mod.CodecSpec.parse(codec).name
    quant = codec_mod.CodecSpec.parse(codec).quant
    for inputs in inputs_list:
        expected = run(full, inputs)
        got = run_split(head, tail, inputs, passthrough)
        for name, ref in expected.items():
            if name not in got:
                raise VerificationError(f"split at {cut.id} does not produce output {name!r}")
            out = got[name]
            err = _max_abs(out, ref)
            errors[name] = max(errors.get(name, 0.0), err)
            exact = exact and out.shape == ref.shape and np.array_equal(out, ref, equal_nan=True)
            if ref.dtype.kind in "fc":
                bound = SPLIT_ATOL + SPLIT_RTOL * float(np.max(np.abs(ref), initial=0.0))
            else:
                bound = 0.0
            if not err <= bound:
                raise VerificationError(
                    f"split at {cut.id} ({cut.describe()}) changes output {name!r}: "
                    f"max |diff| = {err:.3g} > tolerance {bound:.3g}",
                    hint="please report this model; try another cut with --cut",
                )
        if codec_name != "none" and tail is not None:
            lossy = run_split(head, tail, inputs, passthrough, codec=codec_name)
            for name, ref in expected.items():
                if ref.dtype.kind not in "fc":
                    if not np.array_equal(lossy[name], ref):
                        raise VerificationError(
                            f"codec {codec_name} changes integer output {name!r}"
                        )
                    continue
                scale = float(np.max(np.abs(ref), initial=0.0)) or 1.0
                rel = _max_abs(lossy[name], ref) / scale
                codec_errors[name] = max(codec_errors.get(name, 0.0), rel)
                limit = CODEC_TOLERANCE.get(quant, 1e-5)
                if not rel <= limit:
                    raise VerificationError(
                        f"codec {codec_name} moves output {name!r} by {rel:.3g} of its range "
                        f"at {cut.id} (limit {limit:g})",
                        hint="use a lossless codec (--codec none/zstd) or fp16",
                    )
    return Verification(exact, errors, codec_name, codec_errors)


def verify_generation(
    graph: ModelGraph,
    head_model: Any | None,
    tail_model: Any | None,
    *,
    threads: int = 1,
    seed: int = 0,
    full: Any | None = None,
) -> dict[str, Any]:
    """Greedy-decode with the full model and with head+tail, each side feeding its own KV
    cache back; the logits of every call must agree and the tokens must be identical."""
    layout = DecoderLayout.of(
        graph.inputs, [graph.tensor_spec(o) for o in graph.output_names], graph.state
    )
    specs = {s.name: s for s in graph.inputs}
    full = full or session_for(graph.serialized(), threads)
    sessions = [session_for(m, threads) for m in (head_model, tail_model) if m is not None]
    parts = [(session, _state_pairs(session, graph)) for session in sessions]
    full_state = KVState(layout.state, specs)
    split_states = [KVState(pairs, specs) for _, pairs in parts]
    rng = np.random.default_rng(seed)
    tokens = [int(t) for t in rng.integers(0, layout.vocab_size, VERIFY_PROMPT_TOKENS)]
    feed_ids = list(tokens)
    worst = 0.0
    exact = True
    for _ in range(VERIFY_STEPS):
        feed = layout.token_feed(feed_ids, full_state.length)
        expected = full_state.run(full, feed, len(feed_ids))[layout.logits]
        values: dict[str, np.ndarray] = dict(feed)
        for (session, _), state in zip(parts, split_states, strict=True):
            wanted = [i.name for i in session.get_inputs() if i.name not in state.arrays]
            values.update(state.run(session, {n: values[n] for n in wanted}, len(feed_ids)))
        got = values[layout.logits]
        err = _max_abs(got, expected)
        bound = SPLIT_ATOL + SPLIT_RTOL * float(np.max(np.abs(expected), initial=0.0))
        if not err <= bound:
            raise VerificationError(
                f"the split decoder's logits differ from the full model's at position "
                f"{full_state.length - 1}: max |diff| = {err:.3g} > {bound:.3g}",
                hint="please report this model; try another cut with --cut",
            )
        worst = max(worst, err)
        exact = exact and np.array_equal(got, expected)
        if int(np.argmax(got[0, -1])) != int(np.argmax(expected[0, -1])):
            raise VerificationError("the split decoder picks another greedy token")
        feed_ids = [int(np.argmax(expected[0, -1]))]
        tokens.extend(feed_ids)
    return {
        "exact": exact,
        "max_abs_logit_error": worst,
        "prompt_tokens": VERIFY_PROMPT_TOKENS,
        "steps": VERIFY_STEPS,
    }


def verify_parts(
    graph: ModelGraph,
    cut: CutPoint,
    head: bytes | None,
    tail: bytes | None,
    samples: Sequence[Mapping[str, np.ndarray]],
    *,
    codec: str = "none",
) -> Verification:
    """The verdict written into a bundle: :func:`verify_split` on ``samples`` and, for a
    decoder, :func:`verify_generation`; the parts are serialised models (None: empty side)."""
    full = session_for(graph.serialized(), 1)
    head_session = session_for(head, 1) if head is not None else None
    tail_session = session_for(tail, 1) if tail is not None else None
    verification = verify_split(
        graph, cut, head_session, tail_session, samples, codec=codec, full=full
    )
    if not graph.state:
        return verification
    generation = verify_generation(graph, head_session, tail_session, full=full)
    return replace(
        verification, exact=verification.exact and generation["exact"], generation=generation
    )


def session_for(model: Any, threads: int) -> Any:
    """An unoptimised session for verification (a session given is used as it is)."""
    if hasattr(model, "get_inputs"):
        return model
    return make_session(model, threads=threads, optimize=False)


def _state_pairs(session: Any, graph: ModelGraph) -> list[tuple[str, str]]:
    names = {i.name for i in session.get_inputs()}
    return [(i, o) for i, o in graph.state.items() if i in names]
