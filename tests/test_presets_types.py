"""Tests for edgeoffload.core.presets (link / size / device parsers) and edgeoffload.types."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeoffload.core import presets
from edgeoffload.errors import ManifestError, ProfileError, UsageError
from edgeoffload.types import (
    DTYPE_SIZES,
    CalibrationPoint,
    DeviceProfile,
    LinkProfile,
    PowerModel,
    TensorSpec,
)

# -- parse_link ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(presets.LINK_PRESETS))
def test_parse_link_presets(name: str) -> None:
    link = presets.parse_link(name)
    assert link is presets.LINK_PRESETS[name]
    assert link.name == name
    assert link.up_bps > 0 and link.down_bps > 0 and link.rtt_ms >= 0
    # Case and surrounding blanks do not matter for preset names.
    assert presets.parse_link(f"  {name.upper()} ") == link


def test_link_preset_values_match_the_documented_table() -> None:
    table = {
        "3g": (1.1e6, 3e6, 150.0),
        "lte": (5.1e6, 20e6, 50.0),
        "wifi": (18.88e6, 54e6, 5.0),
        "ethernet": (1e9, 1e9, 0.5),
    }
    assert set(table) == set(presets.LINK_PRESETS)
    for name, (up, down, rtt) in table.items():
        link = presets.LINK_PRESETS[name]
        assert (link.up_bps, link.down_bps, link.rtt_ms) == (up, down, rtt)


@pytest.mark.parametrize(
    ("text", "up", "down", "rtt"),
    [
        ("10mbit/20ms", 10e6, 10e6, 20.0),
        ("5mbit:40mbit/35ms", 5e6, 40e6, 35.0),
        ("1gbit/0.5ms", 1e9, 1e9, 0.5),
        ("100kbps/1s", 100e3, 100e3, 1000.0),
        ("2.5Mbps/10ms", 2.5e6, 2.5e6, 10.0),
        ("800bit/0.25s", 800.0, 800.0, 250.0),
        ("1gbps:100mbps/3ms", 1e9, 100e6, 3.0),
    ],
)
def test_parse_link_explicit(text: str, up: float, down: float, rtt: float) -> None:
    link = presets.parse_link(text)
    assert link.up_bps == pytest.approx(up)
    assert link.down_bps == pytest.approx(down)
    assert link.rtt_ms == pytest.approx(rtt)
    assert link.source == "explicit"
    # The parsed link is a valid profile: it survives the strict JSON round trip.
    assert LinkProfile.from_dict(json.loads(json.dumps(link.to_dict()))) == link


@pytest.mark.parametrize(
    "text",
    [
        "",
        "fast",
        "10mbit",  # no RTT
        "10mbit/20",  # RTT without unit
        "/20ms",
        "10tbit/20ms",  # no such unit
        "-5mbit/20ms",
        "10mbit/-20ms",
        "0mbit/20ms",  # zero rate
        "5mbit:0mbit/20ms",
        "10mbit/20ms/3",
        "10 mbit / 20 ms extra",
    ],
)
def test_parse_link_rejects_bad_strings(text: str) -> None:
    with pytest.raises(UsageError) as info:
        presets.parse_link(text)
    err = info.value
    assert err.exit_code == 2
    assert repr(text) in str(err)
    if str(err).startswith("unknown network"):
        assert err.hint is not None and "10mbit/20ms" in err.hint and "wifi" in err.hint


# -- parse_size ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),  # "B" without "i": decimal
        ("300M", 300 * 2**20),  # a bare prefix letter is binary (observed and documented)
        ("300MB", 300_000_000),
        ("4096", 4096),
        ("1k", 1024),
        ("1kB", 1000),
        ("2GiB", 2 * 2**30),
        ("1TiB", 2**40),
        (" 64 mib ", 64 * 2**20),
        ("0", 0),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert presets.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1", "1e9", "12 PB", "5MiBs", "MiB", "1.2.3G"])
def test_parse_size_rejects_bad_strings(text: str) -> None:
    with pytest.raises(UsageError) as info:
        presets.parse_size(text)
    assert info.value.exit_code == 2
    assert info.value.hint is not None and "512MiB" in info.value.hint


# -- device classes -----------------------------------------------------------------------------

REAL_HARDWARE = ("rpi4", "rpi5", "pi-zero-2", "phone-mid", "phone-flagship")


@pytest.mark.parametrize("name", sorted(presets.DEVICE_CLASSES))
def test_device_class_by_name(name: str) -> None:
    device = presets.device_class(name)
    assert device is presets.DEVICE_CLASSES[name]
    assert presets.device_class(f" {name.upper()} ") is device
    assert device.compute > 0 and device.memory > 0


def test_real_hardware_classes_cite_a_published_single_thread_benchmark() -> None:
    for name in REAL_HARDWARE:
        source = presets.CALIBRATION_SOURCES[name]
        assert source.url.startswith("https://")
        assert source.threads == 1
        assert set(source.ms) == {"mobilenet_v2", "resnet18"}
        assert presets.DEVICE_CLASSES[name].hardware == source.hardware
    assert set(presets.DEVICE_CLASSES) == {"this-machine", *REAL_HARDWARE}


def test_device_classes_follow_their_sources() -> None:
    """The fitted factors reproduce the published MobileNetV2 ratios between devices (the
    reference machine's time cancels out of a ratio of two devices)."""
    published = {n: presets.CALIBRATION_SOURCES[n].ms["mobilenet_v2"] for n in REAL_HARDWARE}
    uniform = {n: presets.DEVICE_CLASSES[n].uniform for n in REAL_HARDWARE}
    by_published = sorted(REAL_HARDWARE, key=published.__getitem__)
    assert by_published == sorted(REAL_HARDWARE, key=uniform.__getitem__)
    for a, b in itertools.combinations(REAL_HARDWARE, 2):
        assert uniform[a] / uniform[b] == pytest.approx(published[a] / published[b], rel=0.05)
    # depthwise / elementwise work is slower than dense convolutions on every such device
    assert all(
        presets.DEVICE_CLASSES[n].memory > presets.DEVICE_CLASSES[n].compute for n in uniform
    )
    # a Pi Zero 2 is the slowest, a Pi 4 far slower than the old "rpi" (4x) said
    assert max(uniform, key=uniform.__getitem__) == "pi-zero-2"
    assert uniform["rpi4"] > 8.0


@pytest.mark.parametrize(("alias", "target"), [("phone", "phone-mid"), ("rpi", "rpi4")])
def test_deprecated_names_warn_and_resolve(alias: str, target: str) -> None:
    with pytest.warns(FutureWarning, match=f"now means '{target}'"):
        device = presets.device_class(alias.upper())
    assert device is presets.DEVICE_CLASSES[target]


@pytest.mark.parametrize(
    ("text", "factor"), [("3.5", 3.5), ("2", 2.0), ("4x", 4.0), (" 1.25X ", 1.25), ("0.5", 0.5)]
)
def test_device_class_numbers_are_uniform(text: str, factor: float) -> None:
    device = presets.device_class(text)
    assert device.compute == device.memory == device.uniform == pytest.approx(factor)


@pytest.mark.parametrize("text", ["0", "-1", "fast", "", "x", "nan", "-0.5x", "inf"])
def test_device_class_rejects(text: str) -> None:
    with pytest.raises(UsageError) as info:
        presets.device_class(text)
    assert info.value.exit_code == 2


def test_device_class_unknown_hint_lists_classes_and_profiling() -> None:
    with pytest.raises(UsageError) as info:
        presets.device_class("fast")
    assert info.value.hint is not None
    assert all(name in info.value.hint for name in presets.DEVICE_CLASSES)
    assert "edgeoffload profile" in info.value.hint


@pytest.mark.parametrize(
    ("op_type", "group", "expected"),
    [
        ("Conv", 1, "compute"),
        ("Conv", 32, "memory"),  # depthwise / grouped
        ("MatMul", 1, "compute"),
        ("Gemm", 1, "compute"),
        ("BatchNormalization", 1, "memory"),
        ("Relu", 1, "memory"),
        ("Add", 1, "memory"),
        ("GlobalAveragePool", 1, "memory"),
        ("Transpose", 1, "memory"),
    ],
)
def test_op_class(op_type: str, group: int, expected: str) -> None:
    assert presets.op_class(op_type, group=group) == expected


def test_op_classes_of_reads_the_group_attribute() -> None:
    onnx_helper = pytest.importorskip("onnx.helper")
    nodes = [
        onnx_helper.make_node("Conv", ["x", "w"], ["y"], name="dense"),
        onnx_helper.make_node("Conv", ["y", "w2"], ["z"], name="dw", group=8),
        onnx_helper.make_node("Relu", ["z"], ["r"], name="act"),
    ]
    assert presets.op_classes_of(nodes) == {"dense": "compute", "dw": "memory", "act": "memory"}


def test_apply_device_class_sets_both_factors() -> None:
    profile = _profile()  # slowdown 1.5
    device = presets.DEVICE_CLASSES["rpi4"]
    classes = {"conv1": "compute", "relu1": "memory", "fc": "compute"}
    slow = presets.apply_device_class(profile, device, classes)
    assert slow.slowdown == pytest.approx(1.5 * device.compute)
    assert slow.slowdown * slow.memory_slowdown == pytest.approx(1.5 * device.memory)
    assert slow.memory_nodes == {"relu1"}
    assert slow.node_ms == profile.node_ms and slow.name == device.label
    assert DeviceProfile.from_dict(json.loads(json.dumps(slow.to_dict()))) == slow


def test_apply_device_class_counts_unknown_nodes_as_compute() -> None:
    # a profile of another model is the cost model's to refuse (PlanError, exit 8)
    slow = presets.apply_device_class(_profile(), presets.DEVICE_CLASSES["rpi4"], {})
    assert slow.memory_nodes == frozenset()


# -- TensorSpec ---------------------------------------------------------------------------------

_dims = st.one_of(st.integers(min_value=0, max_value=2**40), st.text(min_size=1, max_size=12))
_specs = st.builds(
    TensorSpec,
    name=st.text(max_size=30),
    dtype=st.sampled_from(sorted(DTYPE_SIZES)),
    shape=st.lists(_dims, max_size=6).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(_specs)
def test_tensor_spec_round_trip(spec: TensorSpec) -> None:
    data = spec.to_dict()
    assert TensorSpec.from_dict(data) == spec
    assert TensorSpec.from_dict(json.loads(json.dumps(data))) == spec


def test_tensor_spec_nbytes() -> None:
    spec = TensorSpec("h", "float32", ("batch", 8, "seq"))
    assert spec.itemsize == 4
    assert spec.nbytes() is None
    assert spec.nbytes({"batch": 2}) is None
    assert spec.resolved({"batch": 2, "seq": 3}) == (2, 8, 3)
    assert spec.nbytes({"batch": 2, "seq": 3}) == 2 * 8 * 3 * 4
    assert TensorSpec("i", "int64", (3, 5)).nbytes() == 120
    assert TensorSpec("b", "bool", (7,)).nbytes() == 7
    assert TensorSpec("h", "float16", (0, 4)).nbytes() == 0
    assert TensorSpec("s", "float64", ()).nbytes() == 8  # a scalar
    assert {d: TensorSpec("t", d, (3,)).nbytes() for d in DTYPE_SIZES} == {
        d: 3 * size for d, size in DTYPE_SIZES.items()
    }


@pytest.mark.parametrize(
    "data",
    [
        {"name": "t", "dtype": "float32", "shape": [1], "extra": 1},  # unknown field
        {"name": "t", "dtype": "float32"},  # missing field
        {"dtype": "float32", "shape": [1]},
        {"name": 3, "dtype": "float32", "shape": [1]},  # wrong types
        {"name": "t", "dtype": "float32", "shape": "1,2"},
        {"name": "t", "dtype": "complex64", "shape": [1]},  # unsupported dtype
        {"name": "t", "dtype": "float32", "shape": [-1]},  # negative dim
        {"name": "t", "dtype": "float32", "shape": [True]},  # bool is not an int dim
        {"name": "t", "dtype": "float32", "shape": [1.5]},
        {"name": "t", "dtype": "float32", "shape": [None]},
        ["t", "float32", [1]],  # not an object
        None,
    ],
)
def test_tensor_spec_from_dict_rejects(data: Any) -> None:
    with pytest.raises(ProfileError):
        TensorSpec.from_dict(data)
    # The caller chooses the error class (manifests use ManifestError).
    with pytest.raises(ManifestError):
        TensorSpec.from_dict(data, ManifestError)


# -- LinkProfile --------------------------------------------------------------------------------

_positive = st.floats(min_value=1e-3, max_value=1e12, allow_nan=False, allow_infinity=False)
_links = st.builds(
    LinkProfile,
    name=st.text(max_size=20),
    up_bps=_positive,
    down_bps=_positive,
    rtt_ms=st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False),
    source=st.text(max_size=20),
)


@settings(max_examples=200, deadline=None)
@given(_links)
def test_link_profile_round_trip(link: LinkProfile) -> None:
    assert LinkProfile.from_dict(link.to_dict()) == link
    assert LinkProfile.from_dict(json.loads(json.dumps(link.to_dict()))) == link


_DROP = object()  # marks a field to delete


def _link_dict(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "l",
        "up_bps": 1e6,
        "down_bps": 2e6,
        "rtt_ms": 10.0,
        "source": "test",
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not _DROP}


def test_link_profile_source_is_optional() -> None:
    link = LinkProfile.from_dict(_link_dict(source=_DROP))
    assert link.source == ""
    assert LinkProfile.from_dict(_link_dict(rtt_ms=0)).rtt_ms == 0.0  # zero RTT is allowed


@pytest.mark.parametrize(
    "changes",
    [
        {"extra": 1},
        {"name": _DROP},
        {"up_bps": _DROP},
        {"rtt_ms": _DROP},
        {"name": 5},
        {"up_bps": "fast"},
        {"up_bps": True},  # bool is not a number
        {"up_bps": 0},  # rates must be positive
        {"down_bps": -1.0},
        {"rtt_ms": -0.1},
        {"rtt_ms": float("nan")},
        {"up_bps": float("inf")},
        {"down_bps": float("nan")},
        {"source": None},
    ],
)
def test_link_profile_from_dict_rejects(changes: dict[str, Any]) -> None:
    with pytest.raises(ProfileError):
        LinkProfile.from_dict(_link_dict(**changes))


def test_link_profile_from_dict_huge_integer_is_a_profile_error() -> None:
    data = json.loads('{"name": "l", "up_bps": 1' + "0" * 400 + ', "down_bps": 1, "rtt_ms": 1}')
    with pytest.raises(ProfileError):
        LinkProfile.from_dict(data)


# -- PowerModel / CalibrationPoint --------------------------------------------------------------


def test_power_model_round_trip_and_defaults() -> None:
    power = PowerModel(compute_w=3.5, radio_tx_w=1.0, radio_rx_w=0.5, idle_w=0.0)
    assert PowerModel.from_dict(power.to_dict()) == power
    assert PowerModel.from_dict({}) == PowerModel()
    assert PowerModel.from_dict({"idle_w": 0.1}) == PowerModel(idle_w=0.1)


@pytest.mark.parametrize(
    "data",
    [
        {"compute_w": -1.0},
        {"idle_w": float("nan")},
        {"radio_tx_w": True},
        {"radio_rx_w": "1"},
        {"watts": 2.0},
        [],
    ],
)
def test_power_model_from_dict_rejects(data: Any) -> None:
    with pytest.raises(ProfileError):
        PowerModel.from_dict(data)


def test_calibration_point_round_trip() -> None:
    point = CalibrationPoint(raw_ms=1.25, measured_ms=0.75)
    assert CalibrationPoint.from_dict(point.to_dict()) == point
    assert CalibrationPoint.from_dict({"raw_ms": 0, "measured_ms": 2}) == CalibrationPoint(0, 2)


@pytest.mark.parametrize(
    "data",
    [
        {"raw_ms": 1.0},
        {"raw_ms": 1.0, "measured_ms": 2.0, "x": 0},
        {"raw_ms": -1.0, "measured_ms": 2.0},
        {"raw_ms": float("nan"), "measured_ms": 2.0},
        {"raw_ms": 1.0, "measured_ms": False},
        {"raw_ms": "1", "measured_ms": 2.0},
    ],
)
def test_calibration_point_from_dict_rejects(data: dict[str, Any]) -> None:
    with pytest.raises(ProfileError):
        CalibrationPoint.from_dict(data)


# -- DeviceProfile ------------------------------------------------------------------------------


def _profile() -> DeviceProfile:
    return DeviceProfile(
        name="laptop",
        model_sha256="ab" * 32,
        threads=2,
        node_ms={"conv1": 0.5, "relu1": 0.0, "fc": 1.25},
        calibration=(CalibrationPoint(0.5, 0.6), CalibrationPoint(1.75, 1.9)),
        slowdown=1.5,
        power=PowerModel(compute_w=4.0),
        codec_bps={"none": 1e9, "zstd": 2.5e8},
        machine="x86_64, 2 cores",
    )


def test_device_profile_round_trip() -> None:
    profile = _profile()
    data = profile.to_dict()
    assert data["kind"] == "edgeoffload.profile"
    assert DeviceProfile.from_dict(data) == profile
    assert DeviceProfile.from_dict(json.loads(json.dumps(data))) == profile


def test_device_profile_optional_fields_default() -> None:
    data = _profile().to_dict()
    for key in ("slowdown", "machine", "power", "codec_bps"):
        del data[key]
    profile = DeviceProfile.from_dict(data)
    assert profile.slowdown == 1.0
    assert profile.machine == ""
    assert profile.power == PowerModel()
    assert profile.codec_bps == {}


def _profile_dict(**changes: Any) -> dict[str, Any]:
    data = _profile().to_dict()
    for key, value in changes.items():
        if value is _DROP:
            del data[key]
        else:
            data[key] = value
    return data


@pytest.mark.parametrize(
    "changes",
    [
        {"extra": 1},
        {"kind": "edgeoffload.manifest"},
        {"kind": _DROP},
        {"name": _DROP},
        {"node_ms": _DROP},
        {"calibration": _DROP},
        {"threads": _DROP},
        {"threads": 2.0},  # float where an int is expected
        {"threads": True},  # bool where an int is expected
        {"threads": "2"},
        {"name": None},
        {"slowdown": 0},
        {"slowdown": -2.0},
        {"slowdown": float("nan")},
        {"slowdown": float("inf")},
        {"node_ms": {"a": -1.0}},
        {"node_ms": {"a": True}},
        {"node_ms": {"a": "1"}},
        {"node_ms": [1.0]},
        {"codec_bps": {"zstd": 0}},
        {"codec_bps": {"zstd": -5.0}},
        {"codec_bps": {"zstd": False}},
        {"calibration": [{"raw_ms": 1.0}]},
        {"calibration": [{"raw_ms": 1.0, "measured_ms": -1.0}]},
        {"calibration": {"raw_ms": 1.0, "measured_ms": 1.0}},
        {"power": {"compute_w": -1.0}},
        {"power": {"bogus": 1.0}},
        {"machine": 3},
    ],
)
def test_device_profile_from_dict_rejects(changes: dict[str, Any]) -> None:
    with pytest.raises(ProfileError):
        DeviceProfile.from_dict(_profile_dict(**changes))


@pytest.mark.parametrize(
    "changes",
    [
        {"node_ms": {"a": float("nan")}},
        {"node_ms": {"a": float("inf")}},
        {"codec_bps": {"zstd": float("nan")}},
        {"codec_bps": {"zstd": float("inf")}},
        {"threads": -1},
        {"threads": 0},
    ],
)
def test_device_profile_from_dict_rejects_nonfinite_and_nonpositive(
    changes: dict[str, Any],
) -> None:
    with pytest.raises(ProfileError):
        DeviceProfile.from_dict(_profile_dict(**changes))


def test_device_profile_with_slowdown() -> None:
    profile = _profile()
    slower = profile.with_slowdown(4.0)
    assert slower.slowdown == pytest.approx(6.0)  # 1.5 x 4
    assert slower.name == "laptop x4 slower"
    assert slower.node_ms == profile.node_ms
    assert slower.calibration == profile.calibration
    assert slower.codec_bps == profile.codec_bps
    assert slower.power == profile.power
    assert (slower.threads, slower.model_sha256, slower.machine) == (
        profile.threads,
        profile.model_sha256,
        profile.machine,
    )
    assert profile.slowdown == 1.5  # the original is untouched
    assert profile.with_slowdown(0.5, name="fast box").name == "fast box"
    assert profile.with_slowdown(2).with_slowdown(3).slowdown == pytest.approx(9.0)
    assert DeviceProfile.from_dict(slower.to_dict()) == slower


@pytest.mark.parametrize("factor", [0.0, -1.0, math.nan, math.inf])
def test_device_profile_with_slowdown_rejects(factor: float) -> None:
    with pytest.raises(ProfileError):
        _profile().with_slowdown(factor)
    with pytest.raises(ProfileError):
        _profile().with_slowdown(2.0, memory_slowdown=factor)


def test_device_profile_without_memory_factor_keeps_its_old_form() -> None:
    data = _profile().with_slowdown(2.0).to_dict()
    assert "memory_slowdown" not in data and "memory_nodes" not in data


def test_device_profile_memory_factor_survives_with_slowdown() -> None:
    slow = _profile().with_slowdown(2.0, memory_slowdown=3.0, memory_nodes=frozenset({"fc"}))
    slower = slow.with_slowdown(2.0)
    assert slower.memory_slowdown == 3.0 and slower.memory_nodes == {"fc"}
    assert slower.slowdown == pytest.approx(6.0)


@pytest.mark.parametrize("nodes", [["nope"], [3], "fc"])
def test_device_profile_rejects_bad_memory_nodes(nodes: Any) -> None:
    data = _profile().with_slowdown(1.0, memory_slowdown=2.0, memory_nodes=frozenset({"fc"}))
    raw = data.to_dict()
    raw["memory_nodes"] = nodes
    with pytest.raises(ProfileError):
        DeviceProfile.from_dict(raw)
