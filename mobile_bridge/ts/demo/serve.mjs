// A small static server for the browser demo (127.0.0.1 only): the built page (demo/dist),
// a bundle folder under /bundle/, and /config.json telling the page where the edge server is.
//
//   node demo/serve.mjs --bundle DIR --server ws://127.0.0.1:8765 \
//       --server-key server/public.key --device-key device/private.key [--port 8080]
//       [--inputs inputs.json]   # [{name, dtype, shape, file}] raw little-endian inputs
//
// The device key is handed to the page: a demo device, allow-listed on the server for this.
// A real web app keeps its device key in the browser (IndexedDB, non-extractable) instead.
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { dirname, extname, join, normalize, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const here = dirname(fileURLToPath(import.meta.url));
const { values } = parseArgs({
  options: {
    bundle: { type: "string" },
    server: { type: "string" },
    "server-key": { type: "string" },
    "device-key": { type: "string" },
    inputs: { type: "string" },
    runs: { type: "string", default: "3" },
    port: { type: "string", default: "8080" },
    "ready-file": { type: "string" },
  },
});
for (const required of ["bundle", "server", "server-key", "device-key"]) {
  if (!values[required]) {
    console.error(`demo/serve.mjs: --${required} is required`);
    process.exit(2);
  }
}
const bundleDir = resolve(values.bundle);
const manifest = JSON.parse(await readFile(join(bundleDir, "manifest.json"), "utf8"));
const inputFiles = values.inputs ? JSON.parse(await readFile(values.inputs, "utf8")) : null;
const config = {
  server: values.server,
  serverKey: (await readFile(values["server-key"], "utf8")).trim(),
  deviceKey: (await readFile(values["device-key"], "utf8")).trim(),
  bundle: "bundle/",
  runs: Number(values.runs),
  inputs: inputFiles
    ? inputFiles.map((t, i) => ({ name: t.name, dtype: t.dtype, shape: t.shape, url: `input/${i}` }))
    : manifest.graph_inputs.map((t) => ({
        name: t.name,
        dtype: t.dtype,
        shape: t.shape.map((d) => (typeof d === "number" ? d : (manifest.dims[d] ?? 1))),
      })),
};
const types = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json" };

/** `rel` under `root`, or null when it would leave it. */
function inside(root, rel) {
  const path = normalize(join(root, rel));
  return path === root || path.startsWith(root + sep) ? path : null;
}

const server = createServer(async (req, res) => {
  const url = new URL(req.url ?? "/", "http://localhost");
  let path = null;
  let body = null;
  if (url.pathname === "/config.json") body = JSON.stringify(config);
  else if (url.pathname.startsWith("/input/") && inputFiles) {
    const entry = inputFiles[Number(url.pathname.slice(7))];
    if (entry) path = resolve(dirname(values.inputs), entry.file);
  } else if (url.pathname.startsWith("/bundle/")) {
    path = inside(bundleDir, decodeURIComponent(url.pathname.slice(8)));
  } else {
    path = inside(join(here, "dist"), url.pathname === "/" ? "index.html" : decodeURIComponent(url.pathname.slice(1)));
  }
  try {
    if (body === null && path !== null) body = await readFile(path);
  } catch {
    body = null;
  }
  if (body === null) {
    res.writeHead(404).end("not found");
    return;
  }
  res.writeHead(200, { "content-type": types[extname(path ?? ".json")] ?? "application/octet-stream", "cache-control": "no-store" });
  res.end(body);
});
server.listen(Number(values.port), "127.0.0.1", async () => {
  const { port } = server.address();
  console.log(`demo at http://127.0.0.1:${port}/ (bundle ${bundleDir}, edge server ${values.server})`);
  if (values["ready-file"]) {
    // Written whole, then renamed: a reader never sees half of it.
    const { rename, writeFile } = await import("node:fs/promises");
    const partial = `${values["ready-file"]}.partial`;
    await writeFile(partial, JSON.stringify({ port, pid: process.pid }));
    await rename(partial, values["ready-file"]);
  }
});
