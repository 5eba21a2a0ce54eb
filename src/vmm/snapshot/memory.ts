/**
 * Guest memory as a snapshot file, and back.
 *
 * Saving writes each RAM region at its offset in one file (regions back to back), only the
 * pages that hold something: the file is created at full size (a hole), and a page is written
 * only when it may be non-zero and is. Which pages may be non-zero comes from
 * /proc/self/pagemap (Documentation/admin-guide/mm/pagemap.rst: bit 63 present, bit 62
 * swapped): a page of private anonymous memory that is neither was never written and reads as
 * zero, so a 2 GiB guest that uses 200 MiB costs a scan of 200 MiB. Memory that was itself
 * restored from a file is a private file mapping: a page it has not touched is the old file's
 * page, so where the old file has data (SEEK_DATA) that page is read too.
 *
 * Restoring maps the file MAP_PRIVATE over each region's reserved range: nothing is read until
 * the guest touches it, so restore time does not grow with guest memory, and VMMs restoring the
 * same snapshot share its pages through the page cache until each writes its own copy.
 *
 * An incremental snapshot (docs/snapshots.md "Incremental snapshots") holds only the pages written
 * since its base: its file has them at their usual offsets and its layout lists them as runs of
 * pages per region. Holes cannot say "unchanged" by themselves: a file system reports data and
 * holes in its own block size (SEEK_DATA on a 128 KiB record finds zeros around a written page),
 * so the runs, in the checksummed state file, are what counts. Restoring maps the base's file,
 * then each incremental layer's runs over it, in order.
 */
import { closeSync, fstatSync, openSync, readSync } from "node:fs";
import { TypevisorError } from "../../errors.js";
import * as libc from "../../sys/libc.js";
import { populateRead } from "../../sys/iov.js";
import type { HostRegion } from "../memory/guest-memory.js";
import type { MemoryLayout } from "./state.js";

const PAGE = 4096;
/** Pages scanned per pagemap read (and largest write): 64 MiB of guest memory. */
const CHUNK_PAGES = 16384;
/**
 * Bits 63 (present) and 62 (swapped) of a pagemap entry, tested in its high 32-bit half (entries
 * are little-endian u64): no BigInt per page, which cost more than the rest of the scan.
 */
const PRESENT_OR_SWAPPED_HI = 0xc000_0000;
/** 32-bit words of a page looked at in JavaScript before comparing the whole page. */
const QUICK_WORDS = 16;

/** One memory file a region is (partly) a private mapping of: the region starts at `offset` of `fd`. */
export interface SourceLayer {
  fd: number;
  offset: number;
  /** An incremental layer: the pages it holds, as [first page, count] runs of the region; absent: every data range of the file. */
  runs?: readonly (readonly [number, number])[];
}

/** Where a region's pages came from when it was restored: its memory files, base first. */
export interface RegionSource {
  layers: readonly SourceLayer[];
}

/**
 * More mappings than this for one restore and the rest of an incremental layer's runs are read
 * into guest memory instead (private copies): each run is a VMA, and a process has at most
 * vm.max_map_count (65530 by default) of them.
 */
export const MAX_LAYER_MAPPINGS = 16_384;

export interface MemoryWriteResult {
  layout: MemoryLayout;
  /** Bytes of pages written (the file's allocated size, give or take the file system's blocks). */
  dataBytes: number;
}

/**
 * Write guest memory to `path` (which must not exist). `sources[i]` names the file region i is a
 * private mapping of, when it was restored. Synchronous: the vCPUs are paused meanwhile and
 * nothing else may write guest memory (the device thread is quiesced).
 */
export function writeMemoryFile(path: string, regions: readonly HostRegion[], sources: readonly (RegionSource | undefined)[], existing?: ExistingViews): MemoryWriteResult {
  const fd = openSync(path, "wx", 0o600);
  let dataBytes = 0;
  const layout: MemoryLayout = { file: "memory", bytes: 0, regions: [] };
  const pagemap = openSync("/proc/self/pagemap", "r");
  try {
    let offset = 0;
    for (const [i, r] of regions.entries()) {
      layout.regions.push({ guestPhysAddr: r.guestPhysAddr, size: r.size, fileOffset: offset });
      dataBytes += writeRegion(fd, pagemap, r, offset, sources[i], existing);
      offset += r.size;
    }
    layout.bytes = offset;
    check(libc.ftruncate(fd, offset), `sizing ${path}`);
    check(libc.fdatasync(fd), `syncing ${path}`);
  } finally {
    closeSync(pagemap);
    closeSync(fd);
  }
  return { layout, dataBytes };
}

function check(r: number, what: string): void {
  if (r < 0) throw new TypevisorError(r === -libc.ENOSPC || r === -libc.EDQUOT ? "DISK_FULL" : "SNAPSHOT_WRITE", `${what}: ${libc.errnoName(-r)}`);
}

const ZERO = new Uint8Array(PAGE);

function writeRegion(fd: number, pagemap: number, r: HostRegion, fileOffset: number, source: RegionSource | undefined, existing: ExistingViews | undefined): number {
  let written = 0;
  forEachDataRun(pagemap, r, source, (offset, bytes) => {
    check(libc.pwriteFull(fd, bytes, fileOffset + offset), "writing guest memory");
    written += bytes.length;
  }, existing);
  return written;
}

/**
 * Views of guest memory that exist already, by guest-physical address (GuestMemory.trySlice), or
 * undefined. A new view of native memory (libc.view) counts as external memory to V8, and every
 * 64 MiB or so of it starts a full collection that reduces memory, throwing away compiled code
 * with it: a migration's rounds, which viewed all of RAM each time, kept making the source's and
 * the checkers' code cold again.
 */
export type ExistingViews = (gpa: number, len: number) => Uint8Array | undefined;

/**
 * Call `run(offset, bytes)` for every run of non-zero pages of region `r` (offset from the
 * region's start; `bytes` a view of guest memory, valid during the call), skipping what
 * pagemap shows was never touched (and, for a private file mapping, what its file has no data
 * for). `pagemap` is an open /proc/self/pagemap.
 */
export function forEachDataRun(pagemap: number, r: HostRegion, source: RegionSource | undefined, run: (offset: number, bytes: Uint8Array) => void, existing?: ExistingViews): void {
  const entries = new Uint32Array(CHUNK_PAGES * 2);
  const entryBytes = new Uint8Array(entries.buffer);
  const pages = r.size / PAGE;
  for (let first = 0; first < pages; first += CHUNK_PAGES) {
    const n = Math.min(CHUNK_PAGES, pages - first);
    const chunkAddr = BigInt(r.hostAddress) + BigInt(first * PAGE);
    // Safe: a view of n pages inside the region's own mapping, which stays mapped for this call.
    const mem = existing?.(r.guestPhysAddr + first * PAGE, n * PAGE) ?? new Uint8Array(libc.view(libc.pointerAt(chunkAddr), n * PAGE));
    const words = new Int32Array(mem.buffer, mem.byteOffset, mem.length / 4);
    const got = readSync(pagemap, entryBytes, 0, n * 8, Number(chunkAddr / BigInt(PAGE)) * 8);
    if (got !== n * 8) throw new TypevisorError("SNAPSHOT_WRITE", `reading /proc/self/pagemap: ${got} of ${n * 8} bytes`);
    const fromFile = source === undefined ? undefined : layerPages(source, first, n);
    let runStart = -1;
    const flush = (end: number): void => {
      if (runStart < 0) return;
      run((first + runStart) * PAGE, mem.subarray(runStart * PAGE, end * PAGE));
      runStart = -1;
    };
    for (let p = 0; p < n; p++) {
      const maybe = (entries[2 * p + 1]! & PRESENT_OR_SWAPPED_HI) !== 0 || (fromFile !== undefined && fromFile[p] === 1);
      let nonZero = false;
      if (maybe) {
        // A page of data nearly always has a non-zero word among its first few, which settles
        // it without a subarray and a compare of the whole page.
        for (let k = p * (PAGE / 4), end = k + QUICK_WORDS; k < end; k++) {
          if (words[k] !== 0) {
            nonZero = true;
            break;
          }
        }
        if (!nonZero) nonZero = Buffer.compare(mem.subarray(p * PAGE, (p + 1) * PAGE), ZERO) !== 0;
      }
      if (nonZero) {
        if (runStart < 0) runStart = p;
      } else flush(p);
    }
    flush(n);
  }
}

/** Whether the page at `off` of `mem` is all zeros (a native compare with a zero page). */
export function isZeroPage(mem: Uint8Array, off: number): boolean {
  return Buffer.compare(mem.subarray(off, off + PAGE), ZERO) === 0;
}

/** The data ranges (not holes) of `fd` within [off, off+len), relative to `off`. */
function dataRanges(fd: number, off: number, len: number): [number, number][] {
  const out: [number, number][] = [];
  let pos = off;
  const end = off + len;
  while (pos < end) {
    const data = libc.lseek(fd, pos, libc.SEEK_DATA);
    if (data < 0 || data >= end) break; // -ENXIO: no data after pos
    const hole = libc.lseek(fd, data, libc.SEEK_HOLE);
    const stop = hole < 0 ? end : Math.min(hole, end);
    out.push([data - off, stop - off]);
    pos = stop;
  }
  return out;
}

/** Which of the region's pages [first, first+n) some layer of `source` holds (1) or leaves to the one below (0). */
function layerPages(source: RegionSource, first: number, n: number): Uint8Array {
  const mask = new Uint8Array(n);
  for (const l of source.layers) {
    if (l.runs === undefined) {
      for (const [a, b] of dataRanges(l.fd, l.offset + first * PAGE, n * PAGE)) mask.fill(1, Math.floor(a / PAGE), Math.ceil(b / PAGE));
      continue;
    }
    for (const [start, count] of l.runs) {
      const a = Math.max(start, first);
      const b = Math.min(start + count, first + n);
      if (a < b) mask.fill(1, a - first, b - first);
    }
  }
  return mask;
}

/**
 * Map `layout`'s regions of the memory file `fd` MAP_PRIVATE over `reserved` (mappings the
 * caller made for each region, of the same sizes). The file must be exactly layout.bytes long:
 * a shorter one would fault (SIGBUS) when the guest reaches past its end.
 */
export function mapMemoryFile(fd: number, layout: MemoryLayout, reserved: readonly libc.Mapping[], what: string): void {
  const size = fstatSync(fd).size;
  if (size !== layout.bytes) {
    throw new TypevisorError("SNAPSHOT_INVALID", `${what}: the memory file is ${size} bytes, the snapshot says ${layout.bytes} (truncated or not this snapshot's)`);
  }
  layout.regions.forEach((r, i) => {
    const m = reserved[i];
    if (m === undefined || m.length !== r.size) throw new TypevisorError("SNAPSHOT_INVALID", `${what}: memory region ${i} does not match this VM's layout`);
    // Safe: replaces exactly the range of the anonymous mapping made for this region (same
    // address and length), still owned by the caller; the file is kept open by the caller.
    libc.mmapFixed(m.address, r.size, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_NORESERVE, fd, r.fileOffset);
  });
}

/** Bytes of a dirty bitmap (one bit per 4 KiB page, as KVM_GET_DIRTY_LOG gives) that one region of `size` needs. */
export const bitmapBytes = (size: number): number => Math.ceil(size / PAGE / 64) * 8;

/** The runs of set bits of `bitmap` (pages of a region of `pages` pages), as [first page, count]. */
export function bitmapRuns(bitmap: Uint8Array, pages: number): [number, number][] {
  const runs: [number, number][] = [];
  let start = -1;
  for (let p = 0; p < pages; p++) {
    const set = (bitmap[p >> 3]! & (1 << (p & 7))) !== 0;
    if (set && start < 0) start = p;
    else if (!set && start >= 0) {
      runs.push([start, p - start]);
      start = -1;
    }
  }
  if (start >= 0) runs.push([start, pages - start]);
  return runs;
}

/**
 * Write the pages `dirty` marks (one bitmap per region, KVM's layout) to `path` (which must not
 * exist) at their offsets, zero or not: an incremental snapshot's memory file. The layout's
 * regions carry the runs written. Synchronous, with the VM paused, as writeMemoryFile.
 */
export function writeDirtyMemoryFile(path: string, regions: readonly HostRegion[], dirty: readonly Uint8Array[]): MemoryWriteResult {
  const fd = openSync(path, "wx", 0o600);
  let dataBytes = 0;
  const layout: MemoryLayout = { file: "memory", bytes: 0, regions: [] };
  try {
    let offset = 0;
    for (const [i, r] of regions.entries()) {
      const bitmap = dirty[i];
      if (bitmap === undefined || bitmap.length < bitmapBytes(r.size)) throw new TypevisorError("SNAPSHOT_WRITE", `no dirty bitmap for memory region ${i}`);
      const runs = bitmapRuns(bitmap, r.size / PAGE);
      for (const [start, count] of runs) {
        for (let done = 0; done < count; done += CHUNK_PAGES) {
          const n = Math.min(CHUNK_PAGES, count - done);
          // Safe: n pages inside region r's own mapping (the run lies within the region: bitmapRuns stops at its last page), mapped for this call.
          const bytes = new Uint8Array(libc.view(libc.pointerAt(BigInt(r.hostAddress) + BigInt((start + done) * PAGE)), n * PAGE));
          check(libc.pwriteFull(fd, bytes, offset + (start + done) * PAGE), "writing guest memory");
          dataBytes += n * PAGE;
        }
      }
      layout.regions.push({ guestPhysAddr: r.guestPhysAddr, size: r.size, fileOffset: offset, runs });
      offset += r.size;
    }
    layout.bytes = offset;
    check(libc.ftruncate(fd, offset), `sizing ${path}`);
    check(libc.fdatasync(fd), `syncing ${path}`);
  } finally {
    closeSync(fd);
  }
  return { layout, dataBytes };
}

/** One memory file of a restore: the base (`layout` without runs) or an incremental layer. */
export interface MemoryLayer {
  fd: number;
  layout: MemoryLayout;
  what: string;
}

/**
 * Map a snapshot's memory over `reserved`: the base layer's file whole (mapMemoryFile), then each
 * incremental layer's runs over it, in order, so the newest copy of every page is what the guest
 * sees. Past MAX_LAYER_MAPPINGS runs, the rest are read in instead (see there).
 */
export function mapMemoryLayers(layers: readonly MemoryLayer[], reserved: readonly libc.Mapping[]): void {
  const [base, ...incremental] = layers;
  if (base === undefined) throw new TypevisorError("SNAPSHOT_INVALID", "no memory file to restore from");
  mapMemoryFile(base.fd, base.layout, reserved, base.what);
  let mappings = 0;
  for (const l of incremental) {
    const size = fstatSync(l.fd).size;
    if (size !== l.layout.bytes) throw new TypevisorError("SNAPSHOT_INVALID", `${l.what}: the memory file is ${size} bytes, the snapshot says ${l.layout.bytes} (truncated or not this snapshot's)`);
    l.layout.regions.forEach((r, i) => {
      const m = reserved[i];
      if (m === undefined || m.length !== r.size) throw new TypevisorError("SNAPSHOT_INVALID", `${l.what}: memory region ${i} does not match this VM's layout`);
      for (const [start, count] of r.runs ?? []) {
        const at = start * PAGE;
        const len = count * PAGE;
        if (++mappings <= MAX_LAYER_MAPPINGS) {
          // Safe: [at, at+len) lies inside this region's mapping (the state's schema checked
          // every run against the region's size), which the caller owns; the file stays open.
          libc.mmapFixed(m.address + BigInt(at), len, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_NORESERVE, l.fd, r.fileOffset + at);
        } else {
          // Safe: the same bounds; writing makes private copies of these pages of the mapping.
          const dst = new Uint8Array(libc.view(libc.pointerAt(m.address + BigInt(at)), len));
          const got = libc.preadFull(l.fd, dst, r.fileOffset + at);
          if (got < 0) throw new TypevisorError("SNAPSHOT_INVALID", `${l.what}: reading memory: ${libc.errnoName(-got)}`);
        }
      }
    });
  }
}

/**
 * Fill the host page tables of every range of `reserved` (mapped by mapMemoryLayers) that some
 * layer holds data for, so the guest's first touch of such a page costs KVM's stage-2 fault only,
 * not a host page fault inside it (lab, 2026-12-06: 0.2 of the 0.27 s a restored 256 MiB guest
 * took to answer its first line was spent that way). Holes are left alone: populating them
 * would give the file pages for them. For a VM built ahead of its restore (a standby's template),
 * where the time is not the guest's. Returns false when the kernel cannot (before Linux 5.14).
 */
export function populateMemoryLayers(layers: readonly MemoryLayer[], reserved: readonly libc.Mapping[]): boolean {
  for (const l of layers) {
    for (const [i, r] of l.layout.regions.entries()) {
      const m = reserved[i];
      if (m === undefined) continue;
      const ranges = r.runs !== undefined ? r.runs.map(([start, count]): [number, number] => [start * PAGE, (start + count) * PAGE]) : dataRanges(l.fd, r.fileOffset, r.size);
      for (const [a, b] of ranges) {
        // Safe: [a, b) lies inside this region (dataRanges stops at its end; runs were checked
        // against its size by the state's schema), whose mapping the caller owns.
        const e = populateRead(m.address + BigInt(a), Math.min(b, r.size) - a);
        if (e === -libc.EINVAL) return false;
        if (e < 0) throw new TypevisorError("SNAPSHOT_INVALID", `${l.what}: reading memory ahead: ${libc.errnoName(-e)}`);
      }
    }
  }
  return true;
}
