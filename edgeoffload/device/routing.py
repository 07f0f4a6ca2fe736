"""Which edge server gets the next request: predicted completion time, two random choices.

A pure policy (no sockets, no clock of its own: ``now`` and the random generator are passed in),
for a device that knows several servers. For every server it keeps what this device measured:

* the link: RTT and uplink rate from :meth:`OffloadClient.measure_link` (a ``LinkProfile``),
  else a moving average of the network time of its own requests;
* the server's tail time, a moving average of the ``server_ms`` its results report;
* the requests this device has in flight there (its share of the server's queue).

The predicted completion time of a request that sends ``nbytes`` is
``network + (in flight here) x tail + tail``. :meth:`Router.choose` draws two distinct
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
    failures: int = 0  # consecutive
    backoff_until: float = 0.0

    @property
    def measured(self) -> bool:
        return self.tail_ms is not None and (self.link is not None or self.network_ms is not None)

    def predicted_ms(self, nbytes: int) -> float:
        """Predicted completion of a request sending ``nbytes`` (inf when never measured)."""
        if not self.measured:
            return math.inf
        assert self.tail_ms is not None
        if self.link is not None:
            network = self.link.rtt_ms + nbytes * 8 / self.link.up_bps * 1e3
        else:
            assert self.network_ms is not None
            network = self.network_ms
        return network + self.in_flight * self.tail_ms + self.tail_ms


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
        return [s for s in self.servers.values() if s.url not in skip and s.backoff_until <= now]

    def choose(self, nbytes: int, *, now: float, exclude: Iterable[str] = ()) -> str | None:
        """The server for a request sending ``nbytes``; None when none is available."""
        candidates = self.available(now=now, exclude=exclude)
        if not candidates:
            return None
        unmeasured = [s for s in candidates if not s.measured]
        if unmeasured:
            return self._rng.choice(unmeasured).url
        if len(candidates) == 1:
            return candidates[0].url
        first, second = self._rng.sample(candidates, 2)
        return min((first, second), key=lambda s: s.predicted_ms(nbytes)).url

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

    def failed(self, url: str, *, now: float) -> None:
        """A request to ``url`` failed, timed out or was refused as overloaded: back off."""
        server = self.servers[url]
        server.in_flight = max(0, server.in_flight - 1)
        server.failures += 1
        delay = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (server.failures - 1))
        server.backoff_until = now + delay

    def measured_link(self, url: str, link: LinkProfile) -> None:
        """RTT and rates measured to ``url`` (``OffloadClient.measure_link``)."""
        self.servers[url].link = link
