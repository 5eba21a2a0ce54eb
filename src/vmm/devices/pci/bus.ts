/**
 * PCI segment 0, bus 0: the host bridge at 00:00.0 and up to 31 device slots,
 * one function each. Configuration space is reachable two ways, which must
 * agree byte for byte:
 * - mechanism #1 (PCI Local Bus 3.0 §3.2.2.3.2): a DWORD address latch at 0xCF8
 *   (enable bit 31, bus 23:16, device 15:11, function 10:8, register 7:2) and a
 *   data window at 0xCFC-0xCFF, addressed by byte within the DWORD;
 * - ECAM (PCIe 5.0 §7.2.2): PCI_ECAM_START + (bus << 20 | dev << 15 | fn << 12 | reg).
 * Functions that do not exist read as all ones (a master abort) and ignore writes.
 *
 * BARs are allocated once, as firmware would, naturally aligned in the 32-bit
 * window; afterwards the guest owns them (Linux may reassign), so MMIO decode
 * follows whatever is programmed, and only while COMMAND.MEMORY is set and the
 * whole BAR lies in the window the host bridge forwards (what _CRS announces):
 * a BAR moved onto RAM, ECAM or the APICs decodes nothing.
 */
import { TypevisorError } from "../../../errors.js";
import { PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO32_END, PCI_MMIO32_START } from "../../arch/x86_64/layout.js";
import type { PioDevice } from "../pio-bus.js";
import { PCI_COMMAND, PCI_CONFIG_SIZE, PCI_REG } from "./config-space.js";
import { PciHostBridge, type PciDevice } from "./device.js";

export const PCI_SLOTS = 32;
/** Mechanism #1 address register: enable, bus, device, function, DWORD register (bits 1:0 read 0). */
const CONFIG_ADDRESS_MASK = 0x80ff_fffc;

export interface PciBusOptions {
  /** The 32-bit MMIO window BARs live in (defaults: layout.ts PCI_MMIO32_START/END). */
  mmioStart?: number;
  mmioEnd?: number;
  /** ECAM base and size (defaults: layout.ts PCI_ECAM_START/SIZE). */
  ecamBase?: number;
  ecamSize?: number;
}

/** Where an MMIO address lands: `offset` is relative to the BAR's base. */
export interface BarHit {
  device: PciDevice;
  slot: number;
  bar: number;
  offset: number;
}

/** A BAR that currently decodes, or a BAR that stopped decoding (address undefined). */
export interface BarDecode {
  slot: number;
  bar: number;
  address: number | undefined;
  size: number;
}

/** The bus's own state for snapshots (plain JSON). */
export interface PciBusState {
  /** The 0xCF8 latch (PCI Local Bus 3.0 §3.2.2.3.2). */
  configAddress: number;
  /** The host bridge's 4 KiB configuration space, base64. */
  hostBridge: string;
}

interface Decoded {
  slot: number;
  bar: number;
  base: number;
  size: number;
  device: PciDevice;
}

function busError(code: string, message: string): TypevisorError {
  return new TypevisorError(code, message);
}

export class PciBus {
  readonly hostBridge = new PciHostBridge();
  private readonly slots: (PciDevice | undefined)[] = new Array<PciDevice | undefined>(PCI_SLOTS).fill(undefined);
  private readonly mmioStart: number;
  private readonly mmioEnd: number;
  private readonly ecamBase: number;
  private readonly ecamSize: number;
  private nextFree: number;
  private configAddress = 0;
  private decoded: Decoded[] = [];
  private readonly listeners: ((changes: BarDecode[]) => void)[] = [];

  constructor(opts: PciBusOptions = {}) {
    this.mmioStart = opts.mmioStart ?? PCI_MMIO32_START;
    this.mmioEnd = opts.mmioEnd ?? PCI_MMIO32_END;
    this.ecamBase = opts.ecamBase ?? PCI_ECAM_START;
    this.ecamSize = opts.ecamSize ?? PCI_ECAM_SIZE;
    this.nextFree = this.mmioStart;
    this.slots[0] = this.hostBridge;
  }

  /**
   * Plug `dev` into `slot` (default: the lowest free one) and allocate its BARs
   * from the 32-bit window, largest first so natural alignment wastes little,
   * then enable memory decode as firmware leaves it. Returns the slot.
   * @throws TypevisorError PCI_SLOT_INVALID, PCI_SLOT_BUSY, PCI_BUS_FULL, PCI_MMIO_EXHAUSTED (configuration mistakes)
   */
  addDevice(dev: PciDevice, slot?: number): number {
    let s: number;
    if (slot === undefined) {
      s = this.slots.findIndex((d) => d === undefined);
      if (s < 0) throw busError("PCI_BUS_FULL", `PCI bus 0 has no free slot (max ${PCI_SLOTS - 1} devices)`);
    } else {
      if (!Number.isInteger(slot) || slot < 1 || slot >= PCI_SLOTS) throw busError("PCI_SLOT_INVALID", `PCI slot ${slot} is not 1..${PCI_SLOTS - 1}`);
      if (this.slots[slot] !== undefined) throw busError("PCI_SLOT_BUSY", `PCI slot ${slot} is taken`);
      s = slot;
    }
    const bars = [...dev.bars].sort((a, b) => b.size - a.size);
    const addrs: { index: number; addr: number }[] = [];
    let next = this.nextFree;
    for (const b of bars) {
      const addr = Math.ceil(next / b.size) * b.size;
      if (addr + b.size > this.mmioEnd) {
        throw busError("PCI_MMIO_EXHAUSTED", `no room for a ${b.size}-byte BAR in the PCI window 0x${this.mmioStart.toString(16)}-0x${this.mmioEnd.toString(16)}`);
      }
      addrs.push({ index: b.index, addr });
      next = addr + b.size;
    }
    this.nextFree = next;
    for (const { index, addr } of addrs) dev.config.setBarAddress(index, addr);
    if (dev.bars.length > 0) dev.config.write(PCI_REG.COMMAND, 2, dev.config.command | PCI_COMMAND.MEMORY);
    this.slots[s] = dev;
    this.rebuildDecode();
    return s;
  }

  /** What the bus itself holds for a snapshot: the mechanism #1 address latch and the host bridge's configuration space. */
  save(): PciBusState {
    return { configAddress: this.configAddress, hostBridge: Buffer.from(this.hostBridge.config.snapshot()).toString("base64") };
  }

  /**
   * Put back a save(), after the devices' own configuration spaces were restored: the latch
   * (through the mask a guest write goes through), the host bridge's guest-writable bits, then
   * BAR decode is rebuilt from what the configuration spaces now say, so decode-change listeners
   * (the ioeventfd routes) follow the BARs as the guest had programmed them.
   * @throws TypevisorError SNAPSHOT_INVALID for a host bridge image of the wrong size
   */
  restore(state: PciBusState): void {
    this.hostBridge.config.restoreWritable(Buffer.from(state.hostBridge, "base64"));
    this.configAddress = (state.configAddress & CONFIG_ADDRESS_MASK) >>> 0;
    this.rebuildDecode();
  }

  device(slot: number): PciDevice | undefined {
    return this.slots[slot];
  }

  /** Register for BAR decode changes (the VMM moves ioeventfds and KVM regions with them). */
  onDecodeChange(listener: (changes: BarDecode[]) => void): void {
    this.listeners.push(listener);
  }

  /** The decoding address of `slot`'s BAR, or undefined while it does not decode. */
  barAddress(slot: number, bar: number): number | undefined {
    return this.decoded.find((d) => d.slot === slot && d.bar === bar)?.base;
  }

  // -------------------------------------------------------------------------
  // Configuration access, common to both mechanisms.

  private fn(bus: number, dev: number, fn: number): PciDevice | undefined {
    if (bus !== 0 || fn !== 0) return undefined;
    return this.slots[dev];
  }

  /** Read `size` (1, 2, 4) bytes of configuration space; absent functions read all ones. */
  configRead(bus: number, dev: number, fn: number, reg: number, size: number): number {
    const d = this.fn(bus, dev, fn);
    const ones = size >= 4 ? 0xffff_ffff : 2 ** (8 * size) - 1;
    if (d === undefined || reg < 0 || reg >= PCI_CONFIG_SIZE) return ones;
    return d.config.read(reg, size);
  }

  configWrite(bus: number, dev: number, fn: number, reg: number, size: number, value: number): void {
    const d = this.fn(bus, dev, fn);
    if (d === undefined || reg < 0 || reg >= PCI_CONFIG_SIZE) return;
    d.config.write(reg, size, value);
    // Command and BAR writes can start, stop or move decoding.
    if (reg < PCI_REG.CARDBUS_CIS && reg + size > PCI_REG.COMMAND) this.rebuildDecode();
  }

  // -------------------------------------------------------------------------
  // Mechanism #1: register with PioBus at PORT.PCI_CONFIG_ADDRESS, length 8.

  /** Ports 0xCF8-0xCFF as one PioDevice (offset 0-3 address latch, 4-7 data). */
  readonly pio: PioDevice = {
    read: (offset, size) => {
      const ones = size >= 4 ? 0xffff_ffff : 2 ** (8 * size) - 1;
      if (offset < 4) {
        // Only a DWORD access hits the latch (byte 0xCF9 is a chipset reset
        // register on PCs, which we do not model).
        return offset === 0 && size === 4 ? this.configAddress : ones;
      }
      const a = this.configAddress;
      if ((a & 0x8000_0000) === 0 || offset + size > 8) return ones;
      return this.configRead((a >>> 16) & 0xff, (a >>> 11) & 0x1f, (a >>> 8) & 0x7, (a & 0xfc) + (offset - 4), size);
    },
    write: (offset, size, value) => {
      if (offset < 4) {
        if (offset === 0 && size === 4) this.configAddress = (value & CONFIG_ADDRESS_MASK) >>> 0;
        return;
      }
      const a = this.configAddress;
      if ((a & 0x8000_0000) === 0 || offset + size > 8) return;
      this.configWrite((a >>> 16) & 0xff, (a >>> 11) & 0x1f, (a >>> 8) & 0x7, (a & 0xfc) + (offset - 4), size, value);
    },
  };

  // -------------------------------------------------------------------------
  // MMIO: ECAM and BARs.

  /** True when `addr` falls in the ECAM window. */
  isEcam(addr: number): boolean {
    return addr >= this.ecamBase && addr < this.ecamBase + this.ecamSize;
  }

  /**
   * One ECAM access. Sizes 1, 2, 4 map to one configuration access; 8 to two
   * DWORDs (low first). Anything else reads as ones and writes nothing.
   */
  ecamAccess(addr: number, data: Uint8Array, isWrite: boolean): void {
    const rel = addr - this.ecamBase;
    if (rel < 0 || rel + data.length > this.ecamSize) {
      if (!isWrite) data.fill(0xff);
      return;
    }
    const bus = Math.floor(rel / 2 ** 20) & 0xff;
    const dev = (rel >>> 15) & 0x1f;
    const fn = (rel >>> 12) & 0x7;
    const reg = rel & 0xfff;
    const parts = data.length === 8 ? [0, 4] : data.length === 1 || data.length === 2 || data.length === 4 ? [0] : [];
    if (parts.length === 0) {
      if (!isWrite) data.fill(0xff);
      return;
    }
    const size = data.length === 8 ? 4 : data.length;
    const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
    for (const p of parts) {
      // An access may not leave its 4 KiB function page (PCIe 5.0 §7.2.2.1).
      if (reg + p + size > PCI_CONFIG_SIZE) {
        if (!isWrite) for (let i = 0; i < size; i++) data[p + i] = 0xff;
        continue;
      }
      if (isWrite) {
        const v = size === 1 ? view.getUint8(p) : size === 2 ? view.getUint16(p, true) : view.getUint32(p, true);
        this.configWrite(bus, dev, fn, reg + p, size, v);
      } else {
        const v = this.configRead(bus, dev, fn, reg + p, size);
        if (size === 1) view.setUint8(p, v);
        else if (size === 2) view.setUint16(p, v, true);
        else view.setUint32(p, v, true);
      }
    }
  }

  /** The BAR decoding `addr`, if any (first match wins, like overlapping BARs on a real bus: undefined behaviour). */
  findBar(addr: number): BarHit | undefined {
    for (const d of this.decoded) {
      if (addr >= d.base && addr < d.base + d.size) return { device: d.device, slot: d.slot, bar: d.bar, offset: addr - d.base };
    }
    return undefined;
  }

  /**
   * Serve an MMIO exit. ECAM and BAR accesses are handled (an access running
   * past the end of its BAR is dropped: reads ones); returns false when nothing
   * decodes `addr`, so the caller applies its default (reads all ones).
   */
  handleMmio(addr: number, data: Uint8Array, isWrite: boolean): boolean {
    if (this.isEcam(addr)) {
      this.ecamAccess(addr, data, isWrite);
      return true;
    }
    const hit = this.findBar(addr);
    if (hit === undefined) return false;
    const size = hit.device.bars.find((b) => b.index === hit.bar)?.size ?? 0;
    if (hit.offset + data.length > size) {
      if (!isWrite) data.fill(0xff);
      return true;
    }
    if (isWrite) hit.device.barWrite(hit.bar, hit.offset, data);
    else hit.device.barRead(hit.bar, hit.offset, data);
    return true;
  }

  private rebuildDecode(): void {
    const next: Decoded[] = [];
    this.slots.forEach((device, slot) => {
      if (device === undefined || !device.config.memoryDecode) return;
      for (const b of device.bars) {
        const base = device.config.barAddress(b.index);
        if (base === undefined || base < this.mmioStart || base + b.size > this.mmioEnd) continue;
        next.push({ slot, bar: b.index, base, size: b.size, device });
      }
    });
    const changes: BarDecode[] = [];
    const key = (d: { slot: number; bar: number }): string => `${d.slot}:${d.bar}`;
    const before = new Map(this.decoded.map((d) => [key(d), d]));
    const after = new Map(next.map((d) => [key(d), d]));
    for (const [k, d] of before) if (!after.has(k)) changes.push({ slot: d.slot, bar: d.bar, address: undefined, size: d.size });
    for (const [k, d] of after) if (before.get(k)?.base !== d.base) changes.push({ slot: d.slot, bar: d.bar, address: d.base, size: d.size });
    this.decoded = next;
    if (changes.length > 0) for (const l of this.listeners) l(changes);
  }
}
