"""The edge server as a container: the image deploy/build_image.sh builds from the Dockerfile,
run with podman as in deployment, serving a real device over the encrypted protocol.

Needs root, podman, buildah, runc and debootstrap (apt-get install podman buildah runc
debootstrap); without them the tests are skipped, unless EDGEOFFLOAD_REQUIRE_CONTAINER=1 (CI),
which turns the skip into a failure. The image is built once per session. Containers share the
host's network but bind 127.0.0.1 only; every wait is bounded and every container is removed.
Start-up time and image size are measured by benchmarks/container_startup.py, not asserted here.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from edgeoffload._ort import make_session, run
from edgeoffload.device.blocking import BlockingOffloadClient
from edgeoffload.device.runtime import DeviceRuntime
from edgeoffload.errors import EdgeOffloadError
from edgeoffload.lab.harness import ThrowawayKeys
from edgeoffload.split.splitter import split_model

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "deploy" / "build_image.sh"
# The settings this machine class needs (runc, cgroupfs, ulimits), shared with the build script.
CONTAINERS_CONF = REPO / "deploy" / "containers.conf"
IMAGE = "localhost/edgeoffload:test"
TOOLS = ("podman", "buildah", "runc", "debootstrap")
CONTAINER_UID = 10001  # the Dockerfile's USER
STOP_TIMEOUT = 20  # podman stop -t: SIGKILL after this many seconds


def _unavailable() -> str | None:
    """Why the container tests cannot run here, or None."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return (
            f"{', '.join(missing)} not installed "
            "(apt-get install -y podman buildah runc debootstrap)"
        )
    if os.geteuid() != 0:
        return "needs root (debootstrap and rootful podman)"
    if sys.version_info[:2] != (3, 11):
        # The wheelhouse is built with this interpreter and installed into the image's 3.11.
        return f"the image runs Python 3.11 and its wheels are built with this one ({sys.version})"
    return None


def podman(*args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    proc = subprocess.run(
        ["podman", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def image() -> str:
    """The edge-server image, built by deploy/build_image.sh once per test session."""
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("EDGEOFFLOAD_REQUIRE_CONTAINER") == "1":
            pytest.fail(f"EDGEOFFLOAD_REQUIRE_CONTAINER=1, but {reason}")
        pytest.skip(reason)
    proc = subprocess.run(
        [str(BUILD_SCRIPT), IMAGE],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=1200,  # cold: debootstrap + wheelhouse + build take ~2 min here
    )
    print(proc.stdout, end="")
    if proc.returncode != 0:
        pytest.fail(f"deploy/build_image.sh exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return IMAGE


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> ThrowawayKeys:
    return ThrowawayKeys.create(tmp_path_factory.mktemp("keys"), devices=("container-device",))


@pytest.fixture(scope="module")
def keys_volume(keys, tmp_path_factory) -> Path:
    """What the server container mounts at /keys (deploy/README.md's layout): its own key in
    server/, owned by the container's user (the server refuses a key others can read), and
    the allow-list. The device's private key never enters the container."""
    volume = tmp_path_factory.mktemp("keys-volume")
    volume.chmod(0o755)
    shutil.copytree(keys.server_dir, volume / "server")
    shutil.copy(keys.allow_file, volume / "authorized_keys")
    for path in [volume / "server", *(volume / "server").iterdir()]:
        os.chown(path, CONTAINER_UID, CONTAINER_UID)
    return volume


@pytest.fixture(scope="module")
def analysis(zoo_analyses):
    return zoo_analyses["resnet"]


@pytest.fixture(scope="module")
def bundle(analysis, tmp_path_factory):
    """ResNet cut in the middle, codec none (lossless, so results can be compared exactly)."""
    n = len(analysis.graph.nodes)
    interior = [c for c in analysis.cuts if 0 < c.index < n]
    return split_model(
        analysis,
        interior[len(interior) // 2],
        tmp_path_factory.mktemp("bundle") / "resnet",
        codec="none",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_args(image: str, port: int) -> list[str]:
    """The image's own CMD (bundle, key and allow-list paths) with 127.0.0.1:PORT: the host's
    network is shared, and nothing may listen beyond loopback."""
    args = json.loads(podman("image", "inspect", "--format", "{{json .Config.Cmd}}", image).stdout)
    for option, value in (("--host", "127.0.0.1"), ("--port", str(port))):
        assert option in args, f"the image's CMD has no {option}: {args}"
        args[args.index(option) + 1] = value
    return args


def _wait_for_healthz(container: str, port: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            pass
        state = podman("inspect", "--format", "{{.State.Status}}", container).stdout.strip()
        if state != "running" or time.monotonic() > deadline:
            logs = podman("logs", container, check=False)
            raise AssertionError(
                f"/healthz did not answer within {timeout:g} s (container {state}):\n"
                f"{logs.stdout}{logs.stderr}"
            )
        time.sleep(0.05)


def test_image_carries_the_server_without_heavy_packages(image):
    """No extras: the image has edgeoffload's server, and no onnx, torch, transformers."""
    probe = (
        "import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not "
        "None for m in ['edgeoffload.edge.server', 'onnx', 'torch', 'transformers', 'optimum']}))"
    )
    found = json.loads(
        podman("run", "--rm", "--network=none", "--entrypoint", "python3", image, "-c", probe)
        .stdout.strip()
        .splitlines()[-1]
    )
    assert found == {
        "edgeoffload.edge.server": True,
        "onnx": False,
        "torch": False,
        "transformers": False,
        "optimum": False,
    }


def test_container_serves_a_device_and_drains_on_stop(image, analysis, bundle, keys, keys_volume):
    port = _free_port()
    container = podman(
        "run", "-d", "--init", "--network=host",
        # deploy/compose.yaml's hardening: nothing written, no capabilities, no setuid gains.
        "--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges",
        "--name", f"edgeoffload-test-{port}",
        "-v", f"{bundle.path}:/bundles:ro",
        "-v", f"{keys_volume}:/keys:ro",
        # The image's healthcheck asks 8765 unless told otherwise; host networking moves it.
        "-e", f"EDGEOFFLOAD_HEALTHCHECK_URL=http://127.0.0.1:{port}/healthz",
        image, *_serve_args(image, port),
    ).stdout.strip()  # fmt: skip
    try:
        assert _wait_for_healthz(container, port)["status"] == "ok"

        # The image's HEALTHCHECK. Podman schedules it with systemd timers, absent here, so it
        # is run once by hand; inspect then reports its verdict.
        podman("healthcheck", "run", container)
        health = podman("inspect", "--format", "{{.State.Health.Status}}", container)
        assert health.stdout.strip() == "healthy"

        # Every process in the container (init and server) runs as the image's user, not root.
        top = podman("top", container, "huser", "args").stdout.strip().splitlines()[1:]
        assert len(top) == 2 and all(line.split()[0] == str(CONTAINER_UID) for line in top), top
        assert podman("exec", container, "id", "-u").stdout.strip() == str(CONTAINER_UID)

        # A real device: head here, tail in the container, over the encrypted channel.
        full = make_session(analysis.graph.model, optimize=False)
        local = DeviceRuntime(bundle)
        samples = [analysis.graph.sample_inputs(seed=s) for s in (21, 22)]
        with BlockingOffloadClient(
            bundle,
            server=f"ws://127.0.0.1:{port}",
            server_key=keys.server.public,
            identity=keys.device,
            fallback="error",  # a result computed on the device would not prove anything
            timeout=30.0,
        ) as client:
            for inputs in samples:
                got = client.run(inputs)
                assert client.last_timing is not None and client.last_timing.offloaded
                expected_local = local.run_local(inputs)
                for name, ref in run(full, inputs).items():
                    # Lossless codec: bit-identical to head + tail on the device (same
                    # onnxruntime in the image), and the unsplit model's output up to fusion.
                    np.testing.assert_array_equal(got[name], expected_local[name])
                    scale = float(np.max(np.abs(ref))) or 1.0
                    assert float(np.max(np.abs(got[name] - ref))) / scale <= 1e-5

            # Stop under load: a device keeps sending while `podman stop` delivers SIGTERM
            # (through the init) and the server drains. Each request either gets its correct
            # result or a clean refusal; the server's final count matches what was received.
            loaded = _DeviceLoop(client, samples[0], expected_local=local.run_local(samples[0]))
            loaded.start()
            try:
                loaded.running.wait(30)
                assert loaded.results > 0, f"no result under load: {loaded.error!r}"
                stop_started = time.monotonic()
                podman("stop", "-t", str(STOP_TIMEOUT), container, timeout=STOP_TIMEOUT + 30)
                stop_s = time.monotonic() - stop_started
            finally:
                loaded.stop.set()
                loaded.join(30)
            assert not loaded.is_alive()
        assert loaded.mismatches == 0
        assert isinstance(loaded.error, EdgeOffloadError), loaded.error  # refused, not hung

        state = podman(
            "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", container
        ).stdout.split()
        logs = podman("logs", container)
        output = logs.stdout + logs.stderr
        # Exit 0 is the server returning from its drain; SIGKILL at the timeout would be 137.
        assert state == ["exited", "0"], (state, output)
        assert stop_s < STOP_TIMEOUT - 5, f"stop took {stop_s:.1f} s: not a prompt drain"
        assert "draining in-flight requests" in output, output
        assert f"stopped: {len(samples) + loaded.results} results" in output, output
        print(f"\ncontainer: stopped (drained) in {stop_s:.2f} s after {loaded.results} requests")
    finally:
        podman("rm", "-f", container, check=False)


class _DeviceLoop(threading.Thread):
    """Offloads the same input until the server stops answering (or ``stop`` is set)."""

    def __init__(self, client: BlockingOffloadClient, inputs: dict, *, expected_local: dict):
        super().__init__(daemon=True, name="device-loop")
        self.client, self.inputs, self.expected = client, inputs, expected_local
        self.stop = threading.Event()
        self.running = threading.Event()  # set at the first result, or the error before it
        self.results = 0
        self.mismatches = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                got = self.client.run(self.inputs)
            except BaseException as exc:  # recorded for the test to judge
                self.error = exc
                self.running.set()
                return
            self.results += 1
            self.mismatches += any(
                not np.array_equal(got[name], ref) for name, ref in self.expected.items()
            )
            self.running.set()
