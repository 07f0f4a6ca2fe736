"""Plots of a plan: predicted latency per cut (needs matplotlib, the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

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
