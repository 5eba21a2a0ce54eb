/**
 * Reading a file that a less trusted process can replace. A sandboxed VMM owns its output
 * directory (console log, exit file) and so can put a symlink to any host file, or a FIFO, where
 * the daemon expects its log: the daemon, root, would then serve /etc/shadow as console output or
 * hang its event loop in open(2). So: O_NOFOLLOW (a symlink as last component fails with ELOOP),
 * O_NONBLOCK (a FIFO does not block the open), and a regular file or nothing. The directories
 * above are the daemon's own, so only the last component needs this (open(2)).
 */
import { closeSync, constants, fstatSync, openSync, readSync } from "node:fs";

/**
 * Open `path` for reading if it is a regular file and not a symlink.
 * @throws the open's error, or an Error with code EFTYPE for anything but a regular file
 */
export function openRegularNoFollow(path: string): number {
  const fd = openSync(path, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  try {
    if (!fstatSync(fd).isFile()) throw Object.assign(new Error(`${path} is not a regular file`), { code: "EFTYPE" });
  } catch (e) {
    closeSync(fd);
    throw e;
  }
  return fd;
}

/** The last `maxBytes` (at most) of the regular file `path`, refusing symlinks and other file types. */
export function readRegularNoFollow(path: string, maxBytes: number): Buffer {
  const fd = openRegularNoFollow(path);
  try {
    const size = fstatSync(fd).size;
    return readAt(fd, Math.max(0, size - maxBytes), Math.min(size, maxBytes));
  } finally {
    closeSync(fd);
  }
}

/** The first `maxBytes` (at most) of the regular file `path`, refusing symlinks and other file types. */
export function readRegularNoFollowHead(path: string, maxBytes: number): Buffer {
  const fd = openRegularNoFollow(path);
  try {
    return readAt(fd, 0, maxBytes);
  } finally {
    closeSync(fd);
  }
}

/** Up to `length` bytes of `fd` from `start` (fewer at its end). */
function readAt(fd: number, start: number, length: number): Buffer {
  const buf = Buffer.alloc(length);
  let got = 0;
  while (got < buf.length) {
    const n = readSync(fd, buf, got, buf.length - got, start + got);
    if (n <= 0) break;
    got += n;
  }
  return buf.subarray(0, got);
}

/** O_PATH (linux/fcntl.h, 010000000 on x86-64; node's fs.constants does not have it). */
const O_PATH = 0o10000000;

/**
 * A descriptor for the unix socket at `path` that a less trusted process could replace: O_PATH |
 * O_NOFOLLOW opens the last component itself (a symlink yields the link, refused below), and only
 * a socket is accepted. `/proc/self/fd/N` then names that very inode for chown(2), chmod(2) and
 * connect(2), which would otherwise follow a symlink swapped in after the check.
 * @throws the open's error, or an Error with code EFTYPE for anything but a socket
 */
export function openSocketNoFollow(path: string): number {
  const fd = openSync(path, O_PATH | constants.O_NOFOLLOW);
  try {
    if (!fstatSync(fd).isSocket()) throw Object.assign(new Error(`${path} is not a socket`), { code: "EFTYPE" });
  } catch (e) {
    closeSync(fd);
    throw e;
  }
  return fd;
}
