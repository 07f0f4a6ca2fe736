"""A fleet of edge servers of different speed under many devices, per routing policy
(``edgeoffload bench fleet``, ``benchmarks/fleet.py``).

Three ``edgeoffload serve`` processes host the same tail (a zoo model cut early, codec none).
Each runs in its own CPU cgroup (:mod:`edgeoffload.lab.deviceemu`) held to a fraction of one
core, all pinned to the server CPU(s): by default a fast one (half of the core), one held to
a quarter of the fast one's speed, and one in between that is SIGKILLed half way through every
run and restarted on the same port a few seconds later. The fractions add up to three quarters
of the server core: the rest is headroom for the kernel's loopback work and the processes'
own event loops on that core, so every server can use its whole quota while the others use
theirs. Each one's speed is then its quota, and the sum of their capacities measured one at a
time is what the fleet can do at best.

First the *direct capacity* of each server is measured alone: as many devices as in the
policy runs, all talking to that server directly, in a closed loop. Then, for every policy,
32 devices (asyncio :class:`OffloadClient` objects in this process, pinned to the other
CPU(s), each with its own key and connections to every server) send closed-loop requests for
a fixed time, cycling through a few inputs; every answer is compared bit for bit with the
device running head and tail itself (a *wrong answer* is a mismatch). Failover and backoff
are the pool's, identical for every policy; only the router's choice differs:

* ``round-robin``: the next available server in a fixed cyclic order (per device);
* ``least-outstanding``: the available server with the fewest of this device's requests in
  flight (random among ties; a device in a closed loop has at most one in flight, so this is
  nearly a random choice);
* ``two-choice``: two random available servers, the one with the shorter queue as the server
  last reported it (``load.inflight``, PROTOCOL.md §14), else this device's own in-flight count;
* ``ours``: :class:`edgeoffload.device.routing.Router` (predicted completion time).

The baselines live here, not in :mod:`edgeoffload.device.routing`: they are for comparison.

Reported per policy: throughput, p50/p99, errors, wrong answers, failovers, requests per
server, latency over time in bins, the kill / restart / restart-ready times and the time from
restart-ready to the first request answered by the restarted server. Every await is bounded.
Linux only (cgroups, ``/proc``, ``taskset``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeoffload.device.client import OffloadClient
from edgeoffload.device.pool import EdgeEndpoint
from edgeoffload.device.routing import Router
from edgeoffload.device.runtime import DeviceRuntime
from edgeoffload.errors import EdgeOffloadError, UsageError
from edgeoffload.lab.deviceemu import CpuLimitedProcess, cpu_limit_method
from edgeoffload.lab.harness import ServerProcess, ThrowawayKeys
from edgeoffload.lab.loadtest import default_cut
from edgeoffload.lab.procfs import busy_cores, cpu_seconds, machine_ticks, pin_threads
from edgeoffload.lab.stats import Environment, Record, environment, percentile

Progress = Callable[[str], None]

POLICIES: tuple[str, ...] = ("round-robin", "least-outstanding", "two-choice", "ours")
# Fractions of one core: the fast server, one at a quarter of its speed, and the one that is
# killed and restarted (the last). They share one core, with a quarter of it as headroom
# (module docstring): at 0.5 + 0.125 + 0.3 each server got only ~94% of its quota in the fleet.
DEFAULT_SPEEDS: tuple[float, ...] = (0.4, 0.1, 0.25)
HEAD_FRACTION = 0.1  # default cut: the first single-tensor cut after ~10% of the nodes
SAMPLES = 4  # distinct inputs, cycled through by every device
REQUEST_TIMEOUT_S = 10.0
MAX_INFLIGHT = 128  # per server, above the device count: no "overloaded" refusals by design
ERROR_PAUSE_S = 0.05  # a device that got an error waits this long (no hot error loop)
LAG_TICK_S = 0.01  # event-loop lag probe

# -- the baseline policies -----------------------------------------------------------------------


class RoundRobin(Router):
    """The next available server in a fixed cyclic order (each device starts at a random one)."""

    def __init__(self, urls: Sequence[str], *, rng: random.Random) -> None:
        super().__init__(urls, rng=rng)
        self._order = list(self.servers)
        self._turn = rng.randrange(len(self._order))

    def choose(self, nbytes: int, *, now: float, exclude: Iterable[str] = ()) -> str | None:
        candidates = {s.url for s in self.available(now=now, exclude=exclude)}
        if not candidates:
            return self._last_resort(exclude)
        for step in range(len(self._order)):
            k = (self._turn + step) % len(self._order)
            if self._order[k] in candidates:
                self._turn = k + 1
                return self._order[k]
        raise AssertionError("unreachable: a candidate is always in the order")


class LeastOutstanding(Router):
    """The available server with the fewest of this device's requests in flight (ties:
    random)."""

    def choose(self, nbytes: int, *, now: float, exclude: Iterable[str] = ()) -> str | None:
        candidates = self.available(now=now, exclude=exclude)
        if not candidates:
            return self._last_resort(exclude)
        fewest = min(s.in_flight for s in candidates)
        return self._rng.choice([s for s in candidates if s.in_flight == fewest]).url


class TwoChoice(Router):
    """Two random available servers; the one with the shorter queue: the server's last
    report (``load.inflight``) where there is one, else this device's own in-flight count."""

    def choose(self, nbytes: int, *, now: float, exclude: Iterable[str] = ()) -> str | None:
        candidates = self.available(now=now, exclude=exclude)
        if not candidates:
            return self._last_resort(exclude)
        if len(candidates) == 1:
            return candidates[0].url
        first, second = self._rng.sample(candidates, 2)  # random order: ties go either way

        def queue(s: Any) -> int:
            return int(s.load.inflight) if s.load is not None else int(s.in_flight)

        return (second if queue(second) < queue(first) else first).url


ROUTERS: dict[str, type[Router]] = {
    "round-robin": RoundRobin,
    "least-outstanding": LeastOutstanding,
    "two-choice": TwoChoice,
    "ours": Router,
}


def parse_policies(text: str | Sequence[str]) -> tuple[str, ...]:
    """A comma-separated list (or a sequence) of policy names, each known and given once."""
    names = [p.strip() for p in (text.split(",") if isinstance(text, str) else text)]
    names = [p for p in names if p]
    unknown = [p for p in names if p not in ROUTERS]
    if not names or unknown or len(set(names)) != len(names):
        raise UsageError(
            f"policies must be distinct names among {', '.join(POLICIES)}, got {text!r}"
        )
    return tuple(names)


# -- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerInfo(Record):
    """One server of the fleet and its capacity measured alone."""

    name: str
    cpu_fraction: float  # of one core (its cgroup quota)
    cpu_limit: str  # what enforced it: cgroup-v1, cgroup-v2 or threads-only (nothing)
    killed: bool  # the one SIGKILLed and restarted in every run
    capacity_req_s: float
    capacity_p50_ms: float
    capacity_requests: int
    capacity_errors: int
    capacity_busy: float  # CPU it used / its quota, during the measurement


@dataclass(frozen=True)
class TimeBin(Record):
    """Requests completed in ``[t_s, t_s + width)`` of a run (seconds from its start)."""

    t_s: float
    requests: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    by_server: dict[str, int]


@dataclass(frozen=True)
class PolicyRun(Record):
    """One policy: every request issued in the measured window, and the kill."""

    policy: str
    issued: int
    answered: int
    throughput_req_s: float  # answers completed inside the window / window
    ratio_to_capacity: float  # throughput / the sum of the servers' direct capacities
    ratio_to_available: float  # ... / that sum weighted by the time each server was up
    available_capacity_req_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    p99_before_kill_ms: float
    p99_after_kill_ms: float  # requests issued from the kill to the window's end
    errors: int
    error_kinds: dict[str, int]
    wrong_answers: int
    failovers: int  # answered requests that needed more than one server
    by_server: dict[str, int]
    kill_s: float  # times from the window's start
    restart_s: float  # the restart began (process spawned)
    ready_s: float  # the restarted server listened
    first_answer_after_ready_s: float | None  # restarted server's first answer - ready
    first_sent_after_ready_s: float | None  # that request's start - ready
    # the first bin-wide span after ready, from ready, in which the restarted server answered
    # at least half as fast as before the kill
    half_share_after_ready_s: float | None
    device_cores: float  # CPU of this (device) process over the window / wall
    machine_busy_cores: float  # the whole machine over the window, other load included
    loop_lag_p99_ms: float  # how late a 10 ms sleep of the event loop woke up (p99)
    server_busy: dict[str, float]  # CPU used / CPU quota while up, per server
    timeline: tuple[TimeBin, ...]


@dataclass(frozen=True)
class FleetResult(Record):
    benchmark: str = field(default="fleet", init=False)
    model: str
    cut: str
    crossing_bytes: int
    codec: str
    devices: int
    duration_s: float
    warmup_s: float
    kill_at_s: float
    restart_gap_s: float
    bin_s: float
    server_cpus: list[int]
    device_cpus: list[int]
    cpu_limit: str
    max_inflight: int
    servers: tuple[ServerInfo, ...]
    capacity_sum_req_s: float
    runs: tuple[PolicyRun, ...]
    notes: tuple[str, ...]
    environment: Environment
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["targets"] = [t.to_dict() for t in targets(self)]
        return data


@dataclass(frozen=True)
class Target(Record):
    """One goal of the benchmark and whether this run met it."""

    name: str
    value: float | None
    bound: float | None
    met: bool | None  # None: not measurable in this run (a policy was not run)


def targets(result: FleetResult) -> list[Target]:
    """The goals for ``ours``: throughput, p99 against two baselines, no failures, recovery."""
    runs = {r.policy: r for r in result.runs}
    ours = runs.get("ours")
    out: list[Target] = []

    def add(name: str, value: float | None, bound: float | None, ok: bool | None) -> None:
        out.append(
            Target(
                name,
                None if value is None else round(value, 3),
                None if bound is None else round(bound, 3),
                ok,
            )
        )

    if ours is None:
        return out
    cap = 0.9 * result.capacity_sum_req_s
    add(
        "ours throughput >= 0.9 x sum of direct capacities (req/s)",
        ours.throughput_req_s,
        cap,
        ours.throughput_req_s >= cap,
    )
    for base, factor in (("round-robin", 0.5), ("two-choice", 1.0)):
        other = runs.get(base)
        bound = factor * other.p99_ms if other is not None else None
        label = f"{factor:g} x " if factor != 1.0 else ""
        add(
            f"ours p99 <= {label}{base} p99 (ms)",
            ours.p99_ms,
            bound,
            None if bound is None else ours.p99_ms <= bound,
        )
    add("ours failed requests == 0", ours.errors, 0, ours.errors == 0)
    add("ours wrong answers == 0", ours.wrong_answers, 0, ours.wrong_answers == 0)
    back = ours.first_answer_after_ready_s
    add(
        "ours: killed server answers within 2 s of its restart (s)",
        back,
        2.0,
        back is not None and back <= 2.0,
    )
    return out


# -- servers -------------------------------------------------------------------------------------


class _Server:
    """One ``edgeoffload serve`` process in its own CPU cgroup, pinned with ``taskset``."""

    def __init__(self, limited: CpuLimitedProcess, server: ServerProcess, ready_at: float):
        self.limited = limited
        self.server = server
        self.ready_at = ready_at

    @property
    def url(self) -> str:
        return self.server.url

    def cpu_s(self) -> float:
        try:
            return cpu_seconds(self.server.pid)
        except (OSError, IndexError, ValueError):
            return 0.0

    def kill(self) -> None:
        """SIGKILL (the process and everything in its cgroup), then remove the cgroup."""
        self.limited.kill()
        self.limited.close(grace=0.0)

    def stop(self) -> None:
        self.server.stop(timeout=10.0)
        self.limited.close(grace=0.0)


def _start_server(
    bundle: Path,
    keys: ThrowawayKeys,
    *,
    fraction: float,
    cpus: Sequence[int],
    port: int = 0,
    timeout: float = 60.0,
) -> _Server:
    """``edgeoffload serve`` held to ``fraction`` of a core on ``cpus`` from its first
    instruction (a restart on a slow server is slow too); returns once it listens.

    The command is :func:`edgeoffload.lab.harness.spawn_server`'s, run through
    :class:`CpuLimitedProcess` (which ``spawn_server`` cannot do) and ``taskset``.
    """
    folder = Path(tempfile.mkdtemp(prefix="serve-", dir=keys.root))
    ready_file, log = folder / "ready.json", folder / "output.log"
    taskset = shutil.which("taskset")
    pin = [taskset, "-c", ",".join(map(str, cpus))] if taskset else []
    cmd = [
        *pin, sys.executable, "-u", "-m", "edgeoffload.cli", "serve", str(bundle),
        "--key", str(keys.server_dir),
        "--allow", str(keys.allow_file),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--threads", "1",
        "--workers", "1",
        "--max-inflight", str(MAX_INFLIGHT),
        "--ready-file", str(ready_file),
    ]  # fmt: skip
    with log.open("wb") as output:
        limited = CpuLimitedProcess(cmd, fraction, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while not ready_file.exists():
            if limited.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"edge server did not start within {timeout:g} s: "
                    + log.read_text(errors="replace")[-2000:]
                )
            time.sleep(0.005)
        ready_at = time.monotonic()
        for _ in range(100):  # the file is written whole, but read it until it parses
            try:
                ready = json.loads(ready_file.read_text())
                break
            except ValueError:
                time.sleep(0.005)
        else:
            raise RuntimeError(f"unreadable ready file {ready_file}")
    except BaseException:
        limited.close(grace=0.0)
        raise
    server = ServerProcess(limited.popen, str(ready["host"]), int(ready["port"]), log)
    if not taskset:
        pin_threads(server.pid, set(cpus))  # after the fact (startup ran unpinned)
    return _Server(limited, server, ready_at)


def _start_all(
    bundle: Path, keys: Sequence[ThrowawayKeys], speeds: Sequence[float], *, cpus: Sequence[int]
) -> list[_Server]:
    """Every server at once (a quarter-speed server also starts at a quarter speed)."""
    with ThreadPoolExecutor(len(speeds)) as starter:
        futures = [
            starter.submit(_start_server, bundle, k, fraction=f, cpus=cpus)
            for k, f in zip(keys, speeds, strict=True)
        ]
        wait(futures)
    started = [f.result() for f in futures if f.exception() is None]
    failed = [e for f in futures if (e := f.exception()) is not None]
    if failed:
        for server in started:
            server.stop()
        raise failed[0]
    return started


# -- devices -------------------------------------------------------------------------------------


@dataclass
class _Request:
    device: int
    start: float  # monotonic
    end: float
    ms: float
    server: str  # URL that answered ("" on error)
    attempts: int
    outcome: str  # "ok", "wrong" or the error's type name


def _same(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> bool:
    return set(got) == set(want) and all(
        got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want
    )


async def _closed_loop(
    clients: Sequence[OffloadClient],
    inputs: Sequence[Mapping[str, np.ndarray]],
    references: Sequence[Mapping[str, np.ndarray]],
    *,
    until: float,
    records: list[_Request] | None,
) -> None:
    """Every client sends one request after another until ``until`` (monotonic)."""

    async def device(i: int, client: OffloadClient) -> None:
        k = i
        while time.monotonic() < until:
            sample = k % len(inputs)
            k += 1
            start = time.monotonic()
            try:
                outputs = await asyncio.wait_for(
                    client.run(inputs[sample]), REQUEST_TIMEOUT_S + 5.0
                )
            except (EdgeOffloadError, asyncio.TimeoutError) as exc:
                end = time.monotonic()
                if records is not None:
                    records.append(
                        _Request(i, start, end, (end - start) * 1e3, "", 0, type(exc).__name__)
                    )
                await asyncio.sleep(ERROR_PAUSE_S)
                continue
            end = time.monotonic()
            timing = client.last_timing
            assert timing is not None
            if records is not None:
                ok = timing.offloaded and _same(outputs, references[sample])
                records.append(
                    _Request(
                        i,
                        start,
                        end,
                        (end - start) * 1e3,
                        timing.server,
                        timing.attempts,
                        "ok" if ok else "wrong",
                    )
                )

    tasks = [asyncio.create_task(device(i, c)) for i, c in enumerate(clients)]
    budget = max(0.0, until - time.monotonic()) + 2 * REQUEST_TIMEOUT_S + 10.0
    done, pending = await asyncio.wait(tasks, timeout=budget)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()  # a bug in the loop itself must not pass silently


async def _close_all(clients: Sequence[OffloadClient]) -> None:
    await asyncio.gather(
        *(asyncio.wait_for(c.close(), 10.0) for c in clients), return_exceptions=True
    )


async def _connect_all(clients: Sequence[OffloadClient]) -> None:
    results = await asyncio.gather(
        *(asyncio.wait_for(c.connect(), 20.0) for c in clients), return_exceptions=True
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise RuntimeError(f"{len(failed)} device(s) could not connect: {failed[0]!r}")


async def _lag_probe(samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(LAG_TICK_S)
        samples.append(max(0.0, (time.perf_counter() - before - LAG_TICK_S) * 1e3))


def _pct(values: Sequence[float], q: float) -> float:
    return round(percentile(values, q), 2) if len(values) else math.nan


# -- the benchmark -------------------------------------------------------------------------------


@dataclass
class _Setup:
    bundle: Path
    keys: list[ThrowawayKeys]
    device_keys: list[Any]
    inputs: list[dict[str, np.ndarray]]
    references: list[dict[str, np.ndarray]]
    speeds: tuple[float, ...]
    server_cpus: list[int]
    names: list[str]


def _measure_capacity(
    setup: _Setup, index: int, server: _Server, *, clients: int, seconds: float
) -> ServerInfo:
    """Server ``index`` alone under ``clients`` closed loops (after a short warm-up)."""
    key = setup.keys[index]
    pool = [
        OffloadClient(
            setup.bundle,
            server=server.url,
            server_key=key.server.public,
            identity=setup.device_keys[i % len(setup.device_keys)],
            fallback="error",
            timeout=REQUEST_TIMEOUT_S,
            connect_timeout=10.0,
            retries=0,
        )
        for i in range(clients)
    ]
    records: list[_Request] = []
    window: list[float] = []

    async def measure() -> None:
        try:
            await _connect_all(pool)
            warm = time.monotonic() + min(1.0, seconds / 3)
            await _closed_loop(pool, setup.inputs, setup.references, until=warm, records=None)
            window.extend([time.monotonic(), server.cpu_s()])
            until = window[0] + seconds
            await _closed_loop(pool, setup.inputs, setup.references, until=until, records=records)
            window.append(server.cpu_s())
        finally:
            await _close_all(pool)

    asyncio.run(measure())
    start, cpu0, cpu1 = window
    ok = [r for r in records if r.outcome == "ok" and r.end <= start + seconds]
    return ServerInfo(
        name=setup.names[index],
        cpu_fraction=setup.speeds[index],
        cpu_limit=server.limited.method,
        killed=index == len(setup.speeds) - 1,
        capacity_req_s=round(len(ok) / seconds, 2),
        capacity_p50_ms=_pct([r.ms for r in ok], 50),
        capacity_requests=len(ok),
        capacity_errors=sum(r.outcome != "ok" for r in records),
        capacity_busy=round((cpu1 - cpu0) / (setup.speeds[index] * seconds), 3),
    )


def _policy_run(
    policy: str,
    setup: _Setup,
    servers: list[_Server],
    *,
    devices: int,
    duration_s: float,
    warmup_s: float,
    kill_at_s: float,
    restart_gap_s: float,
    bin_s: float,
    capacities: Sequence[float],
    seed: int,
) -> PolicyRun:
    """One policy's run; ``servers[-1]`` is killed and replaced (in ``servers``) by its
    restart."""
    urls = [s.url for s in servers]
    names = dict(zip(urls, setup.names, strict=True))
    endpoints = [
        EdgeEndpoint(url, k.server.public) for url, k in zip(urls, setup.keys, strict=True)
    ]
    clients = []
    for i in range(devices):
        client = OffloadClient(
            setup.bundle,
            servers=endpoints,
            identity=setup.device_keys[i],
            fallback="error",
            timeout=REQUEST_TIMEOUT_S,
            connect_timeout=5.0,
            retries=len(endpoints) - 1,  # a request may try every server once
        )
        client.pool.router = ROUTERS[policy](urls, rng=random.Random(seed * 10_000 + i))
        clients.append(client)
    victim = len(servers) - 1
    events: dict[str, float] = {}
    cpu: dict[str, float] = {}
    records: list[_Request] = []
    lags: list[float] = []
    ticks: list[tuple[int, int]] = []

    async def kill_and_restart(t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + kill_at_s - time.monotonic()))
        old = servers[victim]
        cpu["victim_before"] = old.cpu_s() - cpu["victim0"]
        events["kill"] = time.monotonic()
        await asyncio.to_thread(old.kill)
        await asyncio.sleep(max(0.0, events["kill"] + restart_gap_s - time.monotonic()))
        events["restart"] = time.monotonic()
        new = await asyncio.to_thread(
            _start_server,
            setup.bundle,
            setup.keys[victim],
            fraction=setup.speeds[victim],
            cpus=setup.server_cpus,
            port=old.server.port,
        )
        servers[victim] = new
        events["ready"] = new.ready_at
        cpu["victim_after0"] = new.cpu_s()

    async def run() -> None:
        try:
            await _connect_all(clients)
            await _closed_loop(
                clients,
                setup.inputs,
                setup.references,
                until=time.monotonic() + warmup_s,
                records=None,
            )
            stop_lag = asyncio.Event()
            lag = asyncio.create_task(_lag_probe(lags, stop_lag))
            for i, s in enumerate(servers):
                cpu[f"s{i}"] = s.cpu_s()
            cpu["victim0"] = cpu[f"s{victim}"]
            events["t0"] = t0 = time.monotonic()
            cpu["device0"] = time.process_time()
            ticks.append(machine_ticks())
            controller = asyncio.create_task(kill_and_restart(t0))
            await _closed_loop(
                clients, setup.inputs, setup.references, until=t0 + duration_s, records=records
            )
            events["end"] = time.monotonic()
            cpu["device"] = time.process_time() - cpu["device0"]
            ticks.append(machine_ticks())
            for i, s in enumerate(servers[:victim]):
                cpu[f"s{i}"] = s.cpu_s() - cpu[f"s{i}"]
            stop_lag.set()
            await asyncio.wait_for(lag, 5.0)
            await asyncio.wait_for(controller, 90.0)  # the restart may end after the window
            cpu["victim_after"] = servers[victim].cpu_s() - cpu["victim_after0"]
        finally:
            await _close_all(clients)

    asyncio.run(run())
    t0 = events["t0"]
    window_end = t0 + duration_s

    def rel(t: float) -> float:
        return round(t - t0, 3)

    answered = [r for r in records if r.outcome in ("ok", "wrong")]
    ok_ms = [r.ms for r in answered]
    errors = collections.Counter(r.outcome for r in records if r.outcome not in ("ok", "wrong"))
    wrong = sum(r.outcome == "wrong" for r in records)
    victim_url = urls[victim]
    after = [r for r in answered if r.server == victim_url and r.end >= events["ready"]]
    first_answer = min((r.end for r in after), default=None)
    first_sent = min((r.start for r in after), default=None)
    in_window = sum(r.end <= window_end for r in answered)
    throughput = in_window / duration_s
    down_s = max(0.0, events["ready"] - events["kill"])
    up = [1.0] * (len(servers) - 1) + [max(0.0, 1.0 - down_s / duration_s)]
    available = sum(c * u for c, u in zip(capacities, up, strict=True))
    by_server = collections.Counter(names.get(r.server, r.server) for r in answered)
    wall = events["end"] - t0
    busy = _server_busy(setup, cpu, events)
    half_share = _half_share_after(answered, victim_url, events, window_end, bin_s)
    timeline = _timeline(records, t0, bin_s, names)
    before_kill = [r.ms for r in answered if r.start < events["kill"]]
    after_kill = [r.ms for r in answered if r.start >= events["kill"]]
    return PolicyRun(
        policy=policy,
        issued=len(records),
        answered=len(answered),
        throughput_req_s=round(throughput, 2),
        ratio_to_capacity=round(throughput / sum(capacities), 3),
        ratio_to_available=round(throughput / available, 3) if available else math.nan,
        available_capacity_req_s=round(available, 2),
        p50_ms=_pct(ok_ms, 50),
        p99_ms=_pct(ok_ms, 99),
        max_ms=round(max(ok_ms), 2) if ok_ms else math.nan,
        p99_before_kill_ms=_pct(before_kill, 99),
        p99_after_kill_ms=_pct(after_kill, 99),
        errors=sum(errors.values()),
        error_kinds=dict(errors),
        wrong_answers=wrong,
        failovers=sum(r.attempts > 1 for r in answered),
        by_server={n: by_server.get(n, 0) for n in setup.names},
        kill_s=rel(events["kill"]),
        restart_s=rel(events["restart"]),
        ready_s=rel(events["ready"]),
        first_answer_after_ready_s=(
            round(first_answer - events["ready"], 3) if first_answer is not None else None
        ),
        first_sent_after_ready_s=(
            round(first_sent - events["ready"], 3) if first_sent is not None else None
        ),
        half_share_after_ready_s=half_share,
        device_cores=round(cpu["device"] / wall, 3),
        machine_busy_cores=busy_cores(ticks[0], ticks[1]),
        loop_lag_p99_ms=_pct(lags, 99),
        server_busy=busy,
        timeline=timeline,
    )


def _server_busy(
    setup: _Setup, cpu: Mapping[str, float], events: Mapping[str, float]
) -> dict[str, float]:
    """CPU used / CPU quota per server while it was up (the victim: before the kill and
    after its restart was ready)."""
    t0, victim = events["t0"], len(setup.speeds) - 1
    wall = events["end"] - t0
    busy: dict[str, float] = {}
    for i in range(victim):
        busy[setup.names[i]] = round(cpu[f"s{i}"] / (setup.speeds[i] * wall), 3)
    if events["ready"] < events["end"]:  # else its CPU after the restart is start-up only
        victim_cpu = cpu["victim_before"] + cpu["victim_after"]
        victim_up = (events["kill"] - t0) + (events["end"] - events["ready"])
    else:
        victim_cpu, victim_up = cpu["victim_before"], events["kill"] - t0
    busy[setup.names[victim]] = round(victim_cpu / (setup.speeds[victim] * victim_up), 3)
    return busy


def _half_share_after(
    answered: Sequence[_Request],
    victim_url: str,
    events: Mapping[str, float],
    window_end: float,
    bin_s: float,
) -> float | None:
    """Seconds from the restart being ready to the end of the first bin in which the restarted
    server answered at least half as fast as before the kill (None: never in the window)."""
    before = sum(r.server == victim_url and r.end < events["kill"] for r in answered)
    before_rate = before / max(1e-9, events["kill"] - events["t0"])
    step = events["ready"]
    while step + bin_s <= window_end:
        count = sum(r.server == victim_url and step <= r.end < step + bin_s for r in answered)
        if count / bin_s >= 0.5 * before_rate > 0:
            return round(step + bin_s - events["ready"], 3)
        step += bin_s
    return None


def _timeline(
    records: Sequence[_Request], t0: float, bin_s: float, names: Mapping[str, str]
) -> tuple[TimeBin, ...]:
    """Requests completed per ``bin_s`` from ``t0``: counts, latency, answers per server."""
    nbins = math.ceil((max(r.end for r in records) - t0) / bin_s) if records else 0
    bins = []
    for b in range(nbins):
        lo, hi = t0 + b * bin_s, t0 + (b + 1) * bin_s
        inside = [r for r in records if lo <= r.end < hi]
        answered = [r for r in inside if r.outcome in ("ok", "wrong")]
        lat = [r.ms for r in answered]
        bins.append(
            TimeBin(
                t_s=round(b * bin_s, 3),
                requests=len(lat),
                errors=len(inside) - len(lat),
                p50_ms=_pct(lat, 50) if lat else None,
                p99_ms=_pct(lat, 99) if lat else None,
                max_ms=round(max(lat), 2) if lat else None,
                by_server=dict(
                    collections.Counter(names.get(r.server, r.server) for r in answered)
                ),
            )
        )
    return tuple(bins)


def fleet_benchmark(
    model: Any = "zoo:mobilenetv2",
    *,
    cut: str | None = None,
    devices: int = 32,
    policies: Sequence[str] = POLICIES,
    duration_s: float = 36.0,
    warmup_s: float = 2.0,
    kill_at: float = 0.5,
    restart_gap_s: float | None = None,
    speeds: Sequence[float] = DEFAULT_SPEEDS,
    capacity_clients: int | None = None,
    capacity_s: float = 8.0,
    server_cpus: Sequence[int] | None = None,
    bin_s: float | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> FleetResult:
    """Throughput, latency, errors and recovery of a fleet per routing policy.

    Args:
        model: an ONNX ModelProto, a path, or ``zoo:NAME``.
        cut: cut id or node/tensor name; default: the first single-tensor cut after ~10% of
            the nodes (most of the compute on the servers).
        devices: concurrent devices (closed loop, one request in flight each).
        policies: among :data:`POLICIES`, run in this order.
        duration_s: the measured window of each policy (after ``warmup_s`` unmeasured).
        kill_at: when the last server is SIGKILLed, as a fraction of the window.
        restart_gap_s: seconds from the kill to the restart (default: a sixth of the window);
            the restarted server then needs its own start-up time, at its own speed.
        speeds: fraction of one core per server; the last one is killed and restarted.
        capacity_clients, capacity_s: the direct-capacity measurement of each server alone
            (default: ``devices`` clients, the concurrency of the policy runs).
        server_cpus: the CPUs of the servers (default: the last one); the devices (this
            process) get the others.
        bin_s: width of the latency-over-time bins (default: about 1/72 of the window).
        progress: called with a line saying what runs now.
    """
    from edgeoffload.split.analysis import Analysis  # needs onnx (heavy)
    from edgeoffload.split.models import resolve_model
    from edgeoffload.split.splitter import split_model  # needs onnx (heavy)

    policies = parse_policies(policies)
    speeds = tuple(float(s) for s in speeds)
    if len(speeds) < 2 or devices < 1 or duration_s <= 0 or not 0 < kill_at < 1:
        raise UsageError("give two or more server speeds, devices >= 1, a positive duration")
    gap = duration_s / 6 if restart_gap_s is None else restart_gap_s
    capacity_clients = devices if capacity_clients is None else capacity_clients
    bin_s = bin_s or max(0.1, round(duration_s / 72, 2))
    available_cpus = os.sched_getaffinity(0)
    pinned = sorted(server_cpus) if server_cpus else [max(available_cpus)]
    device_cpus = sorted(available_cpus - set(pinned))
    if not set(pinned) <= available_cpus or not device_cpus:
        raise UsageError(
            f"server_cpus {pinned} must be a proper subset of this process's CPUs "
            f"({sorted(available_cpus)}), leaving one for the devices"
        )
    begun = time.monotonic()
    note = progress or (lambda what: None)
    notes: list[str] = []
    method = cpu_limit_method()
    if method == "none":
        notes.append(
            "NO CPU cgroup: the servers ran unthrottled (threads-only), so their speeds are "
            "not what 'speeds' says; only CPU pinning (taskset) applied"
        )
    if sum(speeds) > len(pinned):
        notes.append(
            f"the speeds add up to {sum(speeds):g} cores on {len(pinned)} server CPU(s): the "
            "servers slow each other down, so the sum of capacities measured alone overstates "
            "the fleet"
        )
    if (os.cpu_count() or 1) <= 2:
        notes.append(
            f"{os.cpu_count()} CPUs: all servers share CPU(s) {pinned} (each held to its "
            f"quota), the {devices} devices share CPU(s) {device_cpus} in one process"
        )

    label = model if isinstance(model, str) else None
    if isinstance(model, str):
        model = resolve_model(model)
    note("analysing and splitting the model")
    analysis = Analysis.of(model)
    chosen = (
        analysis.graph.find_cut(cut, analysis.cuts) if cut else default_cut(analysis, HEAD_FRACTION)
    )
    names = [chr(ord("A") + i) for i in range(len(speeds))]
    with tempfile.TemporaryDirectory(prefix="edgeoffload-fleet-") as tmp:
        root = Path(tmp)
        bundle = split_model(analysis, chosen, root / "bundle", codec="none")
        inputs = [analysis.graph.sample_inputs(seed=s) for s in range(SAMPLES)]
        local = DeviceRuntime(bundle)
        references = [local.run_local(x) for x in inputs]
        first = ThrowawayKeys.create(
            root / "keys", devices=[f"device-{i}" for i in range(max(devices, capacity_clients))]
        )
        keys = [first, *(first.another_server(f"server-{n}") for n in names[1:])]
        setup = _Setup(
            bundle=bundle.path,
            keys=keys,
            device_keys=list(first.devices.values()),
            inputs=inputs,
            references=references,
            speeds=speeds,
            server_cpus=pinned,
            names=names,
        )
        pin_threads(os.getpid(), set(device_cpus))
        servers: list[_Server] = []
        try:
            note(f"starting {len(speeds)} servers at {', '.join(f'{s:g}' for s in speeds)} core")
            servers.extend(_start_all(bundle.path, keys, speeds, cpus=pinned))
            infos = []
            capacities = []
            for i, server in enumerate(servers):
                note(f"direct capacity of server {names[i]} alone")
                info = _measure_capacity(
                    setup, i, server, clients=capacity_clients, seconds=capacity_s
                )
                capacities.append(info.capacity_req_s)
                infos.append(info)
            runs = []
            for policy in policies:
                note(f"policy {policy}: {devices} devices for {warmup_s:g} + {duration_s:g} s")
                runs.append(
                    _policy_run(
                        policy,
                        setup,
                        servers,
                        devices=devices,
                        duration_s=duration_s,
                        warmup_s=warmup_s,
                        kill_at_s=kill_at * duration_s,
                        restart_gap_s=gap,
                        bin_s=bin_s,
                        capacities=capacities,
                        seed=seed,
                    )
                )
                time.sleep(0.5)  # let the servers close the old connections
        finally:
            for server in servers:
                server.stop()
            pin_threads(os.getpid(), available_cpus)
    return FleetResult(
        model=label or analysis.source_name,
        cut=chosen.id,
        crossing_bytes=chosen.nbytes,
        codec="none",
        devices=devices,
        duration_s=duration_s,
        warmup_s=warmup_s,
        kill_at_s=round(kill_at * duration_s, 3),
        restart_gap_s=round(gap, 3),
        bin_s=bin_s,
        server_cpus=pinned,
        device_cpus=device_cpus,
        cpu_limit=method,
        max_inflight=MAX_INFLIGHT,
        servers=tuple(infos),
        capacity_sum_req_s=round(sum(capacities), 2),
        runs=tuple(runs),
        notes=tuple(notes),
        environment=environment(),
        elapsed_s=round(time.monotonic() - begun, 1),
    )


# -- text ----------------------------------------------------------------------------------------


def format_result(data: Mapping[str, Any]) -> list[str]:
    """The summary table of a result's JSON data (``FleetResult.to_dict()``)."""
    servers = ", ".join(
        f"{s['name']} {s['cpu_fraction']:g} core{' (killed)' if s['killed'] else ''}: "
        f"{s['capacity_req_s']:.1f} req/s"
        for s in data["servers"]
    )
    lines = [
        f"{data['model']} cut {data['cut']} ({data['crossing_bytes'] / 1024:.0f} KiB crossing, "
        f"codec {data['codec']}); {data['devices']} devices, {data['duration_s']:g} s per "
        f"policy after {data['warmup_s']:g} s warm-up; CPU limit {data['cpu_limit']}, servers "
        f"on CPU {data['server_cpus']}, devices on CPU {data['device_cpus']}",
        f"direct capacity alone: {servers}; sum {data['capacity_sum_req_s']:.1f} req/s",
        "",
        f"{'policy':<18} {'req/s':>6} {'x cap':>6} {'x avail':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} {'errors':>6} {'wrong':>5} {'failover':>8} {'back s':>6} {'half s':>6} "
        f"{'per server':<22} {'dev cores':>9}",
    ]
    for r in data["runs"]:
        back, half = r["first_answer_after_ready_s"], r["half_share_after_ready_s"]
        per = "/".join(str(v) for v in r["by_server"].values())
        lines.append(
            f"{r['policy']:<18} {r['throughput_req_s']:>6.1f} {r['ratio_to_capacity']:>6.2f} "
            f"{r['ratio_to_available']:>7.2f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} "
            f"{r['max_ms']:>7.1f} {r['errors']:>6} {r['wrong_answers']:>5} "
            f"{r['failovers']:>8} {'-' if back is None else f'{back:.2f}':>6} "
            f"{'-' if half is None else f'{half:.2f}':>6} {per:<22} "
            f"{r['device_cores']:>9.2f}"
        )
    if data["runs"]:
        r = data["runs"][0]
        lines.append(
            f"(kill at {r['kill_s']:.1f} s, restart at {r['restart_s']:.1f} s, ready at "
            f"{r['ready_s']:.1f} s in the first run; 'back s': restarted server's first answer "
            "after it was ready; 'half s': until it answered at half its pre-kill rate; 'x avail': "
            "against the capacities weighted by up time; per server: answers by A/B/C...)"
        )
    lines.append("")
    for t in data.get("targets", []):
        verdict = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
        lines.append(f"{verdict:<6} {t['name']}: {t['value']} (bound {t['bound']})")
    for n in data.get("notes", []):
        lines.append(f"note: {n}")
    return lines
