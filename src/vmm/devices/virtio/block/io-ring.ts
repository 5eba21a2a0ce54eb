import { IoVec } from "../../../../sys/iov.js";

/**
 * The shared memory between a disk's device thread side (io-thread.ts) and its I/O thread
 * (io-worker.ts): a FIFO of SLOTS request slots in one SharedArrayBuffer, indexed by two
 * running counters. The submitter fills a slot (operation, position, iovecs of host addresses
 * into guest memory) and then bumps SUBMITTED; the I/O thread does the requests in order,
 * stores each result and bumps COMPLETED. The counters are Atomics (sequentially consistent),
 * so the plain slot stores before a bump are visible to whoever reads the bumped value.
 */
export const SLOTS = 32; // requests in flight per disk: a power of 2
export const SLOT_IOV = 256; // iovec entries per slot: seg_max (queue size - 2) pieces fit at 256
const CTL_BYTES = 32;
const META_FIELDS = 8; // float64s per slot: one cache line
const IOVEC_BYTES = 16;

/**
 * Control words (Int32). TID: the I/O thread's kernel thread id, stored when it starts (liveness).
 * CLOSED: set once the thread has closed its disk backend after STOP (a qcow2 image writes its
 * cached metadata back then), so the owner knows it may end the thread. ACTIVE: 1 while a thread
 * serves this ring (started, not yet ended); a disk's ring outlives its threads, which are started
 * when the disk needs one and ended when it has idled (io-thread.ts). OPEN: the device thread's
 * go-ahead to build the backend (it may hold the image itself until then: qcow2's tables are one
 * thread's only).
 */
export const CTL = { SUBMITTED: 0, COMPLETED: 1, STOP: 2, TID: 3, CLOSED: 4, ACTIVE: 5, OPEN: 6 } as const;
/** Slot fields (Float64). */
export const META = { OP: 0, POS: 1, LEN: 2, IOVCNT: 3, SYNC: 4, RESULT: 5 } as const;
/**
 * Operations. REOPEN: drop the backend (writing back what it caches) and build it again from the
 * file, so it reads metadata another process wrote (an incoming live migration on shared storage).
 */
export const IO_OP = { READ: 1, WRITE: 2, FLUSH: 3, WRITE_ZEROES: 4, DISCARD: 5, REOPEN: 6 } as const;

export interface IoRing {
  readonly sab: SharedArrayBuffer;
  readonly ctl: Int32Array;
  readonly meta: Float64Array;
  /** Each slot's iovec array, over the shared memory. */
  readonly iovs: IoVec[];
}

export function ioRing(sab = new SharedArrayBuffer(CTL_BYTES + SLOTS * META_FIELDS * 8 + SLOTS * SLOT_IOV * IOVEC_BYTES)): IoRing {
  const iovBase = CTL_BYTES + SLOTS * META_FIELDS * 8;
  const iovs: IoVec[] = [];
  for (let s = 0; s < SLOTS; s++) iovs.push(new IoVec(new Uint8Array(sab, iovBase + s * SLOT_IOV * IOVEC_BYTES, SLOT_IOV * IOVEC_BYTES)));
  return { sab, ctl: new Int32Array(sab, 0, CTL_BYTES / 4), meta: new Float64Array(sab, CTL_BYTES, SLOTS * META_FIELDS), iovs };
}

/** Index of `field` of slot `slot` in IoRing.meta. */
export const metaAt = (slot: number, field: number): number => slot * META_FIELDS + field;

const OP_NAMES: Record<number, string> = { [IO_OP.READ]: "read", [IO_OP.WRITE]: "write", [IO_OP.FLUSH]: "flush", [IO_OP.WRITE_ZEROES]: "write-zeroes", [IO_OP.DISCARD]: "discard", [IO_OP.REOPEN]: "reopen" };

/** What a ring shows of its I/O thread, read from any thread without asking either side (GET /threads). */
export interface IoRingStatus {
  /** The I/O thread's kernel thread id; 0 until it has started. */
  tid: number;
  /** Requests handed to the thread, and done by it, since it started (running counters, mod 2^32). */
  submitted: number;
  completed: number;
  /** The request the thread works on now (the oldest not completed), or null when it is idle. */
  current: { op: string; pos: number; len: number } | null;
  stopping: boolean;
  /** Whether a thread serves the ring now (false: the disk's I/O thread has not started yet, or ended after idling). */
  active: boolean;
}

export function ioRingStatus(ring: IoRing): IoRingStatus {
  const submitted = Atomics.load(ring.ctl, CTL.SUBMITTED);
  const completed = Atomics.load(ring.ctl, CTL.COMPLETED);
  let current: IoRingStatus["current"] = null;
  if (submitted !== completed) {
    const slot = completed & (SLOTS - 1);
    const op = ring.meta[metaAt(slot, META.OP)]!;
    current = { op: OP_NAMES[op] ?? `op ${op}`, pos: ring.meta[metaAt(slot, META.POS)]!, len: ring.meta[metaAt(slot, META.LEN)]! };
  }
  return { tid: Atomics.load(ring.ctl, CTL.TID), submitted, completed, current, stopping: Atomics.load(ring.ctl, CTL.STOP) !== 0, active: Atomics.load(ring.ctl, CTL.ACTIVE) !== 0 };
}
