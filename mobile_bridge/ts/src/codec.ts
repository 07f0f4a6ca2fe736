/**
 * Tensor codecs (PROTOCOL.md §8): quantise and compress the tensors that cross a model cut, and
 * decode — as hostile input — the ones that come back. A port of `edgeoffload/core/codec.py`;
 * every check of `codec.decode` (§8.4 stage 3) is here, in the same order, with messages as
 * specific as the Python ones.
 *
 * Quantisations (`none`, `fp16`, `int8`, `int8c`) are bit-exact with numpy: fp16 is the
 * round-to-nearest-even conversion numpy performs (NaN payloads included) with the saturation of
 * finite overflow to ±65504; int8/int8c compute their scales in float64 rounded to float32, and
 * quantise float32 arrays in float32 arithmetic (`Math.fround` of an exact double product or a
 * correctly rounded double quotient is exactly the float32 operation).
 *
 * Compressions:
 *
 * - zstd uses `@bokuweb/zstd-wasm` (level 1, one frame with its content size, as the reference)
 *   for the entropy decoding itself, but the library alone cannot enforce §8.3: its
 *   `decompress` accepts several concatenated (and skippable) frames, and reads the declared
 *   content size through a legalised 64-bit wasm return of which it sees only the low 32 bits
 *   (so 2^32 + 64 reads as 64), then allocates that much. So this module parses the
 *   frame header itself (RFC 8878 §3.1.1) for the declared content size and walks the block
 *   headers to find where the frame ends (nothing may follow it), before the library runs with
 *   an output capacity of exactly the expected byte count (so it never produces more).
 *   The wasm must be loaded once, asynchronously: call `await initCodecs()` before the first
 *   zstd tensor; `encode` and `decode` stay synchronous (they sit on the hot path, like Python's)
 *   and throw a UsageError naming `initCodecs` if zstd is needed before that.
 * - lz4 blocks are encoded and decoded by the small codec at the end of this module, not by
 *   `lz4js`: its `decompressBlock` has no bounds checks at all (a hostile block reads past its
 *   input, copies from before the output, and its overruns are dropped silently), and its
 *   `compressBlock` can start the last match 10 or 11 bytes before the end of the block, which
 *   the LZ4 block format forbids and the reference decoder (lz4 1.9.4, which the Python server
 *   uses) rejects; it also returns 0 for input it cannot compress. The block format is tiny and
 *   fully specified; the decoder here applies the end-of-block rules of `LZ4_decompress_safe`
 *   for a block of known size, and refuses match offset 0, which the format calls invalid and
 *   lz4 1.9.4 accepts.
 *
 * Byte order is little-endian on the wire; everything is read and written through DataView or
 * byte arithmetic, never through a platform-endian typed array view (except in
 * `toTypedArray`/`fromTypedArray`, which swap on a big-endian host). No Node-only APIs: this
 * module runs in Node and in a browser bundle.
 */

import { compress as zstdCompress, decompress as zstdDecompress, init as zstdInit } from "@bokuweb/zstd-wasm";

import { PayloadError, UsageError } from "./errors.js";
import { ITEM_SIZES, type DType, type EncodedTensor, type RawTensor } from "./types.js";

export const QUANTS = ["none", "fp16", "int8", "int8c"] as const;
export const COMPRESSIONS = ["none", "zstd", "lz4"] as const;
export type Quant = (typeof QUANTS)[number];
export type Compression = (typeof COMPRESSIONS)[number];

/** The dtypes allowed on the wire (§8.1), in the reference's order. */
export const ALLOWED_DTYPES = Object.keys(ITEM_SIZES) as readonly DType[];

/** Upper bound on one tensor's decoded size in bytes (`decode`'s `maxBytes` tightens it). */
export const MAX_TENSOR_BYTES = 2 ** 31;
/** Most dimensions a tensor may have. */
export const MAX_NDIM = 32;
export const ZSTD_LEVEL = 1;
export const FP16_MAX = 65504;

const F32_MAX = 3.4028234663852886e38;
const F32_TINY = 2 ** -126; // smallest normal float32

/**
 * Largest float32 scale with `127 × scale ≤ float32 max` (bits 0x7c010203), so dequantising
 * never overflows. Computed as the reference does: float32(max / 127), stepped down while the
 * product (in float64) overflows.
 */
export const SCALE_MAX: number = (() => {
  const bits = new Uint32Array(1);
  const f = new Float32Array(bits.buffer);
  f[0] = F32_MAX / 127;
  while (f[0]! * 127 > F32_MAX) bits[0] = bits[0]! - 1; // positive float32: next one down
  return f[0]!;
})();

const VALID_FORMS =
  "valid codecs: none | fp16 | int8 | int8c | zstd | lz4 | <quant>+<compression> " +
  "(e.g. fp16+zstd, int8+lz4)";

// --- codec names -----------------------------------------------------------------------------

/** Which quantisation and which compression to apply; `name` is the canonical form (§8.2). */
export interface CodecSpec {
  readonly quant: Quant;
  readonly compression: Compression;
  readonly name: string;
}

function spec(quant: Quant, compression: Compression): CodecSpec {
  const name = compression === "none" ? quant : quant === "none" ? compression : `${quant}+${compression}`;
  return { quant, compression, name };
}

const CANONICAL: ReadonlyMap<string, CodecSpec> = new Map(
  QUANTS.flatMap((q) => COMPRESSIONS.map((c) => spec(q, c))).map((s) => [s.name, s] as const),
);

/** The spec of a canonical codec name, or undefined (`none+zstd`, `FP16`, `zstd+fp16`: undefined). */
function canonicalOrUndefined(name: unknown): CodecSpec | undefined {
  return typeof name === "string" ? CANONICAL.get(name) : undefined;
}

/**
 * Parse a canonical codec name (§8.2): `none`, `fp16`, `int8`, `int8c`, `zstd`, `lz4` or
 * `<quant>+<compression>` with neither part `none`. Only canonical names are accepted — they are
 * the only ones valid on the wire, and a bundle manifest records the canonical name.
 *
 * @throws UsageError the name is not canonical (the hint lists the valid forms).
 */
export function parseCodec(name: string): CodecSpec {
  const parsed = canonicalOrUndefined(name);
  if (parsed === undefined) {
    throw new UsageError(`invalid codec ${JSON.stringify(name)}; ${VALID_FORMS}`, { hint: VALID_FORMS });
  }
  return parsed;
}

function isQuantisable(dtype: string): boolean {
  return dtype === "float32" || dtype === "float64";
}

/**
 * The codec actually applied to a tensor of `dtype` under the bundle codec: quantisation
 * applies to float32 and float64 only; every other dtype (float16 included) keeps quant `none`
 * and the compression (`int64` under `fp16+zstd` travels as `zstd`).
 *
 * @throws UsageError `bundleCodec` is a string that is not a canonical codec name.
 */
export function codecFor(bundleCodec: string | CodecSpec, dtype: DType): CodecSpec {
  const s = typeof bundleCodec === "string" ? parseCodec(bundleCodec) : bundleCodec;
  return s.quant === "none" || isQuantisable(dtype) ? s : spec("none", s.compression);
}

// --- zstd wasm loading -----------------------------------------------------------------------

let zstdReady = false;
let zstdLoading: Promise<void> | undefined;

/**
 * Load the zstd wasm (once; later calls return the same promise, and a failed load may be
 * retried). Needed before the first `encode`/`decode` of a zstd codec; the other codecs work
 * without it.
 *
 * In Node the package reads its `zstd.wasm` from its own folder. In a browser bundle (the
 * package's `browser` build) it fetches `zstd.wasm` relative to the bundle's URL unless
 * `zstdWasmUrl` says where it is served: copy
 * `node_modules/@bokuweb/zstd-wasm/dist/web/zstd.wasm` next to the bundle, or pass its URL.
 */
export function initCodecs(options: { zstdWasmUrl?: string } = {}): Promise<void> {
  if (zstdLoading === undefined) {
    // The Node build's init takes no argument; the browser build's takes the wasm URL.
    const load = zstdInit as (path?: string) => Promise<void>;
    zstdLoading = load(options.zstdWasmUrl).then(
      () => {
        zstdReady = true;
      },
      (error: unknown) => {
        zstdLoading = undefined;
        throw new UsageError(`cannot load the zstd wasm: ${String(error)}`, {
          cause: error,
          hint: "in a browser, serve zstd.wasm next to the bundle or pass initCodecs({ zstdWasmUrl })",
        });
      },
    );
  }
  return zstdLoading;
}

function requireZstd(): void {
  if (!zstdReady) {
    throw new UsageError("zstd is not loaded: call `await initCodecs()` before encoding or decoding a zstd tensor");
  }
}

// --- fp16 ------------------------------------------------------------------------------------

/** Round half to even (numpy's `rint`) of a double; exact, since `v - floor(v)` is exact. */
export function roundHalfEven(v: number): number {
  const r = Math.floor(v);
  const d = v - r;
  if (d > 0.5) return r + 1;
  if (d < 0.5) return r;
  return r % 2 === 0 ? r : r + 1;
}

const f64Scratch = new Float64Array(1);
const f64ScratchWords = new Uint32Array(f64Scratch.buffer);
const HI = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1 ? 1 : 0; // index of the high word

/**
 * The binary16 bits of a non-NaN double (float64 tensors), rounded to nearest even in one step
 * from the double as numpy does (not via float32), with finite overflow saturated to ±65504.
 */
function halfBitsOf(x: number): number {
  const sign = x < 0 || Object.is(x, -0) ? 0x8000 : 0;
  const a = Math.abs(x);
  if (a === Infinity) return sign | 0x7c00;
  if (a >= 65520) return sign | 0x7bff; // would round to inf: saturate
  if (a < 2 ** -14) return sign | roundHalfEven(a * 2 ** 24); // subnormal half (1024 = 2^-14)
  f64Scratch[0] = a;
  let e = ((f64ScratchWords[HI]! >>> 20) & 0x7ff) - 1023;
  let m = roundHalfEven(a * 2 ** (10 - e)); // in [1024, 2048]
  if (m === 2048) {
    e += 1;
    m = 1024;
  }
  return sign | ((e + 15) << 10) | (m - 1024);
}

/**
 * The binary16 bits of a float32 given by its bits: numpy's `npy_floatbits_to_halfbits` (round
 * to nearest even in integer arithmetic, NaN payloads kept), except that finite overflow
 * saturates to ±65504 (§8.3). The float32 hot path; `halfBitsOf` gives the same for non-NaN.
 */
function halfBitsOfF32(f: number): number {
  const sign = (f >>> 16) & 0x8000;
  const exp = f & 0x7f800000;
  if (exp >= 0x47800000) {
    // |x| >= 2^16: inf, NaN, or finite overflow
    if (exp !== 0x7f800000) return sign | 0x7bff;
    const sig = f & 0x7fffff;
    return sig === 0 ? sign | 0x7c00 : halfNaN(sign, sig >>> 13);
  }
  if (exp <= 0x38000000) {
    // |x| <= 2^-14: a subnormal half or zero
    if (exp < 0x33000000) return sign;
    let sig = (0x800000 + (f & 0x7fffff)) >>> (113 - (exp >>> 23));
    if ((sig & 0x3fff) !== 0x1000 || (f & 0x7ff) !== 0) sig += 0x1000; // ties to even
    return sign | (sig >>> 13);
  }
  let sig = f & 0x7fffff;
  if ((sig & 0x3fff) !== 0x1000) sig += 0x1000; // ties to even; a carry bumps the exponent
  const h = ((exp - 0x38000000) >>> 13) + (sig >>> 13);
  return sign | (h === 0x7c00 ? 0x7bff : h); // rounded up to inf: saturate
}

/** numpy's NaN conversion: keep the top significand bits, stay a NaN. `sig10` = those bits. */
function halfNaN(signBit: number, sig10: number): number {
  return (signBit ? 0x8000 : 0) | (0x7c00 + (sig10 === 0 ? 1 : sig10));
}

let halfToF32Table: Uint32Array | undefined;
let halfToF64HiTable: Uint32Array | undefined;

/**
 * Lookup tables from binary16 bits to float32 bits and to the high word of float64 bits (a half
 * has at most 11 significant bits, so the low word is always 0). NaN payloads are kept, as numpy
 * keeps them.
 */
function halfTables(): [Uint32Array, Uint32Array] {
  if (halfToF32Table === undefined || halfToF64HiTable === undefined) {
    const t32 = new Uint32Array(65536);
    const t64 = new Uint32Array(65536);
    for (let h = 0; h < 65536; h++) {
      const sign = (h & 0x8000) << 16;
      const exp = (h >> 10) & 0x1f;
      let sig = h & 0x3ff;
      if (exp === 0x1f) {
        t32[h] = (sign | 0x7f800000 | (sig << 13)) >>> 0;
        t64[h] = (sign | 0x7ff00000 | (sig << 10)) >>> 0;
      } else if (exp === 0 && sig === 0) {
        t32[h] = sign >>> 0;
        t64[h] = sign >>> 0;
      } else {
        let e = exp - 15;
        if (exp === 0) {
          e = -14; // subnormal: normalise
          while ((sig & 0x400) === 0) {
            sig <<= 1;
            e -= 1;
          }
          sig &= 0x3ff;
        }
        t32[h] = (sign | ((e + 127) << 23) | (sig << 13)) >>> 0;
        t64[h] = (sign | ((e + 1023) << 20) | (sig << 10)) >>> 0;
      }
    }
    halfToF32Table = t32;
    halfToF64HiTable = t64;
  }
  return [halfToF32Table, halfToF64HiTable];
}

function quantiseFp16(dtype: "float32" | "float64", bytes: Uint8Array, count: number): Uint8Array {
  const src = view(bytes);
  const out = new Uint8Array(2 * count);
  const dst = view(out);
  for (let i = 0; i < count; i++) {
    let h: number;
    if (dtype === "float32") {
      h = halfBitsOfF32(src.getUint32(4 * i, true));
    } else {
      const hi = src.getUint32(8 * i + 4, true);
      const lo = src.getUint32(8 * i, true);
      const isNaN = (hi & 0x7ff00000) === 0x7ff00000 && ((hi & 0xfffff) !== 0 || lo !== 0);
      h = isNaN ? halfNaN(hi >>> 31, (hi & 0xfffff) >>> 10) : halfBitsOf(src.getFloat64(8 * i, true));
    }
    dst.setUint16(2 * i, h, true);
  }
  return out;
}

function dequantiseFp16(dtype: DType, payload: Uint8Array, count: number): Uint8Array {
  const [t32, t64] = halfTables();
  const src = view(payload);
  const out = new Uint8Array(count * ITEM_SIZES[dtype]);
  const dst = view(out);
  for (let i = 0; i < count; i++) {
    const h = src.getUint16(2 * i, true);
    if (dtype === "float32") dst.setUint32(4 * i, t32[h]!, true);
    else dst.setUint32(8 * i + 4, t64[h]!, true); // low word stays 0
  }
  return out;
}

// --- int8 / int8c ----------------------------------------------------------------------------

/** For int8c on ≥ 2 dims: channel of element `i` is `floor(i / inner) % channels`. */
interface ChannelLayout {
  readonly channels: number;
  readonly inner: number;
}

function channelLayout(quant: Quant, shape: readonly number[]): ChannelLayout {
  if (quant === "int8c" && shape.length >= 2) {
    return { channels: shape[1]!, inner: shape.slice(2).reduce((a, b) => a * b, 1) };
  }
  return { channels: 1, inner: 1 };
}

function channelOf(i: number, layout: ChannelLayout): number {
  return layout.channels === 1 ? 0 : Math.floor(i / layout.inner) % layout.channels;
}

function readFloat(src: DataView, dtype: "float32" | "float64", i: number): number {
  return dtype === "float32" ? src.getFloat32(4 * i, true) : src.getFloat64(8 * i, true);
}

/** float32 scales as the reference stores them: one per channel (one for int8). */
function int8Scales(quant: Quant, dtype: "float32" | "float64", bytes: Uint8Array, shape: readonly number[], count: number): Float64Array {
  const layout = channelLayout(quant, shape);
  const src = view(bytes);
  const m = new Float64Array(layout.channels); // max|x| per channel, 0 for empty channels
  for (let i = 0; i < count; i++) {
    const c = channelOf(i, layout);
    const a = Math.abs(readFloat(src, dtype, i));
    if (a > m[c]! || Number.isNaN(a)) m[c] = a; // once NaN, stays NaN (numpy's max propagates it)
  }
  let largest = 0;
  for (const v of m) {
    if (!Number.isFinite(v)) {
      throw new PayloadError(`cannot ${quant}-quantise a tensor that contains NaN or inf; use codec fp16 or a lossless codec`);
    }
    largest = Math.max(largest, v);
  }
  if (largest > F32_MAX) {
    throw new PayloadError(
      `values up to ${formatG(largest)} are beyond float32 range, too large for ${quant}; use a lossless codec`,
    );
  }
  const scales = new Float64Array(layout.channels);
  for (let c = 0; c < m.length; c++) {
    // Clamping a scale that rounded up past SCALE_MAX moves it by one ulp: within the bound.
    const s = m[c] === 0 ? 1 : Math.fround(Math.min(m[c]! / 127, SCALE_MAX));
    scales[c] = Math.max(s, F32_TINY);
  }
  return scales;
}

function quantiseInt8(
  quant: Quant,
  dtype: "float32" | "float64",
  bytes: Uint8Array,
  shape: readonly number[],
  count: number,
): { q: Uint8Array; scales: Uint8Array } {
  const scales = int8Scales(quant, dtype, bytes, shape, count);
  const f32 = dtype === "float32";
  // The reciprocal and the product are computed in the input's precision (float32 for float32).
  const inv = scales.map((s) => (f32 ? Math.fround(1 / s) : 1 / s));
  const layout = channelLayout(quant, shape);
  const src = view(bytes);
  const q = new Uint8Array(count);
  for (let i = 0; i < count; i++) {
    const x = readFloat(src, dtype, i);
    const product = x * inv[channelOf(i, layout)]!;
    const t = roundHalfEven(f32 ? Math.fround(product) : product);
    q[i] = Math.min(127, Math.max(-127, t)) & 0xff; // the clip guards the int8 wrap-around
  }
  const out = new Uint8Array(4 * scales.length);
  const dst = view(out);
  scales.forEach((s, c) => dst.setFloat32(4 * c, s, true));
  return { q, scales: out };
}

function dequantiseInt8(
  quant: Quant,
  dtype: "float32" | "float64",
  payload: Uint8Array,
  scalesRaw: Uint8Array,
  shape: readonly number[],
  count: number,
): Uint8Array {
  const layout = channelLayout(quant, shape);
  const sv = view(scalesRaw);
  const scales: number[] = [];
  for (let c = 0; c < scalesRaw.length / 4; c++) scales.push(sv.getFloat32(4 * c, true));
  if (!scales.every((s) => s > 0 && s <= SCALE_MAX)) {
    // false for NaN too
    throw new PayloadError(
      `scales must be finite, positive and at most ${formatG(SCALE_MAX)}, found [${scales.map(formatFloat).join(", ")}]`,
    );
  }
  for (let i = 0; i < count; i++) {
    if (payload[i] === 0x80) {
      // Encoders write -127..127; -128 with the largest scale would overflow to -inf.
      throw new PayloadError("int8 code -128 is not a quantised value (encoders write -127..127)");
    }
  }
  const out = new Uint8Array(count * ITEM_SIZES[dtype]);
  const dst = view(out);
  for (let i = 0; i < count; i++) {
    const q = (payload[i]! << 24) >> 24; // as signed
    const y = q * scales[channelOf(i, layout)]!; // exact in double
    if (dtype === "float32") dst.setFloat32(4 * i, y, true);
    else dst.setFloat64(8 * i, y, true);
  }
  return out;
}

// --- zstd ------------------------------------------------------------------------------------

const ZSTD_MAGIC = 0xfd2fb528;

/** Names of the zstd error codes a hostile frame can provoke (zstd_errors.h). */
const ZSTD_ERRORS: Readonly<Record<number, string>> = {
  10: "unknown frame prefix",
  12: "unsupported version",
  14: "unsupported frame parameter",
  16: "frame requires a too large window",
  20: "corrupted data",
  22: "checksum mismatch",
  32: "frame needs a dictionary",
  70: "output larger than expected",
  72: "wrong source size",
};

interface ZstdHeader {
  /** Declared Frame_Content_Size, null when the frame does not declare one. */
  readonly contentSize: bigint | null;
  readonly headerEnd: number;
  readonly checksum: boolean;
}

/** Parse the frame header (RFC 8878 §3.1.1); a PayloadError "not a zstd frame" when invalid. */
function zstdHeader(data: Uint8Array): ZstdHeader {
  const fail = (why: string): never => {
    throw new PayloadError(`payload is not a zstd frame: ${why}`);
  };
  if (data.length < 5) fail(`${data.length} bytes is too short for a frame header`);
  const v = view(data);
  if (v.getUint32(0, true) !== ZSTD_MAGIC) fail("bad magic number (one zstd frame expected, not skippable or legacy)");
  const fhd = data[4]!;
  if (fhd & 0x08) fail("reserved bit set in the frame header descriptor");
  const fcsFlag = fhd >> 6;
  const single = (fhd & 0x20) !== 0;
  const dictIdSize = [0, 1, 2, 4][fhd & 3]!;
  const fcsSize = fcsFlag === 0 ? (single ? 1 : 0) : [0, 2, 4, 8][fcsFlag]!;
  const at = 5 + (single ? 0 : 1) + dictIdSize;
  const headerEnd = at + fcsSize;
  if (data.length < headerEnd) fail("truncated frame header");
  let contentSize: bigint | null = null;
  if (fcsSize === 1) contentSize = BigInt(data[at]!);
  else if (fcsSize === 2) contentSize = BigInt(v.getUint16(at, true) + 256);
  else if (fcsSize === 4) contentSize = BigInt(v.getUint32(at, true));
  else if (fcsSize === 8) contentSize = v.getBigUint64(at, true);
  return { contentSize, headerEnd, checksum: (fhd & 0x04) !== 0 };
}

/**
 * Where the frame that starts at 0 ends, from its block headers (RFC 8878 §3.1.1.2), or a
 * description of why it cannot end.
 */
function zstdFrameEnd(data: Uint8Array, header: ZstdHeader): number | string {
  let pos = header.headerEnd;
  for (;;) {
    if (pos + 3 > data.length) return "the frame is truncated";
    const h = data[pos]! | (data[pos + 1]! << 8) | (data[pos + 2]! << 16);
    const type = (h >> 1) & 3;
    if (type === 3) return "reserved block type";
    pos += 3 + (type === 1 ? 1 : h >>> 3); // RLE blocks carry one byte
    if (pos > data.length) return "the frame is truncated";
    if (h & 1) break; // last block
  }
  pos += header.checksum ? 4 : 0;
  if (pos > data.length) return "the frame is truncated";
  return pos;
}

function decompressZstd(data: Uint8Array, expected: number): Uint8Array {
  const header = zstdHeader(data);
  // The declared size is what the decompressor would allocate: checked before anything runs.
  if (header.contentSize !== null && header.contentSize !== BigInt(expected)) {
    throw new PayloadError(`zstd frame declares ${header.contentSize} bytes, expected ${expected} bytes`);
  }
  if (header.contentSize === null && expected === 0) {
    throw new PayloadError("zstd frame without a content size, expected 0 bytes");
  }
  const end = zstdFrameEnd(data, header);
  const failure = (why: string): PayloadError =>
    new PayloadError(`zstd payload does not decompress to ${expected} bytes: ${why}`);
  if (typeof end === "string") throw failure(end);
  if (end !== data.length) {
    throw failure(`${data.length - end} bytes of unused data after the frame (exactly one frame allowed)`);
  }
  requireZstd();
  try {
    // Capacity = expected: the library's own (declared or default) size; never more output.
    return zstdDecompress(data, { defaultHeapSize: expected });
  } catch (error) {
    const code = /code (-?\d+)/.exec(String(error))?.[1];
    const name = code === undefined ? undefined : ZSTD_ERRORS[Math.abs(Number(code))];
    throw failure(name ?? String(error));
  }
}

function compressZstd(bytes: Uint8Array): Uint8Array {
  requireZstd();
  return zstdCompress(bytes, ZSTD_LEVEL);
}

// --- lz4 block -------------------------------------------------------------------------------

const LZ4_MIN_MATCH = 4;
const LZ4_LAST_LITERALS = 5; // the last 5 bytes of a block are always literals
const LZ4_MFLIMIT = 12; // the last match starts at least 12 bytes before the end
const LZ4_HASH_LOG = 16;
const lz4Table = new Int32Array(1 << LZ4_HASH_LOG);

function lz4Length(out: Uint8Array, op: number, rest: number): number {
  for (; rest >= 255; rest -= 255) out[op++] = 255;
  out[op++] = rest;
  return op;
}

function read32(b: Uint8Array, i: number): number {
  return b[i]! | (b[i + 1]! << 8) | (b[i + 2]! << 16) | (b[i + 3]! << 24);
}

/**
 * One raw LZ4 block (no frame, no size), greedy with a 64K-entry hash of 4-byte sequences.
 * Honours the end-of-block rules (last match at least 12 bytes from the end, last 5 bytes
 * literals), so the reference decoder accepts every block.
 */
export function lz4CompressBlock(src: Uint8Array): Uint8Array {
  const n = src.length;
  const out = new Uint8Array(n + Math.ceil(n / 255) + 16);
  let op = 0;
  let anchor = 0;
  const lastMatchStart = n - LZ4_MFLIMIT;
  const matchLimit = n - LZ4_LAST_LITERALS;
  if (n > LZ4_MFLIMIT) {
    lz4Table.fill(-1);
    let ip = 0;
    let misses = 0;
    while (ip <= lastMatchStart) {
      const seq = read32(src, ip);
      const h = Math.imul(seq, 2654435761) >>> (32 - LZ4_HASH_LOG);
      const ref = lz4Table[h]!;
      lz4Table[h] = ip;
      if (ref < 0 || ip - ref > 65535 || read32(src, ref) !== seq) {
        ip += 1 + (misses++ >> 6); // skip faster through incompressible data, as lz4 does
        continue;
      }
      misses = 0;
      let len = LZ4_MIN_MATCH;
      while (ip + len < matchLimit && src[ref + len] === src[ip + len]) len++;
      const literals = ip - anchor;
      const ml = len - LZ4_MIN_MATCH;
      const tokenAt = op++;
      out[tokenAt] = (Math.min(literals, 15) << 4) | Math.min(ml, 15);
      if (literals >= 15) op = lz4Length(out, op, literals - 15);
      out.set(src.subarray(anchor, ip), op);
      op += literals;
      const offset = ip - ref;
      out[op++] = offset & 0xff;
      out[op++] = offset >> 8;
      if (ml >= 15) op = lz4Length(out, op, ml - 15);
      ip += len;
      anchor = ip;
    }
  }
  const literals = n - anchor;
  out[op++] = Math.min(literals, 15) << 4;
  if (literals >= 15) op = lz4Length(out, op, literals - 15);
  out.set(src.subarray(anchor), op);
  op += literals;
  return out.slice(0, op);
}

/**
 * Decode one raw LZ4 block into at most `capacity` bytes with the end-of-block rules of the
 * reference `LZ4_decompress_safe(src, dst, len, capacity)`: a sequence whose literals end within
 * 12 bytes of the capacity (or within 8 bytes of the input's end) must be the last one and end
 * the input exactly; matches must not reach into the last 5 bytes of the capacity. Every read
 * and copy is bounds-checked; a match offset must be 1..(bytes written so far) — the block
 * format makes offset 0 invalid (lz4 1.9.4 accepts it and copies nothing). Returns what was
 * written, which may be fewer than `capacity` bytes (the caller checks the exact size).
 */
function lz4DecodeBlock(src: Uint8Array, capacity: number): Uint8Array {
  const fail = (why: string): never => {
    throw new PayloadError(`lz4 payload does not decompress to ${capacity} bytes: ${why}`);
  };
  const out = new Uint8Array(capacity);
  const iend = src.length;
  let ip = 0;
  let op = 0;
  // The block of no bytes is the single byte 00, and nothing else (as the reference has it).
  if (capacity === 0 && !(iend === 1 && src[0] === 0)) fail("the block of 0 bytes is the single byte 00");
  if (iend === 0) fail("empty block (the block of 0 bytes is the single byte 00)");
  for (;;) {
    const token = src[ip++]!;
    let literals = token >> 4;
    if (literals === 15) {
      let b: number;
      do {
        if (ip >= iend) fail("truncated literal length");
        b = src[ip++]!;
        literals += b;
      } while (b === 255);
    }
    if (ip + literals > iend) fail("literals run past the end of the block");
    if (op + literals > capacity) fail(`output larger than ${capacity} bytes`);
    out.set(src.subarray(ip, ip + literals), op);
    ip += literals;
    op += literals;
    if (ip === iend) break; // the last sequence: literals only
    if (op > capacity - LZ4_MFLIMIT || ip > iend - (2 + 1 + LZ4_LAST_LITERALS)) {
      fail("the last sequence must be literals that end the block");
    }
    const offset = src[ip]! | (src[ip + 1]! << 8);
    ip += 2;
    if (offset === 0 || offset > op) fail(`match offset ${offset} outside the ${op} bytes written`);
    let length = token & 15;
    if (length === 15) {
      let b: number;
      do {
        if (ip >= iend - LZ4_LAST_LITERALS) fail("truncated match length");
        b = src[ip++]!;
        length += b;
      } while (b === 255);
    }
    length += LZ4_MIN_MATCH;
    if (op + length > capacity - LZ4_LAST_LITERALS) {
      fail(`output larger than ${capacity} bytes, or a match within the last 5 bytes`);
    }
    for (let from = op - offset, end = op + length; op < end; ) out[op++] = out[from++]!; // may overlap
  }
  return op === capacity ? out : out.subarray(0, op);
}

// --- compression dispatch ----------------------------------------------------------------------

function compressBytes(compression: Compression, bytes: Uint8Array): Uint8Array {
  if (compression === "none") return bytes;
  if (compression === "zstd") return compressZstd(bytes);
  return lz4CompressBlock(bytes);
}

/** Decompress `data` into exactly `expected` bytes, never producing more. */
function decompressBytes(compression: Compression, data: Uint8Array, expected: number): Uint8Array {
  const payload =
    compression === "none" ? data : compression === "zstd" ? decompressZstd(data, expected) : lz4DecodeBlock(data, expected);
  if (payload.length !== expected) {
    const what = compression === "none" ? "payload" : `${compression}-decompressed payload`;
    throw new PayloadError(`${what} is ${payload.length} bytes, expected ${expected} bytes`);
  }
  return payload;
}

// --- public API ------------------------------------------------------------------------------

/**
 * Quantise and compress a tensor with the bundle codec as adjusted for its dtype (`codecFor`);
 * the result records the codec actually applied. Under codec `none` the payload is the tensor's
 * own bytes (no copy): keep them unchanged until the encoded tensor has been sent.
 *
 * @throws PayloadError the dtype is not allowed, the shape is not a list of ints ≥ 0, the byte
 *   length does not match dtype and shape, the tensor exceeds MAX_TENSOR_BYTES, or int8
 *   quantisation meets NaN, inf or float32 overflow.
 * @throws UsageError `bundleCodec` is not canonical, or zstd is needed before `initCodecs()`.
 */
export function encode(tensor: RawTensor, bundleCodec: string | CodecSpec): EncodedTensor {
  const { dtype, bytes } = tensor;
  if (typeof dtype !== "string" || !Object.hasOwn(ITEM_SIZES, dtype)) {
    throw new PayloadError(`dtype ${pyRepr(dtype)} is not allowed; allowed: ${ALLOWED_DTYPES.join(", ")}`);
  }
  const applied = codecFor(bundleCodec, dtype);
  const shape = checkedShape(tensor.shape, MAX_TENSOR_BYTES);
  const count = shape.reduce((a, b) => a * b, 1);
  if (!(bytes instanceof Uint8Array)) {
    throw new PayloadError(`bytes must be a Uint8Array, found ${typeName(bytes)}`);
  }
  if (bytes.length !== count * ITEM_SIZES[dtype]) {
    throw new PayloadError(
      `tensor of ${dtype} with shape ${pyShape(shape)} has ${bytes.length} bytes, expected ${count * ITEM_SIZES[dtype]}`,
    );
  }
  if (bytes.length > MAX_TENSOR_BYTES) {
    throw new PayloadError(`tensor is ${bytes.length} bytes, the limit is ${MAX_TENSOR_BYTES} bytes`);
  }
  let wire = bytes;
  let scales: Uint8Array = new Uint8Array(0);
  if (applied.quant !== "none") {
    const fdtype = dtype as "float32" | "float64"; // codecFor keeps quant only for these
    if (applied.quant === "fp16") wire = quantiseFp16(fdtype, bytes, count);
    else ({ q: wire, scales } = quantiseInt8(applied.quant, fdtype, bytes, shape, count));
  }
  return { dtype, shape, codec: applied.name, data: compressBytes(applied.compression, wire), scales };
}

/**
 * Rebuild a tensor from an EncodedTensor that may come from a hostile peer (§8.4 stage 3).
 * Every field is checked, and the decoded size bounded, before anything is allocated;
 * decompression never produces more than the expected byte count. Under quant `none` the
 * result's bytes are the (decompressed) payload itself, without a copy.
 *
 * @param opts.maxBytes bound on the decoded size in bytes (the client's own limit, §10); at most
 *   MAX_TENSOR_BYTES applies anyway.
 * @throws PayloadError any field is malformed or inconsistent (the message says what was
 *   expected and what was found).
 * @throws UsageError `maxBytes` is not an integer ≥ 0, or zstd is needed before `initCodecs()`.
 */
export function decode(t: EncodedTensor, opts: { maxBytes: number }): RawTensor {
  const { maxBytes } = opts;
  if (!Number.isSafeInteger(maxBytes) || maxBytes < 0) {
    throw new UsageError(`maxBytes must be a non-negative integer, got ${String(maxBytes)}`);
  }
  const limit = Math.min(MAX_TENSOR_BYTES, maxBytes);

  const { codec, dtype } = t as { codec: unknown; dtype: unknown };
  if (typeof dtype !== "string" || !Object.hasOwn(ITEM_SIZES, dtype)) {
    throw new PayloadError(`dtype ${pyRepr(dtype)} is not allowed; expected one of ${ALLOWED_DTYPES.join(", ")}`);
  }
  const dt = dtype as DType;
  const parsed = canonicalOrUndefined(codec);
  if (parsed === undefined) {
    throw new PayloadError(`unknown codec ${pyRepr(codec)}; expected a canonical codec name`);
  }
  if (codecFor(parsed, dt).name !== parsed.name) {
    throw new PayloadError(`codec ${pyRepr(codec)} cannot apply to dtype ${dt}`);
  }

  const shape = checkedShape(t.shape, limit);
  const count = shape.reduce((a, b) => a * b, 1); // each dim ≤ 2^31 and ≤ 32 dims: no overflow to inf
  const outBytes = count * ITEM_SIZES[dt];
  if (outBytes > limit) {
    throw new PayloadError(`shape ${pyShape(shape)} of ${dt} decodes to ${outBytes} bytes, the limit is ${limit} bytes`);
  }

  const int8 = parsed.quant === "int8" || parsed.quant === "int8c";
  const channels = int8 ? channelLayout(parsed.quant, shape).channels : 0;
  const wireItemsize = int8 ? 1 : parsed.quant === "fp16" ? 2 : ITEM_SIZES[dt];
  const scalesRaw: unknown = t.scales;
  if (!(scalesRaw instanceof Uint8Array)) {
    throw new PayloadError(`scales must be bytes (a Uint8Array), found ${typeName(scalesRaw)}`);
  }
  if (scalesRaw.length !== 4 * channels) {
    throw new PayloadError(
      `codec ${parsed.name} with shape ${pyShape(shape)} needs ${4 * channels} bytes of scales, found ${scalesRaw.length}`,
    );
  }
  const data: unknown = t.data;
  if (!(data instanceof Uint8Array)) {
    throw new PayloadError(`data must be bytes (a Uint8Array), found ${typeName(data)}`);
  }

  const payload = decompressBytes(parsed.compression, data, count * wireItemsize);

  let bytes: Uint8Array;
  if (parsed.quant === "none") bytes = payload;
  else if (parsed.quant === "fp16") bytes = dequantiseFp16(dt, payload, count);
  else bytes = dequantiseInt8(parsed.quant, dt as "float32" | "float64", payload, scalesRaw, shape, count);
  return { dtype: dt, shape, bytes };
}

/**
 * A shape as a fresh array of numbers, each an integer ≥ 0 and ≤ `limit`, at most MAX_NDIM of
 * them (numbers or bigints accepted; msgpack decoders may produce either).
 */
function checkedShape(shape: unknown, limit: number): number[] {
  if (!Array.isArray(shape)) {
    throw new PayloadError(`shape must be an array of ints, found ${typeName(shape)}`);
  }
  if (shape.length > MAX_NDIM) {
    throw new PayloadError(`shape has ${shape.length} dimensions, at most ${MAX_NDIM} allowed`);
  }
  const dims: number[] = [];
  for (const d of shape as unknown[]) {
    const ok = (typeof d === "number" && Number.isInteger(d)) || typeof d === "bigint";
    if (!ok || (d as number | bigint) < 0) {
      throw new PayloadError(`shape ${pyShape(shape)}: dimensions must be non-negative ints, found ${pyRepr(d)}`);
    }
    if ((d as number | bigint) > limit) {
      throw new PayloadError(`shape ${pyShape(shape)}: dimension ${String(d)} exceeds the ${limit}-byte limit`);
    }
    dims.push(Number(d));
  }
  return dims;
}

// --- typed arrays ----------------------------------------------------------------------------

/** The JS typed array of each dtype (onnxruntime's); float16 has none in Node 20: its bits. */
export interface TypedArrayOf {
  float32: Float32Array;
  float16: Uint16Array;
  float64: Float64Array;
  int64: BigInt64Array;
  int32: Int32Array;
  int8: Int8Array;
  uint8: Uint8Array;
  bool: Uint8Array;
}
export type TensorTypedArray = TypedArrayOf[DType];

const TYPED_CTORS = {
  float32: Float32Array,
  float16: Uint16Array,
  float64: Float64Array,
  int64: BigInt64Array,
  int32: Int32Array,
  int8: Int8Array,
  uint8: Uint8Array,
  bool: Uint8Array,
} as const;

const LITTLE_ENDIAN_HOST = HI === 1;

/** Reverse each `size`-byte item (the host is big-endian): a copy. */
function swapped(bytes: Uint8Array, size: number): Uint8Array {
  const out = new Uint8Array(bytes.length);
  for (let i = 0; i < bytes.length; i += size) {
    for (let j = 0; j < size; j++) out[i + j] = bytes[i + size - 1 - j]!;
  }
  return out;
}

/**
 * The elements of a RawTensor as the typed array of its dtype (TypedArrayOf). Zero-copy when the
 * bytes are suitably aligned (on a little-endian host), a copy otherwise.
 *
 * @throws UsageError the byte length is not a multiple of the item size.
 */
export function toTypedArray<D extends DType>(raw: RawTensor & { readonly dtype: D }): TypedArrayOf[D] {
  const size = ITEM_SIZES[raw.dtype];
  let bytes = raw.bytes;
  if (bytes.length % size !== 0) {
    throw new UsageError(`${bytes.length} bytes is not a whole number of ${raw.dtype} items`);
  }
  if (!LITTLE_ENDIAN_HOST && size > 1) bytes = swapped(bytes, size);
  else if (bytes.byteOffset % size !== 0) bytes = bytes.slice();
  const Ctor = TYPED_CTORS[raw.dtype] as unknown as new (b: ArrayBufferLike, o: number, n: number) => TypedArrayOf[D];
  return new Ctor(bytes.buffer, bytes.byteOffset, bytes.length / size);
}

/**
 * A RawTensor from a typed array (zero-copy on a little-endian host): the typed array of the
 * dtype (TypedArrayOf), except that float16 also takes a Float16Array where the platform has
 * one (onnxruntime may return either); `bool` takes a Uint8Array of 0/1. The parameter is any
 * ArrayBufferView so that onnxruntime's tensor data can be passed as it comes: the kind is
 * checked at run time.
 *
 * @throws UsageError the typed array is not the one of the dtype, its length is not the shape's
 *   element count, the shape is not a list of ints ≥ 0, or a bool is neither 0 nor 1.
 */
export function fromTypedArray(dtype: DType, shape: readonly number[], typed: ArrayBufferView): RawTensor {
  if (typeof dtype !== "string" || !Object.hasOwn(ITEM_SIZES, dtype)) {
    throw new UsageError(`dtype ${pyRepr(dtype)} is not allowed; allowed: ${ALLOWED_DTYPES.join(", ")}`);
  }
  const Ctor = TYPED_CTORS[dtype];
  const size = ITEM_SIZES[dtype];
  const isFloat16Array = dtype === "float16" && typed.constructor?.name === "Float16Array";
  if (!(typed instanceof Ctor) && !isFloat16Array) {
    throw new UsageError(`a ${dtype} tensor needs a ${Ctor.name}, found ${typeName(typed)}`);
  }
  if (!shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    throw new UsageError(`shape ${pyShape(shape)}: dimensions must be non-negative ints`);
  }
  const count = shape.reduce((a, b) => a * b, 1);
  if (typed.byteLength !== count * size) {
    throw new UsageError(`shape ${pyShape(shape)} has ${count} elements, the array has ${typed.byteLength / size}`);
  }
  let bytes = new Uint8Array(typed.buffer, typed.byteOffset, typed.byteLength);
  if (dtype === "bool" && !bytes.every((b) => b <= 1)) {
    throw new UsageError("a bool tensor holds only 0 and 1");
  }
  if (!LITTLE_ENDIAN_HOST && size > 1) bytes = swapped(bytes, size);
  return { dtype, shape: [...shape], bytes };
}

// --- small helpers ---------------------------------------------------------------------------

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

function typeName(value: unknown): string {
  if (value === null) return "null";
  if (typeof value === "object") return (value as object).constructor?.name ?? "object";
  return typeof value;
}

/** Roughly Python's repr, so messages read like the reference's ('x', 1.5, True). */
function pyRepr(value: unknown): string {
  if (typeof value === "string") return `'${value}'`;
  if (typeof value === "boolean") return value ? "True" : "False";
  if (typeof value === "number" || typeof value === "bigint") return String(value);
  if (value === undefined || value === null) return "None";
  return typeName(value);
}

/** A shape as Python writes a tuple: `(4, 4)`, `(16,)`, `()`. */
function pyShape(shape: readonly unknown[]): string {
  const parts = shape.map(pyRepr);
  return parts.length === 1 ? `(${parts[0]},)` : `(${parts.join(", ")})`;
}

/** Python's `:g` for the magnitudes these messages print. */
function formatG(v: number): string {
  return String(Number(v.toPrecision(6)));
}

function formatFloat(v: number): string {
  return Number.isNaN(v) ? "nan" : v === Infinity ? "inf" : v === -Infinity ? "-inf" : String(v);
}
