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
