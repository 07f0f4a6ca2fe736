"""Link presets, device classes and the parsers for their command-line forms (pure).

Link presets are for a device talking to a *nearby* edge server (not a distant cloud):

=========  ========  =========  ======  ===============================================
preset     uplink    downlink   RTT     source
=========  ========  =========  ======  ===============================================
3g         1.1 Mb/s  3 Mb/s     150 ms  uplink: Neurosurgeon (Kang et al., ASPLOS'17)
                                        Table 3; downlink/RTT: typical HSPA figures
lte        5.1 Mb/s  20 Mb/s    50 ms   uplink: Neurosurgeon Table 3; downlink/RTT:
                                        typical LTE (OpenSignal-style national averages)
wifi       18.9 Mb/s 54 Mb/s    5 ms    uplink: Neurosurgeon Table 3 (18.88 Mb/s);
                                        downlink: 802.11g nominal; RTT: same-LAN server
ethernet   1 Gb/s    1 Gb/s     0.5 ms  gigabit Ethernet, one switch hop
=========  ========  =========  ======  ===============================================

An explicit link is ``RATE/RTT`` or ``UP:DOWN/RTT``, e.g. ``10mbit/20ms`` or
``5mbit:40mbit/35ms`` (units: bit, kbit, mbit, gbit — or kbps/mbps/gbps — and ms or s).

Device classes describe real hardware as two slowdown factors against ONE core of the
reference machine the factors were derived on (a 2-core AMD EPYC KVM guest, onnxruntime, one
intra-op thread): ``compute`` for compute-bound nodes (Conv, MatMul, Gemm, ...) and ``memory``
for memory-bound ones (elementwise, normalisation, pooling, data movement), applied per node by
:func:`apply_device_class`. Each class is derived from published single-thread benchmarks of
MobileNetV2 1.0/224 and ResNet-18 on that hardware (:data:`CALIBRATION_SOURCES`, derivation in
``benchmarks/device_calibration.py``). They are estimates: a different runtime, thermal state or
clock moves them by tens of percent. Measure the real device with ``edgeoffload profile`` when
you can — that is the recommended path.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgeoffload.errors import UsageError
from edgeoffload.types import DeviceProfile, LinkProfile

LINK_PRESETS: dict[str, LinkProfile] = {
    "3g": LinkProfile("3g", 1.1e6, 3.0e6, 150.0, "Neurosurgeon ASPLOS'17 Table 3 (uplink)"),
    "lte": LinkProfile("lte", 5.1e6, 20e6, 50.0, "Neurosurgeon ASPLOS'17 Table 3 (uplink)"),
    "wifi": LinkProfile("wifi", 18.88e6, 54e6, 5.0, "Neurosurgeon ASPLOS'17 Table 3 (uplink)"),
    "ethernet": LinkProfile("ethernet", 1e9, 1e9, 0.5, "gigabit Ethernet, one switch hop"),
}

# -- device classes ---------------------------------------------------------------------------

# Op types whose time grows with arithmetic (FLOPs), not with bytes moved; every other op is
# memory-bound (elementwise, normalisation, pooling, reshapes, gathers).
COMPUTE_BOUND_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "ConvInteger",
        "QLinearConv",
        "FusedConv",
        "NhwcConv",
        "MatMul",
        "MatMulInteger",
        "QLinearMatMul",
        "MatMulNBits",
        "FusedMatMul",
        "Gemm",
        "FusedGemm",
        "Einsum",
        "Attention",
        "MultiHeadAttention",
        "GroupQueryAttention",
        "LSTM",
        "GRU",
        "RNN",
    }
)
_CONV_OPS = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "FusedConv"})


def op_class(op_type: str, *, group: int = 1) -> str:
    """``"compute"`` or ``"memory"``: which device factor a node of ``op_type`` gets.

    A grouped (depthwise) convolution is memory-bound: it does ~9 multiply-adds per element it
    reads, against hundreds for a dense convolution, and on small cores it runs at memory speed.
    """
    if op_type in _CONV_OPS and group > 1:
        return "memory"
    return "compute" if op_type in COMPUTE_BOUND_OPS else "memory"


def op_classes_of(nodes: Iterable[Any]) -> dict[str, str]:
    """Node name -> op class for ONNX ``NodeProto``-like objects (``name``, ``op_type``,
    ``attribute``); duck-typed so that this module needs no onnx."""
    classes = {}
    for node in nodes:
        group = next((int(a.i) for a in node.attribute if a.name == "group"), 1)
        classes[node.name] = op_class(node.op_type, group=group)
    return classes


@dataclass(frozen=True)
class CalibrationSource:
    """A published single-thread benchmark a device class is derived from."""

    hardware: str
    url: str
    runtime: str
    threads: int
    ms: Mapping[str, float]  # model ("mobilenet_v2", "resnet18") -> published average ms


@dataclass(frozen=True)
class DeviceClass:
    """A device as slowdown factors against one core of the reference machine.

    ``compute`` scales compute-bound nodes (:func:`op_class`) and the session overhead;
    ``memory`` scales memory-bound nodes and the codec pipeline (quantise, compress, encrypt:
    streaming byte work).
    """

    name: str
    compute: float
    memory: float
    hardware: str = ""

    @property
    def uniform(self) -> float:
        """One slowdown for the whole model: the two factors mixed as in MobileNetV2 (the
        published whole-model ratio). What an emulator that slows everything alike can do."""
        share = REFERENCE_MEMORY_SHARE
        return self.compute * (1.0 - share) + self.memory * share

    @property
    def label(self) -> str:
        if self.compute == self.memory:
            return f"{self.name} (x{self.compute:g} time)"
        return f"{self.name} (x{self.compute:g} compute, x{self.memory:g} memory-bound time)"


_NCNN = "https://github.com/Tencent/ncnn/blob/master/benchmark/README.md"

# Published single-thread times (ncnn benchncnn, fp32, `benchncnn LOOPS 1 ...`: one thread,
# average of the loop) of the two architectures the zoo builds exactly. One runtime for every
# device keeps the devices comparable with each other; ncnn is an ARM-tuned runtime, so the
# ratio to onnxruntime here is runtime + hardware, which is what a deployed device shows.
CALIBRATION_SOURCES: dict[str, CalibrationSource] = {
    "rpi4": CalibrationSource(
        "Raspberry Pi 4 Model B, BCM2711, Cortex-A72 1.8 GHz",
        _NCNN,
        "ncnn benchncnn (fp32)",
        1,
        {"mobilenet_v2": 93.48, "resnet18": 191.10},
    ),
    "rpi5": CalibrationSource(
        "Raspberry Pi 5, BCM2712, Cortex-A76 2.4 GHz",
        _NCNN,
        "ncnn benchncnn (fp32)",
        1,
        {"mobilenet_v2": 16.38, "resnet18": 29.68},
    ),
    "pi-zero-2": CalibrationSource(
        "Raspberry Pi Zero 2 W, BCM2710A1, Cortex-A53 1.0 GHz",
        _NCNN,
        "ncnn benchncnn (fp32)",
        1,
        {"mobilenet_v2": 274.23, "resnet18": 654.69},
    ),
    "phone-mid": CalibrationSource(
        "Snapdragon 675 (Kryo 460 / Cortex-A76 2.0 GHz), Redmi Note 7 Pro",
        _NCNN,
        "ncnn benchncnn (fp32)",
        1,
        {"mobilenet_v2": 38.97, "resnet18": 136.98},
    ),
    "phone-flagship": CalibrationSource(
        "Snapdragon 8 Gen 2 (Cortex-X3 3.2 GHz, big core only)",
        _NCNN,
        "ncnn benchncnn (fp32)",
        1,
        {"mobilenet_v2": 10.02, "resnet18": 21.94},
    ),
}

# Factors fitted by benchmarks/device_calibration.py on the reference machine (2-core AMD EPYC
# KVM guest, onnxruntime 1 thread: MobileNetV2 9.2 ms, ResNet-18 40.2 ms; the run is
# benchmarks/results/device_calibration.json), rounded to two figures. Each reproduces both
# published models; MobileNet v1, left out of the fit, is predicted within 2-18%. A compute
# factor below 1 is what the sources say: ncnn's NEON 3x3 convolutions on a Cortex-A76/X3 core
# beat onnxruntime's on this VM's core, while depthwise and elementwise work stays slower.
DEVICE_CLASSES: dict[str, DeviceClass] = {
    "this-machine": DeviceClass("this-machine", 1.0, 1.0, "the machine a profile was measured on"),
    "rpi4": DeviceClass("rpi4", 4.4, 14.0, CALIBRATION_SOURCES["rpi4"].hardware),
    "rpi5": DeviceClass("rpi5", 0.68, 2.6, CALIBRATION_SOURCES["rpi5"].hardware),
    "pi-zero-2": DeviceClass("pi-zero-2", 15.0, 40.0, CALIBRATION_SOURCES["pi-zero-2"].hardware),
    "phone-mid": DeviceClass("phone-mid", 3.4, 4.9, CALIBRATION_SOURCES["phone-mid"].hardware),
    "phone-flagship": DeviceClass(
        "phone-flagship", 0.51, 1.5, CALIBRATION_SOURCES["phone-flagship"].hardware
    ),
}

# Share of MobileNetV2's profiled time in memory-bound nodes on the reference machine (58%): the
# mix a uniform slowdown (the lab's CPU-quota emulator) stands for, see DeviceClass.uniform.
REFERENCE_MEMORY_SHARE = 0.58

# Old names, kept so scripts keep working; they resolve with a FutureWarning because their
# meaning changed (they were 2x and 4x uniform slowdowns, far too fast for real hardware).
DEVICE_ALIASES: dict[str, str] = {"phone": "phone-mid", "rpi": "rpi4"}

_RATE_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
_RATE = r"(\d+(?:\.\d+)?)\s*([kmg]?)(?:bit|bps|b/s)?"
_LINK_RE = re.compile(rf"^{_RATE}(?::{_RATE})?/(\d+(?:\.\d+)?)\s*(ms|s)$", re.IGNORECASE)


def parse_link(text: str) -> LinkProfile:
    """A preset name or an explicit ``RATE/RTT`` / ``UP:DOWN/RTT`` link."""
    key = text.strip().lower()
    if key in LINK_PRESETS:
        return LINK_PRESETS[key]
    match = _LINK_RE.match(key)
    if not match:
        raise UsageError(
            f"unknown network {text!r}",
            hint=f"use a preset ({', '.join(LINK_PRESETS)}) or RATE/RTT such as 10mbit/20ms "
            "or UP:DOWN/RTT such as 5mbit:40mbit/35ms",
        )
    up_value, up_unit, down_value, down_unit, rtt_value, rtt_unit = match.groups()
    up = float(up_value) * _RATE_UNITS[up_unit.lower()]
    down = float(down_value) * _RATE_UNITS[(down_unit or "").lower()] if down_value else up
    rtt = float(rtt_value) * (1000.0 if rtt_unit.lower() == "s" else 1.0)
    if up <= 0 or down <= 0:
        raise UsageError(f"network {text!r}: rates must be positive")
    return LinkProfile(key, up, down, rtt, "explicit")


def parse_size(text: str) -> int:
    """Bytes from ``512MiB``, ``1.5GB``, ``300M``, ``4096``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*", text, re.IGNORECASE)
    if not match:
        raise UsageError(f"cannot read size {text!r}", hint="examples: 512MiB, 1.5GB, 300M")
    value, prefix, suffix = match.groups()
    base = 1024 if suffix.lower().startswith("i") or (prefix and not suffix) else 1000
    power = " kmgt".index(prefix.lower() or " ")
    return int(float(value) * base**power)


def device_class(text: str) -> DeviceClass:
    """A device class name, an alias (``phone``, ``rpi``: with a FutureWarning), or a uniform
    slowdown factor such as ``3.5`` / ``3.5x`` (how many times slower than the profile).

    Raises:
        UsageError: unknown name, or a factor that is not a finite positive number.
    """
    key = text.strip().lower()
    if key in DEVICE_ALIASES:
        target = DEVICE_ALIASES[key]
        warnings.warn(
            f"device class {key!r} is deprecated and now means {target!r} "
            f"({DEVICE_CLASSES[target].label}); name it explicitly",
            FutureWarning,
            stacklevel=2,
        )
        key = target
    if key in DEVICE_CLASSES:
        return DEVICE_CLASSES[key]
    try:
        value = float(key.rstrip("x"))
    except ValueError:
        raise UsageError(
            f"unknown device class {text!r}",
            hint=f"use one of {', '.join(DEVICE_CLASSES)} or a slowdown factor such as 3.5 "
            "(better: measure the device with `edgeoffload profile`)",
        ) from None
    if not (value > 0 and math.isfinite(value)):
        raise UsageError(f"device slowdown must be a finite positive number, got {text!r}")
    return DeviceClass(f"{value:g}x", value, value)


def apply_device_class(
    profile: DeviceProfile, device: DeviceClass, op_classes: Mapping[str, str]
) -> DeviceProfile:
    """``profile`` (measured on the reference machine) as it would be on ``device``.

    ``op_classes`` maps the profile's node names to ``"compute"`` / ``"memory"``
    (:func:`op_classes_of` the model's nodes); memory-bound nodes get the ``memory`` factor,
    the rest ``compute``. This is the one place a device class reaches a profile: the cost
    model then reads the factors per node. A node missing from ``op_classes`` counts as
    compute-bound: a profile of another model is refused by the cost model itself, with the
    error that says so (:class:`~edgeoffload.errors.PlanError`).
    """
    ratio = device.memory / device.compute
    memory_nodes = frozenset(
        n for n in profile.node_ms if ratio != 1.0 and op_classes.get(n) == "memory"
    )
    return profile.with_slowdown(
        device.compute, name=device.label, memory_slowdown=ratio, memory_nodes=memory_nodes
    )
