/**
 * The guest's serial output appended to a file, rotated by size: a file never
 * grows past `maxBytes`; when the next bytes would not fit, PATH becomes
 * PATH.1 (replacing an older PATH.1) and a fresh PATH starts. One generation
 * is kept, as a supervisor only needs "the recent console" and disk use stays
 * bounded at 2 x maxBytes per VM.
 */
import { closeSync, fstatSync, openSync, renameSync, writeSync } from "node:fs";
import { TypevisorError } from "../../errors.js";

/** One piece of a write: `length` bytes, after rotating the file first when `rotateBefore`. */
/** Console log rotation sizes (`--console-log-size`): below the minimum a log would rotate on
 * nearly every line; the maximum keeps byte counts well inside a Number. */
export const LOG_SIZE_LIMITS = { min: 1024, max: 1024 ** 4 } as const;

export interface LogPiece {
  rotateBefore: boolean;
  length: number;
}

/**
 * How to append `length` bytes to a file holding `size` bytes so that no file
 * exceeds `max`: fill the current file only when the whole write fits, else
 * rotate first and continue in fresh files of at most `max` bytes (a write
 * larger than `max` is split). An empty file is never rotated away.
 */
export function planAppend(size: number, length: number, max: number): LogPiece[] {
  if (!(max >= 1)) throw new RangeError("max must be at least 1");
  const pieces: LogPiece[] = [];
  let cur = size;
  let left = length;
  while (left > 0) {
    // Rotate only a non-empty file: the write then starts at the top of a fresh one (a console line
    // is not cut across two generations unless it is longer than a whole file).
    const rotate = cur > 0 && cur + left > max;
    if (rotate) cur = 0;
    const n = Math.min(left, max - cur);
    pieces.push({ rotateBefore: rotate, length: n });
    cur += n;
    left -= n;
  }
  return pieces;
}

export class RotatingLog {
  /** Undefined after a rotation whose fresh file could not be made: the next write tries again. */
  private fd: number | undefined;
  private size: number;
  /** Bytes lost since the last write that reached the file; said in the log once writing works again. */
  private pendingDrop = 0;
  private dropped = 0;

  /**
   * @param onDrop called when output starts being lost (the first failed write after a good one),
   *   with the error's code, so the VMM can say so where someone will read it.
   */
  constructor(readonly path: string, readonly maxBytes: number, private readonly onDrop?: (code: string) => void) {
    try {
      // Append: a supervisor restarting the VM keeps the earlier console in the same file.
      this.fd = openSync(path, "a", 0o640);
      this.size = fstatSync(this.fd).size;
    } catch (e) {
      throw new TypevisorError("CONSOLE_LOG", `cannot open --console-log ${path}: ${(e as Error).message}`);
    }
  }

  /** Console bytes that never reached the file (its disk full, its quota used up, an I/O error). */
  get droppedBytes(): number {
    return this.dropped;
  }

  /**
   * Append, rotating as needed. A write that fails (ENOSPC above all: the log shares a disk with
   * VM disks and the inventory) drops what is left of these bytes instead of throwing into the
   * console's reader, so the guest and the VMM go on; the next write that works first notes how
   * much was lost.
   */
  write(bytes: Uint8Array): void {
    if (this.pendingDrop > 0) {
      const note = new TextEncoder().encode(`\r\n[typevisor: ${this.pendingDrop} bytes of console output dropped: the log could not be written]\r\n`);
      // A note that does not fit whole is not written at all (a cut note would only confuse).
      if (this.append(note) < note.length) {
        this.lose(bytes.length);
        return;
      }
      this.pendingDrop = 0;
    }
    this.lose(bytes.length - this.append(bytes));
  }

  private lose(n: number): void {
    this.pendingDrop += n;
    this.dropped += n;
  }

  /** How many of `bytes` reached the file, in order: all of them unless a write failed. */
  private append(bytes: Uint8Array): number {
    let off = 0;
    try {
      for (const p of planAppend(this.size, bytes.length, this.maxBytes)) {
        if (p.rotateBefore) this.rotate();
        this.fd ??= this.open();
        const end = off + p.length;
        while (off < end) {
          const n = writeSync(this.fd, bytes, off, end - off);
          off += n;
          this.size += n;
        }
      }
      return off;
    } catch (e) {
      if (this.pendingDrop === 0) this.onDrop?.((e as NodeJS.ErrnoException).code ?? "EIO");
      return off;
    }
  }

  private open(): number {
    const fd = openSync(this.path, "a", 0o640);
    this.size = fstatSync(fd).size;
    return fd;
  }

  private rotate(): void {
    if (this.fd !== undefined) closeSync(this.fd);
    this.fd = undefined;
    // rename(2) replaces PATH.1 atomically: a reader sees the old or the new generation, never none.
    renameSync(this.path, `${this.path}.1`);
    this.size = 0;
    this.fd = this.open();
  }

  close(): void {
    if (this.fd !== undefined) closeSync(this.fd);
    this.fd = undefined;
  }
}
