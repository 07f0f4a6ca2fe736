"""End-to-end offload on this machine: a local edge server, a device client, real crypto.

``edgeoffload demo`` runs :func:`run_demo`; the overhead benchmark uses :func:`measure_requests`
against a server process; ``notebooks/split_walkthrough.ipynb`` uses :func:`serve_and_run`.
Everything binds 127.0.0.1 and uses throwaway keys in a temporary folder.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeoffload._ort import make_session, run
from edgeoffload.bundle import Bundle
from edgeoffload.core.noise import DEFAULT_PROTOCOL
from edgeoffload.device.client import OffloadClient, RequestTiming
from edgeoffload.edge.allowlist import AllowList
from edgeoffload.edge.server import EdgeServer, ServerConfig
from edgeoffload.lab.harness import ThrowawayKeys
from edgeoffload.lab.stats import Record, elapsed_ms, median

COMPONENTS = ("head_ms", "encode_ms", "network_ms", "server_ms", "decode_ms", "total_ms")

Inputs = Mapping[str, np.ndarray]
Reference = Callable[[Inputs], dict[str, np.ndarray]]


@dataclass(frozen=True)
class LoopbackRun(Record):
    """The requests of one bundle: per-request timings and the worst error vs the reference."""

    label: str
    timings: tuple[RequestTiming, ...]
    max_abs_error: float

    def median(self, component: str) -> float:
        return median([float(getattr(t, component)) for t in self.timings])

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "max_abs_error": self.max_abs_error,
            "median_ms": {c: round(self.median(c), 4) for c in COMPONENTS},
            "timings": [t.to_dict() for t in self.timings],
        }


@dataclass(frozen=True)
class DemoResult(Record):
    """All-local (the unsplit model here), the chosen split and all-remote, same inputs."""

    all_local_ms: tuple[float, ...]
    split: LoopbackRun
    all_remote: LoopbackRun

    @property
    def median_all_local_ms(self) -> float:
        return median(self.all_local_ms)

    def to_dict(self) -> dict[str, Any]:
        return {
            "all_local_ms": list(self.all_local_ms),
            "split": self.split.to_dict(),
            "all_remote": self.all_remote.to_dict(),
        }


def max_abs_error(outputs: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> float:
    """The largest |output - expected| over every output the reference has."""
    worst = 0.0
    for name, ref in expected.items():
        diff = np.abs(outputs[name].astype(np.float64) - ref.astype(np.float64))
        worst = max(worst, float(diff.max(initial=0.0)))
    return worst


async def measure_requests(
    bundle: Bundle,
    inputs_list: Sequence[Inputs],
    *,
    url: str,
    keys: ThrowawayKeys,
    reference: Reference | None = None,
    threads: int = 1,
    protocol: str = DEFAULT_PROTOCOL,
    warmup: int = 1,
) -> LoopbackRun:
    """Run ``inputs_list`` through a fresh client (after ``warmup`` untimed requests with the
    first input: sessions, connection) against the server at ``url``."""
    client = OffloadClient(
        bundle,
        server=url,
        server_key=keys.server.public,
        identity=keys.device,
        fallback="error",
        threads=threads,
        protocol=protocol,
    )
    timings: list[RequestTiming] = []
    worst = 0.0
    async with client:
        await client.connect()
        for _ in range(warmup):
            await client.run(inputs_list[0])
        for inputs in inputs_list:
            outputs = await client.run(inputs)
            assert client.last_timing is not None
            timings.append(client.last_timing)
            if reference is not None:
                worst = max(worst, max_abs_error(outputs, reference(inputs)))
    return LoopbackRun(str(bundle.path), tuple(timings), worst)


async def serve_and_run(
    bundles: Sequence[Bundle],
    requests: Mapping[str, Sequence[Inputs]],
    *,
    reference: Reference,
    workdir: Path,
    threads: int = 1,
    protocol: str = DEFAULT_PROTOCOL,
) -> list[LoopbackRun]:
    """Start an in-process server hosting ``bundles``; run each bundle's requests (by path)."""
    keys = ThrowawayKeys.create(workdir / "keys", devices=("demo-device",))
    server = EdgeServer(
        bundles,
        identity=keys.server,
        allow=AllowList(keys.allow_file),
        config=ServerConfig(port=0, threads=threads, workers=1),
    )
    await server.start()
    try:
        return [
            await measure_requests(
                bundle,
                requests[str(bundle.path)],
                url=f"ws://127.0.0.1:{server.port}",
                keys=keys,
                reference=reference,
                threads=threads,
                protocol=protocol,
            )
            for bundle in bundles
        ]
    finally:
        await server.shutdown()


def full_model_runner(model: Any, *, threads: int = 1) -> Reference:
    """The unsplit model on this machine, as the reference and the all-local baseline."""
    session = make_session(model, threads=threads)
    return lambda inputs: run(session, inputs)


def run_loopback(
    bundles: Sequence[Bundle],
    requests: Mapping[str, Sequence[Inputs]],
    *,
    reference: Reference,
    threads: int = 1,
) -> list[LoopbackRun]:
    """:func:`serve_and_run` with keys in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="edgeoffload-loopback-") as tmp:
        return asyncio.run(
            serve_and_run(
                bundles, requests, reference=reference, workdir=Path(tmp), threads=threads
            )
        )


def run_demo(
    split: Bundle, all_remote: Bundle, samples: Sequence[Inputs], *, reference: Reference
) -> DemoResult:
    """Time ``samples`` all-local (``reference``), offloaded at ``split`` and all-remote."""
    local_ms = []
    for inputs in samples:
        started = time.perf_counter()
        reference(inputs)
        local_ms.append(elapsed_ms(started))
    runs = run_loopback(
        [split, all_remote],
        {str(split.path): samples, str(all_remote.path): samples},
        reference=reference,
    )
    return DemoResult(tuple(local_ms), runs[0], runs[1])
