"""What benchmarks read from Linux's /proc: memory and CPU time of a process, machine load,
and CPU pinning of every thread of a process (to play device and server on separate cores)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def status_kib(pid: int, field: str) -> int:
    """A KiB field of /proc/<pid>/status, e.g. ``VmRSS`` or ``VmHWM`` (peak RSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])  # "VmRSS:   123456 kB"
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB."""
    return status_kib(pid, "VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal
    return total - values[3] - values[4], total


def busy_cores(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Cores the whole machine kept busy between two :func:`machine_ticks` readings."""
    total = after[1] - before[1]
    return round((after[0] - before[0]) / total * (os.cpu_count() or 1), 3) if total else 0.0


def pin_threads(pid: int, cpus: set[int]) -> None:
    """Pin every thread of process ``pid`` to ``cpus`` (threads started later inherit it from
    the thread that starts them)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):  # thread ended
            os.sched_setaffinity(int(task.name), cpus)
