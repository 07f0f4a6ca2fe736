/**
 * X25519 identity keys and their text forms (PROTOCOL.md §2), a port of edgeoffload/keys.py.
 *
 * Users copy public keys between machines as `"x25519:" + base64url(public)` (43 characters, no
 * padding, the unused low bits of the last character zero so that each key has exactly one text
 * form) and compare fingerprints by eye. A private key is any 32 bytes: X25519 clamps it
 * internally, so unclamped keys (the vectors' keys are raw SHA-256 outputs) are accepted.
 * Works in Node and in browsers (no Buffer, randomness from `globalThis.crypto`).
 */

import { x25519 } from "@noble/curves/ed25519.js";
import { sha256 } from "@noble/hashes/sha2.js";

import { UsageError } from "./errors.js";

export const KEY_SIZE = 32;
export const PUBLIC_PREFIX = "x25519:";
export const PRIVATE_PREFIX = "x25519-private:";
const FINGERPRINT_DOMAIN = new TextEncoder().encode("edgeoffload-key-v1");

const PUBLIC_FORM_HINT =
  "expected 'x25519:' followed by 43 base64url characters (the contents of a public.key " +
  "written by 'edgeoffload keys generate'); 64 hex digits or standard base64 also work";

/** `value` if it is a 32-byte key, else a UsageError naming `what` it was. */
export function checkKeyBytes(value: unknown, what: string): Uint8Array {
  if (!(value instanceof Uint8Array) || value.length !== KEY_SIZE) {
    const got = value instanceof Uint8Array ? `${value.length} bytes` : typeof value;
    throw new UsageError(`${what} must be ${KEY_SIZE} raw bytes, got ${got}`, {
      hint: "X25519 keys are 32 raw bytes (not hex, not PEM)",
    });
  }
  return value;
}

/** The X25519 public key of a 32-byte private key. */
export function publicOf(privateKey: Uint8Array): Uint8Array {
  return x25519.getPublicKey(checkKeyBytes(privateKey, "X25519 private key"));
}

/** 32 random bytes from the platform's CSPRNG (Node ≥ 20 and browsers have `crypto`). */
export function randomBytes(n: number): Uint8Array {
  const out = new Uint8Array(n);
  globalThis.crypto.getRandomValues(out);
  return out;
}

/**
 * A static or ephemeral X25519 key pair as raw 32-byte keys. Built through {@link fromPrivate}
 * or {@link generate}; the constructor checks that the public half belongs to the private one,
 * because a mismatched pair would only fail later, as an opaque authentication failure at the
 * peer. Printing or JSON-serialising a pair shows the fingerprint only.
 */
export class KeyPair {
  readonly private: Uint8Array;
  readonly public: Uint8Array;

  constructor(privateKey: Uint8Array, publicKey: Uint8Array) {
    const priv = checkKeyBytes(privateKey, "X25519 private key");
    const pub = checkKeyBytes(publicKey, "X25519 public key");
    if (!equalBytes(publicOf(priv), pub)) {
      throw new UsageError("the public key does not belong to the private key", {
        hint: "build the pair with KeyPair.fromPrivate(private)",
      });
    }
    this.private = priv.slice();
    this.public = pub.slice();
  }

  /** The key pair of a 32-byte private key (the public key is derived). */
  static fromPrivate(privateKey: Uint8Array): KeyPair {
    return new KeyPair(privateKey, publicOf(privateKey));
  }

  /** A fresh random key pair. */
  static generate(): KeyPair {
    return KeyPair.fromPrivate(randomBytes(KEY_SIZE));
  }

  get fingerprint(): string {
    return fingerprint(this.public);
  }

  toString(): string {
    return `KeyPair(fingerprint=${this.fingerprint})`;
  }

  toJSON(): { fingerprint: string } {
    return { fingerprint: this.fingerprint };
  }

  [Symbol.for("nodejs.util.inspect.custom")](): string {
    return this.toString();
  }
}

// -- text forms -----------------------------------------------------------------------------------

const B64_STD = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const B64_URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

function base64(raw: Uint8Array, alphabet: string): string {
  let out = "";
  for (let i = 0; i < raw.length; i += 3) {
    const n = ((raw[i] ?? 0) << 16) | ((raw[i + 1] ?? 0) << 8) | (raw[i + 2] ?? 0);
    const chars = Math.min(4, Math.ceil(((raw.length - i) * 8) / 6));
    for (let j = 0; j < chars; j++) out += alphabet[(n >> (18 - 6 * j)) & 63];
  }
  return out; // unpadded
}

/** Decode unpadded base64 of `alphabet`; null on a character outside it. Low bits are dropped. */
function unbase64(text: string, alphabet: string): Uint8Array | null {
  const out: number[] = [];
  let acc = 0;
  let bits = 0;
  for (const ch of text) {
    const v = alphabet.indexOf(ch);
    if (v < 0) return null;
    acc = (acc << 6) | v;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push((acc >> bits) & 0xff);
    }
  }
  return Uint8Array.from(out);
}

/** 43 base64url characters (optional '=') to 32 bytes; null unless canonical. */
function b64url32(body: string): Uint8Array | null {
  if (!/^[A-Za-z0-9_-]{43}=?$/.test(body)) return null;
  const bare = body.replace(/=$/, "");
  const raw = unbase64(bare, B64_URL);
  // The last character carries 2 unused bits: non-zero ones would give a key two text forms.
  if (raw === null || raw.length !== KEY_SIZE || base64(raw, B64_URL) !== bare) return null;
  return raw;
}

/** Text form of a public key: `"x25519:"` + unpadded base64url (43 characters). */
export function encodePublic(publicKey: Uint8Array): string {
  return PUBLIC_PREFIX + base64(checkKeyBytes(publicKey, "public key"), B64_URL);
}

/** Text form of a private key, as in `private.key`: `"x25519-private:"` + base64url. */
export function encodePrivate(privateKey: Uint8Array): string {
  return PRIVATE_PREFIX + base64(checkKeyBytes(privateKey, "private key"), B64_URL);
}

/**
 * Parse a public key's text form: the canonical `x25519:<43 base64url>` and, leniently, 64 hex
 * digits or 43/44-character standard base64. Surrounding whitespace is ignored. A private key is
 * refused, and the input is never echoed (a user may have pasted a private key by mistake).
 */
export function decodePublic(text: string): Uint8Array {
  const s = text.trim();
  if (s.startsWith(PRIVATE_PREFIX)) {
    throw new UsageError(
      "this is a private key, not a public key; never share or paste private keys",
      { hint: "use the contents of public.key (or its path) instead" },
    );
  }
  let raw: Uint8Array | null = null;
  if (s.startsWith(PUBLIC_PREFIX)) {
    raw = b64url32(s.slice(PUBLIC_PREFIX.length));
  } else if (/^[0-9A-Fa-f]{64}$/.test(s)) {
    raw = fromHex(s);
  } else if (/^[A-Za-z0-9+/]{43}=?$/.test(s)) {
    // As Python's base64.b64decode: the unused bits of the last character are not checked.
    raw = unbase64(s.replace(/=$/, ""), B64_STD);
  }
  if (raw === null || raw.length !== KEY_SIZE) {
    throw new UsageError(`not a valid X25519 public key (${s.length} characters)`, {
      hint: PUBLIC_FORM_HINT,
    });
  }
  return raw;
}

/** Parse a private key's text form (`x25519-private:<43 base64url>`, the `private.key` line). */
export function decodePrivate(text: string): Uint8Array {
  const s = text.trim();
  const raw = s.startsWith(PRIVATE_PREFIX) ? b64url32(s.slice(PRIVATE_PREFIX.length)) : null;
  if (raw === null) {
    throw new UsageError("not a valid X25519 private key", {
      hint: "expected 'x25519-private:' followed by 43 base64url characters",
    });
  }
  return raw;
}

const BASE32 = "abcdefghijklmnopqrstuvwxyz234567";

/**
 * Short fingerprint of a public key, safe to log and compared by eye: the first 10 bytes of
 * `sha256("edgeoffload-key-v1" || public)` in lowercase base32, four groups of four.
 */
export function fingerprint(publicKey: Uint8Array): string {
  const input = new Uint8Array(FINGERPRINT_DOMAIN.length + KEY_SIZE);
  input.set(FINGERPRINT_DOMAIN);
  input.set(checkKeyBytes(publicKey, "public key"), FINGERPRINT_DOMAIN.length);
  const digest = sha256(input).subarray(0, 10);
  let text = "";
  let acc = 0;
  let bits = 0;
  for (const byte of digest) {
    acc = (acc << 8) | byte;
    bits += 8;
    while (bits >= 5) {
      bits -= 5;
      text += BASE32[(acc >> bits) & 31];
    }
  }
  return (text.match(/.{4}/g) ?? []).join("-"); // 80 bits = 16 characters exactly
}

// -- small byte helpers shared by the protocol modules -----------------------------------------

/** Lowercase hex of `bytes`. */
export function toHex(bytes: Uint8Array): string {
  let out = "";
  for (const b of bytes) out += b.toString(16).padStart(2, "0");
  return out;
}

/** Bytes of an even-length hex string (UsageError otherwise). */
export function fromHex(hex: string): Uint8Array {
  if (hex.length % 2 !== 0 || !/^[0-9A-Fa-f]*$/.test(hex)) {
    throw new UsageError("not a hex string");
  }
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return out;
}

/** Byte equality in time independent of where the first difference is. */
export function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= (a[i] ?? 0) ^ (b[i] ?? 0);
  return diff === 0;
}
