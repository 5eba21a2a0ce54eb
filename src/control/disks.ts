/**
 * A VM's own disks. From an image: a copy of its root filesystem (a reflink
 * where the filesystem offers one, so creation is instant and shares blocks
 * until written), grown to the requested size with e2fsck + resize2fs.
 * Without an image: a blank sparse file. Raw files, sizes multiples of 512
 * (virtio-blk counts 512-byte sectors: virtio 1.2 §5.2.4).
 */
import { execFile } from "node:child_process";
import { statSync, truncateSync, writeFileSync } from "node:fs";
import { promisify } from "node:util";
import { TypevisorError } from "../errors.js";
import { sparseCopy } from "../sys/sparse-copy.js";

export { sparseCopy };

const run = promisify(execFile);

export const SECTOR = 512;

export function roundUpToSector(n: number): number {
  return Math.ceil(n / SECTOR) * SECTOR;
}

export async function diskFromImage(rootfs: string, dest: string, sizeBytes: number | undefined): Promise<number> {
  const base = statSync(rootfs).size;
  const size = sizeBytes === undefined ? base : roundUpToSector(sizeBytes);
  if (size < base) {
    throw new TypevisorError("DISK_SIZE", `disk size ${size} bytes is smaller than the image's root filesystem (${base} bytes)`);
  }
  // Off the event loop: a large copy must not stall every other request.
  await sparseCopy(rootfs, dest);
  if (size > base) {
    truncateSync(dest, size);
    try {
      // resize2fs insists on a freshly checked filesystem; -p fixes only what is safe to fix unattended.
      await run("e2fsck", ["-fp", dest], { timeout: 120_000 });
      await run("resize2fs", [dest], { timeout: 120_000 });
    } catch (e) {
      const err = e as { stderr?: string; message: string; code?: string };
      if (err.code === "ENOENT") throw new TypevisorError("MISSING_TOOL", "growing a disk needs e2fsck and resize2fs", { hint: "apt-get install e2fsprogs" });
      throw new TypevisorError("DISK_RESIZE", `cannot grow the disk to ${size} bytes: ${(err.stderr ?? err.message).trim().split("\n").pop() ?? ""}`);
    }
  }
  return size;
}

export function blankDisk(dest: string, sizeBytes: number): number {
  const size = roundUpToSector(sizeBytes);
  writeFileSync(dest, "", { flag: "wx" });
  truncateSync(dest, size);
  return size;
}

/** Bytes a file takes on the host now (its allocated blocks; 0 when it is gone). */
export function allocatedBytes(path: string): number {
  try {
    return statSync(path).blocks * 512;
  } catch {
    return 0;
  }
}
