import { fstatSync } from "node:fs";
import { IoVec } from "../../sys/iov.js";
import { errnoName, fdatasync, lseek, ENXIO, SEEK_DATA, SEEK_HOLE } from "../../sys/libc.js";
import { TypevisorError } from "../../errors.js";
import { transferAll, writeZeroes } from "../devices/virtio/block/file-io.js";
import { addRange, type DataRange, type DiskBackend } from "./backend.js";

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

  /** The file's data extents (lseek(2) SEEK_DATA/SEEK_HOLE): holes read as zeros. */
  dataRanges(pos: number, len: number): DataRange[] {
    const out: DataRange[] = [];
    const end = Math.min(pos + len, this.capacity);
    let at = pos;
    while (at < end) {
      const data = lseek(this.fd, at, SEEK_DATA);
      if (data === -ENXIO || (data >= 0 && data >= end)) break;
      if (data < 0) throw new TypevisorError("DISK_IO", `SEEK_DATA: ${errnoName(-data)}`);
      const hole = lseek(this.fd, data, SEEK_HOLE);
      if (hole < 0) throw new TypevisorError("DISK_IO", `SEEK_HOLE: ${errnoName(-hole)}`);
      // A file that shrank meanwhile ends the data; never a range past `end`.
      const stop = Math.min(end, Math.max(hole, data + 1));
      addRange(out, data, stop - data);
      at = stop;
    }
    return out;
  }

  close(): void {}
}
