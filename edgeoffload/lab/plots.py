"""Plots of a plan: predicted latency per cut (needs matplotlib, the ``plot`` extra)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeoffload.errors import MissingExtra

if TYPE_CHECKING:
    from edgeoffload.core.costmodel import PlanReport


def plot_costs(report: PlanReport, path: str | Path, *, title: str) -> None:
    """Predicted latency per cut, stacked by component, chosen cut marked; written as PNG."""
    try:
        # matplotlib is heavy and optional (the plot extra): imported only to draw.
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtra("matplotlib", "plot", what="plotting costs (--plot)") from None
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


def plot_fleet(data: Mapping[str, Any], path: str | Path) -> None:
    """The fleet benchmark (``FleetResult.to_dict()``): latency over time per policy with the
    kill, restart and restart-ready times marked, and throughput / p99 per policy; PNG."""
    try:
        # matplotlib is heavy and optional (the plot extra): imported only to draw.
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtra("matplotlib", "plot", what="plotting the fleet benchmark") from None
    runs = data["runs"]
    if not runs:
        raise ValueError("the fleet result has no policy runs to plot")
    fig = plt.figure(figsize=(14, 2.3 * len(runs) + 1.5))
    grid = fig.add_gridspec(len(runs), 2, width_ratios=(3, 1))
    first = fig.add_subplot(grid[0, 0])
    top = max((b["max_ms"] or 0.0) for r in runs for b in r["timeline"] if b["max_ms"] is not None)
    for i, run in enumerate(runs):
        ax = first if i == 0 else fig.add_subplot(grid[i, 0], sharex=first, sharey=first)
        bins = [b for b in run["timeline"] if b["requests"]]
        ts = [b["t_s"] + data["bin_s"] / 2 for b in bins]
        ax.plot(ts, [b["p50_ms"] for b in bins], color="#4c72b0", linewidth=1.2, label="p50")
        ax.plot(ts, [b["p99_ms"] for b in bins], color="#c44e52", linewidth=1.0, label="p99")
        ax.plot(ts, [b["max_ms"] for b in bins], color="#c44e52", alpha=0.25, label="max")
        ax.axvline(run["kill_s"], color="black", linestyle="--", linewidth=1)
        ax.axvline(run["restart_s"], color="#dd8452", linestyle=":", linewidth=1.2)
        ax.axvline(run["ready_s"], color="#55a868", linestyle="--", linewidth=1)
        ax.axvspan(run["kill_s"], run["ready_s"], color="grey", alpha=0.08)
        back = run["first_answer_after_ready_s"]
        ax.set_yscale("log")
        ax.set_ylim(5, top * 1.5)
        ax.set_ylabel("latency ms")
        ax.set_title(
            f"{run['policy']}: {run['throughput_req_s']:.1f} req/s, p50 {run['p50_ms']:.0f} "
            f"ms, p99 {run['p99_ms']:.0f} ms, errors {run['errors']}, wrong "
            f"{run['wrong_answers']}, back in rotation "
            + ("never" if back is None else f"{back:.2f} s after ready"),
            fontsize=9,
            loc="left",
        )
        rate = ax.twinx()
        rate.step(
            [b["t_s"] for b in run["timeline"]],
            [b["requests"] / data["bin_s"] for b in run["timeline"]],
            where="post",
            color="grey",
            alpha=0.45,
            linewidth=0.8,
        )
        rate.set_ylim(0, 1.6 * data["capacity_sum_req_s"])
        rate.set_ylabel("req/s", color="grey")
        if i == 0:
            ax.legend(loc="upper left", fontsize=8, ncol=3)
            ax.text(run["kill_s"], top, " SIGKILL", fontsize=8, va="top")
            ax.text(run["restart_s"], top / 3, " restart", fontsize=8, va="top", color="#dd8452")
            ax.text(run["ready_s"], top / 9, " ready", fontsize=8, va="top", color="#55a868")
        if i == len(runs) - 1:
            ax.set_xlabel("seconds into the measured window (grey line: answers per second)")
    names = [r["policy"] for r in runs]
    palette = {"round-robin": "#8172b3", "least-outstanding": "#937860", "two-choice": "#da8bc3"}
    colors = [palette.get(name, "#55a868") for name in names]
    half = max(1, len(runs) // 2)
    thr = fig.add_subplot(grid[:half, 1])
    thr.bar(names, [r["throughput_req_s"] for r in runs], color=colors)
    cap = data["capacity_sum_req_s"]
    thr.axhline(cap, color="black", linewidth=1, label=f"sum of capacities {cap:.0f}")
    thr.axhline(0.9 * cap, color="black", linestyle=":", linewidth=1, label="0.9 x sum")
    thr.set_ylabel("req/s")
    thr.set_title("throughput", fontsize=10)
    thr.legend(fontsize=7, loc="lower right")
    p99 = fig.add_subplot(grid[half:, 1])
    p99.bar(names, [r["p99_ms"] for r in runs], color=colors)
    p99.set_ylabel("ms")
    p99.set_title("p99 latency", fontsize=10)
    for ax in (thr, p99):
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    servers = ", ".join(
        f"{s['name']} {s['cpu_fraction']:g} core{' (killed)' if s['killed'] else ''}"
        for s in data["servers"]
    )
    fig.suptitle(
        f"{data['model']} cut {data['cut']}: {data['devices']} devices, servers {servers} "
        f"(CPU limit {data['cpu_limit']})",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
