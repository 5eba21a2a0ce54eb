/**
 * The destination's side of "disks": "copy": the files the copied disks go into, and the
 * DISK_DATA written into them. A raw disk's copy is a raw file of the same size; a qcow2 disk's
 * is a standalone qcow2 image of the same virtual size (no backing file: the source sends what
 * its whole chain holds), written through our own qcow2 backend on this thread, which writes
 * its metadata back before the device thread reads the image again (finish(), then the
 * "disks.reopen" device command: that thread opened the image at HELLO, still empty).
 */
import { closeSync, existsSync, openSync, rmSync, statSync, truncateSync, writeSync } from "node:fs";
import { TypevisorError } from "../../errors.js";
import { addressOf, IoVec } from "../../sys/iov.js";
import { errnoName, ftruncate, pwriteFull } from "../../sys/libc.js";
import type { DiskFormat } from "../disk/backend.js";
import { backendFromInit, openDisk } from "../disk/open.js";
import { qcow2ImageBytes } from "../disk/qcow2/create.js";
import { Qcow2Backend } from "../disk/qcow2/image.js";
import type { DiskSpec } from "../device-specs.js";
import { MAX_FRAME, streamError } from "./protocol.js";

export interface DiskTarget {
  path: string;
  fd: number;
  /** The size the guest sees. */
  size: number;
  format: DiskFormat;
  /** A qcow2 copy's backend (this thread's) until finish(). */
  qcow2?: Qcow2Backend;
  /** Made by this migration (removed again if it fails), not an empty file given with --disk. */
  created: boolean;
}

/** All zeros, to compare DISK_DATA with (memcmp, not a loop in JavaScript). */
const ZEROS = Buffer.alloc(MAX_FRAME);
/** One piece over a DISK_DATA payload (256 bytes of storage: off V8's heap, never moves; see IoVec). */
const ONE = new IoVec(new Uint8Array(256));
/** The payload ONE points into, while the backend writes it (writeDiskData). */
let _inFlight: Buffer | undefined;

/**
 * The files the copied disks go into: each disk's path in the (overridden) configuration's `list`, a
 * file that does not exist yet or an empty one (never a disk with data: that would be
 * overwritten), in the format and size HELLO gives. Each of `list` is changed to that format.
 */
export function createDiskTargets(list: DiskSpec[], disks: readonly { size: number; format?: DiskFormat | undefined }[]): DiskTarget[] {
  if (disks.length !== list.length) throw streamError(`HELLO copies ${disks.length} disks for a machine with ${list.length}`);
  const out: DiskTarget[] = [];
  try {
    list.forEach((d, i) => {
      const size = disks[i]!.size;
      const format = disks[i]!.format ?? "raw";
      if (size % 512 !== 0) throw streamError(`disk ${i} of ${size} bytes is not whole sectors`);
      const exists = existsSync(d.path);
      // A daemon whose VMMs cannot create files makes a qcow2 copy's image itself, blank.
      const blank = exists && format === "qcow2" && statSync(d.path).size !== 0 && blankQcow2(d.path, size);
      if (exists && !blank && statSync(d.path).size !== 0) {
        throw new TypevisorError("MIGRATION_DISKS", `${d.path} is not empty: the copied disk would overwrite it`, {
          hint: "give an empty file (or, for a qcow2 disk, a qcow2 image of its size with nothing allocated and no backing file) or a path that does not exist yet (--disk PATH on run --incoming)",
        });
      }
      // Read and write: a qcow2 copy reads its own tables.
      const fd = openSync(d.path, exists ? "r+" : "wx+", 0o600);
      const t: DiskTarget = { path: d.path, fd, size, format, created: !exists };
      out.push(t);
      if (blank) t.qcow2 = new Qcow2Backend(fd, { readonly: false, path: d.path });
      else if (format === "qcow2") {
        // A fresh image (qemu-img's defaults: 64 KiB clusters, 16-bit refcounts) in the file as it is.
        const { head, fileSize } = qcow2ImageBytes({ size });
        writeSync(fd, head, 0, head.length, 0);
        if (ftruncate(fd, fileSize) < 0) throw new TypevisorError("MIGRATION_DISKS", `cannot size ${d.path} to ${fileSize} bytes`);
        t.qcow2 = new Qcow2Backend(fd, { readonly: false, path: d.path });
      } else if (ftruncate(fd, size) < 0) throw new TypevisorError("MIGRATION_DISKS", `cannot size ${d.path} to ${size} bytes`);
      d.format = format;
    });
    return out;
  } catch (e) {
    removeDiskTargets(out);
    throw e;
  }
}

/** Whether `path` is a qcow2 image of `size` bytes with no backing file and nothing allocated (nothing to overwrite). */
function blankQcow2(path: string, size: number): boolean {
  let opened;
  try {
    opened = openDisk(path, { format: "qcow2", readonly: true });
  } catch {
    return false;
  }
  try {
    if (opened.init.backing !== undefined) return false;
    const b = backendFromInit(opened.init);
    try {
      return b.capacity === size && b.dataRanges(0, size).length === 0;
    } finally {
      b.close();
    }
  } catch {
    return false;
  } finally {
    opened.close();
  }
}

/** DISK_DATA for `t` at `offset` (checked against its size by the caller). */
export function writeDiskData(t: DiskTarget, offset: number, data: Buffer): void {
  let r: number;
  if (t.qcow2 !== undefined) {
    // Zeros stay unallocated in the copy (whole clusters; a partial one is written as zeros).
    if (data.equals(ZEROS.subarray(0, data.length))) r = t.qcow2.writeZeroes(offset, data.length);
    else {
      // Safe to hand over: `data` is a view of a frame's own Buffer (off V8's heap, never moved),
      // and the backend writes exactly data.length bytes from it. The backend is JavaScript that
      // allocates, so a GC may run inside the call: `_inFlight` keeps the Buffer reachable until
      // the call returns (a variable the code no longer reads is no root, and its memory would
      // be freed under the pwritev).
      _inFlight = data;
      ONE.clear();
      ONE.push(addressOf(data), data.length);
      r = t.qcow2.writev(ONE, offset);
      ONE.clear();
      _inFlight = undefined;
    }
  } else r = pwriteFull(t.fd, data, offset);
  if (r < 0) throw new TypevisorError("MIGRATION_DISKS", `writing ${t.path}: ${errnoName(-r)}`);
}

/** Every byte is in: a qcow2 copy's metadata written back and synced, before its device reads it again. */
export function finishDiskTargets(targets: readonly DiskTarget[]): void {
  for (const t of targets) {
    if (t.qcow2 === undefined) continue;
    const r = t.qcow2.flush();
    t.qcow2.close();
    t.qcow2 = undefined;
    if (r < 0) throw new TypevisorError("MIGRATION_DISKS", `writing ${t.path}'s metadata: ${errnoName(-r)}`);
  }
}

/** A failed migration leaves nothing: a file made here goes, an empty one given goes back to empty. */
export function removeDiskTargets(targets: readonly DiskTarget[]): void {
  for (const t of targets) {
    try {
      t.qcow2?.close();
    } catch {
      // the file goes anyway
    }
    t.qcow2 = undefined;
    closeSync(t.fd);
    if (t.created) rmSync(t.path, { force: true });
    else truncateSync(t.path, 0);
  }
}
