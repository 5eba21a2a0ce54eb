import { Buffer } from "node:buffer";
import { spawnSync } from "node:child_process";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { TypevisorError } from "../../../../errors.js";
import { parseElf } from "./elf.js";
import { LZ4_LEGACY_BLOCK_MAX, decompressLz4Block, decompressLz4Legacy, extractVmlinux } from "./lz4.js";
import { fakeBzImage, fakeElf, findDebianKernel, readIfPresent } from "./test-fixtures.js";

/** Compress with the reference lz4 tool in legacy mode (`lz4 -l`), as the kernel build does. */
function lz4Tool(data: Uint8Array): Uint8Array | undefined {
  const r = spawnSync("lz4", ["-l", "-9", "-c"], { input: data, maxBuffer: 64 << 20 });
  if (r.error !== undefined || r.status !== 0) return undefined;
  return new Uint8Array(r.stdout);
}
const haveLz4Tool = lz4Tool(new Uint8Array([1])) !== undefined;

function le32(n: number): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, n, true);
  return b;
}
function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  parts.reduce((off, p) => (out.set(p, off), off + p.length), 0);
  return out;
}
const MAGIC = le32(0x184c2102);
function frame(...blocks: Uint8Array[]): Uint8Array {
  return concat(MAGIC, ...blocks.flatMap((b) => [le32(b.length), b]));
}
/** Pseudo-random but compressible: runs of repeated short words. */
function sampleData(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; ) {
    x = (x * 1103515245 + 12345) >>> 0;
    const run = 1 + (x % 40);
    const v = (x >>> 8) & 0xff;
    for (let j = 0; j < run && i < n; j++) out[i++] = (v + (j % 3)) & 0xff;
  }
  return out;
}
/** Byte equality without vitest's deep-equal, which walks typed arrays key by key (far too slow at 16 MiB). */
function same(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.compare(a, b) === 0;
}
function code(f: () => unknown): string | undefined {
  try {
    f();
  } catch (e) {
    return e instanceof TypevisorError ? e.code : `not a TypevisorError: ${String(e)}`;
  }
  return undefined;
}

describe("LZ4 block decoding (lz4_Block_format.md)", () => {
  it("decodes a literal-only block", () => {
    const lit = new TextEncoder().encode("hello");
    const block = concat(new Uint8Array([lit.length << 4]), lit);
    expect(decompressLz4Legacy(frame(block))).toEqual(lit);
  });

  it("decodes long literal lengths and an overlapping match (run-length)", () => {
    // 20 literals (15 + 5), then a match of offset 1, length 4 + 15 + 10 = 29, then a final literal.
    const lits = new Uint8Array(20).map((_, i) => 65 + (i % 26));
    const block = concat(new Uint8Array([0xff, 5]), lits, new Uint8Array([1, 0, 10]), new Uint8Array([0x10, 0x21]));
    const out = decompressLz4Legacy(frame(block));
    const expected = concat(lits, new Uint8Array(29).fill(lits[19]!), new Uint8Array([0x21]));
    expect(out).toEqual(expected);
  });

  it("rejects offset 0, offsets before the block, and truncated sequences", () => {
    const lit = new Uint8Array([0x10, 0x41]);
    expect(code(() => decompressLz4Legacy(frame(concat(lit.slice(0, 1), new Uint8Array([0x41, 0, 0]), new Uint8Array([0x10, 0])))))).toBe("KERNEL_INVALID");
    expect(code(() => decompressLz4Legacy(frame(new Uint8Array([0x10, 0x41, 2, 0, 0x10, 0]))))).toBe("KERNEL_INVALID");
    expect(code(() => decompressLz4Legacy(frame(new Uint8Array([0x50, 1, 2]))))).toBe("KERNEL_INVALID");
    expect(code(() => decompressLz4Legacy(frame(new Uint8Array([0xf0]))))).toBe("KERNEL_INVALID");
    expect(code(() => decompressLz4Legacy(frame(new Uint8Array([0x10, 0x41, 1]))))).toBe("KERNEL_INVALID");
  });

  it("rejects bad framing: no magic, truncated size field, block past the end, oversized block", () => {
    expect(code(() => decompressLz4Legacy(new Uint8Array([1, 2, 3, 4, 5])))).toBe("KERNEL_INVALID");
    expect(code(() => decompressLz4Legacy(concat(MAGIC, new Uint8Array([1, 0]))))).toBe("KERNEL_INVALID");
    expect(code(() => decompressLz4Legacy(concat(MAGIC, le32(100), new Uint8Array([0x10, 1]))))).toBe("KERNEL_INVALID");
    expect(code(() => decompressLz4Legacy(concat(MAGIC, le32(0x7fffffff))))).toBe("KERNEL_INVALID");
  });

  it("never writes past the output limit", () => {
    // 1 literal then a 1000-byte run, but only 100 bytes allowed.
    const block = concat(new Uint8Array([0x1f, 0x41, 1, 0]), new Uint8Array([255, 255, 255, 235]), new Uint8Array([0x10, 0x42]));
    expect(code(() => decompressLz4Legacy(frame(block), { maxOutput: 100 }))).toBe("KERNEL_INVALID");
    const out = new Uint8Array(200).fill(7);
    expect(code(() => decompressLz4Block(block, 0, block.length, out, 0, 100))).toBe("KERNEL_INVALID");
    expect(out.subarray(100).every((b) => b === 7)).toBe(true);
  });

  it("never throws anything but TypevisorError, nor exceeds its limit, on hostile input", () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), fc.integer({ min: 0, max: 4096 }), (body, max) => {
        try {
          const out = decompressLz4Legacy(concat(MAGIC, le32(body.length), body), { maxOutput: max });
          expect(out.length).toBeLessThanOrEqual(max);
        } catch (e) {
          expect(e).toBeInstanceOf(TypevisorError);
        }
      }),
      { numRuns: 500 },
    );
  });
});

describe.skipIf(!haveLz4Tool)("against the reference lz4 tool (lz4 -l)", () => {
  it("round-trips data compressed by lz4 -l, across several 8 MiB blocks", () => {
    const data = sampleData(LZ4_LEGACY_BLOCK_MAX * 2 + 12345, 42);
    const compressed = lz4Tool(data)!;
    expect(compressed.length).toBeLessThan(data.length);
    expect(same(decompressLz4Legacy(compressed, { expectedSize: data.length }), data)).toBe(true);
    expect(same(decompressLz4Legacy(compressed), data)).toBe(true);
  });

  it("round-trips small random inputs", () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 1, maxLength: 2000 }), fc.boolean(), (raw, repeat) => {
        const data = repeat ? concat(raw, raw, raw) : raw;
        expect(decompressLz4Legacy(lz4Tool(data)!)).toEqual(data);
      }),
      { numRuns: 25 },
    );
  });

  it("mutated real frames give TypevisorError or bounded output, nothing else", () => {
    const compressed = lz4Tool(sampleData(50_000, 7))!;
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.nat(compressed.length - 1), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 6 }), (muts) => {
        const m = compressed.slice();
        for (const [i, v] of muts) m[i] = v;
        try {
          expect(decompressLz4Legacy(m, { maxOutput: 60_000 }).length).toBeLessThanOrEqual(60_000);
        } catch (e) {
          expect(e).toBeInstanceOf(TypevisorError);
        }
      }),
      { numRuns: 300 },
    );
  });

  it("extractVmlinux finds the payload of a synthetic bzImage through payload_offset", () => {
    const vmlinux = fakeElf({ segments: [{ paddr: 0x1000000, data: sampleData(30_000, 3) }], pvhEntry: 0x1000010 });
    const payload = concat(lz4Tool(vmlinux)!, le32(vmlinux.length)); // size_append, as Linux's build does
    const out = extractVmlinux(fakeBzImage({ payload }));
    expect(same(out, vmlinux)).toBe(true);
    expect(parseElf(out).pvhEntry).toBe(0x1000010);
    // A size trailer that disagrees with the data is caught.
    const lying = concat(lz4Tool(vmlinux)!, le32(vmlinux.length + 1));
    expect(code(() => extractVmlinux(fakeBzImage({ payload: lying })))).toBe("KERNEL_INVALID");
  });
});

describe("extractVmlinux errors", () => {
  it("names the payload format it cannot handle", () => {
    const gz = concat(new Uint8Array([0x1f, 0x8b, 8, 0]), new Uint8Array(60));
    expect(() => extractVmlinux(fakeBzImage({ payload: gz }))).toThrow(/gzip/);
    expect(() => extractVmlinux(fakeBzImage())).toThrow(/payload_length is 0/);
    // A size trailer no LZ4 data of this length could produce is refused before allocating.
    const boast = concat(MAGIC, le32(2), new Uint8Array([0x10, 0x41]), le32(400 << 20));
    expect(() => extractVmlinux(fakeBzImage({ payload: boast }))).toThrow(/from 14 compressed/);
  });
});

describe("extractVmlinux on a real Debian cloud kernel", () => {
  const path = findDebianKernel("cloud");
  it.skipIf(path === undefined)("yields an ELF vmlinux carrying the PVH note", () => {
    const vmlinux = extractVmlinux(readIfPresent(path)!);
    const elf = parseElf(vmlinux);
    expect(elf.pvhEntry).toBeDefined();
    expect(elf.segments.length).toBeGreaterThan(0);
    const first = Math.min(...elf.segments.map((s) => s.paddr));
    expect(elf.pvhEntry!).toBeGreaterThanOrEqual(first);
  });
});
