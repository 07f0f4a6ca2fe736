"""The standing attack suite: honest devices must stay served while the server is attacked.

Usage:  python benchmarks/attack.py [--model zoo:mobilenetv2] [--duration 20]
                                    [--cases baseline,hog,unauth-frames,...] [--connections 1000]
                                    [--requests 1000] [--soak-requests 100000] [--kills 100]

One `edgeoffload serve` process on 127.0.0.1 (one worker, pinned to the last CPU); per case an
attacker process attacks it while an honest device in this process sends requests one after
another, each checked bit for bit against the device running head and tail itself. Writes
benchmarks/results/attack.json and prints a table: case, what the server did, honest success,
p50/p99, and the server's RSS before / at its peak / after (see edgeoffload/lab/attackbench.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgeoffload.lab.attackbench import CASES, attack_benchmark, format_result

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="zoo:mobilenetv2")
    parser.add_argument("--cut", default=None, help="cut id (default: ~10%% of nodes on device)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per case")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--connections", type=int, default=1000, help="unauth-frames case")
    parser.add_argument("--workers", type=int, default=16, help="flood cases")
    parser.add_argument("--requests", type=int, default=1000, help="per device, devices-64")
    parser.add_argument("--soak-requests", type=int, default=100_000, help="soak, in all")
    parser.add_argument("--kills", type=int, default=100, help="sigkill case")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS / "attack.json")
    args = parser.parse_args(argv)
    started = time.monotonic()
    result = attack_benchmark(
        args.model,
        cut=args.cut,
        cases=[c for c in args.cases.split(",") if c],
        duration_s=args.duration,
        connections=args.connections,
        workers=args.workers,
        requests=args.requests,
        soak_requests=args.soak_requests,
        kills=args.kills,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    print("\n".join(format_result(result)))
    print(f"({time.monotonic() - started:.0f} s; wrote {args.output})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
