/**
 * bench/boot: time from process start to the guest's first userspace line,
 * typevisor against QEMU (`-M microvm -accel kvm`), same kernel and initramfs,
 * alternating, N runs each, inside one lab run, for each guest size (256 MiB and
 * 12 GiB by default). Also the VMM's resident memory beyond the guest's own pages
 * (total RSS minus the RSS of the guest-RAM mappings, from /proc/PID/smaps) and
 * the process's page tables (VmPTE) for both: a VMM's own memory should not grow
 * with the guest's size, only the page tables over guest RAM do.
 *
 * Run: npm run bench:boot        (boots the lab itself when the host KVM is PVM)
 *      BENCH_MEMORY=256,12288    guest sizes in MiB (the lab has 16 GiB)
 */
import { USERSPACE_UP_LINE, runScriptArg } from "../src/images/guest-init.js";
import { imagePaths } from "../src/images/image.js";
import { kvmHostKind } from "../src/kvm/kvm.js";
import { ConsoleProcess } from "../test/helpers/console-process.js";
import { compare, median, processMemory } from "./lib.js";
import { VMM_NODE_FLAGS } from "../src/vmm/isolates.js";

const RUNS = Number(process.env["BENCH_RUNS"] ?? 5);
const MEMORY_MIBS = (process.env["BENCH_MEMORY"] ?? "256,12288").split(",").map((v) => Number(v.trim()));
const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
const MARK = "bench-measure-now";

interface Sample {
  /** Process start to the kernel's first console line: the VMM's own start-up cost. */
  firstLineMs: number;
  bootMs: number;
  overheadKiB: number;
  rssKiB: number;
  guestKiB: number;
  /** The process's page tables (VmPTE, /proc/PID/status): they map guest RAM too, so they grow with it. */
  pteKiB: number;
}

async function once(cmd: string, args: string[], memoryMiB: number): Promise<Sample> {
  const p = new ConsoleProcess(cmd, args);
  try {
    await p.waitFor(/Linux version/, 0, 300_000);
    const firstLineMs = performance.now() - p.t0;
    await p.waitFor(new RegExp(USERSPACE_UP_LINE), 0, 300_000);
    const bootMs = performance.now() - p.t0;
    await p.waitFor(new RegExp(MARK), 0, 300_000);
    const mem = processMemory(p.child.pid!, memoryMiB);
    const code = await p.exited;
    if (code !== 0) throw new Error(`${cmd} exited ${code}:\n${p.output.slice(-2000)}`);
    return { firstLineMs, bootMs, rssKiB: mem.rssKiB, guestKiB: mem.guestRssKiB, pteKiB: mem.pteKiB, overheadKiB: mem.rssKiB - mem.guestRssKiB };
  } finally {
    p.kill();
  }
}

async function size(memoryMiB: number): Promise<{ memoryMiB: number; typevisor: Sample[]; qemu: Sample[] }> {
  const img = imagePaths("minimal");
  const script = runScriptArg(`echo ${MARK}; sleep 2`);
  const cmdline = `console=ttyS0 panic=-1 ${script}`;
  // With the node options the daemon starts every VMM with (engine/native.ts).
  const ours = [process.execPath, ...VMM_NODE_FLAGS, BIN, "run", "--no-lab", "--no-reboot", "--image", "minimal", "--memory", String(memoryMiB), "--cmdline", cmdline];
  const qemu = [
    "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", String(memoryMiB),
    "-nographic", "-nodefaults", "-no-user-config", "-serial", "stdio", "-no-reboot",
    "-kernel", img.kernel, "-initrd", img.initrd, "-append", cmdline,
  ];
  const results = { memoryMiB, typevisor: [] as Sample[], qemu: [] as Sample[] };
  console.log(`bench/boot: ${RUNS} runs each, alternating; guest ${memoryMiB} MiB, 1 vCPU, kernel ${img.kernel}`);
  for (let i = 0; i < RUNS; i++) {
    const a = await once(ours[0]!, ours.slice(1), memoryMiB);
    results.typevisor.push(a);
    const b = await once("qemu-system-x86_64", qemu, memoryMiB);
    results.qemu.push(b);
    const fmt = (x: Sample) => `${x.bootMs.toFixed(0)} ms (first line ${x.firstLineMs.toFixed(0)} ms, +${(x.overheadKiB / 1024).toFixed(1)} MiB, PTE ${x.pteKiB} KiB)`;
    console.log(`run ${i + 1}: typevisor ${fmt(a)}  qemu ${fmt(b)}`);
  }
  const series = (f: (s: Sample) => number) => [results.typevisor.map(f), results.qemu.map(f)] as const;
  console.log(compare(`[${memoryMiB} MiB] process start to the kernel's first line, median (ms)`, ...series((s) => s.firstLineMs), 0));
  console.log(compare(`[${memoryMiB} MiB] boot to userspace, median (ms)`, ...series((s) => s.bootMs), 0));
  console.log(compare(`[${memoryMiB} MiB] VMM memory beyond guest pages, median RSS (MiB)`, ...series((s) => s.overheadKiB / 1024)));
  console.log(compare(`[${memoryMiB} MiB] guest pages touched, median RSS (MiB)`, ...series((s) => s.guestKiB / 1024)));
  console.log(compare(`[${memoryMiB} MiB] process page tables, median VmPTE (KiB)`, ...series((s) => s.pteKiB), 0));
  return results;
}

async function main(): Promise<void> {
  const all = [];
  for (const m of MEMORY_MIBS) all.push(await size(m));
  if (all.length > 1) {
    // Growth of each VMM's own memory from the smallest guest to the largest (medians).
    const first = all[0]!;
    const last = all[all.length - 1]!;
    for (const who of ["typevisor", "qemu"] as const) {
      const d = median(last[who].map((s) => s.overheadKiB)) - median(first[who].map((s) => s.overheadKiB));
      const pte = median(last[who].map((s) => s.pteKiB)) - median(first[who].map((s) => s.pteKiB));
      console.log(`${who}: VMM memory beyond guest pages grows by ${(d / 1024).toFixed(1)} MiB from ${first.memoryMiB} MiB to ${last.memoryMiB} MiB of guest (page tables: ${pte} KiB)`);
    }
  }
  console.log(JSON.stringify({ bench: "boot", date: new Date().toISOString(), where: kvmHostKind() === "hardware" ? "lab (nested KVM under TCG)" : "unknown", runs: RUNS, results: all }));
}

await main();
