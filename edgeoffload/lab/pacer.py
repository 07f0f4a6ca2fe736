"""Hold a process to a fraction of one core by stopping it whenever it is ahead (SIGSTOP/SIGCONT).

Why not only a CFS quota (:mod:`edgeoffload.lab.deviceemu`): the kernel's quota is at least
1 ms per period, and a process that was idle starts each period with that whole millisecond
banked. A device head of ~1 ms of CPU here therefore runs at *full speed* after any wait for
the network (measured: a 1 ms op at a 0.1-core quota took 0.9 ms, not 10 ms), and a 10 ms op
ran ~20% fast. Real slow devices have no such burst.

The pacer polls the process's CPU clock (all its threads, nanoseconds) every ``poll_s``
(0.2 ms; 0.5 ms let a 1 ms op after a wait run 1.4-9x fast) and, when it has used more than
``fraction`` of the wall time since it started, stops it (SIGSTOP) for exactly as long as it
takes the allowance to catch up, then resumes it (SIGCONT). Time spent idle is not banked:
after a wait the process starts one poll's CPU in debt, which pays on average for the CPU it
runs between its last poll and the end of an operation; an idle process is never stopped, so
it wakes at once when its answer arrives.

Measured (``benchmarks/deviceemu_noise.py``, 40 runs each, ``wall / (CPU / fraction)``, 1.0 is
exact; last run in ``benchmarks/results/deviceemu_noise.json``) at the rpi4 / pi-zero-2 /
phone-mid fractions: a 1 ms op after a 20 ms wait, median 1.12 / 0.66 / 1.10 paced (1.07-1.13
for pi-zero-2 in three earlier runs) against 0.10 / 0.03 / 0.23 with the quota (the quota's op
ran at full speed); a 10 ms op, median 1.00-1.02 paced (p10-p90 mostly within ±3%) against
0.71-0.90 with the quota (p10 down to 0.38) on this shared VM.

Costs and limits: the helper wakes ~4000 times a second (a few percent of one core); children
of the paced process are not counted or stopped (the lab's device processes have none). What
runs on the device's core while it is stopped evicts its caches, so a cache-hungry op takes
more CPU than at full speed: MobileNetV2 took 14.3 ms of CPU paced at 0.1 core, 10.5 ms under
a 0.1-core quota, 9.0 ms unthrottled (one run each on this shared VM). Pinning the device and
the pacer to different cores was tried: no clear gain for the cache, and short ops after a
wait ran 20-35% fast again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from edgeoffload.errors import EdgeOffloadError, UsageError

log = logging.getLogger("edgeoffload.lab.pacer")

POLL_S = 0.0002


def cpu_ns(pid: int) -> int:
    """CPU time of all threads of ``pid`` in nanoseconds, up to date (raises OSError once the
    process is gone).

    The process CPU clock of another pid (``clock_getcpuclockid``; Python lacks the call, so
    the id is built as the kernel does: ``(~pid << 3) | CPUCLOCK_SCHED``) is exact to the
    nanosecond for a running task; ``/proc/PID/schedstat`` is only updated at scheduler ticks
    (4 ms), far too late to stop a 1 ms head.
    """
    return time.clock_gettime_ns(((~pid) << 3) | 2)


def pace(pid: int, fraction: float, poll_s: float, done: threading.Event) -> None:
    """Keep ``pid`` at ``fraction`` of one core until it exits or ``done`` is set."""
    f = fraction
    # After idle the process starts a poll's CPU in debt: what it runs between its last poll and
    # the end of an operation (half a poll on average) is never stopped for, and would make
    # every short head after a wait run that much too fast.
    idle_credit = -poll_s

    def send(sig: int) -> bool:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True

    try:
        start_cpu = cpu_ns(pid)
        start_wall = time.perf_counter()
        used = 0.0
        while not done.wait(poll_s):
            used_before, used = used, (cpu_ns(pid) - start_cpu) / 1e9
            credit = f * (time.perf_counter() - start_wall) - used
            if credit > idle_credit and used_before == used:  # idle: no burst after a wait
                start_wall += (credit - idle_credit) / f
            elif credit < 0:
                if not send(signal.SIGSTOP):
                    return
                done.wait(-credit / f)  # until the allowance has caught up with what it used
                if not send(signal.SIGCONT):
                    return
    except OSError:  # the process is gone (and its CPU clock with it)
        return
    finally:
        send(signal.SIGCONT)  # never leave it stopped


class Pacer:
    """Keeps a process at ``fraction`` (0 < fraction < 1) of one core from a helper process.

    The loop runs in its own process (``python -m edgeoffload.lab.pacer FRACTION POLL_S``, the
    pid on its stdin) with a real-time priority where allowed (root): in the lab's own process
    it would wait for the GIL (5 ms switch interval) and for a core that other work keeps busy,
    and a late poll lets a short head run at full speed (measured). :meth:`start` waits until
    the helper is up, so that :meth:`attach` right after the child's fork paces it from its
    first milliseconds (an interpreter starting after the child let short runs go unpaced).
    """

    def __init__(self, fraction: float, *, poll_s: float = POLL_S) -> None:
        if not 0.0 < fraction < 1.0:
            raise UsageError(f"a paced process needs a fraction in (0, 1), got {fraction!r}")
        self.fraction = fraction
        self.poll_s = poll_s
        self.pid: int | None = None
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> Pacer:
        """Start the helper and wait until it is ready for a pid."""
        cmd = [sys.executable, "-m", "edgeoffload.lab.pacer", repr(self.fraction)]
        self._proc = subprocess.Popen(
            [*cmd, repr(self.poll_s)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != "ready":
            self.close()
            raise EdgeOffloadError("the pacer helper did not start", hint="run with -v for its log")
        return self

    def attach(self, pid: int) -> None:
        """Pace ``pid`` from now on (once)."""
        assert self._proc is not None and self._proc.stdin is not None and self.pid is None
        self.pid = pid
        self._proc.stdin.write(f"{pid}\n")
        self._proc.stdin.flush()

    def close(self) -> None:
        """Stop pacing; the process is resumed if it was stopped. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()  # its SIGTERM handler resumes the paced process
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        # whatever happened to the helper, the paced process must not stay stopped
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)


def _main(argv: list[str]) -> None:
    fraction, poll_s = float(argv[0]), float(argv[1])
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:  # a late poll lets the device run free: preempt whatever else runs here
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (PermissionError, OSError, AttributeError):
        log.debug("no real-time priority for the pacer: polls may come late under load")
    print("ready", flush=True)
    line = sys.stdin.readline()
    if line.strip():
        pace(int(line), fraction, poll_s, done)


if __name__ == "__main__":  # python -m edgeoffload.lab.pacer FRACTION POLL_S  (pid on stdin)
    _main(sys.argv[1:])
