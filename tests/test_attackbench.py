"""The attack suite's long form (edgeoffload.lab.attackbench), run small: a real server
process, a real honest device, the four revocations of a real allow-list file."""

from __future__ import annotations

import os

import pytest

from edgeoffload.lab.attackbench import _light_model, attack_benchmark, format_result

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity"), reason="Linux only (/proc, affinity)"
)


def test_attack_suite_runs_and_revocation_fails_closed() -> None:
    cpus = os.sched_getaffinity(0)
    result = attack_benchmark(_light_model(), cases=["baseline", "revocation"], duration_s=1.0)
    baseline, revocation = result.cases
    assert baseline.honest_total > 0 and baseline.honest_ok == baseline.honest_total
    assert set(revocation.revocations) == {
        "clean edit",
        "malformed line",
        "file deleted",
        "same size+mtime",
    }
    for case, outcome in revocation.revocations.items():
        assert outcome["close_code"] == 4401, case
        assert outcome["new_handshake_refused"], case
    assert os.sched_getaffinity(0) == cpus  # the test process gets its CPUs back
    lines = format_result(result)
    assert any(line.startswith("| revocation: file deleted") for line in lines)
