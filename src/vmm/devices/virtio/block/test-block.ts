/** Test helpers for the block device. */
import { pollIn } from "../../../../sys/libc.js";
import type { BlockDevice } from "./block.js";

/** Let a disk's I/O thread finish what is in flight, handing each completion to the device as its loop would (10 s at most). */
export function settle(dev: BlockDevice): void {
  const fd = dev.backendFds[0];
  if (fd === undefined) return;
  for (let waited = 0; dev.inFlight > 0; ) {
    if (pollIn([fd], 100).length === 0 && (waited += 100) > 10_000) throw new Error("I/O thread did not complete in 10 s");
    dev.onBackendReadable(fd);
  }
}

/** Sleep this thread (the tests' device thread never returns to its event loop either). */
export function sleepMs(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

/**
 * Let a disk's on-demand I/O thread come up and take the disk, handing its first signal to the
 * device as its loop would (20 s at most: a worker's start under load).
 */
export function waitIoThreadUp(dev: BlockDevice): void {
  for (let waited = 0; dev.stats().ioThread !== "running"; ) {
    const fd = dev.backendFds[0];
    if (fd === undefined) throw new Error(`no I/O thread is starting (${dev.stats().ioThread})`);
    if (pollIn([fd], 100).length === 0 && (waited += 100) > 20_000) throw new Error("I/O thread did not start in 20 s");
    dev.onBackendReadable(fd);
  }
}
