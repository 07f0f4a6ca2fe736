/**
 * The Noise Protocol Framework (revision 34), pattern IK, for the secure offload channel: a port
 * of edgeoffload/core/noise.py restricted to what the wire protocol runs
 * ({@link RUNTIME_PROTOCOLS}; the Python module also has NK and XX for the cacophony vectors).
 *
 * Pure and deterministic: no I/O, no clocks. The only randomness is the ephemeral key pair when
 * the caller does not pass one in, so tests and golden vectors inject fixed ephemeral keys.
 *
 * Deliberate choices beyond the Noise spec (the same as the reference):
 * - an all-zero X25519 result (a low-order peer key) is an {@link AuthenticationFailed};
 * - any failure while reading a handshake message kills the {@link HandshakeState}: every later
 *   call raises {@link LocalProtocolError};
 * - {@link HandshakeState.split} hands the transport keys out once (two cipher states with one
 *   key and nonce would reuse nonces);
 * - the nonce 2^64 − 1 is reserved; a cipher state that reaches it refuses to work. Rekeying
 *   does not reset the nonce.
 *
 * The AEAD is @noble/ciphers by default (pure JS, audited, the same everywhere); a platform with
 * a native one can install it with {@link useAead} (node.ts installs OpenSSL's through
 * node:crypto, about 15 times faster on large tensors). Both must give identical bytes: the
 * tests run the golden vectors through each.
 *
 * {@link Transport} implements the transport rules of PROTOCOL.md §6 (chunking, implicit nonces,
 * final failure, rekey after `rekeyMessages` messages or `rekeyBytes` bytes), which are part of
 * the wire protocol and must be followed exactly.
 */

import { gcm } from "@noble/ciphers/aes.js";
import { chacha20poly1305 } from "@noble/ciphers/chacha.js";
import { x25519 } from "@noble/curves/ed25519.js";
import { blake2s } from "@noble/hashes/blake2.js";
import { hmac } from "@noble/hashes/hmac.js";
import { sha256 } from "@noble/hashes/sha2.js";

import { AuthenticationFailed, LocalProtocolError, UsageError } from "./errors.js";
import { KeyPair, checkKeyBytes } from "./keys.js";

export const DEFAULT_PROTOCOL = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/** What the wire protocol accepts: ChaChaPoly for devices without AES instructions, AESGCM. */
export const RUNTIME_PROTOCOLS = [
  "Noise_IK_25519_ChaChaPoly_BLAKE2s",
  "Noise_IK_25519_AESGCM_SHA256",
] as const;
export type ProtocolName = (typeof RUNTIME_PROTOCOLS)[number];

/** Largest Noise message in bytes (spec §3). */
export const MAX_MESSAGE = 65535;
/** AEAD authentication tag length. */
export const TAG = 16;
/** Length of an X25519 public key or shared secret. */
export const DHLEN = 32;
/** Largest plaintext of one transport message (65519). */
export const CHUNK = MAX_MESSAGE - TAG;

export type CipherName = "ChaChaPoly" | "AESGCM";
type HashName = "BLAKE2s" | "SHA256";

/** One AEAD operation context: a key, a nonce and associated data, as @noble/ciphers has them. */
export interface Aead {
  encrypt(plaintext: Uint8Array): Uint8Array;
  /** Throws (anything) when the tag does not authenticate. */
  decrypt(ciphertext: Uint8Array): Uint8Array;
}

/** Makes the AEAD of `cipher` for one (key, nonce, ad). */
export type AeadFactory = (cipher: CipherName, key: Uint8Array, nonce: Uint8Array, ad: Uint8Array) => Aead;

/** The default: @noble/ciphers. */
export const nobleAead: AeadFactory = (cipher, key, nonce, ad) =>
  cipher === "ChaChaPoly" ? chacha20poly1305(key, nonce, ad) : gcm(key, nonce, ad);

let aeadFactory: AeadFactory = nobleAead;

/** Install the AEAD every CipherState uses from now on (returns the previous one). */
export function useAead(factory: AeadFactory): AeadFactory {
  const previous = aeadFactory;
  aeadFactory = factory;
  return previous;
}

const MAX_NONCE = 2n ** 64n - 1n;
const ZEROS32 = new Uint8Array(32);
const EMPTY = new Uint8Array(0);

/** IK: initiator → responder, then responder → initiator; the responder's `s` is pre-known. */
const IK_MESSAGES: readonly (readonly string[])[] = [
  ["e", "es", "s", "ss"],
  ["e", "ee", "se"],
];

function hashFn(name: HashName): typeof sha256 {
  return name === "SHA256" ? sha256 : (blake2s as unknown as typeof sha256);
}

function concat(...parts: Uint8Array[]): Uint8Array {
  let size = 0;
  for (const p of parts) size += p.length;
  const out = new Uint8Array(size);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** X25519; a low-order peer key (all-zero result) is an authentication failure. */
function dh(privateKey: Uint8Array, publicKey: Uint8Array): Uint8Array {
  let shared: Uint8Array;
  try {
    shared = x25519.getSharedSecret(privateKey, publicKey);
  } catch {
    // noble refuses low-order points itself; the explicit check below keeps the guarantee.
    throw new AuthenticationFailed();
  }
  if (shared.every((b) => b === 0)) throw new AuthenticationFailed();
  return shared;
}

/**
 * Spec §5.1: a key `k` (maybe empty) and a nonce counter `n`. Nonces are 4 zero bytes then the
 * 64-bit counter, little-endian for ChaChaPoly and big-endian for AESGCM (spec §12.3/§12.4).
 * `n` is public so a caller can read (or, like the spec's SetNonce, set) it.
 */
export class CipherState {
  n = 0n;
  private key: Uint8Array | undefined;

  constructor(
    readonly cipher: CipherName,
    key?: Uint8Array,
  ) {
    if (cipher !== "ChaChaPoly" && cipher !== "AESGCM") {
      throw new UsageError(`unknown Noise cipher ${JSON.stringify(cipher)}`);
    }
    if (key !== undefined) this.key = checkKeyBytes(key, "cipher key").slice();
  }

  hasKey(): boolean {
    return this.key !== undefined;
  }

  /** The 12-byte nonce of counter `n` (no reservation check: callers do it). */
  nonceBytes(n: bigint): Uint8Array {
    const out = new Uint8Array(12);
    new DataView(out.buffer).setBigUint64(4, n, this.cipher === "ChaChaPoly");
    return out;
  }

  private aead(key: Uint8Array, nonce: Uint8Array, ad: Uint8Array): Aead {
    return aeadFactory(this.cipher, key, nonce, ad);
  }

  private checkNonce(count: bigint): void {
    if (this.n + count > MAX_NONCE) {
      throw new LocalProtocolError("nonce space exhausted (2**64 - 1 is reserved)", {
        hint: "close the session and run a new handshake",
      });
    }
  }

  /** AEAD-encrypt with the next nonce; without a key, return the plaintext (spec). */
  encryptWithAd(ad: Uint8Array, plaintext: Uint8Array): Uint8Array {
    if (this.key === undefined) return plaintext.slice();
    this.checkNonce(1n);
    const out = this.aead(this.key, this.nonceBytes(this.n), ad).encrypt(plaintext);
    this.n += 1n;
    return out;
  }

  /** AEAD-decrypt with the next nonce; {@link AuthenticationFailed} leaves `n` as it was. */
  decryptWithAd(ad: Uint8Array, ciphertext: Uint8Array): Uint8Array {
    if (this.key === undefined) return ciphertext.slice();
    this.checkNonce(1n);
    let out: Uint8Array;
    try {
      out = this.aead(this.key, this.nonceBytes(this.n), ad).decrypt(ciphertext);
    } catch {
      throw new AuthenticationFailed();
    }
    this.n += 1n;
    return out;
  }

  /**
   * Encrypt `chunks` with consecutive nonces into one buffer (rule 2 of §6); the counter moves
   * only after every chunk succeeded, as the reference's reserve/commit.
   */
  encryptChunks(chunks: readonly Uint8Array[]): Uint8Array {
    const key = this.requireKey();
    this.checkNonce(BigInt(chunks.length));
    const pieces = chunks.map((c, i) =>
      this.aead(key, this.nonceBytes(this.n + BigInt(i)), EMPTY).encrypt(c),
    );
    this.n += BigInt(chunks.length);
    return concat(...pieces);
  }

  /** Decrypt the pieces of one message (rule 3 of §6) with consecutive nonces, all or nothing. */
  decryptPieces(pieces: readonly Uint8Array[]): Uint8Array {
    const key = this.requireKey();
    this.checkNonce(BigInt(pieces.length));
    let plain: Uint8Array[];
    try {
      plain = pieces.map((p, i) =>
        this.aead(key, this.nonceBytes(this.n + BigInt(i)), EMPTY).decrypt(p),
      );
    } catch {
      throw new AuthenticationFailed();
    }
    this.n += BigInt(pieces.length);
    return concat(...plain);
  }

  /** Spec §4.2 `REKEY(k)`: the first 32 bytes of ENCRYPT(k, 2^64 − 1, "", 32 zero bytes). */
  rekey(): void {
    const key = this.requireKey();
    this.key = this.aead(key, this.nonceBytes(MAX_NONCE), EMPTY).encrypt(ZEROS32).slice(0, 32);
  }

  private requireKey(): Uint8Array {
    if (this.key === undefined) {
      throw new LocalProtocolError("this operation needs a cipher state with a key");
    }
    return this.key;
  }
}

/** Spec §5.2: chaining key `ck`, handshake hash `h` and a CipherState. */
class SymmetricState {
  h: Uint8Array;
  ck: Uint8Array;
  cs: CipherState;
  private readonly hash: typeof sha256;

  constructor(
    protocolName: string,
    private readonly cipher: CipherName,
    hashName: HashName,
  ) {
    this.hash = hashFn(hashName);
    const name = new TextEncoder().encode(protocolName);
    // HASHLEN is 32 for both hashes: a name of at most 32 bytes is zero-padded, else hashed.
    if (name.length <= 32) {
      this.h = new Uint8Array(32);
      this.h.set(name);
    } else {
      this.h = this.hash(name);
    }
    this.ck = this.h;
    this.cs = new CipherState(cipher);
  }

  private hmac(key: Uint8Array, data: Uint8Array): Uint8Array {
    return hmac(this.hash, key, data);
  }

  /** HKDF with two outputs (spec §4.3); three are only needed for PSK modes. */
  hkdf2(ikm: Uint8Array): [Uint8Array, Uint8Array] {
    const temp = this.hmac(this.ck, ikm);
    const out1 = this.hmac(temp, Uint8Array.of(1));
    const out2 = this.hmac(temp, concat(out1, Uint8Array.of(2)));
    return [out1, out2];
  }

  mixKey(ikm: Uint8Array): void {
    const [ck, tempK] = this.hkdf2(ikm);
    this.ck = ck;
    this.cs = new CipherState(this.cipher, tempK);
  }

  mixHash(data: Uint8Array): void {
    this.h = this.hash(concat(this.h, data));
  }

  encryptAndHash(plaintext: Uint8Array): Uint8Array {
    const ciphertext = this.cs.encryptWithAd(this.h, plaintext);
    this.mixHash(ciphertext);
    return ciphertext;
  }

  decryptAndHash(ciphertext: Uint8Array): Uint8Array {
    const plaintext = this.cs.decryptWithAd(this.h, ciphertext);
    this.mixHash(ciphertext);
    return plaintext;
  }

  split(): [CipherState, CipherState] {
    const [k1, k2] = this.hkdf2(EMPTY);
    return [new CipherState(this.cipher, k1), new CipherState(this.cipher, k2)];
  }
}

function parseProtocol(name: string): [CipherName, HashName] {
  if (!(RUNTIME_PROTOCOLS as readonly string[]).includes(name)) {
    throw new UsageError(`unsupported Noise protocol ${JSON.stringify(name)}`, {
      hint: "use one of: " + RUNTIME_PROTOCOLS.join(", "),
    });
  }
  const [, , , cipher, hash] = name.split("_");
  return [cipher as CipherName, hash as HashName];
}

export interface HandshakeOptions {
  initiator: boolean;
  prologue?: Uint8Array;
  /** This side's static key pair (both sides of IK have one). */
  s: KeyPair;
  /** This side's ephemeral key pair; generated when first needed if absent. */
  e?: KeyPair;
  /** The responder's static public key: required for the initiator (pinned), refused otherwise. */
  rs?: Uint8Array;
}

/** Spec §5.3: runs the IK handshake to completion, then hands out the keys. */
export class HandshakeState {
  readonly protocolName: string;
  readonly initiator: boolean;
  private readonly sym: SymmetricState;
  private readonly s: KeyPair;
  private e: KeyPair | undefined;
  private rs: Uint8Array | undefined;
  private re: Uint8Array | undefined;
  private index = 0;
  private dead = false;
  private splitDone = false;

  constructor(protocolName: string, opts: HandshakeOptions) {
    const [cipher, hash] = parseProtocol(protocolName);
    this.protocolName = protocolName;
    this.initiator = opts.initiator;
    if (!(opts.s instanceof KeyPair)) throw new UsageError("s must be a KeyPair");
    if (opts.e !== undefined && !(opts.e instanceof KeyPair)) {
      throw new UsageError("e must be a KeyPair");
    }
    if (opts.initiator !== (opts.rs !== undefined)) {
      throw new UsageError(
        `${protocolName} ${opts.initiator ? "needs" : "does not take"} the peer's static ` +
          "public key (rs) on this side",
        { hint: "the IK initiator pins the responder's key; the responder learns the initiator's" },
      );
    }
    this.s = opts.s;
    this.e = opts.e;
    this.rs = opts.rs === undefined ? undefined : checkKeyBytes(opts.rs, "rs").slice();
    this.sym = new SymmetricState(protocolName, cipher, hash);
    this.sym.mixHash(opts.prologue ?? EMPTY);
    // Pre-message of IK: the responder's static key.
    this.sym.mixHash(opts.initiator ? this.rs! : this.s.public);
  }

  /** Whether every handshake message has been written or read. */
  get complete(): boolean {
    return this.index >= IK_MESSAGES.length;
  }

  /** The final `h` (spec §11.2), a channel binding unique to this session. */
  get handshakeHash(): Uint8Array {
    if (!this.complete) {
      throw new LocalProtocolError("the handshake hash is only final once the handshake is");
    }
    return this.sym.h.slice();
  }

  /** The peer's static public key once known (pinned, or learned from message 1). */
  get remoteStatic(): Uint8Array | undefined {
    return this.rs?.slice();
  }

  private checkTurn(writing: boolean): readonly string[] {
    if (this.dead) throw new LocalProtocolError("the handshake failed earlier; start a new one");
    if (this.complete) throw new LocalProtocolError("the handshake is already complete");
    if (((this.index % 2 === 0) === this.initiator) !== writing) {
      const who = writing ? "peer" : "local side";
      throw new LocalProtocolError(
        `it is the ${who}'s turn to write handshake message ${this.index + 1}`,
      );
    }
    return IK_MESSAGES[this.index]!;
  }

  private mixDh(token: string): void {
    // The first letter names the initiator's key, the second the responder's (spec §7.1).
    const [mine, theirs] = this.initiator ? [token[0], token[1]] : [token[1], token[0]];
    const local = mine === "e" ? this.e : this.s;
    const remote = theirs === "e" ? this.re : this.rs;
    if (local === undefined || remote === undefined) {
      throw new LocalProtocolError(`handshake token ${token} is missing a key`);
    }
    this.sym.mixKey(dh(local.private, remote));
  }

  /** The next handshake message, carrying `payload` (encrypted once a key exists). */
  writeMessage(payload: Uint8Array = EMPTY): Uint8Array {
    const tokens = this.checkTurn(true);
    let overhead = 0;
    let keyed = this.sym.cs.hasKey();
    for (const token of tokens) {
      if (token === "e") overhead += DHLEN;
      else if (token === "s") overhead += DHLEN + (keyed ? TAG : 0);
      else keyed = true;
    }
    overhead += keyed ? TAG : 0;
    if (payload.length + overhead > MAX_MESSAGE) {
      throw new UsageError(
        `handshake payload of ${payload.length} bytes exceeds the Noise message limit`,
        { hint: `keep handshake payloads under ${MAX_MESSAGE - overhead} bytes` },
      );
    }
    const out: Uint8Array[] = [];
    try {
      for (const token of tokens) {
        if (token === "e") {
          this.e ??= KeyPair.generate();
          out.push(this.e.public);
          this.sym.mixHash(this.e.public);
        } else if (token === "s") {
          out.push(this.sym.encryptAndHash(this.s.public));
        } else {
          this.mixDh(token);
        }
      }
      out.push(this.sym.encryptAndHash(payload));
    } catch (exc) {
      this.dead = true;
      throw exc;
    }
    this.advance();
    return concat(...out);
  }

  /** Process the peer's next handshake message and return its payload (opaque failures). */
  readMessage(message: Uint8Array): Uint8Array {
    const tokens = this.checkTurn(false);
    let payload: Uint8Array;
    try {
      if (message.length > MAX_MESSAGE) throw new AuthenticationFailed();
      let pos = 0;
      for (const token of tokens) {
        if (token === "e") {
          if (message.length - pos < DHLEN) throw new AuthenticationFailed();
          this.re = message.slice(pos, pos + DHLEN);
          pos += DHLEN;
          this.sym.mixHash(this.re);
        } else if (token === "s") {
          const size = DHLEN + (this.sym.cs.hasKey() ? TAG : 0);
          if (message.length - pos < size) throw new AuthenticationFailed();
          this.rs = this.sym.decryptAndHash(message.subarray(pos, pos + size));
          pos += size;
        } else {
          this.mixDh(token);
        }
      }
      if (this.sym.cs.hasKey() && message.length - pos < TAG) throw new AuthenticationFailed();
      payload = this.sym.decryptAndHash(message.subarray(pos));
    } catch (exc) {
      this.dead = true;
      throw exc;
    }
    this.advance();
    return payload;
  }

  private advance(): void {
    this.index += 1;
    // The ephemeral private key has done its job: drop the reference (forward secrecy).
    if (this.complete) this.e = undefined;
  }

  /** Spec Split(): (initiator → responder, responder → initiator), available once. */
  split(): [CipherState, CipherState] {
    if (this.dead) throw new LocalProtocolError("the handshake failed earlier; start a new one");
    if (!this.complete) throw new LocalProtocolError("split() before the handshake is complete");
    if (this.splitDone) throw new LocalProtocolError("the transport keys were already handed out");
    this.splitDone = true;
    return this.sym.split();
  }

  /** A {@link Transport} oriented for this side (sends with the right cipher state). */
  transport(opts: { rekeyMessages?: number; rekeyBytes?: number } = {}): Transport {
    const [c1, c2] = this.split();
    const [send, recv] = this.initiator ? [c1, c2] : [c2, c1];
    return new Transport(send, recv, opts);
  }
}

/** Wire protocol v1 rekey limits (§6 rule 5); both peers MUST use them. */
export const REKEY_MESSAGES = 1 << 16;
export const REKEY_BYTES = 2 ** 30;

/**
 * Post-handshake channel (§6): chunking, implicit counters and automatic rekey. The first
 * authentication failure kills it in both directions (later calls raise LocalProtocolError), so
 * a tampering peer gets one guess, not an oracle.
 */
export class Transport {
  readonly rekeyMessages: number;
  readonly rekeyBytes: number;
  messagesSent = 0;
  messagesReceived = 0;
  bytesSent = 0;
  bytesReceived = 0;
  private isDead = false;
  private sendMsgsSince = 0;
  private sendBytesSince = 0;
  private recvMsgsSince = 0;
  private recvBytesSince = 0;

  constructor(
    private readonly send: CipherState,
    private readonly recv: CipherState,
    opts: { rekeyMessages?: number; rekeyBytes?: number } = {},
  ) {
    if (!(send.hasKey() && recv.hasKey())) {
      throw new UsageError("a Transport needs keyed cipher states (from HandshakeState.split)");
    }
    this.rekeyMessages = opts.rekeyMessages ?? REKEY_MESSAGES;
    this.rekeyBytes = opts.rekeyBytes ?? REKEY_BYTES;
    for (const [name, value] of [
      ["rekeyMessages", this.rekeyMessages],
      ["rekeyBytes", this.rekeyBytes],
    ] as const) {
      if (!Number.isSafeInteger(value) || value < 1) {
        throw new UsageError(`${name} must be a positive integer, got ${value}`);
      }
    }
  }

  /** Whether an earlier failure closed this transport for good. */
  get dead(): boolean {
    return this.isDead;
  }

  /** The nonce the next outgoing chunk will use. */
  get sendNonce(): bigint {
    return this.send.n;
  }

  /** The nonce the next incoming chunk must have been encrypted with. */
  get recvNonce(): bigint {
    return this.recv.n;
  }

  private checkAlive(): void {
    if (this.isDead) {
      throw new LocalProtocolError("the secure channel failed earlier and is closed", {
        hint: "close the session and run a new handshake",
      });
    }
  }

  /** Encrypt one application message (any length) into one ciphertext. */
  encrypt(plaintext: Uint8Array): Uint8Array {
    return this.encryptParts([plaintext]);
  }

  /**
   * Encrypt the concatenation of `parts` as one message without concatenating it: chunks are
   * cut from the logical concatenation (§6 rule 1), so only a chunk that straddles parts is
   * assembled.
   */
  encryptParts(parts: readonly Uint8Array[]): Uint8Array {
    this.checkAlive();
    let ciphertext: Uint8Array;
    let size = 0;
    try {
      const chunks = cutChunks(parts);
      for (const c of chunks) size += c.length;
      ciphertext = this.send.encryptChunks(chunks);
    } catch (exc) {
      this.isDead = true;
      throw exc;
    }
    this.messagesSent += 1;
    this.bytesSent += size;
    this.sendMsgsSince += 1;
    this.sendBytesSince += size;
    if (this.sendMsgsSince >= this.rekeyMessages || this.sendBytesSince >= this.rekeyBytes) {
      this.send.rekey();
      this.sendMsgsSince = this.sendBytesSince = 0;
    }
    return ciphertext;
  }

  /** Decrypt one application message; {@link AuthenticationFailed} kills the transport. */
  decrypt(message: Uint8Array): Uint8Array {
    this.checkAlive();
    let plaintext: Uint8Array;
    try {
      // Empty, a final piece too short for a tag, or a full final piece (chunks dropped).
      if (message.length % MAX_MESSAGE < TAG) throw new AuthenticationFailed();
      const pieces: Uint8Array[] = [];
      for (let at = 0; at < message.length; at += MAX_MESSAGE) {
        pieces.push(message.subarray(at, at + MAX_MESSAGE));
      }
      plaintext = this.recv.decryptPieces(pieces);
    } catch (exc) {
      this.isDead = true;
      throw exc;
    }
    const size = plaintext.length;
    this.messagesReceived += 1;
    this.bytesReceived += size;
    this.recvMsgsSince += 1;
    this.recvBytesSince += size;
    if (this.recvMsgsSince >= this.rekeyMessages || this.recvBytesSince >= this.rekeyBytes) {
      this.recv.rekey();
      this.recvMsgsSince = this.recvBytesSince = 0;
    }
    return plaintext;
  }
}

/**
 * The plaintext chunks of the concatenation of `parts` (§6 rule 1): full chunks of
 * {@link CHUNK} bytes, then one final chunk shorter than CHUNK, possibly empty.
 */
export function cutChunks(parts: readonly Uint8Array[]): Uint8Array[] {
  const chunks: Uint8Array[] = [];
  let pending: Uint8Array[] = [];
  let pendingLen = 0;
  for (const part of parts) {
    let offset = 0;
    while (offset < part.length) {
      const take = Math.min(CHUNK - pendingLen, part.length - offset);
      const piece = part.subarray(offset, offset + take);
      offset += take;
      if (pending.length === 0 && take === CHUNK) {
        chunks.push(piece); // a whole chunk inside one part: no copy
        continue;
      }
      pending.push(piece);
      pendingLen += take;
      if (pendingLen === CHUNK) {
        chunks.push(concat(...pending));
        pending = [];
        pendingLen = 0;
      }
    }
  }
  chunks.push(concat(...pending));
  return chunks;
}
