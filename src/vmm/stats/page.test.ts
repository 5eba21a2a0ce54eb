import { mkdirSync, mkdtempSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { BlockDevice } from "../devices/virtio/block/block.js";
import { DISK, diskSlot, HEADER, MAX_DISKS, NIC, nicSlot, parseStatsChanges, parseStatsPage, STATS_HEADER_BYTES, STATS_PAGE_BYTES } from "./layout.js";
import { StatsPage } from "./page.js";

const dir = mkdtempSync(join(tmpdir(), "tv-stats-page-"));

/** A page's bytes as a reader of its file would get them. */
const bytesOf = (p: StatsPage): Uint8Array => new Uint8Array(p.u32.buffer, p.u32.byteOffset, STATS_PAGE_BYTES).slice();

describe("the stats page", () => {
  it("is no page until set up, then reads back what the devices counted", () => {
    const p = StatsPage.create();
    expect(p.read()).toBeUndefined();
    expect(parseStatsPage(bytesOf(p))).toBeUndefined();
    p.setDevices(2, 1);
    const d1 = p.disk(1);
    d1[DISK.READ_BYTES] = 4096;
    d1[DISK.READ_OPS] = 1;
    p.disk(0)[DISK.WRITE_BYTES] = 512;
    p.nic(0)[NIC.RX_BYTES] = 1500;
    p.nic(0)[NIC.TX_PACKETS] = 3;
    p.setStartedAt(1_700_000_000_000);
    const r = parseStatsPage(bytesOf(p));
    expect(r).toEqual(p.read());
    expect(r).toMatchObject({
      disks: [{ readBytes: 0, writeBytes: 512 }, { readBytes: 4096, readOps: 1 }],
      nics: [{ rxBytes: 1500, txPackets: 3 }],
      totals: { diskReadBytes: 4096, diskWriteBytes: 512, diskReadOps: 1, netRxBytes: 1500, netTxPackets: 3 },
      startedAtMs: 1_700_000_000_000,
    });
    // A new boot's devices count from 0.
    p.setDevices(2, 1);
    expect(p.read()?.totals.diskReadBytes).toBe(0);
  });

  it("counts changes in its header, which a watchdog reads alone", () => {
    const p = StatsPage.create();
    expect(parseStatsChanges(bytesOf(p))).toBeUndefined(); // not set up
    p.setDevices(0, 0);
    expect(parseStatsChanges(bytesOf(p))).toBe(0);
    p.noteChange();
    p.noteChange();
    expect(parseStatsChanges(bytesOf(p).subarray(0, STATS_HEADER_BYTES))).toBe(2);
    expect(p.read()?.changes).toBe(2);
    expect(parseStatsChanges(bytesOf(p).subarray(0, 10))).toBeUndefined();
  });

  it("is where a disk counts its completed requests when given one", () => {
    const p = StatsPage.create();
    p.setDevices(1, 0);
    const file = join(dir, "disk.img");
    writeFileSync(file, Buffer.alloc(1 << 20));
    const dev = new BlockDevice({ path: file, readonly: false, counters: p.disk(0) });
    try {
      // What a completion counts (the request path itself is block.test.ts's).
      (dev as unknown as { countDone(kind: number, bytes: number): void }).countDone(1, 8192);
      (dev as unknown as { countDone(kind: number, bytes: number): void }).countDone(2, 512);
      expect(p.read()?.disks[0]).toEqual({ readBytes: 8192, writeBytes: 512, readOps: 1, writeOps: 1 });
      expect(dev.stats()).toMatchObject({ readBytes: 8192, writeBytes: 512, readOps: 1, writeOps: 1 });
    } finally {
      dev.close();
    }
  });

  it("moves onto a file with what it holds, and every later count lands in the file", () => {
    const p = StatsPage.create();
    p.setDevices(1, 1);
    p.disk(0)[DISK.READ_OPS] = 7;
    const file = join(dir, "stats");
    writeFileSync(file, Buffer.alloc(10_000, 0xff)); // an earlier VMM's, larger: emptied first
    p.backWith(file);
    expect(readFileSync(file).length).toBe(STATS_PAGE_BYTES);
    expect(parseStatsPage(readFileSync(file))?.disks[0]?.readOps).toBe(7);
    p.nic(0)[NIC.TX_BYTES] = 99; // through a view made before the move
    expect(parseStatsPage(readFileSync(file))?.totals.netTxBytes).toBe(99);
  });

  it("refuses a symlink or a directory as its file", () => {
    const p = StatsPage.create();
    const target = join(dir, "target");
    writeFileSync(target, "keep");
    symlinkSync(target, join(dir, "link"));
    expect(() => p.backWith(join(dir, "link"))).toThrow(/--stats-file/);
    expect(readFileSync(target, "utf8")).toBe("keep");
    mkdirSync(join(dir, "adir"));
    expect(() => p.backWith(join(dir, "adir"))).toThrow(/--stats-file/);
  });

  it("reads a hostile page as no page, never as wrong numbers", () => {
    const good = StatsPage.create();
    good.setDevices(1, 1);
    const base = bytesOf(good);
    const with_ = (f: (u32: Uint32Array, f64: Float64Array) => void): Uint8Array => {
      const b = base.slice();
      f(new Uint32Array(b.buffer), new Float64Array(b.buffer));
      return b;
    };
    expect(parseStatsPage(base)).toBeDefined();
    expect(parseStatsPage(base.subarray(0, 100))).toBeUndefined();
    expect(parseStatsPage(with_((u) => (u[HEADER.VERSION] = 2)))).toBeUndefined();
    expect(parseStatsPage(with_((u) => (u[HEADER.DISKS] = MAX_DISKS + 1)))).toBeUndefined();
    expect(parseStatsPage(with_((u) => (u[HEADER.NICS] = 0xffff_ffff)))).toBeUndefined();
    for (const bad of [NaN, -1, Infinity, 0.5, 2 ** 53]) {
      expect(parseStatsPage(with_((_, f) => (f[diskSlot(0) + DISK.WRITE_BYTES] = bad)))).toBeUndefined();
      expect(parseStatsPage(with_((_, f) => (f[nicSlot(0) + NIC.RX_DROPPED] = bad)))).toBeUndefined();
      expect(parseStatsPage(with_((_, f) => (f[2] = bad)))).toBeUndefined();
    }
    // Any bytes at all behind a valid header: no throw, and whatever is taken is whole, finite and not negative.
    fc.assert(
      fc.property(fc.uint8Array({ minLength: STATS_PAGE_BYTES, maxLength: STATS_PAGE_BYTES }), fc.nat(MAX_DISKS + 2), fc.nat(40), (noise, disks, nics) => {
        const b = noise.slice();
        b.set(base.subarray(0, 8));
        new Uint32Array(b.buffer)[HEADER.DISKS] = disks;
        new Uint32Array(b.buffer)[HEADER.NICS] = nics;
        const r = parseStatsPage(b);
        if (r === undefined) return;
        for (const v of [...r.disks.flatMap(Object.values), ...r.nics.flatMap(Object.values)]) expect(Number.isSafeInteger(v) && v >= 0).toBe(true);
        for (const v of Object.values(r.totals)) expect(Number.isFinite(v) && v >= 0).toBe(true);
      }),
      { numRuns: 300 },
    );
  });
});
