/**
 * Snapshots, rollback, clones and their crash safety against a real daemon, real qcow2 files
 * and real VMM processes (tiny guests on this host's /dev/kvm): data written into a VM's disk
 * with QEMU's own qemu-io is there after a rollback to the snapshot it was in, and gone after a
 * rollback to one before it; every file the daemon made passes `qemu-img check`; removing
 * snapshots and VMs frees exactly the layers nothing stands on; a daemon SIGKILLed at each step
 * of a snapshot or rollback (TYPEVISOR_CRASH_AT) leaves, after its restart, the VM as before or
 * the operation finished, with no file the inventory does not name. The memory path (a running
 * guest saved and restored) is the lab's (test/control/snapshots.lab.test.ts).
 */
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TypevisorClient } from "../../src/api/client.js";
import { qemuCheck, qemuRaw } from "../../src/vmm/disk/test-disk.js";
import { checkDiskPattern, DISK_GUEST_DONE, writeDiskGuest } from "../helpers/disk-guest.js";
import { BIN, startDaemon, until, type TestDaemon } from "../helpers/daemon.js";
import { outcome } from "../helpers/thrown.js";
import { writeTinyKernel } from "../helpers/tiny-kernel.js";
import { banners, echoes } from "../helpers/tiny-console.js";
import { VMM_NODE_FLAGS } from "../../src/vmm/isolates.js";
import { STANDBY_REFILL_DELAY_MS } from "../../src/control/standby.js";

const hasKvm = existsSync("/dev/kvm");
const hasQemu = spawnSync("qemu-io", ["--version"]).status === 0;

/** qemu-io on a VM's disk (stopped): write `byte` over the first 64 KiB, or check it reads back. */
function qio(path: string, op: "write" | "read", byte: number, format = "qcow2"): boolean {
  const r = spawnSync("qemu-io", ["-f", format, "-c", `${op} -P ${byte} 0 64k`, path], { encoding: "utf8", timeout: 60_000 });
  return r.status === 0 && !/Pattern verification failed|error/i.test(r.stdout + r.stderr);
}

/** Every qcow2 file under `dirs`, checked by qemu-img: corruptions and leaks both fail. */
function checkAll(dirs: string[]): number {
  let n = 0;
  for (const dir of dirs) {
    if (!existsSync(dir)) continue;
    for (const f of readdirSync(dir, { recursive: true }) as string[]) {
      if (!f.endsWith(".qcow2")) continue;
      const c = qemuCheck(join(dir, f));
      expect(c.status, `${f}: ${JSON.stringify(c.report)}`).toBe(0);
      n++;
    }
  }
  return n;
}

/** Bytes of data a qcow2 file holds (not counting its backing chain). */
function allocated(path: string): number {
  const map = JSON.parse(execFileSync("qemu-img", ["map", "--output=json", "-f", "qcow2", path], { encoding: "utf8", maxBuffer: 64 * 2 ** 20 })) as { length: number; data: boolean; depth: number }[];
  return map.filter((m) => m.data && m.depth === 0).reduce((a, m) => a + m.length, 0);
}

function layers(home: string): string[] {
  const d = join(home, "layers");
  return existsSync(d) ? readdirSync(d).sort() : [];
}

describe.skipIf(!hasKvm || !hasQemu)("snapshots, rollback and clones (real daemon, real qcow2)", () => {
  let d: TestDaemon;
  let dir: string;
  let kernel: string;
  const spec = (name: string, extra: Record<string, unknown> = {}) => ({ name, kernel, memoryMiB: 64, rng: false, diskSize: "64M", ...extra });
  const disk0 = async (c: TypevisorClient, vm: string) => (await c.getVm(vm)).disks[0]!;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "tvsnap-"));
    kernel = join(dir, "tiny.bin");
    writeTinyKernel(kernel);
    d = await startDaemon({ args: ["--force-kvm", "--no-sandbox", "--allow-files", dir] });
  }, 60_000);

  afterAll(async () => {
    if (d !== undefined) {
      for (const vm of await d.client.listVms().catch(() => [])) await d.client.removeVm(vm.name, { force: true }).catch(() => undefined);
      await d.stop();
    }
    rmSync(dir, { recursive: true, force: true });
  }, 60_000);

  it("takes disk snapshots of a stopped VM, rolls back to any of them, and keeps a tree", async () => {
    const c = d.client;
    await c.createVm(spec("s1"));
    const top = (await disk0(c, "s1")).path;
    expect(qio(top, "write", 0x11)).toBe(true);

    const one = await c.createSnapshot("s1", { name: "one", description: "before the upgrade" });
    expect(one).toMatchObject({ name: "one", vm: "s1", memory: false, vmState: "stopped", current: true, description: "before the upgrade" });
    expect(one.parent).toBeUndefined();
    // The VM goes on on a new empty overlay under the same name; the old top is a read-only layer.
    const after = await disk0(c, "s1");
    expect(after.path).toBe(top);
    expect(after.backing).toBe(one.disks[0]!.layer);
    expect(statSync(one.disks[0]!.layer).mode & 0o777).toBe(0o444);
    expect(qio(top, "read", 0x11)).toBe(true);
    expect(qio(top, "write", 0x22)).toBe(true);

    const two = await c.createSnapshot("s1", { name: "two" });
    expect(two.parent).toBe("one");
    expect(qio(top, "write", 0x33)).toBe(true);

    const vm = await c.rollbackSnapshot("s1", "one");
    expect(vm.state).toBe("defined");
    expect(qio(top, "read", 0x11)).toBe(true);
    await c.rollbackSnapshot("s1", "two");
    expect(qio(top, "read", 0x22)).toBe(true);
    await c.rollbackSnapshot("s1", "one");
    // A snapshot taken after a rollback branches from the snapshot rolled back to.
    const three = await c.createSnapshot("s1", { name: "three" });
    expect(three.parent).toBe("one");
    const list = await c.listSnapshots("s1");
    expect(list.map((s) => [s.name, s.parent ?? null, s.current])).toEqual([["one", null, false], ["two", "one", false], ["three", "one", true]]);
    // qemu-img sees the same chain the inventory does.
    const chain = JSON.parse(execFileSync("qemu-img", ["info", "--output=json", "--backing-chain", top], { encoding: "utf8" })) as { filename: string }[];
    expect(chain.map((x) => x.filename)).toEqual([top, three.disks[0]!.layer, one.disks[0]!.layer]);
    expect(checkAll([d.home])).toBeGreaterThanOrEqual(4);

    // The CLI draws the tree.
    const ls = spawnSync(process.execPath, [BIN, "vm", "snapshot", "ls", "s1", "--socket", d.socket], { encoding: "utf8", timeout: 30_000 });
    expect(ls.status, ls.stderr).toBe(0);
    expect(ls.stdout).toMatch(/^one\s.*\n├─ two\s.*\n└─ three \*\s/m);

    // rm: "two" stands on nothing else: its layer goes; "one" has a child and the VM on it: kept.
    await c.removeSnapshot("s1", "two");
    expect(layers(d.home)).toEqual([one.disks[0]!.layer, three.disks[0]!.layer].map((p) => p.split("/").pop()).sort());
    // "one" has one file on it ("three"'s layer): merged into it (qemu-img rebase), then freed.
    await c.removeSnapshot("s1", "one");
    expect((await c.listSnapshots("s1")).map((s) => [s.name, s.parent ?? null])).toEqual([["three", null]]);
    expect(layers(d.home)).toEqual([three.disks[0]!.layer.split("/").pop()]);
    expect(statSync(three.disks[0]!.layer).mode & 0o777).toBe(0o444);
    expect(qio(top, "read", 0x11)).toBe(true);
    expect((await disk0(c, "s1")).backing).toBe(three.disks[0]!.layer);
    expect(checkAll([d.home])).toBe(2);
    await c.removeVm("s1");
    expect(layers(d.home)).toEqual([]);
  }, 120_000);

  it("freezes a raw disk and a disk in another pool where they are (layers in the pool's own layers/)", async () => {
    const c = d.client;
    const poolDir = join(dir, "pool1");
    execFileSync("mkdir", ["-p", poolDir]);
    await c.createPool({ name: "p1", path: poolDir });
    await c.createVm(spec("mixed", { diskFormat: "raw", diskSize: "16M" }));
    await c.addDisk("mixed", { size: "16M", pool: "p1" });
    const [raw, pooled] = (await c.getVm("mixed")).disks;
    expect(raw!.format).toBe("raw");
    expect(qio(raw!.path, "write", 0x71, "raw")).toBe(true);
    expect(qio(pooled!.path, "write", 0x72)).toBe(true);
    const s = await c.createSnapshot("mixed", { name: "s" });
    const [l0, l1] = s.disks;
    expect(l0!.layer).toBe(join(d.home, "layers", `${s.id}-disk0.raw`));
    expect(l1!.layer).toBe(join(poolDir, "layers", `${s.id}-disk1.qcow2`));
    const [top0, top1] = (await c.getVm("mixed")).disks;
    // The raw disk goes on as a qcow2 overlay on its frozen self.
    expect(top0).toMatchObject({ path: raw!.path.replace(/\.raw$/, ".qcow2"), format: "qcow2", backing: l0!.layer });
    expect(top1).toMatchObject({ path: pooled!.path, format: "qcow2", backing: l1!.layer, pool: "p1" });
    expect(qio(top0!.path, "write", 0x73)).toBe(true);
    expect(qio(top1!.path, "write", 0x74)).toBe(true);
    await c.rollbackSnapshot("mixed", "s");
    expect(qio(top0!.path, "read", 0x71)).toBe(true);
    expect(qio(top1!.path, "read", 0x72)).toBe(true);
    expect(checkAll([d.home, poolDir])).toBeGreaterThanOrEqual(3);
    await c.removeVm("mixed");
    expect(readdirSync(join(poolDir, "layers"))).toEqual([]);
    expect(layers(d.home)).toEqual([]);
    await c.removePool("p1");
  }, 60_000);

  it.skipIf(process.getuid?.() !== 0)("under the VMM sandbox (root): disk snapshots and linked clones run (layers are backing files a jailed VMM is given)", async () => {
    const sd = await startDaemon({ args: ["--force-kvm", "--allow-files", dir] });
    try {
      const c = sd.client;
      await c.createVm(spec("jailed"));
      expect(qio((await disk0(c, "jailed")).path, "write", 0x5a)).toBe(true);
      await c.createSnapshot("jailed", { name: "d" });
      const clone = await c.cloneVm("jailed", { name: "jailed-c", snapshot: "d", start: true });
      expect(clone.state).toBe("running");
      await until("banner", async () => (await banners(c, "jailed-c")) >= 1 || undefined);
      // No standby VMMs under the sandbox: a jail is made for one VM (docs/snapshots.md).
      expect((await c.host()).standbyVmms.size).toBe(0);
      await c.removeVm("jailed-c", { force: true });
      await c.removeVm("jailed");
    } finally {
      await sd.stop();
    }
  }, 120_000);

  it("refuses what it cannot do with a clear answer", async () => {
    const c = d.client;
    await c.createVm(spec("s2"));
    expect(await outcome(c.createSnapshot("nope", { name: "a" }))).toBe("404 VM_NOT_FOUND");
    expect(await outcome(c.createSnapshot("s2", { name: "Bad Name" }))).toBe("400 INVALID_REQUEST");
    expect(await outcome(c.createSnapshot("s2", { name: "a", memory: true }))).toBe("409 VM_STATE");
    expect(await outcome(c.createSnapshot("s2", { name: "a", colour: "blue" } as never))).toBe("400 INVALID_REQUEST");
    await c.createSnapshot("s2", { name: "a" });
    expect(await outcome(c.createSnapshot("s2", { name: "a" }))).toBe("409 SNAPSHOT_EXISTS");
    expect(await outcome(c.rollbackSnapshot("s2", "zz"))).toBe("404 SNAPSHOT_NOT_FOUND");
    expect(await outcome(c.removeSnapshot("s2", "zz"))).toBe("404 SNAPSHOT_NOT_FOUND");
    // A disk added since: rolling back would have to drop it.
    await c.addDisk("s2", { size: "8M" });
    expect(await outcome(c.rollbackSnapshot("s2", "a"))).toBe("409 SNAPSHOT_MISMATCH");
    expect(await outcome(c.cloneVm("s2", { name: "s2" }))).toBe("409 VM_EXISTS");
    expect(await outcome(c.cloneVm("s2", { name: "x", snapshot: "zz" }))).toBe("404 SNAPSHOT_NOT_FOUND");
    // A caller scoped to s2: its snapshots yes, another VM's no (404, as for a VM that is not
    // there), and a clone only under a name in its scope.
    await c.createVm(spec("other"));
    await c.addUser({ name: "carol", role: "operator", scopes: ["vm:s2", "vm:s2-mine"] });
    const carol = new TypevisorClient({ socketPath: d.socket }, { token: (await c.createToken({ user: "carol" })).token });
    expect((await carol.listSnapshots("s2")).map((x) => x.name)).toEqual(["a"]);
    expect(await outcome(carol.listSnapshots("other"))).toBe("404 VM_NOT_FOUND");
    expect(await outcome(carol.createSnapshot("other", { name: "b" }))).toBe("404 VM_NOT_FOUND");
    expect(await outcome(carol.cloneVm("s2", { name: "stolen", snapshot: "a" }))).toBe("403 FORBIDDEN");
    expect((await carol.cloneVm("s2", { name: "s2-mine", snapshot: "a" })).name).toBe("s2-mine");
    await c.removeVm("s2-mine");
    await c.removeVm("other");
    await c.removeVm("s2");
    expect(layers(d.home)).toEqual([]);
  }, 60_000);

  it("clones: linked (an overlay on the snapshot's layer) and full (a flat copy), each a VM of its own that starts", async () => {
    const c = d.client;
    await c.createVm(spec("src"));
    const top = (await disk0(c, "src")).path;
    expect(qio(top, "write", 0x44)).toBe(true);
    await c.createSnapshot("src", { name: "gold" });
    expect(qio(top, "write", 0x55)).toBe(true);

    const linked = await c.cloneVm("src", { name: "lc", snapshot: "gold", start: true });
    expect(linked.state).toBe("running");
    const lgold = (await c.getSnapshot("src", "gold")).disks[0]!.layer;
    expect(linked.disks[0]!.backing).toBe(lgold);
    const full = await c.cloneVm("src", { name: "fc", snapshot: "gold", full: true });
    expect(full.state).toBe("defined");
    expect(full.disks[0]!.backing).toBeUndefined();
    // Without --snapshot: one is taken now (clone-NEW), with what the disk holds now.
    const now = await c.cloneVm("src", { name: "nc" });
    expect((await c.listSnapshots("src")).map((s) => s.name)).toEqual(["gold", "clone-nc"]);
    await c.stopVm("lc");
    expect(qio(linked.disks[0]!.path, "read", 0x44)).toBe(true);
    expect(qio(full.disks[0]!.path, "read", 0x44)).toBe(true);
    expect(qio(now.disks[0]!.path, "read", 0x55)).toBe(true);
    expect(checkAll([d.home])).toBeGreaterThanOrEqual(6);
    const ev = await c.events({ vm: "lc" });
    expect(ev.map((e) => e.type)).toContain("vm.cloned");

    // The source goes with its snapshots; the layers its clones stand on stay until they go too.
    await c.removeVm("src");
    expect(existsSync(lgold)).toBe(true);
    expect(qio(linked.disks[0]!.path, "read", 0x44)).toBe(true);
    await c.startVm("lc");
    await c.removeVm("lc", { force: true });
    await c.removeVm("nc");
    expect(existsSync(lgold)).toBe(false);
    await c.removeVm("fc");
    expect(layers(d.home)).toEqual([]);
  }, 120_000);


  it("snapshots a running VM with its memory: it goes on without a boot on a new overlay; rollback and a clone run from the saved moment", async () => {
    const c = d.client;
    const first = await c.createVm(spec("run1"), { start: true });
    await until("banner", async () => (await banners(c, "run1")) >= 1 || undefined);
    await echoes(c, "run1", "before-1");
    const boots = await banners(c, "run1");

    const s = await c.createSnapshot("run1", { name: "m1" });
    expect(s).toMatchObject({ memory: true, vmState: "running", current: true });
    expect(s.sizeBytes).toBeGreaterThan(0);
    expect(existsSync(join(d.home, "snapshots", s.id, "state.json"))).toBe(true);
    const after = await c.getVm("run1");
    // A new VMM, restored on the new overlay: the guest answers, and did not boot again.
    expect(after.state).toBe("running");
    expect(after.pid).not.toBe(first.pid);
    expect(after.disks[0]!.backing).toBe(s.disks[0]!.layer);
    await echoes(c, "run1", "after-2");
    expect(await banners(c, "run1")).toBe(boots);

    // Disk-only of a running VM: it runs on, its saved state for the restart thrown away.
    const dOnly = await c.createSnapshot("run1", { name: "d1", memory: false });
    expect(dOnly).toMatchObject({ memory: false, vmState: "running", parent: "m1" });
    expect((await c.getVm("run1")).state).toBe("running");
    expect(readdirSync(join(d.home, "snapshots"))).toEqual([s.id]);
    await echoes(c, "run1", "after-3");

    // A paused VM is saved paused, and comes back paused.
    await c.pauseVm("run1");
    const p = await c.createSnapshot("run1", { name: "p1" });
    expect(p).toMatchObject({ memory: true, vmState: "paused" });
    expect((await c.getVm("run1")).state).toBe("paused");
    await c.resumeVm("run1");

    // Rollback to the memory snapshot, from a stopped VM: running again, from the saved moment.
    await c.stopVm("run1");
    const back = await c.rollbackSnapshot("run1", "m1");
    expect(back.state).toBe("running");
    await echoes(c, "run1", "rolled-4");
    expect(await banners(c, "run1")).toBe(boots);
    expect((await c.rollbackSnapshot("run1", "p1")).state).toBe("paused");
    // Rollback to the disk-only one boots.
    expect((await c.rollbackSnapshot("run1", "d1")).state).toBe("running");
    await until("a new boot", async () => (await banners(c, "run1")) > boots || undefined);

    // A clone of the memory snapshot runs at once, without a boot of its own.
    const clone = await c.cloneVm("run1", { name: "run1-c", snapshot: "m1" });
    expect(clone.state).toBe("running");
    await echoes(c, "run1-c", "clone-5");
    expect(await banners(c, "run1-c")).toBe(0);
    expect(clone.disks[0]!.backing).toBe(s.disks[0]!.layer);
    expect((await c.events({ vm: "run1" })).map((e) => e.type)).toEqual(expect.arrayContaining(["vm.snapshot-created", "vm.rolled-back"]));
    await c.removeVm("run1-c", { force: true });
    await c.removeVm("run1", { force: true });
    expect(existsSync(join(d.home, "snapshots")) ? readdirSync(join(d.home, "snapshots")) : []).toEqual([]);
    expect(layers(d.home)).toEqual([]);
  }, 180_000);

  it("a guest writing its disk through virtio-blk when snapshotted goes on on the new overlay and finishes: every sector right", async () => {
    const c = d.client;
    const writer = join(dir, "disk-writer.bzImage");
    if (!existsSync(writer)) writeDiskGuest(writer);
    await c.createVm({ name: "dw", kernel: writer, memoryMiB: 64, rng: false, diskSize: "16M" }, { start: true });
    try {
      await until("the guest writing", async () => /tv-disk: \d+ MiB/.test((await c.console("dw")).toString()) || undefined, 60_000).catch(async (e: unknown) => {
        throw new Error(`${String(e)}; console: ${JSON.stringify((await c.console("dw")).toString().slice(-800))}; vm: ${JSON.stringify(await c.getVm("dw"))}`);
      });
      const s = await c.createSnapshot("dw", { name: "mid" });
      expect(s.vmState).toBe("running");
      await until("the guest to finish and power off", async () => ((await c.getVm("dw")).state === "stopped" ? true : undefined), 60_000);
      const log = (await c.console("dw")).toString();
      expect(log).toContain(DISK_GUEST_DONE);
      const top = (await c.getVm("dw")).disks[0]!;
      expect(top.backing).toBe(s.disks[0]!.layer);
      // Part of what it wrote is in the frozen layer, the rest in the overlay: together, all of it.
      expect(allocated(s.disks[0]!.layer)).toBeGreaterThan(0);
      expect(allocated(top.path)).toBeGreaterThan(0);
      expect(checkDiskPattern(qemuRaw(top.path, join(dir, "dw.raw")))).toBeUndefined();
      expect(checkAll([d.home])).toBeGreaterThanOrEqual(2);
    } finally {
      await c.removeVm("dw", { force: true });
    }
  }, 180_000);

  /** For until(): true once process `pid` is gone. */
  const gone = (pid: number): true | undefined => {
    try {
      process.kill(pid, 0);
      return undefined;
    } catch {
      return true;
    }
  };

  it("restores through a standby VMM when one is ready (--standby-vmms): no process start to wait for", async () => {
    const sd = await startDaemon({ args: ["--force-kvm", "--no-sandbox", "--allow-files", dir, "--standby-vmms", "1"] });
    try {
      const c = sd.client;
      const waiting = async (): Promise<number[]> => {
        const f = readdirSync(join(sd.home, "standby")).filter((x) => x.endsWith(".pid"));
        return f.map((x) => Number(readFileSync(join(sd.home, "standby", x), "utf8").split(" ")[0]));
      };
      const ready = async (): Promise<number> => {
        await until("a standby VMM ready", async () => (await c.host()).standbyVmms.ready === 1 || undefined, 30_000);
        const pids = await waiting();
        expect(pids).toHaveLength(1);
        return pids[0]!;
      };
      await c.createVm(spec("sb1", { diskSize: undefined }), { start: true });
      await until("banner", async () => (await banners(c, "sb1")) >= 1 || undefined);
      // Nothing to restore yet: no standby is kept.
      expect((await c.host()).standbyVmms).toEqual({ size: 1, ready: 0 });
      expect(await waiting()).toEqual([]);
      await c.createSnapshot("sb1", { name: "m" });
      let standby = await ready();
      // Node started with the VMM's isolate limits, as every VMM the daemon starts (vmm/isolates.ts)
      expect(readFileSync(`/proc/${standby}/cmdline`, "utf8").split("\0")).toEqual(expect.arrayContaining([...VMM_NODE_FLAGS]));
      // Started for the snapshot (the pool's template), whose VM it builds ahead.
      const templateArg = (pid: number): string | undefined => {
        const a = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
        return a[a.indexOf("--template") + 1];
      };
      const m = (await c.listSnapshots("sb1")).find((x) => x.name === "m")!;
      expect(templateArg(standby)).toBe(join(sd.home, "snapshots", m.id));
      const taking = Date.now();
      await c.rollbackSnapshot("sb1", "m");
      // The one behind it starts STANDBY_REFILL_DELAY_MS after the take, not beside the restored
      // guest's first steps (checked when the rollback itself took well under that delay).
      if (Date.now() - taking < STANDBY_REFILL_DELAY_MS - 1000) expect(await waiting()).toEqual([]);
      // The VM's new VMM is the standby that was waiting; another one waits behind it.
      let vm = await c.getVm("sb1");
      expect(vm.pid, sd.log().split("\n").filter((l) => l.includes("standby")).join("\n")).toBe(standby);
      expect(readFileSync(join(sd.home, "vms", vm.id, "vmm.log"), "utf8")).toContain("on standby at");
      expect(readFileSync(join(sd.home, "vms", vm.id, "vmm.log"), "utf8")).toContain("into the VM this standby built ahead");
      await echoes(c, "sb1", "from-standby");
      standby = await ready();
      expect(standby).not.toBe(vm.pid);
      const clone = await c.cloneVm("sb1", { name: "sb1-c", snapshot: "m" });
      expect(clone.pid, sd.log().split("\n").filter((l) => l.includes("standby")).join("\n")).toBe(standby);
      await echoes(c, "sb1-c", "clone-standby");
      expect(await banners(c, "sb1-c")).toBe(0);
      // A clone of another snapshot takes the standby all the same (its VM is built as usual), and
      // turns the pool to that snapshot; removing it ends the standby started for it.
      const m2 = await c.createSnapshot("sb1", { name: "m2" });
      standby = await ready();
      expect(templateArg(standby)).toBe(join(sd.home, "snapshots", m.id));
      const c2 = await c.cloneVm("sb1", { name: "sb1-c2", snapshot: "m2" });
      expect(c2.pid).toBe(standby);
      expect(readFileSync(join(sd.home, "vms", c2.id, "vmm.log"), "utf8")).not.toContain("built ahead");
      await echoes(c, "sb1-c2", "clone-other");
      standby = await ready();
      expect(templateArg(standby)).toBe(join(sd.home, "snapshots", m2.id));
      await c.removeVm("sb1-c2", { force: true });
      await c.removeSnapshot("sb1", "m2");
      await until("the standby for m2 ended", () => gone(standby));
      // A daemon killed leaves its standbys: the next one ends them, and keeps its VMs.
      standby = await ready();
      vm = await c.getVm("sb1");
      await sd.stop("SIGKILL");
      process.kill(standby, 0);
      const again = await startDaemon({ home: sd.home, args: ["--force-kvm", "--no-sandbox", "--allow-files", dir, "--standby-vmms", "0"] });
      try {
        await until("the old standby ended", () => gone(standby));
        expect((await again.client.getVm("sb1")).pid).toBe(vm.pid);
        expect(readdirSync(join(sd.home, "standby"))).toEqual([]);
        for (const v of await again.client.listVms()) await again.client.removeVm(v.name, { force: true });
      } finally {
        await again.stop();
      }
    } finally {
      await sd.stop();
    }
  }, 180_000);

  describe("a daemon killed in the middle", () => {
    /** Run `op` on a daemon that dies at `step`, restart it on the same home; the new daemon. */
    async function killedAt(step: string, op: (c: TypevisorClient) => Promise<unknown>): Promise<TestDaemon> {
      await d.stop();
      const dying = await startDaemon({ home: d.home, args: ["--force-kvm", "--no-sandbox", "--allow-files", dir], env: { TYPEVISOR_CRASH_AT: step } });
      await op(dying.client).then(
        () => expect.fail(`the daemon did not die at ${step}`),
        () => undefined,
      );
      await dying.stop("SIGKILL");
      d = await startDaemon({ home: d.home, args: ["--force-kvm", "--no-sandbox", "--allow-files", dir] });
      return d;
    }

    /** Files in the VM's directory and the layers directory, temporary ones included. */
    const files = (vmDir: string): string[] => [...readdirSync(vmDir).filter((f) => f.includes("disk")).sort(), ...layers(d.home)];

    it.each(["snapshot:planned", "snapshot:frozen"])("before its commit (%s): the snapshot undone, the disk as it was", async (step) => {
      const name = `k-${step.split(":")[1]!}`;
      await d.client.createVm(spec(name));
      expect(qio((await disk0(d.client, name)).path, "write", 0x66)).toBe(true);
      const before = await disk0(d.client, name);
      const vmDir = (await d.client.getVm(name)).disks[0]!.path.replace(/\/disk0\.qcow2$/, "");
      const filesBefore = files(vmDir);
      await killedAt(step, (c) => c.createSnapshot(name, { name: "x" }));
      expect(await d.client.listSnapshots(name)).toEqual([]);
      expect(await disk0(d.client, name)).toEqual(before);
      expect(files(vmDir)).toEqual(filesBefore);
      expect(statSync(before.path).mode & 0o777).toBe(0o600);
      expect(qio(before.path, "read", 0x66)).toBe(true);
      expect(checkAll([d.home])).toBeGreaterThan(0);
      // and it can be taken again
      await d.client.createSnapshot(name, { name: "x" });
      await d.client.removeVm(name);
    }, 120_000);

    it.each([
      ["snapshot:saved", false],
      ["snapshot:vmm-ended", false],
      ["snapshot:state-taken", false],
      ["snapshot:committed", true],
    ] as const)("a snapshot of a running VM (%s): the VM runs on from the saved moment, without a boot", async (step, kept) => {
      const name = `m-${step.split(":")[1]!}`;
      await d.client.createVm(spec(name, { diskSize: undefined }), { start: true });
      await until("banner", async () => (await banners(d.client, name)) >= 1 || undefined);
      await echoes(d.client, name, "one");
      await killedAt(step, (c) => c.createSnapshot(name, { name: "x" }));
      // Re-attached (its VMM was paused for the save: resumed), or started from the state saved for it.
      await until(`${name} running again`, async () => (await d.client.getVm(name)).state === "running" || undefined, 30_000);
      await echoes(d.client, name, "two");
      expect(await banners(d.client, name)).toBe(1);
      expect((await d.client.listSnapshots(name)).map((x) => x.name)).toEqual(kept ? ["x"] : []);
      await until("the plan's files gone", () => readdirSync(join(d.home, "snapshots")).filter((f) => f.endsWith(".op")).length === 0 || undefined);
      await d.client.removeVm(name, { force: true });
    }, 120_000);

    it("a rollback of a running VM whose VMM was already stopped: finished", async () => {
      await d.client.createVm(spec("m-rb", { diskSize: undefined }), { start: true });
      await until("banner", async () => (await banners(d.client, "m-rb")) >= 1 || undefined);
      await d.client.createSnapshot("m-rb", { name: "x" });
      await killedAt("rollback:vmm-ended", (c) => c.rollbackSnapshot("m-rb", "x"));
      await until("m-rb running again", async () => (await d.client.getVm("m-rb")).state === "running" || undefined, 30_000);
      await echoes(d.client, "m-rb", "back");
      expect(await banners(d.client, "m-rb")).toBe(1);
      expect((await d.client.events({ vm: "m-rb" })).map((e) => e.type)).toContain("vm.rolled-back");
      await d.client.removeVm("m-rb", { force: true });
    }, 120_000);

    it("after its commit: the snapshot kept", async () => {
      await d.client.createVm(spec("k-commit"));
      await killedAt("snapshot:committed", (c) => c.createSnapshot("k-commit", { name: "x" }));
      const s = await d.client.listSnapshots("k-commit");
      expect(s.map((x) => [x.name, x.current])).toEqual([["x", true]]);
      expect(checkAll([d.home])).toBeGreaterThan(0);
      await d.client.removeVm("k-commit");
    }, 120_000);

    it.each([
      ["rollback:planned", 0x22],
      ["rollback:swapped", 0x22],
      ["rollback:committed", 0x11],
    ])("a rollback (%s) of a stopped VM: undone, or finished once committed", async (step, expected) => {
      const name = `r-${step.split(":")[1]!}`;
      await d.client.createVm(spec(name));
      const top = (await disk0(d.client, name)).path;
      expect(qio(top, "write", 0x11)).toBe(true);
      await d.client.createSnapshot(name, { name: "a" });
      expect(qio(top, "write", 0x22)).toBe(true);
      const vmDir = top.replace(/\/disk0\.qcow2$/, "");
      await killedAt(step, (c) => c.rollbackSnapshot(name, "a"));
      expect(qio(top, "read", expected)).toBe(true);
      expect(files(vmDir).filter((f) => f.endsWith(".tmp") || f.endsWith(".old"))).toEqual([]);
      expect(checkAll([d.home])).toBeGreaterThan(0);
      await d.client.removeVm(name);
      expect(layers(d.home)).toEqual([]);
    }, 120_000);
  });
});
