"""The bundle signature file and its check, below :mod:`edgeoffload.bundle` so that
``load_bundle(..., trusted=...)`` can refuse a bundle before it parses the manifest.

The public API is :mod:`edgeoffload.signing` (publisher keys, ``sign_bundle``,
``verify_bundle``), which re-exports what is defined here. ``signature.json`` lies beside
``manifest.json``::

    {"schema": 1,
     "publisher": "ed25519:<43 base64url chars>",
     "signed": "<sha256 hex of the manifest.json file>",
     "signature": "<86 base64url chars: Ed25519 over the exact manifest.json bytes>",
     "signed_at": "2026-12-04T19:02:17Z"}

The signature covers the manifest file's bytes exactly as they are on disk; the manifest pins
every part by sha256, so a signature over it covers the whole bundle once the part hashes are
checked too. ``signed`` is redundant with the signature (a quick, readable "was the manifest
changed" check); ``signed_at`` is informational and NOT authenticated (it is outside what is
signed). Stdlib + ``cryptography`` only (device path).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgeoffload.errors import BadSignature, UnknownPublisher, Unsigned, UsageError
from edgeoffload.keys import check_key_bytes, fingerprint
from edgeoffload.types import fields

SIGNATURE = "signature.json"
SIGNATURE_SCHEMA = 1
PUBLISHER_PREFIX = "ed25519:"
PUBLISHER_PRIVATE_PREFIX = "ed25519-private:"
SIGNATURE_SIZE = 64

# A signature file is a few hundred bytes; anything much larger is not one.
_MAX_SIGNATURE_FILE_BYTES = 16384
URLSAFE_43 = re.compile(r"[A-Za-z0-9_-]{43}")
_URLSAFE_86 = re.compile(r"[A-Za-z0-9_-]{86}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_PUBLISHER_FORM_HINT = (
    "expected 'ed25519:' followed by 43 base64url characters (the contents of a publisher.pub "
    "written by 'edgeoffload keys generate --publisher')"
)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def b64url_exact(body: str, pattern: re.Pattern[str], size: int) -> bytes | None:
    """Decode unpadded base64url of ``size`` bytes; None unless it is the canonical form."""
    if not pattern.fullmatch(body):
        return None
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    # The last character carries unused bits: reject non-zero ones (one text form per value).
    if len(raw) != size or b64url(raw) != body:
        return None
    return raw


# --------------------------------------------------------------------------- publisher keys


def encode_publisher_public(public: bytes) -> str:
    """Text form of an Ed25519 publisher public key: ``"ed25519:"`` + unpadded base64url."""
    raw = check_key_bytes(public, "publisher public key")
    return PUBLISHER_PREFIX + b64url(raw)


def decode_publisher_public(text: str) -> bytes:
    """Parse ``"ed25519:<43 base64url chars>"`` (surrounding whitespace ignored) to 32 bytes.

    Raises:
        UsageError: anything else (the input is not echoed: it may be a private key).
    """
    if not isinstance(text, str):
        raise UsageError(
            f"a publisher key must be given as text, not {type(text).__name__}",
            hint=_PUBLISHER_FORM_HINT,
        )
    s = text.strip()
    if s.startswith(PUBLISHER_PRIVATE_PREFIX):
        raise UsageError(
            "this is a publisher private key, not a public key; never share or paste it",
            hint="use the contents of publisher.pub instead",
        )
    raw = b64url_exact(s[len(PUBLISHER_PREFIX) :], URLSAFE_43, 32)
    if not s.startswith(PUBLISHER_PREFIX) or raw is None:
        raise UsageError(
            f"not a valid Ed25519 publisher public key ({len(s)} characters)",
            hint=_PUBLISHER_FORM_HINT,
        )
    return raw


def publisher_fingerprint(public: bytes) -> str:
    """The fingerprint of a publisher key, in the same form as identity keys'."""
    return fingerprint(check_key_bytes(public, "publisher public key"))


def check_trusted(trusted: Sequence[bytes]) -> tuple[bytes, ...]:
    """``trusted`` as a tuple of 32-byte keys (a UsageError for anything else)."""
    if isinstance(trusted, (bytes, bytearray, memoryview, str)):
        raise UsageError(
            "trusted publishers must be a sequence of keys, not a single key",
            hint="pass [key] or the result of edgeoffload.signing.load_trusted(path)",
        )
    return tuple(check_key_bytes(k, "trusted publisher key") for k in trusted)


# --------------------------------------------------------------------------- signature.json


@dataclass(frozen=True)
class Signature:
    """A parsed ``signature.json`` (not yet checked against a manifest or a trust list)."""

    publisher: bytes
    signed: str  # sha256 hex of the manifest.json bytes
    signature: bytes  # 64-byte Ed25519 signature over the manifest.json bytes
    signed_at: str  # ISO 8601, UTC; informational (not covered by the signature)

    @property
    def fingerprint(self) -> str:
        return publisher_fingerprint(self.publisher)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SIGNATURE_SCHEMA,
            "publisher": encode_publisher_public(self.publisher),
            "signed": self.signed,
            "signature": b64url(self.signature),
            "signed_at": self.signed_at,
        }

    @classmethod
    def from_dict(cls, data: object) -> Signature:
        """Strict: a missing, unknown or malformed field is a BadSignature."""
        f = fields(data, SIGNATURE, BadSignature)
        schema = f.integer("schema")
        if schema != SIGNATURE_SCHEMA:
            raise BadSignature(
                f"{SIGNATURE}: schema {schema} is not supported (this is {SIGNATURE_SCHEMA})",
                hint="upgrade edgeoffload, or re-sign the bundle with this version",
            )
        publisher_text = f.text("publisher")
        signed = f.text("signed")
        signature_text = f.text("signature")
        signed_at = f.text("signed_at")
        f.done()
        try:
            publisher = decode_publisher_public(publisher_text)
        except UsageError:
            raise BadSignature(
                f"{SIGNATURE}: field 'publisher' is not an Ed25519 public key"
            ) from None
        if not _SHA256_HEX.fullmatch(signed):
            raise BadSignature(f"{SIGNATURE}: field 'signed' is not a lowercase sha256 hex digest")
        signature = b64url_exact(signature_text, _URLSAFE_86, SIGNATURE_SIZE)
        if signature is None:
            raise BadSignature(
                f"{SIGNATURE}: field 'signature' is not 64 bytes of unpadded base64url"
            )
        try:
            datetime.fromisoformat(signed_at.replace("Z", "+00:00"))
        except ValueError:
            raise BadSignature(f"{SIGNATURE}: field 'signed_at' is not an ISO 8601 time") from None
        return cls(publisher=publisher, signed=signed, signature=signature, signed_at=signed_at)


def _read_small(path: Path) -> bytes | None:
    """The bytes of a small regular file; None when it does not exist."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BadSignature(f"{path}: unreadable ({exc.strerror or exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadSignature(f"{path} is not a regular file")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, _MAX_SIGNATURE_FILE_BYTES + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > _MAX_SIGNATURE_FILE_BYTES:
                raise BadSignature(f"{path} is too large to be a signature file")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_signature(directory: str | Path) -> Signature | None:
    """The parsed ``signature.json`` of a bundle folder, or None when it is unsigned.

    Raises:
        BadSignature: the file exists but is not a well-formed signature file.
    """
    path = Path(directory) / SIGNATURE
    raw = _read_small(path)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadSignature(f"{path}: not valid JSON ({exc})") from None
    return Signature.from_dict(data)


def signature_holds(signature: Signature, manifest_bytes: bytes) -> bool:
    """Whether ``signature`` is its publisher's valid signature over ``manifest_bytes``.

    This does not say whether the publisher is trusted (see :func:`check_signature`).
    """
    if hashlib.sha256(manifest_bytes).hexdigest() != signature.signed:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(signature.publisher).verify(
            signature.signature, manifest_bytes
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def check_signature(
    directory: str | Path, manifest_bytes: bytes, trusted: Sequence[bytes]
) -> bytes:
    """Check that ``manifest_bytes`` (the bundle's manifest.json) is signed by a trusted key.

    Returns:
        The publisher public key that signed it (one of ``trusted``).

    Raises:
        Unsigned: the folder has no ``signature.json``.
        BadSignature: ``signature.json`` is malformed, or does not verify over
            ``manifest_bytes`` (the manifest was modified after signing).
        UnknownPublisher: signed by a key not in ``trusted`` (empty: nothing is trusted).
        UsageError: ``trusted`` is not a sequence of 32-byte keys.
    """
    keys = check_trusted(trusted)
    directory = Path(directory)
    signature = read_signature(directory)
    if signature is None:
        raise Unsigned(
            f"{directory}: the bundle is not signed (no {SIGNATURE}), and only bundles signed "
            "by a trusted publisher are accepted",
            hint=f"sign it with: edgeoffload sign {directory} --key PUBLISHER_DIR",
        )
    fp = signature.fingerprint
    if signature.publisher not in keys:
        raise UnknownPublisher(
            f"{directory}: signed by publisher {fp}, which is not a trusted publisher",
            hint="no publisher keys are trusted (the trust list is empty)"
            if not keys
            else f"if you trust publisher {fp}, add its publisher.pub line to the trusted keys",
        )
    actual = hashlib.sha256(manifest_bytes).hexdigest()
    if actual != signature.signed:
        raise BadSignature(
            f"{directory}: manifest.json was modified after publisher {fp} signed it: "
            f"sha256 {actual[:16]}… != signed {signature.signed[:16]}…",
            hint=f"restore the signed manifest, or re-sign: edgeoffload sign {directory} "
            "--key PUBLISHER_DIR",
        )
    if not signature_holds(signature, manifest_bytes):
        raise BadSignature(
            f"{directory}: the signature of publisher {fp} does not verify over manifest.json",
            hint=f"re-sign the bundle: edgeoffload sign {directory} --key PUBLISHER_DIR",
        )
    return signature.publisher
