"""The standing attack suite, long form (``edgeoffload bench attack``, ``benchmarks/attack.py``).

One ``edgeoffload serve`` process (pinned to the last CPU, one worker) hosts a zoo model cut
early, codec none. For every case an attacker process (pinned to the other CPUs, at nice 10 so
that its own CPU use does not slow the honest device's event loop more than the server does)
attacks it while one honest device sends requests one after another from this process; every
honest answer is compared bit for bit with the device running head and tail itself. Reported
per case: what the server did (as the attacker saw it), the honest device's success rate and
p50/p99, and the server's RSS before, at its peak (sampled every 50 ms) and after.

Cases (:data:`CASES`):

* ``baseline``: no attack — the honest device's unloaded p99 that the others are held to;
* ``hog``: an allow-listed device keeps 32 requests in flight and resends at once on every
  answer (no back-off), tensors that decode to a full tail's work;
* ``unauth-frames``: 1000 connections finish the websocket upgrade and each starts a binary
  frame announcing 1 MiB, sends 16 KiB of it, and holds (from 8 loopback source addresses);
* ``handshake-flood``: 16 workers each open a connection and send a valid hello of a key that
  is not allow-listed (it knows the server's key, so the server does the Diffie-Hellman), in a
  loop, all from one source address;
* ``garbage-flood``: 16 workers send random bytes as the first message, in a loop;
* ``revocation``: not a load: for each of (clean edit, malformed line, file deleted, same size
  and mtime rewrite) a device with an open connection is removed from the allow-list; reported:
  seconds until its connection is closed, and whether a new handshake is refused;
* ``devices-64``: 64 devices, each with its own key, send ``requests`` requests each in a
  closed loop to a server hosting a *light* model (a MobileNetV2 at 32x32, width 0.35: the
  server's per-request overhead, not its tail, is the limit) — more devices than the server
  admits at once, so some requests are refused ``overloaded`` and retried after the
  retry-after (reported; a retry that succeeds inside the timeout counts as a success);
* ``soak``: 16 devices, 100k requests in all to the light model; the server's RSS is sampled
  at every tenth of the requests (flat means the last sample is within a few MiB of the first);
* ``sigkill``: the server is SIGKILLed 100 times, each time 0.1-0.5 s after 4 devices
  (fallback ``local``) started sending requests, and restarted on its port; every answer,
  offloaded or run on the device, must be bit-exact and none may take longer than the
  device's timeout plus 5 s (a hang).

Every await is bounded; Linux only (``/proc``, ``taskset``).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import random
import shutil
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeoffload.errors import UsageError
from edgeoffload.lab.stats import Environment, Record, environment, percentile

Progress = Callable[[str], None]

CASES: tuple[str, ...] = (
    "baseline",
    "hog",
    "unauth-frames",
    "handshake-flood",
    "garbage-flood",
    "revocation",
    "devices-64",
    "soak",
    "sigkill",
)
LOAD_DEVICES = 64  # the devices-64 case
SOAK_DEVICES = 16
SOAK_REQUESTS = 100_000
KILLS = 100  # the sigkill case
KILL_CLIENTS = 4
REVOCATIONS: tuple[str, ...] = ("clean edit", "malformed line", "file deleted", "same size+mtime")
STEP_S = 5.0  # bound on one network step


@dataclass
class CaseResult(Record):
    case: str
    server_action: str  # what the attacker saw the server do
    attacker: dict[str, int] = field(default_factory=dict)
    honest_ok: int = 0
    honest_total: int = 0
    honest_retries: int = 0  # retries after "overloaded" inside the timeout (counted as ok)
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    rss_before_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_after_mib: float = 0.0
    revocations: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # per-case figures (load cases)

    @property
    def success(self) -> float:
        return self.honest_ok / self.honest_total if self.honest_total else float("nan")


@dataclass
class AttackResult(Record):
    model: str
    cut: str
    duration_s: float
    cases: list[CaseResult]
    environment: Environment
    notes: list[str] = field(default_factory=list)


# -- the attacker process ------------------------------------------------------------------------


def _attacker_main(case: str, url: str, args: dict[str, Any], out: Any) -> None:
    """Entry point of the attacker process: run ``case`` for ``args['duration_s']``."""
    with contextlib.suppress(OSError):
        os.nice(10)
    counts: Counter[str] = Counter()
    try:
        asyncio.run(_ATTACKS[case](url, args, counts))
    except Exception as exc:  # reported, not raised: the parent decides
        counts[f"attacker_error:{type(exc).__name__}"] += 1
    out.put(dict(counts))


def _started(identity: Any, args: dict[str, Any]) -> Any:
    """A ClientConnection of ``identity`` for the attacked bundle, its hello queued."""
    from edgeoffload.protocol.connection import ClientConnection

    conn = ClientConnection(
        static=identity,
        server_public=bytes.fromhex(args["server_public"]),
        bundle=args["identity"],
        version=args["version"],
        time_ns=time.time_ns(),
    )
    conn.start()
    return conn


async def _hog(url: str, args: dict[str, Any], counts: Counter[str]) -> None:
    from websockets.asyncio.client import connect

    from edgeoffload.keys import load_identity
    from edgeoffload.protocol.events import ErrorReply, RunResult

    conn = _started(load_identity(Path(args["key_dir"])), args)
    tensors = args["tensors"]
    deadline = time.monotonic() + args["duration_s"]
    async with connect(url, compression=None, max_size=1 << 26, proxy=None) as ws:
        for data in conn.data_to_send():
            await ws.send(data)
        conn.receive(await _recv_bytes(ws))
        next_id = 0
        for _ in range(32):
            next_id += 1
            conn.send_run(next_id, tensors)
        for data in conn.data_to_send():
            await ws.send(data)
        while time.monotonic() < deadline:
            for event in conn.receive(await _recv_bytes(ws)):
                if isinstance(event, RunResult):
                    counts["served"] += 1
                elif isinstance(event, ErrorReply):
                    counts[f"refused:{event.code}"] += 1
                next_id += 1
                conn.send_run(next_id, tensors)
            for data in conn.data_to_send():
                await ws.send(data)


async def _recv_bytes(ws: Any) -> bytes:
    data = await asyncio.wait_for(ws.recv(), STEP_S)
    if not isinstance(data, bytes):
        raise UsageError("the server sent text")
    return data


async def _unauth_frames(url: str, args: dict[str, Any], counts: Counter[str]) -> None:
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    upgrade = (
        f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    # A masked binary frame announcing 1 MiB (64-bit length), then 16 KiB of it.
    header = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 1 << 20) + b"\x01\x02\x03\x04"
    chunk = header + os.urandom(16 << 10)

    async def one(i: int) -> None:
        source = f"127.0.0.{2 + i % 8}"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, int(port), local_addr=(source, 0)), STEP_S
            )
        except (OSError, asyncio.TimeoutError) as exc:
            counts[f"refused_at_connect:{type(exc).__name__}"] += 1
            return
        try:
            writer.write(upgrade)
            status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP_S)
            if b" 101 " not in status.split(b"\r\n", 1)[0]:
                counts["refused_upgrade"] += 1
                writer.close()
                return
            writer.write(chunk)
            await writer.drain()
            held.append((reader, writer))
            counts["frames_started"] += 1
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            counts["dropped_during_upgrade"] += 1
            writer.close()

    for start in range(0, args["connections"], 50):  # in waves: the accept backlog is finite
        await asyncio.gather(*(one(i) for i in range(start, min(start + 50, args["connections"]))))
    await asyncio.sleep(args["duration_s"])
    still_open = await asyncio.gather(*(_open(reader) for reader, _ in held))
    counts["still_open_at_end"] = sum(still_open)
    for _, writer in held:
        writer.close()


async def _open(reader: asyncio.StreamReader) -> bool:
    """Whether the server still holds this connection (it has not closed it on us)."""
    try:
        while True:
            if not await asyncio.wait_for(reader.read(65536), 0.2):
                return False  # EOF: the server closed it
    except asyncio.TimeoutError:
        return True
    except OSError:
        return False


async def _handshake_flood(url: str, args: dict[str, Any], counts: Counter[str]) -> None:
    await _flood(url, args, counts, garbage=False)


async def _garbage_flood(url: str, args: dict[str, Any], counts: Counter[str]) -> None:
    await _flood(url, args, counts, garbage=True)


async def _flood(url: str, args: dict[str, Any], counts: Counter[str], *, garbage: bool) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidMessage

    from edgeoffload.keys import KeyPair

    stranger = KeyPair.from_private(os.urandom(32))
    rng = random.Random(0)
    deadline = time.monotonic() + args["duration_s"]

    async def worker() -> None:
        while time.monotonic() < deadline:
            first: bytes | bytearray
            if garbage:
                first = rng.randbytes(rng.randint(16, 4000))
            else:
                (first,) = _started(stranger, args).data_to_send()
            try:
                async with connect(
                    url, proxy=None, open_timeout=STEP_S, local_addr=("127.0.0.2", 0)
                ) as ws:
                    await ws.send(first)
                    await asyncio.wait_for(ws.recv(), STEP_S)
                counts["answered"] += 1
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else 0
                counts[f"closed:{code}"] += 1
            except (InvalidHandshake, InvalidMessage, OSError, EOFError):
                counts["refused_at_connect"] += 1
                await asyncio.sleep(0.001)
            except asyncio.TimeoutError:
                counts["timeout"] += 1

    await asyncio.gather(*(worker() for _ in range(args["workers"])))


_ATTACKS: dict[str, Callable[[str, dict[str, Any], Counter[str]], Any]] = {
    "hog": _hog,
    "unauth-frames": _unauth_frames,
    "handshake-flood": _handshake_flood,
    "garbage-flood": _garbage_flood,
}


def _action(case: str, counts: Mapping[str, int]) -> str:
    """One line: what the server did to the attacker."""
    if case == "hog":
        refused = sum(v for k, v in counts.items() if k.startswith("refused:"))
        return f"served {counts.get('served', 0)}, refused {refused} (overloaded, retry-after)"
    if case == "unauth-frames":
        return (
            f"{counts.get('frames_started', 0)} frames started, "
            f"{counts.get('still_open_at_end', 0)} still open at the end "
            f"(closed 1009 at the frame header / evicted)"
        )
    if case in ("handshake-flood", "garbage-flood"):
        closed = {k: v for k, v in counts.items() if k.startswith("closed:")}
        return (
            f"{counts.get('refused_at_connect', 0)} refused at accept (rate/address limit), "
            f"closed {closed or 0}"
        )
    return "-"


# -- the honest device ---------------------------------------------------------------------------


async def _honest_loop(
    client: Any, inputs: Sequence[Mapping[str, np.ndarray]], expected: Sequence[Any], seconds: float
) -> tuple[list[float], int, int, int]:
    """Requests one after another for ``seconds``: latencies (ms), ok, total, retries."""
    latencies: list[float] = []
    ok = total = retries = 0
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        x, want = inputs[i % len(inputs)], expected[i % len(inputs)]
        i += 1
        total += 1
        started = time.perf_counter()
        try:
            got = await asyncio.wait_for(client.run(x), 30)
        except Exception:
            continue
        latencies.append((time.perf_counter() - started) * 1e3)
        timing = client.last_timing
        if timing is not None and timing.offloaded and _same(got, want):
            ok += 1
            retries += timing.attempts - 1
    return latencies, ok, total, retries


def _same(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> bool:
    return set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)


async def _rss_sampler(pid: int, peak: list[float], stop: asyncio.Event) -> None:
    from edgeoffload.lab.procfs import rss_kib

    while not stop.is_set():
        with contextlib.suppress(OSError, ValueError):
            peak[0] = max(peak[0], rss_kib(pid) / 1024)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)


# -- revocation ----------------------------------------------------------------------------------


def _revoke(case: str, path: Path, revoked: str, stand_in: str) -> None:
    text = path.read_text()
    if case == "clean edit":
        path.write_text(text.replace(revoked, "# removed"))
    elif case == "malformed line":
        path.write_text(text.replace(revoked, "# removed") + "not-a-key\n")
    elif case == "file deleted":
        path.unlink()
    elif case == "same size+mtime":
        before = path.stat()
        path.write_text(text.replace(revoked, stand_in))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    else:
        raise UsageError(f"unknown revocation case {case!r}")


async def _revocation_case(
    case: str, url: str, keys: Any, make_conn: Callable[[Any], Any], stand_in: str
) -> dict[str, Any]:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from edgeoffload.keys import encode_public

    original = keys.allow_file.read_text()
    revoked_key = keys.devices["revoked"]
    try:
        conn = make_conn(revoked_key)
        async with connect(url, compression=None, max_size=1 << 26, proxy=None) as ws:
            for data in conn.data_to_send():
                await ws.send(data)
            conn.receive(await _recv_bytes(ws))
            _revoke(case, keys.allow_file, encode_public(revoked_key.public), stand_in)
            started = time.monotonic()
            code = 0
            try:
                await asyncio.wait_for(ws.recv(), 10)
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else 0
            closed_s = time.monotonic() - started
        refused = False
        again = make_conn(revoked_key)
        try:
            async with connect(url, compression=None, proxy=None) as ws2:
                for data in again.data_to_send():
                    await ws2.send(data)
                await asyncio.wait_for(ws2.recv(), STEP_S)
        except ConnectionClosed as exc:
            refused = exc.rcvd is not None and exc.rcvd.code == 4401
        return {
            "closed_s": round(closed_s, 3),
            "close_code": code,
            "new_handshake_refused": refused,
        }
    finally:
        keys.allow_file.write_text(original)
        await asyncio.sleep(1.2)  # the server sees the restored list before the next case


# -- the benchmark -------------------------------------------------------------------------------


def attack_benchmark(
    model: Any = "zoo:mobilenetv2",
    *,
    cut: str | None = None,
    cases: Sequence[str] = CASES,
    duration_s: float = 20.0,
    connections: int = 1000,
    workers: int = 16,
    requests: int = 1000,
    soak_requests: int = SOAK_REQUESTS,
    kills: int = KILLS,
    progress: Progress | None = None,
) -> AttackResult:
    """Run the attack cases against one server; see the module docstring.

    ``duration_s``: per attack case; ``connections``: unauth-frames; ``workers``: the floods;
    ``requests``: per device in devices-64; ``soak_requests``: in all in the soak; ``kills``:
    SIGKILLs in the sigkill case.
    """
    from edgeoffload.device.runtime import DeviceRuntime
    from edgeoffload.keys import encode_public
    from edgeoffload.lab.harness import ThrowawayKeys, spawn_server
    from edgeoffload.lab.loadtest import default_cut
    from edgeoffload.protocol.connection import ClientConnection
    from edgeoffload.split.analysis import Analysis
    from edgeoffload.split.models import resolve_model
    from edgeoffload.split.splitter import split_model

    unknown = [c for c in cases if c not in CASES]
    if unknown or duration_s <= 0 or min(requests, soak_requests, kills) < 1:
        raise UsageError(f"cases must be among {CASES} and the duration positive, got {unknown}")
    note = progress or (lambda what: None)
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, device_cpus = cpus[-1], (set(cpus[:-1]) or {cpus[-1]})
    root = Path(tempfile.mkdtemp(prefix="edgeoffload-attack-"))
    try:
        name = model if isinstance(model, str) else "model"
        analysis = Analysis.of(resolve_model(model) if isinstance(model, str) else model)
        chosen = analysis.graph.find_cut(cut, analysis.cuts) if cut else default_cut(analysis)
        bundle = split_model(analysis, chosen, root / "bundle", codec="none")
        manifest = bundle.manifest
        labels = [f"d{i}" for i in range(max(LOAD_DEVICES, SOAK_DEVICES, KILL_CLIENTS))]
        keys = ThrowawayKeys.create(root, devices=("honest", "hog", "revoked", "stand-in", *labels))
        stand_in = encode_public(keys.devices["stand-in"].public)
        # The stand-in is not in the list: the same-size rewrite swaps the revoked key for it.
        keys.allow_file.write_text(
            keys.allow_file.read_text().replace(stand_in, "").replace(" stand-in", "")
        )
        runtime = DeviceRuntime(bundle)
        inputs = [analysis.graph.sample_inputs(seed=s) for s in range(4)]
        expected = [runtime.run_local(x) for x in inputs]
        tensors = runtime.encode(runtime.run_head(runtime.check_inputs(inputs[0])))
        server = spawn_server([bundle.path], keys, workers=1, cpus={server_cpu})
        os.sched_setaffinity(0, device_cpus)
        common = {
            "server_public": keys.server.public.hex(),
            "identity": manifest.identity,
            "version": manifest.version,
            "duration_s": duration_s,
            "connections": connections,
            "workers": workers,
        }

        def make_conn(identity: Any) -> Any:
            conn = ClientConnection(
                static=identity,
                server_public=keys.server.public,
                bundle=manifest.identity,
                version=manifest.version,
                time_ns=time.time_ns(),
            )
            conn.start()
            return conn

        results: list[CaseResult] = []
        try:
            for case in cases:
                note(f"case {case}")
                if case == "revocation":
                    outcome = CaseResult(case, "closed the connection, refused new handshakes")
                    for which in REVOCATIONS:
                        outcome.revocations[which] = asyncio.run(
                            _revocation_case(which, server.url, keys, make_conn, stand_in)
                        )
                    results.append(outcome)
                    continue
                if case in ("devices-64", "soak"):
                    results.append(
                        _load_case(case, root, keys, server_cpu, requests, soak_requests)
                    )
                    note(f"  {results[-1].case}: {results[-1].server_action}")
                    continue
                if case == "sigkill":
                    results.append(
                        asyncio.run(
                            _sigkill_case(
                                bundle,
                                keys,
                                inputs,
                                expected,
                                kills=kills,
                                server_cpu=server_cpu,
                                progress=note,
                            )
                        )
                    )
                    note(f"  sigkill: {results[-1].server_action}")
                    continue
                args = dict(common)
                if case == "hog":
                    args["key_dir"] = str(keys.device_dir("hog"))
                    args["tensors"] = [(n, _plain(t)) for n, t in tensors]
                results.append(
                    asyncio.run(_run_case(case, server, keys, bundle, inputs, expected, args))
                )
                note(f"  {format_case(results[-1], results[0])}")
        finally:
            server.stop()
        return AttackResult(
            model=name,
            cut=chosen.id,
            duration_s=duration_s,
            cases=results,
            environment=environment(),
            notes=[
                f"server: 1 worker, 1 thread, pinned to CPU {server_cpu}; honest device and "
                f"attacker on CPU(s) {sorted(device_cpus)}, the attacker at nice 10",
            ],
        )
    finally:
        os.sched_setaffinity(0, cpus)  # the caller's CPUs back (a test run goes on after us)
        shutil.rmtree(root, ignore_errors=True)


def _load_case(
    case: str, root: Path, keys: Any, server_cpu: int, requests: int, soak_requests: int
) -> CaseResult:
    """devices-64 or soak, against its own server hosting the light model."""
    from edgeoffload.device.runtime import DeviceRuntime
    from edgeoffload.lab.harness import spawn_server
    from edgeoffload.lab.loadtest import default_cut
    from edgeoffload.split.analysis import Analysis
    from edgeoffload.split.splitter import split_model

    folder = root / "light-bundle"
    analysis = Analysis.of(_light_model())
    if not folder.exists():
        split_model(analysis, default_cut(analysis), folder, codec="none")
    from edgeoffload.bundle import load_bundle

    bundle = load_bundle(folder)
    runtime = DeviceRuntime(bundle)
    inputs = [analysis.graph.sample_inputs(seed=s) for s in range(4)]
    expected = [runtime.run_local(x) for x in inputs]
    server = spawn_server([bundle.path], keys, workers=1, cpus={server_cpu})
    try:
        if case == "devices-64":
            devices, per_device, rss_every = LOAD_DEVICES, requests, 0
        else:
            devices = SOAK_DEVICES
            per_device = max(1, soak_requests // SOAK_DEVICES)
            rss_every = max(1, devices * per_device // 10)
        return asyncio.run(
            _many_devices(
                case,
                server,
                keys,
                bundle,
                inputs,
                expected,
                devices=devices,
                requests=per_device,
                rss_every=rss_every,
            )
        )
    finally:
        server.stop()


def _plain(t: Any) -> Any:
    """An EncodedTensor with its payload as bytes (picklable for the attacker process)."""
    import dataclasses

    return dataclasses.replace(t, data=bytes(t.data))


async def _run_case(
    case: str,
    server: Any,
    keys: Any,
    bundle: Any,
    inputs: Sequence[Mapping[str, np.ndarray]],
    expected: Sequence[Any],
    args: dict[str, Any],
) -> CaseResult:
    from edgeoffload.lab.procfs import rss_kib

    client = _device(bundle, server, keys, "honest")
    outcome = CaseResult(case, "-")
    async with client:
        await client.run(inputs[0])  # warm: connection and first run
        outcome.rss_before_mib = rss_kib(server.pid) / 1024
        peak = [outcome.rss_before_mib]
        stop = asyncio.Event()
        sampler = asyncio.create_task(_rss_sampler(server.pid, peak, stop))
        attacker = None
        queue: Any = None
        if case != "baseline":
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            attacker = ctx.Process(target=_attacker_main, args=(case, server.url, args, queue))
            attacker.start()
            await asyncio.sleep(min(3.0, args["duration_s"] / 4))  # let the attack build up
        latencies, ok, total, retries = await _honest_loop(
            client, inputs, expected, args["duration_s"] * (0.6 if attacker else 1.0)
        )
        if attacker is not None:
            counts = await asyncio.to_thread(queue.get, True, args["duration_s"] + 60)
            await asyncio.to_thread(attacker.join, 30)
            outcome.attacker = counts
            outcome.server_action = _action(case, counts)
        stop.set()
        await sampler
        outcome.rss_peak_mib = peak[0]
    await asyncio.sleep(1.0)
    outcome.rss_after_mib = rss_kib(server.pid) / 1024
    outcome.honest_ok, outcome.honest_total, outcome.honest_retries = ok, total, retries
    if latencies:
        outcome.p50_ms = percentile(latencies, 50)
        outcome.p99_ms = percentile(latencies, 99)
    return outcome


# -- load: many devices, the soak, SIGKILL -------------------------------------------------------


def _device(
    bundle: Any,
    server: Any,
    keys: Any,
    label: str,
    *,
    fallback: str = "error",
    timeout: float = 20.0,
) -> Any:
    """An honest device: ``label``'s key, pinned to ``server``."""
    from edgeoffload.device.client import OffloadClient

    return OffloadClient(
        bundle,
        server=server.url,
        server_key=keys.server.public,
        identity=keys.devices[label],
        fallback=fallback,
        timeout=timeout,
    )


def _light_model() -> Any:
    from edgeoffload.split import zoo

    return zoo.build_mobilenetv2(resolution=32, width=0.35, num_classes=10)


async def _many_devices(
    case: str,
    server: Any,
    keys: Any,
    bundle: Any,
    inputs: Sequence[Mapping[str, np.ndarray]],
    expected: Sequence[Any],
    *,
    devices: int,
    requests: int,
    rss_every: int,
) -> CaseResult:
    """``devices`` clients with their own keys, ``requests`` each, closed loop."""
    from edgeoffload.lab.procfs import rss_kib

    labels = [f"d{i}" for i in range(devices)]
    clients = [_device(bundle, server, keys, label) for label in labels]
    outcome = CaseResult(case, "-")
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    done = 0
    rss_series: list[float] = []
    retries = wrong = 0

    async def device(client: Any, offset: int) -> None:
        nonlocal done, retries, wrong
        for i in range(requests):
            k = (offset + i) % len(inputs)
            started = time.perf_counter()
            try:
                got = await asyncio.wait_for(client.run(inputs[k]), 40)
            except Exception as exc:
                failures[type(exc).__name__] += 1
                continue
            latencies.append((time.perf_counter() - started) * 1e3)
            if not _same(got, expected[k]):
                wrong += 1
            timing = client.last_timing
            if timing is not None:
                retries += timing.attempts - 1
            done += 1
            if rss_every and done % rss_every == 0:
                rss_series.append(round(rss_kib(server.pid) / 1024, 1))

    for start in range(0, devices, 16):  # in waves: under the per-address connection rate
        await asyncio.gather(*(c.connect() for c in clients[start : start + 16]))
    await asyncio.sleep(0.5)
    outcome.rss_before_mib = rss_kib(server.pid) / 1024
    peak = [outcome.rss_before_mib]
    stop = asyncio.Event()
    sampler = asyncio.create_task(_rss_sampler(server.pid, peak, stop))
    started = time.monotonic()
    try:
        await asyncio.gather(*(device(c, i) for i, c in enumerate(clients)))
    finally:
        stop.set()
        await sampler
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    elapsed = time.monotonic() - started
    await asyncio.sleep(1.0)
    outcome.rss_peak_mib = peak[0]
    outcome.rss_after_mib = rss_kib(server.pid) / 1024
    total = devices * requests
    outcome.honest_ok = done - wrong
    outcome.honest_total = total
    outcome.honest_retries = retries
    outcome.p50_ms = percentile(latencies, 50)
    outcome.p99_ms = percentile(latencies, 99)
    outcome.attacker = {"wrong": wrong, **{f"failed:{k}": v for k, v in failures.items()}}
    outcome.extra = {
        "devices": devices,
        "requests": total,
        "req_per_s": round(total / elapsed, 1),
        "rss_series_mib": rss_series,
    }
    outcome.server_action = (
        f"{devices} devices x {requests}: {total / elapsed:.0f} req/s, {retries} retries after "
        f"overloaded, {sum(failures.values())} failed, {wrong} wrong"
    )
    if rss_series:
        outcome.server_action += (
            f"; RSS at 10% {rss_series[0]:.0f} MiB, at 100% {rss_series[-1]:.0f} MiB"
        )
    return outcome


def _in_flight(client: Any) -> int:
    """Requests the device has in flight at its servers now (router bookkeeping)."""
    return sum(s.in_flight for s in client.pool.router.servers.values())


async def _sigkill_case(
    bundle: Any,
    keys: Any,
    inputs: Sequence[Mapping[str, np.ndarray]],
    expected: Sequence[Any],
    *,
    kills: int,
    server_cpu: int,
    progress: Progress,
) -> CaseResult:
    """Kill the server mid-request ``kills`` times; devices fall back to local (module doc)."""
    from edgeoffload.lab.harness import spawn_server

    timeout = 5.0
    server = await asyncio.to_thread(
        spawn_server, [bundle.path], keys, workers=1, cpus={server_cpu}
    )
    port = int(server.url.rsplit(":", 1)[1])
    clients = [
        _device(bundle, server, keys, f"d{i}", fallback="local", timeout=timeout)
        for i in range(KILL_CLIENTS)
    ]
    counts: Counter[str] = Counter()
    latencies: list[float] = []
    rng = random.Random(0)
    stop = asyncio.Event()

    async def device(client: Any, offset: int) -> None:
        i = offset
        while not stop.is_set():
            k = i % len(inputs)
            i += 1
            started = time.perf_counter()
            try:
                got = await asyncio.wait_for(client.run(inputs[k]), timeout + 5)
            except asyncio.TimeoutError:
                counts["hang"] += 1
                continue
            except Exception as exc:
                counts[f"error:{type(exc).__name__}"] += 1
                continue
            latencies.append((time.perf_counter() - started) * 1e3)
            timing = client.last_timing
            offloaded = timing is not None and timing.offloaded
            counts["offloaded" if offloaded else "local"] += 1
            if not _same(got, expected[k]):
                counts["wrong"] += 1

    try:
        tasks = [asyncio.create_task(device(c, i)) for i, c in enumerate(clients)]
        for kill in range(kills):
            # Kill while the devices are using this server: after its first offloaded
            # answer (bounded), then 0-0.2 s into the stream of requests.
            served = counts["offloaded"]
            for _ in range(200):
                if counts["offloaded"] > served:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(rng.uniform(0.0, 0.2))
            counts["inflight_at_kill"] += sum(_in_flight(c) for c in clients)
            server.process.kill()
            await asyncio.to_thread(server.process.wait, 10)
            counts["kills"] += 1
            server = await asyncio.to_thread(
                spawn_server, [bundle.path], keys, workers=1, cpus={server_cpu}, port=port
            )
            if (kill + 1) % 20 == 0:
                progress(f"  sigkill: {kill + 1}/{kills} kills, {dict(counts)}")
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        server.stop()
    outcome = CaseResult("sigkill", "-", attacker=dict(counts))
    answered = counts["offloaded"] + counts["local"]
    outcome.honest_ok = answered - counts["wrong"]
    outcome.honest_total = (
        answered + counts["hang"] + sum(v for k, v in counts.items() if k.startswith("error:"))
    )
    outcome.p50_ms = percentile(latencies, 50)
    outcome.p99_ms = percentile(latencies, 99)
    outcome.server_action = (
        f"SIGKILLed {counts['kills']} times and restarted ({counts['inflight_at_kill']} requests "
        f"in flight at the kills): {counts['offloaded']} "
        f"answers offloaded, {counts['local']} by the local fallback, {counts['wrong']} wrong, "
        f"{counts['hang']} hangs"
    )
    return outcome


# -- output --------------------------------------------------------------------------------------


def format_case(case: CaseResult, baseline: CaseResult) -> str:
    if case.case == "revocation":
        parts = [
            f"{k}: closed in {v['closed_s']:.2f} s (code {v['close_code']}), "
            f"new handshake refused {v['new_handshake_refused']}"
            for k, v in case.revocations.items()
        ]
        return "revocation — " + "; ".join(parts)
    ratio = case.p99_ms / baseline.p99_ms if baseline.p99_ms else float("nan")
    return (
        f"{case.case}: honest {case.honest_ok}/{case.honest_total} "
        f"({100 * case.success:.1f}%, {case.honest_retries} retries), p50 {case.p50_ms:.1f} ms, "
        f"p99 {case.p99_ms:.1f} ms ({ratio:.2f}x baseline), RSS {case.rss_before_mib:.0f} -> "
        f"{case.rss_peak_mib:.0f} -> {case.rss_after_mib:.0f} MiB; server: {case.server_action}"
    )


def format_result(result: AttackResult) -> list[str]:
    baseline = next((c for c in result.cases if c.case == "baseline"), result.cases[0])
    lines = [
        f"attack suite: {result.model} cut {result.cut}, {result.duration_s:g} s per case",
        "| case | what the server did | honest ok | p50 ms | p99 ms | p99 / baseline | "
        "RSS MiB before / peak / after |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result.cases:
        if c.case == "revocation":
            for k, v in c.revocations.items():
                lines.append(
                    f"| revocation: {k} | closed in {v['closed_s']:.2f} s (code "
                    f"{v['close_code']}); new handshake refused: {v['new_handshake_refused']} "
                    "| | | | | |"
                )
            continue
        if c.case in ("devices-64", "soak", "sigkill"):  # their own baselines: not comparable
            lines.append(
                f"| {c.case} | {c.server_action} | {c.honest_ok}/{c.honest_total} "
                f"({100 * c.success:.1f}%, {c.honest_retries} retries) | {c.p50_ms:.1f} | "
                f"{c.p99_ms:.1f} | - | {c.rss_before_mib:.0f} / {c.rss_peak_mib:.0f} / "
                f"{c.rss_after_mib:.0f} |"
            )
            continue
        ratio = c.p99_ms / baseline.p99_ms if baseline.p99_ms else float("nan")
        lines.append(
            f"| {c.case} | {c.server_action} | {c.honest_ok}/{c.honest_total} "
            f"({100 * c.success:.1f}%, {c.honest_retries} retries) | {c.p50_ms:.1f} | "
            f"{c.p99_ms:.1f} | {ratio:.2f} | {c.rss_before_mib:.0f} / {c.rss_peak_mib:.0f} / "
            f"{c.rss_after_mib:.0f} |"
        )
    lines += [f"note: {n}" for n in result.notes]
    return lines
