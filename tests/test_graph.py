"""Tests for edgeoffload.split.graph: cut analysis, find_cut, loading, naming and extraction.

Every model is built here with onnx.helper (opset 17, fixed seeds) and every split is run in
real onnxruntime sessions through ``verify.verify_split`` / ``verify.run_split``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeoffload._ort import make_session, run
from edgeoffload.errors import CutError, GraphError
from edgeoffload.split import zoo
from edgeoffload.split.analysis import Analysis
from edgeoffload.split.graph import ModelGraph, layer_of
from edgeoffload.split.loading import load_model
from edgeoffload.split.verify import run_split, verify_split
from edgeoffload.types import CutPoint

SEED = 0
F = TensorProto.FLOAT


def _model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    *,
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _weight(name: str, shape: tuple[int, ...], seed: int) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _feeds(graph: ModelGraph, count: int = 2) -> list[dict[str, np.ndarray]]:
    return [graph.sample_inputs(seed=SEED + i) for i in range(count)]


def _check_split_runs(graph: ModelGraph, cut: CutPoint) -> None:
    """Split at ``cut``: both parts pass the full checker and reproduce the model exactly."""
    head, tail = graph.split(cut)
    for part in (head, tail):
        if part is not None:
            onnx.checker.check_model(part, full_check=True)
    result = verify_split(graph, cut, head, tail, _feeds(graph))
    assert result.exact, result.max_abs_error


def _names(cut: CutPoint) -> list[str]:
    return [t.name for t in cut.tensors]


# -- models -------------------------------------------------------------------------------------


@functools.cache
def chain_model() -> onnx.ModelProto:
    """x[batch,4] -> MatMul(W1 4x8) -> Relu -> MatMul(W2 8x3) -> Sigmoid -> y[batch,3]."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="fc1/matmul"),
        helper.make_node("Relu", ["h1"], ["h2"], name="fc1/relu"),
        helper.make_node("MatMul", ["h2", "W2"], ["h3"], name="fc2/matmul"),
        helper.make_node("Sigmoid", ["h3"], ["y"], name="fc2/sigmoid"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F, ["batch", 4])],
        [helper.make_tensor_value_info("y", F, ["batch", 3])],
        [_weight("W1", (4, 8), 1), _weight("W2", (8, 3), 2)],
    )


@functools.cache
def residual_model() -> onnx.ModelProto:
    """stem Relu -> [Conv -> Relu -> Conv] + skip -> Relu; tensor names sort against order."""
    nodes = [
        helper.make_node("Relu", ["x"], ["zz_skip"], name="stem/relu"),
        helper.make_node("Conv", ["zz_skip", "Wa"], ["mm_a"], name="block1/conv_a", pads=[1] * 4),
        helper.make_node("Relu", ["mm_a"], ["aa_branch"], name="block1/relu"),
        helper.make_node("Conv", ["aa_branch", "Wb"], ["bb_b"], name="block1/conv_b", pads=[1] * 4),
        helper.make_node("Add", ["bb_b", "zz_skip"], ["sum"], name="block1/add"),
        helper.make_node("Relu", ["sum"], ["y"], name="head/relu"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F, ["batch", 2, 5, 5])],
        [helper.make_tensor_value_info("y", F, ["batch", 2, 5, 5])],
        [_weight("Wa", (2, 2, 3, 3), 3), _weight("Wb", (2, 2, 3, 3), 4)],
    )


@functools.cache
def late_input_model() -> onnx.ModelProto:
    """A mask input read only by the last node."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="n/relu"),
        helper.make_node("Sigmoid", ["a"], ["b"], name="n/sigmoid"),
        helper.make_node("Tanh", ["b"], ["c"], name="n/tanh"),
        helper.make_node("Mul", ["c", "mask"], ["y"], name="n/mask"),
    ]
    return _model(
        nodes,
        [
            helper.make_tensor_value_info("x", F, ["batch", 6]),
            helper.make_tensor_value_info("mask", F, ["batch", 6]),
        ],
        [helper.make_tensor_value_info("y", F, ["batch", 6])],
    )


@functools.cache
def shared_constant_model() -> onnx.ModelProto:
    """A Constant node and an initializer, each read by nodes on both sides of c2."""
    const = helper.make_node(
        "Constant",
        [],
        ["C"],
        name="const/C",
        value=numpy_helper.from_array(np.array([0.5, -1.0, 2.0], dtype=np.float32), "C_value"),
    )
    nodes = [
        const,  # not a compute node: it gets no cut of its own
        helper.make_node("Add", ["x", "C"], ["a"], name="p/add"),
        helper.make_node("Mul", ["a", "B"], ["b"], name="p/mul"),
        helper.make_node("Relu", ["b"], ["c"], name="p/relu"),
        helper.make_node("Mul", ["c", "C"], ["d"], name="p/mul2"),
        helper.make_node("Add", ["d", "B"], ["y"], name="p/add2"),
    ]
    b = numpy_helper.from_array(np.array([1.5, 0.25, -3.0], dtype=np.float32), "B")
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F, ["batch", 3])],
        [helper.make_tensor_value_info("y", F, ["batch", 3])],
        [b],
    )


@functools.cache
def if_model() -> onnx.ModelProto:
    """An If node whose branches read ``t`` (and ``r``) from the outer scope.

    relu(x)->r, neg(x)->t, reducesum(x)->s, greater(s, 0)->cond, If(cond)->z, sigmoid(z)->y
    """
    then_branch = helper.make_graph(
        [helper.make_node("Add", ["t", "t"], ["then_out"], name="then/add")],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", F, [2, 3])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Mul", ["t", "r"], ["else_out"], name="else/mul")],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", F, [2, 3])],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="pre/relu"),
        helper.make_node("Neg", ["x"], ["t"], name="pre/neg"),
        helper.make_node("ReduceSum", ["x"], ["s"], name="pre/sum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="pre/greater"),
        helper.make_node(
            "If", ["cond"], ["z"], name="ctl/if", then_branch=then_branch, else_branch=else_branch
        ),
        helper.make_node("Sigmoid", ["z"], ["y"], name="post/sigmoid"),
    ]
    zero = numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [2, 3])],
        [helper.make_tensor_value_info("y", F, [2, 3])],
        [zero],
    )


@functools.cache
def two_output_model() -> onnx.ModelProto:
    """``early`` is a graph output produced by the second of four nodes."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="m/relu"),
        helper.make_node("Neg", ["a"], ["early"], name="m/neg"),
        helper.make_node("Sigmoid", ["a"], ["b"], name="m/sigmoid"),
        helper.make_node("Tanh", ["b"], ["late"], name="m/tanh"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [1, 4])],
        [
            helper.make_tensor_value_info("early", F, [1, 4]),
            helper.make_tensor_value_info("late", F, [1, 4]),
        ],
    )


# -- chain --------------------------------------------------------------------------------------


def test_chain_cuts_cross_one_tensor_each() -> None:
    graph = load_model(chain_model()).graph(dims={"batch": 2})
    cuts = graph.cuts()
    assert len(cuts) == len(graph.nodes) + 1 == 5
    assert [c.index for c in cuts] == list(range(5))
    assert [c.id for c in cuts] == ["c0", "c1", "c2", "c3", "c4"]
    assert [_names(c) for c in cuts] == [["x"], ["h1"], ["h2"], ["h3"], []]
    # bytes = prod(shape) * itemsize, with batch = 2
    assert [c.nbytes for c in cuts] == [2 * 4 * 4, 2 * 8 * 4, 2 * 8 * 4, 2 * 3 * 4, 0]
    assert cuts[1].tensors[0].shape == ("batch", 8)
    assert cuts[1].tensors[0].dtype == "float32"
    assert [c.after for c in cuts] == ["", "fc1/matmul", "fc1/relu", "fc2/matmul", "fc2/sigmoid"]
    assert cuts[0].describe() == "all-remote"
    assert cuts[2].describe() == "after fc1/relu"
    assert [c.layer for c in cuts[1:]] == ["fc1", "fc1", "fc2", "fc2"]
    assert [c.boundary for c in cuts] == [True, False, True, False, True]


def test_chain_batch_defaults_to_one() -> None:
    graph = load_model(chain_model()).graph()
    assert graph.dims == {"batch": 1}
    assert graph.input_shapes() == {"x": (1, 4)}
    assert [c.nbytes for c in graph.cuts()] == [16, 32, 32, 12, 0]
    assert graph.input_bytes() == 16
    assert graph.output_bytes() == 12


def test_chain_weights_depth_and_peak() -> None:
    graph = load_model(chain_model()).graph(dims={"batch": 2})
    cuts = graph.cuts()
    w1, w2 = 4 * 8 * 4, 8 * 3 * 4
    assert [c.head_weight_bytes for c in cuts] == [0, w1, w1, w1 + w2, w1 + w2]
    assert [c.head_depth for c in cuts] == [0, 1, 1, 2, 2]
    for cut in cuts[1:]:
        assert cut.head_peak_bytes >= cut.nbytes
        assert cut.device_memory_bytes == cut.head_weight_bytes + cut.head_peak_bytes
    peaks = [c.head_peak_bytes for c in cuts]
    assert peaks == sorted(peaks)  # a prefix maximum
    # While fc1/matmul runs, x (32 B) and h1 (64 B) are both live.
    assert cuts[1].head_peak_bytes >= 32 + 64
    data = cuts[2].to_dict()
    assert data["id"] == "c2" and data["tensors"] == [
        {"name": "h2", "dtype": "float32", "shape": ["batch", 8]}
    ]


@pytest.mark.parametrize("index", range(5))
def test_chain_every_cut_splits_exactly(index: int) -> None:
    graph = load_model(chain_model()).graph(dims={"batch": 2})
    cut = graph.cuts()[index]
    head, tail = graph.split(cut)
    assert (head is None) == (index == 0)
    assert (tail is None) == (index == 4)
    _check_split_runs(graph, cut)


# -- residual block -----------------------------------------------------------------------------


def test_residual_cuts_cross_skip_and_branch() -> None:
    graph = load_model(residual_model()).graph()
    cuts = graph.cuts()
    assert len(cuts) == 7
    assert _names(cuts[1]) == ["zz_skip"]
    # Inside the block: the skip tensor and the branch tensor, ordered by producer (not name).
    assert _names(cuts[2]) == ["zz_skip", "mm_a"]
    assert _names(cuts[3]) == ["zz_skip", "aa_branch"]
    assert _names(cuts[4]) == ["zz_skip", "bb_b"]
    assert _names(cuts[5]) == ["sum"]
    act = 1 * 2 * 5 * 5 * 4
    assert [c.nbytes for c in cuts] == [act, act, 2 * act, 2 * act, 2 * act, act, 0]
    assert [c.head_depth for c in cuts] == [0, 0, 1, 1, 2, 2, 2]
    conv = 2 * 2 * 3 * 3 * 4
    assert [c.head_weight_bytes for c in cuts] == [0, 0, conv, conv, 2 * conv, 2 * conv, 2 * conv]
    for cut in cuts[1:]:
        assert cut.head_peak_bytes >= cut.nbytes
    for index in (2, 3, 4):
        _check_split_runs(graph, cuts[index])


# -- a graph input read late ----------------------------------------------------------------------


def test_late_input_crosses_every_earlier_cut() -> None:
    graph = load_model(late_input_model()).graph(dims={"batch": 2})
    cuts = graph.cuts()
    assert [_names(c) for c in cuts] == [
        ["mask", "x"],
        ["mask", "a"],
        ["mask", "b"],
        ["mask", "c"],
        [],
    ]
    assert all(c.nbytes == 2 * (2 * 6 * 4) for c in cuts[:4])
    cut = cuts[2]
    assert graph.head_inputs(cut) == ["x"]  # the head does not read the mask
    assert graph.head_outputs(cut) == ["b"]
    head, tail = graph.split(cut)
    assert head is not None and tail is not None
    assert [i.name for i in head.graph.input] == ["x"]
    assert [o.name for o in head.graph.output] == ["b"]
    assert sorted(i.name for i in tail.graph.input) == ["b", "mask"]
    _check_split_runs(graph, cut)

    # run_split passes the mask through from the device's inputs to the tail.
    feed = graph.sample_inputs(seed=7)
    got = run_split(make_session(head), make_session(tail), feed, ["mask"])
    expected = run(make_session(graph.model), feed)
    np.testing.assert_array_equal(got["y"], expected["y"])
    # The tail really reads the passed-through mask: changing it changes the output.
    doubled = run_split(
        make_session(head), make_session(tail), {**feed, "mask": feed["mask"] * 2}, ["mask"]
    )
    np.testing.assert_allclose(doubled["y"], 2 * expected["y"], rtol=1e-6)


# -- Constant nodes and initializers --------------------------------------------------------------


def test_constants_and_initializers_go_to_both_sides() -> None:
    graph = load_model(shared_constant_model()).graph()
    assert [n.name for n in graph.nodes] == ["p/add", "p/mul", "p/relu", "p/mul2", "p/add2"]
    cuts = graph.cuts()
    assert len(cuts) == 6
    for cut in cuts:
        assert not {"B", "C"} & set(_names(cut))
    cut = graph.find_cut("c2")
    head, tail = graph.split(cut)
    assert head is not None and tail is not None
    for part in (head, tail):
        assert [n.name for n in part.graph.node if n.op_type == "Constant"] == ["const/C"]
        assert [t.name for t in part.graph.initializer] == ["B"]
        assert not {"B", "C"} & {i.name for i in part.graph.input}
    # B (3 float32) is a head weight from its first use; Constant bytes are not counted.
    assert [c.head_weight_bytes for c in cuts] == [0, 0, 12, 12, 12, 12]
    for index in range(6):
        _check_split_runs(graph, cuts[index])


def test_unused_constant_and_initializer_stay_out_of_a_part() -> None:
    graph = load_model(shared_constant_model()).graph()
    head, tail = graph.split(graph.find_cut("c1"))
    assert head is not None and tail is not None
    assert [t.name for t in head.graph.initializer] == []  # p/add reads only x and C
    assert [n.op_type for n in head.graph.node] == ["Constant", "Add"]
    assert [t.name for t in tail.graph.initializer] == ["B"]


# -- control flow -------------------------------------------------------------------------------


def test_if_node_is_atomic_and_outer_scope_reads_cross() -> None:
    graph = load_model(if_model()).graph()
    names = [n.name for n in graph.nodes]
    assert names == ["pre/relu", "pre/neg", "pre/sum", "pre/greater", "ctl/if", "post/sigmoid"]
    cuts = graph.cuts()
    assert len(cuts) == 7  # no cut inside the branches
    if_index = names.index("ctl/if")
    assert list(graph.nodes[if_index].input) == ["cond"]  # t and r are not named as inputs
    for cut in cuts:
        crossing = set(_names(cut))
        if 2 <= cut.index <= if_index:  # between neg (index 1) and the If node
            assert "t" in crossing
        else:
            assert "t" not in crossing
        if 1 <= cut.index <= if_index:
            assert "r" in crossing
        assert not {"then_out", "else_out"} & crossing
    assert _names(cuts[if_index]) == ["r", "t", "cond"]
    assert _names(cuts[if_index + 1]) == ["z"]


@pytest.mark.parametrize("key", ["then/add", "else/mul", "then_out", "else_out"])
def test_find_cut_inside_control_flow_body_names_the_node(key: str) -> None:
    graph = load_model(if_model()).graph()
    with pytest.raises(CutError) as info:
        graph.find_cut(key)
    assert "ctl/if" in str(info.value)
    assert info.value.exit_code == 3
    assert info.value.hint is not None and "ctl/if" in info.value.hint


@pytest.mark.parametrize("key", ["c2", "c3", "c4", "pre/greater", "ctl/if"])
def test_split_around_if_node_is_exact(key: str) -> None:
    graph = load_model(if_model()).graph()
    cut = graph.find_cut(key)
    head, tail = graph.split(cut)
    x = np.random.default_rng(SEED).standard_normal((2, 3)).astype(np.float32)
    feeds = [{"x": x}, {"x": -x}]  # one sample for each branch
    assert {float(f["x"].sum()) > 0 for f in feeds} == {True, False}
    for part in (head, tail):
        assert part is not None
        onnx.checker.check_model(part, full_check=True)
    result = verify_split(graph, cut, head, tail, feeds)
    assert result.exact


def test_loop_body_outer_scope_read_crosses_and_splits_exactly() -> None:
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body/cond"),
            helper.make_node("Add", ["v_in", "t"], ["v_out"], name="body/add"),
        ],
        "body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", F, [1, 3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", F, [1, 3]),
        ],
    )
    nodes = [
        helper.make_node("Tanh", ["x"], ["t"], name="pre/tanh"),
        helper.make_node("Relu", ["x"], ["v0"], name="pre/relu"),
        helper.make_node("Loop", ["trips", "go", "v0"], ["v"], name="ctl/loop", body=body),
        helper.make_node("Sigmoid", ["v"], ["y"], name="post/sigmoid"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [1, 3])],
        [helper.make_tensor_value_info("y", F, [1, 3])],
        [
            numpy_helper.from_array(np.array(3, dtype=np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "go"),
        ],
    )
    # Shape inference leaves the Loop output untyped; the probe run of Analysis sizes it.
    analysis = Analysis.of(model, seed=SEED)
    graph, cuts = analysis.graph, analysis.cuts
    assert len(cuts) == 5
    assert [_names(c) for c in cuts] == [["x"], ["x", "t"], ["t", "v0"], ["v"], []]
    assert [c.nbytes for c in cuts] == [12, 24, 24, 12, 0]
    with pytest.raises(CutError, match="ctl/loop"):
        graph.find_cut("body/add")
    for cut in cuts:
        _check_split_runs(graph, cut)


def test_node_reading_an_unknown_tensor_is_a_graph_error() -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "ghost"], ["y"], name="add")],
        "g",
        [helper.make_tensor_value_info("x", F, [1])],
        [helper.make_tensor_value_info("y", F, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(GraphError, match="ghost"):
        load_model(model).graph()


# -- find_cut -----------------------------------------------------------------------------------


def test_find_cut_by_id_node_tensor_and_alias() -> None:
    graph = load_model(chain_model()).graph()
    cuts = graph.cuts()
    assert graph.find_cut("c3") == cuts[3]
    assert graph.find_cut("c0") == cuts[0]
    assert graph.find_cut("fc1/relu").index == 2  # right after the node
    assert graph.find_cut("h3").index == 3  # right after the tensor's producer
    assert graph.find_cut("y").index == 4
    assert graph.find_cut("all-local").index == 4
    assert graph.find_cut("local").index == 4
    assert graph.find_cut("all-remote").index == 0
    assert graph.find_cut("remote").index == 0
    assert graph.find_cut("c1", cuts) is cuts[1]


def test_find_cut_unknown_name_suggests_near_miss() -> None:
    graph = load_model(chain_model()).graph()
    with pytest.raises(CutError) as info:
        graph.find_cut("fc1/rely")
    assert "fc1/rely" in str(info.value)
    assert info.value.hint is not None
    assert "did you mean" in info.value.hint and "fc1/relu" in info.value.hint
    with pytest.raises(CutError) as info:
        graph.find_cut("zzzzzzzzzzzzzzzz")
    assert info.value.hint is not None and "edgeoffload cuts" in info.value.hint


def test_find_cut_out_of_range_id() -> None:
    graph = load_model(chain_model()).graph()
    with pytest.raises(CutError, match=r"c0\.\.c4"):
        graph.find_cut("c9")


def test_cut_leaving_a_graph_output_on_the_device_is_refused() -> None:
    graph = load_model(two_output_model()).graph()
    cuts = graph.cuts()
    # m/neg (index 1) produces "early": c2 and c3 would keep it on the device.
    assert [c.index for c in cuts] == [0, 1, 4]
    for key in ("c2", "c3", "m/neg", "early", "m/sigmoid", "b"):
        with pytest.raises(CutError) as info:
            graph.find_cut(key)
        assert "graph output" in str(info.value)
    assert graph.find_cut("m/relu").index == 1
    assert graph.find_cut("all-local").index == 4
    assert _names(cuts[1]) == ["a"]
    _check_split_runs(graph, cuts[1])
    _check_split_runs(graph, cuts[2])  # all-local: head produces both outputs


# -- loading ------------------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_load_round_trip(tmp_path: Path) -> None:
    data = chain_model().SerializeToString()
    path = _write(tmp_path, "chain.onnx", data)
    graph = load_model(path).graph(dims={"batch": 3})
    assert [n.name for n in graph.nodes] == ["fc1/matmul", "fc1/relu", "fc2/matmul", "fc2/sigmoid"]
    assert graph.input_shapes() == {"x": (3, 4)}
    assert len(graph.sha256) == 64
    assert graph.sha256 == load_model(str(path)).graph().sha256


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("text", "not an ONNX model"),
        ("truncated", "not an ONNX model"),
        ("empty", "not an ONNX model"),
        ("directory", "is a directory"),
        ("missing", "no such file"),
    ],
)
def test_load_rejects_unusable_files(tmp_path: Path, kind: str, needle: str) -> None:
    data = chain_model().SerializeToString()
    path = tmp_path / "model.onnx"
    if kind == "text":
        path.write_text("this is a README, not a neural network\n" * 20)
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(GraphError) as info:
        load_model(path).graph()
    assert info.value.exit_code == 3
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_load_rejects_old_opset(tmp_path: Path) -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="r")]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [1, 2])],
        [helper.make_tensor_value_info("y", F, [1, 2])],
        opset=11,
    )
    path = _write(tmp_path, "old.onnx", model.SerializeToString())
    with pytest.raises(GraphError) as info:
        load_model(path).graph()
    assert "opset 11" in str(info.value)
    assert info.value.hint is not None and "version_converter" in info.value.hint


def test_load_rejects_invalid_model(tmp_path: Path) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(chain_model())
    model.graph.node[1].op_type = "NoSuchOp"
    path = _write(tmp_path, "bad.onnx", model.SerializeToString())
    with pytest.raises(GraphError, match="checker"):
        load_model(path).graph()


def test_unresolved_symbolic_dim_hints_at_dim_flag() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="r")]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", F, ["batch", "sequence"])],
    )
    graph = load_model(model).graph()
    with pytest.raises(GraphError) as info:
        graph.input_shapes()
    assert "sequence" in str(info.value)
    assert info.value.hint is not None and "--dim sequence=N" in info.value.hint
    assert load_model(model).graph(dims={"sequence": 5}).input_shapes() == {"x": (1, 5)}


# 0 is a valid dim (an empty KV cache before a decoder's prefill); negatives and non-ints are not.
@pytest.mark.parametrize("dims", [{"seqlen": 4}, {"batch": "2"}, {"batch": -2}])
def test_bad_dims_are_graph_errors(dims: dict[str, int]) -> None:
    with pytest.raises(GraphError) as info:
        load_model(chain_model()).graph(dims=dims)
    if "seqlen" in dims:
        assert "seqlen" in str(info.value)
        assert info.value.hint is not None and "batch" in info.value.hint


# -- naming -------------------------------------------------------------------------------------


def _unnamed_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Neg", ["a"], ["b"], name="dup"),
        helper.make_node("Relu", ["b"], ["c"]),
        helper.make_node("Abs", ["c"], ["d"], name="dup"),
        helper.make_node("Sigmoid", ["d"], ["y"], name="dup"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [1, 3])],
        [helper.make_tensor_value_info("y", F, [1, 3])],
    )


def test_unnamed_and_duplicate_nodes_get_unique_stable_names(tmp_path: Path) -> None:
    model = _unnamed_model()
    path = _write(tmp_path, "m.onnx", model.SerializeToString())
    names = [n.name for n in load_model(path).graph().nodes]
    assert len(set(names)) == len(names) == 5
    assert all(names)
    assert names[1] == "dup"
    assert names == [n.name for n in load_model(path).graph().nodes]
    assert names == [n.name for n in load_model(model).graph().nodes]
    # The source model is not modified.
    assert [n.name for n in model.graph.node] == ["", "dup", "", "dup", "dup"]
    # Every node can be found by its name.
    graph = load_model(path).graph()
    assert [graph.find_cut(name).index for name in names] == [1, 2, 3, 4, 5]


def test_generated_name_does_not_collide_with_an_existing_name() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="Relu__1"),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [2])],
        [helper.make_tensor_value_info("y", F, [2])],
    )
    names = [n.name for n in load_model(model).graph().nodes]
    assert len(set(names)) == 2, names


# -- layer_of / has_layer_structure -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("/encoder/layer.0/attention/self/MatMul", "encoder/layer.0"),
        ("block3/dw/conv", "block3"),
        ("Conv_12", "Conv_12"),
        ("layer2/ffn/in", "layer2"),
        ("/embeddings/word/Gather", "embeddings"),
        ("features.3.conv.0", "features.3"),
        ("", ""),
    ],
)
def test_layer_of(name: str, layer: str) -> None:
    assert layer_of(name) == layer


def test_has_layer_structure() -> None:
    assert load_model(chain_model()).graph().has_layer_structure
    assert load_model(residual_model()).graph().has_layer_structure
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=f"n{i}") for i in range(6)]
    flat = _model(
        nodes,
        [helper.make_tensor_value_info("t0", F, [1, 2])],
        [helper.make_tensor_value_info("t6", F, [1, 2])],
    )
    graph = load_model(flat).graph()
    assert graph.layers == [f"n{i}" for i in range(6)]
    assert not graph.has_layer_structure


# -- the embedded encoder -----------------------------------------------------------------------


@functools.cache
def _encoder_analysis() -> Analysis:
    return Analysis.of(zoo.build("encoder", seed=SEED), dims={"sequence": 8}, seed=SEED)


def test_encoder_mask_crosses_every_layer_boundary_after_it() -> None:
    analysis = _encoder_analysis()
    graph = analysis.graph
    mask = "mask/mul:0"
    producer = graph.producer[mask]
    last_use = max(i for i, reads in enumerate(graph.node_inputs) if mask in reads)
    assert graph.nodes[last_use].name == "layer3/attention/scores/mask"
    boundaries = [c for c in analysis.cuts if c.boundary and producer < c.index <= last_use]
    # Between mask and layer0, and between consecutive layers.
    starts = {c.layer for c in boundaries}
    assert {"mask", "layer0", "layer1", "layer2"} <= starts
    for cut in boundaries:
        assert mask in _names(cut), cut.id
        assert len(cut.tensors) >= 2
    for cut in analysis.cuts:
        assert (mask in _names(cut)) == (producer < cut.index <= last_use)
    spec = next(t for t in boundaries[0].tensors if t.name == mask)
    assert spec.dtype == "float32"
    assert spec.nbytes(graph.dims) == 1 * 1 * 1 * 8 * 4


def test_encoder_split_between_layers_is_exact() -> None:
    analysis = _encoder_analysis()
    graph = analysis.graph
    last_of_layer1 = max(i for i, n in enumerate(graph.nodes) if n.name.startswith("layer1/"))
    cut = graph.find_cut(graph.nodes[last_of_layer1].name)
    assert cut.index == last_of_layer1 + 1
    assert cut.boundary and cut.layer == "layer1"
    assert "mask/mul:0" in _names(cut)
    head, tail = graph.split(cut)
    result = verify_split(graph, cut, head, tail, [analysis.inputs])
    assert result.exact
    assert cut.nbytes == sum(analysis.activations[t.name].nbytes for t in cut.tensors)
