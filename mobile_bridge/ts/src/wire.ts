/**
 * Strict msgpack for the wire protocol (PROTOCOL.md §4), a port of edgeoffload/protocol/wire.py.
 *
 * Every envelope, handshake payload and transport plaintext is one msgpack map, decoded with hard
 * limits: no extension types, no duplicate keys, string keys only, bounded strings, arrays, maps
 * and binaries, valid UTF-8, no trailing bytes, at most {@link MAX_DEPTH} nested containers (the
 * nesting limit of msgpack-python, which the reference relies on). {@link StrictMap} then reads
 * fields with their types checked and rejects unknown keys. Any violation is a
 * {@link RemoteProtocolError}, as in Python.
 *
 * Why this module encodes and decodes by itself instead of through `@msgpack/msgpack`: strictness
 * and byte identity need information that library does not keep or cannot be told.
 * - Its decoder returns one JS `number` for msgpack ints and floats, so "an integer field rejects
 *   floats" and "`retry_ms` is an integer only" (§4, §7) could not be checked; it silently keeps
 *   the last of duplicate keys, and decodes invalid UTF-8 leniently.
 * - Its encoder with `useBigInt64` writes safe integers ≥ 2^32 as float64, and has no per-value
 *   way to write an integral float as float64 (the reference writes `temperature = 1.0` as `cb`).
 * The formats written here are those of msgpack-python with `use_bin_type=True` (the reference):
 * the shortest int, str, bin, array and map headers, floats as float64. The tests cross-check the
 * decoder against `@msgpack/msgpack` on every vector message.
 *
 * Value representation: ints decode to `number` when they are safe integers and to `bigint`
 * otherwise; floats (float32 or float64 on the wire) decode to {@link Float64}, so an int and a
 * float stay distinguishable; `bin` is `Uint8Array`, `str` is `string`, maps are
 * `Map<string, Value>` (insertion order kept, no prototype keys), arrays are arrays.
 */

import { LocalProtocolError, RemoteProtocolError, UsageError } from "./errors.js";

// Decoding limits (PROTOCOL.md §4). Tensor payloads are bounded by the connection's
// max_message; everything else is small.
export const MAX_STR = 4096;
export const MAX_ARRAY = 4096;
export const MAX_MAP = 64;
export const MAX_TENSORS = 1024;
export const MAX_DIMS = 32;
export const MAX_REQUEST_ID = 2n ** 63n - 1n;
/** Chunks in one prefill message, a replay after a lost session (§12.2). */
export const MAX_CHUNKS = 4096;
/** Nested containers msgpack-python accepts (its unpack stack); one more is a StackError. */
export const MAX_DEPTH = 1024;

/** A msgpack float. Decoding yields one for every float; encoding one always writes float64. */
export class Float64 {
  constructor(readonly value: number) {}
}

/** A request id (or any protocol integer): a `number` when it is a safe integer, else `bigint`. */
export type Id = number | bigint;

/** What {@link unpack} returns, at any depth. */
export type Value =
  | null
  | boolean
  | number
  | bigint
  | Float64
  | string
  | Uint8Array
  | Value[]
  | WireMap;
export type WireMap = Map<string, Value>;

/**
 * What {@link pack} accepts. A JS number that is a safe integer is written as an int, any other
 * number as float64 (wrap a number in {@link Float64} to force float64). Plain objects are
 * written in their key order; keys whose value is `undefined` are left out (an absent optional
 * field), so is nothing else: `null` is written as nil.
 */
export type Encodable =
  | null
  | boolean
  | number
  | bigint
  | Float64
  | string
  | Uint8Array
  | readonly Encodable[]
  | ReadonlyMap<string, Encodable>
  | { readonly [key: string]: Encodable | undefined };

/** The canonical form of a protocol integer: `number` when safe, `bigint` otherwise. */
export function canonicalInt(value: number | bigint): Id {
  if (typeof value === "number") return value;
  return value >= BigInt(Number.MIN_SAFE_INTEGER) && value <= BigInt(Number.MAX_SAFE_INTEGER)
    ? Number(value)
    : value;
}

/** `text` cut to at most `limit` UTF-8 bytes, on a character boundary (peers count bytes). */
export function truncateUtf8(text: string, limit: number = MAX_STR): string {
  const data = utf8Encoder.encode(text);
  if (data.length <= limit) return text;
  let end = limit;
  // Back off over continuation bytes (10xxxxxx): the character they belong to does not fit.
  while (end > 0 && ((data[end] ?? 0) & 0xc0) === 0x80) end -= 1;
  return utf8Decoder.decode(data.subarray(0, end));
}

// -- encoding -------------------------------------------------------------------------------------

const utf8Encoder = new TextEncoder();
// fatal: invalid UTF-8 is an error (as Python's strict decoding); ignoreBOM: keep a leading U+FEFF.
const utf8Decoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

/** bin values at least this big are referenced by {@link packParts}, not copied. */
export const ZERO_COPY_BIN = 1 << 14;

const UINT64_MAX = 2n ** 64n - 1n;
const INT64_MIN = -(2n ** 63n);

/** Accumulates small writes; large bin payloads are kept as separate parts. */
class Writer {
  readonly parts: Uint8Array[] = [];
  private buf = new Uint8Array(256);
  private view = new DataView(this.buf.buffer);
  private pos = 0;

  private reserve(n: number): void {
    if (this.pos + n <= this.buf.length) return;
    const bigger = new Uint8Array(Math.max(this.buf.length * 2, this.pos + n));
    bigger.set(this.buf.subarray(0, this.pos));
    this.buf = bigger;
    this.view = new DataView(bigger.buffer);
  }

  u8(v: number): void {
    this.reserve(1);
    this.buf[this.pos++] = v;
  }
  head(tag: number, size: number, v: number | bigint): void {
    this.reserve(1 + size);
    this.buf[this.pos] = tag;
    const at = this.pos + 1;
    if (size === 1) this.view.setUint8(at, Number(v) & 0xff);
    else if (size === 2) this.view.setUint16(at, Number(v));
    else if (size === 4) this.view.setUint32(at, Number(v));
    else if (typeof v === "bigint") {
      if (v < 0n) this.view.setBigInt64(at, v);
      else this.view.setBigUint64(at, v);
    } else this.view.setFloat64(at, v);
    this.pos += 1 + size;
  }
  bytes(data: Uint8Array): void {
    if (data.length >= ZERO_COPY_BIN) {
      this.flush();
      this.parts.push(data);
      return;
    }
    this.reserve(data.length);
    this.buf.set(data, this.pos);
    this.pos += data.length;
  }
  flush(): void {
    if (this.pos > 0) this.parts.push(this.buf.slice(0, this.pos));
    this.pos = 0;
  }
}

function writeInt(w: Writer, v: bigint): void {
  if (v >= 0n) {
    if (v < 0x80n) w.u8(Number(v));
    else if (v < 0x100n) w.head(0xcc, 1, v);
    else if (v < 0x10000n) w.head(0xcd, 2, v);
    else if (v < 0x100000000n) w.head(0xce, 4, v);
    else if (v <= UINT64_MAX) w.head(0xcf, 8, v);
    else throw new UsageError(`integer ${v} does not fit msgpack's 64 bits`);
  } else {
    if (v >= -0x20n) w.u8(0x100 + Number(v));
    else if (v >= -0x80n) w.head(0xd0, 1, v);
    else if (v >= -0x8000n) w.head(0xd1, 2, BigInt.asUintN(16, v));
    else if (v >= -0x80000000n) w.head(0xd2, 4, BigInt.asUintN(32, v));
    else if (v >= INT64_MIN) w.head(0xd3, 8, v);
    else throw new UsageError(`integer ${v} does not fit msgpack's 64 bits`);
  }
}

/** Header formats of one family: fixed (with its limit), then 8-, 16- and 32-bit lengths. */
interface Family {
  fix?: number;
  fixMax?: number;
  tag8?: number;
  tag16: number;
  tag32: number;
}
const STR: Family = { fix: 0xa0, fixMax: 32, tag8: 0xd9, tag16: 0xda, tag32: 0xdb };
const BIN: Family = { tag8: 0xc4, tag16: 0xc5, tag32: 0xc6 };
const ARRAY: Family = { fix: 0x90, fixMax: 16, tag16: 0xdc, tag32: 0xdd };
const MAP: Family = { fix: 0x80, fixMax: 16, tag16: 0xde, tag32: 0xdf };

function writeLength(w: Writer, n: number, f: Family): void {
  if (f.fix !== undefined && n < (f.fixMax ?? 0)) w.u8(f.fix + n);
  else if (f.tag8 !== undefined && n < 0x100) w.head(f.tag8, 1, n);
  else if (n < 0x10000) w.head(f.tag16, 2, n);
  else if (n <= 0xffffffff) w.head(f.tag32, 4, n);
  else throw new UsageError(`msgpack value of ${n} elements or bytes is too long`);
}

function isPlainMap(value: object): value is ReadonlyMap<string, Encodable> {
  return value instanceof Map;
}

function writeValue(w: Writer, value: Encodable | undefined, depth: number): void {
  if (depth > MAX_DEPTH) throw new UsageError(`msgpack value nested deeper than ${MAX_DEPTH}`);
  if (value === null) w.u8(0xc0);
  else if (value === false) w.u8(0xc2);
  else if (value === true) w.u8(0xc3);
  else if (typeof value === "number") {
    if (Number.isSafeInteger(value)) writeInt(w, BigInt(value));
    else w.head(0xcb, 8, value);
  } else if (typeof value === "bigint") writeInt(w, value);
  else if (typeof value === "string") {
    const data = utf8Encoder.encode(value);
    writeLength(w, data.length, STR);
    w.bytes(data);
  } else if (value instanceof Float64) w.head(0xcb, 8, value.value);
  else if (value instanceof Uint8Array) {
    writeLength(w, value.length, BIN);
    w.bytes(value);
  } else if (Array.isArray(value)) {
    const items = value as readonly Encodable[];
    writeLength(w, items.length, ARRAY);
    for (const item of items) writeValue(w, item, depth + 1);
  } else if (typeof value === "object") {
    const entries: Array<[string, Encodable]> = [];
    const source = isPlainMap(value) ? value.entries() : Object.entries(value);
    for (const [key, item] of source) {
      if (typeof key !== "string") throw new UsageError("msgpack map keys must be strings");
      if (item !== undefined) entries.push([key, item as Encodable]);
    }
    writeLength(w, entries.length, MAP);
    for (const [key, item] of entries) {
      writeValue(w, key, depth + 1);
      writeValue(w, item, depth + 1);
    }
  } else {
    throw new UsageError(`cannot encode a ${typeof value} in msgpack`);
  }
}

/**
 * The msgpack encoding of `value` as buffers whose concatenation equals {@link pack}'s output;
 * `bin` values of at least {@link ZERO_COPY_BIN} bytes are referenced, not copied, so a large
 * tensor goes from its own memory straight into encryption (`Transport.encryptParts`).
 */
export function packParts(value: Encodable): Uint8Array[] {
  const w = new Writer();
  writeValue(w, value, 1);
  w.flush();
  if (w.parts.length === 0) w.parts.push(new Uint8Array(0));
  return w.parts;
}

/** The msgpack encoding of `value` (byte-identical to msgpack-python `use_bin_type=True`). */
export function pack(value: Encodable): Uint8Array {
  return concatBytes(packParts(value));
}

/** One buffer holding `parts` in order. */
export function concatBytes(parts: readonly Uint8Array[]): Uint8Array {
  if (parts.length === 1) return parts[0]!;
  let size = 0;
  for (const p of parts) size += p.length;
  const out = new Uint8Array(size);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

// -- decoding -------------------------------------------------------------------------------------

/** Thrown inside the decoder; {@link unpack} turns it into the reference's error text. */
class Malformed extends Error {}

class Reader {
  private pos = 0;
  private readonly view: DataView;

  constructor(
    private readonly data: Uint8Array,
    private readonly maxBin: number,
  ) {
    this.view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  }

  get remaining(): number {
    return this.data.length - this.pos;
  }

  private need(n: number): number {
    if (this.remaining < n) throw new Malformed("incomplete input");
    const at = this.pos;
    this.pos += n;
    return at;
  }

  private u(size: 1 | 2 | 4): number {
    const at = this.need(size);
    return size === 1
      ? this.view.getUint8(at)
      : size === 2
        ? this.view.getUint16(at)
        : this.view.getUint32(at);
  }

  private str(n: number): string {
    if (n > MAX_STR) throw new Malformed(`str of ${n} bytes exceeds max_str_len ${MAX_STR}`);
    const at = this.need(n);
    try {
      return utf8Decoder.decode(this.data.subarray(at, at + n));
    } catch {
      throw new Malformed("invalid UTF-8 in a str");
    }
  }

  private bin(n: number): Uint8Array {
    if (n > this.maxBin) {
      throw new Malformed(`bin of ${n} bytes exceeds max_bin_len ${this.maxBin}`);
    }
    const at = this.need(n);
    return this.data.subarray(at, at + n);
  }

  private array(n: number, depth: number): Value[] {
    if (n > MAX_ARRAY) throw new Malformed(`array of ${n} exceeds max_array_len ${MAX_ARRAY}`);
    if (depth > MAX_DEPTH) throw new Malformed("nesting too deep");
    // Every element takes at least one byte: refuse before allocating for a lying header.
    if (n > this.remaining) throw new Malformed("incomplete input");
    const out: Value[] = [];
    for (let i = 0; i < n; i++) out.push(this.value(depth));
    return out;
  }

  private map(n: number, depth: number): WireMap {
    if (n > MAX_MAP) throw new Malformed(`map of ${n} exceeds max_map_len ${MAX_MAP}`);
    if (depth > MAX_DEPTH) throw new Malformed("nesting too deep");
    if (2 * n > this.remaining) throw new Malformed("incomplete input");
    const out: WireMap = new Map();
    for (let i = 0; i < n; i++) {
      const key = this.value(depth);
      // strict_map_key: str (or bin) keys only. A bin key can never name a field, and every
      // map the client reads is field-checked, so refusing it here is the same outcome.
      if (typeof key !== "string") throw new Malformed("map keys must be strings");
      const item = this.value(depth);
      if (out.has(key)) {
        throw new RemoteProtocolError(`duplicate key ${JSON.stringify(key)} in a message map`);
      }
      out.set(key, item);
    }
    return out;
  }

  private int64(signed: boolean): Id {
    const at = this.need(8);
    return canonicalInt(signed ? this.view.getBigInt64(at) : this.view.getBigUint64(at));
  }

  /** One value; `depth` counts the containers it sits in. */
  value(depth: number): Value {
    const b = this.u(1);
    if (b <= 0x7f) return b;
    if (b >= 0xe0) return b - 0x100;
    if (b >= 0xa0 && b <= 0xbf) return this.str(b - 0xa0);
    if (b >= 0x90 && b <= 0x9f) return this.array(b - 0x90, depth + 1);
    if (b >= 0x80 && b <= 0x8f) return this.map(b - 0x80, depth + 1);
    switch (b) {
      case 0xc0:
        return null;
      case 0xc2:
        return false;
      case 0xc3:
        return true;
      case 0xc4:
        return this.bin(this.u(1));
      case 0xc5:
        return this.bin(this.u(2));
      case 0xc6:
        return this.bin(this.u(4));
      case 0xca:
        return new Float64(this.view.getFloat32(this.need(4)));
      case 0xcb:
        return new Float64(this.view.getFloat64(this.need(8)));
      case 0xcc:
        return this.u(1);
      case 0xcd:
        return this.u(2);
      case 0xce:
        return this.u(4);
      case 0xcf:
        return this.int64(false);
      case 0xd0:
        return this.view.getInt8(this.need(1));
      case 0xd1:
        return this.view.getInt16(this.need(2));
      case 0xd2:
        return this.view.getInt32(this.need(4));
      case 0xd3:
        return this.int64(true);
      case 0xd9:
        return this.str(this.u(1));
      case 0xda:
        return this.str(this.u(2));
      case 0xdb:
        return this.str(this.u(4));
      case 0xdc:
        return this.array(this.u(2), depth + 1);
      case 0xdd:
        return this.array(this.u(4), depth + 1);
      case 0xde:
        return this.map(this.u(2), depth + 1);
      case 0xdf:
        return this.map(this.u(4), depth + 1);
      case 0xc7:
      case 0xc8:
      case 0xc9:
      case 0xd4:
      case 0xd5:
      case 0xd6:
      case 0xd7:
      case 0xd8:
        // Every extension type, the msgpack timestamp (-1) included (§4).
        throw new RemoteProtocolError("msgpack extension types are not allowed");
      default: // 0xc1, never used
        throw new Malformed(`unknown msgpack type byte 0x${b.toString(16)}`);
    }
  }
}

/**
 * Decode one message map with the limits of §4; `maxBin` bounds every `bin` (4096 for handshake
 * envelopes, 64 for the hello payload, the connection's `max_message` for transport messages).
 */
export function unpack(data: Uint8Array, opts: { maxBin: number }): WireMap {
  const reader = new Reader(data, opts.maxBin);
  let obj: Value;
  try {
    obj = reader.value(0);
    if (reader.remaining > 0) throw new Malformed(`${reader.remaining} trailing bytes`);
  } catch (exc) {
    if (exc instanceof Malformed) {
      throw new RemoteProtocolError(`malformed msgpack message (${exc.message})`);
    }
    throw exc;
  }
  if (!(obj instanceof Map)) throw new RemoteProtocolError("a message must be a msgpack map");
  return obj;
}

// -- field access ---------------------------------------------------------------------------------

/** The msgpack types a field may be required to have, and what reading it gives. */
export interface Kinds {
  str: string;
  int: Id;
  /** int or float, as a JS number (`server_ms`, `tail_ms`): what Python's `(int, float)` takes. */
  number: number;
  bool: boolean;
  bin: Uint8Array;
  array: Value[];
  map: WireMap;
  any: Value;
}

function hasKind(value: Value, kind: keyof Kinds): boolean {
  switch (kind) {
    case "str":
      return typeof value === "string";
    case "int":
      return typeof value === "number" || typeof value === "bigint";
    case "number":
      return typeof value === "number" || typeof value === "bigint" || value instanceof Float64;
    case "bool":
      return typeof value === "boolean";
    case "bin":
      return value instanceof Uint8Array;
    case "array":
      return Array.isArray(value);
    case "map":
      return value instanceof Map;
    case "any":
      return true;
  }
}

/** Typed, strict accessors over a decoded map: unknown keys are an error at {@link done}. */
export class StrictMap {
  private readonly seen = new Set<string>();

  constructor(
    readonly data: WireMap,
    readonly what: string,
  ) {}

  has(key: string): boolean {
    return this.data.has(key);
  }

  /** A required field of msgpack type `kind` (a bool is never an int, nil is never anything). */
  get<K extends keyof Kinds>(key: string, kind: K): Kinds[K];
  /** An optional field: `undefined` when absent (an explicit nil is a wrong type, §4). */
  get<K extends keyof Kinds>(key: string, kind: K, opts: { optional: true }): Kinds[K] | undefined;
  get<K extends keyof Kinds>(
    key: string,
    kind: K,
    opts?: { optional: true },
  ): Kinds[K] | undefined {
    this.seen.add(key);
    if (!this.data.has(key)) {
      if (opts?.optional) return undefined;
      throw new RemoteProtocolError(`${this.what}: missing field '${key}'`);
    }
    const value = this.data.get(key) as Value;
    if (!hasKind(value, kind)) {
      throw new RemoteProtocolError(
        kind === "int" && typeof value === "boolean"
          ? `${this.what}: field '${key}' must be an integer`
          : `${this.what}: field '${key}' has the wrong type`,
      );
    }
    if (kind === "number") {
      const n = value instanceof Float64 ? value.value : Number(value as number | bigint);
      return n as Kinds[K];
    }
    return value as Kinds[K];
  }

  /** A request id: an integer in 0..2^63−1 (§7), canonical (number when safe, else bigint). */
  requestId(key = "id"): Id {
    const value = this.get(key, "int");
    if (!inIdRange(value)) throw new RemoteProtocolError(`${this.what}: request id out of range`);
    return value;
  }

  /** Every field was read: anything else is an unknown field (field sets are closed, §4). */
  done(): void {
    const extra = [...this.data.keys()].filter((k) => !this.seen.has(k)).sort();
    if (extra.length > 0) {
      throw new RemoteProtocolError(
        `${this.what}: unknown field(s) [${extra.map((k) => `'${k}'`).join(", ")}]`,
      );
    }
  }
}

/** Whether an integer is a valid request id or count, 0..2^63−1. */
export function inIdRange(value: Id): boolean {
  return typeof value === "bigint" ? value >= 0n && value <= MAX_REQUEST_ID : value >= 0;
}

/**
 * An id or count this side is about to send, checked: JS has one number type, so a fraction or
 * a negative would otherwise go out as a float or a negative int that the peer rejects (4400).
 */
export function checkOutgoingId(value: Id, what: string): Id {
  const ok =
    typeof value === "bigint"
      ? value >= 0n && value <= MAX_REQUEST_ID
      : Number.isSafeInteger(value) && value >= 0;
  if (!ok) {
    throw new LocalProtocolError(
      `${what} must be an integer in 0..2^63-1 (a safe integer when a number), ` +
        `got ${String(value)}`,
    );
  }
  return canonicalInt(value);
}
