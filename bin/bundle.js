#!/usr/bin/env node
// Bundles what runs in production into dist/bundle/ (run by `npm run build` and by `npm ci`
// through the prepare script, after tsc): the CLI (bin/typevisor.js imports dist/bundle/cli.js)
// and the VMM's worker entries. Each process and each worker thread is a V8 isolate that loads
// its modules itself; unbundled that is ~50-60 files of ours and more of its dependencies per
// isolate, each resolved, read and compiled on its own. In the KVM lab, where every file is read
// over 9p by an emulated CPU, `typevisor --help` took 10.6-18.8 s from dist/ and 5.6-7.6 s from
// a bundle (docs/benchmarks.md, "Start-up: one file per isolate").
//
// Every file lands flat in dist/bundle/, one directory below dist/ like each compiled module
// (dist/api/web.js, dist/engine/native.js), so paths the code resolves against its own
// import.meta.url (../../web/, ../../bin/typevisor.js) hold in both builds; only the worker
// entries' names differ (src/vmm/worker-url.ts). Native addons stay outside: Node loads them
// from node_modules as before.
import { rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "rolldown";
import { VMM_WORKER_ENTRIES, bundledWorkerName } from "../dist/vmm/worker-url.js";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const out = join(root, "dist", "bundle");

/** Entry name (its file in dist/bundle/ without .js) → its compiled module in dist/. */
const input = { cli: join(root, "dist", "cli", "main.js") };
for (const e of VMM_WORKER_ENTRIES) input[bundledWorkerName(e).replace(/\.js$/, "")] = join(root, "dist", "vmm", e);

// Loaded by Node as they are, when they are: native addons (koffi, better-sqlite3); ws's optional
// native helpers, which it tries to require and does without; fastify's JSON-schema compilers,
// which the daemon never has it load (src/api/server.ts; test/api/daemon-modules.test.ts watches
// that through Node's module cache, where they would show if they were). A bundled CommonJS
// module requires an external one when it runs, not when the bundle loads.
const external = [
  /^node:/, "koffi", "better-sqlite3", "bufferutil", "utf-8-validate",
  "@fastify/ajv-compiler", "@fastify/fast-json-stringify-compiler", /^ajv(\/|$)/, /^fast-json-stringify$/,
];

rmSync(out, { recursive: true, force: true });
try {
  // One build per entry: an entry's isolate then reads its own file and, only when it runs a
  // lazy import() (the CLI's commands, a device thread's restore), that import's chunk; no
  // chunks shared between entries, which would each be a file more for every isolate.
  for (const [name, file] of Object.entries(input)) {
    await build({
      input: { [name]: file },
      platform: "node",
      external,
      logLevel: "warn",
      output: {
        dir: out,
        format: "esm",
        entryFileNames: "[name].js",
        chunkFileNames: `${name}-[name]-[hash].js`,
        cleanDir: false,
        // zod in a chunk of its own ("<entry>-zod-<hash>.js"), loaded only by what checks a body,
        // a snapshot or a stream (test/vmm/lazy-modules.test.ts looks for it by that name).
        codeSplitting: { groups: [{ name: "zod", test: /[\\/]node_modules[\\/]zod[\\/]/ }] },
      },
    });
  }
} catch (e) {
  process.stderr.write(`bundle: ${e instanceof Error ? e.message : String(e)}\n`);
  process.exitCode = 1;
}
