"""A fleet of edge servers of different speed, one SIGKILLed and restarted, per routing policy.

Usage:  python benchmarks/fleet.py [--model zoo:mobilenetv2] [--devices 32] [--duration 36]
                                   [--policies round-robin,least-outstanding,two-choice,ours]
                                   [--speeds 0.4,0.1,0.25] [--server-cpus 1]

Three `edgeoffload serve` processes on 127.0.0.1, each held to a fraction of one core by a CPU
cgroup and pinned to the server CPU; the last one is SIGKILLed half way through every run and
restarted on its port a sixth of the run later. This process plays the devices (asyncio
clients on the other CPU(s), one key and one connection per server each, closed loop), and
checks every answer bit for bit against the device running head and tail itself. The direct
capacity of each server is measured alone first. Writes benchmarks/results/fleet.{json,png}
and prints a table (see edgeoffload/lab/fleetbench.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgeoffload.lab.fleetbench import (
    DEFAULT_SPEEDS,
    POLICIES,
    fleet_benchmark,
    format_result,
    parse_policies,
)
from edgeoffload.lab.plots import plot_fleet

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="zoo:mobilenetv2")
    parser.add_argument("--cut", default=None, help="cut id (default: ~10%% of nodes on device)")
    parser.add_argument("--devices", type=int, default=32)
    parser.add_argument("--duration", type=float, default=36.0, help="measured s per policy")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured s per policy")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument(
        "--speeds",
        default=",".join(f"{s:g}" for s in DEFAULT_SPEEDS),
        help="fraction of one core per server; the last one is killed and restarted",
    )
    parser.add_argument("--restart-gap", type=float, default=None, help="s from kill to restart")
    parser.add_argument("--server-cpus", default=None, help="comma list (default: the last CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, default=RESULTS / "fleet.json")
    args = parser.parse_args(argv)
    started = time.monotonic()
    result = fleet_benchmark(
        args.model,
        cut=args.cut,
        devices=args.devices,
        policies=parse_policies(args.policies),
        duration_s=args.duration,
        warmup_s=args.warmup,
        restart_gap_s=args.restart_gap,
        speeds=[float(s) for s in args.speeds.split(",")],
        server_cpus=[int(c) for c in args.server_cpus.split(",")] if args.server_cpus else None,
        seed=args.seed,
        progress=lambda what: print(
            f"[{time.monotonic() - started:6.1f} s] {what}", file=sys.stderr, flush=True
        ),
    )
    data = result.to_dict()
    data["command"] = " ".join(
        ["python", "benchmarks/fleet.py", *(sys.argv[1:] if argv is None else argv)]
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(data, indent=1) + "\n")
    plot_fleet(data, args.output.with_suffix(".png"))
    print("\n".join(format_result(data)))
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
