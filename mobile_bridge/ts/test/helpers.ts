/**
 * Shared by the protocol tests: the golden vectors (mobile_bridge/vectors/protocol-v1.json,
 * described in mobile_bridge/README.md) and small helpers to drive a connection with them.
 * Not a test file itself (node --test runs it too; it defines no tests).
 */

import { readFileSync } from "node:fs";

import { ClientConnection, type Event } from "../src/connection.js";
import { KeyPair, fromHex, toHex } from "../src/keys.js";
import { HandshakeState, type Transport } from "../src/noise.js";
import type { DType, EncodedTensor } from "../src/types.js";
import { Float64, StrictMap, pack, unpack, type Value } from "../src/wire.js";

/* eslint-disable @typescript-eslint/no-explicit-any */
export type Json = any;

/** The vectors; tests run from dist/test/, three levels below mobile_bridge/. */
export const VECTORS: Json = JSON.parse(
  readFileSync(new URL("../../../vectors/protocol-v1.json", import.meta.url), "utf8"),
);
export const SUITES: Json[] = VECTORS.suites;
export const IDENTITY: string = VECTORS.bundle.identity;
export const VERSION: string = VECTORS.bundle.version;
export const AGENT = "edgeoffload/golden-vectors";

export const hex = fromHex;
export { toHex };

export function keyPairs(suite: Json): Record<string, KeyPair> {
  const out: Record<string, KeyPair> = {};
  for (const [name, k] of Object.entries<Json>(suite.keys)) {
    out[name] = KeyPair.fromPrivate(hex(k.private));
  }
  return out;
}

/** The exact time of the vectors: JSON.parse rounds the 19-digit `time_ns`, so it is read back
 * from its TAI64N form (checked against the rounded number in the tests). */
export function exactTimeNs(): bigint {
  const tai = hex(VECTORS.tai64n_hex);
  const view = new DataView(tai.buffer);
  return (view.getBigUint64(0) - 2n ** 62n) * 1_000_000_000n + BigInt(view.getUint32(8));
}

/** A client with the vectors' keys, clock and agent (the hello of `suite.handshake`). */
export function makeClient(
  suite: Json,
  opts: { version?: string; features?: string[]; maxMessage?: number } = {},
): ClientConnection {
  const k = keyPairs(suite);
  return new ClientConnection({
    static: k.client_static!,
    serverPublic: k.server_static!.public,
    bundle: IDENTITY,
    version: opts.version ?? VERSION,
    timeNs: exactTimeNs(),
    protocol: suite.protocol_name,
    ephemeral: k.client_ephemeral!,
    agent: AGENT,
    ...(opts.features ? { features: opts.features } : {}),
    ...(opts.maxMessage ? { maxMessage: opts.maxMessage } : {}),
  });
}

/** The server's Noise state after reading `hs.message1`, with the vectors' server keys. */
export function responderAfterHello(suite: Json, hs: Json): { responder: HandshakeState; hello: Uint8Array } {
  const k = keyPairs(suite);
  const envelope = new StrictMap(unpack(hex(hs.message1.envelope_hex), { maxBin: 4096 }), "hello");
  const responder = new HandshakeState(suite.protocol_name, {
    initiator: false,
    prologue: hex(suite.prologue_hex),
    s: k.server_static!,
    e: k.server_ephemeral!,
  });
  const hello = responder.readMessage(envelope.get("noise", "bin"));
  return { responder, hello };
}

/**
 * A client and the server's transport after the recorded handshake `hs` (default: the suite's
 * `handshake`): the client writes message 1, the responder answers with the recorded payload.
 */
export function connect(
  suite: Json,
  hs: Json = suite.handshake,
  opts: { features?: string[] } = {},
): { client: ClientConnection; server: Transport; events: Event[] } {
  const client = makeClient(suite, opts);
  client.start();
  client.dataToSend();
  const { responder } = responderAfterHello(suite, hs);
  const noise2 = responder.writeMessage(hex(hs.message2.payload_hex));
  const envelope2 = pack(new Map<string, Value>([["v", 1], ["noise", noise2]]));
  const events = client.receive(envelope2);
  return { client, server: responder.transport(), events };
}

/** The msgpack value a compact vector describes (`bin`, `zero_bytes`, `arange_float32`). */
export function rebuild(obj: Json): Json {
  if (obj !== null && typeof obj === "object" && !Array.isArray(obj)) {
    const keys = Object.keys(obj);
    if (keys.length === 1 && keys[0] === "bin") return hex(obj.bin);
    if (keys.length === 1 && keys[0] === "zero_bytes") return new Uint8Array(obj.zero_bytes);
    if (keys.length === 1 && keys[0] === "arange_float32") {
      const n: number = obj.arange_float32;
      const out = new Uint8Array(4 * n);
      const view = new DataView(out.buffer);
      for (let i = 0; i < n; i++) view.setFloat32(4 * i, i, true);
      return out;
    }
    return Object.fromEntries(keys.map((key) => [key, rebuild(obj[key])]));
  }
  if (Array.isArray(obj)) return obj.map(rebuild);
  return obj;
}

/**
 * A decoded or rebuilt value in the vectors' JSON shape: bin as `{"bin": hex}`, maps as objects,
 * floats and ints as JSON numbers (bigints rounded as JSON.parse rounds them).
 */
export function plain(value: unknown): Json {
  if (value instanceof Uint8Array) return { bin: toHex(value) };
  if (value instanceof Float64) return value.value;
  if (typeof value === "bigint") return Number(value);
  if (value instanceof Map) {
    return Object.fromEntries([...value.entries()].map(([k, v]) => [k, plain(v)]));
  }
  if (Array.isArray(value)) return value.map(plain);
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, plain(v)]));
  }
  return value;
}

/** A vector's tensor list as the connection's `[name, EncodedTensor]` pairs. */
export function tensorsOf(list: Json[]): Array<[string, EncodedTensor]> {
  return list.map((t) => [
    t.name,
    {
      dtype: t.dtype as DType,
      shape: t.shape,
      codec: t.codec,
      data: rebuild(t.data),
      scales: t.scales ? rebuild(t.scales) : new Uint8Array(0),
    },
  ]);
}

/** Queue a recorded device → server message through the matching `send*` method. */
export function sendRecorded(client: ClientConnection, message: Json, session: bigint | undefined): void {
  switch (message.t) {
    case "run":
      return client.sendRun(message.id, tensorsOf(message.tensors));
    case "ping":
      return client.sendPing(message.id, rebuild(message.pad));
    case "close":
      return client.sendClose(message.reason);
    case "open":
      return client.sendOpen(message.id, message.sampling, message.max_tokens);
    case "prefill":
      return client.sendFeed(
        message.id,
        "prefill",
        session!,
        message.pos,
        message.chunks.map((c: Json) => ({ n: c.n, tensors: tensorsOf(c.tensors) })),
      );
    case "step":
      return client.sendFeed(message.id, "step", session!, message.pos, [
        { n: 1, tensors: tensorsOf(message.tensors) },
      ]);
    case "end":
      return client.sendEnd(message.id, session!);
    case "status":
      return client.sendStatus(message.id);
    default:
      throw new Error(`no send method for ${message.t}`);
  }
}

/** An event written back in the shape of the server message it came from (for comparison). */
export function eventAsMessage(event: Event): Json {
  const tensors = (list: Array<[string, EncodedTensor]>) =>
    list.map(([name, t]) => ({
      name,
      dtype: t.dtype,
      shape: [...t.shape],
      codec: t.codec,
      ...(t.scales.length > 0 ? { scales: { bin: toHex(t.scales) } } : {}),
      data: { bin: toHex(t.data) },
    }));
  const load = (l: Json) => ({
    inflight: l.inflight,
    queued: l.queued,
    workers: l.workers,
    kv_free: l.kvFree,
    draining: l.draining,
    ...(l.tailMs === undefined ? {} : { tail_ms: l.tailMs }),
  });
  const id = (v: number | bigint) => Number(v);
  switch (event.kind) {
    case "result":
      return {
        t: "result",
        id: id(event.requestId),
        tensors: tensors(event.tensors),
        server_ms: event.serverMs,
        ...(event.load ? { load: load(event.load) } : {}),
      };
    case "error":
      return {
        t: "error",
        code: event.code,
        message: event.message,
        ...(event.requestId === undefined ? {} : { id: id(event.requestId) }),
        ...(event.retryMs === undefined ? {} : { retry_ms: event.retryMs }),
      };
    case "pong":
      return { t: "pong", id: id(event.requestId), pad: { bin: toHex(event.payload) } };
    case "opened":
      return { t: "opened", id: id(event.requestId), session: Number(event.session), max_tokens: event.maxTokens };
    case "token":
      return {
        t: "token",
        id: id(event.requestId),
        session: Number(event.session),
        pos: event.pos,
        token: event.token,
        server_ms: event.serverMs,
        ...(event.load ? { load: load(event.load) } : {}),
      };
    case "ended":
      return { t: "ended", id: id(event.requestId), session: Number(event.session) };
    case "status":
      return {
        t: "status",
        id: id(event.requestId),
        load: load(event.load),
        bundles: event.bundles.map((b) => ({
          identity: b.identity,
          version: b.version,
          inflight: b.inflight,
          ...(b.tailMs === undefined ? {} : { tail_ms: b.tailMs }),
        })),
      };
    case "close":
      return { t: "close", reason: event.reason };
    default:
      throw new Error(`unexpected event ${event.kind}`);
  }
}
