/** Key text forms and fingerprints (§2, src/keys.ts) beyond the vectors' canonical cases. */

import assert from "node:assert/strict";
import { inspect } from "node:util";
import { test } from "node:test";

import { UsageError } from "../src/errors.js";
import {
  KeyPair,
  decodePrivate,
  decodePublic,
  encodePrivate,
  encodePublic,
  fingerprint,
  fromHex,
  toHex,
} from "../src/keys.js";

const pub = fromHex("909203bfe2f1fe0629976de943733de28de7025f563e0ff30863986bef466556");
const text = "x25519:kJIDv-Lx_gYpl23pQ3M94o3nAl9WPg_zCGOYa-9GZVY";

test("public text forms: canonical, hex and standard base64 accepted", () => {
  assert.equal(encodePublic(pub), text);
  assert.deepEqual(decodePublic(`  ${text}\n`), pub);
  assert.deepEqual(decodePublic(toHex(pub).toUpperCase()), pub);
  const std = text.slice(7).replace(/-/g, "+").replace(/_/g, "/");
  assert.deepEqual(decodePublic(std), pub);
  assert.deepEqual(decodePublic(std + "="), pub);
  assert.deepEqual(decodePublic(text + "="), pub);
});

test("public text forms: non-canonical, wrong length and private keys refused", () => {
  // The last character carries two unused bits: "Z" -> "a" sets one of them.
  assert.throws(() => decodePublic(text.slice(0, -1) + "a"), UsageError);
  assert.throws(() => decodePublic(text.slice(0, -1)), UsageError);
  assert.throws(() => decodePublic("x25519:" + "+".repeat(43)), UsageError);
  assert.throws(() => decodePublic(encodePrivate(new Uint8Array(32))), /private key/);
  assert.throws(() => decodePublic("nonsense"), UsageError);
});

test("private keys: any 32 bytes (unclamped too), text form round trip, no leak when printed", () => {
  const priv = new Uint8Array(32).fill(0xff);
  const pair = KeyPair.fromPrivate(priv);
  assert.deepEqual(decodePrivate(encodePrivate(priv)), priv);
  assert.throws(() => decodePrivate(text), UsageError);
  assert.throws(() => new KeyPair(priv, pub), UsageError);
  assert.throws(() => KeyPair.fromPrivate(new Uint8Array(31)), UsageError);
  const shown = `${String(pair)} ${JSON.stringify(pair)} ${inspect(pair)}`;
  assert.ok(!shown.includes(toHex(priv)) && shown.includes(pair.fingerprint));
  assert.match(fingerprint(pair.public), /^[a-z2-7]{4}(-[a-z2-7]{4}){3}$/);
});
