"""Generation sessions on the edge server: the tail's KV cache per conversation.

A session belongs to the device key that opened it and to one hosted bundle version; another
device asking for it gets the same answer as for a session that never existed. Sessions expire
after ``ttl`` seconds without use, and the store keeps the sum of their KV caches under
``budget_bytes`` by evicting the least recently used session *of the device that holds the
most*: a device that opens many sessions or grows one to the budget evicts its own sessions
before anyone else's. An evicted or expired session is *lost*, not an error of the device: it
rebuilds the session from its own token history.

No I/O and no clock of its own: ``now`` is passed in, so tests need no sleeping.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgeoffload.core.decoder import KVState
from edgeoffload.core.sampling import SamplingParams
from edgeoffload.errors import Overloaded, SessionError, SessionLost


@dataclass
class Session:
    session_id: int
    owner: bytes  # the device's static public key
    version: str  # hosted bundle version
    sampling: SamplingParams
    kv: KVState
    last_used: float
    busy: bool = False  # a prefill/step is running: never evicted under it
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.kv.length


class SessionStore:
    """Sessions by id, least recently used first.

    Args:
        ttl: seconds a session may stay unused before it is dropped.
        budget_bytes: total KV-cache bytes kept for all sessions together.
        max_sessions: sessions kept at once (the oldest idle one makes room).
    """

    def __init__(
        self, *, ttl: float = 600.0, budget_bytes: int = 1 << 30, max_sessions: int = 1024
    ) -> None:
        self.ttl = ttl
        self.budget_bytes = budget_bytes
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[int, Session] = OrderedDict()
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def nbytes(self) -> int:
        return sum(s.kv.nbytes for s in self._sessions.values())

    def open(
        self,
        *,
        owner: bytes,
        version: str,
        sampling: SamplingParams,
        make_kv: Callable[[], KVState],
        now: float,
    ) -> Session:
        self.expire(now)
        while len(self._sessions) >= self.max_sessions and self._evict_one(
            keep=None, by_count=True
        ):
            pass
        if len(self._sessions) >= self.max_sessions:
            raise SessionError(f"the server holds {self.max_sessions} busy sessions")
        session_id = secrets.randbits(63)
        while session_id in self._sessions:
            session_id = secrets.randbits(63)
        session = Session(session_id, owner, version, sampling, make_kv(), now)
        self._sessions[session_id] = session
        return session

    def get(self, session_id: int, *, owner: bytes, version: str, now: float) -> Session:
        """The caller's session, marked as just used; SessionLost if it is not here (any more)."""
        self.expire(now)
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner or session.version != version:
            raise SessionLost(f"no session {session_id} (expired, evicted or never opened)")
        session.last_used = now
        self._sessions.move_to_end(session_id)
        return session

    def close(self, session_id: int, *, owner: bytes, version: str, now: float) -> None:
        self.get(session_id, owner=owner, version=version, now=now)
        del self._sessions[session_id]

    def drop(self, session_id: int) -> None:
        self._sessions.pop(session_id, None)

    def drop_owner(self, owner: bytes) -> int:
        """Drop every session of ``owner`` (a revoked key); how many there were."""
        mine = [i for i, s in self._sessions.items() if s.owner == owner]
        for session_id in mine:
            del self._sessions[session_id]
        return len(mine)

    def count(self, version: str) -> int:
        """Sessions held on bundle ``version`` (a draining version waits for them)."""
        return sum(1 for s in self._sessions.values() if s.version == version)

    def drop_version(self, version: str) -> int:
        """Drop the idle sessions of ``version`` (a version retired by force); how many."""
        mine = [i for i, s in self._sessions.items() if s.version == version and not s.busy]
        for session_id in mine:
            del self._sessions[session_id]
        return len(mine)

    def expire(self, now: float) -> None:
        for session_id, session in list(self._sessions.items()):
            if not session.busy and now - session.last_used > self.ttl:
                del self._sessions[session_id]
                self.expired += 1

    def compact_idle(self, now: float, idle: float) -> int:
        """Make the borrowed caches (views of a batched step, edge.stepbatch) of sessions
        unused for ``idle`` seconds their own; how many. Never a busy session: its feed may
        be running on a worker thread right now."""
        compacted = 0
        for session in self._sessions.values():
            if session.kv.borrowed and not session.busy and now - session.last_used >= idle:
                session.kv.compact()
                compacted += 1
        return compacted

    def make_room(self, session: Session, extra_bytes: int) -> None:
        """Evict least recently used sessions so that ``session`` can grow by ``extra_bytes``.

        A session that alone would not fit the budget is refused (SessionError); nothing is
        evicted for it.
        """
        if session.kv.nbytes + extra_bytes > self.budget_bytes:
            raise SessionError(
                f"the session's KV cache would need {session.kv.nbytes + extra_bytes} bytes, "
                f"over the server's budget of {self.budget_bytes}",
                hint="use a shorter context, or raise the server's --kv-budget",
            )
        while self.nbytes + extra_bytes > self.budget_bytes:
            if not self._evict_one(keep=session.session_id):
                raise Overloaded("the server's KV budget is taken by running sessions")

    def _evict_one(self, *, keep: int | None, by_count: bool = False) -> bool:
        """Evict the least recently used idle session of the owner holding the most KV bytes
        (``by_count``: the most sessions) — fair share, the biggest holder pays first; False
        when nothing can be evicted."""
        nbytes: dict[bytes, int] = {}
        count: dict[bytes, int] = {}
        for session in self._sessions.values():
            nbytes[session.owner] = nbytes.get(session.owner, 0) + session.kv.nbytes
            count[session.owner] = count.get(session.owner, 0) + 1
        candidates = {s.owner for i, s in self._sessions.items() if i != keep and not s.busy}
        if not candidates:
            return False

        def share(owner: bytes) -> tuple[int, int]:
            return (count[owner], nbytes[owner]) if by_count else (nbytes[owner], count[owner])

        biggest = max(candidates, key=share)
        for session_id, session in self._sessions.items():
            if session_id != keep and not session.busy and session.owner == biggest:
                del self._sessions[session_id]
                self.evicted += 1
                return True
        return False
