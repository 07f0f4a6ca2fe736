"""edgeoffload.lab.deviceemu: CPU-throttled device processes in real cgroups (no kernel mocks).

The cgroup tests need root and a cpu controller; they skip with the reason otherwise.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeoffload.core import presets
from edgeoffload.errors import UsageError
from edgeoffload.lab import deviceemu
from edgeoffload.lab.deviceemu import (
    DEVICE_CLASSES,
    PERIOD_US,
    CpuLimitedProcess,
    cpu_fraction,
    cpu_limit_method,
)
from edgeoffload.lab.pacer import Pacer

PY = sys.executable
METHOD = cpu_limit_method()
needs_cgroup = pytest.mark.skipif(
    METHOD == "none",
    reason="no usable CPU cgroup (needs root and a cgroup v1/v2 cpu controller): "
    "processes would run unthrottled",
)


def _ours() -> list[Path]:
    """Cgroups this test process created and has not removed."""
    parent = deviceemu._detect()[1]
    if parent is None:
        return []
    return sorted(parent.glob(f"edgeoffload-{os.getpid()}-*"))


@pytest.fixture(autouse=True)
def no_leftover_cgroups():
    before = _ours()
    yield
    assert _ours() == before


# --------------------------------------------------------------------------- fractions


def test_device_classes():
    assert cpu_fraction("rpi4") == pytest.approx(1.0 / presets.DEVICE_CLASSES["rpi4"].uniform)
    assert cpu_fraction(" RPi4 ") == cpu_fraction("rpi4")
    assert cpu_fraction("0.3") == 0.3
    assert cpu_fraction(0.3) == 0.3
    assert cpu_fraction(2) == 2.0
    assert cpu_fraction(64) == 64.0


def test_device_classes_come_from_the_presets_table():
    real = set(presets.DEVICE_CLASSES) - {"this-machine"}
    assert set(DEVICE_CLASSES) == real
    for name in real:
        assert DEVICE_CLASSES[name] == pytest.approx(1.0 / presets.DEVICE_CLASSES[name].uniform)
    # slowest first, as the published benchmarks order them
    order = sorted(DEVICE_CLASSES, key=DEVICE_CLASSES.__getitem__)
    assert order == ["pi-zero-2", "rpi4", "phone-mid", "rpi5", "phone-flagship"]
    assert all(0 < f < 1 for f in DEVICE_CLASSES.values())


@pytest.mark.parametrize(("alias", "target"), [("rpi", "rpi4"), ("phone", "phone-mid")])
def test_deprecated_class_names_warn_and_resolve(alias, target):
    with pytest.warns(FutureWarning, match=target):
        assert cpu_fraction(alias) == DEVICE_CLASSES[target]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "pi",
        "fast",
        "this-machine",
        "0",
        "-0.5",
        "64.5",
        "nan",
        "inf",
        0,
        -1,
        100.0,
        float("nan"),
        True,
        None,
        [0.5],
    ],
)
def test_bad_fractions(bad):
    with pytest.raises(UsageError):
        cpu_fraction(bad)


def test_bad_fraction_creates_nothing():
    with pytest.raises(UsageError):
        CpuLimitedProcess([PY, "-c", "pass"], 0.0)


def test_method_is_one_of_the_documented():
    assert METHOD in ("cgroup-v1", "cgroup-v2", "none")
    assert cpu_limit_method() == METHOD  # detected once, stable


# --------------------------------------------------------------------------- cgroups


@needs_cgroup
def test_method_and_quota_reported():
    with CpuLimitedProcess([PY, "-c", "pass"], 0.25) as proc:
        assert proc.method == METHOD
        assert proc.quota_us == PERIOD_US // 4
        path = proc.cgroup_path
        assert path is not None and path.is_dir()
        assert path.name.startswith(f"edgeoffload-{os.getpid()}-")
        if METHOD == "cgroup-v1":
            assert (path / "cpu.cfs_period_us").read_text().strip() == str(PERIOD_US)
            assert (path / "cpu.cfs_quota_us").read_text().strip() == str(PERIOD_US // 4)
        else:
            assert (path / "cpu.max").read_text().split() == [str(PERIOD_US // 4), str(PERIOD_US)]
        assert proc.wait(10) == 0
    assert not path.exists()
    assert proc.cgroup_path is None


@needs_cgroup
@pytest.mark.parametrize("name", sorted(DEVICE_CLASSES))
def test_every_class_gets_a_quota_the_kernel_accepts(name):
    # 0.234 of a core once gave a 999 us quota: EINVAL, and the child ran unthrottled
    with CpuLimitedProcess([PY, "-c", "pass"], DEVICE_CLASSES[name]) as proc:
        assert proc.method == METHOD
        assert proc.quota_us is not None and proc.quota_us >= 1_000
        proc.kill()


@needs_cgroup
def test_tiny_fraction_gets_minimum_quota():
    with CpuLimitedProcess([PY, "-c", "pass"], 0.001) as proc:
        assert proc.quota_us == 1_000
        proc.kill()


@needs_cgroup
def test_child_is_in_its_cgroup_from_the_start_and_threads_pinned():
    code = (
        "import os; print(open('/proc/self/cgroup').read()); print(os.environ['OMP_NUM_THREADS'])"
    )
    env = dict(os.environ, OMP_NUM_THREADS="8")
    with CpuLimitedProcess(
        [PY, "-c", code], 0.5, env=env, stdout=subprocess.PIPE, text=True
    ) as proc:
        name = proc.cgroup_path.name
        out, _ = proc.popen.communicate(timeout=20)
    lines = [ln for ln in out.splitlines() if ln]
    assert lines[-1] == "1"
    lines = [ln for ln in lines[:-1] if ln.count(":") >= 2]
    if METHOD == "cgroup-v1":
        cpu_lines = [ln for ln in lines if "cpu" in ln.split(":")[1].split(",")]
    else:
        cpu_lines = [ln for ln in lines if ln.startswith("0::")]
    assert cpu_lines and cpu_lines[0].endswith("/" + name)


def _spin_seconds_per_million() -> float:
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        sum(range(1_000_000))
        best = min(best, time.perf_counter() - t)
    return best


def _timed(start) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the reaped children) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    rc = start()
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert rc == 0
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


@needs_cgroup
def test_throttling_slows_a_cpu_bound_child():
    # ~0.3 s of pure CPU for one thread, calibrated on this machine
    n = int(0.3 / _spin_seconds_per_million() * 1_000_000)
    cmd = [PY, "-c", "import sys; sum(range(int(sys.argv[1])))", str(n)]

    def plain() -> int:
        return subprocess.run(cmd, check=False, timeout=30).returncode

    def limited(fraction: float):
        def start() -> int:
            with CpuLimitedProcess(cmd, fraction) as proc:
                rc = proc.wait(30)
                stat = proc.cpu_stat()
            assert stat.get("nr_throttled", 1) > 0
            return rc

        return start

    # The unthrottled baseline is the best of three wall times, and no more than the child's
    # CPU time: other work on this 2-core machine stretches the baseline (the CPUs may be SMT
    # siblings, so even its CPU time grows) and hides the throttling, while a throttled child
    # can only get slower. Baseline runs are interleaved with the throttled ones, and a second
    # attempt is made only when the first one was disturbed.
    for attempt in (1, 2):
        runs = [_timed(plain)]
        half, _ = _timed(limited(0.5))
        runs.append(_timed(plain))
        quarter, _ = _timed(limited(0.25))
        runs.append(_timed(plain))
        base = min(min(w for w, _ in runs), min(c for _, c in runs))
        print(
            f"attempt {attempt}: unthrottled {base:.3f}s (walls {[round(w, 3) for w, _ in runs]})"
            f", 0.5 -> {half:.3f}s = {half / base:.2f}x"
            f", 0.25 -> {quarter:.3f}s = {quarter / base:.2f}x"
        )
        if quarter >= 3.0 * base and half >= 1.6 * base:
            break
    assert quarter >= 3.0 * base, (base, quarter)
    assert half >= 1.6 * base, (base, half)
    assert quarter > half


# --------------------------------------------------------------------------- cleanup


@needs_cgroup
def test_cgroup_removed_after_kill():
    with CpuLimitedProcess([PY, "-c", "import time; time.sleep(30)"], 0.5) as proc:
        path = proc.cgroup_path
        proc.kill()
        assert proc.wait(10) < 0
    assert not path.exists()


@needs_cgroup
def test_cgroup_removed_when_block_raises():
    started = time.monotonic()
    with (
        pytest.raises(RuntimeError, match="boom"),
        CpuLimitedProcess([PY, "-c", "import time; time.sleep(30)"], 0.5) as proc,
    ):
        path = proc.cgroup_path
        assert path.is_dir()
        raise RuntimeError("boom")
    assert not path.exists()
    assert proc.returncode is not None  # killed, not waited for 30 s
    assert time.monotonic() - started < 10


@needs_cgroup
def test_close_kills_a_running_child_and_is_idempotent():
    proc = CpuLimitedProcess([PY, "-c", "import time; time.sleep(30)"], 1.0)
    path = proc.cgroup_path
    proc.close(grace=0.5)
    assert proc.returncode is not None
    assert not path.exists()
    proc.close()


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status or "\nState:\tX" in status


@needs_cgroup
def test_close_kills_descendants_left_in_the_cgroup():
    # the child starts a grandchild and exits; the grandchild stays inside the cgroup
    code = (
        "import subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'],\n"
        "                     stdout=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
    )
    with CpuLimitedProcess([PY, "-c", code], 1.0, stdout=subprocess.PIPE, text=True) as proc:
        path = proc.cgroup_path
        out, _ = proc.popen.communicate(timeout=20)
        grandchild = int(out.split()[0])
        assert proc.returncode == 0
        assert grandchild in deviceemu._cgroup_pids(path)
    assert not path.exists()
    deadline = time.monotonic() + 5
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(grandchild)


@needs_cgroup
def test_failed_start_leaves_no_cgroup(tmp_path):
    with pytest.raises(FileNotFoundError):
        CpuLimitedProcess([str(tmp_path / "no-such-program")], 0.5)


# --------------------------------------------------------------------------- fallback


def test_threads_only_fallback_says_so(monkeypatch, caplog):
    monkeypatch.setattr(deviceemu, "cpu_limit_method", lambda: "none")
    code = "import os; print(os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'])"
    with (
        caplog.at_level("WARNING", logger="edgeoffload.lab.deviceemu"),
        CpuLimitedProcess([PY, "-c", code], 0.25, stdout=subprocess.PIPE, text=True) as proc,
    ):
        out, _ = proc.popen.communicate(timeout=20)
    assert proc.method == "threads-only"
    assert proc.cgroup_path is None and proc.quota_us is None
    assert proc.cpu_stat() == {}
    assert out.split() == ["1", "1"]
    assert "unthrottled" in caplog.text


# --------------------------------------------------------------------------- pacing


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_paced_child_is_slowed_from_its_start_and_needs_no_cgroup():
    # short on purpose: a pacer that started after the child let ~0.1 s run unpaced
    n = int(0.05 / _spin_seconds_per_million() * 1_000_000)
    cmd = [PY, "-c", "import sys; sum(range(int(sys.argv[1])))", str(n)]

    def start() -> int:
        with CpuLimitedProcess(cmd, 0.25, pace=True) as proc:
            assert proc.method == "pace"
            assert proc.cgroup_path is None and proc.quota_us is None
            assert proc.pacer is not None
            return proc.wait(60)

    wall, cpu = _timed(start)
    # a quarter core takes ~4x its CPU time; other load can only make it slower
    assert wall > 2.0 * cpu


def test_pacing_ends_with_the_child_running():
    code = "import time\nt = time.time()\nwhile time.time() - t < 30: pass"
    with CpuLimitedProcess([PY, "-c", code], 0.1, pace=True) as proc:
        time.sleep(0.3)  # long enough to have been stopped many times
        assert proc.pacer is not None
        proc.pacer.close()
        assert _state(proc.pid) != "T"  # resumed, so that SIGTERM can end it
    assert proc.returncode is not None


def test_pace_needs_a_fraction_below_one_core():
    with pytest.raises(UsageError):
        Pacer(1.0)
    with CpuLimitedProcess([PY, "-c", "pass"], 2.0, pace=True) as proc:
        assert proc.pacer is None and proc.method != "pace"
        assert proc.wait(10) == 0
