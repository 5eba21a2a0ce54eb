/**
 * bench/boot: time from process start to the guest's first userspace line,
 * typevisor against QEMU (`-M microvm -accel kvm`), same kernel and initramfs,
 * alternating, N runs each, inside one lab run. Also the VMM's resident memory
 * beyond the guest's own pages (total RSS minus the RSS of the guest-RAM
 * mapping, from /proc/PID/smaps) for both.
 *
 * Run: npm run bench:boot        (boots the lab itself when the host KVM is PVM)
 */
import { readFileSync } from "node:fs";
import { USERSPACE_UP_LINE, runScriptArg } from "../src/images/guest-init.js";
import { imagePaths } from "../src/images/image.js";
import { kvmHostKind } from "../src/kvm/kvm.js";
import { ConsoleProcess } from "../test/helpers/console-process.js";
import { compare } from "./lib.js";

const RUNS = Number(process.env["BENCH_RUNS"] ?? 5);
const MEMORY_MIB = 256;
const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
const MARK = "bench-measure-now";

interface Sample {
  /** Process start to the kernel's first console line: the VMM's own start-up cost. */
  firstLineMs: number;
  bootMs: number;
  overheadKiB: number;
  rssKiB: number;
  guestKiB: number;
}

/** RSS of the whole process, and of the mapping(s) that hold guest RAM (the anonymous ones at least as big as it). */
function memory(pid: number): { rssKiB: number; guestKiB: number } {
  const smaps = readFileSync(`/proc/${pid}/smaps`, "utf8").split("\n");
  let rss = 0;
  let guest = 0;
  let size = 0;
  let anon = false;
  for (const line of smaps) {
    const head = /^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ (\d+)\s*(.*)$/.exec(line);
    if (head !== null) {
      size = (parseInt(head[2]!, 16) - parseInt(head[1]!, 16)) / 1024;
      anon = head[3] === "0" && (head[4] ?? "").trim() === "";
      continue;
    }
    const m = /^Rss:\s+(\d+) kB/.exec(line);
    if (m !== null) {
      const kib = Number(m[1]);
      rss += kib;
      if (anon && size >= MEMORY_MIB * 1024) guest += kib;
    }
  }
  return { rssKiB: rss, guestKiB: guest };
}

async function once(cmd: string, args: string[]): Promise<Sample> {
  const p = new ConsoleProcess(cmd, args);
  try {
    await p.waitFor(/Linux version/, 0, 300_000);
    const firstLineMs = performance.now() - p.t0;
    await p.waitFor(new RegExp(USERSPACE_UP_LINE), 0, 300_000);
    const bootMs = performance.now() - p.t0;
    await p.waitFor(new RegExp(MARK), 0, 300_000);
    const mem = memory(p.child.pid!);
    const code = await p.exited;
    if (code !== 0) throw new Error(`${cmd} exited ${code}:\n${p.output.slice(-2000)}`);
    return { firstLineMs, bootMs, rssKiB: mem.rssKiB, guestKiB: mem.guestKiB, overheadKiB: mem.rssKiB - mem.guestKiB };
  } finally {
    p.kill();
  }
}

async function main(): Promise<void> {
  const img = imagePaths("minimal");
  const script = runScriptArg(`echo ${MARK}; sleep 2`);
  const cmdline = `console=ttyS0 panic=-1 ${script}`;
  const ours = [process.execPath, BIN, "run", "--no-lab", "--no-reboot", "--image", "minimal", "--memory", String(MEMORY_MIB), "--cmdline", cmdline];
  const qemu = [
    "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", String(MEMORY_MIB),
    "-nographic", "-nodefaults", "-no-user-config", "-serial", "stdio", "-no-reboot",
    "-kernel", img.kernel, "-initrd", img.initrd, "-append", cmdline,
  ];
  const results: { typevisor: Sample[]; qemu: Sample[] } = { typevisor: [], qemu: [] };
  console.log(`bench/boot: ${RUNS} runs each, alternating; guest ${MEMORY_MIB} MiB, 1 vCPU, kernel ${img.kernel}`);
  for (let i = 0; i < RUNS; i++) {
    const a = await once(ours[0]!, ours.slice(1));
    results.typevisor.push(a);
    const b = await once("qemu-system-x86_64", qemu);
    results.qemu.push(b);
    const fmt = (x: Sample) => `${x.bootMs.toFixed(0)} ms (first line ${x.firstLineMs.toFixed(0)} ms, +${(x.overheadKiB / 1024).toFixed(1)} MiB)`;
    console.log(`run ${i + 1}: typevisor ${fmt(a)}  qemu ${fmt(b)}`);
  }
  const series = (f: (s: Sample) => number) => [results.typevisor.map(f), results.qemu.map(f)] as const;
  console.log(compare("process start to the kernel's first line, median (ms)", ...series((s) => s.firstLineMs), 0));
  console.log(compare("boot to userspace, median (ms)", ...series((s) => s.bootMs), 0));
  console.log(compare("VMM memory beyond guest pages, median RSS (MiB)", ...series((s) => s.overheadKiB / 1024)));
  console.log(JSON.stringify({ bench: "boot", date: new Date().toISOString(), where: kvmHostKind() === "hardware" ? "lab (nested KVM under TCG)" : "unknown", runs: RUNS, results }));
}

await main();
