import { execFileSync, spawn, spawnSync } from "node:child_process";
import { SYNC_TIMEOUT_MS } from "../test/helpers/sync-timeout.js";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { QmpClient } from "../src/lab/qmp.js";
import type { ConsoleProcess } from "../test/helpers/console-process.js";
import { CLK_TCK, parseStatFields } from "../src/control/proc.js";

/** Shared pieces of the benchmarks: summary statistics and the report line. */

export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

/** "label: typevisor X, qemu Y, ratio X/Y" from the medians of both series. */
export function compare(label: string, ours: readonly number[], qemu: readonly number[], digits = 1): string {
  const t = median(ours);
  const q = median(qemu);
  return `${label}: typevisor ${t.toFixed(digits)}, qemu ${q.toFixed(digits)}, ratio ${(t / q).toFixed(2)}`;
}


export interface ProcessMemory {
  rssKiB: number;
  pssKiB: number;
  /** Unique set size: private clean + private dirty pages. */
  ussKiB: number;
  /** The same three over the mapping(s) holding guest RAM: the guest's pages, not the VMM's. */
  guestRssKiB: number;
  guestPssKiB: number;
  guestUssKiB: number;
  /**
   * The part of ussKiB in file-backed mappings (program text, libraries, read-only data): pages no
   * other process has mapped yet, so it shrinks as more processes of the same program run; the
   * rest of ussKiB (heaps, stacks, anonymous memory) is each process's own whatever runs beside it.
   */
  fileUssKiB: number;
  /** The process's page tables (VmPTE): they map guest RAM too, so they grow with it. */
  pteKiB: number;
  threads: number;
}

/**
 * A VMM's memory from /proc/PID/smaps (proc(5)), split into the guest's RAM and the rest. Guest
 * RAM is the anonymous mappings at least as big as its smallest part (QEMU: one mapping of it all;
 * typevisor: one per region, the one below the MMIO hole at most 3 GiB, unless the kernel merged
 * them).
 */
export function processMemory(pid: number, memoryMiB: number): ProcessMemory {
  const threshold = Math.min(memoryMiB, 3 * 1024) * 1024;
  const out = { rssKiB: 0, pssKiB: 0, ussKiB: 0, guestRssKiB: 0, guestPssKiB: 0, guestUssKiB: 0, fileUssKiB: 0 };
  let guest = false;
  let file = false;
  for (const line of readFileSync(`/proc/${pid}/smaps`, "utf8").split("\n")) {
    const head = /^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ (\d+)\s*(.*)$/.exec(line);
    if (head !== null) {
      const sizeKiB = (parseInt(head[2]!, 16) - parseInt(head[1]!, 16)) / 1024;
      guest = head[3] === "0" && (head[4] ?? "").trim() === "" && sizeKiB >= threshold;
      // A path names a file; no name or a [pseudo] name (heap, stack, vdso) is anonymous.
      file = (head[4] ?? "").trim().startsWith("/");
      continue;
    }
    const m = /^(Rss|Pss|Private_Clean|Private_Dirty):\s+(\d+) kB/.exec(line);
    if (m === null) continue;
    const kib = Number(m[2]);
    const key = m[1] === "Rss" ? "rssKiB" : m[1] === "Pss" ? "pssKiB" : "ussKiB";
    out[key] += kib;
    if (file && key === "ussKiB") out.fileUssKiB += kib;
    if (guest) out[key === "rssKiB" ? "guestRssKiB" : key === "pssKiB" ? "guestPssKiB" : "guestUssKiB"] += kib;
  }
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const field = (name: string): number => Number(new RegExp(`^${name}:\\s+(\\d+)`, "m").exec(status)?.[1] ?? 0);
  return { ...out, pteKiB: field("VmPTE"), threads: field("Threads") };
}

/** utime+stime in ticks of every thread of `pid`, keyed "name#tid" (proc(5) /proc/PID/task/TID/stat). */
export function threadTicks(pid: number): Map<string, number> {
  const out = new Map<string, number>();
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    try {
      const f = parseStatFields(readFileSync(`/proc/${pid}/task/${tid}/stat`, "utf8"));
      // proc(5): 2 comm, 14 utime, 15 stime
      if (f !== undefined) out.set(`${f[2]}#${tid}`, Number(f[14]) + Number(f[15]));
    } catch {
      // a thread that ended between readdir and read
    }
  }
  return out;
}

/** CPU seconds per thread name between two samples. */
export function cpuDelta(a: Map<string, number>, b: Map<string, number>): Record<string, number> {
  const out: Record<string, number> = {};
  // By thread id: a thread may have named itself between the samples (a VMM's worker started
  // ahead is "node" until its init names it), and its earlier CPU is not part of the delta.
  const before = new Map([...a].map(([k, v]) => [k.slice(k.lastIndexOf("#") + 1), v]));
  for (const [k, v] of b) {
    const name = k.slice(0, k.lastIndexOf("#"));
    const d = (v - (before.get(k.slice(k.lastIndexOf("#") + 1)) ?? 0)) / CLK_TCK;
    if (d > 0) out[name] = (out[name] ?? 0) + d;
  }
  return out;
}

/** "name 0.12, other 0.03", busiest thread first. */
export function formatCpu(cpu: Record<string, number>): string {
  return Object.entries(cpu)
    .sort((u, v) => v[1] - u[1])
    .map(([t, sec]) => `${t} ${sec.toFixed(2)}`)
    .join(", ");
}

/*
 * KVM keeps per-VM statistics in debugfs (/sys/kernel/debug/kvm/PID-FD/, one file per counter,
 * summed over vCPUs; Documentation/virt/kvm/api.rst "binary stats" lists the same counters):
 * exits handled inside KVM never reach the VMM, so these show what GET /stats cannot, e.g. how
 * often the vCPU halted and whether halt polling spun (halt_poll_*), for both VMMs alike.
 */
const KVM_DEBUGFS = "/sys/kernel/debug/kvm";
const KVM_KEYS = [
  "exits", "halt_exits", "halt_wakeup", "halt_attempted_poll", "halt_successful_poll", "halt_poll_success_ns",
  "halt_poll_fail_ns", "halt_wait_ns", "irq_injections", "irq_exits", "io_exits", "mmio_exits", "signal_exits",
  "irq_window_exits", "request_irq_exits", "host_state_reload", "fpu_reload",
  // Guest page faults KVM resolved by building a stage-2 (NPT/EPT) entry, and all it took: a
  // guest whose RAM is mapped 4 KiB at a time takes one per page it touches.
  "pf_fixed", "pf_taken",
];

export function mountDebugfs(): boolean {
  if (existsSync(KVM_DEBUGFS)) return true;
  try {
    execFileSync("mount", ["-t", "debugfs", "none", "/sys/kernel/debug"], { stdio: "ignore", timeout: SYNC_TIMEOUT_MS });
  } catch {
    // not root or no debugfs: the counters are left out
  }
  return existsSync(KVM_DEBUGFS);
}

/** KVM_KEYS (or `keys`) of every VM of `pid`, summed (a VMM has one). */
export function kvmCounters(pid: number, keys: readonly string[] = KVM_KEYS): Map<string, number> {
  const out = new Map<string, number>();
  let dirs: string[] = [];
  try {
    dirs = readdirSync(KVM_DEBUGFS).filter((d) => d.startsWith(`${pid}-`));
  } catch {
    return out;
  }
  for (const d of dirs) {
    for (const k of keys) {
      try {
        out.set(k, (out.get(k) ?? 0) + Number(readFileSync(`${KVM_DEBUGFS}/${d}/${k}`, "utf8").trim()));
      } catch {
        // a counter this kernel does not have
      }
    }
  }
  return out;
}

/** Per-counter difference b - a. */
export function counterDelta(a: Map<string, number>, b: Map<string, number>): Record<string, number> {
  return Object.fromEntries([...b].map(([k, v]) => [k, v - (a.get(k) ?? 0)]));
}

/**
 * BENCH_PERF=1: sample a VMM process with Linux perf (software cpu-clock event: the lab's emulated
 * CPU has no PMU) between two points of a benchmark and print where its CPU went, by thread,
 * shared object and symbol. JavaScript frames get names when node runs with --perf-basic-prof
 * (V8 writes /tmp/perf-PID.map); see `nodePerfArgs`. The V8 profiler cannot be used instead: its
 * SIGPROF interrupts KVM ioctls (KVM_CREATE_VM fails with EINTR).
 */
export const PERF = process.env["BENCH_PERF"] === "1";

/** Extra node flags for a VMM: --perf-basic-prof under BENCH_PERF, and BENCH_NODE_FLAGS (space-separated, e.g. --trace-deopt). */
export const nodePerfArgs = (): string[] => [...(PERF ? ["--perf-basic-prof"] : []), ...(process.env["BENCH_NODE_FLAGS"]?.split(" ").filter((f) => f !== "") ?? [])];

/**
 * Start `perf record` on `pid`; the returned function stops it (without waiting: the benchmark goes
 * on) and returns the function that prints the report under `label` (slow: run it after the measurements).
 */
export function perfAttach(pid: number, label: string): () => () => Promise<void> {
  if (!PERF) return () => async () => undefined;
  const args = ["-e", "cpu-clock", "-F", "997", "-g", "--per-thread", "-p", String(pid)];
  return perfRecord(args, `/tmp/bench-perf-${pid}.data`, (out) => report(out, label));
}

/**
 * `perf record -q --no-buildid ARGS -o out` in the background; the returned function stops it
 * (SIGINT, without waiting) and returns the function that waits for perf to write `out` and then
 * runs `summarize` on it.
 */
function perfRecord(args: string[], out: string, summarize: (out: string) => void): () => () => Promise<void> {
  const rec = spawn("perf", ["record", "-q", "--no-buildid", ...args, "-o", out], { stdio: "ignore" });
  const done = new Promise((r) => {
    rec.once("exit", r);
    // No perf binary (apt-get install linux-perf): say so, and let the benchmark go on.
    rec.once("error", (e) => {
      console.log(`bench: perf could not start: ${e.message}`);
      r(undefined);
    });
  });
  return () => {
    rec.kill("SIGINT");
    return async () => {
      await done;
      summarize(out);
    };
  };
}

function report(out: string, label: string): void {
  const print = (title: string, args: string[]): void => {
    const rep = spawnSync("perf", ["report", "-i", out, "--stdio", "--no-children", ...args, "-g", "none"], { encoding: "utf8", timeout: SYNC_TIMEOUT_MS });
    // Keep the sample count from the header: percentages of two reports compare only through it.
    const lines = (rep.stdout ?? "").split("\n").filter((l) => (l.trim() !== "" && !l.startsWith("#")) || l.startsWith("# Samples"));
    console.log(`perf ${label} (${title}):\n${lines.join("\n")}${rep.stderr ? `\n${rep.stderr.slice(0, 500)}` : ""}`);
  };
  for (const [sort, limit] of [["comm,dso", "0.5"], ["comm,dso,sym", "0.3"]] as const) print(sort, ["--sort", sort, "--percent-limit", limit]);
  // BENCH_PERF_COMM=THREAD: that thread's own symbols down to 0.05 % (where a thread's extra CPU goes).
  const comm = process.env["BENCH_PERF_COMM"];
  if (comm !== undefined && comm !== "") print(`thread ${comm}: dso,sym`, ["--comms", comm, "--sort", "dso,sym", "--percent-limit", "0.05"]);
}

/**
 * BENCH_SCHED=1: record the scheduler's switches and wake-ups and KVM's exits and MSIs system-wide
 * between two points of a benchmark (Linux perf tracepoints), then print how often each thread of
 * `pid` left the CPU blocked (S/D: a vCPU that halted) against preempted (R), and a window of the
 * raw sequence from the middle, so the hand-offs of one request can be read off.
 */
export const SCHED = process.env["BENCH_SCHED"] === "1";

export function schedAttach(pid: number, label: string): () => () => Promise<void> {
  if (!SCHED) return () => async () => undefined;
  const events = ["sched:sched_switch", "sched:sched_wakeup", "kvm:kvm_exit", "kvm:kvm_msi_set_irq"];
  return perfRecord([...events.flatMap((e) => ["-e", e]), "-a"], `/tmp/bench-sched-${pid}.data`, (out) => schedReport(out, label));
}

function schedReport(out: string, label: string): void {
  const s = spawnSync("perf", ["script", "-i", out, "-F", "comm,tid,time,event,trace"], { encoding: "utf8", maxBuffer: 1 << 28, timeout: SYNC_TIMEOUT_MS });
  const lines = (s.stdout ?? "").split("\n").filter((l) => l.trim() !== "");
  const switches = new Map<string, number>();
  for (const l of lines) {
    const m = /prev_comm=(.+?) prev_pid=(\d+) prev_prio=\d+ prev_state=(\S+)/.exec(l);
    if (m === null) continue;
    const key = `${m[1]}/${m[2]} ${m[3]}`;
    switches.set(key, (switches.get(key) ?? 0) + 1);
  }
  const top = [...switches].sort((a, b) => b[1] - a[1]).slice(0, 20);
  console.log(`sched ${label}: ${lines.length} events; switches away by thread and state: ${top.map(([k, v]) => `${k} ${v}`).join(", ")}`);
  const mid = Math.floor(lines.length / 2);
  console.log(lines.slice(mid, mid + 80).join("\n"));
}

/** Poll `cond` every 10 ms until it holds (a timeout error after `ms`). */
export async function until(what: string, cond: () => boolean, ms: number): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** QEMU's QMP socket at `path` once it exists (an error with QEMU's output if it exited first). */
export async function qmpOpen(path: string, p: ConsoleProcess, timeoutMs: number): Promise<QmpClient> {
  await until(`QMP socket ${path}`, () => existsSync(path) || p.child.exitCode !== null, timeoutMs);
  if (p.child.exitCode !== null) throw new Error(`QEMU exited ${p.child.exitCode}:\n${p.output.slice(-2000)}`);
  return QmpClient.open(path, timeoutMs);
}

/**
 * A diagnostic: where the CPU went around a moment, thread by thread. Every `everyMs` it reads
 * the schedstat (the kernel's sched-stats.rst: ns on the CPU, ns waiting on a run queue) of each
 * process's main thread and of the threads a VMM names (`tv-*`), and each process's whole CPU
 * (proc(5) stat, in ticks), so a window tells "this thread ran" from "it was runnable and
 * waited", and the rest of a process (V8's helpers) shows as "other". Not free: in the lab the
 * sampler (25 ms steps, with 7 debugfs counters) took 10-25 ms of every 50 of the one CPU, so it
 * tells where time goes; the figures of a run with it are not comparable with one without.
 */
export class SchedTimeline {
  private readonly rows: { at: number; threads: Map<string, [number, number]>; counters: Map<string, number> }[] = [];
  private readonly timer: NodeJS.Timeout;
  private tracked = new Map<number, { tid: string; comm: string }[]>();
  private n = 0;

  /** `counters`: more figures to sample (e.g. KVM's debugfs counters), reported as per-step differences. */
  constructor(
    private readonly pids: () => number[],
    everyMs = 25,
    private readonly counters: () => Map<string, number> = () => new Map(),
  ) {
    this.timer = setInterval(() => this.sample(), everyMs);
    this.sample();
  }

  private rescan(pid: number): void {
    const keep: { tid: string; comm: string }[] = [];
    for (const tid of readdirSync(`/proc/${pid}/task`)) {
      try {
        const comm = readFileSync(`/proc/${pid}/task/${tid}/comm`, "utf8").trim();
        if (tid === String(pid) || comm.startsWith("tv-")) keep.push({ tid, comm: tid === String(pid) ? "main" : comm });
      } catch {
        // ended meanwhile
      }
    }
    this.tracked.set(pid, keep);
  }

  private sample(): void {
    const threads = new Map<string, [number, number]>();
    const rescan = this.n++ % 10 === 0;
    for (const pid of this.pids()) {
      try {
        if (rescan || !this.tracked.has(pid)) this.rescan(pid);
        const f = parseStatFields(readFileSync(`/proc/${pid}/stat`, "utf8"));
        // proc(5): 14 utime, 15 stime (ticks), as ns so it sums like schedstat
        if (f !== undefined) threads.set(`${pid}/all#`, [((Number(f[14]) + Number(f[15])) / CLK_TCK) * 1e9, 0]);
      } catch {
        continue; // the process has ended
      }
      for (const { tid, comm } of this.tracked.get(pid) ?? []) {
        try {
          const [run, wait] = readFileSync(`/proc/${pid}/task/${tid}/schedstat`, "utf8").split(" ").map(Number);
          threads.set(`${pid}/${comm}#${tid}`, [run ?? 0, wait ?? 0]);
        } catch {
          // ended
        }
      }
    }
    this.rows.push({ at: performance.now(), threads, counters: this.counters() });
  }

  stop(): void {
    clearInterval(this.timer);
    this.sample();
  }

  /**
   * From `from` to `to` (performance.now() ms) in steps of `stepMs`: per step, each thread that
   * ran or waited at least 2 ms, as "name run/wait" in ms, and per process "other" (its CPU
   * beyond the named threads, 10 ms ticks, so approximate).
   */
  report(from: number, to: number, stepMs: number, label: (key: string) => string): string {
    const at = (t: number) => this.rows.reduce((best, r) => (Math.abs(r.at - t) < Math.abs(best.at - t) ? r : best), this.rows[0]!);
    const out: string[] = [];
    for (let t = from; t < to; t += stepMs) {
      const a = at(t);
      const b = at(t + stepMs);
      const sums = new Map<string, [number, number]>();
      const named = new Map<string, number>();
      for (const [k, [run, wait]] of b.threads) {
        const [run0, wait0] = a.threads.get(k) ?? [run, wait];
        const pid = k.slice(0, k.indexOf("/"));
        if (k.endsWith("/all#")) continue;
        named.set(pid, (named.get(pid) ?? 0) + (run - run0) / 1e6);
        const name = label(k);
        const s = sums.get(name) ?? [0, 0];
        sums.set(name, [s[0] + (run - run0) / 1e6, s[1] + (wait - wait0) / 1e6]);
      }
      for (const [k, [all]] of b.threads) {
        if (!k.endsWith("/all#")) continue;
        const pid = k.slice(0, k.indexOf("/"));
        const other = (all - (a.threads.get(k)?.[0] ?? all)) / 1e6 - (named.get(pid) ?? 0);
        if (other >= 10) sums.set(label(`${pid}/other#`), [other, 0]);
      }
      const busy = [...sums].filter(([, [r, w]]) => r >= 2 || w >= 2).map(([n, [r, w]]) => `${n} ${r.toFixed(0)}/${w.toFixed(0)}`);
      const counted = [...b.counters].map(([k, v]) => [k, v - (a.counters.get(k) ?? v)] as const).filter(([, d]) => d !== 0);
      out.push(`  ${(a.at - from).toFixed(0)}..${(b.at - from).toFixed(0)} ms: ${busy.join(", ") || "idle"}${counted.length > 0 ? ` | ${counted.map(([k, d]) => `${k} ${d}`).join(" ")}` : ""}`);
    }
    return out.join("\n");
  }
}
