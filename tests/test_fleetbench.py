"""The fleet benchmark's baseline routing policies (pure, seeded) and a short real run."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from edgeoffload.errors import UsageError
from edgeoffload.lab.fleetbench import (
    POLICIES,
    LeastOutstanding,
    RoundRobin,
    TwoChoice,
    fleet_benchmark,
    format_result,
    parse_policies,
)
from edgeoffload.protocol.load import ServerLoad

URLS = ["ws://a", "ws://b", "ws://c"]


def load(inflight: int) -> ServerLoad:
    return ServerLoad(
        inflight=inflight, queued=max(0, inflight - 1), workers=1, kv_free=0, draining=False
    )


def test_round_robin_cycles_over_available_servers_and_skips_backed_off_ones():
    router = RoundRobin(URLS, rng=random.Random(0))
    picks = [router.choose(1, now=0.0) for _ in range(6)]
    start = URLS.index(picks[0])
    assert picks == [URLS[(start + k) % 3] for k in range(6)]
    router.failed("ws://b", now=0.0)  # backed off for 0.5 s
    picks = [router.choose(1, now=0.1) for _ in range(4)]
    assert "ws://b" not in picks and Counter(picks) == {"ws://a": 2, "ws://c": 2}
    assert "ws://b" in {router.choose(1, now=1.0) for _ in range(3)}  # backoff over
    assert router.choose(1, now=1.0, exclude=["ws://a", "ws://c"]) == "ws://b"


def test_round_robin_devices_start_at_different_servers():
    firsts = {RoundRobin(URLS, rng=random.Random(seed)).choose(1, now=0.0) for seed in range(20)}
    assert firsts == set(URLS)


def test_least_outstanding_takes_the_fewest_in_flight_and_breaks_ties_at_random():
    router = LeastOutstanding(URLS, rng=random.Random(1))
    router.started("ws://a")
    router.started("ws://a")
    router.started("ws://b")
    assert {router.choose(1, now=0.0) for _ in range(20)} == {"ws://c"}
    router.started("ws://c")
    assert {router.choose(1, now=0.0) for _ in range(40)} == {"ws://b", "ws://c"}


def test_two_choice_compares_reported_queues_else_own_in_flight():
    router = TwoChoice(URLS, rng=random.Random(2))
    router.reported("ws://a", load(9))
    router.reported("ws://b", load(0))
    router.reported("ws://c", load(4))
    picks = Counter(router.choose(1, now=0.0) for _ in range(300))
    # b wins every pair it is in (2 of 3), c wins the pair (a, c): a never.
    assert set(picks) == {"ws://b", "ws://c"}
    assert 150 < picks["ws://b"] < 250
    fresh = TwoChoice(URLS, rng=random.Random(3))  # no reports: this device's in-flight count
    fresh.started("ws://a")
    fresh.started("ws://b")
    picks = Counter(fresh.choose(1, now=0.0) for _ in range(300))
    assert picks["ws://c"] > 150  # wins both pairs it is in; (a, b) ties go either way
    assert picks["ws://a"] > 0 and picks["ws://b"] > 0


def test_policies_are_seeded_and_skip_excluded_servers():
    for cls in (RoundRobin, LeastOutstanding, TwoChoice):
        one = cls(URLS, rng=random.Random(7))
        two = cls(URLS, rng=random.Random(7))
        assert [one.choose(1, now=0.0) for _ in range(20)] == [
            two.choose(1, now=0.0) for _ in range(20)
        ]
        assert {one.choose(1, now=0.0, exclude=["ws://a"]) for _ in range(20)} <= {
            "ws://b",
            "ws://c",
        }
        # Nothing left: the pool's last resort (a quick failure may be retried), else None.
        assert one.choose(1, now=0.0, exclude=URLS) is None
        one.failed("ws://a", now=0.0, fast=True)
        assert one.choose(1, now=0.0, exclude=["ws://b", "ws://c"]) == "ws://a"


def test_parse_policies():
    assert parse_policies("ours, two-choice") == ("ours", "two-choice")
    assert parse_policies(list(POLICIES)) == POLICIES
    for bad in ("", "ours,ours", "random"):
        with pytest.raises(UsageError):
            parse_policies(bad)


def test_a_short_fleet_run_answers_everything_correctly_across_the_kill():
    """2 servers (the second SIGKILLed and restarted), 2 devices, ~2.5 s measured."""
    from edgeoffload.split import zoo

    result = fleet_benchmark(
        zoo.build("mobilenetv2"),
        devices=2,
        policies=("ours",),
        duration_s=2.5,
        warmup_s=0.3,
        kill_at=0.3,
        restart_gap_s=0.1,
        speeds=(0.3, 0.6),
        capacity_clients=2,
        capacity_s=0.5,
    )
    (run,) = result.runs
    assert [s.name for s in result.servers] == ["A", "B"] and result.servers[1].killed
    assert all(s.capacity_req_s > 0 and s.capacity_errors == 0 for s in result.servers)
    assert run.answered > 0 and run.by_server["A"] > 0
    assert run.wrong_answers == 0
    assert run.errors == 0, run.error_kinds
    assert run.kill_s < run.restart_s < run.ready_s
    data = result.to_dict()
    assert {t["name"] for t in data["targets"]} and format_result(data)
