"""Drive the TypeScript client (``mobile_bridge/ts``) from Python, for interop tests and benchmarks.

The TS package lives in the repository, not in the wheel: these helpers work from a checkout
where ``npm ci`` has been run in ``mobile_bridge/ts``. :func:`run_cases` writes each case's
inputs as raw little-endian files, runs ``node dist/tools/interop.js`` on a plan (see that
file's docstring) and reads back what the TS client returned, so a test can compare it with the
Python client's answer byte for byte.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TS_PACKAGE = Path(__file__).resolve().parents[2] / "mobile_bridge" / "ts"


def ts_ready() -> str | None:
    """Why the TS client cannot run here (None when it can)."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not (TS_PACKAGE / "node_modules").is_dir():
        return f"no {TS_PACKAGE / 'node_modules'}: run `npm ci` there"
    return None


def build(timeout: float = 300.0) -> None:
    """Compile the package (``tsc``) so that ``dist/`` matches the sources."""
    subprocess.run(["npm", "run", "--silent", "build"], cwd=TS_PACKAGE, check=True, timeout=timeout)


@dataclass
class TsCase:
    """One bundle run through the TS client: ``inputs`` once, or ``repeat`` times."""

    name: str
    bundle: Path
    server: str
    server_key: str  # text form, "x25519:…"
    inputs: Mapping[str, np.ndarray]
    fallback: str = "error"
    repeat: int = 1
    timeout_ms: int = 10_000
    model_format: str = "auto"  # which parts to run: "auto" (.ort when present), "onnx", "ort"
    optimization: str | None = None  # the sessions' graph optimization level (TS default: all)
    head_only: bool = False  # run only the head here, return what would cross


@dataclass
class TsResult:
    name: str
    ok: bool
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    timings: list[dict[str, Any]] = field(default_factory=list)
    error_type: str = ""
    error_message: str = ""


def run_cases(
    cases: Sequence[TsCase], device_key_file: Path, workdir: Path, timeout: float = 300.0
) -> list[TsResult]:
    """Run ``cases`` in one node process; one result per case, in order."""
    workdir.mkdir(parents=True, exist_ok=True)
    plan_cases = []
    for i, case in enumerate(cases):
        folder = workdir / f"case{i}"
        folder.mkdir(exist_ok=True)
        inputs = []
        for j, (name, value) in enumerate(case.inputs.items()):
            array = np.ascontiguousarray(value)
            path = folder / f"in{j}.bin"
            path.write_bytes(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
            inputs.append(
                {
                    "name": name,
                    "dtype": array.dtype.name,
                    "shape": list(array.shape),
                    "file": str(path),
                }
            )
        plan_cases.append(
            {
                "name": case.name,
                "bundle": str(case.bundle),
                "server": case.server,
                "serverKey": case.server_key,
                "inputs": inputs,
                "outDir": str(folder / "out"),
                "fallback": case.fallback,
                "repeat": case.repeat,
                "timeoutMs": case.timeout_ms,
                "format": case.model_format,
                "headOnly": case.head_only,
                **({"optimization": case.optimization} if case.optimization else {}),
            }
        )
    plan = workdir / "plan.json"
    plan.write_text(json.dumps({"deviceKey": str(device_key_file), "cases": plan_cases}))
    done = subprocess.run(
        ["node", str(TS_PACKAGE / "dist" / "tools" / "interop.js"), str(plan)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the TS driver exited {done.returncode}: {done.stderr[-4000:]}")
    results = []
    for line in done.stdout.splitlines():
        raw = json.loads(line)
        result = TsResult(raw["name"], raw["ok"], timings=raw.get("timings", []))
        if raw["ok"]:
            for out in raw["outputs"]:
                data = Path(out["file"]).read_bytes()
                array = np.frombuffer(data, dtype=np.dtype(out["dtype"]).newbyteorder("<"))
                result.outputs[out["name"]] = array.reshape(out["shape"]).astype(out["dtype"])
        else:
            result.error_type = raw["error"]["type"]
            result.error_message = raw["error"]["message"]
        results.append(result)
    if len(results) != len(cases):
        raise RuntimeError(f"the TS driver answered {len(results)} of {len(cases)} cases")
    return results
