/**
 * Storage pools against a real daemon with real VMM processes: pool paths are checked, quotas
 * hold under concurrent creates, a pool with disks cannot be removed, and a pool whose
 * filesystem fills up pauses the VM writing to it (a real tmpfs with size=, a tiny guest that
 * writes its whole disk through virtio-blk: test/fixtures/disk-writer.c) with a vm.paused
 * event naming the filesystem; `vm resume` after freeing space finishes every write, and the
 * qcow2 disk is clean for `qemu-img check`. Needs root (mount).
 */
import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { qemuCheck, qemuRaw } from "../../src/vmm/disk/test-disk.js";
import { checkDiskPattern, DISK_GUEST_DONE, writeDiskGuest } from "../helpers/disk-guest.js";
import { outcome } from "../helpers/thrown.js";
import { BIN, startDaemon, until, type TestDaemon } from "../helpers/daemon.js";
import { pattern, qemuImg } from "../../src/vmm/disk/test-disk.js";

const hasKvm = existsSync("/dev/kvm");
const MiB = 1024 * 1024;

async function message(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    return (e as Error).message;
  }
  return "";
}

describe.skipIf(!hasKvm)("storage pools (real daemon, real VMMs)", () => {
  let d: TestDaemon;
  let dir: string;
  let kernel: string;
  let mnt: string;
  /** Where the daemon and the CLI find images (TYPEVISOR_HOME). */
  let dataHome: string;

  /** The real CLI from dist/, with this test's image store. */
  const tv = (args: string[]) => spawnSync(process.execPath, [BIN, ...args], { encoding: "utf8", env: { ...process.env, TYPEVISOR_HOME: dataHome }, timeout: 60_000 });

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "tvpool-"));
    kernel = join(dir, "disk-writer.bzImage");
    writeDiskGuest(kernel);
    mnt = join(dir, "full");
    mkdirSync(mnt);
    execFileSync("mount", ["-t", "tmpfs", "-o", "size=12m,mode=0700", "tvpool-full", mnt]);
    dataHome = join(dir, "data");
    mkdirSync(dataHome);
    d = await startDaemon({ args: ["--force-kvm", "--allow-files", dir], env: { TYPEVISOR_HOME: dataHome } });
  }, 60_000);

  afterAll(async () => {
    if (d !== undefined) {
      for (const vm of await d.client.listVms().catch(() => [])) await d.client.removeVm(vm.name, { force: true }).catch(() => undefined);
      await d.stop();
    }
    try {
      execFileSync("umount", [mnt]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 60_000);

  it("has a default pool in the data directory, and checks the path of a new one", async () => {
    const pools = await d.client.listPools();
    expect(pools.map((p) => p.name)).toEqual(["default"]);
    expect(pools[0]!.path).toBe(join(d.home, "vms"));
    expect(pools[0]!.capacityBytes).toBeGreaterThan(0);
    const a = join(dir, "a");
    mkdirSync(join(a, "inner"), { recursive: true });
    expect(await outcome(d.client.createPool({ name: "rel", path: "pools/a" }))).toBe("400 INVALID_REQUEST");
    expect(await outcome(d.client.createPool({ name: "dots", path: `${a}/../a` }))).toBe("400 INVALID_REQUEST");
    expect(await outcome(d.client.createPool({ name: "gone", path: join(dir, "nope") }))).toBe("400 POOL_PATH");
    expect(await outcome(d.client.createPool({ name: "file", path: kernel }))).toBe("400 POOL_PATH");
    expect(await outcome(d.client.createPool({ name: "home", path: join(d.home, "bases") }))).toBe("400 POOL_PATH");
    expect(await outcome(d.client.createPool({ name: "dots-home", path: `${d.home}/..` }))).toBe("400 INVALID_REQUEST");
    expect(await message(d.client.createPool({ name: "above-home", path: dirname(d.home) }))).toContain("overlaps the daemon's own directory");
    expect(await outcome(d.client.createPool({ name: "root", path: "/" }))).toBe("400 POOL_PATH");
    expect(await outcome(d.client.createPool({ name: "Bad_Name", path: a }))).toBe("400 INVALID_REQUEST");
    const p = await d.client.createPool({ name: "a", path: a, quota: "10M" });
    expect(p).toMatchObject({ name: "a", path: a, quotaBytes: 10 * MiB, allocatedBytes: 0, availableBytes: 10 * MiB, disks: 0 });
    mkdirSync(join(dir, "b"));
    expect(await outcome(d.client.createPool({ name: "a", path: join(dir, "b") }))).toBe("409 POOL_EXISTS");
    expect(await outcome(d.client.createPool({ name: "inner", path: join(a, "inner") }))).toBe("400 POOL_PATH");
    expect(await outcome(d.client.createPool({ name: "outer", path: dir }))).toBe("400 POOL_PATH");
    // A symlink to a pool's directory is that directory.
    symlinkSync(a, join(dir, "link"));
    expect(await message(d.client.createPool({ name: "link", path: join(dir, "link") }))).toContain(`overlaps pool a (${a})`);
    expect(await outcome(d.client.getPool("nope"))).toBe("404 POOL_NOT_FOUND");
    expect(await outcome(d.client.removePool("default"))).toBe("409 POOL_IN_USE");
  });

  it("puts a VM's disk in its pool, refuses a disk past the quota saying what is free, even to creates side by side", async () => {
    const a = join(dir, "a");
    const spec = (name: string, diskSize: string) => ({ name, kernel, memoryMiB: 64, rng: false, diskSize, pool: "a" });
    expect(await outcome(d.client.createVm({ ...spec("p-none", "1M"), pool: "nope" }))).toBe("404 POOL_NOT_FOUND");
    const msg = await message(d.client.createVm(spec("p-big", "11M")));
    expect(msg).toContain("not enough space in pool a: asked 11.0 MiB, 10.0 MiB free of its 10.0 MiB quota");
    // Five creates of 4 MiB at once against 10 MiB: exactly two fit.
    const results = await Promise.all([1, 2, 3, 4, 5].map((i) => outcome(d.client.createVm(spec(`p-${i}`, "4M")))));
    expect(results.filter((r) => r === "ok").length).toBe(2);
    expect(results.filter((r) => r === "409 INSUFFICIENT_RESOURCES").length).toBe(3);
    const made = (await d.client.listVms()).filter((v) => v.name.startsWith("p-"));
    expect(made.length).toBe(2);
    for (const vm of made) {
      expect(vm.disks[0]).toMatchObject({ pool: "a", format: "qcow2", sizeBytes: 4 * MiB });
      expect(vm.disks[0]!.path).toBe(join(a, `${vm.id}-disk0.qcow2`));
      expect(qemuCheck(vm.disks[0]!.path).status).toBe(0);
    }
    const p = await d.client.getPool("a");
    expect(p).toMatchObject({ allocatedBytes: 8 * MiB, availableBytes: 2 * MiB, disks: 2, vms: made.map((v) => v.name).sort() });
    expect(p.usedBytes).toBeGreaterThan(0);
    expect(p.overcommit).toBe(0.8);
    expect(await d.client.metrics()).toContain('typevisor_pool_bytes{pool="a",kind="allocated"} 8388608');
    // The default pool (and the home's disk budget) do not count them.
    expect((await d.client.getPool("default")).allocatedBytes).toBe(0);
    // A pool with disks stays.
    expect(await message(d.client.removePool("a"))).toContain(`pool a has disks of VMs ${made.map((v) => v.name).sort().join(", ")}`);
    for (const vm of made) await d.client.removeVm(vm.name);
    for (const vm of made) expect(existsSync(vm.disks[0]!.path)).toBe(false);
    expect(await outcome(d.client.removePool("a"))).toBe("ok");
    expect(existsSync(a)).toBe(true);
  }, 60_000);

  it("vm disk add|rm: extra disks in pools (quota checked), only while stopped, handed to the VMM as virtio-blk devices the guest writes", async () => {
    const a2 = join(dir, "a2");
    mkdirSync(a2);
    await d.client.createPool({ name: "a2", path: a2, quota: "3M" });
    const vm = await d.client.createVm({ name: "dd", kernel, memoryMiB: 64, rng: false, diskSize: "1M" });
    expect(vm.disks.map((x) => x.name)).toEqual(["disk0"]);
    let info = await d.client.addDisk("dd", { size: "2M", pool: "a2", format: "raw" });
    expect(info.disks[1]).toMatchObject({ name: "disk1", pool: "a2", format: "raw", sizeBytes: 2 * MiB, path: join(a2, `${vm.id}-disk1.raw`) });
    expect(await message(d.client.addDisk("dd", { size: "2M", pool: "a2" }))).toContain("not enough space in pool a2: asked 2.0 MiB, 1.0 MiB free of its 3.0 MiB quota");
    info = await d.client.addDisk("dd", { size: "1M" });
    expect(info.disks[2]).toMatchObject({ name: "disk2", pool: "default", format: "qcow2", sizeBytes: MiB, path: join(d.home, "vms", vm.id, "disk2.qcow2") });
    expect(await outcome(d.client.addDisk("dd", { size: "1M", format: "vmdk" as "raw" }))).toBe("400 INVALID_REQUEST");
    expect(await outcome(d.client.addDisk("nope", { size: "1M" }))).toBe("404 VM_NOT_FOUND");
    expect((await d.client.getPool("a2")).allocatedBytes).toBe(2 * MiB);

    await d.client.startVm("dd");
    expect(await outcome(d.client.addDisk("dd", { size: "1M" }))).toBe("409 VM_STATE");
    expect(await outcome(d.client.removeDisk("dd", "disk1"))).toBe("409 VM_STATE");
    await until("the guest to write its disks and power off", async () => ((await d.client.getVm("dd")).state === "stopped" ? true : undefined), 60_000);
    const log = (await d.client.console("dd")).toString();
    expect(log).toContain("tv-disk: wrote 3 disks");
    expect(log).not.toContain("I/O error");
    for (const disk of info.disks) {
      const bytes = disk.format === "qcow2" ? qemuRaw(disk.path, join(dir, `${disk.name}.raw`)) : readFileSync(disk.path);
      expect(bytes.length).toBe(disk.sizeBytes);
      expect(checkDiskPattern(bytes)).toBeUndefined();
      if (disk.format === "qcow2") expect(qemuCheck(disk.path).status).toBe(0);
    }

    expect(await outcome(d.client.removeDisk("dd", "disk0"))).toBe("409 VM_STATE");
    expect(await outcome(d.client.removeDisk("dd", "disk9"))).toBe("404 DISK_NOT_FOUND");
    expect(await outcome(d.client.removeDisk("dd", "../x"))).toBe("400 INVALID_REQUEST");
    info = await d.client.removeDisk("dd", "1");
    expect(info.disks.map((x) => x.name)).toEqual(["disk0", "disk2"]);
    expect(existsSync(join(a2, `${vm.id}-disk1.raw`))).toBe(false);
    expect((await d.client.getPool("a2")).allocatedBytes).toBe(0);
    // The free index is taken again.
    info = await d.client.addDisk("dd", { size: "1M", pool: "a2" });
    expect(info.disks.map((x) => x.name)).toEqual(["disk0", "disk2", "disk1"]);
    await d.client.removeVm("dd");
    expect(existsSync(info.disks[2]!.path)).toBe(false);
    await d.client.removePool("a2");
  }, 120_000);

  it("image import: a qcow2 image becomes a base VMs are linked clones of; image rm refuses while they are, naming them", async () => {
    const src = join(dir, "cloud.raw");
    writeFileSync(src, pattern(2 * MiB, 0, 21));
    const q = join(dir, "cloud.qcow2");
    qemuImg(["convert", "-f", "raw", "-O", "qcow2", src, q]);
    const imp = tv(["image", "import", "cloud", q]);
    expect(imp.stderr).toContain("as qcow2 (detected");
    expect(imp.stdout).toMatch(/^cloud: qcow2, 2\.0M virtual/);
    expect(imp.status).toBe(0);
    expect(tv(["image", "ls"]).stdout).toMatch(/DISK IMAGE\s+FORMAT[\s\S]*cloud\s+qcow2\s+2\.0M/);
    const stored = join(dataHome, "images", "cloud", "disk.qcow2");
    const sha = createHash("sha256").update(readFileSync(stored)).digest("hex");
    // A disk image has no kernel: one must be given.
    expect(await outcome(d.client.createVm({ name: "clone", image: "cloud", memoryMiB: 64, rng: false }))).toBe("400 INVALID_REQUEST");
    const vm = await d.client.createVm({ name: "clone", image: "cloud", kernel, memoryMiB: 64, rng: false, diskSize: "3M" });
    const disk = vm.disks[0]!;
    expect(disk).toMatchObject({ image: "cloud", format: "qcow2", sizeBytes: 3 * MiB, backing: join(d.home, "bases", `${sha.slice(0, 16)}-img.qcow2`) });
    expect(disk.allocatedBytes).toBeLessThan(MiB);
    // Before the guest writes, the clone reads as the image (and zeros past it).
    const before = qemuRaw(disk.path, join(dir, "clone0.raw"));
    expect(before.subarray(0, 2 * MiB).equals(pattern(2 * MiB, 0, 21))).toBe(true);

    const rm = tv(["image", "rm", "cloud", "--home", d.home]);
    expect(rm.status).toBe(4);
    expect(rm.stderr).toContain("error[IMAGE_IN_USE]: image cloud has linked clones: VM clone (qcow2 overlays on its base)");
    expect(existsSync(stored)).toBe(true);

    await d.client.startVm("clone");
    await until("the guest to write its disk and power off", async () => ((await d.client.getVm("clone")).state === "stopped" ? true : undefined), 60_000);
    expect((await d.client.console("clone")).toString()).toContain(DISK_GUEST_DONE);
    expect(qemuCheck(disk.path)).toMatchObject({ status: 0 });
    expect(checkDiskPattern(qemuRaw(disk.path, join(dir, "clone1.raw")))).toBeUndefined();
    // Neither the base nor the stored image changed.
    expect(createHash("sha256").update(readFileSync(disk.backing!)).digest("hex")).toBe(sha);
    expect(createHash("sha256").update(readFileSync(stored)).digest("hex")).toBe(sha);

    // With the daemon down, the inventory itself says so.
    await d.stop();
    const offline = tv(["image", "rm", "cloud", "--home", d.home]);
    expect(offline.stderr).toContain("error[IMAGE_IN_USE]");
    expect(offline.status).toBe(4);
    d = await startDaemon({ home: d.home, args: ["--force-kvm", "--allow-files", dir], env: { TYPEVISOR_HOME: dataHome } });
    const forced = tv(["image", "rm", "cloud", "--force", "--home", d.home]);
    expect(forced.status).toBe(0);
    expect(existsSync(stored)).toBe(false);
    expect(existsSync(disk.backing!)).toBe(true);
    await d.client.removeVm("clone");
    // The last clone took its base with it.
    expect(existsSync(disk.backing!)).toBe(false);
  }, 120_000);

  it("a pool whose filesystem fills up pauses the VM with an event naming it; resume after freeing space finishes every write", async () => {
    await d.client.createPool({ name: "full", path: mnt });
    const ballast = join(mnt, "ballast");
    writeFileSync(ballast, Buffer.alloc(8 * MiB, 1));
    const after = (await d.client.events({ limit: 1 })).at(-1)?.seq ?? 0;
    const vm = await d.client.createVm({ name: "filler", kernel, memoryMiB: 64, rng: false, diskSize: "8M", pool: "full" }, { start: true });
    const disk = vm.disks[0]!.path;
    const paused = await until("a vm.paused event for the full disk", async () => (await d.client.events({ after, vm: "filler" })).find((e) => e.type === "vm.paused"), 60_000);
    expect(paused.data).toMatchObject({ reason: "disk-full", errno: "ENOSPC", disk, filesystem: mnt, fsType: "tmpfs" });
    expect(paused.message).toContain(`the filesystem ${mnt} (tmpfs) is full`);
    const shown = await d.client.getVm("filler");
    expect(shown.state).toBe("paused");
    expect(shown.pauseReason).toMatchObject({ kind: "disk-full", disk, filesystem: mnt });
    // A daemon killed meanwhile finds the VM paused and why (no second event).
    await d.stop("SIGKILL");
    d = await startDaemon({ home: d.home, args: ["--force-kvm", "--allow-files", dir], env: { TYPEVISOR_HOME: dataHome } });
    const again = await until("the pause reason after a daemon restart", async () => (await d.client.getVm("filler")).pauseReason, 20_000);
    expect(again).toMatchObject({ kind: "disk-full", disk, filesystem: mnt });
    expect((await d.client.events({ after, vm: "filler" })).filter((e) => e.type === "vm.paused").length).toBe(1);
    const log1 = (await d.client.console("filler")).toString();
    expect(log1).not.toContain(DISK_GUEST_DONE);
    expect(log1).not.toContain("I/O error");

    rmSync(ballast);
    expect((await d.client.resumeVm("filler")).state).toBe("running");
    await until("the guest to finish and power off", async () => ((await d.client.getVm("filler")).state === "stopped" ? true : undefined), 60_000);
    const log = (await d.client.console("filler")).toString();
    expect(log).toContain(DISK_GUEST_DONE);
    expect(log).not.toContain("I/O error");
    expect(qemuCheck(disk)).toMatchObject({ status: 0 });
    const raw = qemuRaw(disk, join(dir, "filler.raw"));
    expect(raw.length).toBe(8 * MiB);
    expect(checkDiskPattern(raw)).toBeUndefined();
    const types = (await d.client.events({ after, vm: "filler" })).map((e) => e.type);
    expect(types).toEqual(expect.arrayContaining(["vm.paused", "vm.resumed", "vm.stopped"]));
    expect(readFileSync(join(d.home, "typevisor.db")).length).toBeGreaterThan(0);
    await d.client.removeVm("filler");
    expect(existsSync(disk)).toBe(false);
    await d.client.removePool("full");
  }, 120_000);
});
