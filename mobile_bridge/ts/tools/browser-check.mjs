// Open the demo page in headless Chromium (the Debian package; puppeteer-core never downloads
// a browser), wait until it is done, save a screenshot, print what the page computed as JSON.
//
//   node tools/browser-check.mjs --url http://127.0.0.1:8080/ --screenshot out.png [--chromium PATH]
import { parseArgs } from "node:util";

import puppeteer from "puppeteer-core";

const { values } = parseArgs({
  options: {
    url: { type: "string" },
    screenshot: { type: "string" },
    chromium: { type: "string", default: process.env.CHROMIUM ?? "/usr/bin/chromium" },
    timeout: { type: "string", default: "120000" },
  },
});
if (!values.url) {
  console.error("browser-check: --url is required");
  process.exit(2);
}
const browser = await puppeteer.launch({
  executablePath: values.chromium,
  headless: true,
  // No sandbox: CI runs as root in a container, where Chromium's sandbox cannot start.
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--no-proxy-server"],
});
const console_ = [];
try {
  const page = await browser.newPage();
  page.on("console", (msg) => console_.push(`${msg.type()}: ${msg.text()}`));
  page.on("pageerror", (err) => console_.push(`pageerror: ${err.message}`));
  await page.setViewport({ width: 1000, height: 900 });
  await page.goto(values.url, { waitUntil: "load", timeout: Number(values.timeout) });
  await page.waitForSelector("body[data-done]", { timeout: Number(values.timeout) });
  if (values.screenshot) await page.screenshot({ path: values.screenshot, fullPage: true });
  const state = await page.evaluate(() => window.edgeoffloadDemo);
  const status = await page.$eval("#status", (el) => el.textContent);
  process.stdout.write(JSON.stringify({ status, state, console: console_ }) + "\n");
} finally {
  await browser.close();
}
