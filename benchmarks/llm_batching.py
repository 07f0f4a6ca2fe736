"""Batched LLM decode steps: aggregate decode tokens/s at 1, 4, 16 generating devices, with and
without batched steps, on one edge server in the same run.

Usage:  python benchmarks/llm_batching.py [--model zoo:smollm2] [--bundle DIR] [--head-layers N]
                                          [--sessions 1,4,16] [--prompt-tokens 128]
                                          [--new-tokens 64] [--batch 16]

The model is split at half its blocks (or ``--bundle`` names a decoder bundle split already).
Devices replay heads recorded by a real device runtime and check every token against a lone
run (edgeoffload/lab/stepbench.py says why); the server (``edgeoffload serve``, one worker, one
thread, pinned to one CPU) runs unbatched, then with ``--batch``. Writes
benchmarks/results/llm_batching.{json,png} and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgeoffload.lab.stepbench import bench_steps
from edgeoffload.split.models import resolve_model

RESULTS = Path(__file__).resolve().parent / "results"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for batched, label in ((False, "one step per call"), (True, "batched steps")):
        rows = [r for r in result["rows"] if r["batched"] == batched]
        ax.plot(
            [r["sessions"] for r in rows],
            [r["tokens_per_s"] for r in rows],
            marker="o",
            label=label,
        )
    single = next(r for r in result["rows"] if r["sessions"] == 1 and not r["batched"])
    ax.axhline(3 * single["tokens_per_s"], color="grey", linestyle=":", label="3 x one session")
    ax.set_xscale("log", base=2)
    sessions = sorted({r["sessions"] for r in result["rows"]})
    ax.set_xticks(sessions, [str(s) for s in sessions])
    ax.set_xlabel("generating devices")
    ax.set_ylabel("aggregate decode tokens / s")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("edge server decode throughput (one core)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:smollm2")
    parser.add_argument("--bundle", default=None, help="a decoder bundle split already")
    parser.add_argument("--head-layers", type=int, default=None, help="default: half")
    parser.add_argument("--sessions", default="1,4,16")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    sessions = tuple(int(s) for s in args.sessions.split(","))
    with tempfile.TemporaryDirectory(prefix="llm-batching-") as tmp:
        bundle = Path(args.bundle) if args.bundle else _split(args.model, args.head_layers, tmp)
        result = bench_steps(
            bundle,
            sessions=sessions,
            prompt_tokens=args.prompt_tokens,
            new_tokens=args.new_tokens,
            batch=args.batch,
        )
    result["command"] = " ".join(["python", "benchmarks/llm_batching.py", *sys.argv[1:]])
    single = next(r for r in result["rows"] if r["sessions"] == 1 and not r["batched"])
    print(
        f"{'devices':>8} {'batched':>8} {'tokens/s':>9} {'x one':>6} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'same tokens':>11}"
    )
    for r in result["rows"]:
        print(
            f"{r['sessions']:>8} {'yes' if r['batched'] else 'no':>8} {r['tokens_per_s']:>9.1f} "
            f"{r['tokens_per_s'] / single['tokens_per_s']:>6.2f} {r['step_p50_ms']:>7.1f} "
            f"{r['step_p99_ms']:>7.1f} {r['tokens_identical']!s:>11}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "llm_batching.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, RESULTS / "llm_batching.png")
    print(f"wrote {out}")
    return 0 if all(r["tokens_identical"] for r in result["rows"]) else 1


def _split(model_name: str, head_layers: int | None, tmp: str) -> Path:
    from edgeoffload.split.analysis import Analysis
    from edgeoffload.split.decoder_split import layout_of, split_decoder

    model = resolve_model(model_name)
    if not isinstance(model, Path):
        raise SystemExit("--model must be a decoder ONNX file, folder or zoo:smollm2/tiny-llama")
    analysis = Analysis.of(model)
    layers = head_layers if head_layers is not None else layout_of(analysis).num_layers // 2
    return split_decoder(model, Path(tmp) / "bundle", head_layers=layers, analysis=analysis).path


if __name__ == "__main__":
    raise SystemExit(main())
