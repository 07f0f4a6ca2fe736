// Build the browser demo into demo/dist/: the app bundled and minified by esbuild (without
// onnxruntime-web, which the page loads beside it through an import map), the page, and the
// onnxruntime-web wasm build it needs. Prints what the browser downloads.
import { copyFile, mkdir, readFile, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";

import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "dist");
const ortDist = join(here, "..", "node_modules", "onnxruntime-web", "dist");
await mkdir(join(out, "ort"), { recursive: true });

const result = await build({
  entryPoints: [join(here, "app.ts")],
  bundle: true,
  minify: true,
  format: "esm",
  platform: "browser",
  target: ["es2022"],
  external: ["onnxruntime-web/wasm"],
  outfile: join(out, "app.js"),
  metafile: true,
  logLevel: "warning",
});
await copyFile(join(here, "index.html"), join(out, "index.html"));
for (const file of ["ort.wasm.bundle.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"]) {
  await copyFile(join(ortDist, file), join(out, "ort", file));
}
// The zstd codec's wasm, fetched by the app beside itself (codec.ts initCodecs).
const zstdWasm = join(here, "..", "node_modules", "@bokuweb", "zstd-wasm", "dist", "web", "zstd.wasm");
await copyFile(zstdWasm, join(out, "zstd.wasm"));
const app = await readFile(join(out, "app.js"));
const zstd = await readFile(join(out, "zstd.wasm"));
const size = {
  app_bytes: app.length,
  app_gzip_bytes: gzipSync(app, { level: 9 }).length,
  zstd_wasm_bytes: zstd.length, // fetched only for bundles whose codec uses zstd
  zstd_wasm_gzip_bytes: gzipSync(zstd, { level: 9 }).length,
  inputs: Object.fromEntries(
    Object.entries(result.metafile.outputs[Object.keys(result.metafile.outputs)[0]].inputs)
      .sort((a, b) => b[1].bytesInOutput - a[1].bytesInOutput)
      .slice(0, 8)
      .map(([path, v]) => [path, v.bytesInOutput]),
  ),
};
await writeFile(join(out, "size.json"), JSON.stringify(size, null, 2) + "\n");
console.log(
  `demo/dist/app.js: ${size.app_bytes} bytes minified, ${size.app_gzip_bytes} gzipped ` +
    `(without onnxruntime-web); zstd.wasm ${size.zstd_wasm_bytes} bytes, ` +
    `${size.zstd_wasm_gzip_bytes} gzipped (zstd bundles only)`,
);
