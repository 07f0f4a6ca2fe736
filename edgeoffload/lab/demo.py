"""End-to-end offload on this machine: a local edge server, a device client, real crypto.

Used by ``edgeoffload demo`` and by the loopback benchmark. Everything binds 127.0.0.1 and
uses throwaway keys in a temporary folder.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import subprocess
import sys
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
from edgeoffload.keys import encode_public, generate_identity

COMPONENTS = ("head_ms", "encode_ms", "network_ms", "server_ms", "decode_ms", "total_ms")


@dataclass
class LoopbackRun:
    label: str
    timings: list[RequestTiming]
    max_abs_error: float

    def median(self, component: str) -> float:
        return float(statistics.median(float(getattr(t, component)) for t in self.timings))


async def serve_and_run(
    bundles: Sequence[Bundle],
    requests: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
    *,
    reference: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]],
    workdir: Path,
    threads: int = 1,
    protocol: str = DEFAULT_PROTOCOL,
) -> list[LoopbackRun]:
    """Start a server hosting ``bundles``; for each bundle (by path) run its requests."""
    server_id = generate_identity(workdir / "server")
    device_id = generate_identity(workdir / "device")
    allow_file = workdir / "authorized_keys"
    allow_file.write_text(f"{encode_public(device_id.public)} demo-device\n")
    server = EdgeServer(
        bundles,
        identity=server_id,
        allow=AllowList(allow_file),
        config=ServerConfig(port=0, threads=threads, workers=1),
    )
    await server.start()
    results: list[LoopbackRun] = []
    try:
        for bundle in bundles:
            inputs_list = requests[str(bundle.path)]
            client = OffloadClient(
                bundle,
                server=f"ws://127.0.0.1:{server.port}",
                server_key=server_id.public,
                identity=device_id,
                fallback="error",
                threads=threads,
                protocol=protocol,
            )
            async with client:
                await client.connect()
                await client.run(inputs_list[0])  # warm-up: sessions, connection
                timings: list[RequestTiming] = []
                worst = 0.0
                for inputs in inputs_list:
                    outputs = await client.run(inputs)
                    assert client.last_timing is not None
                    timings.append(client.last_timing)
                    expected = reference(inputs)
                    for name, ref in expected.items():
                        diff = np.abs(outputs[name].astype(np.float64) - ref.astype(np.float64))
                        worst = max(worst, float(diff.max(initial=0.0)))
                results.append(LoopbackRun(str(bundle.path), timings, worst))
    finally:
        await server.shutdown()
    return results


def full_model_runner(
    model: Any, *, threads: int = 1
) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """The unsplit model on this machine, as the reference and the all-local baseline."""
    session = make_session(model, threads=threads)
    return lambda inputs: run(session, inputs)


def run_loopback(
    bundles: Sequence[Bundle],
    requests: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
    *,
    reference: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]],
    threads: int = 1,
) -> list[LoopbackRun]:
    with tempfile.TemporaryDirectory(prefix="edgeoffload-loopback-") as tmp:
        return asyncio.run(
            serve_and_run(
                bundles, requests, reference=reference, workdir=Path(tmp), threads=threads
            )
        )


def spawn_server(
    bundle_dirs: Sequence[Path],
    *,
    key_dir: Path,
    allow: Path,
    extra: Sequence[str] = (),
    timeout: float = 30.0,
) -> tuple[subprocess.Popen[str], int]:
    """``edgeoffload serve`` in its own process on 127.0.0.1 and a free port; (process, port)."""
    cmd = [
        sys.executable,
        "-u",
        "-m",
        "edgeoffload.cli",
        "serve",
        *map(str, bundle_dirs),
        "--key",
        str(key_dir),
        "--allow",
        str(allow),
        "--port",
        "0",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(r"ws://127\.0\.0\.1:(\d+)", line)
        if match:
            return proc, int(match.group(1))
    proc.kill()
    raise RuntimeError("edge server did not start: " + "".join(seen))


async def run_client(
    bundle: Bundle,
    inputs_list: Sequence[Mapping[str, np.ndarray]],
    *,
    port: int,
    server_public: bytes,
    device: Any,
    protocol: str = DEFAULT_PROTOCOL,
    warmup: int = 3,
) -> list[RequestTiming]:
    """Run requests through a fresh client against a server on 127.0.0.1:port."""
    client = OffloadClient(
        bundle,
        server=f"ws://127.0.0.1:{port}",
        server_key=server_public,
        identity=device,
        fallback="error",
        protocol=protocol,
    )
    timings: list[RequestTiming] = []
    async with client:
        for inputs in list(inputs_list[:1]) * warmup:
            await client.run(inputs)
        for inputs in inputs_list:
            await client.run(inputs)
            assert client.last_timing is not None
            timings.append(client.last_timing)
    return timings
