import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { PCI_ECAM_START, PCI_MMIO32_END, PCI_MMIO32_START, PORT } from "../../arch/x86_64/layout.js";
import { PioBus } from "../pio-bus.js";
import { PciBus, type BarDecode } from "./bus.js";
import { PCI_REG, PciConfigSpace, type PciBarSpec } from "./config-space.js";
import type { PciDevice } from "./device.js";

/** A device whose BARs are plain memory, to see where accesses land. */
class RamBarDevice implements PciDevice {
  readonly config: PciConfigSpace;
  readonly bars: PciBarSpec[];
  readonly mem = new Map<number, Uint8Array>();
  constructor(bars: PciBarSpec[], deviceId = 0x1234) {
    this.config = new PciConfigSpace({ vendorId: 0x1af4, deviceId, classCode: 0xff0000, revisionId: 1 });
    for (const b of bars) this.config.addBar(b);
    this.bars = bars;
    for (const b of bars) this.mem.set(b.index, new Uint8Array(b.size));
  }
  barRead(bar: number, offset: number, data: Uint8Array): void {
    data.set(this.mem.get(bar)!.subarray(offset, offset + data.length));
  }
  barWrite(bar: number, offset: number, data: Uint8Array): void {
    this.mem.get(bar)!.set(data, offset);
  }
}

const ecamAddr = (bus: number, dev: number, fn: number, reg: number): number => PCI_ECAM_START + bus * 2 ** 20 + (dev << 15) + (fn << 12) + reg;
const cf8 = (bus: number, dev: number, fn: number, reg: number): number => (0x8000_0000 | (bus << 16) | (dev << 11) | (fn << 8) | (reg & 0xfc)) >>> 0;

function setup(): { bus: PciBus; pio: PioBus; a: RamBarDevice; b: RamBarDevice } {
  const bus = new PciBus();
  const pio = new PioBus();
  pio.register(PORT.PCI_CONFIG_ADDRESS, 8, bus.pio);
  const a = new RamBarDevice([
    { index: 0, size: 0x1000, is64: false, prefetchable: false },
    { index: 2, size: 0x10_0000, is64: true, prefetchable: true },
  ]);
  const b = new RamBarDevice([{ index: 1, size: 0x4000, is64: false, prefetchable: false }], 0x5678);
  bus.addDevice(a);
  bus.addDevice(b);
  return { bus, pio, a, b };
}

function mech1Read(pio: PioBus, bus: number, dev: number, fn: number, reg: number, size: number): number {
  pio.write(PORT.PCI_CONFIG_ADDRESS, 4, cf8(bus, dev, fn, reg));
  return pio.read(PORT.PCI_CONFIG_DATA + (reg & 3), size);
}

function ecamRead(bus: PciBus, b: number, dev: number, fn: number, reg: number, size: number): number {
  const data = new Uint8Array(size);
  expect(bus.handleMmio(ecamAddr(b, dev, fn, reg), data, false)).toBe(true);
  let v = 0;
  for (let i = size - 1; i >= 0; i--) v = v * 256 + data[i]!;
  return v;
}

describe("PciBus configuration access", () => {
  it("host bridge at 00:00.0 is 8086:0d57, class 0x060000", () => {
    const { pio } = setup();
    expect(mech1Read(pio, 0, 0, 0, 0, 4)).toBe(0x0d57_8086);
    expect(mech1Read(pio, 0, 0, 0, PCI_REG.REVISION_ID, 4) >>> 8).toBe(0x060000);
  });

  it("devices fill slots 1, 2, ...; absent slots, functions and buses read all ones", () => {
    const { bus, pio } = setup();
    expect(mech1Read(pio, 0, 1, 0, 0, 4)).toBe(0x1234_1af4);
    expect(mech1Read(pio, 0, 2, 0, 0, 2)).toBe(0x1af4);
    expect(mech1Read(pio, 0, 3, 0, 0, 4)).toBe(0xffff_ffff);
    expect(mech1Read(pio, 0, 1, 1, 0, 2)).toBe(0xffff);
    expect(mech1Read(pio, 1, 1, 0, 0, 1)).toBe(0xff);
    expect(ecamRead(bus, 5, 1, 0, 0, 4)).toBe(0xffff_ffff);
  });

  it("mechanism #1: the enable bit gates data, only DWORD accesses hit the latch", () => {
    const { pio } = setup();
    pio.write(PORT.PCI_CONFIG_ADDRESS, 4, 0x0000_0800); // device 1, enable clear
    expect(pio.read(PORT.PCI_CONFIG_DATA, 4)).toBe(0xffff_ffff);
    // Linux's pci_check_type1(): a byte to 0xCFB, then the latch must read back 0x80000000.
    pio.write(PORT.PCI_CONFIG_ADDRESS + 3, 1, 0x01);
    pio.write(PORT.PCI_CONFIG_ADDRESS, 4, 0x8000_0000);
    expect(pio.read(PORT.PCI_CONFIG_ADDRESS, 4)).toBe(0x8000_0000);
    // Reserved bits 30:24 and 1:0 read as 0.
    pio.write(PORT.PCI_CONFIG_ADDRESS, 4, 0xffff_ffff);
    expect(pio.read(PORT.PCI_CONFIG_ADDRESS, 4)).toBe(0x80ff_fffc);
    expect(pio.read(PORT.PCI_CONFIG_ADDRESS, 2)).toBe(0xffff);
  });

  it("mechanism #1 and ECAM give the same answers for every register and width of the first 256 bytes", () => {
    const { bus, pio } = setup();
    for (const dev of [0, 1, 2, 3, 31]) {
      for (let reg = 0; reg < 256; reg++) {
        for (const size of [1, 2, 4]) {
          if ((reg & 3) + size > 4) continue;
          expect(mech1Read(pio, 0, dev, 0, reg, size)).toBe(ecamRead(bus, 0, dev, 0, reg, size));
        }
      }
    }
  });

  it("writes through either mechanism are seen by the other", () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 3 }), fc.integer({ min: 0, max: 63 }), fc.constantFrom(1, 2, 4), fc.integer({ min: 0, max: 0xffff_ffff }), fc.boolean(), (dev, dw, size, value, viaEcam) => {
        const { bus, pio } = setup();
        const reg = dw * 4 + (size === 4 ? 0 : size === 2 ? 2 * (value & 1) : value & 3);
        const v = size === 4 ? value : value % 2 ** (8 * size);
        if (viaEcam) {
          const data = new Uint8Array(size);
          for (let i = 0; i < size; i++) data[i] = (v >>> (8 * i)) & 0xff;
          bus.handleMmio(ecamAddr(0, dev, 0, reg), data, true);
        } else {
          pio.write(PORT.PCI_CONFIG_ADDRESS, 4, cf8(0, dev, 0, reg));
          pio.write(PORT.PCI_CONFIG_DATA + (reg & 3), size, v);
        }
        for (let r = 0; r < 64; r += 4) expect(mech1Read(pio, 0, dev, 0, r, 4)).toBe(ecamRead(bus, 0, dev, 0, r, 4));
      }),
      { numRuns: 150 },
    );
  });

  it("ECAM: 8-byte accesses split into two DWORDs; other sizes read ones", () => {
    const { bus } = setup();
    const data = new Uint8Array(8);
    bus.handleMmio(ecamAddr(0, 1, 0, 0), data, false);
    expect([...data]).toEqual([0xf4, 0x1a, 0x34, 0x12, ...new Uint8Array(data.buffer, 4, 4)]);
    expect(new DataView(data.buffer).getUint32(4, true)).toBe(ecamRead(bus, 0, 1, 0, 4, 4));
    const odd = new Uint8Array(3);
    bus.handleMmio(ecamAddr(0, 1, 0, 0), odd, false);
    expect([...odd]).toEqual([0xff, 0xff, 0xff]);
    // Extended space of a conventional function reads 0: no extended capabilities.
    expect(ecamRead(bus, 0, 1, 0, 0x100, 4)).toBe(0);
  });
});

describe("PciBus BARs", () => {
  it("allocates naturally aligned, non-overlapping BARs inside the 32-bit window, decode enabled", () => {
    fc.assert(
      fc.property(fc.array(fc.array(fc.integer({ min: 4, max: 24 }), { minLength: 1, maxLength: 3 }), { minLength: 1, maxLength: 10 }), (devs) => {
        const bus = new PciBus();
        const placed: { base: number; size: number }[] = [];
        for (const sizes of devs) {
          const bars = sizes.map((l, i) => ({ index: i * 2, size: 2 ** l, is64: i === 1, prefetchable: false }));
          const slot = bus.addDevice(new RamBarDevice(bars));
          for (const b of bars) {
            const base = bus.barAddress(slot, b.index)!;
            expect(base % b.size).toBe(0);
            expect(base).toBeGreaterThanOrEqual(PCI_MMIO32_START);
            expect(base + b.size).toBeLessThanOrEqual(PCI_MMIO32_END);
            placed.push({ base, size: b.size });
          }
        }
        for (const p of placed) for (const q of placed) if (p !== q) expect(p.base + p.size <= q.base || q.base + q.size <= p.base).toBe(true);
      }),
    );
  });

  it("findBar and handleMmio route to the BAR, with the offset", () => {
    const { bus, a, b } = setup();
    const base = bus.barAddress(2, 1)!;
    const hit = bus.findBar(base + 0x10);
    expect(hit?.device).toBe(b);
    expect(hit).toMatchObject({ slot: 2, bar: 1, offset: 0x10 });
    expect(bus.handleMmio(base + 0x10, Uint8Array.of(1, 2, 3, 4), true)).toBe(true);
    expect([...b.mem.get(1)!.subarray(0x10, 0x14)]).toEqual([1, 2, 3, 4]);
    const back = new Uint8Array(4);
    bus.handleMmio(base + 0x10, back, false);
    expect([...back]).toEqual([1, 2, 3, 4]);
    expect(bus.findBar(bus.barAddress(1, 2)! + 0xf_ffff)?.device).toBe(a);
    expect(bus.handleMmio(PCI_MMIO32_END - 4, new Uint8Array(4), false)).toBe(false);
    // An access running past the BAR's end is dropped and reads ones.
    const tail = new Uint8Array(8);
    bus.handleMmio(base + 0x4000 - 4, tail, false);
    expect([...tail]).toEqual(Array(8).fill(0xff));
  });

  it("decode follows COMMAND.MEMORY and where the guest moves a BAR (Linux sizing + reassign)", () => {
    const { bus, pio, b } = setup();
    const changes: BarDecode[][] = [];
    bus.onDecodeChange((c) => changes.push(c));
    const old = bus.barAddress(2, 1)!;
    const cfgWrite = (reg: number, size: number, v: number): void => {
      pio.write(PORT.PCI_CONFIG_ADDRESS, 4, cf8(0, 2, 0, reg));
      pio.write(PORT.PCI_CONFIG_DATA + (reg & 3), size, v);
    };
    const bar1 = PCI_REG.BAR0 + 4;
    // __pci_read_base: decode off, size with all ones, restore, decode on.
    cfgWrite(PCI_REG.COMMAND, 2, 0);
    expect(bus.findBar(old)).toBeUndefined();
    cfgWrite(bar1, 4, 0xffff_ffff);
    expect(mech1Read(pio, 0, 2, 0, bar1, 4)).toBe(0xffff_c000);
    cfgWrite(bar1, 4, 0xd000_0000);
    cfgWrite(PCI_REG.COMMAND, 2, 2);
    expect(bus.findBar(old)).toBeUndefined();
    expect(bus.findBar(0xd000_0010)).toMatchObject({ device: b, bar: 1, offset: 0x10 });
    expect(bus.barAddress(2, 1)).toBe(0xd000_0000);
    expect(changes.flat()).toEqual([
      { slot: 2, bar: 1, address: undefined, size: 0x4000 },
      { slot: 2, bar: 1, address: 0xd000_0000, size: 0x4000 },
    ]);
  });

  it("a BAR programmed outside the bridge window (onto RAM or the APICs) decodes nothing", () => {
    const { bus, pio } = setup();
    pio.write(PORT.PCI_CONFIG_ADDRESS, 4, cf8(0, 2, 0, PCI_REG.BAR0 + 4));
    pio.write(PORT.PCI_CONFIG_DATA, 4, 0xfee0_0000);
    expect(bus.barAddress(2, 1)).toBeUndefined();
    expect(bus.findBar(0xfee0_0000)).toBeUndefined();
    pio.write(PORT.PCI_CONFIG_DATA, 4, 0x0010_0000);
    expect(bus.findBar(0x0010_0000)).toBeUndefined();
  });

  it("slot errors are typed", () => {
    const { bus } = setup();
    expect(() => bus.addDevice(new RamBarDevice([]), 0)).toThrow(/slot 0/);
    expect(() => bus.addDevice(new RamBarDevice([]), 1)).toThrow(/taken/);
    for (let i = 3; i < 32; i++) bus.addDevice(new RamBarDevice([]));
    expect(() => bus.addDevice(new RamBarDevice([]))).toThrow(/no free slot/);
    const small = new PciBus({ mmioStart: PCI_MMIO32_START, mmioEnd: PCI_MMIO32_START + 0x2000 });
    small.addDevice(new RamBarDevice([{ index: 0, size: 0x2000, is64: false, prefetchable: false }]));
    expect(() => small.addDevice(new RamBarDevice([{ index: 0, size: 0x1000, is64: false, prefetchable: false }]))).toThrow(/no room/);
  });

  it("random port and MMIO traffic never throws", () => {
    fc.assert(
      fc.property(
        fc.array(
          fc.oneof(
            fc.tuple(fc.constant("pio" as const), fc.integer({ min: 0, max: 7 }), fc.constantFrom(1, 2, 4), fc.integer({ min: 0, max: 0xffff_ffff }), fc.boolean()),
            fc.tuple(fc.constant("mmio" as const), fc.integer({ min: 0, max: PCI_ECAM_START + 0x40_0000 - PCI_MMIO32_START }), fc.constantFrom(1, 2, 3, 4, 8), fc.integer({ min: 0, max: 0xffff_ffff }), fc.boolean()),
          ),
          { maxLength: 80 },
        ),
        (ops) => {
          const { bus, pio } = setup();
          for (const [kind, off, size, v, w] of ops) {
            if (kind === "pio") {
              if (w) pio.write(PORT.PCI_CONFIG_ADDRESS + off, size, v);
              else pio.read(PORT.PCI_CONFIG_ADDRESS + off, size);
            } else {
              const data = new Uint8Array(size).fill(v & 0xff);
              bus.handleMmio(PCI_MMIO32_START + off, data, w);
            }
          }
          expect(mech1Read(pio, 0, 1, 0, 0, 4)).toBe(0x1234_1af4);
          expect(mech1Read(pio, 0, 0, 0, 0, 4)).toBe(0x0d57_8086);
        },
      ),
    );
  });
});
