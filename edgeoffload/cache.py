"""The one cache of built artefacts: exported ONNX models and converted model folders.

Everything edgeoffload builds once and reuses (the MiniLM and SmolLM2 exports, the tiny
decoders of ``zoo:tiny-llama``, exports of Hugging Face folders) lives in a folder under
:func:`cache_root` and is made by :func:`cached`: the build runs in a staging folder beside the
target, which gets an ``export.json`` recording the cache key and the sha256 of every file and
is then renamed into place, so a concurrent reader never sees a half-written folder. A later
call with the same key reuses the folder only when every recorded hash still matches.

Stdlib only (plus :func:`edgeoffload.bundle.sha256_file`): the converters and the split room
both use it.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from edgeoffload.bundle import sha256_file
from edgeoffload.errors import ConversionError

log = logging.getLogger("edgeoffload.cache")

RECORD_NAME = "export.json"


def cache_root() -> Path:
    """``$EDGEOFFLOAD_CACHE`` if that is set, else ``~/.cache/edgeoffload``."""
    root = os.environ.get("EDGEOFFLOAD_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "edgeoffload"


def versions(distributions: Iterable[str]) -> dict[str, str | None]:
    """Installed version of each distribution (None when absent): part of cache keys, since
    the tools' versions change what they build."""
    found: dict[str, str | None] = {}
    for name in distributions:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def cached(
    target: Path, key: Mapping[str, object], what: str, build: Callable[[Path], object]
) -> Path:
    """Return ``target`` if it holds an intact build for ``key``, else build it atomically.

    ``build`` writes into a staging folder beside ``target`` (what it returns is ignored),
    which is then renamed into place with an ``export.json`` holding ``key`` and the sha256 of
    every file. A folder that is not ours (no ``export.json``, not empty) is never deleted:
    ConversionError.
    """
    target = Path(target)
    if is_reusable(target, key):
        log.info("reusing the %s in %s", what, target)
        return target
    if target.exists() and not (
        target.is_dir() and ((target / RECORD_NAME).is_file() or not any(target.iterdir()))
    ):
        raise ConversionError(
            f"{target} exists and is not a {what} made by edgeoffload",
            hint="pass an empty or new folder, or delete this one if it is an old cache entry",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        started = time.perf_counter()
        build(staging)
        seconds = time.perf_counter() - started
        files: dict[str, str] = {}
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            path.chmod(0o644)  # safetensors are written 0600
            files[path.relative_to(staging).as_posix()] = sha256_file(path)
        record = {**key, "files": files, "build_seconds": round(seconds, 3)}
        (staging / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if target.exists():
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            # Someone else moved a fresh build in between; use it if it is valid.
            if not is_reusable(target, key):
                raise
            return target
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("built the %s in %s in %.1f s", what, target, seconds)
    return target


def is_reusable(target: Path, key: Mapping[str, object]) -> bool:
    """Whether ``target`` holds a build recorded with ``key`` whose every file is intact."""
    try:
        record = json.loads((target / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in key.items()):
        return False
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, digest in files.items():
        path = target / str(name)
        if not path.is_file() or sha256_file(path) != digest:
            return False
    return True
