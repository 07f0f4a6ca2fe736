"""Batched decode steps under load: aggregate decode tokens/s of 1..N generating devices on one
edge server, with and without batched steps (``serve --batch``), in the same run.

What is measured is the server: its tokens/s as more devices generate at once. The devices
replay *recorded* heads: each session's crossing chunks are recorded first by a real device
runtime (the head and its KV cache) whose own copy of the tail samples the tokens of a lone
run; under load the devices send those chunks through real clients (own keys, Noise,
websockets) and check that every token the server samples equals the lone run's. On this
two-core machine, running sixteen real heads beside the server would measure the heads; on
real hardware each head runs on its own device while the server steps them all.

The server process is pinned to the last CPU with one worker (one core of tail work), the
devices to the others. Sessions prefill first (not timed), then every session decodes at once;
aggregate tokens/s = decode tokens of all sessions / the decode phase's wall time.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeoffload.bundle import Bundle, load_bundle
from edgeoffload.core.decoder import DecoderLayout
from edgeoffload.core.sampling import SamplingParams
from edgeoffload.device.client import OffloadClient
from edgeoffload.device.generate import DecoderDevice
from edgeoffload.device.runtime import DeviceRuntime
from edgeoffload.errors import UsageError
from edgeoffload.lab.genbench import prompt_ids
from edgeoffload.lab.harness import CpuSplit, ThrowawayKeys, devices_pinned, spawn_server
from edgeoffload.lab.stats import Record, environment, median, percentile
from edgeoffload.protocol.events import Chunk

LOAD_TIMEOUT = 900.0  # seconds: bound on one load level (all sessions, prefill and decode)


@dataclass(frozen=True)
class Recording:
    """Per session: the prompt's chunk then one chunk per step, and a lone run's tokens."""

    prompts: list[int]  # prompt lengths
    chunks: list[list[Chunk]]
    tokens: list[list[int]]


def record(bundle: Bundle, sessions: int, prompt_tokens: int, new_tokens: int) -> Recording:
    """Run ``sessions`` greedy generations alone on a device runtime (head + its own tail);
    prompts of different lengths (``prompt_tokens`` down to half), so that batches pad."""
    runtime = DeviceRuntime(bundle, threads=1)
    manifest = bundle.manifest
    state = {e["input"]: e["output"] for e in manifest.state}
    layout = DecoderLayout.of(manifest.graph_inputs, manifest.graph_outputs, state)
    text = prompt_ids(bundle, layout, prompt_tokens + sessions)
    greedy = SamplingParams()
    lengths, chunks, tokens = [], [], []
    for i in range(sessions):
        n = prompt_tokens - (i * prompt_tokens // 2) // max(1, sessions - 1)
        device = DecoderDevice(runtime)
        sent = [device.head(text[i : i + n])]
        got = [device.local_token(greedy)]
        while len(got) < new_tokens:
            sent.append(device.head([got[-1]]))
            got.append(device.local_token(greedy))
        lengths.append(n)
        chunks.append(sent)
        tokens.append(got)
    return Recording(lengths, chunks, tokens)


class _Gate:
    """Opens when ``count`` sessions have arrived (every prefill done before any decode)."""

    def __init__(self, count: int) -> None:
        self.left = count
        self.open = asyncio.Event()
        self.prefilling = asyncio.Lock()

    async def arrive(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.open.set()
        await self.open.wait()


@dataclass(frozen=True)
class LoadRow(Record):
    sessions: int
    batched: bool
    tokens_per_s: float  # all sessions' decode tokens / decode-phase wall time
    step_p50_ms: float  # one step's round trip, as a device sees it
    step_p99_ms: float
    tokens_identical: bool  # every token equal to the lone run's


async def _session(
    client: OffloadClient,
    chunks: list[Chunk],
    tokens: list[int],
    prompt: int,
    gate: _Gate,
    steps_ms: list[float],
) -> tuple[float, float, bool]:
    """Prefill, wait for everyone, decode: (decode start, decode end, tokens identical)."""
    async with gate.prefilling:  # one at a time: prefills are not what is measured
        session, _ = await client.open_session(SamplingParams().to_dict(), prompt + len(chunks))
        event, _, _ = await client.feed_session("prefill", session, 0, [chunks[0]])
    same = event.token == tokens[0]
    await gate.arrive()
    began = time.perf_counter()
    pos = prompt
    for chunk, expected in zip(chunks[1:], tokens[1:], strict=True):
        sent = time.perf_counter()
        event, _, _ = await client.feed_session("step", session, pos, [chunk])
        steps_ms.append((time.perf_counter() - sent) * 1e3)
        same = same and event.token == expected
        pos += chunk.n
    ended = time.perf_counter()
    await client.end_session(session)
    return began, ended, same


async def _load(
    bundle: Bundle, recording: Recording, sessions: int, port: int, keys: ThrowawayKeys
) -> tuple[float, list[float], bool]:
    clients = [
        OffloadClient(
            bundle,
            server=f"ws://127.0.0.1:{port}",
            server_key=keys.server.public,
            identity=keys.devices[f"d{i}"],
            fallback="error",
            timeout=300.0,
        )
        for i in range(sessions)
    ]
    gate = _Gate(sessions)
    steps_ms: list[float] = []
    for client in clients:
        await client.connect()
    try:
        runs = [
            _session(
                client,
                recording.chunks[i],
                recording.tokens[i],
                recording.prompts[i],
                gate,
                steps_ms,
            )
            for i, client in enumerate(clients)
        ]
        done = await asyncio.wait_for(asyncio.gather(*runs), LOAD_TIMEOUT)
    finally:
        for client in clients:
            await client.close()
    began = min(d[0] for d in done)
    ended = max(d[1] for d in done)
    decoded = sum(len(c) - 1 for c in recording.chunks[:sessions])
    return decoded / (ended - began), steps_ms, all(d[2] for d in done)


def bench_steps(
    bundle_path: Path,
    *,
    sessions: tuple[int, ...] = (1, 4, 16),
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    batch: int = 16,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Rows for every session count, unbatched and batched, in one run."""
    if min(sessions) < 1 or new_tokens < 2:
        raise UsageError("sessions must be >= 1 and new_tokens >= 2")
    bundle = load_bundle(bundle_path)
    if not bundle.manifest.state:
        raise UsageError(f"{bundle_path} is not a decoder bundle")
    started = time.perf_counter()
    recording = record(bundle, max(sessions), prompt_tokens, new_tokens)
    record_s = time.perf_counter() - started
    split = CpuSplit.of_machine()
    rows: list[LoadRow] = []
    with tempfile.TemporaryDirectory(prefix="edgeoffload-stepbench-") as tmp:
        root = Path(work_dir) if work_dir is not None else Path(tmp)
        names = tuple(f"d{i}" for i in range(max(sessions)))
        keys = ThrowawayKeys.create(root / "keys", devices=names)
        for batched in (False, True):
            with (
                spawn_server(
                    [bundle.path],
                    keys,
                    threads=1,
                    workers=1,
                    cpus=split.server if split else None,
                    # Unbatched, 16 sessions queue for one worker: this measures throughput,
                    # not admission, so the queue may hold them as long as it takes.
                    extra_args=[
                        "--queue-wait",
                        "60",
                        *(["--batch", str(batch)] if batched else []),
                    ],
                    timeout=300.0,
                ) as server,
                devices_pinned(split),
            ):
                asyncio.run(_load(bundle, recording, 1, server.port, keys))  # warm-up
                for n in sessions:
                    rate, steps, same = asyncio.run(_load(bundle, recording, n, server.port, keys))
                    rows.append(
                        LoadRow(
                            sessions=n,
                            batched=batched,
                            tokens_per_s=round(rate, 1),
                            step_p50_ms=round(median(steps), 2),
                            step_p99_ms=round(percentile(steps, 99), 2),
                            tokens_identical=same,
                        )
                    )
    return {
        "benchmark": "llm_batching",
        "bundle": str(bundle_path),
        "prompt_tokens": recording.prompts,
        "new_tokens": new_tokens,
        "batch": batch,
        "record_seconds": round(record_s, 1),
        "pinned": {"server": sorted(split.server), "devices": sorted(split.devices)}
        if split
        else None,
        "rows": [r.to_dict() for r in rows],
        "environment": environment().to_dict(),
    }
