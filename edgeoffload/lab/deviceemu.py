"""Emulate a slower device by running a process throttled to a fraction of one CPU core.

The benchmark lab runs the device side of an offload (profiling, the head model, the client) in
a child process whose CPU time is capped by the kernel's CFS bandwidth controller: a fresh
cgroup gets ``quota = fraction * period`` microseconds of CPU per ``period`` (4 ms), so a
single-threaded child runs at ``fraction`` of this machine's core speed.

Device classes: the fraction for a class is ``1 / DeviceClass.uniform`` of
:data:`edgeoffload.core.presets.DEVICE_CLASSES` (one table: the calibrated classes and their
sources are documented there and in the README), e.g. ``rpi4`` 0.100, ``phone-mid`` 0.234,
``pi-zero-2`` 0.034 of a core. ``uniform`` mixes the class's compute and memory-bound
factors as MobileNetV2 does, so an emulated device runs MobileNetV2 as fast as the published
hardware; a model with another mix of operators is only approximately right (the emulator
cannot slow memory-bound work more than compute). The deprecated names ``phone`` and
``rpi`` resolve to ``phone-mid`` and ``rpi4``.

What the emulation does and does not capture: it slows *compute* (and everything else the
child does on the CPU) uniformly. It does not emulate a smaller cache, lower memory bandwidth
or a different instruction set, so memory-bound layers are modelled as slowing down as much as
compute-bound ones. Quotas are enforced per 4 ms period: a child may run at full speed for
``quota`` microseconds and then sleep for the rest of the period, which adds up to one period
of jitter to short operations. The period is as short as the kernel's 1 ms minimum quota
allows for a quarter core: with the usual 100 ms (or even 10 ms) period, a 5 ms head's
latency depends on where in the period it starts, which no real device does (measured in the
lab: heads of similar cost took 21 or 46 ms with a 10 ms period). At the calibrated classes'
small fractions even the 1 ms minimum quota is too coarse: an idle child banks it, so a head of
~1 ms of CPU after a wait for the network runs at full speed (measured: 0.03-0.23 of the
intended time, ``benchmarks/deviceemu_noise.py``). ``pace=True`` (what the lab uses) holds the
child with :mod:`edgeoffload.lab.pacer` instead; the quota stays for the fleet benchmark's
servers, whose tails are long.

Mechanisms, chosen once per process by :func:`cpu_limit_method`:

* ``cgroup-v1`` — a directory in the v1 ``cpu`` hierarchy (``/sys/fs/cgroup/cpu``) with
  ``cpu.cfs_period_us`` and ``cpu.cfs_quota_us``. Needs root.
* ``cgroup-v2`` — a directory in the unified hierarchy with ``cpu.max``; used when the cpu
  controller is available there and enabled in the parent's ``cgroup.subtree_control``.
* ``none`` — neither works (not root, read-only cgroupfs, no cpu controller). Processes then
  run *unthrottled* and :attr:`CpuLimitedProcess.method` is ``"threads-only"``: only the
  intra-op thread variables are set. Results measured that way must say so.

The child joins its cgroup in a ``preexec_fn`` between fork and exec, so it is throttled from
its first instruction, and so are all of its descendants. Every cgroup this module creates is
named ``edgeoffload-<pid>-<n>`` and is removed by :meth:`CpuLimitedProcess.close` (also on
exceptions, and at interpreter exit for instances that were never closed). Cgroups this module
did not create are never touched. A parent killed with SIGKILL leaves its empty directory
behind (``rmdir`` it by hand).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import itertools
import logging
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from edgeoffload.core import presets
from edgeoffload.errors import EdgeOffloadError, UsageError
from edgeoffload.lab.pacer import Pacer

log = logging.getLogger("edgeoffload.lab.deviceemu")

DEVICE_CLASSES: dict[str, float] = {
    name: 1.0 / device.uniform
    for name, device in presets.DEVICE_CLASSES.items()
    if name != "this-machine"
}
"""Fraction of one core of this machine per device class (``1 / presets' uniform slowdown``)."""

MAX_FRACTION = 64.0
PERIOD_US = 4_000
MIN_QUOTA_US = 1_000  # the kernel refuses quotas below 1 ms

# Intra-op thread pools of the usual numeric runtimes. onnxruntime has no environment variable
# for its intra-op pool: callers pass ``--threads 1`` (session options) themselves.
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_PREFIX = "edgeoffload"
_counter = itertools.count()
_counter_lock = threading.Lock()


# --------------------------------------------------------------------------- detection


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(mount point, root within the hierarchy, fstype, super options) of cgroup mounts."""
    found: list[tuple[str, str, str, set[str]]] = []
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return found
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        point = fields[4].replace("\\040", " ")
        found.append((point, fields[3], tail[0], set(tail[2].split(","))))
    return found


def _own_cgroup(v1_controller: str | None) -> str | None:
    """This process's cgroup path in the v1 hierarchy of ``v1_controller`` (None: v2)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if v1_controller is None and controllers == "":
            return path
        if v1_controller is not None and v1_controller in controllers.split(","):
            return path
    return None


def _v1_parent() -> Path | None:
    """Where to create v1 cpu cgroups: our own cpu cgroup if visible, else the mount point."""
    for point, root, fstype, options in _mounts():
        if fstype != "cgroup" or "cpu" not in options:
            continue
        mount = Path(point)
        own = _own_cgroup("cpu")
        if own is not None and (root == "/" or own == root or own.startswith(root + "/")):
            relative = own[len(root) :] if root != "/" else own
            candidate = mount / relative.lstrip("/")
            if (candidate / "cpu.cfs_quota_us").exists():
                return candidate
        return mount
    legacy = _CGROUP_ROOT / "cpu"
    return legacy if (legacy / "cpu.cfs_quota_us").exists() else None


def _v2_parent() -> Path | None:
    """Where to create v2 cgroups: the unified mount's root, if the cpu controller is usable.

    The root cgroup is used (not our own) because of v2's no-internal-processes rule: our own
    cgroup holds processes, so it cannot delegate the cpu controller to children.
    """
    points = [Path(p) for p, _, fstype, _ in _mounts() if fstype == "cgroup2"]
    if not points:
        points = [_CGROUP_ROOT]
    for mount in points:
        try:
            controllers = (mount / "cgroup.controllers").read_text().split()
            subtree = (mount / "cgroup.subtree_control").read_text().split()
        except OSError:
            continue
        if "cpu" in controllers and "cpu" in subtree:
            return mount
    return None


def _probe(parent: Path, control_file: str) -> bool:
    """Can we create a cgroup under ``parent`` that has ``control_file``? (Removed again.)"""
    probe = parent / f"{_PREFIX}-{os.getpid()}-probe"
    try:
        probe.mkdir()
    except OSError as exc:
        log.debug("cannot create a cgroup under %s: %s", parent, exc)
        return False
    try:
        return (probe / control_file).exists()
    finally:
        _rmdir_quietly(probe)


@functools.lru_cache(maxsize=1)
def _detect() -> tuple[str, Path | None]:
    found: tuple[str, Path | None] = ("none", None)
    if os.name == "posix":
        v1 = _v1_parent()
        if v1 is not None and _probe(v1, "cpu.cfs_quota_us"):
            found = ("cgroup-v1", v1)
        else:
            v2 = _v2_parent()
            if v2 is not None and _probe(v2, "cpu.max"):
                found = ("cgroup-v2", v2)
    log.debug("CPU limit method: %s (cgroups under %s)", *found)
    return found


def cpu_limit_method() -> str:
    """``"cgroup-v1"``, ``"cgroup-v2"`` or ``"none"``; detected once per process."""
    return _detect()[0]


def cpu_fraction(name_or_value: str | float) -> float:
    """A device class name (``"rpi4"``, ``"phone-mid"``, ...; the deprecated ``"rpi"`` and
    ``"phone"`` with a FutureWarning) or a fraction of one core in (0, 64].

    Raises:
        UsageError: unknown class, not a number, or out of range.
    """
    if isinstance(name_or_value, bool):
        raise UsageError(f"CPU fraction must be a number, got {name_or_value!r}")
    if isinstance(name_or_value, str):
        key = name_or_value.strip().lower()
        if key in presets.DEVICE_ALIASES:
            key = presets.device_class(key).name  # warns once, like the cost model's parser
        if key in DEVICE_CLASSES:
            return DEVICE_CLASSES[key]
        try:
            value = float(key)
        except ValueError:
            raise UsageError(
                f"unknown device class {name_or_value!r}",
                hint=f"use one of {', '.join(DEVICE_CLASSES)} or a fraction of one core "
                "such as 0.3",
            ) from None
    elif isinstance(name_or_value, (int, float)):
        value = float(name_or_value)
    else:
        raise UsageError(f"CPU fraction must be a class name or a number, got {name_or_value!r}")
    if not (math.isfinite(value) and 0.0 < value <= MAX_FRACTION):
        raise UsageError(
            f"CPU fraction must be in (0, {MAX_FRACTION:g}], got {name_or_value!r}",
            hint="0.25 is a quarter of one core; 2 is two full cores",
        )
    return value


# --------------------------------------------------------------------------- cgroup helpers


def _rmdir_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        try:
            path.rmdir()
        except OSError as exc:
            log.warning("could not remove cgroup %s: %s", path, exc)


def _cgroup_pids(path: Path) -> list[int]:
    try:
        text = (path / "cgroup.procs").read_text()
    except OSError:
        return []
    return [int(tok) for tok in text.split() if tok.isdigit()]


def _kill_members(path: Path) -> int:
    """SIGKILL every process inside our cgroup (the child and anything it spawned)."""
    killed = 0
    for pid in _cgroup_pids(path):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


def _join_cgroup_fn(procs_file: str) -> Any:
    """A preexec_fn that moves the forked child into the cgroup before it execs.

    It runs between fork and exec, so it sticks to plain syscalls (no logging, no locks).
    """
    target = os.fsencode(procs_file)

    def join() -> None:
        fd = os.open(target, os.O_WRONLY)
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)

    return join


# Strong references: an instance that is never closed still has its cgroup removed at exit.
_live: set[CpuLimitedProcess] = set()
_live_lock = threading.Lock()


@atexit.register
def _close_all() -> None:
    with _live_lock:
        pending = list(_live)
    for proc in pending:
        with contextlib.suppress(Exception):
            proc.close(grace=0.0)


# --------------------------------------------------------------------------- the process


class CpuLimitedProcess:
    """subprocess.Popen running `cmd` inside a fresh CPU cgroup limited to `fraction` of one core.

    Use it as a context manager: leaving the block waits for nothing, kills the child (and its
    descendants) if it is still running and removes the cgroup, also when the block raises::

        with CpuLimitedProcess(cmd, cpu_fraction("rpi4")) as proc:
            if proc.wait(600) != 0:
                ...

    With ``pace=True`` and a fraction below one core, the child is held to its fraction by a
    :class:`~edgeoffload.lab.pacer.Pacer` (stopped whenever it is ahead) instead of a quota:
    no cgroup, no root, and no full-speed burst after idle — what millisecond heads need.

    Attributes:
        method: the mechanism that actually applied: ``"cgroup-v1"``, ``"cgroup-v2"``,
            ``"pace"`` or ``"threads-only"`` (no cgroup: the child runs unthrottled).
        fraction: the requested fraction of one core.
        quota_us: the CPU time allowed per ``PERIOD_US`` (None with ``"threads-only"``).
        threads: the value given to the intra-op thread variables (1 below two cores).
        cgroup_path: the cgroup directory (None with ``"threads-only"`` or after close).
        popen: the underlying :class:`subprocess.Popen`.
    """

    method: str
    popen: subprocess.Popen[Any]

    def __init__(
        self,
        cmd: list[str],
        fraction: float,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        stdin: int | IO[Any] | None = None,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        text: bool = False,
        pace: bool = False,
    ) -> None:
        self.fraction = cpu_fraction(fraction)
        self.threads = max(1, int(self.fraction))
        self.quota_us: int | None = None
        self.cgroup_path: Path | None = None
        self.pacer: Pacer | None = None
        self._closed = False
        pace = pace and self.fraction < 1.0  # a pacer holds one core at most

        child_env = dict(os.environ if env is None else env)
        for name in THREAD_ENV_VARS:
            child_env[name] = str(self.threads)

        preexec = None
        method = "pace" if pace else cpu_limit_method()
        if method not in ("none", "pace"):
            try:
                self.cgroup_path, self.quota_us = self._make_cgroup(method)
                preexec = _join_cgroup_fn(str(self.cgroup_path / "cgroup.procs"))
            except OSError as exc:
                log.warning(
                    "could not set up a %s CPU limit (%s); the device process runs "
                    "UNTHROTTLED (threads-only)",
                    method,
                    exc,
                )
                method = "none"
        self.method = method if method != "none" else "threads-only"
        if self.method == "threads-only":
            log.warning(
                "no CPU cgroup available: %s runs unthrottled with %s=%d only",
                cmd[0] if cmd else cmd,
                THREAD_ENV_VARS[0],
                self.threads,
            )

        if pace:  # up before the child, so that it is paced from its first milliseconds
            try:
                self.pacer = Pacer(self.fraction).start()
            except BaseException:
                self._closed = True
                raise
        try:
            self.popen = subprocess.Popen(
                cmd,
                env=child_env,
                cwd=cwd,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                text=text,
                preexec_fn=preexec,
            )
        except BaseException:
            self._remove_cgroup()
            if self.pacer is not None:
                self.pacer.close()
            self._closed = True
            raise
        if self.pacer is not None:
            self.pacer.attach(self.popen.pid)
        with _live_lock:
            _live.add(self)
        log.debug(
            "started pid %d at %.3g of a core (%s%s)",
            self.popen.pid,
            self.fraction,
            self.method,
            f", {self.cgroup_path}" if self.cgroup_path else "",
        )

    def _make_cgroup(self, method: str) -> tuple[Path, int]:
        _, parent = _detect()
        assert parent is not None  # method != "none"
        with _counter_lock:
            n = next(_counter)
        path = parent / f"{_PREFIX}-{os.getpid()}-{n}"
        # Small fractions need a longer period: the kernel refuses quotas below 1 ms. The quota
        # is rounded up (int() gave 999 us for 0.234 of a core: EINVAL, run unthrottled).
        period = max(PERIOD_US, math.ceil(MIN_QUOTA_US / self.fraction))
        quota = max(MIN_QUOTA_US, round(self.fraction * period))
        path.mkdir()
        try:
            if method == "cgroup-v1":
                # period first: the kernel checks quota against the current period
                (path / "cpu.cfs_period_us").write_text(str(period))
                (path / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                (path / "cpu.max").write_text(f"{quota} {period}")
        except BaseException:
            _rmdir_quietly(path)
            raise
        log.debug("created cgroup %s with quota %d/%d us", path, quota, period)
        return path, quota

    # ---------------------------------------------------------------- Popen-like surface

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child; raises subprocess.TimeoutExpired like Popen.wait."""
        return self.popen.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the child and every other process in its cgroup."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
        if self.cgroup_path is not None:
            _kill_members(self.cgroup_path)

    def cpu_stat(self) -> dict[str, int]:
        """The cgroup's ``cpu.stat`` (throttling counters); empty without a cgroup."""
        if self.cgroup_path is None:
            return {}
        try:
            lines = (self.cgroup_path / "cpu.stat").read_text().splitlines()
        except OSError:
            return {}
        stat = {}
        for line in lines:
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                stat[key] = int(value)
        return stat

    # ---------------------------------------------------------------- cleanup

    def close(self, *, grace: float = 1.0) -> None:
        """Stop the child if it still runs (SIGTERM, ``grace`` seconds, SIGKILL), reap it,
        close its pipes and remove the cgroup. Idempotent.

        Raises:
            EdgeOffloadError: the cgroup could not be removed (a process that cannot be
                killed is still inside it).
        """
        if self._closed:
            return
        self._closed = True
        with _live_lock:
            _live.discard(self)
        if self.pacer is not None:
            self.pacer.close()  # resumes the child, so that SIGTERM reaches a running process
        try:
            if self.popen.poll() is None:
                if grace > 0:
                    with contextlib.suppress(ProcessLookupError):
                        self.popen.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.popen.wait(grace)
                if self.popen.poll() is None:
                    self.kill()
                self.popen.wait()
            for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        finally:
            self._remove_cgroup()

    def _remove_cgroup(self) -> None:
        path, self.cgroup_path = self.cgroup_path, None
        if path is None:
            return
        delay = 0.005
        deadline = time.monotonic() + 5.0
        while True:
            try:
                path.rmdir()
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise EdgeOffloadError(
                        f"could not remove cgroup {path}: {exc}",
                        hint=f"kill the processes listed in {path / 'cgroup.procs'} and "
                        f"rmdir {path}",
                    ) from exc
                # descendants of the child (or the child itself) are still inside
                if _kill_members(path):
                    log.debug("killed leftover processes in %s", path)
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
            else:
                log.debug("removed cgroup %s", path)
                return

    def __enter__(self) -> CpuLimitedProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close(grace=0.0)
        except EdgeOffloadError as cleanup_error:
            # do not mask the exception that is already propagating
            log.error("%s", cleanup_error)

    def __repr__(self) -> str:
        pid = getattr(getattr(self, "popen", None), "pid", None)
        return (
            f"<CpuLimitedProcess pid={pid} fraction={self.fraction:g}"
            f" method={getattr(self, 'method', None)}"
            f" cgroup={self.cgroup_path}>"
        )
