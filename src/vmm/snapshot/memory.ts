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
 */
import { closeSync, fstatSync, openSync, readSync } from "node:fs";
import { TypevisorError } from "../../errors.js";
import * as libc from "../../sys/libc.js";
import type { HostRegion } from "../memory/guest-memory.js";
import type { MemoryLayout } from "./state.js";

const PAGE = 4096;
/** Pages scanned per pagemap read (and largest write): 64 MiB of guest memory. */
const CHUNK_PAGES = 16384;
const PRESENT = 1n << 63n;
const SWAPPED = 1n << 62n;

/** Where a region's pages came from when it is a private mapping of an older memory file. */
export interface RegionSource {
  fd: number;
  offset: number;
}

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
export function writeMemoryFile(path: string, regions: readonly HostRegion[], sources: readonly (RegionSource | undefined)[]): MemoryWriteResult {
  const fd = openSync(path, "wx", 0o600);
  let dataBytes = 0;
  const layout: MemoryLayout = { file: "memory", bytes: 0, regions: [] };
  const pagemap = openSync("/proc/self/pagemap", "r");
  try {
    let offset = 0;
    for (const [i, r] of regions.entries()) {
      layout.regions.push({ guestPhysAddr: r.guestPhysAddr, size: r.size, fileOffset: offset });
      dataBytes += writeRegion(fd, pagemap, r, offset, sources[i]);
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

function writeRegion(fd: number, pagemap: number, r: HostRegion, fileOffset: number, source: RegionSource | undefined): number {
  let written = 0;
  forEachDataRun(pagemap, r, source, (offset, bytes) => {
    check(libc.pwriteFull(fd, bytes, fileOffset + offset), "writing guest memory");
    written += bytes.length;
  });
  return written;
}

/**
 * Call `run(offset, bytes)` for every run of non-zero pages of region `r` (offset from the
 * region's start; `bytes` a view of guest memory, valid during the call), skipping what
 * pagemap shows was never touched (and, for a private file mapping, what its file has no data
 * for). `pagemap` is an open /proc/self/pagemap.
 */
export function forEachDataRun(pagemap: number, r: HostRegion, source: RegionSource | undefined, run: (offset: number, bytes: Uint8Array) => void): void {
  const entries = new BigUint64Array(CHUNK_PAGES);
  const entryBytes = new Uint8Array(entries.buffer);
  const pages = r.size / PAGE;
  for (let first = 0; first < pages; first += CHUNK_PAGES) {
    const n = Math.min(CHUNK_PAGES, pages - first);
    const chunkAddr = BigInt(r.hostAddress) + BigInt(first * PAGE);
    // Safe: a view of n pages inside the region's own mapping, which stays mapped for this call.
    const mem = new Uint8Array(libc.view(libc.pointerAt(chunkAddr), n * PAGE));
    const got = readSync(pagemap, entryBytes, 0, n * 8, Number(chunkAddr / BigInt(PAGE)) * 8);
    if (got !== n * 8) throw new TypevisorError("SNAPSHOT_WRITE", `reading /proc/self/pagemap: ${got} of ${n * 8} bytes`);
    const fromFile = source === undefined ? undefined : dataRanges(source.fd, source.offset + first * PAGE, n * PAGE);
    let runStart = -1;
    const flush = (end: number): void => {
      if (runStart < 0) return;
      run((first + runStart) * PAGE, mem.subarray(runStart * PAGE, end * PAGE));
      runStart = -1;
    };
    for (let p = 0; p < n; p++) {
      const e = entries[p]!;
      const maybe = (e & (PRESENT | SWAPPED)) !== 0n || (fromFile !== undefined && inRanges(fromFile, p * PAGE));
      const nonZero = maybe && !isZeroPage(mem, p * PAGE);
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

function inRanges(ranges: readonly [number, number][], at: number): boolean {
  for (const [a, b] of ranges) if (at >= a && at < b) return true;
  return false;
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
