"""The ``edgeoffload`` command line.

``main(argv) -> int`` never lets a traceback reach the user for errors they can cause: every
:class:`~edgeoffload.errors.EdgeOffloadError` becomes one ``edgeoffload: error: ...`` line,
an optional ``hint:`` line, and the error's documented exit code (see errors.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeoffload import __version__
from edgeoffload.errors import EdgeOffloadError, UsageError

if TYPE_CHECKING:
    from edgeoffload.device.client import BlockingOffloadClient

app = typer.Typer(
    name="edgeoffload",
    help="Split ONNX models between a device and a nearby edge server.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
# soft_wrap: long lines stay whole when piped (logs, CI) instead of wrapping at 80 columns.
# Tables keep a readable width when piped (rich would otherwise assume 80 columns).
_WIDTH = None if sys.stdout.isatty() else 140
out = Console(highlight=False, soft_wrap=True, markup=False, width=_WIDTH)
err = Console(stderr=True, highlight=False, soft_wrap=True)


# -- shared option types ---------------------------------------------------------------------

ModelArg = Annotated[
    str,
    typer.Argument(
        help="ONNX file, or zoo:NAME for an embedded model (zoo:mobilenetv2, zoo:resnet, "
        "zoo:encoder, zoo:minilm).",
        show_default=False,
    ),
]
DimOpt = Annotated[
    list[str] | None,
    typer.Option("--dim", help="Value of a symbolic input dim, NAME=INT (repeatable)."),
]
InputOpt = Annotated[
    Path | None,
    typer.Option("--input", help="Sample inputs (.npz, one array per model input)."),
]
NetworkOpt = Annotated[
    str, typer.Option("--network", help="Link preset (3g, lte, wifi, ethernet) or RATE/RTT.")
]
DeviceProfileOpt = Annotated[
    Path | None,
    typer.Option("--device-profile", help="Device profile JSON (default: measure this machine)."),
]
ServerProfileOpt = Annotated[
    Path | None,
    typer.Option("--server-profile", help="Server profile JSON (default: measure this machine)."),
]
DeviceClassOpt = Annotated[
    str,
    typer.Option(
        "--device",
        help="How much slower the device is than its profile: this-machine, phone (2x), "
        "rpi (4x) or a factor.",
    ),
]
CodecOpt = Annotated[
    str, typer.Option("--codec", help="auto, none, zstd, lz4, fp16, int8, int8c (+zstd/+lz4).")
]
ThreadsOpt = Annotated[
    int, typer.Option("--threads", min=1, help="Threads per side when measuring.")
]


def _parse_dims(items: list[str] | None) -> dict[str, int]:
    dims: dict[str, int] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().isdigit() or int(value) <= 0:
            raise UsageError(f"--dim {item!r}: expected NAME=POSITIVE_INT, e.g. --dim sequence=128")
        dims[name.strip()] = int(value)
    return dims


def _load_inputs(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise UsageError(f"--input {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"--input {path}: not a readable .npz file ({exc})") from None


def resolve_model(spec: str) -> Any:
    """A path, or a model built for ``zoo:NAME`` (onnx is imported only then)."""
    from edgeoffload.split.zoo import resolve

    return resolve(spec)


@contextmanager
def _progress(enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar fed by ``(what, fraction)`` callbacks."""
    if not enabled or not err.is_terminal:
        yield None
        return
    columns = (TextColumn("{task.description:<40}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("starting", total=1.0)

        def update(what: str, fraction: float) -> None:
            progress.update(task, description=what, completed=fraction)

        yield update


def _profiles(
    analysis: Any,
    *,
    device_profile: Path | None,
    server_profile: Path | None,
    device_class: str,
    threads: int,
) -> tuple[Any, Any, list[str]]:
    from edgeoffload.core.presets import device_slowdown
    from edgeoffload.split.profiler import load_profile

    notes: list[str] = []
    measured = None
    if device_profile is None or server_profile is None:
        with _progress() as progress:
            started = time.perf_counter()
            measured = analysis.profile(threads=threads, progress=progress)
            seconds = time.perf_counter() - started
            notes.append(f"profiled this machine ({threads} thread(s)) in {seconds:.1f} s")
    device = load_profile(device_profile) if device_profile is not None else measured
    server = load_profile(server_profile) if server_profile is not None else measured
    assert device is not None and server is not None  # measured whenever a file is missing
    slowdown = device_slowdown(device_class)
    if slowdown != 1.0:
        device = device.with_slowdown(slowdown, name=f"{device_class} ({slowdown:g}x slower)")
        notes.append(
            f"device = {device.name} than {'its profile' if device_profile else 'this machine'}"
        )
    return device, server, notes


def _analysis(model: str, dim: list[str] | None, input_path: Path | None) -> Any:
    from edgeoffload.split.splitter import Analysis

    return Analysis.of(resolve_model(model), dims=_parse_dims(dim), inputs=_load_inputs(input_path))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _cut_table(report: Any, analysis: Any, show_all: bool) -> Table:
    graph = analysis.graph
    n = len(graph.nodes)
    table = Table(title=f"cuts of {analysis.source_name} ({n} nodes, link {report.link.name})")
    for col in (
        "cut",
        "after",
        "tensors",
        "bytes",
        "codec",
        "wire",
        "device ms",
        "transfer ms",
        "server ms",
        "total ms",
    ):
        table.add_column(
            col, justify="right" if "ms" in col or col in ("bytes", "wire") else "left"
        )
    for plan in report.plans:
        cut = plan.cut
        if not (show_all or cut.boundary or cut.index == report.best.cut.index):
            continue
        names = ", ".join(t.name for t in cut.tensors[:2]) + (" …" if len(cut.tensors) > 2 else "")
        mark = "*" if cut.index == report.best.cut.index else ""
        after = (
            "(all-remote)"
            if cut.index == 0
            else ("(all-local) " if cut.index == n else "") + cut.after
        )
        c = plan.cost
        table.add_row(
            f"{mark}{cut.id}",
            after,
            f"{len(cut.tensors)}: {names}" if cut.tensors else "-",
            _fmt_bytes(cut.nbytes),
            plan.codec if cut.index < n else "-",
            _fmt_bytes(c.wire_bytes),
            f"{c.device_ms:.2f}",
            f"{c.transfer_ms:.2f}",
            f"{c.server_ms:.2f}",
            f"{c.total_ms:.2f}",
            style="bold green" if mark else None,
        )
    return table


def _decision_lines(report: Any, bundle_path: Path | None = None) -> list[str]:
    best = report.best
    unit = "mJ" if report.objective == "energy" else "ms"
    where = "all-local" if best.cut.index == report.all_local.cut.index else best.cut.describe()
    lines = [
        f"chosen cut: {best.cut.id} {where}" + (f" [{best.cut.layer}]" if best.cut.layer else ""),
        f"  crossing: {len(best.cut.tensors)} tensor(s), {_fmt_bytes(best.cut.nbytes)} raw, "
        f"{_fmt_bytes(best.cost.wire_bytes)} on the wire with codec {best.codec}",
        f"  predicted: {best.cost.total_ms:.2f} ms (device {best.cost.device_ms:.2f}, transfer "
        f"{best.cost.transfer_ms:.2f}, server {best.cost.server_ms:.2f}); energy "
        f"{best.cost.energy_mj:.1f} mJ; device memory {_fmt_bytes(best.cost.device_memory_bytes)}",
        f"  vs all-local {report.all_local.cost.total_ms:.2f} ms: {report.speedup_vs_local:.2f}x"
        f"   vs all-remote {report.all_remote.cost.total_ms:.2f} ms: "
        f"{report.speedup_vs_remote:.2f}x   (objective: {report.objective}, {unit})",
    ]
    if bundle_path is not None:
        lines.append(f"bundle: {bundle_path}")
    return lines


# -- commands ---------------------------------------------------------------------------------


@app.command()
def cuts(
    model: ModelArg,
    dim: DimOpt = None,
    input_path: InputOpt = None,
    network: NetworkOpt = "wifi",
    device_profile: DeviceProfileOpt = None,
    server_profile: ServerProfileOpt = None,
    device: DeviceClassOpt = "phone",
    codec: CodecOpt = "auto",
    threads: ThreadsOpt = 1,
    show_all: Annotated[
        bool, typer.Option("--all", help="List every cut, not only layer boundaries.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the places MODEL can be cut, with bytes and predicted costs."""
    from edgeoffload.core.presets import parse_link

    analysis = _analysis(model, dim, input_path)
    dev, srv, notes = _profiles(
        analysis,
        device_profile=device_profile,
        server_profile=server_profile,
        device_class=device,
        threads=threads,
    )
    report = analysis.plan(device=dev, server=srv, link=parse_link(network), codec=codec)
    if as_json:
        payload = {
            "model": analysis.source_name,
            "sha256": analysis.graph.sha256,
            "layer_structure": analysis.graph.has_layer_structure,
            "report": report.to_dict(),
            "cuts": [{**p.cut.to_dict(), "plan": p.to_dict()} for p in report.plans],
        }
        out.print_json(json.dumps(payload))
        return
    for note in notes:
        err.print(f"[dim]{note}[/dim]")
    graph = analysis.graph
    if not show_all and not graph.has_layer_structure:
        show_all = True
        err.print("node names carry no layer structure: listing every cut")
    out.print(_cut_table(report, analysis, show_all))
    if not show_all:
        shown = sum(1 for p in report.plans if p.cut.boundary)
        out.print(f"{shown} layer-boundary cuts of {len(report.plans)}; --all lists every cut")
    for line in _decision_lines(report):
        out.print(line)


@app.command()
def profile(
    model: ModelArg,
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Where to write the profile JSON.")
    ],
    dim: DimOpt = None,
    input_path: InputOpt = None,
    threads: ThreadsOpt = 1,
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs per measurement.")] = 10,
    name: Annotated[
        str, typer.Option("--name", help="Name recorded in the profile.")
    ] = "this-machine",
) -> None:
    """Measure MODEL's per-node and calibrated head times on this machine."""
    from edgeoffload.split.profiler import save_profile

    analysis = _analysis(model, dim, input_path)
    with _progress() as progress:
        started = time.perf_counter()
        prof = analysis.profile(threads=threads, runs=runs, name=name, progress=progress)
    save_profile(prof, output)
    full = prof.calibration[-1].measured_ms if prof.calibration else float("nan")
    out.print(
        f"profile of {analysis.source_name} on {prof.machine}: full model {full:.2f} ms with "
        f"{threads} thread(s), {len(prof.node_ms)} nodes, measured in "
        f"{time.perf_counter() - started:.1f} s -> {output}"
    )


@app.command()
def split(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Bundle folder to write.")],
    dim: DimOpt = None,
    input_path: InputOpt = None,
    network: NetworkOpt = "wifi",
    device_profile: DeviceProfileOpt = None,
    server_profile: ServerProfileOpt = None,
    device: DeviceClassOpt = "phone",
    objective: Annotated[str, typer.Option("--objective", help="latency or energy.")] = "latency",
    max_device_memory: Annotated[
        str | None,
        typer.Option("--max-device-memory", help="e.g. 64MiB: head weights + peak activations."),
    ] = None,
    min_head_depth: Annotated[
        int,
        typer.Option(
            "--min-head-depth", min=0, help="Parametric layers that must stay on the device."
        ),
    ] = 0,
    codec: CodecOpt = "auto",
    cut: Annotated[
        str | None, typer.Option("--cut", help="Force a cut: id (c42), node or tensor name.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write predicted costs per cut as PNG.")
    ] = None,
    threads: ThreadsOpt = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the decision as JSON.")] = False,
    head_layers: Annotated[
        int | None,
        typer.Option(
            "--head-layers", min=0, help="Decoders: force this many blocks on the device."
        ),
    ] = None,
    prompt_tokens: Annotated[
        int, typer.Option("--prompt-tokens", min=1, help="Decoders: typical prompt length.")
    ] = 128,
    new_tokens: Annotated[
        int, typer.Option("--new-tokens", min=1, help="Decoders: typical reply length.")
    ] = 64,
) -> None:
    """Choose a cut for MODEL, split it, verify the halves and write a bundle.

    MODEL is an ONNX file, zoo:NAME, or a folder (an export with model.onnx, or a Hugging Face
    decoder folder, exported with past key values first). Decoder LLMs are cut between blocks
    and priced for a reply (--prompt-tokens, --new-tokens); each side keeps its KV cache.
    """
    from edgeoffload.core.costmodel import Constraints
    from edgeoffload.core.presets import parse_link, parse_size
    from edgeoffload.split.splitter import split_model

    started = time.perf_counter()
    constraints = Constraints(
        max_device_memory=parse_size(max_device_memory) if max_device_memory else None,
        min_head_depth=min_head_depth,
    )
    link = parse_link(network)
    resolved = resolve_model(model)
    if _is_decoder(resolved):
        _split_decoder(
            resolved,
            output,
            link=link,
            device_class=device,
            threads=threads,
            constraints=constraints,
            codec=codec,
            head_layers=head_layers,
            cut=cut,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            as_json=as_json,
            started=started,
        )
        return
    if head_layers is not None:
        raise UsageError("--head-layers is for decoder LLMs; use --cut for other models")
    analysis = _analysis(model, dim, input_path)
    chosen_cut = analysis.graph.find_cut(cut, analysis.cuts) if cut else None
    dev, srv, notes = _profiles(
        analysis,
        device_profile=device_profile,
        server_profile=server_profile,
        device_class=device,
        threads=threads,
    )
    report = analysis.plan(
        device=dev, server=srv, link=link, codec=codec, objective=objective, constraints=constraints
    )
    plan = report.best
    if chosen_cut is not None:
        plan = next(p for p in report.plans if p.cut.index == chosen_cut.index)
        notes.append(f"cut forced with --cut {cut}")
        if not plan.feasible:
            raise UsageError(f"--cut {cut}: {plan.why_infeasible}")
        report = replace(report, best=plan)
    with _progress() as progress:
        if progress:
            progress(f"splitting at {plan.cut.id} and verifying", 0.5)
        bundle = split_model(analysis, plan.cut, output, codec=plan.codec, report=report)
    elapsed = time.perf_counter() - started
    if plot is not None:
        plot_costs(report, plot, title=f"{analysis.source_name}: predicted latency per cut")
    if as_json:
        out.print_json(
            json.dumps(
                {
                    "bundle": str(output),
                    "seconds": round(elapsed, 3),
                    "report": report.to_dict(),
                    "verification": bundle.manifest.verification,
                }
            )
        )
        return
    for note in notes:
        err.print(f"[dim]{note}[/dim]")
    for line in _decision_lines(report, bundle.path):
        out.print(line)
    out.print(f"{_verification_line(bundle.manifest.verification)}; split took {elapsed:.1f} s")
    if plot is not None:
        out.print(f"plot: {plot}")


def _is_decoder(model: Any) -> bool:
    """An ONNX file whose inputs include a KV cache (read without loading the weights)."""
    if not isinstance(model, Path) or model.suffix != ".onnx" or not model.is_file():
        return False
    import onnx

    from edgeoffload.split.graph import detect_state_pairs

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:
        return False  # not ONNX: the one-shot path reports it properly
    inputs = [i.name for i in proto.graph.input]
    return bool(detect_state_pairs(inputs, [o.name for o in proto.graph.output]))


def _split_decoder(
    model: Path,
    output: Path,
    *,
    link: Any,
    device_class: str,
    threads: int,
    constraints: Any,
    codec: str,
    head_layers: int | None,
    cut: str | None,
    prompt_tokens: int,
    new_tokens: int,
    as_json: bool,
    started: float,
) -> None:
    from edgeoffload.core.gencost import GenerationWorkload
    from edgeoffload.core.presets import device_slowdown
    from edgeoffload.split.decoder_split import DecoderAnalysis, split_decoder

    if cut is not None:
        raise UsageError("decoders are cut between blocks: use --head-layers N, not --cut")
    notes: list[str] = []
    if codec == "auto":
        codec = "none"  # a lossy codec would change the generated tokens
    elif codec != "none":
        notes.append(f"codec {codec}: tokens may differ from the unsplit model")
    with _progress() as progress:
        if progress:
            progress("analysing the decoder (prefill and decode step)", 0.1)
        analysis = DecoderAnalysis.of(model, workload=GenerationWorkload(prompt_tokens, new_tokens))
        if head_layers is not None and head_layers not in analysis.blocks:
            blocks = sorted(analysis.blocks)
            raise UsageError(f"--head-layers {head_layers}: choose one of {blocks}")
        slowdown = device_slowdown(device_class)

        def profiles(phase: Any) -> tuple[Any, Any]:
            if progress:
                progress("profiling this machine", 0.4)
            measured = phase.profile(threads=threads)
            device = measured.with_slowdown(slowdown, name=f"{device_class} ({slowdown:g}x)")
            return device, measured

        report = analysis.plan(profiles=profiles, link=link, codec=codec, constraints=constraints)
        chosen = report.best
        if head_layers is not None:
            forced = [p for p in report.plans if p.head_layers == head_layers]
            if not forced:
                blocks = sorted(k for k in analysis.blocks)
                raise UsageError(f"--head-layers {head_layers}: choose one of {blocks}")
            chosen = forced[0]
            notes.append(f"cut forced with --head-layers {head_layers}")
        if progress:
            progress(f"splitting ({chosen.label}) and verifying generation", 0.7)
        bundle = split_decoder(
            model,
            output,
            head_layers=chosen.head_layers,
            codec=codec,
            report=report,
            analysis=analysis.step,
        )
    elapsed = time.perf_counter() - started
    if as_json:
        out.print_json(
            json.dumps(
                {
                    "bundle": str(output),
                    "seconds": round(elapsed, 3),
                    "report": report.to_dict(),
                    "chosen": chosen.to_dict(),
                    "verification": bundle.manifest.verification,
                }
            )
        )
        return
    for note in notes:
        err.print(f"[dim]{note}[/dim]")
    table = Table(
        title=f"{model.name}: {analysis.layout.num_layers} blocks, {prompt_tokens}-token prompt, "
        f"{new_tokens} new tokens, link {link.name}"
    )
    for col in ("cut", "where", "TTFT ms", "ms/token", "total ms", "bytes/token", "device mem"):
        table.add_column(col, justify="left" if col in ("cut", "where") else "right")
    for plan in report.plans:
        mark = "*" if plan is chosen else ""
        table.add_row(
            f"{mark}{plan.cut.id}",
            plan.label,
            f"{plan.ttft_ms:.1f}",
            f"{plan.tpot_ms:.2f}",
            f"{plan.total_ms:.0f}",
            _fmt_bytes(plan.step.wire_bytes) if plan.head_layers is not None else "-",
            _fmt_bytes(plan.device_memory_bytes),
            style="bold green" if mark else None,
        )
    out.print(table)
    gen = bundle.manifest.verification.get("generation", {})
    out.print(
        f"chose {chosen.label} ({chosen.cut.id}): predicted TTFT {chosen.ttft_ms:.1f} ms, "
        f"{1e3 / chosen.tpot_ms:.1f} tokens/s -> {bundle.path}"
    )
    out.print(
        f"verified: greedy decoding through the split matches the full model "
        f"({gen.get('steps')} steps, {'bit-exact' if gen.get('exact') else 'within tolerance'}); "
        f"split took {elapsed:.1f} s"
    )


def _verification_line(ver: dict[str, Any]) -> str:
    line = "verified: tail(head(x)) == full model on 2 inputs"
    line += (
        " (bit-exact)"
        if ver["exact"]
        else f" (max |diff| {max(ver['max_abs_error'].values()):.2g})"
    )
    if ver["codec_max_rel_error"]:
        worst = max(ver["codec_max_rel_error"].values())
        line += f"; codec {ver['codec']} moves outputs by at most {worst:.2g} of their range"
    return line


def plot_costs(report: Any, path: Path, *, title: str) -> None:
    """Predicted latency per cut, stacked by component, chosen cut marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib", hint="pip install 'edgeoffload[plot]'"
        ) from None
    plans = report.plans
    xs = [p.cut.index for p in plans]
    parts = [
        ("device", [p.cost.device_ms for p in plans], "#4c72b0"),
        ("encode+decode", [p.cost.encode_ms + p.cost.decode_ms for p in plans], "#dd8452"),
        ("network", [p.cost.network_ms for p in plans], "#c44e52"),
        ("server", [p.cost.server_ms for p in plans], "#55a868"),
    ]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    bottom = [0.0] * len(xs)
    for label, values, color in parts:
        ax.bar(xs, values, bottom=bottom, width=1.0, label=label, color=color, linewidth=0)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    best = report.best.cut.index
    # Linear scale (stacks on a log axis lie); clip the few huge cuts so the rest stay legible.
    top = 3 * max(report.all_local.cost.total_ms, report.best.cost.total_ms)
    ax.set_ylim(0, min(max(bottom), top) * 1.05)
    ax.axvline(best, color="black", linestyle="--", linewidth=1)
    ax.annotate(
        f"chosen {report.best.cut.id}: {report.best.cost.total_ms:.1f} ms",
        (best, ax.get_ylim()[1] * 0.92),
        ha="right",
        xytext=(-4, 0),
        textcoords="offset points",
    )
    ax.set_xlabel("cut (number of nodes on the device)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(f"{title} — link {report.link.name}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@app.command()
def chat(
    bundle_dir: Annotated[Path, typer.Argument(help="Decoder bundle folder (the device's copy).")],
    server: Annotated[str, typer.Option("--server", help="Edge server URL, ws://HOST:PORT.")],
    server_key: Annotated[
        str, typer.Option("--server-key", help="Server public key, or its key file/folder.")
    ],
    key: Annotated[Path, typer.Option("--key", help="This device's key folder.")],
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
    fallback: Annotated[str, typer.Option("--fallback", help="local or error.")] = "local",
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per request.")] = 10.0,
    threads: ThreadsOpt = 1,
    stats: Annotated[bool, typer.Option("--stats", help="Print timing after each reply.")] = False,
) -> None:
    """Chat with a split decoder: its first blocks here, the rest on the edge server."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    client_args = (bundle_dir, server, server_key, key, fallback, timeout, threads)
    with _blocking_client(*client_args) as client:
        turns = [prompt] if prompt is not None else _stdin_turns()
        for text in turns:
            messages.append({"role": "user", "content": text})
            reply = ""
            for token in client.generate(
                messages=messages,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
            ):
                reply += token.text
                # Verbatim: no markup, no emoji codes (":thumbs_up:" must stay text).
                out.file.write(token.text)
                out.file.flush()
            out.print()
            out.file.flush()  # before the stats line on stderr
            messages.append({"role": "assistant", "content": reply})
            gen = client.client.last_generation
            if stats and gen is not None:
                info = gen.to_dict()
                err.print(
                    f"[dim]{info['generated_tokens']} tokens, TTFT {info['ttft_ms']:.0f} ms, "
                    f"{info['decode_tokens_per_s']:.1f} tokens/s, {info['median_step_bytes']} "
                    f"B/token up, finish {info['finish_reason']}"
                    + (f", finished locally ({gen.fallback_reason})" if gen.fallback_reason else "")
                    + "[/dim]"
                )


def _blocking_client(
    bundle_dir: Path,
    server: str,
    server_key: str,
    key: Path,
    fallback: str,
    timeout: float,
    threads: int,
) -> BlockingOffloadClient:
    """The device client that `run` and `chat` use, from their shared options."""
    from edgeoffload.device.client import BlockingOffloadClient
    from edgeoffload.keys import load_identity, load_public

    return BlockingOffloadClient(
        bundle_dir,
        server=server,
        server_key=load_public(server_key),
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


@app.command()
def export(
    source: Annotated[
        str,
        typer.Argument(
            help="Hugging Face model dir, or 'minilm' for the packaged all-MiniLM-L6-v2."
        ),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")],
    task: Annotated[
        str,
        typer.Option(
            "--task",
            help="optimum task (auto, feature-extraction, text-generation-with-past, ...).",
        ),
    ] = "auto",
) -> None:
    """Export a Hugging Face model to ONNX (needs the 'convert' extra)."""
    if source == "minilm":
        from edgeoffload.converters.minilm import export_minilm

        path = export_minilm(output)
    else:
        from edgeoffload.converters.hf_export import export_hf

        path = export_hf(Path(source), output, task=task)
    out.print(f"exported and validated: {path}")


@app.command()
def demo(
    network: NetworkOpt = "wifi",
    device: DeviceClassOpt = "rpi",
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
    from edgeoffload.core.presets import parse_link
    from edgeoffload.lab.demo import full_model_runner, run_loopback
    from edgeoffload.split.splitter import split_model

    started = time.perf_counter()
    link = parse_link(network)
    analysis = _analysis(model, None, None)
    n = len(analysis.graph.nodes)
    out.print(
        f"model: {analysis.source_name} ({n} nodes, {len(analysis.cuts)} cuts); device: "
        f"{device}; network: {link.name} ({link.up_bps / 1e6:g}/{link.down_bps / 1e6:g} "
        f"Mbit/s, RTT {link.rtt_ms:g} ms)"
    )
    dev, srv, notes = _profiles(
        analysis, device_profile=None, server_profile=None, device_class=device, threads=1
    )
    for note in notes:
        out.print(note)
    report = analysis.plan(device=dev, server=srv, link=link)
    for line in _decision_lines(report):
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
        out.print(_verification_line(bundle.manifest.verification))
        samples = [analysis.graph.sample_inputs(seed=100 + i) for i in range(requests)]
        full = full_model_runner(analysis.graph.model)
        local_ms = []
        for inputs in samples:
            t0 = time.perf_counter()
            full(inputs)
            local_ms.append((time.perf_counter() - t0) * 1e3)
        out.print(
            f"starting a local edge server (127.0.0.1, Noise IK, {requests} requests per bundle)"
        )
        runs = run_loopback(
            [bundle, remote],
            {str(bundle.path): samples, str(remote.path): samples},
            reference=full,
        )
    table = Table(title="measured on this machine over loopback (median ms per request)")
    for col in (
        "path",
        "head",
        "encode+encrypt",
        "network",
        "tail (server)",
        "decode",
        "total",
        "max |diff| vs full",
    ):
        table.add_column(col, justify="right" if col != "path" else "left")
    import statistics

    table.add_row(
        "all-local",
        f"{statistics.median(local_ms):.2f}",
        "-",
        "-",
        "-",
        "-",
        f"{statistics.median(local_ms):.2f}",
        "0",
    )
    for label, result in (
        (f"split {plan.cut.id} ({plan.codec})", runs[0]),
        ("all-remote (c0)", runs[1]),
    ):
        table.add_row(
            label,
            *(
                f"{result.median(c):.2f}"
                for c in (
                    "head_ms",
                    "encode_ms",
                    "network_ms",
                    "server_ms",
                    "decode_ms",
                    "total_ms",
                )
            ),
            f"{result.max_abs_error:.2g}",
        )
    out.print(table)
    out.print(
        "loopback has no real link and the device here is this machine; the predictions "
        f"above model a {device} device on {link.name}."
    )
    out.print(f"demo took {time.perf_counter() - started:.1f} s")


keys_app = typer.Typer(
    help="Long-term X25519 keys for devices and edge servers.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
def keys_generate(
    directory: Annotated[
        Path, typer.Argument(help="Folder for private.key (0600) and public.key.")
    ],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key.")] = False,
) -> None:
    """Create a new identity key pair."""
    from edgeoffload.keys import encode_public, generate_identity

    identity = generate_identity(directory, overwrite=force)
    out.print(f"public key:  {encode_public(identity.public)}")
    out.print(f"fingerprint: {identity.fingerprint}")
    out.print(f"private key: {directory / 'private.key'} (mode 0600; never share it)")


@keys_app.command("show")
def keys_show(
    directory: Annotated[Path, typer.Argument(help="Key folder written by keys generate.")],
) -> None:
    """Print the public key and fingerprint of an identity."""
    from edgeoffload.keys import encode_public, load_identity

    identity = load_identity(directory)
    out.print(f"public key:  {encode_public(identity.public)}")
    out.print(f"fingerprint: {identity.fingerprint}")


@app.command()
def serve(
    bundles: Annotated[list[Path], typer.Argument(help="Bundle folders whose tails to serve.")],
    key: Annotated[Path, typer.Option("--key", help="Server key folder (keys generate).")],
    allow: Annotated[Path, typer.Option("--allow", help="Authorized device keys: file or folder.")],
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Port (0: any free port).")
    ] = 8765,
    threads: ThreadsOpt = 1,
    workers: Annotated[
        int, typer.Option("--workers", min=0, help="Concurrent tail runs (0: CPUs).")
    ] = 0,
    max_inflight: Annotated[
        int,
        typer.Option("--max-inflight", min=0, help="Requests accepted at once (0: 4 x workers)."),
    ] = 0,
    idle_timeout: Annotated[
        float, typer.Option("--idle-timeout", help="Seconds before a silent device is dropped.")
    ] = 120.0,
    kv_budget: Annotated[
        str,
        typer.Option("--kv-budget", help="Decoders: KV-cache memory for all sessions (LRU)."),
    ] = "1GiB",
    session_ttl: Annotated[
        float, typer.Option("--session-ttl", help="Decoders: seconds an idle session is kept.")
    ] = 600.0,
    max_context: Annotated[
        int, typer.Option("--max-context", min=1, help="Decoders: positions per session.")
    ] = 4096,
) -> None:
    """Serve bundle tails to allow-listed devices over the encrypted protocol.

    Decoder bundles are served as generation sessions: the tail's KV cache of each
    conversation stays here (bounded by --kv-budget, --session-ttl and --max-context).
    """
    import asyncio
    import signal

    from edgeoffload.bundle import load_bundle
    from edgeoffload.core.presets import parse_size
    from edgeoffload.edge.server import EdgeServer, ServerConfig
    from edgeoffload.edge.allowlist import AllowList
    from edgeoffload.keys import load_identity

    loaded = [load_bundle(b) for b in bundles]
    identity = load_identity(key)
    allow_list = AllowList(allow)
    config = ServerConfig(
        host=host,
        port=port,
        threads=threads,
        workers=workers,
        max_inflight=max_inflight,
        idle_timeout=idle_timeout,
        kv_budget=parse_size(kv_budget),
        session_ttl=session_ttl,
        max_context=max_context,
    )

    async def main_loop() -> None:
        server = EdgeServer(loaded, identity=identity, allow=allow_list, config=config)
        await server.start()
        out.print(
            f"serving {len(loaded)} bundle(s) on ws://{host}:{server.port} "
            f"(key {identity.fingerprint}, {len(allow_list)} device key(s) allowed); "
            f"GET /healthz for status; SIGTERM drains and stops"
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, allow_list.try_reload)
        await stop.wait()
        out.print("draining in-flight requests…")
        await server.shutdown()
        out.print(f"stopped: {server.stats.results} results, errors {server.stats.errors}")

    asyncio.run(main_loop())


@app.command("run")
def run_cmd(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder (the device's copy).")],
    server: Annotated[str, typer.Option("--server", help="Edge server URL, ws://HOST:PORT.")],
    server_key: Annotated[
        str, typer.Option("--server-key", help="Server public key, or its key file/folder.")
    ],
    key: Annotated[Path, typer.Option("--key", help="This device's key folder.")],
    input_path: Annotated[
        Path, typer.Option("--input", help="Inputs (.npz, one array per model input).")
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Where to write the outputs (.npz).")
    ],
    fallback: Annotated[str, typer.Option("--fallback", help="local or error.")] = "local",
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per request.")] = 10.0,
    threads: ThreadsOpt = 1,
) -> None:
    """Run a bundle: head here, tail on the edge server (or locally as fallback)."""
    import numpy as np

    inputs = _load_inputs(input_path)
    assert inputs is not None
    client_args = (bundle_dir, server, server_key, key, fallback, timeout, threads)
    with _blocking_client(*client_args) as client:
        outputs = client.run(inputs)
        timing = client.last_timing
    np.savez(output, **outputs)  # type: ignore[arg-type]
    assert timing is not None
    where = "offloaded" if timing.offloaded else f"ran locally ({timing.fallback_reason})"
    out.print(
        f"{where}: total {timing.total_ms:.2f} ms (head {timing.head_ms:.2f}, encode+encrypt "
        f"{timing.encode_ms:.2f}, network {timing.network_ms:.2f}, tail {timing.server_ms:.2f}, "
        f"decode {timing.decode_ms:.2f}) -> {output}"
    )


@app.command()
def inspect(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder written by split.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Verify a bundle's hashes and show its manifest."""
    from edgeoffload.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    if as_json:
        out.print_json(json.dumps(m.to_dict()))
        return
    out.print(f"bundle {bundle.path}: version {m.version}, all hashes verified")
    out.print(f"  source: {m.source_name} sha256 {m.source_sha256[:16]}…")
    out.print(f"  cut: {m.cut_id} after {m.cut_after or '(nothing: all-remote)'}; codec {m.codec}")
    for label, part in (("head", m.head), ("tail", m.tail)):
        if part is None:
            out.print(f"  {label}: none")
            continue
        out.print(
            f"  {label}: {part.file} sha256 {part.sha256[:16]}… "
            f"in [{', '.join(t.name for t in part.inputs)}] "
            f"out [{', '.join(t.name for t in part.outputs)}]"
        )
    crossing = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in m.crossing)
    out.print(f"  crossing: {crossing or '(nothing: all-local)'}")


BENCHMARKS = ("cost-accuracy", "overhead", "throughput", "server", "lab", "generate")


@app.command()
def bench(
    scenario: Annotated[
        str,
        typer.Argument(help="cost-accuracy, overhead, throughput, server, lab or generate."),
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
    """
    from edgeoffload.lab import bench as bench_mod

    if scenario not in BENCHMARKS:
        raise UsageError(
            f"unknown benchmark {scenario!r}", hint=f"choose one of {', '.join(BENCHMARKS)}"
        )
    if scenario == "cost-accuracy":
        with _progress() as progress:
            result = bench_mod.cost_accuracy(
                resolve_model(model),
                threads=threads,
                runs=runs,
                dims=_parse_dims(dim),
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
        result["benchmark"] = "generate"
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(result, indent=1) + "\n")
        for line in format_result(result):
            out.print(line)
        return
    elif scenario == "lab":
        from edgeoffload.lab.scenarios import run_lab

        result = run_lab(repeats=max(3, runs // 3), progress=lambda what: err.print(what))
    else:
        result = bench_mod.pipeline_throughput()
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=1) + "\n")
    _print_bench(result)


def _print_bench(result: dict[str, Any]) -> None:
    if result["benchmark"] == "lab":
        out.print(f"median regret {result['median_regret']}, worst {result['worst_regret']}")
        for s in result["scenarios"]:
            out.print(
                f"{s['model']:<12} {s['device']:<6} {s['link']:<9} chosen {s['chosen']:<6} "
                f"best {s['measured_best']:<6} regret {s['regret']:.2f} "
                f"speedup {s['speedup_vs_better_extreme']:.2f}x"
            )
        return
    rows = result["rows"]
    if result["benchmark"] != "cost-accuracy":  # flat columns only (nested details in JSON)
        rows = [{k: v for k, v in r.items() if not isinstance(v, dict | list)} for r in rows]
    if result["benchmark"] == "cost-accuracy":
        for kind in ("head", "tail"):
            s = result[kind]
            out.print(
                f"{kind}: Spearman {s['spearman']:.3f}, median relative error "
                f"{s['median_relative_error']:.1%}, max {s['max_relative_error']:.1%} over "
                f"{result['single_tensor_cuts']} single-tensor cuts of {result['model']}"
            )
        return
    table = Table(title=result["benchmark"])
    for col in rows[0]:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    out.print(table)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Log progress details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(name)s: %(message)s",
    )
    if version:
        out.print(f"edgeoffload {__version__}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        out.print(ctx.get_help())


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        result = app(args=args, prog_name="edgeoffload", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except EdgeOffloadError as exc:
        err.print(f"edgeoffload: error: {exc.message}", markup=False)
        if exc.hint:
            err.print(f"hint: {exc.hint}", markup=False)
        return exc.exit_code
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.TyperException as exc:  # usage errors: bad option, missing argument
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            err.print(f"edgeoffload: error: {exc.format_message()}", markup=False)
        return int(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("edgeoffload: interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
