"""ORT-format parts (``edgeoffload export-ort``): files, pinned hashes, operator lists, loading.

Real onnxruntime conversions of a small zoo ResNet split in the middle; the .ort parts must
give bit-identical outputs to the .onnx parts they were converted from.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeoffload._ort import make_session, run
from edgeoffload.bundle import HEAD_ORT, MANIFEST, ORT_CONFIG, TAIL_ORT, load_bundle
from edgeoffload.cli import main
from edgeoffload.device.runtime import DeviceRuntime
from edgeoffload.errors import ManifestError, UsageError
from edgeoffload.split import splitter, zoo
from edgeoffload.split.analysis import Analysis
from edgeoffload.split.ort_export import export_ort, parse_operator_config, sample_inputs


@pytest.fixture(scope="module")
def analysis() -> Analysis:
    return Analysis.of(zoo.build("resnet", seed=0))


@pytest.fixture(scope="module")
def pristine(analysis: Analysis, tmp_path_factory) -> Path:
    """The mid-cut ResNet bundle as split (no .ort)."""
    out = tmp_path_factory.mktemp("ort") / "split"
    splitter.split_model(analysis, analysis.cuts[len(analysis.cuts) // 2], out)
    return out


@pytest.fixture(scope="module")
def exported_once(pristine: Path, tmp_path_factory) -> Path:
    out = Path(shutil.copytree(pristine, tmp_path_factory.mktemp("ort") / "exported"))
    export_ort(out)
    return out


@pytest.fixture
def exported(exported_once: Path, tmp_path: Path) -> Path:
    """A fresh copy of the exported bundle that a test may damage."""
    return Path(shutil.copytree(exported_once, tmp_path / "bundle"))


@pytest.fixture
def plain(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "plain"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ops(*models: Path) -> set[str]:
    return {node.op_type for m in models for node in onnx.load(str(m)).graph.node}


def _config_ops(path: Path) -> set[str]:
    required = parse_operator_config(path)
    assert set(required) == {"ai.onnx"}
    return {op for ops in required["ai.onnx"].values() for op in ops}


def _sample(analysis: Analysis, seed: int = 7) -> dict[str, np.ndarray]:
    return analysis.graph.sample_inputs(seed=seed)


# --- the files and the manifest ------------------------------------------------------------


def test_export_writes_pinned_files_and_keeps_the_version(exported: Path, pristine: Path) -> None:
    before = load_bundle(pristine).manifest
    bundle = load_bundle(exported)
    m = bundle.manifest
    assert m.version == before.version and m.identity == before.identity
    assert m.head == before.head and m.tail == before.tail
    ort = m.ort
    assert ort is not None
    assert (ort.head.file, ort.tail.file, ort.required_operators.file) == (
        HEAD_ORT,
        TAIL_ORT,
        ORT_CONFIG,
    )
    for entry in ort.files():
        assert entry.sha256 == _sha256(exported / entry.file)
    assert ort.head.converted_from == m.head.sha256 == _sha256(exported / "head.onnx")
    assert ort.tail.converted_from == m.tail.sha256
    assert ort.optimization == "disable"
    assert ort.check["identical"] is True and ort.check["samples"] == 2
    assert (exported / HEAD_ORT).read_bytes()[4:8] == b"ORTM"  # the flatbuffer identifier
    raw = json.loads((exported / MANIFEST).read_text())
    assert raw["ort"]["head"] == {
        "file": "head.ort",
        "sha256": ort.head.sha256,
        "converted_from": m.head.sha256,
    }
    assert not list(exported.glob(".export-ort-*"))  # the staging folder is gone


def test_required_operators_lists_the_parts_operators(exported: Path) -> None:
    config = exported / ORT_CONFIG
    assert _config_ops(config) == _ops(exported / "head.onnx", exported / "tail.onnx")
    text = config.read_text()
    assert "# - head.ort" in text and "# - tail.ort" in text
    assert str(exported) not in text  # names, not paths: the same file wherever exported


def test_bundle_without_ort_still_loads_and_runs_onnx(plain: Path, analysis: Analysis) -> None:
    bundle = load_bundle(plain)
    assert bundle.manifest.ort is None
    assert "ort" not in json.loads((plain / MANIFEST).read_text())
    runtime = DeviceRuntime(bundle)
    assert runtime.head_file == "head.onnx"
    runtime.run_head(_sample(analysis))
    with pytest.raises(ManifestError, match="no ORT-format head") as info:
        DeviceRuntime(bundle, model_format="ort")
    assert "export-ort" in (info.value.hint or "")
    with pytest.raises(UsageError, match="model format"):
        DeviceRuntime(bundle, model_format="tflite")


# --- the device runtime --------------------------------------------------------------------


def test_device_runtime_runs_the_ort_parts_with_identical_outputs(
    exported: Path, analysis: Analysis
) -> None:
    x = _sample(analysis)
    ort_rt = DeviceRuntime(exported, model_format="ort")
    auto_rt = DeviceRuntime(exported)
    onnx_rt = DeviceRuntime(exported, model_format="onnx")
    assert (ort_rt.head_file, auto_rt.head_file, onnx_rt.head_file) == (
        "head.ort",
        "head.ort",
        "head.onnx",
    )
    # The reference: the .onnx parts as split and verified (no graph optimizations).
    head_ref = run(make_session(exported / "head.onnx", optimize=False), x)
    crossing = ort_rt.run_head(x)
    assert list(crossing) == [t.name for t in ort_rt.manifest.crossing]
    for name, value in crossing.items():
        assert np.array_equal(value, head_ref[name]), name
    tail_ref = run(make_session(exported / "tail.onnx", optimize=False), head_ref)
    local = ort_rt.run_local(x)  # the fallback runs tail.ort
    for name, value in local.items():
        assert np.array_equal(value, tail_ref[name]), name
    # The runtime's .onnx sessions optimize the graph (fused kernels): equal up to rounding.
    for name, value in onnx_rt.run_local(x).items():
        np.testing.assert_allclose(value, local[name], rtol=1e-4, atol=1e-4)


def test_client_side_bytes_load_as_ort(exported: Path, analysis: Analysis) -> None:
    """How a mobile or web client loads it: the file's bytes, with the ORT format named."""
    import onnxruntime

    so = onnxruntime.SessionOptions()
    so.add_session_config_entry("session.load_model_format", "ORT")
    session = onnxruntime.InferenceSession((exported / HEAD_ORT).read_bytes(), sess_options=so)
    x = _sample(analysis)
    got = run(session, x)
    want = run(make_session(exported / "head.onnx", optimize=False), x)
    assert all(np.array_equal(got[k], want[k]) for k in want)


# --- tampering -----------------------------------------------------------------------------


def test_tampered_head_ort_is_a_manifest_error(exported: Path, capsys) -> None:
    path = exported / HEAD_ORT
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"head\.ort was modified after export-ort"):
        load_bundle(exported)
    with pytest.raises(ManifestError):
        DeviceRuntime(exported, model_format="onnx")  # the whole bundle is refused
    assert main(["inspect", str(exported)]) == 5
    assert "head.ort was modified" in capsys.readouterr().err


@pytest.mark.parametrize("name", [HEAD_ORT, TAIL_ORT, ORT_CONFIG])
def test_missing_ort_file_is_a_manifest_error(exported: Path, name: str) -> None:
    (exported / name).unlink()
    with pytest.raises(ManifestError, match="missing") as info:
        load_bundle(exported)
    assert "export-ort" in (info.value.hint or "")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda o: o["head"].update(converted_from="0" * 64), "converted from another"),
        (lambda o: o["head"].update(file="tail.onnx"), "must end in .ort"),
        (lambda o: o["tail"].update(file="head.ort"), "collide"),
        (lambda o: o["head"].update(file="../head.ort"), "plain file name"),
        (lambda o: o.update(optimization="fast"), "optimization"),
        (lambda o: o.update(head=None, tail=None), "neither"),
        (lambda o: o.update(extra=1), "unknown field"),
    ],
)
def test_bad_ort_sections_are_refused(exported: Path, mutate, match: str) -> None:
    data = json.loads((exported / MANIFEST).read_text())
    mutate(data["ort"])
    (exported / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=match):
        load_bundle(exported, verify=False)


def test_resplit_into_the_folder_removes_stale_ort_files(
    exported: Path, analysis: Analysis
) -> None:
    splitter.split_model(analysis, analysis.cuts[len(analysis.cuts) // 3], exported)
    bundle = load_bundle(exported)
    assert bundle.manifest.ort is None
    assert not any((exported / n).exists() for n in (HEAD_ORT, TAIL_ORT, ORT_CONFIG))


# --- the command line and the options ------------------------------------------------------


def test_cli_export_ort_head_only_then_again_with_the_tail(plain: Path, capsys) -> None:
    version = load_bundle(plain).manifest.version
    assert main(["export-ort", str(plain), "--optimization", "basic", "--no-tail"]) == 0
    out = capsys.readouterr().out
    assert "head.ort" in out and "outputs identical" in out and version in out
    m = load_bundle(plain).manifest
    assert m.ort is not None and m.ort.tail is None and m.ort.optimization == "basic"
    assert not (plain / TAIL_ORT).exists()
    # The operator list is the converted graph's: basic fuses BatchNormalization into Conv.
    assert _config_ops(plain / ORT_CONFIG) == _ops(plain / "head.onnx") - {"BatchNormalization"}
    first_config = (plain / ORT_CONFIG).read_text()
    head_ops = _config_ops(plain / ORT_CONFIG)

    assert main(["export-ort", str(plain), "--optimization", "basic", "--json"]) == 0
    section = json.loads(capsys.readouterr().out)
    assert section["tail"]["file"] == TAIL_ORT and section["optimization"] == "basic"
    again = load_bundle(plain).manifest
    assert again.version == version and again.ort is not None and again.ort.tail is not None
    assert DeviceRuntime(plain).head_file == "head.ort"
    assert _config_ops(plain / ORT_CONFIG) > head_ops  # the tail's operators join them

    # Back to the head only: tail.ort goes, and the operator list is the first one again
    # (the .ort bytes may differ between exports; what they compute and need does not).
    assert main(["export-ort", str(plain), "--optimization", "basic", "--no-tail"]) == 0
    assert not (plain / TAIL_ORT).exists() and load_bundle(plain).manifest.ort.tail is None
    assert (plain / ORT_CONFIG).read_text() == first_config


@pytest.mark.parametrize("level", ["extended", "all"])
def test_optimized_exports_match_the_onnx_at_the_same_level(plain: Path, level: str) -> None:
    bundle = export_ort(plain, optimization=level, tail=False, samples=1)
    assert bundle.manifest.ort.optimization == level and bundle.manifest.ort.check["identical"]


def test_cli_export_with_given_inputs(plain: Path, analysis: Analysis, tmp_path: Path) -> None:
    good = tmp_path / "x.npz"
    np.savez(good, **_sample(analysis))
    assert main(["export-ort", str(plain), "--no-tail", "--input", str(good)]) == 0
    assert load_bundle(plain).manifest.ort.check["inputs"] == "given"
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=np.zeros((1, 3, 8, 8), np.float32))
    assert main(["export-ort", str(plain), "--input", str(bad)]) == 2


def test_cli_errors(plain: Path, tmp_path: Path, capsys) -> None:
    assert main(["export-ort", str(plain), "--optimization", "fast"]) == 2
    assert main(["export-ort", str(tmp_path / "nowhere")]) == 5
    assert "not a bundle" in capsys.readouterr().err


def test_encoder_head_with_integer_inputs(tmp_path: Path) -> None:
    """Token ids and a mask, generated from the declared shapes for the export's check."""
    enc = Analysis.of(zoo.build("encoder", seed=0), dims={"sequence": 8})
    bundle = splitter.split_model(enc, enc.cuts[len(enc.cuts) // 2], tmp_path / "enc")
    assert {s.dtype for s in bundle.manifest.head.inputs} == {"int64"}
    export_ort(bundle, tail=False)
    x = enc.graph.sample_inputs(seed=3)
    runtime = DeviceRuntime(tmp_path / "enc")
    assert runtime.head_file == "head.ort"
    got = runtime.run_head(x)
    want = run(make_session(tmp_path / "enc" / "head.onnx", optimize=False), x)
    assert got and all(np.array_equal(got[name], want[name]) for name in got)


def test_decoder_head_with_kv_cache(tiny_llama_bundle, tmp_path: Path) -> None:
    """A decoder head: KV-cache inputs and a summed dim (past + sequence) from the manifest."""
    folder = Path(shutil.copytree(tiny_llama_bundle.path, tmp_path / "llama"))
    bundle = export_ort(folder, tail=False, samples=1)
    assert bundle.manifest.ort.check["identical"] and bundle.manifest.state
    m = bundle.manifest
    x = sample_inputs(m.graph_inputs, m.dims, seed=5)
    runtime = DeviceRuntime(folder)
    assert runtime.head_file == "head.ort"
    got = run(runtime.head_session, x)
    want = run(make_session(folder / "head.onnx", optimize=False), x)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_export_needs_no_onnx() -> None:
    """export-ort runs on a device install: onnxruntime (and its flatbuffers) only."""
    code = (
        "import sys, edgeoffload.split.ort_export, onnxruntime.tools.ort_format_model; "
        "sys.exit('onnx' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
