"""Signed bundles: publisher identities (Ed25519), ``sign_bundle`` and ``verify_bundle``.

A publisher (whoever builds and ships bundles) owns an Ed25519 key pair in a key directory::

    DIR/              mode 0700
      publisher.key   mode 0600, "ed25519-private:" + base64url(32-byte seed) + "\\n"
      publisher.pub   mode 0644, "ed25519:" + base64url(32-byte public key) + "\\n"

(the same directory may also hold a device/server identity, ``private.key``/``public.key``).
``publisher.key`` is loaded under the same checks as identity keys (:mod:`edgeoffload.keys`):
a regular file, not a symlink, owned by this user, mode 0600 or stricter.

:func:`sign_bundle` writes ``signature.json`` beside ``manifest.json``: an Ed25519 signature
over the exact bytes of the manifest file, which pins every part (``.onnx``, ``.ort``, other
files) by sha256. :func:`verify_bundle` (and ``load_bundle(..., trusted=keys)``) accepts a
bundle only when, in this order, the signature is by a trusted key and verifies over the current
manifest bytes, and then every part matches its hash. What failed is a typed error
(:class:`~edgeoffload.errors.SignatureError`, exit code 5): ``Unsigned``, ``UnknownPublisher``
(naming the key's fingerprint) or ``BadSignature``; a part changed after signing is the
ManifestError of its hash check.

Anything that rewrites the manifest invalidates the signature: ``edgeoffload export-ort`` adds
the ``ort`` section, a re-split writes a new manifest. Both go through
:func:`edgeoffload.bundle.write_manifest`, which removes ``signature.json`` (with a warning), so
sign a bundle last: split, export-ort, then sign. ``signed_at`` is informational only: it is not
covered by the signature.

:func:`check_signature` is the signature half alone, over manifest bytes the caller already
read (e.g. a device checking a downloaded update before it trusts the manifest's contents).

A trust list (:func:`load_trusted`) is a file of publisher public keys, one per line
(``ed25519:<43 chars> [comment]``, ``#`` comment lines), or a folder of ``*.pub`` files. It
fails closed: any malformed line is an error, never skipped.

Stdlib + ``cryptography`` only (devices verify bundles too).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeoffload._signature import (
    PUBLISHER_PREFIX,
    PUBLISHER_PRIVATE_PREFIX,
    SIGNATURE,
    URLSAFE_43,
    Signature,
    b64url,
    b64url_exact,
    check_signature,
    check_trusted,
    decode_publisher_public,
    encode_publisher_public,
    publisher_fingerprint,
    read_signature,
    signature_holds,
)
from edgeoffload.bundle import MANIFEST, Bundle, load_bundle, sha256_bytes
from edgeoffload.errors import ManifestError, UsageError
from edgeoffload.keys import (
    _check_private_key_fd,
    _fsync_dir,
    _open_private_key,
    _read_key_file,
    _write_file_atomic,
    check_key_bytes,
    read_small_text,
)

__all__ = [
    "PUBLISHER_PREFIX",
    "PUBLISHER_PRIVATE_FILE",
    "PUBLISHER_PUBLIC_FILE",
    "SIGNATURE",
    "PublisherKey",
    "Signature",
    "check_signature",
    "decode_publisher_public",
    "encode_publisher_public",
    "generate_publisher",
    "load_publisher",
    "load_trusted",
    "publisher_fingerprint",
    "read_signature",
    "sign_bundle",
    "signature_holds",
    "verified_bundle",
    "verify_bundle",
]

log = logging.getLogger("edgeoffload.signing")

PUBLISHER_PRIVATE_FILE = "publisher.key"
PUBLISHER_PUBLIC_FILE = "publisher.pub"
_KEYGEN_HINT = "create one with: edgeoffload keys generate --publisher {directory}"
_TRUST_LINE_HINT = (
    "one key per line: 'ed25519:<43 base64url chars> [comment]'; '#' starts a comment line"
)


def _public_of(private: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


@dataclass(frozen=True, repr=False)
class PublisherKey:
    """An Ed25519 publisher key pair as raw 32-byte keys (the private half is the seed).

    Checked when built (both halves 32 bytes, the public half derived from the private one);
    ``repr`` shows the fingerprint only.
    """

    private: bytes
    public: bytes

    def __post_init__(self) -> None:
        private = check_key_bytes(self.private, "Ed25519 private key")
        public = check_key_bytes(self.public, "Ed25519 public key")
        if _public_of(private) != public:
            raise UsageError(
                "the publisher public key does not belong to the private key",
                hint="build the pair with PublisherKey.from_private(private)",
            )
        object.__setattr__(self, "private", private)
        object.__setattr__(self, "public", public)

    @classmethod
    def from_private(cls, private: bytes) -> PublisherKey:
        raw = check_key_bytes(private, "Ed25519 private key")
        return cls(private=raw, public=_public_of(raw))

    @classmethod
    def generate(cls) -> PublisherKey:
        """A fresh random publisher key held in memory only (see :func:`generate_publisher`)."""
        return cls.from_private(Ed25519PrivateKey.generate().private_bytes_raw())

    @property
    def fingerprint(self) -> str:
        return publisher_fingerprint(self.public)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return Ed25519PrivateKey.from_private_bytes(self.private).sign(data)

    def __repr__(self) -> str:
        return f"PublisherKey(fingerprint={self.fingerprint!r})"


# --------------------------------------------------------------------------- key files


def generate_publisher(directory: str | Path, *, overwrite: bool = False) -> PublisherKey:
    """Create a publisher key pair in ``directory`` (made 0700 if new) and return it.

    Writes ``publisher.key`` (mode 0600 from the start) and ``publisher.pub`` (0644).

    Raises:
        UsageError: ``publisher.key`` exists and ``overwrite`` is False, or the directory
            cannot be written.
    """
    d = Path(directory)
    private_path = d / PUBLISHER_PRIVATE_FILE
    exists = UsageError(
        f"{private_path} already exists; refusing to replace a publisher key",
        hint="pass --force (overwrite=True) to replace it; bundles it signed will then be "
        "refused wherever only the new key is trusted",
    )
    try:
        if not d.exists():
            d.mkdir(mode=0o700, parents=True)
            d.chmod(0o700)  # mkdir's mode is filtered by the umask
        elif not d.is_dir():
            raise UsageError(f"{d} exists and is not a directory", hint="choose a key directory")
        if (private_path.exists() or private_path.is_symlink()) and not overwrite:
            raise exists
        key = PublisherKey.generate()
        private_text = f"{PUBLISHER_PRIVATE_PREFIX}{b64url(key.private)}\n".encode("ascii")
        public_text = f"{encode_publisher_public(key.public)}\n".encode("ascii")
        try:
            _write_file_atomic(private_path, private_text, mode=0o600, clobber=overwrite)
        except FileExistsError:
            raise exists from None
        _write_file_atomic(d / PUBLISHER_PUBLIC_FILE, public_text, mode=0o644, clobber=True)
        _fsync_dir(d)
    except OSError as exc:
        raise UsageError(
            f"cannot write keys to {d}: {exc.strerror or exc}",
            hint="check that the directory is writable by this user",
        ) from exc
    log.info("generated publisher key %s in %s", key.fingerprint, d)
    return key


def load_publisher(directory: str | Path) -> PublisherKey:
    """Load the publisher key written by :func:`generate_publisher`.

    ``publisher.key`` must be a regular file (not a symlink), owned by this user, mode 0600 or
    stricter, checked on the descriptor it is read from (see
    :func:`edgeoffload.keys.load_identity`). A ``publisher.pub`` beside it must match.

    Raises:
        UsageError: what is wrong with the directory or the key files; the hint says what to do.
    """
    d = Path(directory)
    hint = _KEYGEN_HINT.format(directory=d)
    if not d.exists():
        raise UsageError(f"key directory {d} does not exist", hint=hint)
    if not d.is_dir():
        raise UsageError(f"{d} is not a key directory", hint=hint)
    private_path = d / PUBLISHER_PRIVATE_FILE
    fd = _open_private_key(private_path, hint)
    try:
        _check_private_key_fd(private_path, fd)
        text = read_small_text(private_path, fd)
    finally:
        os.close(fd)
    s = text.strip()
    raw = None
    if s.startswith(PUBLISHER_PRIVATE_PREFIX):
        raw = b64url_exact(s[len(PUBLISHER_PRIVATE_PREFIX) :], URLSAFE_43, 32)
    if raw is None:
        raise UsageError(  # never echo the contents
            f"{private_path} is not a valid publisher key file",
            hint="expected 'ed25519-private:' followed by 43 base64url characters; "
            + hint
            + " --force",
        )
    key = PublisherKey.from_private(raw)
    public_path = d / PUBLISHER_PUBLIC_FILE
    if public_path.exists():
        try:
            stored = decode_publisher_public(_read_key_file(public_path))
        except UsageError as exc:
            raise UsageError(
                f"{public_path} is not a valid publisher public key: {exc.message}",
                hint=f"if {PUBLISHER_PRIVATE_FILE} is the right key, delete {public_path} "
                "(it is derived from it)",
            ) from None
        if stored != key.public:
            raise UsageError(
                f"{public_path} (key {publisher_fingerprint(stored)}) does not match "
                f"{private_path} (key {key.fingerprint})",
                hint=f"if {PUBLISHER_PRIVATE_FILE} is the right key, delete {public_path}; "
                "otherwise restore the matching publisher.key",
            )
    return key


def _parse_trust_text(text: str, source: Path) -> list[bytes]:
    keys: list[bytes] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        try:
            keys.append(decode_publisher_public(s.split(None, 1)[0]))
        except UsageError as exc:
            raise UsageError(f"{source}:{lineno}: {exc.message}", hint=_TRUST_LINE_HINT) from None
    return keys


def load_trusted(path: str | Path) -> tuple[bytes, ...]:
    """Trusted publisher public keys from a file (one per line) or a folder of ``*.pub`` files.

    A line is ``ed25519:<43 base64url chars>`` optionally followed by a comment; blank lines
    and lines starting with ``#`` are ignored. In a folder every ``*.pub`` file is read that
    way (a publisher key directory works: its ``publisher.pub``). Duplicates are dropped,
    order is kept. An empty result is allowed and trusts nothing.

    Raises:
        UsageError: the path does not exist or cannot be read, or any line is malformed
            (fail closed: a bad line is never skipped); the message names file and line.
    """
    p = Path(path)
    if not p.exists():
        raise UsageError(
            f"trusted publishers {p} does not exist",
            hint="give a file of publisher public keys or a folder of *.pub files",
        )
    files = sorted(q for q in p.iterdir() if q.name.endswith(".pub")) if p.is_dir() else [p]
    keys: list[bytes] = []
    for file in files:
        if file.is_dir():
            raise UsageError(f"{file} is a directory, not a publisher public key file")
        for key in _parse_trust_text(_read_key_file(file), file):
            if key not in keys:
                keys.append(key)
    return tuple(keys)


# --------------------------------------------------------------------------- sign and verify


def _utc_iso(now: float) -> str:
    return datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sign_bundle(
    bundle_dir: str | Path, key: PublisherKey, *, now: float | None = None
) -> dict[str, Any]:
    """Sign a bundle's ``manifest.json`` with ``key``; writes ``signature.json``, returns it.

    The bundle is loaded and every part's hash verified first: a bundle whose parts do not
    match its manifest is refused (ManifestError), not signed. An existing signature is
    replaced. The file is written atomically (temp file + ``os.replace``).

    Sign last: ``export-ort`` and a re-split rewrite the manifest and remove the signature.

    Args:
        bundle_dir: the bundle folder.
        key: the publisher key (:func:`load_publisher`).
        now: the signing time (Unix seconds) recorded as ``signed_at``; default: the clock.

    Raises:
        ManifestError: the bundle does not load and verify, or its manifest changed while it
            was being signed.
    """
    if not isinstance(key, PublisherKey):
        raise UsageError(
            f"sign_bundle needs a PublisherKey, not {type(key).__name__}",
            hint="load one with edgeoffload.signing.load_publisher(DIR)",
        )
    folder = Path(bundle_dir)
    manifest_path = folder / MANIFEST
    try:
        before = manifest_path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(
            f"{folder}: no {MANIFEST}; not a bundle",
            hint="create one with: edgeoffload split MODEL -o DIR",
        ) from None
    except OSError as exc:
        raise ManifestError(f"{manifest_path}: unreadable manifest ({exc})") from None
    load_bundle(folder)  # every part matches the manifest, or nothing is signed
    if manifest_path.read_bytes() != before:
        raise ManifestError(
            f"{manifest_path} changed while the bundle was being signed", hint="sign it again"
        )
    signature = Signature(
        publisher=key.public,
        signed=sha256_bytes(before),
        signature=key.sign(before),
        signed_at=_utc_iso(time.time() if now is None else now),
    )
    document = signature.to_dict()
    tmp = folder / f".{SIGNATURE}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(document, indent=1) + "\n")
        os.replace(tmp, folder / SIGNATURE)
    except OSError as exc:
        raise ManifestError(f"cannot write {folder / SIGNATURE}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    log.info("signed %s as publisher %s", folder, key.fingerprint)
    return document


def verify_bundle(bundle_dir: str | Path, trusted: Sequence[bytes]) -> bytes:
    """Check a bundle's signature, then its parts; return the publisher key that signed it.

    In this order: ``signature.json`` exists and is well-formed, its publisher is one of
    ``trusted``, its signature verifies over the current ``manifest.json`` bytes; then every
    part's sha256 matches the (signed) manifest. Same as ``load_bundle(bundle_dir,
    trusted=trusted).publisher``.

    Raises:
        Unsigned: no ``signature.json``.
        UnknownPublisher: signed by a key not in ``trusted``; the message names its fingerprint.
        BadSignature: malformed ``signature.json``, or the manifest was modified after signing.
        ManifestError: a part was modified after signing (its hash), or a malformed manifest.
    """
    publisher = verified_bundle(bundle_dir, trusted).publisher
    if publisher is None:  # pragma: no cover - load_bundle(trusted=...) sets it or raises
        raise ManifestError(f"{bundle_dir}: the signature was not checked")
    return publisher


def verified_bundle(bundle_dir: str | Path, trusted: Sequence[bytes]) -> Bundle:
    """:func:`verify_bundle` returning the loaded :class:`~edgeoffload.bundle.Bundle`
    (its ``publisher`` is the key that signed it)."""
    return load_bundle(bundle_dir, trusted=check_trusted(trusted))
