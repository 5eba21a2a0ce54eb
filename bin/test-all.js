#!/usr/bin/env node
// `npm test`: everything CI checks, in the least wall time on a 2-core machine.
//
// The lab group is the long pole (one lab boot, 42-58 min on a project machine on 2026-12-07,
// longer where the host's disk is slow: every file the lab reads comes over 9p; docs/lab.md has
// it per file) and its emulated machine has one CPU (docs/lab.md: `-smp 2` once panicked the lab
// kernel, and gave no gain on 2026-12-07), so it keeps one host core busy and leaves the other
// mostly idle. The type-check, lint and unit suite (~10 min) run on that other core at
// the same time instead of before it. What both need is made first, once: the build (dist/, the
// jail helper) and the minimal image (two builders of one image at once would race on its cache).
// Both sides run at the same priority: the unit side at nice 10 starved its own guests whenever
// its tests needed more than the one free core (a VMM's vCPU and device threads, a browser), and
// tests that wait on a guest ran past their limits.
//
// Each line of the two runs is printed as it comes, tagged `[lab]` or `[unit]`, so a CI log shows
// both making progress; the exit code is non-zero if either failed, and the summary says which.
// The last lines repeat what failed and give each side's seconds per test file (a CI log is often
// read from its end).
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { stripVTControlCharacters } from "node:util";

const npx = process.platform === "win32" ? "npx.cmd" : "npx";

/**
 * Lines that say what failed, per tag, repeated at the end: the unit side usually ends long before
 * the lab, and a CI log shown from its tail (stop 38's) then holds only the lab's lines.
 */
const failures = new Map();
/** vitest's failed tests and files and its totals, tsc's errors, eslint's; what a test that timed out printed of the processes it left (test/helpers/unit-stall-report.ts). */
const FAILURE_LINE = /\bFAIL\b|×|✗|Test Files|^\s*Tests\s|error TS\d+|\s\serror\s\s|^test-diag:/;
const MAX_FAILURE_LINES = 40;
/** After vitest's `FAIL  file > test`: its error's first lines. */
const AFTER_FAIL = 2;
const following = new Map();
function noteFailure(tag, line) {
  const seen = failures.get(tag) ?? [];
  failures.set(tag, seen);
  const more = following.get(tag) ?? 0;
  if (more > 0 && line.trim() !== "") following.set(tag, more - 1);
  else if (!FAILURE_LINE.test(line)) return;
  if (/\bFAIL\b/.test(line)) following.set(tag, AFTER_FAIL);
  if (seen.length < MAX_FAILURE_LINES && !seen.includes(line)) seen.push(line);
}

/**
 * Seconds per test file, per tag, from vitest's lines (a file's summary line, or the sum of its
 * tests' lines from the verbose reporter the lab uses), printed at the end for the same reason:
 * where a CI run's time went, in its last lines.
 */
const fileSeconds = new Map();
function noteTime(tag, line) {
  const m = /^\s*[✓×↓]\s+(\S+\.test\.ts)(?:\s+\(\d+ tests?[^)]*\)|\s+>.*)\s(\d+)ms$/.exec(line);
  if (m === null) return;
  const files = fileSeconds.get(tag) ?? new Map();
  fileSeconds.set(tag, files);
  const [, file, ms] = m;
  const summary = !line.includes(" > ");
  const f = files.get(file) ?? { tests: 0, summary: undefined };
  if (summary) f.summary = Number(ms) / 1000;
  else f.tests += Number(ms) / 1000;
  files.set(file, f);
}
function timeSummary(tag, top) {
  const files = [...(fileSeconds.get(tag) ?? new Map())].map(([f, t]) => [f, t.summary ?? t.tests]).sort((a, b) => b[1] - a[1]);
  if (files.length === 0) return undefined;
  const shown = files.slice(0, top).map(([f, s]) => `${f.replace(/\.test\.ts$/, "")} ${s.toFixed(0)}`);
  return `${shown.join(", ")}${files.length > top ? `, ${files.length - top} more` : ""}`;
}

/** Run a command; its output goes to ours, each line tagged; resolves with its exit code. */
function run(tag, cmd, args) {
  return new Promise((resolve) => {
    const started = Date.now();
    console.log(`[${tag}] $ ${cmd} ${args.join(" ")}`);
    const p = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, FORCE_COLOR: process.env.FORCE_COLOR ?? "0" } });
    for (const s of [p.stdout, p.stderr]) createInterface({ input: s }).on("line", (l) => {
      console.log(`[${tag}] ${l}`);
      // CI may force colours on: lines are matched and kept without them.
      const plain = stripVTControlCharacters(l);
      noteFailure(tag, plain);
      noteTime(tag, plain);
    });
    p.on("error", (e) => {
      console.log(`[${tag}] could not start ${cmd}: ${e.message}`);
      resolve(127);
    });
    p.on("close", (code, signal) => {
      const s = ((Date.now() - started) / 1000).toFixed(0);
      console.log(`[${tag}] ${cmd} ${args.join(" ")}: ${signal !== null ? `killed by ${signal}` : `exit ${code}`} after ${s} s`);
      resolve(code ?? 1);
    });
  });
}

/** Run steps one after the other; stop at the first that fails. */
async function chain(tag, steps) {
  for (const [cmd, ...args] of steps) {
    const code = await run(tag, cmd, args);
    if (code !== 0) return code;
  }
  return 0;
}

const t0 = Date.now();
const prep = await chain("prep", [
  ["npm", "run", "build"],
  [process.execPath, "bin/typevisor.js", "image", "build", "minimal"],
]);
if (prep !== 0) process.exit(prep);

// The lab's own limit for the whole group (lab.ts: 3600 s by default) is raised to 80 min: on a
// host with a slow disk the group ran past 60 min (2026-12-07: 5 of 15 files in 60 min, the
// machine's page cache held ~120 MB), and CI's limit for everything is 90 min.
process.env.TYPEVISOR_LAB_TIMEOUT ??= "4800";

const [unit, lab] = await Promise.all([
  chain("unit", [
    ["npm", "run", "typecheck"],
    ["npm", "run", "lint"],
    [npx, "vitest", "run"],
  ]),
  chain("lab", [[process.execPath, "bin/lab.js", "--", npx, "vitest", "run", "--config", "vitest.lab.config.ts"]]),
]);
for (const [tag, code] of [["unit", unit], ["lab", lab]]) {
  if (code === 0) continue;
  console.log(`test-all: what the ${tag} side printed about failures (the first ${MAX_FAILURE_LINES} such lines):`);
  for (const l of failures.get(tag) ?? []) console.log(`[${tag}] ${l}`);
}
for (const [tag, top] of [["unit", 8], ["lab", 20]]) {
  const t = timeSummary(tag, top);
  if (t !== undefined) console.log(`test-all: ${tag} seconds per file, longest first: ${t}`);
}
const min = ((Date.now() - t0) / 60000).toFixed(1);
console.log(`test-all: type-check, lint and unit tests ${unit === 0 ? "passed" : `FAILED (exit ${unit})`}; lab group ${lab === 0 ? "passed" : `FAILED (exit ${lab})`}; ${min} min in all`);
process.exit(unit !== 0 ? unit : lab);
