"""Edge server throughput under 1..64 concurrent devices vs direct onnxruntime (same cores).

Usage:  python benchmarks/server_throughput.py [--model zoo:mobilenetv2] [--clients 1,8,32,64]
                                               [--requests 10] [--workers 0] [--cap 120]
                                               [--batch 0] [--executor local|ray]
                                               [--ray-replicas 2] [--ray-cpus-per-replica 1]

One `edgeoffload serve` process on 127.0.0.1 hosts the tail of the model cut early (the tail
carries most of the compute); this process plays the devices (asyncio clients, one key and one
connection each), every device sending a bounded number of sequential requests. The baseline,
in the same run, is the tail's onnxruntime session called directly from a thread pool as wide
as the server's worker pool. Writes benchmarks/results/server_throughput.{json,png} and prints
a table.

``--executor ray`` runs the tails on Ray Serve replicas (a Ray the server starts inside itself,
``--ray-replicas`` of them) against the same direct baseline, and writes
``server_throughput_ray.{json,png}`` instead. Ray binds every interface it finds: run it in a
network namespace of its own, where only the loopback exists::

    unshare -n sh -c 'ip link set lo up && python benchmarks/server_throughput.py --executor ray'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edgeoffload.lab.loadtest import server_throughput

RESULTS = Path(__file__).resolve().parent / "results"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    clients = [r["clients"] for r in rows]
    fig, (ax, lat) = plt.subplots(1, 2, figsize=(11, 4.5))
    on_ray = result.get("executor") == "ray"
    server = f"edge server, {result['ray_replicas']} Ray replicas" if on_ray else "edge server"
    ax.plot(clients, [r["req_s"] for r in rows], marker="o", label=f"{server} (end to end)")
    base = result["baseline"]["req_s"]
    ax.axhline(
        base, color="grey", linestyle="--", label=f"direct ORT tail, median ({base:.0f} req/s)"
    )
    ax.plot(
        clients,
        [r["direct"]["req_s"] for r in rows],
        linestyle="none",
        marker="x",
        color="grey",
        label="direct ORT, measured beside each row",
    )
    ax.axhline(0.8 * base, color="grey", linestyle=":", linewidth=1, label="0.8 x direct")
    ax.set_xscale("log", base=2)
    ax.set_xticks(clients, [str(c) for c in clients])
    ax.set_xlabel("concurrent devices")
    ax.set_ylabel("requests / s")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right")
    ax.set_title("throughput")
    lat.plot(clients, [r["p50_ms"] for r in rows], marker="o", label="p50 end to end")
    lat.plot(clients, [r["p99_ms"] for r in rows], marker="^", label="p99 end to end")
    lat.plot(
        clients, [r["server_p50_ms"] for r in rows], marker="s", label="p50 server (queue + tail)"
    )
    lat.axhline(result["baseline"]["p50_ms"], color="grey", linestyle="--", label="p50 direct ORT")
    lat.set_xscale("log", base=2)
    lat.set_yscale("log")
    lat.set_xticks(clients, [str(c) for c in clients])
    lat.set_xlabel("concurrent devices")
    lat.set_ylabel("latency ms")
    lat.legend(loc="upper left")
    lat.set_title("latency")
    pinned = f" (server pinned to {result['server_cpus']})" if result["server_cpus"] else ""
    fig.suptitle(
        f"{result['model']} cut {result['cut']} (tail {result['tail_share']:.0%} of compute), "
        f"{result['workers']} server worker(s), {result['cpus']} CPU(s){pinned}, "
        f"{result['requests_per_client']} requests per device"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(result: dict[str, Any]) -> str:
    base = result["baseline"]
    lines = [
        f"{result['model']} cut {result['cut']} ({result['cut_after']}, "
        f"{result['crossing_bytes'] / 1024:.0f} KiB crossing), head {result['head_ms']:.2f} ms, "
        f"tail {result['tail_ms']:.2f} ms ({result['tail_share']:.0%} of compute); "
        f"{result['workers']} server worker(s) on {result['cpus']} CPU(s)"
        + (f", batching up to {result['batch']}" if result.get("batch") else "")
        + (
            f", tails on {result['ray_replicas']} Ray Serve replica(s)"
            if result.get("executor") == "ray"
            else ""
        )
        + (
            f"; server pinned to CPUs {result['server_cpus']}, devices to {result['device_cpus']}"
            if result["server_cpus"]
            else "; server and devices share the CPUs"
        ),
        f"direct ORT baseline (median of the rows'): {base['req_s']:.1f} req/s, "
        f"p50 {base['p50_ms']:.2f} ms, "
        f"p99 {base['p99_ms']:.2f} ms, {base['cpu_ms_per_request']:.2f} CPU ms/request, "
        f"{base['own_cores']:.2f} cores busy (machine: {base['machine_busy_cores']:.2f})",
        "",
        f"{'clients':>7} {'requests':>8} {'wall s':>7} {'req/s':>7} {'direct':>7} {'ratio':>6} "
        f"{'p50 ms':>8} "
        f"{'p99 ms':>8} {'srv p50':>8} {'errors':>6} {'srv CPU':>8} {'cli CPU':>8} "
        f"{'own':>5} {'busy':>5} {'cpu-r':>6} {'cpu-rs':>6}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['clients']:>7} {r['requests']:>8} {r['wall_s']:>7.2f} {r['req_s']:>7.1f} "
            f"{r['direct']['req_s']:>7.1f} {r['ratio_to_direct']:>6.2f} "
            f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
            f"{r['server_p50_ms']:>8.2f} {r['errors']:>6} "
            f"{r['server_cpu_ms_per_request']:>8.2f} {r['client_cpu_ms_per_request']:>8.2f} "
            f"{r['own_cores']:>5.2f} {r['machine_busy_cores']:>5.2f} "
            f"{r['cpu_ratio_shared_cores']:>6.2f} {r['cpu_ratio_server_only']:>6.2f}"
        )
    lines += [
        "",
        "(srv/cli CPU: CPU ms per request of the server / the device process; own: cores kept "
        "busy by both; busy: cores busy machine-wide, other load included; cpu-r / cpu-rs: "
        "ratio the CPU accounting predicts on an otherwise idle machine, devices on the same "
        "cores / elsewhere)",
        f"memory per connection ({result['memory_per_connection_clients']} connections): "
        f"{result['memory_per_connection_kib']} KiB of server RSS",
    ]
    if result["capped"]:
        lines.append(f"CAPPED at {result['duration_cap_s']} s: some requests were not issued")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="zoo:mobilenetv2")
    parser.add_argument("--cut", default=None, help="cut id (default: light head, ~5%% of nodes)")
    parser.add_argument("--clients", default="1,8,32,64", help="comma-separated device counts")
    parser.add_argument("--requests", type=int, default=10, help="sequential requests per device")
    parser.add_argument("--workers", type=int, default=0, help="server workers (0: CPU count)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per tail run")
    parser.add_argument(
        "--server-cpus",
        default=None,
        help="comma-separated CPU ids to pin the server and the direct baseline to; the "
        "devices get the other CPUs (default: no pinning)",
    )
    parser.add_argument(
        "--batch", type=int, default=0, help="server dynamic batching: rows per run (0: off)"
    )
    parser.add_argument(
        "--executor", choices=("local", "ray"), default="local", help="the server's --executor"
    )
    parser.add_argument("--ray-replicas", type=int, default=2, help="with --executor ray")
    parser.add_argument("--ray-cpus-per-replica", type=float, default=1.0, help="with ray")
    parser.add_argument("--cap", type=float, default=120.0, help="stop issuing after this many s")
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args()
    if args.output is None:  # a Ray run never overwrites the local executor's results
        suffix = "_ray" if args.executor == "ray" else ""
        args.output = RESULTS / f"server_throughput{suffix}.json"
    clients = tuple(int(c) for c in args.clients.split(",") if c.strip())
    result = server_throughput(
        args.model,
        cut=args.cut,
        clients=clients,
        requests_per_client=args.requests,
        workers=args.workers,
        threads=args.threads,
        duration_cap_s=args.cap,
        server_cpus=[int(c) for c in args.server_cpus.split(",")] if args.server_cpus else None,
        batch=args.batch,
        executor=args.executor,
        ray_replicas=args.ray_replicas,
        ray_cpus_per_replica=args.ray_cpus_per_replica,
        progress=lambda what, fraction: print(f"[{fraction:4.0%}] {what}", file=sys.stderr),
    ).to_dict()
    result["command"] = " ".join(["python", *sys.argv])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.output.with_suffix(".png"))
    print(table(result))
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
