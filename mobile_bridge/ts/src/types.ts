/** Plain data shared by the codec, the protocol connection and the client. */

/** The dtypes a tensor may have on the wire (PROTOCOL.md §8.1), with their item sizes. */
export const ITEM_SIZES = {
  float32: 4,
  float16: 2,
  float64: 8,
  int64: 8,
  int32: 4,
  int8: 1,
  uint8: 1,
  bool: 1,
} as const;

export type DType = keyof typeof ITEM_SIZES;

/** A tensor as it travels (§8.1): its original dtype and shape, the codec applied, the bytes. */
export interface EncodedTensor {
  readonly dtype: DType;
  readonly shape: readonly number[];
  /** Canonical codec name (§8.2), e.g. "none", "fp16+zstd". */
  readonly codec: string;
  readonly data: Uint8Array;
  /** int8/int8c scales, little-endian float32; empty for every other codec. */
  readonly scales: Uint8Array;
}

/** A decoded tensor: raw little-endian element bytes in C order (what onnxruntime takes). */
export interface RawTensor {
  readonly dtype: DType;
  readonly shape: readonly number[];
  /** `count × itemsize` bytes, little-endian, row-major; `bool` is one 0/1 byte per element. */
  readonly bytes: Uint8Array;
}
