/**
 * bench/create: creating a VM with a 20 GiB disk from the minimal image through the daemon, as a
 * linked clone (a qcow2 overlay on a shared base, the default) against a full copy
 * (`diskFormat: "raw"`): wall time of each create and the bytes its disk takes on the host. The
 * first linked clone of an image and size also makes the base (copy + e2fsck + resize2fs, once);
 * the ones after it only write an overlay of a few clusters. QEMU's peers, by hand, in the same
 * run: `qemu-img create -f qcow2 -b BASE` (an overlay) and `cp` + `truncate` + `e2fsck` +
 * `resize2fs` (a full copy grown to the size). No guest boots, so it runs on this host.
 *
 * Run: npm run bench:create    N: TYPEVISOR_BENCH_VMS (default 3)
 */
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdtempSync, readdirSync, rmSync, statSync, truncateSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { imagePaths } from "../src/images/image.js";
import { startDaemon } from "../test/helpers/daemon.js";
import { compare, median } from "./lib.js";

const N = Number(process.env["TYPEVISOR_BENCH_VMS"] ?? 3);
const SIZE = "20G";
const SIZE_BYTES = 20 * 2 ** 30;
const MiB = 2 ** 20;

const blocks = (p: string): number => statSync(p).blocks * 512;
const mib = (b: number): string => (b / MiB).toFixed(2);

async function main(): Promise<void> {
  const rootfs = imagePaths("minimal").rootfs;
  const home = mkdtempSync(join(tmpdir(), "tvbench-create-"));
  const scratch = mkdtempSync(join(tmpdir(), "tvbench-create-qemu-"));
  // 2 × N disks of 20 GiB are more than a small host's filesystem: the budget is not what is measured.
  const d = await startDaemon({ home, args: ["--disk-overcommit", "64"] });
  const results: { kind: string; ms: number[]; bytes: number[] } [] = [];
  try {
    for (const [kind, format] of [["linked clone (qcow2)", "qcow2"], ["full copy (raw)", "raw"]] as const) {
      const ms: number[] = [];
      const bytes: number[] = [];
      for (let i = 0; i < N; i++) {
        const t0 = performance.now();
        const vm = await d.client.createVm({ name: `${format}-${i}`, image: "minimal", diskSize: SIZE, diskFormat: format });
        ms.push(performance.now() - t0);
        bytes.push(vm.disks[0]!.allocatedBytes);
      }
      results.push({ kind, ms, bytes });
    }
    const bases = readdirSync(join(home, "bases")).map((f) => blocks(join(home, "bases", f)));

    // QEMU's peers, by hand.
    const base = join(scratch, "base.raw");
    const qOverlay: number[] = [];
    const qOverlayBytes: number[] = [];
    const qCopy: number[] = [];
    const qCopyBytes: number[] = [];
    copyFileSync(rootfs, base);
    truncateSync(base, SIZE_BYTES);
    execFileSync("e2fsck", ["-fp", base]);
    execFileSync("resize2fs", [base], { stdio: "ignore" });
    for (let i = 0; i < N; i++) {
      const ov = join(scratch, `ov${i}.qcow2`);
      let t0 = performance.now();
      execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, ov, SIZE]);
      qOverlay.push(performance.now() - t0);
      qOverlayBytes.push(blocks(ov));
      const copy = join(scratch, `copy${i}.raw`);
      t0 = performance.now();
      execFileSync("cp", ["--reflink=auto", "--sparse=always", rootfs, copy]);
      truncateSync(copy, SIZE_BYTES);
      execFileSync("e2fsck", ["-fp", copy]);
      execFileSync("resize2fs", [copy], { stdio: "ignore" });
      qCopy.push(performance.now() - t0);
      qCopyBytes.push(blocks(copy));
    }

    const [clone, copy] = results as [(typeof results)[0], (typeof results)[0]];
    console.log(`bench create: ${N} VMs each way, ${SIZE} disks from the minimal image (rootfs ${mib(statSync(rootfs).size)} MiB), ${new Date().toISOString()}`);
    console.log(`  linked clone: first ${clone.ms[0]!.toFixed(0)} ms (makes the base: ${bases.map(mib).join(", ")} MiB on the host), then ${clone.ms.slice(1).map((x) => x.toFixed(0)).join(", ")} ms; overlay ${clone.bytes.map(mib).join(", ")} MiB`);
    console.log(`  full copy:    ${copy.ms.map((x) => x.toFixed(0)).join(", ")} ms; ${copy.bytes.map(mib).join(", ")} MiB each`);
    console.log(`  create ms, linked clone after the first vs full copy: ${median(clone.ms.slice(1)).toFixed(1)} vs ${median(copy.ms).toFixed(1)}, ratio ${(median(clone.ms.slice(1)) / median(copy.ms)).toFixed(3)}`);
    console.log(`  ${compare("create ms, linked clone after the first (ms)", clone.ms.slice(1), qOverlay)} (qemu: qemu-img create -b)`);
    console.log(`  ${compare("create ms, full copy (ms)", copy.ms, qCopy)} (qemu: cp + truncate + e2fsck + resize2fs)`);
    console.log(`  bytes on the host per VM: clone ${mib(median(clone.bytes))} MiB (qemu-img overlay ${mib(median(qOverlayBytes))}), full copy ${mib(median(copy.bytes))} MiB (by hand ${mib(median(qCopyBytes))})`);
  } finally {
    for (const vm of await d.client.listVms().catch(() => [])) await d.client.removeVm(vm.name).catch(() => undefined);
    await d.stop();
    rmSync(home, { recursive: true, force: true });
    rmSync(scratch, { recursive: true, force: true });
  }
}

await main();
