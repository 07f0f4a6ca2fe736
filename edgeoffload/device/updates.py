"""Devices that update their head (PROTOCOL.md §16): a store of bundle versions, a downloader.

A server that knows §16 tells a device on version ``v`` that it serves a newer version of the
same model (:class:`~edgeoffload.protocol.updates.UpdateOffer`, in the welcome or a ``status``
reply). With ``update="auto"`` the client (:class:`~edgeoffload.device.client.OffloadClient`)
downloads that version's ``manifest.json``, ``signature.json`` and head part over the
encrypted connection with :class:`Updater`, and switches to it at a request boundary.

What the device accepts is decided here, never by the server:

* the manifest is the offered version (its ``version`` and ``identity`` are the offer's) of a
  model the app can still call: the same graph inputs and outputs as the version it runs;
* the manifest carries a valid signature by one of ``trusted_publishers``, checked *before*
  the head is downloaded (``trust_unsigned=True`` accepts unsigned bundles, hashes only; a
  bundle signed by an unknown key is refused either way);
* every downloaded part matches the manifest's sha256 (a flipped byte or a truncated file is
  :class:`UpdateCorrupt`; the partial file is discarded).

Downloads are chunked (each ``fetch`` asks for at most ``chunk_bytes``) and resumable: the
pieces go to ``root/.partial/<version>/`` and a download that was cut off continues from the
partial file's size. A complete, verified version is renamed into ``root/<version>/`` (one
``rename``: a version folder is whole or absent), and ``root/current`` names the version in use
(written to a temporary file and ``os.replace``-d). A device bundle holds no tail: the tail
stays on the server, so a switched device has no local fallback (its runtime says
``has_tail = False``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from edgeoffload.bundle import MANIFEST, Bundle, sha256_file
from edgeoffload.errors import EdgeOffloadError, ManifestError, UsageError
from edgeoffload.manifest import Manifest
from edgeoffload.protocol.updates import MAX_FETCH, FetchRefused, UpdateOffer
from edgeoffload.signing import SIGNATURE, check_signature

log = logging.getLogger("edgeoffload.device.updates")

UPDATE_POLICIES = ("pinned", "notify", "auto")
CURRENT = "current"
PARTIAL = ".partial"
DEFAULT_CHUNK = 256 << 10  # bytes per fetch (bounded by MAX_FETCH and the receive limit)
MAX_MANIFEST_BYTES = 16 << 20
MAX_SIGNATURE_BYTES = 16 << 10
MAX_PART_BYTES = 8 << 30  # a head larger than this is refused before it is downloaded

# fetch(version, file, offset, length) -> (data, file size): one ``fetch`` round trip
Fetch = Callable[[str, str, int, int], Awaitable[tuple[bytes, int]]]


class UpdateError(EdgeOffloadError):
    """An update could not be downloaded or was refused; the device stays on its version
    and tries again later (bounded back-off)."""

    exit_code = 5


class UpdateCorrupt(UpdateError):
    """A downloaded file does not match the manifest's sha256 (tampered or truncated)."""


class UpdateRefused(UpdateError):
    """The offer, the new manifest or the server's answers are not acceptable: another
    version or model than offered, other graph inputs or outputs, a file the server would not
    serve, a file that changed size while it was downloaded."""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def check_trust(trusted: Sequence[bytes] | None, trust_unsigned: bool) -> tuple[bytes, ...]:
    """The trusted publisher keys an updating device needs (UsageError without any, unless
    ``trust_unsigned``)."""
    keys = tuple(trusted or ())
    if not keys and not trust_unsigned:
        raise UsageError(
            "a device that installs updates needs trusted publisher keys",
            hint="pass trusted_publishers=edgeoffload.signing.load_trusted(PATH), or "
            "trust_unsigned=True to accept bundles checked by hash only",
        )
    return keys


def same_interface(old: Manifest, new: Manifest) -> bool:
    """Whether an app written for ``old`` can call ``new``: same graph inputs and outputs."""
    return [t.to_dict() for t in old.graph_inputs] == [t.to_dict() for t in new.graph_inputs] and [
        t.to_dict() for t in old.graph_outputs
    ] == [t.to_dict() for t in new.graph_outputs]


def head_files(manifest: Manifest) -> list[tuple[str, str]]:
    """(file, sha256) of what a device needs of a bundle: the head and its ORT-format copy."""
    if manifest.head is None:
        return []
    files = [(manifest.head.file, manifest.head.sha256)]
    if manifest.ort is not None and manifest.ort.head is not None:
        files.append((manifest.ort.head.file, manifest.ort.head.sha256))
    return files


def verify_device_bundle(
    folder: Path, trusted: Sequence[bytes], *, trust_unsigned: bool = False
) -> Bundle:
    """Load a device bundle folder (manifest, signature, head; no tail), checking the
    signature against ``trusted`` and every head file's sha256."""
    try:
        raw = (folder / MANIFEST).read_bytes()
        manifest = Manifest.from_dict(json.loads(raw))
    except FileNotFoundError:
        raise ManifestError(f"{folder}: no {MANIFEST}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{folder / MANIFEST}: unreadable manifest ({exc})") from None
    publisher = None
    if not (trust_unsigned and not (folder / SIGNATURE).exists()):
        publisher = check_signature(folder, raw, trusted)
    if manifest.head is None:
        raise UpdateRefused(f"{folder}: the bundle has no head for the device")
    for name, digest in head_files(manifest):
        path = folder / name
        if not path.is_file():
            raise UpdateCorrupt(f"{path}: part listed in the manifest is missing")
        if sha256_file(path) != digest:
            raise UpdateCorrupt(f"{path.name} does not match the manifest's sha256")
    for rel, digest in manifest.files.items():  # copied from the previous version, if at all
        path = folder / rel
        if path.is_file() and sha256_file(path) != digest:
            raise UpdateCorrupt(f"{rel} does not match the manifest's sha256")
    return Bundle(folder, manifest, publisher)


class BundleStore:
    """``root/<version>/`` device bundle folders, ``root/current`` and ``root/.partial/``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, version: str) -> Path:
        if not version or not all(c in "0123456789abcdef" for c in version):
            raise UpdateRefused(f"{version!r} is not a bundle version (hex digits)")
        return self.root / version

    def partial(self, version: str) -> Path:
        return self.root / PARTIAL / self.path(version).name

    def versions(self) -> list[str]:
        """The complete versions in the store."""
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()
        )

    def current(self) -> str | None:
        try:
            version = (self.root / CURRENT).read_text().strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        return version if version in self.versions() else None

    def set_current(self, version: str) -> None:
        self.path(version)  # a version name, never a path
        _write_atomic(self.root / CURRENT, version.encode() + b"\n")

    def install(self, version: str) -> Path:
        """Move a complete download into place (one rename) and return its folder."""
        final, partial = self.path(version), self.partial(version)
        if final.exists():
            shutil.rmtree(partial, ignore_errors=True)
            return final
        os.replace(partial, final)
        _fsync_dir(self.root)
        return final

    def discard(self, version: str) -> None:
        shutil.rmtree(self.partial(version), ignore_errors=True)

    def cleanup(self, keep: Sequence[str]) -> list[str]:
        """Delete every version (and partial download) not in ``keep``; the ones deleted."""
        removed = []
        for version in self.versions():
            if version not in keep:
                shutil.rmtree(self.root / version, ignore_errors=True)
                removed.append(version)
        partial_root = self.root / PARTIAL
        if partial_root.is_dir():
            for p in partial_root.iterdir():
                if p.name not in keep:
                    shutil.rmtree(p, ignore_errors=True)
        return removed


def _copy_same_files(current: Bundle, manifest: Manifest, dest: Path) -> None:
    """Copy the files of ``manifest.files`` that ``current`` has with the same sha256."""
    for rel, digest in manifest.files.items():
        src = current.path / rel
        same = current.manifest.files.get(rel) == digest and src.is_file()
        if same and sha256_file(src) == digest:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / rel)
            continue
        log.warning("update %s: %s is not on the device and is not fetched", manifest.version, rel)


class Updater:
    """Download and verify one offered version into a :class:`BundleStore` (see the module
    docstring); ``chunk_bytes`` bounds every fetch."""

    def __init__(
        self,
        store: BundleStore,
        *,
        trusted: Sequence[bytes],
        trust_unsigned: bool = False,
        chunk_bytes: int = DEFAULT_CHUNK,
    ) -> None:
        if not 1 <= chunk_bytes <= MAX_FETCH:
            raise UsageError(f"chunk_bytes must be in 1..{MAX_FETCH}, not {chunk_bytes}")
        self.store = store
        self.trusted = tuple(trusted)
        self.trust_unsigned = trust_unsigned
        self.chunk_bytes = chunk_bytes
        self.fetched_bytes = 0  # over every download (tests and logs: resumption)

    async def _whole(self, fetch: Fetch, version: str, name: str, limit: int) -> bytes:
        data = bytearray()
        size: int | None = None
        while size is None or len(data) < size:
            piece, total = await fetch(version, name, len(data), self.chunk_bytes)
            self.fetched_bytes += len(piece)
            if total > limit:
                raise UpdateRefused(f"{name} of version {version} is {total} bytes (> {limit})")
            if size is not None and total != size:
                raise UpdateRefused(f"{name} changed size while it was downloaded")
            size = total
            if not piece and len(data) < size:
                raise UpdateRefused(f"the server sent no data for {name}")
            data += piece
        return bytes(data)

    async def _part(self, fetch: Fetch, version: str, name: str, digest: str, dest: Path) -> None:
        """Download ``name`` into ``dest``, continuing a partial file; verify its sha256."""
        have = dest.stat().st_size if dest.exists() else 0
        size: int | None = None
        with dest.open("ab") as fh:
            while size is None or have < size:
                piece, total = await fetch(version, name, have, self.chunk_bytes)
                if size is None and total < have:  # the partial file is longer: start again
                    fh.truncate(0)
                    have = 0
                    continue
                if total > MAX_PART_BYTES:
                    raise UpdateRefused(f"{name} is {total} bytes (> {MAX_PART_BYTES})")
                if size is not None and total != size:
                    raise UpdateRefused(f"{name} changed size while it was downloaded")
                size = total
                if not piece and have < size:
                    raise UpdateRefused(f"the server sent no data for {name}")
                fh.write(piece)
                have += len(piece)
                self.fetched_bytes += len(piece)
            fh.flush()
            os.fsync(fh.fileno())
        if sha256_file(dest) != digest:
            dest.unlink(missing_ok=True)  # the next try downloads it afresh
            raise UpdateCorrupt(
                f"{name} of version {version} does not match the signed manifest's sha256 "
                "(tampered or truncated download): refused",
                hint="the device stays on its version; the download is retried later",
            )

    async def download(self, fetch: Fetch, offer: UpdateOffer, current: Bundle) -> Bundle:
        """Download, verify and install ``offer``; the installed bundle (not yet current).

        The bundle's other files (``manifest.files``, e.g. a decoder's ``tokenizer/``) are not
        fetchable: those the running bundle ``current`` has with the same sha256 are copied
        from it, the others are left out (and logged).

        Raises UpdateError (UpdateCorrupt, UpdateRefused), a SignatureError (Unsigned,
        UnknownPublisher, BadSignature), a ManifestError, or what ``fetch`` raises (a lost
        connection: the partial download stays and is continued next time).
        """
        version = offer.version
        final = self.store.path(version)
        if final.is_dir():  # installed earlier (e.g. by a run that stopped before switching)
            return verify_device_bundle(final, self.trusted, trust_unsigned=self.trust_unsigned)
        partial = self.store.partial(version)
        partial.mkdir(parents=True, exist_ok=True)
        try:
            raw = await self._whole(fetch, version, MANIFEST, MAX_MANIFEST_BYTES)
            try:
                manifest = Manifest.from_dict(json.loads(raw))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ManifestError(
                    f"the manifest of version {version} is not JSON ({exc})"
                ) from None
            if manifest.version != version or manifest.identity != offer.identity:
                raise UpdateRefused(
                    f"the server offered {offer.identity[:16]}…@{version} but its manifest is "
                    f"{manifest.identity[:16]}…@{manifest.version}"
                )
            if manifest.head is None or not same_interface(current.manifest, manifest):
                raise UpdateRefused(
                    f"version {version} has other graph inputs or outputs than "
                    f"{current.manifest.version} (or no head): an app cannot switch to it"
                )
            try:
                signature = await self._whole(fetch, version, SIGNATURE, MAX_SIGNATURE_BYTES)
            except FetchRefused as exc:  # the server has none
                log.info("version %s has no signature: %s", version, exc)
                signature = None
            (partial / SIGNATURE).unlink(missing_ok=True)
            if signature is not None:
                _write_atomic(partial / SIGNATURE, signature)
            old_manifest = partial / MANIFEST
            if old_manifest.is_file() and old_manifest.read_bytes() != raw:
                for name, _ in head_files(manifest):  # pieces of another manifest's parts
                    (partial / name).unlink(missing_ok=True)
            _write_atomic(old_manifest, raw)
            # The signature is checked before the head is downloaded: an unknown publisher
            # costs a manifest, not a model.
            if not (self.trust_unsigned and signature is None):
                check_signature(partial, raw, self.trusted)
            for name, digest in head_files(manifest):
                await self._part(fetch, version, name, digest, partial / name)
            _copy_same_files(current, manifest, partial)
            checked = verify_device_bundle(
                partial, self.trusted, trust_unsigned=self.trust_unsigned
            )
        except FetchRefused as exc:  # e.g. the version stopped serving: keep what we have
            raise UpdateRefused(f"update {version}: {exc.message}") from None
        except (UpdateCorrupt, UpdateRefused, ManifestError):
            # Refused for what it is (SignatureError is a ManifestError): start afresh later.
            self.store.discard(version)
            raise
        folder = self.store.install(version)
        log.info("update %s (%s #%d) downloaded and verified", version, offer.model, offer.number)
        return Bundle(folder, manifest, checked.publisher)
