/**
 * The metadata paths ordinary workloads rarely reach: an L2 cache that must evict, and must flush
 * because every table it holds is dirty (with a cache of 1 to 3 tables), in the middle of a
 * request; and a refcount table that grows (512 B clusters, more than 16 MiB written). The image
 * on disk must be consistent for `qemu-img check` at every request boundary and at every
 * metadata flush, and read back (ours and QEMU's) as written.
 */
import { closeSync, copyFileSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, describe, expect, it, vi } from "vitest";
import type { DiskBackend } from "../backend.js";
import { RawBackend } from "../raw.js";
import { io, pattern, qemuCheck, qemuImg, qemuRaw, readAll } from "../test-disk.js";
import { createQcow2 } from "./create.js";
import { Qcow2Backend } from "./image.js";
import { L2Cache } from "./l2-cache.js";

const KiB = 1024;
const MiB = 1024 * 1024;
const dir = mkdtempSync(join(tmpdir(), "tv-qcow2-meta-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
afterEach(() => {
  vi.restoreAllMocks();
});
let n = 0;
const file = (name: string) => join(dir, `${n++}-${name}`);

/** The backend's private parts this file looks at. */
interface Insides {
  l2: L2Cache;
  flushMetadata(): void;
}
const insides = (b: Qcow2Backend) => b as unknown as Insides;
const cacheSize = (c: L2Cache) => (c as unknown as { tables: Map<number, unknown> }).tables.size;

/** An image and a backend on it with a tiny L2 cache; close() closes both. */
function openWith(path: string, l2CacheTables: number, readonly = false, backing?: DiskBackend): { b: Qcow2Backend; close: () => void } {
  const fd = openSync(path, readonly ? "r" : "r+");
  const b = new Qcow2Backend(fd, { readonly, path, l2CacheTables, ...(backing !== undefined ? { backing } : {}) });
  return {
    b,
    close: () => {
      b.close();
      closeSync(fd);
    },
  };
}

describe("L2Cache", () => {
  const table = (dirty = false) => ({ buf: Buffer.alloc(512), dirty });

  it("evicts the least recently used clean table, never a dirty one", () => {
    const c = new L2Cache(3);
    const a = table(true);
    c.put(512, a);
    c.put(1024, table());
    c.put(1536, table());
    c.get(1024); // 1536 is now the least recently used clean table
    c.put(2048, table());
    expect(c.get(512)).toBe(a);
    expect(c.get(1536)).toBeUndefined();
    expect(c.get(1024)).toBeDefined();
    expect(c.get(2048)).toBeDefined();
    expect(c.needsFlush()).toBe(false);
  });

  it("asks for a flush exactly when it is full of dirty tables, and is clean after markClean", () => {
    const c = new L2Cache(2);
    const a = table();
    const b = table();
    c.put(512, a);
    c.put(1024, b);
    c.markDirty(a);
    expect(c.needsFlush()).toBe(false);
    c.markDirty(b);
    c.markDirty(b);
    expect(c.needsFlush()).toBe(true);
    expect(c.dirtyTables().map(([off]) => off).sort((x, y) => x - y)).toEqual([512, 1024]);
    c.markClean(a);
    c.markClean(a);
    expect(c.needsFlush()).toBe(false);
    c.markClean(b);
    expect(c.dirty).toBe(false);
    expect(c.dirtyTables()).toEqual([]);
  });
});

describe("an L2 cache too small for the working set", () => {
  // 512 B clusters: one L2 table maps 64 clusters (32 KiB of disk); 4 MiB is 128 tables.
  const size = 4 * MiB;
  const perTable = 32 * KiB;

  for (const tables of [1, 2, 3]) {
    it(`${tables} table${tables > 1 ? "s" : ""}: requests across many tables evict, flush when all are dirty, and every flush leaves a consistent image`, () => {
      // Over a raw backing file: a cluster whose L2 entry reached the file before its data would
      // read zeros, which is neither what it held (the backing file's bytes) nor what was written.
      const baseRaw = file("base.raw");
      const base = pattern(size, 0, 42);
      writeFileSync(baseRaw, base);
      const img = file("small-cache.qcow2");
      createQcow2(img, { size, clusterBits: 9, backing: { file: baseRaw, format: "raw" } });
      const model = Buffer.from(base);
      const baseFd = openSync(baseRaw, "r");
      const h = openWith(img, tables, false, new RawBackend(baseFd));
      // Every metadata flush (the cache's own inside a request included) leaves the file a
      // consistent image (a copy taken right then is what a kill there would leave), in which each
      // byte reads as before or after the request in progress.
      const snaps: string[] = [];
      const real = Qcow2Backend.prototype as unknown as Insides;
      const original = real.flushMetadata;
      vi.spyOn(real, "flushMetadata").mockImplementation(function (this: Qcow2Backend) {
        original.call(this);
        const snap = file("snap.qcow2");
        copyFileSync(img, snap);
        snaps.push(snap);
      });
      let flushes = 0;
      const judge = (before: Buffer, after: Buffer | undefined) => {
        for (const snap of snaps.splice(0)) {
          flushes++;
          const check = qemuCheck(snap);
          expect([0, 3], `${snap}: ${JSON.stringify(check.report)}`).toContain(check.status);
          if (after !== undefined) {
            const fd = openSync(snap, "r");
            const got = readAll(new Qcow2Backend(fd, { readonly: true, path: snap, backing: new RawBackend(baseFd) }), 0, size);
            closeSync(fd);
            for (let p = 0; p < size; p++) {
              if (got[p] !== before[p] && got[p] !== after[p]) throw new Error(`a flush inside a request left byte ${p} = ${got[p]}: neither ${before[p]} (before) nor ${after[p]} (after)`);
            }
          }
          rmSync(snap);
        }
      };
      try {
        const c = insides(h.b).l2;
        const request = (f: () => number, change: ((m: Buffer) => void) | undefined) => {
          const before = Buffer.from(model);
          expect(f()).toBe(0);
          expect(cacheSize(c)).toBeLessThanOrEqual(tables);
          if (change !== undefined) change(model);
          judge(before, change === undefined ? undefined : model);
        };
        const write = (pos: number, len: number, seed: number) => {
          const data = pattern(len, pos, seed);
          request(() => io(h.b, data, pos, true), (m) => data.copy(m, pos));
        };
        // One cluster in each of 24 tables, request by request: the cache fills with dirty tables and must flush to go on.
        for (let t = 0; t < 24; t++) write(t * 5 * perTable + 1536, 512, t + 1);
        const requestFlushes = flushes;
        expect(requestFlushes).toBeGreaterThan(0);
        // One 1 MiB request over 32 tables: whole new clusters batched into runs, flushes inside the request.
        write(2 * MiB, MiB, 100);
        expect(flushes).toBeGreaterThan(requestFlushes);
        // Partial clusters (copy on write from the backing file) across table edges.
        for (let t = 0; t < 10; t++) write(t * 11 * perTable + perTable - 700, 1400, 200 + t);
        // Write-zeroes across tables (whole clusters become zero clusters: the backing file is hidden).
        const z = 2 * MiB + 3 * perTable + 512;
        request(() => h.b.writeZeroes(z, 5 * perTable), (m) => m.fill(0, z, z + 5 * perTable));
        // A discard across tables: what it reads afterwards is unspecified, so it is taken as read.
        request(() => h.b.discard(0, 3 * perTable), undefined);
        readAll(h.b, 0, 3 * perTable).copy(model, 0);

        // Reads across every table evict clean tables only: no flush, and a dirty table stays dirty.
        expect(h.b.flush()).toBe(0);
        judge(model, model);
        write(127 * perTable + 4096, 512, 300); // a table nothing touched yet: a new, dirty one, beside clean ones
        expect(c.dirty).toBe(true);
        if (tables > 1) {
          const before = flushes;
          expect(readAll(h.b, 0, size).equals(model)).toBe(true);
          judge(model, model);
          expect(flushes).toBe(before);
          expect(c.dirty).toBe(true);
        }
        expect(h.b.flush()).toBe(0);
        judge(model, model);
        expect(c.dirty).toBe(false);
        expect(readAll(h.b, 0, size).equals(model)).toBe(true);
      } finally {
        h.close();
        vi.restoreAllMocks();
      }
      judge(model, model);
      closeSync(baseFd);
      const check = qemuCheck(img);
      expect(check.status, JSON.stringify(check.report)).toBe(0);
      expect(qemuRaw(img, file("raw")).equals(model)).toBe(true);
      console.log(`L2 cache of ${tables}: ${flushes} metadata flushes, each a consistent image`);
    });
  }
});

describe("the refcount table grows", () => {
  // 512 B clusters: a refcount block counts 256 clusters (128 KiB) at 16 bits, 64 (32 KiB) at 64;
  // the first table (one cluster, 64 entries) covers 8 MiB, or 2 MiB. Writing 20 MiB passes both.
  for (const [refcountOrder, minGrowths] of [[4, 2], [6, 3]] as const) {
    it(`${2 ** refcountOrder}-bit refcounts: 20 MiB written in 1 MiB requests moves the table past everything, and qemu-img agrees at every step`, () => {
      const size = 24 * MiB;
      const img = file("grow.qcow2");
      createQcow2(img, { size, clusterBits: 9, refcountOrder });
      const model = Buffer.alloc(size);
      const header = () => {
        const h = readFileSync(img).subarray(0, 104);
        return { offset: Number(h.readBigUInt64BE(48)), clusters: h.readUInt32BE(56) };
      };
      const tables = [header()];
      const h = openWith(img, 1024);
      try {
        for (let i = 0; i < 20; i++) {
          // Not in order, and one request partly over the last: copies on write and in-place rewrites too.
          const pos = ((i * 7) % 20) * MiB + (i % 3 === 0 ? 512 * 3 : 0);
          const data = pattern(MiB, pos, i + 1);
          const sizeBefore = statSync(img).size;
          expect(io(h.b, data, pos, true)).toBe(0);
          data.copy(model, pos);
          const t = header();
          if (t.offset !== tables.at(-1)!.offset) {
            // A new table lies past everything the file held before the request, and is larger.
            expect(t.offset).toBeGreaterThanOrEqual(sizeBefore);
            expect(t.offset % 512).toBe(0);
            expect(t.clusters).toBeGreaterThan(tables.at(-1)!.clusters);
            tables.push(t);
            // The file, as it is between two requests (open, not flushed), is a consistent image.
            const check = qemuCheck(img);
            expect([0, 3], JSON.stringify(check.report)).toContain(check.status);
          }
        }
        expect(h.b.flush()).toBe(0);
        expect(readAll(h.b, 0, size).equals(model)).toBe(true);
      } finally {
        h.close();
      }
      expect(tables.length - 1).toBeGreaterThanOrEqual(minGrowths);
      // Closed: clean, nothing leaked (the old tables were freed), and QEMU reads what we wrote.
      const check = qemuCheck(img);
      expect(check.report, JSON.stringify(check.report)).toMatchObject({ "check-errors": 0 });
      expect(check.status, JSON.stringify(check.report)).toBe(0);
      expect(qemuRaw(img, file("raw")).equals(model)).toBe(true);
      const info = JSON.parse(qemuImg(["info", "--output=json", img])) as { "format-specific": { data: { "refcount-bits": number } } };
      expect(info["format-specific"].data["refcount-bits"]).toBe(2 ** refcountOrder);
      // Reopened, it goes on growing from where it is.
      const r = openWith(img, 16);
      const more = pattern(2 * MiB, 21 * MiB, 99);
      expect(io(r.b, more, 21 * MiB, true)).toBe(0);
      more.copy(model, 21 * MiB);
      r.close();
      expect(qemuCheck(img).status).toBe(0);
      expect(qemuRaw(img, file("raw")).equals(model)).toBe(true);
      console.log(`refcount table (${2 ** refcountOrder}-bit): ${tables.map((t) => `${t.clusters} cluster(s) at ${t.offset}`).join(" -> ")}`);
    }, 60_000);
  }
});
