"""Tests for edgeoffload.core.noise: cacophony vectors, tampering, turn order, transport rules."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeoffload.core.noise import (
    DEFAULT_PROTOCOL,
    MAX_MESSAGE,
    RUNTIME_PROTOCOLS,
    SUPPORTED_PROTOCOLS,
    TAG,
    CipherState,
    HandshakeState,
    Transport,
)
from edgeoffload.errors import AuthenticationFailed, LocalProtocolError, UsageError
from edgeoffload.keys import KeyPair

VECTORS_PATH = Path(__file__).parent / "vectors" / "noise" / "cacophony-subset.json"
VECTORS: list[dict[str, Any]] = json.loads(VECTORS_PATH.read_text())["vectors"]
CHUNK = MAX_MESSAGE - TAG

# Fixed keys so that every run (and every failure) is reproducible.
INIT_S = KeyPair.from_private(bytes(range(1, 33)))
RESP_S = KeyPair.from_private(bytes(range(33, 65)))
INIT_E = KeyPair.from_private(bytes(range(65, 97)))
RESP_E = KeyPair.from_private(bytes(range(97, 129)))

# Low-order Curve25519 points (u-coordinates): 0, 1 and a point of order 8.
LOW_ORDER = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
]


def _pattern(protocol: str) -> str:
    return protocol.split("_")[1]


def make_pair(
    protocol: str = DEFAULT_PROTOCOL,
    *,
    init_prologue: bytes = b"edgeoffload test",
    resp_prologue: bytes | None = None,
    pinned: bytes | None = None,
) -> tuple[HandshakeState, HandshakeState]:
    """An initiator and a responder with the fixed keys each pattern needs."""
    pattern = _pattern(protocol)
    init = HandshakeState(
        protocol,
        initiator=True,
        prologue=init_prologue,
        s=INIT_S if pattern in ("IK", "XX") else None,
        e=INIT_E,
        rs=(pinned or RESP_S.public) if pattern in ("IK", "NK") else None,
    )
    resp = HandshakeState(
        protocol,
        initiator=False,
        prologue=init_prologue if resp_prologue is None else resp_prologue,
        s=RESP_S,
        e=RESP_E,
    )
    return init, resp


def run_handshake(init: HandshakeState, resp: HandshakeState) -> None:
    writer, reader = init, resp
    n = 0
    while not init.complete:
        assert reader.read_message(writer.write_message(b"payload %d" % n)) == b"payload %d" % n
        writer, reader = reader, writer
        n += 1
    assert resp.complete


def make_transports(protocol: str = DEFAULT_PROTOCOL, **limits: int) -> tuple[Transport, Transport]:
    init, resp = make_pair(protocol)
    run_handshake(init, resp)
    return init.transport(**limits), resp.transport(**limits)


# -- constants and keys --------------------------------------------------------------------------


def test_protocol_constants() -> None:
    assert len(SUPPORTED_PROTOCOLS) == 12
    assert len(set(SUPPORTED_PROTOCOLS)) == 12
    assert DEFAULT_PROTOCOL in RUNTIME_PROTOCOLS
    assert set(RUNTIME_PROTOCOLS) <= set(SUPPORTED_PROTOCOLS)
    assert {v["name"] for v in VECTORS} == set(SUPPORTED_PROTOCOLS)
    assert (MAX_MESSAGE, TAG) == (65535, 16)


def test_keypair() -> None:
    pair = KeyPair.generate()
    assert len(pair.private) == len(pair.public) == 32
    assert KeyPair.from_private(pair.private) == pair
    assert pair.private.hex() not in repr(pair)
    for bad in (b"", bytes(31), bytes(33), bytes(64)):
        with pytest.raises(UsageError):
            KeyPair.from_private(bad)
    with pytest.raises(UsageError):
        KeyPair.from_private("00" * 32)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        KeyPair(INIT_S.private, RESP_S.public)  # halves of two different pairs
    with pytest.raises(UsageError):
        KeyPair(INIT_S.private, INIT_S.public[:31])


# -- cacophony vectors ---------------------------------------------------------------------------


def _key(vector: dict[str, Any], name: str) -> KeyPair | None:
    return KeyPair.from_private(bytes.fromhex(vector[name])) if name in vector else None


def _public(vector: dict[str, Any], name: str) -> bytes | None:
    return bytes.fromhex(vector[name]) if name in vector else None


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_cacophony_vector(vector: dict[str, Any]) -> None:
    init = HandshakeState(
        vector["name"],
        initiator=True,
        prologue=bytes.fromhex(vector["init_prologue"]),
        s=_key(vector, "init_static"),
        e=_key(vector, "init_ephemeral"),
        rs=_public(vector, "init_remote_static"),
    )
    resp = HandshakeState(
        vector["name"],
        initiator=False,
        prologue=bytes.fromhex(vector["resp_prologue"]),
        s=_key(vector, "resp_static"),
        e=_key(vector, "resp_ephemeral"),
        rs=_public(vector, "resp_remote_static"),
    )
    ciphers: dict[bool, tuple[CipherState, CipherState]] = {}
    handshake_messages = 0
    for index, message in enumerate(vector["messages"]):
        payload = bytes.fromhex(message["payload"])
        expected = bytes.fromhex(message["ciphertext"])
        from_initiator = index % 2 == 0  # cacophony alternates senders, transport included
        if not init.complete:
            writer, reader = (init, resp) if from_initiator else (resp, init)
            assert writer.write_message(payload) == expected, f"message {index}"
            assert reader.read_message(expected) == payload, f"message {index}"
            handshake_messages += 1
            continue
        if not ciphers:
            assert resp.complete
            i_send, i_recv = init.split()
            r_recv, r_send = resp.split()
            ciphers = {True: (i_send, r_recv), False: (r_send, i_recv)}
        send, recv = ciphers[from_initiator]
        assert send.encrypt_with_ad(b"", payload) == expected, f"message {index}"
        assert recv.decrypt_with_ad(b"", expected) == payload, f"message {index}"
    assert handshake_messages == {"NK": 2, "IK": 2, "XX": 3}[vector["pattern"]]
    assert ciphers, "vector has transport messages"
    assert init.handshake_hash == resp.handshake_hash
    if "handshake_hash" in vector:
        assert init.handshake_hash == bytes.fromhex(vector["handshake_hash"])
    if vector["pattern"] in ("IK", "XX"):
        assert resp.remote_static == _key(vector, "init_static").public  # type: ignore[union-attr]
    assert init.remote_static == _key(vector, "resp_static").public  # type: ignore[union-attr]


# -- handshake behaviour -------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", SUPPORTED_PROTOCOLS)
def test_handshake_roundtrip_with_generated_ephemerals(protocol: str) -> None:
    pattern = _pattern(protocol)
    init = HandshakeState(
        protocol,
        initiator=True,
        s=INIT_S if pattern != "NK" else None,
        rs=RESP_S.public if pattern != "XX" else None,
    )
    resp = HandshakeState(protocol, initiator=False, s=RESP_S)
    assert resp.remote_static is None
    run_handshake(init, resp)
    assert init.handshake_hash == resp.handshake_hash
    assert init.remote_static == RESP_S.public
    assert resp.remote_static == (None if pattern == "NK" else INIT_S.public)
    a, b = init.transport(), resp.transport()
    assert b.decrypt(a.encrypt(b"ping")) == b"ping"
    assert a.decrypt(b.encrypt(b"pong")) == b"pong"


def test_ik_responder_learns_static_from_message_1() -> None:
    init, resp = make_pair()
    resp.read_message(init.write_message(b"hello"))
    assert resp.remote_static == INIT_S.public
    assert not resp.complete


@pytest.mark.parametrize("protocol", [*RUNTIME_PROTOCOLS, "Noise_NK_25519_ChaChaPoly_SHA256"])
def test_wrong_prologue_fails_at_responder(protocol: str) -> None:
    init, resp = make_pair(protocol, init_prologue=b"v1|bundle-a", resp_prologue=b"v1|bundle-b")
    message = init.write_message(b"hi")
    with pytest.raises(AuthenticationFailed):
        resp.read_message(message)
    with pytest.raises(LocalProtocolError):
        resp.write_message(b"")


def test_wrong_prologue_xx_fails_at_initiator() -> None:
    # XX message 1 is unauthenticated; the mismatch shows at the first keyed message.
    protocol = "Noise_XX_25519_ChaChaPoly_BLAKE2s"
    init, resp = make_pair(protocol, init_prologue=b"a", resp_prologue=b"b")
    resp.read_message(init.write_message())
    with pytest.raises(AuthenticationFailed):
        init.read_message(resp.write_message())


@pytest.mark.parametrize("protocol", RUNTIME_PROTOCOLS)
def test_wrong_pinned_static_fails_at_responder(protocol: str) -> None:
    init, resp = make_pair(protocol, pinned=KeyPair.from_private(bytes(32)).public)
    with pytest.raises(AuthenticationFailed):
        resp.read_message(init.write_message(b"hi"))


def _flip(message: bytes, index: int) -> bytes:
    tampered = bytearray(message)
    tampered[index] ^= 1 << (index % 8)
    return bytes(tampered)


@pytest.mark.parametrize("protocol", [*RUNTIME_PROTOCOLS, "Noise_NK_25519_AESGCM_BLAKE2s"])
def test_flipped_bit_in_message_1_or_2(protocol: str) -> None:
    probe_init, probe_resp = make_pair(protocol)
    message1 = probe_init.write_message(b"first payload")
    probe_resp.read_message(message1)
    message2 = probe_resp.write_message(b"second payload")
    for index in range(len(message1)):
        _, resp = make_pair(protocol)
        with pytest.raises(AuthenticationFailed):
            resp.read_message(_flip(message1, index))
        with pytest.raises(LocalProtocolError):
            resp.write_message()
    for index in range(len(message2)):
        init, resp = make_pair(protocol)
        resp.read_message(init.write_message(b"first payload"))
        assert resp.write_message(b"second payload") == message2  # deterministic keys
        with pytest.raises(AuthenticationFailed):
            init.read_message(_flip(message2, index))
        with pytest.raises(LocalProtocolError):
            init.split()


def test_flipped_bit_in_xx_message_1_fails_at_message_2() -> None:
    protocol = "Noise_XX_25519_ChaChaPoly_SHA256"
    probe, _ = make_pair(protocol)
    message1 = probe.write_message(b"x")
    for index in range(len(message1)):
        init, resp = make_pair(protocol)
        init.write_message(b"x")
        resp.read_message(_flip(message1, index))
        with pytest.raises(AuthenticationFailed):
            init.read_message(resp.write_message())


@pytest.mark.parametrize("protocol", RUNTIME_PROTOCOLS)
def test_truncated_or_extended_messages(protocol: str) -> None:
    probe_init, probe_resp = make_pair(protocol)
    message1 = probe_init.write_message(b"abc")
    probe_resp.read_message(message1)
    message2 = probe_resp.write_message(b"def")
    bad1 = [message1[:n] for n in range(len(message1))] + [message1 + b"\0"]
    bad1.append(message1 + bytes(MAX_MESSAGE))  # over the Noise limit
    for bad in bad1:
        _, resp = make_pair(protocol)
        with pytest.raises(AuthenticationFailed):
            resp.read_message(bad)
    for bad in [message2[:n] for n in range(len(message2))] + [message2 + b"\0"]:
        init, resp = make_pair(protocol)
        resp.read_message(init.write_message(b"abc"))
        resp.write_message(b"def")
        with pytest.raises(AuthenticationFailed):
            init.read_message(bad)


@pytest.mark.parametrize("protocol", RUNTIME_PROTOCOLS)
@pytest.mark.parametrize("point", LOW_ORDER, ids=["zero", "one", "order8"])
def test_low_order_ephemeral_rejected(protocol: str, point: bytes) -> None:
    init, resp = make_pair(protocol)
    message1 = init.write_message(b"x")
    with pytest.raises(AuthenticationFailed):
        resp.read_message(point + message1[32:])
    # Message 2: the responder's ephemeral replaced; the initiator's "ee" must refuse it.
    init, resp = make_pair(protocol)
    resp.read_message(init.write_message(b"x"))
    message2 = resp.write_message(b"y")
    with pytest.raises(AuthenticationFailed):
        init.read_message(point + message2[32:])


@pytest.mark.parametrize("point", LOW_ORDER, ids=["zero", "one", "order8"])
def test_low_order_keys_in_xx_and_pinning(point: bytes) -> None:
    # XX message 1 is only an ephemeral: the responder finds out at its first DH (write).
    init, resp = make_pair("Noise_XX_25519_ChaChaPoly_BLAKE2s")
    message1 = init.write_message()
    resp.read_message(point + message1[32:])
    with pytest.raises(AuthenticationFailed):
        resp.write_message()
    with pytest.raises(LocalProtocolError):
        resp.write_message()
    # An IK initiator that pins a low-order key fails before sending anything.
    init, _ = make_pair(pinned=point)
    with pytest.raises(AuthenticationFailed):
        init.write_message()


def test_out_of_turn_calls() -> None:
    init, resp = make_pair()
    with pytest.raises(LocalProtocolError):
        resp.write_message()
    with pytest.raises(LocalProtocolError):
        init.read_message(bytes(100))
    with pytest.raises(LocalProtocolError):
        init.split()
    with pytest.raises(LocalProtocolError):
        _ = init.handshake_hash
    message1 = init.write_message()  # out-of-turn calls left the state usable
    with pytest.raises(LocalProtocolError):
        init.write_message()
    resp.read_message(message1)
    with pytest.raises(LocalProtocolError):
        resp.read_message(message1)
    init.read_message(resp.write_message())
    for side in (init, resp):
        assert side.complete
        with pytest.raises(LocalProtocolError):
            side.write_message()
        with pytest.raises(LocalProtocolError):
            side.read_message(bytes(64))
    init.transport()
    with pytest.raises(LocalProtocolError):
        init.split()  # keys are handed out once
    resp.split()
    with pytest.raises(LocalProtocolError):
        resp.transport()


def test_handshake_usage_errors() -> None:
    with pytest.raises(UsageError):
        HandshakeState("Noise_KK_25519_ChaChaPoly_BLAKE2s", initiator=True, s=INIT_S)
    with pytest.raises(UsageError):
        HandshakeState("Noise_IK_448_ChaChaPoly_BLAKE2s", initiator=True, s=INIT_S)
    with pytest.raises(UsageError):  # IK initiator without the pinned key
        HandshakeState(DEFAULT_PROTOCOL, initiator=True, s=INIT_S)
    with pytest.raises(UsageError):  # IK initiator without its static key
        HandshakeState(DEFAULT_PROTOCOL, initiator=True, rs=RESP_S.public)
    with pytest.raises(UsageError):  # responder cannot "pin" in IK
        HandshakeState(DEFAULT_PROTOCOL, initiator=False, s=RESP_S, rs=INIT_S.public)
    with pytest.raises(UsageError):  # XX rs would look like pinning without being one
        HandshakeState("Noise_XX_25519_AESGCM_SHA256", initiator=True, s=INIT_S, rs=RESP_S.public)
    with pytest.raises(UsageError):  # NK initiator has no static key
        HandshakeState("Noise_NK_25519_AESGCM_SHA256", initiator=True, s=INIT_S, rs=RESP_S.public)
    with pytest.raises(UsageError):
        HandshakeState(DEFAULT_PROTOCOL, initiator=True, s=INIT_S, rs=bytes(31))
    with pytest.raises(UsageError):
        HandshakeState(
            DEFAULT_PROTOCOL, initiator=True, s=INIT_S, rs=RESP_S.public, re=RESP_E.public
        )
    # A payload that would exceed the Noise limit is refused before the state changes.
    init, resp = make_pair()
    with pytest.raises(UsageError):
        init.write_message(bytes(MAX_MESSAGE))
    resp.read_message(init.write_message(bytes(MAX_MESSAGE - 32 - 48 - 16)))


# -- cipher state --------------------------------------------------------------------------------


@pytest.mark.parametrize("cipher", ["ChaChaPoly", "AESGCM"])
def test_cipher_state_nonce_encoding_and_rekey(cipher: str) -> None:
    key = bytes(range(32))
    aead = ChaCha20Poly1305(key) if cipher == "ChaChaPoly" else AESGCM(key)
    order = "little" if cipher == "ChaChaPoly" else "big"
    state = CipherState(cipher, key)
    for n in range(3):
        nonce = bytes(4) + n.to_bytes(8, order)  # type: ignore[arg-type]
        assert state.encrypt_with_ad(b"ad", b"msg") == aead.encrypt(nonce, b"msg", b"ad")
    assert state.n == 3
    state.n = 2**64 - 2  # the last usable nonce
    state.encrypt_with_ad(b"", b"")
    assert state.n == 2**64 - 1
    with pytest.raises(LocalProtocolError):
        state.encrypt_with_ad(b"", b"")
    with pytest.raises(LocalProtocolError):
        state.decrypt_with_ad(b"", bytes(16))

    # REKEY(k) = ENCRYPT(k, 2**64-1, b"", zeros32)[:32], computed here with the raw AEAD.
    state = CipherState(cipher, key)
    state.n = 5
    state.rekey()
    assert state.n == 5  # rekeying keeps the nonce
    new_key = aead.encrypt(bytes(4) + b"\xff" * 8, bytes(32), b"")[:32]
    reference = CipherState(cipher, new_key)
    reference.n = 5
    assert state.encrypt_with_ad(b"", b"after rekey") == reference.encrypt_with_ad(
        b"", b"after rekey"
    )


@pytest.mark.parametrize("cipher", ["ChaChaPoly", "AESGCM"])
def test_cipher_state_failure_does_not_advance_nonce(cipher: str) -> None:
    sender, receiver = CipherState(cipher, bytes(32)), CipherState(cipher, bytes(32))
    ciphertext = sender.encrypt_with_ad(b"ad", b"data")
    with pytest.raises(AuthenticationFailed):
        receiver.decrypt_with_ad(b"other ad", ciphertext)
    assert receiver.n == 0
    assert receiver.decrypt_with_ad(b"ad", ciphertext) == b"data"
    assert receiver.n == 1


def test_cipher_state_without_key_and_usage_errors() -> None:
    state = CipherState("ChaChaPoly")
    assert not state.has_key()
    assert state.encrypt_with_ad(b"ad", b"clear") == b"clear"
    assert state.n == 0
    with pytest.raises(LocalProtocolError):
        state.rekey()
    with pytest.raises(UsageError):
        CipherState("AES256-CBC", bytes(32))
    with pytest.raises(UsageError):
        CipherState("AESGCM", bytes(16))


# -- transport -----------------------------------------------------------------------------------


def _assert_dead(transport: Transport) -> None:
    assert transport.dead
    with pytest.raises(LocalProtocolError):
        transport.encrypt(b"more")
    with pytest.raises(LocalProtocolError):
        transport.decrypt(bytes(32))


@pytest.mark.parametrize("protocol", RUNTIME_PROTOCOLS)
def test_transport_roundtrip_and_counters(protocol: str) -> None:
    a, b = make_transports(protocol)
    for size in (0, 1, 100, CHUNK + 5):
        data = random.Random(size).randbytes(size)
        assert b.decrypt(a.encrypt(data)) == data
        assert a.decrypt(b.encrypt(data)) == data
    total = 0 + 1 + 100 + CHUNK + 5
    for side in (a, b):
        assert side.messages_sent == side.messages_received == 4
        assert side.bytes_sent == side.bytes_received == total
    view = memoryview(bytearray(b"zero-copy input"))
    assert b.decrypt(a.encrypt(view)) == b"zero-copy input"


def _two_chunk_messages() -> tuple[Transport, Transport, list[bytes]]:
    a, b = make_transports()
    messages = [a.encrypt(bytes([i]) * (CHUNK + 10)) for i in range(3)]
    return a, b, messages


def test_transport_replay_fails_and_kills() -> None:
    a, b = make_transports()
    first = a.encrypt(b"one")
    assert b.decrypt(first) == b"one"
    with pytest.raises(AuthenticationFailed):
        b.decrypt(first)
    _assert_dead(b)


def test_transport_reorder_fails_and_kills() -> None:
    a, b = make_transports()
    a.encrypt(b"one")
    second = a.encrypt(b"two")
    with pytest.raises(AuthenticationFailed):
        b.decrypt(second)
    _assert_dead(b)


@pytest.mark.parametrize("position", [0, 5, TAG, MAX_MESSAGE - 1, MAX_MESSAGE, -1])
def test_transport_flipped_bit_fails_and_kills(position: int) -> None:
    _, b, messages = _two_chunk_messages()
    with pytest.raises(AuthenticationFailed):
        b.decrypt(_flip(messages[0], position % len(messages[0])))
    _assert_dead(b)


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda m: m[:-1], id="last-byte-cut"),
        pytest.param(lambda m: m[: MAX_MESSAGE + TAG - 1], id="last-chunk-too-short"),
        pytest.param(lambda m: m[:MAX_MESSAGE], id="trailing-chunk-dropped"),
        pytest.param(lambda m: m[MAX_MESSAGE:], id="first-chunk-dropped"),
        pytest.param(lambda m: m[MAX_MESSAGE:] + m[:MAX_MESSAGE], id="chunks-swapped"),
        pytest.param(lambda m: m + b"\0", id="byte-appended"),
        pytest.param(lambda m: b"", id="empty"),
        pytest.param(lambda m: m[: TAG - 1], id="shorter-than-tag"),
    ],
)
def test_transport_truncated_or_rearranged_chunks(mangle: Any) -> None:
    _, b, messages = _two_chunk_messages()
    with pytest.raises(AuthenticationFailed):
        b.decrypt(mangle(messages[0]))
    _assert_dead(b)


def test_transport_glued_or_split_messages_fail() -> None:
    a, b = make_transports()
    one, two = a.encrypt(b"first"), a.encrypt(b"second")
    with pytest.raises(AuthenticationFailed):
        b.decrypt(one + two)
    a, b = make_transports()
    whole = a.encrypt(bytes(CHUNK))  # one full chunk, then the empty terminator chunk
    assert len(whole) == MAX_MESSAGE + TAG
    with pytest.raises(AuthenticationFailed):
        b.decrypt(whole[:MAX_MESSAGE])


def test_transport_failure_kills_sending_too() -> None:
    a, b = make_transports()
    with pytest.raises(AuthenticationFailed):
        a.decrypt(b.encrypt(b"x")[:-1])
    _assert_dead(a)
    assert not b.dead  # only the side that saw the failure knows; the session must close


def test_transport_rejects_bad_arguments() -> None:
    with pytest.raises(UsageError):
        Transport(CipherState("AESGCM"), CipherState("AESGCM"), rekey_messages=1, rekey_bytes=1)
    keyed = CipherState("AESGCM", bytes(32))
    for limits in (
        {"rekey_messages": 0, "rekey_bytes": 1},
        {"rekey_messages": 1, "rekey_bytes": -1},
    ):
        with pytest.raises(UsageError):
            Transport(keyed, keyed, **limits)


LENGTHS = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 2 * CHUNK, 2 * CHUNK + 1]


@settings(max_examples=60, deadline=None)
@given(
    size=st.one_of(st.sampled_from(LENGTHS), st.integers(min_value=0, max_value=300_000)),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    protocol=st.sampled_from(RUNTIME_PROTOCOLS),
)
def test_transport_chunking_roundtrip(size: int, seed: int, protocol: str) -> None:
    a, b = make_transports(protocol)
    data = random.Random(seed).randbytes(size)
    ciphertext = a.encrypt(data)
    chunks = size // CHUNK + 1  # the last chunk is always shorter than CHUNK
    assert len(ciphertext) == size + TAG * chunks
    assert len(ciphertext) % MAX_MESSAGE >= TAG  # never ends on a full chunk
    assert b.decrypt(ciphertext) == data
    assert b.decrypt(a.encrypt(b"next")) == b"next"  # both sides used the same nonces
    assert a._send.n == b._recv.n == chunks + 1


@pytest.mark.parametrize("protocol", RUNTIME_PROTOCOLS)
def test_transport_rekey_stays_in_sync(protocol: str) -> None:
    limits = {"rekey_messages": 3, "rekey_bytes": 100_000}
    a, b = make_transports(protocol, **limits)
    rng = random.Random(7)
    for i in range(200):
        size = rng.choice([0, 10, 1000, 40_000, 99_999, 100_000, 150_000]) if i % 10 else 0
        data = rng.randbytes(size)
        sender, receiver = (a, b) if rng.random() < 0.6 else (b, a)
        assert receiver.decrypt(sender.encrypt(data)) == data
    assert a.messages_sent + b.messages_sent == 200


@pytest.mark.parametrize("protocol", RUNTIME_PROTOCOLS)
def test_transport_rekey_changes_the_key(protocol: str) -> None:
    # Same handshake twice (fixed keys) -> identical transport keys; only the limits differ.
    rekeying, _ = make_transports(protocol, rekey_messages=3, rekey_bytes=100_000)
    plain, _ = make_transports(protocol)
    for i in range(3):
        assert rekeying.encrypt(b"m%d" % i) == plain.encrypt(b"m%d" % i)
    assert rekeying.encrypt(b"m3") != plain.encrypt(b"m3")  # rekeyed after message 3
    # The byte limit triggers a rekey on its own, right after the message that reaches it.
    rekeying, peer = make_transports(protocol, rekey_messages=1000, rekey_bytes=100_000)
    plain, _ = make_transports(protocol)
    big = bytes(100_000)
    first = rekeying.encrypt(big)
    assert first == plain.encrypt(big)
    after = rekeying.encrypt(b"x")
    assert after != plain.encrypt(b"x")
    assert peer.decrypt(first) == big
    assert peer.decrypt(after) == b"x"
    # A peer with different limits falls out of sync at exactly that message.
    strict, lax = make_transports(protocol, rekey_messages=2, rekey_bytes=1 << 30)
    lax.rekey_messages = 1000
    for _ in range(2):
        assert lax.decrypt(strict.encrypt(b"ok")) == b"ok"
    with pytest.raises(AuthenticationFailed):
        lax.decrypt(strict.encrypt(b"desync"))


# -- large messages: chunks written into one buffer -------------------------------------


def _pair(protocol: str = "Noise_IK_25519_ChaChaPoly_BLAKE2s"):
    server = KeyPair.generate()
    init = HandshakeState(protocol, initiator=True, s=KeyPair.generate(), rs=server.public)
    resp = HandshakeState(protocol, initiator=False, s=server)
    resp.read_message(init.write_message())
    init.read_message(resp.write_message())
    return init, resp


@pytest.mark.parametrize(
    "protocol", ["Noise_IK_25519_ChaChaPoly_BLAKE2s", "Noise_IK_25519_AESGCM_SHA256"]
)
@pytest.mark.parametrize("size", [8 * CHUNK - 1, 8 * CHUNK, 3 * 2**20 + 7])
def test_large_message_round_trip(protocol, size):
    """Multi-chunk messages decrypt back and keep nonces aligned."""
    init, resp = _pair(protocol)
    plaintext = random.Random(size).randbytes(size)
    sender, receiver = init.transport(), resp.transport()
    ciphertext = bytes(sender.encrypt(plaintext))
    assert len(ciphertext) == size + TAG * (size // CHUNK + 1)
    assert bytes(receiver.decrypt(ciphertext)) == plaintext
    # The next (small) message still lines up: nonces advanced by exactly the chunk count.
    assert bytes(receiver.decrypt(sender.encrypt(b"after"))) == b"after"


def test_large_message_equals_the_chunk_by_chunk_definition():
    """Writing chunks into one buffer gives exactly the spec's sequence of chunk messages."""
    init, _ = _pair()
    send_state, recv_state = init.split()
    reference = CipherState(send_state.cipher, send_state._key)  # same key, nonce 0
    plaintext = bytes(range(256)) * (3 * 2**20 // 256)
    expected = b"".join(
        reference.encrypt_with_ad(b"", plaintext[i : i + CHUNK])
        for i in range(0, len(plaintext) + 1, CHUNK)
    )
    transport = Transport(send_state, recv_state, rekey_messages=1 << 16, rekey_bytes=1 << 30)
    assert bytes(transport.encrypt(plaintext)) == expected


def test_large_message_tampering_detected():
    init, resp = _pair()
    sender, receiver = init.transport(), resp.transport()
    ciphertext = bytearray(sender.encrypt(bytes(2 * 2**20)))
    ciphertext[len(ciphertext) // 2] ^= 0x40
    with pytest.raises(AuthenticationFailed):
        receiver.decrypt(bytes(ciphertext))
    with pytest.raises(LocalProtocolError):
        receiver.decrypt(b"x" * 32)
