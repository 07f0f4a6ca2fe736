"""Benchmark split generation against the unsplit model on the device, in the same run.

The device side (head + client, and the unsplit baseline) runs in this process; the edge server
runs in its own process (``edgeoffload serve``), each with the same number of intra-op threads.
Runs alternate split / unsplit so that drift on a noisy machine hits both alike; medians are
reported with their spread. Optionally the link goes through the userspace link emulator.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeoffload.bundle import Bundle, load_bundle
from edgeoffload.core.decoder import DecoderLayout, KVState, select_next
from edgeoffload.errors import UsageError

log = logging.getLogger("edgeoffload.lab.genbench")

PROMPT_TEXT = (
    "Edge servers let small devices run large models. A phone keeps the first blocks of a "
    "language model and their cache, a nearby server runs the rest, and only a hidden state "
    "crosses the network for every token. "
)


@dataclass(frozen=True)
class UnsplitRun:
    tokens: list[int]
    ttft_ms: float
    step_ms: list[float]


def unsplit_generate(
    session: Any, layout: DecoderLayout, prompt: list[int], new_tokens: int
) -> UnsplitRun:
    """Greedy generation with the whole model in one onnxruntime session (the baseline)."""
    kv = KVState(layout.state, {s.name: s for s in layout.state_specs})
    started = time.perf_counter()
    outputs = kv.run(session, layout.token_feed(prompt, 0), len(prompt))
    token = int(np.argmax(select_next(outputs[layout.logits])))
    ttft = (time.perf_counter() - started) * 1e3
    tokens = [token]
    steps = []
    for _ in range(new_tokens - 1):
        step_start = time.perf_counter()
        outputs = kv.run(session, layout.token_feed([token], kv.length), 1)
        token = int(np.argmax(select_next(outputs[layout.logits])))
        steps.append((time.perf_counter() - step_start) * 1e3)
        tokens.append(token)
    return UnsplitRun(tokens, ttft, steps)


def prompt_ids(bundle: Bundle, layout: DecoderLayout, n: int) -> list[int]:
    """``n`` token ids of a fixed English text (random ids if the bundle has no tokenizer)."""
    folder = bundle.path / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        from edgeoffload.device.tokenizer import TextTokenizer

        tokenizer = TextTokenizer.from_dir(folder)
        ids: list[int] = []
        while len(ids) < n:
            ids.extend(tokenizer.encode(PROMPT_TEXT, add_special_tokens=False))
        return ids[:n]
    rng = np.random.default_rng(0)
    return [int(t) for t in rng.integers(0, layout.vocab_size, n)]


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def bench_generation(
    model: Path,
    *,
    head_layers: int | None = None,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    runs: int = 3,
    threads: int = 1,
    network: str | None = None,
    work_dir: Path | None = None,
    pin: bool = True,
) -> dict[str, Any]:
    """Split ``model`` after ``head_layers`` blocks (default: half of them) and compare
    generation with the unsplit model: TTFT, decode tokens/s, bytes per token, memory.

    ``pin``: with 2+ CPUs, the server process gets the last CPU and this process (device and
    unsplit baseline) the others, as if they were two machines; without it the scheduler
    moves both between cores, which costs the ping-ponging split more than the baseline.
    """
    from edgeoffload._ort import make_session
    from edgeoffload.keys import encode_public, generate_identity, load_identity
    from edgeoffload.lab.demo import spawn_server
    from edgeoffload.split.decoder_split import layout_of, split_decoder
    from edgeoffload.split.splitter import Analysis

    if runs < 1 or new_tokens < 2:
        raise UsageError("runs must be >= 1 and new_tokens >= 2")
    with tempfile.TemporaryDirectory(prefix="edgeoffload-genbench-") as tmp:
        root = Path(work_dir) if work_dir is not None else Path(tmp)
        started = time.perf_counter()
        analysis = Analysis.of(model)
        if head_layers is None:
            head_layers = layout_of(analysis).num_layers // 2
        bundle = split_decoder(model, root / "bundle", head_layers=head_layers, analysis=analysis)
        split_s = time.perf_counter() - started
        server_id = generate_identity(root / "server")
        device_id = generate_identity(root / "device")
        (root / "allow").write_text(f"{encode_public(device_id.public)} bench\n")
        manifest = bundle.manifest
        state = {e["input"]: e["output"] for e in manifest.state}
        layout = DecoderLayout.of(manifest.graph_inputs, manifest.graph_outputs, state)
        prompt = prompt_ids(bundle, layout, prompt_tokens)
        session = make_session(model, threads=threads)
        proc, port = spawn_server(
            [bundle.path],
            key_dir=root / "server",
            allow=root / "allow",
            extra=["--threads", str(threads), "--workers", "1"],
            timeout=300.0,
        )
        cpus = sorted(os.sched_getaffinity(0))
        pinned = pin and len(cpus) >= 2
        saved_affinity = set(cpus)
        if pinned:
            from edgeoffload.lab.loadtest import pin_threads

            pin_threads(proc.pid, {cpus[-1]})
            pin_threads(os.getpid(), set(cpus[:-1]))
        try:
            result = asyncio.run(
                _measure(
                    load_bundle(bundle.path),
                    session,
                    layout,
                    prompt,
                    new_tokens=new_tokens,
                    runs=runs,
                    threads=threads,
                    port=port,
                    server_public=server_id.public,
                    device=load_identity(root / "device"),
                    network=network,
                    server_pid=proc.pid,
                )
            )
        finally:
            if pinned:
                from edgeoffload.lab.loadtest import pin_threads

                pin_threads(os.getpid(), saved_affinity)
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except Exception:
                proc.kill()
        head_bytes = (bundle.path / manifest.head.file).stat().st_size if manifest.head else 0
    kv_token = layout.kv_bytes_per_token()
    head_kv_token = layout.kv_bytes_per_token(
        [e["input"] for e in manifest.state if e["side"] == "device"]
    )
    context = prompt_tokens + new_tokens
    result.update(
        {
            "model": str(model),
            "head_layers": head_layers,
            "layers": layout.num_layers,
            "cut": manifest.cut_id,
            "crossing": [t.name for t in manifest.crossing],
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "threads_per_side": threads,
            "runs": runs,
            "network": network or "loopback",
            "pinned": {"server_cpus": [cpus[-1]], "device_cpus": cpus[:-1]} if pinned else None,
            "split_seconds": round(split_s, 2),
            "memory": {
                "device_split_weights_bytes": head_bytes,
                "device_unsplit_weights_bytes": model.stat().st_size,
                "device_split_kv_bytes": head_kv_token * context,
                "device_unsplit_kv_bytes": kv_token * context,
                "server_kv_bytes_per_session": (kv_token - head_kv_token) * context,
                **result.pop("memory"),
            },
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
        }
    )
    return result


async def _measure(
    bundle: Bundle,
    session: Any,
    layout: DecoderLayout,
    prompt: list[int],
    *,
    new_tokens: int,
    runs: int,
    threads: int,
    port: int,
    server_public: bytes,
    device: Any,
    network: str | None,
    server_pid: int,
) -> dict[str, Any]:
    from edgeoffload.core.presets import parse_link
    from edgeoffload.device.client import OffloadClient
    from edgeoffload.lab.linkemu import LinkEmulator, LinkShape

    emulator = None
    target = port
    if network is not None:
        shape = LinkShape.from_link(parse_link(network))
        emulator = LinkEmulator("127.0.0.1", port, shape)
        await emulator.start()
        target = emulator.port
    client = OffloadClient(
        bundle,
        server=f"ws://127.0.0.1:{target}",
        server_key=server_public,
        identity=device,
        fallback="error",
        threads=threads,
        timeout=120.0,
    )
    split_ttft: list[float] = []
    split_tps: list[float] = []
    unsplit_ttft: list[float] = []
    unsplit_tps: list[float] = []
    step_bytes: list[int] = []
    prefill_bytes = 0
    identical = True
    rss_before = _rss_kib(server_pid)
    rss_during = rss_before
    try:
        async with client:
            # Warm-up: sessions, connection, first-run allocations on both sides.
            async for _ in client.generate(input_ids=prompt, max_new_tokens=4):
                pass
            unsplit_generate(session, layout, prompt, 4)
            for _ in range(runs):
                base = await asyncio.to_thread(
                    unsplit_generate, session, layout, prompt, new_tokens
                )
                unsplit_ttft.append(base.ttft_ms)
                unsplit_tps.append(1e3 * len(base.step_ms) / sum(base.step_ms))
                tokens = []
                async for token in client.generate(input_ids=prompt, max_new_tokens=new_tokens):
                    if token.token_id < 0:
                        continue  # text-only flush at the end, not a token
                    tokens.append(token.token_id)
                    if len(tokens) == new_tokens // 2:
                        rss_during = _rss_kib(server_pid)
                stats = client.last_generation
                assert stats is not None
                identical = identical and tokens == base.tokens[: len(tokens)]
                split_ttft.append(stats.ttft_ms)
                split_tps.append(stats.decode_tokens_per_s)
                step_bytes.extend(stats.step_bytes)
                prefill_bytes = stats.bytes_up - sum(stats.step_bytes)
    finally:
        if emulator is not None:
            await emulator.close()
    ratios = [s / u for s, u in zip(split_tps, unsplit_tps, strict=True)]
    return {
        "tokens_identical": identical,
        "split": {"ttft_ms": _spread(split_ttft), "decode_tokens_per_s": _spread(split_tps)},
        "unsplit": {
            "ttft_ms": _spread(unsplit_ttft),
            "decode_tokens_per_s": _spread(unsplit_tps),
        },
        "decode_ratio": _spread(ratios),
        "bytes_per_token": int(statistics.median(step_bytes)) if step_bytes else None,
        "prefill_bytes": prefill_bytes,
        "memory": {
            "server_rss_idle_kib": rss_before,
            "server_rss_generating_kib": rss_during,
        },
    }


def format_result(result: dict[str, Any]) -> list[str]:
    s, u = result["split"], result["unsplit"]
    mem = result["memory"]
    return [
        f"{Path(result['model']).name}: {result['head_layers']}/{result['layers']} blocks on the "
        f"device, {result['prompt_tokens']}-token prompt, {result['new_tokens']} new tokens, "
        f"{result['threads_per_side']} thread(s) per side, {result['network']}, "
        f"{result['runs']} runs (median [min-max])",
        f"decode tokens/s  split {_fmt(s['decode_tokens_per_s'])}  unsplit "
        f"{_fmt(u['decode_tokens_per_s'])}  ratio {_fmt(result['decode_ratio'])}",
        f"TTFT ms          split {_fmt(s['ttft_ms'])}  unsplit {_fmt(u['ttft_ms'])}",
        f"bytes/token up   {result['bytes_per_token']} (prefill {result['prefill_bytes']} B)",
        f"device memory    split {mem['device_split_weights_bytes'] / 2**20:.1f} MiB weights + "
        f"{mem['device_split_kv_bytes'] / 2**20:.2f} MiB KV; unsplit "
        f"{mem['device_unsplit_weights_bytes'] / 2**20:.1f} MiB + "
        f"{mem['device_unsplit_kv_bytes'] / 2**20:.2f} MiB",
        f"server           RSS {mem['server_rss_idle_kib']} KiB idle, "
        f"{mem['server_rss_generating_kib']} KiB generating; KV "
        f"{mem['server_kv_bytes_per_session'] / 2**20:.2f} MiB per session",
        f"tokens identical to the unsplit model: {result['tokens_identical']}",
    ]


def _fmt(spread: dict[str, float]) -> str:
    return f"{spread['median']:.2f} [{spread['min']:.2f}-{spread['max']:.2f}]"
