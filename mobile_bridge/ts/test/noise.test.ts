/** Noise IK and the transport rules of PROTOCOL.md §6 (src/noise.ts), for both suites. */

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { AuthenticationFailed, LocalProtocolError, UsageError } from "../src/errors.js";
import { KeyPair } from "../src/keys.js";
import {
  CHUNK,
  CipherState,
  HandshakeState,
  MAX_MESSAGE,
  RUNTIME_PROTOCOLS,
  TAG,
  Transport,
  cutChunks,
} from "../src/noise.js";

function handshake(protocol: string, opts: { rekeyMessages?: number; rekeyBytes?: number } = {}) {
  const client = KeyPair.generate();
  const server = KeyPair.generate();
  const initiator = new HandshakeState(protocol, { initiator: true, prologue: Uint8Array.of(1), s: client, rs: server.public });
  const responder = new HandshakeState(protocol, { initiator: false, prologue: Uint8Array.of(1), s: server });
  const payload1 = responder.readMessage(initiator.writeMessage(Uint8Array.of(9, 9)));
  assert.deepEqual(payload1, Uint8Array.of(9, 9));
  assert.deepEqual(responder.remoteStatic, client.public);
  initiator.readMessage(responder.writeMessage());
  assert.deepEqual(initiator.handshakeHash, responder.handshakeHash);
  return { initiator, responder, device: initiator.transport(opts), edge: responder.transport(opts) };
}

test("cutChunks: full chunks of 65519, then one shorter chunk, possibly empty", () => {
  const lengths = (size: number, split = 0) => {
    const data = new Uint8Array(size);
    const parts = split ? [data.subarray(0, split), data.subarray(split)] : [data];
    return cutChunks(parts).map((c) => c.length);
  };
  assert.deepEqual(lengths(0), [0]);
  assert.deepEqual(lengths(CHUNK - 1), [CHUNK - 1]);
  assert.deepEqual(lengths(CHUNK), [CHUNK, 0]);
  assert.deepEqual(lengths(CHUNK + 1), [CHUNK, 1]);
  assert.deepEqual(lengths(2 * CHUNK, 100), [CHUNK, CHUNK, 0]);
  const data = Uint8Array.from({ length: 3 * CHUNK + 5 }, (_, i) => i & 0xff);
  const parts = [data.subarray(0, 10), data.subarray(10, 70000), data.subarray(70000)];
  const joined = cutChunks(parts);
  assert.deepEqual(Uint8Array.from(joined.flatMap((c) => [...c])), data);
});

for (const protocol of RUNTIME_PROTOCOLS) {
  describe(protocol, () => {
    test("messages of every size round-trip; length = L + 16 per chunk", () => {
      const { device, edge } = handshake(protocol);
      for (const size of [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 200_000]) {
        const plaintext = Uint8Array.from({ length: size }, (_, i) => (i * 7) & 0xff);
        const ciphertext = device.encrypt(plaintext);
        assert.equal(ciphertext.length, size + TAG * (Math.floor(size / CHUNK) + 1));
        assert.deepEqual(edge.decrypt(ciphertext), plaintext);
        assert.deepEqual(device.decrypt(edge.encrypt(plaintext)), plaintext);
      }
      assert.equal(device.messagesSent, 7);
      assert.equal(edge.sendNonce, device.recvNonce);
    });

    test("every tampering is an opaque AuthenticationFailed that kills the transport", () => {
      const cases: Array<[string, (t: { device: Transport; edge: Transport }) => Uint8Array]> = [
        ["flipped bit", ({ device }) => {
          const c = device.encrypt(Uint8Array.of(1, 2, 3));
          c[0]! ^= 1;
          return c;
        }],
        ["empty", () => new Uint8Array(0)],
        ["shorter than a tag", () => new Uint8Array(TAG - 1)],
        ["final piece of exactly 65535 bytes (trailing chunk dropped)", ({ device }) =>
          device.encrypt(new Uint8Array(CHUNK)).subarray(0, MAX_MESSAGE)],
        ["two messages glued together", ({ device }) => {
          const a = device.encrypt(Uint8Array.of(1));
          const b = device.encrypt(Uint8Array.of(2));
          const glued = new Uint8Array(a.length + b.length);
          glued.set(a);
          glued.set(b, a.length);
          return glued;
        }],
        ["reordered", ({ device }) => {
          device.encrypt(Uint8Array.of(1));
          return device.encrypt(Uint8Array.of(2));
        }],
      ];
      for (const [name, make] of cases) {
        const pair = handshake(protocol);
        const bad = make(pair);
        assert.throws(() => pair.edge.decrypt(bad), (e: unknown) =>
          e instanceof AuthenticationFailed && e.message === "authentication failed", name);
        assert.ok(pair.edge.dead, name);
        assert.throws(() => pair.edge.decrypt(bad), LocalProtocolError, name);
        assert.throws(() => pair.edge.encrypt(Uint8Array.of(1)), LocalProtocolError, name);
      }
    });

    test("a replayed message fails", () => {
      const { device, edge } = handshake(protocol);
      const c = device.encrypt(Uint8Array.of(5));
      edge.decrypt(c);
      assert.throws(() => edge.decrypt(c), AuthenticationFailed);
    });

    test("rekey after rekeyBytes, on both sides at the same message, nonce kept", () => {
      const { device, edge } = handshake(protocol, { rekeyBytes: 100 });
      for (let i = 0; i < 5; i++) {
        const m = new Uint8Array(60).fill(i);
        assert.deepEqual(edge.decrypt(device.encrypt(m)), m);
      }
      assert.equal(device.sendNonce, 5n);
      // The same traffic without rekeying stops decrypting at the third message.
      const plain = handshake(protocol);
      const rekeyed = handshake(protocol, { rekeyMessages: 2 });
      rekeyed.device.encrypt(new Uint8Array(1));
      rekeyed.device.encrypt(new Uint8Array(1));
      const third = rekeyed.device.encrypt(new Uint8Array(1));
      assert.equal(third.length, 17);
      assert.throws(() => plain.edge.decrypt(third), AuthenticationFailed);
    });

    test("nonce 2^64-1 is reserved", () => {
      const cs = new CipherState(protocol.includes("AESGCM") ? "AESGCM" : "ChaChaPoly", new Uint8Array(32));
      cs.n = 2n ** 64n - 2n;
      cs.encryptWithAd(new Uint8Array(0), Uint8Array.of(1));
      assert.throws(() => cs.encryptWithAd(new Uint8Array(0), Uint8Array.of(1)), LocalProtocolError);
      assert.throws(() => cs.decryptWithAd(new Uint8Array(0), new Uint8Array(17)), LocalProtocolError);
    });

    test("handshake failures are opaque and kill the state; turns and split are enforced", () => {
      const server = KeyPair.generate();
      const wrong = KeyPair.generate();
      const initiator = new HandshakeState(protocol, { initiator: true, s: KeyPair.generate(), rs: wrong.public });
      const responder = new HandshakeState(protocol, { initiator: false, s: server });
      const m1 = initiator.writeMessage();
      assert.throws(() => responder.readMessage(m1), AuthenticationFailed);
      assert.throws(() => responder.readMessage(m1), LocalProtocolError);
      assert.throws(() => initiator.writeMessage(), LocalProtocolError); // not its turn

      // A low-order ephemeral (all zeros) fails before any payload is read.
      const r2 = new HandshakeState(protocol, { initiator: false, s: server });
      const i2 = new HandshakeState(protocol, { initiator: true, s: KeyPair.generate(), rs: server.public });
      const good = i2.writeMessage();
      const lowOrder = good.slice();
      lowOrder.fill(0, 0, 32);
      assert.throws(() => r2.readMessage(lowOrder), AuthenticationFailed);
      assert.throws(() => r2.readMessage(new Uint8Array(10)), LocalProtocolError);

      const { initiator: done } = handshake(protocol);
      assert.throws(() => done.split(), LocalProtocolError); // handed out once, by transport()
      assert.throws(() => new HandshakeState(protocol, { initiator: true, s: server }), UsageError);
      assert.throws(() => new HandshakeState(protocol, { initiator: false, s: server, rs: server.public }), UsageError);
      assert.throws(() => new HandshakeState("Noise_XX_25519_ChaChaPoly_BLAKE2s", { initiator: false, s: server }), UsageError);
    });

    test("fresh ephemeral keys per handshake by default", () => {
      const server = KeyPair.generate();
      const a = new HandshakeState(protocol, { initiator: true, s: server, rs: server.public }).writeMessage();
      const b = new HandshakeState(protocol, { initiator: true, s: server, rs: server.public }).writeMessage();
      assert.notDeepEqual(a.subarray(0, 32), b.subarray(0, 32));
    });
  });
}
