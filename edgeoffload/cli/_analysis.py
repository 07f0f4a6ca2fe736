"""From a command's model and profile options to an analysed model and its two profiles.

The split machinery imports onnx, so it is imported inside these functions: a device install
(no onnx) still runs `run`, `chat`, `serve` and `keys`.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeoffload.cli._options import load_inputs, parse_dims
from edgeoffload.cli._render import progress_bar
from edgeoffload.core.presets import DeviceClass, apply_device_class, device_class, op_classes_of

if TYPE_CHECKING:
    from edgeoffload.split.analysis import Analysis
    from edgeoffload.types import DeviceProfile


def resolve_model(spec: str) -> Any:
    """A path, or a model built for ``zoo:NAME`` (onnx is imported only then)."""
    from edgeoffload.split.models import resolve_model  # imports onnx

    return resolve_model(spec)


def analysis_of(model: str, dim: list[str] | None, input_path: Path | None) -> Analysis:
    """MODEL analysed with its ``--dim`` and ``--input`` options."""
    from edgeoffload.split.analysis import Analysis  # imports onnx

    return Analysis.of(resolve_model(model), dims=parse_dims(dim), inputs=load_inputs(input_path))


def profiles_for(
    analysis: Analysis,
    *,
    device_profile: Path | None,
    server_profile: Path | None,
    device_class: str,
    threads: int,
) -> tuple[DeviceProfile, DeviceProfile, list[str]]:
    """(device, server, notes): profile files where given, else this machine measured once;
    the device slowed down by ``--device``."""
    from edgeoffload.split.profiler import load_profile  # imports onnx

    notes: list[str] = []
    measured = None
    if device_profile is None or server_profile is None:
        with progress_bar() as progress:
            started = time.perf_counter()
            measured = analysis.profile(threads=threads, progress=progress)
            seconds = time.perf_counter() - started
            notes.append(f"profiled this machine ({threads} thread(s)) in {seconds:.1f} s")
    device = load_profile(device_profile) if device_profile is not None else measured
    server = load_profile(server_profile) if server_profile is not None else measured
    assert device is not None and server is not None  # measured whenever a file is missing
    target = parse_device_class(device_class, notes)
    if target.name != "this-machine":
        device = apply_device_class(device, target, op_classes_of(analysis.graph.nodes))
        notes.append(
            f"device = {device.name} vs {'its profile' if device_profile else 'this machine'}"
            " (an estimate from published benchmarks: `edgeoffload profile` on the real "
            "device is better)"
        )
    return device, server, notes


def parse_device_class(text: str, notes: list[str]) -> DeviceClass:
    """``--device``: a deprecated name's warning becomes a note the command prints."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        target = device_class(text)
    notes.extend(f"warning: {w.message}" for w in caught if issubclass(w.category, FutureWarning))
    return target
