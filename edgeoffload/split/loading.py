"""Reading a model to analyse: an ONNX file (or a ModelProto) checked and hashed.

Everything that can be wrong with a model *file* is reported here, with the path in the
message: a missing file, a directory, bytes that are not ONNX or were truncated, a model the
ONNX checker rejects, an opset older than the splitter supports. External data (weights in
files beside the model) is loaded from the model's folder. The graph analysis itself
(:mod:`edgeoffload.split.graph`) then works on the ModelProto it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx

from edgeoffload.bundle import sha256_bytes
from edgeoffload.errors import GraphError
from edgeoffload.split.graph import ModelGraph

MIN_OPSET = 13


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for analysis: the proto, the hash that identifies it, a display name."""

    model: onnx.ModelProto
    sha256: str  # of the source file's bytes (or of the serialised proto)
    name: str  # the file's name, or the graph's name for a proto

    def graph(
        self, *, dims: Mapping[str, int] | None = None, state: Mapping[str, str] | None = None
    ) -> ModelGraph:
        """The model prepared for cut analysis (see :class:`ModelGraph` for the arguments)."""
        return ModelGraph(self.model, sha256=self.sha256, dims=dims, state=state)


def load_model(source: str | Path | onnx.ModelProto) -> LoadedModel:
    """Read an ONNX file, or take a ModelProto; an unusable model raises GraphError.

    A file is parsed, checked with the ONNX checker and hashed from its own bytes; a proto is
    taken as it is (the caller built it) and hashed from its serialisation.
    """
    if isinstance(source, onnx.ModelProto):
        check_opset(source)
        name = source.graph.name or "model"
        return LoadedModel(source, sha256_bytes(source.SerializeToString()), name)
    path = Path(source)
    data = _read(path)
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:
        raise GraphError(
            f"{path}: not an ONNX model (protobuf parse failed; truncated or another format)"
        ) from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise GraphError(f"{path}: not an ONNX model (no graph or an empty graph)")
    try:
        # The file's own bytes: re-serialising a large model costs seconds.
        onnx.checker.check_model(data if len(data) < onnx.checker.MAXIMUM_PROTOBUF else model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphError(f"{path}: the ONNX checker rejects this model: {first}") from None
    check_opset(model)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        onnx.load_external_data_for_model(model, str(path.parent))
    return LoadedModel(model, sha256_bytes(data), path.name)


def check_opset(model: onnx.ModelProto) -> None:
    """GraphError for a default-domain opset older than :data:`MIN_OPSET`."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < MIN_OPSET:
            raise GraphError(
                f"the model uses ONNX opset {opset.version}; opset {MIN_OPSET}+ is required",
                hint="convert it with onnx.version_converter.convert_version(model, 17)",
            )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise GraphError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise GraphError(
            f"{path}: is a directory, expected an .onnx file",
            hint="export a Hugging Face model dir first: edgeoffload export DIR -o model.onnx",
        ) from None
    except OSError as exc:
        raise GraphError(f"{path}: cannot read ({exc.strerror})") from None
