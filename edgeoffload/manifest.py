"""The bundle manifest: what a device and a server must agree on about a split model.

A frozen dataclass with a strict ``from_dict`` (unknown or missing fields are a ManifestError)
and ``to_dict``; :attr:`Manifest.version` is a hash over the model, the cut, the codec and every
part's sha256. Two sides (device, server) pair only when their manifests have the same version,
otherwise :func:`check_pair` raises VersionMismatch naming both. The optional ``ort`` section
(:class:`OrtInfo`) pins ORT-format copies of the parts; it is outside the version. Stdlib only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeoffload.errors import ManifestError, VersionMismatch
from edgeoffload.types import TensorSpec, fields

SCHEMA_VERSION = 1


def _specs(items: list[Any]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.from_dict(item, ManifestError) for item in items)


STATE_SIDES = ("device", "server")


def safe_relative(rel: object) -> bool:
    """A bundle-relative file path that cannot escape the folder."""
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")):
        return False
    parts = rel.split("/")
    return all(p not in ("", ".", "..") and "\\" not in p for p in parts)


def _state_entry(data: object) -> dict[str, str]:
    """One KV-cache state pair: the part's input that receives what ``output`` produced."""
    f = fields(data, "manifest state entry", ManifestError)
    entry = {"side": f.text("side"), "input": f.text("input"), "output": f.text("output")}
    f.done()
    if entry["side"] not in STATE_SIDES:
        raise ManifestError(f"manifest state side {entry['side']!r} is not one of {STATE_SIDES}")
    return entry


@dataclass(frozen=True)
class PartInfo:
    """One executable part of the bundle (head or tail)."""

    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: object) -> PartInfo:
        f = fields(data, "manifest part", ManifestError)
        part = cls(
            file=f.text("file"),
            sha256=f.text("sha256"),
            inputs=_specs(f.array("inputs")),
            outputs=_specs(f.array("outputs")),
        )
        f.done()
        if "/" in part.file or "\\" in part.file or part.file in ("", ".", ".."):
            raise ManifestError(f"manifest part file {part.file!r} must be a plain file name")
        return part


def _plain_file(name: str, what: str) -> str:
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise ManifestError(f"manifest {what} file {name!r} must be a plain file name")
    return name


ORT_OPTIMIZATIONS = ("disable", "basic", "extended", "all")


@dataclass(frozen=True)
class OrtFile:
    """One ORT-format file of the bundle: its name, its sha256 and, for a part, the sha256
    of the ``.onnx`` part it was converted from."""

    file: str
    sha256: str
    converted_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {"file": self.file, "sha256": self.sha256}
        if self.converted_from is not None:
            data["converted_from"] = self.converted_from
        return data

    @classmethod
    def from_dict(cls, data: object, what: str) -> OrtFile:
        f = fields(data, f"manifest ort {what}", ManifestError)
        entry = cls(
            file=_plain_file(f.text("file"), f"ort {what}"),
            sha256=f.text("sha256"),
            converted_from=f.opt_text("converted_from"),
        )
        f.done()
        return entry


@dataclass(frozen=True)
class OrtInfo:
    """The optional ORT-format encoding of the parts (``edgeoffload export-ort``).

    The same graphs in onnxruntime's flatbuffer format, for mobile and web runtimes, plus the
    operator list for a reduced onnxruntime build. Not part of :attr:`Manifest.version`: an
    ``.ort`` part computes what its ``.onnx`` computes (checked when exported), so a device
    that runs ``head.ort`` pairs with a server that runs ``tail.onnx``.
    """

    optimization: str  # the graph optimization level the .ort files were saved at
    onnxruntime: str  # version of the onnxruntime that converted them
    required_operators: OrtFile
    head: OrtFile | None = None
    tail: OrtFile | None = None
    check: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "optimization": self.optimization,
            "onnxruntime": self.onnxruntime,
            "head": self.head.to_dict() if self.head else None,
            "tail": self.tail.to_dict() if self.tail else None,
            "required_operators": self.required_operators.to_dict(),
            "check": dict(self.check),
        }

    @classmethod
    def from_dict(cls, data: object) -> OrtInfo:
        f = fields(data, "manifest ort", ManifestError)
        head_raw, tail_raw = f.value("head"), f.value("tail")
        info = cls(
            optimization=f.text("optimization"),
            onnxruntime=f.text("onnxruntime"),
            head=OrtFile.from_dict(head_raw, "head") if head_raw is not None else None,
            tail=OrtFile.from_dict(tail_raw, "tail") if tail_raw is not None else None,
            required_operators=OrtFile.from_dict(f.value("required_operators"), "operators"),
            check=f.obj("check", {}),
        )
        f.done()
        if info.optimization not in ORT_OPTIMIZATIONS:
            raise ManifestError(
                f"manifest ort optimization {info.optimization!r} is not one of {ORT_OPTIMIZATIONS}"
            )
        if info.head is None and info.tail is None:
            raise ManifestError("manifest ort section lists neither a head nor a tail")
        return info

    def files(self) -> tuple[OrtFile, ...]:
        """Every file of the section: the parts, then the operator list."""
        return (*(p for p in (self.head, self.tail) if p), self.required_operators)


@dataclass(frozen=True)
class Manifest:
    """Everything a device and a server need to agree on about a split model."""

    source_sha256: str
    source_name: str
    cut_id: str
    cut_after: str
    crossing: tuple[TensorSpec, ...]  # tensors sent device -> server, in order
    passthrough: tuple[str, ...]  # crossing tensors that are graph inputs (sent as given)
    graph_inputs: tuple[TensorSpec, ...]
    graph_outputs: tuple[TensorSpec, ...]
    head: PartInfo | None  # None for all-remote
    tail: PartInfo | None  # None for all-local
    codec: str
    dims: dict[str, int] = field(default_factory=dict)
    # State tensors that loop back on the same side (KV cache): [{"side", "input", "output"}].
    state: tuple[dict[str, str], ...] = ()
    # Other files of the bundle (e.g. ``tokenizer/tokenizer.json``) -> sha256.
    files: dict[str, str] = field(default_factory=dict)
    predicted: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    created_by: str = ""
    schema_version: int = SCHEMA_VERSION
    # ORT-format copies of the parts (export-ort); absent from older bundles.
    ort: OrtInfo | None = None
    # How each part's weights are stored ({"head": {...}, "tail": {...}}: dtype, bits, block,
    # symmetric, quantiser, bytes; see edgeoffload.split.weights) and, for quantised
    # weights, the measured quality against the fp32 model (edgeoffload.split.quality).
    # Informational: the parts' sha256 already pin what runs. Absent from older bundles.
    weights: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)

    @property
    def identity(self) -> str:
        """Model hash + cut: what the wire protocol binds into its handshake."""
        return f"{self.source_sha256}:{self.cut_id}"

    @property
    def version(self) -> str:
        """Short hash over the identity, codec and part hashes: equal iff parts pair."""
        parts = [
            self.identity,
            self.codec,
            self.head.sha256 if self.head else "-",
            self.tail.sha256 if self.tail else "-",
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        data = {
            "schema_version": self.schema_version,
            "created_by": self.created_by,
            "source": {"name": self.source_name, "sha256": self.source_sha256},
            "dims": dict(self.dims),
            "cut": {"id": self.cut_id, "after": self.cut_after},
            "crossing": [t.to_dict() for t in self.crossing],
            "passthrough": list(self.passthrough),
            "graph_inputs": [t.to_dict() for t in self.graph_inputs],
            "graph_outputs": [t.to_dict() for t in self.graph_outputs],
            "head": self.head.to_dict() if self.head else None,
            "tail": self.tail.to_dict() if self.tail else None,
            "codec": self.codec,
            "state": [dict(s) for s in self.state],
            "files": dict(self.files),
            "predicted": self.predicted,
            "verification": self.verification,
        }
        if self.ort is not None:  # only when exported: older manifests stay byte for byte
            data["ort"] = self.ort.to_dict()
        if self.weights:
            data["weights"] = self.weights
        if self.quality:
            data["quality"] = self.quality
        return data

    @classmethod
    def from_dict(cls, data: object) -> Manifest:
        f = fields(data, "manifest", ManifestError)
        version = f.integer("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema version {version} is not supported (this is {SCHEMA_VERSION})",
                hint="re-split the model with this edgeoffload version",
            )
        source = fields(f.obj("source"), "manifest source", ManifestError)
        cut = fields(f.obj("cut"), "manifest cut", ManifestError)
        head_raw = f.value("head")
        tail_raw = f.value("tail")
        dims = f.obj("dims", {})
        if not all(type(v) is int and v >= 0 for v in dims.values()):
            raise ManifestError("manifest dims must map names to integers >= 0")
        state = tuple(_state_entry(s) for s in f.array("state", []))
        files = f.obj("files", {})
        for rel, digest in files.items():
            if not isinstance(digest, str) or not safe_relative(rel):
                raise ManifestError(f"manifest files entry {rel!r} is not a safe relative path")
        ort_raw = f.obj("ort", {})
        has_ort = isinstance(data, Mapping) and "ort" in data
        passthrough = f.array("passthrough")
        if not all(isinstance(p, str) for p in passthrough):
            raise ManifestError("manifest passthrough must list tensor names (strings)")
        manifest = cls(
            schema_version=version,
            created_by=f.text("created_by", ""),
            source_name=source.text("name"),
            source_sha256=source.text("sha256"),
            dims=dims,
            cut_id=cut.text("id"),
            cut_after=cut.text("after"),
            crossing=_specs(f.array("crossing")),
            passthrough=tuple(passthrough),
            graph_inputs=_specs(f.array("graph_inputs")),
            graph_outputs=_specs(f.array("graph_outputs")),
            head=PartInfo.from_dict(head_raw) if head_raw is not None else None,
            tail=PartInfo.from_dict(tail_raw) if tail_raw is not None else None,
            codec=f.text("codec"),
            state=state,
            files=files,
            predicted=f.obj("predicted", {}),
            verification=f.obj("verification", {}),
            ort=OrtInfo.from_dict(ort_raw) if has_ort else None,
            weights=f.obj("weights", {}),
            quality=f.obj("quality", {}),
        )
        source.done()
        cut.done()
        f.done()
        if manifest.head is None and manifest.tail is None:
            raise ManifestError("manifest has neither a head nor a tail")
        crossing = {t.name for t in manifest.crossing}
        stray = [p for p in manifest.passthrough if p not in crossing]
        if stray:
            raise ManifestError(f"manifest passthrough names non-crossing tensor(s) {stray}")
        if manifest.ort is not None:
            _check_ort(manifest, manifest.ort)
        stray_parts = sorted(set(manifest.weights) - {"head", "tail"})
        if stray_parts:
            raise ManifestError(f"manifest weights names unknown part(s) {stray_parts}")
        return manifest


def _check_ort(manifest: Manifest, ort: OrtInfo) -> None:
    """Each .ort part must be the conversion of this manifest's .onnx part, under its own name."""
    for what, part, converted in (
        ("head", manifest.head, ort.head),
        ("tail", manifest.tail, ort.tail),
    ):
        if converted is None:
            continue
        if part is None:
            raise ManifestError(f"manifest ort section has a {what} but the bundle has none")
        if not converted.file.endswith(".ort"):  # onnxruntime tells the format by the suffix
            raise ManifestError(f"manifest ort {what} file {converted.file!r} must end in .ort")
        if converted.converted_from != part.sha256:
            raise ManifestError(
                f"{converted.file} was converted from another {part.file} than this bundle's",
                hint="re-run: edgeoffload export-ort BUNDLE",
            )
    names = [f.file for f in ort.files()]
    taken = {p.file for p in (manifest.head, manifest.tail) if p} | set(manifest.files)
    if len(set(names)) != len(names) or taken & set(names) or "manifest.json" in names:
        raise ManifestError(f"manifest ort files {names} collide with other bundle files")


def check_pair(device: Manifest, server: Manifest) -> None:
    """Refuse to pair parts from different bundles; the error names both versions."""
    if device.version != server.version:
        raise VersionMismatch(
            f"device bundle {device.version} ({device.identity}) does not match server bundle "
            f"{server.version} ({server.identity})",
            hint="deploy the same bundle (same edgeoffload split output) on both sides",
        )
