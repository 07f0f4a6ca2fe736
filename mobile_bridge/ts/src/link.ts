/**
 * One authenticated connection to one edge server, kept warm and reused: a port of
 * edgeoffload/device/link.py. It owns the platform's WebSocket and the sans-I/O
 * ClientConnection, runs the handshake, sends requests and matches every reply to its
 * request by id *and* kind. It decides nothing: retries and the fallback are the client's.
 *
 * A reply to a request this device never sent (or of the wrong kind) means the server is
 * lying or broken: the connection is dropped, failing everything pending on it, so nothing can
 * be matched to the wrong request. A request that times out drops the connection too: its
 * answer may still come, and must never be taken for the answer to a later request.
 */

import { CLOSE_AUTH, ClientConnection, type Event, type Id, errorToException } from "./connection.js";
import {
  AuthenticationFailed,
  EdgeOffloadError,
  OffloadUnavailable,
  ProtocolError,
  RemoteProtocolError,
} from "./errors.js";
import type { KeyPair } from "./keys.js";
import type { Manifest } from "./bundle.js";

/** What the client needs of a WebSocket: the WHATWG API (browsers, `ws` in Node). */
export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

/** Opens a WebSocket to `url` (e.g. `(u) => new WebSocket(u)` in a browser). */
export type WebSocketFactory = (url: string) => WebSocketLike;

export interface LinkOptions {
  readonly url: string;
  readonly serverKey: Uint8Array;
  readonly identity: KeyPair;
  readonly manifest: Manifest;
  readonly webSocket: WebSocketFactory;
  readonly connectTimeoutMs: number;
  /** The largest message this device accepts from the server (bytes). */
  readonly maxMessage: number;
  readonly protocol?: string;
  /** Wall clock in nanoseconds (the hello's timestamp, §5.3). */
  readonly clock: () => bigint;
}

/** One message's answer: the event and when it arrived (performance.now() ms). */
export interface Answer {
  readonly event: Event;
  readonly receivedAt: number;
  readonly decryptMs: number;
}

/** What sending cost: encryption time, ciphertext bytes, when the last frame left. */
export interface Sent {
  readonly answer: Promise<Answer>;
  readonly encryptMs: number;
  readonly wireBytes: number;
  readonly sentAt: number;
  /** Whether the connection existed before this request (a dead reused one is retried once). */
  readonly reused: boolean;
}

interface Pending {
  readonly kind: Event["kind"];
  readonly resolve: (answer: Answer) => void;
  readonly reject: (error: Error) => void;
}

const OPEN = 1;
const ABANDONED_KEPT = 256;

function toBytes(data: unknown): Uint8Array {
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new RemoteProtocolError("server sent a text message");
}

export class ServerLink {
  /** The bundle version the server hosts, once connected. */
  serverVersion: string | undefined;
  /** The server's message limit, announced in its welcome. */
  peerMaxMessage: number | undefined;
  /** Why the last connection ended badly, if it did. */
  lastError: string | undefined;

  private ws: WebSocketLike | null = null;
  private conn: ClientConnection | null = null;
  private connecting: Promise<void> | null = null;
  // Keyed by the id as the connection decodes it: a bigint id (beyond 2^53) never equals a
  // number key, so a reply under such an id matches nothing and is refused as a lie.
  private readonly pending = new Map<Id, Pending>();
  private readonly abandoned: Id[] = [];

  constructor(readonly options: LinkOptions) {}

  get url(): string {
    return this.options.url;
  }

  get connected(): boolean {
    return this.ws !== null && this.conn !== null && this.ws.readyState === OPEN;
  }

  /** Open the connection and run the handshake (no-op when connected; one at a time). */
  async connect(): Promise<void> {
    if (this.connected) return;
    this.connecting ??= this.open().finally(() => {
      this.connecting = null;
    });
    await this.connecting;
  }

  private open(): Promise<void> {
    const o = this.options;
    const conn = new ClientConnection({
      static: o.identity,
      serverPublic: o.serverKey,
      bundle: o.manifest.identity,
      version: o.manifest.version,
      timeNs: o.clock(),
      maxMessage: o.maxMessage,
      ...(o.protocol === undefined ? {} : { protocol: o.protocol }),
    });
    return new Promise<void>((resolve, reject) => {
      let settled = false;
      let ws: WebSocketLike;
      const fail = (error: Error): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
        try {
          ws.close();
        } catch {
          // already closed
        }
        reject(error);
      };
      const timer = setTimeout(
        () => fail(new OffloadUnavailable(`${o.url} did not answer the handshake in time`)),
        o.connectTimeoutMs,
      );
      try {
        ws = o.webSocket(o.url);
      } catch (error) {
        clearTimeout(timer);
        reject(new OffloadUnavailable(`cannot reach ${o.url}: ${String(error)}`));
        return;
      }
      ws.binaryType = "arraybuffer";
      ws.onerror = () => fail(new OffloadUnavailable(`cannot reach ${o.url}`));
      ws.onclose = (ev) => {
        if (ev.code === CLOSE_AUTH) {
          fail(
            new AuthenticationFailed(`the edge server ${o.url} rejected the handshake`, {
              hint:
                "check that this device's key is in the server's allow-list and that the " +
                "server key you pinned is that server's public key",
            }),
          );
        } else {
          fail(new OffloadUnavailable(`${o.url} closed the connection during the handshake (${ev.code})`));
        }
      };
      ws.onopen = () => {
        try {
          conn.start();
          for (const frame of conn.dataToSend()) ws.send(frame);
        } catch (error) {
          fail(error as Error);
        }
      };
      ws.onmessage = (ev) => {
        try {
          const events = conn.receive(toBytes(ev.data));
          const done = events[0];
          if (done === undefined || done.kind !== "handshake_complete") {
            throw new RemoteProtocolError("the server's handshake reply is not a welcome");
          }
          if (settled) return;
          settled = true;
          clearTimeout(timer);
          this.serverVersion = done.version;
          this.peerMaxMessage = conn.peerMaxMessage;
          this.attach(ws, conn);
          resolve();
        } catch (error) {
          if (error instanceof AuthenticationFailed) {
            fail(
              new AuthenticationFailed(`the handshake reply of ${o.url} failed authentication`, {
                hint: "the pinned server key must be the public key of the server you connect to",
              }),
            );
          } else {
            fail(error instanceof EdgeOffloadError ? error : new RemoteProtocolError(String(error)));
          }
        }
      };
    });
  }

  /** The connection is up: from now on every message is a transport message. */
  private attach(ws: WebSocketLike, conn: ClientConnection): void {
    this.ws = ws;
    this.conn = conn;
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      const receivedAt = performance.now();
      try {
        for (const event of conn.receive(toBytes(ev.data))) {
          const decryptMs = performance.now() - receivedAt;
          if (event.kind === "close") {
            this.lose(ws, new OffloadUnavailable(`${this.url} closed the connection: ${event.reason}`));
            return;
          }
          this.deliver(event, { event, receivedAt, decryptMs });
        }
      } catch (error) {
        const e = error instanceof EdgeOffloadError ? error : new RemoteProtocolError(String(error));
        this.lastError = e.message;
        this.lose(ws, e);
      }
    };
    ws.onerror = () => this.lose(ws, new OffloadUnavailable(`connection to ${this.url} lost`));
    ws.onclose = (ev) => {
      // 4401 after the handshake: the server could not authenticate a message of ours, or
      // this device's key was revoked. Never a reason to fall back silently.
      const error =
        ev.code === CLOSE_AUTH
          ? new AuthenticationFailed(`${this.url} closed the connection: authentication failed`, {
              hint: "the device key may have been revoked, or a message was altered on the way",
            })
          : new OffloadUnavailable(`connection to ${this.url} lost (${ev.code})`);
      this.lose(ws, error);
    };
  }

  /** Resolve the request `event` answers; a reply to nothing we asked is a lie. */
  private deliver(event: Event, answer: Answer): void {
    if (event.kind === "error") {
      const id = event.requestId;
      const entry = id === undefined ? undefined : this.pending.get(id);
      if (entry !== undefined && id !== undefined) {
        this.pending.delete(id);
        entry.reject(errorToException(event));
      }
      return; // an error for no request (or a late one) harms nobody
    }
    if (event.kind === "handshake_complete" || event.kind === "close") {
      throw new RemoteProtocolError(`an unexpected '${event.kind}' on an open connection`);
    }
    const id = event.requestId;
    const entry = this.pending.get(id);
    if (entry === undefined && this.abandoned.includes(id)) return;
    if (entry === undefined || entry.kind !== event.kind) {
      throw new RemoteProtocolError(
        `${this.url} sent a '${event.kind}' for request ${id}, which is not a request of ` +
          "this kind pending on this connection",
      );
    }
    this.pending.delete(id);
    entry.resolve(answer);
  }

  /** The connection ended: fail everything pending on it with `error`. */
  private lose(ws: WebSocketLike, error: Error): void {
    if (this.ws === ws) {
      this.ws = null;
      this.conn = null;
    }
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
    try {
      ws.close();
    } catch {
      // already closed
    }
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const entry of pending) entry.reject(error);
  }

  /** Forget the connection without waiting on a peer that may be dead. */
  drop(reason = "dropped"): void {
    if (this.ws !== null) this.lose(this.ws, new OffloadUnavailable(`connection to ${this.url} ${reason}`));
  }

  /** Send a close message, then drop. */
  close(): void {
    if (this.ws !== null && this.conn !== null && this.connected) {
      try {
        this.conn.sendClose();
        for (const frame of this.conn.dataToSend()) this.ws.send(frame);
      } catch (error) {
        if (!(error instanceof ProtocolError)) throw error;
      }
    }
    this.drop("closed");
  }

  /**
   * Queue one message (`build(connection)`) and send it; the reply of kind `reply` to
   * `requestId` resolves the returned `answer`.
   */
  async send(
    build: (conn: ClientConnection) => void,
    requestId: number,
    reply: Event["kind"],
  ): Promise<Sent> {
    const reused = this.connected;
    await this.connect();
    const ws = this.ws;
    const conn = this.conn;
    if (ws === null || conn === null) {
      // Lost between the handshake and this send (the peer closed at once).
      throw new OffloadUnavailable(`connection to ${this.url} lost before the request was sent`);
    }
    let pending!: Pending;
    const answer = new Promise<Answer>((resolve, reject) => {
      pending = { kind: reply, resolve, reject };
    });
    answer.catch(() => undefined); // rejections are read by the caller; never unhandled
    const started = performance.now();
    build(conn); // throws before anything is pending (PayloadError, LocalProtocolError)
    const frames = conn.dataToSend();
    const encryptMs = performance.now() - started;
    this.pending.set(requestId, pending);
    try {
      for (const frame of frames) ws.send(frame);
    } catch (error) {
      this.pending.delete(requestId);
      throw new OffloadUnavailable(`connection to ${this.url} lost while sending (${String(error)})`);
    }
    const wireBytes = frames.reduce((n, f) => n + f.byteLength, 0);
    return { answer, encryptMs, wireBytes, sentAt: performance.now(), reused };
  }

  /** Stop waiting for `requestId`; a late answer to it is then dropped quietly. */
  forget(requestId: number): void {
    if (this.pending.delete(requestId)) {
      this.abandoned.push(requestId);
      if (this.abandoned.length > ABANDONED_KEPT) this.abandoned.shift();
    }
  }
}
