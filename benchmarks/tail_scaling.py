"""Scale the tail: the edge server's throughput and p50/p99 at 1, 8, 32 and 64 devices with
(a) the worker pool, (b) dynamic batching, (c) Ray Serve with 2 replicas — each row against
direct onnxruntime on the same tail, measured beside it in the same run.

Usage:  python benchmarks/tail_scaling.py [--clients 1,8,32,64] [--requests 10] [--batch 16]
                                          [--modes pool,batch,ray]

Runs benchmarks/server_throughput.py once per mode (the same model, cut and devices; Ray in a
network namespace of its own: ``unshare -n``, loopback only, because Ray binds every
interface) and writes benchmarks/results/tail_scaling.{json,png} with one table. The batched
LLM decode steps have their own benchmark (benchmarks/llm_batching.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LABELS = {"pool": "worker pool", "batch": "dynamic batching", "ray": "Ray Serve, 2 replicas"}


def run_mode(mode: str, args: argparse.Namespace, out: Path) -> dict[str, Any] | str:
    """One server_throughput run; its result, or why it did not run."""
    cmd = [
        sys.executable,
        str(HERE / "server_throughput.py"),
        "--clients",
        args.clients,
        "--requests",
        str(args.requests),
        "--cap",
        str(args.cap),
        "-o",
        str(out),
    ]
    if mode == "batch":
        cmd += ["--batch", str(args.batch)]
    if mode == "ray":
        if shutil.which("unshare") is None or shutil.which("ip") is None:
            return "unshare or ip missing: Ray runs only in a network namespace of its own"
        cmd += ["--executor", "ray", "--ray-replicas", "2", "--batch", str(args.batch)]
        cmd = ["unshare", "-n", "sh", "-c", "ip link set lo up && exec " + shlex.join(cmd)]
    print(f"== {LABELS[mode]}: {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, text=True, capture_output=True, timeout=3600)
    print(proc.stdout[-4000:], flush=True)
    if proc.returncode != 0:
        return f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def plot(modes: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, lat) = plt.subplots(1, 2, figsize=(11, 4.5))
    for mode, result in modes.items():
        rows = result["rows"]
        clients = [r["clients"] for r in rows]
        line = ax.plot(clients, [r["req_s"] for r in rows], marker="o", label=LABELS[mode])[0]
        ax.plot(
            clients,
            [r["direct"]["req_s"] for r in rows],
            linestyle="none",
            marker="x",
            color=line.get_color(),
        )
        lat.plot(clients, [r["p99_ms"] for r in rows], marker="^", label=f"{LABELS[mode]} p99")
    clients = [r["clients"] for r in next(iter(modes.values()))["rows"]]
    for axis in (ax, lat):
        axis.set_xscale("log", base=2)
        axis.set_xticks(clients, [str(c) for c in clients])
        axis.set_xlabel("concurrent devices")
        axis.legend(fontsize=8)
    ax.set_ylabel("requests / s (x: direct ORT beside each row)")
    ax.set_ylim(bottom=0)
    lat.set_yscale("log")
    lat.set_ylabel("ms")
    ax.set_title("throughput")
    lat.set_title("p99 latency")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,8,32,64")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cap", type=float, default=150.0)
    parser.add_argument("--modes", default="pool,batch,ray")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="tail-scaling-") as tmp:
        for mode in args.modes.split(","):
            got = run_mode(mode, args, Path(tmp) / f"{mode}.json")
            if isinstance(got, str):
                skipped[mode] = got
                print(f"{mode}: not run: {got}", flush=True)
            else:
                results[mode] = got
    print(
        f"\n{'mode':<24} {'devices':>7} {'req/s':>7} {'direct':>7} {'ratio':>6} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
    )
    for mode, result in results.items():
        for r in result["rows"]:
            print(
                f"{LABELS[mode]:<24} {r['clients']:>7} {r['req_s']:>7.1f} "
                f"{r['direct']['req_s']:>7.1f} {r['ratio_to_direct']:>6.2f} "
                f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['errors']:>6}"
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "tail_scaling.json"
    summary = {
        "benchmark": "tail_scaling",
        "command": " ".join(["python", "benchmarks/tail_scaling.py", *sys.argv[1:]]),
        "skipped": skipped,
        "modes": results,
    }
    out.write_text(json.dumps(summary, indent=1) + "\n")
    if results:
        plot(results, out.with_suffix(".png"))
    print(f"wrote {out}")
    return 0 if not skipped else 1


if __name__ == "__main__":
    raise SystemExit(main())
