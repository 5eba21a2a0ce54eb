import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { PCI_COMMAND, PCI_CONFIG_SIZE, PCI_REG, PCI_STATUS, PciConfigSpace } from "./config-space.js";

function space(): PciConfigSpace {
  const c = new PciConfigSpace({ vendorId: 0x1af4, deviceId: 0x1042, classCode: 0x018000, revisionId: 1, subsystemVendorId: 0x1af4, subsystemId: 0x42 });
  c.addBar({ index: 0, size: 0x1000, is64: false, prefetchable: false });
  c.addBar({ index: 2, size: 0x4000, is64: true, prefetchable: true });
  return c;
}

/** Walk the capability list as an OS does (PCI 3.0 §6.7), with a loop guard. */
function walkCaps(c: PciConfigSpace): { id: number; off: number }[] {
  const out: { id: number; off: number }[] = [];
  if ((c.read(PCI_REG.STATUS, 2) & PCI_STATUS.CAP_LIST) === 0) return out;
  let p = c.read(PCI_REG.CAPABILITIES_POINTER, 1) & 0xfc;
  for (let guard = 0; p !== 0 && guard < 48; guard++) {
    out.push({ id: c.read(p, 1), off: p });
    p = c.read(p + 1, 1) & 0xfc;
  }
  expect(p).toBe(0);
  return out;
}

describe("PciConfigSpace header", () => {
  it("reads the identity little-endian at every width", () => {
    const c = space();
    expect(c.read(0, 4)).toBe(0x1042_1af4);
    expect(c.read(0, 2)).toBe(0x1af4);
    expect(c.read(2, 2)).toBe(0x1042);
    expect(c.read(1, 1)).toBe(0x1a);
    expect(c.read(PCI_REG.REVISION_ID, 4)).toBe(0x0180_0001);
    expect(c.read(PCI_REG.SUBSYSTEM_VENDOR_ID, 4)).toBe(0x0042_1af4);
    expect(c.read(PCI_REG.HEADER_TYPE, 1)).toBe(0);
    expect(c.read(PCI_REG.INTERRUPT_PIN, 1)).toBe(0);
  });

  it("keeps vendor, device, class and revision read-only", () => {
    const c = space();
    c.write(0, 4, 0xdead_beef);
    c.write(PCI_REG.REVISION_ID, 4, 0xffff_ffff);
    expect(c.read(0, 4)).toBe(0x1042_1af4);
    expect(c.read(PCI_REG.REVISION_ID, 4)).toBe(0x0180_0001);
  });

  it("command: memory, bus master and INTx disable are writable; I/O is hardwired to 0", () => {
    const c = space();
    c.write(PCI_REG.COMMAND, 2, 0xffff);
    expect(c.read(PCI_REG.COMMAND, 2)).toBe(PCI_COMMAND.MEMORY | PCI_COMMAND.MASTER | PCI_COMMAND.INTX_DISABLE);
    expect(c.memoryDecode).toBe(true);
    c.write(PCI_REG.COMMAND, 2, 0);
    expect(c.memoryDecode).toBe(false);
  });

  it("status: error bits are write-one-to-clear, the capability bit is read-only", () => {
    const c = space();
    c.addCapability(0x09, new Uint8Array(2));
    // Simulate the device latching an error, then the OS clearing it with a 1.
    c.setU16(PCI_REG.STATUS, c.getU16(PCI_REG.STATUS) | PCI_STATUS.REC_MASTER_ABORT | PCI_STATUS.DETECTED_PARITY);
    c.write(PCI_REG.STATUS, 2, PCI_STATUS.REC_MASTER_ABORT);
    expect(c.read(PCI_REG.STATUS, 2)).toBe(PCI_STATUS.CAP_LIST | PCI_STATUS.DETECTED_PARITY);
    c.write(PCI_REG.STATUS, 2, 0xffff);
    expect(c.read(PCI_REG.STATUS, 2)).toBe(PCI_STATUS.CAP_LIST);
    // A 4-byte write to COMMAND whose upper half is 0 clears nothing.
    c.setU16(PCI_REG.STATUS, c.getU16(PCI_REG.STATUS) | PCI_STATUS.SIG_SYSTEM_ERROR);
    c.write(PCI_REG.COMMAND, 4, 0x0000_0002);
    expect(c.read(PCI_REG.STATUS, 2) & PCI_STATUS.SIG_SYSTEM_ERROR).not.toBe(0);
  });

  it("interrupt line is read/write, cache line size too, latency timer and BIST are 0", () => {
    const c = space();
    c.write(PCI_REG.INTERRUPT_LINE, 4, 0xffff_ff0b);
    expect(c.read(PCI_REG.INTERRUPT_LINE, 4)).toBe(0x0000_000b);
    c.write(PCI_REG.CACHE_LINE_SIZE, 4, 0xffff_ff10);
    expect(c.read(PCI_REG.CACHE_LINE_SIZE, 4)).toBe(0x10);
  });
});

describe("BAR sizing (PCI 3.0 §6.2.5.1)", () => {
  it("32-bit memory BAR: all ones reads back the size mask, then the address sticks", () => {
    const c = space();
    c.write(PCI_REG.BAR0, 4, 0xffff_ffff);
    expect(c.read(PCI_REG.BAR0, 4)).toBe(0xffff_f000);
    c.write(PCI_REG.BAR0, 4, 0xc000_1234);
    expect(c.read(PCI_REG.BAR0, 4)).toBe(0xc000_1000);
    expect(c.barAddress(0)).toBe(0xc000_1000);
  });

  it("64-bit prefetchable BAR: type bits, size in the low half, all address bits in the high half", () => {
    const c = space();
    const lo = PCI_REG.BAR0 + 8;
    expect(c.read(lo, 4)).toBe(0b1100);
    c.write(lo, 4, 0xffff_ffff);
    c.write(lo + 4, 4, 0xffff_ffff);
    expect(c.read(lo, 4)).toBe((0xffff_c000 | 0b1100) >>> 0);
    expect(c.read(lo + 4, 4)).toBe(0xffff_ffff);
    c.write(lo, 4, 0xd000_0000);
    c.write(lo + 4, 4, 0x1);
    expect(c.barAddress(2)).toBe(0x1_d000_0000);
  });

  it("unimplemented BARs and the expansion ROM read 0 after all ones (not implemented)", () => {
    const c = space();
    for (const off of [PCI_REG.BAR0 + 4, PCI_REG.BAR0 + 16, PCI_REG.BAR0 + 20, PCI_REG.ROM_ADDRESS]) {
      c.write(off, 4, 0xffff_ffff);
      expect(c.read(off, 4)).toBe(0);
    }
  });

  it("any size: sizing recovers exactly that size", () => {
    fc.assert(
      fc.property(fc.integer({ min: 4, max: 31 }), fc.boolean(), fc.boolean(), (log2, is64, pf) => {
        const size = 2 ** log2;
        const c = new PciConfigSpace({ vendorId: 1, deviceId: 2, classCode: 0, revisionId: 0 });
        c.addBar({ index: 0, size, is64, prefetchable: pf });
        c.write(PCI_REG.BAR0, 4, 0xffff_ffff);
        const v = c.read(PCI_REG.BAR0, 4);
        const decoded = (~(v & 0xffff_fff0) + 1) >>> 0;
        return decoded === size && (v & 0xf) === (is64 ? 4 : 0) + (pf ? 8 : 0);
      }),
    );
  });

  it("rejects impossible BARs with a typed error", () => {
    const c = space();
    expect(() => c.addBar({ index: 1, size: 0x1000, is64: false, prefetchable: false })).not.toThrow();
    expect(() => c.addBar({ index: 3, size: 0x1000, is64: false, prefetchable: false })).toThrow(/overlaps/);
    expect(() => c.addBar({ index: 5, size: 0x1000, is64: true, prefetchable: false })).toThrow(/index/);
    expect(() => c.addBar({ index: 4, size: 0x1001, is64: false, prefetchable: false })).toThrow(/power of two/);
    expect(() => c.addBar({ index: 4, size: 8, is64: false, prefetchable: false })).toThrow(/power of two/);
  });
});

describe("capability list", () => {
  it("chains from 0x34, DWORD aligned, reaches every capability and terminates", () => {
    fc.assert(
      fc.property(fc.array(fc.record({ id: fc.integer({ min: 1, max: 0x15 }), len: fc.integer({ min: 0, max: 18 }) }), { minLength: 1, maxLength: 8 }), (caps) => {
        const c = space();
        const offs = caps.map((k) => c.addCapability(k.id, new Uint8Array(k.len)));
        const walked = walkCaps(c);
        expect(walked.map((w) => w.off)).toEqual(offs);
        expect(walked.map((w) => w.id)).toEqual(caps.map((k) => k.id));
        for (const o of offs) expect(o % 4).toBe(0);
        expect(offs[0]).toBe(0x40);
      }),
    );
  });

  it("refuses a capability that would not fit below 0x100", () => {
    const c = space();
    c.addCapability(0x09, new Uint8Array(150));
    expect(() => c.addCapability(0x09, new Uint8Array(100))).toThrow(/does not fit/);
  });

  it("capability bodies are read-only unless masked writable", () => {
    const c = space();
    const off = c.addCapability(0x09, Uint8Array.of(1, 2, 3, 4), Uint8Array.of(0, 0xff, 0, 0));
    c.write(off, 4, 0xffff_ffff);
    c.write(off + 2, 4, 0xffff_ffff);
    expect(c.read(off, 1)).toBe(0x09);
    expect(c.read(off + 1, 1)).toBe(0);
    expect([c.read(off + 2, 1), c.read(off + 3, 1), c.read(off + 4, 1), c.read(off + 5, 1)]).toEqual([1, 0xff, 3, 4]);
  });
});

describe("hostile accesses", () => {
  it("extended space reads 0 (no extended capabilities); past 4 KiB and bad sizes read ones", () => {
    const c = space();
    expect(c.read(0x100, 4)).toBe(0);
    expect(c.read(PCI_CONFIG_SIZE - 4, 4)).toBe(0);
    expect(c.read(PCI_CONFIG_SIZE, 4)).toBe(0xffff_ffff);
    expect(c.read(PCI_CONFIG_SIZE - 2, 4)).toBe(0xffff_0000);
    expect(c.read(0, 3)).toBe(0xff);
    expect(c.read(-1, 2)).toBe(0xffff);
  });

  it("random writes never throw and never change read-only identity fields", () => {
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.integer({ min: -8, max: PCI_CONFIG_SIZE + 8 }), fc.constantFrom(0, 1, 2, 3, 4, 8), fc.oneof(fc.integer({ min: 0, max: 0xffff_ffff }), fc.constant(Number.NaN), fc.constant(-1))), { maxLength: 60 }),
        (ops) => {
          const c = space();
          c.addCapability(0x11, new Uint8Array(10));
          const before = c.snapshot();
          for (const [off, size, v] of ops) {
            c.write(off, size, v);
            c.read(off, size);
          }
          const after = c.snapshot();
          for (const o of [0, 1, 2, 3, 8, 9, 10, 11, 0x0e, 0x2c, 0x2d, 0x2e, 0x2f, 0x34, 0x3d, 0x40, 0x41]) expect(after[o]).toBe(before[o]);
          // Extended space stays zero.
          expect(after.subarray(0x100).every((b) => b === 0)).toBe(true);
        },
      ),
    );
  });
});
