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
  private fd: number;
  private size: number;

  constructor(readonly path: string, readonly maxBytes: number) {
    try {
      // Append: a supervisor restarting the VM keeps the earlier console in the same file.
      this.fd = openSync(path, "a", 0o640);
      this.size = fstatSync(this.fd).size;
    } catch (e) {
      throw new TypevisorError("CONSOLE_LOG", `cannot open --console-log ${path}: ${(e as Error).message}`);
    }
  }

  write(bytes: Uint8Array): void {
    let off = 0;
    for (const p of planAppend(this.size, bytes.length, this.maxBytes)) {
      if (p.rotateBefore) this.rotate();
      writeAll(this.fd, bytes.subarray(off, off + p.length));
      off += p.length;
      this.size += p.length;
    }
  }

  private rotate(): void {
    closeSync(this.fd);
    // rename(2) replaces PATH.1 atomically: a reader sees the old or the new generation, never none.
    renameSync(this.path, `${this.path}.1`);
    this.fd = openSync(this.path, "a", 0o640);
    this.size = 0;
  }

  close(): void {
    closeSync(this.fd);
  }
}

function writeAll(fd: number, b: Uint8Array): void {
  let off = 0;
  while (off < b.length) off += writeSync(fd, b, off, b.length - off);
}
