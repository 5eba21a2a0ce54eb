/**
 * bench/soak: the daemon under sustained load. SOAK_VMS workers each cycle their own VM through
 * create -> start -> (the guest's banner on its console) -> pause -> resume -> stop -> rm, over and
 * over for SOAK_SECONDS, while API readers loop over list, show, stats, events, metrics, health
 * and host, one client follows the event stream, and the first SOAK_FOLLOWERS workers' VMs each
 * have a console follower (`GET console?follow=true`, opened right after create; it must see the
 * banner, and must end by itself once the VM is removed); the first SOAK_ECHO of those also attach
 * to the interactive console after resume, type a token and expect its echo both on the attached
 * connection and in the followed log.
 *
 * Measured: the latency of every API request, by operation (count, failures, p50, p99, max); the
 * daemon's resident memory (VmRSS) and open descriptors, sampled every SOAK_SAMPLE_SECONDS, from
 * the end of the warm-up (every worker through one full cycle) to the end: first, last, max and
 * the least-squares slope in MiB/minute, so "memory flat" is a number; the daemon's CPU and its
 * main thread's run-queue wait (is a slow answer the daemon's work or a host with no CPU free?); the
 * bench's own event-loop delay (a stalled measurer inflates what it measures); the cycles completed. A
 * failure is any error where success was expected: a non-2xx answer, a request past
 * SOAK_TIMEOUT_SECONDS, a banner or an echo that never came, a follow stream that did not end, a
 * page of events (`?after=LAST&limit=100`) or an event stream that skipped events, a VM or VMM
 * process left at the end. Each is printed with its error; the bench exits 1 if any.
 *
 * The guests are the tiny test kernel (test/helpers/tiny-kernel.ts), so this runs on the host's own
 * /dev/kvm (the daemon with --force-kvm), no lab. There is no QEMU figure beside ours: QEMU has no
 * managing daemon to put under the same load, so the figures are absolute.
 *
 * Run: npm run bench:soak      (after npm run build: the daemon and the VMMs run from dist/)
 * Knobs (environment): SOAK_VMS (50), SOAK_SECONDS (300), SOAK_READERS (4), SOAK_READER_PAUSE_MS
 * (50, between one reader's requests), SOAK_FOLLOWERS (10), SOAK_ECHO (5), SOAK_TIMEOUT_SECONDS (60,
 * per request and per wait), SOAK_SAMPLE_SECONDS (5), SOAK_RAMP_MS (100, between workers' first
 * creates).
 */
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { request, type IncomingMessage } from "node:http";
import { cpus, freemem, loadavg, tmpdir, totalmem } from "node:os";
import { join } from "node:path";
import { monitorEventLoopDelay } from "node:perf_hooks";
import type { Duplex } from "node:stream";
import { ApiError, TypevisorClient } from "../src/api/client.js";
import { processUsage } from "../src/control/proc.js";
import { MIN_MEMORY_MIB } from "../src/vmm/defaults.js";
import { startDaemon, type TestDaemon } from "../test/helpers/daemon.js";
import { vmmProcesses } from "../test/helpers/vmm-processes.js";
import { TINY_KERNEL_BANNER, writeTinyKernel } from "../test/helpers/tiny-kernel.js";

function knob(name: string, fallback: number): number {
  const v = Number(process.env[name] ?? fallback);
  if (!Number.isFinite(v) || v < 0) throw new Error(`${name} must be a number >= 0, not ${process.env[name]}`);
  return v;
}

const VMS = knob("SOAK_VMS", 50);
const SECONDS = knob("SOAK_SECONDS", 300);
const READERS = knob("SOAK_READERS", 4);
const READER_PAUSE_MS = knob("SOAK_READER_PAUSE_MS", 50);
const FOLLOWERS = Math.min(knob("SOAK_FOLLOWERS", 10), VMS);
const ECHO = Math.min(knob("SOAK_ECHO", 5), FOLLOWERS);
const TIMEOUT_MS = knob("SOAK_TIMEOUT_SECONDS", 60) * 1000;
const SAMPLE_MS = knob("SOAK_SAMPLE_SECONDS", 5) * 1000;
const RAMP_MS = knob("SOAK_RAMP_MS", 100);
/** The smallest guest the API accepts: the tiny kernel touches a few pages of it. */
const MEMORY_MIB = MIN_MEMORY_MIB;
/** How long a console follow stream may stay open after its VM was removed (the daemon polls the log every 200 ms). */
const FOLLOW_END_MS = 5000;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

// ---- recording --------------------------------------------------------------------------------

interface OpStats {
  ms: number[];
  failures: number;
}

class Recorder {
  readonly ops = new Map<string, OpStats>();
  readonly failures: string[] = [];

  private stats(op: string): OpStats {
    let s = this.ops.get(op);
    if (s === undefined) this.ops.set(op, (s = { ms: [], failures: 0 }));
    return s;
  }

  fail(op: string, what: string): void {
    this.stats(op).failures++;
    this.failures.push(`${new Date().toISOString()} ${op}: ${what}`);
    console.log(`soak: FAILURE ${op}: ${what}`);
  }

  sample(op: string, ms: number): void {
    this.stats(op).ms.push(ms);
  }

  /**
   * Time `fn` as `op`. An error is a failure unless `expected` accepts it (a read of a VM that its
   * worker removed meanwhile); an accepted one is timed like a success. Throws on failure.
   */
  async time<T>(op: string, fn: () => Promise<T>, expected: (e: unknown) => boolean = () => false): Promise<T | undefined> {
    const t0 = performance.now();
    try {
      const v = await fn();
      this.sample(op, performance.now() - t0);
      return v;
    } catch (e) {
      if (expected(e)) {
        this.sample(op, performance.now() - t0);
        return undefined;
      }
      this.fail(op, `${errorText(e)} (after ${(performance.now() - t0).toFixed(0)} ms)`);
      throw e;
    }
  }
}

function errorText(e: unknown): string {
  if (e instanceof ApiError) return `${e.status} ${e.code}: ${e.message}`;
  return e instanceof Error ? e.message : String(e);
}

const notFound = (e: unknown): boolean => e instanceof ApiError && e.status === 404;

/** The q-quantile (0..1) of `xs`, nearest rank. */
function quantile(xs: readonly number[], q: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]!;
}

/** Least-squares slope of y over x. */
function slope(points: readonly { x: number; y: number }[]): number {
  const n = points.length;
  if (n < 2) return NaN;
  const mx = points.reduce((a, p) => a + p.x, 0) / n;
  const my = points.reduce((a, p) => a + p.y, 0) / n;
  const sxy = points.reduce((a, p) => a + (p.x - mx) * (p.y - my), 0);
  const sxx = points.reduce((a, p) => a + (p.x - mx) ** 2, 0);
  return sxx === 0 ? NaN : sxy / sxx;
}

// ---- the daemon's process ------------------------------------------------------------------------

function rssKiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return Number(m?.[1] ?? NaN);
}

/**
 * The daemon's main thread (its event loop) from /proc/PID/task/PID/schedstat: nanoseconds on a CPU
 * and waiting on a run queue for one. Waiting is time the daemon wanted to run and the host had no CPU.
 */
function mainThreadSched(pid: number): { runNs: number; waitNs: number } {
  const [run, wait] = readFileSync(`/proc/${pid}/task/${pid}/schedstat`, "utf8").trim().split(/\s+/).map(Number);
  return { runNs: run ?? NaN, waitNs: wait ?? NaN };
}

function fdCount(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).length;
}

interface ProcSample {
  tMs: number;
  rssKiB: number;
  cpuSeconds: number;
  mainRunNs: number;
  mainWaitNs: number;
  fds: number;
  vmms: number;
}

// ---- shared state of a run -----------------------------------------------------------------------

interface Run {
  client: TypevisorClient;
  socket: string;
  home: string;
  kernel: string;
  rec: Recorder;
  /** Date.now() past which no worker begins a new cycle. */
  endAt: number;
  /** Cycles completed, per worker. */
  cycles: number[];
  /** Set when the workers are done: readers and the event follower stop. */
  done: boolean;
}

// ---- console streams -----------------------------------------------------------------------------

/** What a stream has carried so far, and whether it has ended. */
interface Tap {
  text: () => string;
  ended: () => boolean;
  close: () => void;
}

function tap(stream: IncomingMessage | Duplex): Tap {
  let text = "";
  let ended = false;
  stream.on("data", (b: Buffer) => {
    text += b.toString("latin1");
    // keep the tail only: a long-lived stream must not grow the bench's own memory
    if (text.length > 65536) text = text.slice(-32768);
  });
  stream.on("end", () => (ended = true));
  stream.on("close", () => (ended = true));
  stream.on("error", () => (ended = true));
  return { text: () => text, ended: () => ended, close: () => stream.destroy() };
}

/** Wait until `ok()`, at most `timeoutMs`; false when it timed out. */
async function waitFor(ok: () => boolean, timeoutMs: number, everyMs = 20): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (!ok()) {
    if (Date.now() > deadline) return false;
    await sleep(everyMs);
  }
  return true;
}

/** Time until `ok()` as `op`; a timeout is a failure (and throws). */
async function timeUntil(run: Run, op: string, ok: () => boolean, what: string): Promise<void> {
  const t0 = performance.now();
  if (!(await waitFor(ok, TIMEOUT_MS))) {
    run.rec.fail(op, `${what} not seen within ${TIMEOUT_MS / 1000} s`);
    throw new Error(`${op}: timed out`);
  }
  run.rec.sample(op, performance.now() - t0);
}

/** The banner, from a follow stream or, without one, by polling the captured console. */
async function awaitBanner(run: Run, name: string, follow: Tap | undefined): Promise<void> {
  if (follow !== undefined) return timeUntil(run, "banner (follow stream)", () => follow.text().includes(TINY_KERNEL_BANNER), `${name}: the banner`);
  const t0 = performance.now();
  const deadline = Date.now() + TIMEOUT_MS;
  for (;;) {
    const out = await run.rec.time("console (read)", () => run.client.console(name));
    if (out?.toString("latin1").includes(TINY_KERNEL_BANNER) === true) break;
    if (Date.now() > deadline) {
      run.rec.fail("banner (polled)", `${name}: the banner not seen within ${TIMEOUT_MS / 1000} s`);
      throw new Error("banner: timed out");
    }
    await sleep(50);
  }
  run.rec.sample("banner (polled)", performance.now() - t0);
}

/** Attach to the interactive console, type a token, expect its echo there and in the followed log. */
async function echo(run: Run, name: string, follow: Tap, token: string): Promise<void> {
  const con = await run.rec.time("console attach", () => run.client.attachConsole(name));
  const t = tap(con!);
  try {
    con!.write(token);
    await timeUntil(run, "echo (attached)", () => t.text().includes(token), `${name}: the echo of ${token}`);
    await timeUntil(run, "echo (follow stream)", () => follow.text().includes(token), `${name}: the echo of ${token} in the log`);
  } finally {
    t.close();
  }
}

// ---- a worker: one VM through its lifecycle, again and again --------------------------------------

function expectState(run: Run, op: string, got: { state: string } | undefined, want: string, name: string): void {
  if (got !== undefined && got.state !== want) {
    run.rec.fail(op, `${name}: state ${got.state}, expected ${want}`);
    throw new Error(`${op}: wrong state`);
  }
}

async function cycle(run: Run, i: number, n: number): Promise<void> {
  const { client, rec } = run;
  const name = `soak-${i}`;
  await rec.time("create", () => client.createVm({ name, kernel: run.kernel, memoryMiB: MEMORY_MIB, rng: false }));
  const follow = i < FOLLOWERS ? tap((await rec.time("console follow (open)", () => client.followConsole(name)))!) : undefined;
  try {
    expectState(run, "start", await rec.time("start", () => client.startVm(name)), "running", name);
    await awaitBanner(run, name, follow);
    expectState(run, "pause", await rec.time("pause", () => client.pauseVm(name)), "paused", name);
    expectState(run, "resume", await rec.time("resume", () => client.resumeVm(name)), "running", name);
    if (follow !== undefined && i < ECHO) await echo(run, name, follow, `[soak ${i}.${n}]`);
    expectState(run, "stop", await rec.time("stop", () => client.stopVm(name)), "stopped", name);
    await rec.time("rm", () => client.removeVm(name));
    if (follow !== undefined && !(await waitFor(follow.ended, FOLLOW_END_MS))) {
      rec.fail("console follow (end)", `${name}: the follow stream was still open ${FOLLOW_END_MS / 1000} s after rm`);
    }
  } finally {
    follow?.close();
  }
}

/** After a failed cycle: remove whatever is left of the VM, so the next cycle starts clean. */
async function clearVm(run: Run, name: string): Promise<void> {
  await run.rec.time("rm --force (after a failure)", () => run.client.removeVm(name, { force: true }), notFound).catch(() => undefined);
}

async function worker(run: Run, i: number): Promise<void> {
  await sleep(i * RAMP_MS);
  for (let n = 0; Date.now() < run.endAt; n++) {
    try {
      await cycle(run, i, n);
      run.cycles[i]!++;
    } catch {
      // recorded where it happened
      await clearVm(run, `soak-${i}`);
    }
  }
}

// ---- readers ----------------------------------------------------------------------------------

/** A reader's page of events (GET /v1/events?after=LAST&limit=EVENTS_PAGE). */
const EVENTS_PAGE = 100;

interface ReaderState {
  names: string[];
  lastSeq: number;
}

/** One round of reads, each timed under its own name. */
async function readRound(run: Run, st: ReaderState): Promise<void> {
  const { client, rec } = run;
  const pick = (): string => st.names[Math.floor(Math.random() * st.names.length)] ?? "soak-0";
  const steps: [string, () => Promise<unknown>][] = [
    ["list", async () => (st.names = ((await rec.time("list", () => client.listVms())) ?? []).map((v) => v.name))],
    ["show", () => rec.time("show", () => client.getVm(pick()), notFound)],
    ["stats", () => rec.time("stats", () => client.vmStats(pick()), notFound)],
    ["events", async () => {
      const evs = (await rec.time("events", () => client.events({ after: st.lastSeq, limit: EVENTS_PAGE }))) ?? [];
      // paging with ?after= must hand over every event: the inventory numbers them without gaps
      const first = evs[0]?.seq;
      if (st.lastSeq > 0 && first !== undefined && first !== st.lastSeq + 1) rec.fail("events (paging)", `asked for ${EVENTS_PAGE} events after ${st.lastSeq}, got ${first}..${evs.at(-1)?.seq}: ${first - st.lastSeq - 1} skipped`);
      st.lastSeq = evs.at(-1)?.seq ?? st.lastSeq;
    }],
    ["metrics", () => rec.time("metrics", () => client.metrics())],
    ["health", () => rec.time("health", () => client.health())],
    ["host", () => rec.time("host", () => client.host())],
  ];
  for (const [, step] of steps) {
    if (run.done) return;
    await step().catch(() => undefined); // a failure is recorded; the reader goes on
    await sleep(READER_PAUSE_MS);
  }
}

async function reader(run: Run): Promise<void> {
  const st: ReaderState = { names: [], lastSeq: 0 };
  while (!run.done) await readRound(run, st);
}

/**
 * The event stream, followed for the whole run (raw SSE: the client's generator cannot be cancelled
 * while it waits). Its `id`s must rise one by one: the inventory numbers events without gaps.
 */
function followEvents(run: Run): { count: () => number; gaps: () => number; close: () => void } {
  let count = 0;
  let gaps = 0;
  let last = -1;
  let buf = "";
  const req = request({ socketPath: run.socket, method: "GET", path: "/v1/events?follow=true&after=0", agent: false }, (res) => {
    res.setEncoding("utf8");
    res.on("data", (chunk: string) => {
      buf += chunk;
      let i: number;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        const m = /^id: (\d+)$/.exec(line);
        if (m === null) continue;
        const seq = Number(m[1]);
        if (last >= 0 && seq !== last + 1) gaps++;
        last = seq;
        count++;
      }
    });
    res.on("close", () => {
      if (!run.done) run.rec.fail("events (follow)", "the event stream ended during the run");
    });
  });
  req.on("error", (e) => {
    if (!run.done) run.rec.fail("events (follow)", e.message);
  });
  req.end();
  return { count: () => count, gaps: () => gaps, close: () => req.destroy() };
}

// ---- sampling the daemon ------------------------------------------------------------------------

function sampler(d: TestDaemon, t0: number, samples: ProcSample[]): () => void {
  const take = (): void => {
    const pid = d.proc.pid!;
    const sched = mainThreadSched(pid);
    samples.push({ tMs: Date.now() - t0, rssKiB: rssKiB(pid), cpuSeconds: processUsage(pid)?.cpuSeconds ?? NaN, mainRunNs: sched.runNs, mainWaitNs: sched.waitNs, fds: fdCount(pid), vmms: vmmProcesses(d.home).length });
  };
  take();
  const timer = setInterval(take, SAMPLE_MS);
  return () => {
    clearInterval(timer);
    take();
  };
}

interface ProcSummary {
  samples: number;
  warmupEndS: number;
  rssStartMiB: number;
  rssEndMiB: number;
  rssMaxMiB: number;
  rssSlopeMiBPerMin: number;
  fdsStart: number;
  fdsEnd: number;
  fdsMax: number;
  vmmsMax: number;
  /** The daemon's CPU time over the whole run, as a share of one CPU. */
  cpuPercent: number;
  /** Its main thread's time on a CPU, and waiting for one, as shares of the run's wall time. */
  mainRunPercent: number;
  mainWaitPercent: number;
}

function cpuShare(a: ProcSample | undefined, b: ProcSample | undefined): number {
  return a === undefined || b === undefined || b.tMs === a.tMs ? NaN : (100 * (b.cpuSeconds - a.cpuSeconds)) / ((b.tMs - a.tMs) / 1000);
}

function nsShare(a: ProcSample | undefined, b: ProcSample | undefined, f: (s: ProcSample) => number): number {
  return a === undefined || b === undefined || b.tMs === a.tMs ? NaN : (100 * (f(b) - f(a)) / 1e6) / (b.tMs - a.tMs);
}

function summarize(samples: readonly ProcSample[], warmupEndMs: number): ProcSummary {
  const after = samples.filter((s) => s.tMs >= warmupEndMs);
  const use = after.length >= 2 ? after : samples;
  const mib = (k: number): number => k / 1024;
  return {
    samples: use.length,
    warmupEndS: (use[0]?.tMs ?? 0) / 1000,
    rssStartMiB: mib(use[0]?.rssKiB ?? NaN),
    rssEndMiB: mib(use.at(-1)?.rssKiB ?? NaN),
    rssMaxMiB: mib(maxOf(use.map((s) => s.rssKiB))),
    rssSlopeMiBPerMin: slope(use.map((s) => ({ x: s.tMs / 60_000, y: mib(s.rssKiB) }))),
    fdsStart: use[0]?.fds ?? NaN,
    fdsEnd: use.at(-1)?.fds ?? NaN,
    fdsMax: maxOf(use.map((s) => s.fds)),
    vmmsMax: maxOf(samples.map((s) => s.vmms)),
    cpuPercent: cpuShare(samples[0], samples.at(-1)),
    mainRunPercent: nsShare(samples[0], samples.at(-1), (s) => s.mainRunNs),
    mainWaitPercent: nsShare(samples[0], samples.at(-1), (s) => s.mainWaitNs),
  };
}

// ---- the end: everything gone -------------------------------------------------------------------

/** Remove any VM still there, stop the daemon, and check no VMM process of it is left. */
async function teardown(run: Run, d: TestDaemon): Promise<{ exitCode: number | null; vmmsLeft: number }> {
  for (const vm of await run.client.listVms().catch(() => [])) {
    run.rec.fail("left behind", `VM ${vm.name} (${vm.state}) still there after its worker ended`);
    await clearVm(run, vm.name);
  }
  const exitCode = await d.stop();
  if (exitCode !== 0) run.rec.fail("daemon exit", `the daemon exited with ${exitCode}`);
  await waitFor(() => vmmProcesses(d.home).length === 0, 10_000, 200);
  const left = vmmProcesses(d.home);
  for (const pid of left) {
    run.rec.fail("left behind", `VMM process ${pid} still running after the daemon stopped`);
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      /* gone meanwhile */
    }
  }
  return { exitCode, vmmsLeft: left.length };
}

// ---- report -------------------------------------------------------------------------------------

/** Operations in the order a cycle and a reader round run them; the waits last (not single requests). */
const ORDER = [
  "create", "console follow (open)", "start", "console (read)", "pause", "resume", "console attach", "stop", "rm", "rm --force (after a failure)",
  "list", "show", "stats", "events", "metrics", "health", "host",
];
const WAITS = new Set(["banner (polled)", "banner (follow stream)", "echo (attached)", "echo (follow stream)"]);

const maxOf = (xs: readonly number[]): number => xs.reduce((a, b) => Math.max(a, b), xs.length > 0 ? -Infinity : NaN);

function row(label: string, ms: readonly number[], failures: number): string[] {
  return [label, String(ms.length), String(failures), ...[0.5, 0.99].map((q) => quantile(ms, q).toFixed(1)), maxOf(ms).toFixed(1)];
}

function sortedOps(rec: Recorder): [string, OpStats][] {
  const rank = (op: string): number => (WAITS.has(op) ? 1000 : 0) + (ORDER.includes(op) ? ORDER.indexOf(op) : 500);
  return [...rec.ops].sort((a, b) => rank(a[0]) - rank(b[0]));
}

function table(rec: Recorder): string {
  const ops = sortedOps(rec);
  const api = ops.filter(([op]) => !WAITS.has(op));
  const rows = [
    ...api.map(([op, s]) => row(op, s.ms, s.failures)),
    row("all API requests", api.flatMap(([, s]) => s.ms), api.reduce((a, [, s]) => a + s.failures, 0)),
    ...ops.filter(([op]) => WAITS.has(op)).map(([op, s]) => row(`wait: ${op}`, s.ms, s.failures)),
  ];
  const head = ["operation", "count", "failures", "p50 ms", "p99 ms", "max ms"];
  const widths = head.map((h, c) => Math.max(h.length, ...rows.map((r) => r[c]!.length)));
  const line = (r: string[]): string => r.map((x, c) => (c === 0 ? x.padEnd(widths[c]!) : x.padStart(widths[c]!))).join("  ");
  return [line(head), ...rows.map(line)].join("\n");
}

/** The bench's own event-loop delay (ms): a measurer that stalls inflates every latency it reports. */
interface Lag {
  p99: number;
  max: number;
  cpuPercent: number;
}

function report(run: Run, proc: ProcSummary, events: { count: number; gaps: number }, wallS: number, lag: Lag): void {
  const cycles = run.cycles.reduce((a, b) => a + b, 0);
  const all = [...run.rec.ops.values()];
  console.log(table(run.rec));
  console.log(`cycles completed: ${cycles} in ${wallS.toFixed(0)} s (${(cycles / (wallS / 60)).toFixed(1)}/min; per worker min ${Math.min(...run.cycles)}, max ${Math.max(...run.cycles)})`);
  console.log(`requests: ${all.reduce((a, s) => a + s.ms.length, 0)}, failures: ${run.rec.failures.length}`);
  console.log(`daemon RSS after warm-up (${proc.warmupEndS.toFixed(0)} s, ${proc.samples} samples): start ${proc.rssStartMiB.toFixed(1)} MiB, end ${proc.rssEndMiB.toFixed(1)} MiB, max ${proc.rssMaxMiB.toFixed(1)} MiB, slope ${proc.rssSlopeMiBPerMin.toFixed(2)} MiB/min`);
  console.log(`daemon open descriptors: start ${proc.fdsStart}, end ${proc.fdsEnd}, max ${proc.fdsMax}; VMM processes at once, max ${proc.vmmsMax}; daemon CPU ${proc.cpuPercent.toFixed(0)}% of one CPU over the run`);
  console.log(`daemon main thread (event loop) over the run: on a CPU ${proc.mainRunPercent.toFixed(1)}% of the time, runnable but waiting for a CPU ${proc.mainWaitPercent.toFixed(1)}%`);
  console.log(`event stream: ${events.count} events, ${events.gaps} gaps in their ids`);
  console.log(`the bench's own event-loop delay: p99 ${lag.p99.toFixed(1)} ms, max ${lag.max.toFixed(1)} ms, its CPU ${lag.cpuPercent.toFixed(0)}% of one CPU; host load at the end ${loadavg().map((l) => l.toFixed(2)).join(" ")}`);
  for (const f of run.rec.failures) console.log(`failure: ${f}`);
}

// ---- main ---------------------------------------------------------------------------------------

async function main(): Promise<number> {
  const dir = mkdtempSync(join(tmpdir(), "tvsoak-"));
  const kernel = join(dir, "tiny.bin");
  writeTinyKernel(kernel);
  console.log(`bench/soak: ${VMS} VMs cycling create/start/pause/resume/stop/rm for ${SECONDS} s, ${READERS} readers, ${FOLLOWERS} console followers (${ECHO} with echo), tiny guests of ${MEMORY_MIB} MiB; host ${cpus().length} CPUs, load ${loadavg().map((l) => l.toFixed(2)).join(" ")}, ${(freemem() / 2 ** 30).toFixed(1)} of ${(totalmem() / 2 ** 30).toFixed(1)} GiB free; no QEMU peer (no managing daemon): absolute figures`);
  // The CPU budget must admit every VM at once (2 host CPUs x 4 by default is 8).
  const overcommit = String(Math.min(64, Math.max(4, Math.ceil(VMS / cpus().length))));
  // The daemon's own default usage interval (5 s; startDaemon's 1 s is for tests).
  const d = await startDaemon({ home: join(dir, "home"), args: ["--force-kvm", "--allow-files", dir, "--cpu-overcommit", overcommit, "--usage-interval", "5"] });
  const run: Run = { client: new TypevisorClient({ socketPath: d.socket }, TIMEOUT_MS), socket: d.socket, home: d.home, kernel, rec: new Recorder(), endAt: Date.now() + SECONDS * 1000, cycles: new Array<number>(VMS).fill(0), done: false };
  const loop = monitorEventLoopDelay({ resolution: 20 });
  loop.enable();
  const cpu0 = process.cpuUsage();
  const t0 = Date.now();
  const samples: ProcSample[] = [];
  const stopSampling = sampler(d, t0, samples);
  let warmupEndMs = Math.min(60_000, (SECONDS * 1000) / 3);
  const warm = setInterval(() => {
    if (run.cycles.every((c) => c > 0)) {
      warmupEndMs = Math.min(warmupEndMs, Date.now() - t0);
      clearInterval(warm);
    }
  }, 500);
  const events = followEvents(run);
  const readers = Array.from({ length: READERS }, () => reader(run));
  await Promise.all(Array.from({ length: VMS }, (_, i) => worker(run, i)));
  const wallS = (Date.now() - t0) / 1000;
  loop.disable();
  const cpu = process.cpuUsage(cpu0);
  const lag: Lag = { p99: loop.percentile(99) / 1e6, max: loop.max / 1e6, cpuPercent: (100 * (cpu.user + cpu.system)) / 1e6 / wallS };
  run.done = true;
  clearInterval(warm);
  await Promise.all(readers);
  stopSampling();
  await sleep(500); // the last events on their way
  const ev = { count: events.count(), gaps: events.gaps() };
  events.close();
  const proc = summarize(samples, warmupEndMs);
  const end = await teardown(run, d);
  report(run, proc, ev, wallS, lag);
  const ops = Object.fromEntries(sortedOps(run.rec).map(([op, s]) => [op, { count: s.ms.length, failures: s.failures, p50: quantile(s.ms, 0.5), p99: quantile(s.ms, 0.99), max: maxOf(s.ms) }]));
  console.log(JSON.stringify({ bench: "soak", date: new Date().toISOString(), vms: VMS, seconds: SECONDS, readers: READERS, followers: FOLLOWERS, echo: ECHO, cycles: run.cycles.reduce((a, b) => a + b, 0), failures: run.rec.failures.length, ops, daemon: proc, events: ev, benchLoopDelayMs: lag, ...end }));
  if (end.vmmsLeft === 0) rmSync(dir, { recursive: true, force: true });
  return run.rec.failures.length > 0 ? 1 : 0;
}

process.exitCode = await main();
