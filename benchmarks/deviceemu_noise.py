"""Timing noise of the CPU-quota device emulator for millisecond-scale heads.

Usage:  python benchmarks/deviceemu_noise.py [--repeats 60] [--classes rpi4 pi-zero-2 phone-mid]
        [--work-ms 1 10] [-o benchmarks/results/deviceemu_noise.json]

For each device class (its CPU fraction f from :data:`edgeoffload.lab.deviceemu.DEVICE_CLASSES`)
and each op size (``--work-ms``: CPU milliseconds at full speed), a child held to f of a core
runs the op ``--repeats`` times and times each run (wall and its own CPU time). A device f
times as fast would take ``cpu / f``; the emulator's error is ``wall / (cpu / f)`` (1.0 is
exact). Two
patterns: back to back, and with a 20 ms idle gap before each run — what a head does while
the device waits for the server's answer, and where a quota that refilled during the gap lets
the op run at full speed.

Writes the medians and the 10th-90th percentile spread of that ratio as JSON and prints them.
Modes: ``quota`` (the CFS bandwidth cgroup; needs root) and ``pace`` (the SIGSTOP/SIGCONT
pacer of :mod:`edgeoffload.lab.pacer`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgeoffload.lab.deviceemu import DEVICE_CLASSES, CpuLimitedProcess, cpu_limit_method

RESULTS = Path(__file__).resolve().parent / "results"

# The child: calibrate a busy loop to WORK ms of CPU time (thread_time is not slowed by the
# quota), then time REPEATS runs, optionally after an idle GAP, and print the wall times.
CHILD = r"""
import json, sys, time
work_ms, repeats, gap_ms = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
k = int(sys.argv[5])
def spin(n):
    x = 0
    for i in range(n):
        x += i * i
    return x
n = 1000
while True:
    t0 = time.thread_time(); spin(n); dt = (time.thread_time() - t0) * 1e3
    if dt > 20: break
    n *= 2
n = max(1, int(n * work_ms / dt))
walls = []
for _ in range(repeats):
    if gap_ms:
        time.sleep(gap_ms / 1e3)
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(k):
        spin(n)
    walls.append(((time.perf_counter() - t0) * 1e3 / k, (time.thread_time() - c0) * 1e3 / k))
print(json.dumps(walls))
"""


def measure(fraction: float, work_ms: float, repeats: int, gap_ms: float, mode: str) -> list[float]:
    cmd = [sys.executable, "-c", CHILD, str(work_ms), str(repeats), str(gap_ms), mode, "1"]
    pace = mode == "pace"
    with CpuLimitedProcess(cmd, fraction, stdout=subprocess.PIPE, text=True, pace=pace) as proc:
        out, _ = proc.popen.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"child failed ({proc.returncode})")
    return list(json.loads(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--classes", nargs="+", default=["rpi4", "pi-zero-2", "phone-mid"])
    parser.add_argument("--work-ms", nargs="+", type=float, default=[1.0, 10.0])
    parser.add_argument("--modes", nargs="+", default=["quota", "pace"], choices=["quota", "pace"])
    parser.add_argument("-o", "--output", type=Path, default=RESULTS / "deviceemu_noise.json")
    args = parser.parse_args()
    method = cpu_limit_method()
    if method == "none":
        print("no CPU cgroup here: the child would run unthrottled; nothing to measure")
        return
    rows = []
    for mode, name, work, gap in itertools.product(
        args.modes, args.classes, args.work_ms, (0.0, 20.0)
    ):
        fraction = DEVICE_CLASSES[name]
        pairs = np.array(measure(fraction, work, args.repeats, gap, mode))
        walls, cpus = pairs[:, 0], pairs[:, 1]
        # per run against that run's own CPU time: calibration drift on a shared VM cancels
        ratio = walls / (cpus / fraction)
        row = {
            "mode": mode,
            "class": name,
            "fraction": round(fraction, 4),
            "work_ms": work,
            "gap_ms": gap,
            "expected_ms": round(work / fraction, 2),
            "median_ms": round(float(np.median(walls)), 2),
            "ratio_median": round(float(np.median(ratio)), 3),
            "ratio_mean": round(float(np.mean(ratio)), 3),
            "ratio_p10": round(float(np.percentile(ratio, 10)), 3),
            "ratio_p90": round(float(np.percentile(ratio, 90)), 3),
        }
        rows.append(row)
        print(
            f"{mode:5s} {name:10s} f={fraction:.3f} work {work:4g} ms gap {gap:2g} ms: "
            f"expected {row['expected_ms']:7.1f} ms, median {row['median_ms']:7.1f} ms, "
            f"ratio median {row['ratio_median']:.2f} (p10 {row['ratio_p10']:.2f}, "
            f"p90 {row['ratio_p90']:.2f}, mean {row['ratio_mean']:.2f})"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"method": method, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
