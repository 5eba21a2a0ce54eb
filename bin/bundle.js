#!/usr/bin/env node
// Bundles what runs in production into dist/bundle/ (run by `npm run build` and by `npm ci`
// through the prepare script, after tsc): the CLI (bin/typevisor.js imports dist/bundle/cli.js)
// and the VMM's worker entries. Each process and each worker thread is a V8 isolate that loads
// its modules itself; unbundled that is ~50-60 files of ours and more of its dependencies per
// isolate, each resolved, read and compiled on its own. In the KVM lab, where every file is read
// over 9p by an emulated CPU, `typevisor --help` took 10.6-18.8 s from dist/ and 5.6-7.6 s from
// a bundle (docs/benchmarks.md, "Start-up: one file per isolate").
//
// Every file lands flat in one directory, one below dist/ like each compiled module
// (dist/api/web.js, dist/engine/native.js), so paths the code resolves against its own
// import.meta.url (../../web/, ../../bin/typevisor.js) hold in both builds; only the worker
// entries' names differ (src/vmm/worker-url.ts). Native addons stay outside: Node loads them
// from node_modules as before.
//
// A build is never changed under a process that runs it. Each one goes to a directory of its own,
// dist/bundle-<hash of its files>/, written in full under a temporary name first; then the link
// dist/bundle is pointed at it in one rename(2). Node resolves that link when a process loads its
// first module, so a daemon or a VMM started before a rebuild goes on importing its own build's
// chunks (the commands', a restore's, a migration's, loaded when first needed; their names carry
// content hashes) while every process started after it gets the new one. A build killed halfway
// leaves a temporary directory (removed by the next build) and the previous link intact. The four
// builds before the current one are kept for the processes still running them, as Debian keeps
// the modules of the QEMU it replaced for running QEMUs (QEMU's --enable-module-upgrades); older
// ones are removed.
import { createHash } from "node:crypto";
import { existsSync, lstatSync, readdirSync, readFileSync, renameSync, rmSync, statSync, symlinkSync, utimesSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "rolldown";
import { VMM_WORKER_ENTRIES, bundledWorkerName } from "../dist/vmm/worker-url.js";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const dist = join(root, "dist");
/** The link every process loads through (bin/typevisor.js imports dist/bundle/cli.js). */
const link = join(dist, "bundle");
/** Builds kept besides the current one, for processes started from them (newest first). */
const KEEP_OLD = 4;
const BUILD_DIR = /^bundle-[0-9a-f]{12}$/;
/** This build's files until they are complete. */
const out = join(dist, `.bundle-staging-${process.pid}`);

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

/** Whether a process with this pid runs (another build's temporary files are left alone). */
function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return e.code === "EPERM";
  }
}
// What builds killed halfway left.
for (const name of readdirSync(dist)) {
  const m = /^\.bundle-(?:staging|link)-(\d+)$/.exec(name);
  if (m !== null && (Number(m[1]) === process.pid || !alive(Number(m[1])))) rmSync(join(dist, name), { recursive: true, force: true });
}
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
  publish();
} catch (e) {
  process.stderr.write(`bundle: ${e instanceof Error ? e.message : String(e)}\n`);
  process.exitCode = 1;
  rmSync(out, { recursive: true, force: true });
}

/** Move the complete build to its own directory, point dist/bundle at it, remove old builds. */
function publish() {
  const files = readdirSync(out).sort();
  const h = createHash("sha256");
  for (const f of files) h.update(`${f}\0`).update(readFileSync(join(out, f))).update("\0");
  const name = `bundle-${h.digest("hex").slice(0, 12)}`;
  const dir = join(dist, name);
  // The same files built again (a rebuild without changes): the directory there is complete, and
  // may be in use; this build's copy goes.
  if (existsSync(dir)) rmSync(out, { recursive: true, force: true });
  else renameSync(out, dir);
  const now = new Date();
  utimesSync(dir, now, now);
  const tmp = join(dist, `.bundle-link-${process.pid}`);
  rmSync(tmp, { force: true });
  symlinkSync(name, tmp);
  // dist/bundle was a directory before builds had their own: moved aside (once), as a build of its
  // own, since a rename cannot replace a directory with a link.
  const was = lstatSync(link, { throwIfNoEntry: false });
  if (was?.isDirectory()) renameSync(link, join(dist, `bundle-${Date.now().toString(16).padStart(12, "0")}`));
  renameSync(tmp, link);
  const old = readdirSync(dist)
    .filter((n) => BUILD_DIR.test(n) && n !== name)
    .map((n) => ({ n, t: statSync(join(dist, n)).mtimeMs }))
    .sort((a, b) => b.t - a.t);
  for (const { n } of old.slice(KEEP_OLD)) rmSync(join(dist, n), { recursive: true, force: true });
}
