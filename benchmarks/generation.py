"""Split vs unsplit LLM generation: decode tokens/s, time to first token, bytes per token.

Usage:  python benchmarks/generation.py [--model zoo:smollm2] [--head-layers 15]
                                        [--prompt-tokens 128] [--new-tokens 64] [--runs 3]
                                        [--networks loopback,wifi]

The device side (head + client, and the unsplit baseline in the same run) runs in this
process, the edge server in its own process, one onnxruntime thread each. Every run checks that
the split produces exactly the unsplit model's tokens. Writes
benchmarks/results/generation_<model>.json and prints one summary per network.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgeoffload.lab.genbench import bench_generation, format_result
from edgeoffload.split.models import resolve_model

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:smollm2")
    parser.add_argument("--head-layers", type=int, default=None, help="default: half")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--networks", default="loopback", help="comma list: loopback, wifi, ...")
    parser.add_argument("--out", default=None, help="result file (default: by model name)")
    args = parser.parse_args(argv)
    model = resolve_model(args.model)
    if not isinstance(model, Path):
        parser.error("--model must be a decoder ONNX file, folder or zoo:smollm2/tiny-llama")
    results = []
    for network in args.networks.split(","):
        result = bench_generation(
            model,
            head_layers=args.head_layers,
            prompt_tokens=args.prompt_tokens,
            new_tokens=args.new_tokens,
            runs=args.runs,
            threads=args.threads,
            network=None if network == "loopback" else network,
        )
        result["command"] = " ".join(["python", "benchmarks/generation.py", *sys.argv[1:]])
        results.append(result)
        print("\n".join(format_result(result)), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = args.model.removeprefix("zoo:").replace("/", "_")
    out = Path(args.out) if args.out else RESULTS / f"generation_{name}.json"
    out.write_text(json.dumps({"benchmark": "generation", "results": results}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["tokens_identical"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
