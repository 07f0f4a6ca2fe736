"""The device path stays light: importing it loads no torch/transformers/optimum/onnx."""

from __future__ import annotations

import subprocess
import sys

DEVICE_MODULES = [
    "edgeoffload",
    "edgeoffload.errors",
    "edgeoffload.types",
    "edgeoffload.core.codec",
    "edgeoffload.bundle",
    "edgeoffload._ort",
    "edgeoffload.core.presets",
    "edgeoffload.core.noise",
    "edgeoffload.keys",
    "edgeoffload.protocol.connection",
    "edgeoffload.device.runtime",
    "edgeoffload.device.client",
    "edgeoffload.core.decoder",
    "edgeoffload.core.sampling",
    "edgeoffload.device.tokenizer",
    "edgeoffload.device.generate",
]
HEAVY = ["torch", "transformers", "optimum", "onnx"]


def test_device_imports_stay_light():
    code = (
        "import importlib, sys\n"
        f"for name in {DEVICE_MODULES!r}: importlib.import_module(name)\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"heavy modules imported: {result.stdout}"


def test_converters_import_without_torch():
    code = "import sys, edgeoffload.converters\nprint('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
