"""The layout's promises that import-linter cannot see (``lint-imports`` checks the rest).

* The device path stays light: every module a phone ships (the top level, core/, protocol/,
  device/ and the edge server) imports without loading torch, transformers, optimum or onnx.
* ``converters/`` is installed as ``edgeoffload.converters`` from a folder outside the package,
  so grimp does not see it: its imports are checked here from the source (it may use the top
  level only), and no device-side module may import it.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import edgeoffload

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "edgeoffload"
HEAVY = ["torch", "transformers", "optimum", "onnx", "ray"]
DEVICE_ROOMS = ("core", "protocol", "device", "edge")
TOP_LEVEL = sorted(
    m.name for m in pkgutil.iter_modules(edgeoffload.__path__) if not m.ispkg and m.name != "cli"
)


def _device_side_modules() -> list[str]:
    names = ["edgeoffload"] + [f"edgeoffload.{m}" for m in TOP_LEVEL]
    for room in DEVICE_ROOMS:
        for info in pkgutil.iter_modules([str(PACKAGE / room)]):
            names.append(f"edgeoffload.{room}.{info.name}")
    return names


def _imports(path: Path) -> set[str]:
    """Absolute names a module imports (relative imports resolved against edgeoffload.*)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # inside converters/: relative to edgeoffload.converters
                found.add("edgeoffload.converters" + (f".{node.module}" if node.module else ""))
            elif node.module:
                found.add(node.module)
    return found


def test_the_rooms_exist_and_hold_modules() -> None:
    for room in (*DEVICE_ROOMS, "split", "lab", "cli"):
        assert (PACKAGE / room / "__init__.py").is_file(), room
        assert any(pkgutil.iter_modules([str(PACKAGE / room)])), room


def test_device_imports_stay_light() -> None:
    modules = _device_side_modules()
    assert "edgeoffload.device.client" in modules and "edgeoffload.edge.server" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"heavy modules imported: {result.stdout}"


def test_converters_import_without_torch() -> None:
    code = "import sys, edgeoffload.converters\nprint('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_converters_use_only_the_top_level() -> None:
    allowed = {f"edgeoffload.{m}" for m in TOP_LEVEL} | {"edgeoffload"}
    files = sorted((ROOT / "converters").glob("*.py"))
    assert files
    for path in files:
        for name in _imports(path):
            if name.startswith("edgeoffload.converters") or not name.startswith("edgeoffload"):
                continue
            assert name in allowed, f"converters/{path.name} imports {name}"


def test_no_device_side_module_imports_the_converters() -> None:
    for room in (*DEVICE_ROOMS, None):
        folder = PACKAGE / room if room else PACKAGE
        for path in sorted(folder.glob("*.py")):
            bad = [n for n in _imports(path) if n.startswith("edgeoffload.converters")]
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
