/**
 * A PCI type-0 configuration space (PCI Local Bus 3.0 §6.1, §6.2): 256 bytes of
 * conventional space plus the PCIe extended space up to 4 KiB (PCIe 5.0 §7.2.2),
 * which a conventional function leaves all zero (no extended capabilities, so the
 * header at 0x100 reads 0 and Linux stops looking there).
 *
 * Every byte has a write mask (which bits the guest may change) and a
 * write-one-to-clear mask (status bits). Reads and writes of any offset and size
 * are legal and never throw: the guest is hostile, so bytes past 4 KiB read as
 * all ones and writes to read-only bits are dropped.
 */
import { TypevisorError } from "../../../errors.js";

export const PCI_CONFIG_SIZE = 4096;
/** The conventional part reachable through configuration mechanism #1. */
export const PCI_CONFIG_CONVENTIONAL_SIZE = 256;

/** Header register offsets (PCI Local Bus 3.0 §6.1, Figure 6-1). */
export const PCI_REG = {
  VENDOR_ID: 0x00,
  DEVICE_ID: 0x02,
  COMMAND: 0x04,
  STATUS: 0x06,
  REVISION_ID: 0x08,
  CLASS_PROG: 0x09,
  CACHE_LINE_SIZE: 0x0c,
  LATENCY_TIMER: 0x0d,
  HEADER_TYPE: 0x0e,
  BIST: 0x0f,
  BAR0: 0x10,
  CARDBUS_CIS: 0x28,
  SUBSYSTEM_VENDOR_ID: 0x2c,
  SUBSYSTEM_ID: 0x2e,
  ROM_ADDRESS: 0x30,
  CAPABILITIES_POINTER: 0x34,
  INTERRUPT_LINE: 0x3c,
  INTERRUPT_PIN: 0x3d,
  MIN_GNT: 0x3e,
  MAX_LAT: 0x3f,
} as const;

/** Command register bits (PCI Local Bus 3.0 §6.2.2). */
export const PCI_COMMAND = {
  IO: 1 << 0,
  MEMORY: 1 << 1,
  MASTER: 1 << 2,
  INTX_DISABLE: 1 << 10,
} as const;

/** Status register bits (PCI Local Bus 3.0 §6.2.3). */
export const PCI_STATUS = {
  INTERRUPT: 1 << 3,
  CAP_LIST: 1 << 4,
  MASTER_DATA_PARITY: 1 << 8,
  SIG_TARGET_ABORT: 1 << 11,
  REC_TARGET_ABORT: 1 << 12,
  REC_MASTER_ABORT: 1 << 13,
  SIG_SYSTEM_ERROR: 1 << 14,
  DETECTED_PARITY: 1 << 15,
} as const;

/** The error bits software clears by writing 1 (PCI Local Bus 3.0 §6.2.3). */
const STATUS_W1C =
  PCI_STATUS.MASTER_DATA_PARITY |
  PCI_STATUS.SIG_TARGET_ABORT |
  PCI_STATUS.REC_TARGET_ABORT |
  PCI_STATUS.REC_MASTER_ABORT |
  PCI_STATUS.SIG_SYSTEM_ERROR |
  PCI_STATUS.DETECTED_PARITY;

/** Memory BAR low bits (PCI Local Bus 3.0 §6.2.5.1). */
export const PCI_BAR_MEM_TYPE_64 = 0b100;
export const PCI_BAR_MEM_PREFETCH = 0b1000;

/** A memory BAR a device implements (I/O BARs are not modelled: nothing here needs them). */
export interface PciBarSpec {
  /** 0..5; a 64-bit BAR also takes index+1. */
  index: number;
  /** Bytes; a power of two, at least 16 (PCI Local Bus 3.0 §6.2.5.1). */
  size: number;
  is64: boolean;
  prefetchable: boolean;
}

export interface PciHeaderInit {
  vendorId: number;
  deviceId: number;
  /** 24 bits: base class << 16 | subclass << 8 | programming interface. */
  classCode: number;
  revisionId: number;
  subsystemVendorId?: number;
  subsystemId?: number;
  /** Header type byte (bit 7 = multi-function); only type 0 is modelled. */
  headerType?: number;
}

/** Side effects of a register range: refresh bytes before a read, react after a write. */
export interface ConfigHook {
  start: number;
  length: number;
  /** Called before the bytes of an overlapping read are returned (may update them). */
  beforeRead?(offset: number, size: number): void;
  /** Called after an overlapping write updated the bytes (with the raw value written). */
  afterWrite?(offset: number, size: number, value: number): void;
}

function pciError(code: string, message: string): TypevisorError {
  return new TypevisorError(code, message);
}

const isPow2 = (n: number): boolean => Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0 && n <= 2 ** 31;

export class PciConfigSpace {
  private readonly bytes = new Uint8Array(PCI_CONFIG_SIZE);
  private readonly wmask = new Uint8Array(PCI_CONFIG_SIZE);
  private readonly w1cmask = new Uint8Array(PCI_CONFIG_SIZE);
  private readonly hooks: ConfigHook[] = [];
  private readonly barSpecs: PciBarSpec[] = [];
  /** Where the next capability goes; 0x40 is the first byte after the type-0 header. */
  private capNext = 0x40;
  private lastCap = 0;

  constructor(init: PciHeaderInit) {
    this.setU16(PCI_REG.VENDOR_ID, init.vendorId);
    this.setU16(PCI_REG.DEVICE_ID, init.deviceId);
    this.setU8(PCI_REG.REVISION_ID, init.revisionId);
    this.setU8(PCI_REG.CLASS_PROG, init.classCode & 0xff);
    this.setU16(PCI_REG.CLASS_PROG + 1, (init.classCode >>> 8) & 0xffff);
    this.setU8(PCI_REG.HEADER_TYPE, init.headerType ?? 0);
    this.setU16(PCI_REG.SUBSYSTEM_VENDOR_ID, init.subsystemVendorId ?? 0);
    this.setU16(PCI_REG.SUBSYSTEM_ID, init.subsystemId ?? 0);
    // Memory decode, bus mastering and INTx disable are what a memory-BAR device
    // implements; I/O space stays hardwired to 0 with no I/O BARs, as do the
    // optional parity/SERR enables (PCI Local Bus 3.0 §6.2.2).
    this.setMask16(PCI_REG.COMMAND, PCI_COMMAND.MEMORY | PCI_COMMAND.MASTER | PCI_COMMAND.INTX_DISABLE);
    this.setW1c16(PCI_REG.STATUS, STATUS_W1C);
    // Cache Line Size is read/write for every function (§6.2.4); the interrupt
    // line is a scratch register for software (§6.2.4). Interrupt pin stays 0:
    // functions here interrupt by MSI-X only.
    this.wmask[PCI_REG.CACHE_LINE_SIZE] = 0xff;
    this.wmask[PCI_REG.INTERRUPT_LINE] = 0xff;
  }

  // -------------------------------------------------------------------------
  // Guest-facing access.

  /** Read `size` bytes (1, 2 or 4) little-endian; anything else, or past 4 KiB, reads as ones. */
  read(offset: number, size: number): number {
    if (!validAccess(offset, size)) return size === 4 ? 0xffff_ffff : size === 2 ? 0xffff : 0xff;
    for (const h of this.hooks) if (h.beforeRead !== undefined && overlaps(h, offset, size)) h.beforeRead(offset, size);
    let v = 0;
    for (let i = size - 1; i >= 0; i--) {
      const o = offset + i;
      v = v * 256 + (o < PCI_CONFIG_SIZE ? this.bytes[o]! : 0xff);
    }
    return v;
  }

  /** Write `size` bytes (1, 2 or 4) through the write and write-one-to-clear masks. */
  write(offset: number, size: number, value: number): void {
    if (!validAccess(offset, size) || !Number.isFinite(value)) return;
    const v = value >>> 0;
    for (let i = 0; i < size; i++) {
      const o = offset + i;
      if (o >= PCI_CONFIG_SIZE) break;
      const b = (v >>> (8 * i)) & 0xff;
      const m = this.wmask[o]!;
      const w1c = this.w1cmask[o]!;
      this.bytes[o] = ((this.bytes[o]! & ~m) | (b & m)) & ~(b & w1c);
    }
    for (const h of this.hooks) if (h.afterWrite !== undefined && overlaps(h, offset, size)) h.afterWrite(offset, size, v);
  }

  // -------------------------------------------------------------------------
  // Device-side setup and state (not guest-reachable).

  getU8(off: number): number {
    return this.bytes[off] ?? 0;
  }
  getU16(off: number): number {
    return this.getU8(off) | (this.getU8(off + 1) << 8);
  }
  getU32(off: number): number {
    return (this.getU16(off) | (this.getU16(off + 2) << 16)) >>> 0;
  }
  setU8(off: number, v: number): void {
    this.bytes[off] = v & 0xff;
  }
  setU16(off: number, v: number): void {
    this.setU8(off, v);
    this.setU8(off + 1, v >>> 8);
  }
  setU32(off: number, v: number): void {
    this.setU16(off, v);
    this.setU16(off + 2, v >>> 16);
  }
  /** Make bits of a byte range guest-writable. */
  setMask8(off: number, mask: number): void {
    this.wmask[off] = mask & 0xff;
  }
  setMask16(off: number, mask: number): void {
    this.setMask8(off, mask);
    this.setMask8(off + 1, mask >>> 8);
  }
  setMask32(off: number, mask: number): void {
    this.setMask16(off, mask);
    this.setMask16(off + 2, mask >>> 16);
  }
  private setW1c16(off: number, mask: number): void {
    this.w1cmask[off] = mask & 0xff;
    this.w1cmask[off + 1] = (mask >>> 8) & 0xff;
  }

  addHook(hook: ConfigHook): void {
    this.hooks.push(hook);
  }

  get command(): number {
    return this.getU16(PCI_REG.COMMAND);
  }
  get memoryDecode(): boolean {
    return (this.command & PCI_COMMAND.MEMORY) !== 0;
  }
  get busMaster(): boolean {
    return (this.command & PCI_COMMAND.MASTER) !== 0;
  }

  /** Device-driven Interrupt Status bit (PCI Local Bus 3.0 §6.2.3, bit 3; read-only to software). */
  setInterruptStatus(on: boolean): void {
    const s = this.getU16(PCI_REG.STATUS);
    this.setU16(PCI_REG.STATUS, on ? s | PCI_STATUS.INTERRUPT : s & ~PCI_STATUS.INTERRUPT);
  }

  /**
   * Implement a memory BAR. Its address bits below the size are hardwired to
   * zero (not in the write mask), which is what makes the sizing protocol work:
   * writing all ones reads back ~(size-1) plus the type bits (PCI 3.0 §6.2.5.1).
   * @throws TypevisorError PCI_BAR_INVALID for a bad index, size or overlap (a VMM bug, not guest input)
   */
  addBar(spec: PciBarSpec): void {
    const last = spec.is64 ? spec.index + 1 : spec.index;
    if (!Number.isInteger(spec.index) || spec.index < 0 || last > 5) {
      throw pciError("PCI_BAR_INVALID", `BAR index ${spec.index} does not fit a type-0 header`);
    }
    if (!isPow2(spec.size) || spec.size < 16) {
      throw pciError("PCI_BAR_INVALID", `BAR size ${spec.size} must be a power of two between 16 bytes and 2 GiB`);
    }
    for (const b of this.barSpecs) {
      const bLast = b.is64 ? b.index + 1 : b.index;
      if (spec.index <= bLast && b.index <= last) throw pciError("PCI_BAR_INVALID", `BAR ${spec.index} overlaps BAR ${b.index}`);
    }
    this.barSpecs.push({ ...spec });
    const off = PCI_REG.BAR0 + 4 * spec.index;
    this.setU32(off, (spec.is64 ? PCI_BAR_MEM_TYPE_64 : 0) | (spec.prefetchable ? PCI_BAR_MEM_PREFETCH : 0));
    this.setMask32(off, ~(spec.size - 1) & 0xffff_fff0);
    // Sizes are below 4 GiB, so every bit of the upper half is an address bit.
    if (spec.is64) this.setMask32(off + 4, 0xffff_ffff);
  }

  get bars(): readonly PciBarSpec[] {
    return this.barSpecs;
  }

  /** The address the guest programmed into a BAR (both halves of a 64-bit BAR), or undefined if not implemented. */
  barAddress(index: number): number | undefined {
    const spec = this.barSpecs.find((b) => b.index === index);
    if (spec === undefined) return undefined;
    const off = PCI_REG.BAR0 + 4 * index;
    const lo = (this.getU32(off) & 0xffff_fff0) >>> 0;
    const hi = spec.is64 ? this.getU32(off + 4) : 0;
    return hi * 2 ** 32 + lo;
  }

  /** Firmware-side BAR programming (what the bus allocator does); goes through the same masks as the guest. */
  setBarAddress(index: number, address: number): void {
    const spec = this.barSpecs.find((b) => b.index === index);
    if (spec === undefined) return;
    const off = PCI_REG.BAR0 + 4 * index;
    this.write(off, 4, address % 2 ** 32);
    if (spec.is64) this.write(off + 4, 4, Math.floor(address / 2 ** 32));
  }

  /**
   * Append a capability (PCI Local Bus 3.0 §6.7): `body` is everything after the
   * ID and Next bytes, `wmask` (same length, optional) the guest-writable bits of
   * the body. Capabilities are DWORD aligned and chained from the Capabilities
   * Pointer at 0x34; the status register's Capabilities List bit is set. Returns
   * the capability's offset.
   * @throws TypevisorError PCI_CAPABILITY_SPACE when the conventional space is full
   */
  addCapability(id: number, body: Uint8Array, wmask?: Uint8Array): number {
    const off = this.capNext;
    const len = 2 + body.length;
    if (off + len > PCI_CONFIG_CONVENTIONAL_SIZE) {
      throw pciError("PCI_CAPABILITY_SPACE", `capability 0x${id.toString(16)} of ${len} bytes does not fit below 0x100`);
    }
    this.setU8(off, id);
    this.setU8(off + 1, 0);
    this.bytes.set(body, off + 2);
    if (wmask !== undefined) this.wmask.set(wmask.subarray(0, body.length), off + 2);
    if (this.lastCap === 0) this.setU8(PCI_REG.CAPABILITIES_POINTER, off);
    else this.setU8(this.lastCap + 1, off);
    this.lastCap = off;
    this.capNext = (off + len + 3) & ~3;
    this.setU16(PCI_REG.STATUS, this.getU16(PCI_REG.STATUS) | PCI_STATUS.CAP_LIST);
    return off;
  }

  /** A copy of all 4 KiB (for tests and snapshots). */
  snapshot(): Uint8Array {
    return this.bytes.slice();
  }

  /**
   * Put back a snapshot() taken of a function built the same way: only the guest-writable bits
   * (the write mask: BAR addresses, command, cache line size, interrupt line, capability fields
   * such as MSI-X Message Control) are taken from `saved`; identity, read-only and
   * write-one-to-clear bits stay as this function was built. So a snapshot can set nothing a
   * guest could not have set with its own configuration writes. No hooks run: the owner restores
   * what the hooks maintain (MSI-X, BAR decode) from its own state.
   * @throws TypevisorError SNAPSHOT_INVALID when `saved` is not PCI_CONFIG_SIZE bytes
   */
  restoreWritable(saved: Uint8Array): void {
    if (saved.length !== PCI_CONFIG_SIZE) throw pciError("SNAPSHOT_INVALID", `PCI configuration space of ${saved.length} bytes, not ${PCI_CONFIG_SIZE}`);
    for (let o = 0; o < PCI_CONFIG_SIZE; o++) {
      const m = this.wmask[o]!;
      if (m !== 0) this.bytes[o] = (this.bytes[o]! & ~m) | (saved[o]! & m);
    }
  }
}

function validAccess(offset: number, size: number): boolean {
  return (size === 1 || size === 2 || size === 4) && Number.isSafeInteger(offset) && offset >= 0 && offset < PCI_CONFIG_SIZE;
}

function overlaps(h: ConfigHook, offset: number, size: number): boolean {
  return offset < h.start + h.length && h.start < offset + size;
}
