"""Tests for edgeoffload.bundle: writing, loading, hash verification and pairing of bundles."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeoffload.bundle import HEAD, MANIFEST, TAIL, load_bundle, write_bundle
from edgeoffload.errors import ManifestError, VerificationError, VersionMismatch
from edgeoffload.manifest import SCHEMA_VERSION, Manifest, PartInfo, check_pair
from edgeoffload.split import splitter, zoo
from edgeoffload.split.analysis import Analysis
from edgeoffload.split.verify import CODEC_TOLERANCE
from edgeoffload.types import CutPoint, DeviceProfile, LinkProfile, TensorSpec


@pytest.fixture(scope="module")
def analysis() -> Analysis:
    return Analysis.of(zoo.build("resnet", seed=0))


@pytest.fixture(scope="module")
def mid_cut(analysis: Analysis) -> CutPoint:
    return analysis.cuts[len(analysis.cuts) // 2]


@pytest.fixture(scope="module")
def pristine(analysis: Analysis, mid_cut: CutPoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "mid"
    splitter.split_model(analysis, mid_cut, out)
    return out


@pytest.fixture
def bundle_dir(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the mid-cut bundle that a test may damage."""
    return Path(shutil.copytree(pristine, tmp_path / "bundle"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest_json(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


def _write_manifest_json(directory: Path, data: object) -> None:
    (directory / MANIFEST).write_text(json.dumps(data))


# --- round trip ----------------------------------------------------------------------------


def test_round_trip(analysis: Analysis, mid_cut: CutPoint, tmp_path: Path) -> None:
    written = splitter.split_model(analysis, mid_cut, tmp_path / "b")
    loaded = load_bundle(tmp_path / "b")
    assert loaded.manifest.to_dict() == written.manifest.to_dict()
    assert loaded.manifest == written.manifest
    assert loaded.manifest.version == written.manifest.version
    assert loaded.head_path == tmp_path / "b" / HEAD and loaded.head_path.is_file()
    assert loaded.tail_path == tmp_path / "b" / TAIL and loaded.tail_path.is_file()
    assert loaded.manifest.head is not None and loaded.manifest.tail is not None
    assert loaded.manifest.head.sha256 == _sha256(loaded.head_path)
    assert loaded.manifest.tail.sha256 == _sha256(loaded.tail_path)
    assert not (tmp_path / "b" / (MANIFEST + ".tmp")).exists()
    m = loaded.manifest
    assert m.schema_version == SCHEMA_VERSION
    assert m.cut_id == mid_cut.id and m.cut_after == mid_cut.after
    assert m.crossing == mid_cut.tensors
    assert m.source_sha256 == analysis.graph.sha256
    assert m.codec == "none"
    # the parts are real models whose interfaces match the manifest
    head = onnx.load(str(loaded.head_path))
    tail = onnx.load(str(loaded.tail_path))
    assert [i.name for i in tail.graph.input] == [t.name for t in m.tail.inputs]
    assert [o.name for o in head.graph.output] == [t.name for t in m.head.outputs]
    assert [o.name for o in tail.graph.output] == [t.name for t in m.graph_outputs]


def test_round_trip_with_predicted_report(
    analysis: Analysis, mid_cut: CutPoint, tmp_path: Path
) -> None:
    profile = DeviceProfile(
        name="flat",
        model_sha256=analysis.graph.sha256,
        threads=1,
        node_ms=dict.fromkeys(analysis.node_order, 0.1),
        calibration=(),
    )
    report = analysis.plan(
        device=profile, server=profile, link=LinkProfile("l", 1e8, 1e8, 5.0), codec="none"
    )
    written = splitter.split_model(analysis, mid_cut, tmp_path / "b", report=report)
    loaded = load_bundle(tmp_path / "b")
    assert loaded.manifest == written.manifest
    assert loaded.manifest.predicted["chosen"]["cut"] == mid_cut.id
    assert loaded.manifest.predicted["best"] == report.best.to_dict()


def test_write_bundle_of_hand_built_manifest(tmp_path: Path) -> None:
    head, tail = b"head bytes", b"tail bytes"
    spec = TensorSpec("t", "float32", ("batch", 4))
    manifest = Manifest(
        source_sha256="ab" * 32,
        source_name="hand",
        cut_id="c1",
        cut_after="n0",
        crossing=(spec,),
        passthrough=(),
        graph_inputs=(TensorSpec("x", "float32", ("batch", 4)),),
        graph_outputs=(TensorSpec("y", "float32", ("batch", 2)),),
        head=PartInfo(HEAD, hashlib.sha256(head).hexdigest(), (), (spec,)),
        tail=PartInfo(TAIL, hashlib.sha256(tail).hexdigest(), (spec,), ()),
        codec="fp16",
        dims={"batch": 1},
        state=({"side": "server", "input": "past", "output": "present"},),
    )
    write_bundle(tmp_path, manifest, head=head, tail=tail)
    loaded = load_bundle(tmp_path)
    assert loaded.manifest == manifest
    assert (tmp_path / HEAD).read_bytes() == head
    # bytes that do not match the manifest are refused before anything is written
    with pytest.raises(ManifestError, match=r"tail\.onnx"):
        write_bundle(tmp_path / "other", manifest, head=head, tail=b"other bytes")
    with pytest.raises(ManifestError, match="disagree"):
        write_bundle(tmp_path / "third", manifest, head=head, tail=None)


# --- tampering -----------------------------------------------------------------------------


@pytest.mark.parametrize("part", [TAIL, HEAD])
def test_flipped_byte_is_detected(bundle_dir: Path, part: str) -> None:
    path = bundle_dir / part
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError) as info:
        load_bundle(bundle_dir)
    assert info.value.exit_code == 5
    assert part in str(info.value)
    assert "modified" in str(info.value)
    # without verification the same folder still loads (the device may opt out explicitly)
    assert load_bundle(bundle_dir, verify=False).manifest.cut_id


def test_deleted_part_is_detected(bundle_dir: Path) -> None:
    (bundle_dir / HEAD).unlink()
    with pytest.raises(ManifestError, match="missing") as info:
        load_bundle(bundle_dir)
    assert HEAD in str(info.value)


def test_missing_manifest_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"no manifest\.json"):
        load_bundle(tmp_path)
    with pytest.raises(ManifestError, match="not a bundle folder"):
        load_bundle(tmp_path / "nope")


def test_manifest_unknown_field(bundle_dir: Path) -> None:
    data = _manifest_json(bundle_dir)
    data["surprise"] = 1
    _write_manifest_json(bundle_dir, data)
    with pytest.raises(ManifestError, match=r"unknown field.*surprise"):
        load_bundle(bundle_dir)


def test_manifest_unknown_nested_field(bundle_dir: Path) -> None:
    data = _manifest_json(bundle_dir)
    data["tail"]["extra"] = "x"
    _write_manifest_json(bundle_dir, data)
    with pytest.raises(ManifestError, match="extra"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("key", ["codec", "head", "tail", "crossing", "source", "cut"])
def test_manifest_missing_field(bundle_dir: Path, key: str) -> None:
    data = _manifest_json(bundle_dir)
    del data[key]
    _write_manifest_json(bundle_dir, data)
    with pytest.raises(ManifestError, match=f"missing field '{key}'"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("version", [0, 2, "1"])
def test_manifest_wrong_schema_version(bundle_dir: Path, version: object) -> None:
    data = _manifest_json(bundle_dir)
    data["schema_version"] = version
    _write_manifest_json(bundle_dir, data)
    with pytest.raises(ManifestError, match=r"schema.version"):
        load_bundle(bundle_dir)


def test_manifest_invalid_json(bundle_dir: Path) -> None:
    (bundle_dir / MANIFEST).write_text('{"schema_version": 1,')
    with pytest.raises(ManifestError, match="unreadable manifest") as info:
        load_bundle(bundle_dir)
    assert info.value.exit_code == 5


@pytest.mark.parametrize("name", ["../tail.onnx", "sub/tail.onnx", "..\\tail.onnx", "..", ""])
def test_manifest_part_path_escape(bundle_dir: Path, name: str) -> None:
    data = _manifest_json(bundle_dir)
    data["tail"]["file"] = name
    _write_manifest_json(bundle_dir, data)
    with pytest.raises(ManifestError, match="plain file name"):
        load_bundle(bundle_dir)


def test_manifest_without_parts(bundle_dir: Path) -> None:
    data = _manifest_json(bundle_dir)
    data["head"] = data["tail"] = None
    _write_manifest_json(bundle_dir, data)
    with pytest.raises(ManifestError, match="neither a head nor a tail"):
        load_bundle(bundle_dir)


def test_manifest_bad_tensor_spec(bundle_dir: Path) -> None:
    data = _manifest_json(bundle_dir)
    data["crossing"][0]["dtype"] = "complex128"
    _write_manifest_json(bundle_dir, data)
    with pytest.raises(ManifestError, match="dtype"):
        load_bundle(bundle_dir)


# --- extremes ------------------------------------------------------------------------------


def test_extreme_bundles_and_stale_parts(
    analysis: Analysis, mid_cut: CutPoint, tmp_path: Path
) -> None:
    out = tmp_path / "b"
    splitter.split_model(analysis, mid_cut, out)
    assert (out / HEAD).exists() and (out / TAIL).exists()

    remote = splitter.split_model(analysis, analysis.cuts[0], out)
    assert remote.manifest.head is None and remote.manifest.tail is not None
    assert not (out / HEAD).exists(), "stale head.onnx left behind"
    assert remote.head_path is None
    loaded = load_bundle(out)
    assert loaded.manifest.head is None
    assert loaded.manifest.crossing == tuple(analysis.graph.inputs)
    assert loaded.manifest.passthrough == tuple(i.name for i in analysis.graph.inputs)

    local = splitter.split_model(analysis, analysis.cuts[-1], out)
    assert local.manifest.tail is None and local.manifest.head is not None
    assert not (out / TAIL).exists(), "stale tail.onnx left behind"
    assert local.tail_path is None
    assert load_bundle(out).manifest.crossing == ()


# --- pairing -------------------------------------------------------------------------------


def test_check_pair(analysis: Analysis, mid_cut: CutPoint, pristine: Path, tmp_path: Path) -> None:
    device = load_bundle(pristine).manifest
    check_pair(device, load_bundle(pristine).manifest)  # same bundle: passes

    other_cut = analysis.cuts[len(analysis.cuts) // 2 + 3]
    other = splitter.split_model(analysis, other_cut, tmp_path / "other").manifest
    with pytest.raises(VersionMismatch) as info:
        check_pair(device, other)
    assert info.value.exit_code == 6
    assert device.version in str(info.value) and other.version in str(info.value)

    fp16 = splitter.split_model(analysis, mid_cut, tmp_path / "fp16", codec="fp16").manifest
    assert fp16.head == device.head and fp16.tail == device.tail  # same parts, other codec
    with pytest.raises(VersionMismatch) as info:
        check_pair(fp16, device)
    assert fp16.version in str(info.value) and device.version in str(info.value)


def test_identity_and_version(pristine: Path, analysis: Analysis, mid_cut: CutPoint) -> None:
    m = load_bundle(pristine).manifest
    assert analysis.graph.sha256 in m.identity
    assert mid_cut.id in m.identity
    assert m.identity == f"{analysis.graph.sha256}:{mid_cut.id}"
    assert len(m.version) == 16
    assert m.head is not None and m.tail is not None
    changed = [
        dataclasses.replace(m, head=dataclasses.replace(m.head, sha256="0" * 64)),
        dataclasses.replace(m, tail=dataclasses.replace(m.tail, sha256="0" * 64)),
        dataclasses.replace(m, codec="zstd"),
        dataclasses.replace(m, cut_id="c1"),
        dataclasses.replace(m, source_sha256="f" * 64),
        dataclasses.replace(m, head=None),
    ]
    versions = {c.version for c in changed}
    assert m.version not in versions
    assert len(versions) == len(changed)
    # what does not define the parts does not change the version
    assert dataclasses.replace(m, created_by="someone else").version == m.version


# --- verification recorded -----------------------------------------------------------------


def test_verification_recorded_exact_for_none(pristine: Path) -> None:
    v = load_bundle(pristine).manifest.verification
    assert v["exact"] is True
    assert v["codec"] == "none"
    assert v["codec_max_rel_error"] == {}
    assert all(err == 0.0 for err in v["max_abs_error"].values())
    assert set(v["max_abs_error"]) == {"logits"}


def test_verification_recorded_for_int8(
    analysis: Analysis, mid_cut: CutPoint, tmp_path: Path
) -> None:
    bundle = splitter.split_model(analysis, mid_cut, tmp_path / "q", codec="int8")
    v = load_bundle(tmp_path / "q").manifest.verification
    assert v == bundle.manifest.verification
    assert v["codec"] == "int8"
    assert set(v["codec_max_rel_error"]) == {"logits"}
    err = v["codec_max_rel_error"]["logits"]
    assert 0.0 < err <= CODEC_TOLERANCE["int8"]
    assert bundle.manifest.codec == "int8"


def _outlier_model() -> onnx.ModelProto:
    """Head concatenates one huge constant to the input; the tail slices it away again.

    A per-tensor int8 scale is set by the outlier (1000 / 127), so every real value rounds
    to 0 and the output loses everything: the kind of outlier feature that breaks int8.
    """
    width = 16
    nodes = [
        helper.make_node("Concat", ["x", "big"], ["h"], name="head/concat", axis=1),
        helper.make_node("Slice", ["h", "starts", "ends", "axes"], ["y"], name="tail/slice"),
    ]
    inits = [
        helper.make_tensor("big", TensorProto.FLOAT, [1, 1], [1000.0]),
        helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
        helper.make_tensor("ends", TensorProto.INT64, [1], [width]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
    ]
    graph = helper.make_graph(
        nodes,
        "outlier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_lossy_codec_beyond_tolerance_raises(tmp_path: Path) -> None:
    analysis = Analysis.of(_outlier_model(), seed=0)
    cut = analysis.graph.find_cut("c1")
    assert [t.name for t in cut.tensors] == ["h"]
    # lossless and per-channel int8 (its own scale per column) reproduce the output
    ok = splitter.split_model(analysis, cut, tmp_path / "ok")
    assert ok.manifest.verification["exact"] is True
    per_channel = splitter.split_model(analysis, cut, tmp_path / "c", codec="int8c")
    assert per_channel.manifest.verification["codec_max_rel_error"]["y"] < 0.05
    # per-tensor int8: the outlier's scale wipes out the signal
    with pytest.raises(VerificationError, match="int8") as info:
        splitter.split_model(analysis, cut, tmp_path / "bad", codec="int8")
    assert info.value.exit_code == 7
    assert not (tmp_path / "bad" / MANIFEST).exists()
    ref = analysis.reference["y"]
    np.testing.assert_array_equal(ref, analysis.inputs["x"])


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("passthrough", [5]),
        ("state", [{"side": 3, "bogus": []}]),
        ("dims", {"batch": -4}),
    ],
)
def test_manifest_wrong_types_in_loose_fields(bundle_dir: Path, key: str, value: object) -> None:
    data = _manifest_json(bundle_dir)
    data[key] = value
    _write_manifest_json(bundle_dir, data)
    with pytest.raises(ManifestError):
        load_bundle(bundle_dir)
