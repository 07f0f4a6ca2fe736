"""The edge servers a device command talks to, from ``--server``, ``--server-key``, ``--fleet``
and ``--discover`` (used by ``run``, ``chat`` and ``fleet status``).

Every server comes with the key the device pins for it; discovery only adds addresses of
servers whose key was given here already (see :mod:`edgeoffload.device.discovery`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from edgeoffload.cli._render import err
from edgeoffload.errors import OffloadUnavailable, UsageError
from edgeoffload.keys import load_public

if TYPE_CHECKING:
    from edgeoffload.device.pool import EdgeEndpoint

DISCOVER_SECONDS = 2.0


def _pair(url: str, key_text: str, where: str) -> tuple[str, bytes]:
    if not url.startswith(("ws://", "wss://")):
        raise UsageError(f"{where}: {url!r} is not a ws:// or wss:// URL")
    return url, load_public(key_text)


def _fleet_file(path: Path) -> list[tuple[str, bytes]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read the fleet file {path}: {exc.strerror}") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2:
            raise UsageError(f"{path}:{number}: expected 'URL KEY', got {line.strip()!r}")
        pairs.append(_pair(words[0], words[1], f"{path}:{number}"))
    return pairs


def endpoints(
    servers: list[str] | None,
    server_keys: list[str] | None,
    fleet: Path | None,
    *,
    discover: bool = False,
    bundle_version: str | None = None,
) -> list[EdgeEndpoint]:
    """The servers to use, each with its pinned key, in the order given (then discovered)."""
    from edgeoffload.device.pool import EdgeEndpoint  # websockets: not for --help

    keys = [load_public(k) for k in server_keys or []]
    plain = [s for s in servers or [] if "=" not in s]
    pairs: list[tuple[str, bytes]] = []
    for value in servers or []:
        url, sep, key_text = value.partition("=")
        if sep:
            pairs.append(_pair(url, key_text, "--server"))
        elif len(plain) == 1 and len(keys) == 1:
            pairs.append(_pair(url, server_keys[0] if server_keys else "", "--server"))
        else:
            raise UsageError(
                f"--server {url}: which key? give it as --server {url}=KEY",
                hint="one --server may take its key from --server-key; several need URL=KEY",
            )
    if fleet is not None:
        pairs += _fleet_file(fleet)
    if discover:
        pairs += _discovered(keys + [k for _, k in pairs], bundle_version, pairs)
    if not pairs:
        raise UsageError(
            "no edge server given",
            hint="--server ws://HOST:PORT --server-key KEY, --server URL=KEY, --fleet FILE "
            "or --discover with --server-key",
        )
    seen: set[str] = set()
    unique = []
    for url, pinned in pairs:
        if url in seen:
            raise UsageError(f"edge server {url} is given twice")
        seen.add(url)
        unique.append(EdgeEndpoint(url, pinned))
    return unique


def _discovered(
    keys: list[bytes], bundle_version: str | None, known: list[tuple[str, bytes]]
) -> list[tuple[str, bytes]]:
    from edgeoffload.device.discovery import discover, trusted

    if not keys:
        raise UsageError(
            "--discover needs the keys of the servers to trust",
            hint="give them with --server-key (discovery finds addresses, never trust)",
        )
    found = asyncio.run(discover(DISCOVER_SECONDS))
    known_urls = {url for url, _ in known}
    kept = [p for p in trusted(found, keys, bundle=bundle_version) if p[0] not in known_urls]
    err.print(
        f"discovered {len(found)} edge server(s) on the local network, "
        f"{len(kept)} new with a trusted key"
    )
    if not kept and not known:
        raise OffloadUnavailable("no trusted edge server found on the local network")
    return kept
