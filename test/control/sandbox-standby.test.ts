/**
 * Standby VMMs under the VMM sandbox (docs/security.md "Standby VMMs in the sandbox"), on a real
 * daemon run as root with real jailed VMMs and tiny guests on this host's /dev/kvm: a standby is
 * jailed for one memory snapshot (its own uid, that snapshot's group, nothing of the daemon's home
 * in its view), the pool turning to the snapshot restored last; a clone of that snapshot takes it (the standby's pid and uid become
 * the clone's) and sees its own files at their host paths, backing files read-only, and no other
 * VM's, while the host keeps no mount of them; removing the snapshot ends the standby;
 * a daemon killed leaves nothing its successor does not clean up.
 */
import { parseStatsPage } from "../../src/vmm/stats/layout.js";
import { vmPaths } from "../../src/control/paths.js";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { TypevisorClient } from "../../src/api/client.js";
import { JAIL_BIN } from "../../src/control/sandbox/sandbox.js";
import { startDaemon, until, type TestDaemon } from "../helpers/daemon.js";
import { writeTinyKernel } from "../helpers/tiny-kernel.js";
import { banners, echoes } from "../helpers/tiny-console.js";

const ready = existsSync("/dev/kvm") && process.getuid?.() === 0 && existsSync(JAIL_BIN);

function ids(pid: number): { uid: number; groups: number[] } {
  const s = readFileSync(`/proc/${pid}/status`, "utf8");
  const field = (k: string): string => new RegExp(`^${k}:\\s*(.*)$`, "m").exec(s)![1]!.trim();
  return { uid: Number(field("Uid").split(/\s+/)[0]), groups: field("Groups").split(/\s+/).filter((x) => x !== "").map(Number) };
}

/** Mount points under `dir` in a process's view (/proc/PID/mountinfo), with their options. */
function mountsUnder(pid: number | "self", dir: string): { at: string; opts: string }[] {
  return readFileSync(`/proc/${pid}/mountinfo`, "utf8").split("\n").flatMap((l) => {
    const f = l.split(" ");
    return f[4] !== undefined && f[4].startsWith(dir) ? [{ at: f[4], opts: f[5] ?? "" }] : [];
  });
}

describe.skipIf(!ready)("standby VMMs under the VMM sandbox (root, tiny guests)", () => {
  let d: TestDaemon;
  let dir: string;
  let kernel: string;
  const spec = (name: string) => ({ name, kernel, memoryMiB: 64, rng: false, diskSize: "8M" });
  const args = () => ["--force-kvm", "--allow-files", dir, "--standby-vmms", "1"];

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "tvsbstandby-"));
    kernel = join(dir, "tiny.bin");
    writeTinyKernel(kernel);
    d = await startDaemon({ args: args() });
  }, 60_000);

  afterAll(async () => {
    if (d !== undefined) {
      for (const vm of await d.client.listVms().catch(() => [])) await d.client.removeVm(vm.name, { force: true }).catch(() => undefined);
      await d.stop();
      expect(mountsUnder("self", d.home)).toEqual([]);
    }
    rmSync(dir, { recursive: true, force: true });
  }, 60_000);

  const standbyPids = (home: string): number[] =>
    readdirSync(join(home, "standby")).filter((x) => x.endsWith(".pid")).map((x) => Number(readFileSync(join(home, "standby", x), "utf8").split(" ")[0]));
  async function oneReady(c: TypevisorClient, home: string): Promise<number> {
    await until("a jailed standby VMM ready", async () => (await c.host()).standbyVmms.ready === 1 || undefined, 60_000);
    const pids = standbyPids(home);
    expect(pids).toHaveLength(1);
    return pids[0]!;
  }

  it("a clone of the template takes the jailed standby: its uid, the snapshot's group, its own files at their paths and nothing else", async () => {
    const c = d.client;
    const src = await c.createVm(spec("t"), { start: true });
    await until("banner", async () => (await banners(c, "t")) >= 1 || undefined);
    // No memory snapshot yet: nothing to be a standby for.
    expect((await c.host()).standbyVmms).toEqual({ size: 1, ready: 0 });
    const other = await c.createSnapshot("t", { name: "other" });
    const gold = await c.createSnapshot("t", { name: "gold" });
    // The pool's template is the first memory snapshot saved ("other"); a clone of another one
    // starts a fresh jail and turns the pool to that one.
    const first = await oneReady(c, d.home);
    expect(ids(first).groups).toEqual([statSync(join(d.home, "snapshots", other.id)).gid]);
    expect((await c.host()).standbyVmms.template).toBe(other.id);
    const c0 = await c.cloneVm("t", { name: "c0", snapshot: "gold" });
    expect(c0.pid).not.toBe(first);
    await until("the first standby ended", () => (existsSync(`/proc/${first}`) ? undefined : true), 20_000);
    await c.removeVm("c0", { force: true });
    const standby = await oneReady(c, d.home);
    const group = statSync(join(d.home, "snapshots", gold.id)).gid;
    const sid = ids(standby);
    expect(sid.groups).toEqual([group]);
    expect(sid.uid).not.toBe(ids((await c.getVm("t")).pid!).uid);
    expect(readFileSync(`/proc/${standby}/status`, "utf8")).toMatch(/^CapEff:\s*0+$/m);
    // The allowlist, the quiet clone3 filter and the no-exec filter (installed once, at the standby's start)
    expect(readFileSync(`/proc/${standby}/status`, "utf8")).toMatch(/^Seccomp_filters:\s*3$/m);
    // Before it is handed a VM it sees nothing of the daemon's home but its template's saved
    // state (read-only), from which it built that VM ahead.
    expect(readdirSync(`/proc/${standby}/root${d.home}`)).toEqual(["snapshots"]);
    expect(readdirSync(`/proc/${standby}/root${join(d.home, "snapshots")}`)).toEqual([gold.id]);
    expect(mountsUnder(standby, d.home).find((m) => m.at === join(d.home, "snapshots", gold.id))?.opts).toMatch(/^ro,/);
    await until("the VM built ahead", () => (readFileSync(join(d.home, "standby", `${readdirSync(join(d.home, "standby")).find((f) => f.endsWith(".pid") && readFileSync(join(d.home, "standby", f), "utf8").startsWith(`${standby} `))!.slice(0, -".pid".length)}.log`), "utf8").includes("a VM built for") ? true : undefined), 20_000);

    const key = readdirSync(join(d.home, "standby")).find((f) => f.endsWith(".pid") && readFileSync(join(d.home, "standby", f), "utf8").startsWith(`${standby} `))!.slice(0, -".pid".length);
    expect(existsSync(join(d.home, "standby", `${key}.d`))).toBe(true);
    const clone = await c.cloneVm("t", { name: "c1", snapshot: "gold" });
    expect(clone.state).toBe("running");
    expect(clone.pid, d.log().split("\n").filter((l) => l.includes("standby")).join("\n")).toBe(standby);
    expect(ids(clone.pid!).uid).toBe(sid.uid);
    await echoes(c, "c1", "from-jailed-standby");
    expect(await banners(c, "c1")).toBe(0);
    expect(readFileSync(join(d.home, "vms", clone.id, "vmm.log"), "utf8")).toContain("on standby at");
    expect(readFileSync(join(d.home, "vms", clone.id, "vmm.log"), "utf8")).toContain(`restore: into the VM this standby built ahead for ${join(d.home, "snapshots", gold.id)}`);
    // Its files at their host paths, its disk its uid's and writable, the layer under it read-only.
    const view = `/proc/${clone.pid!}/root`;
    const disk = clone.disks[0]!.path;
    expect(existsSync(`${view}${disk}`)).toBe(true);
    expect(statSync(disk).uid).toBe(sid.uid);
    expect(existsSync(`${view}${join(d.home, "snapshots", gold.id)}/memory`)).toBe(true);
    expect(existsSync(`${view}${join(d.home, "snapshots", other.id)}`)).toBe(false);
    expect(existsSync(`${view}${src.disks[0]!.path}`)).toBe(false);
    // its stats page, handed over like its disk: the standby counts into the file the daemon reads
    expect(existsSync(`${view}${vmPaths(d.home, clone.id).statsFile}`)).toBe(true);
    expect(await until("the clone's stats page", async () => parseStatsPage(readFileSync(vmPaths(d.home, clone.id).statsFile)))).toMatchObject({ disks: [{ readOps: expect.any(Number) }] });
    const inView = mountsUnder(clone.pid!, d.home);
    expect(inView.find((m) => m.at === disk)?.opts).toMatch(/^rw,nosuid,nodev,noexec/);
    const layer = gold.disks[0]!.layer;
    expect(inView.find((m) => m.at === layer)?.opts).toMatch(/^ro,nosuid,nodev,noexec/);
    expect(inView.find((m) => m.at === join(d.home, "snapshots", gold.id))?.opts).toMatch(/^ro,/);

    // The daemon's side of the hand-off is gone once the files were bound: no mount of the clone's
    // files is left in the host's namespace, while its own view keeps them.
    expect(mountsUnder("self", d.home).filter((m) => m.at.includes("/vms/"))).toEqual([]);
    for (const f of [`${key}.d`, `${key}.d.root`, `${key}.api`, `${key}.con`, `${key}.pid`]) expect(existsSync(join(d.home, "standby", f)), f).toBe(false);
    // The directories its copies are mounted on moved into the VM's directory (removing them would unmount them there).
    expect(existsSync(join(d.home, "vms", clone.id, "standby-handoff", "vms", clone.id, "out"))).toBe(true);
    await echoes(c, "c1", "after-the-seal");
    // A new standby for the same template starts behind it.
    const next = await oneReady(c, d.home);
    expect(next).not.toBe(standby);
    await c.stopVm("c1");
    // It boots as a jailed VM of that uid next time.
    const again = await c.startVm("c1");
    expect(ids(again.pid!).uid).toBe(sid.uid);
    await until("c1 booted", async () => (await banners(c, "c1")) >= 1 || undefined);
    await c.removeVm("c1", { force: true });

    // The template removed: its standby ends, and none waits.
    await c.removeSnapshot("t", "gold");
    await until("the standby gone", () => (standbyPids(d.home).length === 0 ? true : undefined), 20_000);
    expect(mountsUnder("self", join(d.home, "standby"))).toEqual([]);
    expect((await c.host()).standbyVmms.ready).toBe(0);
  }, 180_000);

  it("a clone with a NIC: its TAP, opened by the daemon in the host's network namespace, reaches the standby as a descriptor", async () => {
    const c = d.client;
    await c.createVm({ ...spec("n"), nets: [{ tap: "tvsbsb0" }] }, { start: true });
    await until("banner", async () => (await banners(c, "n")) >= 1 || undefined);
    await c.createSnapshot("n", { name: "ngold" });
    // The template was removed with the last test's snapshot: the pool takes the next one saved.
    const standby = await oneReady(c, d.home);
    expect(ids(standby).groups).toEqual([statSync(join(d.home, "snapshots", (await c.getSnapshot("n", "ngold")).id)).gid]);
    const clone = await c.cloneVm("n", { name: "nc", snapshot: "ngold", nets: [{ tap: "tvsbsb1" }] });
    expect(clone.pid).toBe(standby);
    await echoes(c, "nc", "with-a-nic");
    // The VMM holds the TAP device attached to the clone's interface (tun's fdinfo names it).
    const tuns = (pid: number, tap: string) =>
      readdirSync(`/proc/${pid}/fd`).filter((fd) => {
        try {
          return readFileSync(`/proc/${pid}/fdinfo/${fd}`, "utf8").includes(`iff:\t${tap}`);
        } catch {
          return false;
        }
      }).length;
    // As many as the template's VMM (a fresh jail) holds for its own. That one was restarted by
    // the snapshot (a jailed VMM ends once it has saved) and may still be setting up its devices:
    // its count is read once it has them (a clone holding more than it would never match).
    expect(tuns(clone.pid!, "tvsbsb1")).toBeGreaterThan(0);
    const template = (await c.getVm("n")).pid!;
    await until("the template's VMM holding as many", () => (tuns(template, "tvsbsb0") === tuns(clone.pid!, "tvsbsb1") ? true : undefined), 20_000);
    expect(existsSync("/sys/class/net/tvsbsb1")).toBe(true);
    await c.removeVm("nc", { force: true });
    await c.removeVm("n", { force: true });
  }, 120_000);

  it("a rollback (a VM with a uid already) starts a fresh jail; a daemon killed leaves its successor nothing to trip on", async () => {
    const c = d.client;
    await c.createSnapshot("t", { name: "gold2" });
    const standby = await oneReady(c, d.home);
    const back = await c.rollbackSnapshot("t", "gold2");
    expect(back.pid).not.toBe(standby);
    await echoes(c, "t", "rolled");
    // A clone through the standby, then the daemon killed with it running and a new standby waiting:
    // the next daemon keeps the clone's hand-off mounts (its VMM reads its files through them),
    // ends the waiting standby and its mounts, and starts its own.
    const clone = await c.cloneVm("t", { name: "k1", snapshot: "gold2" });
    expect(clone.pid).toBe(standby);
    const waiting = await oneReady(c, d.home);
    const home = d.home;
    const cloneView = mountsUnder(clone.pid!, home).map((m) => m.at);
    expect(cloneView).toContain(clone.disks[0]!.path);
    await d.stop("SIGKILL");
    d = await startDaemon({ home, args: args() });
    expect(() => process.kill(waiting, 0)).toThrow();
    const fresh = await oneReady(d.client, home);
    expect(fresh).not.toBe(waiting);
    expect((await d.client.getVm("t")).state).toBe("running");
    expect((await d.client.getVm("k1")).pid).toBe(clone.pid);
    await echoes(d.client, "k1", "after-the-daemon-restart");
    expect(mountsUnder(clone.pid!, home).map((m) => m.at)).toEqual(cloneView);
    // Only the new standby's hand-off directory is mounted on the host, with its template's saved state in it.
    const handoff = join(home, "standby", readdirSync(join(home, "standby")).find((f) => f.endsWith(".d"))!);
    const gold2 = (await d.client.listSnapshots("t")).find((x) => x.name === "gold2")!;
    expect(mountsUnder("self", home).map((m) => m.at).sort()).toEqual([handoff, join(handoff, relative(home, join(home, "snapshots", gold2.id)))].sort());
    await d.client.stopVm("k1");
  }, 180_000);
});
