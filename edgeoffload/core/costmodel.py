"""The cost model: predicted latency / device energy / device memory of every cut (pure).

For a cut with head H and tail T, and a codec C::

    device_ms   = head time on the device            (calibrated profile, x slowdown,
                                                      memory-bound nodes x memory_slowdown)
    encode_ms   = crossing bytes / device codec rate (quantise + compress)
                  + wire bytes / device channel rate (framing + encryption)
                  + wire bytes / websocket rate / 2 + overhead / 2
    network_ms  = RTT + wire bytes(C) / uplink + result bytes / downlink
    decode_ms   = crossing bytes / server codec rate
                  + wire bytes / server channel rate (decryption + checks)
                  + wire bytes / websocket rate / 2 + overhead / 2
    server_ms   = tail time on the server             (calibrated profile, x slowdown)
    total_ms    = device + encode + network + decode + server

All-local (everything on the device, nothing sent) and all-remote (the raw input is sent)
are the two extreme cuts and are always evaluated.

Head times come from per-node kernel times summed over the head and mapped through the
profile's calibration curve (piecewise linear between real timings of optimised head
sessions, see :mod:`edgeoffload.split.profiler`). Tail time is total minus head plus one session
overhead, so head + tail is consistent with the measured full model.

A device class (:func:`edgeoffload.core.presets.apply_device_class`) slows compute-bound and
memory-bound nodes by different factors. The calibrated time of a part is scaled by the
part's time-weighted mean factor (raw ms of each node x its factor, over raw ms), so a head of
pooling and normalisation slows down by the memory factor and a head of convolutions by the
compute factor, while the calibration curve (fusion, session overhead) stays the one measured.

Energy (device only, millijoules since W x ms = mJ)::

    compute_w x (device + encode) + radio_tx_w x uplink + radio_rx_w x downlink
      + idle_w x (RTT + decode + server)
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeoffload.errors import PlanError
from edgeoffload.types import CutPoint, DeviceProfile, LinkProfile

OBJECTIVES = ("latency", "energy")
LOSSLESS_AUTO_CODECS = ("none", "zstd", "lz4")
AUTO_CODECS = ("none", "zstd", "lz4", "fp16", "fp16+zstd")


@dataclass(frozen=True)
class CostBreakdown:
    device_ms: float
    encode_ms: float
    network_ms: float
    decode_ms: float
    server_ms: float
    wire_bytes: int
    energy_mj: float
    device_memory_bytes: int

    @property
    def transfer_ms(self) -> float:
        return self.encode_ms + self.network_ms + self.decode_ms

    @property
    def total_ms(self) -> float:
        return self.device_ms + self.encode_ms + self.network_ms + self.decode_ms + self.server_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_ms": round(self.device_ms, 4),
            "encode_ms": round(self.encode_ms, 4),
            "network_ms": round(self.network_ms, 4),
            "decode_ms": round(self.decode_ms, 4),
            "server_ms": round(self.server_ms, 4),
            "total_ms": round(self.total_ms, 4),
            "wire_bytes": self.wire_bytes,
            "energy_mj": round(self.energy_mj, 4),
            "device_memory_bytes": self.device_memory_bytes,
        }


@dataclass(frozen=True)
class Plan:
    """One cut with one codec and its predicted cost."""

    cut: CutPoint
    codec: str
    cost: CostBreakdown
    feasible: bool = True
    why_infeasible: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "cut": self.cut.id,
            "after": self.cut.after,
            "codec": self.codec,
            "cost": self.cost.to_dict(),
            "feasible": self.feasible,
            "why_infeasible": self.why_infeasible,
        }


@dataclass(frozen=True)
class Constraints:
    max_device_memory: int | None = None  # bytes
    min_head_depth: int = 0  # parametric layers that must run on the device

    def check(self, cut: CutPoint) -> str:
        """Why the cut violates the constraints ("" when it does not)."""
        if self.max_device_memory is not None and cut.device_memory_bytes > self.max_device_memory:
            return (
                f"needs {cut.device_memory_bytes / 2**20:.1f} MiB on the device "
                f"> limit {self.max_device_memory / 2**20:.1f} MiB"
            )
        if cut.head_depth < self.min_head_depth:
            return f"head has {cut.head_depth} layers < min head depth {self.min_head_depth}"
        return ""


@dataclass(frozen=True)
class PlanReport:
    """Every evaluated plan plus the chosen one and the two extremes."""

    objective: str
    best: Plan
    all_local: Plan
    all_remote: Plan
    plans: tuple[Plan, ...]  # best plan per cut, in cut order
    link: LinkProfile
    notes: tuple[str, ...] = field(default=())

    def score(self, plan: Plan) -> float:
        return objective_value(plan, self.objective)

    @property
    def speedup_vs_local(self) -> float:
        return _ratio(self.all_local.cost.total_ms, self.best.cost.total_ms)

    @property
    def speedup_vs_remote(self) -> float:
        return _ratio(self.all_remote.cost.total_ms, self.best.cost.total_ms)

    def to_dict(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "link": self.link.to_dict(),
            "best": self.best.to_dict(),
            "all_local": self.all_local.to_dict(),
            "all_remote": self.all_remote.to_dict(),
            "speedup_vs_local": round(self.speedup_vs_local, 4),
            "speedup_vs_remote": round(self.speedup_vs_remote, 4),
            "notes": list(self.notes),
        }


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def objective_value(plan: Plan, objective: str) -> float:
    return plan.cost.energy_mj if objective == "energy" else plan.cost.total_ms


class ComputeModel:
    """Predicted compute time of any prefix/suffix of the node order on one machine."""

    def __init__(self, profile: DeviceProfile, node_order: Sequence[str]) -> None:
        missing = [n for n in node_order if n not in profile.node_ms]
        if missing:
            raise PlanError(
                f"profile {profile.name!r} has no time for {len(missing)} node(s), "
                f"e.g. {missing[0]!r}: it was measured on another model",
                hint="measure it with: edgeoffload profile MODEL -o profile.json",
            )
        self.profile = profile
        self.prefix_raw = [0.0]
        # the same sums with each node's device factor applied (memory-bound nodes slower)
        self.prefix_scaled = [0.0]
        for name in node_order:
            ms = profile.node_ms[name]
            factor = profile.memory_slowdown if name in profile.memory_nodes else 1.0
            self.prefix_raw.append(self.prefix_raw[-1] + ms)
            self.prefix_scaled.append(self.prefix_scaled[-1] + ms * factor)
        points = sorted((p.raw_ms, p.measured_ms) for p in profile.calibration)
        if not points:
            points = [(0.0, 0.0), (self.prefix_raw[-1], self.prefix_raw[-1])]
        self._xs = [x for x, _ in points]
        # A longer head never takes less time: a hand-edited or noisy curve is made monotone,
        # so tail = full - head can never go negative.
        self._ys = list(itertools.accumulate((y for _, y in points), max))

    def _calibrated(self, raw_ms: float) -> float:
        xs, ys = self._xs, self._ys
        if len(xs) == 1:
            return ys[0] * raw_ms / xs[0] if xs[0] > 0 else ys[0]
        i = bisect.bisect_right(xs, raw_ms)
        i = min(max(i, 1), len(xs) - 1)  # extrapolate with the end segments
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        slope = (y1 - y0) / (x1 - x0) if x1 > x0 else 0.0
        return max(0.0, y0 + slope * (raw_ms - x0))

    def _mean_factor(self, start: int, stop: int) -> float:
        """Time-weighted mean device factor of nodes [start, stop) (1.0 when they take 0 ms)."""
        raw = self.prefix_raw[stop] - self.prefix_raw[start]
        scaled = self.prefix_scaled[stop] - self.prefix_scaled[start]
        return scaled / raw if raw > 0 else 1.0

    @property
    def overhead_ms(self) -> float:
        return self._calibrated(0.0) * self.profile.slowdown

    def head_ms(self, k: int) -> float:
        if k == 0:
            return 0.0
        # the session overhead (the curve at 0 ms) is not node work: compute factor only
        overhead = self._calibrated(0.0)
        compute = (self._calibrated(self.prefix_raw[k]) - overhead) * self._mean_factor(0, k)
        return (compute + overhead) * self.profile.slowdown

    def tail_ms(self, k: int) -> float:
        n = len(self.prefix_raw) - 1
        if k == n:
            return 0.0
        full = self._calibrated(self.prefix_raw[n])
        head = self._calibrated(self.prefix_raw[k]) if k > 0 else self._calibrated(0.0)
        overhead = self._calibrated(0.0)
        compute = (full - head) * self._mean_factor(k, n)
        return (compute + overhead) * self.profile.slowdown


# Fixed cost of one offloaded request in the runtime (asyncio, websockets, msgpack, one AEAD
# message each way), measured with `edgeoffload bench overhead` on a 2-core x86 VM: ~0.9 ms
# for a 4 KiB tensor, of which the per-byte part is negligible. Split between the two sides.
REQUEST_OVERHEAD_MS = 0.9


def _codec_rate(profile: DeviceProfile, direction: str, codec: str) -> float:
    """Raw bytes/s the codec runs at on this machine (``direction``: encode or decode).

    ``transport`` is the secure channel (msgpack framing + AEAD) on wire bytes and
    ``websocket`` the websocket layer (both ends measured together: half is charged to each
    side). Unmeasured rates fall back to defaults: a memcpy for "none", ~1 GB/s for the
    channel, nothing for websockets (old profiles), zstd-like speed for anything else.
    Codecs stream bytes, so a device class slows them by its memory-bound factor.
    """
    rate = profile.codec_bps.get(f"{direction}:{codec}")
    if rate is None:
        rate = {"none": 2e9, "transport": 1e9, "websocket": math.inf}.get(codec, 3e8)
    return rate / (profile.slowdown * profile.memory_slowdown)


def evaluate(
    cuts: Sequence[CutPoint],
    node_order: Sequence[str],
    *,
    device: DeviceProfile,
    server: DeviceProfile,
    link: LinkProfile,
    wire_bytes: Mapping[str, Mapping[str, int]],
    output_bytes: int,
    codecs: Sequence[str] = ("none",),
    objective: str = "latency",
    constraints: Constraints | None = None,
) -> PlanReport:
    """Predict the cost of every cut with every codec and rank them.

    Args:
        cuts: all cuts from :meth:`ModelGraph.cuts`, including c0 and cN.
        node_order: compute node names in topological order (profile keys).
        wire_bytes: per crossing tensor, per codec name, encoded bytes measured on sample
            activations (tensors not listed are sent raw).
        output_bytes: bytes of the model outputs sent back to the device (never quantised).
        codecs: codec names to consider for the crossing tensors.
    """
    if objective not in OBJECTIVES:
        raise PlanError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if not codecs:
        raise PlanError("no codec to consider")
    constraints = constraints or Constraints()
    dev = ComputeModel(device, node_order)
    srv = ComputeModel(server, node_order)
    n = len(node_order)
    power = device.power

    def cost(cut: CutPoint, codec: str) -> CostBreakdown:
        k = cut.index
        device_ms = dev.head_ms(k)
        server_ms = srv.tail_ms(k)
        if k == n:
            return CostBreakdown(
                device_ms,
                0.0,
                0.0,
                0.0,
                0.0,
                0,
                power.compute_w * device_ms,
                cut.device_memory_bytes,
            )
        wire = sum(_wire(wire_bytes, t.name, codec) for t in cut.tensors)
        # Codec on the raw bytes, then the secure channel on the wire bytes (framing,
        # encryption, websocket) plus its fixed cost per request.
        encode_ms = (
            cut.nbytes / _codec_rate(device, "encode", codec)
            + wire / _codec_rate(device, "encrypt", "transport")
            + wire / _codec_rate(device, "both", "websocket") / 2
        ) * 1e3 + REQUEST_OVERHEAD_MS / 2
        decode_ms = (
            cut.nbytes / _codec_rate(server, "decode", codec)
            + wire / _codec_rate(server, "decrypt", "transport")
            + wire / _codec_rate(server, "both", "websocket") / 2
        ) * 1e3 + REQUEST_OVERHEAD_MS / 2
        up_ms = wire * 8 / link.up_bps * 1e3
        down_ms = output_bytes * 8 / link.down_bps * 1e3
        network_ms = link.rtt_ms + up_ms + down_ms
        energy = (
            power.compute_w * (device_ms + encode_ms)
            + power.radio_tx_w * up_ms
            + power.radio_rx_w * down_ms
            + power.idle_w * (link.rtt_ms + decode_ms + server_ms)
        )
        return CostBreakdown(
            device_ms,
            encode_ms,
            network_ms,
            decode_ms,
            server_ms,
            wire,
            energy,
            cut.device_memory_bytes,
        )

    plans: list[Plan] = []
    for cut in cuts:
        options = list(codecs) if cut.index < n else ["none"]
        best: Plan | None = None
        why = constraints.check(cut)
        for codec in options:
            plan = Plan(cut, codec, cost(cut, codec), feasible=not why, why_infeasible=why)
            if best is None or objective_value(plan, objective) < objective_value(best, objective):
                best = plan
        assert best is not None
        plans.append(best)

    by_index = {p.cut.index: p for p in plans}
    if 0 not in by_index or n not in by_index:
        raise PlanError("the cut list must include all-remote (c0) and all-local (cN)")
    feasible = [p for p in plans if p.feasible]
    if not feasible:
        deep_enough = [c for c in cuts if c.head_depth >= constraints.min_head_depth]
        if deep_enough:
            smallest = min(deep_enough, key=lambda c: c.device_memory_bytes)
            hint = (
                f"the smallest device footprint with head depth >= "
                f"{constraints.min_head_depth} is {smallest.device_memory_bytes / 2**20:.1f} MiB"
                f" ({smallest.id}); raise --max-device-memory or lower --min-head-depth"
            )
        else:
            hint = f"no cut has head depth >= {constraints.min_head_depth}; lower --min-head-depth"
        raise PlanError(
            "no cut satisfies the constraints: " + (plans[-1].why_infeasible or "infeasible"),
            hint=hint,
        )
    best_plan = min(feasible, key=lambda p: (objective_value(p, objective), -p.cut.index))
    return PlanReport(
        objective=objective,
        best=best_plan,
        all_local=by_index[n],
        all_remote=by_index[0],
        plans=tuple(plans),
        link=link,
    )


def _wire(wire_bytes: Mapping[str, Mapping[str, int]], tensor: str, codec: str) -> int:
    try:
        return wire_bytes[tensor][codec]
    except KeyError:
        raise PlanError(
            f"no measured wire size for tensor {tensor!r} with codec {codec!r}"
        ) from None
