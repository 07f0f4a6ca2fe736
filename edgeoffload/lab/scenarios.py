"""The benchmark lab: measured end-to-end latency of cuts on emulated devices and links.

For one model, one device class and one link preset, a scenario

1. profiles the model on the emulated device (``edgeoffload profile`` inside a process held to
   the class's fraction of one core by the pacer, :mod:`edgeoffload.lab.deviceemu` /
   :mod:`edgeoffload.lab.pacer`) and on the server (this machine),
2. asks the cost model for its choice (plus the per-cut plans),
3. starts the edge server (its own process, full speed) behind the userspace link emulator
   (:mod:`edgeoffload.lab.linkemu`, a pipe with the preset's rates and delay),
4. runs a device worker (again held to the device's CPU fraction) that measures all-local,
   all-remote, the chosen cut and the other candidate cuts end to end, best predicted first,
   skipping a cut only when its transfer alone — which the emulator makes exact — already
   takes longer than the best cut measured so far (it cannot win), and
5. reports regret (measured latency of the choice / measured best), the speedup of the choice
   over the better of all-local and all-remote, the predicted-vs-measured error of each
   component, and the bytes on the wire.

``python -m edgeoffload.lab.scenarios worker JOB.json`` is the device side (run by the lab, not
by hand); the job and its answer are JSON files between the two processes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeoffload._ort import make_session, run
from edgeoffload.core.presets import parse_link
from edgeoffload.device.client import OffloadClient
from edgeoffload.keys import load_identity
from edgeoffload.lab.deviceemu import CpuLimitedProcess, cpu_fraction
from edgeoffload.lab.harness import ThrowawayKeys, spawn_server
from edgeoffload.lab.linkemu import LinkEmulator, LinkShape
from edgeoffload.lab.stats import (
    Environment,
    Percentiles,
    Record,
    environment,
    median,
    repeated_ms,
)

log = logging.getLogger("edgeoffload.lab.scenarios")

MODELS = {
    "mobilenetv2": ("zoo:mobilenetv2", {}),
    "encoder": ("zoo:encoder", {"sequence": 128}),
    "minilm": ("zoo:minilm", {"sequence_length": 128}),
}
LINKS = ("3g", "lte", "wifi", "ethernet")
# Calibrated real-hardware classes (core.presets); any name in deviceemu.DEVICE_CLASSES works.
DEVICES = ("phone-mid", "rpi4")
COMPONENTS = ("head_ms", "encode_ms", "network_ms", "server_ms", "decode_ms")


# -- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CutMeasurement(Record):
    """One cut of a scenario: its prediction and what the device measured (or why not)."""

    kind: str  # "all-local", "all-remote" or "split"
    codec: str | None = None
    predicted: dict[str, Any] | None = None  # the cost model's Cost, as JSON
    skipped: str | None = None  # why it was not measured
    measured_total: Percentiles | None = None
    measured_head_ms: float | None = None
    measured_encode_ms: float | None = None
    measured_network_ms: float | None = None
    measured_server_ms: float | None = None
    measured_decode_ms: float | None = None
    wire_bytes: int | None = None

    def measured_ms(self, component: str) -> float:
        """The median of ``component`` (e.g. ``"head_ms"``); all-local is all head."""
        value = getattr(self, f"measured_{component}")
        if value is None and component == "head_ms" and self.measured_total is not None:
            return self.measured_total.median
        return float(value) if value is not None else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if v is not None}


@dataclass(frozen=True)
class ScenarioResult(Record):
    model: str
    link: str
    device: str
    cpu_limit: str
    chosen: str
    chosen_codec: str
    measured_best: str
    chosen_ms: float
    best_ms: float
    all_local_ms: float
    all_remote_ms: float
    regret: float  # chosen / measured best
    speedup_vs_better_extreme: float
    predicted_total_ms: float
    component_relative_error: dict[str, float | None]
    chosen_wire_bytes: int
    cuts_measured: int
    cuts_skipped: int
    cuts: dict[str, CutMeasurement]

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["cuts"] = {k: v.to_dict() for k, v in self.cuts.items()}
        return data


@dataclass(frozen=True)
class LabResult(Record):
    benchmark: str = field(default="lab", init=False)
    partial: bool
    command: str
    environment: Environment
    seconds: float
    median_regret: float | None
    worst_regret: float | None
    worst_vs_better_extreme: float | None
    scenarios: tuple[ScenarioResult, ...]

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["scenarios"] = [s.to_dict() for s in self.scenarios]
        return data


# -- device worker (runs inside the CPU-limited process) --------------------------------------


def _worker(job_path: Path) -> None:
    job = json.loads(job_path.read_text())
    with np.load(job["inputs"]) as data:
        inputs = {k: data[k] for k in data.files}
    repeats = int(job["repeats"])
    results: dict[str, Any] = {}

    # All-local: the unsplit model on the device.
    full = make_session(job["model"], threads=1)
    local = repeated_ms(lambda: run(full, inputs), runs=repeats)
    results["local"] = {"total_ms": local}
    best = median(local)

    identity = load_identity(job["device_key"])
    server_key = bytes.fromhex(job["server_key"])

    async def measure(entry: dict[str, Any]) -> dict[str, Any]:
        client = OffloadClient(
            entry["path"],
            server=job["server"],
            server_key=server_key,
            identity=identity,
            fallback="error",
            timeout=float(job["timeout"]),
            threads=1,
        )
        timings = []
        async with client:
            await client.run(inputs)  # warm-up: connection, sessions
            for _ in range(entry["repeats"]):
                await client.run(inputs)
                assert client.last_timing is not None
                timings.append(client.last_timing.to_dict())
        return {"timings": timings}

    for entry in job["bundles"]:  # best predicted first
        if entry["lower_bound_ms"] >= best and not entry.get("always"):
            results[entry["id"]] = {
                "skipped": f"its transfer alone ({entry['lower_bound_ms']:.1f} "
                f"ms) exceeds the best measured ({best:.1f} ms)"
            }
            continue
        measured = asyncio.run(measure(entry))
        results[entry["id"]] = measured
        best = min(best, median([t["total_ms"] for t in measured["timings"]]))
    Path(job["output"]).write_text(json.dumps(results))


# -- scenario (parent side) ---------------------------------------------------------------------


def run_scenario(
    analysis: Any,
    *,
    model_name: str,
    link_name: str,
    device_class: str,
    device_profile: Any,
    server_profile: Any,
    workdir: Path,
    keys: ThrowawayKeys,
    bundle_cache: dict[tuple[int, str], Any],
    repeats: int = 5,
    single_tensor_cuts: bool = True,
) -> ScenarioResult:
    """Measure one (model, link, device) scenario; see the module docstring."""
    from edgeoffload.split.splitter import split_model  # needs onnx (heavy)

    link = parse_link(link_name)
    report = analysis.plan(device=device_profile, server=server_profile, link=link)
    n = len(analysis.graph.nodes)
    plans = {p.cut.index: p for p in report.plans}
    candidates = {report.best.cut.index, 0}
    for plan in report.plans:
        if plan.cut.index == n:
            continue
        # CNNs: every single-tensor cut; transformers (where the mask crosses every cut inside
        # the layers): every layer boundary.
        wanted = len(plan.cut.tensors) == 1 if single_tensor_cuts else plan.cut.boundary
        if wanted:
            candidates.add(plan.cut.index)
    candidates.discard(n)  # all-local is measured by the worker itself (no bundle to serve)
    ordered = sorted(candidates, key=lambda k: plans[k].cost.total_ms)
    entries = []
    bundles = []
    for k in ordered:
        plan = plans[k]
        key = (k, plan.codec)
        if key not in bundle_cache:
            bundle_cache[key] = split_model(
                analysis, plan.cut, workdir / "bundles" / f"c{k}-{plan.codec}", codec=plan.codec
            )
        bundle = bundle_cache[key]
        bundles.append(bundle)
        slow = plan.cost.network_ms > 1000
        entries.append(
            {
                "id": f"c{k}",
                "path": str(bundle.path),
                "lower_bound_ms": plan.cost.network_ms,
                "repeats": max(2, repeats // 2) if slow else repeats,
                "always": k in (0, report.best.cut.index),
            }
        )
    inputs_path = workdir / "inputs.npz"
    np.savez(inputs_path, **analysis.inputs)
    model_path = workdir / "model.onnx"
    if not model_path.exists():
        model_path.write_bytes(analysis.graph.model.SerializeToString())
    output = workdir / f"result-{link_name}-{device_class}.json"
    with spawn_server(sorted({b.path for b in bundles}), keys, threads=1, workers=1) as server:
        shape = LinkShape.from_link(link)

        async def with_link() -> str:
            async with LinkEmulator("127.0.0.1", server.port, shape) as emulator:
                job = {
                    "model": str(model_path),
                    "inputs": str(inputs_path),
                    "repeats": repeats,
                    "server": f"ws://127.0.0.1:{emulator.port}",
                    "server_key": keys.server.public.hex(),
                    "device_key": str(keys.device_dir()),
                    "timeout": 120,
                    "bundles": entries,
                    "output": str(output),
                }
                job_path = workdir / "job.json"
                job_path.write_text(json.dumps(job))
                cmd = [sys.executable, "-m", "edgeoffload.lab.scenarios", "worker", str(job_path)]
                # paced, not quota'd: a quota lets a millisecond head run at full speed
                with CpuLimitedProcess(cmd, cpu_fraction(device_class), pace=True) as proc:
                    code = await asyncio.to_thread(proc.wait, 1800)
                    method = proc.method
                if code != 0:
                    raise RuntimeError(f"device worker failed with exit code {code}")
                return str(method)

        cpu_limit = asyncio.run(with_link())
    measured = json.loads(output.read_text())
    return _scenario_result(
        analysis,
        report,
        measured,
        model_name=model_name,
        link_name=link_name,
        device_class=device_class,
        cpu_limit=cpu_limit,
    )


def _measured_cut(plan: Any, entry: dict[str, Any]) -> CutMeasurement:
    kind = "all-remote" if plan.cut.index == 0 else "split"
    predicted = plan.cost.to_dict()
    if "skipped" in entry:
        return CutMeasurement(kind, plan.codec, predicted, skipped=entry["skipped"])
    timings = entry["timings"]

    def component(name: str) -> float:
        return round(median([t[name] for t in timings]), 3)

    return CutMeasurement(
        kind,
        plan.codec,
        predicted,
        measured_total=Percentiles.of([t["total_ms"] for t in timings]),
        measured_head_ms=component("head_ms"),
        measured_encode_ms=component("encode_ms"),
        measured_network_ms=component("network_ms"),
        measured_server_ms=component("server_ms"),
        measured_decode_ms=component("decode_ms"),
        wire_bytes=timings[0]["wire_bytes"],
    )


def _relative_errors(chosen: CutMeasurement) -> dict[str, float | None]:
    """Predicted vs measured device, transfer and server time of the chosen cut."""
    if chosen.kind == "all-local" or chosen.predicted is None:
        return {}
    predicted = chosen.predicted
    pairs = {
        "device": (predicted["device_ms"], chosen.measured_ms("head_ms")),
        "transfer": (
            predicted["encode_ms"] + predicted["network_ms"] + predicted["decode_ms"],
            chosen.measured_ms("encode_ms")
            + chosen.measured_ms("network_ms")
            + chosen.measured_ms("decode_ms"),
        ),
        "server": (predicted["server_ms"], chosen.measured_ms("server_ms")),
    }
    # Relative error where the component exists in the plan (all-remote has no device
    # compute to predict: its ~0.1 ms of input checks would read as -100%).
    return {k: round((p - m) / m, 3) if p > 0 and m > 0 else None for k, (p, m) in pairs.items()}


def _scenario_result(
    analysis: Any,
    report: Any,
    measured: dict[str, Any],
    *,
    model_name: str,
    link_name: str,
    device_class: str,
    cpu_limit: str,
) -> ScenarioResult:
    n = len(analysis.graph.nodes)
    local = Percentiles.of(measured["local"]["total_ms"])
    cuts = {f"c{n}": CutMeasurement("all-local", measured_total=local)}
    for plan in report.plans:
        if plan.cut.id in measured and plan.cut.index != n:
            cuts[plan.cut.id] = _measured_cut(plan, measured[plan.cut.id])
    totals = {k: v.measured_total.median for k, v in cuts.items() if v.measured_total}
    best_id = min(totals, key=totals.__getitem__)
    chosen_id = report.best.cut.id
    chosen = totals[chosen_id]
    baseline = min(totals[f"c{n}"], totals["c0"])
    return ScenarioResult(
        model=model_name,
        link=link_name,
        device=device_class,
        cpu_limit=cpu_limit,
        chosen=chosen_id,
        chosen_codec=report.best.codec,
        measured_best=best_id,
        chosen_ms=round(chosen, 3),
        best_ms=round(totals[best_id], 3),
        all_local_ms=round(totals[f"c{n}"], 3),
        all_remote_ms=round(totals["c0"], 3),
        regret=round(chosen / totals[best_id], 4),
        speedup_vs_better_extreme=round(baseline / chosen, 4),
        predicted_total_ms=round(report.best.cost.total_ms, 3),
        component_relative_error=_relative_errors(cuts[chosen_id]),
        chosen_wire_bytes=cuts[chosen_id].wire_bytes or 0,
        cuts_measured=len(totals),
        cuts_skipped=sum(1 for v in cuts.values() if v.skipped is not None),
        cuts=cuts,
    )


def run_lab(
    models: Sequence[str] = tuple(MODELS),
    links: Sequence[str] = LINKS,
    devices: Sequence[str] = DEVICES,
    *,
    repeats: int = 5,
    results_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> LabResult:
    """Every scenario of the grid; returns (and writes) the combined result."""
    from edgeoffload.split.analysis import Analysis
    from edgeoffload.split.models import resolve_model
    from edgeoffload.split.profiler import load_profile  # needs onnx (heavy)

    scenarios: list[ScenarioResult] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgeoffload-lab-") as tmp:
        root = Path(tmp)
        keys = ThrowawayKeys.create(root / "keys")
        for model_name in models:
            spec, dims = MODELS[model_name]
            analysis = Analysis.of(resolve_model(spec), dims=dims)
            workdir = root / model_name
            workdir.mkdir()
            model_path = workdir / "model.onnx"
            model_path.write_bytes(analysis.graph.model.SerializeToString())
            server_profile = analysis.profile(threads=1, name="server")
            bundle_cache: dict[tuple[int, str], Any] = {}
            for device_class in devices:
                profile_path = workdir / f"profile-{device_class}.json"
                cmd = [
                    sys.executable,
                    "-m",
                    "edgeoffload.cli",
                    "profile",
                    str(model_path),
                    "-o",
                    str(profile_path),
                    "--name",
                    device_class,
                    *[f"--dim={k}={v}" for k, v in dims.items()],
                ]
                with CpuLimitedProcess(cmd, cpu_fraction(device_class), pace=True) as proc:
                    if proc.wait(1800) != 0:
                        raise RuntimeError(f"profiling on the emulated {device_class} failed")
                device_profile = load_profile(profile_path)
                for link_name in links:
                    if progress:
                        progress(f"{model_name} / {device_class} / {link_name}")
                    scenarios.append(
                        run_scenario(
                            analysis,
                            model_name=model_name,
                            link_name=link_name,
                            device_class=device_class,
                            device_profile=device_profile,
                            server_profile=server_profile,
                            workdir=workdir,
                            keys=keys,
                            bundle_cache=bundle_cache,
                            repeats=repeats,
                            single_tensor_cuts=model_name == "mobilenetv2",
                        )
                    )
                    if results_dir is not None:  # keep what is measured if the run stops
                        _write(results_dir, _combine(scenarios, started, partial=True))
    result = _combine(scenarios, started, partial=False)
    if results_dir is not None:
        _write(results_dir, result)
    return result


def _combine(scenarios: list[ScenarioResult], started: float, *, partial: bool) -> LabResult:
    regrets = [s.regret for s in scenarios]
    return LabResult(
        partial=partial,
        command=" ".join(sys.argv),
        environment=environment(),
        seconds=round(time.perf_counter() - started, 1),
        median_regret=round(median(regrets), 4) if regrets else None,
        worst_regret=max(regrets) if regrets else None,
        worst_vs_better_extreme=min((s.speedup_vs_better_extreme for s in scenarios), default=None),
        scenarios=tuple(scenarios),
    )


def _write(results_dir: Path, result: LabResult) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "lab.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")


if __name__ == "__main__":  # python -m edgeoffload.lab.scenarios worker JOB.json
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        _worker(Path(sys.argv[2]))
    else:
        print("usage: python -m edgeoffload.lab.scenarios worker JOB.json", file=sys.stderr)
        sys.exit(2)
