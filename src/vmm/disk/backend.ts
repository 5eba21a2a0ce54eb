/**
 * A disk image as virtio-blk uses it: byte-addressed reads and writes straight into and out of
 * guest memory (iovecs of host addresses), write-zeroes, discard and flush, in whatever format
 * the file is in. Every method returns 0 or a negative errno and never throws: a host failure
 * fails one request, not the VM. One backend object is used by one thread only (its tables and
 * caches are not shared); the thread that builds it from a DiskInit owns it.
 */
import type { IoVec } from "../../sys/iov.js";

export interface DiskBackend {
  readonly format: DiskFormat;
  /** Size the guest sees, in bytes. */
  readonly capacity: number;
  /**
   * Bytes [pos, pos + iov.bytes) into the iovec's memory. Reads past `capacity` are the caller's
   * bug. `iov` is the backend's to consume (a transfer advances and clears it): refill it before
   * another call.
   */
  readv(iov: IoVec, pos: number): number;
  /** Bytes [pos, pos + iov.bytes) from the iovec's memory; `iov` is consumed as by readv. */
  writev(iov: IoVec, pos: number): number;
  /** [pos, pos + len) reads as zeros afterwards; may deallocate. */
  writeZeroes(pos: number, len: number): number;
  /** The guest no longer needs [pos, pos + len): may deallocate; what it reads afterwards is unspecified (virtio 1.2 §5.2.6.2). */
  discard(pos: number, len: number): number;
  /** Everything completed before is on stable storage, data and metadata. */
  flush(): number;
  /**
   * The parts of [pos, pos + len) that may read as something other than zeros, ascending and
   * merged (a superset is allowed: a part listed may still read as zeros). What a copy of the
   * disk must send (a live migration's "disks": "copy"): the rest reads as zeros anyway.
   * @throws TypevisorError DISK_IO, or the backend's IoFailure for metadata it refuses
   */
  dataRanges(pos: number, len: number): DataRange[];
  /** Write back what is cached (no flush to storage) and drop this object; the fds stay the opener's. */
  close(): void;
}

export type DiskFormat = "raw" | "qcow2";

/** [offset, offset + length) of a disk, in bytes. */
export interface DataRange {
  offset: number;
  length: number;
}

/** Append [offset, offset + length) to `out`, merged with the last range when they touch. */
export function addRange(out: DataRange[], offset: number, length: number): void {
  if (length <= 0) return;
  const last = out[out.length - 1];
  if (last !== undefined && last.offset + last.length === offset) last.length += length;
  else out.push({ offset, length });
}

/**
 * What a thread needs to build a backend: plain data, so it crosses to a disk's I/O thread
 * (workerData). The fds are opened once by openDisk() (open.ts) and stay owned by whoever
 * opened them; a backend built from this never closes them.
 */
export interface DiskInit {
  format: DiskFormat;
  fd: number;
  /** Path as opened (for messages). */
  path: string;
  readonly: boolean;
  /** qcow2 only: the image this one's unallocated clusters read from, always read-only. */
  backing?: DiskInit;
}
