"""Commands on the device side: ``run`` and ``chat`` (a bundle's head here, its tail on an
edge server) and ``demo`` (both sides on this machine).

The device runtime (numpy, onnxruntime, websockets) is imported inside the commands, so
`edgeoffload --help` and `keys` start fast; none of it needs onnx.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from edgeoffload.cli._analysis import analysis_of, profiles_for
from edgeoffload.cli._fleet import endpoints
from edgeoffload.cli._options import (
    DeviceClassOpt,
    DeviceKeyOpt,
    DiscoverOpt,
    FallbackOpt,
    FleetFileOpt,
    NetworkOpt,
    ServerKeyOpt,
    ServerUrlOpt,
    ThreadsOpt,
    TimeoutOpt,
    load_inputs,
)
from edgeoffload.cli._render import (
    decision_lines,
    demo_table,
    err,
    generation_stats_line,
    out,
    timing_line,
    verification_line,
)
from edgeoffload.core.presets import parse_link
from edgeoffload.keys import load_identity

if TYPE_CHECKING:
    from edgeoffload.device.blocking import BlockingOffloadClient


def run_cmd(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder (the device's copy).")],
    key: DeviceKeyOpt,
    input_path: Annotated[
        Path, typer.Option("--input", help="Inputs (.npz, one array per model input).")
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Where to write the outputs (.npz).")
    ],
    server: ServerUrlOpt = None,
    server_key: ServerKeyOpt = None,
    fleet: FleetFileOpt = None,
    discover: DiscoverOpt = False,
    fallback: FallbackOpt = "local",
    timeout: TimeoutOpt = 10.0,
    threads: ThreadsOpt = 1,
) -> None:
    """Run a bundle: head here, tail on the best edge server (or locally as fallback)."""
    import numpy as np  # not loaded for --help

    inputs = load_inputs(input_path)
    assert inputs is not None
    servers = Servers(server, server_key, fleet, discover)
    client_args = (bundle_dir, servers, key, fallback, timeout, threads)
    with _blocking_client(*client_args) as client:
        outputs = client.run(inputs)
        timing = client.last_timing
    np.savez(output, **outputs)  # type: ignore[arg-type]
    assert timing is not None
    out.print(timing_line(timing, output))


def chat(
    bundle_dir: Annotated[Path, typer.Argument(help="Decoder bundle folder (the device's copy).")],
    key: DeviceKeyOpt,
    server: ServerUrlOpt = None,
    server_key: ServerKeyOpt = None,
    fleet: FleetFileOpt = None,
    discover: DiscoverOpt = False,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="One message; omit to chat on stdin.")
    ] = None,
    system: Annotated[str | None, typer.Option("--system", help="A system message.")] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="Tokens per reply at most.")
    ] = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="0 = no top-k filter.")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Sampling seed.")] = 0,
    fallback: FallbackOpt = "local",
    timeout: TimeoutOpt = 10.0,
    threads: ThreadsOpt = 1,
    stats: Annotated[bool, typer.Option("--stats", help="Print timing after each reply.")] = False,
) -> None:
    """Chat with a split decoder: its first blocks here, the rest on the edge server."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    servers = Servers(server, server_key, fleet, discover)
    client_args = (bundle_dir, servers, key, fallback, timeout, threads)
    with _blocking_client(*client_args) as client:
        turns = [prompt] if prompt is not None else _stdin_turns()
        for text in turns:
            messages.append({"role": "user", "content": text})
            reply = ""
            stream = client.generate(
                messages=messages,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
            )
            for token in stream:
                reply += token.text
                # Verbatim: no markup, no emoji codes (":thumbs_up:" must stay text).
                out.file.write(token.text)
                out.file.flush()
            out.print()
            out.file.flush()  # before the stats line on stderr
            messages.append({"role": "assistant", "content": reply})
            if stats:
                err.print(generation_stats_line(stream.stats))


@dataclass(frozen=True)
class Servers:
    """The server options `run` and `chat` share (see cli/_fleet.py)."""

    server: list[str] | None
    server_key: list[str] | None
    fleet: Path | None
    discover: bool


def _blocking_client(
    bundle_dir: Path,
    servers: Servers,
    key: Path,
    fallback: str,
    timeout: float,
    threads: int,
) -> BlockingOffloadClient:
    """The device client that `run` and `chat` use, from their shared options."""
    # numpy, onnxruntime, websockets: loaded only when a command talks to a server.
    from edgeoffload.bundle import load_bundle
    from edgeoffload.device.blocking import BlockingOffloadClient

    bundle = load_bundle(bundle_dir)
    found = endpoints(
        servers.server,
        servers.server_key,
        servers.fleet,
        discover=servers.discover,
        bundle_version=bundle.manifest.version,
    )
    return BlockingOffloadClient(
        bundle,
        servers=found,
        identity=load_identity(key),
        fallback=fallback,
        timeout=timeout,
        threads=threads,
    )


def _stdin_turns() -> Iterator[str]:
    """User messages typed on stdin, one per line, until EOF or an empty line."""
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            err.print("[bold]> [/bold]", end="")
        line = sys.stdin.readline()
        if not line or not line.strip():
            return
        yield line.rstrip("\n")


def demo(
    network: NetworkOpt = "wifi",
    device: DeviceClassOpt = "rpi4",
    model: Annotated[
        str, typer.Option("--model", help="Model to demo (default: embedded MobileNetV2).")
    ] = "zoo:mobilenetv2",
    requests: Annotated[
        int, typer.Option("--requests", min=1, max=1000, help="Offloaded inferences.")
    ] = 10,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Keep the bundle here.")
    ] = None,
) -> None:
    """Split the embedded model for a link, serve its tail locally, run it offloaded, compare."""
    # The split machinery imports onnx; the loopback server loads onnxruntime and websockets.
    from edgeoffload.lab.demo import full_model_runner, run_demo
    from edgeoffload.split.splitter import split_model

    started = time.perf_counter()
    link = parse_link(network)
    analysis = analysis_of(model, None, None)
    n = len(analysis.graph.nodes)
    out.print(
        f"model: {analysis.source_name} ({n} nodes, {len(analysis.cuts)} cuts); device: "
        f"{device}; network: {link.name} ({link.up_bps / 1e6:g}/{link.down_bps / 1e6:g} "
        f"Mbit/s, RTT {link.rtt_ms:g} ms)"
    )
    dev, srv, notes = profiles_for(
        analysis, device_profile=None, server_profile=None, device_class=device, threads=1
    )
    for note in notes:
        out.print(note)
    report = analysis.plan(device=dev, server=srv, link=link)
    for line in decision_lines(report):
        out.print(line)
    plan = report.best
    if plan.cut.index == n:  # all-local wins: still show the offload path at the best split
        plan = min(
            (p for p in report.plans if 0 < p.cut.index < n and p.feasible),
            key=lambda p: p.cost.total_ms,
        )
        out.print(
            f"the cost model keeps everything on the device; demonstrating offload at the "
            f"best split instead: {plan.cut.id} ({plan.codec})"
        )
    with tempfile.TemporaryDirectory(prefix="edgeoffload-demo-") as tmp:
        split_dir = output or Path(tmp) / "split"
        bundle = split_model(analysis, plan.cut, split_dir, codec=plan.codec, report=report)
        remote = split_model(analysis, analysis.cuts[0], Path(tmp) / "remote", codec="none")
        out.print(verification_line(bundle.manifest.verification))
        samples = [analysis.graph.sample_inputs(seed=100 + i) for i in range(requests)]
        out.print(
            f"starting a local edge server (127.0.0.1, Noise IK, {requests} requests per bundle)"
        )
        measured = run_demo(
            bundle, remote, samples, reference=full_model_runner(analysis.graph.model)
        )
    out.print(demo_table(measured, f"split {plan.cut.id} ({plan.codec})"))
    out.print(
        "loopback has no real link and the device here is this machine; the predictions "
        f"above model a {device} device on {link.name}."
    )
    out.print(f"demo took {time.perf_counter() - started:.1f} s")
