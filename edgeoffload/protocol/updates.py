"""Head updates (PROTOCOL.md §16): what a server offers, and the bounds of a file download.

On a connection that negotiated the ``"update"`` feature (§14.1, ``load.FEATURE_UPDATE``) the
server tells the device the newest version it serves of the device's model (an
:class:`UpdateOffer`, in the welcome and in ``status`` replies), and answers ``fetch``
requests with ``file`` replies: one bounded piece of one file of that version's bundle
(``manifest.json``, ``signature.json``, the head part). Nothing here trusts the server: the
device verifies what it downloaded against the signed manifest
(:mod:`edgeoffload.device.updates`); this module only parses strictly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeoffload.errors import RemoteProtocolError
from edgeoffload.protocol.wire import StrictMap

# A fetch asks for at most this many bytes (and a client asks for no more than its own
# receive limit allows, less framing); the reply's data is at most what was asked.
MAX_FETCH = 1 << 20
MAX_FILE_SIZE = 2**62  # a file's announced size
MAX_OFFER_NUMBER = 2**31 - 1
MAX_OFFER_TEXT = 512  # bytes of an offer's version, identity or model name
MAX_FILE_NAME = 255  # bytes of a fetched file's name


class FetchRefused(RemoteProtocolError):
    """The server answered a ``fetch`` with the ``fetch`` error code (§16.3): not a version
    offered to this connection, not a fetchable file, or past its end."""


def _text(m: StrictMap, key: str) -> str:
    value: str = m.get(key, str)
    if not 0 < len(value.encode()) <= MAX_OFFER_TEXT:
        raise RemoteProtocolError(f"{m.what}: {key} must be 1..{MAX_OFFER_TEXT} bytes")
    return value


@dataclass(frozen=True)
class UpdateOffer:
    """The newest serving version of the device's model on this server (§16.1).

    ``model`` is the server's repository name of the model and ``number`` its version number
    there; ``identity`` and ``version`` are the new bundle's (§11): the device reconnects with
    them once it switched.
    """

    version: str
    identity: str
    model: str
    number: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "identity": self.identity,
            "model": self.model,
            "number": self.number,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> UpdateOffer:
        if not isinstance(raw, dict):
            raise RemoteProtocolError("update offer: must be a map")
        m = StrictMap(raw, "update offer")
        number = m.get("number", int)
        offer = cls(_text(m, "version"), _text(m, "identity"), _text(m, "model"), number)
        m.done()
        if not 0 <= number <= MAX_OFFER_NUMBER:
            raise RemoteProtocolError(f"update offer: number must be in 0..{MAX_OFFER_NUMBER}")
        return offer


def check_file_name(name: str, what: str) -> str:
    """A fetched file's name: non-empty, short; which names exist is the server's business."""
    if not 0 < len(name.encode()) <= MAX_FILE_NAME:
        raise RemoteProtocolError(f"{what}: file name must be 1..{MAX_FILE_NAME} bytes")
    return name


def check_fetch_range(offset: int, length: int, what: str) -> None:
    """A fetch's ``offset`` (0..2^62) and ``length`` (1..MAX_FETCH), integers (not bools)."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, length)):
        raise RemoteProtocolError(f"{what}: offset and length must be integers")
    if not 0 <= offset <= MAX_FILE_SIZE:
        raise RemoteProtocolError(f"{what}: offset out of range")
    if not 1 <= length <= MAX_FETCH:
        raise RemoteProtocolError(f"{what}: length must be in 1..{MAX_FETCH}, not {length}")


def check_file_reply(offset: int, length: int, data_len: int, size: int) -> None:
    """A ``file`` reply against the ``fetch`` it answers (§16.3): never more than asked,
    never past the announced size, and short only at the end of the file."""
    if not 0 <= size <= MAX_FILE_SIZE:
        raise RemoteProtocolError("file: size out of range")
    if data_len > length:
        raise RemoteProtocolError(f"file: {data_len} bytes for a fetch of {length}")
    if offset + data_len > size:
        raise RemoteProtocolError("file: data goes past the announced size")
    if data_len < length and offset + data_len != size:
        raise RemoteProtocolError("file: a short piece before the end of the file")
