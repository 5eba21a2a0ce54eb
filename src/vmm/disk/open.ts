/**
 * Opening a disk image and its backing chain. The format of the image a user names is never
 * guessed from its content: a guest that writes a qcow2 header into its raw disk must not turn it
 * into a qcow2 image whose backing file (any host file) the guest chose. That was QEMU's
 * format-probing hole; so a file that starts with the qcow2 magic and was not said to be qcow2
 * is refused. A backing file's format comes from the overlay's backing-format extension
 * (qcow2.txt §Header extensions 0xe2792aca); when an older image has none it is probed, as QEMU
 * does, which is safe there: a backing file is opened read-only.
 */
import { closeSync, fstatSync, openSync, readSync, statSync } from "node:fs";
import { dirname, isAbsolute, resolve } from "node:path";
import { TypevisorError } from "../../errors.js";
import type { DiskBackend, DiskFormat, DiskInit } from "./backend.js";
import { DiskFormatError, hasQcow2Magic, parseHeader } from "./qcow2/format.js";
import { Qcow2Backend } from "./qcow2/image.js";
import { RawBackend } from "./raw.js";

/** Backing chains longer than this are refused (each level holds an fd for the VM's life). */
export const MAX_CHAIN_DEPTH = 64;

export interface OpenDiskOptions {
  /** Undefined: raw, unless the file starts with the qcow2 magic, which is then refused. */
  format?: DiskFormat;
  readonly: boolean;
}

/** An image and its chain, open: close() closes every fd. */
export interface OpenDisk {
  init: DiskInit;
  close(): void;
}

function readStart(fd: number, bytes: number): Buffer {
  const b = Buffer.alloc(bytes);
  const n = readSync(fd, b, 0, bytes, 0);
  return b.subarray(0, n);
}

/**
 * Open `path` and, for qcow2, its whole backing chain (relative names resolved against the
 * directory of the image that names them; a loop, a missing file or too deep a chain refused).
 * @throws TypevisorError DISK_OPEN, DISK_FORMAT, DISK_CHAIN
 */
export function openDisk(path: string, opts: OpenDiskOptions): OpenDisk {
  const fds: number[] = [];
  const closeAll = () => {
    for (const fd of fds.splice(0)) closeSync(fd);
  };
  try {
    const seen = new Set<string>();
    const init = openLevel(path, opts.format, opts.readonly, true, fds, seen, 0);
    return { init, close: closeAll };
  } catch (e) {
    closeAll();
    throw e;
  }
}

function openLevel(path: string, format: DiskFormat | undefined, readonly: boolean, top: boolean, fds: number[], seen: Set<string>, depth: number): DiskInit {
  if (depth > MAX_CHAIN_DEPTH) throw new TypevisorError("DISK_CHAIN", `backing chain of more than ${MAX_CHAIN_DEPTH} images`);
  let fd: number;
  const what = top ? "disk image" : "backing file";
  const cannot = (verb: string, e: unknown) =>
    new TypevisorError(top ? "DISK_OPEN" : "DISK_CHAIN", `cannot ${verb} ${what} ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, { cause: e });
  const notFile = () => new TypevisorError(top ? "DISK_TYPE" : "DISK_CHAIN", `${what} ${path} is not a regular file`);
  try {
    // Looked at before it is opened, not only after: a backing name is the image's choice, and
    // opening a FIFO blocks until a writer comes (the VMM hung at open) and opening a device
    // can act by itself (a watchdog starts, a tape rewinds). The fstat below still decides.
    if (!statSync(path).isFile()) throw notFile();
    fd = openSync(path, readonly ? "r" : "r+");
  } catch (e) {
    if (e instanceof TypevisorError) throw e;
    throw cannot("open", e);
  }
  fds.push(fd);
  const st = fstatSync(fd);
  if (!st.isFile()) throw notFile();
  const id = `${st.dev}:${st.ino}`;
  if (seen.has(id)) throw new TypevisorError("DISK_CHAIN", `backing chain loops back to ${path}`);
  seen.add(id);
  let start: Buffer;
  try {
    start = readStart(fd, 64 * 1024);
  } catch (e) {
    // A regular file that fails its first read (a backing name of /proc/self/mem did: EIO) is an
    // open failure like any other, not a raw fs Error out of openDisk.
    throw cannot("read", e);
  }
  const magic = hasQcow2Magic(start);
  let fmt: DiskFormat;
  if (format !== undefined) fmt = format;
  else if (!top) fmt = magic ? "qcow2" : "raw";
  else if (magic) {
    // The advice is in the message too: errors from the device thread reach the user without hints.
    throw new DiskFormatError(`${path} starts with the qcow2 magic but no format was given: add format=qcow2`, "say which it is: format=qcow2 (or format=raw for a raw disk whose guest wrote that header)");
  } else fmt = "raw";
  if (fmt === "raw") return { format: "raw", fd, path, readonly };
  if (!magic) throw new DiskFormatError(`${path} is not a qcow2 image (no QFI\\xfb magic)`);
  const h = parseHeader(start, st.size);
  const init: DiskInit = { format: "qcow2", fd, path, readonly };
  if (h.backingFile !== undefined) {
    const name = h.backingFile;
    // Only plain file names: QEMU's "json:" and protocol names (nbd:, http:) are not files.
    if (/^[a-z][a-z0-9+.-]*:/i.test(name) && !name.startsWith("/")) throw new TypevisorError("DISK_CHAIN", `${path}: backing file "${name}" is not a file name`);
    const bpath = isAbsolute(name) ? name : resolve(dirname(path), name);
    let bfmt: DiskFormat | undefined;
    if (h.backingFormat !== undefined) {
      if (h.backingFormat !== "qcow2" && h.backingFormat !== "raw") throw new TypevisorError("DISK_CHAIN", `${path}: backing format "${h.backingFormat}" is not supported (qcow2 and raw are)`);
      bfmt = h.backingFormat;
    }
    init.backing = openLevel(bpath, bfmt, true, false, fds, seen, depth + 1);
  }
  return init;
}

/** Build the backends of an opened chain, on the calling thread (the fds stay the opener's). */
export function backendFromInit(init: DiskInit): DiskBackend {
  if (init.format === "raw") return new RawBackend(init.fd);
  const backing = init.backing !== undefined ? backendFromInit(init.backing) : undefined;
  return new Qcow2Backend(init.fd, { readonly: init.readonly, path: init.path, ...(backing !== undefined ? { backing } : {}) });
}
