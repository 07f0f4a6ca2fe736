"""Every rule of the protocol that changes state, as data and pure functions (h11-style).

Two machines live here. The connection's: :data:`TRANSITIONS` lists every (role, state,
action) that is allowed and the state it leads to (PROTOCOL.md §3); anything not listed is a
protocol error, raised by :func:`next_state`. And a generation session's on the edge server
(PROTOCOL.md §12): how many positions a new session is granted (:func:`grant_max_tokens`) and
which prefill or step it accepts next (:func:`check_feed`). No I/O: callers pass the facts in.
"""

from __future__ import annotations

import enum

from edgeoffload.errors import LocalProtocolError, RemoteProtocolError, SessionError


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    IDLE = "idle"  # client: nothing sent yet
    AWAIT_HELLO = "await-hello"  # server: waiting for handshake message 1
    HANDSHAKE_SENT = "handshake-sent"  # client: message 1 sent, waiting for message 2
    READY = "ready"  # transport established: requests, results, pings
    CLOSED = "closed"


# The whole transition table (PROTOCOL.md §3). Anything not listed is a protocol error.
TRANSITIONS: dict[tuple[Role, State, str], State] = {
    (Role.CLIENT, State.IDLE, "send:hello"): State.HANDSHAKE_SENT,
    (Role.CLIENT, State.HANDSHAKE_SENT, "recv:welcome"): State.READY,
    (Role.CLIENT, State.HANDSHAKE_SENT, "recv:refused"): State.CLOSED,
    (Role.CLIENT, State.READY, "send:run"): State.READY,
    (Role.CLIENT, State.READY, "send:ping"): State.READY,
    (Role.CLIENT, State.READY, "send:open"): State.READY,
    (Role.CLIENT, State.READY, "send:prefill"): State.READY,
    (Role.CLIENT, State.READY, "send:step"): State.READY,
    (Role.CLIENT, State.READY, "send:end"): State.READY,
    (Role.CLIENT, State.READY, "send:status"): State.READY,
    (Role.CLIENT, State.READY, "recv:status"): State.READY,
    (Role.CLIENT, State.READY, "send:fetch"): State.READY,
    (Role.CLIENT, State.READY, "recv:file"): State.READY,
    (Role.CLIENT, State.READY, "recv:opened"): State.READY,
    (Role.CLIENT, State.READY, "recv:token"): State.READY,
    (Role.CLIENT, State.READY, "recv:ended"): State.READY,
    (Role.CLIENT, State.READY, "recv:result"): State.READY,
    (Role.CLIENT, State.READY, "recv:error"): State.READY,
    (Role.CLIENT, State.READY, "recv:pong"): State.READY,
    (Role.CLIENT, State.READY, "send:close"): State.CLOSED,
    (Role.CLIENT, State.READY, "recv:close"): State.CLOSED,
    (Role.SERVER, State.AWAIT_HELLO, "recv:hello"): State.READY,
    (Role.SERVER, State.AWAIT_HELLO, "send:refused"): State.CLOSED,
    (Role.SERVER, State.READY, "recv:run"): State.READY,
    (Role.SERVER, State.READY, "recv:ping"): State.READY,
    (Role.SERVER, State.READY, "recv:open"): State.READY,
    (Role.SERVER, State.READY, "recv:prefill"): State.READY,
    (Role.SERVER, State.READY, "recv:step"): State.READY,
    (Role.SERVER, State.READY, "recv:end"): State.READY,
    (Role.SERVER, State.READY, "recv:status"): State.READY,
    (Role.SERVER, State.READY, "send:status"): State.READY,
    (Role.SERVER, State.READY, "recv:fetch"): State.READY,
    (Role.SERVER, State.READY, "send:file"): State.READY,
    (Role.SERVER, State.READY, "send:opened"): State.READY,
    (Role.SERVER, State.READY, "send:token"): State.READY,
    (Role.SERVER, State.READY, "send:ended"): State.READY,
    (Role.SERVER, State.READY, "send:result"): State.READY,
    (Role.SERVER, State.READY, "send:error"): State.READY,
    (Role.SERVER, State.READY, "send:pong"): State.READY,
    (Role.SERVER, State.READY, "send:close"): State.CLOSED,
    (Role.SERVER, State.READY, "recv:close"): State.CLOSED,
}


def next_state(role: Role, state: State, action: str) -> State:
    """The state after ``action`` ("send:KIND" or "recv:KIND"), or the protocol error.

    Sending what the table does not allow is our own mistake (LocalProtocolError); receiving
    it is the peer's (RemoteProtocolError).
    """
    after = TRANSITIONS.get((role, state, action))
    if after is None:
        error = LocalProtocolError if action.startswith("send:") else RemoteProtocolError
        raise error(f"{action.split(':')[1]!r} is not allowed in state {state.value}")
    return after


# -- generation sessions (PROTOCOL.md §12) -------------------------------------------------------


def grant_max_tokens(requested: int, max_context: int) -> int:
    """Positions a new session may hold: what the device asked for, capped by the server."""
    granted = min(requested, max_context)
    if granted < 1:
        raise SessionError("max_tokens must be at least 1")
    return granted


def check_feed(kind: str, session: int, pos: int, *, length: int, busy: bool) -> None:
    """A prefill or step at ``pos`` for a session holding ``length`` positions (SessionError).

    One feed runs at a time, each continues exactly where the session ends (a device that lost
    track replays from its own history instead), and a step needs a prefill before it.
    """
    if busy:
        raise SessionError(f"session {session} is already running a prefill or step")
    if pos != length:
        raise SessionError(
            f"{kind} at position {pos}, but session {session} holds {length} positions"
        )
    if kind == "step" and length == 0:
        raise SessionError(f"a step before any prefill of session {session}")
