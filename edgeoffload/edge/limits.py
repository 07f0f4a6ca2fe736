"""The edge server's front door: what a connection may hold before it has authenticated.

Checked when the TCP connection is accepted, before any HTTP or websocket parsing, so a
refusal costs tens of microseconds (nginx's ``limit_conn``/``limit_req`` in spirit):

* at most ``max_connections`` open connections, and ``max_per_address`` per source address;
* new connections per source address go through a token bucket (``rate`` per second, bursts
  of ``burst``), which bounds the Diffie-Hellman work one address can ask for;
* at most ``max_unauthenticated`` connections that have not finished the Noise handshake. A
  new one beyond that evicts the *oldest* unauthenticated connection rather than being
  refused: a flood of idle or unfinished connections then cannot lock honest devices out,
  whose handshakes finish in milliseconds.

Everything else that bounds memory before authentication lives in the server: the websocket
message limit is the hello's size until the handshake succeeds, and the handshake deadline.
Pure bookkeeping, no I/O: the server aborts what :meth:`ConnectionLimits.opened` names.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from edgeoffload.errors import UsageError

MAX_BUCKETS = 65536  # source addresses remembered by the rate limit


@dataclass(frozen=True)
class Limits:
    """Defaults sized for one edge server on a LAN: far above what honest devices need."""

    max_connections: int = 4096
    max_per_address: int = 256
    max_unauthenticated: int = 256
    rate: float = 50.0  # new connections per second per address
    burst: int = 200

    def __post_init__(self) -> None:
        counts = (self.max_connections, self.max_per_address, self.max_unauthenticated)
        if min(counts) < 1 or self.burst < 1 or not self.rate > 0:
            raise UsageError(f"connection limits must be positive, got {self}")


class ConnectionLimits:
    """Counts connections by state and source address (see the module docstring)."""

    def __init__(self, limits: Limits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._open: dict[Hashable, str] = {}
        self._per_address: Counter[str] = Counter()
        self._unauthenticated: OrderedDict[Hashable, None] = OrderedDict()
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, at)
        self.refused: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._open)

    @property
    def unauthenticated(self) -> int:
        return len(self._unauthenticated)

    def opened(self, conn: Hashable, address: str) -> tuple[bool, list[Hashable]]:
        """A TCP connection from ``address`` was accepted.

        Returns:
            (admitted, evicted): when not admitted the caller aborts ``conn`` at once; it
            aborts every ``evicted`` connection (unauthenticated ones pushed out by it).
        """
        reason = self._refusal(address)
        if reason is not None:
            self.refused[reason] += 1
            return False, []
        self._open[conn] = address
        self._per_address[address] += 1
        self._unauthenticated[conn] = None
        evicted = []
        while len(self._unauthenticated) > self.limits.max_unauthenticated:
            oldest, _ = self._unauthenticated.popitem(last=False)
            evicted.append(oldest)
            self.refused["evicted_unauthenticated"] += 1
        return True, evicted

    def authenticated(self, conn: Hashable) -> None:
        """``conn`` finished the handshake: it no longer counts as unauthenticated."""
        self._unauthenticated.pop(conn, None)

    def closed(self, conn: Hashable) -> None:
        address = self._open.pop(conn, None)
        self._unauthenticated.pop(conn, None)
        if address is None:
            return
        self._per_address[address] -= 1
        if self._per_address[address] <= 0:
            del self._per_address[address]

    def _refusal(self, address: str) -> str | None:
        if len(self._open) >= self.limits.max_connections:
            return "connections"
        if self._per_address[address] >= self.limits.max_per_address:
            return "per_address"
        if not self._take_token(address):
            return "rate"
        return None

    def _take_token(self, address: str) -> bool:
        now = self._clock()
        burst = float(self.limits.burst)
        tokens, at = self._buckets.get(address, (burst, now))
        tokens = min(burst, tokens + (now - at) * self.limits.rate)
        if tokens < 1.0:
            self._buckets[address] = (tokens, now)
            return False
        if address not in self._buckets and len(self._buckets) >= MAX_BUCKETS:
            self._forget_full_buckets(now)
        self._buckets[address] = (tokens - 1.0, now)
        return True

    def _forget_full_buckets(self, now: float) -> None:
        """Drop addresses whose bucket has refilled (they are as new); if none has, the
        oldest half (an address flood: each then starts with a full bucket, still bounded
        by the connection caps)."""
        burst = float(self.limits.burst)
        full = [
            a for a, (t, at) in self._buckets.items() if t + (now - at) * self.limits.rate >= burst
        ]
        for a in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[a]
