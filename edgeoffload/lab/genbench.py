"""Benchmark split generation against the unsplit model on the device, in the same run.

The device side (head + client, and the unsplit baseline) runs in this process; the edge server
runs in its own process (``edgeoffload serve``), each with the same number of intra-op threads.
Runs alternate split / unsplit so that drift on a noisy machine hits both alike; medians are
reported with their spread. Optionally the link goes through the userspace link emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeoffload._ort import make_session
from edgeoffload.bundle import Bundle, load_bundle
from edgeoffload.core.decoder import DecoderLayout, KVState, select_next
from edgeoffload.core.presets import parse_link
from edgeoffload.device.client import OffloadClient
from edgeoffload.device.tokenizer import TextTokenizer
from edgeoffload.errors import UsageError
from edgeoffload.lab.harness import CpuSplit, ThrowawayKeys, devices_pinned, spawn_server
from edgeoffload.lab.linkemu import LinkEmulator, LinkShape
from edgeoffload.lab.procfs import rss_kib
from edgeoffload.lab.stats import Environment, Record, Spread, elapsed_ms, environment, median

log = logging.getLogger("edgeoffload.lab.genbench")

# The quality report a quantised split writes, kept short here: this benchmark is about speed.
QUICK_QUALITY = {"prompts": 2, "new_tokens": 8}

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
    ttft = elapsed_ms(started)
    tokens = [token]
    steps = []
    for _ in range(new_tokens - 1):
        step_start = time.perf_counter()
        outputs = kv.run(session, layout.token_feed([token], kv.length), 1)
        token = int(np.argmax(select_next(outputs[layout.logits])))
        steps.append(elapsed_ms(step_start))
        tokens.append(token)
    return UnsplitRun(tokens, ttft, steps)


def prompt_ids(bundle: Bundle, layout: DecoderLayout, n: int) -> list[int]:
    """``n`` token ids of a fixed English text (random ids if the bundle has no tokenizer)."""
    folder = bundle.path / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        tokenizer = TextTokenizer.from_dir(folder)
        ids: list[int] = []
        while len(ids) < n:
            ids.extend(tokenizer.encode(PROMPT_TEXT, add_special_tokens=False))
        return ids[:n]
    rng = np.random.default_rng(0)
    return [int(t) for t in rng.integers(0, layout.vocab_size, n)]


# -- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSpeed(Record):
    """Time to first token and decode speed of one side, over the runs."""

    ttft_ms: Spread
    decode_tokens_per_s: Spread


@dataclass(frozen=True)
class GenerationMemory(Record):
    device_split_weights_bytes: int
    device_unsplit_weights_bytes: int
    device_split_kv_bytes: int
    device_unsplit_kv_bytes: int
    server_kv_bytes_per_session: int
    server_rss_idle_kib: int | None
    server_rss_generating_kib: int | None


@dataclass(frozen=True)
class Pinning(Record):
    server_cpus: list[int]
    device_cpus: list[int]


@dataclass(frozen=True)
class GenerationResult(Record):
    tokens_identical: bool
    split: GenerationSpeed
    unsplit: GenerationSpeed
    decode_ratio: Spread  # split / unsplit decode tokens/s, per run
    bytes_per_token: int | None  # median request bytes of one decode step
    prefill_bytes: int
    model: str
    head_layers: int
    layers: int
    cut: str
    crossing: list[str]
    prompt_tokens: int
    new_tokens: int
    threads_per_side: int
    runs: int
    network: str
    pinned: Pinning | None
    split_seconds: float
    memory: GenerationMemory
    environment: Environment
    # How each part stores its weights ("fp32" as cut); the unsplit baseline is the whole
    # model quantised the same way per node, so the token check still holds.
    head_weights: str = "fp32"
    tail_weights: str = "fp32"
    weights_method: str = "rtn"
    weights_compute: str = "fp32"
    benchmark: str = field(default="generate", init=False)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        env = self.environment
        data["machine"] = {"cpus": env.cpus, "platform": env.platform, "python": env.python}
        return data


@dataclass(frozen=True)
class _Measured:
    tokens_identical: bool
    split: GenerationSpeed
    unsplit: GenerationSpeed
    decode_ratio: Spread
    bytes_per_token: int | None
    prefill_bytes: int
    server_rss_idle_kib: int | None
    server_rss_generating_kib: int | None


# -- the benchmark -------------------------------------------------------------------------------


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
    head_weights: str = "fp32",
    tail_weights: str = "fp32",
    weights_method: str = "rtn",
    weights_compute: str = "fp32",
) -> GenerationResult:
    """Split ``model`` after ``head_layers`` blocks (default: half of them) and compare
    generation with the unsplit model: TTFT, decode tokens/s, bytes per token, memory.

    ``pin``: with 2+ CPUs, the server process gets the last CPU and this process (device and
    unsplit baseline) the others, as if they were two machines; without it the scheduler
    moves both between cores, which costs the ping-ponging split more than the baseline.

    ``head_weights`` / ``tail_weights`` (int4, int8, fp16; RTN, block 32, asymmetric) store
    each part quantised; the unsplit baseline is then the whole model quantised the same way
    per node (:func:`edgeoffload.split.weights.quantize_unsplit`). Run it twice (fp32, then
    quantised) to compare quantised against fp32 speed.
    """
    from edgeoffload.split.analysis import Analysis
    from edgeoffload.split.decoder_split import (  # needs onnx (heavy)
        block_cuts,
        layout_of,
        split_decoder,
    )
    from edgeoffload.split.weights import WeightScheme, quantize_unsplit

    if runs < 1 or new_tokens < 2:
        raise UsageError("runs must be >= 1 and new_tokens >= 2")
    split = CpuSplit.of_machine(pin)
    with tempfile.TemporaryDirectory(prefix="edgeoffload-genbench-") as tmp:
        root = Path(work_dir) if work_dir is not None else Path(tmp)
        started = time.perf_counter()
        analysis = Analysis.of(model)
        if head_layers is None:
            head_layers = layout_of(analysis).num_layers // 2
        schemes = tuple(
            WeightScheme(
                kind,
                method=weights_method if kind == "int4" else "rtn",
                compute=weights_compute,
            )
            for kind in (head_weights, tail_weights)
        )
        bundle = split_decoder(
            model,
            root / "bundle",
            head_layers=head_layers,
            analysis=analysis,
            head_weights=schemes[0],
            tail_weights=schemes[1],
            quality_settings=QUICK_QUALITY,  # measured for real by split itself
        )
        split_s = time.perf_counter() - started
        baseline: Any = model
        if head_weights != "fp32" or tail_weights != "fp32":
            cut = block_cuts(analysis)[head_layers]
            baseline = quantize_unsplit(analysis.graph, cut, *schemes).SerializeToString()
        keys = ThrowawayKeys.create(root / "keys", devices=("bench",))
        manifest = bundle.manifest
        state = {e["input"]: e["output"] for e in manifest.state}
        layout = DecoderLayout.of(manifest.graph_inputs, manifest.graph_outputs, state)
        prompt = prompt_ids(bundle, layout, prompt_tokens)
        session = make_session(baseline, threads=threads)
        with (
            spawn_server(
                [bundle.path],
                keys,
                threads=threads,
                workers=1,
                cpus=split.server if split else None,
                timeout=300.0,
            ) as server,
            devices_pinned(split),
        ):
            measured = asyncio.run(
                _measure(
                    load_bundle(bundle.path),
                    session,
                    layout,
                    prompt,
                    new_tokens=new_tokens,
                    runs=runs,
                    threads=threads,
                    port=server.port,
                    keys=keys,
                    network=network,
                    server_pid=server.pid,
                )
            )
        head_bytes = (bundle.path / manifest.head.file).stat().st_size if manifest.head else 0
    kv_token = layout.kv_bytes_per_token()
    head_kv_token = layout.kv_bytes_per_token(
        [e["input"] for e in manifest.state if e["side"] == "device"]
    )
    context = prompt_tokens + new_tokens
    return GenerationResult(
        tokens_identical=measured.tokens_identical,
        split=measured.split,
        unsplit=measured.unsplit,
        decode_ratio=measured.decode_ratio,
        bytes_per_token=measured.bytes_per_token,
        prefill_bytes=measured.prefill_bytes,
        model=str(model),
        head_layers=head_layers,
        layers=layout.num_layers,
        cut=manifest.cut_id,
        crossing=[t.name for t in manifest.crossing],
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        threads_per_side=threads,
        runs=runs,
        network=network or "loopback",
        pinned=Pinning(sorted(split.server), sorted(split.devices)) if split else None,
        split_seconds=round(split_s, 2),
        memory=GenerationMemory(
            device_split_weights_bytes=head_bytes,
            device_unsplit_weights_bytes=(
                len(baseline) if isinstance(baseline, bytes) else model.stat().st_size
            ),
            device_split_kv_bytes=head_kv_token * context,
            device_unsplit_kv_bytes=kv_token * context,
            server_kv_bytes_per_session=(kv_token - head_kv_token) * context,
            server_rss_idle_kib=measured.server_rss_idle_kib,
            server_rss_generating_kib=measured.server_rss_generating_kib,
        ),
        environment=environment(),
        head_weights=head_weights,
        tail_weights=tail_weights,
        weights_method=weights_method,
        weights_compute=weights_compute,
    )


def _rss_kib(pid: int) -> int | None:
    """The server's RSS, or None where /proc cannot tell."""
    with contextlib.suppress(OSError, RuntimeError):
        return rss_kib(pid)
    return None


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
    keys: ThrowawayKeys,
    network: str | None,
    server_pid: int,
) -> _Measured:
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
        server_key=keys.server.public,
        identity=keys.device,
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
                stream = client.generate(input_ids=prompt, max_new_tokens=new_tokens)
                async for token in stream:
                    if token.token_id < 0:
                        continue  # text-only flush at the end, not a token
                    tokens.append(token.token_id)
                    if len(tokens) == new_tokens // 2:
                        rss_during = _rss_kib(server_pid)
                stats = stream.stats
                identical = identical and tokens == base.tokens[: len(tokens)]
                split_ttft.append(stats.ttft_ms)
                split_tps.append(stats.decode_tokens_per_s)
                step_bytes.extend(stats.step_bytes)
                prefill_bytes = stats.bytes_up - sum(stats.step_bytes)
    finally:
        if emulator is not None:
            await emulator.close()
    ratios = [s / u for s, u in zip(split_tps, unsplit_tps, strict=True)]
    return _Measured(
        tokens_identical=identical,
        split=GenerationSpeed(Spread.of(split_ttft), Spread.of(split_tps)),
        unsplit=GenerationSpeed(Spread.of(unsplit_ttft), Spread.of(unsplit_tps)),
        decode_ratio=Spread.of(ratios),
        bytes_per_token=int(median(step_bytes)) if step_bytes else None,
        prefill_bytes=prefill_bytes,
        server_rss_idle_kib=rss_before,
        server_rss_generating_kib=rss_during,
    )


def format_result(result: GenerationResult) -> list[str]:
    s, u, mem = result.split, result.unsplit, result.memory
    return [
        f"{Path(result.model).name}: {result.head_layers}/{result.layers} blocks on the "
        f"device, {result.prompt_tokens}-token prompt, {result.new_tokens} new tokens, "
        f"{result.threads_per_side} thread(s) per side, {result.network}, "
        f"{result.runs} runs (median [min-max]); weights head {result.head_weights}, tail "
        f"{result.tail_weights} ({result.weights_method}, compute {result.weights_compute})",
        f"decode tokens/s  split {s.decode_tokens_per_s}  unsplit "
        f"{u.decode_tokens_per_s}  ratio {result.decode_ratio}",
        f"TTFT ms          split {s.ttft_ms}  unsplit {u.ttft_ms}",
        f"bytes/token up   {result.bytes_per_token} (prefill {result.prefill_bytes} B)",
        f"device memory    split {mem.device_split_weights_bytes / 2**20:.1f} MiB weights + "
        f"{mem.device_split_kv_bytes / 2**20:.2f} MiB KV; unsplit "
        f"{mem.device_unsplit_weights_bytes / 2**20:.1f} MiB + "
        f"{mem.device_unsplit_kv_bytes / 2**20:.2f} MiB",
        f"server           RSS {mem.server_rss_idle_kib} KiB idle, "
        f"{mem.server_rss_generating_kib} KiB generating; KV "
        f"{mem.server_kv_bytes_per_session / 2**20:.2f} MiB per session",
        f"tokens identical to the unsplit model: {result.tokens_identical}",
    ]
