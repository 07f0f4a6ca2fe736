/**
 * Interop driver: run bundles through the TS client against a live edge server and write what
 * came back, for the Python tests and benchmarks to compare with the Python client.
 *
 *   node dist/tools/interop.js PLAN.json
 *
 * PLAN: {"deviceKey": "device/private.key", "cases": [{"name", "bundle": DIR, "server": URL,
 *   "serverKey": "x25519:…", "inputs": [{"name", "dtype", "shape", "file"}], "outDir": DIR,
 *   "fallback": "error"|"local", "repeat": 1, "timeoutMs": 10000, "format": "auto"|"onnx"|"ort",
 *   "optimization": "all"|…, "headOnly": false}]}
 *
 * `headOnly` runs only the bundle's head here (no server) and returns what would cross.
 *
 * One JSON line per case on stdout: {"name", "ok": true, "outputs": [{"name", "dtype",
 * "shape", "file"}], "timings": [RequestTiming…]} or {"name", "ok": false, "error":
 * {"type", "message"}}. A case's failure never stops the others.
 */

import { mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";

import type { Fallback } from "../src/client.js";
import { KeyPair, decodePrivate, decodePublic } from "../src/keys.js";
import type { ModelFormat } from "../src/bundle.js";
import { loadBundle, nodeRunner, openClient } from "../src/node.js";
import type { RunnerOptions } from "../src/runner.js";
import type { DType, RawTensor } from "../src/types.js";

interface TensorFile {
  name: string;
  dtype: DType;
  shape: number[];
  file: string;
}

interface Case {
  name: string;
  bundle: string;
  server: string;
  serverKey: string;
  inputs: TensorFile[];
  outDir: string;
  fallback?: Fallback;
  repeat?: number;
  timeoutMs?: number;
  format?: ModelFormat;
  optimization?: RunnerOptions["optimization"];
  headOnly?: boolean;
}

async function readInputs(c: Case): Promise<Record<string, RawTensor>> {
  const inputs: Record<string, RawTensor> = {};
  for (const t of c.inputs) {
    inputs[t.name] = { dtype: t.dtype, shape: t.shape, bytes: new Uint8Array(await readFile(t.file)) };
  }
  return inputs;
}

async function writeOutputs(dir: string, outputs: Record<string, RawTensor>): Promise<TensorFile[]> {
  await mkdir(dir, { recursive: true });
  const written: TensorFile[] = [];
  for (const [name, t] of Object.entries(outputs)) {
    const file = join(dir, `${written.length}.bin`);
    await writeFile(file, t.bytes);
    written.push({ name, dtype: t.dtype, shape: [...t.shape], file });
  }
  return written;
}

async function runHead(c: Case): Promise<Record<string, unknown>> {
  const bundle = await loadBundle(c.bundle, c.format ?? "auto");
  if (bundle.head === null) throw new Error("the bundle has no head");
  const runner = await nodeRunner(bundle.head, c.optimization === undefined ? {} : { optimization: c.optimization });
  try {
    const outputs = await runner.run(await readInputs(c));
    return { ok: true, headFormat: bundle.headFormat, outputs: await writeOutputs(c.outDir, outputs), timings: [] };
  } finally {
    await runner.release();
  }
}

async function runCase(c: Case, deviceKey: string): Promise<Record<string, unknown>> {
  if (c.headOnly) return runHead(c);
  const client = await openClient(c.bundle, {
    format: c.format ?? "auto",
    ...(c.optimization === undefined ? {} : { optimization: c.optimization }),
    identity: KeyPair.fromPrivate(decodePrivate(deviceKey)),
    server: c.server,
    serverKey: decodePublic(c.serverKey),
    fallback: c.fallback ?? "error",
    timeoutMs: c.timeoutMs ?? 10_000,
  });
  try {
    const inputs = await readInputs(c);
    const timings = [];
    let outputs: Record<string, RawTensor> = {};
    for (let i = 0; i < Math.max(1, c.repeat ?? 1); i++) {
      outputs = await client.run(inputs);
      timings.push(client.lastTiming);
    }
    return { ok: true, outputs: await writeOutputs(c.outDir, outputs), timings };
  } finally {
    client.close();
  }
}

async function main(): Promise<void> {
  const plan = JSON.parse(await readFile(process.argv[2]!, "utf8")) as { deviceKey: string; cases: Case[] };
  const deviceKey = (await readFile(plan.deviceKey, "utf8")).trim();
  for (const c of plan.cases) {
    let line: Record<string, unknown>;
    try {
      line = { name: c.name, ...(await runCase(c, deviceKey)) };
    } catch (error) {
      const e = error as Error;
      line = { name: c.name, ok: false, error: { type: e.name, message: e.message } };
    }
    process.stdout.write(JSON.stringify(line) + "\n");
  }
}

await main();
