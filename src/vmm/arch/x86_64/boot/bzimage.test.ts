import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { TypevisorError } from "../../../../errors.js";
import { parseBzImage } from "./bzimage.js";
import { fakeBzImage, findDebianKernel, readIfPresent } from "./test-fixtures.js";

function invalid(image: Uint8Array, message: RegExp): void {
  let caught: unknown;
  try {
    parseBzImage(image);
  } catch (e) {
    caught = e;
  }
  expect(caught).toBeInstanceOf(TypevisorError);
  expect((caught as TypevisorError).code).toBe("KERNEL_INVALID");
  expect((caught as TypevisorError).message).toMatch(message);
}

function patch(image: Uint8Array, f: (dv: DataView, b: Uint8Array) => void): Uint8Array {
  const copy = image.slice();
  f(new DataView(copy.buffer), copy);
  return copy;
}

describe("parseBzImage on synthetic images", () => {
  it("reads the fields it was built with", () => {
    const img = fakeBzImage({ setupSects: 7, initSize: 0x123000, prefAddress: 0x2000000n, cmdlineSize: 511, initrdAddrMax: 0x37ffffff, pmSize: 0x8000 });
    const h = parseBzImage(img);
    expect(h.setupSects).toBe(7);
    expect(h.protectedModeOffset).toBe(8 * 512);
    expect(h.protectedModeSize).toBe(img.length - 8 * 512);
    expect(h.initSize).toBe(0x123000);
    expect(h.prefAddress).toBe(0x2000000);
    expect(h.cmdlineSize).toBe(511);
    expect(h.initrdAddrMax).toBe(0x37ffffff);
    expect(h.headerEnd).toBe(0x202 + img[0x201]!);
    expect(h.relocatable).toBe(true);
    expect(h.kernelVersion).toBe("6.1.0-fake (test@typevisor) #1 SMP");
  });

  it("treats setup_sects 0 as 4 (boot.rst)", () => {
    const h = parseBzImage(fakeBzImage({ setupSects: 0 }));
    expect(h.setupSects).toBe(4);
    expect(h.protectedModeOffset).toBe(5 * 512);
  });

  it("rejects each malformed header with KERNEL_INVALID saying what is wrong", () => {
    const ok = fakeBzImage();
    invalid(ok.subarray(0, 0x100), /too short/);
    invalid(patch(ok, (dv) => dv.setUint32(0x202, 0x53726449, true)), /HdrS/);
    invalid(fakeBzImage({ version: 0x020b }), /2\.11 is older than 2\.12/);
    invalid(patch(ok, (_, b) => (b[0x200] = 0x90)), /short jump/);
    invalid(patch(ok, (_, b) => (b[0x201] = 0x40)), /before init_size/);
    invalid(patch(ok, (_, b) => (b[0x201] = 0xa0)), /past its 0x290 limit/);
    invalid(patch(ok, (dv) => dv.setUint16(0x1fe, 0, true)), /boot_flag/);
    invalid(fakeBzImage({ loadflags: 0 }), /LOADED_HIGH/);
    invalid(fakeBzImage({ xloadflags: 0x7e }), /XLF_KERNEL_64/);
    invalid(patch(ok, (_, b) => (b[0x1f1] = 200)), /protected-mode kernel starts at/);
    invalid(patch(ok, (dv) => dv.setUint32(0x1f4, 0x10000, true)), /truncated: syssize/);
    invalid(patch(ok, (dv) => dv.setUint32(0x1f4, 0, true)), /syssize is 0/);
    invalid(fakeBzImage({ kernelAlignment: 0x300000 }), /kernel_alignment/);
    invalid(fakeBzImage({ kernelAlignment: 0 }), /kernel_alignment/);
    invalid(fakeBzImage({ initSize: 0 }), /init_size is 0/);
    invalid(fakeBzImage({ relocatable: false, prefAddress: 0n }), /no pref_address/);
    invalid(fakeBzImage({ prefAddress: 1n << 60n }), /pref_address/);
    invalid(patch(fakeBzImage({ payload: new Uint8Array(64) }), (dv) => dv.setUint32(0x24c, 0x100000, true)), /payload/);
  });

  it("rejects every truncation of a valid image", () => {
    const img = fakeBzImage({ pmSize: 0x1000 });
    fc.assert(
      fc.property(fc.integer({ min: 0, max: img.length - 1 }), (cut) => {
        expect(() => parseBzImage(img.subarray(0, cut))).toThrow(TypevisorError);
      }),
    );
  });

  it("never throws anything but TypevisorError on mutated headers", () => {
    const img = fakeBzImage({ pmSize: 0x1000 });
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.integer({ min: 0x1e0, max: 0x270 }), fc.integer({ min: 0, max: 255 })), { maxLength: 8 }), (muts) => {
        const m = img.slice();
        for (const [off, v] of muts) m[off] = v;
        try {
          const h = parseBzImage(m);
          // Whatever parses must describe a range inside the file.
          expect(h.protectedModeOffset + h.protectedModeSize).toBe(m.length);
          if (h.payloadLength > 0) expect(h.payloadOffset + h.payloadLength).toBeLessThanOrEqual(h.protectedModeSize);
        } catch (e) {
          expect(e).toBeInstanceOf(TypevisorError);
        }
      }),
      { numRuns: 300 },
    );
  });
});

describe("parseBzImage on a real Debian cloud kernel", () => {
  const path = findDebianKernel("cloud");
  it.skipIf(path === undefined)(`parses ${path ?? "(no vmlinuz-*-cloud-amd64 found: set TYPEVISOR_TEST_KERNEL)"}`, () => {
    const img = readIfPresent(path)!;
    const dv = new DataView(img.buffer, img.byteOffset, img.byteLength);
    const h = parseBzImage(img);
    // Compare with the raw header fields (boot.rst offsets) rather than fixed numbers.
    expect(h.version).toBe(dv.getUint16(0x206, true));
    expect(h.version).toBeGreaterThanOrEqual(0x020c);
    expect(h.initSize).toBe(dv.getUint32(0x260, true));
    expect(h.prefAddress).toBe(Number(dv.getBigUint64(0x258, true)));
    expect(h.protectedModeOffset).toBe(((img[0x1f1] || 4) + 1) * 512);
    expect(h.relocatable).toBe(true);
    // The version string names the same release as the file name.
    const release = path!.replace(/.*vmlinuz-/, "");
    expect(h.kernelVersion?.startsWith(release)).toBe(true);
  });
});
