/**
 * The tensor codecs against the golden vectors' `codecs` section (PROTOCOL.md §8), round trips
 * through our encoder, and the hostile payloads §8.4 stage 3 must refuse (the cases of
 * tests/test_codec.py, with zstd frames and LZ4 blocks built by hand so that each rule is hit
 * on its own).
 */

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import * as esbuild from "esbuild";

import {
  ALLOWED_DTYPES,
  COMPRESSIONS,
  MAX_TENSOR_BYTES,
  QUANTS,
  SCALE_MAX,
  codecFor,
  decode,
  encode,
  fromTypedArray,
  initCodecs,
  lz4CompressBlock,
  parseCodec,
  toTypedArray,
} from "../src/codec.js";
import { PayloadError, UsageError } from "../src/errors.js";
import type { DType, EncodedTensor, RawTensor } from "../src/types.js";

interface CodecVector {
  name: string;
  input_dtype: DType;
  input_shape: number[];
  input_hex: string;
  requested_codec: string;
  codec: string;
  data_hex: string;
  scales_hex: string;
  decoded_hex: string;
  encoded_bytes_reproducible: boolean;
}

const VECTORS = JSON.parse(readFileSync(new URL("../../../vectors/protocol-v1.json", import.meta.url), "utf8")) as {
  codecs: CodecVector[];
};

const LIMIT = { maxBytes: MAX_TENSOR_BYTES };

function fromHex(hex: string): Uint8Array {
  return Uint8Array.from(hex.match(/../g) ?? [], (b) => parseInt(b, 16));
}
function toHex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
function concat(...parts: ArrayLike<number>[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
function f32(values: number[]): Uint8Array {
  const out = new Uint8Array(4 * values.length);
  const v = new DataView(out.buffer);
  values.forEach((x, i) => v.setFloat32(4 * i, x, true));
  return out;
}
function readF32(bytes: Uint8Array): number[] {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return Array.from({ length: bytes.length / 4 }, (_, i) => v.getFloat32(4 * i, true));
}
function raw(dtype: DType, shape: number[], bytes: Uint8Array): RawTensor {
  return { dtype, shape, bytes };
}
function enc(dtype: DType, shape: unknown, codec: string, data: Uint8Array, scales: Uint8Array = new Uint8Array(0)): EncodedTensor {
  return { dtype, shape: shape as number[], codec, data, scales };
}
function throwsPayload(fn: () => unknown, message: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof PayloadError, `expected a PayloadError, got ${String(e)}`);
    assert.match(e.message, message);
    return true;
  });
}

const ALL_CODECS = QUANTS.flatMap((q) => COMPRESSIONS.map((c) => (c === "none" ? q : q === "none" ? c : `${q}+${c}`)));
/** A float32 [4, 4] tensor 0..15 under codec none: 64 bytes (test_codec.py's `_encoded`). */
const BASE = encode(raw("float32", [4, 4], f32(Array.from({ length: 16 }, (_, i) => i))), "none");
const with_ = (changes: Partial<Record<keyof EncodedTensor, unknown>>): EncodedTensor => ({ ...BASE, ...changes }) as EncodedTensor;

// --- runs first: zstd needs the wasm -----------------------------------------------------------

test("zstd before initCodecs is a UsageError naming it; other codecs need no wasm", async () => {
  const t = raw("float32", [2], f32([1, 2]));
  assert.throws(() => encode(t, "zstd"), (e: unknown) => e instanceof UsageError && /initCodecs/.test(e.message));
  const frame = fromHex("28b52ffd2008" + "410000" + "0000803f00000040"); // single segment, size 8, one raw block
  assert.throws(() => decode(enc("float32", [2], "zstd", frame), LIMIT), UsageError);
  assert.deepEqual(decode(encode(t, "fp16+lz4"), LIMIT).bytes, t.bytes);
  const first = initCodecs();
  assert.equal(initCodecs(), first); // idempotent: one load
  await first;
  assert.deepEqual(decode(enc("float32", [2], "zstd", frame), LIMIT).bytes, t.bytes);
});

// --- golden vectors ----------------------------------------------------------------------------

for (const v of VECTORS.codecs) {
  test(`vector: ${v.name}`, async () => {
    await initCodecs();
    const input = raw(v.input_dtype, v.input_shape, fromHex(v.input_hex));
    const received = enc(v.input_dtype, v.input_shape, v.codec, fromHex(v.data_hex), fromHex(v.scales_hex));
    const decoded = decode(received, LIMIT);
    assert.equal(toHex(decoded.bytes), v.decoded_hex);
    assert.deepEqual(decoded.shape, v.input_shape);
    assert.equal(decoded.dtype, v.input_dtype);
    assert.equal(codecFor(v.requested_codec, v.input_dtype).name, v.codec);
    const again = encode(input, v.requested_codec);
    assert.equal(again.codec, v.codec);
    if (v.encoded_bytes_reproducible) {
      assert.equal(toHex(again.data), v.data_hex);
      assert.equal(toHex(again.scales), v.scales_hex);
    } else {
      // another compressor's bytes, but the same element bytes inside
      assert.equal(toHex(again.scales), v.scales_hex);
      assert.equal(toHex(decode(again, LIMIT).bytes), v.decoded_hex);
    }
  });
}

// --- names -------------------------------------------------------------------------------------

test("parseCodec accepts exactly the twelve canonical names", () => {
  assert.equal(ALL_CODECS.length, 12);
  for (const name of ALL_CODECS) {
    const s = parseCodec(name);
    assert.equal(s.name, name);
    assert.ok(QUANTS.includes(s.quant) && COMPRESSIONS.includes(s.compression));
  }
  assert.deepEqual(parseCodec("int8c+lz4"), { quant: "int8c", compression: "lz4", name: "int8c+lz4" });
  for (const bad of ["none+zstd", "fp16+none", "none+none", "FP16", "zstd+fp16", "", "+", "fp16+zstd+lz4", " fp16", "gzip", "int4", "int8+", "+zstd"]) {
    assert.throws(() => parseCodec(bad), (e: unknown) => e instanceof UsageError && /valid codecs/.test(e.message), bad);
  }
});

test("codecFor drops the quantisation for every dtype but float32 and float64", () => {
  assert.equal(codecFor("int8+zstd", "float32").name, "int8+zstd");
  assert.equal(codecFor("int8+zstd", "float64").name, "int8+zstd");
  assert.equal(codecFor("int8+zstd", "float16").name, "zstd");
  assert.equal(codecFor("fp16", "int64").name, "none");
  assert.equal(codecFor(parseCodec("fp16+lz4"), "bool").name, "lz4");
  const e = encode(raw("int64", [3], new Uint8Array(24)), "int8c+lz4");
  assert.equal(e.codec, "lz4");
  assert.equal(e.scales.length, 0);
});

// --- round trips -------------------------------------------------------------------------------

function sampleBytes(dtype: DType, count: number): Uint8Array {
  const size = { float32: 4, float16: 2, float64: 8, int64: 8, int32: 4, int8: 1, uint8: 1, bool: 1 }[dtype];
  const out = new Uint8Array(count * size);
  if (dtype === "bool") out.forEach((_, i) => (out[i] = i % 3 === 0 ? 1 : 0));
  else if (dtype === "float32") out.set(f32(Array.from({ length: count }, (_, i) => Math.sin(i) * 10 ** (i % 7))));
  else out.forEach((_, i) => (out[i] = (i * 37 + (i >> 3)) & 0xff));
  return out;
}

test("lossless codecs reproduce every dtype bit for bit, in every shape", async () => {
  await initCodecs();
  for (const dtype of ALLOWED_DTYPES) {
    for (const shape of [[], [0], [3, 0, 2], [5], [2, 3], [2, 3, 4], [1, 1, 1, 7]]) {
      const count = shape.reduce((a, b) => a * b, 1);
      const t = raw(dtype, shape, sampleBytes(dtype, count));
      const codecs = dtype === "float32" || dtype === "float64" ? ["none", "zstd", "lz4"] : ALL_CODECS;
      for (const codec of codecs) {
        const e = encode(t, codec);
        assert.equal(e.codec, codecFor(codec, dtype).name);
        const d = decode(e, LIMIT);
        assert.deepEqual([d.dtype, d.shape, toHex(d.bytes)], [dtype, shape, toHex(t.bytes)], `${dtype} ${codec} ${shape}`);
      }
    }
  }
});

test("zstd and lz4 round-trip a megabyte, and compress a compressible one", async () => {
  await initCodecs();
  const values = Array.from({ length: 1 << 18 }, (_, i) => (i % 5 === 0 ? Math.fround(i / 7) : 0)); // ReLU-like
  const t = raw("float32", [512, 512], f32(values));
  for (const codec of ["zstd", "lz4", "fp16+zstd", "int8+lz4"]) {
    const e = encode(t, codec);
    assert.ok(e.data.length < t.bytes.length / 2, `${codec}: ${e.data.length} bytes`);
    const d = decode(e, LIMIT);
    if (!codec.includes("+")) assert.ok(toHex(d.bytes.subarray(0, 4096)) === toHex(t.bytes.subarray(0, 4096)) && d.bytes.every((b, i) => b === t.bytes[i]));
  }
  const noise = Uint8Array.from({ length: 100_000 }, (_, i) => (Math.imul(i, 2654435761) >>> 13) & 0xff);
  for (const codec of ["zstd", "lz4"]) {
    const d = decode(encode(raw("uint8", [noise.length], noise), codec), LIMIT);
    assert.ok(d.bytes.every((b, i) => b === noise[i]));
  }
});

test("lz4 blocks of every small size obey the end-of-block rules and round-trip", () => {
  for (let n = 0; n < 300; n++) {
    for (const fill of [(i: number) => 0 * i, (i: number) => i % 3, (i: number) => (i * 7919) & 0xff]) {
      const src = Uint8Array.from({ length: n }, (_, i) => fill(i));
      const block = lz4CompressBlock(src);
      const d = decode(enc("uint8", [n], "lz4", block), LIMIT); // the decoder enforces the rules
      assert.equal(toHex(d.bytes), toHex(src), `n=${n}`);
    }
  }
  assert.equal(toHex(lz4CompressBlock(new Uint8Array(0))), "00"); // as lz4.block.compress(b"")
});

test("fp16 saturates finite overflow, keeps inf and NaN, rounds to nearest even", () => {
  const input = [1e6, -1e30, 65519, 65520, Infinity, -Infinity, NaN, 1, 2 ** -25, 3 * 2 ** -25, 1 + 2 ** -11, 1 + 3 * 2 ** -11];
  const e = encode(raw("float32", [input.length], f32(input)), "fp16");
  const halves = Array.from({ length: input.length }, (_, i) => e.data[2 * i]! | (e.data[2 * i + 1]! << 8));
  const expected = [0x7bff, 0xfbff, 0x7bff, 0x7bff, 0x7c00, 0xfc00, 0x7e00, 0x3c00, 0x0000, 0x0002, 0x3c00, 0x3c02];
  assert.deepEqual(halves.map((h) => h.toString(16)), expected.map((h) => h.toString(16)));
  const back = readF32(decode(e, LIMIT).bytes);
  assert.deepEqual(back, [65504, -65504, 65504, 65504, Infinity, -Infinity, NaN, 1, 0, 2 ** -23, 1, 1 + 2 ** -9]);
  // float64 rounds once, from the double (not via float32)
  const d = new Uint8Array(8);
  new DataView(d.buffer).setFloat64(0, 1 + 2 ** -11 + 2 ** -40, true);
  assert.equal(toHex(encode(raw("float64", [1], d), "fp16").data), "013c");
});

test("int8 and int8c scales: per tensor, per channel along axis 1, 1.0 when all zero", () => {
  const values = Array.from({ length: 2 * 5 * 3 }, (_, i) => Math.floor(i / 3) % 5 + 1); // channel c holds c + 1
  const t = raw("float32", [2, 5, 3], f32(values));
  const c = encode(t, "int8c");
  assert.deepEqual(readF32(c.scales), [1, 2, 3, 4, 5].map((m) => Math.fround(m / 127)));
  assert.ok(readF32(decode(c, LIMIT).bytes).every((y, i) => Math.abs(y - values[i]!) <= 1e-6 * values[i]!));
  assert.deepEqual(readF32(encode(t, "int8").scales), [Math.fround(5 / 127)]);
  assert.equal(encode(raw("float32", [7], f32([1, 2, 3, 4, 5, 6, 7])), "int8c").scales.length, 4); // < 2 dims: one scale
  const zeros = encode(raw("float32", [2, 3], f32([0, 0, 0, 0, 0, 0])), "int8c");
  assert.deepEqual(readF32(zeros.scales), [1, 1, 1]);
  assert.deepEqual(readF32(decode(zeros, LIMIT).bytes), [0, 0, 0, 0, 0, 0]);
  // round half to even, as numpy's rint: 63.5 -> 64, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0
  const ties = encode(raw("float32", [7], f32([127, 63.5, -63.5, 0.5, 1.5, 2.5, -0.5])), "int8");
  assert.deepEqual([toHex(ties.data), toHex(ties.scales)], ["7f40c000020200", "0000803f"]);
  const tiny = encode(raw("float32", [1], f32([1e-44])), "int8");
  assert.deepEqual(readF32(tiny.scales), [2 ** -126]); // clamped to the smallest normal
});

test("SCALE_MAX is the largest float32 with 127 × SCALE_MAX ≤ float32 max (bits 0x7c010203)", () => {
  assert.equal(toHex(f32([SCALE_MAX]).reverse()), "7c010203");
  assert.ok(SCALE_MAX * 127 <= 3.4028234663852886e38);
  const huge = encode(raw("float32", [2], f32([3.4028234663852886e38, -1])), "int8");
  assert.deepEqual(readF32(huge.scales), [SCALE_MAX]);
  assert.deepEqual(readF32(decode(huge, LIMIT).bytes)[0], Math.fround(127 * SCALE_MAX));
});

test("int8 refuses NaN, inf and float64 values beyond float32", () => {
  for (const quant of ["int8", "int8c"]) {
    for (const bad of [NaN, Infinity, -Infinity]) {
      throwsPayload(() => encode(raw("float32", [2, 2], f32([1, bad, 2, 3])), quant), /NaN or inf/);
      throwsPayload(() => encode(raw("float32", [2, 2], f32([bad, 1, 2, 3])), quant), /NaN or inf/);
    }
  }
  const d = new Uint8Array(8);
  new DataView(d.buffer).setFloat64(0, 1e300, true);
  throwsPayload(() => encode(raw("float64", [1], d), "int8"), /beyond float32 range/);
  assert.equal(encode(raw("float32", [1], f32([NaN])), "fp16").codec, "fp16"); // fp16 keeps NaN
});

test("encode refuses a dtype that is not allowed and bytes that do not match the shape", () => {
  throwsPayload(() => encode(raw("int16" as DType, [1], new Uint8Array(2)), "none"), /not allowed/);
  throwsPayload(() => encode(raw("float32", [2, 2], new Uint8Array(15)), "none"), /15 bytes, expected 16/);
  throwsPayload(() => encode(raw("float32", [-1], new Uint8Array(0)), "none"), /shape/);
  assert.throws(() => encode(raw("float32", [1], new Uint8Array(4)), "none+zstd"), UsageError);
});

// --- hostile decode inputs ---------------------------------------------------------------------

test("maxBytes bounds the decoded size; a negative one is a UsageError", () => {
  assert.deepEqual(decode(BASE, { maxBytes: 64 }).shape, [4, 4]);
  throwsPayload(() => decode(BASE, { maxBytes: 63 }), /decodes to 64 bytes, the limit is 63 bytes/);
  for (const bad of [-1, 1.5, NaN]) assert.throws(() => decode(BASE, { maxBytes: bad }), UsageError);
  // MAX_TENSOR_BYTES applies even with a larger maxBytes
  throwsPayload(() => decode(with_({ shape: [2 ** 30, 4] }), { maxBytes: 2 ** 40 }), /limit is 2147483648 bytes/);
});

test("dtype, codec and their combination are checked first", () => {
  for (const dtype of ["object", "float128", "", "FLOAT32", "int16", undefined, 3]) {
    throwsPayload(() => decode(with_({ dtype }), LIMIT), /not allowed/);
  }
  for (const codec of ["gzip", "none+zstd", "ZSTD", "int8+gzip", "", "zstd+fp16", " none", undefined]) {
    throwsPayload(() => decode(with_({ codec }), LIMIT), /codec .*expected a canonical codec name/);
  }
  throwsPayload(() => decode(with_({ dtype: "int32", codec: "int8", scales: f32([1]) }), LIMIT), /codec 'int8' cannot apply to dtype int32/);
  throwsPayload(() => decode(enc("int64", [2], "fp16+zstd", new Uint8Array(4)), LIMIT), /cannot apply to dtype int64/);
  throwsPayload(() => decode(enc("float16", [2], "fp16", new Uint8Array(4)), LIMIT), /cannot apply to dtype float16/);
});

test("shapes: at most 32 dims, each an int ≥ 0 within the byte limit", () => {
  for (const shape of [[-1], [4, -4], [2 ** 40], [2 ** 20, 2 ** 20], [0, 2 ** 62], [1.5], [true, 16], ["4"], [NaN], [null]]) {
    throwsPayload(() => decode(with_({ shape }), LIMIT), /shape/);
  }
  throwsPayload(() => decode(with_({ shape: new Array(33).fill(1) }), LIMIT), /33 dimensions, at most 32 allowed/);
  throwsPayload(() => decode(with_({ shape: "4x4" }), LIMIT), /shape must be an array/);
  assert.deepEqual(decode(with_({ shape: [4n, 4n] }), LIMIT).shape, [4, 4]); // bigints from msgpack
  assert.deepEqual(decode(with_({ shape: new Array(32).fill(1).fill(16, 0, 1) }), LIMIT).bytes.length, 64);
  // a zero dim next to dims that are each within the limit decodes to nothing
  assert.equal(decode(enc("float32", [2 ** 31, 2 ** 31, 0], "none", new Uint8Array(0)), LIMIT).bytes.length, 0);
});

test("payload length must be exact under codec none", () => {
  throwsPayload(() => decode(with_({ data: BASE.data.subarray(0, 63) }), LIMIT), /payload is 63 bytes, expected 64 bytes/);
  throwsPayload(() => decode(with_({ data: concat(BASE.data, [0]) }), LIMIT), /payload is 65 bytes, expected 64 bytes/);
  throwsPayload(() => decode(with_({ data: Array.from(BASE.data) }), LIMIT), /data must be bytes/);
  throwsPayload(() => decode(with_({ scales: undefined }), LIMIT), /scales must be bytes/);
});

test("scales: exactly 4 bytes per channel, finite, > 0 and ≤ SCALE_MAX", () => {
  for (const quant of ["int8", "int8c"]) {
    const good = encode(raw("float32", [2, 3, 4], f32(new Array(24).fill(1))), quant);
    for (const scales of [new Uint8Array(0), good.scales.subarray(1), concat(good.scales, f32([1]))]) {
      throwsPayload(() => decode({ ...good, scales }, LIMIT), /bytes of scales/);
    }
  }
  throwsPayload(() => decode(with_({ scales: f32([1]) }), LIMIT), /needs 0 bytes of scales, found 4/);
  const good = encode(raw("float32", [2, 3], f32([1, 1, 1, 1, 1, 1])), "int8c");
  const above = new Uint8Array(4);
  new DataView(above.buffer).setUint32(0, 0x7c010204, true); // the next float32 above SCALE_MAX
  for (const bad of [NaN, Infinity, -Infinity, 0, -0, -1, 3e38]) {
    const scales = f32([1 / 127, bad, 1 / 127]);
    throwsPayload(() => decode({ ...good, scales }, LIMIT), /scales must be finite, positive and at most 2\.67\d*e\+36/);
  }
  throwsPayload(() => decode({ ...good, scales: concat(f32([1]), above, f32([1])) }, LIMIT), /finite, positive/);
  assert.equal(decode({ ...good, scales: f32([1, SCALE_MAX, 1]) }, LIMIT).bytes.length, 24);
});

test("int8 code -128 is refused", () => {
  const good = encode(raw("float32", [4], f32([1, -1, 0.5, 0])), "int8");
  assert.equal(toHex(good.data), "7f814000");
  throwsPayload(() => decode({ ...good, data: fromHex("7f804000") }, LIMIT), /int8 code -128/);
  throwsPayload(() => decode({ ...encode(raw("float32", [4], f32([1, -1, 0.5, 0])), "int8+lz4"), data: lz4CompressBlock(fromHex("80000000")) }, LIMIT), /-128/);
});

test("every codec refuses a truncated payload", async () => {
  await initCodecs();
  const t = raw("float32", [64], f32(Array.from({ length: 64 }, (_, i) => -1 + (2 * i) / 63)));
  for (const codec of ALL_CODECS) {
    const e = encode(t, codec);
    assert.throws(() => decode({ ...e, data: e.data.subarray(0, e.data.length >> 1) }, LIMIT), PayloadError, codec);
  }
});

// --- zstd frames (RFC 8878), built by hand ----------------------------------------------------

const MAGIC = [0x28, 0xb5, 0x2f, 0xfd];
const WINDOW_128K = 0x38; // Window_Descriptor: 2^17 bytes
function blockHeader(size: number, type: number, last: boolean): number[] {
  const h = (size << 3) | (type << 1) | (last ? 1 : 0);
  return [h & 0xff, (h >> 8) & 0xff, (h >> 16) & 0xff];
}
/** A frame of raw blocks; `contentSize` undefined: no Frame_Content_Size field. */
function rawFrame(content: Uint8Array, contentSize?: number | bigint): Uint8Array {
  let header: number[];
  if (contentSize === undefined) header = [0x00, WINDOW_128K];
  else {
    const fcs = new Uint8Array(8);
    new DataView(fcs.buffer).setBigUint64(0, BigInt(contentSize), true);
    header = [0xc0, WINDOW_128K, ...fcs]; // 8-byte Frame_Content_Size
  }
  return concat(MAGIC, header, blockHeader(content.length, 0, true), content);
}
const ZEROS_64 = new Uint8Array(64);

test("zstd: hand-built frames with and without a content size decode", async () => {
  await initCodecs();
  const bytes = f32(Array.from({ length: 16 }, (_, i) => i));
  assert.deepEqual(decode(enc("float32", [16], "zstd", rawFrame(bytes, 64)), LIMIT).bytes, bytes);
  assert.deepEqual(decode(enc("float32", [16], "zstd", rawFrame(bytes)), LIMIT).bytes, bytes);
  // a frame without a content size that holds fewer bytes than expected
  throwsPayload(() => decode(enc("float32", [16], "zstd", rawFrame(bytes.subarray(0, 60))), LIMIT), /zstd-decompressed payload is 60 bytes, expected 64 bytes/);
});

test("zstd: a declared content size must equal the expected count", async () => {
  await initCodecs();
  throwsPayload(() => decode(enc("float32", [16], "zstd", rawFrame(new Uint8Array(60), 60)), LIMIT), /declares 60 bytes, expected 64 bytes/);
  const bomb = concat(MAGIC, [0xc0, WINDOW_128K], [0, 0, 0, 4, 0, 0, 0, 0], blockHeader(1 << 17, 1, true), [0]);
  throwsPayload(() => decode(enc("float32", [16], "zstd", bomb), LIMIT), /declares 67108864 bytes, expected 64 bytes/);
  throwsPayload(() => decode(enc("float32", [16], "zstd", rawFrame(ZEROS_64, 2n ** 64n - 1n)), LIMIT), /declares 18446744073709551615 bytes/);
});

test("zstd: a frame without a content size never yields more than expected, nor anything for 0 bytes", async () => {
  await initCodecs();
  // 512 RLE blocks of 128 KiB: a 64 MiB bomb in 2 KiB, no declared size
  const blocks = Array.from({ length: 512 }, (_, i) => [...blockHeader(1 << 17, 1, i === 511), 0]).flat();
  const bomb = concat(MAGIC, [0x00, WINDOW_128K], blocks);
  throwsPayload(() => decode(enc("float32", [16], "zstd", bomb), LIMIT), /zstd payload does not decompress to 64 bytes: output larger than expected/);
  throwsPayload(() => decode(enc("float32", [0], "zstd", rawFrame(new Uint8Array(0))), LIMIT), /without a content size, expected 0 bytes/);
  assert.equal(decode(enc("float32", [0], "zstd", rawFrame(new Uint8Array(0), 0)), LIMIT).bytes.length, 0);
  assert.equal(decode(encode(raw("float32", [0], new Uint8Array(0)), "zstd"), LIMIT).bytes.length, 0);
});

test("zstd: exactly one frame, nothing after it", async () => {
  await initCodecs();
  const frame = encode(raw("uint8", [64], ZEROS_64), "zstd").data;
  throwsPayload(() => decode(enc("uint8", [64], "zstd", concat(frame, [0x6a, 0x75, 0x6e, 0x6b])), LIMIT), /4 bytes of unused data after the frame/);
  throwsPayload(() => decode(enc("uint8", [64], "zstd", concat(frame, frame)), LIMIT), /unused data/);
  const skippable = [0x50, 0x2a, 0x4d, 0x18, 4, 0, 0, 0, 1, 2, 3, 4];
  throwsPayload(() => decode(enc("uint8", [64], "zstd", concat(frame, skippable)), LIMIT), /12 bytes of unused data/);
  throwsPayload(() => decode(enc("uint8", [64], "zstd", concat(skippable, frame)), LIMIT), /not a zstd frame/);
  throwsPayload(() => decode(enc("uint8", [64], "zstd", new TextEncoder().encode("garbage!")), LIMIT), /not a zstd frame/);
  throwsPayload(() => decode(enc("uint8", [64], "zstd", Uint8Array.from(MAGIC)), LIMIT), /not a zstd frame: 4 bytes is too short/);
  throwsPayload(() => decode(enc("uint8", [64], "zstd", frame.subarray(0, frame.length - 1)), LIMIT), /the frame is truncated/);
  throwsPayload(() => decode(enc("uint8", [64], "zstd", concat(MAGIC, [0x08, WINDOW_128K], blockHeader(0, 0, true))), LIMIT), /reserved bit/);
  throwsPayload(() => decode(enc("uint8", [64], "zstd", concat(MAGIC, [0x00, WINDOW_128K], blockHeader(0, 3, true))), LIMIT), /reserved block type/);
});

// --- lz4 blocks, built by hand -----------------------------------------------------------------

const bytesUpTo = (n: number): number[] => Array.from({ length: n }, (_, i) => i + 1);

test("lz4: a block must decompress to exactly the expected size", () => {
  const literals = (n: number): Uint8Array => concat(n >= 15 ? [0xf0, n - 15] : [n << 4], bytesUpTo(n));
  assert.deepEqual(decode(enc("uint8", [64], "lz4", literals(64)), LIMIT).bytes, Uint8Array.from(bytesUpTo(64)));
  throwsPayload(() => decode(enc("uint8", [64], "lz4", literals(60)), LIMIT), /lz4-decompressed payload is 60 bytes, expected 64 bytes/);
  throwsPayload(() => decode(enc("uint8", [64], "lz4", literals(70)), LIMIT), /lz4 payload does not decompress to 64 bytes: output larger than 64 bytes/);
  // a bomb: one literal, then a match of 4 + 15 + 255 × 1000 bytes
  const bomb = concat([0x1f, 0], [1, 0], new Array(1000).fill(255), [0], [0x50], [1, 2, 3, 4, 5]);
  throwsPayload(() => decode(enc("float32", [16], "lz4", bomb), LIMIT), /lz4 payload does not decompress to 64 bytes/);
  throwsPayload(() => decode(enc("float32", [16], "lz4", new Uint8Array(8).fill(0xff)), LIMIT), /truncated literal length/);
  throwsPayload(() => decode(enc("uint8", [0], "lz4", new Uint8Array(0)), LIMIT), /single byte 00/);
  throwsPayload(() => decode(enc("uint8", [0], "lz4", Uint8Array.of(0x06)), LIMIT), /single byte 00/);
  assert.equal(decode(enc("uint8", [0], "lz4", Uint8Array.of(0)), LIMIT).bytes.length, 0);
});

test("lz4: offsets and the end-of-block rules of the reference decoder", () => {
  const twelve = bytesUpTo(12);
  const tail = [0x80, 65, 66, 67, 68, 69, 70, 71, 72];
  const ok = decode(enc("uint8", [24], "lz4", concat([0xc0], twelve, [12, 0], tail)), LIMIT);
  assert.equal(toHex(ok.bytes), toHex(concat(twelve, [1, 2, 3, 4], tail.slice(1))));
  const overlap = decode(enc("uint8", [24], "lz4", concat([0xc0], twelve, [1, 0], tail)), LIMIT); // offset 1 repeats
  assert.equal(toHex(overlap.bytes.subarray(12, 16)), "0c0c0c0c");
  throwsPayload(() => decode(enc("uint8", [24], "lz4", concat([0xc0], twelve, [0, 0], tail)), LIMIT), /match offset 0/);
  throwsPayload(() => decode(enc("uint8", [24], "lz4", concat([0xc0], twelve, [13, 0], tail)), LIMIT), /match offset 13 outside/);
  // a match reaching into the last 5 bytes: 12 literals + 19 matched + 4 literals (lz4 refuses it)
  const into = concat([0xcf], twelve, [12, 0, 0], [0x40, 1, 2, 3, 4]);
  throwsPayload(() => decode(enc("uint8", [35], "lz4", into), LIMIT), /a match within the last 5 bytes/);
  const fiveLeft = concat([0xcf], twelve, [12, 0, 0], [0x50, 1, 2, 3, 4, 5]);
  assert.equal(decode(enc("uint8", [36], "lz4", fiveLeft), LIMIT).bytes.length, 36);
  // a match starting 11 bytes before the end (lz4js's compressBlock writes these; lz4 rejects them)
  const late = concat([0xf0, 49 - 15], bytesUpTo(49), [49, 0], [0x70], bytesUpTo(7));
  throwsPayload(() => decode(enc("uint8", [60], "lz4", late), LIMIT), /the last sequence must be literals/);
  const inTime = concat([0xf0, 48 - 15], bytesUpTo(48), [48, 0], [0x80], bytesUpTo(8));
  assert.equal(decode(enc("uint8", [60], "lz4", inTime), LIMIT).bytes.length, 60);
});

// --- typed arrays ------------------------------------------------------------------------------

test("toTypedArray / fromTypedArray: each dtype's typed array, little-endian bytes", () => {
  const cases: [DType, ArrayBufferView & { length: number }][] = [
    ["float32", Float32Array.of(1.5, -2)],
    ["float16", Uint16Array.of(0x3c00, 0xc000)],
    ["float64", Float64Array.of(Math.PI, -0)],
    ["int64", BigInt64Array.of(-1n, 2n ** 62n)],
    ["int32", Int32Array.of(-7, 2 ** 31 - 1)],
    ["int8", Int8Array.of(-128, 127)],
    ["uint8", Uint8Array.of(0, 255)],
    ["bool", Uint8Array.of(1, 0)],
  ];
  for (const [dtype, typed] of cases) {
    const r = fromTypedArray(dtype, [2, 1], typed);
    assert.equal(r.bytes.length, typed.byteLength);
    const back = toTypedArray(r);
    assert.equal(back.constructor, typed.constructor);
    assert.deepEqual(Array.from(back as ArrayLike<unknown>), Array.from(typed as unknown as ArrayLike<unknown>));
  }
  assert.equal(toHex(fromTypedArray("float32", [1], Float32Array.of(1)).bytes), "0000803f");
  assert.equal(toHex(fromTypedArray("int64", [1], BigInt64Array.of(-2n)).bytes), "feffffffffffffff");
  // unaligned bytes (a payload slice) are copied, aligned ones are viewed
  const unaligned = concat([0], f32([3, 4])).subarray(1);
  assert.deepEqual(Array.from(toTypedArray(raw("float32", [2], unaligned)) as Float32Array), [3, 4]);
  const aligned = f32([5]);
  assert.equal((toTypedArray(raw("float32", [1], aligned)) as Float32Array).buffer, aligned.buffer);
  assert.throws(() => fromTypedArray("float32", [2], Float64Array.of(1, 2)), UsageError);
  assert.throws(() => fromTypedArray("float32", [3], Float32Array.of(1, 2)), UsageError);
  assert.throws(() => fromTypedArray("bool", [1], Uint8Array.of(2)), UsageError);
  assert.throws(() => fromTypedArray("int64", [1], Float64Array.of(1)), UsageError);
  assert.throws(() => toTypedArray(raw("float32", [1], new Uint8Array(3))), UsageError);
});

test("the codec bundles for the browser: no Node built-ins", async () => {
  const result = await esbuild.build({
    entryPoints: [new URL("../src/codec.js", import.meta.url).pathname],
    bundle: true,
    platform: "browser",
    format: "esm",
    write: false,
    logLevel: "silent",
  });
  assert.equal(result.errors.length, 0);
  const code = new TextDecoder().decode(result.outputFiles[0]!.contents);
  assert.doesNotMatch(code, /require\(["'](fs|path|fs\/promises)["']\)/);
  assert.match(code, /zstd\.wasm/);
});
