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

Device classes describe a device as N times slower than the machine a profile was measured
on: a phone's big core is roughly 2x slower than a current x86 server core on CNN inference,
a Raspberry Pi 4 (Cortex-A72, 1.5 GHz) roughly 4x. They are rough; measure the real device
with ``edgeoffload profile`` when you can.
"""

from __future__ import annotations

import math
import re

from edgeoffload.errors import UsageError
from edgeoffload.types import LinkProfile

LINK_PRESETS: dict[str, LinkProfile] = {
    "3g": LinkProfile("3g", 1.1e6, 3.0e6, 150.0, "Neurosurgeon ASPLOS'17 Table 3 (uplink)"),
    "lte": LinkProfile("lte", 5.1e6, 20e6, 50.0, "Neurosurgeon ASPLOS'17 Table 3 (uplink)"),
    "wifi": LinkProfile("wifi", 18.88e6, 54e6, 5.0, "Neurosurgeon ASPLOS'17 Table 3 (uplink)"),
    "ethernet": LinkProfile("ethernet", 1e9, 1e9, 0.5, "gigabit Ethernet, one switch hop"),
}

DEVICE_CLASSES: dict[str, float] = {
    "this-machine": 1.0,
    "phone": 2.0,
    "rpi": 4.0,
}

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


def device_slowdown(text: str) -> float:
    """A device class name or a number (how many times slower than the profiled machine)."""
    key = text.strip().lower()
    if key in DEVICE_CLASSES:
        return DEVICE_CLASSES[key]
    try:
        value = float(key.rstrip("x"))
    except ValueError:
        raise UsageError(
            f"unknown device class {text!r}",
            hint=f"use one of {', '.join(DEVICE_CLASSES)} or a slowdown factor such as 3.5",
        ) from None
    if not (value > 0 and math.isfinite(value)):
        raise UsageError(f"device slowdown must be a finite positive number, got {text!r}")
    return value
