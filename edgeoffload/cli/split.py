"""Commands on the splitting side: ``cuts``, ``profile``, ``split``, ``export-ort``, ``inspect``,
``export``.

The split machinery (edgeoffload.split, edgeoffload.lab.plots, the converters) imports onnx,
matplotlib or torch, so each command imports it inside: `edgeoffload --help` stays fast and a
missing extra becomes MissingExtra (see _extras.py), not an import error at start-up.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer

from edgeoffload.bundle import MANIFEST, load_bundle
from edgeoffload.cli._analysis import (
    analysis_of,
    parse_device_class,
    profiles_for,
    resolve_model,
)
from edgeoffload.cli._options import (
    CodecOpt,
    DeviceClassOpt,
    DeviceProfileOpt,
    DimOpt,
    InputOpt,
    ModelArg,
    NetworkOpt,
    ServerProfileOpt,
    ThreadsOpt,
    load_inputs,
)
from edgeoffload.cli._render import (
    cut_table,
    decision_lines,
    decoder_summary_lines,
    decoder_table,
    err,
    manifest_lines,
    out,
    print_notes,
    progress_bar,
    verification_line,
)
from edgeoffload.core.costmodel import Constraints
from edgeoffload.core.presets import apply_device_class, op_classes_of, parse_link, parse_size
from edgeoffload.errors import BadSignature, PlanError, UsageError
from edgeoffload.signing import read_signature, signature_holds
from edgeoffload.types import LinkProfile


def cuts(
    model: ModelArg,
    dim: DimOpt = None,
    input_path: InputOpt = None,
    network: NetworkOpt = "wifi",
    device_profile: DeviceProfileOpt = None,
    server_profile: ServerProfileOpt = None,
    device: DeviceClassOpt = "phone-mid",
    codec: CodecOpt = "auto",
    threads: ThreadsOpt = 1,
    show_all: Annotated[
        bool, typer.Option("--all", help="List every cut, not only layer boundaries.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the places MODEL can be cut, with bytes and predicted costs."""
    analysis = analysis_of(model, dim, input_path)
    dev, srv, notes = profiles_for(
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
    print_notes(notes)
    if not show_all and not analysis.graph.has_layer_structure:
        show_all = True
        err.print("node names carry no layer structure: listing every cut")
    out.print(cut_table(report, analysis, show_all))
    if not show_all:
        shown = sum(1 for p in report.plans if p.cut.boundary)
        out.print(f"{shown} layer-boundary cuts of {len(report.plans)}; --all lists every cut")
    for line in decision_lines(report):
        out.print(line)


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
    from edgeoffload.split.profiler import save_profile  # imports onnx

    analysis = analysis_of(model, dim, input_path)
    with progress_bar() as progress:
        started = time.perf_counter()
        prof = analysis.profile(threads=threads, runs=runs, name=name, progress=progress)
    save_profile(prof, output)
    full = prof.calibration[-1].measured_ms if prof.calibration else float("nan")
    out.print(
        f"profile of {analysis.source_name} on {prof.machine}: full model {full:.2f} ms with "
        f"{threads} thread(s), {len(prof.node_ms)} nodes, measured in "
        f"{time.perf_counter() - started:.1f} s -> {output}"
    )


def split(
    model: ModelArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Bundle folder to write.")],
    dim: DimOpt = None,
    input_path: InputOpt = None,
    network: NetworkOpt = "wifi",
    device_profile: DeviceProfileOpt = None,
    server_profile: ServerProfileOpt = None,
    device: DeviceClassOpt = "phone-mid",
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
    head_weights: Annotated[
        str,
        typer.Option(
            "--head-weights",
            help="Decoders: store the head's weights as int4, int8, fp16 or fp32 (as cut).",
        ),
    ] = "fp32",
    tail_weights: Annotated[
        str,
        typer.Option("--tail-weights", help="Decoders: the same for the tail (edge server)."),
    ] = "fp32",
    weights_block: Annotated[
        int,
        typer.Option(
            "--weights-block", help="int4/int8: weights per quantisation block (32, 64, 128)."
        ),
    ] = 32,
    weights_symmetric: Annotated[
        bool,
        typer.Option(
            "--weights-symmetric/--weights-asymmetric",
            help="int4/int8: symmetric blocks (no zero point) or asymmetric (default).",
        ),
    ] = False,
    weights_method: Annotated[
        str,
        typer.Option(
            "--weights-method",
            help="int4: rtn (round to nearest, default) or hqq (half-quadratic fit, needs "
            "torch; the embedding stays RTN).",
        ),
    ] = "rtn",
    weights_compute: Annotated[
        str,
        typer.Option(
            "--weights-compute",
            help="int4/int8: what MatMulNBits computes in: fp32 (default) or int8 (activations "
            "quantised per block: faster decode, other numerics; measured like the rest).",
        ),
    ] = "fp32",
    max_quality_loss: Annotated[
        float | None,
        typer.Option(
            "--max-quality-loss",
            min=0.0,
            max=1.0,
            help="Quantised weights: refuse the bundle if teacher-forced top-1 agreement with "
            "fp32 is lower than 1 - X (0.05: at least 95 %).",
        ),
    ] = None,
) -> None:
    """Choose a cut for MODEL, split it, verify the halves and write a bundle.

    MODEL is an ONNX file, zoo:NAME, or a folder (an export with model.onnx, or a Hugging Face
    decoder folder, exported with past key values first). Decoder LLMs are cut between blocks
    and priced for a reply (--prompt-tokens, --new-tokens); each side keeps its KV cache.
    --head-weights/--tail-weights quantise each part after the cut and measure the bundle
    against the fp32 model (agreement, perplexity; stored in the manifest).
    """
    from edgeoffload.split.splitter import split_model  # imports onnx

    started = time.perf_counter()
    constraints = Constraints(
        max_device_memory=parse_size(max_device_memory) if max_device_memory else None,
        min_head_depth=min_head_depth,
    )
    link = parse_link(network)
    resolved = resolve_model(model)
    weights = WeightOptions(
        head_weights,
        tail_weights,
        weights_block,
        weights_symmetric,
        weights_method,
        weights_compute,
        max_quality_loss,
    )
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
            weights=weights,
        )
        return
    if head_layers is not None:
        raise UsageError("--head-layers is for decoder LLMs; use --cut for other models")
    if weights.changed:
        raise UsageError(
            "--head-weights/--tail-weights/--max-quality-loss are for decoder LLMs",
            hint="the quality of quantised weights is measured by generating text",
        )
    analysis = analysis_of(model, dim, input_path)
    chosen_cut = analysis.graph.find_cut(cut, analysis.cuts) if cut else None
    dev, srv, notes = profiles_for(
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
    with progress_bar() as progress:
        if progress:
            progress(f"splitting at {plan.cut.id} and verifying", 0.5)
        bundle = split_model(analysis, plan.cut, output, codec=plan.codec, report=report)
    elapsed = time.perf_counter() - started
    if plot is not None:
        from edgeoffload.lab.plots import plot_costs  # imports matplotlib

        plot_costs(report, plot, title=f"{analysis.source_name}: predicted latency per cut")
    if as_json:
        _print_split_json(output, elapsed, report, bundle)
        return
    print_notes(notes)
    for line in decision_lines(report, bundle.path):
        out.print(line)
    out.print(f"{verification_line(bundle.manifest.verification)}; split took {elapsed:.1f} s")
    if plot is not None:
        out.print(f"plot: {plot}")


@dataclass(frozen=True)
class WeightOptions:
    """The split's weight options as given (parsed into schemes where onnx is loaded)."""

    head: str
    tail: str
    block: int
    symmetric: bool
    method: str
    compute: str
    max_quality_loss: float | None

    @property
    def changed(self) -> bool:
        return (self.head, self.tail) != ("fp32", "fp32") or self.max_quality_loss is not None

    def schemes(self) -> tuple[Any, Any]:
        from edgeoffload.split.weights import WeightScheme  # imports onnx

        def scheme(kind: str) -> Any:
            # HQQ is an int4 method: an int8 or fp16 side of the same split stays RTN.
            method = self.method if kind == "int4" else "rtn"
            return WeightScheme(kind, self.block, self.symmetric, method, self.compute)

        return scheme(self.head), scheme(self.tail)


def _print_split_json(output: Path, elapsed: float, report: Any, bundle: Any, **extra: Any) -> None:
    """The --json answer of ``split``: the bundle, the time, the plan and its verification."""
    data = {"bundle": str(output), "seconds": round(elapsed, 3), "report": report.to_dict()}
    out.print_json(json.dumps({**data, **extra, "verification": bundle.manifest.verification}))


def _is_decoder(model: Any) -> bool:
    """An ONNX file whose inputs include a KV cache (read without loading the weights)."""
    if not isinstance(model, Path) or model.suffix != ".onnx" or not model.is_file():
        return False
    import onnx  # the split extra; only a file on disk is read here

    from edgeoffload.core.decoder import state_pairs

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:
        return False  # not ONNX: the one-shot path reports it properly
    inputs = [i.name for i in proto.graph.input]
    return bool(state_pairs(inputs, [o.name for o in proto.graph.output]))


def _split_decoder(
    model: Path,
    output: Path,
    *,
    link: LinkProfile,
    device_class: str,
    threads: int,
    constraints: Constraints,
    codec: str,
    head_layers: int | None,
    cut: str | None,
    prompt_tokens: int,
    new_tokens: int,
    as_json: bool,
    started: float,
    weights: WeightOptions,
) -> None:
    """`split` for a decoder LLM: cut between blocks, priced for a reply (the head's memory
    with its weights as stored), quantised and measured when asked."""
    from edgeoffload.core.gencost import GenerationWorkload
    from edgeoffload.split.decoder_split import (  # imports onnx
        DecoderAnalysis,
        check_head_layers,
        choose_decoder_plan,
        decoder_codec,
        split_decoder,
    )

    if cut is not None:
        raise UsageError("decoders are cut between blocks: use --head-layers N, not --cut")
    head_scheme, tail_scheme = weights.schemes()
    codec, notes = decoder_codec(codec)
    with progress_bar() as progress:
        if progress:
            progress("analysing the decoder (prefill and decode step)", 0.1)
        analysis = DecoderAnalysis.of(model, workload=GenerationWorkload(prompt_tokens, new_tokens))
        check_head_layers(head_layers, analysis.blocks)
        target = parse_device_class(device_class, notes)

        def profiles(phase: Any) -> tuple[Any, Any]:
            if progress:
                progress("profiling this machine", 0.4)
            measured = phase.profile(threads=threads)
            device = apply_device_class(measured, target, op_classes_of(phase.graph.nodes))
            return device, measured

        try:
            report = analysis.plan(
                profiles=profiles,
                link=link,
                codec=codec,
                constraints=constraints,
                head_weights=head_scheme,
            )
        except PlanError as exc:
            lighter = analysis.lighter_weights_hint(constraints, head_scheme)
            if lighter is None:
                raise
            raise PlanError(exc.message, hint=f"{lighter}; or {exc.hint}") from None
        chosen, forced = choose_decoder_plan(report, head_layers)
        notes += forced
        if not chosen.feasible:
            notes.append(f"the forced cut is over the constraints: {chosen.why_infeasible}")
            lighter = analysis.lighter_weights_hint(constraints, head_scheme, head_layers)
            if lighter is not None:
                notes.append(lighter)
        if progress:
            measure = " (then quantising and measuring quality)" if weights.changed else ""
            progress(f"splitting ({chosen.label}) and verifying generation{measure}", 0.7)
        bundle = split_decoder(
            model,
            output,
            head_layers=chosen.head_layers,
            codec=codec,
            report=report,
            analysis=analysis.step,
            head_weights=head_scheme,
            tail_weights=tail_scheme,
            max_quality_loss=weights.max_quality_loss,
            threads=threads,
        )
    elapsed = time.perf_counter() - started
    if as_json:
        m = bundle.manifest
        extra = {"chosen": chosen.to_dict(), "weights": m.weights, "quality": m.quality}
        _print_split_json(output, elapsed, report, bundle, **extra)
        return
    print_notes(notes)
    title = (
        f"{model.name}: {analysis.layout.num_layers} blocks, {prompt_tokens}-token prompt, "
        f"{new_tokens} new tokens, link {link.name}"
    )
    out.print(decoder_table(report, chosen, title=title))
    for line in decoder_summary_lines(chosen, bundle, elapsed):
        out.print(line)


def export_ort(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder written by split.")],
    optimization: Annotated[
        str,
        typer.Option(
            "--optimization",
            help="Graph optimization saved in the .ort files: disable (the graph as split), "
            "basic (portable to every execution provider), extended or all (CPU-only kernels).",
        ),
    ] = "disable",
    tail: Annotated[
        bool, typer.Option("--tail/--no-tail", help="Also convert the tail (local fallback).")
    ] = True,
    input_path: InputOpt = None,
    samples: Annotated[
        int, typer.Option("--samples", min=1, help="Generated samples to compare outputs on.")
    ] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print the ort section as JSON.")] = False,
) -> None:
    """Write ORT-format parts (head.ort, tail.ort) and required_operators.config into a bundle.

    For onnxruntime-mobile, onnxruntime-web and reduced (minimal) onnxruntime builds. Each .ort
    is checked to give bit-identical outputs to its .onnx, then pinned by sha256 in the
    manifest; the bundle version stays the same, so such a device pairs with any server of it.
    A signed bundle loses its signature (the manifest changes; a warning says so): sign after.
    """
    from edgeoffload.split.ort_export import export_ort as run_export  # onnxruntime tools

    if optimization not in ("disable", "basic", "extended", "all"):
        raise UsageError(
            f"--optimization {optimization!r}: expected disable, basic, extended or all"
        )
    given = load_inputs(input_path)
    started = time.perf_counter()
    bundle = run_export(
        bundle_dir,
        optimization=optimization,
        tail=tail,
        inputs=[given] if given is not None else None,
        samples=samples,
    )
    ort = bundle.manifest.ort
    assert ort is not None  # export_ort records it or raises
    if as_json:
        out.print_json(json.dumps({"bundle": str(bundle.path), **ort.to_dict()}))
        return
    for entry in ort.files():
        size = (bundle.path / entry.file).stat().st_size
        out.print(f"wrote {bundle.path / entry.file} ({size:,} bytes, sha256 {entry.sha256[:16]}…)")
    out.print(
        f"outputs identical to the .onnx parts (optimization {optimization}) on "
        f"{ort.check.get('samples')} sample(s); bundle version {bundle.manifest.version} "
        f"unchanged; took {time.perf_counter() - started:.1f} s"
    )


def inspect(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle folder written by split.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Verify a bundle's hashes and show its manifest (and its signature, if signed)."""
    bundle = load_bundle(bundle_dir)
    if as_json:
        out.print_json(json.dumps(bundle.manifest.to_dict()))
        return
    for line in manifest_lines(bundle, signature=signature_line(bundle.path)):
        out.print(line)


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
        from edgeoffload.converters.minilm import export_minilm  # torch, optimum: heavy

        path = export_minilm(output)
    else:
        from edgeoffload.converters.hf_export import export_hf  # torch, optimum: heavy

        path = export_hf(Path(source), output, task=task)
    out.print(f"exported and validated: {path}")


def signature_line(folder: Path) -> str | None:
    """What ``inspect`` says about a bundle's signature.json (None when unsigned).

    Whether the signature verifies over this manifest is shown; whether its publisher is
    trusted is not known here (that is ``edgeoffload verify --trust``).
    """
    try:
        signature = read_signature(folder)
    except BadSignature as exc:
        return f"  signature: malformed ({exc.message})"
    if signature is None:
        return None
    holds = signature_holds(signature, (folder / MANIFEST).read_bytes())
    state = (
        "valid over this manifest (check the publisher with: edgeoffload verify --trust)"
        if holds
        else "STALE: it does not verify over this manifest (modified after signing)"
    )
    return f"  signature: publisher {signature.fingerprint}, signed {signature.signed_at}; {state}"
