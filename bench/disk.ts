/**
 * bench/disk: guest disk throughput on virtio-blk over PCI, typevisor against
 * QEMU (`-M q35 -accel kvm`, virtio-blk-pci, raw image, default cache), same
 * guest kernel and initramfs, same raw image size, inside one lab run.
 * In the guest: busybox dd with O_DIRECT — sequential write and read in 1 MiB
 * blocks, and 4 KiB reads at queue depth 1 (busybox has no random-I/O tool, so
 * this is sequential small-block IOPS; fio would be the next step).
 * The image is written full of zeros first: on a sparse tmpfs file the first VMM to write would
 * also pay for allocating every page and the second would not. Each phase also reports the CPU
 * time of every thread of the VMM process (guest time counts in its vCPU thread): in the lab
 * there is one CPU, so whatever a VMM spends per request comes straight out of throughput.
 *
 * BENCH_DISK_FORMAT=qcow2 measures qcow2 instead: each run of each VMM gets a fresh 2 GiB overlay
 * (made by our createQcow2, which QEMU opens as well) on a 1 GiB raw base. The warm-up uses the
 * base's second half (and makes one L2 table past the base); then, on the first half, sequential
 * reads come from the backing file (no cluster allocated yet), sequential writes allocate every
 * cluster, 4 KiB reads hit the clusters just allocated, and then the same half, now fully
 * allocated, is read and written again in 1 MiB blocks (no allocation, no backing file: the qcow2
 * steady state).
 *
 * Run: npm run bench:disk  (BENCH_DISK_FORMAT=qcow2 npm run bench:disk)
 */
import { closeSync, existsSync, openSync, rmSync, writeSync } from "node:fs";
import { mkdtempSync } from "node:fs";
import { join } from "node:path";
import { runScriptArg } from "../src/images/guest-init.js";
import { createQcow2 } from "../src/vmm/disk/qcow2/create.js";
import { imagePaths } from "../src/images/image.js";
import { ConsoleProcess } from "../test/helpers/console-process.js";
import { compare, counterDelta, cpuDelta, formatCpu, kvmCounters, mountDebugfs, nodePerfArgs, perfAttach, schedAttach, threadTicks } from "./lib.js";

const RUNS = Number(process.env["BENCH_RUNS"] ?? 3);
const NODE_FLAGS = (process.env["BENCH_NODE_FLAGS"] ?? "") !== "";
/** Lines of V8's --trace-deopt, --trace-opt and --trace-gc. */
const V8_TRACE = /^\[(bailout|marking|compiling|completed|optimizing)|^\[\d+:0x[0-9a-f]+\]/;
/** BENCH_PERF: the phases perf samples, [PERF_FROM, PERF_TO) in script order: the first two, or the one BENCH_PERF_PHASE (0-based) names. */
const PERF_PHASE = process.env["BENCH_PERF_PHASE"];
const PERF_FROM = PERF_PHASE !== undefined && PERF_PHASE !== "" ? Number(PERF_PHASE) : 0;
const PERF_TO = PERF_PHASE !== undefined && PERF_PHASE !== "" ? PERF_FROM + 1 : 2;
const QCOW2 = process.env["BENCH_DISK_FORMAT"] === "qcow2";
/** The raw image's size, or the qcow2 base's (MiB); a qcow2 overlay is twice that (NEXT_TABLE). */
const DISK_MIB = QCOW2 ? 1024 : 512;
// busybox time reports 10 ms steps: 512 MiB at ~600 MB/s takes ~0.9 s, so one step is ~1% (128 MiB made it ~5%).
const SEQ_MIB = 512;
const IOPS_COUNT = 8192;
const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;

/** The phases a script can time, by the tag its `timed` line prints. */
type Phase = "write" | "read" | "4k" | "writeAlloc" | "readAlloc";
/** Phase → the busybox-time tag in the guest's output. */
const TAGS: Record<Phase, string> = { write: "W", read: "R", "4k": "I", writeAlloc: "AW", readAlloc: "AR" };

interface Result {
  /** MB/s for the sequential phases, IOPS for "4k". */
  rate: Partial<Record<Phase, number>>;
  /** Per phase (in REPORT order): CPU seconds by thread name, threads of one name summed. */
  cpu: Record<string, number>[];
  /** Per phase (in REPORT order): KVM's own counters for the VM (debugfs), when debugfs is there. */
  kvm: Record<string, number>[];
}

// busybox dd prints no rate, so each run is timed with busybox's time applet ("real\t0m 1.23s").
const timed = (phase: Phase, cmd: string) => `busybox time ${cmd} 2>&1 | grep real | sed 's/^/${TAGS[phase]}: /'`;
// MARKn lines bound the phases for the per-thread CPU samples; the sleeps let the samples land.
const mark = (n: number) => `echo MARK${n}; sleep 1`;
const WRITE = `dd if=/dev/zero of=/dev/vda bs=1M count=${SEQ_MIB} oflag=direct`;
const READ = `dd if=/dev/vda of=/dev/null bs=1M count=${SEQ_MIB} iflag=direct`;
const SMALL = `dd if=/dev/vda of=/dev/null bs=4k count=${IOPS_COUNT} iflag=direct`;
/*
 * Untimed warm-up, the same for both VMMs: the three phases once, then measured. QEMU is compiled
 * ahead of time; our device path is compiled by V8 while it runs, and under the lab's emulated CPU
 * each optimizing compile costs a large share of a 0.3 s phase. With a shorter warm-up (16 MiB
 * each way and 1024 small reads) the measured phases still paid for compiles and deoptimizations
 * (V8's threads took up to a third of a phase's CPU, and any change to the code moved which phase
 * paid); after one full round our figures are what a VM that has been running a while gets.
 */
const WARMUP = [WRITE, READ, SMALL].map((c) => `${c} 2>/dev/null`).join("; ");
/**
 * qcow2: writes that make the L2 table of the 512 MiB past the base (the overlay is twice the
 * base's size). The warm-up's first write makes the second half's table while V8 is not yet
 * collecting type feedback for the write path, so without a second table made later the timed
 * allocating write met that code as new (a deoptimization and a recompile in the phase).
 */
const NEXT_TABLE = `w count=32 seek=${DISK_MIB}`;
/**
 * qcow2: allocating writes again at the end of the warm-up. Its first in-place write
 * deoptimized the write path (`--trace-opt --trace-deopt`), which then ran unoptimized through
 * the reads and was compiled again (write, alloc, setEntry) inside the timed allocating write.
 */
const LATE_ALLOC = `w count=128 seek=${DISK_MIB + 32}`;
/**
 * qcow2: warm up on the second half (its own clusters, its own L2 table) with every kind of request
 * the timed phases make on the first: reads from the backing file (no L2 table yet), writes that
 * allocate (a new L2 table, new clusters), writes in place, reads of allocated clusters, small
 * reads. A warm-up that skipped one left its code path unrun: V8 then deoptimized the device path
 * in the timed phase that first took it (`BENCH_NODE_FLAGS=--trace-deopt` shows where) and
 * recompiled it there, 0.2-0.3 s of the lab's one CPU in a 1-4 s phase (docs/benchmarks.md).
 */
// w/r: the dd commands of WRITE/READ/SMALL as shell functions (the script travels on the kernel command line: 1.5 KiB at most).
const WARMUP_QCOW2 = [
  `w(){ dd if=/dev/zero of=/dev/vda bs=1M oflag=direct "$@"; }`,
  `r(){ dd if=/dev/vda of=/dev/null iflag=direct "$@"; }`,
  `r bs=1M count=${SEQ_MIB} skip=${SEQ_MIB}`, `w count=${SEQ_MIB} seek=${SEQ_MIB}`, NEXT_TABLE, `w count=${SEQ_MIB} seek=${SEQ_MIB}`,
  `r bs=1M count=${SEQ_MIB} skip=${SEQ_MIB}`, `r bs=4k count=${IOPS_COUNT} skip=${SEQ_MIB * 256}`, LATE_ALLOC]
  .map((c) => `${c} 2>/dev/null`)
  .join("; ");
/**
 * The timed phases in the order the script runs them. qcow2: reads from the backing file, the
 * allocating write, 4 KiB reads of what it allocated, then 1 MiB read and write of the same
 * (now fully allocated) half.
 */
const RUN: readonly (readonly [Phase, string])[] = QCOW2
  ? [["read", READ], ["write", WRITE], ["4k", SMALL], ["readAlloc", READ], ["writeAlloc", WRITE]]
  : [["write", WRITE], ["read", READ], ["4k", SMALL]];
const SCRIPT = [QCOW2 ? WARMUP_QCOW2 : WARMUP, mark(0), ...RUN.flatMap(([ph, cmd], i) => [timed(ph, cmd), mark(i + 1)])].join("; ");
/** The order phases are reported in, whatever order the script ran them in. */
const REPORT: readonly Phase[] = (["write", "read", "4k", "writeAlloc", "readAlloc"] as const).filter((ph) => RUN.some(([p]) => p === ph));

/** Seconds from "TAG: real\tXm Y.YYs". */
function seconds(out: string, tag: string): number {
  // The lookbehind keeps "W" from matching "AW".
  const m = new RegExp(`(?<![A-Z])${tag}: real\\s+(\\d+)m ([\\d.]+)s`).exec(out);
  if (m === null) throw new Error(`no ${tag} timing in guest output:\n${out.slice(-1500)}`);
  return Number(m[1]) * 60 + Number(m[2]);
}

async function once(cmd: string, args: string[]): Promise<Result> {
  const p = new ConsoleProcess(cmd, args);
  try {
    const pid = p.child.pid;
    if (pid === undefined) throw new Error(`${cmd} did not start`);
    const samples: Map<string, number>[] = [];
    const kvm: Map<string, number>[] = [];
    let at = 0;
    let stopPerf: (() => () => Promise<void>) | undefined;
    let perfReport: (() => Promise<void>) | undefined;
    let stopSched: (() => () => Promise<void>) | undefined;
    let schedReport: (() => Promise<void>) | undefined;
    for (let n = 0; n <= RUN.length; n++) {
      // The mark ends its line, or a V8 trace line (BENCH_NODE_FLAGS: they share the VMM's stdout) landed right after it.
      at = await p.waitFor(new RegExp(`MARK${n}(?=[\\r\\n[])`), at, 600_000);
      samples.push(threadTicks(pid));
      kvm.push(kvmCounters(pid));
      if (n === PERF_FROM) stopPerf = perfAttach(pid, `${cmd.endsWith("qemu-system-x86_64") ? "qemu" : "typevisor"} ${RUN.slice(PERF_FROM, PERF_TO).map(([ph]) => ph).join("+")}`);
      if (n === PERF_TO) perfReport = stopPerf?.();
      // BENCH_SCHED: the second phase only.
      if (n === 1) stopSched = schedAttach(pid, `${cmd.endsWith("qemu-system-x86_64") ? "qemu" : "typevisor"} ${RUN[1]![0]}`);
      if (n === 2) schedReport = stopSched?.();
    }
    await perfReport?.();
    await schedReport?.();
    // With V8 tracing on, its lines can cut the guest's last line: wait for the VMM to end instead.
    if (NODE_FLAGS && cmd === process.execPath) await p.exit(600_000);
    else await p.waitFor(/typevisor-guest: exit/, at, 600_000);
    // BENCH_NODE_FLAGS (e.g. --trace-deopt, --trace-opt, --trace-gc): V8's trace lines and the phase marks, in the order the VMM printed them.
    if (NODE_FLAGS && cmd === process.execPath) console.log(`bench/disk: V8 trace of this run:\n${p.output.split("\n").filter((l) => V8_TRACE.test(l) || /^MARK\d/.test(l)).join("\n")}`);
    const bytes = SEQ_MIB * 1024 * 1024;
    const rate: Partial<Record<Phase, number>> = {};
    for (const [ph] of RUN) rate[ph] = (ph === "4k" ? IOPS_COUNT : bytes / 1e6) / seconds(p.output, TAGS[ph]);
    // Phase i of the script lies between MARKi and MARKi+1.
    const index = REPORT.map((ph) => RUN.findIndex(([p]) => p === ph));
    const cpu = index.map((i) => cpuDelta(samples[i]!, samples[i + 1]!));
    const kvmDelta = index.map((i) => counterDelta(kvm[i]!, kvm[i + 1]!));
    return { rate, cpu, kvm: kvmDelta };
  } catch (e) {
    // With V8 tracing on, what the guest printed last is under thousands of trace lines: leave them out.
    const out = NODE_FLAGS ? p.output.split("\n").filter((l) => !V8_TRACE.test(l)).join("\n") : p.output;
    console.log(`bench/disk: ${cmd} failed; its output ends:\n${out.slice(-3000)}`);
    throw e;
  } finally {
    p.kill();
  }
}

/**
 * Write and delete a file of `mib` MiB in `dir`, so the memory a run's files and guest take has
 * been used once before any VMM is timed. In the lab, the first use of a page of the lab VM's
 * memory costs a fault in the QEMU that emulates it; without this the first VMM of the first run
 * (always ours, before the order alternated) paid for it: its allocating write was 20-30 % below
 * the same VMM's later runs (docs/benchmarks.md).
 */
function prefault(dir: string, mib: number): void {
  const p = join(dir, "prefault");
  const fd = openSync(p, "w");
  try {
    const chunk = Buffer.alloc(1024 * 1024, 1);
    for (let i = 0; i < mib; i++) writeSync(fd, chunk);
  } finally {
    closeSync(fd);
    rmSync(p, { force: true });
  }
}

async function main(): Promise<void> {
  const img = imagePaths("minimal");
  // The lab's /dev/shm is a plain tmpfs; its /tmp is an overlay (tmpfs over the host's 9p root),
  // whose files answer RWF_NOWAIT with EOPNOTSUPP and so would be read on our disk's I/O thread
  // as if they were on a real disk. Both VMMs read the same file.
  const base = process.env["BENCH_DISK_DIR"] ?? (existsSync("/dev/shm") ? "/dev/shm" : (process.env["TMPDIR"] ?? "/tmp"));
  const dir = mkdtempSync(join(base, "tv-bench-disk-"));
  const rawDisk = join(dir, "disk.raw");
  const fd = openSync(rawDisk, "w");
  const zeros = Buffer.alloc(1024 * 1024);
  for (let i = 0; i < DISK_MIB; i++) writeSync(fd, zeros);
  closeSync(fd);
  const cmdline = `console=ttyS0 panic=-1 quiet ${runScriptArg(SCRIPT)}`;
  // qcow2: a fresh overlay per run and VMM, on the raw file as its base.
  const disk = QCOW2 ? join(dir, "disk.qcow2") : rawDisk;
  const fresh = (): void => {
    if (!QCOW2) return;
    rmSync(disk, { force: true });
    createQcow2(disk, { size: 2 * DISK_MIB * 1024 * 1024, backing: { file: rawDisk, format: "raw" } });
  };
  const format = QCOW2 ? "qcow2" : "raw";
  const ours = [...nodePerfArgs(), BIN, "run", "--no-lab", "--no-reboot", "--image", "minimal", "--memory", "512", "--disk", `${disk},format=${format}`, "--cmdline", cmdline,
    // a control socket, so a lab watchdog that finds this run stalled gets the VMM's GET /threads (docs/lab.md)
    "--api-socket", join(dir, "vmm.sock"),
    // BENCH_TV_ARGS: more `typevisor run` options for our VMM (a diagnostic: e.g. --vcpu-nice 8)
    ...(process.env["BENCH_TV_ARGS"]?.split(" ").filter((a) => a !== "") ?? [])];
  const qemu = [
    // debug-threads names QEMU's threads (vCPU, I/O workers), so its CPU splits by thread as ours does.
    "-name", "debug-threads=on", "-M", "q35", "-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", "512",
    "-nographic", "-nodefaults", "-no-user-config", "-serial", "stdio", "-no-reboot",
    "-kernel", img.kernel, "-initrd", img.initrd, "-append", cmdline,
    "-drive", `file=${disk},if=none,id=d0,format=${format}`, "-device", "virtio-blk-pci,drive=d0",
  ];
  const res: { typevisor: Result[]; qemu: Result[] } = { typevisor: [], qemu: [] };
  if (!mountDebugfs()) console.log("bench/disk: no KVM debugfs here, KVM counters left out");
  const what = QCOW2 ? `fresh ${2 * DISK_MIB} MiB qcow2 overlays (64 KiB clusters) on a ${DISK_MIB} MiB raw base` : `${DISK_MIB} MiB raw image`;
  console.log(`bench/disk: ${RUNS} runs each, alternating; ${what} in ${base}, guest 512 MiB, 1 vCPU`);
  prefault(base, DISK_MIB + 512 + 256);
  for (let i = 0; i < RUNS; i++) {
    // Which VMM goes first alternates: the first of a pair meets the machine as the previous run left it.
    let a: Result | undefined;
    let b: Result | undefined;
    for (const who of i % 2 === 0 ? (["typevisor", "qemu"] as const) : (["qemu", "typevisor"] as const)) {
      fresh();
      if (who === "typevisor") a = await once(process.execPath, ours);
      else b = await once("qemu-system-x86_64", qemu);
    }
    if (a === undefined || b === undefined) throw new Error("bench/disk: a run did not complete");
    res.typevisor.push(a);
    res.qemu.push(b);
    const f = (x: Result) => REPORT.map((ph) => `${ph} ${(x.rate[ph] ?? 0).toFixed(ph === "4k" ? 0 : 1)} ${ph === "4k" ? "IOPS" : "MB/s"}`).join(", ");
    console.log(`run ${i + 1}: typevisor ${f(a)} | qemu ${f(b)}`);
    const c = (x: Result) => REPORT.map((ph, j) => `${ph}: ${formatCpu(x.cpu[j]!)}`).join(" | ");
    console.log(`  cpu s (phase incl. 1 s sleep) typevisor ${c(a)}`);
    console.log(`  cpu s (phase incl. 1 s sleep) qemu ${c(b)}`);
    const k = (x: Result) => REPORT.map((ph, j) => `${ph}: ${Object.entries(x.kvm[j]!).map(([n, v]) => `${n} ${v}`).join(", ")}`).join(" | ");
    if (Object.keys(a.kvm[0]!).length > 0) {
      console.log(`  kvm counters typevisor ${k(a)}`);
      console.log(`  kvm counters qemu ${k(b)}`);
    }
  }
  const labels: Record<Phase, string> = QCOW2
    ? {
        write: "seq write 1 MiB, allocating (MB/s)",
        read: "seq read 1 MiB, from the backing file (MB/s)",
        "4k": "4 KiB read QD1, allocated (IOPS)",
        writeAlloc: "seq write 1 MiB, fully allocated (MB/s)",
        readAlloc: "seq read 1 MiB, fully allocated (MB/s)",
      }
    : { write: "seq write 1 MiB (MB/s)", read: "seq read 1 MiB (MB/s)", "4k": "4 KiB read QD1 (IOPS)", writeAlloc: "", readAlloc: "" };
  for (const ph of REPORT) {
    console.log(compare(labels[ph], res.typevisor.map((r) => r.rate[ph] ?? 0), res.qemu.map((r) => r.rate[ph] ?? 0)));
  }
  console.log(JSON.stringify({ bench: "disk", format, date: new Date().toISOString(), runs: RUNS, results: res }));
  rmSync(dir, { recursive: true, force: true });
}

await main();
