"""Tests of the device runtime (edgeoffload.device.runtime) on bundles split from zoo models."""

from __future__ import annotations

import numpy as np
import pytest

from edgeoffload._ort import make_session, run
from edgeoffload.core import codec as codec_mod
from edgeoffload.device.runtime import DeviceRuntime, check_inputs
from edgeoffload.errors import PayloadError, UsageError
from edgeoffload.protocol.tensors import decode_checked
from edgeoffload.split import zoo
from edgeoffload.split.analysis import Analysis
from edgeoffload.split.splitter import split_model
from edgeoffload.types import TensorSpec

# -- check_inputs --------------------------------------------------------------------------------

SPECS = (
    TensorSpec("image", "float32", ("batch", 3, 4)),
    TensorSpec("mask", "int64", ("batch", "seq")),
)


def good_inputs(batch: int = 2, seq: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "image": rng.standard_normal((batch, 3, 4)).astype(np.float32),
        "mask": np.ones((batch, seq), dtype=np.int64),
    }


def test_check_inputs_accepts_and_returns_c_contiguous_arrays():
    inputs = good_inputs()
    fortran = np.asfortranarray(inputs["image"])
    strided = np.ones((2, 10), dtype=np.int64)[:, ::2]
    assert not fortran.flags.c_contiguous and not strided.flags.c_contiguous
    arrays = check_inputs({"image": fortran, "mask": strided}, SPECS, {})
    assert set(arrays) == {"image", "mask"}
    for name, array in arrays.items():
        assert isinstance(array, np.ndarray) and array.flags.c_contiguous, name
    np.testing.assert_array_equal(arrays["image"], inputs["image"])
    np.testing.assert_array_equal(arrays["mask"], strided)


def test_check_inputs_converts_lists():
    arrays = check_inputs(
        {"image": np.zeros((1, 3, 4), dtype=np.float32), "mask": [[1, 1, 0]]}, SPECS, {}
    )
    assert arrays["mask"].dtype == np.int64 and arrays["mask"].shape == (1, 3)


def test_check_inputs_accepts_other_values_of_symbolic_dims():
    # The manifest's split-time dims are not enforced (PROTOCOL.md section 8.4).
    arrays = check_inputs(good_inputs(batch=3, seq=9), SPECS, {"batch": 1, "seq": 5})
    assert arrays["mask"].shape == (3, 9)


def test_check_inputs_missing():
    inputs = good_inputs()
    del inputs["mask"]
    with pytest.raises(UsageError, match=r"missing \['mask'\]") as info:
        check_inputs(inputs, SPECS, {})
    assert "image float32['batch', 3, 4]" in info.value.hint
    assert "mask int64['batch', 'seq']" in info.value.hint


def test_check_inputs_extra():
    inputs = dict(good_inputs(), extra=np.zeros(1))
    with pytest.raises(UsageError, match=r"unexpected \['extra'\]"):
        check_inputs(inputs, SPECS, {})


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        (
            "image",
            np.zeros((2, 3, 4), dtype=np.float64),
            r"'image' has dtype float64, expected float32",
        ),
        ("mask", np.ones((2, 5), dtype=np.int32), r"'mask' has dtype int32, expected int64"),
        ("image", np.zeros((2, 3), dtype=np.float32), r"'image' has shape \[2, 3\], expected"),
        ("image", np.zeros((2, 3, 4, 1), dtype=np.float32), r"'image' has shape \[2, 3, 4, 1\]"),
        (
            "image",
            np.zeros((2, 3, 5), dtype=np.float32),
            r"'image' has shape \[2, 3, 5\], expected \['batch', 3, 4\]",
        ),
        ("image", np.zeros((2, 4, 4), dtype=np.float32), r"'image' has shape \[2, 4, 4\]"),
        ("mask", np.ones((3, 5), dtype=np.int64), r"dim 'batch' is 3 here but 2 elsewhere"),
    ],
    ids=[
        "dtype-float",
        "dtype-int",
        "rank-low",
        "rank-high",
        "fixed-dim",
        "fixed-dim-2",
        "symbolic",
    ],
)
def test_check_inputs_rejects_with_a_clear_message(name, value, match):
    inputs = dict(good_inputs(), **{name: value})
    with pytest.raises(UsageError, match=match):
        check_inputs(inputs, SPECS, {})


def test_check_inputs_ragged_list_is_a_usage_error():
    inputs = dict(good_inputs(), mask=[[1, 1], [1]])
    with pytest.raises(UsageError):
        check_inputs(inputs, SPECS, {})


# -- DeviceRuntime on real bundles ---------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    analysis = Analysis.of(zoo.build("resnet"))
    n = len(analysis.graph.nodes)
    single = [c for c in analysis.cuts if 0 < c.index < n and len(c.tensors) == 1]
    multi = [c for c in analysis.cuts if 0 < c.index < n and len(c.tensors) > 1]
    root = tmp_path_factory.mktemp("resnet")
    cuts = {
        "middle": single[len(single) // 2],
        "multi": multi[len(multi) // 2],
        "remote": analysis.cuts[0],
        "local": analysis.cuts[-1],
    }
    bundles = {key: split_model(analysis, cut, root / key) for key, cut in cuts.items()}
    return analysis, bundles


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    analysis = Analysis.of(zoo.build("encoder"), dims={"sequence": 16})
    root = tmp_path_factory.mktemp("encoder")
    bundles = {
        # c1: both graph inputs cross next to the embedding output; c2: only attention_mask
        "c1": split_model(analysis, analysis.cuts[1], root / "c1"),
        "c2": split_model(analysis, analysis.cuts[2], root / "c2", codec="fp16"),
        "remote": split_model(analysis, analysis.cuts[0], root / "c0", codec="fp16+zstd"),
    }
    return analysis, bundles


def full_model(analysis, inputs):
    return run(make_session(analysis.graph.model, optimize=False), inputs)


def assert_close(got, want, name=""):
    """Within 1e-5 relative, the absolute part scaled by the tensor's range: the bundle's
    sessions run optimised (fused kernels), the reference unoptimised."""
    scale = float(np.max(np.abs(want), initial=0.0)) or 1.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


def assert_outputs_equal(got, want):
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        assert_close(got[name], want[name], name)


def check_head(runtime, inputs):
    manifest = runtime.manifest
    crossing = runtime.run_head(runtime.check_inputs(inputs))
    assert list(crossing) == [t.name for t in manifest.crossing]
    for spec in manifest.crossing:
        array = crossing[spec.name]
        assert array.dtype.name == spec.dtype, spec.name
        assert array.shape == spec.resolved(manifest.dims), spec.name
    for name in manifest.passthrough:
        np.testing.assert_array_equal(crossing[name], inputs[name])
    return crossing


@pytest.mark.parametrize("key", ["middle", "multi"])
def test_resnet_head_and_local_run(resnet, key):
    analysis, bundles = resnet
    runtime = DeviceRuntime(bundles[key].path)
    assert runtime.has_tail and runtime.manifest.passthrough == ()
    crossing = check_head(runtime, analysis.inputs)
    assert len(crossing) == (1 if key == "middle" else len(runtime.manifest.crossing))
    for name, array in crossing.items():
        assert_close(array, analysis.activations[name], name)
    for seed in (0, 3):
        inputs = analysis.graph.sample_inputs(seed=seed)
        assert_outputs_equal(runtime.run_local(inputs), full_model(analysis, inputs))


def test_resnet_all_remote_head_returns_the_inputs(resnet):
    analysis, bundles = resnet
    runtime = DeviceRuntime(bundles["remote"])
    assert runtime.bundle.head_path is None and runtime.has_tail
    assert runtime.manifest.passthrough == ("input",)
    crossing = runtime.run_head(runtime.check_inputs(analysis.inputs))
    assert list(crossing) == ["input"]
    np.testing.assert_array_equal(crossing["input"], analysis.inputs["input"])
    assert_outputs_equal(runtime.run_local(analysis.inputs), full_model(analysis, analysis.inputs))


def test_resnet_all_local_head_returns_the_outputs(resnet):
    analysis, bundles = resnet
    runtime = DeviceRuntime(bundles["local"])
    assert not runtime.has_tail and runtime.manifest.crossing == ()
    want = full_model(analysis, analysis.inputs)
    outputs = runtime.run_head(runtime.check_inputs(analysis.inputs))
    assert list(outputs) == [s.name for s in runtime.manifest.graph_outputs] == ["logits"]
    assert_outputs_equal(outputs, want)
    assert_outputs_equal(runtime.run_local(analysis.inputs), want)


def test_runtime_rejects_bad_inputs(resnet):
    analysis, bundles = resnet
    runtime = DeviceRuntime(bundles["middle"])
    with pytest.raises(UsageError, match="missing"):
        runtime.run_local({})
    bad = {"input": analysis.inputs["input"].astype(np.float64)}
    with pytest.raises(UsageError, match="float64"):
        runtime.run_local(bad)


@pytest.mark.parametrize("key", ["c1", "c2"])
def test_encoder_head_passes_graph_inputs_through(encoder, key):
    analysis, bundles = encoder
    runtime = DeviceRuntime(bundles[key])
    manifest = runtime.manifest
    expected_passthrough = ("attention_mask", "input_ids") if key == "c1" else ("attention_mask",)
    assert manifest.passthrough == expected_passthrough
    assert manifest.head is not None and manifest.tail is not None
    crossing = check_head(runtime, analysis.inputs)
    assert set(expected_passthrough) < set(crossing)  # head outputs cross too
    inputs = analysis.graph.sample_inputs(seed=5)
    assert_outputs_equal(runtime.run_local(inputs), full_model(analysis, inputs))


def test_encoder_all_remote_head_returns_the_inputs_in_manifest_order(encoder):
    analysis, bundles = encoder
    runtime = DeviceRuntime(bundles["remote"])
    crossing = runtime.run_head(runtime.check_inputs(analysis.inputs))
    assert list(crossing) == [t.name for t in runtime.manifest.crossing]
    assert set(crossing) == {"input_ids", "attention_mask"}
    for name, array in crossing.items():
        np.testing.assert_array_equal(array, analysis.inputs[name])
    # int64 inputs keep quant none but keep the compression
    encoded = dict(runtime.encode(crossing))
    assert {name: t.codec for name, t in encoded.items()} == {
        "input_ids": "zstd",
        "attention_mask": "zstd",
    }


def test_encode_uses_the_bundle_codec_per_dtype(encoder):
    analysis, bundles = encoder
    runtime = DeviceRuntime(bundles["c2"])
    assert runtime.manifest.codec == "fp16"
    assert runtime.codec_for("float32") == "fp16"
    assert runtime.codec_for("int64") == "none"
    crossing = runtime.run_head(runtime.check_inputs(analysis.inputs))
    encoded = runtime.encode(crossing)
    assert [name for name, _ in encoded] == list(crossing)
    for name, tensor in encoded:
        dtype = crossing[name].dtype.name
        assert tensor.codec == ("fp16" if dtype == "float32" else "none"), name
        assert tensor.dtype == dtype and tensor.shape == crossing[name].shape
    assert {name: crossing[name].dtype.name for name, _ in encoded}["attention_mask"] == "int64"
    # what the server does with them: validate against the manifest, decode, run the tail
    decoded = decode_checked(
        encoded, runtime.manifest.crossing, runtime.codec_for, max_bytes=1 << 24
    )
    for name, array in crossing.items():
        if array.dtype == np.int64:
            np.testing.assert_array_equal(decoded[name], array)
        else:
            bound = codec_mod.max_abs_error(codec_mod.CodecSpec.parse("fp16"), array)
            assert np.max(np.abs(decoded[name] - array)) <= bound
    tail = runtime.run_tail_locally(decoded)
    want = full_model(analysis, analysis.inputs)
    scale = float(np.max(np.abs(want["last_hidden_state"])))
    assert float(np.max(np.abs(tail["last_hidden_state"] - want["last_hidden_state"]))) < (
        1e-2 * scale
    )


# -- decode_checked ------------------------------------------------------------------------------

X_SPECS = (TensorSpec("x", "float32", ("batch", 4)),)


def _encoded(codec: str = "none") -> codec_mod.EncodedTensor:
    array = np.arange(8, dtype=np.float32).reshape(2, 4)
    return codec_mod.encode(array, codec_mod.CodecSpec.parse(codec))


@pytest.mark.parametrize(
    "data",
    [lambda d: d[:-1], lambda d: d + b"\x00", lambda d: b"", lambda d: d[:-4]],
    ids=["short", "long", "empty", "one-element-short"],
)
def test_decode_checked_rejects_a_lying_byte_length(data):
    honest = _encoded()
    lying = codec_mod.EncodedTensor(
        honest.dtype, honest.shape, honest.codec, data(bytes(honest.data))
    )
    with pytest.raises(PayloadError, match=r"tensor 'x':.*bytes"):
        decode_checked([("x", lying)], X_SPECS, lambda dtype: "none", max_bytes=1 << 20)


def test_decode_checked_rejects_a_lying_shape():
    honest = _encoded()
    lying = codec_mod.EncodedTensor("float32", (3, 4), "none", bytes(honest.data))
    with pytest.raises(PayloadError, match="tensor 'x'"):
        decode_checked([("x", lying)], X_SPECS, lambda dtype: "none", max_bytes=1 << 20)


def test_decode_checked_rejects_a_lying_compressed_size():
    honest = _encoded("zstd")
    lying = codec_mod.EncodedTensor("float32", (4, 4), "zstd", honest.data)
    with pytest.raises(PayloadError, match="tensor 'x'"):
        decode_checked([("x", lying)], X_SPECS, lambda dtype: "zstd", max_bytes=1 << 20)


def test_decode_checked_enforces_max_bytes():
    with pytest.raises(PayloadError, match="tensor 'x'"):
        decode_checked([("x", _encoded())], X_SPECS, lambda dtype: "none", max_bytes=16)


def test_decode_checked_decodes_honest_tensors():
    out = decode_checked(
        [("x", _encoded("zstd"))], X_SPECS, lambda dtype: "zstd", max_bytes=1 << 20
    )
    np.testing.assert_array_equal(out["x"], np.arange(8, dtype=np.float32).reshape(2, 4))
