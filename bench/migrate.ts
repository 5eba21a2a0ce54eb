/**
 * bench/migrate: live migration of a running guest, typevisor VMM to typevisor VMM against QEMU to
 * QEMU (`-M q35 -accel kvm`, virtio-net-pci on a TAP, same kernel, initramfs and command line,
 * `-incoming tcp:`), inside one lab run, over loopback TCP, alternating, BENCH_RUNS runs each
 * (issue 17, "Benchmark").
 *
 * Cases: an idle 256 MiB and 1 GiB guest, and a 256 MiB guest dirtying memory steadily (a 64 MiB
 * tmpfs file rewritten in a loop). Every guest keeps one TCP connection to a peer outside it (this
 * process, on a bridge that holds the source's and the destination's TAPs) and sends `n=N` on it
 * every TICK_S; the peer stamps each line as it arrives.
 *
 * Figures, per case and VMM:
 *  - the gap the guest's peer sees: the longest time between two consecutive lines arriving, from
 *    the migration's start until 20 more have come from the destination (the guest stops sending at
 *    the pause and goes on at the destination, whose TAP the bridge learns from the guest's
 *    announcement or its next frame; the usual interval is printed beside it, as a line is the
 *    resolution). Not the serial console: our VMM's console output goes through its event loop,
 *    which is busy during a migration, so console timestamps there come late and hide the pause;
 *  - the VMM's own downtime (ours: the source's "downtime N ms", paused to the destination's
 *    RUNNING; QEMU: query-migrate's `downtime`);
 *  - total time: the migrate request to the source done (ours: the source VMM prints "migrated
 *    to", before it exits; QEMU: query-migrate `completed`), and bytes sent.
 * Both with the same downtime limit (BENCH_DOWNTIME_MS, 300 by default: QEMU's default) and no
 * bandwidth limit (QEMU's default 128 MiB/s lifted; ours has none by default).
 *
 * Run: npm run bench:migrate     (boots the lab itself when the host KVM is PVM)
 *      BENCH_RUNS=1 BENCH_CASES=idle-256,idle-1024,dirty-256 BENCH_DOWNTIME_MS=300
 * Diagnostics: BENCH_TICKS=1 (every line's arrival and guest clock), BENCH_TIMELINE=1 (per thread,
 * time on the CPU and waiting for it, 50 ms steps across the gap; costs the lab CPU), BENCH_ONLY=
 * typevisor|qemu (one VMM's runs), BENCH_TV_ARGS / BENCH_DST_ARGS / BENCH_DST_PREFIX (below).
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { setPriority, tmpdir } from "node:os";
import { join } from "node:path";
import { runScriptArg } from "../src/images/guest-init.js";
import { imagePaths } from "../src/images/image.js";
import { kvmHostKind } from "../src/kvm/kvm.js";
import type { QmpClient } from "../src/lab/qmp.js";
import { ConsoleProcess } from "../test/helpers/console-process.js";
import { unixApi } from "../test/helpers/unix-api.js";
import { compare, cpuDelta, formatCpu, median, nodePerfArgs, perfAttach, qmpOpen as qmpOpenLib, kvmCounters, mountDebugfs, SchedTimeline, threadTicks, until as untilLib } from "./lib.js";

const RUNS = Number(process.env["BENCH_RUNS"] ?? 1);
const CASES = (process.env["BENCH_CASES"] ?? "idle-256,idle-1024,dirty-256").split(",").map((c) => c.trim());
const DOWNTIME_MS = Number(process.env["BENCH_DOWNTIME_MS"] ?? 300);
/** BENCH_ONLY=typevisor|qemu (a diagnostic: one VMM's runs, e.g. to compare builds; no ratio is printed). */
const ONLY = ((o) => (o === "typevisor" || o === "qemu" ? o : undefined))(process.env["BENCH_ONLY"]);
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
/**
 * The peer stands for another machine, but here it shares the lab's one CPU with the VMMs it
 * measures. At the same nice value, the migration's busy threads (both VMMs' main threads) kept it
 * from reading lines for hundreds of milliseconds: lines the guest sent before its pause were
 * stamped during it, which split one gap into two smaller ones (a 400 ms "gap" beside a 900 ms
 * pause) and moved gaps to where the peer, not the guest, was starved. So this process (the peer)
 * runs PEER_NICE steps ahead of everything it starts: a line's wake-up preempts a VMM at once,
 * and the peer's own work per line is a few microseconds.
 */
const PEER_NICE = 10;

/** A VMM's or QEMU's command line, run PEER_NICE steps nicer than this process (back at the nice it would have had). */
function behindPeer(cmd: string, args: string[]): [string, string[]] {
  return ["nice", ["-n", String(PEER_NICE), cmd, ...args]];
}

/** The guest's segment: the peer's address on the bridge, the guest's, its MAC, the TAPs of the source and the destination. */
const BRIDGE = "tvmigbr0";
const PEER = "10.79.0.1";
const GUEST = "10.79.0.2";
const MAC = "02:00:00:00:79:02";
const TAP_SRC = "tvmigs0";
const TAP_DST = "tvmigd0";
const PEER_PORT = 7300;

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

/** The guest: its address, lines to the peer in the background, for a dirtying case a tmpfs file rewritten in 4 MiB pieces for ever, then READY. */
function guestScript(c: Case): string {
  const lines = [
    `ip addr add ${GUEST}/24 dev eth0`, "ip link set eth0 up",
    // Each line carries the guest's own uptime (read by the shell, no fork): across the peer's
    // longest gap it says whether the guest made no lines (its clock ran on by the gap) or made
    // them and they came late (its clock moved by a tick or two).
    `(i=0; while true; do i=$((i+1)); read up rest < /proc/uptime; echo "n=$i t=$up"; sleep ${TICK_S}; done | nc ${PEER} ${PEER_PORT}; echo "nc-ended") &`,
  ];
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

/** The peer: when each line the guest sent arrived (ms, performance.now()), on its one connection. */
class Ticks {
  readonly at = new Map<number, number>();
  /** The guest's uptime (s) in each line. */
  readonly guestAt = new Map<number, number>();
  connections = 0;
  private readonly server: Server;
  private readonly sockets: Socket[] = [];

  constructor() {
    this.server = createServer((sock) => {
      this.connections++;
      this.sockets.push(sock);
      let partial = "";
      sock.on("error", () => undefined);
      sock.on("data", (d: Buffer) => {
        const now = performance.now();
        const lines = (partial + d.toString("latin1")).split("\n");
        partial = lines.pop() ?? "";
        for (const l of lines) {
          const m = /^n=(\d+)(?: t=(\d+\.\d+))?$/.exec(l);
          if (m !== null && !this.at.has(Number(m[1]))) {
            this.at.set(Number(m[1]), now);
            if (m[2] !== undefined) this.guestAt.set(Number(m[1]), Number(m[2]));
          }
        }
      });
    });
  }

  listen(): Promise<void> {
    return new Promise((r) => this.server.listen(PEER_PORT, PEER, r));
  }

  /** The server and the guest's connection: its VM is killed without a FIN, and an open socket would keep this process alive. */
  close(): void {
    this.server.close();
    for (const s of this.sockets) s.destroy();
  }

  last(): number {
    return Math.max(0, ...this.at.keys());
  }

  /** BENCH_TICKS=1, a diagnostic: every line from `from` on, as arrival (ms after `from`)/n/guest clock (s). */
  dump(from: number): string {
    const rows = [...this.at.entries()].filter(([, at]) => at >= from).sort((a, b) => a[0] - b[0]);
    return `ticks from the migrate request (arrival ms n guest-s): ${rows.map(([n, at]) => `${(at - from).toFixed(0)} ${n} ${this.guestAt.get(n) ?? "?"}`).join(", ")}`;
  }

  /** The longest gap between consecutive tick arrivals at or after `from` (ms), and the median gap before it. */
  gaps(from: number): { maxGapMs: number; usualGapMs: number; gapFromMs: number; guestGapMs: number } {
    const entries = [...this.at.entries()].sort((a, b) => a[0] - b[0]);
    const times = entries.map((e) => e[1]);
    let maxGapMs = 0;
    let gapFromMs = NaN;
    let guestGapMs = NaN;
    const before: number[] = [];
    for (let i = 1; i < times.length; i++) {
      const g = times[i]! - times[i - 1]!;
      if (times[i]! >= from) {
        if (g > maxGapMs) {
          maxGapMs = g;
          gapFromMs = times[i - 1]! - from;
          const a = this.guestAt.get(entries[i - 1]![0]);
          const b = this.guestAt.get(entries[i]![0]);
          guestGapMs = a !== undefined && b !== undefined ? (b - a) * 1000 : NaN;
        }
      } else before.push(g);
    }
    return { maxGapMs, usualGapMs: before.length > 0 ? median(before.slice(-200)) : NaN, gapFromMs, guestGapMs };
  }
}

interface Sample {
  maxGapMs: number;
  usualGapMs: number;
  /** Where that gap began, ms after the migrate request (the pause ends about when the source says it is done: totalMs). */
  gapFromMs: number;
  /** How far the guest's own clock moved between the gap's two lines (ms; 10 ms resolution). */
  guestGapMs: number;
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

const until = (what: string, cond: () => boolean, ms = STEP_MS): Promise<void> => untilLib(what, cond, ms);

/**
 * Wait for AFTER_TICKS more lines than the peer had when the source said it was done: those come
 * from the destination, so the gap across the switch-over is among the measured ones. (Until
 * 2026-12-06 this counted from the migrate request: a migration longer than AFTER_TICKS lines was
 * measured without its switch-over, whose lines had not arrived yet; see docs/benchmarks.md.)
 */
async function afterMove(ticks: Ticks): Promise<void> {
  const from = ticks.last();
  await until(`${AFTER_TICKS} ticks after the move`, () => ticks.last() >= from + AFTER_TICKS);
}

/** BENCH_TIMELINE's KVM counters of the destination's VM (debugfs): what its vCPU does once it runs. */
const TIMELINE_KVM_KEYS = ["exits", "io_exits", "mmio_exits", "halt_exits", "pf_fixed", "pf_taken", "irq_injections"];

async function ours(c: Case, cmdline: string, work: string): Promise<Sample> {
  const apiA = join(work, "a.sock");
  const apiB = join(work, "b.sock");
  const port = await freePort();
  const ticks = new Ticks();
  await ticks.listen();
  const a = new ConsoleProcess(...behindPeer(process.execPath, [...nodePerfArgs(), BIN, "run", "--no-lab", "--no-reboot", "--image", "minimal", "--memory", String(c.memoryMiB), "--net", `tap=${TAP_SRC},mac=${MAC}`, "--cmdline", cmdline, "--api-socket", apiA,
    // BENCH_TV_ARGS: more `typevisor run` options for the source (a diagnostic: e.g. --vcpu-nice 0)
    ...(process.env["BENCH_TV_ARGS"]?.split(" ").filter((x) => x !== "") ?? [])]));
  // BENCH_DST_PREFIX: a command the destination runs under (a diagnostic: e.g. strace --seccomp-bpf -f -T -e trace=ioctl -o FILE)
  const prefix = process.env["BENCH_DST_PREFIX"]?.split(" ").filter((x) => x !== "") ?? [];
  // BENCH_DST_ARGS: more `typevisor run` options for the destination (a diagnostic: e.g. --vcpu-nice 0)
  const dstArgs = [...nodePerfArgs(), BIN, "run", "--no-lab", "--no-reboot", "--incoming", `tcp:127.0.0.1:${port}`, "--plain-tcp", "--net", `tap=${TAP_DST}`, "--api-socket", apiB,
    ...(process.env["BENCH_DST_ARGS"]?.split(" ").filter((x) => x !== "") ?? [])];
  const b = new ConsoleProcess(...(prefix.length > 0 ? behindPeer(prefix[0]!, [...prefix.slice(1), process.execPath, ...dstArgs]) : behindPeer(process.execPath, dstArgs)));
  try {
    await a.waitFor(new RegExp(READY), 0, BOOT_MS);
    await b.waitFor(/waiting for a migration/, 0, BOOT_MS);
    await until("the guest ticking", () => ticks.last() >= 50);
    // Where each side's CPU went during the migration, by thread (the source's last sample is
    // taken shortly before it exits), and under BENCH_PERF where in the code.
    const pidA = a.child.pid!;
    const pidB = b.child.pid!;
    const cpuA0 = threadTicks(pidA);
    const cpuB0 = threadTicks(pidB);
    let cpuA1 = cpuA0;
    const sampler = setInterval(() => {
      try {
        cpuA1 = threadTicks(pidA);
      } catch {
        // the source has exited: its last sample stands
      }
    }, 100);
    const stopPerfA = perfAttach(pidA, "typevisor migration source");
    const stopPerfB = perfAttach(pidB, "typevisor migration destination");
    // BENCH_TIMELINE=1 (a diagnostic): which thread ran, and which waited for the CPU, across the gap.
    let timeline: SchedTimeline | undefined;
    if (process.env["BENCH_TIMELINE"] === "1") {
      mountDebugfs(); // KVM's counters where debugfs is there; without it they are left out
      timeline = new SchedTimeline(() => [pidA, pidB, process.pid], 25, () => kvmCounters(pidB, TIMELINE_KVM_KEYS));
    }
    const t = performance.now();
    const r = await unixApi(apiA, "POST", "/migrate", { to: `tcp:127.0.0.1:${port}`, plainTcp: true, maxDowntimeMs: DOWNTIME_MS });
    if (r.status !== 202) throw new Error(`POST /migrate answered ${r.status}: ${JSON.stringify(r.body)}`);
    // Done when the source says so (as QEMU's query-migrate "completed"), not when its process has exited.
    await a.waitFor(/migrated to /, 0, STEP_MS);
    const totalMs = performance.now() - t;
    clearInterval(sampler);
    const cpuB1 = threadTicks(pidB);
    const reportA = stopPerfA();
    const reportB = stopPerfB();
    console.log(`[${c.name}] typevisor CPU (s) during the migration: source ${formatCpu(cpuDelta(cpuA0, cpuA1))}; destination ${formatCpu(cpuDelta(cpuB0, cpuB1))}`);
    const code = await a.exited;
    if (code !== 0) throw new Error(`the source VMM ended ${String(code)}:\n${a.output.slice(-2000)}`);
    const moved = /migrated to .* \(downtime (\d+) ms, (\d+) bytes in (\d+) rounds\)/.exec(a.output);
    if (moved === null) throw new Error(`no migration summary from the source:\n${a.output.slice(-2000)}`);
    await afterMove(ticks);
    if (ticks.connections !== 1) throw new Error(`the guest's peer saw ${ticks.connections} connections: the TCP connection did not survive the move`);
    if (timeline !== undefined) {
      timeline.stop();
      const g = ticks.gaps(t);
      const side = (k: string): string => (k.startsWith(`${pidA}/`) ? "src " : k.startsWith(`${pidB}/`) ? "dst " : "peer ") + k.slice(k.indexOf("/") + 1, k.lastIndexOf("#"));
      console.log(`[${c.name}] typevisor threads across the gap (run/waiting ms; from 100 ms before the gap's first line, at ${(performance.timeOrigin + t + g.gapFromMs - 100).toFixed(0)} epoch ms; ${g.maxGapMs.toFixed(0)} ms gap):\n${timeline.report(t + g.gapFromMs - 100, t + g.gapFromMs + g.maxGapMs + 100, 50, side)}`);
    }
    // Where the pause went (cli/run.ts prints the source's and the destination's steps).
    console.log(`[${c.name}] typevisor ${/migration switch-over.*/.exec(a.output)?.[0] ?? "(no switch-over line)"}`);
    // TYPEVISOR_TRACE_PHASES=1: the destination's marks and its device thread's restore steps.
    for (const l of b.output.split("\n").filter((x) => /typevisor: (phases|device thread restore|device thread: |vCPU \d+ first KVM_RUN)/.test(x))) console.log(`[${c.name}] destination ${l.trim()}`);
    for (const l of a.output.split("\n").filter((x) => x.includes("typevisor: source phases"))) console.log(`[${c.name}] ${l.trim()} (migrate request at ${(performance.timeOrigin + t).toFixed(1)} epoch ms)`);
    if (nodePerfArgs().includes("--trace-gc")) {
      for (const [side, out] of [["source", a.output], ["destination", b.output]] as const) {
        const lines = out.split("\n").filter((l) => /: (Mark-Compact|Scavenge|Mark-Sweep)/.test(l));
        console.log(`[${c.name}] ${side} GCs: ${lines.length}; full: ${lines.filter((l) => !l.includes("Scavenge")).map((l) => l.replace(/^.*?\] */, "").replace(/\(average mu.*?\)/, "").slice(0, 220)).join(" | ")}`);
      }
    }
    await reportA();
    await reportB();
    if (process.env["BENCH_TICKS"] === "1") {
      console.log(`[${c.name}] typevisor ${ticks.dump(t)}`);
      // What the guest's kernel said on the destination's console (a clock or watchdog complaint after the move).
      console.log(`[${c.name}] typevisor destination console, last lines:\n${b.output.split("\n").filter((l) => !/^n=\d|tick \d/.test(l)).slice(-25).join("\n")}`);
    }
    return { ...ticks.gaps(t), downtimeMs: Number(moved[1]), totalMs, bytes: Number(moved[2]), rounds: Number(moved[3]) };
  } finally {
    ticks.close();
    a.kill();
    b.kill();
    await Promise.all([a.exited, b.exited]);
  }
}

const qmpOpen = (path: string, p: ConsoleProcess): Promise<QmpClient> => qmpOpenLib(path, p, STEP_MS);

async function qemu(c: Case, cmdline: string, work: string): Promise<Sample> {
  const img = imagePaths("minimal");
  const port = await freePort();
  // q35 with virtio-net-pci, as bench/net: a PCI NIC as ours has (microvm would need virtio-mmio).
  const args = (qmp: string, tap: string, extra: string[]): string[] => [
    "-M", "q35", "-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", String(c.memoryMiB),
    "-nographic", "-nodefaults", "-no-user-config", "-serial", "stdio", "-no-reboot",
    "-kernel", img.kernel, "-initrd", img.initrd, "-append", cmdline,
    "-netdev", `tap,id=n0,ifname=${tap},script=no,downscript=no,vhost=off`, "-device", `virtio-net-pci,netdev=n0,mac=${MAC}`,
    "-qmp", `unix:${qmp},server=on,wait=off`, ...extra,
  ];
  const srcQmp = join(work, "src.qmp");
  const ticks = new Ticks();
  await ticks.listen();
  const a = new ConsoleProcess(...behindPeer(QEMU, args(srcQmp, TAP_SRC, [])));
  const b = new ConsoleProcess(...behindPeer(QEMU, args(join(work, "dst.qmp"), TAP_DST, ["-incoming", `tcp:127.0.0.1:${port}`])));
  try {
    await a.waitFor(new RegExp(READY), 0, BOOT_MS);
    await until("the guest ticking", () => ticks.last() >= 50);
    const m = await qmpOpen(srcQmp, a);
    try {
      await m.execute("migrate-set-parameters", { "downtime-limit": DOWNTIME_MS, "max-bandwidth": 2 ** 40 }, STEP_MS);
      const cpuA0 = threadTicks(a.child.pid!);
      const cpuB0 = threadTicks(b.child.pid!);
      const t = performance.now();
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
      console.log(`[${c.name}] QEMU CPU (s) during the migration: source ${formatCpu(cpuDelta(cpuA0, threadTicks(a.child.pid!)))}; destination ${formatCpu(cpuDelta(cpuB0, threadTicks(b.child.pid!)))}`);
      await afterMove(ticks);
      if (ticks.connections !== 1) throw new Error(`the guest's peer saw ${ticks.connections} connections: the TCP connection did not survive the move`);
      return { ...ticks.gaps(t), downtimeMs: s.downtime ?? NaN, totalMs, bytes: s.ram?.transferred ?? NaN };
    } finally {
      m.close();
    }
  } finally {
    ticks.close();
    a.kill();
    b.kill();
    await Promise.all([a.exited, b.exited]);
  }
}

async function runCase(c: Case): Promise<{ case: string; typevisor: Sample[]; qemu: Sample[] }> {
  const cmdline = `console=ttyS0 panic=-1 ${runScriptArg(guestScript(c))}`;
  const results = { case: c.name, typevisor: [] as Sample[], qemu: [] as Sample[] };
  const fmt = (s: Sample): string =>
    `gap the peer saw ${s.maxGapMs.toFixed(0)} ms from ${s.gapFromMs.toFixed(0)} ms after the migrate request (the guest's clock moved ${s.guestGapMs.toFixed(0)} ms between those lines; lines every ${s.usualGapMs.toFixed(0)} ms), VMM downtime ${s.downtimeMs.toFixed(0)} ms, total ${s.totalMs.toFixed(0)} ms, ${(s.bytes / 2 ** 20).toFixed(1)} MiB sent${s.rounds !== undefined ? ` in ${s.rounds} rounds` : ""}`;
  for (let i = 0; i < RUNS; i++) {
    for (const who of ["qemu", "typevisor"] as const) {
      if (ONLY !== undefined && who !== ONLY) continue;
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
  if (ONLY !== undefined) {
    const r = results[ONLY];
    console.log(`[${c.name}] ${ONLY} only (BENCH_ONLY), medians: gap ${median(r.map((s) => s.maxGapMs)).toFixed(0)} ms, downtime ${median(r.map((s) => s.downtimeMs)).toFixed(0)} ms, total ${median(r.map((s) => s.totalMs)).toFixed(0)} ms`);
    return results;
  }
  const series = (f: (s: Sample) => number) => [results.typevisor.map(f), results.qemu.map(f)] as const;
  console.log(compare(`[${c.name}] the longest gap the guest's peer saw, median (ms)`, ...series((s) => s.maxGapMs), 0));
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
  const ip = (...a: string[]): void => void execFileSync("ip", a, { stdio: "pipe", timeout: 10_000 });
  ip("link", "set", "lo", "up");
  // The guest's segment: the peer's address on a bridge that holds both TAPs. An earlier run in
  // the same lab (a series of builds or settings in one boot) left its own: gone first.
  for (const dev of [TAP_SRC, TAP_DST, BRIDGE]) {
    try {
      ip("link", "del", dev);
    } catch {
      // not there
    }
  }
  ip("link", "add", BRIDGE, "type", "bridge");
  ip("addr", "add", `${PEER}/24`, "dev", BRIDGE);
  for (const t of [TAP_SRC, TAP_DST]) {
    ip("tuntap", "add", "dev", t, "mode", "tap");
    ip("link", "set", t, "master", BRIDGE);
    ip("link", "set", t, "up");
  }
  ip("link", "set", BRIDGE, "up");
  // The peer first (PEER_NICE above): the lab runs this as root, which may lower its nice value.
  setPriority(-PEER_NICE);
  console.log(`bench/migrate: the peer at nice -${PEER_NICE}, the VMMs at 0; ${RUNS} run(s) each, alternating (QEMU first); cases ${CASES.join(", ")}; downtime limit ${DOWNTIME_MS} ms, no bandwidth limit; the stream over loopback TCP; 1 vCPU, virtio-net on a TAP, a line to the peer every ${TICK_S * 1000} ms; kernel ${imagePaths("minimal").kernel}`);
  const all = [];
  for (const c of cases) all.push(await runCase(c));
  console.log(JSON.stringify({ bench: "migrate", date: new Date().toISOString(), where: kvmHostKind() === "hardware" ? "lab (nested KVM under TCG)" : "unknown", runs: RUNS, downtimeLimitMs: DOWNTIME_MS, results: all }));
}

await main();
