/** Strict msgpack (src/wire.ts): the reference's byte forms, and every rejection of wire.py. */

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { encode as referenceEncode } from "@msgpack/msgpack";

import { RemoteProtocolError, UsageError } from "../src/errors.js";
import { fromHex, toHex } from "../src/keys.js";
import {
  Float64,
  MAX_DEPTH,
  StrictMap,
  ZERO_COPY_BIN,
  canonicalInt,
  pack,
  packParts,
  truncateUtf8,
  unpack,
  type Value,
} from "../src/wire.js";

const rejects = (data: Uint8Array | string, maxBin = 4096) =>
  assert.throws(
    () => unpack(typeof data === "string" ? fromHex(data) : data, { maxBin }),
    RemoteProtocolError,
  );

/** `{"a": <value bytes>}` */
const inMap = (valueHex: string) => fromHex("81a161" + valueHex);

describe("pack: msgpack-python's forms (use_bin_type=True)", () => {
  test("integers take the shortest form, numbers and bigints alike", () => {
    const cases: Array<[number | bigint, string]> = [
      [0, "00"],
      [127, "7f"],
      [128, "cc80"],
      [255, "ccff"],
      [256, "cd0100"],
      [65535, "cdffff"],
      [65536, "ce00010000"],
      [2 ** 32 - 1, "ceffffffff"],
      [2 ** 32, "cf0000000100000000"],
      [Number.MAX_SAFE_INTEGER, "cf001fffffffffffff"],
      [2n ** 64n - 1n, "cfffffffffffffffff"],
      [8006126049727944423n, "cf6f1b7939550916e7"],
      [5n, "05"],
      [-1, "ff"],
      [-32, "e0"],
      [-33, "d0df"],
      [-128, "d080"],
      [-129, "d1ff7f"],
      [-32768, "d18000"],
      [-32769, "d2ffff7fff"],
      [-(2 ** 31), "d280000000"],
      [-(2 ** 31) - 1, "d3ffffffff7fffffff"],
      [-(2n ** 63n), "d38000000000000000"],
    ];
    for (const [value, expected] of cases) assert.equal(toHex(pack(value)), expected, String(value));
    assert.throws(() => pack(2n ** 64n), UsageError);
    assert.throws(() => pack(-(2n ** 63n) - 1n), UsageError);
  });

  test("agrees with @msgpack/msgpack for safe integers", () => {
    for (let i = 0; i < 2000; i++) {
      const magnitude = 2 ** Math.floor(Math.random() * 53);
      const value = Math.floor((Math.random() - 0.5) * 2 * magnitude);
      assert.equal(toHex(pack(value)), toHex(referenceEncode(value)), String(value));
    }
  });

  test("floats are float64; Float64 forces it for integral values", () => {
    assert.equal(toHex(pack(1.5)), "cb3ff8000000000000");
    assert.equal(toHex(pack(new Float64(1))), "cb3ff0000000000000");
    assert.equal(toHex(pack(0.8)), "cb3fe999999999999a");
    assert.equal(toHex(pack(1)), "01");
  });

  test("str, bin, array and map headers", () => {
    assert.equal(toHex(pack("a".repeat(31))).slice(0, 2), "bf");
    assert.equal(toHex(pack("a".repeat(32))).slice(0, 4), "d920");
    assert.equal(toHex(pack("a".repeat(256))).slice(0, 6), "da0100");
    assert.equal(toHex(pack(new Uint8Array(0))), "c400");
    assert.equal(toHex(pack(new Uint8Array(256))).slice(0, 6), "c50100");
    assert.equal(toHex(pack(new Uint8Array(65536))).slice(0, 10), "c600010000");
    assert.equal(toHex(pack(new Array(15).fill(0))).slice(0, 2), "9f");
    assert.equal(toHex(pack(new Array(16).fill(0))).slice(0, 6), "dc0010");
    const big = new Map<string, Value>(Array.from({ length: 16 }, (_, i) => [`k${i}`, i]));
    assert.equal(toHex(pack(big)).slice(0, 6), "de0010");
    assert.equal(toHex(pack([null, true, false])), "93c0c3c2");
    // Plain objects keep their order and leave undefined fields out.
    assert.equal(toHex(pack({ t: "x", skip: undefined, id: 1 })), "82a174a178a2696401");
  });

  test("packParts references large bins and concatenates to pack", () => {
    const payload = new Uint8Array(ZERO_COPY_BIN).fill(7);
    const value = { t: "run", data: payload, after: "x" };
    const parts = packParts(value);
    assert.ok(parts.includes(payload));
    const joined = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      joined.set(p, at);
      at += p.length;
    }
    assert.deepEqual(joined, pack(value));
    assert.equal(toHex(pack(value)), toHex(referenceEncode(value)));
  });
});

describe("unpack: the limits and rejections of wire.py", () => {
  test("ints, floats, bins and strs decode to distinguishable types", () => {
    const m = unpack(fromHex("86a169 01 a166 cb3ff8000000000000 a167 ca3fc00000 a162 c40101 a173 a178 a175 cfffffffffffffffff".replace(/ /g, "")), { maxBin: 16 });
    assert.equal(m.get("i"), 1);
    assert.deepEqual(m.get("f"), new Float64(1.5));
    assert.deepEqual(m.get("g"), new Float64(1.5));
    assert.deepEqual(m.get("b"), Uint8Array.of(1));
    assert.equal(m.get("s"), "x");
    assert.equal(m.get("u"), 2n ** 64n - 1n);
    assert.equal(canonicalInt(5n), 5);
    // A leading BOM is kept, as Python keeps U+FEFF.
    assert.equal(unpack(inMap("a3efbbbf"), { maxBin: 0 }).get("a"), "\ufeff");
  });

  test("duplicate keys, at any depth", () => {
    rejects("82a16101a16102");
    rejects("81a16182a16201a16202");
    rejects("81a1619182a16201a16202");
  });

  test("trailing bytes, truncation, empty input, not a map, the never-used byte", () => {
    rejects("80c0");
    rejects("81a161");
    rejects("82a16101");
    rejects("");
    rejects("9101");
    rejects("01");
    rejects(inMap("c1"));
    rejects(inMap("dd00010000")); // an array header longer than the input
  });

  test("string limits and UTF-8", () => {
    const ok = pack({ a: "x".repeat(4096) });
    assert.equal((unpack(ok, { maxBin: 0 }).get("a") as string).length, 4096);
    rejects(pack({ a: "x".repeat(4097) }));
    rejects(pack({ ["k".repeat(4097)]: 1 })); // keys are strs too
    rejects(inMap("a2c328")); // invalid UTF-8
    rejects(inMap("a3eda080")); // an encoded surrogate
    rejects(inMap("a2c0af")); // overlong
    rejects("81a2c32801"); // invalid UTF-8 in a key
  });

  test("bin, array and map limits", () => {
    assert.equal((unpack(pack({ a: new Uint8Array(64) }), { maxBin: 64 }).get("a") as Uint8Array).length, 64);
    rejects(pack({ a: new Uint8Array(65) }), 64);
    unpack(pack({ a: new Array(4096).fill(0) }), { maxBin: 0 });
    rejects(pack({ a: new Array(4097).fill(0) }));
    const map64 = new Map<string, Value>(Array.from({ length: 64 }, (_, i) => [`k${i}`, i]));
    unpack(pack(map64), { maxBin: 0 });
    map64.set("one more", 0);
    rejects(pack(map64));
  });

  test("no extension types, the timestamp included", () => {
    rejects(inMap("d40100"));
    rejects(inMap("d6ff00000000")); // timestamp 32
    rejects(inMap("c70005")); // ext 8 of length 0
    rejects(inMap("c8000105ff"));
    rejects(inMap("c90000000105ff"));
  });

  test("map keys must be strings", () => {
    rejects("810101");
    rejects("81c4016101"); // a bin key
    rejects("81c001");
    rejects("819101" + "01");
  });

  test("nesting: msgpack-python's 1024 containers", () => {
    // A map, then arrays: MAX_DEPTH containers in all pass, one more is refused.
    const nested = (containers: number) =>
      fromHex("81a161" + "91".repeat(containers - 2) + "90");
    unpack(nested(MAX_DEPTH), { maxBin: 0 });
    rejects(nested(MAX_DEPTH + 1));
  });
});

describe("StrictMap", () => {
  const m = (value: Record<string, unknown>) => new StrictMap(unpack(pack(value as never), { maxBin: 64 }), "msg");

  test("typed fields: a bool is not an int, a float is not an int, nil is no type", () => {
    assert.equal(m({ a: 1 }).get("a", "int"), 1);
    assert.throws(() => m({ a: true }).get("a", "int"), RemoteProtocolError);
    assert.throws(() => m({ a: 1.5 }).get("a", "int"), RemoteProtocolError);
    assert.throws(() => m({ a: new Float64(1) }).get("a", "int"), RemoteProtocolError);
    assert.throws(() => m({ a: 1 }).get("a", "bool"), RemoteProtocolError);
    assert.throws(() => m({ a: "x" }).get("a", "bin"), RemoteProtocolError);
    assert.throws(() => m({ a: new Uint8Array(1) }).get("a", "str"), RemoteProtocolError);
    assert.throws(() => m({ a: null }).get("a", "str", { optional: true }), RemoteProtocolError);
    assert.equal(m({}).get("a", "str", { optional: true }), undefined);
    assert.throws(() => m({}).get("a", "str"), RemoteProtocolError);
    assert.equal(m({ a: 2 }).get("a", "number"), 2);
    assert.equal(m({ a: new Float64(2.5) }).get("a", "number"), 2.5);
    assert.throws(() => m({ a: false }).get("a", "number"), RemoteProtocolError);
  });

  test("request ids are 0..2^63-1, canonical", () => {
    assert.equal(m({ id: 0 }).requestId(), 0);
    assert.equal(m({ id: 2n ** 63n - 1n }).requestId(), 2n ** 63n - 1n);
    assert.equal(m({ id: 2 ** 40 }).requestId(), 2 ** 40);
    assert.throws(() => m({ id: -1 }).requestId(), RemoteProtocolError);
    assert.throws(() => m({ id: 2n ** 63n }).requestId(), RemoteProtocolError);
  });

  test("done() rejects unknown fields", () => {
    const s = m({ t: "x", extra: 1 });
    s.get("t", "str");
    assert.throws(() => s.done(), /unknown field\(s\) \['extra'\]/);
    const fine = m({ t: "x" });
    fine.get("t", "str");
    fine.done();
  });
});

test("truncateUtf8 cuts on a character boundary", () => {
  assert.equal(truncateUtf8("abc", 2), "ab");
  assert.equal(truncateUtf8("é".repeat(3000)).length, 2048);
  assert.equal(truncateUtf8("aé", 2), "a");
  assert.equal(truncateUtf8("€€", 5), "€");
  assert.equal(truncateUtf8("short"), "short");
});
