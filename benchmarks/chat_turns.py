"""Multi-turn chat: time to first token of later turns with the KV caches kept between turns
vs a full re-prefill of the conversation, tokens checked identical.

Usage:  python benchmarks/chat_turns.py [--bundle DIR | --model zoo:smollm2] [--head-layers N]
                                        [--new-tokens 48] [--rounds 3]

Four user turns of a chat (edgeoffload/lab/chatbench.py); each later turn is answered twice:
by a Conversation that prefills only the new turn, and by generate(messages=...) on the whole
conversation. Writes benchmarks/results/chat_turns.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from edgeoffload.lab.chatbench import bench_chat

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:smollm2")
    parser.add_argument("--bundle", default=None, help="a decoder bundle split already")
    parser.add_argument("--head-layers", type=int, default=None, help="default: half")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="chat-turns-") as tmp:
        if args.bundle:
            bundle = Path(args.bundle)
        else:
            from llm_batching import _split  # the same split as the batching benchmark

            bundle = _split(args.model, args.head_layers, tmp)
        result = bench_chat(bundle, new_tokens=args.new_tokens, rounds=args.rounds)
    result["command"] = " ".join(["python", "benchmarks/chat_turns.py", *sys.argv[1:]])
    print(
        f"{'turn':>4} {'prompt':>6} {'kept':>5} {'TTFT kept':>10} {'re-prefill':>10} "
        f"{'ratio':>6} {'same':>5}"
    )
    for t in result["turns"]:
        print(
            f"{t['turn']:>4} {t['prompt_tokens']:>6} {t['reused_tokens']:>5} "
            f"{t['ttft_kept_ms']:>8.1f}ms {t['ttft_reprefill_ms']:>8.1f}ms {t['ratio']:>6.3f} "
            f"{t['identical']!s:>5}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "chat_turns.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if all(t["identical"] for t in result["turns"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
