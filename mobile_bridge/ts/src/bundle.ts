/**
 * A bundle's manifest (manifest.json, written by `edgeoffload split`) and the check that its
 * parts are the ones it pins, a port of edgeoffload/manifest.py and bundle.py.
 *
 * Pure: the bytes come from the platform (a folder in Node, `fetch` in the browser; see
 * node.ts and browser.ts). The version is the same short hash the Python side computes, so
 * the server refuses a device whose head differs from its tail's bundle (PROTOCOL.md §11).
 */

import { sha256 } from "@noble/hashes/sha2.js";
import { bytesToHex, utf8ToBytes } from "@noble/hashes/utils.js";

import { ManifestError } from "./errors.js";
import type { Dim, TensorSpec } from "./specs.js";
import { type DType, ITEM_SIZES } from "./types.js";

export const SCHEMA_VERSION = 1;

export interface PartInfo {
  readonly file: string;
  readonly sha256: string;
  readonly inputs: readonly TensorSpec[];
  readonly outputs: readonly TensorSpec[];
}

/** One ORT-format file (`edgeoffload export-ort`): name, sha256, the .onnx it came from. */
export interface OrtFile {
  readonly file: string;
  readonly sha256: string;
  readonly convertedFrom: string | undefined;
}

export const ORT_OPTIMIZATIONS = ["disable", "basic", "extended", "all"] as const;
export type OrtOptimization = (typeof ORT_OPTIMIZATIONS)[number];

/**
 * The optional ORT-format encoding of the parts. Not part of the version: an .ort part computes
 * what its .onnx computes (checked when exported), so an .ort head pairs with an .onnx tail.
 */
export interface OrtInfo {
  /** The graph optimization level the .ort files were saved at (they are not re-optimized). */
  readonly optimization: OrtOptimization;
  readonly onnxruntime: string;
  readonly head: OrtFile | null;
  readonly tail: OrtFile | null;
  readonly requiredOperators: OrtFile;
}

export interface Manifest {
  readonly sourceName: string;
  readonly sourceSha256: string;
  readonly cutId: string;
  readonly cutAfter: string;
  /** Tensors sent device → server, in order. */
  readonly crossing: readonly TensorSpec[];
  /** Crossing tensors that are graph inputs (sent as given). */
  readonly passthrough: readonly string[];
  readonly graphInputs: readonly TensorSpec[];
  readonly graphOutputs: readonly TensorSpec[];
  readonly head: PartInfo | null;
  readonly tail: PartInfo | null;
  readonly codec: string;
  readonly dims: Readonly<Record<string, number>>;
  /** KV-cache loops of decoder bundles; this client runs only bundles without them. */
  readonly state: readonly Readonly<Record<string, string>>[];
  /** The ORT-format parts, when the bundle has them. */
  readonly ort: OrtInfo | null;
  /** Model hash + cut: what the handshake binds (§5.2). */
  readonly identity: string;
  /** Short hash over identity, codec and part hashes: equal iff device and server pair. */
  readonly version: string;
}

/** Strict reader over a JSON object: typed access, leftovers are an error (as types._Fields). */
class Fields {
  private readonly data: Record<string, unknown>;
  private readonly seen = new Set<string>();

  constructor(
    value: unknown,
    private readonly what: string,
  ) {
    if (typeof value !== "object" || value === null || Array.isArray(value)) {
      throw new ManifestError(`${what}: expected a JSON object`);
    }
    this.data = value as Record<string, unknown>;
  }

  value(key: string, fallback?: unknown): unknown {
    this.seen.add(key);
    if (!Object.hasOwn(this.data, key)) {
      if (fallback !== undefined) return fallback;
      throw new ManifestError(`${this.what}: missing field '${key}'`);
    }
    return this.data[key];
  }

  text(key: string, fallback?: string): string {
    const v = this.value(key, fallback);
    if (typeof v !== "string") throw new ManifestError(`${this.what}: '${key}' must be a string`);
    return v;
  }

  integer(key: string): number {
    const v = this.value(key);
    if (typeof v !== "number" || !Number.isSafeInteger(v)) {
      throw new ManifestError(`${this.what}: '${key}' must be an integer`);
    }
    return v;
  }

  array(key: string, fallback?: unknown[]): unknown[] {
    const v = this.value(key, fallback);
    if (!Array.isArray(v)) throw new ManifestError(`${this.what}: '${key}' must be an array`);
    return v;
  }

  object(key: string, fallback?: Record<string, unknown>): Record<string, unknown> {
    const v = this.value(key, fallback);
    if (typeof v !== "object" || v === null || Array.isArray(v)) {
      throw new ManifestError(`${this.what}: '${key}' must be an object`);
    }
    return v as Record<string, unknown>;
  }

  done(): void {
    const extra = Object.keys(this.data).filter((k) => !this.seen.has(k));
    if (extra.length > 0) {
      throw new ManifestError(`${this.what}: unknown field(s) ${JSON.stringify(extra.sort())}`);
    }
  }
}

function parseSpec(value: unknown): TensorSpec {
  const f = new Fields(value, "tensor spec");
  const name = f.text("name");
  const dtype = f.text("dtype");
  const shape = f.array("shape");
  f.done();
  if (!Object.hasOwn(ITEM_SIZES, dtype)) {
    throw new ManifestError(`tensor '${name}': unsupported dtype '${dtype}'`);
  }
  for (const dim of shape) {
    const ok = typeof dim === "string" || (typeof dim === "number" && Number.isSafeInteger(dim) && dim >= 0);
    if (!ok) throw new ManifestError(`tensor '${name}': dims must be integers or names`);
  }
  return { name, dtype: dtype as DType, shape: shape as Dim[] };
}

function parsePart(value: unknown): PartInfo {
  const f = new Fields(value, "manifest part");
  const part = {
    file: plainFile(f.text("file"), "part"),
    sha256: f.text("sha256"),
    inputs: f.array("inputs").map(parseSpec),
    outputs: f.array("outputs").map(parseSpec),
  };
  f.done();
  return part;
}

function plainFile(name: string, what: string): string {
  if (/[/\\]/.test(name) || ["", ".", ".."].includes(name)) {
    throw new ManifestError(`manifest ${what} file '${name}' must be a plain file name`);
  }
  return name;
}

function parseOrtFile(value: unknown, what: string): OrtFile {
  const f = new Fields(value, `manifest ort ${what}`);
  const file = plainFile(f.text("file"), `ort ${what}`);
  const sha256 = f.text("sha256");
  const from = f.value("converted_from", null);
  if (from !== null && typeof from !== "string") {
    throw new ManifestError(`manifest ort ${what}: 'converted_from' must be a string`);
  }
  f.done();
  return { file, sha256, convertedFrom: from ?? undefined };
}

function parseOrt(value: unknown): OrtInfo {
  const f = new Fields(value, "manifest ort");
  const headRaw = f.value("head");
  const tailRaw = f.value("tail");
  const optimization = f.text("optimization");
  const info = {
    optimization: optimization as OrtOptimization,
    onnxruntime: f.text("onnxruntime"),
    head: headRaw === null ? null : parseOrtFile(headRaw, "head"),
    tail: tailRaw === null ? null : parseOrtFile(tailRaw, "tail"),
    requiredOperators: parseOrtFile(f.value("required_operators"), "operators"),
  };
  f.object("check", {});
  f.done();
  if (!(ORT_OPTIMIZATIONS as readonly string[]).includes(optimization)) {
    throw new ManifestError(`manifest ort optimization '${optimization}' is not one of ${ORT_OPTIMIZATIONS.join(", ")}`);
  }
  if (info.head === null && info.tail === null) {
    throw new ManifestError("manifest ort section lists neither a head nor a tail");
  }
  return info;
}

/** The short version hash of §11: sha256("identity|codec|head sha|tail sha")[:16]. */
export function bundleVersion(
  identity: string,
  codec: string,
  head: PartInfo | null,
  tail: PartInfo | null,
): string {
  const text = [identity, codec, head ? head.sha256 : "-", tail ? tail.sha256 : "-"].join("|");
  return bytesToHex(sha256(utf8ToBytes(text))).slice(0, 16);
}

/** Parse manifest.json's object; every malformation is a ManifestError. */
export function parseManifest(json: unknown): Manifest {
  const f = new Fields(json, "manifest");
  const schema = f.integer("schema_version");
  if (schema !== SCHEMA_VERSION) {
    throw new ManifestError(
      `manifest schema version ${schema} is not supported (this is ${SCHEMA_VERSION})`,
      { hint: "re-split the model with a matching edgeoffload version" },
    );
  }
  f.text("created_by", "");
  const source = new Fields(f.object("source"), "manifest source");
  const cut = new Fields(f.object("cut"), "manifest cut");
  const dims = f.object("dims", {});
  for (const v of Object.values(dims)) {
    if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 0) {
      throw new ManifestError("manifest dims must map names to integers >= 0");
    }
  }
  const state = f.array("state", []).map((entry) => {
    const s = new Fields(entry, "manifest state entry");
    const out = { side: s.text("side"), input: s.text("input"), output: s.text("output") };
    s.done();
    return out;
  });
  f.object("files", {});
  f.object("predicted", {});
  f.object("verification", {});
  const passthrough = f.array("passthrough");
  if (!passthrough.every((p) => typeof p === "string")) {
    throw new ManifestError("manifest passthrough must list tensor names (strings)");
  }
  const headRaw = f.value("head");
  const tailRaw = f.value("tail");
  const head = headRaw === null ? null : parsePart(headRaw);
  const tail = tailRaw === null ? null : parsePart(tailRaw);
  const sourceSha256 = source.text("sha256");
  const sourceName = source.text("name");
  const cutId = cut.text("id");
  const cutAfter = cut.text("after");
  const codec = f.text("codec");
  const crossing = f.array("crossing").map(parseSpec);
  const graphInputs = f.array("graph_inputs").map(parseSpec);
  const graphOutputs = f.array("graph_outputs").map(parseSpec);
  const ortRaw = f.value("ort", null);
  const ort = ortRaw === null ? null : parseOrt(ortRaw);
  source.done();
  cut.done();
  f.done();
  if (head === null && tail === null) throw new ManifestError("manifest has neither a head nor a tail");
  const crossingNames = new Set(crossing.map((t) => t.name));
  const stray = (passthrough as string[]).filter((p) => !crossingNames.has(p));
  if (stray.length > 0) {
    throw new ManifestError(`manifest passthrough names non-crossing tensor(s) ${JSON.stringify(stray)}`);
  }
  const identity = `${sourceSha256}:${cutId}`;
  return {
    sourceName,
    sourceSha256,
    cutId,
    cutAfter,
    crossing,
    passthrough: passthrough as string[],
    graphInputs,
    graphOutputs,
    head,
    tail,
    codec,
    dims: dims as Record<string, number>,
    state,
    ort,
    identity,
    version: bundleVersion(identity, codec, head, tail),
  };
}

/** Refuse a part whose bytes are not the ones the manifest pins (ManifestError). */
export function verifyPart(name: string, bytes: Uint8Array, expectedSha256: string): void {
  const actual = bytesToHex(sha256(bytes));
  if (actual !== expectedSha256) {
    throw new ManifestError(
      `${name} was modified after splitting: sha256 ${actual.slice(0, 16)}… != manifest ` +
        `${expectedSha256.slice(0, 16)}…`,
      { hint: "re-split the model, or restore the original file" },
    );
  }
}

/** Which encoding of the parts to load: the .ort ones when the bundle has them ("auto"). */
export type ModelFormat = "auto" | "onnx" | "ort";

/** The file to load for a part in `format` (ManifestError when "ort" is asked and absent). */
export function partFile(
  manifest: Manifest,
  part: "head" | "tail",
  format: ModelFormat,
): { file: string; sha256: string; format: "onnx" | "ort" } | null {
  const onnx = manifest[part];
  if (onnx === null) return null;
  const ort = manifest.ort?.[part] ?? null;
  if (format === "ort" && ort === null) {
    throw new ManifestError(`the bundle has no ORT-format ${part}`, {
      hint: "write one with: edgeoffload export-ort BUNDLE",
    });
  }
  if (format !== "onnx" && ort !== null) return { file: ort.file, sha256: ort.sha256, format: "ort" };
  return { file: onnx.file, sha256: onnx.sha256, format: "onnx" };
}

/** A bundle in memory: its manifest and the verified bytes of the parts this side runs. */
export interface Bundle {
  readonly manifest: Manifest;
  /** Which file the head bytes came from ("onnx" or "ort"). */
  readonly headFormat: "onnx" | "ort" | null;
  /** The head's model bytes (.onnx or .ort); null for an all-remote bundle. */
  readonly head: Uint8Array | null;
  /** The tail's model bytes when the bundle carries it (the local fallback); else null. */
  readonly tail: Uint8Array | null;
}
