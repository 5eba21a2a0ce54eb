/**
 * bench/control: create + start N VMs from the minimal image through the
 * daemon's API, against doing the same by hand with QEMU (copy the root
 * filesystem, start `qemu-system-x86_64 -M q35 -accel kvm` with a virtio-blk-pci
 * disk and a QMP socket), in one lab run. For each VM: time until its VMM
 * answers on its control socket (our API `start` returns; QEMU's QMP greeting),
 * and until the guest's root filesystem is up. Also the daemon's resident
 * memory with N VMs running, and the median resident memory of one VMM process.
 *
 * Run: npm run bench:control      (boots the lab itself when the host KVM is PVM)
 * N: TYPEVISOR_BENCH_VMS (default 3; the lab passes TYPEVISOR_* variables).
 */
import { spawn, type ChildProcess } from "node:child_process";
import { copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ROOTFS_UP_LINE } from "../src/images/guest-init.js";
import { imagePaths } from "../src/images/image.js";
import { kvmHostKind } from "../src/kvm/kvm.js";
import { startDaemon } from "../test/helpers/daemon.js";
import { compare, median } from "./lib.js";

const N = Number(process.env["TYPEVISOR_BENCH_VMS"] ?? 3);
const MEMORY_MIB = 256;
/** What the daemon boots an image VM with: the image's own command line, root on the first disk. */
const CMDLINE = `${(JSON.parse(readFileSync(imagePaths("minimal").manifest, "utf8")) as { cmdline: string }).cmdline} root=/dev/vda`;

function rssKiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return Number(m?.[1] ?? NaN);
}

async function until(what: string, fn: () => boolean, timeoutMs = 600_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!fn()) {
    if (Date.now() > deadline) throw new Error(`timed out: ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function count(file: string, needle: string): number {
  return existsSync(file) ? readFileSync(file, "utf8").split(needle).length - 1 : 0;
}

interface Sample {
  readyMs: number;
  userspaceMs: number;
}

async function ours(cgroups: boolean): Promise<{ samples: Sample[]; daemonKiB: number; vmmKiB: number[] }> {
  const d = await startDaemon({ home: mkdtempSync(join(tmpdir(), "tvbench-")), args: ["--usage-interval", "5", ...(cgroups ? [] : ["--no-cgroups"])] });
  try {
    const samples: Sample[] = [];
    const vmm: number[] = [];
    for (let i = 0; i < N; i++) {
      const t0 = performance.now();
      const vm = await d.client.createVm({ name: `b${i}`, image: "minimal", memoryMiB: MEMORY_MIB, rng: false }, { start: true });
      const readyMs = performance.now() - t0;
      await until(`b${i} rootfs`, () => count(vm.consoleLog, ROOTFS_UP_LINE) >= 1);
      samples.push({ readyMs, userspaceMs: performance.now() - t0 });
      vmm.push(rssKiB(vm.pid!));
    }
    const daemonKiB = rssKiB(d.proc.pid!);
    for (const v of await d.client.listVms()) await d.client.removeVm(v.name, { force: true });
    return { samples, daemonKiB, vmmKiB: vmm };
  } finally {
    await d.stop();
  }
}

/** Resolves when the QMP server greets (QEMU's monitor is up: the peer of our VMM API answering). */
function qmpGreeting(path: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = connect(path);
    s.once("data", () => {
      s.destroy();
      resolve();
    });
    s.once("error", reject);
  });
}

async function qemu(): Promise<{ samples: Sample[]; vmmKiB: number[] }> {
  const img = imagePaths("minimal");
  const dir = mkdtempSync(join(tmpdir(), "qbench-"));
  const procs: ChildProcess[] = [];
  try {
    const samples: Sample[] = [];
    const vmm: number[] = [];
    for (let i = 0; i < N; i++) {
      const t0 = performance.now();
      const disk = join(dir, `q${i}.raw`);
      const con = join(dir, `q${i}.log`);
      const qmp = join(dir, `q${i}.qmp`);
      copyFileSync(img.rootfs, disk);
      const p = spawn("qemu-system-x86_64", [
        "-M", "q35", "-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", String(MEMORY_MIB),
        "-display", "none", "-nodefaults", "-no-user-config", "-serial", `file:${con}`,
        "-qmp", `unix:${qmp},server=on,wait=off`,
        "-kernel", img.kernel, "-initrd", img.initrd, "-append", CMDLINE,
        "-drive", `file=${disk},if=none,id=d0,format=raw`, "-device", "virtio-blk-pci,drive=d0",
      ], { stdio: "ignore" });
      procs.push(p);
      for (;;) {
        try {
          if (existsSync(qmp)) {
            await qmpGreeting(qmp);
            break;
          }
        } catch {
          /* not listening yet */
        }
        if (p.exitCode !== null) throw new Error(`qemu exited ${p.exitCode}`);
        await new Promise((r) => setTimeout(r, 20));
      }
      const readyMs = performance.now() - t0;
      await until(`q${i} rootfs`, () => count(con, ROOTFS_UP_LINE) >= 1);
      samples.push({ readyMs, userspaceMs: performance.now() - t0 });
      vmm.push(rssKiB(p.pid!));
    }
    return { samples, vmmKiB: vmm };
  } finally {
    for (const p of procs) p.kill("SIGKILL");
    rmSync(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  console.log(`bench/control: ${N} VMs one after another (each left running), minimal image, ${MEMORY_MIB} MiB, 1 vCPU; typevisor through the daemon API, QEMU by hand`);
  const a = await ours(true);
  const b = await qemu();
  // The same without per-VM cgroups: what the limits (cpu.max, memory.max) cost.
  const c = await ours(false);
  for (let i = 0; i < N; i++) {
    const s = (x: Sample | undefined) => `ready ${x?.readyMs.toFixed(0)} ms, rootfs up ${x?.userspaceMs.toFixed(0)} ms`;
    console.log(`VM ${i + 1}: typevisor ${s(a.samples[i])} | qemu ${s(b.samples[i])}`);
  }
  console.log(compare("create+start to VMM control socket ready, median (ms)", a.samples.map((s) => s.readyMs), b.samples.map((s) => s.readyMs), 0));
  console.log(compare("create+start to guest root filesystem up, median (ms)", a.samples.map((s) => s.userspaceMs), b.samples.map((s) => s.userspaceMs), 0));
  console.log(compare("without cgroups: create+start to guest root filesystem up, median (ms)", c.samples.map((s) => s.userspaceMs), b.samples.map((s) => s.userspaceMs), 0));
  console.log(compare("resident memory of one VMM process, median (MiB)", a.vmmKiB.map((k) => k / 1024), b.vmmKiB.map((k) => k / 1024)));
  console.log(`daemon resident memory with ${N} VMs: ${(a.daemonKiB / 1024).toFixed(1)} MiB (QEMU has no daemon; median VMM ${(median(a.vmmKiB) / 1024).toFixed(1)} MiB)`);
  console.log(JSON.stringify({ bench: "control", date: new Date().toISOString(), where: kvmHostKind() === "hardware" ? "lab (nested KVM under TCG)" : "unknown", vms: N, typevisor: a, qemu: b, typevisorNoCgroups: c }));
}

await main();
