"""The device's server choice (edgeoffload.device.routing): pure, driven with a seeded rng."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from edgeoffload.device.routing import BACKOFF_S, MAX_BACKOFF_S, Router
from edgeoffload.errors import UsageError
from edgeoffload.types import LinkProfile

A, B, C = "ws://a:8765", "ws://b:8765", "ws://c:8765"


def _measured(tails: dict[str, float], *, network_ms: float = 5.0, seed: int = 0) -> Router:
    router = Router(list(tails), rng=random.Random(seed))
    for url, tail in tails.items():
        router.started(url)
        router.succeeded(url, network_ms=network_ms, server_ms=tail)
    return router


def test_every_server_is_measured_before_any_is_preferred() -> None:
    router = Router([A, B, C], rng=random.Random(1))
    tried = []
    for _ in range(3):
        url = router.choose(1000, now=0.0)
        assert url is not None
        tried.append(url)
        router.started(url)
        router.succeeded(url, network_ms=5.0, server_ms=10.0)
    assert sorted(tried) == [A, B, C]


def test_two_choices_never_pick_the_slowest_and_favour_the_fastest() -> None:
    router = _measured({A: 10.0, B: 50.0, C: 100.0})
    picks = Counter(router.choose(1000, now=0.0) for _ in range(300))
    assert picks[C] == 0  # always paired with a faster one
    assert picks[A] > picks[B] > 0  # A wins 2 of the 3 pairs, B one
    assert sum(picks.values()) == 300


def test_the_same_seed_makes_the_same_choices() -> None:
    def picks(seed: int) -> list[str | None]:
        router = _measured({A: 10.0, B: 12.0, C: 11.0}, seed=seed)
        return [router.choose(1000, now=0.0) for _ in range(50)]

    assert picks(7) == picks(7)


def test_requests_in_flight_count_as_queue() -> None:
    router = _measured({A: 10.0, B: 50.0})
    assert router.choose(1000, now=0.0) == A
    for _ in range(10):
        router.started(A)  # 5 + 10 x 10 + 10 = 115 ms predicted, against 55 ms
    assert router.servers[A].predicted_ms(1000) == pytest.approx(115.0)
    assert router.choose(1000, now=0.0) == B


def test_the_link_decides_for_large_requests() -> None:
    router = _measured({A: 10.0, B: 30.0})
    router.measured_link(A, LinkProfile("slow", up_bps=1e6, down_bps=1e6, rtt_ms=5.0))
    router.measured_link(B, LinkProfile("fast", up_bps=100e6, down_bps=100e6, rtt_ms=5.0))
    assert router.choose(100, now=0.0) == A  # 5.8 + 10 ms against 5.008 + 30 ms
    assert router.choose(1_000_000, now=0.0) == B  # 8 s of uplink against 80 ms


def test_failures_back_off_doubling_and_a_success_clears_them() -> None:
    router = _measured({A: 10.0, B: 50.0})
    router.started(A)
    router.failed(A, now=100.0)
    assert router.servers[A].in_flight == 0
    assert router.choose(1000, now=100.0) == B
    assert router.choose(1000, now=100.0 + BACKOFF_S) == A  # eligible again: probed back in
    router.started(A)
    router.failed(A, now=200.0)
    router.started(A)
    router.failed(A, now=200.0)
    assert router.servers[A].backoff_until == pytest.approx(200.0 + 4 * BACKOFF_S)
    for _ in range(20):
        router.failed(A, now=300.0)
    assert router.servers[A].backoff_until == pytest.approx(300.0 + MAX_BACKOFF_S)
    router.started(A)
    router.succeeded(A, network_ms=5.0, server_ms=10.0)
    assert router.servers[A].failures == 0
    assert router.choose(1000, now=300.0) == A


def test_no_server_left_and_retries_go_elsewhere() -> None:
    router = _measured({A: 10.0, B: 50.0})
    assert router.choose(1000, now=0.0, exclude=[A]) == B  # a retry after A died
    assert router.choose(1000, now=0.0, exclude=[A, B]) is None  # then: local fallback
    router.failed(A, now=0.0)
    router.failed(B, now=0.0)
    assert router.choose(1000, now=0.1) is None


def test_servers_must_be_given_once() -> None:
    for urls in ([], [A, A]):
        with pytest.raises(UsageError, match="at least one server, each once"):
            Router(urls, rng=random.Random(0))


def _load(inflight: int, workers: int = 1, *, draining: bool = False, tail_ms=None):
    from edgeoffload.protocol.load import ServerLoad

    return ServerLoad(
        inflight=inflight,
        queued=max(0, inflight - workers),
        workers=workers,
        kv_free=0,
        draining=draining,
        tail_ms=tail_ms,
    )


def test_a_reported_queue_counts_and_own_requests_are_not_counted_twice() -> None:
    router = _measured({A: 10.0, B: 20.0})
    router.reported(A, _load(inflight=6, workers=2))  # 5 waiting ahead over 2 workers
    assert router.servers[A].predicted_ms(1000) == pytest.approx(5 + 5 / 2 * 10 + 10)
    for _ in range(3):
        router.started(A)  # this device's 3 are part of the server's 6
    assert router.servers[A].predicted_ms(1000) == pytest.approx(5 + 5 / 2 * 10 + 10)
    assert router.choose(1000, now=0.0) == B  # 25 ms predicted against 40


def test_a_draining_server_is_not_chosen_and_the_servers_own_tail_estimate_is_used() -> None:
    router = Router([A, B], rng=random.Random(0))
    router.reported(A, _load(0, draining=True, tail_ms=1.0))
    router.reported(B, _load(0, tail_ms=50.0))
    assert [s.url for s in router.available(now=0.0)] == [B]
    router.started(B)
    router.succeeded(B, network_ms=5.0, server_ms=30.0)
    assert router.servers[B].expected_tail_ms == 30.0  # our own measurement wins
    router.reported(A, _load(0, tail_ms=1.0))  # no longer draining
    router.servers[A].network_ms = 5.0
    assert router.servers[A].expected_tail_ms == 1.0 and router.choose(1000, now=0.0) == A


def test_when_all_are_backed_off_a_quick_refusal_is_tried_and_a_hang_is_not() -> None:
    router = _measured({A: 10.0, B: 10.0})
    router.started(A)
    router.failed(A, now=0.0, fast=True)  # answered overloaded at once
    router.started(B)
    router.failed(B, now=0.0, fast=False)  # timed out
    assert router.choose(1000, now=0.1) == A
    assert router.choose(1000, now=0.1, exclude=[A]) is None
