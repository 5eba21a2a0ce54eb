/**
 * The source's side of a live migration that copies the disks ("disks": "copy"): what each disk
 * holds goes in DISK_DATA frames while the guest runs, then the blocks its writes changed since
 * (marked by the device thread in a DirtyBlocks map as each write completes), round after round,
 * and the last ones in the pause.
 *
 * Each pass reads the disk through a backend of its own, opened read-only for that pass: a raw
 * image as its file, a qcow2 image through its tables as they are on storage. The device thread's
 * (or the disk's I/O thread's) qcow2 backend caches tables and allocations, so before every pass
 * the device thread writes its cache back ("disks.flush"): a write that completed before the
 * pass's dirty blocks were taken is then mapped on storage, and one that completes later is
 * marked for the next pass. While the guest runs, that backend may write tables back at any
 * moment, so a pass may read a table half-written or pointing past the file as this reader saw
 * it: such a read fails (the reader refuses it) or reads blocks that the write that changed the
 * entry marked anyway; a failed read marks its blocks again for the next pass. In the pause
 * nothing writes, and a failure is a failure.
 *
 * Only what may hold data is sent (DiskBackend.dataRanges: a raw file's extents, a qcow2 image's
 * allocated clusters down its backing chain): the destination's copy starts out reading zeros.
 */
import { addressOf, IoVec } from "../../sys/iov.js";
import { errnoName } from "../../sys/libc.js";
import { TypevisorError } from "../../errors.js";
import type { DiskBackend, DiskFormat } from "../disk/backend.js";
import { DIRTY_BLOCK_SIZE, DirtyBlocks } from "../disk/dirty-blocks.js";
import { backendFromInit, openDisk } from "../disk/open.js";
import { DISK_CHUNK } from "./protocol.js";

export interface CopiedDisk {
  path: string;
  format: DiskFormat;
  /** The size the guest sees, in bytes. */
  size: number;
  dirty: DirtyBlocks;
}

/** Send `data` (the caller's to keep) as disk `disk`'s bytes at `offset`. */
export type EmitDiskData = (disk: number, offset: number, data: Buffer) => Promise<void>;

export class DiskCopy {
  readonly disks: CopiedDisk[] = [];
  private readonly buf = Buffer.alloc(DISK_CHUNK);
  /** One piece over `buf` (256 bytes of storage: off V8's heap, never moves; see IoVec). */
  private readonly iov = new IoVec(new Uint8Array(256));
  private readonly bufAddress = addressOf(this.buf);

  /**
   * Every disk of the machine, in --disk order, its size read through a backend of its own.
   * @throws TypevisorError (MIGRATION_DISKS, or the disk's own open errors)
   */
  constructor(disks: readonly { path: string; format?: DiskFormat }[]) {
    for (const d of disks) {
      const size = this.withReader({ path: d.path, format: d.format ?? "raw" }, (b) => b.capacity);
      this.disks.push({ path: d.path, format: d.format ?? "raw", size, dirty: DirtyBlocks.create(size) });
    }
  }

  /** Whether the device thread must write its cached metadata back before a pass reads (a qcow2 disk is copied). */
  get needsFlush(): boolean {
    return this.disks.some((d) => d.format === "qcow2");
  }

  get totalBytes(): number {
    return this.disks.reduce((n, d) => n + d.size, 0);
  }

  /** A read-only backend of `d` as it is on storage now (its cache lives as long as the pass that uses it). */
  private openReader(d: { path: string; format: DiskFormat }): { b: DiskBackend; close: () => void } {
    const opened = openDisk(d.path, { format: d.format, readonly: true });
    try {
      const b = backendFromInit(opened.init);
      return {
        b,
        close: () => {
          b.close();
          opened.close();
        },
      };
    } catch (e) {
      opened.close();
      throw e;
    }
  }

  private withReader<T>(d: { path: string; format: DiskFormat }, use: (b: DiskBackend) => T): T {
    const r = this.openReader(d);
    try {
      return use(r.b);
    } finally {
      r.close();
    }
  }

  /** The first pass: everything that may hold data, while the guest runs (what cannot be read goes in the next pass). */
  async copyAll(emit: EmitDiskData, check: () => void): Promise<void> {
    for (const [i, d] of this.disks.entries()) {
      const r = this.openReader(d);
      try {
        let ranges;
        try {
          ranges = r.b.dataRanges(0, d.size);
        } catch {
          // Tables read half-written: the next pass reads every block (zeros included).
          d.dirty.mark(0, d.size);
          continue;
        }
        for (const x of ranges) {
          for (let off = x.offset; off < x.offset + x.length; off += DISK_CHUNK) {
            check();
            await this.sendRange(r.b, i, off, Math.min(DISK_CHUNK, x.offset + x.length - off), emit, false);
          }
        }
      } finally {
        r.close();
      }
    }
  }

  /** The blocks in `blocks` (one ascending list per disk), runs of neighbours in one frame. `final`: in the pause. */
  async sendBlocks(blocks: number[][], emit: EmitDiskData, check: () => void, final: boolean): Promise<void> {
    const per = DISK_CHUNK / DIRTY_BLOCK_SIZE;
    for (const [i, list] of blocks.entries()) {
      if (list.length === 0) continue;
      const d = this.disks[i]!;
      const r = this.openReader(d);
      try {
        for (let k = 0; k < list.length;) {
          let n = 1;
          while (k + n < list.length && n < per && list[k + n] === list[k]! + n) n++;
          const off = list[k]! * DIRTY_BLOCK_SIZE;
          if (off < d.size) {
            check();
            await this.sendRange(r.b, i, off, Math.min(n * DIRTY_BLOCK_SIZE, d.size - off), emit, final);
          }
          k += n;
        }
      } finally {
        r.close();
      }
    }
  }

  /** Read [off, off + len) of disk `i` (at most DISK_CHUNK) through `b` and emit it. */
  private async sendRange(b: DiskBackend, i: number, off: number, len: number, emit: EmitDiskData, final: boolean): Promise<void> {
    const d = this.disks[i]!;
    this.iov.clear();
    this.iov.push(this.bufAddress, len);
    const r = b.readv(this.iov, off);
    this.iov.clear();
    if (r < 0) {
      if (!final && d.format === "qcow2") {
        d.dirty.mark(off, len);
        return;
      }
      throw new TypevisorError("MIGRATION_DISKS", `reading ${d.path} at ${off}: ${errnoName(-r)}`);
    }
    // A copy: the socket may still hold the frame when the buffer is reused for the next one.
    await emit(i, off, Buffer.from(this.buf.subarray(0, len)));
  }
}
