/**
 * bench/disk: guest disk throughput on virtio-blk over PCI, typevisor against
 * QEMU (`-M q35 -accel kvm`, virtio-blk-pci, raw image, default cache), same
 * guest kernel and initramfs, same raw image size, inside one lab run.
 * In the guest: busybox dd with O_DIRECT — sequential write and read in 1 MiB
 * blocks, and 4 KiB reads at queue depth 1 (busybox has no random-I/O tool, so
 * this is sequential small-block IOPS; fio would be the next step).
 *
 * Run: npm run bench:disk
 */
import { closeSync, ftruncateSync, openSync, rmSync } from "node:fs";
import { mkdtempSync } from "node:fs";
import { join } from "node:path";
import { runScriptArg } from "../src/images/guest-init.js";
import { imagePaths } from "../src/images/image.js";
import { ConsoleProcess } from "../test/helpers/console-process.js";
import { compare } from "./lib.js";

const RUNS = Number(process.env["BENCH_RUNS"] ?? 3);
const DISK_MIB = 256;
const SEQ_MIB = 128;
const IOPS_COUNT = 8192;
const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;

interface Result {
  writeMBs: number;
  readMBs: number;
  iops: number;
}

// busybox dd prints no rate, so each run is timed with busybox's time applet ("real\t0m 1.23s").
const timed = (tag: string, cmd: string) => `busybox time ${cmd} 2>&1 | grep real | sed 's/^/${tag}: /'`;
const SCRIPT = [
  timed("W", `dd if=/dev/zero of=/dev/vda bs=1M count=${SEQ_MIB} oflag=direct`),
  timed("R", `dd if=/dev/vda of=/dev/null bs=1M count=${SEQ_MIB} iflag=direct`),
  timed("I", `dd if=/dev/vda of=/dev/null bs=4k count=${IOPS_COUNT} iflag=direct`),
].join("; ");

/** Seconds from "TAG: real\tXm Y.YYs". */
function seconds(out: string, tag: string): number {
  const m = new RegExp(`${tag}: real\\s+(\\d+)m ([\\d.]+)s`).exec(out);
  if (m === null) throw new Error(`no ${tag} timing in guest output:\n${out.slice(-1500)}`);
  return Number(m[1]) * 60 + Number(m[2]);
}

async function once(cmd: string, args: string[]): Promise<Result> {
  const p = new ConsoleProcess(cmd, args);
  try {
    await p.waitFor(/typevisor-guest: exit/, 0, 600_000);
    const bytes = SEQ_MIB * 1024 * 1024;
    return { writeMBs: bytes / seconds(p.output, "W") / 1e6, readMBs: bytes / seconds(p.output, "R") / 1e6, iops: IOPS_COUNT / seconds(p.output, "I") };
  } finally {
    p.kill();
  }
}

async function main(): Promise<void> {
  const img = imagePaths("minimal");
  const dir = mkdtempSync(join(process.env["TMPDIR"] ?? "/tmp", "tv-bench-disk-"));
  const disk = join(dir, "disk.raw");
  const fd = openSync(disk, "w");
  ftruncateSync(fd, DISK_MIB * 1024 * 1024);
  closeSync(fd);
  const cmdline = `console=ttyS0 panic=-1 quiet ${runScriptArg(SCRIPT)}`;
  const ours = [BIN, "run", "--no-lab", "--no-reboot", "--image", "minimal", "--memory", "512", "--disk", disk, "--cmdline", cmdline];
  const qemu = [
    "-M", "q35", "-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", "512",
    "-nographic", "-nodefaults", "-no-user-config", "-serial", "stdio", "-no-reboot",
    "-kernel", img.kernel, "-initrd", img.initrd, "-append", cmdline,
    "-drive", `file=${disk},if=none,id=d0,format=raw`, "-device", "virtio-blk-pci,drive=d0",
  ];
  const res: { typevisor: Result[]; qemu: Result[] } = { typevisor: [], qemu: [] };
  console.log(`bench/disk: ${RUNS} runs each, alternating; ${DISK_MIB} MiB raw image on the lab's tmpfs, guest 512 MiB, 1 vCPU`);
  for (let i = 0; i < RUNS; i++) {
    const a = await once(process.execPath, ours);
    res.typevisor.push(a);
    const b = await once("qemu-system-x86_64", qemu);
    res.qemu.push(b);
    const f = (x: Result) => `write ${x.writeMBs.toFixed(1)} MB/s, read ${x.readMBs.toFixed(1)} MB/s, 4k ${x.iops.toFixed(0)} IOPS`;
    console.log(`run ${i + 1}: typevisor ${f(a)} | qemu ${f(b)}`);
  }
  for (const [k, label] of [["writeMBs", "seq write 1 MiB (MB/s)"], ["readMBs", "seq read 1 MiB (MB/s)"], ["iops", "4 KiB read QD1 (IOPS)"]] as const) {
    console.log(compare(label, res.typevisor.map((r) => r[k]), res.qemu.map((r) => r[k])));
  }
  console.log(JSON.stringify({ bench: "disk", date: new Date().toISOString(), runs: RUNS, results: res }));
  rmSync(dir, { recursive: true, force: true });
}

await main();
