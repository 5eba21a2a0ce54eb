import type { IoVec } from "../../../../sys/iov.js";
import type { GuestMemory } from "../../../memory/guest-memory.js";
import type { GuestBuf } from "./split-queue.js";

/** What these helpers use of a buffer: where it is in guest memory. */
type GuestRange = Pick<GuestBuf, "addr" | "len">;

/*
 * Helpers for devices over the buffers of a popped chain. The buffers were bounds-checked when
 * the chain was popped, so the views below are in guest RAM; they are live (mem.slices), so
 * file and crypto calls read and write guest memory with no copy. A buffer lies in one RAM
 * region but may cross a boundary between two of the region's host views (guest-memory.ts):
 * it is then taken as two views, which every helper here accepts.
 */

/** Total bytes of `bufs`. */
export function bufsLength(bufs: readonly GuestRange[]): number {
  let n = 0;
  for (const b of bufs) n += b.len;
  return n;
}

/**
 * Live views covering bytes [offset, offset + len) of the concatenation of `bufs`, clipped to
 * what the buffers hold (a buffer crossing two host views gives two).
 */
export function chainSlices(mem: GuestMemory, bufs: readonly GuestRange[], offset: number, len: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  let skip = Math.max(0, offset);
  let left = Math.max(0, len);
  for (const b of bufs) {
    if (left === 0) break;
    if (skip >= b.len) {
      skip -= b.len;
      continue;
    }
    const n = Math.min(b.len - skip, left);
    for (const v of mem.slices(b.addr + skip, n)) out.push(v);
    left -= n;
    skip = 0;
  }
  return out;
}

/** Copy up to `maxLen` bytes of the buffers, starting at `offset`, into a new Buffer. */
export function readChain(mem: GuestMemory, bufs: readonly GuestRange[], offset: number, maxLen: number): Buffer {
  const views = chainSlices(mem, bufs, offset, maxLen);
  return Buffer.concat(views);
}

/**
 * The first `len` bytes of the buffers (fewer if they hold fewer): a view of guest memory, no
 * copy, when the first buffer holds them all (drivers put a header there), else gathered into a
 * new Buffer. A view reads what the guest has there now: copy it before validating what you pass on.
 */
export function chainHead(mem: GuestMemory, bufs: readonly GuestRange[], len: number): Uint8Array {
  const first = bufs[0];
  const view = first !== undefined && first.len >= len ? mem.trySlice(first.addr, len) : undefined;
  return view ?? readChain(mem, bufs, 0, len);
}

/** Copy `data` into the buffers starting at `offset`; returns the bytes written (clipped to the buffers). */
export function writeChain(mem: GuestMemory, bufs: readonly GuestRange[], data: Uint8Array, offset = 0): number {
  let done = 0;
  for (const v of chainSlices(mem, bufs, offset, data.length)) {
    v.set(data.subarray(done, done + v.length));
    done += v.length;
  }
  return done;
}

/**
 * Append bytes [offset, offset + len) of `bufs` to `iov` as host addresses (from the walk that
 * bounds-checked each buffer whole), merging pieces adjacent in host memory. When `iov` is full,
 * `full()` runs: it empties it (does the I/O gathered so far) and returns true to go on, or is
 * absent and the gathering stops. Returns whether every byte was appended.
 */
export function gatherHost(iov: IoVec, bufs: readonly GuestBuf[], offset: number, len: number, full?: () => boolean): boolean {
  let skip = Math.max(0, offset);
  let left = Math.max(0, len);
  for (const b of bufs) {
    if (left === 0) break;
    if (skip >= b.len) {
      skip -= b.len;
      continue;
    }
    const n = Math.min(b.len - skip, left);
    const host = b.host + skip;
    if (!iov.extend(host, n) && !iov.push(host, n)) {
      if (full === undefined || !full()) return false;
      iov.push(host, n);
    }
    left -= n;
    skip = 0;
  }
  return true;
}
