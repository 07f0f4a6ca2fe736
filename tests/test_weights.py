"""Quantised weights per side of a decoder split (edgeoffload.split.weights).

The tiny random Llama (4 blocks, tied embeddings read by the lm_head through a Transpose) is
split after 2 blocks and each part quantised with onnxruntime's real MatMulNBits quantiser.
The oracle for exactness is the whole model quantised with the same settings per node
(:func:`quantize_unsplit`): head + tail must give its tokens and logits. Sizes, the manifest
record, the pricing of a quantised head and the privacy floor on a quantised graph are checked
against the quantised parts themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from edgeoffload._ort import make_session
from edgeoffload.bundle import load_bundle
from edgeoffload.core.costmodel import Constraints
from edgeoffload.core.decoder import DecoderLayout
from edgeoffload.errors import UsageError
from edgeoffload.manifest import Manifest
from edgeoffload.split.analysis import Analysis
from edgeoffload.split.decoder_split import block_cuts, split_decoder
from edgeoffload.split.graph import ModelGraph
from edgeoffload.split.quality import PartsDecoder
from edgeoffload.split.weights import (
    WeightScheme,
    materialise_weight_views,
    priced_cuts,
    quantize_model,
    quantize_unsplit,
    weight_bytes,
    weights_record,
)

HEAD_LAYERS = 2
QUICK = {"prompts": 4, "new_tokens": 16, "window": 128}  # quality settings for fast tests


@pytest.fixture(scope="module")
def analysis(tiny_llama_dir: Path) -> Analysis:
    return Analysis.of(tiny_llama_dir / "model.onnx")


def _layout(graph: ModelGraph) -> DecoderLayout:
    outputs = [graph.tensor_spec(o) for o in graph.output_names]
    return DecoderLayout.of(graph.inputs, outputs, graph.state)


def _generate(decoder: PartsDecoder, prompt: list[int], steps: int) -> tuple[list[int], Any]:
    """Greedy tokens and every step's logits."""
    states = decoder.start()
    logits = [decoder.forward(states, prompt)[-1]]
    tokens = [int(np.argmax(logits[-1]))]
    while len(tokens) < steps:
        logits.append(decoder.forward(states, tokens[-1:])[-1])
        tokens.append(int(np.argmax(logits[-1])))
    return tokens, np.stack(logits)


@pytest.mark.parametrize(
    ("head", "tail"),
    [
        ("int4", "int4"),
        ("int4", "int8"),
        ("int8", "fp32"),
        ("fp16", "int4"),
        ("hqq", "int8"),
        ("int4-int8compute", "int8"),
    ],
)
def test_quantised_split_gives_the_quantised_unsplit_models_tokens(
    analysis: Analysis, head: str, tail: str
) -> None:
    graph = analysis.graph
    cut = block_cuts(analysis)[HEAD_LAYERS]
    head_scheme = {
        "hqq": WeightScheme("int4", method="hqq"),
        "int4-int8compute": WeightScheme("int4", compute="int8"),
    }.get(head) or WeightScheme(head)
    tail_scheme = WeightScheme(tail, 64, symmetric=True)
    head_model, tail_model = graph.split(cut)
    assert head_model is not None and tail_model is not None
    parts = [
        make_session(quantize_model(head_model, head_scheme), optimize=False),
        make_session(quantize_model(tail_model, tail_scheme), optimize=False),
    ]
    whole = quantize_unsplit(graph, cut, head_scheme, tail_scheme)
    layout = _layout(graph)
    split = PartsDecoder(parts, graph, layout)
    unsplit = PartsDecoder([make_session(whole, optimize=False)], graph, layout)
    prompt = [5, 17, 42, 99, 3, 250, 7]
    tokens, logits = _generate(split, prompt, 12)
    want_tokens, want_logits = _generate(unsplit, prompt, 12)
    assert tokens == want_tokens
    np.testing.assert_array_equal(logits, want_logits)
    _, fp32_logits = _generate(
        PartsDecoder([make_session(graph.serialized(), optimize=False)], graph, layout),
        prompt,
        12,
    )
    assert not np.array_equal(logits, fp32_logits)  # the weights did change


def test_tied_lm_head_is_materialised_and_quantised(analysis: Analysis) -> None:
    _, tail_model = analysis.graph.split(block_cuts(analysis)[HEAD_LAYERS])
    assert tail_model is not None
    copy = onnx.ModelProto()
    copy.CopyFrom(tail_model)
    assert materialise_weight_views(copy) == 1
    quantised = quantize_model(tail_model, WeightScheme("int4"))
    ops = [n.op_type for n in quantised.graph.node]
    inits = {t.name for t in quantised.graph.initializer}
    weight_matmuls = [
        n for n in quantised.graph.node if n.op_type == "MatMul" and n.input[1] in inits
    ]
    assert not weight_matmuls  # every MatMul with a weight became MatMulNBits, lm_head too
    assert ops.count("MatMulNBits") == 2 * 7 + 1


def test_int4_head_is_much_smaller(analysis: Analysis) -> None:
    head_model, _ = analysis.graph.split(block_cuts(analysis)[HEAD_LAYERS])
    assert head_model is not None
    fp32 = weight_bytes(head_model)
    int8 = weight_bytes(quantize_model(head_model, WeightScheme("int8")))
    int4 = quantize_model(head_model, WeightScheme("int4"))
    fp16 = weight_bytes(quantize_model(head_model, WeightScheme("fp16")))
    assert fp32 > fp16 > int8 > weight_bytes(int4)
    assert fp32 >= 4 * weight_bytes(int4)
    assert fp16 * 2 == pytest.approx(fp32, rel=0.01)
    ops = [n.op_type for n in int4.graph.node]
    assert ops.count("GatherBlockQuantized") == 1  # the embedding, packed at 4 bits
    # The files carry the graph too (thousands of small nodes in this tiny model): 3x still.
    assert len(head_model.SerializeToString()) >= 3 * len(int4.SerializeToString())


@pytest.mark.parametrize(
    "scheme",
    [
        WeightScheme("int4"),
        WeightScheme("int4", 64, symmetric=True),
        WeightScheme("int8"),
        WeightScheme("int8", 128, symmetric=True),
        WeightScheme("fp16"),
        WeightScheme("int4", method="hqq"),
    ],
    ids=str,
)
def test_priced_head_weights_are_the_quantised_parts(
    analysis: Analysis, scheme: WeightScheme
) -> None:
    blocks = block_cuts(analysis)
    priced = dict(
        zip(blocks, priced_cuts(analysis.graph, list(blocks.values()), scheme), strict=True)
    )
    for k in (1, HEAD_LAYERS, 4):
        head_model, _ = analysis.graph.split(blocks[k])
        assert head_model is not None
        assert priced[k].head_weight_bytes == weight_bytes(quantize_model(head_model, scheme))
        assert priced[k].head_peak_bytes == blocks[k].head_peak_bytes


def test_quantised_blocks_count_for_min_head_depth(analysis: Analysis) -> None:
    """MatMulNBits is parametric: the head depth of every block cut is that of fp32."""
    whole = quantize_model(analysis.graph.model, WeightScheme("int4"))
    quantised = ModelGraph(whole, sha256="q", dims=analysis.graph.dims)
    assert [n.op_type for n in quantised.nodes].count("MatMulNBits") > 0
    q_analysis = Analysis.of(whole)
    fp32_depth = {k: c.head_depth for k, c in block_cuts(analysis).items()}
    q_depth = {k: c.head_depth for k, c in block_cuts(q_analysis).items()}
    assert q_depth == fp32_depth and fp32_depth[HEAD_LAYERS] > 0
    floor = Constraints(min_head_depth=fp32_depth[HEAD_LAYERS])
    assert floor.check(block_cuts(q_analysis)[HEAD_LAYERS]) == ""
    assert floor.check(block_cuts(q_analysis)[HEAD_LAYERS - 1]) != ""


def test_bundle_manifest_records_each_parts_weights(tiny_llama_dir: Path, tmp_path: Path) -> None:
    bundle = split_decoder(
        tiny_llama_dir / "model.onnx",
        tmp_path / "b",
        head_layers=HEAD_LAYERS,
        head_weights=WeightScheme("int4"),
        tail_weights=WeightScheme("int8", 64, symmetric=True),
        quality_settings=QUICK,
    )
    loaded = load_bundle(bundle.path)  # every hash verified
    head, tail = loaded.manifest.weights["head"], loaded.manifest.weights["tail"]
    assert head["dtype"] == "int4" and head["bits"] == 4 and head["block"] == 32
    assert head["symmetric"] is False and head["scheme"] == "rtn"
    assert head["quantised_ops"] == {"MatMulNBits": HEAD_LAYERS * 7, "GatherBlockQuantized": 1}
    assert tail["dtype"] == "int8" and tail["block"] == 64 and tail["symmetric"] is True
    assert tail["quantised_ops"]["MatMulNBits"] == (4 - HEAD_LAYERS) * 7 + 1  # + lm_head
    assert head["fp32_weight_matmuls"] == tail["fp32_weight_matmuls"] == 0
    assert "onnxruntime" in head["quantiser"] and "matmul_nbits" in head["quantiser"]
    head_file = onnx.load(str(bundle.path / "head.onnx"))
    assert head["weight_bytes"] == weight_bytes(head_file)
    again = Manifest.from_dict(json.loads((bundle.path / "manifest.json").read_text()))
    assert again == loaded.manifest
    assert loaded.manifest.quality["positions"] == QUICK["prompts"] * QUICK["new_tokens"]


def test_fp32_bundle_has_no_weights_section(tiny_decoder_bundle: Any) -> None:
    manifest = tiny_decoder_bundle("llama", HEAD_LAYERS).manifest
    assert manifest.weights == {} and manifest.quality == {}
    assert "weights" not in manifest.to_dict() and "quality" not in manifest.to_dict()


@pytest.mark.parametrize(
    ("kind", "block", "symmetric", "method"),
    [
        ("int3", 32, False, "rtn"),
        ("bf16", 32, False, "rtn"),
        ("int4", 48, False, "rtn"),
        ("int8", 256, False, "rtn"),
        ("int4", 32, False, "gptq"),
        ("int8", 32, False, "hqq"),
        ("int4", 32, True, "hqq"),
    ],
)
def test_weight_scheme_rejects_bad_values(
    kind: str, block: int, symmetric: bool, method: str
) -> None:
    with pytest.raises(UsageError):
        WeightScheme(kind, block, symmetric, method)


def test_int8_compute_is_recorded_and_set_on_the_quantised_nodes(analysis: Analysis) -> None:
    head_model, _ = analysis.graph.split(block_cuts(analysis)[HEAD_LAYERS])
    assert head_model is not None
    scheme = WeightScheme("int4", compute="int8")
    quantised = quantize_model(head_model, scheme)
    levels = [
        a.i
        for n in quantised.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    ]
    assert levels == [4] * HEAD_LAYERS * 7
    record = weights_record(quantised, scheme)
    assert record["compute"] == "int8" and record["accuracy_level"] == 4
    with pytest.raises(UsageError, match="weights-compute"):
        WeightScheme("int4", compute="int16")
