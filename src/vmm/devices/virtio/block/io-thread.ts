import { Worker } from "node:worker_threads";
import type { IoVec } from "../../../../sys/iov.js";
import * as libc from "../../../../sys/libc.js";
import { workerUrl } from "../../../worker-url.js";
import { CTL, META, metaAt, SLOTS, ioRing, type IoRing } from "./io-ring.js";
import type { IoWorkerInit } from "./io-worker.js";

/**
 * The device thread's handle on a disk's I/O thread (io-worker.ts): submit requests into free
 * slots, reap completions when `eventfd` is readable (the device thread polls it with the
 * queue kicks), drain before a reset or a snapshot. Up to SLOTS requests are in flight; the
 * device leaves further ones in the available ring until a slot frees (back-pressure).
 */
export class BlockIoThread {
  /** Readable when requests completed (one count per completion). */
  readonly eventfd: number;
  private readonly ring: IoRing;
  private readonly worker: Worker;
  private submitted = 0;
  private reaped = 0;
  private closed = false;

  /** `fd`: the disk image, owned by the caller and open until after close(). */
  constructor(fd: number, name: string) {
    this.ring = ioRing();
    this.eventfd = libc.eventfd();
    const init: IoWorkerInit = { sab: this.ring.sab, fd, eventfd: this.eventfd, name };
    // The thread waits in Atomics.wait, never in its event loop: unref'd, it keeps no process alive.
    try {
      this.worker = new Worker(workerUrl("devices/virtio/block/io-worker.js"), { workerData: init });
    } catch (e) {
      libc.close(this.eventfd);
      throw e;
    }
    this.worker.unref();
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
      const c = Atomics.load(this.ring.ctl, CTL.COMPLETED);
      if (c === this.submitted) break;
      // As long as the disk takes: a reset must not return while I/O still lands in guest memory.
      Atomics.wait(this.ring.ctl, CTL.COMPLETED, c);
    }
    this.reap(done);
  }

  /** Drain (results dropped), stop the thread and close the eventfd. */
  close(): void {
    if (this.closed) return;
    this.drain(() => {});
    this.closed = true;
    Atomics.store(this.ring.ctl, CTL.STOP, 1);
    Atomics.notify(this.ring.ctl, CTL.SUBMITTED);
    void this.worker.terminate();
    libc.close(this.eventfd);
  }
}
