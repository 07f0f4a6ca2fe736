"""The edge server's allow-list: the device keys it admits. It fails closed.

An authorized-keys file (like ssh's ``authorized_keys``) or a folder of one-key files. The list
re-reads its source at most every ``check_interval`` seconds (0.5 s by default) and compares a
hash of the *content*. It does not use mtime, size or inode, because an edit that keeps all
three would go unseen. An allow-list that goes wrong must refuse devices, never keep admitting a
revoked one, so:

- **changed, well-formed content** replaces the list, and removed keys are revoked at once;
- **a missing or unreadable source** empties the list: no device is admitted until the source is
  restored (ERROR once per state change). A restored source is loaded normally;
- **malformed content** (a bad line or ``quota=``, a folder file without exactly one key, bytes
  that are not UTF-8) never widens access. Only the keys that were installed *and* still sit on a
  valid line stay in force, each with the lower of its old and new quotas. A key removed in the
  same edit is revoked and nothing new is admitted (ERROR names the file and line);
- **the first load**, at construction, raises UsageError instead: a server must not start with a
  broken list.

:attr:`AllowList.generation` counts changes of what is enforced (keys and quotas), so a server
that polls it can close the connections of revoked keys well within 2 s. Public keys never appear
in logs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

from edgeoffload.errors import UsageError
from edgeoffload.keys import PUBLIC_FILE, decode_public

log = logging.getLogger("edgeoffload.edge.allowlist")

_HINT = (
    "one key per line: 'x25519:<43 base64url chars> [quota=N] [label]'; '#' starts a comment "
    "line; a folder holds one such key per *.pub file"
)
_QUOTA_PREFIX = "quota="
_QUOTA_VALUE = re.compile(r"[0-9]{1,9}")
# Bytes that are not UTF-8 decode (with surrogateescape) to lone low surrogates.
_NOT_UTF8 = re.compile("[\udc80-\udcff]")
_MAX_PROBLEMS_SHOWN = 5


class _Entry(NamedTuple):
    label: str | None
    quota: int | None


class _File(NamedTuple):
    path: Path
    data: bytes | None  # None: the file could not be read (``error`` says why)
    error: str | None
    loose_mode: int | None  # the mode, when group/others can write the file


class _Snapshot(NamedTuple):
    signature: bytes
    is_dir: bool
    files: tuple[_File, ...]


class AllowList:
    """Device keys an edge server admits, with an optional per-key quota. Fails closed.

    Source: an authorized-keys file or a folder of ``*.pub`` / ``public.key`` files. A line is
    ``<key> [quota=N] [label]`` or ``<key> [label] [quota=N]``. The key is in the text form of
    :func:`edgeoffload.keys.decode_public`. ``quota=N`` (N >= 1) caps the requests that device
    may have in flight. The label is the rest of the line, for logs. '#' comment lines and blank
    lines are ignored, and when a key is listed twice its first line wins. A folder file holds
    exactly one key. Hidden files are ignored. Its label defaults to the file name without
    ``.pub`` (``None`` for ``public.key``).

    Every due check (:meth:`check`, called by :meth:`allows`, :meth:`label` and :meth:`quota`,
    at most once per ``check_interval`` seconds) hashes the source's bytes: the file, or the
    sorted names and bytes of the folder's key files. Nothing is parsed while the hash is
    unchanged. On a change the module's fail-closed rules apply: a clean edit replaces the
    list. A missing or unreadable source empties it. Malformed content keeps only the installed
    keys that are still on a valid line. Each new broken state is logged once, at ERROR.

    Thread-safe.

    Args:
        path: the authorized-keys file or the folder.
        check_interval: minimum seconds between two checks of the source (0: every call).
        clock: monotonic clock in seconds (injectable for tests).

    Raises:
        UsageError: the first load finds the source missing, unreadable or malformed.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        check_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not check_interval >= 0:
            raise UsageError(f"check_interval must be >= 0 seconds, got {check_interval!r}")
        self.path = Path(path)
        self.check_interval = float(check_interval)
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: Mapping[bytes, _Entry] = {}
        self._signature: bytes | None = None  # of the last content acted on, good or bad
        self._unavailable = False
        self._generation = 0
        self._last_check = 0.0
        self.reload()

    # -- public API ---------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """Starts at 0 and goes up by one each time the enforced keys or quotas change.

        Includes a change to the empty list or to an intersection. A label-only or
        comment-only edit does not count. Compare it with the value you saw last, because
        :meth:`check` reports only the changes that its own call made.
        """
        return self._generation

    def check(self) -> bool:
        """Re-read the source if ``check_interval`` has passed since the last check.

        Call it periodically, so a revoked key's connections can be closed.

        Returns:
            True when this call changed the enforced keys or quotas (see :attr:`generation`).
        """
        now = self._clock()
        if now - self._last_check < self.check_interval:
            return False
        with self._lock:
            if now - self._last_check < self.check_interval:
                return False  # another thread checked meanwhile
            self._last_check = now
            before = self._generation
            failure, new_state = self._refresh(force=False)
            changed = self._generation != before
        if failure is not None and new_state:
            log.error("%s", failure.message)
        return changed

    def allows(self, public: bytes) -> bool:
        """True when ``public`` (32 raw bytes) is in the list (checking the source first if due)."""
        self.check()
        return bytes(public) in self._keys

    def label(self, public: bytes) -> str | None:
        """The label of ``public`` (for logging), or None if it has none or is not listed."""
        self.check()
        entry = self._keys.get(bytes(public))
        return entry.label if entry is not None else None

    def quota(self, public: bytes) -> int | None:
        """The ``quota=N`` of ``public``: the most requests it may have in flight.

        Returns None when the key has no quota (the server's own limits apply) or is not
        listed.
        """
        self.check()
        entry = self._keys.get(bytes(public))
        return entry.quota if entry is not None else None

    def reload(self) -> None:
        """Check the source now, whatever the interval (e.g. on SIGHUP).

        Raises:
            UsageError: the source is missing, unreadable or malformed. The fail-closed rule
                has already been applied: the list is empty, or only the keys still listed
                on valid lines remain. The message says which, for the caller to log.
        """
        with self._lock:
            self._last_check = self._clock()
            failure, _ = self._refresh(force=True)
        if failure is not None:
            raise failure

    def try_reload(self) -> bool:
        """Like :meth:`reload`, but log the failure at ERROR instead of raising (for SIGHUP).

        Returns:
            True when the source was loaded cleanly, False when it failed closed.
        """
        try:
            self.reload()
        except UsageError as exc:
            log.error("%s", exc.message)
            return False
        return True

    def entries(self) -> dict[bytes, str | None]:
        """A copy of the list: public key -> label."""
        return {key: entry.label for key, entry in self._keys.items()}

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, public: object) -> bool:
        return isinstance(public, (bytes, bytearray)) and self.allows(bytes(public))

    def __repr__(self) -> str:
        return f"AllowList({str(self.path)!r}, {len(self._keys)} keys)"

    # -- internals ------------------------------------------------------------------------

    def _refresh(self, *, force: bool) -> tuple[UsageError | None, bool]:
        """Read the source and apply the rules (lock held).

        Returns:
            The failure to report (None after a clean load), and whether this content or
            state is new (it should be logged).

        Raises:
            UsageError: on the first load, when the source is unavailable or malformed.
        """
        first = self._signature is None
        try:
            snapshot = self._snapshot()
        except UsageError as exc:
            if first:
                raise
            signature = b"unavailable\0" + exc.message.encode("utf-8", "replace")
            new_state = signature != self._signature
            revoked = len(self._keys)
            self._install({}, signature, quiet=True)
            self._unavailable = True
            message = (
                f"{exc.message}: the allow-list is now EMPTY and NO DEVICE WILL BE ADMITTED "
                f"until it is restored"
            )
            if revoked:
                message += f" ({revoked} keys revoked)"
            return UsageError(message, hint=exc.hint), new_state
        if snapshot.signature == self._signature and not force:
            return None, False
        new_state = snapshot.signature != self._signature
        entries, problems = self._parse(snapshot)
        if not problems:
            self._install(entries, snapshot.signature, quiet=False)
            self._unavailable = False
            return None, new_state
        shown = "; ".join(problems[:_MAX_PROBLEMS_SHOWN])
        if len(problems) > _MAX_PROBLEMS_SHOWN:
            shown += f"; and {len(problems) - _MAX_PROBLEMS_SHOWN} more"
        if first:
            raise UsageError(shown, hint=_HINT)
        kept = {
            key: _Entry(entry.label, _lower_quota(self._keys[key].quota, entry.quota))
            for key, entry in entries.items()
            if key in self._keys
        }
        before = len(self._keys)
        self._install(kept, snapshot.signature, quiet=True)
        message = (
            f"allow-list {self.path} is malformed ({shown}); failing closed: kept the {len(kept)} "
            f"of {before} admitted keys that are still on a valid line, revoked "
            f"{before - len(kept)}, admitting nothing new until it is fixed"
        )
        return UsageError(message, hint=_HINT), new_state

    def _install(self, keys: Mapping[bytes, _Entry], signature: bytes, *, quiet: bool) -> None:
        """Put ``keys`` in force; log a clean load at INFO unless ``quiet`` (a failure is
        logged by the caller, at ERROR)."""
        old = self._keys
        first = self._signature is None
        self._keys = keys
        self._signature = signature
        if first:
            log.info("allow-list %s: %d keys", self.path, len(keys))
            return
        if {k: e.quota for k, e in old.items()} != {k: e.quota for k, e in keys.items()}:
            self._generation += 1
        if not quiet:
            log.info(
                "allow-list %s %s: %d keys (+%d, -%d)",
                self.path,
                "restored" if self._unavailable else "reloaded",
                len(keys),
                len(keys.keys() - old.keys()),
                len(old.keys() - keys.keys()),
            )

    def _missing(self) -> UsageError:
        return UsageError(
            f"allow-list {self.path} does not exist",
            hint="create an authorized-keys file (one 'x25519:...' key per line) or a folder "
            "of *.pub files; add a device by appending the contents of its public.key",
        )

    def _unreadable(self, reason: str) -> UsageError:
        return UsageError(
            f"cannot read allow-list {self.path}: {reason}",
            hint="make it readable by the server's user (and writable only by its owner)",
        )

    def _snapshot(self) -> _Snapshot:
        """The source's bytes and their hash.

        Raises:
            UsageError: the source is missing or unreadable.
        """
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise self._missing() from None
        except OSError as exc:
            raise self._unreadable(exc.strerror or str(exc)) from exc
        digest = hashlib.blake2b(digest_size=32)
        files: list[_File] = []
        if stat.S_ISDIR(st.st_mode):
            digest.update(b"folder\0")
            try:
                names = sorted(os.listdir(self.path))
            except FileNotFoundError:
                raise self._missing() from None
            except OSError as exc:
                raise self._unreadable(exc.strerror or str(exc)) from exc
            for name in names:
                if name.startswith(".") or not (name.endswith(".pub") or name == PUBLIC_FILE):
                    continue
                p = self.path / name
                try:
                    read = _read_regular(p)
                except FileNotFoundError:
                    continue  # deleted since listdir: a revocation
                except OSError as exc:
                    files.append(_File(p, None, exc.strerror or str(exc), None))
                    continue
                if read is not None:  # not a regular file (e.g. a folder named x.pub): ignored
                    files.append(_File(p, read[0], None, read[1]))
        elif stat.S_ISREG(st.st_mode):
            digest.update(b"file\0")
            try:
                read = _read_regular(self.path)
            except FileNotFoundError:
                raise self._missing() from None
            except OSError as exc:
                raise self._unreadable(exc.strerror or str(exc)) from exc
            if read is None:
                raise self._unreadable("not a regular file")
            files.append(_File(self.path, read[0], None, read[1]))
        else:
            raise self._unreadable("neither a regular file nor a folder")
        for f in files:
            # Length-prefixed fields, so that no two different sources hash alike. The
            # loose-mode bit is hashed so that a chmod re-runs the permission warning.
            raw_name = os.fsencode(f.path.name)
            body = f.data if f.data is not None else b"\0unreadable\0" + (f.error or "").encode()
            digest.update(len(raw_name).to_bytes(8, "big") + raw_name)
            digest.update(len(body).to_bytes(8, "big") + body)
            digest.update(b"L" if f.loose_mode is not None else b"-")
        return _Snapshot(digest.digest(), stat.S_ISDIR(st.st_mode), tuple(files))

    def _parse(self, snapshot: _Snapshot) -> tuple[dict[bytes, _Entry], list[str]]:
        """Keys on the valid lines (first entry wins), and one message per malformed thing."""
        keys: dict[bytes, _Entry] = {}
        problems: list[str] = []
        for f in snapshot.files:
            if f.loose_mode is not None:
                log.warning(
                    "allow-list file %s is writable by group/others (mode %04o): anyone who "
                    "can write it can admit devices",
                    f.path,
                    f.loose_mode,
                )
            if f.data is None:
                problems.append(f"{f.path}: cannot read: {f.error}")
                continue
            entries, file_problems = _parse_lines(f.data, f.path)
            problems += file_problems
            if snapshot.is_dir:
                if len(entries) > 1 or (not entries and not file_problems):
                    problems.append(
                        f"{f.path}: a key file must contain exactly one public key, "
                        f"found {len(entries)}"
                    )
                if f.path.name != PUBLIC_FILE:
                    default = f.path.name[: -len(".pub")]
                    entries = [(k, _Entry(e.label or default, e.quota)) for k, e in entries]
            for key, entry in entries:
                keys.setdefault(key, entry)
        return keys, problems


def _read_regular(path: Path) -> tuple[bytes, int | None] | None:
    """The bytes of ``path`` and its mode when group/others may write it; None if not a file.

    The mode and the bytes come from one descriptor, so they describe the same file.
    O_NONBLOCK keeps a FIFO planted at the path from hanging the server.
    """
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    loose = os.name != "nt" and bool(st.st_mode & 0o022)
    return b"".join(chunks), stat.S_IMODE(st.st_mode) if loose else None


def _parse_lines(data: bytes, source: Path) -> tuple[list[tuple[bytes, _Entry]], list[str]]:
    """Parse authorized-keys bytes line by line: the valid entries and the problems found.

    Lines and their numbers are those of :func:`edgeoffload.keys.parse_key_text`. Unlike
    that function, a bad line does not stop the parse, because failing closed needs to know
    which keys are still listed on valid lines.
    """
    text = data.decode("utf-8", errors="surrogateescape")
    entries: list[tuple[bytes, _Entry]] = []
    problems: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if _NOT_UTF8.search(s):
            problems.append(f"{source}:{lineno}: not UTF-8 text")
            continue
        if not s or s.startswith("#"):
            continue
        try:
            key, entry = _parse_line(s)
        except UsageError as exc:
            problems.append(f"{source}:{lineno}: {exc.message}")
            continue
        entries.append((key, entry))
    return entries, problems


def _parse_line(s: str) -> tuple[bytes, _Entry]:
    """``<key> [quota=N] [label]`` or ``<key> [label] [quota=N]`` (stripped, not a comment)."""
    parts = s.split(None, 1)
    key = decode_public(parts[0])
    rest = parts[1].strip() if len(parts) > 1 else ""
    tokens = rest.split()
    at = [i for i, t in enumerate(tokens) if t.lower().startswith(_QUOTA_PREFIX)]
    quota = None
    if at:
        if len(at) > 1:
            raise UsageError("more than one quota= token")
        i = at[0]
        if i not in (0, len(tokens) - 1):
            # Inside a label it would read as a quota that is silently not enforced.
            raise UsageError("quota=N must come right after the key or at the end of the line")
        token = tokens[i]
        value = token[len(_QUOTA_PREFIX) :]
        if not _QUOTA_VALUE.fullmatch(value) or int(value) < 1:
            raise UsageError("quota=N needs a whole number N from 1 to 999999999")
        quota = int(value)
        rest = (rest[len(token) :] if i == 0 else rest[: -len(token)]).strip()
    return key, _Entry(rest or None, quota)


def _lower_quota(old: int | None, new: int | None) -> int | None:
    """The tighter of two quotas (None: no quota), so a broken edit cannot raise one."""
    if old is None:
        return new
    if new is None:
        return old
    return min(old, new)
