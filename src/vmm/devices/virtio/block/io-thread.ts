import { readFileSync } from "node:fs";
import type { Worker } from "node:worker_threads";
import type { IoVec } from "../../../../sys/iov.js";
import * as libc from "../../../../sys/libc.js";
import { spawnWorker } from "../../../threads/spawn.js";
import { CTL, META, metaAt, SLOTS, ioRing, type IoRing } from "./io-ring.js";
import type { DiskInit } from "../../../disk/backend.js";
import type { IoWorkerInit } from "./io-worker.js";

/** How long drain() waits for a completion before it asks whether the thread is still there. */
const LIVENESS_MS = 1000;
/** How long a thread that has not yet stored its tid counts as starting. */
const START_GRACE_MS = 30_000;
/** How long close() lets the thread write back its backend's cache (a qcow2 image's tables: a few syncs). */
const CLOSE_MS = 30_000;

/**
 * The device thread's handle on a disk's I/O thread (io-worker.ts): submit requests into free
 * slots, reap completions when `eventfd` is readable (the device thread polls it with the
 * queue kicks), drain before a reset or a snapshot. Up to SLOTS requests are in flight; the
 * device leaves further ones in the available ring until a slot frees (back-pressure).
 *
 * One disk may have several of these in turn, one at a time, on the same ring: the device starts
 * one when a request needs it and ends it after it has idled (block.ts, ioThreadStart). A new one
 * waits until open() before it builds its backend, since until then the device may still serve
 * the image itself.
 *
 * The device thread never returns to its event loop, so it would not hear of the worker's end
 * ("exit" event): whether the thread is still there is asked of the kernel instead
 * (/proc/self/task/TID, proc(5)), by the device about once a second while requests are in
 * flight, and by drain() whenever a wait times out. A thread that is gone has its requests
 * answered with EIO (abandon) and is not used again.
 */
export class BlockIoThread {
  /** Readable when requests completed (one count per completion). */
  readonly eventfd: number;
  private readonly ring: IoRing;
  private readonly worker: Worker;
  private submitted = 0;
  private reaped = 0;
  private closed = false;
  /** close() saw the thread close its backend, or end (see close()). */
  private closedCleanly = true;
  /** Set by abandon(): the thread is gone and its in-flight requests were answered. */
  private gone_ = false;
  private readonly startedAt = performance.now();

  /**
   * `disk`: the image and its chain, open; owned by the caller and open until after close().
   * `ring`: the disk's ring, which may have served an earlier thread of the same disk (its
   * counters run on, so whoever reads it sees one history). The thread builds its backend only
   * after open(): until then the caller may still serve the image itself.
   */
  constructor(disk: DiskInit, private readonly name: string, ring: IoRing = ioRing()) {
    this.ring = ring;
    const { ctl } = ring;
    const done = Atomics.load(ctl, CTL.COMPLETED);
    Atomics.store(ctl, CTL.SUBMITTED, done);
    this.submitted = done;
    this.reaped = done;
    for (const w of [CTL.STOP, CTL.CLOSED, CTL.TID, CTL.OPEN]) Atomics.store(ctl, w, 0);
    Atomics.store(ctl, CTL.ACTIVE, 1);
    this.eventfd = libc.eventfd();
    const init: IoWorkerInit = { sab: this.ring.sab, disk, eventfd: this.eventfd, name };
    // The thread waits in Atomics.wait, never in its event loop: unref'd, it keeps no process alive.
    try {
      this.worker = spawnWorker("devices/virtio/block/io-worker.js", init);
    } catch (e) {
      libc.close(this.eventfd);
      Atomics.store(ctl, CTL.ACTIVE, 0);
      throw e;
    }
    this.worker.unref();
  }

  /** Whether the thread is up (it has stored its tid, and signalled the eventfd once to say so). */
  get started(): boolean {
    return Atomics.load(this.ring.ctl, CTL.TID) !== 0;
  }

  /** Let the thread build its backend: the caller no longer acts on the image (see the constructor). */
  open(): void {
    Atomics.store(this.ring.ctl, CTL.OPEN, 1);
    Atomics.notify(this.ring.ctl, CTL.OPEN);
  }

  /** Requests submitted and not yet reaped. */
  get inFlight(): number {
    return (this.submitted - this.reaped) | 0;
  }

  get full(): boolean {
    return this.inFlight >= SLOTS;
  }

  /** The next free slot's iovec array, empty, for the caller to fill before submit(). Only when !full. */
  nextIov(): IoVec {
    const iov = this.ring.iovs[this.submitted & (SLOTS - 1)]!;
    iov.clear();
    return iov;
  }

  /** Hand the slot nextIov() returned to the I/O thread; returns its slot number (for reap). */
  submit(op: number, pos: number, len: number, sync: boolean): number {
    const slot = this.submitted & (SLOTS - 1);
    const m = this.ring.meta;
    m[metaAt(slot, META.OP)] = op;
    m[metaAt(slot, META.POS)] = pos;
    m[metaAt(slot, META.LEN)] = len;
    m[metaAt(slot, META.IOVCNT)] = this.ring.iovs[slot]!.count;
    m[metaAt(slot, META.SYNC)] = sync ? 1 : 0;
    this.submitted = (this.submitted + 1) | 0;
    Atomics.store(this.ring.ctl, CTL.SUBMITTED, this.submitted);
    Atomics.notify(this.ring.ctl, CTL.SUBMITTED);
    return slot;
  }

  /** Completed requests in submission order: done(slot, 0 or -errno). */
  reap(done: (slot: number, result: number) => void): void {
    libc.eventfdClear(this.eventfd);
    const completed = Atomics.load(this.ring.ctl, CTL.COMPLETED);
    while (this.reaped !== completed) {
      const slot = this.reaped & (SLOTS - 1);
      this.reaped = (this.reaped + 1) | 0;
      done(slot, this.ring.meta[metaAt(slot, META.RESULT)]!);
    }
  }

  /**
   * Wait until every submitted request is done, then reap them all. Used where the guest's
   * memory or rings must not change under the I/O any more: device reset, snapshot, shutdown.
   */
  drain(done: (slot: number, result: number) => void): void {
    for (;;) {
      if (this.gone_) return;
      const c = Atomics.load(this.ring.ctl, CTL.COMPLETED);
      if (c === this.submitted) break;
      // As long as the disk takes (a reset must not return while I/O still lands in guest
      // memory), but not for a thread that is no longer there.
      if (Atomics.wait(this.ring.ctl, CTL.COMPLETED, c, LIVENESS_MS) === "timed-out" && !this.alive()) {
        this.abandon(done);
        return;
      }
    }
    this.reap(done);
  }

  /** Whether abandon() has run: the thread is not to be used again. */
  get gone(): boolean {
    return this.gone_;
  }

  /**
   * Whether the thread still exists: its tid names a task of this process with its name (a tid
   * is reused only after the thread is gone). Before it has stored its tid, a thread counts as
   * starting for `startGraceMs` (a worker's start takes seconds under an emulated CPU).
   */
  alive(startGraceMs = START_GRACE_MS): boolean {
    if (this.gone_) return false;
    const tid = Atomics.load(this.ring.ctl, CTL.TID);
    if (tid === 0) return performance.now() - this.startedAt < startGraceMs;
    try {
      // comm holds at most 15 bytes of the name (pthread_setname_np(3)).
      return readFileSync(`/proc/self/task/${tid}/comm`, "utf8").trim() === this.name.slice(0, 15);
    } catch {
      return false;
    }
  }

  /**
   * The thread is gone: reap what it finished, answer the rest with -EIO in submission order,
   * and never use it again (whatever it had started on those buffers ended with it).
   */
  abandon(done: (slot: number, result: number) => void): void {
    // Once only: afterwards `reaped` is past COMPLETED, which reap() must never see.
    if (this.gone_) return;
    this.reap(done);
    while (this.reaped !== this.submitted) {
      const slot = this.reaped & (SLOTS - 1);
      this.reaped = (this.reaped + 1) | 0;
      done(slot, -libc.EIO);
    }
    this.gone_ = true;
  }

  /** Drain (results dropped), stop the thread once it has closed its backend, and close the eventfd. */
  /**
   * Returns false when the thread was still there after CLOSE_MS without having closed its
   * backend (its storage hangs in the write-back): it may yet write the image, so nothing else
   * may act on it, and the ring must not serve another thread.
   */
  close(): boolean {
    if (this.closed) return this.closedCleanly;
    this.drain(() => {});
    this.closed = true;
    Atomics.store(this.ring.ctl, CTL.STOP, 1);
    Atomics.notify(this.ring.ctl, CTL.SUBMITTED);
    Atomics.notify(this.ring.ctl, CTL.OPEN);
    // Its cached metadata must reach the file before the thread goes (or the fds close).
    const deadline = performance.now() + CLOSE_MS;
    while (!this.gone_ && Atomics.load(this.ring.ctl, CTL.CLOSED) === 0 && performance.now() < deadline) {
      if (Atomics.wait(this.ring.ctl, CTL.CLOSED, 0, LIVENESS_MS) === "timed-out" && !this.alive()) break;
    }
    this.closedCleanly = this.gone_ || Atomics.load(this.ring.ctl, CTL.CLOSED) !== 0 || !this.alive();
    void this.worker.terminate();
    libc.close(this.eventfd);
    // The ring no longer has a thread (GET /threads: "idle" until the disk starts another).
    Atomics.store(this.ring.ctl, CTL.TID, 0);
    Atomics.store(this.ring.ctl, CTL.ACTIVE, 0);
    return this.closedCleanly;
  }
}
