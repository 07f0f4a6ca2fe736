"""The benchmark lab: every (model x link x device) scenario, measured end to end.

Usage:  python benchmarks/lab.py [--models mobilenetv2 encoder minilm] [--links 3g lte wifi
        ethernet] [--devices phone rpi] [--repeats 5]

Writes benchmarks/results/lab.json, PNG plots under benchmarks/results/lab/, and regenerates
the lab table in benchmarks/README.md (between the lab-table markers).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from edgeoffload.lab.deviceemu import DEVICE_CLASSES
from edgeoffload.lab.scenarios import DEVICES, LINKS, MODELS, run_lab

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def plot_scenario(scenario: dict, path: Path) -> None:
    """Measured latency per measured cut, stacked by component; the chosen cut marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(k, v) for k, v in scenario["cuts"].items() if "measured_total" in v]
    rows.sort(key=lambda kv: int(kv[0][1:]))
    labels = [k for k, _ in rows]
    parts = (
        "measured_head_ms",
        "measured_encode_ms",
        "measured_network_ms",
        "measured_server_ms",
        "measured_decode_ms",
    )
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows)), 4))
    bottom = [0.0] * len(rows)
    for part in parts:
        values = [
            v.get(part, v["measured_total"]["median"] if part == "measured_head_ms" else 0.0)
            for _, v in rows
        ]
        ax.bar(
            labels, values, bottom=bottom, label=part.removeprefix("measured_").removesuffix("_ms")
        )
        bottom = [b + x for b, x in zip(bottom, values, strict=True)]
    chosen = labels.index(scenario["chosen"]) if scenario["chosen"] in labels else None
    if chosen is not None:
        ax.bar(
            [labels[chosen]],
            [bottom[chosen]],
            fill=False,
            edgecolor="black",
            linewidth=2,
            label="chosen",
        )
    ax.set_ylabel("measured ms (median)")
    ax.set_title(
        f"{scenario['model']} / {scenario['device']} / {scenario['link']}: regret "
        f"{scenario['regret']:.2f}"
    )
    ax.tick_params(axis="x", rotation=90, labelsize=6)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_prediction(result: dict, path: Path) -> None:
    """Predicted vs measured total for every measured split cut of every scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for scenario in result["scenarios"]:
        xs, ys = [], []
        for row in scenario["cuts"].values():
            if "measured_total" in row and "predicted" in row:
                xs.append(row["measured_total"]["median"])
                ys.append(row["predicted"]["total_ms"])
        ax.scatter(
            xs, ys, s=8, label=f"{scenario['model']}/{scenario['device']}/{scenario['link']}"
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    lims = ax.get_xlim()
    ax.plot(lims, lims, color="grey", linewidth=1)
    ax.set_xlabel("measured ms")
    ax.set_ylabel("predicted ms")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(result: dict) -> str:
    lines = [
        f"Median regret {result['median_regret']}, worst {result['worst_regret']}; chosen vs "
        f"the better of all-local/all-remote: worst {result['worst_vs_better_extreme']}x "
        f"(`{result['command']}`, {result['seconds']} s).",
        "",
        "| model | device | link | chosen | measured best | chosen ms | best ms | all-local ms "
        "| all-remote ms | regret | speedup vs better extreme | wire bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["scenarios"]:
        lines.append(
            f"| {s['model']} | {s['device']} | {s['link']} | {s['chosen']} ({s['chosen_codec']}) "
            f"| {s['measured_best']} | {s['chosen_ms']:.1f} | {s['best_ms']:.1f} "
            f"| {s['all_local_ms']:.1f} | {s['all_remote_ms']:.1f} | {s['regret']:.2f} "
            f"| {s['speedup_vs_better_extreme']:.2f} | {s['chosen_wire_bytes']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--links", nargs="+", default=list(LINKS), choices=list(LINKS))
    parser.add_argument(
        "--devices", nargs="+", default=list(DEVICES), choices=sorted(DEVICE_CLASSES)
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    result = run_lab(
        args.models,
        args.links,
        args.devices,
        repeats=args.repeats,
        results_dir=RESULTS,
        progress=lambda what: print(what, flush=True),
    )
    (RESULTS / "lab").mkdir(exist_ok=True)
    for s in result["scenarios"]:
        plot_scenario(s, RESULTS / "lab" / f"{s['model']}-{s['device']}-{s['link']}.png")
    plot_prediction(result, RESULTS / "lab" / "predicted_vs_measured.png")
    readme = HERE / "README.md"
    text = readme.read_text()
    block = f"<!-- lab-table:start -->\n{table(result)}\n<!-- lab-table:end -->"
    if "<!-- lab-table:start -->" in text:
        text = re.sub(
            r"<!-- lab-table:start -->.*<!-- lab-table:end -->", lambda _: block, text, flags=re.S
        )
    else:
        text += "\n## Lab: emulated devices and links\n\n" + block + "\n"
    readme.write_text(text)
    print(table(result))
    json.dump(
        {"median_regret": result["median_regret"], "worst_regret": result["worst_regret"]},
        sys.stdout,
    )


if __name__ == "__main__":
    main()
