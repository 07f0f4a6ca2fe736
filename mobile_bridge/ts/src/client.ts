/**
 * The device side in TypeScript: run the head here, send what crosses the cut encrypted to an
 * edge server, get the tail's answer — or run the tail here when the server cannot answer.
 * A port of edgeoffload/device/client.py and pool.py for one server.
 *
 * * Request ids increase for the client's lifetime (across reconnections), as the server's
 *   duplicate-id window expects (PROTOCOL.md §7).
 * * `overloaded` with `retry_ms` means the request did not run: it is sent again after that
 *   wait (doubling per wait up to 8×, times a random factor in [0.5, 1.5] so refused devices do
 *   not come back in step) while the deadline allows.
 * * A warm connection that turns out dead when reused is reopened once (the request never
 *   reached a live server on it).
 * * `fallback: "local"` (default) runs the tail here when the server is unreachable, too slow
 *   or busy, and the bundle carries the tail; `"error"` throws OffloadUnavailable instead.
 *   A refused key or bundle (AuthenticationFailed, VersionMismatch) is never hidden behind the
 *   fallback: the deployment is wrong, or someone is tampering.
 */

import type { Bundle, Manifest } from "./bundle.js";
import { decode, encode } from "./codec.js";
import {
  AuthenticationFailed,
  LocalProtocolError,
  OffloadUnavailable,
  Overloaded,
  PayloadError,
  ProtocolError,
  RemoteProtocolError,
  ServerBusy,
  UsageError,
  VersionMismatch,
} from "./errors.js";
import type { KeyPair } from "./keys.js";
import { type Answer, ServerLink, type WebSocketFactory } from "./link.js";
import type { ModelRunner } from "./runner.js";
import { checkResult, matchSpecs, specBytes } from "./specs.js";
import type { EncodedTensor, RawTensor } from "./types.js";

export const FALLBACKS = ["local", "error"] as const;
export type Fallback = (typeof FALLBACKS)[number];

const MAX_OVERLOADED_WAITS = 64;
const OVERLOADED_MARGIN_MS = 50;

/** Where one request's time went (ms), as edgeoffload.device.client.RequestTiming. */
export interface RequestTiming {
  readonly headMs: number;
  /** Codec encode + encryption on the device. */
  readonly encodeMs: number;
  /** Send → result received, minus the server's own time. */
  readonly networkMs: number;
  /** The tail on the server as the server measured it. */
  readonly serverMs: number;
  /** Decryption + codec decode of the result. */
  readonly decodeMs: number;
  /** The tail on the device (the local fallback). */
  readonly localTailMs: number;
  readonly totalMs: number;
  /** Request ciphertext bytes sent by the attempt that was answered. */
  readonly wireBytes: number;
  readonly offloaded: boolean;
  readonly fallbackReason: string;
  readonly attempts: number;
}

export interface EdgeClientOptions {
  readonly bundle: Bundle;
  readonly identity: KeyPair;
  /** ws:// or wss:// URL of the edge server. */
  readonly server: string;
  /** The server's pinned X25519 public key (32 bytes; see keys.ts for the text form). */
  readonly serverKey: Uint8Array;
  readonly webSocket: WebSocketFactory;
  /** Runs the bundle's head (required when the bundle has one). */
  readonly head?: ModelRunner;
  /** Creates the tail's runner on first use: the local fallback. */
  readonly tail?: () => Promise<ModelRunner>;
  readonly fallback?: Fallback;
  /** Per request, retries included (default 10 s). */
  readonly timeoutMs?: number;
  /** For the websocket and the handshake (default 3 s). */
  readonly connectTimeoutMs?: number;
  /** Noise suite (PROTOCOL.md §5.1); the default is the Python default. */
  readonly protocol?: string;
  /** Wall clock in ns (the hello's timestamp); `Date.now()` based by default. */
  readonly clock?: () => bigint;
  /** Uniform [0, 1) for retry jitter; Math.random by default. */
  readonly random?: () => number;
}

interface Offloaded {
  readonly outputs: Record<string, RawTensor>;
  readonly encryptMs: number;
  readonly wireBytes: number;
  readonly networkMs: number;
  readonly serverMs: number;
  readonly decodeMs: number;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function wallClockNs(): bigint {
  // performance.timeOrigin + now() gives sub-millisecond resolution where Date.now() does not.
  return BigInt(Math.round((performance.timeOrigin + performance.now()) * 1e3)) * 1000n;
}

export class EdgeClient {
  readonly manifest: Manifest;
  readonly link: ServerLink;
  readonly fallback: Fallback;
  readonly timeoutMs: number;
  /** How the last request went; undefined before the first. */
  lastTiming: RequestTiming | undefined;

  private nextId = 1;
  private tailRunner: Promise<ModelRunner> | null = null;
  private readonly maxMessage: number;
  private readonly random: () => number;

  constructor(private readonly options: EdgeClientOptions) {
    const m = options.bundle.manifest;
    if (m.state.length > 0) {
      throw new UsageError("this bundle is a decoder with a KV cache: the TS client runs only run() bundles");
    }
    if (!/^wss?:\/\//.test(options.server)) {
      throw new UsageError(`server must be a ws:// or wss:// URL, got '${options.server}'`);
    }
    if (options.serverKey.length !== 32) {
      throw new UsageError("the server key must be a 32-byte X25519 public key");
    }
    if (m.head !== null && options.head === undefined) {
      throw new UsageError("the bundle has a head: give a runner for it (head)");
    }
    const fallback = options.fallback ?? "local";
    if (!FALLBACKS.includes(fallback)) {
      throw new UsageError(`fallback must be one of ${FALLBACKS.join(", ")}, got '${String(fallback)}'`);
    }
    this.manifest = m;
    this.fallback = fallback;
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.random = options.random ?? Math.random;
    const outputs = m.graphOutputs.reduce((n, s) => n + (specBytes(s, m.dims) ?? 0), 0);
    this.maxMessage = Math.max(1 << 20, 4 * outputs + 65536);
    this.link = new ServerLink({
      url: options.server,
      serverKey: options.serverKey,
      identity: options.identity,
      manifest: m,
      webSocket: options.webSocket,
      connectTimeoutMs: options.connectTimeoutMs ?? 3000,
      maxMessage: this.maxMessage,
      clock: options.clock ?? wallClockNs,
      ...(options.protocol === undefined ? {} : { protocol: options.protocol }),
    });
  }

  /** Open the connection now (otherwise the first request does). */
  async connect(): Promise<void> {
    await this.link.connect();
  }

  close(): void {
    this.link.close();
  }

  /** The model's outputs for `inputs`: head here, tail on the server (or the fallback). */
  async run(inputs: Readonly<Record<string, RawTensor>>): Promise<Record<string, RawTensor>> {
    const m = this.manifest;
    const started = performance.now();
    matchSpecs(
      Object.entries(inputs).map(([name, t]) => [name, t.dtype, t.shape] as const),
      m.graphInputs,
      {
        error: UsageError,
        kind: "input",
        hint: "the model takes " + m.graphInputs.map((s) => `${s.name} ${s.dtype}[${s.shape.join(", ")}]`).join(", "),
      },
    );
    const produced: Record<string, RawTensor> = this.options.head ? await this.options.head.run(inputs) : {};
    for (const name of m.passthrough) produced[name] = inputs[name]!;
    const headMs = performance.now() - started;
    if (m.tail === null) {
      this.lastTiming = timing({ headMs, totalMs: headMs, fallbackReason: "all-local", attempts: 0 });
      return produced;
    }
    const crossing: Record<string, RawTensor> = {};
    for (const spec of m.crossing) crossing[spec.name] = produced[spec.name]!;
    const encodeStart = performance.now();
    const encoded: Array<[string, EncodedTensor]> = m.crossing.map((s) => [s.name, encode(crossing[s.name]!, m.codec)]);
    const codecMs = performance.now() - encodeStart;
    let attempts = 0;
    try {
      const done = await this.offload(encoded, started + this.timeoutMs, () => attempts++);
      this.lastTiming = timing({
        headMs,
        encodeMs: codecMs + done.encryptMs,
        networkMs: done.networkMs,
        serverMs: done.serverMs,
        decodeMs: done.decodeMs,
        totalMs: performance.now() - started,
        wireBytes: done.wireBytes,
        offloaded: true,
        attempts,
      });
      return done.outputs;
    } catch (error) {
      if (!(error instanceof OffloadUnavailable)) throw error;
      if (this.fallback === "error" || this.options.tail === undefined) {
        if (this.fallback === "error") throw error;
        throw new OffloadUnavailable(error.message, {
          hint: "the bundle carries no tail to run locally; give `tail` to the client",
        });
      }
      const tailStart = performance.now();
      this.tailRunner ??= this.options.tail();
      const outputs = await (await this.tailRunner).run(crossing);
      const localTailMs = performance.now() - tailStart;
      const totalMs = performance.now() - started;
      this.lastTiming = timing({
        headMs,
        encodeMs: codecMs,
        networkMs: totalMs - headMs - codecMs - localTailMs,
        localTailMs,
        totalMs,
        fallbackReason: error.message,
        attempts,
      });
      return outputs;
    }
  }

  /** Round-trip time (ms) of an encrypted ping carrying `pad` bytes each way. */
  async ping(pad = 0): Promise<number> {
    const id = this.nextId++;
    const sent = await this.link.send((c) => c.sendPing(id, new Uint8Array(pad)), id, "pong");
    const answer = await this.await(sent.answer, id, this.timeoutMs);
    return answer.receivedAt - sent.sentAt;
  }

  /** Send `encoded` to the server, retrying what may be retried, until `deadline`. */
  private async offload(
    encoded: Array<[string, EncodedTensor]>,
    deadline: number,
    attempted: () => void,
  ): Promise<Offloaded> {
    const id = this.nextId++;
    for (let waits = 0; ; waits++) {
      const remaining = deadline - performance.now();
      if (remaining <= 0) throw new OffloadUnavailable("the request's deadline passed");
      attempted();
      try {
        return await this.attempt(id, encoded, deadline);
      } catch (error) {
        if (error instanceof AuthenticationFailed || error instanceof VersionMismatch) throw error;
        if (error instanceof PayloadError || error instanceof LocalProtocolError) throw error;
        if (error instanceof ProtocolError) {
          // A server that breaks the protocol is dropped; the request may run elsewhere.
          this.link.drop("broke the protocol");
          throw new OffloadUnavailable(`${this.link.url}: ${error.message}`);
        }
        if (!(error instanceof Overloaded) || error.retryAfter === undefined) throw error;
        if (waits >= MAX_OVERLOADED_WAITS) throw error;
        const pause = error.retryAfter * 1000 * 2 ** Math.min(waits, 3) * (0.5 + this.random());
        if (performance.now() + pause >= deadline - OVERLOADED_MARGIN_MS) throw error;
        await sleep(pause);
      }
    }
  }

  /** One try; a reused connection found dead is reopened once. */
  private async attempt(id: number, encoded: Array<[string, EncodedTensor]>, deadline: number): Promise<Offloaded> {
    let sent;
    let answer: Answer | undefined;
    for (const fresh of [false, true]) {
      sent = await this.link.send((c) => c.sendRun(id, encoded), id, "result");
      try {
        answer = await this.await(sent.answer, id, deadline - performance.now());
        break;
      } catch (error) {
        if (error instanceof ServerBusy || !(error instanceof OffloadUnavailable)) throw error;
        this.link.drop();
        if (fresh || !sent.reused || performance.now() >= deadline) throw error;
      }
    }
    const event = answer!.event;
    if (event.kind !== "result") throw new RemoteProtocolError(`expected a result, got '${event.kind}'`);
    const decodeStart = performance.now();
    const outputs: Record<string, RawTensor> = {};
    try {
      checkResult(event.tensors, this.manifest.graphOutputs);
      for (const [name, t] of event.tensors) outputs[name] = decode(t, { maxBytes: this.maxMessage });
    } catch (error) {
      // The server's answer, not our request, is malformed.
      if (error instanceof PayloadError) throw new RemoteProtocolError(`${this.link.url} returned ${error.message}`);
      throw error;
    }
    const decodeMs = answer!.decryptMs + (performance.now() - decodeStart);
    return {
      outputs,
      encryptMs: sent!.encryptMs,
      wireBytes: sent!.wireBytes,
      networkMs: Math.max(0, answer!.receivedAt - sent!.sentAt - event.serverMs),
      serverMs: event.serverMs,
      decodeMs,
    };
  }

  /** The answer within `ms`; a timeout drops the connection (the answer may still come). */
  private async await(answer: Promise<Answer>, id: number, ms: number): Promise<Answer> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        reject(new OffloadUnavailable(`${this.link.url}: no answer within ${Math.max(0, ms).toFixed(0)} ms`));
        this.link.drop("timed out");
      }, Math.max(0, ms));
    });
    try {
      return await Promise.race([answer, timeout]);
    } finally {
      clearTimeout(timer);
      this.link.forget(id);
    }
  }
}

function timing(t: Partial<RequestTiming> & { headMs: number; totalMs: number }): RequestTiming {
  return {
    encodeMs: 0,
    networkMs: 0,
    serverMs: 0,
    decodeMs: 0,
    localTailMs: 0,
    wireBytes: 0,
    offloaded: false,
    fallbackReason: "",
    attempts: 1,
    ...t,
  };
}
