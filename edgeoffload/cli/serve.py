"""``serve``: the edge server, serving bundle tails to allow-listed devices.

Bundles come from the command line, from a model repository (``--repository DIR``, laid out
``DIR/<model>/<version>/``, kept in sync while running: on a file change, and on SIGHUP), or
both; ``--trust`` makes every bundle carry a signature by a trusted publisher.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Annotated

import typer

from edgeoffload.bundle import load_bundle
from edgeoffload.cli._options import ThreadsOpt
from edgeoffload.cli._render import out
from edgeoffload.core.presets import parse_size
from edgeoffload.edge.allowlist import AllowList
from edgeoffload.errors import UsageError
from edgeoffload.keys import load_identity


def serve(
    bundles: Annotated[
        list[Path] | None,
        typer.Argument(help="Bundle folders whose tails to serve (or use --repository)."),
    ] = None,
    *,
    key: Annotated[Path, typer.Option("--key", help="Server key folder (keys generate).")],
    allow: Annotated[Path, typer.Option("--allow", help="Authorized device keys: file or folder.")],
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Port (0: any free port).")
    ] = 8765,
    threads: ThreadsOpt = 1,
    workers: Annotated[
        int, typer.Option("--workers", min=0, help="Concurrent tail runs (0: CPUs).")
    ] = 0,
    max_inflight: Annotated[
        int,
        typer.Option(
            "--max-inflight", min=0, help="Requests running or queued at once (0: 64 x workers)."
        ),
    ] = 0,
    per_device: Annotated[
        int,
        typer.Option(
            "--per-device",
            min=1,
            help="Requests one device may have running or queued (an allow-list quota=N wins).",
        ),
    ] = 4,
    queue_wait: Annotated[
        float,
        typer.Option(
            "--queue-wait",
            help="Seconds a request may wait for a worker (then 'overloaded' with a retry-after).",
        ),
    ] = 2.0,
    batch: Annotated[
        int,
        typer.Option(
            "--batch",
            min=0,
            help="Dynamic batching: stack stateless requests of one bundle into runs of up to "
            "N rows (0: off).",
        ),
    ] = 0,
    batch_delay: Annotated[
        float,
        typer.Option(
            "--batch-delay", min=0.0, help="With --batch: ms a request may be held, at most."
        ),
    ] = 2.0,
    idle_timeout: Annotated[
        float, typer.Option("--idle-timeout", help="Seconds before a silent device is dropped.")
    ] = 120.0,
    kv_budget: Annotated[
        str,
        typer.Option("--kv-budget", help="Decoders: KV-cache memory for all sessions (LRU)."),
    ] = "1GiB",
    session_ttl: Annotated[
        float, typer.Option("--session-ttl", help="Decoders: seconds an idle session is kept.")
    ] = 600.0,
    max_context: Annotated[
        int, typer.Option("--max-context", min=1, help="Decoders: positions per session.")
    ] = 4096,
    ready_file: Annotated[
        Path | None,
        typer.Option("--ready-file", help="Once listening, write host, port and pid here (JSON)."),
    ] = None,
    repository: Annotated[
        Path | None,
        typer.Option(
            "--repository",
            help="Model repository: DIR/<model>/<version>/ bundle folders (and an optional "
            "DIR/<model>/policy.json), loaded, served and drained while running.",
        ),
    ] = None,
    repository_interval: Annotated[
        float,
        typer.Option(
            "--repository-interval",
            min=0.05,
            help="Seconds between checks of the repository for changes (SIGHUP: at once).",
        ),
    ] = 1.0,
    trust: Annotated[
        Path | None,
        typer.Option(
            "--trust",
            help="Trusted publisher keys (file or folder): every bundle served must be signed "
            "by one of them.",
        ),
    ] = None,
    executor: Annotated[
        str,
        typer.Option(
            "--executor",
            help="Where stateless tails run: 'local' (this process's workers) or 'ray' (Ray "
            "Serve replicas on a Ray cluster; needs pip install 'edgeoffload[ray]'). "
            "Generation sessions (decoders) stay local.",
        ),
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="With --executor ray: the cluster to join (e.g. 10.0.0.5:6379, or 'auto'); "
            "default: start a Ray inside this process.",
        ),
    ] = None,
    ray_replicas: Annotated[
        int,
        typer.Option("--ray-replicas", min=1, help="With --executor ray: replicas per bundle."),
    ] = 1,
    ray_autoscale: Annotated[
        str | None,
        typer.Option(
            "--ray-autoscale",
            metavar="MIN:MAX",
            help="With --executor ray: autoscale each bundle's replicas between MIN and MAX "
            "(by requests in flight) instead of a fixed --ray-replicas.",
        ),
    ] = None,
    ray_cpus_per_replica: Annotated[
        float,
        typer.Option(
            "--ray-cpus-per-replica",
            min=0.01,
            help="With --executor ray: CPUs Ray reserves for each replica (its session uses "
            "--threads).",
        ),
    ] = 1.0,
    advertise: Annotated[
        bool,
        typer.Option(
            "--advertise/--no-advertise",
            help="Announce the server over mDNS/DNS-SD (_edgeoffload._tcp) on the interfaces "
            "it binds; devices still trust only keys they pinned.",
        ),
    ] = False,
) -> None:
    """Serve bundle tails to allow-listed devices over the encrypted protocol.

    Decoder bundles are served as generation sessions: the tail's KV cache of each
    conversation stays here (bounded by --kv-budget, --session-ttl and --max-context).

    With --repository, new versions are loaded without pausing the ones serving, and a
    version that leaves the policy drains: its devices finish on it, then it is unloaded.
    SIGHUP re-reads the allow-list and the repository.

    With --executor ray, stateless tails run on Ray Serve replicas (--ray-replicas per bundle,
    batched there with --batch), on this machine or the cluster at --ray-address.
    """
    # numpy, onnxruntime, websockets: loaded only when a server starts, not for --help.
    from edgeoffload.edge.advertise import Advertiser, advertised_addresses
    from edgeoffload.edge.server import EdgeServer, ServerConfig

    bundles = bundles or []
    if executor not in ("local", "ray"):
        raise UsageError(f"--executor {executor!r}: not an executor", hint="use local or ray")
    bounds = _autoscale_bounds(ray_autoscale)
    if executor == "ray":
        from edgeoffload.edge.rayexec import require_ray

        require_ray()  # a missing extra fails here, before any bundle is loaded
    if not bundles and repository is None:
        raise UsageError(
            "nothing to serve: give bundle folders, --repository DIR, or both",
            hint="e.g. edgeoffload serve --repository models/ (models/<model>/<version>/)",
        )
    trusted = _load_trusted(trust) if trust is not None else None
    loaded = [load_bundle(b, trusted=trusted) for b in bundles]
    if advertise:
        advertised_addresses(host)  # a --host that cannot be announced fails before serving
    identity = load_identity(key)
    allow_list = AllowList(allow)
    config = ServerConfig(
        host=host,
        port=port,
        threads=threads,
        workers=workers,
        max_inflight=max_inflight,
        per_device=per_device,
        queue_wait=queue_wait,
        batch_max=batch,
        batch_delay_ms=batch_delay,
        # From the environment, not argv: a token on the command line is visible in ps.
        metrics_token=os.environ.get("EDGEOFFLOAD_METRICS_TOKEN") or None,
        idle_timeout=idle_timeout,
        kv_budget=parse_size(kv_budget),
        session_ttl=session_ttl,
        max_context=max_context,
        repository_interval=repository_interval,
        executor=executor,
        ray_address=ray_address,
        ray_replicas=ray_replicas,
        ray_min_replicas=bounds[0] if bounds else None,
        ray_max_replicas=bounds[1] if bounds else None,
        ray_cpus_per_replica=ray_cpus_per_replica,
    )

    async def main_loop() -> None:
        server = EdgeServer(
            loaded,
            identity=identity,
            allow=allow_list,
            config=config,
            repository=repository,
            trusted=trusted,
        )
        await server.start()
        source = f" (repository {repository})" if repository is not None else ""
        out.print(
            f"serving {len(server.bundles)} bundle version(s){source} on ws://{host}:{server.port} "
            f"(key {identity.fingerprint}, {len(allow_list)} device key(s) allowed); "
            f"GET /healthz, /readyz, /metrics for status; SIGTERM drains and stops"
        )
        advertiser = None
        if advertise:  # before the ready file, so a script that waits for it can browse
            advertiser = Advertiser(
                host=host, port=server.port, public_key=identity.public, bundles=server.bundles
            )
            await advertiser.start()
            out.print(f"announced as {advertiser.name} on mDNS ({', '.join(advertiser.addresses)})")
        if ready_file is not None:  # for scripts: the port, without parsing the line above
            ready = {"host": host, "port": server.port, "pid": os.getpid()}
            partial = ready_file.with_name(ready_file.name + ".partial")
            partial.write_text(json.dumps(ready))
            os.replace(partial, ready_file)  # atomic: a reader never sees half a file
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def reload() -> None:  # SIGHUP: the allow-list and the repository, at once
            allow_list.try_reload()
            server.request_sync()

        loop.add_signal_handler(signal.SIGHUP, reload)
        await stop.wait()
        if advertiser is not None:  # goodbye first: devices stop finding a draining server
            await advertiser.stop()
        out.print("draining in-flight requests…")
        await server.shutdown()
        out.print(f"stopped: {server.stats.results} results, errors {server.stats.errors}")

    asyncio.run(main_loop())


def _load_trusted(path: Path) -> tuple[bytes, ...]:
    """Publisher keys from ``--trust`` (edgeoffload.signing, imported only when asked for)."""
    try:
        from edgeoffload.signing import load_trusted
    except ImportError as exc:  # pragma: no cover - an install without signing support
        raise UsageError(
            f"--trust needs bundle signing support, which this install lacks ({exc})",
            hint="upgrade edgeoffload, or serve without --trust",
        ) from None
    return tuple(load_trusted(path))


def _autoscale_bounds(text: str | None) -> tuple[int, int] | None:
    """``MIN:MAX`` (1 <= MIN <= MAX) as two ints; None when not given."""
    if text is None:
        return None
    low, sep, high = text.partition(":")
    if not sep or not low.isdigit() or not high.isdigit() or not 1 <= int(low) <= int(high):
        raise UsageError(
            f"--ray-autoscale {text!r}: expected MIN:MAX with 1 <= MIN <= MAX", hint="e.g. 1:4"
        )
    return int(low), int(high)
