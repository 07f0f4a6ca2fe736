/**
 * EdgeClient's policy against a scripted edge server on 127.0.0.1: a real `ws` server speaking
 * the real Noise IK responder and transport (noise.ts), whose answers each test scripts —
 * overloaded with retry_ms, silence, a reply under the wrong id, a payload error, a 4401 close,
 * a dropped connection. What is under test is the client: retries with the same id, increasing
 * ids across reconnections, timeouts, the fallback and which errors it never hides. (The real
 * Python server is exercised from tests/test_ts_client.py.)
 */

import assert from "node:assert/strict";
import type { AddressInfo } from "node:net";
import { after, test } from "node:test";

import { WebSocketServer, WebSocket as NodeWebSocket } from "ws";

import { parseManifest, type Bundle } from "../src/bundle.js";
import { EdgeClient, type EdgeClientOptions } from "../src/client.js";
import { prologue } from "../src/connection.js";
import {
  AuthenticationFailed,
  OffloadUnavailable,
  PayloadError,
  UsageError,
  VersionMismatch,
} from "../src/errors.js";
import { KeyPair } from "../src/keys.js";
import type { WebSocketLike } from "../src/link.js";
import { DEFAULT_PROTOCOL, HandshakeState, type Transport } from "../src/noise.js";
import type { ModelRunner } from "../src/runner.js";
import { decodeTensors, encodeTensors } from "../src/tensormap.js";
import type { RawTensor } from "../src/types.js";
import { Float64, pack, unpack, type Encodable, type WireMap } from "../src/wire.js";

const SERVER = KeyPair.fromPrivate(new Uint8Array(32).fill(7));
const DEVICE = KeyPair.fromPrivate(new Uint8Array(32).fill(9));

/** An all-remote bundle: x float32[1, 4] crosses as given, the tail answers y. */
const MANIFEST = parseManifest({
  schema_version: 1,
  source: { name: "probe", sha256: "ab".repeat(32) },
  dims: {},
  cut: { id: "c0", after: "" },
  crossing: [{ name: "x", dtype: "float32", shape: [1, 4] }],
  passthrough: ["x"],
  graph_inputs: [{ name: "x", dtype: "float32", shape: [1, 4] }],
  graph_outputs: [{ name: "y", dtype: "float32", shape: [1, 4] }],
  head: null,
  tail: {
    file: "tail.onnx",
    sha256: "cd".repeat(32),
    inputs: [{ name: "x", dtype: "float32", shape: [1, 4] }],
    outputs: [{ name: "y", dtype: "float32", shape: [1, 4] }],
  },
  codec: "none",
});
const BUNDLE: Bundle = { manifest: MANIFEST, headFormat: null, head: null, tail: null };

const X: RawTensor = { dtype: "float32", shape: [1, 4], bytes: new Uint8Array(new Float32Array([1, -2, 3, -4]).buffer) };

/** The tail's answer, computed the same way by the scripted server and the local fallback. */
function negate(x: RawTensor): RawTensor {
  const v = new Float32Array(x.bytes.slice().buffer).map((a) => -a);
  return { dtype: "float32", shape: x.shape, bytes: new Uint8Array(v.buffer) };
}

type Reply = (body: Record<string, Encodable>) => void;
interface Script {
  /** Called for every request; answer with `reply`, or not at all. */
  onRequest(msg: WireMap, reply: Reply, ws: NodeWebSocket, connection: number): void;
}

/** A ws server on 127.0.0.1 that accepts the hello of DEVICE for MANIFEST and runs `script`. */
async function scriptedServer(script: Script): Promise<{ url: string; seen: number[][]; close(): Promise<void> }> {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise<void>((resolve) => wss.once("listening", () => resolve()));
  const seen: number[][] = []; // request ids per connection
  wss.on("connection", (ws) => {
    const connection = seen.length;
    seen.push([]);
    let transport: Transport | null = null;
    ws.on("message", (data: Buffer) => {
      const bytes = new Uint8Array(data);
      if (transport === null) {
        const envelope = unpack(bytes, { maxBin: 4096 });
        const hs = new HandshakeState(DEFAULT_PROTOCOL, {
          initiator: false,
          prologue: prologue(DEFAULT_PROTOCOL, MANIFEST.identity),
          s: SERVER,
        });
        try {
          hs.readMessage(envelope.get("noise") as Uint8Array);
        } catch {
          ws.close(4401); // as the real server: opaque refusal of a hello it cannot read
          return;
        }
        const welcome = { ok: true, max_message: 1 << 20, agent: "scripted/1", version: MANIFEST.version };
        ws.send(pack({ v: 1, noise: hs.writeMessage(pack(welcome)) }));
        transport = hs.transport();
        return;
      }
      const t = transport;
      const msg = unpack(t.decrypt(bytes), { maxBin: 1 << 20 });
      if (msg.get("t") === "close") return;
      seen[connection]!.push(Number(msg.get("id")));
      script.onRequest(msg, (body) => ws.send(t.encrypt(pack(body))), ws, connection);
    });
  });
  const { port } = wss.address() as AddressInfo;
  return {
    url: `ws://127.0.0.1:${port}`,
    seen,
    close: () =>
      new Promise<void>((resolve) => {
        for (const c of wss.clients) c.terminate();
        wss.close(() => resolve());
      }),
  };
}

/** A result for `msg` computed by the scripted tail (negation). */
function answer(msg: WireMap, id: number = Number(msg.get("id"))): Record<string, Encodable> {
  const [, x] = decodeTensors(msg.get("tensors")!, "run")[0]!;
  const y = negate({ dtype: x.dtype, shape: x.shape, bytes: x.data });
  return {
    t: "result",
    id,
    tensors: encodeTensors([["y", { dtype: "float32", shape: y.shape, codec: "none", data: y.bytes, scales: new Uint8Array() }]]),
    server_ms: new Float64(0.25),
  };
}

const localTail: ModelRunner = {
  run: async (inputs) => ({ y: negate(inputs.x!) }),
  release: async () => undefined,
};

function client(url: string, extra: Partial<EdgeClientOptions> = {}): EdgeClient {
  return new EdgeClient({
    bundle: BUNDLE,
    identity: DEVICE,
    server: url,
    serverKey: SERVER.public,
    webSocket: (u) => new NodeWebSocket(u, { perMessageDeflate: false }) as unknown as WebSocketLike,
    tail: async () => localTail,
    fallback: "error",
    timeoutMs: 3000,
    connectTimeoutMs: 2000,
    random: () => 0.5,
    ...extra,
  });
}

const servers: Array<{ close(): Promise<void> }> = [];
after(async () => {
  await Promise.all(servers.map((s) => s.close()));
});

function floats(t: RawTensor): number[] {
  return Array.from(new Float32Array(t.bytes.slice().buffer));
}

test("a request is answered by the server's tail", async () => {
  const server = await scriptedServer({ onRequest: (msg, reply) => reply(answer(msg)) });
  servers.push(server);
  const c = client(server.url);
  const out = await c.run({ x: X });
  assert.deepEqual(floats(out.y!), [-1, 2, -3, 4]);
  assert.equal(c.lastTiming!.offloaded, true);
  assert.equal(c.lastTiming!.serverMs, 0.25);
  assert.ok(c.lastTiming!.wireBytes > 16);
  c.close();
});

test("overloaded with retry_ms is retried with the same id until admitted", async () => {
  let refusals = 0;
  const server = await scriptedServer({
    onRequest: (msg, reply) => {
      if (refusals++ < 2) reply({ t: "error", id: msg.get("id")!, code: "overloaded", message: "full", retry_ms: 20 });
      else reply(answer(msg));
    },
  });
  servers.push(server);
  const c = client(server.url);
  const out = await c.run({ x: X });
  assert.deepEqual(floats(out.y!), [-1, 2, -3, 4]);
  assert.deepEqual(server.seen, [[1, 1, 1]]); // one id, three tries, one connection
  assert.equal(c.lastTiming!.attempts, 3);
  await c.run({ x: X });
  assert.deepEqual(server.seen, [[1, 1, 1, 2]]);
  c.close();
});

test("request ids keep increasing across reconnections", async () => {
  const server = await scriptedServer({
    onRequest: (msg, reply, ws) => {
      reply(answer(msg));
      ws.close(1000); // every connection serves one request
    },
  });
  servers.push(server);
  const c = client(server.url);
  for (let i = 0; i < 3; i++) {
    await c.run({ x: X });
    await new Promise((r) => setTimeout(r, 30)); // let the close arrive
  }
  assert.deepEqual(server.seen, [[1], [2], [3]]);
  c.close();
});

test("silence times out; the local tail answers only when the fallback is local", async () => {
  const server = await scriptedServer({ onRequest: () => undefined });
  servers.push(server);
  const strict = client(server.url, { timeoutMs: 300 });
  await assert.rejects(strict.run({ x: X }), (e: unknown) => e instanceof OffloadUnavailable && /no answer/.test(e.message));
  const lenient = client(server.url, { timeoutMs: 300, fallback: "local" });
  const out = await lenient.run({ x: X });
  assert.deepEqual(floats(out.y!), [-1, 2, -3, 4]);
  assert.equal(lenient.lastTiming!.offloaded, false);
  assert.match(lenient.lastTiming!.fallbackReason, /no answer/);
  strict.close();
  lenient.close();
});

test("a reply under an id never asked for drops the connection", async () => {
  const server = await scriptedServer({ onRequest: (msg, reply) => reply(answer(msg, Number(msg.get("id")) + 100)) });
  servers.push(server);
  const c = client(server.url);
  await assert.rejects(c.run({ x: X }), (e: unknown) => e instanceof OffloadUnavailable && /not a request/.test(e.message));
  assert.equal(c.link.connected, false);
  c.close();
});

test("refusals of what was sent, and of who sent it, are never hidden by the fallback", async () => {
  const server = await scriptedServer({
    onRequest: (msg, reply, ws, connection) => {
      if (connection === 0) reply({ t: "error", id: msg.get("id")!, code: "payload", message: "bad x" });
      else if (connection === 1) ws.close(4401);
      else reply({ t: "error", id: msg.get("id")!, code: "version_mismatch", message: "not hosted" });
    },
  });
  servers.push(server);
  const c = client(server.url, { fallback: "local" });
  await assert.rejects(c.run({ x: X }), PayloadError);
  c.link.drop(); // the next request opens connection 1
  await assert.rejects(c.run({ x: X }), AuthenticationFailed);
  await assert.rejects(c.run({ x: X }), VersionMismatch);
  c.close();
});

test("a wrong pinned server key fails the handshake with AuthenticationFailed", async () => {
  const server = await scriptedServer({ onRequest: (msg, reply) => reply(answer(msg)) });
  servers.push(server);
  const c = client(server.url, { serverKey: KeyPair.fromPrivate(new Uint8Array(32).fill(3)).public, fallback: "local" });
  // The responder cannot read a hello sealed to another key: 4401, never the fallback.
  await assert.rejects(c.run({ x: X }), AuthenticationFailed);
  c.close();
});

test("inputs are checked against the bundle before anything runs", async () => {
  const c = client("ws://127.0.0.1:9");
  await assert.rejects(c.run({ x: { ...X, shape: [1, 5] } }), UsageError);
  await assert.rejects(c.run({ z: X }), UsageError);
  assert.throws(() => client("http://127.0.0.1:9"), UsageError);
});
