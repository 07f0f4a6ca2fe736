/**
 * Deterministic next-token sampling from a logits vector (PROTOCOL.md §12.6), a port of
 * `edgeoffload/core/sampling.py`: the token drawn at a position is a pure function of
 * `(logits, params, position)`, so the device's local fallback draws exactly what the server
 * would, and a replay draws the same tokens again.
 *
 * The pipeline is Hugging Face `generate(do_sample=True)` with the temperature, top-k and top-p
 * warpers, in that order: greedy argmax when `temperature = 0`; top-k on the model's own values
 * (ties with the k-th kept); scores `(z − max z) / temperature` in float64; top-p keeping a token
 * while the probability mass ranked before it (ties: lower id first) is `< top_p`; then one
 * uniform draw `u` and the first token (ascending id) whose running weight exceeds `u × total`.
 *
 * `u` comes from numpy's `default_rng([seed, position]).random()`, ported here exactly:
 * `SeedSequence` (its uint32 hash mixing) seeds a `PCG64` (128-bit LCG, XSL-RR output), and
 * `random()` is `(next_uint64 >> 11) × 2^-53`. The vectors' `u` bits check this port bit for
 * bit. The sums are numpy's too (`sum` is pairwise, `cumsum` sequential), so the probabilities
 * match to the last bit wherever `Math.exp` and numpy's `exp` agree (both are within an ulp; an
 * ulp can only matter when `u × total` falls exactly on a boundary).
 */

import { SamplingError } from "./errors.js";

/** Largest accepted seed (seeds are non-negative and fit a signed 64-bit integer). */
export const MAX_SEED = 2n ** 63n - 1n;
/** Largest accepted position: `[seed, position]` is an injective key only while it fits 32 bits. */
export const MAX_POSITION = 2 ** 32 - 1;

const HINT = "see SamplingParams: temperature >= 0, top_k >= 0, 0 < top_p <= 1, 0 <= seed < 2**63";

/** How to pick the next token; the defaults are greedy decoding. */
export interface SamplingParams {
  /** 0: greedy (argmax); otherwise logits are divided by it. Finite, ≥ 0. */
  readonly temperature: number;
  /** Keep the `topK` most likely tokens (plus ties); 0 disables it. */
  readonly topK: number;
  /** Nucleus threshold in (0, 1]; 1 disables it. */
  readonly topP: number;
  /** With the position, the only source of randomness; 0 ≤ seed < 2^63 (a bigint: 2^63 − 1 is no JS number). */
  readonly seed: bigint;
}

/** The `sampling` map of an `open` message (§12.6): the wire's field names. */
export interface SamplingWire {
  temperature: number;
  top_k: number;
  top_p: number;
  /** A number when it is a safe integer, else a bigint (encode it as a msgpack uint64). */
  seed: number | bigint;
}

function isInteger(value: unknown): value is number | bigint {
  return typeof value === "bigint" || (typeof value === "number" && Number.isInteger(value));
}

function show(value: unknown): string {
  if (typeof value === "string") return JSON.stringify(value);
  if (typeof value === "boolean") return value ? "True" : "False";
  return String(value);
}

/**
 * Validated, normalised sampling parameters; absent fields take their defaults.
 *
 * @throws SamplingError a value has the wrong type (booleans are not numbers) or is out of range.
 */
export function samplingParams(
  init: { temperature?: number; topK?: number | bigint; topP?: number; seed?: number | bigint } = {},
): SamplingParams {
  const { temperature = 0, topK = 0, topP = 1, seed = 0 } = init;
  if (typeof temperature !== "number" || !Number.isFinite(temperature) || temperature < 0) {
    throw new SamplingError(`temperature must be a finite number >= 0, got ${show(temperature)}`, { hint: HINT });
  }
  if (!isInteger(topK) || topK < 0 || topK > Number.MAX_SAFE_INTEGER) {
    throw new SamplingError(`top_k must be an integer >= 0, got ${show(topK)}`, { hint: HINT });
  }
  if (typeof topP !== "number" || !(topP > 0 && topP <= 1)) {
    throw new SamplingError(`top_p must be a number in (0, 1], got ${show(topP)}`, { hint: HINT });
  }
  const seedOk = typeof seed === "bigint" || (typeof seed === "number" && Number.isSafeInteger(seed));
  if (!seedOk || seed < 0 || BigInt(seed) > MAX_SEED) {
    throw new SamplingError(`seed must be an integer in [0, 2**63), got ${show(seed)}`, { hint: HINT });
  }
  // +0 for -0, as Python's float(-0.0) == 0.0 compares equal and greedy tests `== 0`.
  return { temperature: temperature + 0, topK: Number(topK), topP, seed: BigInt(seed) };
}

/**
 * Parse the wire's `sampling` map (`temperature`, `top_k`, `top_p`, `seed`): absent keys take
 * their defaults, unknown keys and wrong types are rejected (SamplingParams.from_dict).
 */
export function samplingParamsFromWire(data: unknown): SamplingParams {
  const what = "sampling params";
  if (typeof data !== "object" || data === null || Array.isArray(data)) {
    throw new SamplingError(`${what}: expected a JSON object, got ${data === null ? "null" : Array.isArray(data) ? "list" : typeof data}`);
  }
  const map = data as Record<string, unknown>;
  const extra = Object.keys(map).filter((k) => !["temperature", "top_k", "top_p", "seed"].includes(k));
  const number = (key: string, dflt: number, positive: boolean): number => {
    const v = map[key] ?? dflt;
    const n = typeof v === "number" ? v : typeof v === "bigint" ? Number(v) : NaN;
    if (!Number.isFinite(n)) throw new SamplingError(`${what}: field '${key}' must be a finite number`);
    if (n < 0 || (positive && n === 0)) {
      throw new SamplingError(`${what}: field '${key}' must be a finite ${positive ? "positive" : "non-negative"} number`);
    }
    return n;
  };
  const integer = (key: string): number | bigint => {
    const v = map[key] ?? 0;
    if (!isInteger(v)) throw new SamplingError(`${what}: field '${key}' must be an integer`);
    return v;
  };
  const temperature = number("temperature", 0, false);
  const topK = integer("top_k");
  const topP = number("top_p", 1, true);
  const seed = integer("seed");
  if (extra.length > 0) {
    throw new SamplingError(`${what}: unknown field(s) ${extra.sort().map((k) => `'${k}'`).join(", ")}`);
  }
  return samplingParams({ temperature, topK, topP, seed });
}

/** The wire's `sampling` map, all four fields (the reference client always sends them). */
export function samplingParamsToWire(p: SamplingParams): SamplingWire {
  const seed = p.seed <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(p.seed) : p.seed;
  return { temperature: p.temperature, top_k: p.topK, top_p: p.topP, seed };
}

// --- numpy's generator: SeedSequence + PCG64 -------------------------------------------------

const INIT_A = 0x43b0d7e5;
const MULT_A = 0x931e8875;
const INIT_B = 0x8b51f9dd;
const MULT_B = 0x58f38ded;
const MIX_MULT_L = 0xca01f9dd;
const MIX_MULT_R = 0x4973f715;
const POOL_SIZE = 4;

/** An integer as SeedSequence sees it: 32-bit words, least significant first (0 is one word). */
function words32(n: bigint): number[] {
  const out: number[] = [];
  do {
    out.push(Number(n & 0xffffffffn));
    n >>= 32n;
  } while (n > 0n);
  return out;
}

/** numpy `SeedSequence(entropy).generate_state(n32)` as uint32 words (no spawn key). */
function seedSequenceState(entropy: readonly number[], n32: number): Uint32Array {
  let hashConst = INIT_A;
  const hashmix = (value: number): number => {
    value = (value ^ hashConst) >>> 0;
    hashConst = Math.imul(hashConst, MULT_A) >>> 0;
    value = Math.imul(value, hashConst) >>> 0;
    return (value ^ (value >>> 16)) >>> 0;
  };
  const mix = (x: number, y: number): number => {
    const r = (Math.imul(MIX_MULT_L, x) - Math.imul(MIX_MULT_R, y)) >>> 0;
    return (r ^ (r >>> 16)) >>> 0;
  };
  const pool = new Uint32Array(POOL_SIZE);
  for (let i = 0; i < POOL_SIZE; i++) pool[i] = hashmix(entropy[i] ?? 0);
  for (let src = 0; src < POOL_SIZE; src++) {
    for (let dst = 0; dst < POOL_SIZE; dst++) {
      if (src !== dst) pool[dst] = mix(pool[dst]!, hashmix(pool[src]!));
    }
  }
  for (let src = POOL_SIZE; src < entropy.length; src++) {
    for (let dst = 0; dst < POOL_SIZE; dst++) pool[dst] = mix(pool[dst]!, hashmix(entropy[src]!));
  }
  const state = new Uint32Array(n32);
  let hc = INIT_B;
  for (let i = 0; i < n32; i++) {
    let v = (pool[i % POOL_SIZE]! ^ hc) >>> 0;
    hc = Math.imul(hc, MULT_B) >>> 0;
    v = Math.imul(v, hc) >>> 0;
    state[i] = v ^ (v >>> 16);
  }
  return state;
}

const MASK64 = (1n << 64n) - 1n;
const MASK128 = (1n << 128n) - 1n;
const PCG_MULT = (2549297995355413924n << 64n) + 4865540595714422341n;

/** numpy's PCG64: a 128-bit LCG with the XSL-RR 64-bit output. */
class Pcg64 {
  private state = 0n;
  private readonly inc: bigint;

  constructor(seed: bigint, initseq: bigint) {
    this.inc = ((initseq << 1n) | 1n) & MASK128;
    this.step();
    this.state = (this.state + seed) & MASK128;
    this.step();
  }

  private step(): void {
    this.state = (this.state * PCG_MULT + this.inc) & MASK128;
  }

  nextUint64(): bigint {
    this.step();
    const s = this.state;
    const rot = s >> 122n;
    const x = ((s >> 64n) ^ s) & MASK64;
    return ((x >> rot) | (x << ((64n - rot) & 63n))) & MASK64;
  }
}

/**
 * `numpy.random.default_rng([seed, position]).random()`: the one uniform draw in [0, 1) of a
 * position (§12.6).
 */
export function uniformDraw(seed: bigint, position: number): number {
  const st = seedSequenceState([...words32(seed), ...words32(BigInt(position))], 8);
  const u64 = (k: number): bigint => BigInt(st[2 * k]!) | (BigInt(st[2 * k + 1]!) << 32n);
  const rng = new Pcg64((u64(0) << 64n) | u64(1), (u64(2) << 64n) | u64(3));
  return Number(rng.nextUint64() >> 11n) * 2 ** -53;
}

// --- numpy's sums ----------------------------------------------------------------------------

/** numpy's pairwise summation of float64 (what `ndarray.sum()` computes), bit for bit. */
export function pairwiseSum(a: ArrayLike<number>, start = 0, n = a.length - start): number {
  if (n < 8) {
    let res = 0;
    for (let i = 0; i < n; i++) res += a[start + i]!;
    return res;
  }
  if (n <= 128) {
    const r = Array.from({ length: 8 }, (_, j) => a[start + j]!);
    let i = 8;
    for (; i < n - (n % 8); i += 8) for (let j = 0; j < 8; j++) r[j]! += a[start + i + j]!;
    let res = r[0]! + r[1]! + (r[2]! + r[3]!) + (r[4]! + r[5]! + (r[6]! + r[7]!));
    for (; i < n; i++) res += a[start + i]!;
    return res;
  }
  let n2 = Math.floor(n / 2);
  n2 -= n2 % 8;
  return pairwiseSum(a, start, n2) + pairwiseSum(a, start + n2, n - n2);
}

/** `numpy.cumsum` of float64: a plain running sum. */
function cumsum(a: ArrayLike<number>): Float64Array {
  const out = new Float64Array(a.length);
  let acc = 0;
  for (let i = 0; i < a.length; i++) out[i] = acc += a[i]!;
  return out;
}

// --- the pipeline ----------------------------------------------------------------------------

/** Logits as a JS typed array: float32 from the model (float64 accepted). */
export type Logits = Float32Array | Float64Array;

/** The logits as float64 and whether all are finite; SamplingError for NaN, +inf, all −inf. */
function checkedLogits(logits: unknown): { values: Float64Array; allFinite: boolean } {
  if (!(logits instanceof Float32Array || logits instanceof Float64Array)) {
    throw new SamplingError(`logits must be a Float32Array or Float64Array, got ${typeNameOf(logits)}`, {
      hint: "convert float16 logits (Uint16Array bits) to float32 first",
    });
  }
  if (logits.length === 0) {
    throw new SamplingError("logits must have shape [vocab] with vocab >= 1, got shape (0,)", {
      hint: "pass the logits of the last position only, e.g. logits[0, -1]",
    });
  }
  const values = Float64Array.from(logits); // exact: every float32 is a float64
  let allFinite = true;
  let anyAlive = false;
  for (const v of values) {
    if (Number.isNaN(v) || v === Infinity) {
      throw new SamplingError("logits contain NaN or +inf", {
        hint:
          "the model produced non-finite outputs: check the inputs, the KV cache and the numeric precision of the model",
      });
    }
    if (v === -Infinity) allFinite = false;
    else anyAlive = true;
  }
  if (!anyAlive) throw new SamplingError("every logit is -inf: no token can be sampled");
  return { values, allFinite };
}

function checkedPosition(position: unknown): number {
  const ok = (typeof position === "number" && Number.isInteger(position)) || typeof position === "bigint";
  const value = ok ? Number(position) : -1;
  if (!(value >= 0 && value <= MAX_POSITION)) {
    throw new SamplingError(`position must be an integer in [0, 2**32), got ${show(position)}`, {
      hint: "pass the index in the sequence of the token being generated",
    });
  }
  return value;
}

/** The first index of the maximum (numpy's argmax; values hold no NaN here). */
function argmax(values: Float64Array): number {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i]! > values[best]!) best = i;
  return best;
}

/** The k-th largest value (numpy `partition(v, n − k)[n − k]`), 1 ≤ k ≤ n. */
function kthLargest(sortedAscending: Float64Array, k: number): number {
  return sortedAscending[sortedAscending.length - k]!;
}

function pick<T extends Float64Array | Int32Array>(a: T, at: ArrayLike<number>): T {
  const out = new (a.constructor as new (n: number) => T)(at.length);
  for (let i = 0; i < at.length; i++) out[i] = a[at[i]!]!;
  return out;
}

const NUCLEUS_FIRST_GUESS = 256;

/**
 * Positions (ascending) of the nucleus of `probs`, ordered by `scores` (decreasing, ties by
 * lower position). Only the tokens scoring at least the k-th best are sorted, k growing ×8 until
 * their mass reaches `topP`: they are exactly the head of the full order and their running sum
 * is that of a full sort, so the result does not depend on where the search stopped.
 */
function nucleus(scores: Float64Array, probs: Float64Array, topP: number): Int32Array {
  const size = scores.length;
  const sorted = Float64Array.from(scores).sort();
  let k = NUCLEUS_FIRST_GUESS;
  let order: number[];
  let cumulative: Float64Array;
  for (;;) {
    const head: number[] = [];
    const kth = k < size ? kthLargest(sorted, k) : -Infinity;
    for (let i = 0; i < size; i++) if (scores[i]! >= kth) head.push(i);
    order = head.sort((a, b) => (scores[a]! > scores[b]! ? -1 : scores[a]! < scores[b]! ? 1 : a - b));
    cumulative = cumsum(order.map((i) => probs[i]!));
    if (k >= size || cumulative[cumulative.length - 1]! >= topP) break;
    k *= 8;
  }
  // Keep a token while the mass strictly before it is < topP: always the first token.
  const kept = order.filter((_, j) => (j === 0 ? 0 : cumulative[j - 1]!) < topP);
  return Int32Array.from(kept.sort((a, b) => a - b));
}

/** Token ids (ascending) of the survivors and their unnormalised weights. */
function weightsOf(values: Float64Array, allFinite: boolean, p: SamplingParams): { ids: Int32Array; weights: Float64Array } {
  let ids = Int32Array.from({ length: values.length }, (_, i) => i);
  if (!allFinite) {
    const alive = ids.filter((i) => values[i]! > -Infinity);
    ids = alive;
    values = pick(values, alive);
  }
  // Top-k on the model's own values: after the shift below, 1 + 3e-28 and 1 would tie.
  if (p.topK > 0 && p.topK < values.length) {
    const kth = kthLargest(Float64Array.from(values).sort(), p.topK);
    const keep = Int32Array.from({ length: values.length }, (_, i) => i).filter((i) => values[i]! >= kth);
    ids = pick(ids, keep);
    values = pick(values, keep);
  }
  // Shift before dividing: softmax is shift-invariant, and a tiny temperature then yields
  // -inf (weight 0) instead of inf - inf = NaN.
  let max = -Infinity;
  for (const v of values) max = Math.max(max, v);
  let weights = values.map((v) => Math.exp((v - max) / p.temperature));
  if (p.topP < 1 && weights.length > 1) {
    const total = pairwiseSum(weights);
    // Ordered by the model's values too: the shift can turn near-equal logits into ties.
    const kept = nucleus(values, weights.map((w) => w / total), p.topP);
    ids = pick(ids, kept);
    weights = pick(weights, kept);
  }
  return { ids, weights };
}

/**
 * The tokens `sampleToken` can return and their probabilities: ids ascending, each probability
 * > 0, summing to 1. Greedy gives `([argmax], [1])`.
 *
 * @throws SamplingError the logits are not a non-empty Float32Array/Float64Array, or hold NaN,
 *   +inf or only −inf.
 */
export function filteredDistribution(logits: Logits, params: SamplingParams): { tokenIds: number[]; probs: Float64Array } {
  const { values, allFinite } = checkedLogits(logits);
  if (params.temperature === 0) return { tokenIds: [argmax(values)], probs: Float64Array.of(1) };
  const { ids, weights } = weightsOf(values, allFinite, params);
  // exp() underflows to 0 for far-away tokens; they can never be drawn, so are not support.
  const nonzero = Int32Array.from({ length: weights.length }, (_, i) => i).filter((i) => weights[i]! > 0);
  const w = pick(weights, nonzero);
  const total = pairwiseSum(w);
  return { tokenIds: Array.from(pick(ids, nonzero)), probs: w.map((x) => x / total) };
}

/**
 * Pick the next token id: a pure function of `(logits, params, position)`.
 *
 * @param logits shape [vocab] (float32 from the model); −inf masks a token.
 * @param position the sequence index of the token being generated (the session length `P`
 *   after this call, §12.6), 0 ≤ position < 2^32; with the seed it seeds this draw only.
 * @throws SamplingError bad logits (see filteredDistribution) or a bad position.
 */
export function sampleToken(logits: Logits, params: SamplingParams, position: number): number {
  const pos = checkedPosition(position);
  const { values, allFinite } = checkedLogits(logits);
  if (params.temperature === 0) return argmax(values);
  const { ids, weights } = weightsOf(values, allFinite, params);
  if (weights.length === 1) return ids[0]!;
  const cdf = cumsum(weights);
  const total = cdf[cdf.length - 1]!;
  const target = uniformDraw(params.seed, pos) * total;
  // The first token whose running weight exceeds u × total: picked with probability exactly
  // its share, a zero-weight token never.
  let index = cdf.findIndex((c) => c > target);
  if (index === -1) index = cdf.findIndex((c) => c >= total); // u × total rounded up to total
  return ids[index]!;
}

function typeNameOf(value: unknown): string {
  if (value === null) return "null";
  if (typeof value === "object") return (value as object).constructor?.name ?? "object";
  return typeof value;
}
