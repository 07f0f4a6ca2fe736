"""Strict msgpack for the wire protocol: the decoding limits, pack/unpack and field access.

Every message (PROTOCOL.md §4) is one msgpack map decoded with hard limits: no extension types,
no duplicate keys, bounded strings, arrays, maps and binaries. :class:`StrictMap` then reads
the fields with their types checked and rejects unknown keys, so a peer cannot smuggle anything
past the parser. Any violation is a :class:`~edgeoffload.errors.RemoteProtocolError`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import msgpack

from edgeoffload.errors import ProtocolError, RemoteProtocolError

# Decoding limits (PROTOCOL.md §4). Tensor payloads are bounded by the connection's
# max_message; everything else is small.
MAX_STR = 4096
MAX_ARRAY = 4096
MAX_MAP = 64
MAX_TENSORS = 1024
MAX_DIMS = 32
MAX_REQUEST_ID = 2**63 - 1
MAX_CHUNKS = 4096  # chunks in one prefill message, a replay after a lost session (§12.2)


def truncate_utf8(text: str, limit: int = MAX_STR) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes (peers count bytes, not characters)."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", errors="ignore")


def _pairs_no_duplicates(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result: dict[Any, Any] = {}
    for key, value in pairs:
        if key in result:
            raise RemoteProtocolError(f"duplicate key {key!r} in a message map")
        result[key] = value
    return result


def _ext_forbidden(code: int, data: bytes) -> Any:
    raise RemoteProtocolError(f"msgpack extension type {code} is not allowed")


def unpack(data: bytes | bytearray | memoryview, *, max_bin: int) -> dict[str, Any]:
    """Decode one message map with strict limits; any violation is a RemoteProtocolError."""
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            object_pairs_hook=_pairs_no_duplicates,
            ext_hook=_ext_forbidden,
            max_bin_len=max_bin,
            max_str_len=MAX_STR,
            max_array_len=MAX_ARRAY,
            max_map_len=MAX_MAP,
            max_ext_len=0,
        )
    except ProtocolError:
        raise
    except (
        ValueError,
        TypeError,
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
        UnicodeDecodeError,
    ) as exc:
        raise RemoteProtocolError(f"malformed msgpack message ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError("a message must be a msgpack map")
    return obj


def pack(obj: Mapping[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


ZERO_COPY_BIN = 1 << 14  # bytes-like values at least this big are not copied by pack_parts
_PACKER = msgpack.Packer(use_bin_type=True)


def pack_parts(obj: Any) -> list[bytes | bytearray | memoryview]:
    """The msgpack encoding of ``obj`` as a list of buffers whose concatenation equals
    ``pack(obj)`` byte for byte; large bytes-like values are referenced, not copied.

    Tensor payloads (megabytes) then go from the array's memory straight into encryption
    (:meth:`edgeoffload.core.noise.Transport.encrypt_parts`) instead of being copied into a
    msgpack buffer first.
    """
    parts: list[bytes | bytearray | memoryview] = []
    small = bytearray()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            small.extend(_PACKER.pack_map_header(len(value)))
            for key, item in value.items():
                small.extend(_PACKER.pack(key))
                walk(item)
        elif isinstance(value, list | tuple):
            small.extend(_PACKER.pack_array_header(len(value)))
            for item in value:
                walk(item)
        elif isinstance(value, bytes | bytearray | memoryview):
            size = value.nbytes if isinstance(value, memoryview) else len(value)
            if size < ZERO_COPY_BIN:
                small.extend(_PACKER.pack(bytes(value)))
                return
            # bin 16 / bin 32 headers, exactly as msgpack writes them for these sizes
            small.extend(
                struct.pack(">BH", 0xC5, size) if size < 1 << 16 else struct.pack(">BI", 0xC6, size)
            )
            parts.append(bytes(small))
            small.clear()
            parts.append(value)
        else:
            small.extend(_PACKER.pack(value))

    walk(obj)
    if small or not parts:
        parts.append(bytes(small))
    return parts


class StrictMap:
    """Typed, strict accessors over a decoded map (unknown keys are an error)."""

    def __init__(self, data: dict[str, Any], what: str) -> None:
        self.data = data
        self.what = what
        self.seen: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if optional:
                return None
            raise RemoteProtocolError(f"{self.what}: missing field {key!r}")
        value = self.data[key]
        if isinstance(value, bool) and kind is int:
            raise RemoteProtocolError(f"{self.what}: field {key!r} must be an integer")
        if not isinstance(value, kind):
            raise RemoteProtocolError(f"{self.what}: field {key!r} has the wrong type")
        return value

    def request_id(self, key: str = "id") -> int:
        value = self.get(key, int)
        if not 0 <= value <= MAX_REQUEST_ID:
            raise RemoteProtocolError(f"{self.what}: request id out of range")
        return int(value)

    def done(self) -> None:
        extra = set(self.data) - self.seen
        if extra:
            raise RemoteProtocolError(f"{self.what}: unknown field(s) {sorted(map(str, extra))}")
