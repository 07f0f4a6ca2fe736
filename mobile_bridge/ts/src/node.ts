/**
 * Node conveniences: read a bundle folder, run its parts in onnxruntime-node, speak over the
 * `ws` package. `openClient(folder, …)` is the one call a Node app needs.
 *
 * onnxruntime-node and ws are imported lazily so that importing this module costs nothing
 * until a client is made (and a bundler that follows it never inlines the native addon).
 */

import { readFile } from "node:fs/promises";
import { join } from "node:path";

import { type Bundle, type ModelFormat, parseManifest, partFile, verifyPart } from "./bundle.js";
import { EdgeClient, type EdgeClientOptions } from "./client.js";
import { initCodecs, parseCodec } from "./codec.js";
import { ManifestError } from "./errors.js";
import { nodeAead } from "./nodecrypto.js";
import { useAead } from "./noise.js";
import type { WebSocketFactory, WebSocketLike } from "./link.js";
import { createRunner, type ModelRunner, type OrtModule, type RunnerOptions } from "./runner.js";

export const MANIFEST = "manifest.json";

async function readPart(folder: string, file: string, sha: string): Promise<Uint8Array> {
  let bytes: Uint8Array;
  try {
    bytes = new Uint8Array(await readFile(join(folder, file)));
  } catch {
    throw new ManifestError(`${join(folder, file)}: part listed in the manifest is missing`);
  }
  verifyPart(file, bytes, sha);
  return bytes;
}

/**
 * Read and verify a bundle folder written by `edgeoffload split` (ManifestError if not). With
 * `format` "auto" (default) the ORT-format parts are loaded when `export-ort` wrote them.
 */
export async function loadBundle(folder: string, format: ModelFormat = "auto"): Promise<Bundle> {
  let text: string;
  try {
    text = await readFile(join(folder, MANIFEST), "utf8");
  } catch {
    throw new ManifestError(`${folder}: no ${MANIFEST}; not a bundle`, {
      hint: "create one with: edgeoffload split MODEL -o DIR",
    });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw new ManifestError(`${join(folder, MANIFEST)}: unreadable manifest (${String(error)})`);
  }
  const manifest = parseManifest(json);
  const headFile = partFile(manifest, "head", format);
  const tailFile = partFile(manifest, "tail", format);
  const head = headFile ? await readPart(folder, headFile.file, headFile.sha256) : null;
  const tail = tailFile ? await readPart(folder, tailFile.file, tailFile.sha256) : null;
  return { manifest, headFormat: headFile?.format ?? null, head, tail };
}

/** A runner of `model` (.onnx or .ort bytes) in onnxruntime-node. */
export async function nodeRunner(model: Uint8Array, options: RunnerOptions = {}): Promise<ModelRunner> {
  const ort = (await import("onnxruntime-node")) as unknown as OrtModule;
  return createRunner(ort, model, { threads: 1, ...options });
}

/** A WebSocket factory over the `ws` package (no per-message deflate: tensors are binary). */
export async function nodeWebSocket(maxPayload = 1 << 27): Promise<WebSocketFactory> {
  const { WebSocket } = await import("ws");
  return (url) => new WebSocket(url, { perMessageDeflate: false, maxPayload }) as unknown as WebSocketLike;
}

export type NodeClientOptions = Omit<EdgeClientOptions, "bundle" | "webSocket" | "head" | "tail"> & {
  readonly threads?: number;
  /** Which encoding of the parts to run (default "auto": .ort when the bundle has it). */
  readonly format?: ModelFormat;
  /** Graph optimization level of the parts' sessions (default "all"). */
  readonly optimization?: RunnerOptions["optimization"];
};

/** Use OpenSSL's AEADs (node:crypto) for the Noise transport; openClient does it. */
export function useNodeCrypto(): void {
  useAead(nodeAead);
}

/**
 * A client for the bundle in `folder`: head and local tail in onnxruntime-node, ws sockets,
 * OpenSSL's AEADs.
 */
export async function openClient(folder: string, options: NodeClientOptions): Promise<EdgeClient> {
  useNodeCrypto();
  const bundle = await loadBundle(folder, options.format ?? "auto");
  if (parseCodec(bundle.manifest.codec).compression === "zstd") await initCodecs();
  const runnerOptions: RunnerOptions = {
    threads: options.threads ?? 1,
    ...(options.optimization === undefined ? {} : { optimization: options.optimization }),
  };
  const head = bundle.head ? await nodeRunner(bundle.head, runnerOptions) : undefined;
  const tailBytes = bundle.tail;
  return new EdgeClient({
    ...options,
    bundle,
    webSocket: await nodeWebSocket(),
    ...(head === undefined ? {} : { head }),
    ...(tailBytes === null ? {} : { tail: () => nodeRunner(tailBytes, runnerOptions) }),
  });
}
