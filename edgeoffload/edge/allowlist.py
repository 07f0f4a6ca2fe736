"""The edge server's allow-list: the device keys it admits.

An authorized-keys file (like ssh's ``authorized_keys``) or a folder of one-key files. The list
reloads itself when its source changes, so a server picks up edits without a restart; a broken
edit never empties it. Public keys appear in logs only as fingerprints.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edgeoffload.errors import UsageError
from edgeoffload.keys import PUBLIC_FILE, parse_key_text

log = logging.getLogger("edgeoffload.edge.allowlist")

_Signature = tuple[object, ...]


class AllowList:
    """Device keys an edge server admits.

    Source: an authorized-keys file (one key per line, '#' comments, blank lines ok, optional
    trailing label after whitespace, like ssh's ``authorized_keys``) or a folder of ``*.pub`` /
    ``public.key`` files (one key each; hidden files are ignored; the label is the file's
    trailing label, else the file name without ``.pub``, else for ``public.key`` ``None``).

    The list reloads itself when its source changes (checked through ``mtime_ns``, size and
    inode of the file, or of the folder and its key files), at most once per
    ``check_interval`` seconds, so a server picks up edits without a restart. A reload that
    fails (a malformed line, a vanished file) leaves the previously loaded list in force and
    logs a warning; the same broken state is not re-parsed until it changes again.

    Thread-safe.

    Args:
        path: the authorized-keys file or the folder.
        check_interval: minimum seconds between two checks of the source (0: every call).
        clock: monotonic clock in seconds (injectable for tests).

    Raises:
        UsageError: the path is missing or the first load fails.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        check_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not check_interval >= 0:
            raise UsageError(f"check_interval must be >= 0 seconds, got {check_interval!r}")
        self.path = Path(path)
        self.check_interval = float(check_interval)
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[bytes, str | None] = {}
        self._signature: _Signature | None = None
        self._failed_signature: _Signature | None = None
        self._last_check = 0.0
        self.reload()

    # -- public API ---------------------------------------------------------------------

    def allows(self, public: bytes) -> bool:
        """True when ``public`` (32 raw bytes) is in the list (reloading it first if due)."""
        self._maybe_reload()
        return bytes(public) in self._keys

    def label(self, public: bytes) -> str | None:
        """The label of ``public`` (for logging), or None if it has none or is not listed."""
        self._maybe_reload()
        return self._keys.get(bytes(public))

    def reload(self) -> None:
        """Reload the source now (e.g. on SIGHUP).

        Raises:
            UsageError: the source is missing or malformed; the previous list stays in force.
        """
        with self._lock:
            self._last_check = self._clock()
            signature = None
            try:
                signature = self._signature_of()
                keys = self._load()
            except UsageError:
                self._failed_signature = signature
                raise
            self._install(keys, signature)

    def try_reload(self) -> bool:
        """Like :meth:`reload`, but log a warning instead of raising (for a SIGHUP handler).

        Returns:
            True when the list was reloaded, False when the previous list stays in force.
        """
        try:
            self.reload()
        except UsageError as exc:
            log.warning("allow-list not reloaded, keeping %d keys: %s", len(self), exc)
            return False
        return True

    def entries(self) -> dict[bytes, str | None]:
        """A copy of the list: public key -> label."""
        return dict(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, public: object) -> bool:
        return isinstance(public, (bytes, bytearray)) and self.allows(bytes(public))

    def __repr__(self) -> str:
        return f"AllowList({str(self.path)!r}, {len(self._keys)} keys)"

    # -- internals ------------------------------------------------------------------------

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now - self._last_check < self.check_interval:
            return
        with self._lock:
            if now - self._last_check < self.check_interval:
                return  # another thread checked meanwhile
            self._last_check = now
            try:
                signature = self._signature_of()
            except UsageError as exc:
                if self._failed_signature != ("missing",):
                    self._failed_signature = ("missing",)
                    log.warning("allow-list not reloaded, keeping %d keys: %s", len(self), exc)
                return
            if signature == self._signature or signature == self._failed_signature:
                return
            try:
                keys = self._load()
            except UsageError as exc:
                self._failed_signature = signature
                log.warning("allow-list not reloaded, keeping %d keys: %s", len(self), exc)
                return
            self._install(keys, signature)

    def _install(self, keys: dict[bytes, str | None], signature: _Signature) -> None:
        added = len(keys.keys() - self._keys.keys())
        removed = len(self._keys.keys() - keys.keys())
        first = self._signature is None
        self._keys = keys
        self._signature = signature
        self._failed_signature = None
        if first:
            log.info("allow-list %s: %d keys", self.path, len(keys))
        else:
            log.info(
                "allow-list %s reloaded: %d keys (+%d, -%d)", self.path, len(keys), added, removed
            )

    def _missing(self) -> UsageError:
        return UsageError(
            f"allow-list {self.path} does not exist",
            hint="create an authorized-keys file (one 'x25519:...' key per line) or a folder "
            "of *.pub files; add a device by appending the contents of its public.key",
        )

    def _key_files(self) -> list[Path]:
        try:
            names = sorted(os.listdir(self.path))
        except FileNotFoundError:
            raise self._missing() from None
        except OSError as exc:
            raise UsageError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        files = []
        for name in names:
            if name.startswith(".") or not (name.endswith(".pub") or name == PUBLIC_FILE):
                continue
            p = self.path / name
            if p.is_file():
                files.append(p)
        return files

    def _signature_of(self) -> _Signature:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise self._missing() from None
        except OSError as exc:
            raise UsageError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        sig: list[object] = [st.st_ino, st.st_mtime_ns, st.st_size]
        if stat.S_ISDIR(st.st_mode):
            for p in self._key_files():
                try:
                    fst = os.stat(p)
                except OSError:
                    sig.append((p.name, None))
                    continue
                sig.append((p.name, fst.st_ino, fst.st_mtime_ns, fst.st_size))
        return tuple(sig)

    def _load(self) -> dict[bytes, str | None]:
        keys: dict[bytes, str | None] = {}
        if self.path.is_dir():
            for p in self._key_files():
                entries = parse_key_text(self._read(p), p)
                if len(entries) != 1:
                    raise UsageError(
                        f"{p}: a key file must contain exactly one public key, found {len(entries)}"
                    )
                _, key, label = entries[0]
                if label is None and p.name != PUBLIC_FILE:
                    label = p.name[: -len(".pub")]
                keys.setdefault(key, label)
        else:
            for _, key, label in parse_key_text(self._read(self.path), self.path):
                keys.setdefault(key, label)
        return keys

    def _read(self, path: Path) -> str:
        try:
            st = os.stat(path)
            if os.name != "nt" and st.st_mode & 0o022:
                log.warning(
                    "allow-list file %s is writable by group/others (mode %04o): anyone who "
                    "can write it can admit devices",
                    path,
                    stat.S_IMODE(st.st_mode),
                )
            data = path.read_bytes()
        except FileNotFoundError:
            raise UsageError(f"{path} disappeared while reading the allow-list") from None
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{path} is not UTF-8 text") from None
