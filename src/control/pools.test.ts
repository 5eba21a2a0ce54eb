import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { checkPoolPath, checkPoolQuota, claimPool, poolOwner, poolReport, releasePool, sweepPool, type PoolRow } from "./pools.js";

const dir = mkdtempSync(join(tmpdir(), "tv-pools-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const MiB = 2 ** 20;
const row = (name: string, path: string, quotaBytes: number | null = null): PoolRow => ({ name, path, quotaBytes, createdAt: "2026-01-01T00:00:00.000Z" });

describe("storage pools", () => {
  it("a pool directory belongs to one daemon: another home is refused, and its files are never swept", () => {
    const p = join(dir, "shared");
    mkdirSync(p);
    claimPool(p, "/home-a");
    expect(poolOwner(p)).toBe("/home-a");
    claimPool(p, "/home-a"); // again by its owner: fine
    expect(() => claimPool(p, "/home-b")).toThrow(expect.objectContaining({ code: "POOL_PATH", message: expect.stringContaining("another typevisor daemon (/home-a)") }));
    // home-b's sweep leaves home-a's disks alone; home-a's removes what no VM of its has.
    writeFileSync(join(p, "0123456789ab-disk0.qcow2"), "");
    writeFileSync(join(p, "ba9876543210-disk1.raw.creating"), "");
    writeFileSync(join(p, "notes.txt"), "");
    expect(sweepPool(row("s", p), new Set(), "/home-b")).toEqual([]);
    expect(sweepPool(row("s", p), new Set(["0123456789ab"]), "/home-a")).toEqual([join(p, "ba9876543210-disk1.raw.creating")]);
    expect(existsSync(join(p, "0123456789ab-disk0.qcow2"))).toBe(true);
    expect(existsSync(join(p, "notes.txt"))).toBe(true);
    releasePool(p);
    expect(poolOwner(p)).toBeUndefined();
    claimPool(p, "/home-b");
  });

  it("refuses paths that overlap the daemon's own directories or another pool", () => {
    const home = join(dir, "home");
    mkdirSync(join(home, "vms"), { recursive: true });
    const a = join(dir, "a");
    mkdirSync(join(a, "b"), { recursive: true });
    expect(checkPoolPath(a, [home], [])).toBe(a);
    expect(() => checkPoolPath(join(home, "vms"), [home], [])).toThrow(/overlaps the daemon's own directory/);
    expect(() => checkPoolPath(dir, [home], [])).toThrow(/overlaps the daemon's own directory/);
    expect(() => checkPoolPath(join(a, "b"), [home], [row("a", a)])).toThrow(/overlaps pool a/);
    expect(() => checkPoolPath(`${a}//b`, [home], [])).toThrow(/give it plainly/);
    expect(() => checkPoolPath("/", [], [])).toThrow(/root directory/);
  });

  it("reports allocated, available and overcommit, and refuses a disk past the quota saying what is free", () => {
    const p = row("q", dir, 10 * MiB);
    const r = poolReport(p, [{ vm: "x", path: join(dir, "none"), sizeBytes: 6 * MiB, pool: "q" }, { vm: "y", path: "/none", sizeBytes: 50 * MiB }], 2 * MiB);
    expect(r).toMatchObject({ allocatedBytes: 8 * MiB, availableBytes: 2 * MiB, overcommit: 0.8, disks: 1, vms: ["x"], usedBytes: 0 });
    expect(() => checkPoolQuota(p, 8 * MiB, 2 * MiB)).not.toThrow();
    expect(() => checkPoolQuota(p, 8 * MiB, 3 * MiB)).toThrow(expect.objectContaining({ code: "INSUFFICIENT_RESOURCES", message: "not enough space in pool q: asked 3.0 MiB, 2.0 MiB free of its 10.0 MiB quota (8.0 MiB allocated to its disks)" }));
    expect(() => checkPoolQuota(row("n", dir), 1e15, 1e15)).not.toThrow();
  });
});
