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
    return {
        name: Analysis.of(model, dims=dims.get(name)) for name, model in zoo_models.items()
    }
