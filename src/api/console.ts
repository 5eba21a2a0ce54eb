/**
 * A VM's serial console over the API: the captured log (the VMM writes it,
 * rotated to console.log.1), followed like `tail -F`, and the interactive
 * attach, which splices the client's connection to the VMM's console socket.
 */
import { closeSync, fstatSync, lstatSync, readSync } from "node:fs";
import type { Writable } from "node:stream";
import { openRegularNoFollow, readRegularNoFollow } from "../sys/untrusted-file.js";

/**
 * Most of one console file the daemon reads (the VMM rotates at --console-log-size, 1 MiB by
 * default; a VMM that ignores that, a sandboxed one taken over, must not make the daemon read gigabytes).
 */
const CONSOLE_READ_MAX = 64 * 2 ** 20;

/**
 * The last `tail` bytes of the console (the rotated file first), or all of it. The files are the
 * VMM's (a sandboxed VMM owns their directory): a symlink or a FIFO put there is not followed.
 */
export function readConsole(log: string, tail?: number): Buffer {
  const parts: Buffer[] = [];
  for (const f of [`${log}.1`, log]) {
    try {
      parts.push(readRegularNoFollow(f, CONSOLE_READ_MAX));
    } catch {
      /* absent: nothing captured yet, or never rotated */
    }
  }
  const all = Buffer.concat(parts);
  return tail === undefined || tail >= all.length ? all : all.subarray(all.length - tail);
}

/**
 * How much a follower's connection may hold unsent before the follower is made to wait: the log
 * file is the buffer, so a client that does not read costs the daemon this much memory at most
 * (it lags, and past a rotation it misses what rotated away, as `tail -F` would).
 */
export const FOLLOW_HIGH_WATER = 256 * 1024;

/**
 * Follow the console log from its current end: new bytes are written to
 * `out` as the VMM appends them, across rotations (the old file is drained
 * before the new one is opened). Returns a function that stops following.
 */
export function followConsole(log: string, out: Writable, intervalMs = 200): () => void {
  let fd: number | undefined;
  let ino = -1;
  let pos = 0;
  const open = (fromEnd: boolean): void => {
    try {
      fd = openRegularNoFollow(log);
      const st = fstatSync(fd);
      ino = st.ino;
      pos = fromEnd ? st.size : 0;
    } catch {
      fd = undefined;
    }
  };
  const drain = (): void => {
    if (fd === undefined) return;
    const buf = Buffer.alloc(65536);
    // what the client has not taken yet stays in the file, not in this process
    while (out.writableLength < FOLLOW_HIGH_WATER) {
      const n = readSync(fd, buf, 0, buf.length, pos);
      if (n <= 0) break;
      pos += n;
      out.write(Buffer.from(buf.subarray(0, n)));
    }
  };
  open(true);
  const timer = setInterval(() => {
    try {
      if (fd === undefined) {
        open(false);
      } else {
        drain();
        let now: number | undefined;
        try {
          now = lstatSync(log).ino;
        } catch {
          now = undefined;
        }
        // rotated: move on only once the old file is drained (a slow client may still be reading it)
        if (now !== ino && out.writableLength < FOLLOW_HIGH_WATER) {
          closeSync(fd);
          open(false);
        }
      }
      drain();
    } catch {
      /* the VM was removed meanwhile: the next tick retries, the caller stops us */
    }
  }, intervalMs);
  return () => {
    clearInterval(timer);
    if (fd !== undefined) closeSync(fd);
    fd = undefined;
  };
}
