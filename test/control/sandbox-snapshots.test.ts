/**
 * Memory snapshots, rollback and clones under the VMM sandbox (docs/snapshots.md "Under the VMM
 * sandbox"), on real jailed VMMs of a real daemon run as root, with tiny guests on this host's
 * /dev/kvm: a jailed VMM saves into its own output directory and the daemon takes the result
 * into its snapshots/ tree (root's, read-only); a VMM that restores a snapshot is given that
 * snapshot's group and its directory bound read-only, and sees no other snapshot; two clones of
 * one snapshot run at once as two uids, and one rebooted boots its own kernel copy; a daemon killed between the save and the move finishes
 * the move at its next start and the guest runs on from the saved moment.
 */
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { vmPaths } from "../../src/control/paths.js";
import { JAIL_BIN } from "../../src/control/sandbox/sandbox.js";
import { startDaemon, until, type TestDaemon } from "../helpers/daemon.js";
import { writeTinyKernel } from "../helpers/tiny-kernel.js";
import { banners, echoes } from "../helpers/tiny-console.js";

const ready = existsSync("/dev/kvm") && process.getuid?.() === 0 && existsSync(JAIL_BIN);

function ids(pid: number): { uid: number; gid: number; groups: number[] } {
  const s = readFileSync(`/proc/${pid}/status`, "utf8");
  const field = (k: string): string => new RegExp(`^${k}:\\s*(.*)$`, "m").exec(s)![1]!.trim();
  return { uid: Number(field("Uid").split(/\s+/)[0]), gid: Number(field("Gid").split(/\s+/)[0]), groups: field("Groups").split(/\s+/).filter((x) => x !== "").map(Number) };
}

describe.skipIf(!ready)("memory snapshots, rollback and clones under the VMM sandbox (root, tiny guests)", () => {
  let d: TestDaemon;
  let dir: string;
  let kernel: string;
  const spec = (name: string) => ({ name, kernel, memoryMiB: 64, rng: false, diskSize: "8M" });

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "tvsbsnap-"));
    kernel = join(dir, "tiny.bin");
    writeTinyKernel(kernel);
    d = await startDaemon({ args: ["--force-kvm", "--allow-files", dir] });
  }, 60_000);

  afterAll(async () => {
    if (d !== undefined) {
      for (const vm of await d.client.listVms().catch(() => [])) await d.client.removeVm(vm.name, { force: true }).catch(() => undefined);
      await d.stop();
    }
    rmSync(dir, { recursive: true, force: true });
  }, 60_000);

  /** What a VM's out/ and the daemon's snapshots/ hold that an operation left: nothing once it is over. */
  const leftovers = (vmId: string): string[] => [
    ...readdirSync(vmPaths(d.home, vmId).outDir).filter((f) => f.endsWith(".op")),
    ...(existsSync(join(d.home, "snapshots")) ? readdirSync(join(d.home, "snapshots")).filter((f) => f.endsWith(".op")) : []),
  ];

  it("a jailed VM's memory snapshot: saved in its own out/, taken by the daemon (root's, one group may read it); it runs on without a boot", async () => {
    const c = d.client;
    const first = await c.createVm(spec("m"), { start: true });
    await until("banner", async () => (await banners(c, "m")) >= 1 || undefined);
    await echoes(c, "m", "before-1");
    const own = ids(first.pid!);

    const s1 = await c.createSnapshot("m", { name: "s1" });
    expect(s1).toMatchObject({ memory: true, vmState: "running", current: true });
    const vm = await c.getVm("m");
    expect(vm.state).toBe("running");
    expect(vm.pid).not.toBe(first.pid);
    await echoes(c, "m", "after-2");
    expect(await banners(c, "m")).toBe(1);
    expect(leftovers(vm.id)).toEqual([]);

    // The snapshot's files: root's, read-only, its group's (not the VM's gid, not world-readable).
    const sdir = join(d.home, "snapshots", s1.id);
    const st = statSync(sdir);
    const group = st.gid;
    expect([st.uid, st.mode & 0o777]).toEqual([0, 0o750]);
    expect(group).not.toBe(own.gid);
    expect(readdirSync(sdir).sort()).toEqual(["config.json", "memory", "state.json"]);
    for (const f of readdirSync(sdir)) {
      const fs = statSync(join(sdir, f));
      expect([f, fs.uid, fs.gid, fs.mode & 0o777]).toEqual([f, 0, group, 0o440]);
    }
    // The VMM that restored it: the VM's uid, with the snapshot's group, its directory bound read-only.
    const now = ids(vm.pid!);
    expect(now).toEqual({ uid: own.uid, gid: own.gid, groups: [group] });
    expect(existsSync(`/proc/${vm.pid!}/root${sdir}/memory`)).toBe(true);

    // A paused VM is saved paused and comes back paused; a disk-only snapshot of it runs on too.
    await c.pauseVm("m");
    const s2 = await c.createSnapshot("m", { name: "s2" });
    expect((await c.getVm("m")).state).toBe("paused");
    await c.resumeVm("m");
    expect(statSync(join(d.home, "snapshots", s2.id)).gid).not.toBe(group);
    const d1 = await c.createSnapshot("m", { name: "d1", memory: false });
    expect(d1.memory).toBe(false);
    expect((await c.getVm("m")).state).toBe("running");
    await echoes(c, "m", "after-3");
    expect(readdirSync(join(d.home, "snapshots")).sort()).toEqual([s1.id, s2.id].sort());
    expect(leftovers(vm.id)).toEqual([]);
  }, 120_000);

  it("rollback to a memory snapshot and two clones of it at once, each its own uid with only that snapshot in its view", async () => {
    const c = d.client;
    const s1 = await c.getSnapshot("m", "s1");
    const s2 = await c.getSnapshot("m", "s2");
    const back = await c.rollbackSnapshot("m", "s1");
    expect(back.state).toBe("running");
    await echoes(c, "m", "rolled-4");
    expect(await banners(c, "m")).toBe(1);

    const [c1, c2] = await Promise.all([c.cloneVm("m", { name: "c1", snapshot: "s1" }), c.cloneVm("m", { name: "c2", snapshot: "s1" })]);
    for (const x of [c1, c2]) {
      expect(x.state).toBe("running");
      await echoes(c, x.name, `clone-${x.name}`);
      expect(await banners(c, x.name)).toBe(0);
    }
    const group = statSync(join(d.home, "snapshots", s1.id)).gid;
    const a = ids(c1.pid!);
    const b = ids(c2.pid!);
    expect(a.uid).not.toBe(b.uid);
    expect(a.uid).not.toBe(ids(back.pid!).uid);
    expect(a.groups).toEqual([group]);
    expect(b.groups).toEqual([group]);
    // In a clone's view: the snapshot it restored, not the source's other snapshot, nor the source's disk.
    expect(existsSync(`/proc/${c1.pid!}/root${join(d.home, "snapshots", s1.id)}/memory`)).toBe(true);
    expect(existsSync(`/proc/${c1.pid!}/root${join(d.home, "snapshots", s2.id)}`)).toBe(false);
    expect(existsSync(`/proc/${c1.pid!}/root${back.disks[0]!.path}`)).toBe(false);
    // A guest reboot in a clone boots the clone's own kernel copy (the snapshot names its source's,
    // which is not in the clone's view): the tiny guest comes up again, and the VM runs on.
    await c.rebootVm("c1");
    await until("c1's guest booted again", async () => (await banners(c, "c1")) >= 1 || undefined);
    expect((await c.getVm("c1")).state).toBe("running");
    expect((await c.getVm("c1")).pid).toBe(c1.pid);
    await c.removeVm("c1", { force: true });
    await c.removeVm("c2", { force: true });
  }, 120_000);

  it("a daemon killed after the jailed VMM saved and ended, before the daemon took the state: at its next start the state is taken and the guest runs on", async () => {
    const c = d.client;
    await c.createVm(spec("k"), { start: true });
    await until("banner", async () => (await banners(c, "k")) >= 1 || undefined);
    await echoes(c, "k", "one");
    const id = (await c.getVm("k")).id;
    await d.stop();
    const dying = await startDaemon({ home: d.home, args: ["--force-kvm", "--allow-files", dir], env: { TYPEVISOR_CRASH_AT: "snapshot:vmm-ended" } });
    await dying.client.createSnapshot("k", { name: "x" }).then(
      () => expect.fail("the daemon did not die"),
      () => undefined,
    );
    await dying.stop("SIGKILL");
    // The save is still where the VMM made it.
    expect(readdirSync(vmPaths(d.home, id).outDir).filter((f) => f.endsWith(".op"))).toHaveLength(1);
    d = await startDaemon({ home: d.home, args: ["--force-kvm", "--allow-files", dir] });
    await until("k running again", async () => (await d.client.getVm("k")).state === "running" || undefined, 30_000);
    await echoes(d.client, "k", "two");
    expect(await banners(d.client, "k")).toBe(1);
    expect(await d.client.listSnapshots("k")).toEqual([]);
    await until("the plan's files gone", () => leftovers(id).length === 0 || undefined);
    await d.client.removeVm("k", { force: true });
    await d.client.removeVm("m", { force: true });
    expect(readdirSync(join(d.home, "snapshots"))).toEqual([]);
  }, 120_000);
});
