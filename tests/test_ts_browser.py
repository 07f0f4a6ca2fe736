"""The browser demo in a real headless Chromium: head in onnxruntime-web, tail on the edge server.

The page (mobile_bridge/ts/demo, built with esbuild) fetches a bundle, runs its head in
onnxruntime-web (wasm), sends the crossing tensors over the encrypted WebSocket to a real
``edgeoffload serve`` on 127.0.0.1 and shows the result beside all-local. Chromium is the
Debian package driven by puppeteer-core (nothing downloads a browser). The test asserts:

* the result the page shows is exactly what the server's tail computes from what the page's
  head produced (the Python tail, run here on the same crossing after the bundle's codec);
* it matches the unsplit model run by Python within float tolerance (wasm kernels may round
  differently from native ones), and the page's all-local run gives the same numbers;
* a screenshot of the page is kept (``$EDGEOFFLOAD_ARTIFACTS`` or ``test-artifacts/``).

Skipped without node, ``npm ci`` or Chromium, unless EDGEOFFLOAD_REQUIRE_BROWSER=1 (CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from edgeoffload._ort import make_session, run
from edgeoffload.core import codec as codec_mod
from edgeoffload.lab import tsclient
from edgeoffload.lab.harness import ThrowawayKeys, spawn_server
from edgeoffload.split.splitter import split_model

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(
    os.environ.get("EDGEOFFLOAD_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts")
)
DEMO = tsclient.TS_PACKAGE / "demo"


@pytest.fixture(scope="module")
def demo_built() -> Path:
    reason = tsclient.ts_ready()
    if reason is None and not Path(CHROMIUM).exists():
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if reason is not None:
        if os.environ.get("EDGEOFFLOAD_REQUIRE_BROWSER") == "1":
            pytest.fail(f"EDGEOFFLOAD_REQUIRE_BROWSER=1, but {reason}")
        pytest.skip(reason)
    tsclient.build()
    subprocess.run(
        ["npm", "run", "--silent", "demo:build"], cwd=tsclient.TS_PACKAGE, check=True, timeout=300
    )
    return DEMO / "dist"


def _unhex(entry: dict) -> np.ndarray:
    raw = bytes.fromhex(entry["hex"])
    return (
        np.frombuffer(raw, dtype=np.dtype(entry["dtype"]).newbyteorder("<"))
        .reshape(entry["shape"])
        .astype(entry["dtype"])
    )


def _serve_demo(
    bundle: Path, server_url: str, keys: ThrowawayKeys, inputs_json: Path, folder: Path
):
    ready = folder / "demo-ready.json"
    args = [
        "node", str(DEMO / "serve.mjs"),
        "--bundle", str(bundle),
        "--server", server_url,
        "--server-key", str(keys.server_dir / "public.key"),
        "--device-key", str(keys.device_dir() / "private.key"),
        "--inputs", str(inputs_json),
        "--port", "0",
        "--ready-file", str(ready),
    ]  # fmt: skip
    with (folder / "demo.log").open("wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError((folder / "demo.log").read_text())
        time.sleep(0.05)
    return process, json.loads(ready.read_text())["port"]


@pytest.mark.parametrize(("model", "codec"), [("resnet", "none"), ("mobilenetv2", "fp16+zstd")])
def test_browser_demo_shows_the_edge_servers_answer(
    demo_built, zoo_analyses, model, codec, tmp_path
) -> None:
    analysis = zoo_analyses[model]
    n = len(analysis.graph.nodes)
    interior = [c for c in analysis.cuts if 0 < c.index < n]
    bundle = split_model(analysis, interior[len(interior) // 2], tmp_path / "bundle", codec=codec)
    keys = ThrowawayKeys.create(tmp_path / "keys")
    inputs = analysis.graph.sample_inputs(seed=3)
    entries = []
    for i, (name, array) in enumerate(inputs.items()):
        path = tmp_path / f"input{i}.bin"
        path.write_bytes(np.ascontiguousarray(array).tobytes())
        entries.append(
            {"name": name, "dtype": array.dtype.name, "shape": list(array.shape), "file": path.name}
        )
    inputs_json = tmp_path / "inputs.json"
    inputs_json.write_text(json.dumps(entries))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / f"browser-demo-{model}.png"
    with spawn_server([bundle.path], keys, workers=1) as server:
        demo, port = _serve_demo(bundle.path, server.url, keys, inputs_json, tmp_path)
        try:
            check = [
                "node", str(tsclient.TS_PACKAGE / "tools" / "browser-check.mjs"),
                "--url", f"http://127.0.0.1:{port}/",
                "--screenshot", str(screenshot),
                "--chromium", CHROMIUM,
            ]  # fmt: skip
            done = subprocess.run(check, capture_output=True, text=True, timeout=240)
        finally:
            demo.terminate()
            demo.wait(10)
        assert server.process.poll() is None
    assert done.returncode == 0, done.stderr[-3000:]
    page = json.loads(done.stdout.strip().splitlines()[-1])
    state = page["state"]
    assert "error" not in state, (state.get("error"), page["console"])
    assert all(t["offloaded"] for t in state["timing"]) and len(state["timing"]) == 3
    assert screenshot.stat().st_size > 10_000

    # Bit for bit: the server's tail on what the page's head sent (through the bundle codec).
    spec = codec_mod.CodecSpec.parse(bundle.manifest.codec)
    crossing = {
        name: codec_mod.decode(codec_mod.encode(_unhex(entry), spec), max_bytes=1 << 30)
        for name, entry in state["crossing"].items()
    }
    assert set(crossing) == {t.name for t in bundle.manifest.crossing}
    tail = make_session(bundle.tail_path)
    for name, value in run(tail, crossing).items():
        np.testing.assert_array_equal(_unhex(state["outputs"][name]), value)

    # Within tolerance: the unsplit model in Python, and the page's own all-local run.
    full = run(make_session(analysis.graph.model, optimize=False), inputs)
    tolerance = 1e-4 if codec == "none" else 2e-2
    for name, reference in full.items():
        scale = float(np.max(np.abs(reference))) or 1.0
        shown = _unhex(state["outputs"][name])
        local = _unhex(state["local"][name])
        assert float(np.max(np.abs(shown - reference))) / scale <= tolerance
        assert float(np.max(np.abs(local - reference))) / scale <= 1e-4
    shutil.copy(screenshot, tmp_path / screenshot.name)  # beside the test's own files too
