"""Split vs unsplit LLM generation: decode tokens/s, time to first token, bytes per token.

Usage:  python benchmarks/generation.py [--model zoo:smollm2] [--head-layers 15]
                                        [--prompt-tokens 128] [--new-tokens 64] [--runs 3]
                                        [--networks loopback,wifi]
                                        [--head-weights int4] [--tail-weights int4]
                                        [--weights-method rtn|hqq] [--weights-compute fp32|int8]

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
    for side in ("head", "tail"):
        parser.add_argument(
            f"--{side}-weights",
            default="fp32",
            choices=("fp32", "fp16", "int8", "int4"),
            help=f"store the {side}'s weights quantised (block 32, asymmetric)",
        )
    parser.add_argument("--weights-method", default="rtn", choices=("rtn", "hqq"))
    parser.add_argument("--weights-compute", default="fp32", choices=("fp32", "int8"))
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
            head_weights=args.head_weights,
            tail_weights=args.tail_weights,
            weights_method=args.weights_method,
            weights_compute=args.weights_compute,
        )
        print("\n".join(format_result(result)), flush=True)
        record = result.to_dict()
        record["command"] = " ".join(["python", "benchmarks/generation.py", *sys.argv[1:]])
        results.append(record)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = args.model.removeprefix("zoo:").replace("/", "_")
    if (args.head_weights, args.tail_weights) != ("fp32", "fp32"):
        name += f"_{args.head_weights}-{args.tail_weights}-{args.weights_method}"
        name += f"-{args.weights_compute}" if args.weights_compute != "fp32" else ""
    out = Path(args.out) if args.out else RESULTS / f"generation_{name}.json"
    out.write_text(json.dumps({"benchmark": "generation", "results": results}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["tokens_identical"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
