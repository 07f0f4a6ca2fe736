/**
 * The sampler against the golden vectors' `sampling` section (PROTOCOL.md §12.6), bit for bit,
 * plus cases computed with edgeoffload/core/sampling.py on a 5000-token vocabulary (nuclei
 * larger than the first 256-token guess, -inf masks, a tiny temperature) and invalid settings.
 */

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { SamplingError } from "../src/errors.js";
import {
  filteredDistribution,
  pairwiseSum,
  sampleToken,
  samplingParams,
  samplingParamsFromWire,
  samplingParamsToWire,
  uniformDraw,
  type SamplingParams,
} from "../src/sampling.js";

interface WireParams {
  temperature: number;
  top_k: number;
  top_p: number;
  seed: string;
}
interface Case {
  params: WireParams;
  position: number;
  u?: { value: number; bits_hex: string };
  support: number[];
  probs: number[];
  token: number;
}

// Seeds up to 2^63 - 1 are no JS numbers: read them as strings before JSON.parse rounds them.
const text = readFileSync(new URL("../../../vectors/protocol-v1.json", import.meta.url), "utf8");
const VECTORS = JSON.parse(text.replace(/"seed": (\d+)/g, '"seed": "$1"')) as {
  sampling: { logits_f32le_hex: string; logits: (number | string)[]; cases: Case[] };
};
const SAMPLING = VECTORS.sampling;

function fromHex(hex: string): Uint8Array {
  return Uint8Array.from(hex.match(/../g) ?? [], (b) => parseInt(b, 16));
}

function bitsHex(x: number): string {
  const v = new DataView(new ArrayBuffer(8));
  v.setFloat64(0, x);
  return Array.from(new Uint8Array(v.buffer), (b) => b.toString(16).padStart(2, "0")).join("");
}

function params(p: WireParams): SamplingParams {
  return samplingParams({ temperature: p.temperature, topK: p.top_k, topP: p.top_p, seed: BigInt(p.seed) });
}

const LOGITS = new Float32Array(fromHex(SAMPLING.logits_f32le_hex).buffer);

test("vector logits decode to the listed values", () => {
  assert.deepEqual(Array.from(LOGITS), SAMPLING.logits.map((v) => (v === "-inf" ? -Infinity : Number(v))));
});

for (const c of SAMPLING.cases) {
  const p = c.params;
  test(`vector: T=${p.temperature} k=${p.top_k} p=${p.top_p} seed=${p.seed} @${c.position}`, () => {
    const sp = params(p);
    if (c.u === undefined) {
      assert.equal(p.temperature, 0);
    } else {
      const u = uniformDraw(sp.seed, c.position);
      assert.equal(bitsHex(u), c.u.bits_hex);
      assert.equal(u, c.u.value);
    }
    const { tokenIds, probs } = filteredDistribution(LOGITS, sp);
    assert.deepEqual(tokenIds, c.support);
    assert.equal(probs.length, c.probs.length);
    probs.forEach((q, i) => assert.ok(Math.abs(q - c.probs[i]!) <= 1e-12 * c.probs[i]!, `prob ${i}: ${q} vs ${c.probs[i]}`));
    assert.equal(sampleToken(LOGITS, sp, c.position), c.token);
    // float64 logits of the same values sample the same token
    assert.equal(sampleToken(Float64Array.from(LOGITS), sp, c.position), c.token);
  });
}

test("the vectors' probabilities are reproduced bit for bit", () => {
  for (const c of SAMPLING.cases) {
    assert.deepEqual(Array.from(filteredDistribution(LOGITS, params(c.params)).probs), c.probs);
  }
});

test("uniformDraw: multi-word seeds and extreme positions (numpy default_rng([seed, position]).random())", () => {
  const expected: [bigint, number, string][] = [
    [0n, 0, "3fe461fd79fb3850"],
    [1n, 0, "3fe060d7be6f245c"],
    [2n ** 32n, 7, "3fde0c71cded008a"],
    [2n ** 32n + 1n, 7, "3fe6b84143f007ed"],
    [123456789012345n, 99, "3fe102e9df9bb519"],
    [2n ** 63n - 1n, 0, "3fc675ac88b7d938"],
    [5n, 2 ** 32 - 1, "3fec9876693c4377"],
  ];
  for (const [seed, position, hex] of expected) assert.equal(bitsHex(uniformDraw(seed, position)), hex, `${seed}@${position}`);
});

// Computed with edgeoffload.core.sampling (sample_token, filtered_distribution) on
// logits[i] = float32(((i * 7919) % 1013) / 97 - 5), every 7th token masked with -inf.
const BIG_CASES = [
  { t: 1.0, k: 0, p: 0.9, seed: 11, tokens: [619, 1024, 4507, 4841, 723, 367, 1265, 2755, 3625, 3357, 2087, 3050], size: 945, sum: 2357620, first: "3f3a67c81af57b61", max: "3f65fff3c69e36dc" },
  { t: 0.7, k: 0, p: 0.95, seed: 3, tokens: [422, 1254, 115, 493, 4512, 674, 2278, 3428, 1747, 4890, 3844, 3428], size: 861, sum: 2150433, first: "3f2f97228b21530b", max: "3f6dab7a5e3d0718" },
  { t: 1.3, k: 50, p: 0.8, seed: 4, tokens: [4731, 4961, 3050, 3384, 1243, 1243, 1588, 4846, 3050, 1807, 4282, 909], size: 41, sum: 99987, first: "3f983ca967cc4e47", max: "3f99d30d0464db04" },
  { t: 1e-300, k: 0, p: 1.0, seed: 1, tokens: [3603, 1577, 1577, 564, 1577, 1577, 564, 1577, 3603, 3603, 4616, 564], size: 4, sum: 10360, first: "3fd0000000000000", max: "3fd0000000000000" },
  { t: 2.0, k: 0, p: 0.3, seed: 9, tokens: [4359, 4178, 3105, 1473, 4085, 3729, 3543, 3280, 1024, 2864, 274, 1402], size: 291, sum: 727235, first: "3f6ff2267e1c4960", max: "3f70a538cc809726" },
  { t: 1.0, k: 3000, p: 1.0, seed: 2, tokens: [1293, 4485, 4266, 1748, 2592, 4118, 4430, 587, 827, 2552, 4168, 1205], size: 3000, sum: 7497037, first: "3f37c851fad20221", max: "3f63d08529fa3fb0" },
];

test("a 5000-token vocabulary matches the Python sampler", () => {
  const logits = Float32Array.from({ length: 5000 }, (_, i) => (i % 7 === 0 ? -Infinity : ((i * 7919) % 1013) / 97 - 5));
  for (const c of BIG_CASES) {
    const sp = samplingParams({ temperature: c.t, topK: c.k, topP: c.p, seed: c.seed });
    const tokens = Array.from({ length: 12 }, (_, pos) => sampleToken(logits, sp, pos));
    assert.deepEqual(tokens, c.tokens, `tokens ${JSON.stringify(c)}`);
    const { tokenIds, probs } = filteredDistribution(logits, sp);
    assert.equal(tokenIds.length, c.size);
    assert.equal(tokenIds.reduce((a, b) => a + b, 0), c.sum);
    assert.equal(bitsHex(probs[0]!), c.first);
    assert.equal(bitsHex(Math.max(...probs)), c.max);
    assert.ok(tokens.every((t) => tokenIds.includes(t)));
  }
});

test("greedy takes the first maximum and draws nothing", () => {
  const logits = Float32Array.of(1, 5, -Infinity, 5, 2);
  assert.equal(sampleToken(logits, samplingParams(), 0), 1);
  assert.deepEqual(filteredDistribution(logits, samplingParams()), { tokenIds: [1], probs: Float64Array.of(1) });
});

test("a single survivor is returned without a draw; a masked token is never drawn", () => {
  const logits = Float32Array.of(-Infinity, 3, -Infinity);
  const sp = samplingParams({ temperature: 1, seed: 1 });
  for (let pos = 0; pos < 50; pos++) assert.equal(sampleToken(logits, sp, pos), 1);
  const two = Float32Array.of(0, -Infinity, 0);
  const seen = new Set(Array.from({ length: 64 }, (_, pos) => sampleToken(two, sp, pos)));
  assert.deepEqual([...seen].sort(), [0, 2]);
});

test("pairwiseSum is numpy's summation order, not a running sum", () => {
  // numpy: np.array([1e16] + [1.0] * 19 + [0.1 * i for i in range(200)]).sum()
  const a = [1e16, ...Array.from({ length: 19 }, () => 1), ...Array.from({ length: 200 }, (_, i) => 0.1 * i)];
  assert.equal(bitsHex(pairwiseSum(a)), "4341c37937e083ec");
  assert.equal(bitsHex(a.reduce((x, y) => x + y, 0)), "4341c37937e083de"); // a running sum differs
  assert.equal(pairwiseSum([1, 2, 3]), 6);
  assert.equal(pairwiseSum([]), 0);
});

test("invalid sampling settings raise SamplingError", () => {
  const bad: Parameters<typeof samplingParams>[0][] = [
    { temperature: -1 },
    { temperature: NaN },
    { temperature: Infinity },
    { temperature: true as unknown as number },
    { temperature: "1" as unknown as number },
    { topK: -1 },
    { topK: 1.5 },
    { topK: true as unknown as number },
    { topP: 0 },
    { topP: 1.5 },
    { topP: NaN },
    { topP: -0.5 },
    { seed: -1 },
    { seed: 2n ** 63n },
    { seed: 1.5 },
    { seed: 2 ** 53 }, // not a safe integer: pass a bigint
    { seed: false as unknown as number },
  ];
  for (const init of bad) assert.throws(() => samplingParams(init), SamplingError, JSON.stringify(init, (_, v) => (typeof v === "bigint" ? String(v) : v)));
  assert.deepEqual(samplingParams(), { temperature: 0, topK: 0, topP: 1, seed: 0n });
  assert.equal(samplingParams({ seed: 2n ** 63n - 1n }).seed, 2n ** 63n - 1n);
});

test("the wire's sampling map: defaults, strict fields, round trip", () => {
  assert.deepEqual(samplingParamsFromWire({}), samplingParams());
  const p = samplingParamsFromWire({ temperature: 0.8, top_k: 20, top_p: 0.9, seed: 2n ** 63n - 1n });
  assert.deepEqual(p, { temperature: 0.8, topK: 20, topP: 0.9, seed: 2n ** 63n - 1n });
  assert.deepEqual(samplingParamsToWire(p), { temperature: 0.8, top_k: 20, top_p: 0.9, seed: 2n ** 63n - 1n });
  assert.deepEqual(samplingParamsToWire(samplingParams({ seed: 7 })), { temperature: 0, top_k: 0, top_p: 1, seed: 7 });
  assert.deepEqual(samplingParamsFromWire({ temperature: 1, top_p: 1 }), samplingParams({ temperature: 1 }));
  const cases: [unknown, RegExp][] = [
    [null, /expected a JSON object/],
    [[1], /expected a JSON object/],
    [{ temperature: 1, beam: 2 }, /unknown field\(s\) 'beam'/],
    [{ temperature: true }, /'temperature' must be a finite number/],
    [{ temperature: "1" }, /'temperature' must be a finite number/],
    [{ temperature: -1 }, /non-negative/],
    [{ top_p: 0 }, /'top_p' must be a finite positive number/],
    [{ top_k: 1.5 }, /'top_k' must be an integer/],
    [{ top_k: false }, /'top_k' must be an integer/],
    [{ seed: -1 }, /seed must be an integer in \[0, 2\*\*63\)/],
    [{ top_p: 2 }, /top_p must be a number in \(0, 1\]/],
  ];
  for (const [data, message] of cases) assert.throws(() => samplingParamsFromWire(data), (e: unknown) => e instanceof SamplingError && message.test(e.message));
});

test("bad logits and positions raise SamplingError", () => {
  const sp = samplingParams({ temperature: 1 });
  const logits = Float32Array.of(1, 2, 3);
  for (const position of [-1, 2 ** 32, 1.5, NaN]) {
    assert.throws(() => sampleToken(logits, sp, position), /position must be an integer in \[0, 2\*\*32\)/);
  }
  assert.equal(typeof sampleToken(logits, sp, 2 ** 32 - 1), "number");
  const bad: [unknown, RegExp][] = [
    [Float32Array.of(1, NaN), /NaN or \+inf/],
    [Float32Array.of(1, Infinity), /NaN or \+inf/],
    [Float32Array.of(-Infinity, -Infinity), /every logit is -inf/],
    [new Float32Array(0), /vocab >= 1/],
    [[1, 2, 3], /must be a Float32Array or Float64Array/],
    [Int32Array.of(1, 2), /must be a Float32Array or Float64Array/],
  ];
  for (const [value, message] of bad) {
    assert.throws(() => sampleToken(value as Float32Array, sp, 0), (e: unknown) => e instanceof SamplingError && message.test(e.message));
    // greedy validates the logits too
    assert.throws(() => sampleToken(value as Float32Array, samplingParams(), 0), SamplingError);
  }
});
