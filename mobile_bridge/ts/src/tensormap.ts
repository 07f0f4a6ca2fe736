/**
 * Tensor maps of the wire protocol (PROTOCOL.md §8.1) at the structure level: a port of
 * `encode_tensors` and `decode_tensors` of edgeoffload/protocol/tensors.py (§8.4 stage 1).
 *
 * A malformed map (not a list, too many entries, a missing or unknown field, a wrong msgpack
 * type) is a {@link RemoteProtocolError}; a well-formed map that lies about its tensors (a name
 * twice, a dtype not allowed, a bad shape) is a {@link PayloadError}, so that a server can answer
 * that one request and keep the connection. Byte lengths and codecs are checked later, by the
 * codec (stage 3), not here.
 */

import { PayloadError, RemoteProtocolError } from "./errors.js";
import { ITEM_SIZES, type DType, type EncodedTensor } from "./types.js";
import { MAX_DIMS, MAX_TENSORS, StrictMap, type Encodable, type Value } from "./wire.js";

/** A named tensor as messages carry them, in message order. */
export type NamedTensor = readonly [string, EncodedTensor];

/**
 * Tensor maps for a message, fields in the reference order `name, dtype, shape, codec`, then
 * `scales` only when non-empty, then `data` last (the reference streams the payload from there).
 */
export function encodeTensors(tensors: readonly NamedTensor[]): Encodable[] {
  return tensors.map(([name, t]) => {
    const item = new Map<string, Encodable>([
      ["name", name],
      ["dtype", t.dtype],
      ["shape", [...t.shape]],
      ["codec", t.codec],
    ]);
    if (t.scales.length > 0) item.set("scales", t.scales);
    item.set("data", t.data);
    return item;
  });
}

/** Whether `dtype` is one of the dtypes allowed on the wire (§8.1). */
export function isAllowedDType(dtype: string): dtype is DType {
  return Object.prototype.hasOwnProperty.call(ITEM_SIZES, dtype);
}

/**
 * The tensors of a `tensors` array, checked for structure only (see the module comment); `what`
 * names the message in errors ("result", "prefill", …).
 *
 * One difference from Python, which has unbounded ints: a dim beyond 2^53 − 1 (valid at stage 1
 * there, refused at stage 3 by the size limit) is refused here already, as the same
 * PayloadError, because `EncodedTensor.shape` holds JS numbers.
 */
export function decodeTensors(raw: Value, what: string): Array<[string, EncodedTensor]> {
  if (!Array.isArray(raw) || raw.length > MAX_TENSORS) {
    throw new RemoteProtocolError(`${what}: 'tensors' must be a list of at most ${MAX_TENSORS}`);
  }
  const out: Array<[string, EncodedTensor]> = [];
  const names = new Set<string>();
  for (const entry of raw) {
    if (!(entry instanceof Map)) {
      throw new RemoteProtocolError(`${what}: each tensor must be a map`);
    }
    const m = new StrictMap(entry, `${what} tensor`);
    const name = m.get("name", "str");
    const dtype = m.get("dtype", "str");
    const shape = m.get("shape", "array");
    const codec = m.get("codec", "str");
    const data = m.get("data", "bin");
    const scales = m.get("scales", "bin", { optional: true }) ?? new Uint8Array(0);
    m.done();
    if (names.has(name)) throw new PayloadError(`tensor '${name}' appears twice`);
    names.add(name);
    if (!isAllowedDType(dtype)) {
      throw new PayloadError(`tensor '${name}': dtype '${dtype}' is not allowed`);
    }
    // Only ints ≥ 0: never a bool, a float or nil. (Decoded ints are numbers when safe.)
    if (shape.length > MAX_DIMS || !shape.every((d) => typeof d === "number" && d >= 0)) {
      throw new PayloadError(`tensor '${name}': shape must be at most ${MAX_DIMS} ints >= 0`);
    }
    out.push([name, { dtype, shape: shape as number[], codec, data, scales }]);
  }
  return out;
}
