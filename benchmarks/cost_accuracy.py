"""Predicted vs measured head/tail times over every single-tensor cut (issue: split pipeline).

Usage:  python benchmarks/cost_accuracy.py [--model zoo:mobilenetv2] [--threads 1] [--runs 15]

Writes benchmarks/results/cost_accuracy_<model>.json and a scatter plot PNG beside it, and
prints Spearman's rank correlation and the median relative error for heads and tails. Also
times `edgeoffload split` end to end (profiling included) in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgeoffload.lab.bench import cost_accuracy
from edgeoffload.split.models import resolve_model

RESULTS = Path(__file__).resolve().parent / "results"


def time_split(model: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "edgeoffload.cli", "split", model, "-o", f"{tmp}/b"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        return time.perf_counter() - start


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, kind in zip(axes, ("head", "tail"), strict=True):
        pred = [r[f"predicted_{kind}_ms"] for r in result["rows"]]
        meas = [r[f"measured_{kind}_ms"] for r in result["rows"]]
        top = max(pred + meas) * 1.05
        ax.plot([0, top], [0, top], color="grey", linewidth=1)
        ax.scatter(meas, pred, s=12)
        s = result[kind]
        ax.set_title(
            f"{kind}: Spearman {s['spearman']:.3f}, "
            f"median rel. err {s['median_relative_error']:.1%}"
        )
        ax.set_xlabel("measured ms (real ORT session)")
        ax.set_ylabel("predicted ms (profile + calibration)")
    fig.suptitle(
        f"{result['model']}: {result['single_tensor_cuts']} single-tensor cuts, "
        f"{result['threads']} thread(s)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:mobilenetv2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    result = cost_accuracy(resolve_model(args.model), threads=args.threads, runs=args.runs)
    result["split_end_to_end_seconds"] = round(time_split(args.model), 2)
    result["command"] = " ".join(["python", *sys.argv])
    RESULTS.mkdir(exist_ok=True)
    stem = f"cost_accuracy_{result['model'].removesuffix('.onnx')}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, RESULTS / f"{stem}.png")
    for kind in ("head", "tail"):
        s = result[kind]
        print(
            f"{kind}: Spearman {s['spearman']:.3f}  median relative error "
            f"{s['median_relative_error']:.1%}  max {s['max_relative_error']:.1%}"
        )
    print(
        f"single-tensor cuts: {result['single_tensor_cuts']}; profiling took "
        f"{result['profile_seconds']} s; `edgeoffload split` end to end: "
        f"{result['split_end_to_end_seconds']} s"
    )
    print(f"wrote {RESULTS / (stem + '.json')}")


if __name__ == "__main__":
    main()
