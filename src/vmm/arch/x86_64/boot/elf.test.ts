import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { TypevisorError } from "../../../../errors.js";
import { parseElf, parseNotes } from "./elf.js";
import { fakeElf } from "./test-fixtures.js";

const seg = (paddr: number, n: number, memSize?: number) => ({ paddr, data: new Uint8Array(n).map((_, i) => i & 0xff), ...(memSize !== undefined ? { memSize } : {}) });

function invalid(image: Uint8Array, message: RegExp): void {
  expect(() => parseElf(image)).toThrow(message);
  try {
    parseElf(image);
  } catch (e) {
    expect((e as TypevisorError).code).toBe("KERNEL_INVALID");
  }
}

describe("parseElf", () => {
  it("finds PT_LOAD segments at p_paddr and the PVH entry note", () => {
    const img = fakeElf({ segments: [seg(0x1000000, 300, 0x2000), seg(0x1200000, 100)], pvhEntry: 0x1000040 });
    const elf = parseElf(img);
    expect(elf.pvhEntry).toBe(0x1000040);
    expect(elf.segments.map((s) => [s.paddr, s.fileSize, s.memSize])).toEqual([
      [0x1000000, 300, 0x2000],
      [0x1200000, 100, 100],
    ]);
    const first = elf.segments[0]!;
    expect(img.subarray(first.fileOffset, first.fileOffset + first.fileSize)).toEqual(seg(0, 300).data);
  });

  it("reads an 8-byte entry note and falls back to SHT_NOTE sections", () => {
    expect(parseElf(fakeElf({ segments: [seg(0x1000000, 64)], pvhEntry: 0x1000008, pvhEntryBytes: 8 })).pvhEntry).toBe(0x1000008);
    expect(parseElf(fakeElf({ segments: [seg(0x1000000, 64)], pvhEntry: 0x1000010, notesInSectionOnly: true })).pvhEntry).toBe(0x1000010);
  });

  it("reports no PVH entry when the note is absent", () => {
    expect(parseElf(fakeElf({ segments: [seg(0x1000000, 64)] })).pvhEntry).toBeUndefined();
  });

  it("rejects malformed files with KERNEL_INVALID", () => {
    const ok = fakeElf({ segments: [seg(0x1000000, 64)], pvhEntry: 0x1000000 });
    const patch = (f: (dv: DataView, b: Uint8Array) => void) => {
      const c = ok.slice();
      f(new DataView(c.buffer), c);
      return c;
    };
    invalid(ok.subarray(0, 40), /shorter than its 64-byte header/);
    invalid(patch((_, b) => (b[4] = 1)), /not 64-bit/);
    invalid(patch((_, b) => (b[5] = 2)), /little-endian/);
    invalid(patch((dv) => dv.setUint16(18, 3, true)), /x86-64/);
    invalid(patch((dv) => dv.setUint16(16, 1, true)), /not an executable/);
    invalid(patch((dv) => dv.setUint16(56, 0, true)), /no program headers/);
    invalid(patch((dv) => dv.setUint16(54, 32, true)), /program header size/);
    invalid(patch((dv) => dv.setBigUint64(32, 0xffffffffffn, true)), /out of range|outside the file/);
    invalid(patch((dv) => dv.setBigUint64(32, BigInt(ok.length - 10), true)), /program headers lie outside/);
    // First phdr (PT_LOAD): p_offset past the end, p_filesz > p_memsz.
    invalid(patch((dv) => dv.setBigUint64(64 + 8, BigInt(ok.length), true)), /lies outside the .*file/);
    invalid(patch((dv) => dv.setBigUint64(64 + 40, 10n, true)), /p_filesz > p_memsz/);
    invalid(fakeElf({ segments: [seg(0x1000000, 64)], pvhEntry: 0x2000000 }), /not inside any loaded segment/);
    invalid(fakeElf({ segments: [seg(0x1000000, 64)], pvhEntry: 0x1_0000_0000, pvhEntryBytes: 8 }), /not a 32-bit physical address/);
  });

  it("rejects notes whose sizes run past their segment", () => {
    const n = new Uint8Array(16);
    new DataView(n.buffer).setUint32(0, 0xfffffff0, true);
    expect(() => parseNotes(n)).toThrow(/runs past/);
  });

  it("never throws anything but TypevisorError on truncated or mutated files", () => {
    const img = fakeElf({ segments: [seg(0x1000000, 200, 0x1000), seg(0x1100000, 50)], pvhEntry: 0x1000004 });
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: img.length }),
        fc.array(fc.tuple(fc.nat(img.length - 1), fc.integer({ min: 0, max: 255 })), { maxLength: 6 }),
        (cut, muts) => {
          const m = img.slice(0, cut);
          for (const [i, v] of muts) if (i < m.length) m[i] = v;
          try {
            const elf = parseElf(m);
            for (const s of elf.segments) expect(s.fileOffset + s.fileSize).toBeLessThanOrEqual(m.length);
          } catch (e) {
            expect(e).toBeInstanceOf(TypevisorError);
          }
        },
      ),
      { numRuns: 500 },
    );
  });
});
