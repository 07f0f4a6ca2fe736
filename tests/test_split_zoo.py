"""Every single-tensor cut and >= 20 multi-tensor cuts of every zoo model split and verify.

Verification runs the real head and tail in onnxruntime and compares tail(head(x)) with the
full model on two inputs (see verify.verify_split); any difference beyond the documented
tolerance raises VerificationError, which fails the test.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeoffload.split import zoo
from edgeoffload.split.verify import verify_split


def _interior(analysis):
    n = len(analysis.graph.nodes)
    return [c for c in analysis.cuts if 0 < c.index < n]


def _spread(cuts, count):
    """``count`` cuts spread evenly over the list (deterministic)."""
    if len(cuts) <= count:
        return cuts
    idx = np.linspace(0, len(cuts) - 1, count).round().astype(int)
    return [cuts[i] for i in sorted(set(idx.tolist()))]


def _verify(analysis, cut, samples):
    head, tail = analysis.graph.split(cut)
    result = verify_split(analysis.graph, cut, head, tail, samples)
    assert result.exact, f"{cut.id}: {result.max_abs_error}"
    return result


@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_every_single_tensor_cut_verifies(zoo_analyses, name):
    analysis = zoo_analyses[name]
    samples = [analysis.inputs, analysis.graph.sample_inputs(seed=7)]
    single = [c for c in _interior(analysis) if len(c.tensors) == 1]
    if name != "encoder":  # the encoder's attention mask crosses every cut inside the layers
        assert len(single) >= 10
    for cut in single:
        _verify(analysis, cut, samples)


@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_twenty_multi_tensor_cuts_verify(zoo_analyses, name):
    analysis = zoo_analyses[name]
    samples = [analysis.inputs, analysis.graph.sample_inputs(seed=7)]
    multi = [c for c in _interior(analysis) if len(c.tensors) > 1]
    chosen = _spread(multi, 20)
    assert len(chosen) >= 20, f"{name} has only {len(multi)} multi-tensor cuts"
    for cut in chosen:
        _verify(analysis, cut, samples)


@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_extreme_cuts_verify(zoo_analyses, name):
    analysis = zoo_analyses[name]
    first, last = analysis.cuts[0], analysis.cuts[-1]
    head, tail = analysis.graph.split(first)
    assert head is None and tail is not None
    head, tail = analysis.graph.split(last)
    assert tail is None and head is not None
    for cut in (first, last):
        _verify(analysis, cut, [analysis.inputs])


def test_residual_cuts_cross_two_tensors(zoo_analyses):
    """Cuts inside a MobileNetV2 residual block carry the skip tensor and the branch."""
    analysis = zoo_analyses["mobilenetv2"]
    inside = [c for c in analysis.cuts if c.layer == "block2" and not c.boundary]
    assert inside and all(len(c.tensors) == 2 for c in inside)
    skip = {t.name for t in inside[0].tensors} & {t.name for t in inside[-1].tensors}
    assert skip, "the skip tensor should cross every cut inside the block"


@pytest.mark.slow
def test_minilm_cuts_verify(minilm_analysis):
    """Real weights: every single-tensor cut and 20 multi-tensor cuts of MiniLM verify."""
    analysis = minilm_analysis
    samples = [analysis.inputs]
    interior = _interior(analysis)
    single = [c for c in interior if len(c.tensors) == 1]
    multi = _spread([c for c in interior if len(c.tensors) > 1], 20)
    assert len(multi) >= 20
    for cut in single + multi:
        _verify(analysis, cut, samples)
    # The cuts at encoder layer boundaries carry the hidden state and the attention mask.
    boundaries = [c for c in interior if c.boundary and c.layer.startswith("encoder/layer.")]
    assert len(boundaries) >= 5
