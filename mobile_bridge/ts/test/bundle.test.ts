/**
 * The manifest reader and the version hash (bundle.ts, a port of manifest.py), and the
 * spec checks (specs.ts, a port of types.match_specs).
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import { sha256 } from "@noble/hashes/sha2.js";
import { bytesToHex } from "@noble/hashes/utils.js";

import { bundleVersion, parseManifest, partFile, verifyPart } from "../src/bundle.js";
import { ManifestError, PayloadError, UsageError } from "../src/errors.js";
import { checkResult, matchSpecs, resolveDim, specBytes } from "../src/specs.js";
import { VECTORS } from "./helpers.js";

const spec = (name: string, shape: Array<number | string>) => ({ name, dtype: "float32", shape });

function manifest(extra: Record<string, unknown> = {}): Record<string, unknown> {
  const b = VECTORS.bundle;
  return {
    schema_version: 1,
    created_by: "edgeoffload 0.1.0",
    source: { name: "m", sha256: b.source_sha256 },
    dims: { batch: 1 },
    cut: { id: b.cut_id, after: "layer1/relu" },
    crossing: [spec("h", ["batch", 8])],
    passthrough: [],
    graph_inputs: [spec("x", ["batch", 4])],
    graph_outputs: [spec("y", ["batch", 2])],
    head: { file: "head.onnx", sha256: b.head_sha256, inputs: [spec("x", ["batch", 4])], outputs: [spec("h", ["batch", 8])] },
    tail: { file: "tail.onnx", sha256: b.tail_sha256, inputs: [spec("h", ["batch", 8])], outputs: [spec("y", ["batch", 2])] },
    codec: b.codec,
    state: [],
    files: {},
    predicted: {},
    verification: {},
    ...extra,
  };
}

test("identity and version are the golden vectors' (§11)", () => {
  const m = parseManifest(manifest());
  assert.equal(m.identity, VECTORS.bundle.identity);
  assert.equal(m.version, VECTORS.bundle.version);
  assert.equal(bundleVersion(m.identity, m.codec, m.head, null), bundleVersion(m.identity, m.codec, m.head, null));
  assert.notEqual(bundleVersion(m.identity, "none", m.head, m.tail), m.version);
});

test("malformed manifests are ManifestErrors naming what is wrong", () => {
  const bad: Array<[Record<string, unknown>, RegExp]> = [
    [{ schema_version: 2 }, /schema version 2/],
    [{ surprise: 1 }, /unknown field.*surprise/],
    [{ dims: { batch: -1 } }, /dims/],
    [{ passthrough: ["nope"] }, /non-crossing/],
    [{ head: null, tail: null }, /neither a head nor a tail/],
    [{ graph_inputs: [{ name: "x", dtype: "complex64", shape: [1] }] }, /unsupported dtype/],
    [{ graph_inputs: [{ name: "x", dtype: "float32", shape: [1.5] }] }, /integers or names/],
    [{ tail: { file: "../tail.onnx", sha256: "00", inputs: [], outputs: [] } }, /plain file name/],
  ];
  for (const [extra, message] of bad) {
    assert.throws(() => parseManifest(manifest(extra)), (e: unknown) => e instanceof ManifestError && message.test(e.message));
  }
  const missing = manifest();
  delete missing.codec;
  assert.throws(() => parseManifest(missing), /missing field 'codec'/);
});

test("the ort section picks the .ort parts, and is refused when malformed", () => {
  const ortFile = (file: string) => ({ file, sha256: "ee".repeat(32), converted_from: "ff".repeat(32) });
  const ort = {
    optimization: "disable",
    onnxruntime: "1.32.0",
    head: ortFile("head.ort"),
    tail: null,
    required_operators: { file: "required_operators.config", sha256: "aa".repeat(32) },
    check: { identical: true },
  };
  const m = parseManifest(manifest({ ort }));
  assert.equal(m.version, VECTORS.bundle.version); // .ort files do not change the version
  assert.deepEqual(partFile(m, "head", "auto"), { file: "head.ort", sha256: "ee".repeat(32), format: "ort" });
  assert.equal(partFile(m, "head", "onnx")!.file, "head.onnx");
  assert.equal(partFile(m, "tail", "auto")!.file, "tail.onnx");
  assert.throws(() => partFile(m, "tail", "ort"), ManifestError);
  assert.throws(() => partFile(parseManifest(manifest()), "head", "ort"), /no ORT-format head/);
  assert.throws(() => parseManifest(manifest({ ort: { ...ort, optimization: "max" } })), /optimization 'max'/);
  assert.throws(() => parseManifest(manifest({ ort: { ...ort, head: null } })), /neither a head nor a tail/);
  assert.throws(() => parseManifest(manifest({ ort: { ...ort, extra: 1 } })), ManifestError);
});

test("a part whose bytes are not the pinned ones is refused", () => {
  const bytes = new TextEncoder().encode("model bytes");
  verifyPart("head.onnx", bytes, bytesToHex(sha256(bytes)));
  assert.throws(() => verifyPart("head.onnx", bytes, "00".repeat(32)), /modified after splitting/);
});

test("matchSpecs: names, dtypes, ranks and one value per symbolic dim", () => {
  const specs = [spec("a", ["batch", 3]), spec("b", ["batch", "seq"])] as const;
  const ok = matchSpecs(
    [
      ["a", "float32", [2, 3]],
      ["b", "float32", [2, 7]],
    ],
    specs as never,
    { error: UsageError },
  );
  assert.deepEqual([...ok], [["batch", 2], ["seq", 7]]);
  const cases: Array<[Array<[string, string, number[]]>, RegExp]> = [
    [[["a", "float32", [2, 3]]], /missing \["b"\]/],
    [[["a", "float32", [2, 3]], ["b", "float32", [3, 1]]], /'batch' is 3 here but 2 elsewhere/],
    [[["a", "float32", [2, 4]], ["b", "float32", [2, 1]]], /expected \[batch, 3\]/],
    [[["a", "int64", [2, 3]], ["b", "float32", [2, 1]]], /dtype int64/],
    [[["a", "float32", [2, 3]], ["b", "float32", [2]]], /rank 1, not 2/],
    [[["a", "float32", [2, 3]], ["a", "float32", [2, 3]]], /appears twice/],
  ];
  for (const [tensors, message] of cases) {
    assert.throws(() => matchSpecs(tensors, specs as never, { error: UsageError }), (e: unknown) => e instanceof UsageError && message.test(e.message));
  }
});

test("a result must carry the outputs with codec none; empty outputs are fine", () => {
  const outputs = [spec("y", ["n", 4])] as never;
  const t = (codec: string, shape: number[]) => ({ dtype: "float32" as const, shape, codec, data: new Uint8Array(), scales: new Uint8Array() });
  checkResult([["y", t("none", [0, 4])]], outputs);
  assert.throws(() => checkResult([["y", t("fp16", [1, 4])]], outputs), PayloadError);
  assert.throws(() => checkResult([["z", t("none", [1, 4])]], outputs), PayloadError);
});

test("symbolic dims resolve from the manifest's dims, sums included", () => {
  assert.equal(resolveDim("past + 1", { past: 7 }), 8);
  assert.equal(resolveDim("past+seq", { past: 7, seq: 2 }), 9);
  assert.equal(resolveDim("other", { past: 7 }), undefined);
  assert.equal(specBytes({ name: "h", dtype: "float32", shape: ["batch", 8] }, { batch: 2 }), 64);
  assert.equal(specBytes({ name: "h", dtype: "float32", shape: ["batch", 8] }, {}), undefined);
});
