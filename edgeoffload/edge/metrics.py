"""What the edge server counts, and its exposition in Prometheus text format (``GET /metrics``).

:class:`ServerStats` is the one place the server counts things: every count is a plain int or
dict (read in-process, e.g. by tests) and a prometheus-client metric in a registry of this
server's own, so that several servers in one process never share counters. Gauges that
describe the present (requests in flight, sessions, KV bytes, draining) are read from the
server when scraped, never copied.

Labels are bundle versions (the manifest's public hash), request kinds, stages, error codes and
handshake outcomes: never key material, device identities or tensor contents.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Request kinds as counted: a one-shot run, the session messages, and pings.
REQUEST_KINDS = ("run", "open", "prefill", "step", "end", "ping", "invalid")
# Handshake outcomes: admitted, refused for a bundle version not hosted, failed authentication.
HANDSHAKE_RESULTS = ("ok", "version", "auth")
# Server-side stages of a request: "tail" is decoding the tensors and running the tail on a
# worker; "total" runs from admission to the reply being sent (the queue wait included).
STAGES = ("tail", "total")
# Seconds; from a sub-millisecond tail to one that hits the request timeout.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass(frozen=True)
class LiveState:
    """How to read the server's present state when /metrics is scraped."""

    inflight: Callable[[], float]
    max_inflight: Callable[[], float]
    connections_open: Callable[[], float]
    sessions: Callable[[], float]
    kv_bytes: Callable[[], float]
    draining: Callable[[], float]
    # Bundle versions serving / draining (a model repository changes them while running).
    versions_serving: Callable[[], float] | None = None
    versions_draining: Callable[[], float] | None = None


@dataclass
class ServerStats:
    """Counters of one edge server; update them through the methods only."""

    connections: int = 0
    handshakes_ok: int = 0
    handshakes_rejected: int = 0
    requests: int = 0  # requests admitted or refused (runs and session feeds)
    results: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    bundles_loaded: int = 0  # bundle versions loaded (at start and while running)
    bundles_unloaded: int = 0  # versions unloaded after their drain
    bundles_refused: int = 0  # repository versions that failed to load (bad hash, signature)
    batch_sizes: dict[int, int] = field(default_factory=dict)  # batched tail runs by requests
    registry: CollectorRegistry = field(default_factory=CollectorRegistry, repr=False)

    def __post_init__(self) -> None:
        r = self.registry
        self._connections = Counter(
            "edgeoffload_connections", "WebSocket connections accepted.", registry=r
        )
        self._handshakes = Counter(
            "edgeoffload_handshakes", "Handshakes by result.", ["result"], registry=r
        )
        self._requests = Counter(
            "edgeoffload_requests", "Requests by bundle version and kind.", ["bundle", "kind"],
            registry=r,
        )  # fmt: skip
        self._results = Counter(
            "edgeoffload_results", "Requests answered with a result.", ["bundle"], registry=r
        )
        self._errors = Counter(
            "edgeoffload_errors", "Error replies and failed connections by code.", ["code"],
            registry=r,
        )  # fmt: skip
        self._loaded = Counter(
            "edgeoffload_bundle_loaded", "Bundle versions loaded.", ["bundle"], registry=r
        )
        self._unloaded = Counter(
            "edgeoffload_bundle_unloaded", "Bundle versions unloaded after draining.", ["bundle"],
            registry=r,
        )  # fmt: skip
        self._refused = Counter(
            "edgeoffload_bundle_refused",
            "Repository version folders refused at load (bad hash or signature).",
            registry=r,
        )
        self._latency = Histogram(
            "edgeoffload_request_seconds",
            "Server time per answered request, by bundle version and stage.",
            ["bundle", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        self._batch = Histogram(
            "edgeoffload_batch_requests",
            "Requests per batched tail run (dynamic batching on).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )

    def watch(self, live: LiveState) -> None:
        """Expose the server's present state as gauges, read at every scrape."""
        r = self.registry
        for name, doc, read in (
            ("edgeoffload_inflight_requests", "Requests running or queued.", live.inflight),
            ("edgeoffload_max_inflight_requests", "Admission limit.", live.max_inflight),
            ("edgeoffload_open_connections", "Device connections open.", live.connections_open),
            ("edgeoffload_sessions", "Generation sessions held.", live.sessions),
            ("edgeoffload_kv_bytes", "Bytes of tail KV cache held.", live.kv_bytes),
            ("edgeoffload_draining", "1 while the server drains.", live.draining),
        ):
            Gauge(name, doc, registry=r).set_function(read)
        for name, doc, maybe in (
            ("edgeoffload_bundles_serving", "Bundle versions serving.", live.versions_serving),
            ("edgeoffload_bundles_draining", "Bundle versions draining.", live.versions_draining),
        ):
            if maybe is not None:
                Gauge(name, doc, registry=r).set_function(maybe)

    def bundle_loaded(self, bundle: str) -> None:
        self.bundles_loaded += 1
        self._loaded.labels(bundle).inc()

    def bundle_unloaded(self, bundle: str) -> None:
        self.bundles_unloaded += 1
        self._unloaded.labels(bundle).inc()

    def bundle_refused(self) -> None:
        self.bundles_refused += 1
        self._refused.inc()

    def connection(self) -> None:
        self.connections += 1
        self._connections.inc()

    def handshake(self, result: str) -> None:
        """A handshake ended: ``ok``, ``version`` (bundle not hosted) or ``auth``."""
        if result == "ok":
            self.handshakes_ok += 1
        else:
            self.handshakes_rejected += 1
        self._handshakes.labels(result).inc()

    def request(self, bundle: str, kind: str) -> None:
        """A message asking for work arrived (counted whatever its fate)."""
        self._requests.labels(bundle, kind).inc()

    def admission(self) -> None:
        self.requests += 1

    def result(self, bundle: str, *, tail_s: float, total_s: float) -> None:
        self.results += 1
        self._results.labels(bundle).inc()
        self._latency.labels(bundle, "tail").observe(tail_s)
        self._latency.labels(bundle, "total").observe(total_s)

    def batch(self, requests: int, rows: int) -> None:
        """A batched tail run of ``requests`` requests (``rows`` rows) finished."""
        del rows  # requests are what batching is judged by; rows = requests for batch-1 devices
        self.batch_sizes[requests] = self.batch_sizes.get(requests, 0) + 1
        self._batch.observe(requests)

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1
        self._errors.labels(code).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
