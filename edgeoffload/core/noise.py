"""The Noise Protocol Framework (revision 34) for the secure offload channel.

Why Noise: the device and the edge server need mutual authentication with pinned static keys,
forward secrecy and a tiny, auditable state machine that a TypeScript or mobile client can
reimplement from a published spec and check against public test vectors (cacophony). The
runtime handshake is IK (as WireGuard uses): the device already knows the server's static key,
so one round trip authenticates both sides and the first message already carries an encrypted
payload. XX and NK are implemented too so that the cacophony vectors exercise every token.

This module is pure: no I/O, no clocks, deterministic. The only randomness is the generation of
key pairs when the caller does not pass them in, so tests and golden vectors pass fixed
ephemeral keys. Primitives come from ``cryptography`` (X25519, ChaCha20-Poly1305, AES-256-GCM)
and the standard library (SHA-256, BLAKE2s, HMAC).

Supported protocol names: ``Noise_{IK,XX,NK}_25519_{ChaChaPoly,AESGCM}_{SHA256,BLAKE2s}``
(:data:`SUPPORTED_PROTOCOLS`); the wire protocol accepts only :data:`RUNTIME_PROTOCOLS`.

Deliberate choices beyond the spec
----------------------------------

* An all-zero X25519 result (the peer sent a low-order point) is rejected with
  :class:`~edgeoffload.errors.AuthenticationFailed` (the spec allows but does not require it).
* Any failure while reading a handshake message (bad tag, too short, too long, bad DH) kills the
  :class:`HandshakeState`; every later call raises
  :class:`~edgeoffload.errors.LocalProtocolError`. Calling a method out of turn raises
  ``LocalProtocolError`` and leaves the state untouched.
* :meth:`HandshakeState.split` (and :meth:`HandshakeState.transport`, which calls it) hands the
  transport keys out once: a second call raises ``LocalProtocolError``, because two cipher
  states with the same key and nonce would reuse nonces.
* A handshake that would need more keys than the pattern uses (``s`` for an NK initiator,
  ``rs`` for a responder or for XX, any ``re``) is a :class:`~edgeoffload.errors.UsageError`:
  passing ``rs`` to XX would look like pinning without being one.
* A nonce of ``2**64 - 1`` is reserved (spec section 5.1); a cipher state that reaches it raises
  ``LocalProtocolError``. Rekeying does not reset the nonce (spec section 11.3).

Transport rules (:class:`Transport`)
------------------------------------

These rules are part of the wire protocol; a peer in another language must follow them exactly.

1. **Chunking.** An application message (a plaintext of any length, including empty) is cut into
   chunks. Every chunk except the last holds exactly ``MAX_MESSAGE - TAG = 65519`` plaintext
   bytes; the last chunk holds the remaining ``len % 65519`` bytes, which may be zero. So a
   message always ends with a chunk shorter than 65519 bytes: a message of ``L`` bytes is
   ``L // 65519 + 1`` chunks (an empty message is one empty chunk; a message of exactly 65519
   bytes is one full chunk followed by one empty chunk).
2. **Encryption.** Each chunk, in order, is one Noise transport message:
   ``EncryptWithAd(ad=b"", chunk)`` with the direction's next implicit nonce (nonces are never
   sent). The application ciphertext is the concatenation of the chunk ciphertexts; its length
   is ``L + 16 * (L // 65519 + 1)``.
3. **Decryption.** The receiver cuts the ciphertext every ``MAX_MESSAGE = 65535`` bytes. The last
   piece must be at least 16 and at most 65534 bytes long (a final piece of exactly 65535 bytes
   means trailing chunks were dropped); each piece is decrypted in order with the next nonce and
   the plaintexts are concatenated.
4. **Failure is final.** Replay, reordering, truncation, a flipped bit, a dropped chunk, two
   messages glued together or one message split in two all make decryption fail with
   :class:`~edgeoffload.errors.AuthenticationFailed`, whose message never says which check
   failed. The :class:`Transport` is then dead in both directions: every later
   :meth:`Transport.encrypt` or :meth:`Transport.decrypt` raises
   :class:`~edgeoffload.errors.LocalProtocolError`, so an attacker gets one guess, not an
   oracle. The session must be closed and a new handshake made.
5. **Rekey.** Each direction counts application messages and plaintext bytes since its last
   rekey. After each application message (after all its chunks), if the message count has
   reached ``rekey_messages`` or the byte count has reached ``rekey_bytes``, that direction's
   cipher state is rekeyed with the spec's ``REKEY(k) = ENCRYPT(k, 2**64-1, b"", 32 zero
   bytes)[:32]`` (nonce unchanged) and both counts restart from zero. Sender and receiver apply
   the same rule at the same message, so no signalling is needed; both peers must use the same
   limits (defaults ``2**16`` messages and ``2**30`` bytes).

Why the last chunk is always short: with full-size final chunks, an attacker who drops the
trailing chunks of a multi-chunk message leaves a prefix of valid chunks that would decrypt to a
truncated plaintext, detected only at the next message. A short final chunk marks the end of
every message without adding a byte to the common case (and without touching the associated
data, so every chunk stays a standard Noise transport message).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Sequence
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from edgeoffload.errors import AuthenticationFailed, LocalProtocolError, UsageError
from edgeoffload.keys import KeyPair, check_key_bytes

__all__ = [
    "CHUNK",
    "DEFAULT_PROTOCOL",
    "DHLEN",
    "MAX_MESSAGE",
    "RUNTIME_PROTOCOLS",
    "SUPPORTED_PROTOCOLS",
    "TAG",
    "CipherState",
    "HandshakeState",
    "Transport",
]

DEFAULT_PROTOCOL: Final = "Noise_IK_25519_ChaChaPoly_BLAKE2s"
"""The handshake the device and the edge server run unless configured otherwise."""

RUNTIME_PROTOCOLS: Final = ("Noise_IK_25519_ChaChaPoly_BLAKE2s", "Noise_IK_25519_AESGCM_SHA256")
"""What the wire protocol accepts: ChaChaPoly for devices without AES instructions, AESGCM for
those with them."""

MAX_MESSAGE: Final = 65535
"""Largest Noise message in bytes (spec section 3)."""

TAG: Final = 16
"""AEAD authentication tag length."""

DHLEN: Final = 32
"""Length of an X25519 public key or shared secret."""

CHUNK: Final = MAX_MESSAGE - TAG
"""Largest plaintext of one transport message (65519)."""

_Pattern = tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, ...], ...]]
_PATTERNS: Final[dict[str, _Pattern]] = {
    # name: (initiator pre-message, responder pre-message, messages; even index = initiator)
    "NK": ((), ("s",), (("e", "es"), ("e", "ee"))),
    "IK": ((), ("s",), (("e", "es", "s", "ss"), ("e", "ee", "se"))),
    "XX": ((), (), (("e",), ("e", "ee", "s", "es"), ("s", "se"))),
}
_CIPHERS: Final = ("ChaChaPoly", "AESGCM")
# Any: typeshed gives sha256 and blake2s unrelated types; both are hashlib constructors that hmac
# accepts as digestmod.
_HASHES: Final[dict[str, Callable[..., Any]]] = {
    "SHA256": hashlib.sha256,
    "BLAKE2s": hashlib.blake2s,
}

SUPPORTED_PROTOCOLS: Final[tuple[str, ...]] = tuple(
    f"Noise_{pattern}_25519_{cipher}_{hash_name}"
    for pattern in _PATTERNS
    for cipher in _CIPHERS
    for hash_name in _HASHES
)
"""Every protocol name this module implements (12: three patterns, two ciphers, two hashes)."""

_MAX_NONCE: Final = 2**64 - 1
# Noise nonces: 32 zero bits then the 64-bit counter, little-endian for ChaChaPoly (RFC 8439
# style) and big-endian for AESGCM (spec section 12.3/12.4). One precompiled Struct each.
_NONCE_LE: Final = struct.Struct("<4xQ")
_NONCE_BE: Final = struct.Struct(">4xQ")
_ZEROS32: Final = bytes(32)

Buffer = bytes | bytearray | memoryview
"""Anything the AEAD accepts without a copy; the hot path passes memoryview slices."""


def _dh(private: bytes, public: bytes) -> bytes:
    """X25519; a low-order peer key (all-zero result) is an authentication failure.

    ``cryptography`` itself refuses an all-zero shared secret with ValueError; the explicit check
    keeps the guarantee if that ever changes.
    """
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(public)
        )
    except ValueError:
        raise AuthenticationFailed() from None
    if not any(shared):
        raise AuthenticationFailed()
    return shared


class CipherState:
    """Spec section 5.1: a key ``k`` (maybe empty) and a nonce counter ``n``.

    The AEAD object is built once per key (on construction and on :meth:`rekey`), not per call:
    on the transport hot path the key schedule would otherwise run for every 64 KiB chunk.
    ``n`` is public so that a caller can read (or, like the spec's ``SetNonce``, set) it.
    """

    __slots__ = ("_aead", "_cipher", "_key", "_pack", "n")

    def __init__(self, cipher: str, key: bytes | None = None) -> None:
        if cipher not in _CIPHERS:
            raise UsageError(
                f"unknown Noise cipher {cipher!r}", hint=f"use one of {', '.join(_CIPHERS)}"
            )
        self._cipher = cipher
        self._pack = (_NONCE_LE if cipher == "ChaChaPoly" else _NONCE_BE).pack
        self.n = 0
        self._key: bytes | None = None
        self._aead: ChaCha20Poly1305 | AESGCM | None = None
        if key is not None:
            self._set_key(check_key_bytes(key, "cipher key"))

    def _set_key(self, key: bytes) -> None:
        self._key = key
        self._aead = ChaCha20Poly1305(key) if self._cipher == "ChaChaPoly" else AESGCM(key)

    @property
    def cipher(self) -> str:
        """``"ChaChaPoly"`` or ``"AESGCM"``."""
        return self._cipher

    def has_key(self) -> bool:
        """Whether a key is set (before the first DH a handshake sends payloads in clear)."""
        return self._aead is not None

    def _nonce(self) -> bytes:
        if self.n >= _MAX_NONCE:
            raise LocalProtocolError(
                "nonce space exhausted (2**64 - 1 is reserved)",
                hint="close the session and run a new handshake",
            )
        return self._pack(self.n)

    def encrypt_with_ad(self, ad: Buffer, plaintext: Buffer) -> bytes:
        """AEAD-encrypt with the next nonce; without a key, return the plaintext (spec)."""
        if self._aead is None:
            return bytes(plaintext)
        ciphertext = self._aead.encrypt(self._nonce(), plaintext, ad)
        self.n += 1
        return ciphertext

    def decrypt_with_ad(self, ad: Buffer, ciphertext: Buffer) -> bytes:
        """AEAD-decrypt with the next nonce; :class:`AuthenticationFailed` leaves ``n`` as is."""
        if self._aead is None:
            return bytes(ciphertext)
        nonce = self._nonce()
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, ad)
        except InvalidTag:
            raise AuthenticationFailed() from None
        self.n += 1
        return plaintext

    def reserve(self, count: int) -> tuple[ChaCha20Poly1305 | AESGCM, list[bytes]]:
        """The AEAD object and the next ``count`` nonces, for one multi-chunk message.

        Used by :class:`Transport` to process the chunks of one large message into a single
        buffer. The counter advances only when :meth:`commit` is called (after success).
        """
        if self._aead is None:
            raise LocalProtocolError("cannot reserve nonces on a cipher state with no key")
        if self.n + count > _MAX_NONCE:
            raise LocalProtocolError(
                "nonce space exhausted (2**64 - 1 is reserved)",
                hint="close the session and run a new handshake",
            )
        return self._aead, [self._pack(self.n + i) for i in range(count)]

    def commit(self, count: int) -> None:
        """Advance the counter past a batch taken with :meth:`reserve`."""
        self.n += count

    def rekey(self) -> None:
        """Spec section 4.2 ``REKEY(k)``: the first 32 bytes of encrypting 32 zero bytes under
        the reserved nonce ``2**64 - 1``. ``n`` is not reset."""
        if self._aead is None:
            raise LocalProtocolError("cannot rekey a cipher state that has no key")
        self._set_key(self._aead.encrypt(self._pack(_MAX_NONCE), _ZEROS32, b"")[:32])


class _SymmetricState:
    """Spec section 5.2: chaining key ``ck``, handshake hash ``h`` and a CipherState."""

    __slots__ = ("_hash", "cipher", "ck", "cs", "h")

    def __init__(self, protocol_name: str, cipher: str, hash_name: str) -> None:
        self._hash = _HASHES[hash_name]
        self.cipher = cipher
        name = protocol_name.encode("ascii")
        # HASHLEN is 32 for both supported hashes.
        self.h: bytes = name.ljust(32, b"\0") if len(name) <= 32 else self._hash(name).digest()
        self.ck: bytes = self.h
        self.cs = CipherState(cipher)

    def _hmac(self, key: bytes, data: bytes) -> bytes:
        return hmac.digest(key, data, self._hash)

    def hkdf2(self, ikm: bytes) -> tuple[bytes, bytes]:
        """HKDF with two outputs (spec section 4.3); three are only needed for PSK modes."""
        temp = self._hmac(self.ck, ikm)
        out1 = self._hmac(temp, b"\x01")
        out2 = self._hmac(temp, out1 + b"\x02")
        return out1, out2

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = self.hkdf2(ikm)
        self.cs = CipherState(self.cipher, temp_k)

    def mix_hash(self, data: Buffer) -> None:
        hasher = self._hash(self.h)
        hasher.update(data)
        self.h = bytes(hasher.digest())

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cs.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cs.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = self.hkdf2(b"")
        return CipherState(self.cipher, k1), CipherState(self.cipher, k2)


def _parse_protocol(protocol_name: str) -> tuple[str, str, str]:
    if protocol_name not in SUPPORTED_PROTOCOLS:
        raise UsageError(
            f"unsupported Noise protocol {protocol_name!r}",
            hint="use one of: " + ", ".join(SUPPORTED_PROTOCOLS),
        )
    _, pattern, _, cipher, hash_name = protocol_name.split("_")
    return pattern, cipher, hash_name


class HandshakeState:
    """Spec section 5.3: runs one handshake pattern to completion, then hands out the keys.

    Key arguments follow the spec's names: ``s``/``e`` are the local static and ephemeral key
    pairs, ``rs``/``re`` the peer's public keys known before the handshake (``rs`` is the pinned
    server key of an IK or NK initiator). An ephemeral that is not passed in is generated when
    the pattern first needs it.
    """

    def __init__(
        self,
        protocol_name: str,
        *,
        initiator: bool,
        prologue: bytes = b"",
        s: KeyPair | None = None,
        e: KeyPair | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
    ) -> None:
        pattern, cipher, hash_name = _parse_protocol(protocol_name)
        pre_i, pre_r, messages = _PATTERNS[pattern]
        self.protocol_name = protocol_name
        self.initiator = initiator
        self._messages = messages
        self._index = 0
        self._dead = False
        self._split_done = False

        mine, theirs = (pre_i, pre_r) if initiator else (pre_r, pre_i)
        my_tokens = {t for i, m in enumerate(messages) if (i % 2 == 0) == initiator for t in m}
        needs_s = "s" in mine or "s" in my_tokens
        if needs_s and s is None:
            raise UsageError(f"{protocol_name} needs a local static key pair (s) on this side")
        if not needs_s and s is not None:
            raise UsageError(f"{protocol_name} does not use a local static key (s) on this side")
        if ("s" in theirs) != (rs is not None):
            raise UsageError(
                f"{protocol_name} {'needs' if 's' in theirs else 'does not take'} the peer's "
                "static public key (rs) on this side",
                hint="the IK/NK initiator pins the responder's key; everyone else learns it "
                "from the handshake (check remote_static afterwards)",
            )
        if re is not None:
            raise UsageError(f"{protocol_name} does not take a pre-known remote ephemeral (re)")
        if s is not None and not isinstance(s, KeyPair):
            raise UsageError("s must be a KeyPair")
        if e is not None and not isinstance(e, KeyPair):
            raise UsageError("e must be a KeyPair")
        if not isinstance(prologue, (bytes, bytearray, memoryview)):
            raise UsageError("prologue must be bytes")

        self._s = s
        self._e = e
        self._rs = check_key_bytes(rs, "rs") if rs is not None else None
        self._re: bytes | None = None
        self._sym = _SymmetricState(protocol_name, cipher, hash_name)
        self._sym.mix_hash(prologue)
        # Pre-messages: the initiator's keys are hashed first, then the responder's.
        for pre, side_is_initiator in ((pre_i, True), (pre_r, False)):
            for token in pre:  # only "s" in the supported patterns
                assert token == "s"
                if side_is_initiator == initiator:
                    assert self._s is not None
                    self._sym.mix_hash(self._s.public)
                else:
                    assert self._rs is not None
                    self._sym.mix_hash(self._rs)

    # -- state ------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Whether every handshake message has been written or read."""
        return self._index >= len(self._messages)

    @property
    def handshake_hash(self) -> bytes:
        """The final ``h`` (spec section 11.2), a channel binding unique to this session."""
        if not self.complete:
            raise LocalProtocolError("the handshake hash is only final once the handshake is")
        return self._sym.h

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key once known (pinned, or learned from a message)."""
        return self._rs

    def _check_turn(self, writing: bool) -> tuple[str, ...]:
        if self._dead:
            raise LocalProtocolError("the handshake failed earlier; start a new one")
        if self.complete:
            raise LocalProtocolError("the handshake is already complete")
        if ((self._index % 2 == 0) == self.initiator) != writing:
            who = "peer" if writing else "local side"
            raise LocalProtocolError(
                f"it is the {who}'s turn to write handshake message {self._index + 1}"
            )
        return self._messages[self._index]

    def _mix_dh(self, token: str) -> None:
        # The first letter names the initiator's key, the second the responder's (spec 7.1).
        mine, theirs = (token[0], token[1]) if self.initiator else (token[1], token[0])
        local = self._e if mine == "e" else self._s
        remote = self._re if theirs == "e" else self._rs
        assert local is not None and remote is not None
        self._sym.mix_key(_dh(local.private, remote))

    # -- messages ---------------------------------------------------------------------------

    def write_message(self, payload: bytes = b"") -> bytes:
        """The next handshake message, carrying ``payload`` (encrypted once a key exists).

        Raises :class:`LocalProtocolError` out of turn, :class:`UsageError` if the message would
        exceed :data:`MAX_MESSAGE`, :class:`AuthenticationFailed` if a DH with the peer's key is
        invalid (low-order point); the last kills the handshake.
        """
        tokens = self._check_turn(writing=True)
        overhead, keyed = 0, self._sym.cs.has_key()
        for token in tokens:
            if token == "e":
                overhead += DHLEN
            elif token == "s":
                overhead += DHLEN + (TAG if keyed else 0)
            else:
                keyed = True
        overhead += TAG if keyed else 0
        if len(payload) + overhead > MAX_MESSAGE:
            raise UsageError(
                f"handshake payload of {len(payload)} bytes exceeds the Noise message limit",
                hint=f"keep handshake payloads under {MAX_MESSAGE - overhead} bytes",
            )
        try:
            out: list[bytes] = []
            for token in tokens:
                if token == "e":
                    if self._e is None:
                        self._e = KeyPair.generate()
                    out.append(self._e.public)
                    self._sym.mix_hash(self._e.public)
                elif token == "s":
                    assert self._s is not None
                    out.append(self._sym.encrypt_and_hash(self._s.public))
                else:
                    self._mix_dh(token)
            out.append(self._sym.encrypt_and_hash(bytes(payload)))
        except BaseException:
            self._dead = True
            raise
        self._index += 1
        self._finish_if_complete()
        return b"".join(out)

    def read_message(self, message: bytes) -> bytes:
        """Process the peer's next handshake message and return its payload.

        Any tampering, truncation, oversize or invalid key raises the opaque
        :class:`AuthenticationFailed` and kills the handshake.
        """
        tokens = self._check_turn(writing=False)
        try:
            data = bytes(message)
            if len(data) > MAX_MESSAGE:
                raise AuthenticationFailed()
            pos = 0
            for token in tokens:
                if token == "e":
                    if len(data) - pos < DHLEN:
                        raise AuthenticationFailed()
                    self._re = data[pos : pos + DHLEN]
                    pos += DHLEN
                    self._sym.mix_hash(self._re)
                elif token == "s":
                    size = DHLEN + (TAG if self._sym.cs.has_key() else 0)
                    if len(data) - pos < size:
                        raise AuthenticationFailed()
                    self._rs = self._sym.decrypt_and_hash(data[pos : pos + size])
                    pos += size
                else:
                    self._mix_dh(token)
            if self._sym.cs.has_key() and len(data) - pos < TAG:
                raise AuthenticationFailed()
            payload = self._sym.decrypt_and_hash(data[pos:])
        except BaseException:
            self._dead = True
            raise
        self._index += 1
        self._finish_if_complete()
        return payload

    def _finish_if_complete(self) -> None:
        if self.complete:
            # The ephemeral private key has done its job; dropping it is the forward-secrecy
            # half that Python lets us do (the bytes are not wiped, only unreferenced).
            self._e = None

    # -- results ----------------------------------------------------------------------------

    def split(self) -> tuple[CipherState, CipherState]:
        """Spec ``Split()``: (initiator -> responder, responder -> initiator) cipher states.

        Available once, after completion: a second pair would reuse nonces.
        """
        if self._dead:
            raise LocalProtocolError("the handshake failed earlier; start a new one")
        if not self.complete:
            raise LocalProtocolError("split() before the handshake is complete")
        if self._split_done:
            raise LocalProtocolError("the transport keys were already handed out")
        self._split_done = True
        return self._sym.split()

    def transport(self, *, rekey_messages: int = 1 << 16, rekey_bytes: int = 1 << 30) -> Transport:
        """A :class:`Transport` oriented for this side (sends with the right cipher state)."""
        c1, c2 = self.split()
        send, recv = (c1, c2) if self.initiator else (c2, c1)
        return Transport(send, recv, rekey_messages=rekey_messages, rekey_bytes=rekey_bytes)


class Transport:
    """Post-handshake channel with implicit counters, chunking and automatic rekey.

    See the module docstring for the exact rules (they are part of the wire protocol). The
    first authentication failure kills the transport in both directions, so a tampering peer
    gets no oracle: later calls raise :class:`LocalProtocolError`.
    """

    __slots__ = (
        "_dead",
        "_recv",
        "_recv_bytes_since",
        "_recv_msgs_since",
        "_send",
        "_send_bytes_since",
        "_send_msgs_since",
        "bytes_received",
        "bytes_sent",
        "messages_received",
        "messages_sent",
        "rekey_bytes",
        "rekey_messages",
    )

    def __init__(
        self, send: CipherState, recv: CipherState, *, rekey_messages: int, rekey_bytes: int
    ) -> None:
        if not (send.has_key() and recv.has_key()):
            raise UsageError("a Transport needs keyed cipher states (from HandshakeState.split)")
        for name, value in (("rekey_messages", rekey_messages), ("rekey_bytes", rekey_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive int, got {value!r}")
        self._send = send
        self._recv = recv
        self.rekey_messages = rekey_messages
        self.rekey_bytes = rekey_bytes
        self._dead = False
        self.messages_sent = self.messages_received = 0
        self.bytes_sent = self.bytes_received = 0
        self._send_msgs_since = self._send_bytes_since = 0
        self._recv_msgs_since = self._recv_bytes_since = 0

    @property
    def dead(self) -> bool:
        """Whether an earlier failure closed this transport for good."""
        return self._dead

    def _check_alive(self) -> None:
        if self._dead:
            raise LocalProtocolError(
                "the secure channel failed earlier and is closed",
                hint="close the session and run a new handshake",
            )

    def encrypt(self, plaintext: Buffer) -> bytes | bytearray:
        """Encrypt one application message (any length) into one ciphertext."""
        return self.encrypt_parts((plaintext,))

    def encrypt_parts(self, parts: Sequence[Buffer]) -> bytes | bytearray:
        """Encrypt the concatenation of ``parts`` as one message, without concatenating it.

        The chunks are cut from the logical concatenation; only a chunk that straddles two
        parts is assembled (at most 64 KiB copied), so a large tensor can be encrypted
        straight from its own memory.
        """
        self._check_alive()
        encrypt = self._send.encrypt_with_ad
        ciphertext: bytes | bytearray
        try:
            if len(parts) == 1 and _nbytes(parts[0]) < CHUNK:  # common: one short chunk
                size = _nbytes(parts[0])
                ciphertext = encrypt(b"", parts[0])
            else:
                chunks = _chunks(parts)
                size = sum(_nbytes(c) for c in chunks)
                ciphertext = _encrypt_into(self._send, chunks, size)
        except BaseException:
            self._dead = True
            raise
        self.messages_sent += 1
        self.bytes_sent += size
        self._send_msgs_since += 1
        self._send_bytes_since += size
        if (
            self._send_msgs_since >= self.rekey_messages
            or self._send_bytes_since >= self.rekey_bytes
        ):
            self._send.rekey()
            self._send_msgs_since = self._send_bytes_since = 0
        return ciphertext

    def decrypt(self, message: Buffer) -> bytes | bytearray:
        """Decrypt one application message; :class:`AuthenticationFailed` kills the transport."""
        self._check_alive()
        decrypt = self._recv.decrypt_with_ad
        plaintext: bytes | bytearray
        try:
            total = message.nbytes if isinstance(message, memoryview) else len(message)
            last = total % MAX_MESSAGE
            if last < TAG:  # empty, a piece too short for a tag, or a full final piece
                raise AuthenticationFailed()
            if total < MAX_MESSAGE:
                plaintext = decrypt(b"", message)
            else:
                plaintext = _decrypt_into(self._recv, memoryview(message).cast("B"))
        except BaseException:
            self._dead = True
            raise
        size = len(plaintext)
        self.messages_received += 1
        self.bytes_received += size
        self._recv_msgs_since += 1
        self._recv_bytes_since += size
        if (
            self._recv_msgs_since >= self.rekey_messages
            or self._recv_bytes_since >= self.rekey_bytes
        ):
            self._recv.rekey()
            self._recv_msgs_since = self._recv_bytes_since = 0
        return plaintext


# -- multi-chunk messages -----------------------------------------------------------------------
#
# Chunks are written straight into one preallocated buffer (``encrypt_into``/``decrypt_into``)
# instead of being joined afterwards: one copy of a 4 MiB message less on each side. They are
# processed on the calling thread: ``cryptography``'s AEAD calls hold the GIL, so splitting a
# message over worker threads only added hand-offs (measured on the server under load: a
# 784 KiB decrypt took 6.2 ms through a pool, 0.53 ms inline).


def _nbytes(buffer: Buffer) -> int:
    return buffer.nbytes if isinstance(buffer, memoryview) else len(buffer)


def _chunks(parts: Sequence[Buffer]) -> list[Buffer]:
    """The plaintext chunks of the concatenation of ``parts`` (rule 1 of the module docstring:
    full chunks of CHUNK bytes, then one final chunk shorter than CHUNK, possibly empty)."""
    chunks: list[Buffer] = []
    pending: list[memoryview] = []
    pending_len = 0
    for part in parts:
        view = memoryview(part).cast("B")
        offset = 0
        while offset < view.nbytes:
            take = min(CHUNK - pending_len, view.nbytes - offset)
            piece = view[offset : offset + take]
            offset += take
            if not pending and take == CHUNK:
                chunks.append(piece)  # a whole chunk inside one part: no copy
                continue
            pending.append(piece)
            pending_len += take
            if pending_len == CHUNK:
                chunks.append(b"".join(pending))
                pending, pending_len = [], 0
    chunks.append(b"".join(pending))
    return chunks


def _encrypt_into(state: CipherState, chunks: Sequence[Buffer], size: int) -> bytearray:
    count = len(chunks)
    aead, nonces = state.reserve(count)
    out = bytearray(size + TAG * count)
    target = memoryview(out)
    for i, piece in enumerate(chunks):
        start = i * MAX_MESSAGE
        aead.encrypt_into(nonces[i], piece, b"", target[start : start + _nbytes(piece) + TAG])
    state.commit(count)
    return out


def _decrypt_into(state: CipherState, view: memoryview) -> bytearray:
    total = view.nbytes
    count = -(-total // MAX_MESSAGE)
    aead, nonces = state.reserve(count)
    out = bytearray(total - TAG * count)
    target = memoryview(out)
    try:
        for i in range(count):
            piece = view[i * MAX_MESSAGE : (i + 1) * MAX_MESSAGE]
            start = i * CHUNK
            aead.decrypt_into(nonces[i], piece, b"", target[start : start + len(piece) - TAG])
    except InvalidTag:
        raise AuthenticationFailed() from None
    state.commit(count)
    return out
