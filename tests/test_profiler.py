"""Tests for edgeoffload.split.profiler: real onnxruntime timings on a zoo model, profile files."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from edgeoffload.errors import ProfileError
from edgeoffload.split import zoo
from edgeoffload.split.analysis import Analysis
from edgeoffload.split.profiler import codec_rates, load_profile, profile_model, save_profile
from edgeoffload.types import DeviceProfile, PowerModel

CODECS = ("none", "zstd", "int8+zstd")


@pytest.fixture(scope="module")
def analysis() -> Analysis:
    return Analysis.of(zoo.build("resnet", seed=0))


@pytest.fixture(scope="module")
def profile(analysis: Analysis) -> DeviceProfile:
    return profile_model(
        analysis.graph,
        inputs=analysis.inputs,
        activations=analysis.activations,
        threads=1,
        runs=3,
        name="ci",
        codecs=CODECS,
    )


def test_node_times_cover_every_node(profile: DeviceProfile, analysis: Analysis) -> None:
    names = {node.name for node in analysis.graph.nodes}
    assert set(profile.node_ms) == names
    assert all(ms >= 0.0 and math.isfinite(ms) for ms in profile.node_ms.values())
    assert sum(profile.node_ms.values()) > 0.0
    # the convolutions do real work: at least one of them has a measurable time
    convs = [n.name for n in analysis.graph.nodes if n.op_type == "Conv"]
    assert any(profile.node_ms[name] > 0.0 for name in convs)


def test_calibration_curve(profile: DeviceProfile) -> None:
    points = profile.calibration
    assert len(points) >= 3  # overhead, interior cuts, full model
    raws = [p.raw_ms for p in points]
    measured = [p.measured_ms for p in points]
    assert raws == sorted(raws)
    assert all(b >= a for a, b in itertools.pairwise(measured))
    assert raws[0] == 0.0
    assert measured[0] > 0.0  # per-run session overhead of an Identity model
    assert raws[-1] == pytest.approx(sum(profile.node_ms.values()), abs=1e-3)
    assert measured[-1] > measured[0]


def test_codec_rates_recorded(profile: DeviceProfile) -> None:
    expected = {f"{d}:{c}" for d in ("encode", "decode") for c in CODECS}
    expected |= {"encrypt:transport", "decrypt:transport", "both:websocket"}  # the channel
    assert set(profile.codec_bps) == expected
    assert all(rate > 0 and math.isfinite(rate) for rate in profile.codec_bps.values())


def test_profile_metadata(profile: DeviceProfile, analysis: Analysis) -> None:
    assert profile.threads == 1
    assert profile.name == "ci"
    assert profile.model_sha256 == analysis.graph.sha256
    assert profile.slowdown == 1.0
    assert profile.power == PowerModel()
    assert profile.machine


def test_profile_is_usable_for_planning(profile: DeviceProfile, analysis: Analysis) -> None:
    from edgeoffload.types import LinkProfile

    report = analysis.plan(
        device=profile.with_slowdown(4.0),
        server=profile,
        link=LinkProfile("lan", 1e9, 1e9, 1.0),
        codec="none",
    )
    local = report.all_local.cost.device_ms
    assert local == pytest.approx(4.0 * profile.calibration[-1].measured_ms, rel=1e-3)
    assert report.best.cost.total_ms <= min(p.cost.total_ms for p in report.plans)


def test_threads_recorded_without_activations() -> None:
    model = zoo.build("mobilenetv2", seed=0)
    analysis = Analysis.of(model)
    prof = profile_model(analysis.graph, inputs=analysis.inputs, threads=2, runs=1)
    assert prof.threads == 2
    assert prof.codec_bps == {}  # no activations given: no codec rates measured
    assert set(prof.node_ms) == set(analysis.node_order)


def test_save_load_round_trip(profile: DeviceProfile, tmp_path: Path) -> None:
    path = save_profile(profile, tmp_path / "p.json")
    assert path == tmp_path / "p.json"
    loaded = load_profile(path)
    assert loaded == profile
    assert loaded.to_dict() == profile.to_dict()
    assert json.loads(path.read_text())["kind"] == "edgeoffload.profile"


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no such profile file") as info:
        load_profile(tmp_path / "absent.json")
    assert info.value.exit_code == 8


def test_load_not_json(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_bytes(b"\x89PNG not json")
    with pytest.raises(ProfileError, match="not a JSON profile") as info:
        load_profile(path)
    assert info.value.exit_code == 8
    assert str(path) in str(info.value)


def _mutated(profile: DeviceProfile, tmp_path: Path, **changes: object) -> Path:
    data = profile.to_dict()
    data.update(changes)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    return path


def test_load_wrong_kind(profile: DeviceProfile, tmp_path: Path) -> None:
    path = _mutated(profile, tmp_path, kind="edgeoffload.link")
    with pytest.raises(ProfileError, match="kind") as info:
        load_profile(path)
    assert info.value.exit_code == 8
    assert str(path) in str(info.value)


def test_load_negative_node_time(profile: DeviceProfile, tmp_path: Path) -> None:
    node_ms = dict(profile.node_ms)
    first = next(iter(node_ms))
    node_ms[first] = -0.5
    with pytest.raises(ProfileError, match="node_ms") as info:
        load_profile(_mutated(profile, tmp_path, node_ms=node_ms))
    assert info.value.exit_code == 8
    assert first in str(info.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"threads": "one"},
        {"slowdown": 0},
        {"codec_bps": {"encode:none": 0}},
        {"calibration": [{"raw_ms": -1, "measured_ms": 1}]},
        {"extra": True},
    ],
)
def test_load_other_malformed_fields(
    profile: DeviceProfile, tmp_path: Path, changes: dict[str, object]
) -> None:
    with pytest.raises(ProfileError):
        load_profile(_mutated(profile, tmp_path, **changes))


def test_load_json_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(ProfileError, match="JSON object"):
        load_profile(path)


@pytest.mark.parametrize(("threads", "runs"), [(0, 3), (-1, 3), (1, 0)])
def test_bad_threads_or_runs(analysis: Analysis, threads: int, runs: int) -> None:
    with pytest.raises(ProfileError) as info:
        profile_model(analysis.graph, inputs=analysis.inputs, threads=threads, runs=runs)
    assert info.value.exit_code == 8


def test_codec_rates_on_arrays() -> None:
    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal((64, 128)).astype(np.float32),
        rng.standard_normal((3, 32, 32)).astype(np.float64),
        rng.integers(0, 100, size=(512,)).astype(np.int64),
    ]
    names = ["none", "zstd", "lz4", "fp16", "fp16+zstd", "int8", "int8+lz4"]
    rates = codec_rates(arrays, names, repeats=2)
    assert set(rates) == {f"{d}:{c}" for d in ("encode", "decode") for c in names}
    assert all(r > 0 and math.isfinite(r) for r in rates.values())


def test_codec_rates_canonical_names_and_empty_input() -> None:
    arrays = [np.ones((16, 16), dtype=np.float32)]
    assert set(codec_rates(arrays, ["NONE+zstd"], repeats=1)) == {"encode:zstd", "decode:zstd"}
    assert codec_rates([np.zeros((0,), dtype=np.float32)], ["none"]) == {}
