"""Shared pieces of the peer fuzzers: ``tests/test_fuzz_peer.py`` and ``benchmarks/fuzz_peer.py``.

Both drive every decoder the edge server runs on a peer's bytes, and both hold it to one
contract: an input decodes, or raises an :class:`~edgeoffload.errors.EdgeOffloadError` of the
class the server's caller catches. The test draws its inputs with hypothesis (a few hundred
examples a target, in CI); the benchmark with a seeded random/mutation loop (millions, in a
worker process). What they have in common lives here:

* fixed keys, bundle and limits, and an in-memory :class:`ClientConnection` /
  :class:`ServerConnection` pair handshaken over them (:func:`connected`);
* valid hellos, hellos that carry any payload inside a valid Noise message and envelope
  (:func:`hello_carrying`), and valid transport frames of any plaintext (:func:`encrypted`);
* the crossing specs of a small bundle and its codecs, real tensors and their wire maps
  (:func:`valid_tensor_maps`, :func:`encoded_fields`), decompression bombs (:func:`bomb`) and
  the int8 scales at the edge of what decode accepts (:data:`SCALE_LIES`);
* the "typed outcome" of one call (:func:`outcome`: decoded, a typed error in or outside the
  documented class, or untyped);
* what the server does next with a decoded event, minus onnxruntime (:func:`serve`).

Why by hand: no fuzzing library drives the project's sans-I/O connections. Reaching the
transport decoders needs a real handshake (real keys, a mac1, a fresh timestamp) and each
plaintext encrypted under the connection's own counters, so the inputs are built through
:class:`ClientConnection` itself; a coverage-guided fuzzer (atheris) would spend its time
failing the AEAD tag. How inputs are drawn stays with each caller; how they are built and
judged is here, so the two cannot drift apart.

Time is passed in (``time_ns``): the benchmark uses :data:`T0` throughout (every pair then has
the same transport keys, so one pair's frames are valid on another), the test a clock of its
own.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lz4.block
import msgpack
import numpy as np
import zstandard

from edgeoffload.core import codec as codec_mod
from edgeoffload.core.decoder import KVState
from edgeoffload.core.sampling import SamplingParams
from edgeoffload.edge.sessions import SessionStore
from edgeoffload.errors import EdgeOffloadError, PayloadError, SamplingError, SessionError
from edgeoffload.keys import KeyPair
from edgeoffload.protocol._state import check_feed, grant_max_tokens
from edgeoffload.protocol.connection import (
    ClientConnection,
    HostedBundle,
    ReplayGuard,
    ServerConnection,
    tai64n,
)
from edgeoffload.protocol.events import (
    Event,
    InvalidRequest,
    RunRequest,
    SessionEnd,
    SessionFeed,
    SessionOpen,
)
from edgeoffload.protocol.tensors import decode_checked, encode_tensors
from edgeoffload.types import TensorSpec

__all__ = [
    "BUNDLE",
    "BUNDLE_CODECS",
    "CLIENT_EPHEMERAL",
    "CLIENT_STATIC",
    "DECODER_SPECS",
    "DEVICE_KINDS",
    "ENVELOPE_FIELDS",
    "HELLO_FIELDS",
    "LARGEST_SCALE",
    "LOAD_FIELDS",
    "MAX_CONTEXT",
    "MAX_DIMS",
    "MAX_MESSAGE",
    "MESSAGE_FIELDS",
    "SCALE_LIES",
    "SERVER_EPHEMERAL",
    "SERVER_STATIC",
    "SPECS",
    "T0",
    "TAKES_MAX_DIMS",
    "TENSOR_FIELDS",
    "VERSION",
    "Outcome",
    "array",
    "bomb",
    "checked",
    "codec_for",
    "connected",
    "direct",
    "encoded_fields",
    "encrypted",
    "hello_carrying",
    "hello_map",
    "load_map",
    "make_client",
    "make_server",
    "one_message",
    "outcome",
    "packed",
    "serve",
    "show",
    "valid_hello",
    "valid_tensor_maps",
    "zstd_bomb",
]

CLIENT_STATIC = KeyPair.from_private(bytes(range(1, 33)))
SERVER_STATIC = KeyPair.from_private(bytes(range(101, 133)))
CLIENT_EPHEMERAL = KeyPair.from_private(bytes([0x11] * 32))
SERVER_EPHEMERAL = KeyPair.from_private(bytes([0x22] * 32))
T0 = 1_767_225_600_123_456_789
BUNDLE = "83e3c0620000000000000000000000000000000000000000000000000000020ae:c3"
VERSION = "0123456789abcdef"
MAX_MESSAGE = 1 << 20
MAX_CONTEXT = 4096
DEVICE_KINDS = ("run", "ping", "open", "prefill", "step", "end", "status", "close")

# A small bundle's crossing tensors: a CNN/encoder cut (run) and a decoder cut (prefill/step).
SPECS = (
    TensorSpec("hidden", "float32", ("batch", "sequence_length", 8)),
    TensorSpec("mask", "int64", ("batch", "sequence_length")),
    TensorSpec("flags", "bool", (2,)),
)
DECODER_SPECS = (
    TensorSpec("hidden", "float32", ("batch", "sequence_length", 4)),
    TensorSpec("attention_mask", "int64", ("batch", "past_sequence_length+sequence_length")),
)
BUNDLE_CODECS = ("none", "zstd", "lz4", "fp16", "fp16+lz4", "int8+zstd", "int8c", "int8c+lz4")
MAX_DIMS = {"batch": 4, "sequence_length": 64, "past_sequence_length+sequence_length": 128}
TAKES_MAX_DIMS = "max_dims" in inspect.signature(decode_checked).parameters

# The fields a mutation may drop, retype or add, beside the ones a map already has.
ENVELOPE_FIELDS = ("v", "proto", "bundle", "noise", "mac1")
HELLO_FIELDS = ("ts", "version", "agent", "features")
MESSAGE_FIELDS = ("t", "id", "tensors", "session", "pos", "chunks")
TENSOR_FIELDS = ("name", "dtype", "shape", "codec", "data", "scales")
LOAD_FIELDS = ("inflight", "queued", "workers", "kv_free", "tail_ms")


# -- connections ----------------------------------------------------------------------------------


def make_client(*, features: tuple[str, ...] = ("load",), time_ns: int = T0) -> ClientConnection:
    return ClientConnection(
        static=CLIENT_STATIC,
        server_public=SERVER_STATIC.public,
        bundle=BUNDLE,
        version=VERSION,
        time_ns=time_ns,
        ephemeral=CLIENT_EPHEMERAL,
        features=features,
    )


def make_server() -> ServerConnection:
    return ServerConnection(
        static=SERVER_STATIC,
        is_allowed=lambda key: key == CLIENT_STATIC.public,
        bundles={VERSION: HostedBundle(BUNDLE, VERSION)},
        replay_guard=ReplayGuard(),
        max_message=MAX_MESSAGE,
        ephemeral=SERVER_EPHEMERAL,
    )


def one_message(conn: ClientConnection | ServerConnection) -> bytes:
    (out,) = conn.data_to_send()
    return bytes(out)


def connected(
    *, features: tuple[str, ...] = ("load",), time_ns: int = T0
) -> tuple[ClientConnection, ServerConnection]:
    """A client and a server, handshaken in memory (both READY unless the handshake broke)."""
    client, server = make_client(features=features, time_ns=time_ns), make_server()
    client.start()
    server.receive(one_message(client))
    client.receive(one_message(server))
    return client, server


def encrypted(client: ClientConnection, plaintext: bytes) -> bytes:
    """A valid transport frame of ``plaintext`` (the client's next counter), as sent."""
    if client.transport is None:
        raise RuntimeError("the client has no transport yet: handshake first (connected())")
    return bytes(client.transport.encrypt(plaintext))


def valid_hello(*, time_ns: int = T0) -> bytes:
    client = make_client(time_ns=time_ns)
    client.start()
    return one_message(client)


def hello_map(time_ns: int) -> dict[Any, Any]:
    """The hello payload a client sends (what :func:`hello_carrying` lies about)."""
    return {"ts": tai64n(time_ns), "version": VERSION, "agent": "fuzz", "features": ["load"]}


class _SwapPayload:
    """Stands in for a ClientConnection's HandshakeState so that message 1 carries ``payload``
    instead of the hello the client built: the server then decrypts a fuzzed hello from a valid
    Noise message in an envelope (mac1 included) that the client itself wrote."""

    def __init__(self, hs: Any, payload: bytes) -> None:
        self._hs = hs
        self._payload = payload

    def write_message(self, payload: bytes = b"") -> bytes:
        return self._hs.write_message(self._payload)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hs, name)


def hello_carrying(payload: bytes, *, time_ns: int = T0) -> bytes:
    """Handshake message 1 whose encrypted payload is ``payload`` (any bytes)."""
    client = make_client(time_ns=time_ns)
    assert hasattr(client, "_hs"), "ClientConnection no longer keeps its HandshakeState in _hs"
    client._hs = _SwapPayload(client._hs, payload)  # type: ignore[assignment]
    client.start()
    return one_message(client)


def packed(value: Any) -> bytes:
    """``value`` as msgpack, the way a peer writes it (bytes as bin, str as str)."""
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def load_map() -> dict[Any, Any]:
    """A valid load report (a fresh dict each call: callers add to it)."""
    return {"inflight": 3, "queued": 1, "workers": 2, "kv_free": 1 << 20, "draining": False}


# -- tensors --------------------------------------------------------------------------------------


def array(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.startswith("float"):
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(-100, 100, size=shape).astype(dtype)


def valid_tensor_maps(
    rng: np.random.Generator,
    specs: tuple[TensorSpec, ...],
    dims: dict[str, int],
    bundle_codec: str,
) -> list[Any]:
    """The wire tensor maps of a real, valid request: ``specs`` at ``dims``, encoded with the
    bundle's codec, "data" as bytes (a memoryview for codec none is bytes on the wire)."""
    spec = codec_mod.CodecSpec.parse(bundle_codec)
    encoded = [
        (s.name, codec_mod.encode(array(rng, s.dtype, _shape(s, dims)), spec)) for s in specs
    ]
    maps: list[Any] = encode_tensors(encoded)
    for m in maps:
        m["data"] = bytes(m["data"])
    return maps


def _shape(spec: TensorSpec, dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else dims[d] for d in spec.shape)


def encoded_fields(
    rng: np.random.Generator, dtype: str, shape: tuple[int, ...], codec: str
) -> dict[str, Any]:
    """The fields of a real :class:`EncodedTensor` of a random ``dtype``/``shape`` array."""
    real = codec_mod.encode(array(rng, dtype, shape), codec_mod.CodecSpec.parse(codec))
    return {
        "dtype": real.dtype,
        "shape": real.shape,
        "codec": real.codec,
        "data": bytes(real.data),
        "scales": real.scales,
    }


def zstd_bomb(size: int, *, declare: bool) -> bytes:
    """A zstd frame of ``size`` zero bytes, compressed 1 MiB at a time (never held whole)."""
    cobj = zstandard.ZstdCompressor(level=1, write_content_size=declare).compressobj(
        size=size if declare else -1
    )
    zeros = bytes(1 << 20)
    out = [cobj.compress(zeros[: min(len(zeros), size - done)]) for done in range(0, size, 1 << 20)]
    return b"".join([*out, cobj.flush()])


@functools.cache
def bomb(compression: str, size: int, *, declare: bool = False) -> bytes:
    """A small payload that decompresses to ``size`` zero bytes ("zstd" or "lz4"; ``declare``:
    the zstd frame states its size). Built once per process."""
    if compression == "lz4":
        return lz4.block.compress(bytes(size), store_size=False)  # type: ignore[no-any-return]
    return zstd_bomb(size, declare=declare)


# The largest scale decode accepts is the one encode stores for a tensor holding float32 max.
_F32_MAX = float(np.finfo(np.float32).max)
LARGEST_SCALE = codec_mod.encode(
    np.array([_F32_MAX], np.float32), codec_mod.CodecSpec("int8")
).scales
SCALE_LIES = [
    *(np.float32(v).tobytes() for v in (0.0, -1.0, np.nan, np.inf, 1e38, 1e-45)),
    LARGEST_SCALE,
]


# -- the contract ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one call made of a peer's input."""

    value: Any = None  # what it returned, when it decoded
    error: Exception | None = None  # what it raised
    expected: bool = True  # the error is of the class the caller catches

    @property
    def decoded(self) -> bool:
        return self.error is None

    @property
    def typed(self) -> bool:
        """A typed error: an :class:`EdgeOffloadError`, in or outside the documented class."""
        return isinstance(self.error, EdgeOffloadError)

    @property
    def off_contract(self) -> bool:
        """Typed, but not what the caller catches (e.g. not a ProtocolError out of receive)."""
        return self.typed and not self.expected

    @property
    def untyped(self) -> bool:
        """Anything else: a KeyError, a TypeError, numpy's OverflowError, a MemoryError..."""
        return self.error is not None and not self.typed


def outcome(
    fn: Callable[..., Any],
    /,
    *args: Any,
    expect: type[EdgeOffloadError] | tuple[type[EdgeOffloadError], ...] = EdgeOffloadError,
    **kwargs: Any,
) -> Outcome:
    """``fn(*args, **kwargs)`` classified: decoded, typed (``expect``: the documented class or
    classes), or untyped. Only ``Exception`` is caught: a KeyboardInterrupt still stops a run."""
    try:
        return Outcome(value=fn(*args, **kwargs))
    except EdgeOffloadError as exc:
        return Outcome(error=exc, expected=isinstance(exc, expect))
    except Exception as exc:
        return Outcome(error=exc, expected=False)


def show(value: Any, limit: int = 600) -> str:
    """``repr(value)``, cut at ``limit`` characters (inputs can be megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


# -- what the server does next with an event (EdgeServer, minus onnxruntime) -----------------------


def direct(
    fn: Callable[..., Any],
    /,
    *args: Any,
    expect: type[EdgeOffloadError] | tuple[type[EdgeOffloadError], ...] = EdgeOffloadError,
    **kwargs: Any,
) -> Any:
    """The plain ``call`` of :func:`checked` and :func:`serve`: any error propagates, so the
    first typed one ends the checks (as the server's error reply does). ``expect`` is unused."""
    del expect
    return fn(*args, **kwargs)


@functools.cache
def codec_for(bundle_codec: str) -> Callable[[str], str]:
    """The codec a bundle with codec ``bundle_codec`` expects for each dtype (by name)."""
    spec = codec_mod.CodecSpec.parse(bundle_codec)
    return lambda dtype: codec_mod.codec_for_dtype(spec, dtype).name


def checked(
    tensors: Any,
    specs: Any,
    bundle_codec: str,
    max_bytes: int = MAX_MESSAGE,
    *,
    call: Callable[..., Any] = direct,
) -> Any:
    """``decode_checked`` against ``specs`` as the server calls it (PayloadError expected).

    ``call(fn, *args, expect=..., **kwargs)`` makes the call: :func:`direct`, or a caller's own
    (the test's ``typed`` returns the typed error instead and fails on anything else).
    """
    kwargs: dict[str, Any] = {"max_bytes": max_bytes}
    if TAKES_MAX_DIMS:
        kwargs["max_dims"] = MAX_DIMS
    return call(
        decode_checked, tensors, specs, codec_for(bundle_codec), expect=PayloadError, **kwargs
    )


def serve(
    event: Event,
    store: SessionStore,
    bundle_codec: str = "none",
    *,
    call: Callable[..., Any] = direct,
    look_up_session: bool = False,
) -> None:
    """Run ``event`` through the server's next checks: tensors against the bundle, sampling
    parameters, session grants and positions, the session store. Each must be typed as the
    server's handlers expect (they answer those with an error reply and go on).

    Each check is made through ``call`` (see :func:`checked`): with :func:`direct` the first
    typed error ends them; with a ``call`` that returns the error, the later checks run too.
    ``look_up_session``: look a feed's session up in ``store`` first (it never exists there;
    with :func:`direct` its SessionError would end the checks before the tensors, so the
    benchmark leaves it to its ``readers`` target). ``store.open`` is called as is.
    """
    owner = CLIENT_STATIC.public
    if isinstance(event, RunRequest):
        checked(event.tensors, SPECS, bundle_codec, call=call)
    elif isinstance(event, InvalidRequest):
        assert isinstance(event.message, str)
    elif isinstance(event, SessionOpen):
        params = call(SamplingParams.from_dict, event.sampling, expect=SamplingError)
        granted = call(grant_max_tokens, event.max_tokens, MAX_CONTEXT, expect=SessionError)
        if isinstance(params, SamplingParams) and isinstance(granted, int):
            store.open(
                owner=owner,
                version=VERSION,
                sampling=params,
                make_kv=lambda: KVState((), {}, max_tokens=granted),
                now=0.0,
            )
    elif isinstance(event, SessionEnd):
        call(store.close, event.session, owner=owner, version=VERSION, now=0.0, expect=SessionError)
    elif isinstance(event, SessionFeed):
        if look_up_session:
            call(
                store.get, event.session, owner=owner, version=VERSION, now=0.0, expect=SessionError
            )
        # As if the session existed and held ``pos`` positions, to reach the tensor checks.
        length = event.pos if event.kind == "prefill" or event.pos else 0
        call(
            check_feed, event.kind, event.session, event.pos, length=length, busy=False,
            expect=SessionError,
        )  # fmt: skip
        kv = KVState((), {}, max_tokens=MAX_CONTEXT)
        call(kv.check_room, sum(c.n for c in event.chunks), expect=SessionError)
        for chunk in event.chunks:
            checked(chunk.tensors, DECODER_SPECS, bundle_codec, call=call)
