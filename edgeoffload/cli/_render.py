"""Everything that turns results into text: the consoles, the progress bar, bytes, tables."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# soft_wrap: long lines stay whole when piped (logs, CI) instead of wrapping at 80 columns.
# Tables keep a readable width when piped (rich would otherwise assume 80 columns).
_WIDTH = None if sys.stdout.isatty() else 140
out = Console(highlight=False, soft_wrap=True, markup=False, width=_WIDTH)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ProgressFn = Callable[[str, float], None]


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[ProgressFn | None]:
    """A rich progress bar fed by ``(what, fraction)`` callbacks (None when not on a terminal)."""
    if not enabled or not err.is_terminal:
        yield None
        return
    columns = (TextColumn("{task.description:<40}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("starting", total=1.0)

        def update(what: str, fraction: float) -> None:
            progress.update(task, description=what, completed=fraction)

        yield update


def print_notes(notes: list[str]) -> None:
    for note in notes:
        err.print(f"[dim]{note}[/dim]")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def cut_table(report: Any, analysis: Any, show_all: bool) -> Table:
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
            fmt_bytes(cut.nbytes),
            plan.codec if cut.index < n else "-",
            fmt_bytes(c.wire_bytes),
            f"{c.device_ms:.2f}",
            f"{c.transfer_ms:.2f}",
            f"{c.server_ms:.2f}",
            f"{c.total_ms:.2f}",
            style="bold green" if mark else None,
        )
    return table


def decision_lines(report: Any, bundle_path: Path | None = None) -> list[str]:
    best = report.best
    unit = "mJ" if report.objective == "energy" else "ms"
    where = "all-local" if best.cut.index == report.all_local.cut.index else best.cut.describe()
    lines = [
        f"chosen cut: {best.cut.id} {where}" + (f" [{best.cut.layer}]" if best.cut.layer else ""),
        f"  crossing: {len(best.cut.tensors)} tensor(s), {fmt_bytes(best.cut.nbytes)} raw, "
        f"{fmt_bytes(best.cost.wire_bytes)} on the wire with codec {best.codec}",
        f"  predicted: {best.cost.total_ms:.2f} ms (device {best.cost.device_ms:.2f}, transfer "
        f"{best.cost.transfer_ms:.2f}, server {best.cost.server_ms:.2f}); energy "
        f"{best.cost.energy_mj:.1f} mJ; device memory {fmt_bytes(best.cost.device_memory_bytes)}",
        f"  vs all-local {report.all_local.cost.total_ms:.2f} ms: {report.speedup_vs_local:.2f}x"
        f"   vs all-remote {report.all_remote.cost.total_ms:.2f} ms: "
        f"{report.speedup_vs_remote:.2f}x   (objective: {report.objective}, {unit})",
    ]
    if bundle_path is not None:
        lines.append(f"bundle: {bundle_path}")
    return lines


def verification_line(ver: dict[str, Any]) -> str:
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


def decoder_table(report: Any, chosen: Any, *, title: str) -> Table:
    """The priced block cuts of a decoder, the chosen one marked."""
    table = Table(title=title)
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
            fmt_bytes(plan.step.wire_bytes) if plan.head_layers is not None else "-",
            fmt_bytes(plan.device_memory_bytes),
            style="bold green" if mark else None,
        )
    return table


def decoder_summary_lines(chosen: Any, bundle: Any, elapsed: float) -> list[str]:
    gen = bundle.manifest.verification.get("generation", {})
    lines = [
        f"chose {chosen.label} ({chosen.cut.id}): predicted TTFT {chosen.ttft_ms:.1f} ms, "
        f"{1e3 / chosen.tpot_ms:.1f} tokens/s, device memory "
        f"{fmt_bytes(chosen.device_memory_bytes)} -> {bundle.path}",
        f"verified: greedy decoding through the split matches the full model "
        f"({gen.get('steps')} steps, {'bit-exact' if gen.get('exact') else 'within tolerance'}); "
        f"split took {elapsed:.1f} s",
    ]
    return lines + weights_lines(bundle, indent="")


def weights_lines(bundle: Any, *, indent: str = "  ") -> list[str]:
    """How a bundle's parts store their weights, and the measured quality (if quantised)."""
    m = bundle.manifest
    if not m.weights:
        return [f"{indent}weights: fp32 (as cut)"]
    parts = []
    for label in ("head", "tail"):
        record = m.weights.get(label)
        if record is None:
            continue
        kind = record.get("dtype", "?")
        if "block" in record:
            kind += f" {str(record.get('scheme', '')).upper()} block {record['block']} " + (
                "sym" if record.get("symmetric") else "asym"
            )
            if record.get("compute", "fp32") != "fp32":
                kind += f", {record['compute']} compute"
        part = getattr(m, label)
        size = (bundle.path / part.file).stat().st_size if part is not None else 0
        parts.append(f"{label} {kind} ({fmt_bytes(size)} file)")
    lines = [f"{indent}weights: {', '.join(parts)}"]
    q = m.quality
    if q:
        lines.append(
            f"{indent}quality vs fp32: teacher-forced top-1 agreement {q['agreement']:.1%} over "
            f"{q['positions']} positions ({q['prompts']} prompts x {q['new_tokens']} tokens); "
            f"perplexity {q['perplexity']:.3f} vs {q['perplexity_fp32']:.3f} "
            f"({q['perplexity_change']:+.1%}) on {q['text']['file']}"
        )
    return lines


def manifest_lines(bundle: Any, *, signature: str | None = None) -> list[str]:
    """What ``inspect`` prints about a verified bundle (``signature``: its signature line)."""
    m = bundle.manifest
    lines = [
        f"bundle {bundle.path}: version {m.version}, all hashes verified",
        f"  source: {m.source_name} sha256 {m.source_sha256[:16]}…",
        f"  cut: {m.cut_id} after {m.cut_after or '(nothing: all-remote)'}; codec {m.codec}",
    ]
    for label, part in (("head", m.head), ("tail", m.tail)):
        if part is None:
            lines.append(f"  {label}: none")
            continue
        lines.append(
            f"  {label}: {part.file} sha256 {part.sha256[:16]}… "
            f"in [{', '.join(t.name for t in part.inputs)}] "
            f"out [{', '.join(t.name for t in part.outputs)}]"
        )
    crossing = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in m.crossing)
    lines.append(f"  crossing: {crossing or '(nothing: all-local)'}")
    lines.extend(weights_lines(bundle))
    if m.ort is not None:
        files = ", ".join(f"{f.file} sha256 {f.sha256[:16]}…" for f in m.ort.files())
        lines.append(f"  ort ({m.ort.optimization}, onnxruntime {m.ort.onnxruntime}): {files}")
    if signature is not None:
        lines.append(signature)
    return lines


def timing_line(timing: Any, output: Path) -> str:
    """One offloaded (or fallen-back) run, as ``run`` reports it."""
    where = "offloaded" if timing.offloaded else f"ran locally ({timing.fallback_reason})"
    return (
        f"{where}: total {timing.total_ms:.2f} ms (head {timing.head_ms:.2f}, encode+encrypt "
        f"{timing.encode_ms:.2f}, network {timing.network_ms:.2f}, tail {timing.tail_ms:.2f}, "
        f"decode {timing.decode_ms:.2f}) -> {output}"
    )


def generation_stats_line(gen: Any) -> str:
    """A reply's generation stats, as ``chat --stats`` prints them (rich markup: dim)."""
    return (
        f"[dim]{gen.generated_tokens} tokens, TTFT {gen.ttft_ms:.0f} ms, "
        f"{gen.decode_tokens_per_s:.1f} tokens/s, {gen.median_step_bytes} "
        f"B/token up, finish {gen.finish_reason}"
        + (f", finished locally ({gen.fallback_reason})" if gen.fallback_reason else "")
        + "[/dim]"
    )


def demo_table(measured: Any, split_label: str) -> Table:
    """The demo's measured paths (median ms per request over loopback)."""
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
    local_ms = measured.median_all_local_ms
    table.add_row("all-local", f"{local_ms:.2f}", "-", "-", "-", "-", f"{local_ms:.2f}", "0")
    for label, result in (
        (split_label, measured.split),
        ("all-remote (c0)", measured.all_remote),
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
    return table


def print_bench(result: dict[str, Any]) -> None:
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
