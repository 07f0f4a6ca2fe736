"""Bundles: a folder with ``manifest.json``, ``head.onnx`` and ``tail.onnx``, pinned by hashes.

``edgeoffload export-ort`` may add ORT-format copies (``head.ort``, ``tail.ort``) and
``required_operators.config``, pinned in the manifest's ``ort`` section and verified the same way.
``edgeoffload sign`` may add ``signature.json``: a publisher's Ed25519 signature over the exact
``manifest.json`` bytes (:mod:`edgeoffload.signing`). ``load_bundle(..., trusted=keys)`` accepts
only a bundle signed by one of ``keys``. Rewriting the manifest (:func:`write_manifest`: a
re-split into the folder, ``export-ort``) removes a signature file, which it would make stale.

Stdlib only, so the device can load and verify a bundle without onnx or torch. Loading
verifies the sha256 of every part against the manifest (:mod:`edgeoffload.manifest`); a
mismatch is a ManifestError that names the file and both hashes. This is the project's one
place that hashes files (:func:`sha256_file`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeoffload._signature import SIGNATURE, check_signature
from edgeoffload.errors import ManifestError, UsageError
from edgeoffload.manifest import Manifest, OrtFile, PartInfo

MANIFEST = "manifest.json"
HEAD = "head.onnx"
TAIL = "tail.onnx"
HEAD_ORT = "head.ort"
TAIL_ORT = "tail.ort"
ORT_CONFIG = "required_operators.config"
# Which encoding of a part to load: the .ort when exported ("auto"), always .onnx, or the .ort.
MODEL_FORMATS = ("auto", "onnx", "ort")

log = logging.getLogger("edgeoffload.bundle")


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data`` (how the manifest names every part)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A loaded, hash-verified bundle folder.

    ``publisher`` is the Ed25519 key that signed it when it was loaded with ``trusted`` keys
    (the signature checked), else None (a signature file, if any, was not looked at).
    """

    path: Path
    manifest: Manifest
    publisher: bytes | None = None

    @property
    def head_path(self) -> Path | None:
        return self.path / self.manifest.head.file if self.manifest.head else None

    @property
    def tail_path(self) -> Path | None:
        return self.path / self.manifest.tail.file if self.manifest.tail else None

    def part_path(self, part: str, model_format: str = "onnx") -> Path | None:
        """The file to load for ``part`` ("head" or "tail") in ``model_format`` (MODEL_FORMATS).

        None when the bundle has no such part. "auto" picks the ``.ort`` when the manifest
        lists one; "ort" requires it (a ManifestError names the command that writes it).
        """
        if model_format not in MODEL_FORMATS:
            raise UsageError(f"model format {model_format!r} is not one of {MODEL_FORMATS}")
        info: PartInfo | None = getattr(self.manifest, part)
        if info is None:
            return None
        ort: OrtFile | None = getattr(self.manifest.ort, part) if self.manifest.ort else None
        if model_format == "ort" and ort is None:
            raise ManifestError(
                f"{self.path}: the bundle has no ORT-format {part}",
                hint=f"write one with: edgeoffload export-ort {self.path}",
            )
        if model_format != "onnx" and ort is not None:
            return self.path / ort.file
        return self.path / info.file


def write_manifest(directory: Path, manifest: Manifest) -> bool:
    """Replace ``manifest.json`` atomically (a folder with a manifest is whole).

    A ``signature.json`` in the folder is removed first: it signs the old manifest's bytes,
    so it would be refused anyway (BadSignature); the bundle must be signed again.

    Returns:
        Whether a signature file was removed.
    """
    dropped = False
    with contextlib.suppress(FileNotFoundError):
        (directory / SIGNATURE).unlink()
        dropped = True
        log.warning(
            "%s: removed %s: it signed the manifest being replaced; sign the bundle again "
            "with: edgeoffload sign %s --key PUBLISHER_DIR",
            directory,
            SIGNATURE,
            directory,
        )
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=1) + "\n")
    os.replace(tmp, directory / MANIFEST)
    return dropped


def write_bundle(
    directory: str | Path,
    manifest: Manifest,
    *,
    head: bytes | None,
    tail: bytes | None,
) -> Bundle:
    """Write the parts and the manifest (last, atomically: a folder with a manifest is whole)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for rel, digest in manifest.files.items():
        if not (directory / rel).is_file() or sha256_file(directory / rel) != digest:
            raise ManifestError(f"{rel}: copy the file into the bundle before writing it")
    for part, data in ((manifest.head, head), (manifest.tail, tail)):
        if (part is None) != (data is None):
            raise ManifestError("bundle parts and manifest disagree about which parts exist")
        if part is not None and data is not None:
            if hashlib.sha256(data).hexdigest() != part.sha256:
                raise ManifestError(f"{part.file}: bytes do not match the manifest hash")
            (directory / part.file).write_bytes(data)
    names = {p.file for p in (manifest.head, manifest.tail) if p}
    names |= {f.file for f in manifest.ort.files()} if manifest.ort else set()
    for stale in (HEAD, TAIL, HEAD_ORT, TAIL_ORT, ORT_CONFIG):  # e.g. a re-split into the folder
        if stale not in names and (directory / stale).exists():
            (directory / stale).unlink()
    write_manifest(directory, manifest)
    return Bundle(directory, manifest)


def load_bundle(
    directory: str | Path, *, verify: bool = True, trusted: Sequence[bytes] | None = None
) -> Bundle:
    """Read a bundle and verify every part's sha256 against the manifest.

    Args:
        directory: the bundle folder.
        verify: check every part's sha256 (False: trust the files, e.g. just written).
        trusted: publisher public keys (32-byte Ed25519, see
            :func:`edgeoffload.signing.load_trusted`). When given, even empty (then nothing is
            trusted and every bundle is refused), the bundle must carry a signature by one of
            them over the manifest bytes read here; it is checked before the manifest is
            parsed and before the part hashes (also with ``verify=False``).

    Raises:
        ManifestError: malformed manifest, missing or modified part.
        SignatureError: (with ``trusted``) Unsigned, UnknownPublisher or BadSignature.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        raise ManifestError(f"{directory}: not a bundle folder (no such directory)")
    try:
        raw = manifest_path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(
            f"{directory}: no {MANIFEST}; not a bundle",
            hint="create one with: edgeoffload split MODEL -o DIR",
        ) from None
    except OSError as exc:
        raise ManifestError(f"{manifest_path}: unreadable manifest ({exc})") from None
    # The signature is checked over the very bytes that are parsed next (no re-read between).
    publisher = check_signature(directory, raw, trusted) if trusted is not None else None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{manifest_path}: unreadable manifest ({exc})") from None
    manifest = Manifest.from_dict(data)
    if verify:
        for part in (manifest.head, manifest.tail):
            if part is None:
                continue
            path = directory / part.file
            if not path.is_file():
                raise ManifestError(f"{path}: part listed in the manifest is missing")
            actual = sha256_file(path)
            if actual != part.sha256:
                raise ManifestError(
                    f"{path.name} was modified after splitting: sha256 {actual[:16]}… "
                    f"!= manifest {part.sha256[:16]}…",
                    hint="re-split the model, or restore the original file",
                )
        for rel, digest in manifest.files.items():
            path = directory / rel
            if not path.is_file():
                raise ManifestError(f"{path}: file listed in the manifest is missing")
            if sha256_file(path) != digest:
                raise ManifestError(
                    f"{rel} was modified after splitting",
                    hint="re-split the model, or restore the original file",
                )
        for entry in manifest.ort.files() if manifest.ort else ():
            path = directory / entry.file
            if not path.is_file():
                raise ManifestError(
                    f"{path}: ORT-format file listed in the manifest is missing",
                    hint=f"re-run: edgeoffload export-ort {directory}",
                )
            actual = sha256_file(path)
            if actual != entry.sha256:
                raise ManifestError(
                    f"{entry.file} was modified after export-ort: sha256 {actual[:16]}… "
                    f"!= manifest {entry.sha256[:16]}…",
                    hint=f"re-run: edgeoffload export-ort {directory}",
                )
    return Bundle(directory, manifest, publisher)
