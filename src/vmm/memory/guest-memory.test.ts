import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { isTypevisorError } from "../../errors.js";
import { addressOf } from "../../sys/iov.js";
import * as libc from "../../sys/libc.js";
import { DEFAULT_VIEW_GEOMETRY, GuestMemory, MAX_VIEW_BYTES } from "./guest-memory.js";

// Two regions with a hole between them, packed back to back in one backing (like RAM below and above the 32-bit PCI hole).
const backing = new ArrayBuffer(0x6000);
const mem = new GuestMemory(backing, [
  { guestPhysAddr: 0x10000, size: 0x2000, hostOffset: 0x4000 },
  { guestPhysAddr: 0, size: 0x4000, hostOffset: 0 },
]);
const base = addressOf(new Uint8Array(backing));

describe("GuestMemory.tryHostAddress", () => {
  it("maps a range to where its bytes live in the backing, or refuses it exactly like slice()", () => {
    fc.assert(
      fc.property(fc.integer({ min: -2, max: 0x13000 }), fc.integer({ min: 0, max: 0x5000 }), (gpa, len) => {
        let sliceOk = true;
        try {
          mem.slice(gpa, len);
        } catch (e) {
          expect(isTypevisorError(e) && e.code === "GUEST_MEMORY_OUT_OF_RANGE").toBe(true);
          sliceOk = false;
        }
        if (!sliceOk) {
          expect(mem.tryHostAddress(gpa, len)).toBe(-1);
          return;
        }
        const expected = gpa >= 0x10000 ? base + 0x4000 + (gpa - 0x10000) : base + gpa;
        expect(mem.tryHostAddress(gpa, len)).toBe(expected);
        if (len > 0) expect(addressOf(mem.slice(gpa, len))).toBe(expected);
      }),
      { numRuns: 500 },
    );
  });

  it("refuses a range straddling the hole and non-integer or unsafe addresses", () => {
    expect(mem.tryHostAddress(0x3fff, 2)).toBe(-1);
    expect(mem.tryHostAddress(0.5, 1)).toBe(-1);
    expect(mem.tryHostAddress(2 ** 53, 1)).toBe(-1);
  });
});

describe("GuestMemory.dataView", () => {
  it("sees the same bytes as slice() over the same range, and refuses what slice() refuses", () => {
    fc.assert(
      fc.property(fc.integer({ min: -2, max: 0x13000 }), fc.integer({ min: 0, max: 0x5000 }), (gpa, len) => {
        let s: Uint8Array | undefined;
        try {
          s = mem.slice(gpa, len);
        } catch {
          expect(() => mem.dataView(gpa, len)).toThrow(/outside guest RAM/);
          return;
        }
        const v = mem.dataView(gpa, len);
        expect(v.byteLength).toBe(len);
        if (len > 0) {
          s[len - 1] = (s[len - 1]! + 1) & 0xff;
          expect(v.getUint8(len - 1)).toBe(s[len - 1]);
          expect(addressOf(new Uint8Array(v.buffer, v.byteOffset, len))).toBe(addressOf(s));
        }
      }),
      { numRuns: 300 },
    );
  });
});

/*
 * The region walk under hostile addresses, with views cut tiny so every boundary is within
 * reach: a few regions (gaps between them, or none), views of `step` bytes overlapping by
 * `overlap`, and accesses starting and ending on or next to every region and view boundary.
 * The model is the backing buffer itself (views alias it), so every answer is checked against
 * the bytes where they must be, and a write may change exactly its own bytes.
 */
describe("GuestMemory region and view walk (fast-check, every boundary)", () => {
  interface Layout {
    step: number;
    overlap: number;
    regions: { guestPhysAddr: number; size: number; hostOffset: number }[];
    total: number;
  }
  const layoutArb: fc.Arbitrary<Layout> = fc
    .record({
      step: fc.integer({ min: 1, max: 48 }),
      overlap: fc.integer({ min: 0, max: 20 }),
      parts: fc.array(fc.record({ gap: fc.integer({ min: 0, max: 40 }), size: fc.integer({ min: 1, max: 160 }) }), { minLength: 1, maxLength: 4 }),
      pad: fc.integer({ min: 0, max: 16 }),
    })
    .map(({ step, overlap, parts, pad }) => {
      const regions: Layout["regions"] = [];
      let gpa = 0;
      let host = pad; // not at offset 0 of the backing: host offsets must be honoured
      for (const p of parts) {
        gpa += p.gap;
        regions.push({ guestPhysAddr: gpa, size: p.size, hostOffset: host });
        gpa += p.size;
        host += p.size + 3;
      }
      return { step, overlap, regions, total: host + pad };
    });

  /** Every boundary of the layout, and its neighbours. */
  const boundaries = (l: Layout): number[] => {
    const out = new Set<number>();
    for (const r of l.regions) {
      for (let off = 0; off <= r.size + l.step + l.overlap; off += l.step) {
        for (const b of [off, off + l.overlap]) for (const d of [-2, -1, 0, 1, 2]) out.add(r.guestPhysAddr + b + d);
      }
      for (const d of [-2, -1, 0, 1, 2]) out.add(r.guestPhysAddr + r.size + d);
    }
    return [...out].sort((a, b) => a - b);
  };

  const caseArb = layoutArb.chain((l) => {
    const bs = boundaries(l);
    const point = fc.oneof(fc.constantFrom(...bs), fc.integer({ min: -3, max: bs[bs.length - 1]! + 3 }));
    return fc.record({
      l: fc.constant(l),
      ops: fc.array(fc.tuple(fc.constantFrom("read", "write", "fill", "slices", "slice", "trySlice", "dataView", "u8", "u16", "u32", "u64", "host"), point, point, fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 30 }),
    });
  });

  it("answers every access exactly as the model says: in one region or refused, split only where a view ends", () => {
    fc.assert(
      fc.property(caseArb, ({ l, ops }) => {
        const backing = new ArrayBuffer(l.total);
        const model = new Uint8Array(backing);
        for (let i = 0; i < model.length; i++) model[i] = (i * 7 + 1) & 0xff;
        const mem = new GuestMemory(backing, l.regions, { step: l.step, overlap: l.overlap });
        const base = addressOf(model);
        const regionOf = (gpa: number, len: number) => l.regions.find((r) => gpa >= r.guestPhysAddr && gpa + len <= r.guestPhysAddr + r.size);
        /** Whether the model puts [gpa, gpa+len) of region r inside one view. */
        const oneView = (r: Layout["regions"][number], gpa: number, len: number): boolean => {
          const off = gpa - r.guestPhysAddr;
          const i = Math.min(Math.floor(off / l.step), Math.ceil(r.size / l.step) - 1);
          return off + len <= Math.min(i * l.step + l.step + l.overlap, r.size);
        };
        const codeOf = (fn: () => unknown): string | undefined => {
          try {
            fn();
            return undefined;
          } catch (e) {
            if (!isTypevisorError(e)) throw e;
            return e.code;
          }
        };
        for (const [op, a, b, value] of ops) {
          const gpa = Math.min(a, b);
          const widths: Record<string, number> = { u8: 1, u16: 2, u32: 4, u64: 8 };
          const len = widths[op] ?? Math.max(a, b) - gpa;
          const r = regionOf(gpa, len);
          const host = r === undefined ? -1 : r.hostOffset + (gpa - r.guestPhysAddr);
          const before = model.slice();
          const expectUnchangedExcept = (from: number, n: number) => {
            for (let i = 0; i < model.length; i++) if (i < from || i >= from + n) expect(model[i]).toBe(before[i]);
          };
          const outside = (fn: () => unknown) => {
            expect(codeOf(fn)).toBe("GUEST_MEMORY_OUT_OF_RANGE");
            expect(model).toEqual(before);
          };
          if (op === "host") {
            expect(mem.tryHostAddress(gpa, len)).toBe(r === undefined ? -1 : base + host);
            expect(mem.contains(gpa, len)).toBe(r !== undefined);
            continue;
          }
          const data = Uint8Array.from({ length: Math.max(0, len) }, (_, i) => (value + i * 13) & 0xff);
          const run = (): unknown => {
            switch (op) {
              case "read": return mem.read(gpa, len);
              case "write": return mem.write(gpa, data);
              case "fill": return mem.fill(gpa, len, value);
              case "slices": return mem.slices(gpa, len);
              case "slice": return mem.slice(gpa, len);
              case "dataView": return mem.dataView(gpa, len);
              case "trySlice": return mem.trySlice(gpa, len);
              case "u8": return (mem.writeU8(gpa, value), mem.readU8(gpa));
              case "u16": return (mem.writeU16(gpa, value * 257), mem.readU16(gpa));
              case "u32": return (mem.writeU32(gpa, value * 0x1010101), mem.readU32(gpa));
              default: return (mem.writeU64(gpa, BigInt(value) * 0x0101010101010101n), mem.readU64(gpa));
            }
          };
          if (op === "trySlice") {
            const s = mem.trySlice(gpa, len);
            if (r === undefined || !oneView(r, gpa, len)) expect(s).toBeUndefined();
            else {
              expect(s!.length).toBe(len);
              if (len > 0) expect(addressOf(s!)).toBe(base + host);
            }
            continue;
          }
          if (r === undefined) {
            outside(run);
            continue;
          }
          if ((op === "slice" || op === "dataView") && !oneView(r, gpa, len)) {
            expect(codeOf(run)).toBe("GUEST_MEMORY_VIEW_SPLIT");
            expect(len).toBeGreaterThan(l.overlap); // anything up to the overlap is always one view
            continue;
          }
          const got = run();
          switch (op) {
            case "read":
              expect(got).toEqual(before.subarray(host, host + len));
              break;
            case "write":
              expect(model.subarray(host, host + len)).toEqual(data);
              expectUnchangedExcept(host, len);
              break;
            case "fill":
              expect(model.subarray(host, host + len).every((x) => x === value)).toBe(true);
              expectUnchangedExcept(host, len);
              break;
            case "slices": {
              const parts = got as Uint8Array[];
              let at = host;
              for (const p of parts) {
                // Each piece is one view's, contiguous with the one before, and no piece but the last is empty.
                expect(p.length).toBeLessThanOrEqual(l.step + l.overlap);
                if (p.length > 0) expect(addressOf(p)).toBe(base + at);
                at += p.length;
              }
              expect(at).toBe(host + len);
              expect(parts.length).toBeLessThanOrEqual(Math.max(1, Math.ceil(len / l.step) + 1));
              break;
            }
            case "slice":
            case "dataView": {
              const v = got as Uint8Array | DataView;
              expect(v.byteLength).toBe(len);
              if (len > 0) expect(addressOf(new Uint8Array(v.buffer, v.byteOffset, len))).toBe(base + host);
              break;
            }
            default: {
              const n = widths[op]!;
              const dv = new DataView(backing, host, n);
              const expected = n === 8 ? dv.getBigUint64(0, true) : n === 4 ? dv.getUint32(0, true) : n === 2 ? dv.getUint16(0, true) : dv.getUint8(0);
              expect(got).toBe(expected);
              expect(expected).toBe(n === 8 ? BigInt(value) * 0x0101010101010101n : n === 4 ? (value * 0x1010101) >>> 0 : n === 2 ? value * 257 : value);
              expectUnchangedExcept(host, n);
            }
          }
        }
      }),
      { numRuns: 400 },
    );
  });

  it("cuts views as the geometry says and refuses a geometry V8 cannot view", () => {
    const m = new GuestMemory(new ArrayBuffer(100), [{ guestPhysAddr: 0, size: 100, hostOffset: 0 }], { step: 30, overlap: 5 });
    expect(m.viewCount).toBe(4); // [0,35) [30,65) [60,95) [90,100)
    expect(m.slices(25, 50).map((s) => s.length)).toEqual([10, 30, 10]); // 25..35 from view 0, 35..65 from view 1, 65..75 from view 2
    for (const g of [{ step: 0, overlap: 0 }, { step: 2 ** 32, overlap: 1 }, { step: 1.5, overlap: 0 }, { step: 8, overlap: -1 }]) {
      expect(() => new GuestMemory(new ArrayBuffer(16), [{ guestPhysAddr: 0, size: 16, hostOffset: 0 }], g)).toThrow(/view geometry/);
    }
  });

  it("the default views hold every in-place virtio structure whole: overlap >= the largest ring or indirect table", () => {
    // split-queue.ts: a 32768-entry descriptor table or indirect table is 512 KiB, the used ring 256 KiB + 6.
    expect(DEFAULT_VIEW_GEOMETRY.overlap).toBeGreaterThanOrEqual(16 * 32768);
    expect(DEFAULT_VIEW_GEOMETRY.step + DEFAULT_VIEW_GEOMETRY.overlap).toBeLessThanOrEqual(MAX_VIEW_BYTES);
  });
});

describe("GuestMemory.mapped over host mappings larger than one view", () => {
  it("reaches every byte of a 12 GiB region through 2 GiB views: boundaries, the last byte, a write across views", () => {
    const GiB = 2 ** 30;
    const size = 12 * GiB;
    // MAP_NORESERVE: nothing is committed; the test touches a few pages only.
    const low = libc.mmap(64 * 1024, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS);
    const high = libc.mmap(size, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE);
    try {
      const HIGH = 4 * GiB;
      const m = GuestMemory.mapped([
        { guestPhysAddr: HIGH, size, hostAddress: Number(high.address) },
        { guestPhysAddr: 0, size: 64 * 1024, hostAddress: Number(low.address) },
      ]);
      expect(m.size).toBe(size + 64 * 1024);
      expect(m.viewCount).toBe(1 + 6);
      expect(m.hostRegions).toEqual([
        { guestPhysAddr: 0, size: 64 * 1024, hostAddress: Number(low.address) },
        { guestPhysAddr: HIGH, size, hostAddress: Number(high.address) },
      ]);
      for (const off of [0, 2 * GiB - 8, 2 * GiB, 4 * GiB - 4, 4 * GiB, 6 * GiB + 3, size - 8]) {
        m.writeU64(HIGH + off, BigInt(off) + 0x1234n);
        expect(m.readU64(HIGH + off)).toBe(BigInt(off) + 0x1234n);
        expect(m.tryHostAddress(HIGH + off, 8)).toBe(Number(high.address) + off);
      }
      // 4 MiB across the view boundary at 8 GiB: split for copies, refused as one view, one iovec address.
      const at = HIGH + 8 * GiB - 4096; // view 3 covers [6 GiB, 8 GiB + 2 MiB) of the region
      const data = Uint8Array.from({ length: 4 * 1024 * 1024 }, (_, i) => (i * 31) & 0xff);
      m.write(at, data);
      expect(Buffer.from(m.read(at, data.length)).equals(Buffer.from(data))).toBe(true);
      expect(m.slices(at, data.length).map((s) => s.length)).toEqual([4096 + 2 * 1024 * 1024, 2 * 1024 * 1024 - 4096]);
      expect(m.slice(at, 2 * 1024 * 1024).length).toBe(2 * 1024 * 1024); // within the overlap: one view
      expect(() => m.slice(at, data.length)).toThrow(/cannot be one live view/);
      expect(m.tryHostAddress(at, data.length)).toBe(Number(high.address) + (at - HIGH));
      expect(m.readU8(HIGH + size - 1)).toBe(0);
      expect(m.contains(HIGH + size - 1, 2)).toBe(false);
      expect(m.contains(64 * 1024, 1)).toBe(false);
    } finally {
      libc.munmap(high);
      libc.munmap(low);
    }
  });
});
