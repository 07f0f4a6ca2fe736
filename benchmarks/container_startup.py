"""The edge-server image: its size, build time, and how fast a container starts and stops.

Usage:  python benchmarks/container_startup.py [--runs 5] [--no-build] [--image TAG]

Builds the image with deploy/build_image.sh (timed; --no-build uses the existing one), then,
round-robin, starts `edgeoffload serve` natively (the baseline, same bundle and keys) and as a
container (`podman run --init --network=host`, bound to 127.0.0.1), each timed from the start
command to /healthz answering, and stops each with SIGTERM (`podman stop`), timed until it has
exited. The bundle is the zoo ResNet cut in the middle. Needs root and podman (see
deploy/README.md). Writes benchmarks/results/container.json and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from edgeoffload.lab.harness import ThrowawayKeys, spawn_server
from edgeoffload.lab.stats import Environment, Record, Spread, environment
from edgeoffload.split import zoo
from edgeoffload.split.analysis import Analysis
from edgeoffload.split.splitter import split_model

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CONTAINERS_CONF = REPO / "deploy" / "containers.conf"
CONTAINER_UID = 10001  # the Dockerfile's USER


@dataclass(frozen=True)
class ContainerResult(Record):
    image: str
    image_size_mb: float  # podman image inspect {{.Size}}, in 10^6 bytes
    build_s: float | None  # deploy/build_image.sh, base image included if it had to be made
    runs: int
    startup_s: Spread  # `podman run -d` to /healthz answering
    native_startup_s: Spread  # `edgeoffload serve` process start to /healthz answering
    startup_ratio: float  # container / native, medians
    stop_s: Spread  # `podman stop` (SIGTERM, drain) until the container has exited
    command: str
    environment: Environment


def podman(*args: str, timeout: float = 60.0) -> str:
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    proc = subprocess.run(
        ["podman", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise SystemExit(f"podman {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_healthz(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.01)
    raise SystemExit(f"/healthz on port {port} did not answer within {timeout:g} s")


def time_container(image: str, bundle: Path, keys_volume: Path) -> tuple[float, float]:
    """Start-up and stop seconds of one container."""
    port = free_port()
    args = json.loads(podman("image", "inspect", "--format", "{{json .Config.Cmd}}", image))
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    started = time.monotonic()
    container = podman(
        "run", "-d", "--init", "--network=host",
        "-v", f"{bundle}:/bundles:ro", "-v", f"{keys_volume}:/keys:ro",
        "-e", f"EDGEOFFLOAD_HEALTHCHECK_URL=http://127.0.0.1:{port}/healthz",
        image, *args,
    ).splitlines()[-1]  # fmt: skip
    try:
        wait_for_healthz(port)
        startup = time.monotonic() - started
        started = time.monotonic()
        podman("stop", "-t", "20", container, timeout=50)
        return startup, time.monotonic() - started
    finally:
        podman("rm", "-f", container)


def time_native(bundle: Path, keys: ThrowawayKeys) -> float:
    started = time.monotonic()
    with spawn_server([bundle], keys) as server:
        wait_for_healthz(server.port)
        return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", default="localhost/edgeoffload:test")
    parser.add_argument("--no-build", action="store_true", help="use the existing image")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS / "container.json")
    args = parser.parse_args(argv)

    build_s = None
    if not args.no_build:
        started = time.monotonic()
        env = {**os.environ, "PYTHON": sys.executable}
        subprocess.run([str(REPO / "deploy" / "build_image.sh"), args.image], env=env, check=True)
        build_s = round(time.monotonic() - started, 1)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", args.image))

    with tempfile.TemporaryDirectory(prefix="container-bench-") as tmp:
        root = Path(tmp)
        keys = ThrowawayKeys.create(root / "keys")
        # The container's /keys: its key (owned by its user: the server refuses a key others
        # can read) and the allow-list.
        keys_volume = root / "keys-volume"
        keys_volume.mkdir()
        shutil.copytree(keys.server_dir, keys_volume / "server")
        shutil.copy(keys.allow_file, keys_volume / "authorized_keys")
        for path in [keys_volume / "server", *(keys_volume / "server").iterdir()]:
            os.chown(path, CONTAINER_UID, CONTAINER_UID)
        analysis = Analysis.of(zoo.build("resnet"))
        cut = analysis.cuts[len(analysis.cuts) // 2]
        bundle = split_model(analysis, cut, root / "bundle", codec="none").path

        time_container(args.image, bundle, keys_volume)  # warm-up: page cache, storage
        startup, stop, native = [], [], []
        for i in range(args.runs):
            up, down = time_container(args.image, bundle, keys_volume)
            startup.append(up)
            stop.append(down)
            native.append(time_native(bundle, keys))
            print(f"run {i + 1}/{args.runs}: container {up:.2f} s (stop {down:.2f} s), "
                  f"native {native[-1]:.2f} s", file=sys.stderr)  # fmt: skip

    result = ContainerResult(
        image=args.image,
        image_size_mb=round(size / 1e6, 1),
        build_s=build_s,
        runs=args.runs,
        startup_s=Spread.of(startup),
        native_startup_s=Spread.of(native),
        startup_ratio=round(Spread.of(startup).median / Spread.of(native).median, 2),
        stop_s=Spread.of(stop),
        command=" ".join(["python", *sys.argv]),
        environment=environment(),
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    print(
        f"image {result.image} {result.image_size_mb:.0f} MB"
        + (f", built in {build_s:.0f} s" if build_s is not None else "")
        + f"\nstart-up to /healthz: container {result.startup_s} s, "
        f"native {result.native_startup_s} s (x{result.startup_ratio})"
        f"\nstop (SIGTERM, drain): {result.stop_s} s"
        f"\nwrote {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
