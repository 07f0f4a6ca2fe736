"""Server throughput under many concurrent devices (``benchmarks/server_throughput.py``).

One edge server (``edgeoffload serve`` in its own process, 127.0.0.1) hosts the tail of a
model cut early, so the tail carries most of the compute. This process then plays C devices
at once (C asyncio :class:`~edgeoffload.device.client.OffloadClient` objects, each with its own
key, connection and head session), each sending a bounded number of sequential requests.

The baseline is the tail's onnxruntime session called directly from a thread pool as wide as
the server's worker pool, on the same crossing tensors, in the same run and on the same cores:
right before and right after each row, for as many requests as the row, so that drift on a
shared machine hits both sides alike. Each row also records the CPU time the server and the
device process spent per request and how busy the whole machine was (other load included),
so a ratio can be explained, not only read: on a dedicated machine a saturated server reaches
about ``direct CPU per request / offload CPU per request``.

Everything is bounded: request counts are fixed, every await has a timeout, and no request is
issued once ``duration_cap_s`` has passed (the result then says ``capped``). Linux only (reads
``/proc``).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeoffload._ort import make_session, run
from edgeoffload.device.client import OffloadClient
from edgeoffload.errors import EdgeOffloadError, UsageError
from edgeoffload.lab.demo import max_abs_error
from edgeoffload.lab.harness import ServerProcess, ThrowawayKeys, spawn_server
from edgeoffload.lab.procfs import (
    busy_cores,
    cpu_seconds,
    machine_ticks,
    pin_threads,
    rss_kib,
    status_kib,
)
from edgeoffload.lab.stats import Environment, Record, environment, interleaved_ms, percentile

Progress = Callable[[str, float], None]

DEFAULT_CLIENTS: tuple[int, ...] = (1, 8, 32, 64)
MAX_INFLIGHT = 256  # 64 devices x 1 request in flight, with room: no "overloaded" by design
HEAD_FRACTION = 0.05  # default cut: the first single-tensor cut after ~5% of the nodes
REQUEST_TIMEOUT_S = 30.0
SAMPLES = 4  # distinct inputs, cycled through by every device and by the baseline
BASELINE_METHOD = (
    "tail session called directly from {workers} thread(s) on the same crossing tensors, right "
    "before and right after each row, for as many requests as the row (the faster of the two "
    "is the row's 'direct', which its ratio_to_direct uses); this summary is the median of the "
    "rows' direct runs"
)


def _pct(values: Sequence[float], q: float) -> float:
    return round(percentile(values, q), 3)


# -- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DirectRun(Record):
    """The tail session called directly by a thread pool: the baseline of one row."""

    requests: int
    wall_s: float
    req_s: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_request: float
    own_cores: float
    machine_busy_cores: float
    capped: bool


@dataclass(frozen=True)
class ThroughputRow(Record):
    """One concurrent-device count, with the direct baseline measured right before and after."""

    clients: int
    requests: int
    wall_s: float
    req_s: float
    ratio_to_direct: float
    p50_ms: float
    p99_ms: float
    server_p50_ms: float
    server_p99_ms: float
    errors: int
    error_kinds: dict[str, int]
    server_cpu_ms_per_request: float
    client_cpu_ms_per_request: float
    # What the CPU accounting predicts for a machine with no other load, once the server is
    # saturated: direct CPU per request over the CPU the offload path spends per request,
    # with the devices on the same cores, and with them elsewhere.
    cpu_ratio_shared_cores: float
    cpu_ratio_server_only: float
    # Cores kept busy by the server + this process, and by the whole machine (the rest is
    # other load on a shared machine, which the baseline may not have met).
    own_cores: float
    machine_busy_cores: float
    server_peak_rss_kib: int
    max_abs_error: float
    capped: bool
    direct_runs: tuple[DirectRun, DirectRun]  # right before, right after

    @property
    def direct(self) -> DirectRun:
        """The faster of the two adjacent direct runs (conservative: a dip caused by other
        load on the machine does not count)."""
        return max(self.direct_runs, key=lambda b: b.req_s)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        runs = data.pop("direct_runs")
        data["direct"] = {**self.direct.to_dict(), "runs": list(runs)}
        return data


@dataclass(frozen=True)
class ConnectionMemory(Record):
    """Server RSS growth per open connection (each completed one request)."""

    connections: int
    server_rss_before_kib: int
    server_rss_connected_kib: int
    kib_per_connection: float
    errors: dict[str, int]
    max_abs_error: float


@dataclass(frozen=True)
class ServerThroughputResult(Record):
    benchmark: str = field(default="server-throughput", init=False)
    model: str
    nodes: int
    cut: str
    cut_after: str
    crossing_bytes: int
    codec: str
    head_ms: float
    tail_ms: float
    tail_share: float | None
    workers: int
    threads: int
    max_inflight: int
    cpus: int | None
    server_cpus: list[int] | None
    device_cpus: list[int] | None
    requests_per_client: int
    server: str
    environment: Environment
    baseline: DirectRun | None  # the median (by req/s) of the rows' direct runs
    rows: tuple[ThroughputRow, ...]
    server_rss_idle_kib: int
    memory: ConnectionMemory | None
    duration_cap_s: float
    elapsed_s: float
    skipped_client_counts: tuple[int, ...]
    server_output_tail: tuple[str, ...]
    batch: int = 0  # the server's --batch (0: dynamic batching off)
    executor: str = "local"  # the server's --executor
    ray_replicas: int | None = None  # with executor "ray": --ray-replicas

    @property
    def capped(self) -> bool:
        return bool(self.skipped_client_counts) or any(r.capped for r in self.rows)

    @property
    def max_abs_error(self) -> float:
        memory = self.memory.max_abs_error if self.memory else 0.0
        return max([r.max_abs_error for r in self.rows] + [memory])

    def to_dict(self) -> dict[str, Any]:
        memory = self.memory.to_dict() if self.memory else {}
        method = BASELINE_METHOD.format(workers=self.workers)
        return {
            "benchmark": self.benchmark,
            "model": self.model,
            "nodes": self.nodes,
            "cut": self.cut,
            "cut_after": self.cut_after,
            "crossing_bytes": self.crossing_bytes,
            "codec": self.codec,
            "head_ms": self.head_ms,
            "tail_ms": self.tail_ms,
            "tail_share": self.tail_share,
            "workers": self.workers,
            "threads": self.threads,
            "max_inflight": self.max_inflight,
            "batch": self.batch,
            "cpus": self.cpus,
            "server_cpus": self.server_cpus,
            "device_cpus": self.device_cpus,
            "requests_per_client": self.requests_per_client,
            "server": self.server,
            "environment": self.environment.to_dict(),
            "baseline": {
                "method": method,
                **(self.baseline.to_dict() if self.baseline else {}),
            },
            "rows": [r.to_dict() for r in self.rows],
            "memory_per_connection_kib": memory.get("kib_per_connection"),
            "memory_per_connection_clients": memory.get("connections"),
            "memory": {"server_rss_idle_kib": self.server_rss_idle_kib, **memory},
            "max_abs_error": self.max_abs_error,
            "duration_cap_s": self.duration_cap_s,
            "elapsed_s": self.elapsed_s,
            "capped": self.capped,
            "skipped_client_counts": list(self.skipped_client_counts),
            "server_output_tail": list(self.server_output_tail),
        }


# -- pieces ------------------------------------------------------------------------------------


def default_cut(analysis: Any, fraction: float = HEAD_FRACTION) -> Any:
    """The first single-tensor cut whose head holds at least ``fraction`` of the nodes."""
    n = len(analysis.node_order)
    single = [c for c in analysis.cuts if 0 < c.index < n and len(c.tensors) == 1]
    if not single:
        raise UsageError(
            "the model has no single-tensor cut with work on both sides",
            hint="pass cut='c<N>' explicitly",
        )
    return next((c for c in single if c.index >= fraction * n), single[-1])


def direct_baseline(
    session: Any,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    workers: int,
    requests: int,
    deadline: float,
    cpus: set[int] | None = None,
) -> DirectRun:
    """The tail session called directly by ``workers`` threads, ``requests`` calls in all.

    Each thread runs calls back to back (a closed loop as wide as the server's pool); the
    latency of a call is its own ``session.run`` time. No call starts after ``deadline``
    (``time.monotonic()``). ``cpus``: pin the calling threads there (the server's cores).
    """
    names = [o.name for o in session.get_outputs()]
    inputs = [{i.name: feed[i.name] for i in session.get_inputs()} for feed in feeds]
    lock = threading.Lock()
    issued = iter(range(requests))
    latencies: list[float] = []

    def worker() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)  # this thread only
        while time.monotonic() < deadline:
            with lock:
                k = next(issued, None)
            if k is None:
                return
            start = time.perf_counter()
            session.run(names, inputs[k % len(inputs)])
            ms = (time.perf_counter() - start) * 1e3
            with lock:
                latencies.append(ms)

    for feed in inputs:  # warm-up outside the clock
        session.run(names, feed)
    cpu0, ticks0 = time.process_time(), machine_ticks()
    start = time.perf_counter()
    with ThreadPoolExecutor(workers, thread_name_prefix="direct-tail") as pool:
        futures = [pool.submit(worker) for _ in range(workers)]
        for future in futures:
            future.result(timeout=max(1.0, deadline - time.monotonic()) + REQUEST_TIMEOUT_S)
    wall = time.perf_counter() - start
    cpu, ticks1 = time.process_time() - cpu0, machine_ticks()
    done = len(latencies)
    return DirectRun(
        requests=done,
        wall_s=round(wall, 4),
        req_s=round(done / wall, 3) if wall > 0 else float("nan"),
        p50_ms=_pct(latencies, 50),
        p99_ms=_pct(latencies, 99),
        cpu_ms_per_request=round(cpu * 1e3 / done, 3) if done else float("nan"),
        own_cores=round(cpu / wall, 3) if wall > 0 else 0.0,
        machine_busy_cores=busy_cores(ticks0, ticks1),
        capped=done < requests,
    )


async def _bounded(awaitable: Any, timeout: float) -> Any:
    return await asyncio.wait_for(awaitable, max(0.1, timeout))


async def _close_all(clients: Sequence[OffloadClient]) -> None:
    await asyncio.gather(*(_bounded(c.close(), 10.0) for c in clients), return_exceptions=True)


async def _connect_and_run_once(
    clients: Sequence[OffloadClient],
    inputs: Sequence[Mapping[str, np.ndarray]],
    *,
    deadline: float,
    check: Callable[[int, Mapping[str, np.ndarray]], float],
    errors: collections.Counter[str],
) -> float:
    """Connect each client and complete one request on it, one device at a time (so that
    transient request buffers never pile up); returns the worst |output - reference|."""
    worst = 0.0
    for i, client in enumerate(clients):
        if time.monotonic() >= deadline:
            errors["not-connected-before-cap"] += 1
            continue
        try:
            outputs = await _bounded(client.run(inputs[i % len(inputs)]), REQUEST_TIMEOUT_S + 5)
            worst = max(worst, check(i % len(inputs), outputs))
        except (EdgeOffloadError, asyncio.TimeoutError) as exc:
            errors[type(exc).__name__] += 1
    return worst


async def _memory_per_connection(
    clients: Sequence[OffloadClient],
    inputs: Sequence[Mapping[str, np.ndarray]],
    *,
    server: ServerProcess,
    deadline: float,
    check: Callable[[int, Mapping[str, np.ndarray]], float],
) -> ConnectionMemory:
    """Server RSS growth per connection: open ``len(clients)`` connections that complete one
    request each, on a server warmed up beforehand (ORT arenas, allocator pools)."""
    errors: collections.Counter[str] = collections.Counter()
    await asyncio.sleep(0.2)  # let the server finish closing earlier connections
    before = rss_kib(server.pid)
    worst = await _connect_and_run_once(
        clients, inputs, deadline=deadline, check=check, errors=errors
    )
    await asyncio.sleep(0.1)
    after = rss_kib(server.pid)
    await _close_all(clients)
    return ConnectionMemory(
        connections=len(clients),
        server_rss_before_kib=before,
        server_rss_connected_kib=after,
        kib_per_connection=round((after - before) / len(clients), 2),
        errors=dict(errors),
        max_abs_error=worst,
    )


async def _row(
    clients: Sequence[OffloadClient],
    inputs: Sequence[Mapping[str, np.ndarray]],
    *,
    requests_per_client: int,
    server: ServerProcess,
    deadline: float,
    check: Callable[[int, Mapping[str, np.ndarray]], float],
    direct: Callable[[int], DirectRun],
) -> ThroughputRow:
    """One client count: connect + one request each (untimed), the direct baseline for the
    same number of requests (right before, so that drift on a shared machine hits both
    alike), then the timed run, then the direct baseline again."""
    count = len(clients)
    errors: collections.Counter[str] = collections.Counter()
    worst = await _connect_and_run_once(
        clients, inputs, deadline=deadline, check=check, errors=errors
    )
    before = await asyncio.to_thread(direct, count * requests_per_client)

    totals: list[float] = []
    server_ms: list[float] = []
    start_gate = asyncio.Event()

    async def device(i: int) -> None:
        client = clients[i]
        await start_gate.wait()
        for k in range(requests_per_client):
            if time.monotonic() >= deadline:
                return
            try:
                await _bounded(client.run(inputs[(i + k) % len(inputs)]), REQUEST_TIMEOUT_S + 5)
            except (EdgeOffloadError, asyncio.TimeoutError) as exc:
                errors[type(exc).__name__] += 1
                continue
            timing = client.last_timing
            assert timing is not None
            if not timing.offloaded or timing.attempts != 1:
                errors["not-offloaded-first-try"] += 1
            totals.append(timing.total_ms)
            server_ms.append(timing.server_ms)

    tasks = [asyncio.create_task(device(i)) for i in range(count)]
    server_cpu0, client_cpu0 = cpu_seconds(server.pid), time.process_time()
    ticks0 = machine_ticks()
    started = time.perf_counter()
    start_gate.set()
    budget = max(0.0, deadline - time.monotonic()) + REQUEST_TIMEOUT_S + 10
    _, pending = await asyncio.wait(tasks, timeout=budget)
    wall = time.perf_counter() - started
    server_cpu = cpu_seconds(server.pid) - server_cpu0
    client_cpu = time.process_time() - client_cpu0
    ticks1 = machine_ticks()
    for task in pending:
        task.cancel()
        errors["unfinished"] += 1
    peak_rss = status_kib(server.pid, "VmHWM")
    await _close_all(clients)
    after = await asyncio.to_thread(direct, count * requests_per_client)
    baseline = max(before, after, key=lambda b: b.req_s)

    done = len(totals)
    req_s = round(done / wall, 3) if wall > 0 and done else 0.0
    server_cpu_ms = server_cpu * 1e3 / done if done else math.nan
    client_cpu_ms = client_cpu * 1e3 / done if done else math.nan
    direct_cpu_ms = baseline.cpu_ms_per_request
    return ThroughputRow(
        clients=count,
        requests=done,
        wall_s=round(wall, 4),
        req_s=req_s,
        ratio_to_direct=round(req_s / baseline.req_s, 4) if baseline.req_s else math.nan,
        p50_ms=_pct(totals, 50),
        p99_ms=_pct(totals, 99),
        server_p50_ms=_pct(server_ms, 50),
        server_p99_ms=_pct(server_ms, 99),
        errors=sum(errors.values()),
        error_kinds=dict(errors),
        server_cpu_ms_per_request=round(server_cpu_ms, 3),
        client_cpu_ms_per_request=round(client_cpu_ms, 3),
        cpu_ratio_shared_cores=round(direct_cpu_ms / (server_cpu_ms + client_cpu_ms), 4),
        cpu_ratio_server_only=round(direct_cpu_ms / server_cpu_ms, 4),
        own_cores=round((server_cpu + client_cpu) / wall, 3) if wall > 0 else 0.0,
        machine_busy_cores=busy_cores(ticks0, ticks1),
        server_peak_rss_kib=peak_rss,
        max_abs_error=worst,
        capped=done < count * requests_per_client,
        direct_runs=(before, after),
    )


# -- the benchmark -----------------------------------------------------------------------------


def server_throughput(
    model: Any = "zoo:mobilenetv2",
    *,
    cut: str | None = None,
    clients: tuple[int, ...] = DEFAULT_CLIENTS,
    requests_per_client: int = 10,
    workers: int = 0,
    threads: int = 1,
    duration_cap_s: float = 120.0,
    server_cpus: Sequence[int] | None = None,
    batch: int = 0,
    executor: str = "local",
    ray_replicas: int = 2,
    ray_cpus_per_replica: float = 1.0,
    progress: Progress | None = None,
) -> ServerThroughputResult:
    """Requests/s and latency of one edge server under 1..N concurrent devices.

    Args:
        model: an ONNX ModelProto, a path, or ``zoo:NAME`` (see
            :func:`edgeoffload.split.models.resolve_model`).
        cut: cut id or node/tensor name; default: the first single-tensor cut after ~5% of the
            nodes, so that the tail (on the server) carries most of the compute.
        clients: concurrent device counts, one row each.
        requests_per_client: sequential requests each device sends in a row.
        workers: server tail workers (and baseline threads); 0 = CPU count.
        threads: intra-op threads per tail run (server and baseline alike).
        duration_cap_s: no request is issued after this many seconds from the start.
        server_cpus: pin the server (and the direct baseline) to these CPUs and the devices
            (this process) to the others, so that the devices' own work (head, encryption)
            does not compete with the server; default: no pinning, everyone shares the cores.
        batch: the server's ``--batch`` (dynamic batching of up to this many rows; 0: off).
        executor: the server's ``--executor``: ``"local"`` or ``"ray"`` (a Ray started inside
            the server with ``ray_replicas`` replicas of ``ray_cpus_per_replica`` CPUs; run
            the benchmark in a network namespace of its own, see benchmarks/README.md). The
            server's CPU figures then leave out Ray's processes, where the tails run.
        progress: ``(what, fraction)`` callback.
    """
    from edgeoffload.split.analysis import Analysis  # needs onnx (heavy)
    from edgeoffload.split.models import resolve_model
    from edgeoffload.split.splitter import split_model  # needs onnx (heavy)

    if not clients or min(clients) < 1 or requests_per_client < 1:
        raise UsageError("clients must be positive counts and requests_per_client >= 1")
    if executor not in ("local", "ray"):
        raise UsageError(f"executor {executor!r}: use 'local' or 'ray'")
    begun = time.monotonic()
    deadline = begun + duration_cap_s
    available = os.sched_getaffinity(0)
    pinned = set(server_cpus) if server_cpus else None
    device_cpus = available - pinned if pinned else None
    if pinned is not None and (not pinned <= available or not device_cpus):
        raise UsageError(
            f"server_cpus {sorted(pinned)} must be a proper subset of the CPUs this process may "
            f"use ({sorted(available)}), leaving at least one for the devices"
        )
    workers = workers or (len(pinned) if pinned else os.cpu_count() or 1)

    def note(what: str, fraction: float) -> None:
        if progress is not None:
            progress(what, fraction)

    label = model if isinstance(model, str) else None
    if isinstance(model, str):
        model = resolve_model(model)
    note("analysing the model", 0.0)
    analysis = Analysis.of(model)
    n = len(analysis.node_order)
    chosen = analysis.graph.find_cut(cut, analysis.cuts) if cut else default_cut(analysis)

    with tempfile.TemporaryDirectory(prefix="edgeoffload-loadtest-") as tmp:
        root = Path(tmp)
        note(f"splitting at {chosen.id}", 0.05)
        bundle = split_model(analysis, chosen, root / "bundle", codec="none")
        head = make_session(bundle.head_path, threads=threads) if bundle.head_path else None
        tail = make_session(bundle.tail_path, threads=threads)
        inputs = [analysis.graph.sample_inputs(seed=s) for s in range(SAMPLES)]
        crossings = []
        for sample in inputs:
            crossing = run(head, sample) if head is not None else {}
            crossing.update({k: sample[k] for k in bundle.manifest.passthrough})
            crossings.append(crossing)
        references = [run(tail, c) for c in crossings]
        head_ms, tail_ms = (
            interleaved_ms(
                [
                    functools.partial(run, head, inputs[0]),
                    functools.partial(run, tail, crossings[0]),
                ],
                runs=10,
            )
            if head is not None
            else (0.0, float("nan"))
        )

        def check(k: int, outputs: Mapping[str, np.ndarray]) -> float:
            return max_abs_error(outputs, references[k])

        def direct(requests: int) -> DirectRun:
            return direct_baseline(
                tail, crossings, workers=workers, requests=requests, deadline=deadline, cpus=pinned
            )

        keys = ThrowawayKeys.create(
            root / "keys", devices=[f"device-{i}" for i in range(max(clients))]
        )
        note("starting the edge server", 0.15)
        on_ray = [
            *("--executor", "ray", "--ray-replicas", str(ray_replicas)),
            *("--ray-cpus-per-replica", str(ray_cpus_per_replica)),
        ]
        server = spawn_server(
            [bundle.path],
            keys,
            threads=threads,
            workers=workers,
            cpus=pinned,
            extra_args=[
                *("--max-inflight", str(MAX_INFLIGHT), "--batch", str(batch)),
                *(on_ray if executor == "ray" else []),
            ],
            # Starting a Ray and deploying the replicas takes seconds on a busy machine.
            timeout=180.0 if executor == "ray" else 30.0,
        )
        rows: list[ThroughputRow] = []
        memory: list[ConnectionMemory] = []
        skipped: list[int] = []
        try:
            if device_cpus is not None:
                pin_threads(os.getpid(), device_cpus)
            rss_idle = rss_kib(server.pid)
            pool = [
                OffloadClient(
                    bundle,
                    server=server.url,
                    server_key=keys.server.public,
                    identity=device,
                    fallback="error",
                    timeout=REQUEST_TIMEOUT_S,
                    connect_timeout=10.0,
                    retries=0,  # a retried request would hide an error
                    threads=threads,
                )
                for device in keys.devices.values()
            ]

            async def rows_in_loop() -> None:
                # Warm the server up first (ORT arenas for concurrent runs, allocator pools),
                # so that no row's memory or latency pays for first-run allocations.
                # One connection carries the warm-up (2 x workers requests in flight, twice),
                # so that little freed connection memory is there to be reused below.
                for _ in range(2):
                    await asyncio.gather(
                        *(
                            _bounded(pool[0].run(inputs[k % len(inputs)]), REQUEST_TIMEOUT_S + 5)
                            for k in range(2 * workers)
                        )
                    )
                await _close_all(pool[:1])
                note(f"memory with {max(clients)} connections", 0.18)
                memory.append(
                    await _memory_per_connection(
                        pool, inputs, server=server, deadline=deadline, check=check
                    )
                )
                for i, count in enumerate(clients):
                    if time.monotonic() >= deadline:
                        skipped.append(count)
                        continue
                    note(f"{count} concurrent device(s)", 0.2 + 0.7 * i / len(clients))
                    rows.append(
                        await _row(
                            pool[:count],
                            inputs,
                            requests_per_client=requests_per_client,
                            server=server,
                            deadline=deadline,
                            check=check,
                            direct=direct,
                        )
                    )
                await _close_all(pool)

            asyncio.run(rows_in_loop())
        finally:
            server.stop()
            if pinned is not None:
                pin_threads(os.getpid(), available)
        server_output = server.output_tail(3)

    # The summary baseline: the median (by req/s) of the rows' direct runs, robust to a dip.
    directs = sorted((r.direct for r in rows), key=lambda b: b.req_s)
    note("done", 1.0)
    return ServerThroughputResult(
        model=label or analysis.source_name,
        nodes=n,
        cut=chosen.id,
        cut_after=chosen.after,
        crossing_bytes=chosen.nbytes,
        codec="none",
        head_ms=round(head_ms, 3),
        tail_ms=round(tail_ms, 3),
        tail_share=round(tail_ms / (head_ms + tail_ms), 4) if head_ms + tail_ms > 0 else None,
        workers=workers,
        threads=threads,
        max_inflight=MAX_INFLIGHT,
        batch=batch,
        executor=executor,
        ray_replicas=ray_replicas if executor == "ray" else None,
        cpus=os.cpu_count(),
        server_cpus=sorted(pinned) if pinned else None,
        device_cpus=sorted(device_cpus) if device_cpus else None,
        requests_per_client=requests_per_client,
        server="separate process (edgeoffload serve), 127.0.0.1; devices: asyncio "
        "OffloadClients in one client process on the same machine"
        + (
            f"; tails on {ray_replicas} Ray Serve replica(s) started by the server "
            "(their CPU is not in the server's figures)"
            if executor == "ray"
            else ""
        ),
        environment=environment(),
        baseline=directs[len(directs) // 2] if directs else None,
        rows=tuple(rows),
        server_rss_idle_kib=rss_idle,
        memory=memory[0] if memory else None,
        duration_cap_s=duration_cap_s,
        elapsed_s=round(time.monotonic() - begun, 2),
        skipped_client_counts=tuple(skipped),
        server_output_tail=tuple(server_output),
    )
