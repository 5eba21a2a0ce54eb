import { TypevisorError } from "../../errors.js";
import { addressOf } from "../../sys/iov.js";
import * as libc from "../../sys/libc.js";

/**
 * Guest-physical memory: the only way the VMM reads or writes guest RAM.
 *
 * Everything the guest hands us (descriptor addresses, lengths, boot pointers)
 * is hostile input, so every access is bounds-checked against the region map
 * and may not straddle two regions: in every layout we build, regions are
 * separated by holes (the 32-bit MMIO hole), so a range that leaves its region
 * is not RAM, and a guest could otherwise make us touch the host's memory
 * between the mappings. Out-of-range access throws GuestMemoryError; callers
 * on guest-driven paths catch it and fail that request.
 *
 * A region is one host mapping, contiguous in host memory (so one host address
 * serves an iovec of any length inside it), but JavaScript sees it through
 * **views** no larger than V8 and koffi allow (MAX_VIEW_BYTES). View i of a
 * region starts at i x `step` and is `step + overlap` bytes long (clipped to
 * the region): neighbouring views overlap, so every access of up to `overlap`
 * bytes lies inside one view whatever its address, and the structures devices
 * read in place (rings, descriptor tables, headers: at most 512 KiB) never
 * need splitting. Longer accesses that cross a view boundary are split where
 * their contract allows it (read, write, fill, slices: copies or a list of
 * views) and refused where it does not (slice, dataView: one live view).
 */
export class GuestMemoryError extends TypevisorError {
  constructor(gpa: number, len: number, code: "GUEST_MEMORY_OUT_OF_RANGE" | "GUEST_MEMORY_VIEW_SPLIT" = "GUEST_MEMORY_OUT_OF_RANGE") {
    super(
      code,
      code === "GUEST_MEMORY_OUT_OF_RANGE"
        ? `guest access of ${len} bytes at 0x${gpa.toString(16)} is outside guest RAM`
        : `guest access of ${len} bytes at 0x${gpa.toString(16)} crosses two host views and cannot be one live view`,
    );
  }
}

/**
 * The largest view of host memory we make: koffi.view (and a V8 typed array) of exactly 2^32
 * bytes works in Node 20; one byte more aborts the process inside koffi (measured), so this is
 * a hard limit, not a tuning knob.
 */
export const MAX_VIEW_BYTES = 2 ** 32;

/** How a region is cut into views: view i covers [i x step, i x step + step + overlap). */
export interface ViewGeometry {
  step: number;
  overlap: number;
}

/**
 * 2 GiB steps with 2 MiB of overlap: a 12 GiB guest needs 7 views, and any access of up to
 * 2 MiB (a virtqueue's rings are at most 512 KiB, an indirect table 512 KiB) is one view.
 */
export const DEFAULT_VIEW_GEOMETRY: ViewGeometry = { step: 2 ** 31, overlap: 2 * 1024 * 1024 };

/** One contiguous guest-physical range inside one backing ArrayBuffer (tests, tiny guests). */
export interface MemoryRegionSpec {
  /** Guest-physical start address. */
  guestPhysAddr: number;
  /** Size in bytes. */
  size: number;
  /** Byte offset of this region inside the backing buffer. */
  hostOffset: number;
}

/** One contiguous guest-physical range backed by its own host mapping (plain data: posted to workers). */
export interface HostRegion {
  guestPhysAddr: number;
  size: number;
  /** Host virtual address of the region's first byte (user-space addresses are below 2^47: exact as a Number). */
  hostAddress: number;
}

interface View {
  bytes: Uint8Array;
  dv: DataView;
}

interface Region {
  guestPhysAddr: number;
  size: number;
  /** guestPhysAddr + size */
  end: number;
  /** Host virtual address of the region's first byte. */
  host: number;
  /** How many views cover the region. */
  viewCount: number;
  /** View i (made on first use) starts at region offset i x step. */
  view: (i: number) => View;
}

function layoutError(message: string): TypevisorError {
  return new TypevisorError("GUEST_MEMORY_LAYOUT", message);
}

function checkGeometry(g: ViewGeometry): void {
  if (!Number.isSafeInteger(g.step) || !Number.isSafeInteger(g.overlap) || g.step < 1 || g.overlap < 0 || g.step + g.overlap > MAX_VIEW_BYTES) {
    throw layoutError(`view geometry step ${g.step} overlap ${g.overlap} is not 1 <= step, 0 <= overlap, step + overlap <= 2^32`);
  }
}

/**
 * The views over [0, size) of a region, made on first use by `make(offset, length)`. Lazily,
 * because V8 counts every byte an ArrayBuffer views as external memory and answers each new
 * 2 GiB with a full "external memory pressure" garbage collection (seen with --trace-gc): made
 * all at once, a 12 GiB guest cost 7 of them before it booted; made on demand, the views of RAM
 * the VMM never touches (most of a big guest's, until its devices use it) cost nothing.
 */
function lazyViews(size: number, g: ViewGeometry, make: (offset: number, length: number) => Uint8Array): (i: number) => View {
  const views: (View | undefined)[] = new Array<View | undefined>(Math.ceil(size / g.step)).fill(undefined);
  return (i: number): View => {
    let v = views[i];
    if (v === undefined) {
      const off = i * g.step;
      const bytes = make(off, Math.min(g.step + g.overlap, size - off));
      v = { bytes, dv: new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength) };
      views[i] = v;
    }
    return v;
  };
}

/** The unit of dirty tracking: x86's base page. */
export const DIRTY_PAGE_SIZE = 4096;

/**
 * Which guest pages the VMM itself wrote (devices: data into a chain's writable buffers, used
 * rings, status bytes), one bit per 4 KiB page of guest-physical space in a SharedArrayBuffer, so
 * the device thread marks and another thread (live migration, later) takes the set. KVM's own
 * dirty log (KVM_GET_DIRTY_LOG) sees only what vCPUs write; this is the other half.
 *
 * Where marks come from (GuestMemory.dirtyLog): every GuestMemory write method, and the split
 * virtqueue at each used element (SplitQueue.pushUsed marks the used ring entry and index and the
 * chain's writable buffers, which covers the writes devices make through host addresses:
 * preadv/readv by the kernel, the I/O threads), and avail_event (armNotification). A chain's
 * buffers are marked when it is returned, after its data is written, so a copy pass that cleared
 * the bit before the write cannot miss it.
 */
export class DirtyLog {
  readonly words: Int32Array;

  /** @param shared one bit per page, as made by DirtyLog.create (the same buffer on every thread) */
  constructor(readonly shared: SharedArrayBuffer) {
    this.words = new Int32Array(shared);
  }

  /** A log for guest-physical [0, end): ceil(end / 4 KiB) bits. */
  static create(end: number): DirtyLog {
    return new DirtyLog(new SharedArrayBuffer(Math.ceil(Math.ceil(end / DIRTY_PAGE_SIZE) / 32) * 4));
  }

  /** Mark the pages of [gpa, gpa+len) (len 0 marks nothing; pages past the log are ignored). */
  mark(gpa: number, len: number): void {
    if (len <= 0) return;
    const last = Math.min(Math.floor((gpa + len - 1) / DIRTY_PAGE_SIZE), this.words.length * 32 - 1);
    for (let p = Math.floor(gpa / DIRTY_PAGE_SIZE); p <= last; p++) Atomics.or(this.words, p >>> 5, 1 << (p & 31));
  }

  isDirty(page: number): boolean {
    return page >= 0 && page < this.words.length * 32 && (Atomics.load(this.words, page >>> 5) & (1 << (page & 31))) !== 0;
  }

  /** The dirty page numbers, ascending, clearing them (a word at a time, atomically: a mark made meanwhile is kept for the next call). */
  take(): number[] {
    const out: number[] = [];
    for (let w = 0; w < this.words.length; w++) {
      if (this.words[w] === 0) continue;
      const bits = Atomics.exchange(this.words, w, 0);
      for (let b = 0; b < 32; b++) if ((bits & (1 << b)) !== 0) out.push(w * 32 + b);
    }
    return out;
  }
}

/** Scratch for typed accesses that cross a view boundary (only with an overlap under 8 bytes: tests). */
const scratch = new DataView(new ArrayBuffer(8));
const scratchBytes = new Uint8Array(scratch.buffer);

export class GuestMemory {
  /**
   * When set, every write through this object, and every used buffer of the split queues built
   * on it, marks its pages (DirtyLog). Undefined (the default) costs one property test per write.
   */
  dirtyLog: DirtyLog | undefined;
  private readonly regions: Region[];
  /** regions[0] (the lowest; guest RAM below the PCI hole holds almost every buffer). */
  private readonly first: Region;
  private readonly step: number;
  private readonly overlap: number;

  /**
   * Regions inside one backing buffer (e.g. an ArrayBuffer in tests); each region's views are
   * windows of it. `GuestMemory.mapped` builds guest memory from host mappings instead.
   */
  constructor(backing: ArrayBuffer | SharedArrayBuffer, specs: readonly MemoryRegionSpec[], geometry?: ViewGeometry);
  /** @internal (GuestMemory.mapped) */
  constructor(backing: null, specs: readonly HostRegion[], geometry: ViewGeometry);
  constructor(backing: ArrayBuffer | SharedArrayBuffer | null, specs: readonly (MemoryRegionSpec | HostRegion)[], geometry: ViewGeometry = DEFAULT_VIEW_GEOMETRY) {
    checkGeometry(geometry);
    this.step = geometry.step;
    this.overlap = geometry.overlap;
    this.regions = [...specs]
      .sort((a, b) => a.guestPhysAddr - b.guestPhysAddr)
      .map((s) => {
        if (!Number.isSafeInteger(s.guestPhysAddr) || !Number.isSafeInteger(s.size) || s.guestPhysAddr < 0 || s.size <= 0 || !Number.isSafeInteger(s.guestPhysAddr + s.size)) {
          throw layoutError(`region at 0x${s.guestPhysAddr.toString(16)} of ${s.size} bytes is malformed`);
        }
        let view: (i: number) => View;
        let host: number;
        if (backing !== null) {
          const { hostOffset } = s as MemoryRegionSpec;
          if (!Number.isSafeInteger(hostOffset) || hostOffset < 0 || hostOffset + s.size > backing.byteLength) {
            throw layoutError(`region at 0x${s.guestPhysAddr.toString(16)} does not fit its backing`);
          }
          view = lazyViews(s.size, geometry, (off, len) => new Uint8Array(backing, hostOffset + off, len));
          host = addressOf(view(0).bytes);
        } else {
          const { hostAddress } = s as HostRegion;
          if (!Number.isSafeInteger(hostAddress) || hostAddress <= 0) throw layoutError(`region at 0x${s.guestPhysAddr.toString(16)} has no host address`);
          // Each view is koffi.view over [hostAddress + off, + len): inside the region's mapping,
          // which the caller keeps mapped for as long as this GuestMemory is used (mapped()).
          view = lazyViews(s.size, geometry, (off, len) => new Uint8Array(libc.view(libc.pointerAt(BigInt(hostAddress + off)), len)));
          host = hostAddress;
        }
        return { guestPhysAddr: s.guestPhysAddr, size: s.size, end: s.guestPhysAddr + s.size, host, viewCount: Math.ceil(s.size / geometry.step), view };
      });
    const first = this.regions[0];
    if (first === undefined) throw layoutError("guest memory has no regions");
    this.first = first;
    for (let i = 1; i < this.regions.length; i++) {
      if (this.regions[i - 1]!.end > this.regions[i]!.guestPhysAddr) throw layoutError("guest memory regions overlap");
    }
  }

  /**
   * Guest memory over host mappings, one per region (what the VMM and its device thread use).
   * The caller guarantees each [hostAddress, hostAddress + size) is mapped read-write for as long
   * as this object is used: the views read and write it directly.
   */
  static mapped(regions: readonly HostRegion[], geometry: ViewGeometry = DEFAULT_VIEW_GEOMETRY): GuestMemory {
    return new GuestMemory(null, regions, geometry);
  }

  /** Each region and where it lives in host memory (plain data: what a worker or a snapshot needs). */
  get hostRegions(): HostRegion[] {
    return this.regions.map((r) => ({ guestPhysAddr: r.guestPhysAddr, size: r.size, hostAddress: r.host }));
  }

  /** How many views cover guest RAM (tests and the docs' arithmetic). */
  get viewCount(): number {
    return this.regions.reduce((n, r) => n + r.viewCount, 0);
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
      if (gpa >= r.guestPhysAddr && gpa + len <= r.end) return r;
    }
    return undefined;
  }

  private region(gpa: number, len: number): Region {
    const r = this.find(gpa, len);
    if (r === undefined) throw new GuestMemoryError(gpa, len);
    return r;
  }

  /** Index of the view that starts at or below region offset `off` (the last one for off = size). */
  private viewIndex(r: Region, off: number): number {
    return Math.min(Math.floor(off / this.step), r.viewCount - 1);
  }

  /** The one view holding region offset [off, off+len), or undefined when the range crosses a view boundary. */
  private viewFor(r: Region, off: number, len: number): View | undefined {
    const i = this.viewIndex(r, off);
    // The view's length without making it: step + overlap, clipped to the region.
    const length = Math.min(this.step + this.overlap, r.size - i * this.step);
    return off - i * this.step + len <= length ? r.view(i) : undefined;
  }

  /**
   * The views covering [gpa, gpa+len) in address order, split only where one view ends: the
   * same bytes as one slice() would be, for callers that can take them in pieces.
   */
  slices(gpa: number, len: number): Uint8Array[] {
    const r = this.region(gpa, len);
    let off = gpa - r.guestPhysAddr;
    const end = off + len;
    const out: Uint8Array[] = [];
    do {
      const i = this.viewIndex(r, off);
      const v = r.view(i);
      const at = off - i * this.step;
      const n = Math.min(end - off, v.bytes.length - at);
      out.push(v.bytes.subarray(at, at + n));
      off += n;
    } while (off < end);
    return out;
  }

  /** A live view (no copy) of guest memory; valid while the VM's memory is mapped. Refused (GUEST_MEMORY_VIEW_SPLIT) when no one view holds it. */
  slice(gpa: number, len: number): Uint8Array {
    const r = this.region(gpa, len);
    const off = gpa - r.guestPhysAddr;
    const i = this.viewIndex(r, off);
    const v = this.viewFor(r, off, len);
    if (v === undefined) throw new GuestMemoryError(gpa, len, "GUEST_MEMORY_VIEW_SPLIT");
    const at = off - i * this.step;
    return v.bytes.subarray(at, at + len);
  }

  /** A live view of [gpa, gpa+len), or undefined when it is outside one region or crosses two views. */
  trySlice(gpa: number, len: number): Uint8Array | undefined {
    const r = this.find(gpa, len);
    if (r === undefined) return undefined;
    const off = gpa - r.guestPhysAddr;
    const v = this.viewFor(r, off, len);
    if (v === undefined) return undefined;
    const at = off - this.viewIndex(r, off) * this.step;
    return v.bytes.subarray(at, at + len);
  }

  /** A live DataView (no copy) of [gpa, gpa+len), for little-endian structures read in place; refused like slice(). */
  dataView(gpa: number, len: number): DataView {
    const s = this.slice(gpa, len);
    return new DataView(s.buffer, s.byteOffset, len);
  }

  /**
   * Host virtual address of [gpa, gpa+len), or -1 when the range is not inside one region
   * (exactly when contains() is false): for iovecs the kernel fills or reads (preadv/pwritev),
   * where a view per buffer would cost more than the I/O's bookkeeping. A region is one host
   * mapping, so this holds whatever views the range crosses. Valid while the VM's memory is
   * mapped. The descriptor walk calls this for every buffer of every request, so the common
   * case, the first region, is tested before the general search.
   */
  tryHostAddress(gpa: number, len: number): number {
    const r0 = this.first;
    if (gpa >= r0.guestPhysAddr && len >= 0 && gpa + len <= r0.end && Number.isSafeInteger(gpa) && Number.isSafeInteger(len)) {
      return r0.host + (gpa - r0.guestPhysAddr);
    }
    const r = this.find(gpa, len);
    return r === undefined ? -1 : r.host + (gpa - r.guestPhysAddr);
  }

  /** A copy of [gpa, gpa+len) (split across views as needed). */
  read(gpa: number, len: number): Uint8Array {
    const parts = this.slices(gpa, len);
    if (parts.length === 1) return parts[0]!.slice();
    const out = new Uint8Array(len);
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }

  write(gpa: number, data: Uint8Array): void {
    this.dirtyLog?.mark(gpa, data.length);
    let at = 0;
    for (const p of this.slices(gpa, data.length)) {
      p.set(data.subarray(at, at + p.length));
      at += p.length;
    }
  }

  /**
   * A writable view of guest memory from `gpa`, at most `max` bytes long and at least one (shorter
   * where [gpa, gpa+max) crosses into the next view), its pages marked as written: for a writer
   * that fills it in place (a migration stream read straight into guest memory).
   */
  writableRun(gpa: number, max: number): Uint8Array {
    const first = this.slices(gpa, max)[0]!;
    this.dirtyLog?.mark(gpa, first.length);
    return first;
  }

  fill(gpa: number, len: number, value = 0): void {
    this.dirtyLog?.mark(gpa, len);
    for (const p of this.slices(gpa, len)) p.fill(value);
  }

  /** The DataView and offset holding [gpa, gpa+len), or undefined when it crosses views (then the caller goes through scratch). */
  private at(gpa: number, len: number): { dv: DataView; off: number } | undefined {
    const r = this.region(gpa, len);
    const off = gpa - r.guestPhysAddr;
    const v = this.viewFor(r, off, len);
    return v === undefined ? undefined : { dv: v.dv, off: off - this.viewIndex(r, off) * this.step };
  }

  private toScratch(gpa: number, len: number): DataView {
    scratchBytes.set(this.read(gpa, len));
    return scratch;
  }

  private fromScratch(gpa: number, len: number): void {
    this.write(gpa, scratchBytes.subarray(0, len));
  }

  readU8(gpa: number): number {
    const a = this.at(gpa, 1);
    return a !== undefined ? a.dv.getUint8(a.off) : this.toScratch(gpa, 1).getUint8(0);
  }
  readU16(gpa: number): number {
    const a = this.at(gpa, 2);
    return a !== undefined ? a.dv.getUint16(a.off, true) : this.toScratch(gpa, 2).getUint16(0, true);
  }
  readU32(gpa: number): number {
    const a = this.at(gpa, 4);
    return a !== undefined ? a.dv.getUint32(a.off, true) : this.toScratch(gpa, 4).getUint32(0, true);
  }
  readU64(gpa: number): bigint {
    const a = this.at(gpa, 8);
    return a !== undefined ? a.dv.getBigUint64(a.off, true) : this.toScratch(gpa, 8).getBigUint64(0, true);
  }
  writeU8(gpa: number, v: number): void {
    this.dirtyLog?.mark(gpa, 1);
    const a = this.at(gpa, 1);
    if (a !== undefined) a.dv.setUint8(a.off, v);
    else {
      scratch.setUint8(0, v);
      this.fromScratch(gpa, 1);
    }
  }
  writeU16(gpa: number, v: number): void {
    this.dirtyLog?.mark(gpa, 2);
    const a = this.at(gpa, 2);
    if (a !== undefined) a.dv.setUint16(a.off, v, true);
    else {
      scratch.setUint16(0, v, true);
      this.fromScratch(gpa, 2);
    }
  }
  writeU32(gpa: number, v: number): void {
    this.dirtyLog?.mark(gpa, 4);
    const a = this.at(gpa, 4);
    if (a !== undefined) a.dv.setUint32(a.off, v, true);
    else {
      scratch.setUint32(0, v, true);
      this.fromScratch(gpa, 4);
    }
  }
  writeU64(gpa: number, v: bigint): void {
    this.dirtyLog?.mark(gpa, 8);
    const a = this.at(gpa, 8);
    if (a !== undefined) a.dv.setBigUint64(a.off, v, true);
    else {
      scratch.setBigUint64(0, v, true);
      this.fromScratch(gpa, 8);
    }
  }
}
