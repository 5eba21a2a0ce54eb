import koffi from "koffi";
import { IOV_MAX } from "./libc.js";

/**
 * Scatter-gather I/O on raw host addresses: one preadv/pwritev/readv/writev (readv(2)) over an iovec array
 * built in place, with no JavaScript object per buffer. A device moving a 1 MiB request of 256
 * guest pages through Node's fs.readvSync made a typed-array view per page and Node validated and
 * converted each one; here a page costs two 32-bit stores. Callers pass addresses they have
 * bounds-checked (GuestMemory.tryHostAddress): the kernel writes wherever an iovec points.
 *
 * Loaded once per thread, like libc.ts (koffi handles are per isolate).
 */
const libc = koffi.load("libc.so.6");
const preadvFn = libc.func("long preadv(int fd, void *iov, int iovcnt, int64_t offset)");
const pwritevFn = libc.func("long pwritev(int fd, void *iov, int iovcnt, int64_t offset)");
const preadv2Fn = libc.func("long preadv2(int fd, void *iov, int iovcnt, int64_t offset, int flags)");
const readvFn = libc.func("long readv(int fd, void *iov, int iovcnt)");
const writevFn = libc.func("long writev(int fd, void *iov, int iovcnt)");
// memmove(p, p, 0) returns p: the address of a typed array's bytes (koffi passes them by pointer).
const addressFn = libc.func("uintptr_t memmove(void *dst, void *src, size_t n)");
// The same two functions with a raw host address on one side (guest memory an iovec names): an
// address is passed as an integer, which the x86-64 ABI hands over exactly as a pointer.
const copyToAddressFn = libc.func("uintptr_t memmove(uintptr_t dst, void *src, size_t n)");
const copyFromAddressFn = libc.func("uintptr_t memmove(void *dst, uintptr_t src, size_t n)");
const madviseAtFn = libc.func("int madvise(uintptr_t addr, size_t len, int advice)");
const MADV_DONTNEED = 4;
const PAGE = 4096;
/** Node's Buffer pool hands out slices of 8 KiB slabs other buffers share: nothing this small is released. */
const MIN_DISCARD = 64 * 1024;
const fillAddressFn = libc.func("uintptr_t memset(uintptr_t dst, int c, size_t n)");

export { IOV_MAX };
/** preadv2 flag: fail with EAGAIN instead of waiting for the disk (data not in the page cache). */
export const RWF_NOWAIT = 0x8;
/** sizeof(struct iovec) on x86-64: void *iov_base @0, size_t iov_len @8. */
const IOVEC_SIZE = 16;
const TWO_32 = 2 ** 32;
/** Largest entry extend() builds: iov_len is 64-bit, but one entry of 1 GiB is plenty and keeps lengths in 32 bits. */
const MAX_PIECE = 2 ** 30;

/**
 * Host address of the first byte of `view`. Valid while the view's buffer lives and is not
 * detached: ArrayBuffer backing stores larger than a few dozen bytes live outside V8's moving
 * heap, and mmapped ones (koffi.view) never move.
 */
export function addressOf(view: Uint8Array): number {
  const a = addressFn(view, view, 0) as number | bigint;
  return Number(a);
}

/**
 * Give the memory under `bytes` back to the kernel now rather than whenever V8 collects the
 * buffer (madvise(2) MADV_DONTNEED): a kernel or initrd read to boot a guest would otherwise stay
 * resident in a VMM whose main thread allocates too little to ever collect it (16 MiB of a lab
 * VMM's private memory: docs/benchmarks.md "Density"). Afterwards the buffer reads as zeros.
 * Only a buffer that is its whole ArrayBuffer (never a view into a shared pool or someone else's
 * bytes) of at least MIN_DISCARD. Safe: only whole pages strictly inside the buffer's own bytes
 * are advised (its allocator's bookkeeping lies outside them), and the pages stay mapped, so the
 * buffer remains valid to read and write. Returns the bytes released.
 */
export function discardPages(bytes: Uint8Array): number {
  const ab = bytes.buffer;
  if (ab instanceof SharedArrayBuffer || bytes.byteOffset !== 0 || bytes.byteLength !== ab.byteLength || bytes.byteLength < MIN_DISCARD) return 0;
  const start = addressOf(bytes);
  const first = Math.ceil(start / PAGE) * PAGE;
  const end = Math.floor((start + bytes.byteLength) / PAGE) * PAGE;
  if (end <= first) return 0;
  // Advice, not a requirement: a kernel that refuses leaves the pages to V8 as before.
  return (madviseAtFn(first, end - first, MADV_DONTNEED) as number) === 0 ? end - first : 0;
}

/** madvise(2) MADV_POPULATE_READ (Linux 5.14, mm/madvise.c). */
const MADV_POPULATE_READ = 22;

/**
 * Fill the page tables of [address, address+length) of a mapping as reads would (madvise(2)
 * MADV_POPULATE_READ): a private file mapping gets the file's pages mapped read-only (a later
 * write still copies). Returns 0, or -errno (EINVAL: a kernel before 5.14). The caller owns the
 * range; nothing is written to it.
 */
export function populateRead(address: bigint, length: number): number {
  return (madviseAtFn(address, length, MADV_POPULATE_READ) as number) === 0 ? 0 : -koffi.errno();
}

/** A reusable iovec array of up to `capacity` (default IOV_MAX) entries. */
export class IoVec {
  /** The struct iovec array as the kernel reads it (larger than 64 bytes: off V8's heap, never moves). */
  private readonly raw: Uint8Array;
  private readonly words: Uint32Array;
  readonly capacity: number;
  /** Entries in use. */
  count = 0;
  /** Sum of their lengths. */
  bytes = 0;

  /**
   * `storage`: where the array lives, e.g. a slice of a SharedArrayBuffer another thread submits
   * from (16 bytes per entry, 4-byte aligned); by default a private buffer of IOV_MAX entries.
   */
  constructor(storage?: Uint8Array) {
    this.raw = storage ?? new Uint8Array(IOVEC_SIZE * IOV_MAX);
    if (this.raw.byteOffset % 4 !== 0 || this.raw.byteLength % IOVEC_SIZE !== 0) throw new RangeError("iovec storage must be 4-byte aligned whole entries");
    this.words = new Uint32Array(this.raw.buffer, this.raw.byteOffset, this.raw.byteLength / 4);
    this.capacity = Math.min(IOV_MAX, this.raw.byteLength / IOVEC_SIZE);
  }

  /** Take the first `count` entries another thread wrote into this storage as ours (bytes summed). */
  adopt(count: number): void {
    this.count = Math.min(count, this.capacity);
    let bytes = 0;
    for (let i = 0; i < this.count; i++) bytes += this.words[i * 4 + 2]!;
    this.bytes = bytes;
  }

  clear(): void {
    this.count = 0;
    this.bytes = 0;
  }

  /** Append [addr, addr + len); false when the array is full (`capacity` entries). */
  push(addr: number, len: number): boolean {
    if (this.count === this.capacity) return false;
    const w = this.count * 4;
    this.words[w] = addr % TWO_32;
    this.words[w + 1] = Math.floor(addr / TWO_32);
    this.words[w + 2] = len;
    this.words[w + 3] = 0;
    this.count++;
    this.bytes += len;
    return true;
  }

  /**
   * Grow the last entry by `len` when [addr, addr + len) starts where it ends (guest pages that
   * are contiguous in host memory); false when it does not, or the entry would pass 1 GiB.
   */
  extend(addr: number, len: number): boolean {
    if (this.count === 0) return false;
    const w = (this.count - 1) * 4;
    const last = this.words[w]! + this.words[w + 1]! * TWO_32;
    const lastLen = this.words[w + 2]!;
    if (last + lastLen !== addr || lastLen + len > MAX_PIECE) return false;
    this.words[w + 2] = lastLen + len;
    this.bytes += len;
    return true;
  }

  /** Drop the first `n` bytes (after a short transfer): whole entries go, a partly done one shrinks. */
  advance(n: number): void {
    let skip = 0;
    while (skip < this.count && n >= this.words[skip * 4 + 2]!) {
      n -= this.words[skip * 4 + 2]!;
      this.bytes -= this.words[skip * 4 + 2]!;
      skip++;
    }
    if (skip > 0) {
      this.words.copyWithin(0, skip * 4, this.count * 4);
      this.count -= skip;
    }
    if (n > 0 && this.count > 0) {
      const addr = this.words[0]! + this.words[1]! * TWO_32 + n;
      this.words[0] = addr % TWO_32;
      this.words[1] = Math.floor(addr / TWO_32);
      this.words[2] = this.words[2]! - n;
      this.bytes -= n;
    }
  }

  /** Host address of entry `i` (< count). */
  addressAt(i: number): number {
    return this.words[i * 4]! + this.words[i * 4 + 1]! * TWO_32;
  }

  /** Length of entry `i` (< count). */
  lengthAt(i: number): number {
    return this.words[i * 4 + 2]!;
  }

  /**
   * Append to `dst` the pieces that cover bytes [skip, skip + len) of this array (a request cut
   * at cluster boundaries). False when `dst` fills up or this array holds fewer bytes.
   */
  sliceInto(dst: IoVec, skip: number, len: number): boolean {
    for (let i = 0; i < this.count && len > 0; i++) {
      const l = this.lengthAt(i);
      if (skip >= l) {
        skip -= l;
        continue;
      }
      const n = Math.min(l - skip, len);
      const a = this.addressAt(i) + skip;
      if (!dst.extend(a, n) && !dst.push(a, n)) return false;
      len -= n;
      skip = 0;
    }
    return len === 0;
  }

  /**
   * Copy `src` into the memory the entries describe, in order, from byte `skip` of the array on
   * (as many bytes as both hold). The addresses are the caller's, bounds-checked when it built
   * the array (see the class comment); `src` is read within its own length.
   */
  copyIn(src: Uint8Array, skip = 0): void {
    this.copy(src, skip, true);
  }

  /** Copy the described memory, from byte `skip` on, into `dst` (as many bytes as both hold). */
  copyOut(dst: Uint8Array, skip = 0): void {
    this.copy(dst, skip, false);
  }

  private copy(buf: Uint8Array, skip: number, toMemory: boolean): void {
    let done = 0;
    for (let i = 0; i < this.count && done < buf.length; i++) {
      const l = this.lengthAt(i);
      if (skip >= l) {
        skip -= l;
        continue;
      }
      const n = Math.min(l - skip, buf.length - done);
      const part = buf.subarray(done, done + n);
      if (toMemory) copyToAddressFn(this.addressAt(i) + skip, part, n);
      else copyFromAddressFn(part, this.addressAt(i) + skip, n);
      done += n;
      skip = 0;
    }
  }

  /** Zero every byte the entries describe (a read of a hole or a zero cluster). */
  fillZero(): void {
    for (let i = 0; i < this.count; i++) fillAddressFn(this.addressAt(i), 0, this.lengthAt(i));
  }

  /** preadv(2) at `offset`; bytes read or -errno. */
  preadv(fd: number, offset: number): number {
    const r = preadvFn(fd, this.raw, this.count, offset) as number;
    return r < 0 ? -koffi.errno() : r;
  }

  /** preadv2(2) at `offset` with RWF_* `flags` (e.g. RWF_NOWAIT); bytes read or -errno. */
  preadv2(fd: number, offset: number, flags: number): number {
    const r = preadv2Fn(fd, this.raw, this.count, offset, flags) as number;
    return r < 0 ? -koffi.errno() : r;
  }

  /** readv(2) (a TAP: one frame per call); bytes read or -errno. */
  readv(fd: number): number {
    const r = readvFn(fd, this.raw, this.count) as number;
    return r < 0 ? -koffi.errno() : r;
  }

  /** writev(2) (a TAP: one frame per call); bytes written or -errno. */
  writev(fd: number): number {
    const r = writevFn(fd, this.raw, this.count) as number;
    return r < 0 ? -koffi.errno() : r;
  }

  /** pwritev(2) at `offset`; bytes written or -errno. */
  pwritev(fd: number, offset: number): number {
    const r = pwritevFn(fd, this.raw, this.count, offset) as number;
    return r < 0 ? -koffi.errno() : r;
  }
}
