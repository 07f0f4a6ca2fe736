"""edgeoffload.split.zoo: validity, runnability, determinism and naming of the zoo models."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeoffload.errors import UsageError
from edgeoffload.split import zoo

SEED = 0
SEQUENCE = 16


@functools.cache
def _model(name: str) -> onnx.ModelProto:
    return zoo.build(name, seed=SEED)


@functools.cache
def _session(name: str) -> ort.InferenceSession:
    return _make_session(_model(name))


def _make_session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT warns about lenient shape merges; not our concern here
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _feed(name: str, batch: int, *, rng_seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rng_seed)
    if name == "encoder":
        return {
            "input_ids": rng.integers(0, 1000, size=(batch, SEQUENCE), dtype=np.int64),
            "attention_mask": np.ones((batch, SEQUENCE), dtype=np.int64),
        }
    return {"input": rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)}


def _expected_shape(name: str, batch: int) -> tuple[int, ...]:
    return (batch, SEQUENCE, 256) if name == "encoder" else (batch, 1000)


@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_checker_full_check_passes(name: str) -> None:
    model = _model(name)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert model.ir_version in (8, 9)


@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_graph_io_has_symbolic_batch(name: str) -> None:
    graph = _model(name).graph
    for value in [*graph.input, *graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    if name == "encoder":
        assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
        assert [o.name for o in graph.output] == ["last_hidden_state"]
        for value in graph.input:
            assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
            assert value.type.tensor_type.shape.dim[1].dim_param == "sequence"
    else:
        assert [i.name for i in graph.input] == ["input"]
        assert [o.name for o in graph.output] == ["logits"]
        dims = graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_value for d in dims[1:]] == [3, 224, 224]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_runs_in_onnxruntime(name: str, batch: int) -> None:
    (out,) = _session(name).run(None, _feed(name, batch))
    assert out.shape == _expected_shape(name, batch)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert 1e-3 < float(out.std()) < 1e3
    if batch == 2:
        assert not np.allclose(out[0], out[1])  # rows are independent, not broadcast


@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_same_seed_gives_identical_bytes(name: str) -> None:
    assert zoo.build(name, seed=SEED).SerializeToString() == _model(name).SerializeToString()


@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_other_seed_gives_other_weights(name: str) -> None:
    other = zoo.build(name, seed=SEED + 1)
    ours = {t.name: t.raw_data for t in _model(name).graph.initializer}
    theirs = {t.name: t.raw_data for t in other.graph.initializer}
    assert ours.keys() == theirs.keys()
    assert [n.name for n in other.graph.node] == [n.name for n in _model(name).graph.node]
    weights = [k for k in ours if k.endswith(".weight")]
    assert weights and all(ours[k] != theirs[k] for k in weights)


@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_names_are_unique_and_hierarchical(name: str) -> None:
    graph = _model(name).graph
    node_names = [n.name for n in graph.node]
    assert len(set(node_names)) == len(node_names)
    assert all("/" in n and all(part for part in n.split("/")) for n in node_names)

    produced = [out for n in graph.node for out in n.output]
    inits = [t.name for t in graph.initializer]
    graph_inputs = [i.name for i in graph.input]
    every = produced + inits + graph_inputs
    assert len(set(every)) == len(every)

    # Each initializer feeds exactly one node, so extracted sub-graphs are self-contained.
    uses = Counter(i for n in graph.node for i in n.input if i in set(inits))
    assert set(uses) == set(inits)
    assert set(uses.values()) == {1}


def test_mobilenetv2_structure() -> None:
    nodes = _model("mobilenetv2").graph.node
    layers = {n.name.split("/")[0] for n in nodes}
    assert layers == {"stem", "head", "classifier"} | {f"block{i}" for i in range(17)}
    ops = Counter(n.op_type for n in nodes)
    adds = sorted(int(n.name.split("/")[0][5:]) for n in nodes if n.op_type == "Add")
    assert adds == [2, 4, 5, 7, 8, 9, 11, 12, 14, 15]  # stride 1 and unchanged width
    assert ops["BatchNormalization"] == 52  # not folded
    assert ops["Clip"] == 35
    depthwise = [n for n in nodes if n.name.endswith("/dw/conv")]
    assert len(depthwise) == 17
    for node in depthwise:
        group = next(a.i for a in node.attribute if a.name == "group")
        assert group > 1
    assert "block0/expand/conv" not in {n.name for n in nodes}  # t = 1: no expansion
    assert {
        "stem/conv",
        "block3/expand/conv",
        "block3/dw/relu6",
        "block4/add",
        "head/pool",
        "classifier/gemm",
    } <= {n.name for n in nodes}


def test_resnet_structure() -> None:
    nodes = _model("resnet").graph.node
    names = {n.name for n in nodes}
    assert {"stem/conv", "stem/maxpool", "block7/add", "head/pool", "classifier/gemm"} <= names
    downsample = sorted(n.split("/")[0] for n in names if n.endswith("/downsample/conv"))
    assert downsample == ["block2", "block4", "block6"]
    assert Counter(n.op_type for n in nodes)["Add"] == 8


def test_encoder_structure() -> None:
    graph = _model("encoder").graph
    names = {n.name for n in graph.node}
    assert {
        "embeddings/word",
        "embeddings/ln",
        "mask/sub",
        "layer0/attention/q/matmul",
        "layer0/ffn/gelu/erf",
        "layer3/ffn/ln",
    } <= names
    # The extended mask is computed once and added to the scores of every layer.
    mask_out = next(n.output[0] for n in graph.node if n.name == "mask/mul")
    consumers = sorted(n.name for n in graph.node if mask_out in n.input)
    assert consumers == [f"layer{i}/attention/scores/mask" for i in range(4)]
    assert Counter(n.op_type for n in graph.node)["Erf"] == 4


def test_encoder_sequence_is_symbolic() -> None:
    session = _session("encoder")
    for length in (1, 7, 128):
        feed = {
            "input_ids": np.arange(length, dtype=np.int64).reshape(1, length) % 1000,
            "attention_mask": np.ones((1, length), dtype=np.int64),
        }
        (out,) = session.run(None, feed)
        assert out.shape == (1, length, 256)
        assert np.isfinite(out).all()


def test_encoder_uses_attention_mask() -> None:
    session = _session("encoder")
    feed = _feed("encoder", 1)
    (full,) = session.run(None, feed)
    masked = dict(feed, attention_mask=feed["attention_mask"].copy())
    masked["attention_mask"][0, -4:] = 0
    (out,) = session.run(None, masked)
    assert not np.allclose(full[0, 0], out[0, 0], atol=1e-4)

    # Padded tokens are invisible to the others: changing them leaves real positions unchanged.
    repadded = dict(masked, input_ids=masked["input_ids"].copy())
    repadded["input_ids"][0, -4:] = (repadded["input_ids"][0, -4:] + 1) % 1000
    (out2,) = session.run(None, repadded)
    np.testing.assert_allclose(out2[0, :-4], out[0, :-4], rtol=0, atol=1e-5)
    assert not np.allclose(out2[0, -4:], out[0, -4:])


def test_small_configurations_run() -> None:
    cases = [
        (zoo.build_mobilenetv2(seed=3, resolution=96, width=0.5, num_classes=10), (2, 10)),
        (
            zoo.build_resnet(seed=3, resolution=64, widths=(8, 16), blocks=(1, 1), num_classes=5),
            (2, 5),
        ),
    ]
    for model, shape in cases:
        onnx.checker.check_model(model, full_check=True)
        res = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
        x = np.random.default_rng(0).standard_normal((2, 3, res, res), dtype=np.float32)
        (out,) = _make_session(model).run(None, {"input": x})
        assert out.shape == shape and np.isfinite(out).all()

    encoder = zoo.build_encoder(seed=3, vocab_size=50, hidden=32, heads=2, layers=1, ffn=64)
    feed = {"input_ids": np.array([[1, 2, 3]]), "attention_mask": np.array([[1, 1, 0]])}
    (out,) = _make_session(encoder).run(None, feed)
    assert out.shape == (1, 3, 32) and np.isfinite(out).all()


def test_unknown_name_raises_usage_error() -> None:
    with pytest.raises(UsageError) as info:
        zoo.build("vgg16")
    for valid in zoo.MODEL_NAMES:
        assert valid in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    "call",
    [
        lambda: zoo.build("encoder", seed=-1),
        lambda: zoo.build_encoder(hidden=30, heads=4),
        lambda: zoo.build_mobilenetv2(resolution=16),
        lambda: zoo.build_mobilenetv2(width=0),
        lambda: zoo.build_resnet(widths=(8, 16), blocks=(1,)),
    ],
)
def test_bad_arguments_raise_usage_error(call: Callable[[], object]) -> None:
    with pytest.raises(UsageError):
        call()


def test_default_model_is_in_the_zoo() -> None:
    assert zoo.DEFAULT_MODEL in zoo.MODEL_NAMES
    assert zoo.MODEL_NAMES == ("mobilenetv2", "resnet", "encoder")


def test_save_writes_the_model(tmp_path: Path) -> None:
    target = zoo.save("encoder", tmp_path / "sub" / "enc.onnx", seed=SEED)
    assert target == tmp_path / "sub" / "enc.onnx"
    assert target.read_bytes() == _model("encoder").SerializeToString()
    onnx.checker.check_model(str(target), full_check=True)

    in_dir = zoo.save("resnet", tmp_path, seed=SEED)
    assert in_dir == tmp_path / "resnet.onnx"
    assert onnx.load(str(in_dir)).graph.name == "resnet"
