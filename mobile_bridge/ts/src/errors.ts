/**
 * One error tree for everything the client throws on purpose, mirroring edgeoffload/errors.py
 * (PROTOCOL.md §9): the same class names and the same parentage, so an app can catch
 * `OffloadUnavailable` or `ProtocolError` exactly as a Python app does.
 */

export class EdgeOffloadError extends Error {
  /** What the user can do about it, when there is something to say. */
  readonly hint: string | undefined;

  constructor(message: string, options: { hint?: string; cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.hint = options.hint;
  }
}

/** An API argument has an invalid value. */
export class UsageError extends EdgeOffloadError {}

/** A bundle or its manifest is malformed, incomplete or fails hash verification. */
export class ManifestError extends EdgeOffloadError {}

/** Two parts that must come from the same bundle do not (their hashes differ). */
export class VersionMismatch extends EdgeOffloadError {}

/** The peer broke the wire protocol (or we would have). */
export class ProtocolError extends EdgeOffloadError {}

/** We were asked to do something the protocol does not allow in the current state. */
export class LocalProtocolError extends ProtocolError {}

/** The peer sent something the protocol does not allow. */
export class RemoteProtocolError extends ProtocolError {}

/** A handshake or transport message failed authentication; deliberately opaque. */
export class AuthenticationFailed extends ProtocolError {
  constructor(message = "authentication failed", options: { hint?: string; cause?: unknown } = {}) {
    super(message, options);
  }
}

/** A tensor payload is malformed: dtype, shape or byte length do not match. */
export class PayloadError extends ProtocolError {}

/** A generation-session message is not valid now (§12.8); only that session is affected. */
export class SessionError extends ProtocolError {}

/** The server no longer has the session (evicted, expired, restarted). */
export class SessionLost extends SessionError {}

/** No edge server could answer and the fallback policy is "error". */
export class OffloadUnavailable extends EdgeOffloadError {}

/** The server answered but could not serve this request (timeout, shutting down, internal). */
export class ServerBusy extends OffloadUnavailable {}

/** The server refused the request at its concurrency limit; `retryAfter` is its hint, seconds. */
export class Overloaded extends ServerBusy {
  readonly retryAfter: number | undefined;

  constructor(message: string, options: { hint?: string; retryAfter?: number } = {}) {
    super(message, options);
    this.retryAfter = options.retryAfter;
  }
}

/** Sampling parameters are invalid, or a logits vector cannot be sampled from. */
export class SamplingError extends EdgeOffloadError {}
