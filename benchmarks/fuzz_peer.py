"""Long-run fuzzer over every decoder the edge server runs on bytes that come from a peer.

Usage:  python benchmarks/fuzz_peer.py [--inputs 1000000] [--seed 0] [--minutes 25]
                                       [--targets hello_raw,codec,...] [--batch 2000]
                                       [--json PATH]

The same targets as ``tests/test_fuzz_peer.py`` (which runs a few hundred hypothesis examples
of each in CI), driven by a plain seeded random/mutation loop for as long as you like:

=================  ============================================================================
target             input
=================  ============================================================================
hello_raw          random bytes as handshake message 1 of a fresh ServerConnection
hello_mutate       byte-level and msgpack-field mutations of a real hello (ClientConnection)
hello_payload      a fuzzed hello payload inside a valid Noise message and envelope (mac1 too)
transport_raw      garbage and tampered transport frames on a freshly handshaken connection
transport_plain    valid ciphertexts (the client's transport) of fuzzed plaintexts: raw bytes,
                   any msgpack, device messages of every type with fuzzed fields and tensors;
                   each event then goes through the server's next checks (tensors against the
                   bundle, sampling parameters, session grants, the session store)
codec              codec.decode of fuzzed EncodedTensors, zstd/lz4 bombs with small max_bytes
decode_checked     decode_tensors + decode_checked of fuzzed tensor maps against manifest specs
readers            strict msgpack unpack, decode_tensors, check_features, the load readers,
                   SamplingParams.from_dict, grant_max_tokens/check_feed, the session store
=================  ============================================================================

Every input must decode or raise an ``EdgeOffloadError``; anything else is an *untyped*
exception (grouped by type and the line that raised it, with the first input that did). A typed
error outside the class the caller catches (e.g. not a ProtocolError out of ``receive``) is
counted as *off-contract*, and a warning raised while decoding (numpy's RuntimeWarning for an
overflow, say) is listed with the first input that raised it. Inputs run in a worker process:
if it dies (a crash in a C extension, the OOM killer) or a batch hangs, that batch is replayed
with every input written to a trace file first, which names the input that killed it.
``--inputs`` is split evenly over the targets, which take batches in turn, so a ``--minutes``
cap still covers all of them.

Exit status 1 when any untyped exception or crash was seen.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import random
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lz4.block
import msgpack
import numpy as np
import zstandard

from edgeoffload import __version__
from edgeoffload.core import codec as codec_mod
from edgeoffload.core.codec import ALLOWED_DTYPES, EncodedTensor
from edgeoffload.core.sampling import SamplingParams
from edgeoffload.edge.sessions import SessionStore
from edgeoffload.errors import (
    AuthenticationFailed,
    EdgeOffloadError,
    PayloadError,
    ProtocolError,
    RemoteProtocolError,
    SamplingError,
    SessionError,
)
from edgeoffload.lab.peerfuzz import (
    BUNDLE_CODECS,
    DECODER_SPECS,
    DEVICE_KINDS,
    ENVELOPE_FIELDS,
    HELLO_FIELDS,
    LOAD_FIELDS,
    MAX_CONTEXT,
    MAX_MESSAGE,
    MESSAGE_FIELDS,
    SCALE_LIES,
    SPECS,
    T0,
    TENSOR_FIELDS,
    VERSION,
    bomb,
    checked,
    connected,
    encoded_fields,
    encrypted,
    hello_carrying,
    hello_map,
    load_map,
    make_server,
    one_message,
    outcome,
    packed,
    serve,
    show,
    valid_hello,
    valid_tensor_maps,
)
from edgeoffload.protocol._state import State, check_feed, grant_max_tokens
from edgeoffload.protocol.connection import ClientConnection, ServerConnection
from edgeoffload.protocol.load import ServerLoad, bundles_from_wire, check_features
from edgeoffload.protocol.tensors import decode_tensors
from edgeoffload.protocol.wire import unpack
from edgeoffload.types import TensorSpec

# Keys, bundle, limits, connections (fixed keys and time: every fresh pair has the same
# transport keys), the server's next checks and the outcome of a call: edgeoffload.lab.peerfuzz.
BATCH_TIMEOUT_S = 300.0


# -- random values and mutations ------------------------------------------------------------------

ALPHABET = "abt_-+.0:9 éß中\x00\x7f\U0001f600"
WORDS = ("t", "id", "run", "ping", "tensors", "data", "shape", "float32", "none", "zstd", "n")
INTS = (0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63))
FLOATS = (0.0, -0.0, 0.5, 1.0, float("nan"), float("inf"), float("-inf"), 1e308, 5e-324)


def rand_text(r: random.Random, limit: int = 12) -> str:
    return "".join(r.choice(ALPHABET) for _ in range(r.randrange(limit)))


def rand_key(r: random.Random, *, mixed: bool = False) -> str | bytes:
    if mixed and r.random() < 0.4:
        return r.randbytes(r.randrange(5))
    return r.choice(WORDS) if r.random() < 0.5 else rand_text(r, 8)


def rand_value(r: random.Random, depth: int = 0) -> Any:
    """Any msgpack value the strict reader could be handed."""
    k = r.randrange(12 if depth < 3 else 8)
    if k == 0:
        return None
    if k == 1:
        return r.random() < 0.5
    if k == 2:
        return r.randrange(-300, 300)
    if k == 3:
        return r.choice(INTS)
    if k == 4:
        return r.choice(FLOATS) if r.random() < 0.5 else r.uniform(-1e6, 1e6)
    if k == 5:
        return rand_text(r, 24)
    if k == 6:
        return r.randbytes(r.randrange(48))
    if k == 7:
        return r.choice(WORDS)
    if k in (8, 9):
        return [rand_value(r, depth + 1) for _ in range(r.randrange(5))]
    mixed = k == 11
    return {rand_key(r, mixed=mixed): rand_value(r, depth + 1) for _ in range(r.randrange(5))}


def mutate_bytes(r: random.Random, base: bytes) -> bytes:
    """``base`` with a few byte-level edits: flips, overwrites, cuts, insertions, extensions."""
    data = bytearray(base)
    for _ in range(r.randint(1, 4)):
        op = r.randrange(7)
        pos = r.randrange(len(data)) if data else 0
        if op == 0 and data:
            data[pos] ^= 1 << r.randrange(8)
        elif op == 1 and data:
            data[pos] = r.choice((0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xD9, 0xDC, 0xDF, 0xFF))
        elif op == 2:
            del data[pos:]
        elif op == 3:
            data[pos:pos] = r.randbytes(r.randint(1, 8))
        elif op == 4:
            data += r.randbytes(r.randrange(32))
        elif op == 5 and data:
            del data[pos : pos + r.randint(1, 8)]
        elif op == 6 and len(data) > 4:  # splice a piece of itself elsewhere
            start = r.randrange(len(data))
            data[pos:pos] = data[start : start + r.randint(1, 16)]
    return bytes(data)


def mutate_map(
    r: random.Random, base: dict[Any, Any], keys: tuple[str, ...] = (), *, least: int = 0
) -> dict:
    """``base`` with ``least``..3 fields dropped, retyped (any msgpack value) or added."""
    out = dict(base)
    names = sorted(set(map(str, out)) | set(keys))
    for _ in range(r.randint(least, 3)):
        op = r.randrange(3)
        if op == 0 and out:
            out.pop(r.choice(list(out)))
        elif op == 1 and names:
            out[r.choice(names)] = rand_value(r)
        else:
            out[rand_key(r)] = rand_value(r)
    return out


# -- tensors --------------------------------------------------------------------------------------


BOMBS: list[tuple[str, bytes]] = []


def bombs() -> list[tuple[str, bytes]]:
    if not BOMBS:
        for size in (1 << 20, 1 << 24):
            BOMBS.append(("zstd", bomb("zstd", size)))
            BOMBS.append(("zstd", bomb("zstd", size, declare=True)))
            BOMBS.append(("lz4", bomb("lz4", size)))
    return BOMBS


CODEC_LIES = (
    *BUNDLE_CODECS,
    *("int8", "zstd", "fp16+zstd", "FP16", "none+zstd", "zstd+fp16", "int8+", "+", "", "gzip"),
)
DTYPE_LIES = (*ALLOWED_DTYPES, "bfloat16", "object", "<f4", "", "float128")
DIM_LIES = (0, -1, 2**31, 2**62, 2**63 - 1, 2**64 - 1, True, 1.0, "batch", None)


def tensor_maps(
    r: random.Random, rng: np.random.Generator, specs: tuple[TensorSpec, ...], bundle_codec: str
) -> list[Any]:
    """The wire tensor maps of a real, valid request, then structure-aware lies in them."""
    dims = {
        "batch": r.randint(1, 3),
        "sequence_length": r.randint(1, 6),
        "past_sequence_length+sequence_length": r.randint(1, 9),
    }
    maps = valid_tensor_maps(rng, specs, dims, bundle_codec)
    for _ in range(r.choice((0, 0, 1, 1, 2, 3))):
        if not maps:
            break
        i = r.randrange(len(maps))
        m = maps[i]
        if not isinstance(m, dict):
            continue
        lie = r.randrange(10)
        if lie == 0:
            m["dtype"] = r.choice(DTYPE_LIES)
        elif lie == 1:
            m["shape"] = (
                [r.choice((*INTS, 0, 1, 2)) for _ in range(r.randrange(40))]
                if r.random() < 0.7
                else rand_value(r)
            )
        elif lie == 2 and isinstance(m.get("shape"), list) and m["shape"]:
            m["shape"][r.randrange(len(m["shape"]))] = (
                r.choice(DIM_LIES) if r.random() < 0.5 else r.randrange(101)
            )
        elif lie == 3:
            m["codec"] = r.choice(CODEC_LIES)
        elif lie == 4 and isinstance(m.get("data"), bytes):
            m["data"] = mutate_bytes(r, m["data"]) if r.random() < 0.7 else r.randbytes(64)
        elif lie == 5:
            m["scales"] = r.choice(SCALE_LIES) if r.random() < 0.5 else r.randbytes(r.randrange(24))
        elif lie == 6:
            maps[i] = mutate_map(r, m, TENSOR_FIELDS)
        elif lie == 7:
            op = r.randrange(4)
            if op == 0:
                maps.pop(i)
            elif op == 1:
                maps.append(dict(m))
            elif op == 2:
                m["name"] = r.choice(("", "x", "hidden", "mask", "flags")) + rand_text(r, 2)
            else:
                maps.insert(i, rand_value(r))
        elif lie == 8:
            compression, data = r.choice(bombs())
            m.update(
                codec=compression,
                data=data,
                shape=r.choice(([1 << 18], [1, 8], [2**31], [4, 2**40], [1 << 22])),
            )
        else:  # zero dims where symbolic ones belong
            if isinstance(m.get("shape"), list) and m["shape"]:
                m["shape"][0] = 0
    return maps


def encoded_tensor(r: random.Random, rng: np.random.Generator) -> EncodedTensor:
    dtype = r.choice(ALLOWED_DTYPES)
    shape = tuple(r.randrange(6) for _ in range(r.randrange(5)))
    fields = encoded_fields(rng, dtype, shape, r.choice(BUNDLE_CODECS))
    for _ in range(r.choice((0, 1, 1, 2, 3))):
        key = r.choice(("dtype", "shape", "codec", "data", "scales", "bomb", "extreme"))
        if key == "dtype":
            fields[key] = r.choice(DTYPE_LIES) if r.random() < 0.8 else rand_value(r)
        elif key == "shape":
            x = r.random()
            if x < 0.5:
                fields[key] = tuple(r.choice((*INTS, 0, 1, 3)) for _ in range(r.randrange(40)))
            elif x < 0.8:
                fields[key] = (r.choice((2**31, 2**32, 2**62, 2**64 - 1)), 0)
            else:
                fields[key] = rand_value(r)
        elif key == "codec":
            fields[key] = r.choice(CODEC_LIES) if r.random() < 0.8 else rand_value(r)
        elif key == "data":
            old = fields["data"]
            x = r.random()
            if isinstance(old, bytes) and x < 0.5:
                fields[key] = mutate_bytes(r, old)
            elif isinstance(old, bytes) and x < 0.6:  # every byte the same, e.g. int8 -128
                fields[key] = bytes([r.choice((0x00, 0x7F, 0x80, 0xFF))]) * len(old)
            else:
                fields[key] = r.randbytes(r.randrange(64)) if x < 0.9 else rand_value(r)
        elif key == "scales":
            fields[key] = r.choice(SCALE_LIES) if r.random() < 0.5 else r.randbytes(r.randrange(24))
        elif key == "bomb":
            compression, data = r.choice(bombs())
            fields.update(codec=compression, data=data, shape=(r.choice((1 << 18, 16, 1 << 30)),))
        else:  # int8 codes and scales at the edges of what decode accepts
            channels = r.randint(1, 4)
            fields.update(
                dtype=r.choice(("float32", "float64")),
                codec=r.choice(("int8", "int8c")),
                shape=(1, channels),
                data=bytes(r.choice((0x80, 0x81, 0x7F, 0x00)) for _ in range(channels)),
                scales=b"".join(r.choice(SCALE_LIES) for _ in range(channels)),
            )
            if fields["codec"] == "int8":
                fields["scales"] = fields["scales"][:4]
    return EncodedTensor(**fields)


# -- device messages ------------------------------------------------------------------------------

REQUEST_ID_LIES = (2**63 - 1, 2**63, 2**64 - 1, -1, True, 0)


def request_id(r: random.Random) -> Any:
    return r.randrange(10) if r.random() < 0.85 else r.choice(REQUEST_ID_LIES)


def sampling_map(r: random.Random) -> dict[Any, Any]:
    pick = {
        "temperature": lambda: r.choice((0.0, 0.7, 2, *FLOATS, *INTS)),
        "top_k": lambda: r.choice((0, 5, -5, True, 1.5, *INTS)),
        "top_p": lambda: r.choice((0.5, 1.0, 1.0000001, *FLOATS)),
        "seed": lambda: r.choice((0, 7, -1, 0.5, *INTS)),
    }
    out: dict[Any, Any] = {k: f() for k, f in pick.items() if r.random() < 0.5}
    if r.random() < 0.05:  # msgpack's strict_map_key lets bytes keys through beside str ones
        return {r.randbytes(r.randrange(4)): rand_value(r), "x" + rand_text(r, 6): rand_value(r)}
    return mutate_map(r, out, tuple(pick)) if r.random() < 0.5 else out


def device_message(r: random.Random, rng: np.random.Generator, bundle_codec: str) -> dict:
    kind = r.choice((*DEVICE_KINDS, *DEVICE_KINDS, "result", "pong", "token", "", "RUN"))
    msg: dict[str, Any] = {"t": kind, "id": request_id(r)}
    if kind == "run":
        msg["tensors"] = tensor_maps(r, rng, SPECS, bundle_codec)
    elif kind == "ping":
        msg["pad"] = r.randbytes(r.randrange(64))
    elif kind == "open":
        msg["sampling"] = sampling_map(r)
        msg["max_tokens"] = r.randrange(-1, 10_000) if r.random() < 0.8 else r.choice(INTS)
    elif kind in ("prefill", "step"):
        msg["session"] = request_id(r)
        msg["pos"] = r.randrange(6) if r.random() < 0.7 else request_id(r)
        if kind == "step":
            msg["tensors"] = tensor_maps(r, rng, DECODER_SPECS, bundle_codec)
        else:
            msg["chunks"] = [
                {
                    "n": r.randrange(5) if r.random() < 0.9 else request_id(r),
                    "tensors": tensor_maps(r, rng, DECODER_SPECS, bundle_codec),
                }
                for _ in range(r.randrange(4))
            ]
            if msg["chunks"] and r.random() < 0.2:
                i = r.randrange(len(msg["chunks"]))
                msg["chunks"][i] = mutate_map(r, msg["chunks"][i], ("n", "tensors"))
    elif kind == "end":
        msg["session"] = request_id(r)
    elif kind == "close":
        msg.pop("id")
        msg["reason"] = rand_text(r, 40)
    if r.random() < 0.3:
        msg = mutate_map(r, msg, MESSAGE_FIELDS)
    return msg


# -- targets --------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    make: Callable[[random.Random, np.random.Generator], Any]  # an input
    run: Callable[[Any], Any]  # decode it (raises)
    expect: tuple[type[EdgeOffloadError], ...]  # what the caller catches


class Harness:
    """Per-worker state: reference messages, reused connections, the session store."""

    def __init__(self) -> None:
        self.hello = valid_hello()
        self.envelope = msgpack.unpackb(self.hello, raw=False)
        # First frames of a fresh pair (all pairs share keys): valid, then tampered with.
        rng = np.random.default_rng(0)
        self.frames = []
        for pad in (b"", b"x" * 100, bytes(70_000)):
            c, _ = connected()
            c.send_ping(1, pad)
            self.frames.append(one_message(c))
        c, _ = connected()
        big = codec_mod.encode(
            rng.standard_normal((1, 20_000, 8)).astype(np.float32), codec_mod.CodecSpec()
        )
        c.send_run(1, [("hidden", big)])
        self.frames.append(one_message(c))
        self.pairs: dict[bool, tuple[ClientConnection, ServerConnection]] = {}
        self.store = SessionStore()

    def pair(self, load: bool) -> tuple[ClientConnection, ServerConnection]:
        pair = self.pairs.get(load)
        if pair is None or pair[1].state is not State.READY:
            pair = self.pairs[load] = connected(features=("load",) if load else ())
        return pair

    # hello_raw
    def make_hello_raw(self, r: random.Random, rng: np.random.Generator) -> bytes:
        x = r.random()
        if x < 0.6:
            return rng.bytes(r.randrange(400))
        if x < 0.9:  # a map header first, so more of it gets past the first byte
            return bytes([0x80 | r.randrange(16)]) + rng.bytes(r.randrange(300))
        return rng.bytes(r.randint(8000, 9000))

    def run_hello(self, data: bytes) -> Any:
        return make_server().receive(data)

    # hello_mutate
    def make_hello_mutate(self, r: random.Random, rng: np.random.Generator) -> bytes:
        if r.random() < 0.5:
            return mutate_bytes(r, self.hello)
        lied = mutate_map(r, self.envelope, ENVELOPE_FIELDS, least=1)
        if r.random() < 0.2:
            lied = {**lied, "noise": mutate_bytes(r, self.envelope["noise"])}
        return packed(lied)

    # hello_payload
    def make_hello_payload(self, r: random.Random, rng: np.random.Generator) -> bytes:
        x = r.random()
        if x < 0.2:
            payload = r.randbytes(r.randrange(200))
        elif x < 0.4:
            payload = packed(rand_value(r))
        else:
            hello = mutate_map(r, hello_map(T0 + r.randrange(10**9)), HELLO_FIELDS)
            if r.random() < 0.3:
                hello["features"] = [
                    r.choice(("load", "", "x" * 65, "é" * 40))
                    if r.random() < 0.7
                    else rand_value(r)
                    for _ in range(r.randrange(20))
                ]
            payload = packed(hello)
        return hello_carrying(payload)

    # transport_raw
    def make_transport_raw(self, r: random.Random, rng: np.random.Generator) -> bytes:
        x = r.random()
        if x < 0.3:
            return rng.bytes(r.randrange(300))
        if x < 0.4:
            return rng.bytes(r.choice((65534, 65535, 65536, 65551, 65552, 131070, MAX_MESSAGE + 1)))
        frame = r.choice(self.frames)
        if x < 0.95:
            return mutate_bytes(r, frame)
        return frame + frame

    def run_transport_raw(self, frame: bytes) -> Any:
        client, server = connected()
        try:
            return server.receive(frame)
        except AuthenticationFailed:
            # The transport is dead: a genuine frame must now be refused, typed.
            client.send_ping(2)
            with contextlib.suppress(ProtocolError):
                server.receive(one_message(client))
            raise

    # transport_plain
    def make_transport_plain(self, r: random.Random, rng: np.random.Generator) -> tuple:
        load = r.random() < 0.7
        bundle_codec = r.choice(BUNDLE_CODECS)
        x = r.random()
        if x < 0.1:
            plaintext = r.randbytes(r.randrange(300))
        elif x < 0.25:
            plaintext = packed(rand_value(r))
        elif x < 0.3:
            plaintext = mutate_bytes(r, packed(device_message(r, rng, bundle_codec)))
        else:
            plaintext = packed(device_message(r, rng, bundle_codec))
        return plaintext, load, bundle_codec

    def run_transport_plain(self, item: tuple) -> Any:
        plaintext, load, bundle_codec = item
        client, server = self.pair(load)
        events = server.receive(encrypted(client, plaintext))
        for event in events:
            serve(event, self.store, bundle_codec)
        return events

    # codec
    def make_codec(self, r: random.Random, rng: np.random.Generator) -> tuple:
        return encoded_tensor(r, rng), r.choice((0, 16, 64, 1024, 4096, 1 << 16, None))

    def run_codec(self, item: tuple) -> Any:
        encoded, max_bytes = item
        out = codec_mod.decode(encoded, max_bytes=max_bytes)
        limit = codec_mod.MAX_TENSOR_BYTES if max_bytes is None else max_bytes
        assert out.nbytes <= limit, f"decoded {out.nbytes} bytes over the {limit} limit"
        return out

    # decode_checked
    def make_decode_checked(self, r: random.Random, rng: np.random.Generator) -> tuple:
        specs = r.choice((SPECS, DECODER_SPECS))
        bundle_codec = r.choice(BUNDLE_CODECS)
        maps = tensor_maps(r, rng, specs, bundle_codec)
        return maps, specs, bundle_codec, r.choice((64, 4096, MAX_MESSAGE))

    def run_decode_checked(self, item: tuple) -> Any:
        maps, specs, bundle_codec, max_bytes = item
        return checked(decode_tensors(maps, "request"), specs, bundle_codec, max_bytes)

    # readers
    def make_readers(self, r: random.Random, rng: np.random.Generator) -> tuple:
        which = r.choice(
            ("unpack", "unpack", "tensors", "features", "load", "bundles", "sampling", "grants")
        )
        if which == "unpack":
            x = r.random()
            if x < 0.3:
                data = rng.bytes(r.randrange(200))
            elif x < 0.6:
                data = packed(rand_value(r))
            elif x < 0.9:
                data = mutate_bytes(r, packed(rand_value(r)))
            else:
                n = r.randrange(1, 3000)
                data = (b"\x91" * n + b"\xc0") if r.random() < 0.5 else (b"\x81\xa1k" * n + b"\xc0")
            return which, (data, r.choice((0, 64, 4096)))
        if which == "tensors":
            value = rand_value(r) if r.random() < 0.5 else [rand_value(r) for _ in range(3)]
            return which, value
        if which == "features":
            return which, [
                rand_value(r) if r.random() < 0.5 else rand_text(r, 70)
                for _ in range(r.randrange(20))
            ]
        if which == "load":
            base = load_map()
            if r.random() < 0.5:
                base["tail_ms"] = r.choice(FLOATS + INTS)
            return which, mutate_map(r, base, LOAD_FIELDS)
        if which == "bundles":
            return which, [rand_value(r) for _ in range(r.randrange(4))]
        if which == "sampling":
            return which, sampling_map(r) if r.random() < 0.7 else rand_value(r)
        return which, (
            r.choice((*INTS, 3, 0, 4096)),
            r.choice((*INTS, 0, 3)),
            r.choice(("prefill", "step")),
        )

    def run_readers(self, item: tuple) -> Any:
        which, value = item
        if which == "unpack":
            data, max_bin = value
            return unpack(data, max_bin=max_bin)
        if which == "tensors":
            return decode_tensors(value, "request")
        if which == "features":
            return check_features(value, "hello")
        if which == "load":
            return ServerLoad.from_wire(value)
        if which == "bundles":
            return bundles_from_wire(value)
        if which == "sampling":
            return SamplingParams.from_dict(value)
        number, length, kind = value
        grant_max_tokens(number, MAX_CONTEXT)
        check_feed(kind, 1, number, length=length, busy=False)
        return self.store.get(number, owner=b"k", version=VERSION, now=0.0)


PEER_SERVING = (RemoteProtocolError, PayloadError, SessionError, SamplingError)


def targets(h: Harness) -> dict[str, Target]:
    proto = (ProtocolError,)
    return {
        t.name: t
        for t in (
            Target("hello_raw", h.make_hello_raw, h.run_hello, proto),
            Target("hello_mutate", h.make_hello_mutate, h.run_hello, proto),
            Target("hello_payload", h.make_hello_payload, h.run_hello, proto),
            Target("transport_raw", h.make_transport_raw, h.run_transport_raw, proto),
            Target("transport_plain", h.make_transport_plain, h.run_transport_plain, PEER_SERVING),
            Target("codec", h.make_codec, h.run_codec, (PayloadError,)),
            Target("decode_checked", h.make_decode_checked, h.run_decode_checked, (ProtocolError,)),
            Target("readers", h.make_readers, h.run_readers, (ProtocolError, SamplingError)),
        )
    }


TARGET_NAMES = (
    "hello_raw",
    "hello_mutate",
    "hello_payload",
    "transport_raw",
    "transport_plain",
    "codec",
    "decode_checked",
    "readers",
)


# -- the worker -----------------------------------------------------------------------------------


@dataclass
class Stats:
    inputs: int = 0
    ok: int = 0
    typed: Counter[str] = field(default_factory=Counter)
    off_contract: Counter[str] = field(default_factory=Counter)
    untyped: dict[str, dict[str, Any]] = field(default_factory=dict)  # signature -> details
    warned: dict[str, dict[str, Any]] = field(default_factory=dict)  # warnings, as untyped
    crashes: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def merge(self, other: Stats) -> None:
        self.inputs += other.inputs
        self.ok += other.ok
        self.typed.update(other.typed)
        self.off_contract.update(other.off_contract)
        for sig, info in other.untyped.items():
            if sig in self.untyped:
                self.untyped[sig]["count"] += info["count"]
            else:
                self.untyped[sig] = info
        for sig, info in other.warned.items():
            if sig in self.warned:
                self.warned[sig]["count"] += info["count"]
            else:
                self.warned[sig] = info
        self.crashes.extend(other.crashes)
        self.seconds += other.seconds

    @property
    def untyped_count(self) -> int:
        return sum(info["count"] for info in self.untyped.values())


def _signature(exc: BaseException) -> tuple[str, str]:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "edgeoffload" in f.filename and "benchmarks" not in f.filename]
    where = (ours or frames)[-1] if (ours or frames) else None
    place = f"{os.path.relpath(where.filename)}:{where.lineno}" if where else "?"
    return f"{type(exc).__name__} at {place}", "".join(traceback.format_exception(exc)[-6:])


def batch_rngs(seed: int, target: str, index: int) -> tuple[random.Random, np.random.Generator]:
    key = [seed, TARGET_NAMES.index(target), index]
    return random.Random(f"{seed}/{target}/{index}"), np.random.default_rng(key)


def run_batch(target: Target, seed: int, index: int, count: int, trace: str | None = None) -> Stats:
    r, rng = batch_rngs(seed, target.name, index)
    stats = Stats()
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _run_inputs(target, r, rng, count, trace, stats, seen)
    stats.seconds = time.perf_counter() - started
    return stats


def _run_inputs(
    target: Target,
    r: random.Random,
    rng: np.random.Generator,
    count: int,
    trace: str | None,
    stats: Stats,
    seen: list[warnings.WarningMessage],
) -> None:
    for i in range(count):
        item = target.make(r, rng)
        if trace is not None:  # the OS keeps what was written if this process dies next
            with open(trace, "w") as f:
                f.write(f"{i}\n{item!r}")
        stats.inputs += 1
        out = outcome(target.run, item, expect=target.expect)
        if out.decoded:
            stats.ok += 1
        elif out.typed:
            stats.typed[type(out.error).__name__] += 1
            if out.off_contract:
                stats.off_contract[type(out.error).__name__] += 1
        else:
            sig, tb = _signature(out.error)
            if sig in stats.untyped:
                stats.untyped[sig]["count"] += 1
            else:
                stats.untyped[sig] = {"count": 1, "input": show(item), "traceback": tb}
        if seen:  # e.g. numpy's RuntimeWarning for an overflow while decoding
            w = seen[-1]
            sig = f"{w.category.__name__} at {os.path.relpath(w.filename)}:{w.lineno}: {w.message}"
            if sig in stats.warned:
                stats.warned[sig]["count"] += 1
            else:
                stats.warned[sig] = {"count": 1, "input": show(item)}
            seen.clear()


def worker_main(conn: Any, seed: int) -> None:
    harness = Harness()
    table = targets(harness)
    while True:
        job = conn.recv()
        if job is None:
            return
        name, index, count, trace = job
        conn.send(run_batch(table[name], seed, index, count, trace))


# -- the parent -----------------------------------------------------------------------------------


class Pool:
    """One worker process, restarted when it dies."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.proc: Any = None
        self.conn: Any = None

    def start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=worker_main, args=(child, self.seed), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent

    def run(self, job: tuple) -> Stats | str:
        """The batch's stats, or why the worker died ("exit -11", "hang")."""
        if self.proc is None or not self.proc.is_alive():
            self.start()
        self.conn.send(job)
        try:
            if self.conn.poll(BATCH_TIMEOUT_S):
                result: Stats = self.conn.recv()
                return result
            why = "hang"
        except (EOFError, ConnectionError):
            why = "died"
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        why = f"{why} (exit {self.proc.exitcode})"
        self.proc = None
        return why

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(10)


def fuzz(
    *, inputs: int, seed: int, minutes: float, names: list[str], batch: int
) -> tuple[dict[str, Stats], float, bool]:
    per_target = {
        n: inputs // len(names) + (1 if i < inputs % len(names) else 0) for i, n in enumerate(names)
    }
    done = {n: 0 for n in names}
    stats = {n: Stats() for n in names}
    pool = Pool(seed)
    started = last = time.monotonic()
    deadline = started + minutes * 60 if minutes > 0 else float("inf")
    index = dict.fromkeys(names, 0)
    capped = False
    try:
        while any(done[n] < per_target[n] for n in names):
            for name in names:
                if done[name] >= per_target[name]:
                    continue
                if time.monotonic() >= deadline:
                    capped = True
                    break
                count = min(batch, per_target[name] - done[name])
                job = (name, index[name], count, None)
                result = pool.run(job)
                if isinstance(result, str):
                    crash = replay_crash(seed, job, result)
                    stats[name].crashes.append(crash)
                    stats[name].inputs += crash["index"] + 1 if crash["reproduced"] else count
                else:
                    stats[name].merge(result)
                done[name] += count
                index[name] += 1
                now = time.monotonic()
                if now - last >= 10:
                    last = now
                    total = sum(s.inputs for s in stats.values())
                    bad = sum(s.untyped_count + len(s.crashes) for s in stats.values())
                    print(
                        f"[{now - started:6.0f} s] {total:>9,} inputs "
                        f"({total / (now - started):,.0f}/s), untyped+crashes: {bad}, "
                        + ", ".join(f"{n} {stats[n].inputs:,}" for n in names),
                        flush=True,
                    )
            if capped:
                break
    finally:
        pool.close()
    return stats, time.monotonic() - started, capped


def replay_crash(seed: int, job: tuple, why: str) -> dict[str, Any]:
    """Run a batch that killed the worker again, each input traced first: the last one traced
    is the one that killed it."""
    name, index, count, _ = job
    fd, trace = tempfile.mkstemp(prefix="fuzz_peer_", suffix=".txt")
    os.close(fd)
    pool = Pool(seed)
    try:
        again = pool.run((name, index, count, trace))
    finally:
        pool.close()
    with open(trace) as f:
        position, _, last = f.read().partition("\n")
    os.unlink(trace)
    return {
        "why": why,
        "batch": index,
        "index": int(position or 0),
        "reproduced": isinstance(again, str),
        "input": last[:2000] if isinstance(again, str) else "(did not crash again)",
    }


# -- output ---------------------------------------------------------------------------------------


def table(stats: dict[str, Stats]) -> str:
    header = (
        "target",
        "inputs",
        "decoded ok",
        "typed errors (by class)",
        "untyped",
        "crashes",
        "inputs/s",
    )
    rows = []
    for name, s in stats.items():
        typed = ", ".join(f"{k} {v:,}" for k, v in s.typed.most_common()) or "-"
        rate = s.inputs / s.seconds if s.seconds else 0.0
        rows.append(
            (
                name,
                f"{s.inputs:,}",
                f"{s.ok:,}",
                typed,
                str(s.untyped_count),
                str(len(s.crashes)),
                f"{rate:,.0f}",
            )
        )
    total = Stats()
    for s in stats.values():
        total.merge(s)
    rows.append(
        (
            "total",
            f"{total.inputs:,}",
            f"{total.ok:,}",
            f"{sum(total.typed.values()):,}",
            str(total.untyped_count),
            str(len(total.crashes)),
            f"{total.inputs / total.seconds:,.0f}" if total.seconds else "0",
        )
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i in (0, 3) else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def findings(stats: dict[str, Stats]) -> str:
    out = []
    for name, s in stats.items():
        for sig, info in s.untyped.items():
            out.append(
                f"UNTYPED [{name}] {sig}: {info['count']:,} input(s)\n"
                f"  first input: {info['input']}\n"
                + "".join(f"  | {line}\n" for line in info["traceback"].rstrip().splitlines())
            )
        for sig, info in s.warned.items():
            out.append(
                f"WARNING [{name}] {sig}: {info['count']:,} input(s)\n"
                f"  first input: {info['input']}\n"
            )
        for crash in s.crashes:
            out.append(f"CRASH [{name}] {crash['why']} in batch {crash['batch']}: {crash['input']}")
        for cls, n in s.off_contract.items():
            out.append(
                f"off-contract [{name}] {cls}: {n:,} (typed, but not what the caller catches)"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1_000_000, help="total, split over targets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=25.0, help="time cap (0: none)")
    parser.add_argument("--targets", default=",".join(TARGET_NAMES))
    parser.add_argument("--batch", type=int, default=2000, help="inputs per worker job")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(TARGET_NAMES))
    if unknown or not names or args.inputs < 1 or args.batch < 1:
        parser.error(
            f"unknown targets {unknown}; known: {', '.join(TARGET_NAMES)}"
            if unknown
            else "bad arguments"
        )
    print(
        f"fuzz_peer: {args.inputs:,} inputs over {len(names)} targets, seed {args.seed}, "
        f"cap {args.minutes:g} min; edgeoffload {__version__}, Python {platform.python_version()}, "
        f"numpy {np.__version__}, msgpack {'.'.join(map(str, msgpack.version))}, "
        f"zstandard {zstandard.__version__}, lz4 {lz4.__version__}, {os.cpu_count()} CPUs",
        flush=True,
    )
    stats, elapsed, capped = fuzz(
        inputs=args.inputs, seed=args.seed, minutes=args.minutes, names=names, batch=args.batch
    )
    total = sum(s.inputs for s in stats.values())
    print()
    print(table(stats))
    print()
    print(f"{total:,} inputs in {elapsed:.0f} s" + (" (stopped by the time cap)" if capped else ""))
    report = findings(stats)
    if report:
        print()
        print(report)
    bad = sum(s.untyped_count + len(s.crashes) for s in stats.values())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                    "versions": {"edgeoffload": __version__, "python": platform.python_version()},
                    "args": vars(args),
                    "seconds": elapsed,
                    "capped": capped,
                    "targets": {
                        n: {
                            "inputs": s.inputs,
                            "ok": s.ok,
                            "typed": dict(s.typed),
                            "off_contract": dict(s.off_contract),
                            "untyped": s.untyped,
                            "warnings": s.warned,
                            "crashes": s.crashes,
                            "seconds": s.seconds,
                        }
                        for n, s in stats.items()
                    },
                },
                f,
                indent=1,
            )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
