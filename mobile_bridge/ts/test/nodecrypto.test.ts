/**
 * OpenSSL's AEADs (nodecrypto.ts) against @noble/ciphers: identical bytes for both ciphers on
 * random keys, nonces, associated data and lengths around the chunk size, tampering refused;
 * then the whole golden-vector suite again with OpenSSL installed (vectors.test.js imported
 * into this process after useAead).
 */

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { test } from "node:test";

import { nodeAead } from "../src/nodecrypto.js";
import { nobleAead, useAead, type CipherName } from "../src/noise.js";

for (const cipher of ["ChaChaPoly", "AESGCM"] as CipherName[]) {
  test(`${cipher}: node:crypto and noble agree byte for byte`, () => {
    for (const length of [0, 1, 15, 16, 17, 4096, 65519, 65535, 200_000]) {
      const key = randomBytes(32);
      const nonce = randomBytes(12);
      const ad = randomBytes(length % 3 === 0 ? 0 : 32);
      const plaintext = randomBytes(length);
      const ours = nodeAead(cipher, key, nonce, ad).encrypt(plaintext);
      const theirs = nobleAead(cipher, key, nonce, ad).encrypt(plaintext);
      assert.deepEqual(ours, theirs);
      assert.deepEqual(nodeAead(cipher, key, nonce, ad).decrypt(theirs), new Uint8Array(plaintext));
      const tampered = theirs.slice();
      tampered[length % tampered.length]! ^= 1;
      assert.throws(() => nodeAead(cipher, key, nonce, ad).decrypt(tampered));
      assert.throws(() => nodeAead(cipher, key, randomBytes(12), ad).decrypt(theirs));
    }
    assert.throws(() => nodeAead(cipher, randomBytes(32), randomBytes(12), new Uint8Array()).decrypt(new Uint8Array(15)));
  });
}

useAead(nodeAead);
await import("./vectors.test.js");
