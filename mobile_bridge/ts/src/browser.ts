/**
 * Browser conveniences: fetch a bundle over HTTP, run its parts in onnxruntime-web (wasm),
 * speak over the page's WebSocket. The app passes the `ort` module it loaded (the
 * onnxruntime-web build and its wasm files are the app's to serve; see demo/).
 */

import { type Bundle, type ModelFormat, parseManifest, partFile, verifyPart } from "./bundle.js";
import { EdgeClient, type EdgeClientOptions } from "./client.js";
import { initCodecs, parseCodec } from "./codec.js";
import { ManifestError } from "./errors.js";
import type { WebSocketLike } from "./link.js";
import { createRunner, type OrtModule } from "./runner.js";

async function fetchBytes(url: string): Promise<Uint8Array> {
  const response = await fetch(url);
  if (!response.ok) throw new ManifestError(`${url}: ${response.status} ${response.statusText}`);
  return new Uint8Array(await response.arrayBuffer());
}

/** Fetch and verify the bundle served under `baseUrl` (manifest.json and its parts). */
export async function fetchBundle(
  baseUrl: string,
  options: { withTail?: boolean; format?: ModelFormat } = {},
): Promise<Bundle> {
  const base = baseUrl.endsWith("/") ? baseUrl : `${baseUrl}/`;
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder().decode(await fetchBytes(`${base}manifest.json`)));
  } catch (error) {
    if (error instanceof ManifestError) throw error;
    throw new ManifestError(`${base}manifest.json: unreadable manifest (${String(error)})`);
  }
  const manifest = parseManifest(json);
  const load = async (part: { file: string; sha256: string } | null): Promise<Uint8Array | null> => {
    if (part === null) return null;
    const bytes = await fetchBytes(base + encodeURIComponent(part.file));
    verifyPart(part.file, bytes, part.sha256);
    return bytes;
  };
  const format = options.format ?? "auto";
  const headFile = partFile(manifest, "head", format);
  const head = await load(headFile);
  const tail = options.withTail === false ? null : await load(partFile(manifest, "tail", format));
  return { manifest, headFormat: headFile?.format ?? null, head, tail };
}

export type BrowserClientOptions = Omit<EdgeClientOptions, "webSocket" | "head" | "tail"> & {
  readonly ort: OrtModule;
  /** Where zstd.wasm is served (default: beside the app's bundle). */
  readonly zstdWasmUrl?: string;
};

/** A client whose head (and local tail) run in onnxruntime-web, over the page's WebSocket. */
export async function browserClient(options: BrowserClientOptions): Promise<EdgeClient> {
  const { ort, bundle } = options;
  if (parseCodec(bundle.manifest.codec).compression === "zstd") {
    // Only a zstd bundle fetches the codec's wasm (250 kB); results always travel as "none".
    await initCodecs(options.zstdWasmUrl === undefined ? {} : { zstdWasmUrl: options.zstdWasmUrl });
  }
  const providers = ["wasm"];
  const head = bundle.head ? await createRunner(ort, bundle.head, { executionProviders: providers }) : undefined;
  const tailBytes = bundle.tail;
  return new EdgeClient({
    ...options,
    webSocket: (url) => new WebSocket(url) as unknown as WebSocketLike,
    ...(head === undefined ? {} : { head }),
    ...(tailBytes === null ? {} : { tail: () => createRunner(ort, tailBytes, { executionProviders: providers }) }),
  });
}
