"""The command line, run in-process through ``main(argv) -> int`` on real models and files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeoffload.cli import main
from edgeoffload.split import zoo


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(err: str, code: int, expected: int) -> None:
    assert code == expected, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("edgeoffload: error:")]
    assert len(lines) == 1, err


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory) -> Path:
    return zoo.save("resnet", tmp_path_factory.mktemp("models") / "resnet.onnx")


@pytest.fixture(scope="module")
def resnet_profile(resnet_file, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("profiles") / "resnet.json"
    assert main(["profile", str(resnet_file), "-o", str(path), "--runs", "3"]) == 0
    return path


def test_split_writes_a_verified_bundle(capsys, resnet_file, resnet_profile, tmp_path):
    out_dir = tmp_path / "bundle"
    plot = tmp_path / "costs.png"
    code, out, err = _run(
        capsys,
        "split",
        str(resnet_file),
        "-o",
        str(out_dir),
        "--network",
        "lte",
        "--device-profile",
        str(resnet_profile),
        "--server-profile",
        str(resnet_profile),
        "--device",
        "rpi",
        "--plot",
        str(plot),
    )
    assert code == 0, err
    assert "chosen cut: c" in out and "verified" in out
    # the old name still works, says what it means now, and that profiling is better
    assert "'rpi' is deprecated and now means 'rpi4'" in out + err
    assert "edgeoffload profile" in out + err
    assert (out_dir / "manifest.json").is_file()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["verification"]["exact"] is True
    code, out, _ = _run(capsys, "inspect", str(out_dir))
    assert code == 0 and "all hashes verified" in out


def test_split_json_with_forced_cut(capsys, resnet_file, resnet_profile, tmp_path):
    code, out, err = _run(
        capsys,
        "split",
        str(resnet_file),
        "-o",
        str(tmp_path / "b"),
        "--cut",
        "c10",
        "--codec",
        "fp16",
        "--device-profile",
        str(resnet_profile),
        "--server-profile",
        str(resnet_profile),
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["report"]["best"]["cut"] == "c10"
    assert result["report"]["best"]["codec"] == "fp16"
    assert 0 < result["verification"]["codec_max_rel_error"]["logits"] < 1e-2


def test_cuts_json_lists_every_cut(capsys, resnet_file, resnet_profile):
    code, out, err = _run(
        capsys,
        "cuts",
        str(resnet_file),
        "--json",
        "--device-profile",
        str(resnet_profile),
        "--server-profile",
        str(resnet_profile),
    )
    assert code == 0, err
    payload = json.loads(out)
    nodes = len(onnx.load(str(resnet_file)).graph.node)
    assert len(payload["cuts"]) == nodes + 1
    assert payload["cuts"][0]["tensors"][0]["name"] == "input"
    assert payload["cuts"][-1]["tensors"] == []
    assert payload["layer_structure"] is True


def test_cuts_table(capsys, resnet_file, resnet_profile):
    code, out, err = _run(
        capsys,
        "cuts",
        str(resnet_file),
        "--device-profile",
        str(resnet_profile),
        "--server-profile",
        str(resnet_profile),
        "--network",
        "3g",
    )
    assert code == 0, err
    assert "layer-boundary cuts" in out and "chosen cut" in out


def test_demo_runs(capsys):
    code, out, err = _run(capsys, "demo", "--network", "wifi", "--device", "rpi4")
    assert code == 0, err
    assert "chosen cut" in out and "verified" in out
    assert "rpi4 (x4.4 compute, x14 memory-bound time)" in out


# -- bad input: one clear line, documented exit code --------------------------------------------


def test_not_onnx(capsys, tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n")
    code, _, err = _run(capsys, "split", str(path), "-o", str(tmp_path / "b"))
    _assert_one_line_error(err, code, 3)
    assert "not an ONNX model" in err


def test_truncated_onnx(capsys, resnet_file, tmp_path):
    data = resnet_file.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    code, _, err = _run(capsys, "cuts", str(path))
    _assert_one_line_error(err, code, 3)


def test_unknown_cut(capsys, resnet_file, resnet_profile, tmp_path):
    code, _, err = _run(
        capsys,
        "split",
        str(resnet_file),
        "-o",
        str(tmp_path / "b"),
        "--cut",
        "block3/conv9",
        "--device-profile",
        str(resnet_profile),
        "--server-profile",
        str(resnet_profile),
    )
    _assert_one_line_error(err, code, 3)
    assert "no cut named" in err and "hint:" in err


def _if_model(path: Path) -> Path:
    """x -> relu -> If(cond) { then: relu_out * 2 (outer-scope read), else: -relu_out } -> y."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    then_graph = helper.make_graph(
        [helper.make_node("Mul", ["r", "two"], ["t_out"], name="then/mul")],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1, 4])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["r"], ["e_out"], name="else/neg")],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1, 4])],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="pre/relu"),
        helper.make_node(
            "If",
            ["cond"],
            ["branch"],
            name="select/if",
            then_branch=then_graph,
            else_branch=else_graph,
        ),
        helper.make_node("Sigmoid", ["branch"], ["y"], name="post/sigmoid"),
    ]
    graph = helper.make_graph(nodes, "ifmodel", [x, cond], [y], [two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def test_cut_inside_control_flow(capsys, tmp_path):
    model = _if_model(tmp_path / "if.onnx")
    code, _, err = _run(capsys, "split", str(model), "-o", str(tmp_path / "b"), "--cut", "then/mul")
    _assert_one_line_error(err, code, 3)
    assert "select/if" in err and "control-flow" in err


def test_control_flow_model_splits_before_the_if(capsys, tmp_path):
    model = _if_model(tmp_path / "if.onnx")
    inputs = tmp_path / "in.npz"
    np.savez(inputs, x=np.arange(4, dtype=np.float32).reshape(1, 4) - 2, cond=np.array(True))
    code, _, err = _run(
        capsys,
        "split",
        str(model),
        "-o",
        str(tmp_path / "b"),
        "--cut",
        "pre/relu",
        "--input",
        str(inputs),
    )
    assert code == 0, err
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert {t["name"] for t in manifest["crossing"]} == {"r", "cond"}


def test_impossible_memory_constraint(capsys, resnet_file, resnet_profile, tmp_path):
    code, _, err = _run(
        capsys,
        "split",
        str(resnet_file),
        "-o",
        str(tmp_path / "b"),
        "--max-device-memory",
        "1KiB",
        "--min-head-depth",
        "1",
        "--device-profile",
        str(resnet_profile),
        "--server-profile",
        str(resnet_profile),
    )
    _assert_one_line_error(err, code, 4)
    assert "no cut satisfies" in err


def test_modified_bundle(capsys, resnet_file, resnet_profile, tmp_path):
    out_dir = tmp_path / "b"
    assert (
        main(
            [
                "split",
                str(resnet_file),
                "-o",
                str(out_dir),
                "--cut",
                "c20",
                "--device-profile",
                str(resnet_profile),
                "--server-profile",
                str(resnet_profile),
            ]
        )
        == 0
    )
    capsys.readouterr()
    tail = out_dir / "tail.onnx"
    data = bytearray(tail.read_bytes())
    data[len(data) // 2] ^= 0x01
    tail.write_bytes(bytes(data))
    code, _, err = _run(capsys, "inspect", str(out_dir))
    _assert_one_line_error(err, code, 5)
    assert "tail.onnx was modified" in err


def test_profile_of_another_model(capsys, resnet_profile, tmp_path):
    model = zoo.save("mobilenetv2", tmp_path / "m.onnx")
    code, _, err = _run(
        capsys,
        "split",
        str(model),
        "-o",
        str(tmp_path / "b"),
        "--device-profile",
        str(resnet_profile),
        "--server-profile",
        str(resnet_profile),
    )
    _assert_one_line_error(err, code, 8)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--dim", "sequence"], "NAME=POSITIVE_INT"),
        (["--network", "carrier-pigeon"], "unknown network"),
        (["--codec", "gzip"], "unknown codec"),
        (["--max-device-memory", "lots"], "cannot read size"),
        (["--device", "toaster"], "unknown device class"),
    ],
)
def test_bad_option_values(capsys, resnet_file, tmp_path, args, needle):
    code, _, err = _run(capsys, "split", str(resnet_file), "-o", str(tmp_path / "b"), *args)
    _assert_one_line_error(err, code, 2)
    assert needle in err


def test_missing_file(capsys, tmp_path):
    code, _, err = _run(capsys, "cuts", str(tmp_path / "nope.onnx"))
    _assert_one_line_error(err, code, 3)
    assert "no such file" in err


def test_version(capsys):
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.startswith("edgeoffload ")
