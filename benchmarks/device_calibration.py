"""Derive the device classes' slowdown factors from published benchmarks (issue: honest cut choice).

Usage:  python benchmarks/device_calibration.py [--runs 60] [-o results/device_calibration.json]

The published figures (:data:`edgeoffload.core.presets.DEVICE_CLASSES`, each with its source)
are single-thread ncnn ``benchncnn`` times of MobileNetV2 1.0/224 and ResNet-18 on real
hardware. This script measures the *same architectures* here — the zoo's ``mobilenetv2`` is
MobileNetV2 1.0/224 and ``build_resnet(widths=(64, 128, 256, 512))`` is ResNet-18 — with
onnxruntime, one intra-op thread, full graph optimisations, and splits each model's time
into a compute-bound share (dense Conv/MatMul/Gemm nodes) and a memory-bound share (depthwise
convolutions and everything else: ``presets.op_class``) from the per-node profile the cost
model uses (optimisations off).

For a device, each model gives one equation in the two unknown factors::

    device_ms(model) / here_ms(model) = compute * (1 - s(model)) + memory * s(model)

where ``s`` is the memory-bound share measured here. MobileNetV2 (depthwise convolutions,
many BatchNorm/Clip nodes) and ResNet-18 (dense 3x3 convolutions) have different shares, so
the two equations fix both factors. Prints them, and writes the measurement as JSON.

The factors in presets.py are these numbers rounded, measured on the reference machine named
in the JSON; re-run this on a different server to re-derive them for it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx

from edgeoffload._ort import make_session, run
from edgeoffload.core.presets import CALIBRATION_SOURCES, op_classes_of
from edgeoffload.lab.stats import environment
from edgeoffload.split import zoo
from edgeoffload.split.graph import ModelGraph
from edgeoffload.split.loading import load_model
from edgeoffload.split.profiler import machine_description, node_times
from edgeoffload.split.zoo import build_mobilenetv2, build_resnet

RESULTS = Path(__file__).resolve().parent / "results"

# MobileNet v1 1.0/224 (ncnn's "mobilenet"): 13 depthwise-separable blocks. Not in the zoo, and
# not used in the fit: it is the out-of-sample check of the two fitted factors.
_V1_BLOCKS = (
    ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2))
    + ((512, 1),) * 5
    + (
        (1024, 2),
        (1024, 1),
    )
)


def build_mobilenet_v1() -> onnx.ModelProto:
    b = zoo._GraphBuilder(0)  # the zoo's own builder: same node style (Conv + BN + ReLU6)
    x = b.relu6(
        "stem/relu6", b.batch_norm("stem/bn", b.conv("stem/conv", "input", 3, 32, 3, stride=2), 32)
    )
    in_ch = 32
    for i, (out_ch, stride) in enumerate(_V1_BLOCKS):
        y = b.conv(f"block{i}/dw/conv", x, in_ch, in_ch, 3, stride=stride, group=in_ch)
        y = b.relu6(f"block{i}/dw/relu6", b.batch_norm(f"block{i}/dw/bn", y, in_ch))
        y = b.conv(f"block{i}/pw/conv", y, in_ch, out_ch, 1)
        x = b.relu6(f"block{i}/pw/relu6", b.batch_norm(f"block{i}/pw/bn", y, out_ch))
        in_ch = out_ch
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x], "head/pool")], "head/flatten", axis=1)
    b.classifier(x, in_ch, 1000)
    image, logits = zoo._image_io(224, 1000)
    return b.model("mobilenet_v1", [image], [logits], doc="MobileNet v1 1.0/224", metadata={})


MODELS = {
    "mobilenet_v2": lambda: build_mobilenetv2(),
    "resnet18": lambda: build_resnet(widths=(64, 128, 256, 512)),
    "mobilenet_v1": build_mobilenet_v1,
}
FITTED = ("mobilenet_v2", "resnet18")
# ncnn benchncnn "mobilenet" (v1), 1 thread, same README and runs as CALIBRATION_SOURCES
V1_PUBLISHED_MS = {
    "rpi4": 124.32,
    "rpi5": 20.30,
    "pi-zero-2": 393.94,
    "phone-mid": 54.41,
    "phone-flagship": 15.49,
}
# ncnn on an x86 server core (AMD EPYC 7742, 1 thread, same README): if onnxruntime here is
# close to it, the factors measure hardware, not the runtime swap (ncnn there, ORT here).
X86_NCNN_MS = {"mobilenet_v2": 10.78, "resnet18": 35.43, "mobilenet_v1": 16.35}


def measure(model_name: str, runs: int) -> dict[str, float]:
    graph: ModelGraph = load_model(MODELS[model_name]()).graph()
    feed = graph.sample_inputs(seed=0)
    session = make_session(graph.serialized(), threads=1, optimize=True)
    for _ in range(3):
        run(session, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(session, feed)
        times.append((time.perf_counter() - start) * 1e3)
    raw = node_times(graph, feed, threads=1, runs=max(5, runs // 3))
    classes = op_classes_of(graph.nodes)
    memory_raw = sum(ms for name, ms in raw.items() if classes[name] == "memory")
    total_raw = sum(raw.values())
    return {
        "optimised_ms": statistics.median(times),
        "optimised_p10_ms": float(np.percentile(times, 10)),
        "optimised_p90_ms": float(np.percentile(times, 90)),
        "raw_total_ms": total_raw,
        "memory_share": memory_raw / total_raw,
    }


def solve(here: dict[str, dict[str, float]], device_ms: dict[str, float]) -> tuple[float, float]:
    """(compute, memory) factors from the two models' equations."""
    rows, rhs = [], []
    for model, published in device_ms.items():
        s = here[model]["memory_share"]
        rows.append([1.0 - s, s])
        rhs.append(published / here[model]["optimised_ms"])
    (compute, memory), *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    return float(compute), float(memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("-o", "--output", type=Path, default=RESULTS / "device_calibration.json")
    args = parser.parse_args()

    here = {name: measure(name, args.runs) for name in MODELS}
    for name, m in here.items():
        print(
            f"here: {name:13s} {m['optimised_ms']:7.2f} ms (p10 {m['optimised_p10_ms']:.2f}, "
            f"p90 {m['optimised_p90_ms']:.2f}), memory-bound share {m['memory_share']:.1%}"
        )
    classes = {}
    for name in MODELS:
        print(
            f"ncnn on an EPYC 7742 core / onnxruntime here, {name}: "
            f"{X86_NCNN_MS[name] / here[name]['optimised_ms']:.2f}"
        )
    for name, source in CALIBRATION_SOURCES.items():
        compute, memory = solve(here, {m: source.ms[m] for m in FITTED})
        whole = {m: source.ms[m] / here[m]["optimised_ms"] for m in source.ms}
        s1 = here["mobilenet_v1"]["memory_share"]
        v1_predicted = here["mobilenet_v1"]["optimised_ms"] * (compute * (1 - s1) + memory * s1)
        classes[name] = {
            "hardware": source.hardware,
            "url": source.url,
            "runtime": source.runtime,
            "threads": source.threads,
            "published_ms": source.ms,
            "whole_model_ratio": {m: round(v, 2) for m, v in whole.items()},
            "compute": round(compute, 2),
            "memory": round(memory, 2),
            "check_mobilenet_v1_ms": {
                "published": V1_PUBLISHED_MS[name],
                "predicted": round(v1_predicted, 2),
            },
        }
        print(
            f"{name:15s} compute {compute:6.2f}x  memory {memory:6.2f}x  (whole model: "
            + ", ".join(f"{m} {v:.1f}x" for m, v in whole.items())
            + f"); MobileNet v1 predicted {v1_predicted:.1f} ms, published "
            f"{V1_PUBLISHED_MS[name]:.1f} ms"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "machine": machine_description(),
                "environment": environment().to_dict(),
                "runs": args.runs,
                "here": here,
                "classes": classes,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
