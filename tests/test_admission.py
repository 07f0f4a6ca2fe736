"""Fair admission (edge.admission) and the pre-authentication front door (edge.limits).

Pure bookkeeping, no sockets: orderings and counts, driven step by step on one event loop.
"""

from __future__ import annotations

import asyncio

import pytest

from edgeoffload.edge.admission import FairAdmission, Grant
from edgeoffload.edge.limits import ConnectionLimits, Limits
from edgeoffload.errors import Overloaded, UsageError

HOG, HONEST, THIRD = b"h" * 32, b"o" * 32, b"t" * 32


def run(coro_fn):
    return asyncio.run(asyncio.wait_for(coro_fn(), 10))


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_honest_request_overtakes_a_hogs_queue() -> None:
    async def main() -> list[bytes]:
        adm = FairAdmission(workers=1, max_waiting=16, per_device=8, queue_wait=5)
        order: list[bytes] = []

        async def request(device: bytes) -> None:
            grant = await adm.acquire(device, 10.0)
            order.append(device)
            await asyncio.sleep(0)
            adm.release(grant, actual_ms=10.0)

        first = await adm.acquire(HOG, 10.0)  # the hog holds the only worker
        hog = [asyncio.create_task(request(HOG)) for _ in range(6)]
        await _settle()
        honest = asyncio.create_task(request(HONEST))  # arrives last
        await _settle()
        assert adm.waiting == 7
        adm.release(first, actual_ms=10.0)
        await asyncio.gather(*hog, honest)
        return order

    order = run(main)
    assert order[0] == HONEST, order  # first granted when the worker freed up
    assert order.count(HOG) == 6


def test_cost_not_message_count_decides() -> None:
    """A device whose requests really cost 10x is charged 10x: the cheap one goes first."""

    async def main() -> list[bytes]:
        adm = FairAdmission(workers=1, max_waiting=16, per_device=8, queue_wait=5)
        # HOG ran one request that was estimated at 1 ms and really took 100 ms.
        grant = await adm.acquire(HOG, 1.0)
        adm.release(grant, actual_ms=100.0)
        blocker = await adm.acquire(THIRD, 1.0)
        order: list[bytes] = []

        async def request(device: bytes) -> None:
            g = await adm.acquire(device, 1.0)
            order.append(device)
            adm.release(g, actual_ms=1.0)

        tasks = [asyncio.create_task(request(HOG))]
        await _settle()
        tasks.append(asyncio.create_task(request(HONEST)))
        await _settle()
        adm.release(blocker, actual_ms=1.0)
        await asyncio.gather(*tasks)
        return order

    assert run(main) == [HONEST, HOG]


def test_per_device_limit_and_quota_refuse_with_retry_after() -> None:
    async def main() -> None:
        adm = FairAdmission(workers=1, max_waiting=16, per_device=2, queue_wait=5)
        g1 = await adm.acquire(HOG, 50.0)
        waiter = asyncio.create_task(adm.acquire(HOG, 50.0))
        await _settle()
        with pytest.raises(Overloaded) as info:
            await adm.acquire(HOG, 50.0)
        assert info.value.retry_after is not None and info.value.retry_after > 0
        assert adm.refused["device_limit"] == 1
        # Another device is not affected by the hog's limit; a quota raises a key's limit.
        other = asyncio.create_task(adm.acquire(HONEST, 50.0))
        quota = asyncio.create_task(adm.acquire(HOG, 50.0, limit=3))
        await _settle()
        assert adm.admitted_for(HOG) == 3 and adm.admitted_for(HONEST) == 1
        adm.release(g1)
        assert (await other).device == HONEST  # the device that had nothing goes first
        adm.release(Grant(HONEST, 50.0, 0.0))
        adm.release(await waiter)
        adm.release(await quota)
        assert adm.admitted == 0 and adm.running == 0

    run(main)


def test_queue_full_and_queue_wait_refuse_and_leak_nothing() -> None:
    async def main() -> None:
        adm = FairAdmission(workers=1, max_waiting=1, per_device=8, queue_wait=0.05)
        g = await adm.acquire(HOG, 200.0)
        waiting = asyncio.create_task(adm.acquire(HONEST, 200.0))
        await _settle()
        with pytest.raises(Overloaded) as full:
            await adm.acquire(THIRD, 200.0)
        # retry-after covers the work ahead: 200 ms running + 200 ms waiting on one worker
        assert full.value.retry_after == pytest.approx(0.4)
        with pytest.raises(Overloaded, match="within"):
            await waiting  # nobody released within queue_wait
        assert adm.refused == {"queue_full": 1, "queue_wait": 1}
        assert adm.waiting == 0 and adm.admitted_for(HONEST) == 0
        adm.release(g)
        assert adm.admitted == 0
        g2 = await adm.acquire(THIRD, 1.0)  # free again: granted at once
        assert g2.waited_s == 0.0
        adm.release(g2)

    run(main)


def test_cancelled_waiter_frees_its_place() -> None:
    async def main() -> None:
        adm = FairAdmission(workers=1, max_waiting=4, per_device=8, queue_wait=5)
        g = await adm.acquire(HOG, 1.0)
        gone = asyncio.create_task(adm.acquire(HONEST, 1.0))
        stays = asyncio.create_task(adm.acquire(THIRD, 1.0))
        await _settle()
        gone.cancel()
        await _settle()
        assert adm.waiting == 1 and adm.admitted_for(HONEST) == 0
        adm.release(g)
        granted: Grant = await stays
        assert granted.device == THIRD and adm.running == 1
        adm.release(granted)
        assert adm.admitted == 0

    run(main)


def test_wait_for_room_holds_a_device_at_its_limit_until_one_finishes() -> None:
    async def main() -> None:
        adm = FairAdmission(workers=2, max_waiting=8, per_device=2, queue_wait=5)
        grants = [await adm.acquire(HOG, 1.0), await adm.acquire(HOG, 1.0)]
        await asyncio.wait_for(adm.wait_for_room(HONEST), 1)  # others are not held
        held = asyncio.create_task(adm.wait_for_room(HOG))
        quota = asyncio.create_task(adm.wait_for_room(HOG, limit=3))
        await _settle()
        assert not held.done() and quota.done()  # a quota above the count has room
        adm.release(grants[0])
        await asyncio.wait_for(held, 1)
        adm.release(grants[1])

    run(main)


def test_waiting_bytes_are_bounded() -> None:
    async def main() -> None:
        adm = FairAdmission(
            workers=1, max_waiting=8, per_device=8, queue_wait=5, max_waiting_bytes=100
        )
        g = await adm.acquire(HOG, 1.0, nbytes=10**6)  # running: not counted as waiting
        first = asyncio.create_task(adm.acquire(HONEST, 1.0, nbytes=500))  # alone: may wait
        await _settle()
        with pytest.raises(Overloaded):
            await adm.acquire(THIRD, 1.0, nbytes=1)
        assert adm.refused["queue_full"] == 1 and adm.waiting_bytes == 500
        adm.release(g)
        adm.release(await first)
        assert adm.waiting_bytes == 0 and adm.admitted == 0

    run(main)


def test_admission_rejects_nonsense_settings() -> None:
    with pytest.raises(UsageError):
        FairAdmission(workers=0, max_waiting=1, per_device=1, queue_wait=1)
    with pytest.raises(UsageError):
        Limits(max_unauthenticated=0)


# -- the front door ------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_connection_caps_total_and_per_address() -> None:
    limits = ConnectionLimits(Limits(max_connections=3, max_per_address=2, rate=1e9, burst=100))
    assert limits.opened("a1", "10.0.0.1") == (True, [])
    assert limits.opened("a2", "10.0.0.1") == (True, [])
    assert limits.opened("a3", "10.0.0.1") == (False, [])  # per address
    assert limits.opened("b1", "10.0.0.2") == (True, [])
    assert limits.opened("c1", "10.0.0.3") == (False, [])  # total
    assert limits.refused == {"per_address": 1, "connections": 1}
    limits.closed("a1")
    assert limits.opened("a3", "10.0.0.1") == (True, [])
    limits.closed("never-opened")  # harmless
    assert len(limits) == 3


def test_oldest_unauthenticated_connection_is_evicted() -> None:
    limits = ConnectionLimits(Limits(max_unauthenticated=2, rate=1e9, burst=100))
    limits.opened("honest", "10.0.0.9")
    limits.authenticated("honest")  # finished its handshake: never evicted for this
    limits.opened("x1", "10.0.0.1")
    limits.opened("x2", "10.0.0.1")
    admitted, evicted = limits.opened("x3", "10.0.0.1")
    assert admitted and evicted == ["x1"]
    assert limits.unauthenticated == 2
    limits.closed("x1")  # the server aborted it: its close is counted once
    assert len(limits) == 3


def test_new_connections_per_address_are_rate_limited() -> None:
    clock = Clock()
    limits = ConnectionLimits(Limits(rate=10.0, burst=3), clock=clock)
    got = [limits.opened(f"c{i}", "10.0.0.1")[0] for i in range(5)]
    assert got == [True, True, True, False, False]
    assert limits.opened("other", "10.0.0.2")[0]  # another address has its own bucket
    clock.t += 0.1  # one token back
    assert limits.opened("c5", "10.0.0.1")[0]
    assert not limits.opened("c6", "10.0.0.1")[0]
    assert limits.refused["rate"] == 3
