import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { PCI_REG, PciConfigSpace } from "./config-space.js";
import { MSIX_ENTRY_SIZE, Msix, PCI_CAP_ID_MSIX } from "./msix.js";

const ENABLE = 0x8000;
const FMASK = 0x4000;

function setup(vectors = 4): { msix: Msix; cfg: PciConfigSpace; cap: number; sent: [bigint, number][]; updates: (number | undefined)[] } {
  const sent: [bigint, number][] = [];
  const updates: (number | undefined)[] = [];
  const msix = new Msix({ vectors, deliver: (lo, hi, d) => void sent.push([(BigInt(hi) << 32n) | BigInt(lo), d]), onUpdate: (v) => updates.push(v) });
  const cfg = new PciConfigSpace({ vendorId: 1, deviceId: 2, classCode: 0, revisionId: 0 });
  const cap = msix.attach(cfg, { tableBar: 1, tableOffset: 0, pbaBar: 1, pbaOffset: 0x800 });
  return { msix, cfg, cap, sent, updates };
}

function u32(v: number): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, v, true);
  return b;
}

/** Program entry `v` as a driver does: address, data, then unmask. */
function program(msix: Msix, v: number, addr: number, data: number, unmask = true): void {
  msix.tableWrite(v * 16, u32(addr));
  msix.tableWrite(v * 16 + 4, u32(0));
  msix.tableWrite(v * 16 + 8, u32(data));
  if (unmask) msix.tableWrite(v * 16 + 12, u32(0));
}

describe("MSI-X capability (PCI 3.0 §6.8.2)", () => {
  it("encodes table size N-1, table and PBA BIR/offset; only Enable and Function Mask are writable", () => {
    const { cfg, cap, msix } = setup(4);
    expect(cfg.read(PCI_REG.CAPABILITIES_POINTER, 1)).toBe(cap);
    expect(cfg.read(cap, 1)).toBe(PCI_CAP_ID_MSIX);
    expect(cfg.read(cap + 2, 2)).toBe(3);
    expect(cfg.read(cap + 4, 4)).toBe(0x0000_0001);
    expect(cfg.read(cap + 8, 4)).toBe(0x0000_0801);
    cfg.write(cap, 4, 0xffff_ffff);
    expect(cfg.read(cap + 2, 2)).toBe(0xc003);
    expect(msix.enabled && msix.functionMasked).toBe(true);
    cfg.write(cap + 4, 4, 0);
    expect(cfg.read(cap + 4, 4)).toBe(1);
  });

  it("vectors start masked; table reads back what was written (address bits 1:0 and reserved control bits zero)", () => {
    const { msix } = setup(2);
    const d = new Uint8Array(4);
    msix.tableRead(12, d);
    expect(new DataView(d.buffer).getUint32(0, true)).toBe(1);
    msix.tableWrite(0, u32(0xfee0_1003));
    msix.tableWrite(4, u32(0x1));
    msix.tableWrite(8, u32(0x4041));
    msix.tableWrite(12, u32(0xffff_fffe));
    const q = new Uint8Array(8);
    msix.tableRead(0, q);
    expect(new DataView(q.buffer).getBigUint64(0, true)).toBe(0x1_fee0_1000n);
    msix.tableRead(8, q);
    expect(new DataView(q.buffer).getBigUint64(0, true)).toBe(0x4041n);
    expect(msix.entry(0)).toEqual({ address: 0x1_fee0_1000n, data: 0x4041, masked: false });
  });

  it("fires when enabled and unmasked; disabled sends nothing and leaves nothing pending", () => {
    const { msix, cfg, cap, sent } = setup();
    program(msix, 1, 0xfee0_0000, 0x31);
    expect(msix.fire(1)).toBe("disabled");
    expect(msix.isPending(1)).toBe(false);
    cfg.write(cap + 2, 2, ENABLE);
    expect(msix.fire(1)).toBe("delivered");
    expect(sent).toEqual([[0xfee0_0000n, 0x31]]);
    expect(msix.fire(4)).toBe("invalid");
    expect(msix.fire(-1)).toBe("invalid");
  });

  it("a masked vector becomes pending (PBA bit) and is delivered once on unmask", () => {
    const { msix, cfg, cap, sent } = setup();
    program(msix, 2, 0xfee0_0000, 0x42, false);
    cfg.write(cap + 2, 2, ENABLE);
    expect(msix.fire(2)).toBe("pending");
    expect(msix.fire(2)).toBe("pending");
    const pba = new Uint8Array(8);
    msix.pbaRead(0, pba);
    expect(pba[0]).toBe(0b100);
    expect(sent).toEqual([]);
    msix.tableWrite(2 * 16 + 12, u32(0));
    expect(sent).toEqual([[0xfee0_0000n, 0x42]]);
    msix.pbaRead(0, pba);
    expect(pba[0]).toBe(0);
    // PBA writes are ignored.
    msix.fire(2);
    expect(sent.length).toBe(2);
  });

  it("function mask holds every vector pending until cleared", () => {
    const { msix, cfg, cap, sent } = setup();
    program(msix, 0, 0xfee0_0000, 1);
    program(msix, 3, 0xfee0_1000, 4);
    cfg.write(cap + 2, 2, ENABLE | FMASK);
    expect(msix.fire(0)).toBe("pending");
    expect(msix.fire(3)).toBe("pending");
    cfg.write(cap + 2, 2, ENABLE);
    expect(sent).toEqual([
      [0xfee0_0000n, 1],
      [0xfee0_1000n, 4],
    ]);
    expect(msix.isPending(0) || msix.isPending(3)).toBe(false);
  });

  it("reports entry and control changes for routing updates", () => {
    const { msix, cfg, cap, updates } = setup();
    program(msix, 1, 0xfee0_0000, 1, false);
    cfg.write(cap + 2, 2, ENABLE);
    expect(updates).toEqual([1, 1, 1, undefined]);
  });

  it("reset clears Message Control in config space too", () => {
    const { msix, cfg, cap } = setup();
    cfg.write(cap + 2, 2, ENABLE);
    msix.reset();
    expect(cfg.read(cap + 2, 2)).toBe(3);
    expect(msix.enabled).toBe(false);
  });

  it("odd, unaligned or out-of-range table accesses never throw and change nothing", () => {
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.integer({ min: -4, max: 4 * MSIX_ENTRY_SIZE + 8 }), fc.constantFrom(1, 2, 3, 4, 8), fc.boolean()), { maxLength: 40 }), (ops) => {
        const { msix } = setup(4);
        const before = JSON.stringify(msix.save());
        for (const [off, size, write] of ops) {
          const ok = (size === 4 || size === 8) && off >= 0 && off % size === 0 && off + size <= 4 * MSIX_ENTRY_SIZE;
          const d = new Uint8Array(size).fill(0xff);
          if (write && !ok) msix.tableWrite(off, d);
          else if (!write) msix.tableRead(off, d);
          msix.pbaRead(off, d);
        }
        expect(JSON.stringify(msix.save())).toBe(before);
      }),
    );
  });
});
