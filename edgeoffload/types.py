"""Frozen value types shared by every layer, with strict ``to_dict`` / ``from_dict``.

Stdlib only. ``from_dict`` rejects unknown keys, missing keys and wrong types with the error
class the caller names (ProfileError for profile files, ManifestError for manifests), so a
malformed JSON file never surfaces as a KeyError deep inside the code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeoffload.errors import EdgeOffloadError, ProfileError

Dim = int | str
"""A tensor dimension: a concrete size or a symbolic name such as ``"batch"``."""

DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "float64": 8,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "bool": 1,
}


def _finite_float(value: object) -> float | None:
    """``value`` as a finite float, or None (bools, non-numbers, NaN, inf, huge ints)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


class _Fields:
    """Strict reader over a JSON object: every access is typed, leftovers are an error."""

    def __init__(
        self, data: object, what: str, error: type[EdgeOffloadError] = ProfileError
    ) -> None:
        if not isinstance(data, Mapping):
            raise error(f"{what}: expected a JSON object, got {type(data).__name__}")
        self._data = dict(data)
        self._what = what
        self._error = error
        self._seen: set[str] = set()

    def _get(self, key: str, default: object, required: bool) -> object:
        self._seen.add(key)
        if key not in self._data:
            if required:
                raise self._error(f"{self._what}: missing field {key!r}")
            return default
        return self._data[key]

    def value(self, key: str) -> object:
        """A required field of any JSON type (the caller validates it)."""
        return self._get(key, None, True)

    def text(self, key: str, default: str | None = None, *, required: bool = True) -> str:
        value = self._get(key, default, required and default is None)
        if not isinstance(value, str):
            raise self._error(f"{self._what}: field {key!r} must be a string")
        return value

    def opt_text(self, key: str) -> str | None:
        value = self._get(key, None, False)
        if value is not None and not isinstance(value, str):
            raise self._error(f"{self._what}: field {key!r} must be a string or null")
        return value

    def integer(self, key: str, default: int | None = None) -> int:
        value = self._get(key, default, default is None)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._error(f"{self._what}: field {key!r} must be an integer")
        return value

    def number(self, key: str, default: float | None = None, *, positive: bool = False) -> float:
        value = self._get(key, default, default is None)
        number = _finite_float(value)
        if number is None:
            raise self._error(f"{self._what}: field {key!r} must be a finite number")
        if not math.isfinite(number) or number < 0 or (positive and number == 0):
            bound = "positive" if positive else "non-negative"
            raise self._error(f"{self._what}: field {key!r} must be a finite {bound} number")
        return number

    def array(self, key: str, default: list[Any] | None = None) -> list[Any]:
        value = self._get(key, default, default is None)
        if not isinstance(value, list):
            raise self._error(f"{self._what}: field {key!r} must be a list")
        return value

    def obj(self, key: str, default: dict[str, Any] | None = None) -> dict[str, Any]:
        value = self._get(key, default, default is None)
        if not isinstance(value, dict):
            raise self._error(f"{self._what}: field {key!r} must be an object")
        return value

    def done(self) -> None:
        # repr before sorting: a peer's map may mix key types (str and bytes do not compare)
        extra = sorted(repr(k) for k in set(self._data) - self._seen)
        if extra:
            raise self._error(f"{self._what}: unknown field(s) {', '.join(extra)}")


def fields(data: object, what: str, error: type[EdgeOffloadError]) -> _Fields:
    """Strict field reader for ``from_dict`` implementations in other modules."""
    return _Fields(data, what, error)


def dim_terms(dim: str) -> list[str]:
    """The terms of a symbolic dim: exporters write sums such as ``past_sequence_length + 1``."""
    return [term.strip() for term in dim.split("+")]


def resolve_dim(dim: int | str, dims: Mapping[str, int]) -> int | None:
    """A dim's value: an int, a named dim, or a sum of those; None when a name is unknown."""
    if isinstance(dim, int):
        return dim
    if dim in dims:
        return dims[dim]
    if "+" not in dim:
        return None
    total = 0
    for term in dim_terms(dim):
        if term.isdigit():
            total += int(term)
        elif term in dims:
            total += dims[term]
        else:
            return None
    return total


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a tensor; dims may be symbolic (strings)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES.get(self.dtype, 0)

    def resolved(self, dims: Mapping[str, int]) -> tuple[int, ...] | None:
        """The concrete shape given values for the symbolic dims, or None if one is missing."""
        out: list[int] = []
        for dim in self.shape:
            value = resolve_dim(dim, dims)
            if value is None:
                return None
            out.append(value)
        return tuple(out)

    def nbytes(self, dims: Mapping[str, int] | None = None) -> int | None:
        shape = self.resolved(dims or {})
        if shape is None:
            return None
        return math.prod(shape) * self.itemsize

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: object, error: type[EdgeOffloadError] = ProfileError) -> TensorSpec:
        f = _Fields(data, "tensor spec", error)
        name, dtype, shape = f.text("name"), f.text("dtype"), f.array("shape")
        f.done()
        if dtype not in DTYPE_SIZES:
            raise error(f"tensor {name!r}: unsupported dtype {dtype!r}")
        dims: list[Dim] = []
        for dim in shape:
            if isinstance(dim, bool) or not isinstance(dim, int | str):
                raise error(f"tensor {name!r}: dims must be integers or names, got {dim!r}")
            if isinstance(dim, int) and dim < 0:
                raise error(f"tensor {name!r}: negative dim {dim}")
            dims.append(dim)
        return cls(name=name, dtype=dtype, shape=tuple(dims))


@dataclass(frozen=True)
class LinkProfile:
    """A network link between device and server: rates in bits per second, RTT in ms."""

    name: str
    up_bps: float
    down_bps: float
    rtt_ms: float
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "up_bps": self.up_bps,
            "down_bps": self.down_bps,
            "rtt_ms": self.rtt_ms,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: object) -> LinkProfile:
        f = _Fields(data, "link profile")
        link = cls(
            name=f.text("name"),
            up_bps=f.number("up_bps", positive=True),
            down_bps=f.number("down_bps", positive=True),
            rtt_ms=f.number("rtt_ms"),
            source=f.text("source", ""),
        )
        f.done()
        return link


@dataclass(frozen=True)
class PowerModel:
    """Device power draw in watts, for the energy objective (Neurosurgeon-style).

    Defaults are typical smartphone figures: ~2 W for a busy big core cluster, ~1.2 W for the
    radio while transmitting over Wi-Fi/LTE, ~0.9 W receiving and ~0.3 W idle while waiting
    for the server (Carroll & Heiser 2010; Huang et al. MobiSys 2012). Override them per device.
    """

    compute_w: float = 2.0
    radio_tx_w: float = 1.2
    radio_rx_w: float = 0.9
    idle_w: float = 0.3

    def to_dict(self) -> dict[str, Any]:
        return {
            "compute_w": self.compute_w,
            "radio_tx_w": self.radio_tx_w,
            "radio_rx_w": self.radio_rx_w,
            "idle_w": self.idle_w,
        }

    @classmethod
    def from_dict(cls, data: object) -> PowerModel:
        f = _Fields(data, "power model")
        power = cls(
            compute_w=f.number("compute_w", 2.0),
            radio_tx_w=f.number("radio_tx_w", 1.2),
            radio_rx_w=f.number("radio_rx_w", 0.9),
            idle_w=f.number("idle_w", 0.3),
        )
        f.done()
        return power


@dataclass(frozen=True)
class CalibrationPoint:
    """One real timing used to calibrate per-node profile sums.

    ``raw_ms`` is the sum of per-node kernel times (unfused) of the nodes before a cut;
    ``measured_ms`` is the median wall time of a real, optimised head session ending there.
    """

    raw_ms: float
    measured_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {"raw_ms": self.raw_ms, "measured_ms": self.measured_ms}

    @classmethod
    def from_dict(cls, data: object) -> CalibrationPoint:
        f = _Fields(data, "calibration point")
        point = cls(raw_ms=f.number("raw_ms"), measured_ms=f.number("measured_ms"))
        f.done()
        return point


@dataclass(frozen=True)
class DeviceProfile:
    """Measured compute times of one model's nodes on one machine (device or server).

    ``node_ms`` holds per-node kernel times from onnxruntime's profiler with graph
    optimisations off, so every original node has its own time. ``calibration`` maps sums of
    those raw times to wall times of real optimised sessions (fusion, session overhead), and
    ``slowdown`` describes a machine that is N times slower than the one measured.
    ``memory_nodes`` (the memory-bound nodes) and the codec pipeline are slower by a further
    ``memory_slowdown`` (device classes set both: ``core.presets.apply_device_class``).
    """

    name: str
    model_sha256: str
    threads: int
    node_ms: dict[str, float]
    calibration: tuple[CalibrationPoint, ...]
    slowdown: float = 1.0
    power: PowerModel = field(default_factory=PowerModel)
    # Bytes per second the codec pipeline runs at on this machine, per codec name.
    codec_bps: dict[str, float] = field(default_factory=dict)
    machine: str = ""
    memory_slowdown: float = 1.0  # relative to ``slowdown``
    memory_nodes: frozenset[str] = frozenset()

    def with_slowdown(
        self,
        factor: float,
        name: str | None = None,
        *,
        memory_slowdown: float | None = None,
        memory_nodes: frozenset[str] | None = None,
    ) -> DeviceProfile:
        """Slower by ``factor`` everywhere; optionally memory-bound work by a further
        ``memory_slowdown`` (replacing the current one) on ``memory_nodes``."""
        for value in (factor, 1.0 if memory_slowdown is None else memory_slowdown):
            if not math.isfinite(value) or value <= 0:
                raise ProfileError(f"slowdown must be a positive number, got {value}")
        return DeviceProfile(
            name=name or f"{self.name} x{factor:g} slower",
            model_sha256=self.model_sha256,
            threads=self.threads,
            node_ms=self.node_ms,
            calibration=self.calibration,
            slowdown=self.slowdown * factor,
            power=self.power,
            codec_bps=self.codec_bps,
            machine=self.machine,
            memory_slowdown=self.memory_slowdown if memory_slowdown is None else memory_slowdown,
            memory_nodes=self.memory_nodes if memory_nodes is None else memory_nodes,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "edgeoffload.profile",
            "name": self.name,
            "model_sha256": self.model_sha256,
            "threads": self.threads,
            "slowdown": self.slowdown,
            "machine": self.machine,
            "power": self.power.to_dict(),
            "codec_bps": dict(self.codec_bps),
            "calibration": [p.to_dict() for p in self.calibration],
            "node_ms": dict(self.node_ms),
            # only when set, so profiles without a device class keep their old form
            **(
                {
                    "memory_slowdown": self.memory_slowdown,
                    "memory_nodes": sorted(self.memory_nodes),
                }
                if self.memory_slowdown != 1.0
                else {}
            ),
        }

    @classmethod
    def from_dict(cls, data: object) -> DeviceProfile:
        f = _Fields(data, "profile")
        kind = f.text("kind")
        if kind != "edgeoffload.profile":
            raise ProfileError(f"profile: 'kind' is {kind!r}, expected 'edgeoffload.profile'")
        node_ms_raw = f.obj("node_ms")
        node_ms: dict[str, float] = {}
        for key, value in node_ms_raw.items():
            number = _finite_float(value)
            if number is None or number < 0:
                raise ProfileError(f"profile: node_ms[{key!r}] must be a finite number >= 0")
            node_ms[key] = number
        codec_raw = f.obj("codec_bps", {})
        codec_bps: dict[str, float] = {}
        for key, value in codec_raw.items():
            number = _finite_float(value)
            if number is None or number <= 0:
                raise ProfileError(f"profile: codec_bps[{key!r}] must be a finite number > 0")
            codec_bps[key] = number
        profile = cls(
            name=f.text("name"),
            model_sha256=f.text("model_sha256"),
            threads=f.integer("threads"),
            slowdown=f.number("slowdown", 1.0, positive=True),
            machine=f.text("machine", ""),
            power=PowerModel.from_dict(f.obj("power", {})),
            codec_bps=codec_bps,
            calibration=tuple(CalibrationPoint.from_dict(p) for p in f.array("calibration")),
            node_ms=node_ms,
            memory_slowdown=f.number("memory_slowdown", 1.0, positive=True),
            memory_nodes=frozenset(_memory_nodes(f.array("memory_nodes", []), node_ms)),
        )
        f.done()
        if profile.threads < 1:
            raise ProfileError(f"profile: threads must be >= 1, got {profile.threads}")
        return profile


def _memory_nodes(names: list[Any], node_ms: Mapping[str, float]) -> list[str]:
    for name in names:
        if not isinstance(name, str) or name not in node_ms:
            raise ProfileError(f"profile: memory_nodes entry {name!r} is not a profiled node")
    return names


@dataclass(frozen=True)
class CutPoint:
    """One place the model can be cut, with everything the cost model needs about it."""

    index: int  # number of compute nodes in the head
    after: str  # name of the last head node ("" for the all-remote cut)
    layer: str  # readable layer label of the last head node
    boundary: bool  # True when the cut falls between two layers
    tensors: tuple[TensorSpec, ...]  # what crosses, symbolic shapes
    nbytes: int  # bytes that cross at the resolved dims, before any codec
    head_weight_bytes: int
    head_peak_bytes: int  # peak live activation bytes while the head runs (estimate)
    head_depth: int  # parametric layers (Conv/MatMul/Gemm...) in the head

    @property
    def id(self) -> str:
        return f"c{self.index}"

    @property
    def device_memory_bytes(self) -> int:
        return self.head_weight_bytes + self.head_peak_bytes

    def describe(self) -> str:
        if self.index == 0:
            return "all-remote"
        return f"after {self.after}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "index": self.index,
            "after": self.after,
            "layer": self.layer,
            "boundary": self.boundary,
            "tensors": [t.to_dict() for t in self.tensors],
            "nbytes": self.nbytes,
            "head_weight_bytes": self.head_weight_bytes,
            "head_peak_bytes": self.head_peak_bytes,
            "head_depth": self.head_depth,
        }


def match_specs(
    tensors: Sequence[tuple[str, str, tuple[int, ...]]],
    specs: Sequence[TensorSpec],
    *,
    error: type[EdgeOffloadError],
    kind: str = "tensor",
    fixed_dims: Mapping[str, int] | None = None,
    hint: str | None = None,
) -> dict[str, int]:
    """Check ``(name, dtype, shape)`` triples against declared specs; the one rule for both sides.

    The names must be exactly the declared ones (each once); every dtype and rank must match;
    an int dim must equal the size, and a symbolic dim must have one value across all tensors
    (every ``batch`` agrees) and equal ``fixed_dims[dim]`` when that is given. A mismatch raises
    ``error`` (PayloadError for a peer's tensors, UsageError for a caller's inputs) naming the
    tensor as ``kind``; ``hint`` goes with a wrong set of names. Returns the symbolic dims'
    values.
    """
    expected = {s.name: s for s in specs}
    got = [name for name, _, _ in tensors]
    if len(set(got)) != len(got):
        raise error(f"a {kind} name appears twice")
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise error(
            f"{kind}s do not match the bundle: "
            + (f"missing {missing} " if missing else "")
            + (f"unexpected {unexpected}" if unexpected else ""),
            hint=hint,
        )
    bound: dict[str, int] = dict(fixed_dims or {})
    for name, dtype, shape in tensors:
        spec = expected[name]
        if dtype != spec.dtype:
            raise error(f"{kind} {name!r} has dtype {dtype}, expected {spec.dtype}")
        if len(shape) != len(spec.shape):
            raise error(
                f"{kind} {name!r} has shape {list(shape)}, expected {list(spec.shape)} "
                f"(rank {len(shape)}, not {len(spec.shape)})"
            )
        for size, dim in zip(shape, spec.shape, strict=True):
            if isinstance(dim, int):
                if size != dim:
                    raise error(
                        f"{kind} {name!r} has shape {list(shape)}, expected {list(spec.shape)}"
                    )
            elif fixed_dims is not None and dim in fixed_dims and size != fixed_dims[dim]:
                raise error(f"{kind} {name!r}: dim {dim!r} is {size}, it must be {fixed_dims[dim]}")
            elif bound.setdefault(dim, size) != size:
                raise error(
                    f"{kind} {name!r}: dim {dim!r} is {size} here but {bound[dim]} elsewhere"
                )
    return bound


def sample_array(
    name: str, dtype: np.dtype[Any], shape: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    """One deterministic sample input, the rule every sample of a model follows (verification,
    profiling, ORT export): floats standard normal, bools and inputs named like masks ones,
    token types zeros, positions a range, other integers (token ids) uniform in [0, 100)."""
    lname = name.lower()
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b" or "mask" in lname:
        return np.ones(shape, dtype=dtype)
    if "type" in lname:
        return np.zeros(shape, dtype=dtype)
    if "position" in lname and shape:
        positions = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape)
        return np.array(positions)  # a writable copy of the broadcast view
    return rng.integers(0, 100, size=shape).astype(dtype)
