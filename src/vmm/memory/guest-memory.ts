import { TypevisorError } from "../../errors.js";
import { addressOf } from "../../sys/iov.js";

/**
 * Guest-physical memory: the only way the VMM reads or writes guest RAM.
 *
 * Everything the guest hands us (descriptor addresses, lengths, boot pointers)
 * is hostile input, so every access is bounds-checked against the region map
 * and may not straddle two regions (a guest could otherwise make us read the
 * host's memory between them). Out-of-range access throws GuestMemoryError;
 * callers on guest-driven paths catch it and fail that request.
 */
export class GuestMemoryError extends TypevisorError {
  constructor(gpa: number, len: number) {
    super("GUEST_MEMORY_OUT_OF_RANGE", `guest access of ${len} bytes at 0x${gpa.toString(16)} is outside guest RAM`);
  }
}

/** One contiguous guest-physical range backed by host memory (plain data). */
export interface MemoryRegionSpec {
  /** Guest-physical start address. */
  guestPhysAddr: number;
  /** Size in bytes. */
  size: number;
  /** Byte offset of this region inside the host backing mapping. */
  hostOffset: number;
}

interface Region extends MemoryRegionSpec {
  bytes: Uint8Array;
  view: DataView;
  /** Host virtual address of the region's first byte (for iovecs handed to the kernel). */
  host: number;
}

export class GuestMemory {
  private readonly regions: Region[];
  /** regions[0] (the lowest; guest RAM below the PCI hole holds almost every buffer). */
  private readonly first: Region;

  /**
   * @param backing the host mapping (e.g. a koffi.view over an mmap); regions index into it.
   */
  constructor(backing: ArrayBuffer | SharedArrayBuffer, specs: readonly MemoryRegionSpec[]) {
    this.regions = [...specs]
      .sort((a, b) => a.guestPhysAddr - b.guestPhysAddr)
      .map((s) => {
        if (s.hostOffset < 0 || s.size <= 0 || s.hostOffset + s.size > backing.byteLength) {
          throw new TypevisorError("GUEST_MEMORY_LAYOUT", `region at 0x${s.guestPhysAddr.toString(16)} does not fit its backing`);
        }
        const bytes = new Uint8Array(backing, s.hostOffset, s.size);
        return { ...s, bytes, view: new DataView(backing, s.hostOffset, s.size), host: addressOf(bytes) };
      });
    const first = this.regions[0];
    if (first === undefined) throw new TypevisorError("GUEST_MEMORY_LAYOUT", "guest memory has no regions");
    this.first = first;
    for (let i = 1; i < this.regions.length; i++) {
      const prev = this.regions[i - 1]!;
      const cur = this.regions[i]!;
      if (prev.guestPhysAddr + prev.size > cur.guestPhysAddr) {
        throw new TypevisorError("GUEST_MEMORY_LAYOUT", "guest memory regions overlap");
      }
    }
  }

  /** The region layout as plain data (what a snapshot or a vCPU worker needs). */
  get layout(): MemoryRegionSpec[] {
    return this.regions.map(({ guestPhysAddr, size, hostOffset }) => ({ guestPhysAddr, size, hostOffset }));
  }

  /** Total bytes of guest RAM. */
  get size(): number {
    return this.regions.reduce((n, r) => n + r.size, 0);
  }

  /** True when [gpa, gpa+len) lies inside one region. */
  contains(gpa: number, len: number): boolean {
    return this.find(gpa, len) !== undefined;
  }

  private find(gpa: number, len: number): Region | undefined {
    if (!Number.isSafeInteger(gpa) || !Number.isSafeInteger(len) || gpa < 0 || len < 0) return undefined;
    for (const r of this.regions) {
      if (gpa >= r.guestPhysAddr && gpa + len <= r.guestPhysAddr + r.size) return r;
    }
    return undefined;
  }

  private region(gpa: number, len: number): Region {
    const r = this.find(gpa, len);
    if (r === undefined) throw new GuestMemoryError(gpa, len);
    return r;
  }

  /** A live view (no copy) of guest memory; valid while the VM's memory is mapped. */
  slice(gpa: number, len: number): Uint8Array {
    const r = this.region(gpa, len);
    const off = gpa - r.guestPhysAddr;
    return r.bytes.subarray(off, off + len);
  }

  /** A live DataView (no copy) of [gpa, gpa+len), for little-endian structures read in place. */
  dataView(gpa: number, len: number): DataView {
    const r = this.region(gpa, len);
    return new DataView(r.view.buffer, r.view.byteOffset + (gpa - r.guestPhysAddr), len);
  }

  /**
   * Host virtual address of [gpa, gpa+len), or -1 when the range is not inside one region
   * (exactly when contains() is false): for iovecs the kernel fills or reads (preadv/pwritev),
   * where a view per buffer would cost more than the I/O's bookkeeping. Valid while the VM's
   * memory is mapped. The descriptor walk calls this for every buffer of every request, so the
   * common case, the first region, is tested before the general search.
   */
  tryHostAddress(gpa: number, len: number): number {
    const r0 = this.first;
    if (gpa >= r0.guestPhysAddr && len >= 0 && gpa + len <= r0.guestPhysAddr + r0.size && Number.isSafeInteger(gpa) && Number.isSafeInteger(len)) {
      return r0.host + (gpa - r0.guestPhysAddr);
    }
    const r = this.find(gpa, len);
    return r === undefined ? -1 : r.host + (gpa - r.guestPhysAddr);
  }

  read(gpa: number, len: number): Uint8Array {
    return this.slice(gpa, len).slice();
  }

  write(gpa: number, data: Uint8Array): void {
    this.slice(gpa, data.length).set(data);
  }

  fill(gpa: number, len: number, value = 0): void {
    this.slice(gpa, len).fill(value);
  }

  readU8(gpa: number): number {
    const r = this.region(gpa, 1);
    return r.view.getUint8(gpa - r.guestPhysAddr);
  }
  readU16(gpa: number): number {
    const r = this.region(gpa, 2);
    return r.view.getUint16(gpa - r.guestPhysAddr, true);
  }
  readU32(gpa: number): number {
    const r = this.region(gpa, 4);
    return r.view.getUint32(gpa - r.guestPhysAddr, true);
  }
  readU64(gpa: number): bigint {
    const r = this.region(gpa, 8);
    return r.view.getBigUint64(gpa - r.guestPhysAddr, true);
  }
  writeU8(gpa: number, v: number): void {
    const r = this.region(gpa, 1);
    r.view.setUint8(gpa - r.guestPhysAddr, v);
  }
  writeU16(gpa: number, v: number): void {
    const r = this.region(gpa, 2);
    r.view.setUint16(gpa - r.guestPhysAddr, v, true);
  }
  writeU32(gpa: number, v: number): void {
    const r = this.region(gpa, 4);
    r.view.setUint32(gpa - r.guestPhysAddr, v, true);
  }
  writeU64(gpa: number, v: bigint): void {
    const r = this.region(gpa, 8);
    r.view.setBigUint64(gpa - r.guestPhysAddr, v, true);
  }
}
