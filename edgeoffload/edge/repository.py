"""The edge server's model repository: ``DIR/<model>/<version>/`` bundle folders (Triton's layout).

``edgeoffload serve --repository DIR`` serves every model folder under ``DIR``; each holds
numbered version folders (a positive integer, no leading zero, as Triton), each a bundle folder
(``manifest.json``, the parts, maybe ``signature.json``), and an optional ``policy.json``:

- ``{"policy": "latest", "count": N}``: the N highest version numbers (the default, N = 1);
- ``{"policy": "pinned", "versions": [3, 4]}``: exactly those numbers.

This module is the pure part: :class:`ModelRepository` scans the tree into a
:class:`RepositoryState` (no bundle is loaded, nothing is hashed), :func:`desired_versions` is
the policy as a function, and :class:`RepositoryWatcher` polls a cheap fingerprint of the tree
(names, sizes and mtimes of the model folders' ``policy.json`` and of every file directly in a
version folder) and calls the server's ``sync`` on a change or when poked (SIGHUP). The server
(:meth:`edgeoffload.edge.server.EdgeServer.sync`) loads, drains and unloads.

Fail safe, never fail closed here: a serving version must not go away because of a typo. A
malformed ``policy.json`` keeps that model as it is (ERROR, once per distinct content); a policy
that selects nothing that can be loaded (a pinned number that is absent or refused) keeps the
versions that serve; an unreadable repository keeps everything. Deleting a version folder (or a
model folder) is deliberate: that version drains.

A version folder counts once it has a ``manifest.json`` (``write_bundle`` writes it last); the
safe way to publish is to copy the bundle beside the repository, or into a hidden folder, and
``rename`` it to its number.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edgeoffload.errors import UsageError

log = logging.getLogger("edgeoffload.edge.repository")

POLICY_FILE = "policy.json"
MANIFEST_FILE = "manifest.json"
# Triton: version folders are numbers; names that start with a zero are ignored.
_VERSION_NAME = re.compile(r"[1-9][0-9]{0,17}")
_POLICY_HINT = (
    'policy.json is {"policy": "latest", "count": N} (N >= 1) or '
    '{"policy": "pinned", "versions": [1, 2]} (positive integers)'
)
MAX_POLICY_BYTES = 1 << 16

PolicyKind = Literal["latest", "pinned"]
VersionState = Literal["serving", "draining"]


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's version numbers to serve."""

    kind: PolicyKind = "latest"
    count: int = 1  # for "latest"
    versions: tuple[int, ...] = ()  # for "pinned", ascending

    @classmethod
    def parse(cls, data: object, source: str = POLICY_FILE) -> VersionPolicy:
        """The policy in ``data`` (the decoded JSON).

        Raises:
            UsageError: naming ``source`` and what is wrong.
        """
        if not isinstance(data, dict):
            raise UsageError(f"{source}: expected a JSON object", hint=_POLICY_HINT)
        kind = data.get("policy")
        if kind == "latest":
            extra = set(data) - {"policy", "count"}
            count = data.get("count", 1)
            if type(count) is not int or count < 1:
                raise UsageError(
                    f"{source}: 'count' must be a whole number >= 1, got {count!r}",
                    hint=_POLICY_HINT,
                )
            if extra:
                raise UsageError(f"{source}: unknown keys {sorted(extra)}", hint=_POLICY_HINT)
            return cls("latest", count=count)
        if kind == "pinned":
            extra = set(data) - {"policy", "versions"}
            versions = data.get("versions")
            if (
                not isinstance(versions, list)
                or not versions
                or not all(type(v) is int and v >= 1 for v in versions)
            ):
                raise UsageError(
                    f"{source}: 'versions' must be a non-empty list of positive integers, "
                    f"got {versions!r}",
                    hint=_POLICY_HINT,
                )
            if extra:
                raise UsageError(f"{source}: unknown keys {sorted(extra)}", hint=_POLICY_HINT)
            return cls("pinned", versions=tuple(sorted(set(versions))))
        raise UsageError(
            f'{source}: \'policy\' must be "latest" or "pinned", got {kind!r}', hint=_POLICY_HINT
        )

    def select(self, candidates: Iterable[int]) -> frozenset[int]:
        """The numbers among ``candidates`` this policy serves."""
        present = sorted(set(candidates))
        if self.kind == "latest":
            return frozenset(present[-self.count :])
        return frozenset(v for v in present if v in self.versions)

    def describe(self) -> str:
        if self.kind == "latest":
            return f"latest {self.count}"
        return "pinned " + ", ".join(map(str, self.versions))


DEFAULT_POLICY = VersionPolicy()


@dataclass(frozen=True)
class HostedVersion:
    """A read-only view of one bundle version an edge server holds
    (:meth:`edgeoffload.edge.server.EdgeServer.hosted_versions`).

    ``model`` and ``number`` are the repository's folder names (None for a bundle given on the
    command line). ``state``: "serving" (new handshakes may pick it) or "draining" (left the
    policy; its connections, requests and sessions finish on it, then it is unloaded).
    """

    model: str | None
    number: int | None
    identity: str
    version: str
    state: VersionState
    inflight: int
    sessions: int
    path: Path
    connections: int = 0


@dataclass(frozen=True)
class ModelState:
    """One model folder as scanned.

    ``policy`` is None when ``policy.json`` is malformed (``problem`` says why): the model then
    keeps what it serves. ``versions`` maps each present version number (ascending) to a
    fingerprint of its folder's files, so that a folder that was refused is retried once its
    files change (e.g. a copy that finished).
    """

    name: str
    path: Path
    versions: Mapping[int, bytes]
    policy: VersionPolicy | None
    problem: str | None = None

    @property
    def numbers(self) -> tuple[int, ...]:
        return tuple(sorted(self.versions))

    def version_path(self, number: int) -> Path:
        return self.path / str(number)

    def desired(
        self, *, failed: Iterable[int] = (), serving: Iterable[int] = ()
    ) -> frozenset[int] | None:
        """What this model should serve (:func:`desired_versions`); None: keep as it is."""
        if self.policy is None:
            return None
        return desired_versions(self.policy, self.numbers, failed=failed, serving=serving)


@dataclass(frozen=True)
class RepositoryState:
    """The repository as scanned: its models by name. ``problem`` is set (and ``models`` empty)
    when the root itself could not be read: the server then keeps everything."""

    root: Path
    models: Mapping[str, ModelState] = field(default_factory=dict)
    problem: str | None = None


def desired_versions(
    policy: VersionPolicy,
    present: Iterable[int],
    *,
    failed: Iterable[int] = (),
    serving: Iterable[int] = (),
) -> frozenset[int]:
    """The version numbers a model should serve.

    ``present``: the numbered folders with a manifest; ``failed``: those refused at load (left
    out, so ``latest N`` falls back to older versions); ``serving``: those serving now. When
    the policy selects nothing loadable although versions are present (a pinned number that is
    absent or refused, a newest version that is refused), the versions that serve now are kept:
    a typo or a bad upload never unloads a serving version. When no version folder is present
    at all (they were deleted), nothing is kept.
    """
    present_set = set(present)
    failed_set = set(failed)
    chosen = policy.select(present_set - failed_set)
    if chosen or not present_set:
        return chosen
    return frozenset(serving)


def version_numbers(names: Iterable[str]) -> list[int]:
    """The version numbers among folder ``names``, ascending numerically ("10" after "9")."""
    return sorted(int(n) for n in names if _VERSION_NAME.fullmatch(n))


class ModelRepository:
    """A ``DIR/<model>/<version>/`` tree of bundles. Scanning reads names, stats and
    ``policy.json`` only; it never loads or hashes a bundle."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._reported: dict[str, bytes] = {}  # model -> policy bytes already logged as bad

    def check_root(self) -> None:
        """Raise UsageError when the root is not a readable folder (for the server's start)."""
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            raise UsageError(
                f"model repository {self.root} does not exist",
                hint="create DIR/<model>/<version>/ bundle folders (e.g. DIR/resnet/1/)",
            ) from None
        except OSError as exc:
            raise UsageError(f"cannot read model repository {self.root}: {exc}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"model repository {self.root} is not a folder")

    def scan(self) -> RepositoryState:
        """The models, their present versions and policies, as the tree is now."""
        try:
            names = sorted(os.listdir(self.root))
        except OSError as exc:
            return RepositoryState(self.root, {}, f"cannot read {self.root}: {exc}")
        models: dict[str, ModelState] = {}
        for name in names:
            if name.startswith("."):
                continue
            path = self.root / name
            if not path.is_dir():
                continue
            models[name] = self._scan_model(name, path)
        return RepositoryState(self.root, models)

    def fingerprint(self) -> bytes:
        """A hash over the tree's names, sizes and mtimes (what the watcher polls)."""
        digest = hashlib.blake2b(digest_size=16)
        try:
            names = sorted(os.listdir(self.root))
        except OSError as exc:
            digest.update(b"unreadable\0" + str(exc).encode("utf-8", "replace"))
            return digest.digest()
        for name in names:
            if name.startswith("."):
                continue
            path = self.root / name
            try:
                children = sorted(os.listdir(path))
            except OSError:
                continue  # a file, or unreadable: not a model
            digest.update(_field(os.fsencode(name)))
            digest.update(_stat_field(path / POLICY_FILE))
            for number in version_numbers(children):
                digest.update(_field(str(number).encode()))
                digest.update(_folder_fingerprint(path / str(number)))
        return digest.digest()

    def _scan_model(self, name: str, path: Path) -> ModelState:
        try:
            children = os.listdir(path)
        except OSError as exc:
            return ModelState(name, path, {}, None, f"cannot read {path}: {exc}")
        versions = {
            number: _folder_fingerprint(path / str(number))
            for number in version_numbers(children)
            if (path / str(number) / MANIFEST_FILE).is_file()
        }
        policy_path = path / POLICY_FILE
        try:
            raw = _read_small(policy_path)
        except FileNotFoundError:
            self._reported.pop(name, None)
            return ModelState(name, path, versions, DEFAULT_POLICY)
        except OSError as exc:
            return self._bad(name, path, versions, f"cannot read {policy_path}: {exc}", b"")
        try:
            policy = VersionPolicy.parse(json.loads(raw.decode("utf-8")), str(policy_path))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return self._bad(name, path, versions, f"{policy_path}: not JSON ({exc})", raw)
        except UsageError as exc:
            return self._bad(name, path, versions, exc.message, raw)
        self._reported.pop(name, None)
        return ModelState(name, path, versions, policy)

    def _bad(
        self, name: str, path: Path, versions: Mapping[int, bytes], problem: str, raw: bytes
    ) -> ModelState:
        if self._reported.get(name) != raw:  # once per distinct bad content
            self._reported[name] = raw
            log.error(
                "model %s: %s; keeping the versions it serves until it is fixed (%s)",
                name,
                problem,
                _POLICY_HINT,
            )
        return ModelState(name, path, versions, None, problem)


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def _stat_field(path: Path) -> bytes:
    try:
        st = os.stat(path)
    except OSError:
        return b"-"
    return b"+" + st.st_size.to_bytes(8, "big") + st.st_mtime_ns.to_bytes(12, "big", signed=True)


def _folder_fingerprint(path: Path) -> bytes:
    """Names, sizes and mtimes of the files directly in a version folder (a bundle is flat)."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return b"unreadable"
    for name in names:
        digest.update(_field(os.fsencode(name)))
        digest.update(_stat_field(path / name))
    return digest.digest()


def _read_small(path: Path) -> bytes:
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("not a regular file")
        data = os.read(fd, MAX_POLICY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_POLICY_BYTES:
        raise OSError(f"larger than {MAX_POLICY_BYTES} bytes")
    return data


class RepositoryWatcher:
    """Call ``sync(force)`` when the repository's fingerprint changes (polled every
    ``interval`` seconds, off the event loop) or when :meth:`poke` is called (SIGHUP:
    ``force=True`` retries refused versions too). One sync runs at a time; a failing sync is
    logged and the watcher goes on."""

    def __init__(
        self,
        repository: ModelRepository,
        sync: Callable[[bool], Awaitable[object]],
        *,
        interval: float = 1.0,
    ) -> None:
        if not interval > 0:
            raise UsageError(f"the repository interval must be > 0 seconds, got {interval!r}")
        self.repository = repository
        self.interval = float(interval)
        self._sync = sync
        self._poked = asyncio.Event()
        self._force = False
        self._task: asyncio.Task[None] | None = None
        self.fingerprint: bytes | None = None

    def start(self, fingerprint: bytes | None = None) -> None:
        """Start polling (from a running event loop); ``fingerprint``: the tree's as last
        synced, so an unchanged tree is not synced again."""
        self.fingerprint = fingerprint
        self._task = asyncio.create_task(self._run())

    def poke(self) -> None:
        """Sync as soon as possible, retrying refused versions (e.g. on SIGHUP)."""
        self._force = True
        self._poked.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._poked.wait(), self.interval)
            force, self._force = self._force, False
            self._poked.clear()
            try:
                fingerprint = await asyncio.to_thread(self.repository.fingerprint)
                if force or fingerprint != self.fingerprint:
                    self.fingerprint = fingerprint
                    await self._sync(force)
            except asyncio.CancelledError:
                raise
            except Exception:  # never stop watching
                log.exception("model repository sync failed")
