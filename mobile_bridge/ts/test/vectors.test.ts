/**
 * Conformance with the golden vectors (mobile_bridge/README.md, "Using them in a port"), for both
 * runtime suites: keys, prologue, both handshake roles, mac1, the whole transport list through
 * ClientConnection, rekey, the refused handshake, generation sessions and load reports (§14).
 */

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { decode as referenceDecode } from "@msgpack/msgpack";
import { sha256 } from "@noble/hashes/sha2.js";

import {
  ClientConnection,
  MAX_HELLO_BYTES,
  MAX_RETRY_MS,
  PROLOGUE_PREFIX,
  mac1,
  mac1Key,
  prologue,
  tai64n,
  verifyMac1,
} from "../src/connection.js";
import { AuthenticationFailed, VersionMismatch } from "../src/errors.js";
import { decodePublic, encodePublic, fingerprint } from "../src/keys.js";
import { CHUNK, HandshakeState, MAX_MESSAGE, TAG, type Transport } from "../src/noise.js";
import { StrictMap, pack, unpack, type Value } from "../src/wire.js";
import {
  IDENTITY,
  VECTORS,
  SUITES,
  connect,
  eventAsMessage,
  exactTimeNs,
  hex,
  keyPairs,
  makeClient,
  plain,
  rebuild,
  responderAfterHello,
  sendRecorded,
  toHex,
  type Json,
} from "./helpers.js";

const utf8 = new TextEncoder();

test("the vectors cover both runtime suites and state the shared constants", () => {
  assert.deepEqual(
    SUITES.map((s) => s.protocol_name),
    ["Noise_IK_25519_ChaChaPoly_BLAKE2s", "Noise_IK_25519_AESGCM_SHA256"],
  );
  assert.equal(VECTORS.protocol_version, 1);
  assert.equal(toHex(PROLOGUE_PREFIX), VECTORS.prologue_prefix_hex);
  assert.equal(MAX_HELLO_BYTES, VECTORS.max_hello_bytes);
  assert.equal(MAX_RETRY_MS, VECTORS.max_retry_ms);
  assert.equal(toHex(tai64n(exactTimeNs())), VECTORS.tai64n_hex);
  assert.equal(Number(exactTimeNs()), VECTORS.time_ns); // the JSON number, rounded alike
  assert.equal(toHex(tai64n(1767225600123456789n)), "400000006955b900075bcd15"); // §5.3 example
});

/** One recorded transport list replayed through a ClientConnection and the server's transport. */
function replay(client: ClientConnection, server: Transport, entries: Json[], session?: bigint): Json[] {
  const events: Json[] = [];
  for (const entry of entries) {
    const what = `${entry.direction} ${entry.type} (${entry.note})`;
    const clientTransport = client.transport!;
    const long = !("plaintext_hex" in entry);
    assert.equal(entry.chunks, Math.floor(entry.plaintext_len / CHUNK) + 1, what);
    assert.equal(entry.ciphertext_len, entry.plaintext_len + TAG * entry.chunks, what);
    let ciphertext: Uint8Array;
    let plaintext: Uint8Array;
    if (entry.direction === "client->server") {
      assert.equal(clientTransport.sendNonce, BigInt(entry.nonce), what);
      sendRecorded(client, entry.message, session);
      const frames = client.dataToSend();
      assert.equal(frames.length, 1, what);
      ciphertext = frames[0]!;
      plaintext = server.decrypt(ciphertext);
      assert.equal(clientTransport.sendNonce, BigInt(entry.nonce + entry.chunks), what);
      // The device's plaintext read back strictly is the recorded message.
      assert.deepEqual(plain(unpack(plaintext, { maxBin: 1 << 26 })), plain(rebuild(entry.message)), what);
    } else {
      assert.equal(clientTransport.recvNonce, BigInt(entry.nonce), what);
      plaintext = long ? pack(rebuild(entry.message)) : hex(entry.plaintext_hex);
      ciphertext = server.encrypt(plaintext);
      const [event, ...rest] = client.receive(ciphertext);
      assert.equal(rest.length, 0, what);
      assert.equal(clientTransport.recvNonce, BigInt(entry.nonce + entry.chunks), what);
      assert.deepEqual(eventAsMessage(event!), plain(rebuild(entry.message)), what);
      events.push(event);
    }
    assert.equal(plaintext.length, entry.plaintext_len, what);
    assert.equal(ciphertext.length, entry.ciphertext_len, what);
    if (long) {
      assert.ok(toHex(plaintext).startsWith(entry.plaintext_head_hex), what);
      assert.equal(toHex(sha256(plaintext)), entry.plaintext_sha256, what);
      assert.equal(toHex(sha256(ciphertext)), entry.ciphertext_sha256, what);
      const pieces: number[] = [];
      for (let at = 0; at < ciphertext.length; at += MAX_MESSAGE) {
        pieces.push(Math.min(MAX_MESSAGE, ciphertext.length - at));
      }
      assert.deepEqual(pieces, entry.ciphertext_chunk_lens, what);
    } else {
      assert.equal(toHex(plaintext), entry.plaintext_hex, what);
      assert.equal(toHex(ciphertext), entry.ciphertext_hex, what);
      // Cross-check the strict decoder against @msgpack/msgpack on the same bytes.
      assert.deepEqual(
        plain(referenceDecode(plaintext, { useBigInt64: true })),
        plain(unpack(plaintext, { maxBin: 1 << 26 })),
        what,
      );
    }
  }
  return events;
}

for (const suite of SUITES) {
  describe(suite.protocol_name, () => {
    const k = keyPairs(suite);
    const hs = suite.handshake;

    test("key pairs, text forms and fingerprints derive from the private keys", () => {
      for (const key of Object.values<Json>(suite.keys)) {
        const label = utf8.encode("edgeoffload protocol-v1 golden vector: " + key.label);
        assert.equal(toHex(sha256(label)), key.private);
      }
      for (const [name, pair] of Object.entries(k)) {
        const key = suite.keys[name];
        assert.equal(toHex(pair.public), key.public, name);
        assert.equal(encodePublic(pair.public), key.text, name);
        assert.equal(fingerprint(pair.public), key.fingerprint, name);
        assert.equal(pair.fingerprint, key.fingerprint, name);
        assert.deepEqual(decodePublic(key.text), pair.public, name);
        assert.deepEqual(decodePublic(key.public), pair.public, name);
      }
    });

    test("prologue", () => {
      assert.equal(toHex(prologue(suite.protocol_name, IDENTITY)), suite.prologue_hex);
    });

    test("responder: reads message 1, recovers the hello and the device key, writes message 2", () => {
      const envelope = unpack(hex(hs.message1.envelope_hex), { maxBin: 4096 });
      assert.deepEqual([...envelope.keys()], ["v", "proto", "bundle", "noise", "mac1"]);
      assert.deepEqual(plain(envelope), hs.message1.envelope);
      const { responder, hello } = responderAfterHello(suite, hs);
      assert.equal(toHex(hello), hs.message1.payload_hex);
      assert.deepEqual(plain(unpack(hello, { maxBin: 64 })), hs.message1.payload);
      assert.deepEqual(responder.remoteStatic, k.client_static!.public);
      const noise2 = responder.writeMessage(hex(hs.message2.payload_hex));
      assert.equal(toHex(noise2), hs.message2.noise_hex);
      assert.equal(noise2.length, hs.message2.noise_len);
      const envelope2 = pack(new Map<string, Value>([["v", 1], ["noise", noise2]]));
      assert.equal(toHex(envelope2), hs.message2.envelope_hex);
      assert.equal(toHex(responder.handshakeHash), hs.handshake_hash_hex);
    });

    test("initiator: ClientConnection writes message 1 (with mac1) and reads message 2", () => {
      const client = makeClient(suite);
      assert.equal(client.state, "idle");
      client.start();
      assert.equal(client.state, "handshake-sent");
      const [frame, ...rest] = client.dataToSend();
      assert.equal(rest.length, 0);
      assert.equal(toHex(frame!), hs.message1.envelope_hex);
      assert.ok(frame!.length <= MAX_HELLO_BYTES);
      assert.equal(hs.message1.noise_len, 32 + 48 + hex(hs.message1.payload_hex).length + 16);
      const [event, ...more] = client.receive(hex(hs.message2.envelope_hex));
      assert.equal(more.length, 0);
      assert.equal(client.state, "ready");
      assert.deepEqual(event, {
        kind: "handshake_complete",
        peerPublic: k.server_static!.public,
        bundle: IDENTITY,
        version: hs.message2.payload.version,
        info: { maxMessage: hs.message2.payload.max_message, agent: hs.message2.payload.agent },
      });
      assert.equal(client.peerMaxMessage, 1048576);
      assert.deepEqual(client.features, []);
      assert.equal(toHex(client.handshakeHash()), hs.handshake_hash_hex);
    });

    test("mac1: key, input and value; the three rejected hellos do not verify", () => {
      const vector = suite.mac1;
      const serverPublic = k.server_static!.public;
      assert.equal(toHex(mac1Key(serverPublic)), vector.key_hex);
      const envelope = new StrictMap(unpack(hex(hs.message1.envelope_hex), { maxBin: 4096 }), "hello");
      const noise = envelope.get("noise", "bin");
      const pro = prologue(suite.protocol_name, IDENTITY);
      assert.equal(toHex(pro) + toHex(noise), vector.input_hex);
      assert.equal(toHex(mac1(mac1Key(serverPublic), pro, noise)), vector.mac1_hex);
      assert.ok(verifyMac1(serverPublic, suite.protocol_name, IDENTITY, noise, envelope.get("mac1", "bin")));
      assert.equal(vector.rejected.length, 3);
      for (const rejected of vector.rejected) {
        const forged = unpack(hex(rejected.envelope_hex), { maxBin: 4096 });
        assert.deepEqual(forged.get("noise"), noise, rejected.note);
        assert.equal(forged.get("proto"), suite.protocol_name);
        assert.equal(forged.get("bundle"), IDENTITY);
        const ok = verifyMac1(serverPublic, suite.protocol_name, IDENTITY, noise, forged.get("mac1"));
        assert.equal(ok, false, rejected.note);
        assert.equal(rejected.close_code, 4401);
      }
      assert.equal(vector.rejected[2].note, "no mac1 field");
      assert.equal(unpack(hex(vector.rejected[2].envelope_hex), { maxBin: 4096 }).has("mac1"), false);
      // The other-server case verifies under the other key: it is a real mac1, just not ours.
      const other = hex(/public key ([0-9a-f]{64})/.exec(vector.rejected[1].note)![1]!);
      const otherTag = unpack(hex(vector.rejected[1].envelope_hex), { maxBin: 4096 }).get("mac1");
      assert.ok(verifyMac1(other, suite.protocol_name, IDENTITY, noise, otherTag));
    });

    test("transport: the whole list, in order, through ClientConnection", () => {
      const { client, server } = connect(suite);
      assert.deepEqual(
        suite.transport.map((e: Json) => e.type),
        ["run", "run", "result", "error", "ping", "pong", "ping", "pong", "run", "result", "close"],
      );
      const events = replay(client, server, suite.transport);
      const error = events.find((e) => e.kind === "error");
      assert.deepEqual(error, {
        kind: "error",
        requestId: 2,
        code: "overloaded",
        message: "4 requests in flight",
        retryMs: 250,
      });
      assert.equal(client.state, "closed");
    });

    test("rekey: the third message is under REKEY(k) with rekeyMessages = 2", () => {
      const rekey = suite.rekey;
      assert.equal(rekey.rekey_messages, 2);
      // A fresh session of the recorded handshake, run with bare Noise states on both sides.
      const { responder, hello } = responderAfterHello(suite, hs);
      const initiator = new HandshakeState(suite.protocol_name, {
        initiator: true,
        prologue: hex(suite.prologue_hex),
        s: k.client_static!,
        e: k.client_ephemeral!,
        rs: k.server_static!.public,
      });
      assert.equal(toHex(initiator.writeMessage(hello)), hs.message1.noise_hex);
      initiator.readMessage(responder.writeMessage(hex(hs.message2.payload_hex)));
      const sender = initiator.transport({ rekeyMessages: 2 });
      const receiver = responder.transport({ rekeyMessages: 2 });
      for (const entry of rekey.messages) {
        assert.equal(sender.sendNonce, BigInt(entry.nonce));
        assert.equal(toHex(sender.encrypt(hex(entry.plaintext_hex))), entry.ciphertext_hex);
        assert.equal(toHex(receiver.decrypt(hex(entry.ciphertext_hex))), entry.plaintext_hex);
      }
      // By hand, as tests/test_golden.py: without the rekey the third would not decrypt.
      const { responder: again } = responderAfterHello(suite, hs);
      again.writeMessage(hex(hs.message2.payload_hex));
      const [toServer] = again.split();
      const none = new Uint8Array(0);
      for (const entry of rekey.messages.slice(0, 2)) toServer.decryptWithAd(none, hex(entry.ciphertext_hex));
      const third = hex(rekey.messages[2].ciphertext_hex);
      assert.throws(() => toServer.decryptWithAd(none, third), AuthenticationFailed);
      toServer.rekey();
      assert.equal(toHex(toServer.decryptWithAd(none, third)), rekey.messages[2].plaintext_hex);
    });

    test("refused handshake: version_mismatch raises VersionMismatch and closes", () => {
      const refused = suite.refused_handshake;
      const client = makeClient(suite, { version: "0000000000000000" });
      client.start();
      assert.equal(toHex(client.dataToSend()[0]!), refused.message1.envelope_hex);
      const { responder, hello } = responderAfterHello(suite, refused);
      assert.equal(toHex(hello), refused.message1.payload_hex);
      assert.equal(toHex(responder.writeMessage(hex(refused.message2.payload_hex))), refused.message2.noise_hex);
      assert.throws(
        () => client.receive(hex(refused.message2.envelope_hex)),
        (exc: unknown) =>
          exc instanceof VersionMismatch && exc.message.includes("the server has version 72ebae2906b7fd4e"),
      );
      assert.equal(client.state, "closed");
    });

    test("sessions: open/opened, two-chunk prefill, token, step, end/ended, session_lost", () => {
      const sessions = suite.sessions;
      const session = BigInt("0x" + sessions.session_id_hex);
      assert.equal(Number(session), sessions.session_id);
      const { client, server } = connect(suite);
      const events = replay(client, server, sessions.messages, session);
      assert.deepEqual(
        events.map((e) => e.kind),
        ["opened", "token", "token", "ended", "error"],
      );
      assert.equal(events[0].session, session); // a bigint, exact
      assert.equal(typeof events[0].session, "bigint");
      assert.deepEqual(
        [events[1].pos, events[1].token, events[2].pos, events[2].token],
        [3, 42, 4, 7],
      );
      assert.equal(events[4].code, "session_lost");
      assert.equal(events[4].requestId, 24);
      assert.equal(client.state, "ready");
    });

    test("load (§14): features asked and granted, result with a load map, status", () => {
      const load = suite.load;
      const client = makeClient(suite, { features: ["load", "x-unknown"] });
      client.start();
      assert.equal(toHex(client.dataToSend()[0]!), load.message1.envelope_hex);
      client.receive(hex(load.message2.envelope_hex));
      assert.deepEqual(client.features, ["load"]);
      const { client: c, server, events: hsEvents } = connect(suite, load, { features: ["load", "x-unknown"] });
      assert.equal(hsEvents[0]!.kind, "handshake_complete");
      const events = replay(c, server, load.messages);
      assert.deepEqual(events[0].load, {
        inflight: 3,
        queued: 1,
        workers: 2,
        kvFree: 1073741824,
        draining: false,
        tailMs: 12.25,
      });
      assert.equal(events[1].kind, "status");
      assert.deepEqual(events[1].bundles, [{ identity: IDENTITY, version: "72ebae2906b7fd4e", inflight: 0 }]);
      assert.equal(events[1].load.draining, true);
      assert.equal("tailMs" in events[1].load, false);
    });
  });
}
