"""Multi-turn chat: time to first token of each later turn with both caches kept
(:class:`~edgeoffload.device.conversation.Conversation`) vs a full re-prefill of the
conversation (``generate(messages=...)``, what a stateless client does), in the same run.

The edge server runs in its own process, pinned to the last CPU, the device (head + client)
here on the others, one onnxruntime thread each, as in genbench. Every turn's reply is compared
token by token with the re-prefill's.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from edgeoffload.bundle import load_bundle
from edgeoffload.device.client import OffloadClient
from edgeoffload.errors import UsageError
from edgeoffload.lab.harness import CpuSplit, ThrowawayKeys, devices_pinned, spawn_server
from edgeoffload.lab.stats import environment, median

USER_TURNS = (
    "Explain in a few sentences why a phone might share the work of a language model with a "
    "nearby edge server instead of a distant cloud, and what it gains in latency and privacy.",
    "What does the phone keep for itself?",
    "And what crosses the network for every token?",
    "Summarise that in one line.",
)


async def _turns(client: OffloadClient, new_tokens: int, rounds: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for _ in range(rounds):
        chat = client.conversation(max_context=2048)
        try:
            for i, text in enumerate(USER_TURNS):
                messages = [*chat.messages, {"role": "user", "content": text}]
                kept = chat.say(text, max_new_tokens=new_tokens)
                kept_ids = [t.token_id async for t in kept if t.token_id >= 0]
                fresh = client.generate(messages=messages, max_new_tokens=new_tokens)
                fresh_ids = [t.token_id async for t in fresh if t.token_id >= 0]
                rows.append(
                    {
                        "turn": i + 1,
                        "prompt_tokens": kept.stats.prompt_tokens,
                        "reused_tokens": kept.stats.reused_tokens,
                        "ttft_kept_ms": round(kept.stats.ttft_ms, 2),
                        "ttft_reprefill_ms": round(fresh.stats.ttft_ms, 2),
                        "identical": kept_ids == fresh_ids,
                    }
                )
        finally:
            await chat.close()
    return rows


def bench_chat(bundle_path: Path, *, new_tokens: int = 48, rounds: int = 3) -> dict[str, Any]:
    """TTFT per turn, kept caches vs full re-prefill, medians over ``rounds`` conversations."""
    bundle = load_bundle(bundle_path)
    if not bundle.manifest.state:
        raise UsageError(f"{bundle_path} is not a decoder bundle")
    split = CpuSplit.of_machine()
    with tempfile.TemporaryDirectory(prefix="edgeoffload-chatbench-") as tmp:
        keys = ThrowawayKeys.create(Path(tmp) / "keys", devices=("bench",))
        with (
            spawn_server(
                [bundle.path],
                keys,
                threads=1,
                workers=1,
                cpus=split.server if split else None,
                timeout=300.0,
            ) as server,
            devices_pinned(split),
        ):
            client = OffloadClient(
                bundle,
                server=f"ws://127.0.0.1:{server.port}",
                server_key=keys.server.public,
                identity=keys.device,
                fallback="error",
                timeout=120.0,
            )

            async def main() -> list[dict[str, Any]]:
                async with client:
                    await _turns(client, 4, 1)  # warm-up: sessions, allocations
                    return await _turns(client, new_tokens, rounds)

            rows = asyncio.run(main())
    summary = []
    for turn in range(1, len(USER_TURNS) + 1):
        mine = [r for r in rows if r["turn"] == turn]
        kept = median([r["ttft_kept_ms"] for r in mine])
        fresh = median([r["ttft_reprefill_ms"] for r in mine])
        summary.append(
            {
                "turn": turn,
                "prompt_tokens": int(median([r["prompt_tokens"] for r in mine])),
                "reused_tokens": int(median([r["reused_tokens"] for r in mine])),
                "ttft_kept_ms": round(kept, 2),
                "ttft_reprefill_ms": round(fresh, 2),
                "ratio": round(kept / fresh, 3),
                "identical": all(r["identical"] for r in mine),
            }
        )
    return {
        "benchmark": "chat_turns",
        "bundle": str(bundle_path),
        "new_tokens": new_tokens,
        "rounds": rounds,
        "pinned": {"server": sorted(split.server), "devices": sorted(split.devices)}
        if split
        else None,
        "turns": summary,
        "runs": rows,
        "environment": environment().to_dict(),
    }
