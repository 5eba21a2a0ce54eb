import { fstatSync } from "node:fs";
import { IoVec } from "../../sys/iov.js";
import { fdatasync } from "../../sys/libc.js";
import { transferAll, writeZeroes } from "../devices/virtio/block/file-io.js";
import type { DiskBackend } from "./backend.js";

/**
 * A raw image: guest byte N is file byte N. As a backing file it may be shorter than the
 * overlay (qcow2.txt §Cluster mapping: parts not covered read as zeros; the overlay does that).
 */
export class RawBackend implements DiskBackend {
  readonly format = "raw";
  readonly capacity: number;

  constructor(private readonly fd: number) {
    this.capacity = fstatSync(fd).size;
  }

  readv(iov: IoVec, pos: number): number {
    return transferAll(this.fd, iov, false, pos);
  }

  writev(iov: IoVec, pos: number): number {
    return transferAll(this.fd, iov, true, pos);
  }

  /** Made on first use: a raw disk served by the device's own fast paths never needs it. */
  private scratch: IoVec | undefined;

  writeZeroes(pos: number, len: number): number {
    this.scratch ??= new IoVec();
    return writeZeroes(this.fd, this.scratch, pos, len);
  }

  /** virtio 1.2 §5.2.6.2: the device MAY deallocate; a raw file keeps its blocks (reads then are unchanged). */
  discard(_pos: number, _len: number): number {
    return 0;
  }

  flush(): number {
    return fdatasync(this.fd);
  }

  close(): void {}
}
