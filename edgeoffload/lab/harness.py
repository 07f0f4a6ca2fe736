"""Throwaway keys and local edge-server processes, for benchmarks, the demo and end-to-end tests.

:class:`ThrowawayKeys` writes a server key, device keys and the allow-list naming those devices
into one folder. :func:`spawn_server` runs ``edgeoffload serve`` in its own process (as in
deployment) on 127.0.0.1 and a free port; the server reports that port through
``--ready-file`` (JSON written once it listens), never through its human output, which goes to
a log file so that it can never fill a pipe and block the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from edgeoffload.keys import KeyPair, encode_public, generate_identity
from edgeoffload.lab.procfs import pin_threads

SERVER_DIR = "server"
ALLOW_FILE = "authorized_keys"


@dataclass(frozen=True)
class ThrowawayKeys:
    """A server key and device keys in ``root/<label>/``, and the allow-list of the devices."""

    root: Path
    server: KeyPair
    devices: Mapping[str, KeyPair]  # label -> key, in allow-list order
    allow_file: Path
    server_folder: str = SERVER_DIR  # the server key's folder under root

    @classmethod
    def create(cls, root: Path, devices: Sequence[str] = ("device",)) -> ThrowawayKeys:
        """Generate the keys under ``root`` (created if needed); every device is allowed."""
        if not devices or SERVER_DIR in devices:
            raise ValueError(f"device labels must be given and differ from {SERVER_DIR!r}")
        root.mkdir(parents=True, exist_ok=True)
        server = generate_identity(root / SERVER_DIR)
        keys = {label: generate_identity(root / label) for label in devices}
        allow_file = root / ALLOW_FILE
        allow_file.write_text(
            "".join(f"{encode_public(key.public)} {label}\n" for label, key in keys.items())
        )
        return cls(root, server, keys, allow_file)

    @property
    def server_dir(self) -> Path:
        return self.root / self.server_folder

    def another_server(self, label: str) -> ThrowawayKeys:
        """The same devices and allow-list with a new server key in ``root/label/`` (one of
        several servers of a fleet, each with its own identity)."""
        if label == SERVER_DIR or label in self.devices:
            raise ValueError(f"server label {label!r} is taken")
        server = generate_identity(self.root / label)
        return ThrowawayKeys(self.root, server, self.devices, self.allow_file, label)

    @property
    def device(self) -> KeyPair:
        """The first device's key."""
        return next(iter(self.devices.values()))

    def device_dir(self, label: str | None = None) -> Path:
        """The key folder of device ``label`` (default: the first device)."""
        return self.root / (label if label is not None else next(iter(self.devices)))


class ServerProcess:
    """A running ``edgeoffload serve`` process; :meth:`stop` (or ``with``) ends it."""

    def __init__(self, process: subprocess.Popen[bytes], host: str, port: int, log: Path) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.log = log

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def output_tail(self, lines: int = 3) -> list[str]:
        """The last ``lines`` lines the server printed."""
        return self.log.read_text(errors="replace").splitlines()[-lines:]

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the server drains and exits), SIGKILL if it does not exit in ``timeout``."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def spawn_server(
    bundles: Sequence[Path],
    keys: ThrowawayKeys,
    *,
    threads: int = 1,
    workers: int | None = None,
    cpus: set[int] | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 30.0,
    port: int = 0,
) -> ServerProcess:
    """``edgeoffload serve BUNDLES`` on 127.0.0.1 and a free port, with ``keys``' server key and
    allow-list; returns once it listens.

    ``workers``: concurrent tail runs (default: the server's own default, one per CPU).
    ``cpus``: pin every thread of the server to these CPUs once it listens (its onnxruntime
    thread pools exist by then). ``extra_args``: further ``serve`` options. ``port``: 0 for a
    free one, or a given one (a server restarted where it was).
    """
    folder = Path(tempfile.mkdtemp(prefix="serve-", dir=keys.root))
    ready_file, log = folder / "ready.json", folder / "output.log"
    cmd = [
        sys.executable, "-u", "-m", "edgeoffload.cli", "serve", *map(str, bundles),
        "--key", str(keys.server_dir),
        "--allow", str(keys.allow_file),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--threads", str(threads),
        *(["--workers", str(workers)] if workers is not None else []),
        "--ready-file", str(ready_file),
        *extra_args,
    ]  # fmt: skip
    with log.open("wb") as output:
        process = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not ready_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait(10)
            raise RuntimeError(
                f"edge server did not start within {timeout:g} s: "
                + log.read_text(errors="replace")
            )
        time.sleep(0.02)
    ready = json.loads(ready_file.read_text())
    server = ServerProcess(process, str(ready["host"]), int(ready["port"]), log)
    if cpus:
        pin_threads(server.pid, cpus)
    return server


@dataclass(frozen=True)
class CpuSplit:
    """The edge server on the last CPU, this process (the devices) on the others: two
    machines' worth of isolation on one (the scheduler would otherwise move both between
    cores, which costs a ping-ponging split more than a baseline in one process)."""

    server: set[int]
    devices: set[int]

    @classmethod
    def of_machine(cls, pin: bool = True) -> CpuSplit | None:
        """The split of this process's CPUs; None when ``pin`` is off or there is one CPU."""
        cpus = sorted(os.sched_getaffinity(0))
        return cls({cpus[-1]}, set(cpus[:-1])) if pin and len(cpus) >= 2 else None


@contextlib.contextmanager
def devices_pinned(split: CpuSplit | None) -> Iterator[None]:
    """This process on ``split``'s device CPUs inside the block, on all of its CPUs again
    after (nothing with no split). Pin the server with ``spawn_server(cpus=split.server)``."""
    if split is None:
        yield
        return
    everything = os.sched_getaffinity(0)
    pin_threads(os.getpid(), split.devices)
    try:
        yield
    finally:
        pin_threads(os.getpid(), everything)


def netns_unavailable() -> str | None:
    """Why this process cannot make a network namespace of its own (``unshare -n``, for the
    tests that run multicast or Ray where only a loopback exists); None when it can."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} not found (util-linux / iproute2)"
    try:
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare -n failed: {exc}"
    if probe.returncode != 0:
        reason = probe.stderr.decode(errors="replace").strip()
        return f"cannot create a network namespace (unshare -n needs root): {reason}"
    return None
