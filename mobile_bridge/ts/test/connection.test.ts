/**
 * ClientConnection's checks beyond the vectors (connection.py's rules): state, decryption
 * failure, strict messages, retry_ms, features and load reports, tensor structure, limits.
 * Server messages are written with the vectors' handshake and the server's real transport.
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  ClientConnection,
  errorToException,
  tai64n,
  type ErrorEvent,
  type Event,
} from "../src/connection.js";
import {
  AuthenticationFailed,
  LocalProtocolError,
  Overloaded,
  PayloadError,
  RemoteProtocolError,
  ServerBusy,
  SessionError,
  SessionLost,
  UsageError,
  VersionMismatch,
} from "../src/errors.js";
import { KeyPair, toHex } from "../src/keys.js";
import type { Transport } from "../src/noise.js";
import type { EncodedTensor } from "../src/types.js";
import { Float64, pack, unpack, type Encodable, type Value } from "../src/wire.js";
import { IDENTITY, SUITES, VERSION, connect, exactTimeNs, hex, keyPairs, makeClient, responderAfterHello } from "./helpers.js";

const suite = SUITES[0];

function ready(opts: { features?: string[] } = {}) {
  const hs = opts.features ? suite.load : suite.handshake;
  return connect(suite, hs, opts);
}

/** What the client makes of one server message. */
function deliver(client: ClientConnection, server: Transport, message: Encodable): Event[] {
  return client.receive(server.encrypt(pack(message)));
}

const tensor = (over: Record<string, Encodable | undefined> = {}) => ({
  name: "y",
  dtype: "float32",
  shape: [1],
  codec: "none",
  data: new Uint8Array(4),
  ...over,
});

const load = (over: Record<string, Encodable | undefined> = {}) => ({
  inflight: 1,
  queued: 0,
  workers: 1,
  kv_free: 10,
  draining: false,
  ...over,
});

test("a tampered ciphertext is AuthenticationFailed and closes the connection", () => {
  const { client, server } = ready();
  const c = server.encrypt(pack({ t: "pong", id: 1, pad: new Uint8Array(0) }));
  c[c.length - 1]! ^= 0x80;
  assert.throws(() => client.receive(c), AuthenticationFailed);
  assert.equal(client.state, "closed");
  assert.throws(() => client.receive(c), LocalProtocolError);
  assert.throws(() => client.sendPing(2), LocalProtocolError);
});

test("a ciphertext longer than this side's max_message is a protocol error", () => {
  const client = makeClient(suite, { maxMessage: 100 });
  client.start();
  client.dataToSend();
  const { responder } = responderAfterHello(suite, suite.handshake);
  client.receive(pack({ v: 1, noise: responder.writeMessage(hex(suite.handshake.message2.payload_hex)) }));
  const server = responder.transport();
  assert.throws(() => deliver(client, server, { t: "pong", id: 1, pad: new Uint8Array(200) }), RemoteProtocolError);
  assert.equal(client.state, "ready");
  // The announced server limit is the peer's, ours stays 100 (connection.py keeps its own).
  assert.equal(client.peerMaxMessage, 1048576);
  assert.equal(client.maxMessage, 100);
});

test("malformed server messages are RemoteProtocolError, the state stays", () => {
  const cases: Array<[string, Encodable]> = [
    ["unknown type", { t: "surprise", id: 1 }],
    ["unknown field", { t: "pong", id: 1, pad: new Uint8Array(0), extra: 1 }],
    ["missing field", { t: "pong", id: 1 }],
    ["bool id", { t: "pong", id: true, pad: new Uint8Array(0) }],
    ["float id", { t: "pong", id: 1.5, pad: new Uint8Array(0) }],
    ["negative id", { t: "pong", id: -1, pad: new Uint8Array(0) }],
    ["id beyond 2^63-1", { t: "pong", id: 2n ** 63n, pad: new Uint8Array(0) }],
    ["str pad", { t: "pong", id: 1, pad: "x" }],
    ["retry_ms with another code", { t: "error", code: "timeout", message: "m", id: 1, retry_ms: 5 }],
    ["retry_ms too large", { t: "error", code: "overloaded", message: "m", retry_ms: 60001 }],
    ["retry_ms float", { t: "error", code: "overloaded", message: "m", retry_ms: new Float64(5) }],
    ["negative error id", { t: "error", code: "internal", message: "m", id: -3 }],
    ["server_ms negative", { t: "result", id: 1, tensors: [], server_ms: -1 }],
    ["server_ms bool", { t: "result", id: 1, tensors: [], server_ms: true }],
    ["tensors not a list", { t: "result", id: 1, tensors: {}, server_ms: 1 }],
    ["tensor with an unknown field", { t: "result", id: 1, tensors: [tensor({ extra: 1 })], server_ms: 1 }],
    ["tensor data as str", { t: "result", id: 1, tensors: [tensor({ data: "x" })], server_ms: 1 }],
    ["load without the feature", { t: "result", id: 1, tensors: [], server_ms: 1, load: load() }],
    ["status without the feature", { t: "status", id: 1, load: load(), bundles: [] }],
    ["opened session negative", { t: "opened", id: 1, session: -1, max_tokens: 4 }],
    ["token pos beyond a JS number", { t: "token", id: 1, session: 5n, pos: 2n ** 60n, token: 1, server_ms: 1 }],
  ];
  for (const [name, message] of cases) {
    const { client, server } = ready();
    assert.throws(() => deliver(client, server, message), RemoteProtocolError, name);
    assert.equal(client.state, "ready", name);
  }
});

test("tensors that lie about their structure are PayloadError (§8.4 stage 1)", () => {
  const cases: Array<[string, Encodable[]]> = [
    ["duplicate names", [tensor(), tensor()]],
    ["dtype not allowed", [tensor({ dtype: "complex64" })]],
    ["negative dim", [tensor({ shape: [-1] })]],
    ["bool dim", [tensor({ shape: [true] })]],
    ["float dim", [tensor({ shape: [1.5] })]],
    ["33 dims", [tensor({ shape: new Array(33).fill(1) })]],
  ];
  for (const [name, tensors] of cases) {
    const { client, server } = ready();
    assert.throws(() => deliver(client, server, { t: "result", id: 1, tensors, server_ms: 1 }), PayloadError, name);
  }
  const { client, server } = ready();
  const [event] = deliver(client, server, {
    t: "result",
    id: 1,
    tensors: [tensor({ scales: Uint8Array.of(1, 2, 3, 4), shape: [0, 2] })],
    server_ms: 3,
  });
  assert.equal(event!.kind, "result");
  const t = (event as Extract<Event, { kind: "result" }>).tensors[0]![1];
  assert.deepEqual([...t.scales], [1, 2, 3, 4]);
  assert.deepEqual(t.shape, [0, 2]);
});

test("error replies: unknown codes read as internal; the exceptions of the reference", () => {
  const { client, server } = ready();
  const [e1] = deliver(client, server, { t: "error", code: "brand_new", message: "m" });
  assert.deepEqual(e1, { kind: "error", code: "internal", message: "m" });
  const [e2] = deliver(client, server, { t: "error", code: "overloaded", message: "busy", id: 9, retry_ms: 1500 });
  assert.equal(e2!.kind, "error");
  const overloaded = errorToException(e2 as ErrorEvent);
  assert.ok(overloaded instanceof Overloaded && overloaded.retryAfter === 1.5);
  const map: Array<[string, new (...args: never[]) => Error]> = [
    ["payload", PayloadError],
    ["version_mismatch", VersionMismatch],
    ["unknown_bundle", VersionMismatch],
    ["session_lost", SessionLost],
    ["session", SessionError],
    ["timeout", ServerBusy],
    ["shutting_down", ServerBusy],
    ["internal", ServerBusy],
    ["duplicate_id", RemoteProtocolError],
    ["protocol", RemoteProtocolError],
  ];
  for (const [code, cls] of map) {
    assert.ok(errorToException({ kind: "error", code: code as never, message: "m" }) instanceof cls, code);
  }
  assert.ok(!(errorToException({ kind: "error", code: "session", message: "m" }) instanceof SessionLost));
});

test("ids: numbers when safe, bigints above, sent and received alike", () => {
  const { client, server } = ready();
  client.sendPing(2n ** 60n);
  const sent = unpack(server.decrypt(client.dataToSend()[0]!), { maxBin: 100 });
  assert.equal(sent.get("id"), 2n ** 60n);
  const [pong] = deliver(client, server, { t: "pong", id: 2n ** 60n, pad: new Uint8Array(0) });
  assert.deepEqual(pong, { kind: "pong", requestId: 2n ** 60n, payload: new Uint8Array(0) });
  const [small] = deliver(client, server, { t: "pong", id: 7n, pad: new Uint8Array(0) });
  assert.equal((small as { requestId: unknown }).requestId, 7);
  assert.throws(() => client.sendPing(1.5), LocalProtocolError);
  assert.throws(() => client.sendPing(-1), LocalProtocolError);
  assert.throws(() => client.sendPing(2n ** 63n), LocalProtocolError);
  const [opened] = deliver(client, server, { t: "opened", id: 3, session: 12, max_tokens: 8 });
  assert.deepEqual(opened, { kind: "opened", requestId: 3, session: 12n, maxTokens: 8 });
});

test("open writes temperature and top_p as float64, as the reference client", () => {
  const { client, server } = ready();
  client.sendOpen(1, { temperature: 1, top_k: 0, top_p: 1, seed: 2n ** 62n }, 16);
  const sent = unpack(server.decrypt(client.dataToSend()[0]!), { maxBin: 100 });
  const sampling = sent.get("sampling") as Map<string, Value>;
  assert.deepEqual(sampling.get("temperature"), new Float64(1));
  assert.deepEqual(sampling.get("top_p"), new Float64(1));
  assert.equal(sampling.get("top_k"), 0);
  assert.equal(sampling.get("seed"), 2n ** 62n);
});

test("send rules: state, steps of one position, the server's limit", () => {
  const idle = makeClient(suite);
  assert.throws(() => idle.sendPing(1), LocalProtocolError);
  assert.throws(() => idle.receive(new Uint8Array(1)), LocalProtocolError);
  idle.start();
  assert.throws(() => idle.start(), LocalProtocolError);

  const { client } = ready();
  const t: [string, EncodedTensor] = ["x", { dtype: "float32", shape: [1], codec: "none", data: new Uint8Array(4), scales: new Uint8Array(0) }];
  assert.throws(() => client.sendFeed(1, "step", 5n, 1, [{ n: 2, tensors: [t] }]), LocalProtocolError);
  assert.throws(() => client.sendFeed(1, "step", 5n, 1, [{ n: 1, tensors: [t] }, { n: 1, tensors: [t] }]), LocalProtocolError);
  assert.throws(() => client.sendStatus(1), LocalProtocolError); // "load" not negotiated
  const big: [string, EncodedTensor] = ["x", { ...t[1], data: new Uint8Array(1048577) }];
  assert.throws(() => client.sendRun(1, [big]), PayloadError);
  // Under the payload limit but over it once msgpack framing and tags are counted.
  const edge: [string, EncodedTensor] = ["x", { ...t[1], data: new Uint8Array(1048576 - 100) }];
  assert.throws(() => client.sendRun(1, [edge]), PayloadError);
  assert.equal(client.dataToSend().length, 0);
  assert.equal(client.state, "ready");
  client.sendClose("bye");
  assert.equal(client.state, "closed");
  assert.throws(() => client.sendPing(1), LocalProtocolError);
});

test("a close from the server ends the connection", () => {
  const { client, server } = ready();
  assert.deepEqual(deliver(client, server, { t: "close", reason: "later" }), [{ kind: "close", reason: "later" }]);
  assert.equal(client.state, "closed");
});

test("load reports are parsed strictly (§14.2)", () => {
  const bad: Array<[string, Encodable]> = [
    ["queued above inflight", load({ queued: 2 })],
    ["no worker", load({ workers: 0 })],
    ["extra field", load({ extra: 1 })],
    ["negative tail_ms", load({ tail_ms: -1 })],
    ["bool tail_ms", load({ tail_ms: true })],
    ["inflight above 2^31-1", load({ inflight: 2 ** 31, queued: 0 })],
    ["kv_free above 2^62", load({ kv_free: 2n ** 62n + 1n })],
    ["draining as int", load({ draining: 0 })],
  ];
  for (const [name, l] of bad) {
    const { client, server } = ready({ features: ["load", "x-unknown"] });
    assert.throws(
      () => deliver(client, server, { t: "result", id: 1, tensors: [], server_ms: 1, load: l }),
      RemoteProtocolError,
      name,
    );
  }
  const { client, server } = ready({ features: ["load", "x-unknown"] });
  const [ok] = deliver(client, server, { t: "token", id: 1, session: 2, pos: 1, token: 3, server_ms: 1, load: load({ tail_ms: 2 }) });
  assert.deepEqual((ok as { load: unknown }).load, { inflight: 1, queued: 0, workers: 1, kvFree: 10, draining: false, tailMs: 2 });
  assert.throws(
    () => deliver(client, server, { t: "status", id: 1, load: load(), bundles: [{ identity: "", version: "v", inflight: 0 }] }),
    RemoteProtocolError,
  );
  const many = Array.from({ length: 65 }, () => ({ identity: "i", version: "v", inflight: 0 }));
  assert.throws(() => deliver(client, server, { t: "status", id: 1, load: load(), bundles: many }), RemoteProtocolError);
});

test("the welcome is checked strictly", () => {
  const welcome = (payload: Encodable, envelope: Record<string, Encodable> = {}, opts: { features?: string[] } = {}) => {
    const client = makeClient(suite, opts);
    client.start();
    const { responder } = responderAfterHello(suite, opts.features ? suite.load : suite.handshake);
    return () => client.receive(pack({ v: 1, noise: responder.writeMessage(pack(payload)), ...envelope }));
  };
  const base = { ok: true, version: VERSION, max_message: 1 << 20, agent: "a" };
  welcome(base)();
  assert.throws(welcome({ ...base, features: ["load"] }), /did not ask for/); // not asked
  assert.throws(welcome({ ...base, features: ["other"] }, {}, { features: ["load", "x-unknown"] }), RemoteProtocolError);
  assert.throws(welcome({ ...base, extra: 1 }), RemoteProtocolError);
  assert.throws(welcome(base, { v: 2 }), RemoteProtocolError);
  assert.throws(welcome(base, { mac1: new Uint8Array(16) }), RemoteProtocolError);
  assert.throws(welcome({ ok: false, code: "weird", message: "no" }), RemoteProtocolError);
  assert.throws(welcome({ ok: false, code: "unknown_bundle", message: "no" }), VersionMismatch);

  // A client that pinned another server key cannot read the real server's message 2.
  const k = keyPairs(suite);
  const pinnedWrong = new ClientConnection({
    static: k.client_static!,
    serverPublic: KeyPair.generate().public,
    bundle: IDENTITY,
    version: VERSION,
    timeNs: exactTimeNs(),
  });
  pinnedWrong.start();
  assert.throws(() => pinnedWrong.receive(hex(suite.handshake.message2.envelope_hex)), AuthenticationFailed);
  assert.equal(pinnedWrong.state, "handshake-sent");
  assert.throws(() => pinnedWrong.receive(hex(suite.handshake.message2.envelope_hex)), LocalProtocolError);
});

test("tai64n floors negative times as Python's divmod and refuses labels beyond 64 bits", () => {
  assert.equal(toHex(tai64n(-1n)), "3fffffffffffffff3b9ac9ff");
  assert.equal(toHex(tai64n(0n)), "400000000000000000000000");
  assert.throws(() => tai64n(2n ** 64n * 1_000_000_000n), UsageError);
});

test("constructor checks: suite and features", () => {
  const k = keyPairs(suite);
  const base = { static: k.client_static!, serverPublic: k.server_static!.public, bundle: IDENTITY, version: VERSION, timeNs: 1n };
  assert.throws(() => new ClientConnection({ ...base, protocol: "Noise_XX_25519_ChaChaPoly_BLAKE2s" }), LocalProtocolError);
  assert.throws(() => new ClientConnection({ ...base, features: ["load", "load"] }), RemoteProtocolError);
  assert.throws(() => new ClientConnection({ ...base, features: [""] }), RemoteProtocolError);
  const noFeatures = new ClientConnection(base);
  noFeatures.start();
  assert.equal(noFeatures.dataToSend().length, 1);
});
