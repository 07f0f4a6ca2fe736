/**
 * @edgeoffload/client — the edgeoffload device client in TypeScript (PROTOCOL.md v1).
 *
 * Platform-neutral API; `@edgeoffload/client/node` adds bundle folders, onnxruntime-node and
 * `ws`, `@edgeoffload/client/browser` fetched bundles, onnxruntime-web and the page's WebSocket.
 */

export { type Bundle, type Manifest, type ModelFormat, parseManifest, partFile, verifyPart } from "./bundle.js";
export { EdgeClient, type EdgeClientOptions, type Fallback, type RequestTiming } from "./client.js";
export { codecFor, decode, encode, fromTypedArray, initCodecs, parseCodec, toTypedArray } from "./codec.js";
export { ClientConnection, type Event, PROTOCOL_VERSION } from "./connection.js";
export * from "./errors.js";
export { KeyPair, decodePrivate, decodePublic, encodePrivate, encodePublic, fingerprint } from "./keys.js";
export type { WebSocketFactory, WebSocketLike } from "./link.js";
export { type ModelRunner, type OrtModule, type RunnerOptions, createRunner } from "./runner.js";
export { sampleToken, samplingParams, type SamplingParams } from "./sampling.js";
export type { TensorSpec } from "./specs.js";
export type { DType, EncodedTensor, RawTensor } from "./types.js";
