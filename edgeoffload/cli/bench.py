"""``bench``: run one of the benchmarks in edgeoffload.lab and print its summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgeoffload.cli._analysis import resolve_model
from edgeoffload.cli._options import CodecOpt, DimOpt, ThreadsOpt, parse_dims
from edgeoffload.cli._render import err, out, print_bench, progress_bar
from edgeoffload.errors import UsageError

if TYPE_CHECKING:
    from edgeoffload.lab.stats import Record

BENCHMARKS = (
    "cost-accuracy",
    "overhead",
    "throughput",
    "server",
    "lab",
    "generate",
    "fleet",
    "attack",
)


def bench(
    scenario: Annotated[
        str,
        typer.Argument(
            help="cost-accuracy, overhead, throughput, server, lab, generate, fleet or attack."
        ),
    ],
    model: Annotated[
        str, typer.Option("--model", help="Model for cost-accuracy (path or zoo:NAME).")
    ] = "zoo:mobilenetv2",
    dim: DimOpt = None,
    threads: ThreadsOpt = 1,
    runs: Annotated[int, typer.Option("--runs", min=3, help="Timed runs / requests.")] = 15,
    codec: CodecOpt = "none",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the result JSON here.")
    ] = None,
    head_layers: Annotated[
        int | None, typer.Option("--head-layers", min=0, help="generate: blocks on the device.")
    ] = None,
    prompt_tokens: Annotated[
        int, typer.Option("--prompt-tokens", min=1, help="generate: prompt length.")
    ] = 128,
    new_tokens: Annotated[
        int, typer.Option("--new-tokens", min=2, help="generate: tokens per reply.")
    ] = 64,
    network: Annotated[
        str | None,
        typer.Option("--network", help="generate: emulate this link (default: loopback)."),
    ] = None,
    duration: Annotated[
        float, typer.Option("--duration", min=1.0, help="fleet: measured seconds per policy.")
    ] = 36.0,
    devices: Annotated[
        int, typer.Option("--devices", min=1, help="fleet: concurrent devices.")
    ] = 32,
    policies: Annotated[
        str,
        typer.Option(
            "--policies",
            help="fleet: comma list of round-robin, least-outstanding, two-choice, ours.",
        ),
    ] = "round-robin,least-outstanding,two-choice,ours",
    plot: Annotated[
        Path | None, typer.Option("--plot", help="fleet: write the plot (PNG) here.")
    ] = None,
) -> None:
    """Run a benchmark and print its summary (JSON with -o).

    cost-accuracy: predicted vs measured head/tail times over every single-tensor cut.
    overhead: per-request framework overhead on loopback for 4 KiB, 256 KiB, 4 MiB tensors.
    throughput: encode+encrypt+decrypt+decode GB/s of a 4 MiB tensor per Noise suite.
    server: requests/s and p50/p99 of one edge server under 1, 8, 32, 64 devices vs direct ORT.
    lab: every model x link x device scenario on emulated devices and links (long; see
    benchmarks/lab.py for plots and the README table).
    generate: split vs unsplit decoder generation (--model zoo:smollm2): decode tokens/s,
    TTFT, bytes per token, memory; the server in its own process.
    fleet: three servers of different speed (one SIGKILLed half way and restarted), --devices
    devices, per routing policy: throughput, p50/p99, errors, wrong answers (~3-4 min on 2
    CPUs; --plot for the latency-over-time plot).
    attack: the standing attack suite — a hogging device, 1000 unauthenticated connections
    with unfinished frames, handshake and garbage floods, revocation — each while an honest
    device is served (--duration seconds per case; ~4 min at 20 s).
    """
    # The benchmarks load onnxruntime and websockets, some onnx: imported only to run one.
    from edgeoffload.lab import bench as bench_mod

    if scenario not in BENCHMARKS:
        raise UsageError(
            f"unknown benchmark {scenario!r}", hint=f"choose one of {', '.join(BENCHMARKS)}"
        )
    result: Record
    if scenario == "cost-accuracy":
        with progress_bar() as progress:
            result = bench_mod.cost_accuracy(
                resolve_model(model),
                threads=threads,
                runs=runs,
                dims=parse_dims(dim),
                progress=progress,
            )
    elif scenario == "overhead":
        result = bench_mod.offload_overhead(requests=max(runs, 20), codec=codec)
    elif scenario == "server":
        from edgeoffload.lab.loadtest import server_throughput

        result = server_throughput(resolve_model(model), threads=threads)
    elif scenario == "generate":
        from edgeoffload.lab.genbench import bench_generation, format_result

        model_path = resolve_model(model if model != "zoo:mobilenetv2" else "zoo:smollm2")
        if not isinstance(model_path, Path):
            raise UsageError("generate needs a decoder model: a path or zoo:smollm2/tiny-llama")
        result = bench_generation(
            model_path,
            head_layers=head_layers,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            runs=max(1, runs // 5),
            threads=threads,
            network=network,
        )
        _write_bench(result, output)
        for line in format_result(result):
            out.print(line)
        return
    elif scenario == "fleet":
        from edgeoffload.lab import fleetbench

        chosen = fleetbench.parse_policies(policies)
        result = fleetbench.fleet_benchmark(
            model,
            devices=devices,
            policies=chosen,
            duration_s=duration,
            progress=lambda what: err.print(what),
        )
        data = _write_bench(result, output)
        if plot is not None:
            from edgeoffload.lab.plots import plot_fleet

            plot_fleet(data, plot)
        for line in fleetbench.format_result(data):
            out.print(line)
        return
    elif scenario == "attack":
        from edgeoffload.lab import attackbench

        attack = attackbench.attack_benchmark(
            model, duration_s=duration, progress=lambda what: err.print(what)
        )
        _write_bench(attack, output)
        for line in attackbench.format_result(attack):
            out.print(line)
        return
    elif scenario == "lab":
        from edgeoffload.lab.scenarios import run_lab

        result = run_lab(repeats=max(3, runs // 3), progress=lambda what: err.print(what))
    else:
        result = bench_mod.pipeline_throughput()
    print_bench(_write_bench(result, output))


def _write_bench(result: Record, output: Path | None) -> dict[str, Any]:
    """The result as JSON data, written to ``output`` when one is given."""
    data: dict[str, Any] = result.to_dict()
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(data, indent=1) + "\n")
    return data
