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


# -- rolling upgrades (edgeoffload.edge.rollout) --------------------------------------------------

RepositoryOpt = Annotated[
    list[Path],
    typer.Option(
        "--repository",
        help="A server's model repository (serve --repository); repeat, one per server.",
    ),
]
MetricsOpt = Annotated[
    list[str],
    typer.Option(
        "--metrics",
        help="That server's metrics URL (http://HOST:PORT/metrics), in --repository order.",
    ),
]
MetricsTokenOpt = Annotated[
    str | None,
    typer.Option(
        "--metrics-token",
        envvar="EDGEOFFLOAD_METRICS_TOKEN",
        help="Bearer token of the servers' /metrics, when they require one.",
    ),
]
TrustOpt = Annotated[
    list[Path] | None,
    typer.Option("--trust", help="Trusted publisher keys: the new version must be signed."),
]


def _fleet_servers(repositories: list[Path], metrics: list[str], token: str | None) -> list[Any]:
    from edgeoffload.edge.rollout import FleetServer
    from edgeoffload.errors import UsageError

    if not repositories or len(repositories) != len(metrics):
        raise UsageError(
            "give one --metrics URL per --repository (one pair per server)",
            hint="e.g. --repository /srv/a/models --metrics http://10.0.0.5:8765/metrics",
        )
    return [FleetServer(r, m, token) for r, m in zip(repositories, metrics, strict=True)]


def _percent(text: str) -> float:
    from edgeoffload.errors import UsageError

    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise UsageError(f"{text!r} is not a share (10%, or 0.1)") from None
    if not 0 < value <= 1:
        raise UsageError(f"a share must be in (0, 100%], got {text!r}")
    return value


def _trusted(trust: list[Path] | None) -> tuple[bytes, ...] | None:
    if not trust:
        return None
    from edgeoffload.signing import load_trusted

    keys: list[bytes] = []
    for path in trust:
        keys.extend(load_trusted(path))
    return tuple(keys)


def _print_report(report: Any, json_out: bool) -> None:
    import dataclasses
    import json

    if json_out:
        out.print_json(json.dumps(dataclasses.asdict(report)))
        return
    from rich.table import Table

    table = Table(title=f"{report.model}: {report.previous} -> {report.target} ({report.outcome})")
    for column in ("phase", "share", "seconds", "answered", "failures", "note"):
        table.add_column(column, justify="left" if column in ("phase", "note") else "right")
    for s in report.steps:
        table.add_row(
            s.phase, f"{s.share:.0%}", f"{s.seconds:.1f}", f"{s.answered:.0f}",
            f"{s.failures:.0f}", s.note,
        )  # fmt: skip
    out.print(table)
    out.print(f"took {report.seconds:.1f} s")


@fleet_app.command("rollout")
def fleet_rollout(
    model: Annotated[str, typer.Argument(help="Model folder name in the repositories.")],
    version: Annotated[int, typer.Argument(help="Version number to roll out.", min=1)],
    repository: RepositoryOpt,
    metrics: MetricsOpt,
    canary: Annotated[str, typer.Option(help="Share of devices offered it first.")] = "10%",
    step: Annotated[
        list[str] | None, typer.Option("--step", help="Later shares (repeat); then 100%.")
    ] = None,
    watch: Annotated[float, typer.Option(help="Seconds each share is watched.", min=0)] = 10.0,
    max_failure_rate: Annotated[
        float, typer.Option(help="Failures per answer that roll it back.", min=0)
    ] = 0.01,
    retire_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the old version to drain.", min=0)
    ] = 600.0,
    trust: TrustOpt = None,
    metrics_token: MetricsTokenOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="The report as JSON.")] = False,
) -> None:
    """Roll MODEL to VERSION on every server: verify it everywhere, load it beside the old one,
    offer it to a canary share of devices, widen step by step while watching each server's
    failures, then retire the old version (it unloads once its last device moved). A rise in
    failures rolls back. Servers run `serve --repository`; this writes their repositories."""
    from edgeoffload.edge.rollout import run_rollout

    shares = sorted({_percent(canary), *(_percent(s) for s in step or ["50%"]), 1.0})
    report = run_rollout(
        _fleet_servers(repository, metrics, metrics_token),
        model,
        version,
        shares=shares,
        watch=watch,
        max_failure_rate=max_failure_rate,
        retire_timeout=retire_timeout,
        trusted=_trusted(trust),
        progress=lambda line: out.print(line) if not json_out else None,
    )
    _print_report(report, json_out)


@fleet_app.command("rollback")
def fleet_rollback(
    model: Annotated[str, typer.Argument(help="Model folder name in the repositories.")],
    version: Annotated[int, typer.Argument(help="Version number to go back to.", min=1)],
    repository: RepositoryOpt,
    metrics: MetricsOpt,
    retire_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the other versions to drain.", min=0)
    ] = 600.0,
    trust: TrustOpt = None,
    metrics_token: MetricsTokenOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="The report as JSON.")] = False,
) -> None:
    """Move every device of MODEL back to VERSION (still in the repositories) and retire the
    versions rolled back from once their devices moved."""
    from edgeoffload.edge.rollout import run_rollback

    report = run_rollback(
        _fleet_servers(repository, metrics, metrics_token),
        model,
        version,
        retire_timeout=retire_timeout,
        trusted=_trusted(trust),
        progress=lambda line: out.print(line) if not json_out else None,
    )
    _print_report(report, json_out)


@fleet_app.command("plan")
def fleet_plan(
    repository: RepositoryOpt,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per model.")] = False,
) -> None:
    """What each repository serves and offers: its models' version folders, load policy and
    rollout plan (target, share, phase)."""
    import json

    from edgeoffload.edge.repository import ModelRepository
    from edgeoffload.edge.rollout import PlanReader, RolloutPlan

    reader = PlanReader()
    entries: list[tuple[str, str, tuple[int, ...], str, RolloutPlan | None]] = []
    for root in repository:
        for name, model in sorted(ModelRepository(root).scan().models.items()):
            policy = model.policy.describe() if model.policy else f"malformed: {model.problem}"
            entries.append((str(root), name, model.numbers, policy, reader.plan(model.path)))
    if json_out:
        for root_text, name, numbers, policy, plan in entries:
            row = {
                "repository": root_text,
                "model": name,
                "versions": list(numbers),
                "policy": policy,
                "rollout": plan.to_dict() if plan else None,
            }
            out.print_json(json.dumps(row))
        return
    from rich.table import Table

    table = Table(title="model repositories")
    for column in ("repository", "model", "versions", "policy", "offer"):
        table.add_column(column)
    for root_text, name, numbers, policy, plan in entries:
        offer = f"{plan.target} to {plan.share:.0%} ({plan.phase})" if plan else "newest"
        table.add_row(root_text, name, ", ".join(map(str, numbers)), policy, offer)
    out.print(table)
