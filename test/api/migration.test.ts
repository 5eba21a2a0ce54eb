/**
 * Live migration between two daemons on this host (different homes, each with its HTTPS
 * listener), tiny guests on the host's /dev/kvm: `vm migrate` moves a running VM from A to B (it
 * answers on B's console without having rebooted, A's inventory no longer has it, events on
 * both); refusals leave it running on A; and either daemon SIGKILLed at each step of the
 * protocol (TYPEVISOR_CRASH_AT) leaves, once restarted, exactly one owner with the guest running.
 * (Two daemons in two network namespaces with a Debian guest: test/vmm/migration.lab.test.ts.)
 */
import { execFileSync, spawnSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { TypevisorClient } from "../../src/api/client.js";
import { processAlive } from "../../src/control/proc.js";
import { JAIL_BIN } from "../../src/control/sandbox/sandbox.js";
import { BIN, startDaemon, tcpPort, until, type TestDaemon } from "../helpers/daemon.js";
import { TINY_KERNEL_BANNER, writeTinyKernel } from "../helpers/tiny-kernel.js";

const hasKvm = existsSync("/dev/kvm");

/** Daemons A and B (their `args`), a pool "shared" of A's in `dir`, and what A needs to migrate to B (an operator token of B's, B's fingerprint). */
async function startPair(args: string[], dir: string): Promise<{ a: TestDaemon; b: TestDaemon; peer: { to: string; peerToken: string; peerFingerprint: string } }> {
  writeTinyKernel(join(dir, "tiny.bin"));
  mkdirSync(join(dir, "shared"));
  const [a, b] = await Promise.all([startDaemon({ args }), startDaemon({ args })]);
  await a.client.createPool({ name: "shared", path: join(dir, "shared") });
  await b.client.addUser({ name: "peer-a", role: "operator" });
  const t = await b.client.createToken({ user: "peer-a" });
  return { a, b, peer: { to: `https://127.0.0.1:${await tcpPort(b)}`, peerToken: t.token, peerFingerprint: (await b.client.host()).tls!.fingerprint } };
}

async function stopPair(daemons: (TestDaemon | undefined)[], dir: string): Promise<void> {
  for (const d of daemons) {
    if (d === undefined) continue;
    for (const vm of await d.client.listVms().catch(() => [])) await d.client.removeVm(vm.name, { force: true }).catch(() => undefined);
    await d.stop();
  }
  rmSync(dir, { recursive: true, force: true });
}

/** Type `word` on the VM's console at `d` and see it echoed: the guest runs there. */
async function answers(d: TestDaemon, name: string, word: string): Promise<void> {
  const s = await d.client.attachConsole(name);
  s.on("error", () => undefined);
  s.write(word);
  try {
    await until(`the echo of ${word} on ${name}`, async () => (await d.client.console(name)).toString().includes(word) || undefined, 20_000);
  } finally {
    s.destroy();
  }
}

describe.skipIf(!hasKvm)("live migration between two daemons (tiny guests, --force-kvm)", () => {
  const dir = mkdtempSync(join(tmpdir(), "tvmigd-"));
  const shared = join(dir, "shared");
  const kernel = join(dir, "tiny.bin");
  let a: TestDaemon;
  let b: TestDaemon;
  let peer: { to: string; peerToken: string; peerFingerprint: string };
  const args = ["--force-kvm", "--no-sandbox", "--allow-files", dir, "--listen", "127.0.0.1:0"];

  beforeAll(async () => {
    ({ a, b, peer } = await startPair(args, dir));
  }, 60_000);
  afterAll(() => stopPair([a, b], dir), 60_000);

  /** A running tiny guest on A whose disk is on the shared storage. */
  async function sourceVm(name: string): Promise<void> {
    await a.client.createVm({ name, kernel, memoryMiB: 64, rng: false, diskSize: "16M", diskFormat: "raw", pool: "shared" }, { start: true });
    await until(`${name}'s banner`, async () => (await a.client.console(name)).toString().includes(TINY_KERNEL_BANNER) || undefined);
  }


  const names = async (c: TypevisorClient): Promise<Record<string, string>> => Object.fromEntries((await c.listVms()).map((v) => [v.name, v.state]));

  /** Exactly one daemon owns `name` and runs it: A (running, B none) or B (running, A none). */
  async function settledOwner(name: string): Promise<"a" | "b"> {
    return until(`one owner of ${name}`, async () => {
      const [na, nb] = [await names(a.client), await names(b.client)];
      if (na[name] === "running" && nb[name] === undefined) return "a" as const;
      if (na[name] === undefined && nb[name] === "running") return "b" as const;
      return undefined;
    }, 60_000);
  }

  it("vm migrate moves a running VM to the other daemon: it runs on there without a reboot and leaves A's inventory", async () => {
    await sourceVm("mig1");
    await answers(a, "mig1", "before-move");
    const pidA = (await a.client.getVm("mig1")).pid!;
    const r = spawnSync(process.execPath, [BIN, "vm", "migrate", "mig1", "--to", peer.to, "--peer-token", peer.peerToken, "--peer-fingerprint", peer.peerFingerprint, "--max-downtime", "200", "--home", a.home], { encoding: "utf8", timeout: 120_000 });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain("mig1: migrated to https://127.0.0.1");
    expect(r.stderr).toMatch(/mig1: (precopy|stopped|committed|confirming|completed)/);
    expect(await names(a.client)).not.toHaveProperty("mig1");
    // B lists it as running once its VMM's API answers, which may come a moment after A heard RUNNING.
    const onB = await until("mig1 running on B", async () => {
      const v = await b.client.getVm("mig1").catch(() => undefined);
      return v?.state === "running" ? v : undefined;
    }, 30_000);
    expect(onB.state).toBe("running");
    expect(onB.disks[0]!.path.startsWith(shared)).toBe(true);
    await answers(b, "mig1", "after-move");
    // B's console starts at the move: the guest did not boot again.
    expect((await b.client.console("mig1")).toString()).not.toContain(TINY_KERNEL_BANNER);
    await until("A's VMM to end", () => !processAlive(pidA) || undefined);
    expect((await a.client.events({ vm: "mig1" })).map((e) => e.type)).toEqual(expect.arrayContaining(["vm.migrating", "vm.migrated"]));
    expect((await b.client.events({ vm: "mig1" })).map((e) => e.type)).toEqual(expect.arrayContaining(["vm.incoming", "vm.migrated-in"]));
    expect((await a.client.migration("mig1")).phase).toBe("completed");
    // A restart of A does not sweep the disk B's VM now uses out of A's pool.
    await a.stop();
    a = await startDaemon({ home: a.home, args });
    expect(existsSync(onB.disks[0]!.path)).toBe(true);
    // B made the VM's own boot files: it starts again there (a boot: the banner).
    await b.client.stopVm("mig1");
    await b.client.startVm("mig1");
    await until("the banner of a fresh boot on B", async () => (await b.client.console("mig1")).toString().includes(TINY_KERNEL_BANNER) || undefined);
    await b.client.removeVm("mig1", { force: true });
  }, 180_000);

  it("vm migrate --copy-disks moves a VM whose raw disk is A's own: B runs it on a copy with the same bytes, A's file is gone", async () => {
    await a.client.createVm({ name: "mig3", kernel, memoryMiB: 64, rng: false, diskSize: "16M", diskFormat: "raw" });
    const diskA = (await a.client.getVm("mig3")).disks[0]!.path;
    expect(diskA.startsWith(a.home)).toBe(true);
    // Data where a sparse copy must find it (and holes between, which stay zero).
    const fd = openSync(diskA, "r+");
    for (const at of [0, 5 * 2 ** 20 + 4096, 16 * 2 ** 20 - 65536]) writeSync(fd, randomBytes(65536), 0, 65536, at);
    closeSync(fd);
    const before = createHash("sha256").update(readFileSync(diskA)).digest("hex");
    await a.client.startVm("mig3");
    await until("mig3's banner", async () => (await a.client.console("mig3")).toString().includes(TINY_KERNEL_BANNER) || undefined);
    const r = spawnSync(process.execPath, [BIN, "vm", "migrate", "mig3", "--to", peer.to, "--peer-token", peer.peerToken, "--peer-fingerprint", peer.peerFingerprint, "--copy-disks", "--home", a.home], { encoding: "utf8", timeout: 120_000 });
    expect(r.status, r.stderr).toBe(0);
    const onB = await until("mig3 running on B", async () => {
      const v = await b.client.getVm("mig3").catch(() => undefined);
      return v?.state === "running" ? v : undefined;
    }, 30_000);
    const diskB = onB.disks[0]!.path;
    expect(diskB.startsWith(b.home)).toBe(true);
    expect(onB.disks[0]!.pool).toBe("default");
    expect(createHash("sha256").update(readFileSync(diskB)).digest("hex")).toBe(before);
    expect(await names(a.client)).not.toHaveProperty("mig3");
    expect(existsSync(diskA)).toBe(false);
    await answers(b, "mig3", "copied-over");
    await b.client.removeVm("mig3", { force: true });
    expect(existsSync(diskB)).toBe(false);
  }, 180_000);

  it("vm migrate --copy-disks moves a VM whose qcow2 disk is A's own: B runs it on a qcow2 image of its own that reads the same, A's file is gone", async () => {
    await a.client.createVm({ name: "mig4", kernel, memoryMiB: 64, rng: false, diskSize: "16M", diskFormat: "qcow2" });
    const diskA = (await a.client.getVm("mig4")).disks[0]!.path;
    expect(diskA.startsWith(a.home)).toBe(true);
    // Clusters QEMU allocates (data, and a zeroed one), the rest unallocated.
    execFileSync("qemu-io", ["-f", "qcow2", "-c", "write -P 0x61 0 64k", "-c", "write -P 0x62 5M 68k", "-c", "write -z 9M 64k", "-c", "write -P 0x63 15M 1M", diskA], { timeout: 30_000 });
    const rawOf = (img: string): string => {
      const out = join(mkdtempSync(join(tmpdir(), "tv-migq-")), "disk.raw");
      execFileSync("qemu-img", ["convert", "-U", "-f", "qcow2", "-O", "raw", img, out], { timeout: 60_000 });
      return createHash("sha256").update(readFileSync(out)).digest("hex");
    };
    const before = rawOf(diskA);
    await a.client.startVm("mig4");
    await until("mig4's banner", async () => (await a.client.console("mig4")).toString().includes(TINY_KERNEL_BANNER) || undefined);
    await a.client.migrateVm("mig4", { ...peer, copyDisks: true });
    const onB = await until("mig4 running on B", async () => {
      const v = await b.client.getVm("mig4").catch(() => undefined);
      return v?.state === "running" ? v : undefined;
    }, 60_000);
    const diskB = onB.disks[0]!.path;
    expect(diskB.startsWith(b.home)).toBe(true);
    expect(diskB.endsWith(".qcow2")).toBe(true);
    expect(onB.disks[0]).toMatchObject({ format: "qcow2", sizeBytes: 16 * 2 ** 20 });
    const check = spawnSync("qemu-img", ["check", "-U", diskB], { encoding: "utf8", timeout: 60_000 });
    expect(check.status, `${check.stdout}${check.stderr}`).toBe(0);
    expect(rawOf(diskB)).toBe(before);
    await until("A to drop mig4", async () => (!("mig4" in (await names(a.client))) ? true : undefined));
    expect(existsSync(diskA)).toBe(false);
    await answers(b, "mig4", "copied-qcow2");
    await b.client.removeVm("mig4", { force: true });
    expect(existsSync(diskB)).toBe(false);
  }, 180_000);

  it("refuses what it cannot do, and a failed migration leaves the VM running on A and nothing on B", async () => {
    await sourceVm("mig2");
    await a.client.createVm({ name: "local", kernel, memoryMiB: 64, rng: false, diskSize: "16M", diskFormat: "raw" }, { start: true });
    await expect(a.client.migrateVm("local", peer)).rejects.toMatchObject({ code: "MIGRATION_UNSUPPORTED", message: expect.stringContaining("own directory") });
    for (const bad of [{ ...peer, peerToken: "tv_wrong" }, { ...peer, peerFingerprint: "00".repeat(32) }]) {
      await a.client.migrateVm("mig2", bad);
      await until("the failure", async () => ((await a.client.migration("mig2")).phase === "failed" ? true : undefined));
      expect((await a.client.getVm("mig2")).state).toBe("running");
    }
    expect(await names(b.client)).toEqual({});
    await answers(a, "mig2", "still-on-a");
    expect((await a.client.events({ vm: "mig2" })).map((e) => e.type)).toContain("vm.migration-failed");
    await a.client.removeVm("local", { force: true });
    await a.client.removeVm("mig2", { force: true });
  }, 120_000);

  describe("a daemon killed at each step: after its restart exactly one owner runs the VM", () => {
    /** Restart `who` to die at `step` (TYPEVISOR_CRASH_AT), migrate `name`, and start it again once it died. */
    async function dieAt(who: "a" | "b", step: string, copyDisks: boolean, name: string): Promise<void> {
      const victim = who === "a" ? a : b;
      await victim.stop();
      const dying = await startDaemon({ home: victim.home, args, env: { TYPEVISOR_CRASH_AT: step } });
      if (who === "a") a = dying;
      else {
        b = dying;
        peer.to = `https://127.0.0.1:${await tcpPort(b)}`;
      }
      await a.client.migrateVm(name, { ...peer, ...(copyDisks ? { copyDisks: true } : {}) }).catch(() => undefined);
      await until(`the daemon to die at ${step}`, () => (dying.proc.exitCode !== null || dying.proc.signalCode !== null) || undefined, 60_000);
      const again = await startDaemon({ home: victim.home, args: [...args.slice(0, -1), `127.0.0.1:${await tcpPort(dying)}`] });
      if (who === "a") a = again;
      else b = again;
    }

    it.each([
      ["a", "migrate-source-marked", "a"],
      ["a", "migrate-source-peer-prepared", "a"],
      ["a", "migrate-source-vmm-started", "b"],
      ["b", "migrate-dest-row", "a"],
      ["b", "migrate-dest-listening", "a"],
      ["b", "migrate-dest-before-running", "b"],
    ] as const)("%s killed at %s: the VM ends up on %s", async (who, step, owner) => {
      const name = `k-${step.replace(/^migrate-/, "").slice(0, 20)}`;
      await sourceVm(name);
      await dieAt(who, step, false, name);
      expect(await settledOwner(name)).toBe(owner);
      await answers(owner === "a" ? a : b, name, `alive-${step}`);
      await (owner === "a" ? a : b).client.removeVm(name, { force: true });
    }, 180_000);

    // Copied disks: the owner has its disk, the other daemon has no VM directory left for it.
    it.each([
      ["a", "migrate-source-vmm-started", "b"],
      ["b", "migrate-dest-listening", "a"],
      ["b", "migrate-dest-before-running", "b"],
    ] as const)("with a copied qcow2 disk, %s killed at %s: the VM ends up on %s, nothing of it left on the other", async (who, step, owner) => {
      const name = `kc-${step.replace(/^migrate-/, "").slice(0, 20)}`;
      await a.client.createVm({ name, kernel, memoryMiB: 64, rng: false, diskSize: "16M", diskFormat: "qcow2" }, { start: true });
      await until(`${name}'s banner`, async () => (await a.client.console(name)).toString().includes(TINY_KERNEL_BANNER) || undefined);
      const idA = (await a.client.getVm(name)).id;
      await dieAt(who, step, true, name);
      expect(await settledOwner(name)).toBe(owner);
      const mine = await (owner === "a" ? a : b).client.getVm(name);
      expect(existsSync(mine.disks[0]!.path)).toBe(true);
      await answers(owner === "a" ? a : b, name, `alive-${step}`);
      if (owner === "b") {
        await until("A's VM directory to go", () => !existsSync(join(a.home, "vms", idA)) || undefined, 30_000);
      } else {
        const left = existsSync(join(b.home, "vms")) ? readdirSync(join(b.home, "vms")) : [];
        const bIds = new Set((await b.client.listVms()).map((v) => v.id));
        expect(left.filter((d) => !bIds.has(d))).toEqual([]);
      }
      await (owner === "a" ? a : b).client.removeVm(name, { force: true });
    }, 180_000);
  });
});

describe.skipIf(!hasKvm || process.getuid?.() !== 0 || !existsSync(JAIL_BIN))("live migration between two sandboxing daemons (root, tiny guests)", () => {
  const dir = mkdtempSync(join(tmpdir(), "tvmigsb-"));
  const kernel = join(dir, "tiny.bin");
  let a: TestDaemon;
  let b: TestDaemon;
  let peer: { to: string; peerToken: string; peerFingerprint: string };
  // The daemons' default: every VMM jailed (docs/security.md), so each stream goes through its daemon's relay.
  const args = ["--force-kvm", "--allow-files", dir, "--listen", "127.0.0.1:0"];

  beforeAll(async () => {
    ({ a, b, peer } = await startPair(args, dir));
  }, 60_000);
  afterAll(() => stopPair([a, b], dir), 60_000);


  it.each([
    ["a raw disk on shared storage", { pool: "shared" }, false, "raw"],
    ["a qcow2 disk on shared storage", { pool: "shared" }, false, "qcow2"],
    ["a raw disk of A's own, copied", {}, true, "raw"],
    ["a qcow2 disk of A's own, copied", {}, true, "qcow2"],
  ] as const)("moves a jailed VMM's guest with %s: it runs on B in B's jail, its stream carried by both daemons", async (_what, where, copyDisks, diskFormat) => {
    const name = `sb${copyDisks ? "copy" : "shared"}${diskFormat}`;
    await a.client.createVm({ name, kernel, memoryMiB: 64, rng: false, diskSize: "16M", diskFormat, ...where }, { start: true });
    await until(`${name}'s banner`, async () => (await a.client.console(name)).toString().includes(TINY_KERNEL_BANNER) || undefined);
    const onA = await a.client.getVm(name);
    expect(onA.sandbox?.uid).toBeGreaterThan(0);
    await answers(a, name, "before-move");
    await a.client.migrateVm(name, { ...peer, ...(copyDisks ? { copyDisks: true } : {}) });
    const onB = await until(`${name} running on B`, async () => {
      const v = await b.client.getVm(name).catch(() => undefined);
      return v?.state === "running" ? v : undefined;
    }, 60_000);
    expect((await a.client.migration(name)).phase).not.toBe("failed");
    // Jailed there too: its own uid, without capabilities.
    expect(onB.sandbox?.uid).toBeGreaterThan(0);
    const status = readFileSync(`/proc/${onB.pid!}/status`, "utf8");
    expect(status).toMatch(/^CapEff:\s*0+$/m);
    expect(status).toMatch(/^Seccomp:\s*2$/m);
    await answers(b, name, "after-move");
    expect((await b.client.console(name)).toString()).not.toContain(TINY_KERNEL_BANNER);
    await until("A to drop it", async () => ((await a.client.listVms()).some((v) => v.name === name) ? undefined : true));
    if (copyDisks) expect(onB.disks[0]!.path.startsWith(b.home)).toBe(true);
    expect(onB.disks[0]!.format).toBe(diskFormat);
    const check = spawnSync("qemu-img", ["check", "-U", onB.disks[0]!.path], { encoding: "utf8", timeout: 60_000 });
    if (diskFormat === "qcow2") expect(check.status, `${check.stdout}${check.stderr}`).toBe(0);
    await b.client.removeVm(name, { force: true });
  }, 120_000);
});
