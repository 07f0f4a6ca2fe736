#!/usr/bin/env python
"""Generate the edgeoffload wire protocol v1 golden vectors (``protocol-v1.json``).

Run from the repository root::

    python mobile_bridge/vectors/generate.py            # rewrite protocol-v1.json
    python mobile_bridge/vectors/generate.py --check    # exit 1 if the committed file differs

Everything comes from fixed inputs: static and ephemeral X25519 keys derived from fixed labels,
a fixed clock (``TIME_NS``), a fixed bundle manifest and fixed tensors. The handshake and the
transport messages are produced by the real sans-I/O connections
(:class:`edgeoffload.protocol.connection.ClientConnection` /
:class:`~edgeoffload.protocol.connection.ServerConnection`, with ``ephemeral=`` and ``time_ns=``
pinned), and every byte is cross-checked against a second,
independent run of the bare Noise primitives (:mod:`edgeoffload.core.noise`) before it is written;
each hello's ``mac1`` is recomputed with hashlib from the formula of PROTOCOL.md §5.3, and the
hellos listed under ``mac1.rejected`` are checked to be refused by the real server.
The file is never edited by hand: change the code, rerun this script, review the diff.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from edgeoffload.core import codec as codec_mod
from edgeoffload.core.noise import CHUNK, RUNTIME_PROTOCOLS, HandshakeState, Transport
from edgeoffload.core.sampling import SamplingParams, filtered_distribution, sample_token
from edgeoffload.errors import AuthenticationFailed, VersionMismatch
from edgeoffload.keys import KeyPair, encode_public, fingerprint
from edgeoffload.manifest import Manifest, PartInfo
from edgeoffload.protocol.connection import (
    MAC1_LABEL,
    MAX_HELLO_BYTES,
    MAX_RETRY_MS,
    PROLOGUE_PREFIX,
    PROTOCOL_VERSION,
    ClientConnection,
    HostedBundle,
    ReplayGuard,
    ServerConnection,
    mac1,
    mac1_key,
    prologue,
    tai64n,
)
from edgeoffload.protocol.events import (
    Chunk,
    CloseRequested,
    ErrorReply,
    FetchRequest,
    FileData,
    HandshakeComplete,
    Ping,
    Pong,
    RunRequest,
    RunResult,
    SessionEnd,
    SessionEnded,
    SessionFeed,
    SessionOpen,
    SessionOpened,
    StatusReply,
    StatusRequest,
    TokenResult,
)
from edgeoffload.protocol.load import BundleLoad, ServerLoad
from edgeoffload.protocol.updates import UpdateOffer
from edgeoffload.protocol.wire import MAX_STR
from edgeoffload.types import TensorSpec

OUTPUT = Path(__file__).resolve().parent / "protocol-v1.json"

# 2026-01-01T00:00:00.123456789Z as Unix nanoseconds.
TIME_NS = 1_767_225_600_123_456_789
# The agent string is fixed so that a version bump does not change every vector.
AGENT = "edgeoffload/golden-vectors"
KEY_LABEL = b"edgeoffload protocol-v1 golden vector: "
SERVER_MAX_MESSAGE = 1 << 20  # the edge server's floor (server.MIN_MAX_MESSAGE)
CLIENT_MAX_MESSAGE = 1 << 20
UNHOSTED_VERSION = "0000000000000000"
CHUNKED_PAD = 70_000  # > 65519: a ping/pong that needs two transport chunks
# A 600 000-byte tensor: the large-message paths (pre-sized packing, multi-chunk and, on
# machines with several cores, parallel AEAD) must give the same bytes as the simple ones.
LARGE_COUNT = 150_000
LARGE_ARRAY = np.arange(LARGE_COUNT, dtype="<f4").reshape(1, LARGE_COUNT)
# §14: the hello asks for a feature the server knows and one it does not.
FEATURES_ASKED = ("load", "x-unknown")
RESULT_LOAD = ServerLoad(
    inflight=3, queued=1, workers=2, kv_free=1 << 30, draining=False, tail_ms=12.25
)
STATUS_LOAD = ServerLoad(inflight=0, queued=0, workers=2, kv_free=1 << 30, draining=True)
REKEY_MESSAGES = 2  # the rekey vector lowers the limit (the wire default is 2**16)
OVERLOADED_RETRY_MS = 250  # the retry_ms of the transport vectors' "overloaded" error (§7)


def _key(label: str) -> KeyPair:
    """A fixed key pair: private key = sha256(KEY_LABEL + label), used as raw X25519 bytes."""
    return KeyPair.from_private(hashlib.sha256(KEY_LABEL + label.encode()).digest())


CLIENT_STATIC = _key("device static")
CLIENT_EPHEMERAL = _key("device ephemeral")
SERVER_STATIC = _key("server static")
SERVER_EPHEMERAL = _key("server ephemeral")
# Only its public key is used: the mac1 vector for a device that pinned another server's key.
OTHER_SERVER_STATIC = _key("other server static")


def golden_manifest() -> Manifest:
    """A bundle manifest with fixed hashes; only identity and version reach the wire."""
    x = TensorSpec("x", "float32", ("batch", 3))
    y = TensorSpec("y", "float32", ("batch", 2))
    return Manifest(
        source_sha256=hashlib.sha256(b"golden source model").hexdigest(),
        source_name="golden",
        cut_id="c3",
        cut_after="relu_2",
        crossing=(x,),
        passthrough=(),
        graph_inputs=(TensorSpec("input", "float32", ("batch", 4)),),
        graph_outputs=(y,),
        head=PartInfo("head.onnx", hashlib.sha256(b"golden head").hexdigest(), (), (x,)),
        tail=PartInfo("tail.onnx", hashlib.sha256(b"golden tail").hexdigest(), (x,), (y,)),
        codec="fp16+zstd",
    )


# Tensors of the transport vectors.
RUN_ARRAY = np.array([[1.0, -2.5, 0.0], [3.25, 0.001, -7.0]], dtype=np.float32)
RESULT_ARRAY = np.array([[0.25, 0.75], [-1.0, 2.0]], dtype=np.float32)

# Generation session vectors (PROTOCOL.md §12): a server-chosen 63-bit id, the sampling
# settings of the open, and the crossing tensor "x" of the golden bundle for 2 + 1 prefill
# positions and one step (the protocol does not relate a chunk's n to its tensors' shapes;
# the tail does). The token values are arbitrary: no model runs here.
SESSION_ID = int.from_bytes(hashlib.sha256(b"edgeoffload golden session").digest()[:8], "big") >> 1
SESSION_SAMPLING = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7)
SESSION_MAX_TOKENS = 64
PREFILL_X = (
    np.array([[0.5, -1.0, 2.0], [0.25, 3.5, -0.75]], dtype=np.float32),  # chunk n = 2
    np.array([[1.5, 0.0, -2.25]], dtype=np.float32),  # chunk n = 1
)
STEP_X = np.array([[-0.5, 4.0, 0.125]], dtype=np.float32)

# Sampling vectors (PROTOCOL.md §12.6): fixed logits (one masked with -inf, a tie at the top)
# and (params, position) cases; every draw is np.random.default_rng([seed, position]).random().
SAMPLING_LOGITS = np.array(
    [2.0, -1.0, 0.5, 3.0, 3.0, -np.inf, 0.0, 1.5, -0.25, 2.5], dtype=np.float32
)
SAMPLING_CASES: tuple[tuple[SamplingParams, int], ...] = (
    (SamplingParams(), 0),
    (SamplingParams(temperature=1.0, seed=0), 0),
    (SamplingParams(temperature=1.0, seed=0), 1),
    (SamplingParams(temperature=0.5, seed=1), 5),
    (SamplingParams(temperature=0.8, top_k=3, seed=7), 3),
    (SamplingParams(temperature=0.8, top_p=0.5, seed=7), 3),
    (SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7), 0),
    (SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7), 1),
    (SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7), 2),
    (SamplingParams(temperature=2.0, top_k=1, seed=3), 4),
    (SamplingParams(temperature=1.0, seed=2**63 - 1), 2**32 - 1),
)

# Inputs of the codec vectors: fp16 saturation (70000), int8 rounding, an int64 tensor that
# keeps quant "none" whatever the codec asks for.
CODEC_FLOAT = np.array([[0.5, -1.25, 3.0], [100.0, -0.001, 70000.0]], dtype=np.float32)
CODEC_INT64 = np.array([[0, 1, -1], [2**40, -(2**40), 7]], dtype=np.int64)
CODEC_CASES: tuple[tuple[str, np.ndarray, str], ...] = (
    ("float32 none", CODEC_FLOAT, "none"),
    ("float32 fp16", CODEC_FLOAT, "fp16"),
    ("float32 int8", CODEC_FLOAT, "int8"),
    ("float32 int8c", CODEC_FLOAT, "int8c"),
    ("float32 zstd", CODEC_FLOAT, "zstd"),
    ("float32 lz4", CODEC_FLOAT, "lz4"),
    ("float32 fp16+zstd", CODEC_FLOAT, "fp16+zstd"),
    ("float32 int8c+lz4", CODEC_FLOAT, "int8c+lz4"),
    ("int64 fp16+zstd (quant does not apply: codec becomes zstd)", CODEC_INT64, "fp16+zstd"),
    ("int64 int8+lz4 (quant does not apply: codec becomes lz4)", CODEC_INT64, "int8+lz4"),
)


# -- helpers ----------------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    """A decoded msgpack value as JSON: bin values become {"bin": hex}."""
    if isinstance(obj, bytes):
        return {"bin": obj.hex()}
    if isinstance(obj, dict):
        return {key: _plain(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_plain(value) for value in obj]
    return obj


def _described(obj: Any) -> Any:
    """Like :func:`_plain`, but the large bin values of the compact vectors become a recipe.

    ``{"zero_bytes": n}`` is ``n`` zero bytes; ``{"arange_float32": n}`` is the little-endian
    float32 values ``0.0, 1.0, ..., n - 1``.
    """
    if isinstance(obj, bytes):
        if len(obj) > 64 and not any(obj):
            return {"zero_bytes": len(obj)}
        if len(obj) > 64:
            count = len(obj) // 4
            if obj != np.arange(count, dtype="<f4").tobytes():
                raise AssertionError("compact vectors describe zeros or arange data only")
            return {"arange_float32": count}
        return {"bin": obj.hex()}
    if isinstance(obj, dict):
        return {key: _described(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_described(value) for value in obj]
    return obj


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=True)


def _keypair(pair: KeyPair, label: str) -> dict[str, str]:
    return {
        "label": label,
        "private": pair.private.hex(),
        "public": pair.public.hex(),
        "text": encode_public(pair.public),
        "fingerprint": fingerprint(pair.public),
    }


def _le_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _mirror_handshake(
    protocol: str, bundle: str, message1: bytes, message2: bytes
) -> tuple[HandshakeState, HandshakeState, bytes, bytes]:
    """Replay the handshake with bare Noise states; check it yields the same bytes.

    Returns the completed initiator and responder states and the two plaintext payloads.
    """
    pro = prologue(protocol, bundle)
    init = HandshakeState(
        protocol,
        initiator=True,
        prologue=pro,
        s=CLIENT_STATIC,
        e=CLIENT_EPHEMERAL,
        rs=SERVER_STATIC.public,
    )
    resp = HandshakeState(
        protocol, initiator=False, prologue=pro, s=SERVER_STATIC, e=SERVER_EPHEMERAL
    )
    envelope1 = _unpack(message1)
    noise1, noise2 = envelope1["noise"], _unpack(message2)["noise"]
    # mac1 by hand with hashlib, as PROTOCOL.md §5.3 states it.
    key = hashlib.blake2s(b"edgeoffload mac1" + SERVER_STATIC.public).digest()
    if envelope1["mac1"] != hashlib.blake2s(pro + noise1, digest_size=16, key=key).digest():
        raise AssertionError(f"{protocol}: mac1 differs from the spec's formula")
    hello = resp.read_message(noise1)
    if init.write_message(hello) != noise1:
        raise AssertionError(f"{protocol}: message 1 differs from a bare Noise initiator")
    welcome = init.read_message(noise2)
    if resp.write_message(welcome) != noise2:
        raise AssertionError(f"{protocol}: message 2 differs from a bare Noise responder")
    if init.handshake_hash != resp.handshake_hash:
        raise AssertionError(f"{protocol}: handshake hashes differ")
    if resp.remote_static != CLIENT_STATIC.public:
        raise AssertionError(f"{protocol}: responder did not learn the device key")
    return init, resp, hello, welcome


def _handshake_message(message: bytes, payload: bytes) -> dict[str, Any]:
    envelope = _unpack(message)
    return {
        "envelope_hex": message.hex(),
        "envelope": _plain(envelope),
        "noise_hex": envelope["noise"].hex(),
        "noise_len": len(envelope["noise"]),
        "payload_hex": payload.hex(),
        "payload": _plain(_unpack(payload)),
    }


class _Recorder:
    """Sends messages through the real connections and records them, checked twice."""

    def __init__(
        self,
        client: ClientConnection,
        server: ServerConnection,
        init: Transport,
        resp: Transport,
    ) -> None:
        self.client, self.server = client, server
        self.init, self.resp = init, resp
        self.nonces = {"client->server": 0, "server->client": 0}
        self.messages: list[dict[str, Any]] = []

    def send(
        self,
        direction: str,
        send: Callable[[], None],
        expect: type,
        *,
        note: str = "",
        compact: bool = False,
    ) -> Any:
        if direction == "client->server":
            sender, receiver, mirror_send, mirror_recv = (
                self.client,
                self.server,
                self.init,
                self.resp,
            )
        else:
            sender, receiver, mirror_send, mirror_recv = (
                self.server,
                self.client,
                self.resp,
                self.init,
            )
        send()
        (ciphertext,) = sender.data_to_send()
        plaintext = mirror_recv.decrypt(ciphertext)
        if mirror_send.encrypt(plaintext) != ciphertext:
            raise AssertionError(f"{direction}: ciphertext differs from a bare Noise transport")
        (event,) = receiver.receive(ciphertext)
        if not isinstance(event, expect):
            raise AssertionError(f"{direction}: expected {expect.__name__}, got {event!r}")
        chunks = len(plaintext) // CHUNK + 1
        entry: dict[str, Any] = {
            "direction": direction,
            "type": _unpack(plaintext)["t"],
            "nonce": self.nonces[direction],
            "chunks": chunks,
        }
        if note:
            entry["note"] = note
        self.nonces[direction] += chunks
        entry["plaintext_len"] = len(plaintext)
        entry["ciphertext_len"] = len(ciphertext)
        if compact:
            entry["message"] = _described(_unpack(plaintext))
            entry["plaintext_head_hex"] = plaintext[:16].hex()
            entry["plaintext_sha256"] = hashlib.sha256(plaintext).hexdigest()
            entry["ciphertext_sha256"] = hashlib.sha256(ciphertext).hexdigest()
            entry["ciphertext_chunk_lens"] = [
                len(ciphertext[i : i + CHUNK + 16]) for i in range(0, len(ciphertext), CHUNK + 16)
            ]
        else:
            entry["plaintext_hex"] = plaintext.hex()
            entry["ciphertext_hex"] = ciphertext.hex()
            entry["message"] = _plain(_unpack(plaintext))
        self.messages.append(entry)
        return event


# -- vectors ----------------------------------------------------------------------------------


def suite_vectors(protocol: str, manifest: Manifest) -> dict[str, Any]:
    """The handshake, transport, refusal and rekey vectors of one Noise suite."""
    identity, version = manifest.identity, manifest.version
    hosted = {version: HostedBundle(identity, version)}

    def new_server() -> ServerConnection:
        return ServerConnection(
            static=SERVER_STATIC,
            is_allowed=lambda key: key == CLIENT_STATIC.public,
            bundles=hosted,
            replay_guard=ReplayGuard(),
            max_message=SERVER_MAX_MESSAGE,
            ephemeral=SERVER_EPHEMERAL,
            agent=AGENT,
        )

    def new_client(bundle_version: str, features: tuple[str, ...] = ()) -> ClientConnection:
        return ClientConnection(
            static=CLIENT_STATIC,
            server_public=SERVER_STATIC.public,
            bundle=identity,
            version=bundle_version,
            time_ns=TIME_NS,
            protocol=protocol,
            ephemeral=CLIENT_EPHEMERAL,
            max_message=CLIENT_MAX_MESSAGE,
            agent=AGENT,
            features=features,
        )

    # Accepted handshake.
    client, server = new_client(version), new_server()
    client.start()
    (message1,) = client.data_to_send()
    (server_event,) = server.receive(message1)
    if not isinstance(server_event, HandshakeComplete):
        raise AssertionError(f"server did not accept the handshake: {server_event!r}")
    (message2,) = server.data_to_send()
    (client_event,) = client.receive(message2)
    if not isinstance(client_event, HandshakeComplete):
        raise AssertionError(f"client did not accept the welcome: {client_event!r}")
    init, resp, hello, welcome = _mirror_handshake(protocol, identity, message1, message2)
    handshake_hash = init.handshake_hash

    # Transport messages, in the order they are sent.
    rec = _Recorder(client, server, init.transport(), resp.transport())
    none = codec_mod.CodecSpec()
    rec.send(
        "client->server",
        lambda: client.send_run(1, [("x", codec_mod.encode(RUN_ARRAY, none))]),
        RunRequest,
        note="run, float32 [2, 3] under codec none",
    )
    fp16_zstd = codec_mod.CodecSpec.parse("fp16+zstd")
    rec.send(
        "client->server",
        lambda: client.send_run(2, [("x", codec_mod.encode(RUN_ARRAY, fp16_zstd))]),
        RunRequest,
        note="run, the same tensor under codec fp16+zstd (the bundle's codec)",
    )
    rec.send(
        "server->client",
        lambda: server.send_result(1, [("y", codec_mod.encode(RESULT_ARRAY, none))], 1.5),
        RunResult,
        note="result of request 1 (results always use codec none)",
    )
    rec.send(
        "server->client",
        lambda: server.send_error(
            2, "overloaded", "4 requests in flight", retry_ms=OVERLOADED_RETRY_MS
        ),
        ErrorReply,
        note=f"overloaded error for request 2, retry_ms = {OVERLOADED_RETRY_MS}",
    )
    rec.send("client->server", lambda: client.send_ping(3, b"\x01\x02\x03"), Ping, note="ping")
    rec.send(
        "server->client", lambda: server.send_pong(3, b"\x01\x02\x03"), Pong, note="pong echoes pad"
    )
    big_pad = bytes(CHUNKED_PAD)
    rec.send(
        "client->server",
        lambda: client.send_ping(4, big_pad),
        Ping,
        note=f"ping with {CHUNKED_PAD} zero bytes of pad: two chunks (listed by hash)",
        compact=True,
    )
    rec.send(
        "server->client",
        lambda: server.send_pong(4, big_pad),
        Pong,
        note="pong with the same pad: two chunks (listed by hash)",
        compact=True,
    )
    rec.send(
        "client->server",
        lambda: client.send_run(5, [("x", codec_mod.encode(LARGE_ARRAY, none))]),
        RunRequest,
        note=f"run with a float32 [1, {LARGE_COUNT}] tensor under codec none (listed by hash)",
        compact=True,
    )
    rec.send(
        "server->client",
        lambda: server.send_result(5, [("y", codec_mod.encode(LARGE_ARRAY, none))], 2.5),
        RunResult,
        note=f"result with a float32 [1, {LARGE_COUNT}] tensor (listed by hash)",
        compact=True,
    )
    rec.send("client->server", lambda: client.send_close("done"), CloseRequested, note="close")

    # Generation session messages on a second connection with the same handshake.
    sessions = session_vectors(new_client(version), new_server(), protocol, identity, message1)

    # Load reports (§14) on a third connection whose hello asks for features.
    loads = load_vectors(
        new_client(version, FEATURES_ASKED), new_server(), protocol, identity, version
    )

    # Head updates (§16) on a fourth connection whose hello asks for "load" and "update".
    updates = update_vectors(
        new_client(version, UPDATE_FEATURES_ASKED),
        ServerConnection(
            static=SERVER_STATIC,
            is_allowed=lambda key: key == CLIENT_STATIC.public,
            bundles=hosted,
            replay_guard=ReplayGuard(),
            max_message=SERVER_MAX_MESSAGE,
            ephemeral=SERVER_EPHEMERAL,
            agent=AGENT,
            offers=lambda v, device: UPDATE_OFFER if v == version else None,
        ),
        protocol,
        identity,
        version,
    )

    # Refused handshake: the device asks for a version the server does not host.
    refused_client, refused_server = new_client(UNHOSTED_VERSION), new_server()
    refused_client.start()
    (refused1,) = refused_client.data_to_send()
    (refused_event,) = refused_server.receive(refused1)
    if not isinstance(refused_event, ErrorReply):
        raise AssertionError(f"server did not refuse: {refused_event!r}")
    (refused2,) = refused_server.data_to_send()
    try:
        refused_client.receive(refused2)
    except VersionMismatch:
        pass
    else:
        raise AssertionError("client accepted a refusal")
    _, _, refused_hello, refused_reply = _mirror_handshake(protocol, identity, refused1, refused2)

    # Rekey rule at a lowered limit, on a fresh transport with this suite's session keys.
    rk_init, rk_resp, _, _ = _mirror_handshake(protocol, identity, message1, message2)
    sender = rk_init.transport(rekey_messages=REKEY_MESSAGES)
    receiver = rk_resp.transport(rekey_messages=REKEY_MESSAGES)
    rekey_messages = []
    for index in range(3):
        plaintext = f"rekey vector message {index}".encode()
        ciphertext = sender.encrypt(plaintext)
        if receiver.decrypt(ciphertext) != plaintext:
            raise AssertionError(f"{protocol}: rekey vector does not round-trip")
        rekey_messages.append(
            {"nonce": index, "plaintext_hex": plaintext.hex(), "ciphertext_hex": ciphertext.hex()}
        )

    return {
        "protocol_name": protocol,
        "keys": {
            "client_static": _keypair(CLIENT_STATIC, "device static"),
            "client_ephemeral": _keypair(CLIENT_EPHEMERAL, "device ephemeral"),
            "server_static": _keypair(SERVER_STATIC, "server static"),
            "server_ephemeral": _keypair(SERVER_EPHEMERAL, "server ephemeral"),
        },
        "prologue_hex": prologue(protocol, identity).hex(),
        "mac1": mac1_vectors(protocol, identity, message1, new_server),
        "handshake": {
            "message1": _handshake_message(message1, hello),
            "message2": _handshake_message(message2, welcome),
            "handshake_hash_hex": handshake_hash.hex(),
        },
        "transport": rec.messages,
        "sessions": {
            "note": "a second connection whose handshake is byte-identical to 'handshake' "
            "(same fixed keys and clock, so the same transport keys; nonces restart at 0 in "
            "each direction); the device opens a generation session, prefills 3 positions in "
            "2 chunks, steps once, ends the session, then steps again and gets session_lost",
            "session_id": SESSION_ID,
            "session_id_hex": f"{SESSION_ID:016x}",
            "messages": sessions,
        },
        "load": loads,
        "update": updates,
        "refused_handshake": {
            "note": f"the device offers bundle version {UNHOSTED_VERSION}, which the server "
            "does not host; the server answers message 2 with ok=false and closes (4409)",
            "message1": _handshake_message(refused1, refused_hello),
            "message2": _handshake_message(refused2, refused_reply),
        },
        "rekey": {
            "note": f"client->server on a fresh transport of this suite's session (nonce 0), "
            f"with rekey_messages={REKEY_MESSAGES} instead of the wire default 2**16: messages "
            "0 and 1 use the split key k, then the key becomes REKEY(k) and message 2 uses it "
            "with nonce 2 (rekeying does not reset the nonce)",
            "rekey_messages": REKEY_MESSAGES,
            "messages": rekey_messages,
        },
    }


def mac1_vectors(
    protocol: str,
    identity: str,
    message1: bytes | bytearray,
    new_server: Callable[[], ServerConnection],
) -> dict[str, Any]:
    """mac1 of the accepted hello, and hellos the server must reject on mac1 alone (§5.3)."""
    envelope = _unpack(bytes(message1))
    pro = prologue(protocol, identity)
    key = mac1_key(SERVER_STATIC.public)
    if mac1(key, pro, envelope["noise"]) != envelope["mac1"]:
        raise AssertionError(f"{protocol}: the hello's mac1 is not mac1(prologue || noise)")
    flipped = bytearray(envelope["mac1"])
    flipped[-1] ^= 0x01
    other = mac1(mac1_key(OTHER_SERVER_STATIC.public), pro, envelope["noise"])
    without = {k: v for k, v in envelope.items() if k != "mac1"}
    cases = [
        ("mac1 with its last bit flipped", dict(envelope, mac1=bytes(flipped))),
        (
            "mac1 computed with the key of another server (public key "
            f"{OTHER_SERVER_STATIC.public.hex()}): the device pinned the wrong key",
            dict(envelope, mac1=other),
        ),
        ("no mac1 field", without),
    ]
    rejected = []
    for note, forged in cases:
        data = msgpack.packb(forged, use_bin_type=True)
        try:
            new_server().receive(data)
        except AuthenticationFailed:
            pass
        else:
            raise AssertionError(f"{protocol}: the server accepted a hello with {note}")
        rejected.append({"note": note, "envelope_hex": data.hex(), "close_code": 4401})
    return {
        "note": "mac1 = BLAKE2s-128 keyed with key = BLAKE2s-256(label || server static public), "
        "over input = prologue || noise (the message-1 envelope's noise field); 'rejected' are "
        "hellos that differ only in mac1: the server refuses them with AuthenticationFailed "
        "(close 4401) before any Diffie-Hellman",
        "label_hex": MAC1_LABEL.hex(),
        "key_hex": key.hex(),
        "input_hex": (pro + envelope["noise"]).hex(),
        "mac1_hex": envelope["mac1"].hex(),
        "rejected": rejected,
    }


def session_vectors(
    client: ClientConnection,
    server: ServerConnection,
    protocol: str,
    identity: str,
    expected_message1: bytes | bytearray,
) -> list[dict[str, Any]]:
    """open/opened, prefill (2 chunks)/token, step/token, end/ended, step/session_lost."""
    client.start()
    (message1,) = client.data_to_send()
    if message1 != expected_message1:
        raise AssertionError(f"{protocol}: the second handshake differs from the first")
    (server_event,) = server.receive(message1)
    if not isinstance(server_event, HandshakeComplete):
        raise AssertionError(f"server did not accept the handshake: {server_event!r}")
    (message2,) = server.data_to_send()
    client.receive(message2)
    init, resp, _, _ = _mirror_handshake(protocol, identity, bytes(message1), bytes(message2))
    rec = _Recorder(client, server, init.transport(), resp.transport())
    none = codec_mod.CodecSpec()

    def x(array: np.ndarray) -> tuple[tuple[str, codec_mod.EncodedTensor], ...]:
        return (("x", codec_mod.encode(array, none)),)

    sid = SESSION_ID
    rec.send(
        "client->server",
        lambda: client.send_open(20, SESSION_SAMPLING.to_dict(), SESSION_MAX_TOKENS),
        SessionOpen,
        note="open: sampling settings and the positions the device wants",
    )
    rec.send(
        "server->client",
        lambda: server.send_opened(20, sid, SESSION_MAX_TOKENS),
        SessionOpened,
        note="opened: the server-chosen session id and the positions granted",
    )
    prefill = [Chunk(len(a), x(a)) for a in PREFILL_X]
    rec.send(
        "client->server",
        lambda: client.send_feed(21, "prefill", sid, 0, prefill),
        SessionFeed,
        note="prefill at pos 0: two chunks, n = 2 then n = 1",
    )
    rec.send(
        "server->client",
        lambda: server.send_token(21, sid, 3, 42, 1.25),
        TokenResult,
        note="token: pos is the session length after the prefill (3)",
    )
    rec.send(
        "client->server",
        lambda: client.send_feed(22, "step", sid, 3, [Chunk(1, x(STEP_X))]),
        SessionFeed,
        note="step at pos 3 (the session length): one position, tensors at the top level",
    )
    rec.send(
        "server->client",
        lambda: server.send_token(22, sid, 4, 7, 0.5),
        TokenResult,
        note="token after the step; the session holds 4 positions",
    )
    rec.send("client->server", lambda: client.send_end(23, sid), SessionEnd, note="end")
    rec.send("server->client", lambda: server.send_ended(23, sid), SessionEnded, note="ended")
    rec.send(
        "client->server",
        lambda: client.send_feed(24, "step", sid, 4, [Chunk(1, x(STEP_X))]),
        SessionFeed,
        note="a step on the ended session",
    )
    rec.send(
        "server->client",
        lambda: server.send_error(
            24, "session_lost", f"no session {sid} (expired, evicted or never opened)"
        ),
        ErrorReply,
        note="session_lost: the device rebuilds the session by replay (or gives up)",
    )
    return rec.messages


def load_vectors(
    client: ClientConnection,
    server: ServerConnection,
    protocol: str,
    identity: str,
    version: str,
) -> dict[str, Any]:
    """A hello asking for features, the welcome granting "load", a result carrying a load
    report, and status / status (§14)."""
    client.start()
    (message1,) = client.data_to_send()
    (server_event,) = server.receive(message1)
    if not isinstance(server_event, HandshakeComplete):
        raise AssertionError(f"server did not accept the handshake: {server_event!r}")
    (message2,) = server.data_to_send()
    client.receive(message2)
    if client.features != ("load",) or server.features != ("load",):
        raise AssertionError(f"features not negotiated: {client.features} / {server.features}")
    init, resp, hello, welcome = _mirror_handshake(
        protocol, identity, bytes(message1), bytes(message2)
    )
    rec = _Recorder(client, server, init.transport(), resp.transport())
    none = codec_mod.CodecSpec()
    rec.send(
        "client->server",
        lambda: client.send_run(1, [("x", codec_mod.encode(RUN_ARRAY, none))]),
        RunRequest,
        note="run, as in 'transport'",
    )
    rec.send(
        "server->client",
        lambda: server.send_result(
            1, [("y", codec_mod.encode(RESULT_ARRAY, none))], 1.5, RESULT_LOAD
        ),
        RunResult,
        note="result with a load report: 3 other requests in flight, 1 waiting for a worker",
    )
    rec.send("client->server", lambda: client.send_status(2), StatusRequest, note="status")
    rec.send(
        "server->client",
        lambda: server.send_status(2, STATUS_LOAD, [BundleLoad(identity, version, 0)]),
        StatusReply,
        note="status: the load and every hosted bundle (tail_ms absent: never run)",
    )
    return {
        "note": "a third connection: same keys and clock as 'handshake', but the hello payload "
        f"asks for features {list(FEATURES_ASKED)}; the server grants the ones it knows "
        "(['load']), so its results carry 'load' and it answers 'status'",
        "message1": _handshake_message(message1, hello),
        "message2": _handshake_message(message2, welcome),
        "messages": rec.messages,
    }


UPDATE_FEATURES_ASKED = ("load", "update")
UPDATE_OFFER = UpdateOffer(
    version="5ee0b7d2c4a1f3e9",
    identity="b7a1" + "0" * 60 + ":c3",
    model="golden-model",
    number=2,
)
UPDATE_MANIFEST = b'{"golden": "a stand-in for manifest.json (any bytes)"}\n'
UPDATE_HEAD_SIZE = 5000  # the head's size in the vectors; the second fetch reads its end
UPDATE_HEAD = hashlib.sha256(b"edgeoffload golden head").digest() * (UPDATE_HEAD_SIZE // 32 + 1)


def update_vectors(
    client: ClientConnection,
    server: ServerConnection,
    protocol: str,
    identity: str,
    version: str,
) -> dict[str, Any]:
    """A hello asking for "load" and "update", the welcome with the offer, two fetches and
    their file pieces (a whole small file; the short last piece of another), and a status
    that carries the offer (§16)."""
    client.start()
    (message1,) = client.data_to_send()
    (server_event,) = server.receive(message1)
    if not isinstance(server_event, HandshakeComplete):
        raise AssertionError(f"server did not accept the handshake: {server_event!r}")
    (message2,) = server.data_to_send()
    (client_event,) = client.receive(message2)
    if not isinstance(client_event, HandshakeComplete) or client_event.update != UPDATE_OFFER:
        raise AssertionError(f"the welcome did not carry the offer: {client_event!r}")
    if client.features != UPDATE_FEATURES_ASKED:
        raise AssertionError(f"features not negotiated: {client.features}")
    init, resp, hello, welcome = _mirror_handshake(
        protocol, identity, bytes(message1), bytes(message2)
    )
    rec = _Recorder(client, server, init.transport(), resp.transport())
    offered = UPDATE_OFFER.version
    head = UPDATE_HEAD[:UPDATE_HEAD_SIZE]
    rec.send(
        "client->server",
        lambda: client.send_fetch(1, offered, "manifest.json", 0, 4096),
        FetchRequest,
        note="fetch the offered version's manifest, 4096 bytes from offset 0",
    )
    rec.send(
        "server->client",
        lambda: server.send_file(1, UPDATE_MANIFEST, len(UPDATE_MANIFEST)),
        FileData,
        note="the whole manifest: shorter than asked because the file ends (size = its length)",
    )
    rec.send(
        "client->server",
        lambda: client.send_fetch(2, offered, "head.onnx", 4096, 4096),
        FetchRequest,
        note=f"fetch the head from offset 4096 (a resumed download of a {UPDATE_HEAD_SIZE}-byte "
        "file)",
    )
    rec.send(
        "server->client",
        lambda: server.send_file(2, head[4096:], UPDATE_HEAD_SIZE),
        FileData,
        note=f"the last {UPDATE_HEAD_SIZE - 4096} bytes of the head",
    )
    rec.send("client->server", lambda: client.send_status(3), StatusRequest, note="status")
    rec.send(
        "server->client",
        lambda: server.send_status(3, STATUS_LOAD, [BundleLoad(identity, version, 0)]),
        StatusReply,
        note="status with the offer (the newest version of the device's model)",
    )
    return {
        "note": "a fourth connection: same keys and clock as 'handshake', the hello asks for "
        f"features {list(UPDATE_FEATURES_ASKED)}; the server serves a newer version of the "
        "device's model, so its welcome carries 'update' (§16.1); the device fetches pieces "
        "of that version's files (§16.3)",
        "offer": UPDATE_OFFER.to_wire(),
        "message1": _handshake_message(message1, hello),
        "message2": _handshake_message(message2, welcome),
        "messages": rec.messages,
    }


def _f64(value: float) -> dict[str, Any]:
    """A float64 exactly: its value (shortest repr) and its IEEE 754 bits, big-endian hex."""
    return {"value": value, "bits_hex": np.float64(value).tobytes()[::-1].hex()}


def sampling_vectors() -> dict[str, Any]:
    logits = SAMPLING_LOGITS
    cases = []
    for params, position in SAMPLING_CASES:
        ids, probs = filtered_distribution(logits, params)
        case: dict[str, Any] = {"params": params.to_dict(), "position": position}
        if not params.greedy:
            case["u"] = _f64(float(np.random.default_rng([params.seed, position]).random()))
        case["support"] = [int(i) for i in ids]
        case["probs"] = [float(p) for p in probs]
        case["token"] = sample_token(logits, params, position)
        cases.append(case)
    return {
        "note": "u = np.random.default_rng([seed, position]).random() (numpy SeedSequence + "
        "PCG64, random() = (next_uint64 >> 11) * 2**-53); support = the token ids that survive "
        "temperature, top-k and top-p, ascending, with their probabilities; token = the "
        "first support entry whose cumulative weight exceeds u * total (PROTOCOL.md §12.6)",
        "logits_f32le_hex": _le_bytes(logits).hex(),
        "logits": [float(v) if np.isfinite(v) else str(float(v)) for v in logits],
        "cases": cases,
    }


def codec_vectors() -> list[dict[str, Any]]:
    out = []
    for name, array, codec_name in CODEC_CASES:
        encoded = codec_mod.encode(array, codec_mod.CodecSpec.parse(codec_name))
        decoded = codec_mod.decode(encoded)
        out.append(
            {
                "name": name,
                "input_dtype": array.dtype.name,
                "input_shape": list(array.shape),
                "input_hex": _le_bytes(array).hex(),
                "requested_codec": codec_name,
                "codec": encoded.codec,
                "data_hex": encoded.data.hex(),
                "scales_hex": encoded.scales.hex(),
                "decoded_hex": _le_bytes(decoded).hex(),
                # Compressor output may differ between zstd/lz4 versions and implementations;
                # quantisation and the raw layout are fully specified (PROTOCOL.md §8).
                "encoded_bytes_reproducible": encoded.codec in codec_mod.QUANTS,
            }
        )
    return out


def build_vectors() -> dict[str, Any]:
    manifest = golden_manifest()
    head = manifest.head.sha256 if manifest.head else "-"
    tail = manifest.tail.sha256 if manifest.tail else "-"
    version_input = "|".join([manifest.identity, manifest.codec, head, tail])
    if hashlib.sha256(version_input.encode()).hexdigest()[:16] != manifest.version:
        raise AssertionError("Manifest.version no longer follows the documented derivation")
    return {
        "format": "edgeoffload wire protocol golden vectors",
        "protocol_version": PROTOCOL_VERSION,
        "spec": "mobile_bridge/PROTOCOL.md",
        "generator": "mobile_bridge/vectors/generate.py (never edit this file by hand)",
        "prologue_prefix_hex": PROLOGUE_PREFIX.hex(),
        "max_str": MAX_STR,
        "max_hello_bytes": MAX_HELLO_BYTES,
        "max_retry_ms": MAX_RETRY_MS,
        "time_ns": TIME_NS,
        "tai64n_hex": tai64n(TIME_NS).hex(),
        "key_derivation": "private = sha256(" + repr(KEY_LABEL.decode()) + " + label)",
        "bundle": {
            "source_sha256": manifest.source_sha256,
            "cut_id": manifest.cut_id,
            "identity": manifest.identity,
            "codec": manifest.codec,
            "head_sha256": head,
            "tail_sha256": tail,
            "version_input": version_input,
            "version": manifest.version,
        },
        "suites": [suite_vectors(protocol, manifest) for protocol in RUNTIME_PROTOCOLS],
        "codecs": codec_vectors(),
        "sampling": sampling_vectors(),
    }


def render() -> str:
    """The exact text of protocol-v1.json."""
    return json.dumps(build_vectors(), indent=2, ensure_ascii=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: rerun {Path(__file__).name}", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
