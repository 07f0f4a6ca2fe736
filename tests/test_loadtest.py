"""The server-throughput load test: structure and sanity of a small real run (no speed targets).

A real ``edgeoffload serve`` process on 127.0.0.1, real asyncio clients with their own keys,
real crypto and onnxruntime; only the request counts are small.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import pytest

from edgeoffload.errors import UsageError
from edgeoffload.lab.loadtest import default_cut, server_throughput
from edgeoffload.lab.procfs import cpu_seconds, rss_kib
from edgeoffload.split import zoo

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    """The benchmark's JSON (what ``benchmarks/server_throughput.py`` writes)."""
    return server_throughput(
        zoo.build("resnet"), clients=(1, 4), requests_per_client=3, duration_cap_s=60.0
    ).to_dict()


def test_structure(result: dict[str, Any]) -> None:
    assert result["benchmark"] == "server-throughput"
    for key in ("model", "cut", "workers", "environment", "baseline", "rows"):
        assert key in result
    assert result["codec"] == "none"
    assert result["workers"] == (os.cpu_count() or 1)
    assert result["environment"]["onnxruntime"]
    assert [r["clients"] for r in result["rows"]] == [1, 4]
    for row in result["rows"]:
        for key in (
            "requests",
            "wall_s",
            "req_s",
            "ratio_to_direct",
            "p50_ms",
            "p99_ms",
            "server_p50_ms",
            "errors",
            "direct",
        ):
            assert key in row, key
    json.dumps(result, allow_nan=True)  # the benchmark script writes it as JSON


def test_every_request_succeeded(result: dict[str, Any]) -> None:
    assert not result["capped"]
    for row in result["rows"]:
        assert row["errors"] == 0, row["error_kinds"]
        assert row["requests"] == row["clients"] * 3
        assert row["max_abs_error"] <= 1e-4  # the server's answers are the tail's answers
    assert result["memory"]["errors"] == {}
    assert result["max_abs_error"] <= 1e-4


def test_sanity(result: dict[str, Any]) -> None:
    base = result["baseline"]
    assert base["req_s"] > 0 and base["p99_ms"] >= base["p50_ms"] > 0
    # the summary is one of the rows' direct runs, each as many calls as that row's requests
    assert base["requests"] in {r["requests"] for r in result["rows"]}
    for row in result["rows"]:
        assert row["req_s"] > 0
        assert row["p99_ms"] >= row["p50_ms"] > 0
        assert row["server_p50_ms"] > 0
        assert math.isfinite(row["ratio_to_direct"]) and row["ratio_to_direct"] > 0
        assert row["direct"]["requests"] == row["requests"]  # same number of direct calls
        assert row["server_cpu_ms_per_request"] > 0 and row["client_cpu_ms_per_request"] > 0
    assert result["memory_per_connection_clients"] == 4
    assert result["memory_per_connection_kib"] > 0
    assert 0 < result["tail_share"] < 1


def test_default_cut_leaves_the_compute_to_the_tail(zoo_analyses: dict[str, Any]) -> None:
    analysis = zoo_analyses["mobilenetv2"]
    cut = default_cut(analysis)
    n = len(analysis.node_order)
    assert len(cut.tensors) == 1
    assert 0.05 * n <= cut.index < 0.15 * n


def test_bad_arguments() -> None:
    with pytest.raises(UsageError):
        server_throughput(zoo.build("resnet"), clients=(0,))
    with pytest.raises(UsageError):
        server_throughput(zoo.build("resnet"), requests_per_client=0)
    with pytest.raises(UsageError):  # pinning must leave a CPU for the devices
        server_throughput(zoo.build("resnet"), server_cpus=sorted(os.sched_getaffinity(0)))


def test_proc_readers() -> None:
    assert rss_kib(os.getpid()) > 0
    assert cpu_seconds(os.getpid()) > 0
