import * as fs from "node:fs";
import { addressOf, type IoVec } from "../../../../sys/iov.js";
import { EINTR, EIO } from "../../../../sys/libc.js";

/**
 * The disk file operations virtio-blk needs, written once for both places they run: the device
 * thread (requests the I/O thread cannot take) and the disk's I/O thread (io-worker.ts). Each
 * returns 0 or a negative errno and never throws: a host I/O failure fails one request.
 */

/**
 * Move every byte `iov` describes to or from `fd` at byte `pos`, resuming after short transfers
 * (regular files stop short only at end of file or on a signal). An end of file the request
 * did not expect is EIO. Leaves `iov` empty.
 */
export function transferAll(fd: number, iov: IoVec, write: boolean, pos: number): number {
  while (iov.bytes > 0) {
    const n = write ? iov.pwritev(fd, pos) : iov.preadv(fd, pos);
    if (n === -EINTR) continue;
    if (n < 0 || n === 0) {
      iov.clear();
      return n < 0 ? n : -EIO;
    }
    pos += n;
    iov.advance(n);
  }
  iov.clear();
  return 0;
}

const ZERO_CHUNK = new Uint8Array(64 * 1024);
const ZERO_CHUNK_ADDRESS = addressOf(ZERO_CHUNK);

/** Write `len` zero bytes at `pos` (WRITE_ZEROES), 64 KiB per call, through `iov` (left empty). */
export function writeZeroes(fd: number, iov: IoVec, pos: number, len: number): number {
  while (len > 0) {
    const n = Math.min(len, ZERO_CHUNK.length);
    iov.clear();
    iov.push(ZERO_CHUNK_ADDRESS, n);
    const r = transferAll(fd, iov, true, pos);
    if (r < 0) return r;
    pos += n;
    len -= n;
  }
  return 0;
}

/** fdatasync(2): the written data (and the size) on stable storage. */
export function syncData(fd: number): number {
  try {
    fs.fdatasyncSync(fd);
    return 0;
  } catch (e) {
    const errno = (e as NodeJS.ErrnoException).errno;
    return typeof errno === "number" && errno < 0 ? errno : -EIO;
  }
}
