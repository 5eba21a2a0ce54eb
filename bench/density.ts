/**
 * bench/density: what each VM costs the host beyond its own memory, typevisor against QEMU
 * (`-M microvm -accel kvm`), with the same guest (the minimal image: cloud kernel, busybox
 * initramfs, 256 MiB, 1 vCPU) and the same devices (a read-only disk, a network card on its own
 * TAP, an entropy source), N VMs at once, inside one lab run.
 *
 * Per VMM process (/proc/PID/smaps, summed over its mappings): RSS, PSS and USS (private clean +
 * private dirty), each less the guest-RAM mapping's own pages, which are the guest's, not the
 * VMM's. PSS and USS are the figures that count for density: code and read-only data shared by
 * several VMMs (node's binary, QEMU's, their libraries) are paid once, and PSS divides them among
 * the processes that share them. Besides, the host's own view: MemAvailable before the VMs and
 * after they all idle, divided by N (guest pages included: what a VM costs in all). And start-up:
 * process start to the kernel's first console line, the VMM's own cost before the guest runs.
 *
 * Run: npm run bench:density          (boots the lab itself when the host KVM is PVM)
 *      BENCH_DENSITY=1,10,30          the numbers of VMs at once
 *      BENCH_SETTLE_MS=15000          how long they all idle before they are measured
 */
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { USERSPACE_UP_LINE, runScriptArg } from "../src/images/guest-init.js";
import { imagePaths } from "../src/images/image.js";
import { kvmHostKind } from "../src/kvm/kvm.js";
import { ConsoleProcess } from "../test/helpers/console-process.js";
import { SYNC_TIMEOUT_MS } from "../test/helpers/sync-timeout.js";
import { compare, median, processMemory, type ProcessMemory } from "./lib.js";
import { VMM_NODE_FLAGS } from "../src/vmm/isolates.js";

const COUNTS = (process.env["BENCH_DENSITY"] ?? "1,10,30").split(",").map((v) => Number(v.trim()));
const MEMORY_MIB = 256;
const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
const MARK = "bench-density-idle";
/**
 * How long all N VMs idle before they are measured: their boot's transient buffers settle, and
 * each VMM's disk I/O thread, started by the boot's reads, ends after 10 s without a request
 * (IO_THREAD_IDLE_MS; QEMU's thread pool ends its idle workers after 10 s as well), so both are
 * measured as idle VMs stay. Until 2026-12-07: 5 s (`BENCH_SETTLE_MS=5000` for that).
 */
const SETTLE_MS = Number(process.env["BENCH_SETTLE_MS"] ?? 15_000);

interface Sample extends ProcessMemory {
  firstLineMs: number;
}

interface Round {
  count: number;
  samples: Sample[];
  /** MemAvailable (proc(5) /proc/meminfo) before starting minus with all running, per VM. */
  hostPerVmKiB: number;
}

function memAvailableKiB(): number {
  return Number(/^MemAvailable:\s+(\d+) kB/m.exec(readFileSync("/proc/meminfo", "utf8"))?.[1]);
}

const tap = (i: number): string => `tvdense${i}`;

function makeTaps(n: number): void {
  for (let i = 0; i < n; i++) {
    execFileSync("ip", ["tuntap", "add", "dev", tap(i), "mode", "tap"], { timeout: SYNC_TIMEOUT_MS });
    execFileSync("ip", ["link", "set", tap(i), "up"], { timeout: SYNC_TIMEOUT_MS });
  }
}

function removeTaps(n: number): void {
  for (let i = 0; i < n; i++) {
    try {
      execFileSync("ip", ["link", "del", tap(i)], { stdio: "ignore", timeout: SYNC_TIMEOUT_MS });
    } catch {
      /* never made */
    }
  }
}

function commandFor(who: "typevisor" | "qemu", i: number): [string, string[]] {
  const img = imagePaths("minimal");
  const cmdline = `console=ttyS0 panic=-1 ${runScriptArg(`echo ${MARK}; sleep 100000`)}`;
  if (who === "typevisor") {
    // With the node options the daemon starts every VMM with (engine/native.ts).
    return [process.execPath, [...VMM_NODE_FLAGS, BIN, "run", "--no-lab", "--no-reboot", "--image", "minimal", "--memory", String(MEMORY_MIB), "--cmdline", cmdline,
      "--disk", `${img.rootfs},readonly=on`, "--net", `tap=${tap(i)}`, "--rng"]];
  }
  return ["qemu-system-x86_64", [
    "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", String(MEMORY_MIB),
    "-nographic", "-nodefaults", "-no-user-config", "-serial", "stdio", "-no-reboot",
    "-kernel", img.kernel, "-initrd", img.initrd, "-append", cmdline,
    "-drive", `id=d0,file=${img.rootfs},format=raw,if=none,readonly=on`, "-device", "virtio-blk-device,drive=d0",
    "-netdev", `tap,id=n0,ifname=${tap(i)},script=no,downscript=no,vhost=off`, "-device", "virtio-net-device,netdev=n0",
    "-device", "virtio-rng-device",
  ]];
}

/** N VMs of one VMM, started one after the other (each up before the next), measured together. */
async function round(who: "typevisor" | "qemu", count: number): Promise<Round> {
  const before = memAvailableKiB();
  const procs: ConsoleProcess[] = [];
  const firstLines: number[] = [];
  try {
    for (let i = 0; i < count; i++) {
      const [cmd, args] = commandFor(who, i);
      const p = new ConsoleProcess(cmd, args);
      procs.push(p);
      await p.waitFor(/Linux version/, 0, 300_000);
      firstLines.push(performance.now() - p.t0);
      await p.waitFor(new RegExp(USERSPACE_UP_LINE), 0, 300_000);
      await p.waitFor(new RegExp(MARK), 0, 300_000);
      // A line per VM: the lab stops a command that stays silent for 10 minutes, and a round of 30 takes longer.
      console.log(`  ${who} ${i + 1}/${count} up: first line after ${(firstLines[i]! / 1000).toFixed(1)} s, userspace after ${((performance.now() - p.t0) / 1000).toFixed(1)} s`);
    }
    await new Promise((r) => setTimeout(r, SETTLE_MS));
    const after = memAvailableKiB();
    const samples = procs.map((p, i) => ({ ...processMemory(p.child.pid!, MEMORY_MIB), firstLineMs: firstLines[i]! }));
    return { count, samples, hostPerVmKiB: (before - after) / count };
  } finally {
    for (const p of procs) p.kill();
    await Promise.all(procs.map((p) => p.exited.catch(() => undefined)));
  }
}

async function main(): Promise<void> {
  const most = Math.max(...COUNTS);
  console.log(`bench/density: ${COUNTS.join(", ")} VMs at once per VMM; guest ${MEMORY_MIB} MiB, 1 vCPU, minimal image, read-only disk + net (own TAP) + rng; measured after ${SETTLE_MS / 1000} s idle`);
  removeTaps(most);
  makeTaps(most);
  const results: { count: number; typevisor: Round; qemu: Round }[] = [];
  try {
    for (const count of COUNTS) {
      const ours = await round("typevisor", count);
      const qemu = await round("qemu", count);
      results.push({ count, typevisor: ours, qemu });
      const mib = (f: (s: Sample) => number) => [ours.samples.map((s) => f(s) / 1024), qemu.samples.map((s) => f(s) / 1024)] as const;
      console.log(compare(`[${count} VMs] VMM RSS beyond guest pages, median (MiB)`, ...mib((s) => s.rssKiB - s.guestRssKiB)));
      console.log(compare(`[${count} VMs] VMM PSS beyond guest pages, median (MiB)`, ...mib((s) => s.pssKiB - s.guestPssKiB)));
      console.log(compare(`[${count} VMs] VMM USS beyond guest pages, median (MiB)`, ...mib((s) => s.ussKiB - s.guestUssKiB)));
      console.log(compare(`[${count} VMs] of which in file-backed mappings (text, libraries), median (MiB)`, ...mib((s) => s.fileUssKiB)));
      console.log(compare(`[${count} VMs] guest pages touched, median (MiB)`, ...mib((s) => s.guestRssKiB)));
      console.log(compare(`[${count} VMs] host memory per VM (MemAvailable drop / N, MiB)`, [ours.hostPerVmKiB / 1024], [qemu.hostPerVmKiB / 1024]));
      console.log(compare(`[${count} VMs] process start to the kernel's first line, median (ms)`, ours.samples.map((s) => s.firstLineMs), qemu.samples.map((s) => s.firstLineMs), 0));
      console.log(`[${count} VMs] threads per VMM, median: typevisor ${median(ours.samples.map((s) => s.threads))}, qemu ${median(qemu.samples.map((s) => s.threads))}`);
    }
  } finally {
    removeTaps(most);
  }
  console.log(JSON.stringify({ bench: "density", date: new Date().toISOString(), where: kvmHostKind() === "hardware" ? "lab (nested KVM under TCG)" : "unknown", results }));
}

await main();
