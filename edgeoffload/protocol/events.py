"""What a connection's ``receive`` reports: one frozen dataclass per kind of message.

Events carry values that were already checked by the parser (types, ranges, tensor structure);
:class:`Chunk` is the unit of a prefill message, used by both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgeoffload.core.codec import EncodedTensor
from edgeoffload.errors import (
    Overloaded,
    PayloadError,
    RemoteProtocolError,
    ServerBusy,
    SessionError,
    SessionLost,
    VersionMismatch,
)
from edgeoffload.protocol.load import BundleLoad, ServerLoad
from edgeoffload.protocol.updates import FetchRefused, UpdateOffer


@dataclass(frozen=True)
class Event:
    """Base class of what ``receive`` reports."""


@dataclass(frozen=True)
class HandshakeComplete(Event):
    peer_public: bytes  # the peer's static key (the server learns the device's here)
    bundle: str  # bundle identity
    version: str  # bundle version of the peer
    info: dict[str, Any] = field(default_factory=dict)
    update: UpdateOffer | None = None  # client: the server's offer in the welcome (§16)


@dataclass(frozen=True)
class RunRequest(Event):
    request_id: int
    tensors: tuple[tuple[str, EncodedTensor], ...]


@dataclass(frozen=True)
class InvalidRequest(Event):
    """A run request whose tensors are malformed; it gets a "payload" error reply."""

    request_id: int
    message: str


@dataclass(frozen=True)
class RunResult(Event):
    request_id: int
    tensors: tuple[tuple[str, EncodedTensor], ...]
    server_ms: float
    load: ServerLoad | None = None  # on connections that negotiated "load" (§14)


@dataclass(frozen=True)
class ErrorReply(Event):
    request_id: int | None
    code: str
    message: str
    retry_ms: int | None = None  # "overloaded" only: when the server expects to admit a retry

    def to_exception(self) -> Exception:
        if self.code == "overloaded":
            retry_after = None if self.retry_ms is None else self.retry_ms / 1000
            return Overloaded(f"edge server overloaded: {self.message}", retry_after=retry_after)
        if self.code == "payload":
            return PayloadError(f"edge server rejected the tensors: {self.message}")
        if self.code in ("unknown_bundle", "version_mismatch"):
            return VersionMismatch(self.message)
        if self.code == "session_lost":
            return SessionLost(f"edge server lost the session: {self.message}")
        if self.code == "session":
            return SessionError(f"edge server refused the session message: {self.message}")
        if self.code in ("timeout", "shutting_down", "internal"):
            # The server could not answer this time: the client may retry or fall back.
            return ServerBusy(f"edge server could not answer ({self.code}): {self.message}")
        if self.code == "fetch":
            return FetchRefused(f"edge server refused the download: {self.message}")
        return RemoteProtocolError(f"edge server error ({self.code}): {self.message}")


@dataclass(frozen=True)
class SessionOpen(Event):
    """Open a generation session: tail KV cache on the server, sampling settings."""

    request_id: int
    sampling: dict[str, Any]
    max_tokens: int


@dataclass(frozen=True)
class Chunk:
    """``n`` new positions and the crossing tensors the head produced for them."""

    n: int
    tensors: tuple[tuple[str, EncodedTensor], ...]


@dataclass(frozen=True)
class SessionFeed(Event):
    """Prefill (one or more chunks) or one decode step at position ``pos``."""

    request_id: int
    kind: str  # "prefill" or "step"
    session: int
    pos: int
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class SessionEnd(Event):
    request_id: int
    session: int


@dataclass(frozen=True)
class SessionOpened(Event):
    request_id: int
    session: int
    max_tokens: int


@dataclass(frozen=True)
class TokenResult(Event):
    """The token sampled after a prefill or step; ``pos`` is the session length now."""

    request_id: int
    session: int
    pos: int
    token: int
    server_ms: float
    load: ServerLoad | None = None  # on connections that negotiated "load" (§14)


@dataclass(frozen=True)
class SessionEnded(Event):
    request_id: int
    session: int


@dataclass(frozen=True)
class Ping(Event):
    request_id: int
    payload: bytes


@dataclass(frozen=True)
class Pong(Event):
    request_id: int
    payload: bytes


@dataclass(frozen=True)
class StatusRequest(Event):
    """A device asks for the server's load (§14.3; "load" feature only)."""

    request_id: int


@dataclass(frozen=True)
class StatusReply(Event):
    request_id: int
    load: ServerLoad
    bundles: tuple[BundleLoad, ...]
    update: UpdateOffer | None = None  # on connections that negotiated "update" (§16)


@dataclass(frozen=True)
class FetchRequest(Event):
    """A device asks for ``length`` bytes at ``offset`` of one file of a bundle version
    (§16.3; "update" feature only)."""

    request_id: int
    version: str
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class FileData(Event):
    """One piece of a fetched file and the file's whole ``size`` (§16.3)."""

    request_id: int
    data: bytes
    size: int


@dataclass(frozen=True)
class CloseRequested(Event):
    reason: str
