/**
 * Incremental snapshots (`POST /snapshot {"path", "track"}` then `{"path", "base"}`) on the host
 * with the tiny test kernel (--force-kvm): what an incremental snapshot holds is checked against a
 * full snapshot taken at the same instant (the VM paused between the two): the base's memory with
 * the incremental layer's pages laid over it must be that full snapshot's memory, byte for byte.
 * A restore from a chain runs on; a base that was replaced or is missing is refused before any
 * vCPU runs.
 */
import { cpSync, existsSync, mkdtempSync, openSync, readFileSync, readSync, closeSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { VMGENID_ADDR, VMGENID_SIZE } from "../../src/vmm/arch/x86_64/layout.js";
import { decodeState, type SnapshotState } from "../../src/vmm/snapshot/state.js";
import { consoleClient as connectConsole, type ConsoleClient } from "../helpers/console-client.js";
import { until as pollUntil } from "../helpers/daemon.js";
import { TINY_KERNEL_BANNER, writeTinyKernel } from "../helpers/tiny-kernel.js";
import { unixApi } from "../helpers/unix-api.js";
import { killVmm, startVmm, type Vmm } from "../helpers/vmm-process.js";

const hasKvm = existsSync("/dev/kvm");
const dir = mkdtempSync(join(tmpdir(), "tv-incsnap-"));
const kernel = join(dir, "tiny.bzImage");
writeTinyKernel(kernel);
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const until = (what: string, cond: () => boolean, ms = 20_000): Promise<boolean> => pollUntil(what, cond, ms);
const MEMORY_MIB = 64;
const PAGE = 4096;

const start = (name: string, args: string[]): Vmm => startVmm(dir, name, args);

async function open(v: Vmm): Promise<ConsoleClient> {
  await until(`console socket ${v.sock}`, () => existsSync(v.sock));
  await until("the API", () => existsSync(v.api));
  return connectConsole(v.sock);
}

const kill = killVmm;

const readIf = (p: string): string => (existsSync(p) ? readFileSync(p, "latin1") : "");
const stateOf = (d: string): SnapshotState => decodeState(readFileSync(join(d, "state.json")), d);

/** Guest memory as a restore of `chain` (base first) sees it: the base's file, then each layer's runs over it. */
function composite(chain: string[]): Buffer {
  const out = Buffer.alloc(MEMORY_MIB * 1024 * 1024);
  for (const d of chain) {
    const layout = stateOf(d).memory!;
    const fd = openSync(join(d, "memory"), "r");
    try {
      for (const r of layout.regions) {
        const runs = r.runs ?? [[0, r.size / PAGE] as const];
        for (const [start, count] of runs) readSync(fd, out, r.fileOffset + start * PAGE, count * PAGE, r.fileOffset + start * PAGE);
      }
    } finally {
      closeSync(fd);
    }
  }
  return out;
}

async function snapshot(v: Vmm, body: Record<string, unknown>): Promise<Record<string, unknown>> {
  const r = await unixApi(v.api, "POST", "/snapshot", body);
  expect(r.status, JSON.stringify(r.body)).toBe(200);
  return r.body;
}

describe.skipIf(!hasKvm)("incremental snapshots (tiny kernel, --force-kvm)", () => {
  const s1 = join(dir, "s1");
  const s2 = join(dir, "s2");
  const s3 = join(dir, "s3");

  it("holds exactly the pages written since its base: base + layer = a full snapshot of the same instant", async () => {
    const a = start("a", ["--kernel", kernel, "--memory", String(MEMORY_MIB), "--cpus", "2", "--rng"]);
    try {
      const c = await open(a);
      await until("the banner", () => readIf(a.log).includes(TINY_KERNEL_BANNER));
      // An incremental snapshot needs a tracked base first.
      const refused = await unixApi(a.api, "POST", "/snapshot", { path: join(dir, "nobase"), base: join(dir, "nowhere") });
      expect(refused.status).toBe(409);
      expect(existsSync(join(dir, "nobase"))).toBe(false);
      const full = await snapshot(a, { path: s1, track: true });
      c.sock.write("one");
      await until("the echo", () => c.text().includes("one"));
      // Paused, so the incremental and the full snapshot below see the same memory.
      expect((await unixApi(a.api, "POST", "/pause")).status).toBe(200);
      const inc = await snapshot(a, { path: s2, base: s1 });
      await snapshot(a, { path: join(dir, "f2") });
      expect(inc.dataBytes).toBeGreaterThan(0);
      expect(inc.dataBytes).toBeLessThan(full.dataBytes as number);
      expect(stateOf(s2).memory!.base).toEqual({ path: "../s1", sha256: expect.stringMatching(/^[0-9a-f]{64}$/) });
      expect(composite([s1, s2]).equals(composite([join(dir, "f2")]))).toBe(true);
      expect((await unixApi(a.api, "POST", "/resume")).status).toBe(200);
      // Only the tracked snapshot is a base: s1 is not any more.
      const stale = await unixApi(a.api, "POST", "/snapshot", { path: join(dir, "stale"), base: s1 });
      expect([stale.status, stale.body.code]).toEqual([400, "SNAPSHOT_MISMATCH"]);
      c.sock.write("two");
      await until("the second echo", () => c.text().includes("two"));
      await snapshot(a, { path: s3, base: s2 });
      c.sock.destroy();
    } finally {
      await kill(a);
    }
  }, 90_000);

  it("restores from a chain of three: the guest goes on; a full snapshot of it equals the chain's memory", async () => {
    const b = start("b", ["--restore", s3, "--paused"]);
    const f3 = join(dir, "f3");
    try {
      const c = await open(b);
      await snapshot(b, { path: f3 });
      // Taken before the restored guest ran: exactly what the chain holds, but for the new
      // generation ID the restore wrote (devices/legacy/vmgenid: every restore is a new machine).
      const got = composite([f3]);
      const want = composite([s1, s2, s3]);
      expect(got.subarray(VMGENID_ADDR, VMGENID_ADDR + VMGENID_SIZE).equals(want.subarray(VMGENID_ADDR, VMGENID_ADDR + VMGENID_SIZE))).toBe(false);
      got.fill(0, VMGENID_ADDR, VMGENID_ADDR + VMGENID_SIZE);
      want.fill(0, VMGENID_ADDR, VMGENID_ADDR + VMGENID_SIZE);
      const diff: string[] = [];
      for (let p = 0; p < got.length / PAGE; p++) if (got.subarray(p * PAGE, (p + 1) * PAGE).compare(want.subarray(p * PAGE, (p + 1) * PAGE)) !== 0) diff.push(`0x${(p * PAGE).toString(16)}`);
      expect(diff).toEqual([]);
      expect((await unixApi(b.api, "POST", "/resume")).status).toBe(200);
      c.sock.write("three");
      await until("the restored guest's echo", () => c.text().includes("three"));
      expect(readIf(b.log)).not.toContain(TINY_KERNEL_BANNER);
      c.sock.destroy();
    } finally {
      await kill(b);
    }
  }, 60_000);

  it.each([
    ["replaced", (d: string) => {
      // Another snapshot's state under the base's name: a different SHA-256.
      cpSync(join(dir, "f2", "state.json"), join(d, "s1", "state.json"));
    }, /is not the snapshot it was taken on/],
    ["missing", (d: string) => rmSync(join(d, "s1"), { recursive: true }), /not a snapshot/],
    ["layer truncated", (d: string) => writeFileSync(join(d, "s2", "memory"), Buffer.alloc(PAGE)), /memory file is 4096 bytes/],
  ] as const)("refuses a chain whose base is %s, with one line and exit 2", async (name, change, message) => {
    const d = mkdtempSync(join(dir, `bad-${name.replace(" ", "-")}-`));
    for (const s of ["s1", "s2", "s3"]) cpSync(join(dir, s), join(d, s), { recursive: true });
    change(d);
    const v = start(`bad-${name.replace(" ", "-")}`, ["--restore", join(d, "s3")]);
    expect(await v.exited, v.stderr()).toBe(2);
    expect(v.stderr()).toMatch(message);
    expect(readIf(v.log)).toBe("");
  }, 30_000);
});
