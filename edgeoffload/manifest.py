"""The bundle manifest: what a device and a server must agree on about a split model.

A frozen dataclass with a strict ``from_dict`` (unknown or missing fields are a ManifestError)
and ``to_dict``; :attr:`Manifest.version` is a hash over the model, the cut, the codec and every
part's sha256. Two sides (device, server) pair only when their manifests have the same version,
otherwise :func:`check_pair` raises VersionMismatch naming both. Stdlib only.
"""

from __future__ import annotations

import hashlib
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
        return {
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
        return manifest


def check_pair(device: Manifest, server: Manifest) -> None:
    """Refuse to pair parts from different bundles; the error names both versions."""
    if device.version != server.version:
        raise VersionMismatch(
            f"device bundle {device.version} ({device.identity}) does not match server bundle "
            f"{server.version} ({server.identity})",
            hint="deploy the same bundle (same edgeoffload split output) on both sides",
        )
