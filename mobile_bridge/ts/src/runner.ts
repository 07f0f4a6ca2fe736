/**
 * Run one ONNX part (the head, or the tail for the local fallback) behind one small
 * interface, on whichever onnxruntime the platform has: `onnxruntime-node` in Node,
 * `onnxruntime-web` (wasm) in the browser. Both expose the same `InferenceSession` and
 * `Tensor` API (onnxruntime-common), so the module is passed in rather than imported here:
 * the protocol core stays free of either, and the browser bundle never pulls the native one.
 *
 * Tensors cross this interface as RawTensor (little-endian element bytes), the form the codec
 * encodes from and decodes to; a `.ort` part loads the same way as an `.onnx` one (onnxruntime
 * recognises the format from the bytes).
 */

import { fromTypedArray, toTypedArray } from "./codec.js";
import { UsageError } from "./errors.js";
import type { DType, RawTensor } from "./types.js";

/** The slice of an onnxruntime tensor this module uses. */
export interface OrtTensorLike {
  readonly type: string;
  readonly dims: readonly number[];
  readonly data: unknown;
}

/** The slice of the onnxruntime module (node or web) this module uses. */
export interface OrtModule {
  readonly InferenceSession: {
    create(model: Uint8Array, options?: Record<string, unknown>): Promise<OrtSessionLike>;
  };
  readonly Tensor: new (type: string, data: unknown, dims: readonly number[]) => OrtTensorLike;
}

export interface OrtSessionLike {
  readonly inputNames: readonly string[];
  readonly outputNames: readonly string[];
  run(feeds: Record<string, OrtTensorLike>): Promise<Record<string, OrtTensorLike>>;
  release?(): Promise<void>;
}

/** One model part that turns named tensors into named tensors. */
export interface ModelRunner {
  run(inputs: Readonly<Record<string, RawTensor>>): Promise<Record<string, RawTensor>>;
  release(): Promise<void>;
}

export interface RunnerOptions {
  /** Intra-op threads (onnxruntime-node; the wasm build sets its own through `ort.env`). */
  readonly threads?: number;
  /** Execution providers, e.g. ["wasm"] in the browser; the runtime's default when absent. */
  readonly executionProviders?: readonly string[];
  /**
   * Graph optimization level (default "all"). An .ort part was optimized when it was written
   * and is not re-optimized; run its .onnx at the level the manifest records to compare them.
   */
  readonly optimization?: "disabled" | "basic" | "extended" | "all";
}

const ORT_TYPES: Record<DType, string> = {
  float32: "float32",
  float16: "float16",
  float64: "float64",
  int64: "int64",
  int32: "int32",
  int8: "int8",
  uint8: "uint8",
  bool: "bool",
};

/** A runner over an onnxruntime session of `model` (the bytes of an .onnx or .ort file). */
export async function createRunner(
  ort: OrtModule,
  model: Uint8Array,
  options: RunnerOptions = {},
): Promise<ModelRunner> {
  const sessionOptions: Record<string, unknown> = { graphOptimizationLevel: options.optimization ?? "all" };
  if (options.threads !== undefined) {
    sessionOptions.intraOpNumThreads = options.threads;
    sessionOptions.interOpNumThreads = 1;
  }
  if (options.executionProviders !== undefined) {
    sessionOptions.executionProviders = [...options.executionProviders];
  }
  const session = await ort.InferenceSession.create(model, sessionOptions);
  return {
    async run(inputs) {
      const feeds: Record<string, OrtTensorLike> = {};
      for (const name of session.inputNames) {
        const raw = inputs[name];
        if (raw === undefined) throw new UsageError(`the model needs input '${name}'`);
        feeds[name] = new ort.Tensor(ORT_TYPES[raw.dtype], toTypedArray(raw), raw.shape);
      }
      const results = await session.run(feeds);
      const out: Record<string, RawTensor> = {};
      for (const name of session.outputNames) {
        const tensor = results[name]!;
        const dtype = tensor.type as DType;
        if (!Object.hasOwn(ORT_TYPES, dtype)) {
          throw new UsageError(`output '${name}' has dtype ${tensor.type}, not one the protocol carries`);
        }
        out[name] = fromTypedArray(dtype, tensor.dims, tensor.data as ArrayBufferView);
      }
      return out;
    },
    async release() {
      await session.release?.();
    },
  };
}
