import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { afterAll, describe, expect, it } from "vitest";
import { addressOf, discardPages, IOV_MAX, IoVec } from "./iov.js";

const dir = mkdtempSync(join(tmpdir(), "tv-iov-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Random non-overlapping pieces of a 64 KiB arena, as (offset, length) pairs. */
const pieces = fc
  .array(fc.record({ gap: fc.integer({ min: 0, max: 300 }), len: fc.integer({ min: 1, max: 700 }) }), { minLength: 1, maxLength: 60 })
  .map((xs) => {
    let at = 0;
    return xs.map(({ gap, len }) => {
      at += gap;
      const p = { off: at, len };
      at += len;
      return p;
    });
  });

describe("IoVec", () => {
  it("addressOf follows a view's offset inside its buffer", () => {
    const ab = new ArrayBuffer(8192);
    expect(addressOf(new Uint8Array(ab, 4096)) - addressOf(new Uint8Array(ab))).toBe(4096);
  });

  it("preadv and pwritev move exactly the bytes of the pieces, in order, after any advance", () => {
    const file = join(dir, "data");
    fc.assert(
      fc.property(pieces, fc.integer({ min: 0, max: 4096 }), fc.nat(), (ps, pos, adv) => {
        const content = Buffer.alloc(64 * 1024 + 4096);
        for (let i = 0; i < content.length; i++) content[i] = (i * 7 + 3) & 0xff;
        writeFileSync(file, content);
        const arena = new Uint8Array(64 * 1024);
        const base = addressOf(arena);
        const iov = new IoVec();
        for (const p of ps) expect(iov.push(base + p.off, p.len)).toBe(true);
        const total = ps.reduce((n, p) => n + p.len, 0);
        expect(iov.bytes).toBe(total);
        // Drop a prefix as a short transfer would, then read the rest from the file.
        const skip = adv % (total + 1);
        iov.advance(skip);
        expect(iov.bytes).toBe(total - skip);
        const fd = openSync(file, "r+");
        try {
          expect(iov.preadv(fd, pos)).toBe(total - skip);
          // Model: the concatenated pieces, minus the skipped prefix, hold file[pos, ...).
          const flat = Buffer.concat(ps.map((p) => arena.subarray(p.off, p.off + p.len)));
          expect(flat.subarray(skip).equals(content.subarray(pos, pos + total - skip))).toBe(true);
          expect(flat.subarray(0, skip).every((b) => b === 0)).toBe(true);
          // And back: the same iovecs written at another offset.
          expect(iov.pwritev(fd, 0)).toBe(total - skip);
        } finally {
          closeSync(fd);
        }
        const after = readFileSync(file);
        expect(after.subarray(0, total - skip).equals(content.subarray(pos, pos + total - skip))).toBe(true);
      }),
      { numRuns: 150 },
    );
  });

  it("holds at most IOV_MAX entries and reports errors as -errno", () => {
    const iov = new IoVec();
    for (let i = 0; i < IOV_MAX; i++) expect(iov.push(0x1000, 1)).toBe(true);
    expect(iov.push(0x1000, 1)).toBe(false);
    expect(iov.count).toBe(IOV_MAX);
    iov.clear();
    iov.push(addressOf(new Uint8Array(4096)), 16);
    expect(iov.preadv(-1, 0)).toBe(-9); // EBADF
  });

  it("sliceInto, copyIn, copyOut and fillZero act on exactly the bytes of the range they are given", () => {
    fc.assert(
      fc.property(pieces, fc.nat(), fc.nat(), (ps, a, b) => {
        const arena = new Uint8Array(64 * 1024).fill(0xee);
        const base = addressOf(arena);
        const iov = new IoVec();
        for (const p of ps) iov.push(base + p.off, p.len);
        const total = iov.bytes;
        const skip = a % (total + 1);
        const len = b % (total - skip + 1);
        const part = new IoVec();
        expect(iov.sliceInto(part, skip, len)).toBe(true);
        expect(part.bytes).toBe(len);
        // A model of the array as one flat run of its bytes' arena offsets.
        const flat: number[] = [];
        for (const p of ps) for (let i = 0; i < p.len; i++) flat.push(p.off + i);
        const src = Uint8Array.from({ length: len }, (_, i) => (i * 13 + 1) & 0xff || 1);
        part.copyIn(src);
        for (let i = 0; i < len; i++) expect(arena[flat[skip + i]!]).toBe(src[i]);
        const out = new Uint8Array(len);
        iov.copyOut(out, skip);
        expect(Buffer.from(out).equals(Buffer.from(src))).toBe(true);
        part.fillZero();
        let touched = 0;
        for (let i = 0; i < arena.length; i++) if (arena[i] !== 0xee) touched++;
        for (let i = 0; i < len; i++) expect(arena[flat[skip + i]!]).toBe(0);
        expect(touched).toBe(len);
      }),
      { numRuns: 150 },
    );
  });
});

describe("discardPages", () => {
  const rssKiB = (): number => Number(/VmRSS:\s+(\d+)/.exec(readFileSync("/proc/self/status", "utf8"))?.[1]);

  it("hands a big buffer's pages back to the kernel: RSS drops, whole pages read zero, the edges keep their bytes", () => {
    const size = 32 * 2 ** 20 + 123;
    const b = Buffer.allocUnsafeSlow(size).fill(0xa5);
    const before = rssKiB();
    const released = discardPages(b);
    const after = rssKiB();
    expect(released).toBeGreaterThanOrEqual(32 * 2 ** 20 - 8192);
    expect(before - after).toBeGreaterThan(30 * 1024);
    const start = addressOf(b);
    const head = (4096 - (start % 4096)) % 4096;
    const tail = (start + size) % 4096;
    expect(b.subarray(0, head).every((x) => x === 0xa5)).toBe(true);
    expect(b.subarray(size - tail).every((x) => x === 0xa5)).toBe(true);
    expect(b.subarray(head, size - tail).every((x) => x === 0)).toBe(true);
    // Still a valid buffer.
    b.fill(1);
    expect(b[size - 1]).toBe(1);
  });

  it("leaves alone what is not a whole buffer of its own: pool slices, views, shared memory, small buffers", () => {
    const pooled = Buffer.from("pooled bytes");
    const big = Buffer.allocUnsafeSlow(1 << 20).fill(7);
    const view = big.subarray(4096);
    const shared = new Uint8Array(new SharedArrayBuffer(1 << 20)).fill(9);
    const small = new Uint8Array(16 * 1024).fill(3);
    for (const v of [pooled, view, shared, small]) expect(discardPages(v)).toBe(0);
    expect(pooled.toString()).toBe("pooled bytes");
    expect(big.every((x) => x === 7)).toBe(true);
    expect(shared.every((x) => x === 9)).toBe(true);
    expect(small.every((x) => x === 3)).toBe(true);
  });
});
