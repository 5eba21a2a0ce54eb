/**
 * bench/snapshot: saving a running guest to a file and bringing it back, typevisor against QEMU
 * (`-M microvm -accel kvm`, same kernel, initramfs and command line), alternating, N runs each,
 * inside one lab run, for each guest size (256 MiB and 2 GiB by default; issue 15).
 *
 * Each run boots a source VM whose guest script (from the initramfs: no devices, so the VMM's
 * device thread holds nothing to save) first answers one console line (the cold-boot figure:
 * process start to the guest answering), then dirties memory realistically: a tmpfs file of
 * random data, 100 MiB for a 256 MiB guest and half the guest for larger ones (BENCH_FILL_MIB
 * overrides), then answers every line typed on its console (`ans-LINE`). Then:
 *  - snapshot: ours is `POST /snapshot {"path": DIR}` on the VMM's API socket (its own `ms` and
 *    the request's wall time; the guest runs on); QEMU's is `stop`, `migrate "exec:cat > FILE"`
 *    and polling `query-migrate` until "completed" over QMP, timed from `stop` (the bandwidth
 *    limit, 128 MiB/s by default, is lifted first, as libvirt does for `virsh save`);
 *  - restore to running: process start to the restored guest answering a line typed on its
 *    console (a probe line typed when the VM is built, again every PROBE_RETRY_MS, since neither
 *    VMM says on the console when the guest runs again): ours `run --restore DIR` (built: its API socket is
 *    up, which it serves once the VM is restored), QEMU `-incoming "exec:cat FILE"` and `cont`
 *    over QMP once the incoming migration is done (built: `cont` sent; the source was stopped, so
 *    QEMU leaves the restored guest paused). Both read a file the source just wrote (page cache).
 * Also KVM's stage-2 page faults (debugfs pf_fixed) from the VM built to the answer, and each
 * VMM's resident memory right after the restored guest answered: ours maps the
 * memory file and loads pages on demand, QEMU reads the whole stream into guest RAM.
 *
 * Then (first, in the same lab run) the daemon's instant create: a VM cloned from a memory
 * snapshot against a cold create and boot, with a standby VMM and under the sandbox
 * (bench/instant-create.ts).
 *
 * Run: npm run bench:snapshot     (boots the lab itself when the host KVM is PVM)
 *      BENCH_RUNS=3 BENCH_MEMORY=256,2048 BENCH_ONLY=daemon|vmm
 */
import { existsSync, mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { runScriptArg } from "../src/images/guest-init.js";
import { imagePaths } from "../src/images/image.js";
import { kvmHostKind } from "../src/kvm/kvm.js";
import type { QmpClient } from "../src/lab/qmp.js";
import { ConsoleProcess } from "../test/helpers/console-process.js";
import { microvm } from "../test/helpers/qemu-microvm.js";
import { unixApi } from "../test/helpers/unix-api.js";
import { instantCreate } from "./instant-create.js";
import { compare, counterDelta, kvmCounters, median, mountDebugfs, processMemory, type ProcessMemory, qmpOpen as qmpOpenLib, until as untilLib } from "./lib.js";

const RUNS = Number(process.env["BENCH_RUNS"] ?? 3);
const MEMORY_MIBS = (process.env["BENCH_MEMORY"] ?? "256,2048").split(",").map((v) => Number(v.trim()));
const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
const QEMU = "qemu-system-x86_64";
/**
 * A probe line is typed again after this long without an answer. One line is enough once the VM
 * is built (both VMMs hold typed input until the guest's UART takes it); typing more meanwhile
 * costs the guest an echo of each and skews the figure: ours handles each UART access in
 * JavaScript, and probes every 100 ms (this benchmark's first version) left a restored guest
 * echoing 45-58 of them before it answered.
 */
const PROBE_RETRY_MS = 2000;
/** Limits for a lab under load (boots there took 12-40 s). */
const BOOT_MS = 600_000;
const STEP_MS = 300_000;
const UP = "snapbench-up";
const READY = "snapbench-ready";
/** A chunk of random data is written this many MiB at a time (its copies make the fill). */
const CHUNK_MIB = 4;
/** BENCH_SHOW_CONSOLE=1: print what each restored guest wrote on its console, to see what it did before it answered. */
const SHOW_CONSOLE = process.env["BENCH_SHOW_CONSOLE"] === "1";

/** BENCH_KEEP_CLOCK=1: restore ours with --keep-clock (the guest clock not moved to now), to see what moving it costs. */
const KEEP_CLOCK = process.env["BENCH_KEEP_CLOCK"] === "1";

function showConsole(who: string, p: ConsoleProcess): void {
  if (SHOW_CONSOLE) console.log(`${who} restored console (${p.output.length} bytes): ${JSON.stringify(p.output.slice(-4000))}`);
}

const fillMiB = (memoryMiB: number): number => {
  const env = process.env["BENCH_FILL_MIB"];
  const mib = env !== undefined ? Number(env) : memoryMiB >= 1024 ? memoryMiB / 2 : Math.round((memoryMiB * 100) / 256);
  return Math.max(CHUNK_MIB, Math.round(mib / CHUNK_MIB) * CHUNK_MIB);
};

/**
 * The guest's script: answer one line (cold boot), fill tmpfs with `fill` MiB of random data
 * (one random chunk, copied: urandom itself is slow under the lab's emulator), then answer lines
 * for ever. /tmp is tmpfs at half of RAM by default; 2 GiB guests need more room for 1 GiB.
 */
function guestScript(fill: number): string {
  return [
    `echo ${UP}`,
    `read l; echo "ans-$l"`,
    "mount -o remount,size=90% /tmp",
    `dd if=/dev/urandom of=/tmp/chunk bs=1048576 count=${CHUNK_MIB} 2>/dev/null`,
    `i=0; while [ $i -lt ${fill / CHUNK_MIB} ]; do cat /tmp/chunk; i=$((i+1)); done > /tmp/fill`,
    "rm /tmp/chunk",
    `echo ${READY} $(du -m /tmp/fill)`,
    `while read l; do echo "ans-$l"; done`,
  ].join("\n");
}

/**
 * Type a probe line, again every PROBE_RETRY_MS, until the guest answers one; the time from
 * process start to the answer (ms).
 */
async function answerMs(p: ConsoleProcess, from: number): Promise<number> {
  let n = 0;
  let answered = false;
  const probe = (): void => {
    if (!answered) p.type(`p${n++}\n`);
  };
  probe();
  const timer = setInterval(probe, PROBE_RETRY_MS);
  try {
    await p.waitFor(/ans-p\d+/, from, STEP_MS);
    return performance.now() - p.t0;
  } finally {
    answered = true;
    clearInterval(timer);
  }
}

/** Type `line` and wait for its answer: the guest's loop is reading, and every earlier line was read. */
async function roundTrip(p: ConsoleProcess, line: string): Promise<void> {
  const from = p.output.length;
  p.type(`${line}\n`);
  await p.waitFor(new RegExp(`ans-${line}`), from, STEP_MS);
}

const until = (what: string, cond: () => boolean, ms = STEP_MS): Promise<void> => untilLib(what, cond, ms);

interface Sample {
  /** Process start to the source guest's first answer (a cold boot). */
  coldMs: number;
  /** The VMM's own figure for the snapshot (ours: POST /snapshot's `ms`; QEMU: same as wallMs). */
  snapshotMs: number;
  /** The snapshot request's wall time (ours: the HTTP request; QEMU: stop to migration completed). */
  snapshotWallMs: number;
  /** Bytes of the snapshot on disk (allocated blocks: sparse files count what they hold). */
  fileBytes: number;
  /** Process start to the restored guest's first answer. */
  restoreMs: number;
  /**
   * Process start to the restored VM being built and about to run: ours, its API socket appearing
   * (served once the VM is restored); QEMU, the incoming migration done (`cont` sent).
   */
  restoreBuiltMs: number;
  /** Resident memory of the restored VMM right after that answer (KiB). */
  restoreRssKiB: number;
  /** KVM's counters for the restored VM from built to the answer (debugfs; empty where it is not mounted). */
  restoreKvm: Record<string, number>;
  /**
   * Ours only: the restore into a standby VMM (`run --standby`, started and ready beforehand, as
   * the daemon's pool keeps them): `PUT /restore` sent to the guest answering, and to its answer.
   */
  standbyMs?: number;
  standbyBuiltMs?: number;
  /** The standby's memory while it waits, built ahead for the snapshot (lib.ts processMemory). */
  standbyWaiting?: ProcessMemory;
}

/** Allocated bytes of a file or of every file in a directory (st_blocks, so holes do not count). */
function allocated(path: string): number {
  const st = statSync(path);
  if (!st.isDirectory()) return st.blocks * 512;
  let sum = 0;
  for (const f of ["memory", "state.json", "config.json"]) if (existsSync(join(path, f))) sum += statSync(join(path, f)).blocks * 512;
  return sum;
}

async function boot(cmd: string, args: string[]): Promise<{ p: ConsoleProcess; coldMs: number }> {
  const p = new ConsoleProcess(cmd, args);
  const at = await p.waitFor(new RegExp(UP), 0, BOOT_MS);
  const coldMs = await answerMs(p, at);
  await p.waitFor(new RegExp(READY), at, STEP_MS);
  await roundTrip(p, "before");
  return { p, coldMs };
}

async function ours(memoryMiB: number, cmdline: string, work: string): Promise<Sample> {
  const api = join(work, "api.sock");
  const snap = join(work, "snap");
  const { p, coldMs } = await boot(process.execPath, [BIN, "run", "--no-lab", "--no-reboot", "--image", "minimal", "--memory", String(memoryMiB), "--cmdline", cmdline, "--api-socket", api]);
  let snapshotMs: number;
  let snapshotWallMs: number;
  try {
    const t = performance.now();
    const r = await unixApi(api, "POST", "/snapshot", { path: snap });
    snapshotWallMs = performance.now() - t;
    if (r.status !== 200) throw new Error(`POST /snapshot answered ${r.status}: ${JSON.stringify(r.body)}`);
    snapshotMs = Number(r.body.ms);
    // The source runs on after a snapshot.
    await roundTrip(p, "after");
  } finally {
    p.kill();
    await p.exited;
  }
  const fileBytes = allocated(snap);
  const api2 = join(work, "api2.sock");
  const q = new ConsoleProcess(process.execPath, [BIN, "run", "--no-lab", "--no-reboot", "--restore", snap, "--api-socket", api2, ...(KEEP_CLOCK ? ["--keep-clock"] : [])]);
  try {
    await until("the restored VMM's API socket", () => existsSync(api2) || q.child.exitCode !== null);
    const restoreBuiltMs = performance.now() - q.t0;
    const k0 = kvmCounters(q.child.pid!);
    const restoreMs = await answerMs(q, 0);
    const restoreKvm = counterDelta(k0, kvmCounters(q.child.pid!));
    const restoreRssKiB = processMemory(q.child.pid!, memoryMiB).rssKiB;
    showConsole("typevisor", q);
    q.kill();
    await q.exited;
    const { standbyMs, standbyBuiltMs, standbyWaiting } = await standbyRestore(snap, work, memoryMiB);
    return { coldMs, snapshotMs, snapshotWallMs, fileBytes, restoreMs, restoreBuiltMs, restoreRssKiB, restoreKvm, standbyMs, standbyBuiltMs, standbyWaiting };
  } finally {
    q.kill();
    await q.exited;
  }
}

/**
 * The same snapshot restored into a standby VMM: Node, the modules and KVM are up before the clock
 * starts (the daemon keeps a pool of these: docs/snapshots.md "Standby VMMs"), so the figure is
 * what a pool-backed instant create waits for. Timed from `PUT /restore` to the guest's answer.
 * The standby is started for this snapshot (`--template`), as the daemon's pool starts them for
 * its template; BENCH_STANDBY_TEMPLATE=0 starts it without one.
 */
async function standbyRestore(snap: string, work: string, memoryMiB: number): Promise<{ standbyMs: number; standbyBuiltMs: number; standbyWaiting: ProcessMemory }> {
  const api = join(work, "standby.sock");
  const template = process.env["BENCH_STANDBY_TEMPLATE"] === "0" ? [] : ["--template", snap];
  const p = new ConsoleProcess(process.execPath, [BIN, "run", "--no-lab", "--no-reboot", "--standby", ...template, "--api-socket", api]);
  try {
    await until("the standby VMM's API socket", () => existsSync(api) || p.child.exitCode !== null);
    const ready = await unixApi(api, "GET", "/vm");
    if (ready.status !== 200 || ready.body.state !== "standby") throw new Error(`the standby VMM is not on standby: ${ready.status} ${JSON.stringify(ready.body)}`);
    const standbyWaiting = processMemory(p.child.pid!, memoryMiB);
    const t = performance.now();
    const from = p.output.length;
    const r = await unixApi(api, "PUT", "/restore", { snapshot: snap, ...(KEEP_CLOCK ? { keepClock: true } : {}) });
    const standbyBuiltMs = performance.now() - t;
    if (r.status !== 200) throw new Error(`PUT /restore answered ${r.status}: ${JSON.stringify(r.body)}`);
    const answeredAt = (await answerMs(p, from)) + p.t0;
    showConsole("typevisor (standby)", p);
    return { standbyMs: answeredAt - t, standbyBuiltMs, standbyWaiting };
  } finally {
    p.kill();
    await p.exited;
  }
}

const qmpOpen = (path: string, p: ConsoleProcess): Promise<QmpClient> => qmpOpenLib(path, p, STEP_MS);

async function qemu(memoryMiB: number, cmdline: string, work: string): Promise<Sample> {
  const img = imagePaths("minimal");
  const file = join(work, "qemu.state");
  const args = (qmp: string, extra: string[]): string[] => {
    const a = microvm(img.kernel, img.initrd, cmdline, ["-qmp", `unix:${qmp},server=on,wait=off`, ...extra]);
    a[a.indexOf("-m") + 1] = String(memoryMiB);
    return a;
  };
  const srcQmp = join(work, "src.qmp");
  const { p, coldMs } = await boot(QEMU, args(srcQmp, []));
  let snapshotMs: number;
  try {
    const m = await qmpOpen(srcQmp, p);
    try {
      // QEMU throttles migration to 128 MiB/s by default; a save to a file should not be.
      await m.execute("migrate-set-parameters", { "max-bandwidth": 2 ** 40 }, STEP_MS);
      const t = performance.now();
      await m.execute("stop", undefined, STEP_MS);
      await m.execute("migrate", { uri: `exec:cat > ${file}` }, STEP_MS);
      for (const end = Date.now() + STEP_MS; ; ) {
        const s = (await m.execute("query-migrate", undefined, STEP_MS)) as { status?: string; "error-desc"?: string };
        if (s.status === "completed") break;
        if (Date.now() > end) throw new Error(`QEMU migration still ${s.status ?? "?"} after ${STEP_MS} ms`);
        if (s.status === "failed" || s.status === "cancelled") throw new Error(`QEMU migration ${s.status}: ${s["error-desc"] ?? ""}`);
        await new Promise((r) => setTimeout(r, 10));
      }
      snapshotMs = performance.now() - t;
      // As ours: the source runs on afterwards.
      await m.execute("cont", undefined, STEP_MS);
      await roundTrip(p, "after");
    } finally {
      m.close();
    }
  } finally {
    p.kill();
    await p.exited;
  }
  const fileBytes = allocated(file);
  const dstQmp = join(work, "dst.qmp");
  const q = new ConsoleProcess(QEMU, args(dstQmp, ["-incoming", `exec:cat ${file}`]));
  try {
    const m = await qmpOpen(dstQmp, q);
    let restoreBuiltMs: number;
    try {
      for (const end = Date.now() + STEP_MS; ; ) {
        const s = (await m.execute("query-status", undefined, STEP_MS)) as { status?: string };
        if (Date.now() > end) throw new Error(`the restored QEMU still ${s.status ?? "?"} after ${STEP_MS} ms`);
        if (s.status === "running") {
          restoreBuiltMs = performance.now() - q.t0;
          break;
        }
        if (s.status !== "inmigrate") {
          restoreBuiltMs = performance.now() - q.t0;
          // The migration is in: the guest is paused as the source was when saved.
          await m.execute("cont", undefined, STEP_MS);
          break;
        }
        await new Promise((r) => setTimeout(r, 10));
      }
    } finally {
      m.close();
    }
    const k0 = kvmCounters(q.child.pid!);
    const restoreMs = await answerMs(q, 0);
    const restoreKvm = counterDelta(k0, kvmCounters(q.child.pid!));
    const restoreRssKiB = processMemory(q.child.pid!, memoryMiB).rssKiB;
    showConsole("qemu", q);
    return { coldMs, snapshotMs, snapshotWallMs: snapshotMs, fileBytes, restoreMs, restoreBuiltMs, restoreRssKiB, restoreKvm };
  } finally {
    q.kill();
    await q.exited;
  }
}

async function size(memoryMiB: number): Promise<{ memoryMiB: number; fillMiB: number; typevisor: Sample[]; qemu: Sample[] }> {
  const img = imagePaths("minimal");
  const fill = fillMiB(memoryMiB);
  const cmdline = `console=ttyS0 panic=-1 ${runScriptArg(guestScript(fill))}`;
  const results = { memoryMiB, fillMiB: fill, typevisor: [] as Sample[], qemu: [] as Sample[] };
  console.log(`bench/snapshot: ${RUNS} runs each, alternating; guest ${memoryMiB} MiB with ${fill} MiB of tmpfs data, 1 vCPU, no devices, kernel ${img.kernel}`);
  const fmt = (s: Sample): string =>
    `cold ${s.coldMs.toFixed(0)} ms, snapshot ${s.snapshotMs.toFixed(0)} ms (wall ${s.snapshotWallMs.toFixed(0)} ms, ${(s.fileBytes / 2 ** 20).toFixed(0)} MiB), restore ${s.restoreMs.toFixed(0)} ms (built ${s.restoreBuiltMs.toFixed(0)} ms, RSS ${(s.restoreRssKiB / 1024).toFixed(0)} MiB, from built to answer: ${s.restoreKvm["pf_fixed"] ?? "?"} stage-2 faults, ${s.restoreKvm["exits"] ?? "?"} exits)`;
  for (let i = 0; i < RUNS; i++) {
    // QEMU first: each run still alternates the two, one right after the other.
    for (const who of ["qemu", "typevisor"] as const) {
      const work = mkdtempSync(join(tmpdir(), `bench-snap-${who}-`));
      try {
        const s = await (who === "typevisor" ? ours : qemu)(memoryMiB, cmdline, work);
        results[who].push(s);
        console.log(`run ${i + 1} ${who}: ${fmt(s)}`);
      } finally {
        rmSync(work, { recursive: true, force: true });
      }
    }
  }
  const series = (f: (s: Sample) => number) => [results.typevisor.map(f), results.qemu.map(f)] as const;
  const tag = `[${memoryMiB} MiB]`;
  console.log(compare(`${tag} snapshot, the VMM's own time, median (ms)`, ...series((s) => s.snapshotMs), 0));
  console.log(compare(`${tag} snapshot, request wall time, median (ms)`, ...series((s) => s.snapshotWallMs), 0));
  console.log(compare(`${tag} snapshot size on disk, median (MiB)`, ...series((s) => s.fileBytes / 2 ** 20)));
  console.log(compare(`${tag} restore: process start to the guest answering, median (ms)`, ...series((s) => s.restoreMs), 0));
  console.log(compare(`${tag} restore: process start to the VM built (ours: API socket up; QEMU: incoming done), median (ms)`, ...series((s) => s.restoreBuiltMs), 0));
  if (results.typevisor.every((s) => s.restoreKvm["pf_fixed"] !== undefined)) {
    console.log(compare(`${tag} restore: stage-2 page faults from built to the answer, median`, ...series((s) => s.restoreKvm["pf_fixed"] ?? 0), 0));
  }
  // Ours from a standby VMM against QEMU's whole restore: QEMU has no standby; its process start is a small part of its restore.
  const standby = results.typevisor.map((s) => s.standbyMs ?? NaN);
  console.log(compare(`${tag} restore into a standby VMM (ours: PUT /restore to the answer; QEMU: process start to the answer), median (ms)`, standby, results.qemu.map((s) => s.restoreMs), 0));
  console.log(`${tag} restore into a standby VMM: PUT /restore answered after ${median(results.typevisor.map((s) => s.standbyBuiltMs ?? NaN)).toFixed(0)} ms (median)`);
  const w = (f: (m: ProcessMemory) => number): string => (median(results.typevisor.map((s) => (s.standbyWaiting !== undefined ? f(s.standbyWaiting) : NaN))) / 1024).toFixed(1);
  console.log(`${tag} a standby waiting (its VM built ahead), median (MiB): RSS ${w((m) => m.rssKiB)}, USS ${w((m) => m.ussKiB)} of which in files ${w((m) => m.fileUssKiB)} (the snapshot's memory file, its pages in the page cache, which clones share), page tables ${w((m) => m.pteKiB)}`);
  const rs = median(standby) / median(results.qemu.map((s) => s.restoreMs));
  console.log(`${tag} goal: restore at most 0.2x QEMU's, from a standby VMM: ${rs.toFixed(2)}x, ${rs <= 0.2 ? "met" : "not met"}`);
  console.log(compare(`${tag} resident memory right after the restored guest answered, median (MiB)`, ...series((s) => s.restoreRssKiB / 1024)));
  console.log(compare(`${tag} cold boot: process start to the guest answering, median (ms)`, ...series((s) => s.coldMs), 0));
  const r = median(results.typevisor.map((s) => s.restoreMs)) / median(results.qemu.map((s) => s.restoreMs));
  console.log(`${tag} goal: restore at most 0.2x QEMU's: ${r.toFixed(2)}x, ${r <= 0.2 ? "met" : "not met"}`);
  return results;
}

async function main(): Promise<void> {
  // BENCH_ONLY=daemon: only the daemon's instant create (bench/instant-create.ts); =vmm: only the VMM's figures.
  const only = process.env["BENCH_ONLY"];
  const daemon = only !== "vmm" ? await instantCreate(RUNS) : undefined;
  if (only === "daemon") {
    console.log(JSON.stringify({ bench: "snapshot", part: "daemon", date: new Date().toISOString(), where: kvmHostKind() === "hardware" ? "lab (nested KVM under TCG)" : "unknown", runs: RUNS, daemon }));
    return;
  }
  mountDebugfs();
  const all = [];
  for (const m of MEMORY_MIBS) all.push(await size(m));
  if (all.length > 1) {
    const first = all[0]!;
    const last = all[all.length - 1]!;
    for (const who of ["typevisor", "qemu"] as const) {
      const g = median(last[who].map((s) => s.restoreMs)) / median(first[who].map((s) => s.restoreMs));
      const goal = who === "typevisor" ? ` (goal: within 1.2x: ${g <= 1.2 ? "met" : "not met"})` : "";
      console.log(`${who}: restore time ${first.memoryMiB} MiB -> ${last.memoryMiB} MiB: ${g.toFixed(2)}x${goal}`);
    }
  }
  console.log(JSON.stringify({ bench: "snapshot", date: new Date().toISOString(), where: kvmHostKind() === "hardware" ? "lab (nested KVM under TCG)" : "unknown", runs: RUNS, results: all, daemon }));
}

await main();
