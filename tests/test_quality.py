"""The quality report of quantised bundles (edgeoffload.split.quality) and its CLI.

The tiny random Llama is split after 2 of its 4 blocks with quantised weights (onnxruntime's
real quantiser), measured against its fp32 self on the shipped text, and refused by
``--max-quality-loss``. Random weights make near-uniform logits, so the bounds are loose;
what is asserted are orderings, counts and the refusal, not speed.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from edgeoffload.cli import main
from edgeoffload.device.tokenizer import TextTokenizer
from edgeoffload.errors import QualityError
from edgeoffload.split.analysis import Analysis
from edgeoffload.split.decoder_split import block_cuts, split_decoder
from edgeoffload.split.quality import (
    TEXT,
    QualityReport,
    check_quality,
    measure_quality,
    prompt_offsets,
    text_ids,
)
from edgeoffload.split.weights import WeightScheme, quantize_model

QUICK: dict[str, int] = {"prompts": 6, "new_tokens": 24, "window": 256}
WORKLOAD = ("--prompt-tokens", "16", "--new-tokens", "8")


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def reports(tiny_llama_dir: Path) -> dict[str, QualityReport]:
    """fp32 / int8 / int4 (asym, block 32) and int4 block 128 sym, both parts quantised."""
    analysis = Analysis.of(tiny_llama_dir / "model.onnx")
    head, tail = analysis.graph.split(block_cuts(analysis)[2])
    assert head is not None and tail is not None
    schemes = {
        "fp32": WeightScheme("fp32"),
        "int8": WeightScheme("int8"),
        "int4": WeightScheme("int4"),
        "int4-coarse": WeightScheme("int4", 128, symmetric=True),
    }
    out = {}
    for name, scheme in schemes.items():
        parts = [quantize_model(m, scheme).SerializeToString() for m in (head, tail)]
        out[name] = measure_quality(analysis.graph, *parts, tiny_llama_dir, **QUICK)
    return out


def test_fp32_split_agrees_with_itself(reports: dict[str, QualityReport]) -> None:
    fp32 = reports["fp32"]
    assert fp32.agreement == 1.0
    assert fp32.perplexity == pytest.approx(fp32.perplexity_fp32, rel=1e-6)
    assert fp32.positions == QUICK["prompts"] * QUICK["new_tokens"]


def test_more_bits_agree_more(reports: dict[str, QualityReport]) -> None:
    int8, int4, coarse = reports["int8"], reports["int4"], reports["int4-coarse"]
    assert 1.0 >= int8.agreement >= int4.agreement - 0.02
    assert int4.agreement >= coarse.agreement - 0.02
    assert int8.agreement >= 0.9
    assert abs(int8.perplexity_change) <= abs(int4.perplexity_change) + 0.01
    for report in (int8, int4, coarse):
        assert report.perplexity_fp32 == reports["fp32"].perplexity_fp32  # one reference
        assert report.text == TEXT.name and report.text_tokens > QUICK["window"]


def test_report_round_trips_and_bounds(reports: dict[str, QualityReport]) -> None:
    int4 = reports["int4"]
    data = int4.to_dict()
    assert data["agreement_loss"] == pytest.approx(1 - data["agreement"], abs=1e-6)
    assert data["text"]["sha256"] and data["positions"] == int4.positions
    check_quality(int4, None)
    check_quality(int4, int4.agreement_loss)  # exactly at the bound passes
    with pytest.raises(QualityError, match=r"max-quality-loss 0\.1") as info:
        check_quality(replace(int4, agreement=0.5), 0.1)
    assert info.value.exit_code == 4 and info.value.hint


def test_prompts_come_from_fixed_offsets(tiny_llama_dir: Path) -> None:
    ids = text_ids(TextTokenizer.from_dir(tiny_llama_dir))
    offsets = prompt_offsets(len(ids), 20, 16)
    assert offsets == prompt_offsets(len(ids), 20, 16)
    assert len(set(offsets)) == 20 and offsets[0] == 0 and offsets[-1] + 16 <= len(ids)


def test_the_text_ships_with_its_source_and_licence() -> None:
    readme = (TEXT.parent / "README.md").read_text(encoding="utf-8")
    assert "public domain" in readme and "Gutenberg" in readme
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    assert '"split/data/*.txt"' in pyproject  # package data: split needs it installed
    assert 4_000 < TEXT.stat().st_size < 64_000


def test_split_refuses_a_bundle_over_the_quality_bound(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "refused"
    with pytest.raises(QualityError):
        split_decoder(
            tiny_llama_dir / "model.onnx",
            out,
            head_layers=2,
            head_weights=WeightScheme("int4", 128, symmetric=True),
            tail_weights=WeightScheme("int4", 128, symmetric=True),
            max_quality_loss=0.0,
            quality_settings=QUICK,
        )
    assert not (out / "manifest.json").exists()


def test_cli_split_prints_and_stores_the_quality(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    code, stdout, stderr = _run(
        "split", str(tiny_llama_dir), "-o", str(out), "--head-layers", "2",
        "--head-weights", "int4", "--tail-weights", "int8", *WORKLOAD,
    )  # fmt: skip
    assert code == 0, stderr
    assert "weights: head int4 RTN block 32 asym" in stdout
    assert "tail int8 RTN block 32 asym" in stdout
    assert "teacher-forced top-1 agreement" in stdout and "perplexity" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quality"]["positions"] == 20 * 64
    assert manifest["weights"]["head"]["dtype"] == "int4"
    code, shown, _ = _run("inspect", str(out))
    assert code == 0 and "weights: head int4" in shown and "agreement" in shown


def test_cli_refuses_with_a_one_line_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    code, _, stderr = _run(
        "split", str(tiny_llama_dir), "-o", str(tmp_path / "r"), "--head-layers", "2",
        "--head-weights", "int4", "--weights-block", "128", "--weights-symmetric",
        "--tail-weights", "int4", "--max-quality-loss", "0", *WORKLOAD,
    )  # fmt: skip
    assert code == 4, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("edgeoffload: error:")]
    assert len(errors) == 1 and "--max-quality-loss 0" in errors[0]
    assert "Traceback" not in stderr


def test_cli_memory_hint_names_lighter_head_weights(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Over --max-device-memory with fp32 weights; int4 would fit (priced on the quantised
    head): the error's hint says so."""
    limit = "110KiB"  # the 2-block int4 head + its KV at 24 positions is ~106 KiB
    code, _, stderr = _run(
        "split", str(tiny_llama_dir), "-o", str(tmp_path / "m"), "--max-device-memory", limit,
        "--min-head-depth", "14", *WORKLOAD,
    )  # fmt: skip
    assert code == 4, stderr
    assert "--head-weights int4" in stderr and "fits" in stderr
    code, stdout, stderr = _run(
        "split", str(tiny_llama_dir), "-o", str(tmp_path / "m"), "--max-device-memory", limit,
        "--min-head-depth", "14", "--head-weights", "int4", "--json", *WORKLOAD,
    )  # fmt: skip
    assert code == 0, stderr
    result: dict[str, Any] = json.loads(stdout)
    assert result["chosen"]["feasible"] and result["chosen"]["head_layers"] >= 2
    head_bytes = result["weights"]["head"]["weight_bytes"]
    assert result["chosen"]["device_memory_bytes"] >= head_bytes


def test_weights_flags_are_for_decoders(tmp_path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    path = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    code, _, stderr = _run("split", str(path), "-o", str(tmp_path / "x"), "--head-weights", "int4")
    assert code == 2 and "decoder" in stderr
