/**
 * The device's side of the edgeoffload wire protocol, sans-I/O: a faithful port of
 * `ClientConnection` in edgeoffload/protocol/connection.py (with the events of events.py, the
 * state table of _state.py and the load reports of load.py), specified in PROTOCOL.md.
 *
 * Byte-in / events-out: feed every websocket binary message to {@link ClientConnection.receive},
 * write whatever {@link ClientConnection.dataToSend} returns, in order, and call the `send*`
 * methods to queue messages. No sockets, clocks or randomness live here beyond the ephemeral key
 * generated when none is injected (time and ephemeral keys are passed in), so the golden vectors
 * drive it directly.
 *
 * Integers. Request ids are integers in 0..2^63 − 1 (§7); they are typed {@link Id}: a `number`
 * when the value is a safe integer (≤ 2^53 − 1, which is what a device's own counter produces),
 * a `bigint` above. Received ids are always in that canonical form, so an id the device sent as
 * a number comes back as the same number. Session ids are server-chosen 63-bit random integers,
 * so they are always `bigint` (§12.3: JavaScript ports must not hold them in a `number`).
 * Positions, tokens and `max_tokens` are `number`s; a received value above 2^53 − 1 (valid for
 * Python, impossible in practice: positions are bounded by the server's context, tokens by the
 * vocabulary) is refused as a RemoteProtocolError instead of being rounded.
 */

import { blake2s } from "@noble/hashes/blake2.js";

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
} from "./errors.js";
import { KeyPair, checkKeyBytes, equalBytes } from "./keys.js";
import {
  CHUNK,
  DEFAULT_PROTOCOL,
  HandshakeState,
  RUNTIME_PROTOCOLS,
  TAG,
  Transport,
} from "./noise.js";
import { decodeTensors, encodeTensors, type NamedTensor } from "./tensormap.js";
import type { EncodedTensor } from "./types.js";
import {
  Float64,
  MAX_CHUNKS,
  MAX_STR,
  StrictMap,
  checkOutgoingId,
  inIdRange,
  pack,
  packParts,
  truncateUtf8,
  unpack,
  type Encodable,
  type Id,
  type Value,
  type WireMap,
} from "./wire.js";

export type { Id } from "./wire.js";

export const PROTOCOL_VERSION = 1;
/** This package's agent string (free text, never compared; §5.3). */
export const DEFAULT_AGENT = "edgeoffload-ts/0.1.0";
export const PROLOGUE_PREFIX = new TextEncoder().encode("edgeoffload/1\x00");

/** mac1 of the hello (§5.3): a filter against garbage, not authentication (its key is public). */
export const MAC1_LABEL = new TextEncoder().encode("edgeoffload mac1");
export const MAC1_BYTES = 16;
/** The largest first message (the hello envelope) a server decodes (§5.3, §10). */
export const MAX_HELLO_BYTES = 8192;

// Websocket close codes (§9.2).
export const CLOSE_AUTH = 4401;
export const CLOSE_PROTOCOL = 4400;
export const CLOSE_VERSION = 4409;
export const CLOSE_SHUTDOWN = 4503;

/** Error codes carried in `error` messages (§9.1); a received unknown code reads "internal". */
export const ERROR_CODES = [
  "overloaded",
  "payload",
  "protocol",
  "timeout",
  "internal",
  "unknown_bundle",
  "version_mismatch",
  "shutting_down",
  "session",
  "session_lost",
  "duplicate_id",
] as const;
export type ErrorCode = (typeof ERROR_CODES)[number];
export const SESSION_KINDS = ["prefill", "step"] as const;
/** The largest `retry_ms` of an `overloaded` error (§7). */
export const MAX_RETRY_MS = 60_000;

// Features (§14.1) and load report bounds (§14.2).
export const FEATURE_LOAD = "load";
export const KNOWN_FEATURES: readonly string[] = [FEATURE_LOAD];
export const MAX_FEATURES = 16;
export const MAX_FEATURE_NAME = 64;
const MAX_LOAD_COUNT = 2 ** 31 - 1;
const MAX_LOAD_BYTES = 2n ** 62n;
const MAX_LOAD_MS = 1e9;
const MAX_STATUS_BUNDLES = 64;

const utf8 = new TextEncoder();

// -- events ---------------------------------------------------------------------------------------

/** A server's state when it wrote a reply (§14.2); advice, parsed as strictly as the rest. */
export interface ServerLoad {
  /** Requests admitted and not answered, all bundles and devices, not counting this reply's. */
  readonly inflight: number;
  /** Of those, the ones waiting for a worker. */
  readonly queued: number;
  /** Tail runs the server does at once (≥ 1). */
  readonly workers: number;
  /** Bytes of the session KV budget not in use (≤ 2^62; above 2^53 a JS number rounds). */
  readonly kvFree: number;
  readonly draining: boolean;
  /** Moving average of this connection's bundle's tail time; absent before its first run. */
  readonly tailMs?: number;
}

/** One hosted bundle in a `status` reply (§14.3). */
export interface BundleLoad {
  readonly identity: string;
  readonly version: string;
  readonly inflight: number;
  readonly tailMs?: number;
}

/** `n` new positions and the crossing tensors the head produced for them in one call (§12.1). */
export interface Chunk {
  readonly n: number;
  readonly tensors: readonly NamedTensor[];
}

/** What {@link ClientConnection.receive} reports, one kind per server message (events.py). */
export type Event =
  | {
      readonly kind: "handshake_complete";
      /** The server's static key (the pinned one, now authenticated). */
      readonly peerPublic: Uint8Array;
      /** Bundle identity. */
      readonly bundle: string;
      /** The server's bundle version ("" when the welcome omitted it). */
      readonly version: string;
      readonly info: { readonly maxMessage: number; readonly agent: string };
    }
  | {
      readonly kind: "result";
      readonly requestId: Id;
      readonly tensors: Array<[string, EncodedTensor]>;
      readonly serverMs: number;
      readonly load?: ServerLoad;
    }
  | {
      readonly kind: "error";
      /** Absent: an error not tied to a request (the reference client ignores those). */
      readonly requestId?: Id;
      readonly code: ErrorCode;
      readonly message: string;
      /** `overloaded` only: when the server expects to admit a retry, in milliseconds. */
      readonly retryMs?: number;
    }
  | { readonly kind: "pong"; readonly requestId: Id; readonly payload: Uint8Array }
  | {
      readonly kind: "opened";
      readonly requestId: Id;
      readonly session: bigint;
      readonly maxTokens: number;
    }
  | {
      readonly kind: "token";
      readonly requestId: Id;
      readonly session: bigint;
      /** The session length after the feed. */
      readonly pos: number;
      readonly token: number;
      readonly serverMs: number;
      readonly load?: ServerLoad;
    }
  | { readonly kind: "ended"; readonly requestId: Id; readonly session: bigint }
  | {
      readonly kind: "status";
      readonly requestId: Id;
      readonly load: ServerLoad;
      readonly bundles: readonly BundleLoad[];
    }
  | { readonly kind: "close"; readonly reason: string };

export type ErrorEvent = Extract<Event, { kind: "error" }>;

/** The exception the reference client raises for an `error` reply (ErrorReply.to_exception). */
export function errorToException(event: ErrorEvent): Error {
  const { code, message } = event;
  if (code === "overloaded") {
    const retryAfter = event.retryMs === undefined ? undefined : event.retryMs / 1000;
    return new Overloaded(`edge server overloaded: ${message}`, { retryAfter });
  }
  if (code === "payload") return new PayloadError(`edge server rejected the tensors: ${message}`);
  if (code === "unknown_bundle" || code === "version_mismatch") return new VersionMismatch(message);
  if (code === "session_lost") return new SessionLost(`edge server lost the session: ${message}`);
  if (code === "session") {
    return new SessionError(`edge server refused the session message: ${message}`);
  }
  if (code === "timeout" || code === "shutting_down" || code === "internal") {
    // The server could not answer this time: the client may retry or fall back.
    return new ServerBusy(`edge server could not answer (${code}): ${message}`);
  }
  return new RemoteProtocolError(`edge server error (${code}): ${message}`);
}

// -- handshake helpers ----------------------------------------------------------------------------

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** The Noise prologue (§5.2): `"edgeoffload/1\0" || protocol || "\0" || utf8(bundle)`. */
export function prologue(protocol: string, bundle: string): Uint8Array {
  return concat(PROLOGUE_PREFIX, utf8.encode(protocol), Uint8Array.of(0), utf8.encode(bundle));
}

/**
 * TAI64N label of a Unix time in nanoseconds (§5.3): `be64(2^62 + seconds) || be32(nanos)`,
 * no TAI−UTC offset, seconds floored as Python's divmod.
 */
export function tai64n(timeNs: bigint): Uint8Array {
  const billion = 1_000_000_000n;
  let seconds = timeNs / billion;
  let nanos = timeNs % billion;
  if (nanos < 0n) {
    seconds -= 1n;
    nanos += billion;
  }
  const label = 2n ** 62n + seconds;
  if (label < 0n || label >= 2n ** 64n) {
    throw new UsageError(`time ${timeNs} ns is outside the TAI64N range`);
  }
  const out = new Uint8Array(12);
  const view = new DataView(out.buffer);
  view.setBigUint64(0, label);
  view.setUint32(8, Number(nanos));
  return out;
}

/** The mac1 key of a server: BLAKE2s-256(MAC1_LABEL || server static public key). */
export function mac1Key(serverPublic: Uint8Array): Uint8Array {
  return blake2s(concat(MAC1_LABEL, checkKeyBytes(serverPublic, "server public key")));
}

/** mac1 of a hello: BLAKE2s-128 keyed (RFC 7693 key parameter) with `key`, over prologue||noise. */
export function mac1(key: Uint8Array, prologueBytes: Uint8Array, noise: Uint8Array): Uint8Array {
  return blake2s(concat(prologueBytes, noise), { key, dkLen: MAC1_BYTES });
}

/**
 * The server's cheap pre-check of a hello (§5.3 step 3): whether `tag` (the envelope's `mac1`
 * value, any type, absent = undefined) is the mac1 of `noise` under this server key and the
 * prologue of `protocol` and `bundle`. Constant-time in the tag bytes.
 */
export function verifyMac1(
  serverPublic: Uint8Array,
  protocol: string,
  bundle: string,
  noise: Uint8Array,
  tag: unknown,
): boolean {
  if (!(tag instanceof Uint8Array)) return false;
  return equalBytes(tag, mac1(mac1Key(serverPublic), prologue(protocol, bundle), noise));
}

/** A hello's or welcome's `features` array (§14.1): distinct strings of 1..64 bytes, ≤ 16. */
export function checkFeatures(raw: readonly Value[], what: string): string[] {
  if (raw.length > MAX_FEATURES) {
    throw new RemoteProtocolError(`${what}: at most ${MAX_FEATURES} features, not ${raw.length}`);
  }
  const names: string[] = [];
  for (const name of raw) {
    if (typeof name !== "string") {
      throw new RemoteProtocolError(`${what}: a feature name must be a short string`);
    }
    const size = utf8.encode(name).length;
    if (!(size > 0 && size <= MAX_FEATURE_NAME)) {
      throw new RemoteProtocolError(`${what}: a feature name must be a short string`);
    }
    if (names.includes(name)) {
      throw new RemoteProtocolError(`${what}: feature '${name}' listed twice`);
    }
    names.push(name);
  }
  return names;
}

// -- field checks ---------------------------------------------------------------------------------

/** A non-negative count or position (`_count`), as a JS number (see the module comment). */
function count(value: Id, what: string): number {
  if (!inIdRange(value)) throw new RemoteProtocolError(`${String(value)} is not a valid count`);
  if (typeof value === "bigint") {
    throw new RemoteProtocolError(`${what} ${value} is beyond what this client can represent`);
  }
  return value;
}

/** A session id: range-checked as a request id, always a bigint. */
function sessionId(m: StrictMap): bigint {
  return BigInt(m.requestId("session"));
}

function milliseconds(value: number): number {
  if (!(value >= 0 && value < 1e9)) {
    throw new RemoteProtocolError("server_ms must be a non-negative number");
  }
  return value;
}

function loadCount(m: StrictMap, key: string, limit: number | bigint = MAX_LOAD_COUNT): number {
  const value = m.get(key, "int");
  if (!(value >= 0 && value <= limit)) {
    throw new RemoteProtocolError(`${m.what}: ${key} out of range`);
  }
  return Number(value);
}

function loadMs(m: StrictMap, key: string): number | undefined {
  const value = m.get(key, "number", { optional: true });
  if (value === undefined) return undefined;
  if (!(Number.isFinite(value) && value >= 0 && value < MAX_LOAD_MS)) {
    throw new RemoteProtocolError(`${m.what}: ${key} must be a finite, non-negative number`);
  }
  return value;
}

/** A load map (ServerLoad.from_wire). */
export function loadFromWire(raw: Value): ServerLoad {
  if (!(raw instanceof Map)) throw new RemoteProtocolError("load report: must be a map");
  const m = new StrictMap(raw, "load report");
  const inflight = loadCount(m, "inflight");
  const queued = loadCount(m, "queued");
  const workers = loadCount(m, "workers");
  const kvFree = loadCount(m, "kv_free", MAX_LOAD_BYTES);
  const draining = m.get("draining", "bool");
  const tailMs = loadMs(m, "tail_ms");
  m.done();
  if (queued > inflight) {
    throw new RemoteProtocolError("load report: more requests queued than in flight");
  }
  if (workers === 0) throw new RemoteProtocolError("load report: a server has at least one worker");
  return tailMs === undefined
    ? { inflight, queued, workers, kvFree, draining }
    : { inflight, queued, workers, kvFree, draining, tailMs };
}

/** The `bundles` array of a `status` reply (bundles_from_wire). */
export function bundlesFromWire(raw: readonly Value[]): BundleLoad[] {
  if (raw.length > MAX_STATUS_BUNDLES) {
    throw new RemoteProtocolError(`status: at most ${MAX_STATUS_BUNDLES} bundles`);
  }
  return raw.map((item) => {
    if (!(item instanceof Map)) throw new RemoteProtocolError("status bundle: must be a map");
    const m = new StrictMap(item, "status bundle");
    const identity = m.get("identity", "str");
    const version = m.get("version", "str");
    if (!(identity && version) || identity.length > MAX_STR || version.length > MAX_STR) {
      throw new RemoteProtocolError("status bundle: identity and version must be non-empty");
    }
    const inflight = loadCount(m, "inflight");
    const tailMs = loadMs(m, "tail_ms");
    m.done();
    return tailMs === undefined
      ? { identity, version, inflight }
      : { identity, version, inflight, tailMs };
  });
}

// -- state table (the client half of protocol._state.TRANSITIONS, §3) -------------------------

export type ConnectionState = "idle" | "handshake-sent" | "ready" | "closed";

const TRANSITIONS: ReadonlyMap<string, ConnectionState> = new Map<string, ConnectionState>([
  ["idle send:hello", "handshake-sent"],
  ["handshake-sent recv:welcome", "ready"],
  ["handshake-sent recv:refused", "closed"],
  ...(["run", "ping", "open", "prefill", "step", "end", "status"] as const).map(
    (k): [string, ConnectionState] => [`ready send:${k}`, "ready"],
  ),
  ...(["status", "opened", "token", "ended", "result", "error", "pong"] as const).map(
    (k): [string, ConnectionState] => [`ready recv:${k}`, "ready"],
  ),
  ["ready send:close", "closed"],
  ["ready recv:close", "closed"],
]);

/** The state after `action`, or the protocol error (ours for send:, the peer's for recv:). */
function nextState(state: ConnectionState, action: string): ConnectionState {
  const after = TRANSITIONS.get(`${state} ${action}`);
  if (after === undefined) {
    const [direction, kind] = action.split(":");
    const Err = direction === "send" ? LocalProtocolError : RemoteProtocolError;
    throw new Err(`'${kind}' is not allowed in state ${state}`);
  }
  return after;
}

// -- the connection -------------------------------------------------------------------------------

export interface ClientConnectionOptions {
  /** The device's static key pair. */
  static: KeyPair;
  /** The server's static public key, pinned (32 bytes). */
  serverPublic: Uint8Array;
  /** Bundle identity (§11), bound into the prologue. */
  bundle: string;
  /** The device's bundle version (§11). */
  version: string;
  /** The device clock, Unix nanoseconds; must increase between handshakes of one key (§5.5). */
  timeNs: bigint;
  /** Noise suite; default `Noise_IK_25519_ChaChaPoly_BLAKE2s`. */
  protocol?: string;
  /** Fixed ephemeral key (tests and vectors); generated otherwise. */
  ephemeral?: KeyPair;
  agent?: string;
  /** The largest transport message this side accepts (§10); default 2^26. */
  maxMessage?: number;
  /** Features to ask for (§14.1), e.g. `["load"]`. */
  features?: readonly string[];
}

/** The device's side of one connection (ClientConnection of connection.py). */
export class ClientConnection {
  readonly agent: string;
  readonly bundle: string;
  readonly version: string;
  readonly protocol: string;
  /** This side's transport limit: ciphertexts longer than this are refused (§6, §10). */
  readonly maxMessage: number;
  /** Asked for in the hello; {@link features} becomes what the server granted (§14.1). */
  readonly requestedFeatures: readonly string[];
  /** Features in force: asked for and granted (empty for a plain v1 server). */
  features: string[] = [];
  /** The server's announced `max_message`, once the welcome came. */
  peerMaxMessage: number | undefined;

  private currentState: ConnectionState = "idle";
  private outgoing: Uint8Array[] = [];
  private transportState: Transport | undefined;
  private readonly prologueBytes: Uint8Array;
  private readonly hs: HandshakeState;
  private readonly mac1KeyBytes: Uint8Array;
  private readonly timeNs: bigint;

  constructor(opts: ClientConnectionOptions) {
    const protocol = opts.protocol ?? DEFAULT_PROTOCOL;
    if (!(RUNTIME_PROTOCOLS as readonly string[]).includes(protocol)) {
      throw new LocalProtocolError(`unsupported Noise protocol ${JSON.stringify(protocol)}`);
    }
    this.agent = truncateUtf8(opts.agent ?? DEFAULT_AGENT, 256);
    this.maxMessage = opts.maxMessage ?? 2 ** 26;
    this.bundle = opts.bundle;
    this.version = opts.version;
    this.protocol = protocol;
    this.requestedFeatures = checkFeatures([...(opts.features ?? [])], "features");
    this.prologueBytes = prologue(protocol, opts.bundle);
    this.hs = new HandshakeState(protocol, {
      initiator: true,
      prologue: this.prologueBytes,
      s: opts.static,
      ...(opts.ephemeral === undefined ? {} : { e: opts.ephemeral }),
      rs: opts.serverPublic,
    });
    this.mac1KeyBytes = mac1Key(opts.serverPublic);
    this.timeNs = opts.timeNs;
  }

  /** "idle", "handshake-sent", "ready" or "closed" (§3). */
  get state(): ConnectionState {
    return this.currentState;
  }

  /** The established transport (after the welcome), e.g. for its counters. */
  get transport(): Transport | undefined {
    return this.transportState;
  }

  /** The final Noise handshake hash, a channel binding (after the welcome). */
  handshakeHash(): Uint8Array {
    return this.hs.handshakeHash;
  }

  /** Websocket binary messages to send, in order. */
  dataToSend(): Uint8Array[] {
    const out = this.outgoing;
    this.outgoing = [];
    return out;
  }

  private transition(action: string): void {
    this.currentState = nextState(this.currentState, action);
  }

  /** Queue handshake message 1: the cleartext envelope with the Noise message and mac1. */
  start(): void {
    this.transition("send:hello");
    const hello = new Map<string, Encodable>([
      ["ts", tai64n(this.timeNs)],
      ["version", this.version],
      ["agent", this.agent],
    ]);
    // A v1 server without §14 never sees the field.
    if (this.requestedFeatures.length > 0) hello.set("features", [...this.requestedFeatures]);
    const noise = this.hs.writeMessage(pack(hello));
    const envelope = new Map<string, Encodable>([
      ["v", PROTOCOL_VERSION],
      ["proto", this.protocol],
      ["bundle", this.bundle],
      ["noise", noise],
      ["mac1", mac1(this.mac1KeyBytes, this.prologueBytes, noise)],
    ]);
    this.outgoing.push(pack(envelope));
  }

  /** Process one websocket message from the server: message 2, then transport messages. */
  receive(data: Uint8Array): Event[] {
    if (this.currentState === "handshake-sent") return [this.receiveWelcome(data)];
    if (this.currentState !== "ready") {
      throw new LocalProtocolError(`cannot receive in state ${this.currentState}`);
    }
    const m = new StrictMap(this.decrypt(data), "server message");
    const kind = m.get("t", "str");
    let event: Event;
    if (kind === "result") {
      const requestId = m.requestId();
      const tensors = decodeTensors(m.get("tensors", "array"), "result");
      const serverMs = milliseconds(m.get("server_ms", "number"));
      event = withLoad({ kind, requestId, tensors, serverMs }, this.load(m));
    } else if (kind === "error") {
      const requestId = m.has("id") ? m.requestId() : undefined;
      const code = m.get("code", "str");
      const rawRetry = m.get("retry_ms", "int", { optional: true });
      let retryMs: number | undefined;
      if (rawRetry !== undefined) {
        if (code !== "overloaded") {
          throw new RemoteProtocolError("retry_ms is only sent with code 'overloaded'");
        }
        if (!(rawRetry >= 0 && rawRetry <= MAX_RETRY_MS)) {
          throw new RemoteProtocolError(`retry_ms must be in 0..${MAX_RETRY_MS}`);
        }
        retryMs = Number(rawRetry);
      }
      const known = (ERROR_CODES as readonly string[]).includes(code);
      event = {
        kind,
        ...(requestId === undefined ? {} : { requestId }),
        code: known ? (code as ErrorCode) : "internal",
        message: m.get("message", "str"),
        ...(retryMs === undefined ? {} : { retryMs }),
      };
    } else if (kind === "pong") {
      event = { kind, requestId: m.requestId(), payload: m.get("pad", "bin") };
    } else if (kind === "opened") {
      const requestId = m.requestId();
      const session = sessionId(m);
      const maxTokens = count(m.get("max_tokens", "int"), "max_tokens");
      event = { kind, requestId, session, maxTokens };
    } else if (kind === "token") {
      const requestId = m.requestId();
      const session = sessionId(m);
      const pos = count(m.get("pos", "int"), "pos");
      const token = count(m.get("token", "int"), "token");
      const serverMs = milliseconds(m.get("server_ms", "number"));
      event = withLoad({ kind, requestId, session, pos, token, serverMs }, this.load(m));
    } else if (kind === "status") {
      this.requireFeature(FEATURE_LOAD, kind, true);
      const requestId = m.requestId();
      const load = loadFromWire(m.get("load", "map"));
      event = { kind, requestId, load, bundles: bundlesFromWire(m.get("bundles", "array")) };
    } else if (kind === "ended") {
      const requestId = m.requestId();
      event = { kind, requestId, session: sessionId(m) };
    } else if (kind === "close") {
      event = { kind, reason: m.get("reason", "str") };
    } else {
      throw new RemoteProtocolError(`unknown server message type '${kind}'`);
    }
    m.done();
    // The state changes only for a message that was entirely valid (§3).
    this.transition(`recv:${kind}`);
    return [event];
  }

  private receiveWelcome(data: Uint8Array): Event {
    const envelope = new StrictMap(unpack(data, { maxBin: 4096 }), "handshake reply");
    if (envelope.get("v", "int") !== PROTOCOL_VERSION) {
      throw new RemoteProtocolError("server speaks another protocol version");
    }
    const noise = envelope.get("noise", "bin");
    envelope.done();
    const payload = this.hs.readMessage(noise); // AuthenticationFailed on a wrong server key
    const reply = new StrictMap(unpack(payload, { maxBin: 4096 }), "handshake reply payload");
    const ok = reply.get("ok", "bool");
    const serverVersion = reply.get("version", "str", { optional: true });
    if (!ok) {
      const code = reply.get("code", "str");
      const message = reply.get("message", "str");
      reply.done();
      this.transition("recv:refused");
      if (code === "version_mismatch" || code === "unknown_bundle") {
        throw new VersionMismatch(
          `device bundle ${this.version} (${this.bundle}) is not served: ${message}` +
            (serverVersion ? `; the server has version ${serverVersion}` : ""),
          { hint: "deploy the same bundle (same edgeoffload split output) on both sides" },
        );
      }
      throw new RemoteProtocolError(`server refused the session (${code}): ${message}`);
    }
    const maxMessage = Number(reply.get("max_message", "int"));
    const agent = reply.get("agent", "str");
    const granted = reply.get("features", "array", { optional: true });
    reply.done();
    if (granted !== undefined) {
      const features = checkFeatures(granted, "welcome");
      if (!features.every((f) => this.requestedFeatures.includes(f))) {
        throw new RemoteProtocolError("server granted a feature this device did not ask for");
      }
      this.features = features;
    }
    this.transition("recv:welcome");
    this.transportState = this.hs.transport();
    // What the server accepts; this side's own receive limit stays its own (results can be
    // larger than requests, e.g. logits).
    this.peerMaxMessage = maxMessage;
    return {
      kind: "handshake_complete",
      peerPublic: this.hs.remoteStatic!,
      bundle: this.bundle,
      version: serverVersion ?? "",
      info: { maxMessage, agent },
    };
  }

  private decrypt(data: Uint8Array): WireMap {
    const transport = this.transportState!;
    if (data.length > this.maxMessage) {
      throw new RemoteProtocolError(`message of ${data.length} bytes exceeds ${this.maxMessage}`);
    }
    let plaintext: Uint8Array;
    try {
      plaintext = transport.decrypt(data);
    } catch (exc) {
      if (exc instanceof AuthenticationFailed) this.currentState = "closed"; // §6 rule 4
      throw exc;
    }
    return unpack(plaintext, { maxBin: this.maxMessage });
  }

  private requireFeature(feature: string, kind: string, received: boolean): void {
    if (!this.features.includes(feature)) {
      const Err = received ? RemoteProtocolError : LocalProtocolError;
      throw new Err(`'${kind}' needs the '${feature}' feature, not negotiated (§14.1)`);
    }
  }

  /** A reply's optional load report; only a server that granted "load" may send one. */
  private load(m: StrictMap): ServerLoad | undefined {
    const raw = m.get("load", "map", { optional: true });
    if (raw === undefined) return undefined;
    this.requireFeature(FEATURE_LOAD, "load", true);
    return loadFromWire(raw);
  }

  private sendEncrypted(action: string, message: Encodable, what = ""): void {
    const parts = packParts(message);
    if (what && this.peerMaxMessage !== undefined) {
      const size = parts.reduce((n, p) => n + p.length, 0);
      const wire = size + TAG * (Math.floor(size / CHUNK) + 1); // AEAD tags, §6
      if (wire > this.peerMaxMessage) {
        throw new PayloadError(
          `${what} of ${wire} bytes exceeds the server's limit of ${this.peerMaxMessage}`,
          { hint: "send fewer positions per prefill message" },
        );
      }
    }
    this.transition(action);
    this.outgoing.push(this.transportState!.encryptParts(parts));
  }

  private checkPayloadSize(what: string, tensors: readonly NamedTensor[], hint: string): void {
    const size = tensors.reduce((n, [, t]) => n + t.data.length + t.scales.length, 0);
    if (this.peerMaxMessage !== undefined && size > this.peerMaxMessage) {
      throw new PayloadError(
        `${what} of ${size} bytes exceeds the server's limit of ${this.peerMaxMessage}`,
        { hint },
      );
    }
  }

  /** Queue a run request; refuses one the server announced it would not accept. */
  sendRun(requestId: Id, tensors: readonly NamedTensor[]): void {
    this.checkPayloadSize(
      "request",
      tensors,
      "the server sizes its limit from the bundle's declared tensors",
    );
    const body = new Map<string, Encodable>([
      ["t", "run"],
      ["id", checkOutgoingId(requestId, "request id")],
      ["tensors", encodeTensors(tensors)],
    ]);
    this.sendEncrypted("send:run", body, "request");
  }

  sendPing(requestId: Id, pad: Uint8Array = new Uint8Array(0)): void {
    const body = new Map<string, Encodable>([
      ["t", "ping"],
      ["id", checkOutgoingId(requestId, "request id")],
      ["pad", pad],
    ]);
    this.sendEncrypted("send:ping", body);
  }

  /**
   * Open a generation session (§12.2). `sampling` goes out as given, in its key order, except
   * that a number under `temperature` or `top_p` is written as float64, as the reference client
   * sends them (§12.6) — a JS number has no int/float distinction of its own.
   */
  sendOpen(requestId: Id, sampling: Readonly<Record<string, unknown>>, maxTokens: number): void {
    const params = new Map<string, Encodable>();
    for (const [key, value] of Object.entries(sampling)) {
      const asFloat = (key === "temperature" || key === "top_p") && typeof value === "number";
      params.set(key, asFloat ? new Float64(value) : (value as Encodable));
    }
    const body = new Map<string, Encodable>([
      ["t", "open"],
      ["id", checkOutgoingId(requestId, "request id")],
      ["sampling", params],
      ["max_tokens", checkOutgoingId(maxTokens, "max_tokens")],
    ]);
    this.sendEncrypted("send:open", body);
  }

  /** Queue a prefill (any number of chunks) or a step (exactly one chunk of one position). */
  sendFeed(
    requestId: Id,
    kind: "prefill" | "step",
    session: Id,
    pos: number,
    chunks: readonly Chunk[],
  ): void {
    if (!(SESSION_KINDS as readonly string[]).includes(kind)) {
      throw new LocalProtocolError(`unknown session message '${String(kind)}'`);
    }
    if (kind === "step" && (chunks.length !== 1 || chunks[0]!.n !== 1)) {
      throw new LocalProtocolError("a step carries exactly one position");
    }
    if (chunks.length > MAX_CHUNKS) {
      throw new LocalProtocolError(`a prefill carries at most ${MAX_CHUNKS} chunks`);
    }
    this.checkPayloadSize(
      kind,
      chunks.flatMap((c) => c.tensors),
      "send the prompt in several prefill messages",
    );
    const body = new Map<string, Encodable>([
      ["t", kind],
      ["id", checkOutgoingId(requestId, "request id")],
      ["session", checkOutgoingId(session, "session id")],
      ["pos", checkOutgoingId(pos, "pos")],
    ]);
    if (kind === "step") {
      body.set("tensors", encodeTensors(chunks[0]!.tensors));
    } else {
      body.set(
        "chunks",
        chunks.map(
          (c) =>
            new Map<string, Encodable>([
              ["n", checkOutgoingId(c.n, "chunk n")],
              ["tensors", encodeTensors(c.tensors)],
            ]),
        ),
      );
    }
    this.sendEncrypted(`send:${kind}`, body, kind);
  }

  sendEnd(requestId: Id, session: Id): void {
    const body = new Map<string, Encodable>([
      ["t", "end"],
      ["id", checkOutgoingId(requestId, "request id")],
      ["session", checkOutgoingId(session, "session id")],
    ]);
    this.sendEncrypted("send:end", body);
  }

  /** Ask for the server's load (§14.3): needs the "load" feature. */
  sendStatus(requestId: Id): void {
    this.requireFeature(FEATURE_LOAD, "status", false);
    const body = new Map<string, Encodable>([
      ["t", "status"],
      ["id", checkOutgoingId(requestId, "request id")],
    ]);
    this.sendEncrypted("send:status", body);
  }

  /** End the connection; `reason` is cut to 4096 UTF-8 bytes (§9.1 caveat). */
  sendClose(reason = ""): void {
    const body = new Map<string, Encodable>([
      ["t", "close"],
      ["reason", truncateUtf8(reason)],
    ]);
    this.sendEncrypted("send:close", body);
  }
}

/** `event` with its load report, when the reply carried one. */
function withLoad<T extends object>(
  event: T,
  load: ServerLoad | undefined,
): T & { load?: ServerLoad } {
  return load === undefined ? event : { ...event, load };
}
