"""``fleet status``: what each known edge server says about itself, as a table."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgeoffload.cli._fleet import endpoints
from edgeoffload.cli._options import (
    DeviceKeyOpt,
    DiscoverOpt,
    FleetFileOpt,
    ServerKeyOpt,
    ServerUrlOpt,
    TimeoutOpt,
)
from edgeoffload.cli._render import out
from edgeoffload.errors import EdgeOffloadError
from edgeoffload.keys import load_identity

if TYPE_CHECKING:
    from edgeoffload.device.pool import EdgeEndpoint
    from edgeoffload.keys import KeyPair
    from edgeoffload.manifest import Manifest

fleet_app = typer.Typer(help="Several edge servers: what they report.", no_args_is_help=True)


@fleet_app.command("status")
def fleet_status(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder (connections name a bundle).")],
    key: DeviceKeyOpt,
    server: ServerUrlOpt = None,
    server_key: ServerKeyOpt = None,
    fleet: FleetFileOpt = None,
    discover: DiscoverOpt = False,
    timeout: TimeoutOpt = 3.0,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per server.")] = False,
) -> None:
    """Ping every server and ask its load (PROTOCOL.md §14): address, key fingerprint, RTT,
    requests in flight and queued, workers, draining, hosted bundle versions."""
    import json

    from edgeoffload.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    found = endpoints(
        server, server_key, fleet, discover=discover, bundle_version=bundle.manifest.version
    )
    identity = load_identity(key)
    rows = asyncio.run(_statuses(found, identity, bundle.manifest, timeout))
    if json_out:
        for row in rows:
            out.print_json(json.dumps(row))
        return
    from rich.table import Table

    table = Table(title=f"edge servers for bundle {bundle.manifest.version}")
    for column in ("server", "key", "RTT ms", "in flight", "queued", "workers", "tail ms"):
        table.add_column(column, justify="right" if "ms" in column else "left")
    table.add_column("bundles")
    table.add_column("state")
    for row in rows:
        table.add_row(
            row["url"],
            row["fingerprint"],
            _num(row.get("rtt_ms")),
            _num(row.get("inflight")),
            _num(row.get("queued")),
            _num(row.get("workers")),
            _num(row.get("tail_ms")),
            ", ".join(row.get("bundles", [])),
            row["state"],
        )
    out.print(table)


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


async def _statuses(
    found: list[EdgeEndpoint], identity: KeyPair, manifest: Manifest, timeout: float
) -> list[dict[str, Any]]:
    from edgeoffload.device.link import ServerLink

    async def one(endpoint: EdgeEndpoint) -> dict[str, Any]:
        link = ServerLink(
            endpoint.url,
            endpoint.key,
            identity=identity,
            manifest=manifest,
            max_message=1 << 20,
            connect_timeout=timeout,
        )
        row: dict[str, Any] = {"url": endpoint.url, "fingerprint": link.fingerprint}
        try:
            row["rtt_ms"] = round(await link.ping(timeout=timeout), 3)
            status = await link.status(timeout=timeout)
        except EdgeOffloadError as exc:
            row["state"] = f"error: {exc}"
            return row
        finally:
            await link.close()
        load = status.load
        row.update(
            inflight=load.inflight,
            queued=load.queued,
            workers=load.workers,
            tail_ms=load.tail_ms,
            kv_free=load.kv_free,
            bundles=[b.version for b in status.bundles],
            state="draining" if load.draining else "ok",
        )
        return row

    return list(await asyncio.gather(*(one(e) for e in found)))
