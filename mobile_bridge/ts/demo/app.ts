/**
 * The browser demo: fetch a bundle, run its head in onnxruntime-web, offload the tail to the
 * edge server over the encrypted WebSocket, and show the result with the per-request time
 * breakdown beside all-local. `config.json` (written by demo/serve.mjs) names the server, its
 * pinned key, this page's device key and the input.
 *
 * What the page computed is also left in `window.edgeoffloadDemo` for the headless-browser test.
 */

import * as ort from "onnxruntime-web/wasm";

import { browserClient, fetchBundle } from "../src/browser.js";
import type { RequestTiming } from "../src/client.js";
import { KeyPair, decodePrivate, decodePublic } from "../src/keys.js";
import { createRunner, type OrtModule } from "../src/runner.js";
import { ITEM_SIZES, type DType, type RawTensor } from "../src/types.js";

interface InputFile {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: number[];
  /** URL of the raw little-endian element bytes; absent: a fixed pseudo-random fill. */
  readonly url?: string;
}

interface DemoConfig {
  readonly server: string;
  readonly serverKey: string;
  readonly deviceKey: string;
  readonly bundle: string;
  readonly inputs: InputFile[];
  readonly runs?: number;
}

interface Shown {
  /** What crossed the cut (the head's outputs in this page, before the codec). */
  crossing: Record<string, { dtype: string; shape: number[]; hex: string }>;
  outputs: Record<string, { dtype: string; shape: number[]; hex: string }>;
  local: Record<string, { dtype: string; shape: number[]; hex: string }>;
  timing: RequestTiming[];
  local_timing: LocalTiming[];
  error?: string;
}

const $ = (id: string): HTMLElement => document.getElementById(id)!;

function hex(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** A fixed fill (xorshift32, values in [-1, 1)) for float inputs, zeros otherwise. */
function filled(spec: InputFile): RawTensor {
  const count = spec.shape.reduce((a, b) => a * b, 1);
  const bytes = new Uint8Array(count * ITEM_SIZES[spec.dtype]);
  if (spec.dtype === "float32") {
    const values = new Float32Array(bytes.buffer);
    let x = 2463534242;
    for (let i = 0; i < count; i++) {
      x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
      values[i] = x / 2 ** 31 - 1;
    }
  }
  return { dtype: spec.dtype, shape: spec.shape, bytes };
}

async function loadInput(spec: InputFile): Promise<RawTensor> {
  if (spec.url === undefined) return filled(spec);
  const bytes = new Uint8Array(await (await fetch(spec.url)).arrayBuffer());
  return { dtype: spec.dtype, shape: spec.shape, bytes };
}

function shown(outputs: Record<string, RawTensor>): Shown["outputs"] {
  return Object.fromEntries(
    Object.entries(outputs).map(([name, t]) => [name, { dtype: t.dtype, shape: [...t.shape], hex: hex(t.bytes) }]),
  );
}

function describe(outputs: Record<string, RawTensor>): string {
  return Object.entries(outputs)
    .map(([name, t]) => {
      let detail = "";
      if (t.dtype === "float32") {
        const v = new Float32Array(t.bytes.buffer, t.bytes.byteOffset, t.bytes.byteLength / 4);
        const top = Array.from(v.slice(0, 100_000), (x, i) => [x, i] as const)
          .sort((a, b) => b[0] - a[0])
          .slice(0, 5);
        detail = " — top-5: " + top.map(([x, i]) => `#${i} (${x.toFixed(3)})`).join(", ");
      }
      return `<p><code>${name}</code> ${t.dtype}[${t.shape.join(", ")}]${detail}</p>`;
    })
    .join("");
}

interface LocalTiming {
  readonly headMs: number;
  readonly tailMs: number;
  readonly totalMs: number;
}

function timingTable(offloaded: RequestTiming, local: LocalTiming): string {
  // [label, bar colour, offloaded ms, all-here ms]
  const parts: Array<[string, string, number, number]> = [
    ["head", "head", offloaded.headMs, local.headMs],
    ["encode + encrypt", "encode", offloaded.encodeMs, 0],
    ["network", "network", offloaded.networkMs, 0],
    ["tail on the server", "server", offloaded.serverMs, 0],
    ["decrypt + decode", "decode", offloaded.decodeMs, 0],
    ["tail here", "tail", offloaded.localTailMs, local.tailMs],
  ];
  const scale = 260 / Math.max(offloaded.totalMs, local.totalMs, 1);
  const bar = (cls: string, ms: number): string =>
    `<span class="bar ${cls}" style="width:${Math.max(ms > 0 ? 1 : 0, ms * scale).toFixed(1)}px"></span>`;
  const rows = parts
    .map(
      ([label, cls, off, here]) =>
        `<tr><td>${label}</td><td>${bar(cls, off)} ${off.toFixed(2)}</td><td>${bar(cls, here)} ${here.toFixed(2)}</td></tr>`,
    )
    .join("");
  return `<table><tr><th></th><th>offloaded</th><th>all here</th></tr>${rows}
    <tr><th>total</th><th>${offloaded.totalMs.toFixed(2)}</th><th>${local.totalMs.toFixed(2)}</th></tr>
    <tr><td>request bytes on the wire</td><td>${offloaded.wireBytes}</td><td>0</td></tr></table>
    <p class="sub">The last of several requests each way (the first offloaded one also opened the connection).</p>`;
}

async function main(): Promise<void> {
  const state: Shown = { crossing: {}, outputs: {}, local: {}, timing: [], local_timing: [] };
  (window as unknown as { edgeoffloadDemo: Shown }).edgeoffloadDemo = state;
  try {
    ort.env.wasm.numThreads = 1; // threads need cross-origin isolation; one is plenty here
    ort.env.wasm.wasmPaths = new URL("./ort/", location.href).href;
    const config = (await (await fetch("config.json")).json()) as DemoConfig;
    const bundle = await fetchBundle(config.bundle);
    const m = bundle.manifest;
    $("bundle").innerHTML =
      `<p>bundle <code>${m.sourceName}</code>, cut <code>${m.cutId}</code> after <code>${m.cutAfter}</code>, ` +
      `codec <code>${m.codec}</code>, version <code>${m.version}</code>; server <code>${config.server}</code></p>`;
    const ortModule = ort as unknown as OrtModule;
    const client = await browserClient({
      ort: ortModule,
      bundle,
      identity: KeyPair.fromPrivate(decodePrivate(config.deviceKey)),
      server: config.server,
      serverKey: decodePublic(config.serverKey),
      fallback: "error", // the demo shows the offloaded path; a failure is shown, not hidden
      zstdWasmUrl: new URL("./zstd.wasm", location.href).href,
    });
    const inputs: Record<string, RawTensor> = {};
    for (const spec of config.inputs) inputs[spec.name] = await loadInput(spec);
    const runs = Math.max(1, config.runs ?? 3);
    let outputs: Record<string, RawTensor> = {};
    for (let i = 0; i < runs; i++) {
      outputs = await client.run(inputs);
      state.timing.push(client.lastTiming!);
    }
    state.outputs = shown(outputs);
    // All here: the same head, then the bundle's tail, in this page.
    const head = bundle.head ? await createRunner(ortModule, bundle.head, { executionProviders: ["wasm"] }) : null;
    const tail = bundle.tail ? await createRunner(ortModule, bundle.tail, { executionProviders: ["wasm"] }) : null;
    let local: Record<string, RawTensor> = {};
    for (let i = 0; i < runs; i++) {
      const start = performance.now();
      const crossing: Record<string, RawTensor> = head ? await head.run(inputs) : {};
      for (const name of m.passthrough) crossing[name] = inputs[name]!;
      const headDone = performance.now();
      local = tail ? await tail.run(crossing) : crossing;
      const end = performance.now();
      state.local_timing.push({ headMs: headDone - start, tailMs: end - headDone, totalMs: end - start });
      state.crossing = shown(crossing);
    }
    state.local = shown(local);
    client.close();
    $("result").innerHTML = describe(outputs);
    $("timing").innerHTML = timingTable(state.timing.at(-1)!, state.local_timing.at(-1)!);
    $("status").textContent = `offloaded ${runs}× to the edge server; last request ${state.timing.at(-1)!.totalMs.toFixed(1)} ms`;
    $("status").className = "ok";
  } catch (error) {
    state.error = `${(error as Error).name}: ${(error as Error).message}`;
    $("status").textContent = state.error;
    $("status").className = "error";
  }
  document.body.dataset.done = "1";
}

void main();
