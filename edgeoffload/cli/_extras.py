"""The one way the CLI reports a missing optional part: :class:`MissingExtra` (exit code 12).

Commands import their heavy modules (onnx for splitting, matplotlib for plots, torch for
exports) inside the function; when one is missing, :func:`missing_extra` turns the
ModuleNotFoundError into a MissingExtra that names the ``pip install`` line to run.
"""

from __future__ import annotations

from edgeoffload.errors import MissingExtra

# Top-level module -> the extra that installs it (pyproject.toml, [project.optional-dependencies]).
EXTRAS = {
    "onnx": "split",
    "matplotlib": "plot",
    "torch": "convert",
    "onnxscript": "convert",
    "transformers": "convert",
    "optimum": "convert",
    "gguf": "convert",
    "accelerate": "convert",
    "ray": "ray",  # serve --executor ray (edge.rayexec)
}


def missing_extra(exc: ImportError, *, what: str) -> MissingExtra | None:
    """The MissingExtra that ``exc`` stands for (None: not an optional part of edgeoffload)."""
    module = (exc.name or "").partition(".")[0]
    extra = EXTRAS.get(module)
    return None if extra is None else MissingExtra(module, extra, what=what)
