"""Load reports (PROTOCOL.md §14): what a server tells its devices about how busy it is.

A device that knows several servers routes each request to the one predicted to answer first
(:mod:`edgeoffload.device.routing`); the server's queue is part of that prediction, and only
the server knows it. Servers therefore attach a :class:`ServerLoad` to every ``result`` and
``token`` and answer a cheap ``status`` request, on connections that negotiated the
``"load"`` feature in the handshake (§14.1), so v1 peers that never asked see nothing new.

A load report is advice from an authenticated peer, not a fact: it is parsed as strictly as
any other field (bounded integers, finite non-negative times, ``queued <= inflight``), and a
report that breaks the rules is a protocol error like any other malformed field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edgeoffload.errors import RemoteProtocolError
from edgeoffload.protocol.wire import MAX_STR, StrictMap

# Features a device may ask for in its hello (§14.1); the server grants those it knows.
FEATURE_LOAD = "load"
FEATURE_UPDATE = "update"  # head updates (§16): offers in the welcome and status, fetch/file
KNOWN_FEATURES = (FEATURE_LOAD, FEATURE_UPDATE)
MAX_FEATURES = 16
MAX_FEATURE_NAME = 64

MAX_LOAD_COUNT = 2**31 - 1  # requests, workers: far above any real server
MAX_LOAD_BYTES = 2**62  # KV budget bytes
MAX_LOAD_MS = 1e9
MAX_STATUS_BUNDLES = 64


def check_features(raw: list[Any], what: str) -> tuple[str, ...]:
    """A hello's or welcome's ``features`` array: distinct short strings, at most 16."""
    if len(raw) > MAX_FEATURES:
        raise RemoteProtocolError(f"{what}: at most {MAX_FEATURES} features, not {len(raw)}")
    names: list[str] = []
    for name in raw:
        if not isinstance(name, str) or not 0 < len(name.encode()) <= MAX_FEATURE_NAME:
            raise RemoteProtocolError(f"{what}: a feature name must be a short string")
        if name in names:
            raise RemoteProtocolError(f"{what}: feature {name!r} listed twice")
        names.append(name)
    return tuple(names)


def _count(m: StrictMap, key: str, limit: int = MAX_LOAD_COUNT) -> int:
    value = m.get(key, int)
    if not 0 <= value <= limit:
        raise RemoteProtocolError(f"{m.what}: {key} out of range")
    return int(value)


def _ms(m: StrictMap, key: str) -> float | None:
    value = m.get(key, (int, float), optional=True)
    if value is None:
        return None
    if isinstance(value, bool) or not (math.isfinite(value) and 0 <= value < MAX_LOAD_MS):
        raise RemoteProtocolError(f"{m.what}: {key} must be a finite, non-negative number")
    return float(value)


@dataclass(frozen=True)
class ServerLoad:
    """A server's state when it wrote a reply (§14.2).

    ``inflight`` counts requests the server admitted and has not answered, over all bundles
    and devices, *not* counting the one the reply answers; ``queued`` of them wait for one of
    the ``workers`` (tail runs at once, shared by all bundles). ``tail_ms`` is the server's
    moving average of this connection's bundle's tail time (None before its first run).
    """

    inflight: int
    queued: int
    workers: int
    kv_free: int  # bytes of the generation-session KV budget not in use
    draining: bool
    tail_ms: float | None = None

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "inflight": self.inflight,
            "queued": self.queued,
            "workers": self.workers,
            "kv_free": self.kv_free,
            "draining": self.draining,
        }
        if self.tail_ms is not None:
            body["tail_ms"] = float(self.tail_ms)
        return body

    @classmethod
    def from_wire(cls, raw: Any) -> ServerLoad:
        if not isinstance(raw, dict):
            raise RemoteProtocolError("load report: must be a map")
        m = StrictMap(raw, "load report")
        load = cls(
            inflight=_count(m, "inflight"),
            queued=_count(m, "queued"),
            workers=_count(m, "workers"),
            kv_free=_count(m, "kv_free", MAX_LOAD_BYTES),
            draining=m.get("draining", bool),
            tail_ms=_ms(m, "tail_ms"),
        )
        m.done()
        if load.queued > load.inflight:
            raise RemoteProtocolError("load report: more requests queued than in flight")
        if load.workers == 0:
            raise RemoteProtocolError("load report: a server has at least one worker")
        return load


@dataclass(frozen=True)
class BundleLoad:
    """One hosted bundle in a ``status`` reply (§14.3)."""

    identity: str
    version: str
    inflight: int  # this bundle's share of the server's in-flight requests
    tail_ms: float | None = None

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "identity": self.identity,
            "version": self.version,
            "inflight": self.inflight,
        }
        if self.tail_ms is not None:
            body["tail_ms"] = float(self.tail_ms)
        return body

    @classmethod
    def from_wire(cls, raw: Any) -> BundleLoad:
        if not isinstance(raw, dict):
            raise RemoteProtocolError("status bundle: must be a map")
        m = StrictMap(raw, "status bundle")
        identity = m.get("identity", str)
        version = m.get("version", str)
        if not (identity and version) or len(identity) > MAX_STR or len(version) > MAX_STR:
            raise RemoteProtocolError("status bundle: identity and version must be non-empty")
        bundle = cls(identity, version, _count(m, "inflight"), _ms(m, "tail_ms"))
        m.done()
        return bundle


def bundles_from_wire(raw: list[Any]) -> tuple[BundleLoad, ...]:
    if len(raw) > MAX_STATUS_BUNDLES:
        raise RemoteProtocolError(f"status: at most {MAX_STATUS_BUNDLES} bundles")
    return tuple(BundleLoad.from_wire(item) for item in raw)
