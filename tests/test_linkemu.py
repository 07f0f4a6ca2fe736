"""The link emulator on real sockets (127.0.0.1 only): delay, rate, pipe, jitter, loss, limits.

No pytest-asyncio: each test runs one coroutine with ``asyncio.run`` under a hard timeout. Every
loop is bounded in count, every wait in time. Timing tolerances are wide enough for a busy
2-core CI machine; the model itself is checked exactly through the pure ``LinkSchedule``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import statistics
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from edgeoffload.core.presets import LINK_PRESETS
from edgeoffload.errors import UsageError
from edgeoffload.lab.linkemu import LinkEmulator, LinkSchedule, LinkShape

T = TypeVar("T")
HOST = "127.0.0.1"
MAX_CHUNKS = 100_000  # bound on read loops


def run(coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, HOST, 0)
    return server, server.sockets[0].getsockname()[1]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        for _ in range(MAX_CHUNKS):
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def stop(server: asyncio.Server, *writers: asyncio.StreamWriter) -> None:
    for writer in writers:
        writer.close()
    server.close()
    await asyncio.wait_for(server.wait_closed(), 5)


def fast(delay_ms: float, **kw: Any) -> LinkShape:
    """A link whose rate does not matter for small messages."""
    return LinkShape(up_bps=1e9, down_bps=1e9, delay_ms=delay_ms, **kw)


# --- the shape and the pure model ----------------------------------------------------------


def test_from_link_wifi_preset() -> None:
    wifi = LINK_PRESETS["wifi"]
    shape = LinkShape.from_link(wifi)
    assert shape.delay_ms == pytest.approx(2.5)
    assert (shape.up_bps, shape.down_bps) == (wifi.up_bps, wifi.down_bps)
    assert (shape.jitter_ms, shape.loss) == (0.0, 0.0)
    assert shape.segment_bytes == 2360  # about 1 ms of the 18.88 Mbit/s uplink
    assert LinkShape.from_link(LINK_PRESETS["ethernet"]).segment_bytes == 65536
    lossy = LinkShape.from_link(LINK_PRESETS["lte"], jitter_ms=3.0, loss=0.01)
    assert lossy.to_dict() == {
        "up_bps": 5.1e6,
        "down_bps": 20e6,
        "delay_ms": 25.0,
        "jitter_ms": 3.0,
        "loss": 0.01,
        "loss_penalty_ms": 200.0,
        "segment_bytes": 1500,  # ~1 ms of the 5.1 Mbit/s uplink is below one Ethernet frame
    }


@pytest.mark.parametrize(
    "kw",
    [
        {"up_bps": 0.0},
        {"down_bps": -1.0},
        {"delay_ms": float("nan")},
        {"jitter_ms": -1.0},
        {"loss": 1.5},
        {"segment_bytes": 0},
    ],
)
def test_shape_rejects_bad_values(kw: dict[str, Any]) -> None:
    args: dict[str, Any] = {"up_bps": 1e6, "down_bps": 1e6, "delay_ms": 1.0, **kw}
    with pytest.raises(UsageError):
        LinkShape(**args)


def test_schedule_is_a_pipe() -> None:
    sched = LinkSchedule(8e6, 100.0)
    first, lost = sched.segment(0.0, 100_000)  # 0.1 s serialisation + 0.1 s delay
    assert first == pytest.approx(0.2)
    assert lost is False
    second, _ = sched.segment(0.0, 100_000)  # queued behind the first's serialisation only
    assert second == pytest.approx(0.3)
    late, _ = sched.segment(5.0, 1)  # an idle link: one delay plus 1 µs
    assert late == pytest.approx(5.1 + 1e-6)
    assert sched.fin(5.0) == pytest.approx(5.1 + 1e-6)


def test_schedule_jitter_loss_in_order_and_reproducible() -> None:
    def times(seed: int) -> list[tuple[float, bool]]:
        sched = LinkSchedule(
            1e9, 10.0, jitter_ms=20.0, loss=0.3, loss_penalty_ms=50.0, rng=random.Random(seed)
        )
        return [sched.segment(k * 0.001, 100) for k in range(200)]

    out = times(1)
    assert out == times(1)
    assert out != times(2)
    whens = [w for w, _ in out]
    assert whens == sorted(whens)
    assert 20 < sum(lost for _, lost in out) < 100
    for k, (when, _) in enumerate(out):
        assert 0.010 <= when - k * 0.001 <= 0.010 + 0.020 + 0.050 + 1e-5


# --- real sockets --------------------------------------------------------------------------


def test_small_message_rtt_is_two_delays() -> None:
    async def scenario() -> list[float]:
        server, port = await serve(echo)
        async with LinkEmulator(HOST, port, fast(20.0)) as emu:
            reader, writer = await asyncio.open_connection(HOST, emu.port)
            loop = asyncio.get_running_loop()
            rtts = []
            for k in range(10):
                t0 = loop.time()
                writer.write(b"ping%04d" % k)
                assert await reader.readexactly(8) == b"ping%04d" % k
                rtts.append(loop.time() - t0)
            stats = dict(emu.stats)
        await stop(server, writer)
        assert stats["connections"] == 1
        assert stats["segments_up"] == stats["segments_down"] == 10
        assert stats["bytes_up"] == stats["bytes_down"] == 80
        return rtts

    rtts = run(scenario())
    # Lower bounds only: load on the machine can only add time (the schedule's accuracy is
    # tested exactly above, and measured by the lab benchmark).
    assert min(rtts) >= 0.040 - 0.001


def test_upstream_throughput_at_link_rate() -> None:
    size = 1_000_000

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(size)
        writer.write(b"k")
        await writer.drain()
        writer.close()

    async def scenario() -> float:
        server, port = await serve(handler)
        shape = LinkShape(up_bps=8e6, down_bps=8e6, delay_ms=5.0)
        async with LinkEmulator(HOST, port, shape) as emu:
            reader, writer = await asyncio.open_connection(HOST, emu.port)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            writer.write(bytes(size))
            await writer.drain()
            assert await reader.readexactly(1) == b"k"
            elapsed = loop.time() - t0
            assert emu.stats["bytes_up"] == size
        await stop(server, writer)
        return elapsed

    elapsed = run(scenario())
    assert elapsed >= 0.98 * (1.0 + 0.005)  # never faster than 1 MB at 8 Mbit/s + one delay


def test_asymmetric_link_each_direction_at_its_own_rate() -> None:
    up_size, down_size = 250_000, 1_000_000
    marks: dict[str, float] = {}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        await reader.readexactly(up_size)
        marks["server_got_all"] = loop.time()
        writer.write(bytes(down_size))
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        server, port = await serve(handler)
        shape = LinkShape(up_bps=4e6, down_bps=16e6, delay_ms=5.0)
        async with LinkEmulator(HOST, port, shape) as emu:
            reader, writer = await asyncio.open_connection(HOST, emu.port)
            loop = asyncio.get_running_loop()
            marks["start"] = loop.time()
            writer.write(bytes(up_size))
            await writer.drain()
            await reader.readexactly(down_size)
            marks["client_got_all"] = loop.time()
        await stop(server, writer)

    run(scenario())
    up_time = marks["server_got_all"] - marks["start"]
    down_time = marks["client_got_all"] - marks["server_got_all"]
    assert up_time >= 0.98 * 0.5  # 250 kB at 4 Mbit/s
    assert down_time >= 0.98 * 0.5  # 1 MB at 16 Mbit/s
    # Each direction at its own rate: a byte down takes a quarter of a byte up (2x margin).
    assert down_time / down_size < 0.5 * up_time / up_size


def test_link_is_a_pipe_not_stop_and_wait() -> None:
    size = 100_000
    arrivals: list[float] = []

    async def receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(2):
            await reader.readexactly(size)
            arrivals.append(loop.time())
        data = await reader.readexactly(1)
        writer.write(data)  # then a 1-byte round trip on the idle link
        await writer.drain()
        writer.close()

    async def scenario() -> tuple[float, float, float]:
        server, port = await serve(receiver)
        # 4000-byte segments: a message ends on a segment boundary (no quantisation error)
        shape = LinkShape(up_bps=8e6, down_bps=8e6, delay_ms=100.0, segment_bytes=4000)
        async with LinkEmulator(HOST, port, shape) as emu:
            reader, writer = await asyncio.open_connection(HOST, emu.port)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            writer.write(bytes(size))
            writer.write(bytes(size))
            await writer.drain()
            await asyncio.wait_for(_until(lambda: len(arrivals) == 2), 5)
            await asyncio.sleep(0.05)
            t1 = loop.time()
            writer.write(b"?")
            assert await reader.readexactly(1) == b"?"
            rtt = loop.time() - t1
        await stop(server, writer)
        return arrivals[0] - t0, arrivals[1] - t0, rtt

    first, second, rtt = run(scenario())
    assert first >= 0.2 - 0.002  # 100 ms serialisation + 100 ms delay
    assert second - first >= 0.1 - 0.002  # its own serialisation...
    assert second - first < first  # ...but not the delay again: stop-and-wait would wait 0.3
    assert rtt >= 0.2 - 0.002


async def _until(predicate: Callable[[], bool]) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def test_jitter_keeps_order_and_spreads_latency() -> None:
    count, delay, jitter = 40, 0.010, 0.020
    received: list[tuple[int, float]] = []

    async def receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(count):
            msg = await reader.readexactly(8)
            received.append((int(msg), loop.time()))
        writer.close()

    async def scenario() -> list[float]:
        server, port = await serve(receiver)
        sent: list[float] = []
        shape = fast(delay * 1000, jitter_ms=jitter * 1000)
        async with LinkEmulator(HOST, port, shape, seed=3) as emu:
            _, writer = await asyncio.open_connection(HOST, emu.port)
            loop = asyncio.get_running_loop()
            for k in range(count):
                sent.append(loop.time())
                writer.write(b"%08d" % k)
                await asyncio.sleep(0.004)
            await asyncio.wait_for(_until(lambda: len(received) == count), 5)
        await stop(server, writer)
        assert [k for k, _ in received] == list(range(count))
        return [at - sent[k] for k, at in received]

    latencies = run(scenario())
    # No upper bound: a busy machine adds lateness (the schedule's bound on the jitter is
    # tested exactly in test_schedule_jitter_loss_in_order_and_reproducible).
    assert min(latencies) >= delay - 0.001
    assert max(latencies) - min(latencies) > 0.008  # the jitter is really there
    assert statistics.pstdev(latencies) > 0.003


def _loss_run(seed: int) -> tuple[list[float], dict[str, int]]:
    # Messages 55 ms apart: more than the 50 ms penalty, so a lost segment never holds the next
    # one back and each latency says on its own whether that segment was "lost".
    count, delay, gap = 20, 0.010, 0.055
    received: list[tuple[bytes, float]] = []

    async def receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(count):
            received.append((await reader.readexactly(100), loop.time()))
        writer.close()

    async def scenario() -> tuple[list[float], dict[str, int]]:
        server, port = await serve(receiver)
        sent: list[float] = []
        payloads = [bytes([k]) * 100 for k in range(count)]
        shape = fast(delay * 1000, loss=0.5, loss_penalty_ms=50.0)
        async with LinkEmulator(HOST, port, shape, seed=seed) as emu:
            _, writer = await asyncio.open_connection(HOST, emu.port)
            loop = asyncio.get_running_loop()
            for payload in payloads:
                sent.append(loop.time())
                writer.write(payload)
                await asyncio.sleep(gap)
            await asyncio.wait_for(_until(lambda: len(received) == count), 5)
            stats = dict(emu.stats)
        await stop(server, writer)
        assert [data for data, _ in received] == payloads  # intact and in order
        return [at - sent[k] for k, (_, at) in enumerate(received)], stats

    return run(scenario())


def test_loss_delays_segments_and_is_reproducible() -> None:
    latencies, stats = _loss_run(seed=11)
    assert stats["segments_up"] == 20
    assert 1 <= stats["lost_up"] <= 19
    assert stats["lost_down"] == 0
    # Every segment pays the delay and every lost one the 50 ms penalty on top. Lower bounds
    # only: a busy machine adds lateness (which segments the schedule loses, and that nothing
    # else is delayed, is tested exactly on LinkSchedule above).
    assert min(latencies) >= 0.010 - 0.001
    assert sum(lat >= 0.060 - 0.001 for lat in latencies) >= stats["lost_up"]
    _, stats_again = _loss_run(seed=11)
    assert stats_again["lost_up"] == stats["lost_up"]  # the same seed loses the same segments


def test_backpressure_bounds_the_buffer_on_a_slow_link() -> None:
    total, max_buffer, segment = 20_000_000, 256 * 1024, 16384
    received = [0]

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(MAX_CHUNKS):
                data = await reader.read(65536)
                if not data:
                    break
                received[0] += len(data)
        except ConnectionError:
            pass
        writer.close()

    async def scenario() -> tuple[int, dict[str, int]]:
        server, port = await serve(sink)
        sent = [0]
        shape = LinkShape(up_bps=8e6, down_bps=8e6, delay_ms=5.0, segment_bytes=segment)
        async with LinkEmulator(HOST, port, shape, max_buffer=max_buffer) as emu:
            _, writer = await asyncio.open_connection(HOST, emu.port)

            async def flood() -> None:
                chunk = bytes(65536)
                for _ in range(total // len(chunk)):
                    writer.write(chunk)
                    await writer.drain()
                    sent[0] += len(chunk)

            task = asyncio.create_task(flood())
            await asyncio.sleep(1.0)  # long enough to fill every buffer on the way
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            stats = dict(emu.stats)
        await stop(server, writer)
        return sent[0], stats

    sent, stats = run(scenario())
    assert stats["peak_buffered"] >= max_buffer // 2  # the queue did fill up ...
    assert stats["peak_buffered"] <= max_buffer + segment  # ... and stayed bounded
    assert stats["bytes_up"] == pytest.approx(1_000_000, rel=0.25)  # the link rate, 1 s
    assert sent < total  # the sender was held back, not absorbed


def test_backpressure_when_the_receiver_does_not_read() -> None:
    max_buffer, segment = 128 * 1024, 16384
    server_sent = [0]

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = bytes(65536)
        try:
            for _ in range(20_000_000 // len(chunk)):
                writer.write(chunk)
                await writer.drain()
                server_sent[0] += len(chunk)
        except ConnectionError:
            pass

    async def scenario() -> dict[str, int]:
        server, port = await serve(firehose)
        async with LinkEmulator(HOST, port, fast(1.0), max_buffer=max_buffer) as emu:
            reader, writer = await asyncio.open_connection(HOST, emu.port, limit=65536)
            await asyncio.sleep(0.8)  # the device reads nothing meanwhile
            stats = dict(emu.stats)
            got = 0
            for _ in range(100):  # then it reads a little: data still flows
                got += len(await reader.read(65536))
                if got > 1_000_000:
                    break
            assert got > 1_000_000
        await stop(server, writer)
        return stats

    stats = run(scenario())
    assert stats["peak_buffered"] <= max_buffer + segment
    assert server_sent[0] < 20_000_000


def test_half_close_is_forwarded_after_the_data() -> None:
    async def upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the device's EOF
        writer.write(data.upper())
        await writer.drain()
        writer.close()

    async def scenario() -> tuple[bytes, float]:
        server, port = await serve(upper)
        async with LinkEmulator(HOST, port, fast(15.0)) as emu:
            reader, writer = await asyncio.open_connection(HOST, emu.port)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            writer.write(b"hello link")
            writer.write_eof()
            answer = await reader.read()  # until the server's close reaches us
            elapsed = loop.time() - t0
            await asyncio.wait_for(_until(lambda: emu.stats["active_connections"] == 0), 2)
        await stop(server, writer)
        return answer, elapsed

    answer, elapsed = run(scenario())
    assert answer == b"HELLO LINK"
    assert elapsed >= 0.030 - 0.001  # data + FIN up, answer + FIN down


def test_close_ends_open_connections_and_leaves_no_tasks() -> None:
    class Echo(asyncio.Protocol):  # a callback server: it owns no tasks of its own
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)  # type: ignore[attr-defined]

    async def scenario() -> None:
        before = asyncio.all_tasks()  # this test's own (asyncio.run, wait_for)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        emu = LinkEmulator(HOST, port, fast(30.0))
        await emu.start()
        clients = [await asyncio.open_connection(HOST, emu.port) for _ in range(3)]
        for _, writer in clients:
            writer.write(b"x" * 1000)  # data in flight on the emulated link
        await asyncio.wait_for(_until(lambda: emu.stats["active_connections"] == 3), 2)
        await asyncio.sleep(0.01)
        await emu.close()
        assert emu.stats["active_connections"] == 0
        assert asyncio.all_tasks() == before
        for reader, _ in clients:  # every device sees its connection end
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(reader.read(), 2)
            assert reader.at_eof()
        await emu.close()  # idempotent
        with pytest.raises(ConnectionError):
            await asyncio.open_connection(HOST, emu.port)
        for _, writer in clients:
            writer.close()
        server.close()
        await server.wait_closed()

    run(scenario())


def test_unreachable_target_closes_the_device_connection() -> None:
    with socket.socket() as probe:  # a port with nothing listening on it
        probe.bind((HOST, 0))
        dead_port = probe.getsockname()[1]

    async def scenario() -> None:
        async with LinkEmulator(HOST, dead_port, fast(1.0)) as emu:
            reader, writer = await asyncio.open_connection(HOST, emu.port)
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 2) == b""
            writer.close()
            await asyncio.wait_for(_until(lambda: emu.stats["active_connections"] == 0), 2)

    run(scenario())


def test_port_before_start_is_a_usage_error() -> None:
    emu = LinkEmulator(HOST, 1, fast(1.0))
    with pytest.raises(UsageError):
        _ = emu.port
    with pytest.raises(UsageError):
        LinkEmulator(HOST, 1, fast(1.0), max_buffer=0)
