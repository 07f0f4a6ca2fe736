"""Which edge server gets the next request: predicted completion time, two random choices.

A pure policy (no sockets, no clock of its own: ``now`` and the random generator are passed in),
for a device that knows several servers. For every server it keeps what this device measured:

* the link: RTT and uplink rate from :meth:`OffloadClient.measure_link` (a ``LinkProfile``),
  else a moving average of the network time of its own requests;
* the server's tail time, a moving average of the ``server_ms`` its results report (before
  the first, the server's own estimate from its load report);
* the requests this device has in flight there, and the last load report the server sent
  (PROTOCOL.md §14: requests in flight over all devices, workers, draining).

The predicted completion time of a request that sends ``nbytes`` is
``network + wait + tail``, where ``wait = max(0, ahead - workers + 1) / workers x tail`` and
``ahead`` is the larger of this device's requests in flight there and the server's reported
in-flight count (the report includes this device's own requests; taking the larger counts
them once). A draining server is not chosen. :meth:`Router.choose` draws two distinct
available servers at random and takes the one predicted to finish first ("power of two
choices": many devices do not all stampede the one server that looks best); a server never
measured is tried before measured ones, so every server gets measured. A server that fails,
times out or answers ``overloaded`` is backed off (doubling, capped) and becomes eligible again
when its backoff ends; its first success clears it. ``exclude`` lets a retry go to a server the
request has not tried yet, so a request is never sent twice to one server.

Written here rather than taken from a library: load balancers (Envoy, Ray Serve's router)
route on queue lengths inside their own proxies; none predicts split-inference completion from
a device's own link and tail measurements.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from edgeoffload.errors import UsageError
from edgeoffload.protocol.load import ServerLoad
from edgeoffload.types import LinkProfile

EWMA_WEIGHT = 0.3  # weight of the newest measurement in the moving averages
BACKOFF_S = 0.5  # first backoff after a failure; doubles per consecutive failure
MAX_BACKOFF_S = 30.0


@dataclass
class ServerEstimate:
    """What this device has measured of one server."""

    url: str
    link: LinkProfile | None = None
    network_ms: float | None = None  # moving average over this device's requests
    tail_ms: float | None = None  # moving average of the server-reported tail time
    in_flight: int = 0
    load: ServerLoad | None = None  # the server's last load report
    failures: int = 0  # consecutive
    backoff_until: float = 0.0
    failed_fast: bool = False  # the last failure was a quick refusal, not a hang

    @property
    def expected_tail_ms(self) -> float | None:
        """This device's measurement, else what the server reported of itself."""
        if self.tail_ms is not None:
            return self.tail_ms
        return self.load.tail_ms if self.load is not None else None

    @property
    def measured(self) -> bool:
        network_known = self.link is not None or self.network_ms is not None
        return self.expected_tail_ms is not None and network_known

    def predicted_ms(self, nbytes: int) -> float:
        """Predicted completion of a request sending ``nbytes`` (inf when never measured)."""
        tail = self.expected_tail_ms
        if tail is None or not self.measured:
            return math.inf
        if self.link is not None:
            network = self.link.rtt_ms + nbytes * 8 / self.link.up_bps * 1e3
        else:
            assert self.network_ms is not None
            network = self.network_ms
        ahead, workers = self.in_flight, 1
        if self.load is not None:
            ahead, workers = max(ahead, self.load.inflight), self.load.workers
        wait = max(0, ahead - workers + 1) / workers * tail
        return network + wait + tail


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * new


class Router:
    """The per-request choice among ``urls`` (see the module docstring)."""

    def __init__(self, urls: Sequence[str], *, rng: random.Random) -> None:
        if not urls or len(set(urls)) != len(urls):
            raise UsageError("give at least one server, each once")
        self.servers = {url: ServerEstimate(url) for url in urls}
        self._rng = rng

    def available(self, *, now: float, exclude: Iterable[str] = ()) -> list[ServerEstimate]:
        """Servers not backed off at ``now`` and not in ``exclude``, in the given order."""
        skip = set(exclude)
        return [
            s
            for s in self.servers.values()
            if s.url not in skip
            and s.backoff_until <= now
            and not (s.load is not None and s.load.draining)
        ]

    def choose(self, nbytes: int, *, now: float, exclude: Iterable[str] = ()) -> str | None:
        """The server for a request sending ``nbytes``; None when none can take it.

        When every server not in ``exclude`` is backed off, the one whose backoff ends first
        is chosen anyway if its last failure was quick (a refusal such as ``overloaded``, or
        a refused connection: trying again costs a round trip); a server that hung is not.
        So one server alone behaves as one server should — every request tries it — and the
        caller's fallback applies only when no server can answer in time.
        """
        candidates = self.available(now=now, exclude=exclude)
        if not candidates:
            return self._last_resort(exclude)
        unmeasured = [s for s in candidates if not s.measured]
        if unmeasured:
            return self._rng.choice(unmeasured).url
        if len(candidates) == 1:
            return candidates[0].url
        first, second = self._rng.sample(candidates, 2)
        return min((first, second), key=lambda s: s.predicted_ms(nbytes)).url

    def _last_resort(self, exclude: Iterable[str]) -> str | None:
        skip = set(exclude)
        quick = [
            s
            for s in self.servers.values()
            if s.url not in skip and s.failed_fast and not (s.load is not None and s.load.draining)
        ]
        return min(quick, key=lambda s: s.backoff_until).url if quick else None

    def started(self, url: str) -> None:
        self.servers[url].in_flight += 1

    def succeeded(self, url: str, *, network_ms: float, server_ms: float) -> None:
        """A request to ``url`` got its result: its measured network and tail times."""
        server = self.servers[url]
        server.in_flight = max(0, server.in_flight - 1)
        server.network_ms = _average(server.network_ms, network_ms)
        server.tail_ms = _average(server.tail_ms, server_ms)
        server.failures = 0
        server.backoff_until = 0.0
        server.failed_fast = False

    def cancelled(self, url: str) -> None:
        """A request to ``url`` ended without saying anything about the server."""
        server = self.servers[url]
        server.in_flight = max(0, server.in_flight - 1)

    def recovered(self, url: str) -> None:
        """A probe reached ``url`` again: it is back in rotation."""
        server = self.servers[url]
        server.failures = 0
        server.backoff_until = 0.0
        server.failed_fast = False

    def backed_off(self, *, now: float) -> list[str]:
        """Servers that are backed off at ``now`` (candidates for a probe)."""
        return [s.url for s in self.servers.values() if s.backoff_until > now]

    def reported(self, url: str, load: ServerLoad) -> None:
        """The load report that came with a reply of ``url`` (or its status answer)."""
        self.servers[url].load = load

    def failed(self, url: str, *, now: float, fast: bool = False) -> None:
        """A request to ``url`` failed, timed out or was refused as overloaded: back off.
        ``fast``: it failed quickly (see :meth:`choose`)."""
        server = self.servers[url]
        server.failed_fast = fast
        server.in_flight = max(0, server.in_flight - 1)
        server.failures += 1
        delay = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (server.failures - 1))
        server.backoff_until = now + delay
        server.load = None  # from before the failure: a restarted server starts afresh

    def measured_link(self, url: str, link: LinkProfile) -> None:
        """RTT and rates measured to ``url`` (``OffloadClient.measure_link``)."""
        self.servers[url].link = link
