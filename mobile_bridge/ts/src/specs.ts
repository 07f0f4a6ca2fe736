/**
 * Declared tensors and the one rule that checks tensors against them, a port of
 * `edgeoffload.types.match_specs` and `protocol.tensors.check_against_specs` (PROTOCOL.md §8.4
 * stage 2): the caller's inputs are checked with it (UsageError), the server's outputs too
 * (PayloadError).
 */

import { EdgeOffloadError, PayloadError } from "./errors.js";
import { type DType, type EncodedTensor, ITEM_SIZES } from "./types.js";

/** A dim is a size or a symbolic name such as "batch" (the manifest's spelling). */
export type Dim = number | string;

export interface TensorSpec {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: readonly Dim[];
}

type ErrorClass = new (message: string, options?: { hint?: string }) => EdgeOffloadError;

/**
 * Check `[name, dtype, shape]` triples against `specs`: exactly the declared names, each once;
 * equal dtypes and ranks; int dims equal; one value per symbolic dim across all tensors.
 * Returns the symbolic dims' values.
 */
export function matchSpecs(
  tensors: ReadonlyArray<readonly [string, string, readonly number[]]>,
  specs: readonly TensorSpec[],
  options: { error: ErrorClass; kind?: string; hint?: string },
): Map<string, number> {
  const { error: Err, kind = "tensor", hint } = options;
  const expected = new Map(specs.map((s) => [s.name, s]));
  const got = tensors.map(([name]) => name);
  if (new Set(got).size !== got.length) throw new Err(`a ${kind} name appears twice`);
  const missing = [...expected.keys()].filter((n) => !got.includes(n)).sort();
  const unexpected = got.filter((n) => !expected.has(n)).sort();
  if (missing.length > 0 || unexpected.length > 0) {
    const parts = [];
    if (missing.length > 0) parts.push(`missing ${JSON.stringify(missing)}`);
    if (unexpected.length > 0) parts.push(`unexpected ${JSON.stringify(unexpected)}`);
    throw new Err(`${kind}s do not match the bundle: ${parts.join(" ")}`, hint ? { hint } : {});
  }
  const bound = new Map<string, number>();
  for (const [name, dtype, shape] of tensors) {
    const spec = expected.get(name)!;
    const want = `[${spec.shape.join(", ")}]`;
    if (dtype !== spec.dtype) {
      throw new Err(`${kind} '${name}' has dtype ${dtype}, expected ${spec.dtype}`);
    }
    if (shape.length !== spec.shape.length) {
      throw new Err(
        `${kind} '${name}' has shape [${shape.join(", ")}], expected ${want} ` +
          `(rank ${shape.length}, not ${spec.shape.length})`,
      );
    }
    shape.forEach((size, axis) => {
      const dim = spec.shape[axis]!;
      if (typeof dim === "number") {
        if (size !== dim) {
          throw new Err(`${kind} '${name}' has shape [${shape.join(", ")}], expected ${want}`);
        }
      } else {
        const seen = bound.get(dim);
        if (seen === undefined) bound.set(dim, size);
        else if (seen !== size) {
          throw new Err(`${kind} '${name}': dim '${dim}' is ${size} here but ${seen} elsewhere`);
        }
      }
    });
  }
  return bound;
}

/**
 * A server's result must be exactly the graph outputs, with codec "none" (§8.4 stage 2, client
 * side). Empty outputs are accepted: a model may legitimately answer nothing (no detections).
 */
export function checkResult(
  tensors: ReadonlyArray<readonly [string, EncodedTensor]>,
  outputs: readonly TensorSpec[],
): void {
  matchSpecs(
    tensors.map(([name, t]) => [name, t.dtype, t.shape] as const),
    outputs,
    { error: PayloadError },
  );
  for (const [name, t] of tensors) {
    if (t.codec !== "none") {
      throw new PayloadError(`tensor '${name}': codec '${t.codec}', results use 'none'`);
    }
  }
}

/** A dim's value: a size, a named dim, or a sum such as "past + 1"; undefined if unknown. */
export function resolveDim(dim: Dim, dims: Readonly<Record<string, number>>): number | undefined {
  if (typeof dim === "number") return dim;
  if (Object.hasOwn(dims, dim)) return dims[dim];
  if (!dim.includes("+")) return undefined;
  let total = 0;
  for (const term of dim.split("+").map((t) => t.trim())) {
    if (/^[0-9]+$/.test(term)) total += Number(term);
    else if (Object.hasOwn(dims, term)) total += dims[term]!;
    else return undefined;
  }
  return total;
}

/** Bytes of a spec once its symbolic dims are known (undefined while one is not). */
export function specBytes(spec: TensorSpec, dims: Readonly<Record<string, number>>): number | undefined {
  let count = 1;
  for (const dim of spec.shape) {
    const size = resolveDim(dim, dims);
    if (size === undefined) return undefined;
    count *= size;
  }
  return count * ITEM_SIZES[spec.dtype];
}
