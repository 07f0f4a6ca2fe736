"""Long-term X25519 identity keys for devices and edge servers: the project's one key type.

Every device and every edge server owns one static X25519 key pair (the ``s`` key of the Noise
IK handshake). It lives in a key directory::

    DIR/            mode 0700
      private.key   mode 0600, "x25519-private:" + base64url(32 raw bytes) + "\\n"
      public.key    mode 0644, "x25519:" + base64url(32 raw bytes) + "\\n"

The text form of a public key (``encode_public``) is what users copy between machines, paste on
command lines and list in an edge server's allow-list. ``fingerprint`` gives a short form that a
person can compare by eye and that is safe to log.

An edge server admits only the device keys in its allow-list
(:class:`edgeoffload.edge.allowlist.AllowList`), written in the authorized-keys text parsed here.

Key material is never logged: private keys never appear in messages, logs or reprs; public keys
appear only as fingerprints. Stdlib + ``cryptography`` only (this module is on the device path).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edgeoffload.errors import UsageError

__all__ = [
    "KEY_SIZE",
    "PRIVATE_FILE",
    "PUBLIC_FILE",
    "PUBLIC_PREFIX",
    "KeyPair",
    "decode_public",
    "encode_public",
    "fingerprint",
    "generate_identity",
    "load_identity",
    "load_public",
]

log = logging.getLogger("edgeoffload.keys")

PRIVATE_FILE = "private.key"
PUBLIC_FILE = "public.key"
KEY_SIZE = 32
PUBLIC_PREFIX = "x25519:"
PRIVATE_PREFIX = "x25519-private:"
FINGERPRINT_DOMAIN = b"edgeoffload-key-v1"

# Key files are a line of text; anything much larger is not a key file.
_MAX_KEY_FILE_BYTES = 4096
# What os.open(..., O_NOFOLLOW) raises on a symlink: ELOOP (Linux, macOS), EMLINK (FreeBSD),
# EFTYPE (NetBSD; absent from Python's errno elsewhere).
_SYMLINK_ERRNOS = frozenset(
    e for e in (errno.ELOOP, errno.EMLINK, getattr(errno, "EFTYPE", None)) if e is not None
)
_KEYGEN_HINT = "create one with: edgeoffload keys generate {directory}"
_PUBLIC_FORM_HINT = (
    "expected 'x25519:' followed by 43 base64url characters (the contents of a public.key "
    "written by 'edgeoffload keys generate'); 64 hex digits or standard base64 also work"
)

_URLSAFE_43 = re.compile(r"[A-Za-z0-9_-]{43}=?")
_STD_B64_43 = re.compile(r"[A-Za-z0-9+/]{43}=?")
_HEX_64 = re.compile(r"[0-9A-Fa-f]{64}")


# --------------------------------------------------------------------------- text forms


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _b64url_32(body: str) -> bytes | None:
    """Decode 43 base64url characters (optional '=') to 32 bytes; None unless canonical."""
    if not _URLSAFE_43.fullmatch(body):
        return None
    body = body.rstrip("=")
    raw = base64.urlsafe_b64decode(body + "=")
    # The last character carries 2 unused bits: reject non-zero ones so that each key has
    # exactly one text form.
    if len(raw) != KEY_SIZE or _b64url(raw) != body:
        return None
    return raw


def encode_public(public: bytes) -> str:
    """Text form of a 32-byte X25519 public key: ``"x25519:"`` + unpadded base64url (43 chars).

    Raises:
        UsageError: ``public`` is not 32 bytes.
    """
    check_key_bytes(public, "public key")
    return PUBLIC_PREFIX + _b64url(bytes(public))


def decode_public(text: str) -> bytes:
    """Parse a public key's text form and return its 32 raw bytes.

    Accepts the canonical ``x25519:<43 base64url chars>`` form and, leniently, 64 hex digits or
    44-character standard base64 of the 32 bytes. Surrounding whitespace is ignored.

    Raises:
        UsageError: anything else; the hint shows the expected form. The input is not echoed
            (a user may have pasted a private key by mistake).
    """
    if not isinstance(text, str):
        raise UsageError(
            f"a public key must be given as text, not {type(text).__name__}",
            hint=_PUBLIC_FORM_HINT,
        )
    s = text.strip()
    if s.startswith(PRIVATE_PREFIX):
        raise UsageError(
            "this is a private key, not a public key; never share or paste private keys",
            hint="use the contents of public.key (or its path) instead",
        )
    raw: bytes | None = None
    if s.startswith(PUBLIC_PREFIX):
        raw = _b64url_32(s[len(PUBLIC_PREFIX) :])
    elif _HEX_64.fullmatch(s):
        raw = bytes.fromhex(s)
    elif _STD_B64_43.fullmatch(s):
        try:
            raw = base64.b64decode(s.rstrip("=") + "=", validate=True)
        except binascii.Error:  # pragma: no cover - the regex already guarantees validity
            raw = None
        if raw is not None and len(raw) != KEY_SIZE:  # pragma: no cover - 43 chars -> 32 bytes
            raw = None
    if raw is None:
        raise UsageError(
            f"not a valid X25519 public key ({len(s)} characters)", hint=_PUBLIC_FORM_HINT
        )
    return raw


def fingerprint(public: bytes) -> str:
    """Short fingerprint of a public key that a person can compare by eye, safe to log.

    The first 10 bytes of ``sha256(b"edgeoffload-key-v1" + public)`` in lowercase base32,
    in four groups of four characters: ``"mfrg-gzdf-mztw-q2lk"``.
    """
    check_key_bytes(public, "public key")
    digest = hashlib.sha256(FINGERPRINT_DOMAIN + bytes(public)).digest()[:10]
    text = base64.b32encode(digest).decode("ascii").lower()  # 10 bytes -> 16 chars, no '='
    return "-".join(text[i : i + 4] for i in range(0, len(text), 4))


def check_key_bytes(value: object, what: str) -> bytes:
    """``value`` as bytes if it is a 32-byte key, else a UsageError naming ``what`` it was."""
    if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != KEY_SIZE:
        size = len(value) if isinstance(value, (bytes, bytearray, memoryview)) else None
        got = f"{size} bytes" if size is not None else type(value).__name__
        raise UsageError(
            f"{what} must be {KEY_SIZE} raw bytes, got {got}",
            hint="X25519 keys are 32 raw bytes (not hex, not PEM)",
        )
    return bytes(value)


def public_of(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


# --------------------------------------------------------------------------- key pair


@dataclass(frozen=True, repr=False)
class KeyPair:
    """A static X25519 key pair as raw 32-byte keys: the ``s`` key Noise hashes and sends.

    The one key type of the project: devices and servers load theirs from a key directory
    (:func:`load_identity`), the handshake uses the same object. A pair built directly is
    checked (both halves 32 bytes, the public half derived from the private one), because a
    mismatched pair would fail only later, as an opaque authentication failure at the peer.
    ``repr`` shows the fingerprint only, so a logged pair never leaks the private key.
    """

    private: bytes
    public: bytes

    def __post_init__(self) -> None:
        private = check_key_bytes(self.private, "X25519 private key")
        public = check_key_bytes(self.public, "X25519 public key")
        if public_of(private) != public:
            raise UsageError(
                "the public key does not belong to the private key",
                hint="build the pair with KeyPair.from_private(private)",
            )
        # Normalise bytearray/memoryview input so the frozen pair is immutable and hashable.
        object.__setattr__(self, "private", private)
        object.__setattr__(self, "public", public)

    @classmethod
    def from_private(cls, private: bytes) -> KeyPair:
        """The key pair of a 32-byte private key (the public key is derived)."""
        raw = check_key_bytes(private, "X25519 private key")
        return cls(private=raw, public=public_of(raw))

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh random key pair held in memory only (see :func:`generate_identity`)."""
        key = X25519PrivateKey.generate()
        return cls(private=key.private_bytes_raw(), public=key.public_key().public_bytes_raw())

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the public key (see :func:`fingerprint`)."""
        return fingerprint(self.public)

    def __repr__(self) -> str:
        return f"KeyPair(fingerprint={self.fingerprint!r})"


def _write_file_atomic(path: Path, data: bytes, *, mode: int, clobber: bool) -> None:
    """Write ``data`` to ``path`` through a temp file created with ``mode`` from the start.

    The temp file is created with O_CREAT|O_EXCL and ``mode`` (then fchmod'ed to exactly
    ``mode``, whatever the umask), so a private key is never readable by others, not even
    while it is being written. With ``clobber=False`` an existing ``path`` is never replaced
    (hard-link publish, which fails atomically when the name exists).

    Raises:
        FileExistsError: ``clobber`` is False and ``path`` exists.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, mode)
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if clobber:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:
                # No hard links on this file system: check-then-rename is the best we have.
                if path.exists():
                    raise FileExistsError(str(path)) from None
                os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # pragma: no cover - directories cannot be opened on Windows
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def generate_identity(directory: str | Path, *, overwrite: bool = False) -> KeyPair:
    """Create a new key pair in ``directory`` and return it.

    Creates ``directory`` (mode 0700) if needed, writes ``private.key`` (mode 0600; never
    readable by others, even briefly) and ``public.key`` (mode 0644).

    Args:
        directory: the key directory.
        overwrite: replace an existing ``private.key`` (the old identity is lost).

    Raises:
        UsageError: ``private.key`` exists and ``overwrite`` is False, or ``directory`` is not a
            directory / cannot be written.
    """
    d = Path(directory)
    private_path = d / PRIVATE_FILE
    public_path = d / PUBLIC_FILE
    try:
        if not d.exists():
            d.mkdir(mode=0o700, parents=True)
            d.chmod(0o700)  # mkdir's mode is filtered by the umask
        elif not d.is_dir():
            raise UsageError(f"{d} exists and is not a directory", hint="choose a key directory")
        if private_path.exists() and not overwrite:
            raise UsageError(
                f"{private_path} already exists; refusing to replace an identity",
                hint="pass --force (overwrite=True) to replace it; the old key is lost",
            )
        identity = KeyPair.generate()
        private_text = f"{PRIVATE_PREFIX}{_b64url(identity.private)}\n".encode("ascii")
        public_text = f"{encode_public(identity.public)}\n".encode("ascii")
        try:
            _write_file_atomic(private_path, private_text, mode=0o600, clobber=overwrite)
        except FileExistsError:
            raise UsageError(
                f"{private_path} already exists; refusing to replace an identity",
                hint="pass --force (overwrite=True) to replace it; the old key is lost",
            ) from None
        _write_file_atomic(public_path, public_text, mode=0o644, clobber=True)
        _fsync_dir(d)
    except OSError as exc:
        raise UsageError(
            f"cannot write keys to {d}: {exc.strerror or exc}",
            hint="check that the directory is writable by this user",
        ) from exc
    log.info("generated identity %s in %s", identity.fingerprint, d)
    return identity


def read_small_text(path: Path, fd: int) -> str:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = os.read(fd, _MAX_KEY_FILE_BYTES + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > _MAX_KEY_FILE_BYTES:
            raise UsageError(f"{path} is too large to be a key file")
    try:
        return b"".join(chunks).decode("ascii")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a key file (not ASCII text)") from None


def _read_key_file(path: Path) -> str:
    """Read a small text file; OSErrors become UsageError."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return read_small_text(path, fd)
    finally:
        os.close(fd)


def _open_private_key(path: Path, hint: str) -> int:
    """Open ``path`` for reading without following a final symlink and without blocking."""
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever (it is
    # refused by the fstat check right after); it changes nothing for a regular file.
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        raise UsageError(f"{path.parent} has no {path.name}", hint=hint) from None
    except OSError as exc:
        # O_NOFOLLOW on a symlink: ELOOP (Linux, macOS), EMLINK (FreeBSD), EFTYPE (NetBSD).
        if exc.errno in _SYMLINK_ERRNOS and os.path.islink(path):
            raise UsageError(
                f"{path} is a symbolic link; a private key must be a regular file",
                hint=f"put the key file itself at {path} (move the file the link points to "
                "there), or pass the directory that holds the real file",
            ) from None
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _check_private_key_fd(path: Path, fd: int) -> None:
    """Refuse an open private key that is not a regular file of ours that only we can use."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(
            f"{path} is not a regular file ({_file_kind(st.st_mode)})",
            hint=f"{path.name} must be the key file written by 'edgeoffload keys generate'",
        )
    getuid = getattr(os, "getuid", None)
    if os.name != "nt" and getuid is not None and st.st_uid != getuid():
        uid = getuid()
        raise UsageError(
            f"{path} is owned by uid {st.st_uid}, not by this user (uid {uid}): "
            "a private key must belong to the user that uses it",
            hint=f"chown {uid} {path} (or run as the key's owner)",
        )
    if os.name != "nt" and st.st_mode & 0o077:
        raise UsageError(
            f"permissions {stat.S_IMODE(st.st_mode):04o} for {path} are too open: "
            "a private key must not be accessible by others",
            hint=f"chmod 600 {path}",
        )


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a plain file"


def load_identity(directory: str | Path) -> KeyPair:
    """Load the key pair stored in ``directory`` by :func:`generate_identity`.

    ``private.key`` is accepted only when it is, at the moment it is read:

    - a regular file: not a symlink, even to a good file (opened with ``O_NOFOLLOW``, where the
      OS has it: not on Windows; the directory itself may be a symlink), nor a directory, FIFO,
      socket or device;
    - owned by the user running this process (``os.getuid()``; not checked on Windows or where
      ``os.getuid`` does not exist);
    - neither readable nor writable nor executable by group or others (mode ``0600`` or
      stricter, like ssh; not checked on Windows).

    The checks ``fstat`` the descriptor the key is then read from, so they and the read see the
    same file (no check-then-open race). When ``public.key`` is present it must match the
    private key.

    Raises:
        UsageError: the directory or ``private.key`` is missing, ``private.key`` is a symlink,
            not a regular file, owned by another user, accessible by group or others, or
            malformed, or ``public.key`` does not match it. The hint says what to fix.
    """
    d = Path(directory)
    hint = _KEYGEN_HINT.format(directory=d)
    if not d.exists():
        raise UsageError(f"key directory {d} does not exist", hint=hint)
    if not d.is_dir():
        raise UsageError(f"{d} is not a key directory", hint=hint)
    private_path = d / PRIVATE_FILE
    fd = _open_private_key(private_path, hint)
    try:
        _check_private_key_fd(private_path, fd)
        text = read_small_text(private_path, fd)
    finally:
        os.close(fd)
    s = text.strip()
    raw = _b64url_32(s[len(PRIVATE_PREFIX) :]) if s.startswith(PRIVATE_PREFIX) else None
    if raw is None:
        # Never echo the contents: they are (or were meant to be) a private key.
        raise UsageError(
            f"{private_path} is not a valid private key file",
            hint="expected 'x25519-private:' followed by 43 base64url characters; "
            + hint
            + " --force",
        )
    identity = KeyPair.from_private(raw)
    public_path = d / PUBLIC_FILE
    if public_path.exists():
        try:
            stored = decode_public(_read_key_file(public_path))
        except UsageError as exc:
            raise UsageError(
                f"{public_path} is not a valid public key: {exc.message}",
                hint=f"if {PRIVATE_FILE} is the right key, delete {public_path} "
                "(public.key is derived from it) and share the key again",
            ) from None
        if stored != identity.public:
            raise UsageError(
                f"{public_path} (key {fingerprint(stored)}) does not match {private_path} "
                f"(key {identity.fingerprint})",
                hint=f"if {PRIVATE_FILE} is the right key, delete {public_path} (it is derived "
                "from private.key); otherwise restore the matching private.key",
            )
    return identity


def load_public(path_or_text: str | Path) -> bytes:
    """A public key given on the command line: text form, a ``public.key`` file or a key dir.

    A :class:`~pathlib.Path` is always a path. A string starting with ``x25519:`` is always
    key text; any other string is a path when it names an existing file or directory, and
    otherwise is parsed as key text (hex / standard base64 leniently accepted).

    A file may hold the key followed by a label (like an authorized-keys line); '#' comment
    lines and blank lines are ignored; it must hold exactly one key.

    Raises:
        UsageError: not a key, a missing path, a private key, or a file without exactly one key.
    """
    if isinstance(path_or_text, str):
        s = path_or_text.strip()
        if s.startswith((PUBLIC_PREFIX, PRIVATE_PREFIX)):
            return decode_public(s)
        p = Path(path_or_text)
        if not _exists(p):
            try:
                return decode_public(s)
            except UsageError:
                raise UsageError(
                    "not a public key and not an existing file or key directory "
                    f"({len(s)} characters)",
                    hint=_PUBLIC_FORM_HINT + "; or give the path of a public.key file "
                    "or of a key directory",
                ) from None
    else:
        p = Path(path_or_text)
        if not p.exists():
            raise UsageError(
                f"{p} does not exist", hint="give a public.key file or a key directory"
            )
    if p.is_dir():
        p = p / PUBLIC_FILE
        if not p.exists():
            raise UsageError(
                f"{p.parent} has no {PUBLIC_FILE}",
                hint=_KEYGEN_HINT.format(directory=p.parent),
            )
    entries = parse_key_text(_read_key_file(p), p)
    if len(entries) != 1:
        raise UsageError(f"{p} must contain exactly one public key, found {len(entries)}")
    return entries[0][1]


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except (OSError, ValueError):  # e.g. a name too long to be a path: it is key text
        return False


# --------------------------------------------------------------------------- authorized-keys text


def parse_key_text(text: str, source: Path) -> list[tuple[int, bytes, str | None]]:
    """Parse authorized-keys lines into (line number, key, label or None).

    Raises:
        UsageError: naming ``source`` and the line of the first malformed entry.
    """
    entries: list[tuple[int, bytes, str | None]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.split(None, 1)
        try:
            key = decode_public(parts[0])
        except UsageError as exc:
            raise UsageError(
                f"{source}:{lineno}: {exc.message}",
                hint="one key per line: 'x25519:<43 base64url chars> [label]'; "
                "'#' starts a comment line",
            ) from None
        label = parts[1].strip() if len(parts) > 1 else None
        entries.append((lineno, key, label or None))
    return entries
