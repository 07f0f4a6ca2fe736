"""Head updates, the server's side (PROTOCOL.md §16): offers and file downloads.

A device that connects with version ``v`` of a model, on a connection that negotiated the
``"update"`` feature, is told in its welcome (and in ``status`` replies) about the newest
version the server serves of the same model — what the model repository's
``server.latest_for(v)`` returns, or during a rollout the plan's target for the devices in its
share (:mod:`edgeoffload.edge.rollout`) — and may download that version's ``manifest.json``,
``signature.json`` and head part with ``fetch`` requests. Nothing else is fetchable: not the
tail (it stays on the server), not another model's files, not a path. The device verifies
everything it downloads against the signed manifest; the server only serves bytes.

Fetches are answered in line, before the connection's next message is read: one piece of at
most ``MAX_FETCH`` bytes in flight per connection, so a device that downloads cannot crowd out
the tails (it is slowed by TCP back-pressure like any other reader).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed

from edgeoffload.bundle import MANIFEST
from edgeoffload.edge.peer import Peer
from edgeoffload.edge.repository import HostedVersion
from edgeoffload.edge.rollout import PlanReader, in_share
from edgeoffload.errors import EdgeOffloadError, ManifestError
from edgeoffload.manifest import Manifest
from edgeoffload.protocol.connection import ServerConnection
from edgeoffload.protocol.events import FetchRequest
from edgeoffload.protocol.updates import UpdateOffer
from edgeoffload.signing import SIGNATURE

log = logging.getLogger("edgeoffload.edge.updates")


class FetchRefused(EdgeOffloadError):
    """A fetch the server does not answer with data (the ``fetch`` error code, §16.3)."""


class UpdateService:
    """Offers and fetches for one server.

    ``server.latest_for(version)`` (the model repository's) maps a bundle version to the
    newest serving version of the same model, None when there is none newer; it is looked up
    at every use, so versions loaded or drained at runtime are seen at once. A server
    without it offers nothing.
    """

    def __init__(self, server: Any) -> None:
        self._server = server
        self._manifests: dict[Path, tuple[int, Manifest]] = {}
        self._plans = PlanReader()

    def latest(self, version: str) -> HostedVersion | None:
        latest_for: Callable[[str], HostedVersion | None] | None = getattr(
            self._server, "latest_for", None
        )
        if latest_for is None:
            return None
        newer = latest_for(version)
        return newer if newer is not None and newer.version != version else None

    def target(self, version: str, device_key: bytes) -> HostedVersion | None:
        """The version the device ``device_key`` on ``version`` should move to.

        Without a rollout plan (``rollout.json`` in the model's repository folder, see
        :mod:`edgeoffload.edge.rollout`): the newest serving version of its model. With one:
        the plan's target, and only for the devices in the plan's share.
        """
        hosted_versions: Callable[[], list[HostedVersion]] | None = getattr(
            self._server, "hosted_versions", None
        )
        views = hosted_versions() if hosted_versions is not None else []
        current = next((v for v in views if v.version == version), None)
        if current is None or current.model is None:
            return self.latest(version)
        plan = self._plans.plan(Path(current.path).parent)
        if plan is None:
            return self.latest(version)
        if not in_share(device_key, current.model, plan.share):
            return None
        return next(
            (
                v
                for v in views
                if v.model == current.model
                and v.number == plan.target
                and v.state == "serving"
                and v.version != version
            ),
            None,
        )

    def offer(self, version: str, device_key: bytes) -> UpdateOffer | None:
        """The update offered to a device on ``version`` (welcome and status, §16.1)."""
        newer = self.target(version, device_key)
        if newer is None:
            return None
        model = newer.model or newer.identity  # latest_for names repository versions only
        return UpdateOffer(newer.version, newer.identity, model, int(newer.number or 0))

    def _manifest(self, folder: Path) -> Manifest:
        path = folder / MANIFEST
        stamp = path.stat().st_mtime_ns
        cached = self._manifests.get(folder)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        manifest = Manifest.from_dict(json.loads(path.read_text()))
        self._manifests[folder] = (stamp, manifest)
        return manifest

    def fetchable(self, folder: Path, name: str) -> Path:
        """The file ``name`` of the bundle in ``folder``, if a device may download it: the
        manifest, the signature, the manifest's head part and its ORT-format copy."""
        allowed = {MANIFEST, SIGNATURE}
        manifest = self._manifest(folder)
        if manifest.head is not None:
            allowed.add(manifest.head.file)
        if manifest.ort is not None and manifest.ort.head is not None:
            allowed.add(manifest.ort.head.file)
        if name not in allowed:
            raise FetchRefused(f"{name!r} is not a fetchable file of this bundle")
        return folder / name

    def read(self, folder: Path, name: str, offset: int, length: int) -> tuple[bytes, int]:
        """``length`` bytes at ``offset`` of a fetchable file, and the file's size."""
        try:
            path = self.fetchable(folder, name)
            with path.open("rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if offset > size:
                    raise FetchRefused(f"offset {offset} is past the end of {name} ({size} bytes)")
                fh.seek(offset)
                return fh.read(length), size
        except FileNotFoundError:
            raise FetchRefused(f"this bundle has no {name}") from None
        except (OSError, ValueError, ManifestError) as exc:
            raise FetchRefused(f"{name} cannot be read: {exc}") from None

    async def serve_fetch(self, peer: Peer, event: FetchRequest) -> None:
        """Answer one ``fetch`` with a ``file`` or a ``fetch`` error."""
        hosted = peer.connection.bundle
        newer = self.target(hosted.version, peer.public_key) if hosted is not None else None
        try:
            if newer is None or event.version != newer.version:
                raise FetchRefused(f"version {event.version} is not offered to this connection")
            data, size = await asyncio.to_thread(
                self.read, Path(newer.path), event.file, event.offset, event.length
            )
        except FetchRefused as exc:
            await peer.reply_error(event.request_id, "fetch", exc.message)
            return
        with contextlib.suppress(ConnectionClosed):
            await peer.send(ServerConnection.send_file, event.request_id, data, size)
