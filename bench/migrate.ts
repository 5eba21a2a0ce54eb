/**
 * bench/migrate: live migration of a running guest, typevisor VMM to typevisor VMM against QEMU to
 * QEMU (`-M microvm -accel kvm`, same kernel, initramfs and command line, `-incoming tcp:`), inside
 * one lab run, over loopback TCP, alternating, BENCH_RUNS runs each (issue 17, "Benchmark").
 *
 * Cases: an idle 256 MiB and 1 GiB guest, and a 256 MiB guest dirtying memory steadily (a 64 MiB
 * tmpfs file rewritten in a loop). Every guest prints `tick=N` on its serial console every
 * TICK_S; the host stamps each tick when it arrives from the source or the destination VMM.
 *
 * Figures, per case and VMM:
 *  - guest-visible gap: the longest time between two consecutive ticks arriving, from the
 *    migration's start until the destination has printed 20 more (the guest's output stops at the
 *    pause and resumes at the destination: what its peer outside sees; the usual tick interval is
 *    printed beside it, since a tick is the resolution);
 *  - the VMM's own downtime (ours: the source's "downtime N ms", paused to the destination's
 *    RUNNING; QEMU: query-migrate's `downtime`);
 *  - total time: the migrate request to the source done (ours: the source VMM prints "migrated
 *    to", before it exits; QEMU: query-migrate `completed`), and bytes sent.
 * Both with the same downtime limit (BENCH_DOWNTIME_MS, 300 by default: QEMU's default) and no
 * bandwidth limit (QEMU's default 128 MiB/s lifted; ours has none by default).
 *
 * Run: npm run bench:migrate     (boots the lab itself when the host KVM is PVM)
 *      BENCH_RUNS=1 BENCH_CASES=idle-256,idle-1024,dirty-256 BENCH_DOWNTIME_MS=300
 */
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { runScriptArg } from "../src/images/guest-init.js";
import { imagePaths } from "../src/images/image.js";
import { kvmHostKind } from "../src/kvm/kvm.js";
import { QmpClient } from "../src/lab/qmp.js";
import { ConsoleProcess } from "../test/helpers/console-process.js";
import { microvm } from "../test/helpers/qemu-microvm.js";
import { unixApi } from "../test/helpers/unix-api.js";
import { compare, median } from "./lib.js";

const RUNS = Number(process.env["BENCH_RUNS"] ?? 1);
const CASES = (process.env["BENCH_CASES"] ?? "idle-256,idle-1024,dirty-256").split(",").map((c) => c.trim());
const DOWNTIME_MS = Number(process.env["BENCH_DOWNTIME_MS"] ?? 300);
const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
const QEMU = "qemu-system-x86_64";
/** The guest's tick interval (s): busybox sleep takes fractions. */
const TICK_S = 0.02;
/** Ticks the destination must print before the gap is measured. */
const AFTER_TICKS = 20;
/** Limits for a lab under load (boots there took 12-40 s; a migration of 1 GiB under emulation takes minutes). */
const BOOT_MS = 600_000;
const STEP_MS = 600_000;
const READY = "migbench-ready";

interface Case {
  name: string;
  memoryMiB: number;
  dirtyMiB: number;
}

function parseCase(c: string): Case {
  const m = /^(idle|dirty)-(\d+)$/.exec(c);
  if (m === null) throw new Error(`BENCH_CASES: unknown case ${c} (idle-MIB or dirty-MIB)`);
  return { name: c, memoryMiB: Number(m[2]), dirtyMiB: m[1] === "dirty" ? 64 : 0 };
}

/** The guest: ticks in the background, for a dirtying case a tmpfs file rewritten in 4 MiB pieces for ever, then READY. */
function guestScript(c: Case): string {
  const lines = [`(i=0; while true; do i=$((i+1)); echo "tick=$i"; sleep ${TICK_S}; done) &`];
  if (c.dirtyMiB > 0) {
    lines.push(
      "mount -o remount,size=90% /tmp",
      "dd if=/dev/urandom of=/tmp/chunk bs=1048576 count=4 2>/dev/null",
      `(while true; do j=0; while [ $j -lt ${c.dirtyMiB / 4} ]; do dd if=/tmp/chunk of=/tmp/dirty bs=1048576 seek=$((j*4)) conv=notrunc 2>/dev/null; j=$((j+1)); done; done) &`,
    );
  }
  lines.push(`echo ${READY}`, "while read l; do echo \"ans-$l\"; done");
  return lines.join("\n");
}

/** When each tick number first arrived on the host (ms, performance.now()), from any of the processes given. */
class Ticks {
  readonly at = new Map<number, number>();
  private partial = new Map<ConsoleProcess, string>();

  follow(p: ConsoleProcess): void {
    p.child.stdout.on("data", (d: Buffer) => {
      const now = performance.now();
      const text = (this.partial.get(p) ?? "") + d.toString("latin1");
      const lines = text.split("\n");
      this.partial.set(p, lines.pop() ?? "");
      for (const l of lines) {
        const m = /tick=(\d+)/.exec(l);
        if (m !== null && !this.at.has(Number(m[1]))) this.at.set(Number(m[1]), now);
      }
    });
  }

  last(): number {
    return Math.max(0, ...this.at.keys());
  }

  /** The longest gap between consecutive tick arrivals at or after `from` (ms), and the median gap before it. */
  gaps(from: number): { maxGapMs: number; usualGapMs: number } {
    const times = [...this.at.entries()].sort((a, b) => a[0] - b[0]).map((e) => e[1]);
    let maxGapMs = 0;
    const before: number[] = [];
    for (let i = 1; i < times.length; i++) {
      const g = times[i]! - times[i - 1]!;
      if (times[i]! >= from) maxGapMs = Math.max(maxGapMs, g);
      else before.push(g);
    }
    return { maxGapMs, usualGapMs: before.length > 0 ? median(before.slice(-200)) : NaN };
  }
}

interface Sample {
  maxGapMs: number;
  usualGapMs: number;
  /** The VMM's own downtime figure. */
  downtimeMs: number;
  totalMs: number;
  bytes: number;
  rounds?: number;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const a = s.address();
      s.close(() => (typeof a === "object" && a !== null ? resolve(a.port) : reject(new Error("no port"))));
    });
  });
}

async function until(what: string, cond: () => boolean, ms = STEP_MS): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Wait for the destination to print AFTER_TICKS ticks past the highest seen when the migration began. */
async function afterMove(ticks: Ticks, from: number): Promise<void> {
  await until(`${AFTER_TICKS} ticks after the move`, () => ticks.last() >= from + AFTER_TICKS);
}

async function ours(c: Case, cmdline: string, work: string): Promise<Sample> {
  const apiA = join(work, "a.sock");
  const apiB = join(work, "b.sock");
  const port = await freePort();
  const a = new ConsoleProcess(process.execPath, [BIN, "run", "--no-lab", "--no-reboot", "--image", "minimal", "--memory", String(c.memoryMiB), "--cmdline", cmdline, "--api-socket", apiA]);
  const b = new ConsoleProcess(process.execPath, [BIN, "run", "--no-lab", "--no-reboot", "--incoming", `tcp:127.0.0.1:${port}`, "--plain-tcp", "--api-socket", apiB]);
  const ticks = new Ticks();
  ticks.follow(a);
  ticks.follow(b);
  try {
    await a.waitFor(new RegExp(READY), 0, BOOT_MS);
    await b.waitFor(/waiting for a migration/, 0, BOOT_MS);
    await until("the guest ticking", () => ticks.last() >= 50);
    const t = performance.now();
    const startTick = ticks.last();
    const r = await unixApi(apiA, "POST", "/migrate", { to: `tcp:127.0.0.1:${port}`, plainTcp: true, maxDowntimeMs: DOWNTIME_MS });
    if (r.status !== 202) throw new Error(`POST /migrate answered ${r.status}: ${JSON.stringify(r.body)}`);
    // Done when the source says so (as QEMU's query-migrate "completed"), not when its process has exited.
    await a.waitFor(/migrated to /, 0, STEP_MS);
    const totalMs = performance.now() - t;
    const code = await a.exited;
    if (code !== 0) throw new Error(`the source VMM ended ${String(code)}:\n${a.output.slice(-2000)}`);
    const moved = /migrated to .* \(downtime (\d+) ms, (\d+) bytes in (\d+) rounds\)/.exec(a.output);
    if (moved === null) throw new Error(`no migration summary from the source:\n${a.output.slice(-2000)}`);
    await afterMove(ticks, startTick);
    // Where the pause went (cli/run.ts prints the source's and the destination's steps).
    console.log(`[${c.name}] typevisor ${/migration switch-over.*/.exec(a.output)?.[0] ?? "(no switch-over line)"}`);
    return { ...ticks.gaps(t), downtimeMs: Number(moved[1]), totalMs, bytes: Number(moved[2]), rounds: Number(moved[3]) };
  } finally {
    a.kill();
    b.kill();
    await Promise.all([a.exited, b.exited]);
  }
}

async function qmpOpen(path: string, p: ConsoleProcess): Promise<QmpClient> {
  await until(`QMP socket ${path}`, () => existsSync(path) || p.child.exitCode !== null);
  if (p.child.exitCode !== null) throw new Error(`QEMU exited ${p.child.exitCode}:\n${p.output.slice(-2000)}`);
  return QmpClient.open(path, STEP_MS);
}

async function qemu(c: Case, cmdline: string, work: string): Promise<Sample> {
  const img = imagePaths("minimal");
  const port = await freePort();
  const args = (qmp: string, extra: string[]): string[] => {
    const a = microvm(img.kernel, img.initrd, cmdline, ["-qmp", `unix:${qmp},server=on,wait=off`, ...extra]);
    a[a.indexOf("-m") + 1] = String(c.memoryMiB);
    return a;
  };
  const srcQmp = join(work, "src.qmp");
  const a = new ConsoleProcess(QEMU, args(srcQmp, []));
  const b = new ConsoleProcess(QEMU, args(join(work, "dst.qmp"), ["-incoming", `tcp:127.0.0.1:${port}`]));
  const ticks = new Ticks();
  ticks.follow(a);
  ticks.follow(b);
  try {
    await a.waitFor(new RegExp(READY), 0, BOOT_MS);
    await until("the guest ticking", () => ticks.last() >= 50);
    const m = await qmpOpen(srcQmp, a);
    try {
      await m.execute("migrate-set-parameters", { "downtime-limit": DOWNTIME_MS, "max-bandwidth": 2 ** 40 }, STEP_MS);
      const t = performance.now();
      const startTick = ticks.last();
      await m.execute("migrate", { uri: `tcp:127.0.0.1:${port}` }, STEP_MS);
      let s: { status?: string; "error-desc"?: string; downtime?: number; ram?: { transferred?: number } };
      for (const end = Date.now() + STEP_MS; ; ) {
        s = (await m.execute("query-migrate", undefined, STEP_MS)) as typeof s;
        if (s.status === "completed") break;
        if (Date.now() > end) throw new Error(`QEMU migration still ${s.status ?? "?"} after ${STEP_MS} ms`);
        if (s.status === "failed" || s.status === "cancelled") throw new Error(`QEMU migration ${s.status}: ${s["error-desc"] ?? ""}`);
        await new Promise((r) => setTimeout(r, 10));
      }
      const totalMs = performance.now() - t;
      await afterMove(ticks, startTick);
      return { ...ticks.gaps(t), downtimeMs: s.downtime ?? NaN, totalMs, bytes: s.ram?.transferred ?? NaN };
    } finally {
      m.close();
    }
  } finally {
    a.kill();
    b.kill();
    await Promise.all([a.exited, b.exited]);
  }
}

async function runCase(c: Case): Promise<{ case: string; typevisor: Sample[]; qemu: Sample[] }> {
  const cmdline = `console=ttyS0 panic=-1 ${runScriptArg(guestScript(c))}`;
  const results = { case: c.name, typevisor: [] as Sample[], qemu: [] as Sample[] };
  const fmt = (s: Sample): string =>
    `guest-visible gap ${s.maxGapMs.toFixed(0)} ms (ticks every ${s.usualGapMs.toFixed(0)} ms), VMM downtime ${s.downtimeMs.toFixed(0)} ms, total ${s.totalMs.toFixed(0)} ms, ${(s.bytes / 2 ** 20).toFixed(1)} MiB sent${s.rounds !== undefined ? ` in ${s.rounds} rounds` : ""}`;
  for (let i = 0; i < RUNS; i++) {
    for (const who of ["qemu", "typevisor"] as const) {
      const work = mkdtempSync(join(tmpdir(), `bench-mig-${who}-`));
      try {
        const s = await (who === "typevisor" ? ours : qemu)(c, cmdline, work);
        results[who].push(s);
        console.log(`[${c.name}] run ${i + 1} ${who}: ${fmt(s)}`);
      } finally {
        rmSync(work, { recursive: true, force: true });
      }
    }
  }
  const series = (f: (s: Sample) => number) => [results.typevisor.map(f), results.qemu.map(f)] as const;
  console.log(compare(`[${c.name}] guest-visible gap, median (ms)`, ...series((s) => s.maxGapMs), 0));
  console.log(compare(`[${c.name}] the VMM's own downtime, median (ms)`, ...series((s) => s.downtimeMs), 0));
  console.log(compare(`[${c.name}] total migration time, median (ms)`, ...series((s) => s.totalMs), 0));
  console.log(compare(`[${c.name}] bytes sent, median (MiB)`, ...series((s) => s.bytes / 2 ** 20)));
  const gap = median(results.typevisor.map((s) => s.maxGapMs)) / median(results.qemu.map((s) => s.maxGapMs));
  const total = median(results.typevisor.map((s) => s.totalMs)) / median(results.qemu.map((s) => s.totalMs));
  console.log(`[${c.name}] goals: gap at most half QEMU's: ${gap.toFixed(2)}x, ${gap <= 0.5 ? "met" : "not met"}; total no longer than QEMU's: ${total.toFixed(2)}x, ${total <= 1 ? "met" : "not met"}`);
  return results;
}

async function main(): Promise<void> {
  const cases = CASES.map(parseCase);
  // The lab boots with its loopback down: a connect to 127.0.0.1 is "Network is unreachable" there.
  execFileSync("ip", ["link", "set", "lo", "up"], { stdio: "pipe", timeout: 10_000 });
  console.log(`bench/migrate: ${RUNS} run(s) each, alternating (QEMU first); cases ${CASES.join(", ")}; downtime limit ${DOWNTIME_MS} ms, no bandwidth limit; loopback TCP; 1 vCPU; kernel ${imagePaths("minimal").kernel}`);
  const all = [];
  for (const c of cases) all.push(await runCase(c));
  console.log(JSON.stringify({ bench: "migrate", date: new Date().toISOString(), where: kvmHostKind() === "hardware" ? "lab (nested KVM under TCG)" : "unknown", runs: RUNS, downtimeLimitMs: DOWNTIME_MS, results: all }));
}

await main();
