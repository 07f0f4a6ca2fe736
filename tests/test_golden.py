"""Golden vectors of the wire protocol v1 (mobile_bridge/vectors/protocol-v1.json).

Two kinds of checks:

* Regeneration: running the generator in-process gives exactly the committed file, so any change
  to the bytes on the wire (handshake, envelopes, msgpack layout, transport framing, codecs)
  shows up here and has to be made on purpose (regenerate, review the diff, bump the protocol
  version when old peers would break).
* Independent re-check: the committed vectors are decoded the way a port to another language
  would do it, with the Noise primitives (HandshakeState, CipherState, Transport), msgpack,
  numpy and the compression libraries, never with edgeoffload.protocol.connection's connections.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
import struct
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import lz4.block
import msgpack
import numpy as np
import pytest
import zstandard

from edgeoffload.core import codec as codec_mod
from edgeoffload.core.noise import (
    MAX_MESSAGE,
    RUNTIME_PROTOCOLS,
    TAG,
    CipherState,
    HandshakeState,
)
from edgeoffload.keys import KeyPair

ROOT = Path(__file__).resolve().parents[1]
VECTOR_DIR = ROOT / "mobile_bridge" / "vectors"
VECTORS_PATH = VECTOR_DIR / "protocol-v1.json"
GENERATOR_PATH = VECTOR_DIR / "generate.py"
VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
SUITES: list[dict[str, Any]] = VECTORS["suites"]
CHUNK = MAX_MESSAGE - TAG


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("edgeoffload_golden_generate", GENERATOR_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def _first_difference(a: Any, b: Any, path: str = "$") -> str | None:
    """The JSON path of the first place two decoded documents differ (for a short message)."""
    if type(a) is not type(b):
        return f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        if list(a) != list(b):
            return f"{path}: keys {list(a)} != {list(b)}"
        for key in a:
            found = _first_difference(a[key], b[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} items != {len(b)}"
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _first_difference(x, y, f"{path}[{index}]")
            if found:
                return found
        return None
    return None if a == b else f"{path}: {a!r} != {b!r}"


def _plain(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return {"bin": obj.hex()}
    if isinstance(obj, dict):
        return {key: _plain(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_plain(value) for value in obj]
    return obj


def _strict_unpack(data: bytes) -> Any:
    """msgpack as a port must read it: str keys, no ext types, no duplicate keys."""

    def no_duplicates(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        keys = [key for key, _ in pairs]
        assert len(set(keys)) == len(keys), f"duplicate keys in {keys}"
        assert all(isinstance(key, str) for key in keys)
        return dict(pairs)

    return msgpack.unpackb(
        data, raw=False, strict_map_key=True, object_pairs_hook=no_duplicates, max_ext_len=0
    )


def _pair(private_hex: str, public_hex: str) -> KeyPair:
    pair = KeyPair.from_private(bytes.fromhex(private_hex))
    assert pair.public.hex() == public_hex, "the listed public key does not match the private key"
    return pair


def _keys(suite: dict[str, Any]) -> dict[str, KeyPair]:
    return {name: _pair(k["private"], k["public"]) for name, k in suite["keys"].items()}


def _prologue(protocol: str, identity: str) -> bytes:
    # PROTOCOL.md §5, written out rather than imported from edgeoffload.protocol.connection.
    return b"edgeoffload/1\x00" + protocol.encode("ascii") + b"\x00" + identity.encode("utf-8")


# PROTOCOL.md §5.3, written out: the label as the spec prints it, the two BLAKE2s calls.
MAC1_LABEL = b"edgeoffload mac1"


def _mac1(server_public: bytes, prologue: bytes, noise: bytes) -> bytes:
    key = hashlib.blake2s(MAC1_LABEL + server_public, digest_size=32).digest()
    return hashlib.blake2s(prologue + noise, digest_size=16, key=key).digest()


def _handshake(suite: dict[str, Any], hs: dict[str, Any]) -> tuple[HandshakeState, HandshakeState]:
    """Run one recorded handshake with bare Noise states and check every recorded byte."""
    keys = _keys(suite)
    protocol = suite["protocol_name"]
    identity = VECTORS["bundle"]["identity"]
    prologue = _prologue(protocol, identity)
    assert prologue.hex() == suite["prologue_hex"]

    m1, m2 = hs["message1"], hs["message2"]
    envelope1 = _strict_unpack(bytes.fromhex(m1["envelope_hex"]))
    assert list(envelope1) == ["v", "proto", "bundle", "noise", "mac1"]
    assert envelope1["v"] == 1
    assert envelope1["proto"] == protocol
    assert envelope1["bundle"] == identity
    noise1 = envelope1["noise"]
    assert noise1.hex() == m1["noise_hex"]
    # The cheap pre-check the server does before any DH: keyed by the pinned server key.
    assert envelope1["mac1"] == _mac1(keys["server_static"].public, prologue, noise1)
    assert len(bytes.fromhex(m1["envelope_hex"])) <= VECTORS["max_hello_bytes"]

    # The responder (server) side: it knows only its own keys and learns the device's.
    responder = HandshakeState(
        protocol,
        initiator=False,
        prologue=prologue,
        s=keys["server_static"],
        e=keys["server_ephemeral"],
    )
    hello = responder.read_message(noise1)
    assert hello.hex() == m1["payload_hex"]
    assert responder.remote_static == keys["client_static"].public

    # The initiator (device) side, with the pinned server key: it must produce message 1 exactly.
    initiator = HandshakeState(
        protocol,
        initiator=True,
        prologue=prologue,
        s=keys["client_static"],
        e=keys["client_ephemeral"],
        rs=keys["server_static"].public,
    )
    assert initiator.write_message(hello) == noise1

    envelope2 = _strict_unpack(bytes.fromhex(m2["envelope_hex"]))
    assert set(envelope2) == {"v", "noise"}
    assert envelope2["v"] == 1
    noise2 = envelope2["noise"]
    assert noise2.hex() == m2["noise_hex"]
    reply = initiator.read_message(noise2)
    assert reply.hex() == m2["payload_hex"]
    assert responder.write_message(reply) == noise2
    assert initiator.handshake_hash == responder.handshake_hash
    return initiator, responder


def _tai64n(time_ns: int) -> bytes:
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    return struct.pack(">QI", 2**62 + seconds, nanos)


# -- regeneration -------------------------------------------------------------------------------


def test_regenerated_vectors_match_the_committed_file() -> None:
    text = _load_generator().render()
    committed = VECTORS_PATH.read_text(encoding="utf-8")
    if text != committed:
        where = _first_difference(json.loads(committed), json.loads(text)) or "formatting"
        pytest.fail(
            f"the wire bytes changed ({where}); if intended, run "
            "`python mobile_bridge/vectors/generate.py`, review the diff and update "
            "mobile_bridge/PROTOCOL.md"
        )


def test_generator_check_mode(tmp_path: Path) -> None:
    generator = _load_generator()
    out = tmp_path / "v.json"
    assert generator.main(["--check", "--output", str(out)]) == 1
    assert generator.main(["--output", str(out)]) == 0
    assert generator.main(["--check", "--output", str(out)]) == 0


# -- independent re-check -----------------------------------------------------------------------


def test_vectors_cover_both_runtime_suites() -> None:
    assert [s["protocol_name"] for s in SUITES] == list(RUNTIME_PROTOCOLS)
    assert VECTORS["protocol_version"] == 1
    assert bytes.fromhex(VECTORS["prologue_prefix_hex"]) == b"edgeoffload/1\x00"


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s["protocol_name"])
def test_key_text_forms(suite: dict[str, Any]) -> None:
    for key in suite["keys"].values():
        private = hashlib.sha256(b"edgeoffload protocol-v1 golden vector: " + key["label"].encode())
        assert key["private"] == private.hexdigest()
        public = bytes.fromhex(key["public"])
        assert key["text"] == "x25519:" + base64.urlsafe_b64encode(public).decode().rstrip("=")
        digest = hashlib.sha256(b"edgeoffload-key-v1" + public).digest()[:10]
        text = base64.b32encode(digest).decode().lower()
        assert key["fingerprint"] == "-".join(text[i : i + 4] for i in range(0, 16, 4))


def test_bundle_identity_and_version() -> None:
    b = VECTORS["bundle"]
    assert b["identity"] == f"{b['source_sha256']}:{b['cut_id']}"
    version_input = "|".join([b["identity"], b["codec"], b["head_sha256"], b["tail_sha256"]])
    assert b["version_input"] == version_input
    assert b["version"] == hashlib.sha256(version_input.encode()).hexdigest()[:16]


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s["protocol_name"])
def test_handshake_payloads(suite: dict[str, Any]) -> None:
    hs = suite["handshake"]
    initiator, _ = _handshake(suite, hs)
    assert initiator.handshake_hash.hex() == hs["handshake_hash_hex"]

    hello = _strict_unpack(bytes.fromhex(hs["message1"]["payload_hex"]))
    assert list(hello) == ["ts", "version", "agent"]
    assert hello["ts"] == _tai64n(VECTORS["time_ns"])
    assert hello["ts"].hex() == VECTORS["tai64n_hex"]
    assert hello["version"] == VECTORS["bundle"]["version"]
    assert hello["agent"].startswith("edgeoffload/")
    assert _plain(hello) == hs["message1"]["payload"]

    welcome = _strict_unpack(bytes.fromhex(hs["message2"]["payload_hex"]))
    assert list(welcome) == ["ok", "version", "max_message", "agent"]
    assert welcome["ok"] is True
    assert welcome["version"] == VECTORS["bundle"]["version"]
    assert isinstance(welcome["max_message"], int) and welcome["max_message"] > 0
    assert _plain(welcome) == hs["message2"]["payload"]

    # IK message sizes: e (32) + encrypted s (32 + 16) + payload + tag (16); e (32) + payload + 16.
    assert (
        hs["message1"]["noise_len"]
        == 32 + 48 + len(bytes.fromhex(hs["message1"]["payload_hex"])) + 16
    )
    assert (
        hs["message2"]["noise_len"] == 32 + len(bytes.fromhex(hs["message2"]["payload_hex"])) + 16
    )


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s["protocol_name"])
def test_refused_handshake(suite: dict[str, Any]) -> None:
    refused = suite["refused_handshake"]
    _handshake(suite, refused)
    hello = _strict_unpack(bytes.fromhex(refused["message1"]["payload_hex"]))
    assert hello["version"] != VECTORS["bundle"]["version"]
    reply = _strict_unpack(bytes.fromhex(refused["message2"]["payload_hex"]))
    assert reply["ok"] is False
    assert reply["code"] == "version_mismatch"
    assert reply["version"] == VECTORS["bundle"]["version"]
    assert isinstance(reply["message"], str)


def _rebuild(obj: Any) -> Any:
    """The msgpack value a compact vector describes (see the generator's ``_described``)."""
    if isinstance(obj, dict) and len(obj) == 1 and "bin" in obj:
        return bytes.fromhex(obj["bin"])
    if isinstance(obj, dict) and len(obj) == 1 and "zero_bytes" in obj:
        return bytes(obj["zero_bytes"])
    if isinstance(obj, dict) and len(obj) == 1 and "arange_float32" in obj:
        return np.arange(obj["arange_float32"], dtype="<f4").tobytes()
    if isinstance(obj, dict):
        return {key: _rebuild(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_rebuild(value) for value in obj]
    return obj


def _seal(state: CipherState, plaintext: bytes) -> bytes:
    """PROTOCOL.md §6 rules 1-2 by hand: full chunks of 65519 bytes, then a short last one."""
    starts = range(0, len(plaintext) + 1, CHUNK)
    return b"".join(state.encrypt_with_ad(b"", plaintext[i : i + CHUNK]) for i in starts)


def _open(state: CipherState, ciphertext: bytes) -> bytes:
    """PROTOCOL.md §6 rule 3 by hand: cut every 65535 bytes; the last piece is 16..65534."""
    assert len(ciphertext) % MAX_MESSAGE >= TAG
    starts = range(0, len(ciphertext), MAX_MESSAGE)
    return b"".join(state.decrypt_with_ad(b"", ciphertext[i : i + MAX_MESSAGE]) for i in starts)


def _replay_transport(
    suite: dict[str, Any], entries: list[dict[str, Any]], handshake: dict[str, Any] | None = None
) -> list[Any]:
    """Check recorded transport messages with bare cipher states; the decoded messages.

    The messages follow ``handshake`` (default: the suite's ``handshake``); the two
    directions count their nonces from 0.
    """
    initiator, responder = _handshake(suite, handshake or suite["handshake"])
    # Bare cipher states from Split(), used as a port would: c1 device -> server, c2 back.
    send_c1, send_c2 = initiator.split()
    recv_c1, recv_c2 = responder.split()
    states = {"client->server": (send_c1, recv_c1), "server->client": (recv_c2, send_c2)}
    messages = []
    for entry in entries:
        direction = entry["direction"]
        sender, receiver = states[direction]
        assert entry["nonce"] == sender.n == receiver.n
        length = entry["plaintext_len"]
        # L // 65519 + 1 chunks, 16 bytes of tag each.
        assert entry["chunks"] == length // CHUNK + 1
        assert entry["ciphertext_len"] == length + TAG * entry["chunks"]
        if "plaintext_hex" in entry:
            plaintext = bytes.fromhex(entry["plaintext_hex"])
            ciphertext = bytes.fromhex(entry["ciphertext_hex"])
            assert _open(receiver, ciphertext) == plaintext
            assert _seal(sender, plaintext) == ciphertext
            message = _strict_unpack(plaintext)
            assert _plain(message) == entry["message"]
        else:  # long messages are listed by hash; the plaintext is rebuilt from its description
            plaintext = msgpack.packb(_rebuild(entry["message"]), use_bin_type=True)
            assert plaintext.hex().startswith(entry["plaintext_head_hex"])
            assert hashlib.sha256(plaintext).hexdigest() == entry["plaintext_sha256"]
            ciphertext = _seal(sender, plaintext)
            assert hashlib.sha256(ciphertext).hexdigest() == entry["ciphertext_sha256"]
            pieces = [
                len(ciphertext[i : i + MAX_MESSAGE]) for i in range(0, len(ciphertext), MAX_MESSAGE)
            ]
            assert pieces == entry["ciphertext_chunk_lens"]
            assert _open(receiver, ciphertext) == plaintext
            message = _strict_unpack(plaintext)
        assert len(plaintext) == length
        assert message["t"] == entry["type"]
        assert sender.n == receiver.n == entry["nonce"] + entry["chunks"]
        messages.append(message)
    return messages


def _transport_class_agrees(suite: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    initiator, responder = _handshake(suite, suite["handshake"])
    peers = {"client->server": (initiator.transport(), responder.transport())}
    peers["server->client"] = (peers["client->server"][1], peers["client->server"][0])
    for entry in entries:
        sender, receiver = peers[entry["direction"]]
        if "plaintext_hex" in entry:
            plaintext = bytes.fromhex(entry["plaintext_hex"])
        else:
            plaintext = msgpack.packb(_rebuild(entry["message"]), use_bin_type=True)
        ciphertext = bytes(sender.encrypt(plaintext))
        if "ciphertext_hex" in entry:
            assert ciphertext.hex() == entry["ciphertext_hex"]
        else:
            assert hashlib.sha256(ciphertext).hexdigest() == entry["ciphertext_sha256"]
        assert bytes(receiver.decrypt(ciphertext)) == plaintext


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s["protocol_name"])
def test_transport_messages(suite: dict[str, Any]) -> None:
    messages = _replay_transport(suite, suite["transport"])
    assert [e["type"] for e in suite["transport"]] == [
        "run", "run", "result", "error", "ping", "pong", "ping", "pong", "run", "result", "close"
    ]  # fmt: skip
    # The overloaded error carries retry_ms (PROTOCOL.md §7): an int in 0..60000, last.
    error = messages[3]
    assert list(error) == ["t", "code", "message", "id", "retry_ms"]
    assert error["code"] == "overloaded" and error["id"] == messages[1]["id"]
    retry_ms = error["retry_ms"]
    assert type(retry_ms) is int and 0 <= retry_ms <= VECTORS["max_retry_ms"] == 60_000


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s["protocol_name"])
def test_mac1_vectors(suite: dict[str, Any]) -> None:
    """PROTOCOL.md §5.3 mac1, recomputed with hashlib; the listed rejections differ in mac1 only."""
    vector = suite["mac1"]
    server_public = bytes.fromhex(suite["keys"]["server_static"]["public"])
    assert bytes.fromhex(vector["label_hex"]) == MAC1_LABEL
    key = hashlib.blake2s(MAC1_LABEL + server_public).digest()
    assert key.hex() == vector["key_hex"]
    envelope = _strict_unpack(bytes.fromhex(suite["handshake"]["message1"]["envelope_hex"]))
    prologue = _prologue(suite["protocol_name"], VECTORS["bundle"]["identity"])
    assert vector["input_hex"] == (prologue + envelope["noise"]).hex()
    tag = hashlib.blake2s(bytes.fromhex(vector["input_hex"]), digest_size=16, key=key).digest()
    assert tag.hex() == vector["mac1_hex"] == envelope["mac1"].hex()

    others = {k: v for k, v in envelope.items() if k != "mac1"}
    assert len(vector["rejected"]) == 3
    for case in vector["rejected"]:
        forged = _strict_unpack(bytes.fromhex(case["envelope_hex"]))
        assert {k: v for k, v in forged.items() if k != "mac1"} == others, case["note"]
        assert forged.get("mac1") != tag and case["close_code"] == 4401
    flipped, other_key, absent = (
        _strict_unpack(bytes.fromhex(c["envelope_hex"])) for c in vector["rejected"]
    )
    assert bytes(a ^ b for a, b in zip(flipped["mac1"], tag, strict=True)) == bytes(15) + b"\x01"
    other_public = bytes.fromhex(
        re.search(r"public key ([0-9a-f]{64})", vector["rejected"][1]["note"])[1]
    )
    assert other_key["mac1"] == _mac1(other_public, prologue, envelope["noise"])
    assert "mac1" not in absent


def test_spec_states_the_mac1_label_and_limits() -> None:
    section = _section("5")
    assert 'b"edgeoffload mac1"' in section and MAC1_LABEL.hex() in section
    assert "| `mac1` | bin (16 bytes) |" in section
    assert f"`MAX_HELLO_BYTES` = {VECTORS['max_hello_bytes']}" in PROTOCOL_MD


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s["protocol_name"])
@pytest.mark.parametrize("section", ["transport", "sessions"])
def test_transport_class_agrees(suite: dict[str, Any], section: str) -> None:
    """noise.Transport (with its large-message paths) gives the listed bytes too."""
    entries = suite["transport"] if section == "transport" else suite["sessions"]["messages"]
    _transport_class_agrees(suite, entries)


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s["protocol_name"])
def test_run_request_tensors_decode(suite: dict[str, Any]) -> None:
    first, second = [e for e in suite["transport"] if e["type"] == "run"][:2]
    tensors = [
        _strict_unpack(bytes.fromhex(e["plaintext_hex"]))["tensors"][0] for e in (first, second)
    ]
    assert [t["codec"] for t in tensors] == ["none", "fp16+zstd"]
    for t in tensors:
        assert set(t) == {"name", "dtype", "shape", "codec", "data"}
    raw = np.frombuffer(tensors[0]["data"], dtype="<f4").reshape(tensors[0]["shape"])
    half = zstandard.ZstdDecompressor().decompress(tensors[1]["data"])
    assert zstandard.frame_content_size(tensors[1]["data"]) == len(half) == raw.size * 2
    approx = np.frombuffer(half, dtype="<f2").astype(np.float32).reshape(tensors[1]["shape"])
    np.testing.assert_allclose(approx, raw, rtol=2**-11, atol=2**-25)


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s["protocol_name"])
def test_rekey_vector(suite: dict[str, Any]) -> None:
    rekey = suite["rekey"]
    assert rekey["rekey_messages"] == 2
    _, responder = _handshake(suite, suite["handshake"])
    # Bare cipher states, rekeyed by hand after the second message (PROTOCOL.md §6 rule 5).
    to_server, _ = responder.split()
    for entry in rekey["messages"]:
        assert to_server.n == entry["nonce"]
        plaintext = to_server.decrypt_with_ad(b"", bytes.fromhex(entry["ciphertext_hex"]))
        assert plaintext.hex() == entry["plaintext_hex"]
        if entry["nonce"] == 1:
            to_server.rekey()


def _independent_decode(entry: dict[str, Any]) -> np.ndarray:
    """PROTOCOL.md §8 written out with numpy and the compression libraries."""
    dtype, shape, codec = entry["input_dtype"], entry["input_shape"], entry["codec"]
    quant, _, compression = codec.partition("+")
    if quant in ("zstd", "lz4"):
        quant, compression = "none", quant
    count = int(np.prod(shape))
    wire_itemsize = {"none": np.dtype(dtype).itemsize, "fp16": 2, "int8": 1, "int8c": 1}[quant]
    data = bytes.fromhex(entry["data_hex"])
    if compression == "zstd":
        assert zstandard.frame_content_size(data) == count * wire_itemsize
        data = zstandard.ZstdDecompressor().decompress(data)
    elif compression == "lz4":
        data = lz4.block.decompress(data, uncompressed_size=count * wire_itemsize)
    assert len(data) == count * wire_itemsize
    if quant == "none":
        return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    if quant == "fp16":
        return np.frombuffer(data, dtype="<f2").astype(dtype).reshape(shape)
    q = np.frombuffer(data, dtype=np.int8).reshape(shape)
    scales = np.frombuffer(bytes.fromhex(entry["scales_hex"]), dtype="<f4").astype(dtype)
    if quant == "int8c" and len(shape) >= 2:
        scales = scales.reshape((1, shape[1], *([1] * (len(shape) - 2))))
    else:
        assert scales.size == 1
    return (q * scales).astype(dtype)


@pytest.mark.parametrize("entry", VECTORS["codecs"], ids=lambda e: e["name"])
def test_codec_vectors(entry: dict[str, Any]) -> None:
    decoded = _independent_decode(entry)
    assert decoded.astype(decoded.dtype.newbyteorder("<")).tobytes().hex() == entry["decoded_hex"]
    encoded = codec_mod.EncodedTensor(
        entry["input_dtype"],
        tuple(entry["input_shape"]),
        entry["codec"],
        bytes.fromhex(entry["data_hex"]),
        bytes.fromhex(entry["scales_hex"]),
    )
    assert codec_mod.decode(encoded).tobytes().hex() == entry["decoded_hex"]
    if entry["encoded_bytes_reproducible"]:
        source = np.frombuffer(
            bytes.fromhex(entry["input_hex"]),
            dtype=np.dtype(entry["input_dtype"]).newbyteorder("<"),
        ).reshape(entry["input_shape"])
        again = codec_mod.encode(source, codec_mod.CodecSpec.parse(entry["requested_codec"]))
        assert again.data.hex() == entry["data_hex"]
        assert again.scales.hex() == entry["scales_hex"]


# -- generation sessions (PROTOCOL.md §12) ---------------------------------------------------------

# Field order of each session message as the reference writes it (PROTOCOL.md §12.2).
SESSION_FIELDS = {
    "open": ["t", "id", "sampling", "max_tokens"],
    "opened": ["t", "id", "session", "max_tokens"],
    "prefill": ["t", "id", "session", "pos", "chunks"],
    "step": ["t", "id", "session", "pos", "tensors"],
    "token": ["t", "id", "session", "pos", "token", "server_ms"],
    "end": ["t", "id", "session"],
    "ended": ["t", "id", "session"],
    "error": ["t", "code", "message", "id"],
}


def _x(tensor: dict[str, Any]) -> np.ndarray:
    assert list(tensor) == ["name", "dtype", "shape", "codec", "data"]
    assert (tensor["name"], tensor["dtype"], tensor["codec"]) == ("x", "float32", "none")
    return np.frombuffer(tensor["data"], dtype="<f4").reshape(tensor["shape"])


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s["protocol_name"])
def test_session_messages(suite: dict[str, Any]) -> None:
    sessions = suite["sessions"]
    messages = _replay_transport(suite, sessions["messages"])
    assert [m["t"] for m in messages] == [
        "open", "opened", "prefill", "token", "step", "token", "end", "ended", "step", "error"
    ]  # fmt: skip
    directions = [e["direction"] for e in sessions["messages"]]
    assert directions == ["client->server", "server->client"] * 5
    for message in messages:
        assert list(message) == SESSION_FIELDS[message["t"]], message["t"]
    sid = sessions["session_id"]
    assert 0 <= sid < 2**63 and f"{sid:016x}" == sessions["session_id_hex"]
    # Every reply answers the request before it, by id, for the session it names.
    for request, reply in zip(messages[::2], messages[1::2], strict=True):
        assert reply["id"] == request["id"]
        assert request.get("session", sid) == sid and reply.get("session", sid) == sid
    open_, opened, prefill, token, step, stepped, _, _, late_step, error = messages

    sampling = open_["sampling"]
    assert list(sampling) == ["temperature", "top_k", "top_p", "seed"]
    assert isinstance(sampling["temperature"], float) and isinstance(sampling["top_p"], float)
    assert isinstance(sampling["top_k"], int) and isinstance(sampling["seed"], int)
    assert 1 <= opened["max_tokens"] <= open_["max_tokens"]

    # Positions: a feed starts at the session length; a token reports the length after it.
    assert prefill["pos"] == 0
    chunks = prefill["chunks"]
    assert len(chunks) == 2 and all(list(c) == ["n", "tensors"] for c in chunks)
    assert [c["n"] for c in chunks] == [2, 1]
    for chunk in chunks:
        (tensor,) = chunk["tensors"]
        assert _x(tensor).shape == (chunk["n"], 3)
    assert token["pos"] == prefill["pos"] + sum(c["n"] for c in chunks)
    assert step["pos"] == token["pos"]
    (tensor,) = step["tensors"]
    assert _x(tensor).shape == (1, 3)
    assert stepped["pos"] == step["pos"] + 1
    for reply in (token, stepped):
        assert isinstance(reply["token"], int) and reply["token"] >= 0
        assert isinstance(reply["server_ms"], float)

    # After end, the session is gone: the late step gets session_lost with its id.
    assert late_step["pos"] == stepped["pos"]
    assert error["code"] == "session_lost" and error["id"] == late_step["id"]
    assert isinstance(error["message"], str)


def _reference_sampling(
    logits: np.ndarray, params: dict[str, Any], position: int
) -> tuple[list[int], np.ndarray, int]:
    """PROTOCOL.md §12.6 written out plainly (sorting, loops), not with core.sampling."""
    values = logits.astype(np.float64)
    if params["temperature"] == 0:
        best = int(np.argmax(values))  # the first maximum
        return [best], np.ones(1), best
    scores = (values - values.max()) / params["temperature"]
    alive = [i for i in range(values.size) if scores[i] > -np.inf]
    k = params["top_k"]
    if 0 < k < len(alive):
        kth = sorted((scores[i] for i in alive), reverse=True)[k - 1]
        alive = [i for i in alive if scores[i] >= kth]  # ties with the k-th survive
    weights = {i: float(np.exp(scores[i])) for i in alive}
    if params["top_p"] < 1.0 and len(alive) > 1:
        total = np.sum([weights[i] for i in alive])
        order = sorted(alive, key=lambda i: (-scores[i], i))
        kept, mass = [], 0.0
        for i in order:
            if mass < params["top_p"]:
                kept.append(i)
            mass += weights[i] / total
        alive = sorted(kept)
    alive = [i for i in alive if weights[i] > 0.0]
    w = np.array([weights[i] for i in alive])
    cdf = np.cumsum(w)
    u = np.random.default_rng([params["seed"], position]).random()
    index = next((j for j, c in enumerate(cdf) if c > u * cdf[-1]), len(alive) - 1)
    return alive, w / w.sum(), alive[index]


SAMPLING = VECTORS["sampling"]


@pytest.mark.parametrize(
    "case", SAMPLING["cases"], ids=lambda c: f"{c['params']}@{c['position']}".replace(" ", "")
)
def test_sampling_vectors(case: dict[str, Any]) -> None:
    logits = np.frombuffer(bytes.fromhex(SAMPLING["logits_f32le_hex"]), dtype="<f4")
    assert logits.tolist() == [float(v) for v in SAMPLING["logits"]]  # "-inf" parses too
    params, position = case["params"], case["position"]
    assert list(params) == ["temperature", "top_k", "top_p", "seed"]
    if params["temperature"] > 0:
        u = np.random.default_rng([params["seed"], position]).random()
        assert u == case["u"]["value"]
        assert struct.pack(">d", u).hex() == case["u"]["bits_hex"]
    else:
        assert "u" not in case
    support, probs, token = _reference_sampling(logits, params, position)
    assert support == case["support"]
    np.testing.assert_allclose(probs, case["probs"], rtol=1e-12, atol=0)
    assert token == case["token"]


# -- the spec's tables match the code ---------------------------------------------------------


PROTOCOL_MD = (ROOT / "mobile_bridge" / "PROTOCOL.md").read_text(encoding="utf-8")


def _section(number: str) -> str:
    start = PROTOCOL_MD.index(f"\n## §{number} ")
    end = PROTOCOL_MD.index("\n## §", start + 1)
    return PROTOCOL_MD[start:end]


def test_transition_table_matches_the_code() -> None:
    from edgeoffload.protocol._state import TRANSITIONS

    rows = re.findall(
        r"^\| (client|server) \| ([a-z-]+) \| `((?:send|recv):[a-z]+)` \| ([a-z-]+) \|$",
        _section("3"),
        flags=re.M,
    )
    documented = [(role, state, event, after) for role, state, event, after in rows]
    in_code = [(r.value, s.value, e, t.value) for (r, s, e), t in TRANSITIONS.items()]
    assert documented == in_code


def test_error_code_table_matches_the_code() -> None:
    from edgeoffload.protocol.connection import ERROR_CODES

    codes = re.findall(r"^\| `([a-z_]+)` \|", _section("9").split("### §9.2")[0], flags=re.M)
    assert tuple(codes) == ERROR_CODES


LOAD_FIELDS = ["inflight", "queued", "workers", "kv_free", "draining"]


def _check_load(load: dict[str, Any]) -> None:
    """PROTOCOL.md §14.2: the fields in order, tail_ms last and optional."""
    assert list(load)[:5] == LOAD_FIELDS and set(load) <= {*LOAD_FIELDS, "tail_ms"}
    assert all(isinstance(load[k], int) and load[k] >= 0 for k in LOAD_FIELDS[:4])
    assert isinstance(load["draining"], bool)
    assert load["queued"] <= load["inflight"] and load["workers"] >= 1
    if "tail_ms" in load:
        assert isinstance(load["tail_ms"], float) and load["tail_ms"] >= 0


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s["protocol_name"])
def test_load_report_vectors(suite: dict[str, Any]) -> None:
    section = suite["load"]
    _handshake(suite, section)
    hello = _strict_unpack(bytes.fromhex(section["message1"]["payload_hex"]))
    assert list(hello) == ["ts", "version", "agent", "features"]
    assert hello["features"] == ["load", "x-unknown"]
    welcome = _strict_unpack(bytes.fromhex(section["message2"]["payload_hex"]))
    assert list(welcome) == ["ok", "version", "max_message", "agent", "features"]
    assert welcome["features"] == ["load"]  # the unknown feature is dropped, not an error

    messages = _replay_transport(suite, section["messages"], section)
    assert [m["t"] for m in messages] == ["run", "result", "status", "status"]
    run, result, status, answer = messages
    assert result["id"] == run["id"] and answer["id"] == status["id"]
    assert list(result) == ["t", "id", "tensors", "server_ms", "load"]
    _check_load(result["load"])
    assert list(status) == ["t", "id"]
    assert list(answer) == ["t", "id", "load", "bundles"]
    _check_load(answer["load"])
    (bundle,) = answer["bundles"]
    assert bundle == {
        "identity": VECTORS["bundle"]["identity"],
        "version": VECTORS["bundle"]["version"],
        "inflight": 0,
    }
