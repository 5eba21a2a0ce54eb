/**
 * A disk's I/O thread (one per virtio-blk device): does the disk I/O of the requests the
 * device thread submits through an io-ring, in order, and signals an eventfd per completion,
 * so the device thread never waits on the disk (a guest's flush can take as long as the
 * storage needs while the other devices go on) and the work of a request is split the way
 * QEMU splits it with aio=threads: the device thread walks rings, this thread moves data.
 * It blocks in Atomics.wait between requests and never returns to its event loop.
 */
import * as libc from "../../../../sys/libc.js";
import type { DiskBackend, DiskInit } from "../../../disk/backend.js";
import { backendFromInit } from "../../../disk/open.js";
import { CTL, IO_OP, META, metaAt, SLOTS, ioRing } from "./io-ring.js";
import { workerInit } from "../../../threads/spawn.js";

export interface IoWorkerInit {
  sab: SharedArrayBuffer;
  /**
   * The disk image and its chain, open (the device owns the fds; they outlive this thread). The
   * backend built from it lives here only: a qcow2 image's tables are this thread's alone.
   */
  disk: DiskInit;
  /** Signalled once per completed request. */
  eventfd: number;
  /** Thread name, e.g. tv-blk0 (at most 15 bytes). */
  name: string;
}

const init = await workerInit<IoWorkerInit>();
const ring = ioRing(init.sab);
const { ctl, meta } = ring;
libc.pthreadSetName(libc.pthreadSelf(), init.name);
// Named first, then the tid: the device thread's liveness check finds /proc/self/task/TID/comm = name.
Atomics.store(ctl, CTL.TID, libc.gettid());
// Up: the device thread (woken by the eventfd, no request completed) may hand the image over.
// Until it says OPEN it may still serve the disk itself, so nothing here touches the image. A
// thread started with the device has OPEN already and needs no such wake-up.
if (Atomics.load(ctl, CTL.OPEN) === 0) libc.eventfdSignal(init.eventfd);
while (Atomics.load(ctl, CTL.OPEN) === 0 && Atomics.load(ctl, CTL.STOP) === 0) Atomics.wait(ctl, CTL.OPEN, 0);
// The device built it once already (validated, capacity known), so this does not fail but for a
// file changed in between; then every request fails with EIO, which the guest sees. Not built
// when told to stop before OPEN: the device thread still holds the image.
let disk: DiskBackend | undefined;
try {
  disk = Atomics.load(ctl, CTL.OPEN) !== 0 ? backendFromInit(init.disk) : undefined;
} catch {
  disk = undefined;
}

/** IO_OP.REOPEN: the backend built again from the file (its metadata as on disk now). */
function reopen(): number {
  try {
    disk?.close();
  } catch {
    // a backend that cannot write back has nothing to lose here: it never wrote (see BlockDevice.reopen)
  }
  try {
    disk = backendFromInit(init.disk);
    return 0;
  } catch {
    disk = undefined;
    return -libc.EIO;
  }
}

function execute(slot: number): number {
  const op = meta[metaAt(slot, META.OP)]!;
  if (op === IO_OP.REOPEN) return reopen();
  if (disk === undefined) return -libc.EIO;
  const pos = meta[metaAt(slot, META.POS)]!;
  let r: number;
  switch (op) {
    case IO_OP.READ:
    case IO_OP.WRITE: {
      const iov = ring.iovs[slot]!;
      iov.adopt(meta[metaAt(slot, META.IOVCNT)]!);
      r = op === IO_OP.WRITE ? disk.writev(iov, pos) : disk.readv(iov, pos);
      iov.clear();
      break;
    }
    case IO_OP.WRITE_ZEROES:
      r = disk.writeZeroes(pos, meta[metaAt(slot, META.LEN)]!);
      break;
    case IO_OP.DISCARD:
      r = disk.discard(pos, meta[metaAt(slot, META.LEN)]!);
      break;
    case IO_OP.FLUSH:
      return disk.flush();
    default:
      return -libc.EIO;
  }
  // Writethrough (FLUSH not negotiated): stable before it completes (virtio 1.2 §5.2.6.2).
  if (r === 0 && meta[metaAt(slot, META.SYNC)] === 1) r = disk.flush();
  return r;
}

// The ring may have served an earlier thread of this disk: its counters run on from there.
let next = Atomics.load(ctl, CTL.COMPLETED);
for (;;) {
  if (Atomics.load(ctl, CTL.SUBMITTED) === next) {
    // Stop only when idle: everything submitted has been done.
    if (Atomics.load(ctl, CTL.STOP) !== 0) break;
    Atomics.wait(ctl, CTL.SUBMITTED, next);
    continue;
  }
  const slot = next & (SLOTS - 1);
  let r: number;
  try {
    r = execute(slot);
  } catch {
    // Nothing above throws by design; if it does, that request fails and the disk goes on.
    r = -libc.EIO;
  }
  meta[metaAt(slot, META.RESULT)] = r;
  next = (next + 1) | 0;
  Atomics.store(ctl, CTL.COMPLETED, next);
  // A device thread draining (reset, shutdown) waits on COMPLETED; otherwise it polls the eventfd.
  Atomics.notify(ctl, CTL.COMPLETED);
  libc.eventfdSignal(init.eventfd);
}
// STOP: write back what the backend caches (a qcow2 image's tables), then say so.
try {
  disk?.close();
} finally {
  Atomics.store(ctl, CTL.CLOSED, 1);
  Atomics.notify(ctl, CTL.CLOSED);
}
