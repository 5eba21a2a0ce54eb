/**
 * A writer for uncompressed cpio "newc" archives, the format Linux unpacks as an initramfs
 * (Documentation/driver-api/early-userspace/buffer-format.rst): per entry a 110-byte ASCII header
 * "070701" + 13 eight-digit hex fields, the NUL-terminated name, padding to 4 bytes, the data,
 * padding to 4 bytes; the archive ends with an entry named "TRAILER!!!".
 *
 * Why our own writer rather than `cpio -o -H newc`: the archive must hold root-owned files and a
 * /dev/console character device (the kernel opens it for init's stdio before devtmpfs is mounted);
 * the cpio tool copies those from a real directory, which needs root to create. Writing the
 * headers ourselves needs no privileges, is deterministic, and the tests check it with Debian's cpio.
 */
import { TypevisorError } from "../errors.js";

export type CpioEntry =
  | { type: "dir"; path: string; mode?: number }
  | { type: "file"; path: string; data: Uint8Array; mode?: number }
  | { type: "symlink"; path: string; target: string }
  | { type: "char"; path: string; major: number; minor: number; mode?: number };

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;

function hex8(n: number): string {
  if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) throw new TypevisorError("CPIO_FIELD_RANGE", `cpio newc field out of range: ${n}`);
  return n.toString(16).padStart(8, "0");
}

function pad4(n: number): number {
  return (4 - (n % 4)) % 4;
}

/** Paths inside the archive are relative ("bin/sh"), as the kernel and cpio expect. */
export function normalizeCpioPath(p: string): string {
  const parts = p.split("/").filter((s) => s !== "" && s !== ".");
  if (parts.length === 0 || parts.includes("..")) throw new TypevisorError("CPIO_BAD_PATH", `bad path for a cpio entry: ${JSON.stringify(p)}`);
  return parts.join("/");
}

/** Build the archive. Entries keep their order; parents should come before children. */
export function writeNewc(entries: CpioEntry[], mtime = 0): Buffer {
  const chunks: Buffer[] = [];
  let ino = 1;
  const push = (name: string, mode: number, data: Uint8Array, nlink: number, rdev: [number, number]): void => {
    const nameBytes = Buffer.from(`${name}\0`, "utf8");
    const header =
      "070701" +
      hex8(name === "TRAILER!!!" ? 0 : ino++) +
      hex8(mode) +
      hex8(0) + // uid: root
      hex8(0) + // gid: root
      hex8(nlink) +
      hex8(mtime) +
      hex8(data.length) +
      hex8(0) + // devmajor
      hex8(0) + // devminor
      hex8(rdev[0]) +
      hex8(rdev[1]) +
      hex8(nameBytes.length) +
      hex8(0); // check: unused by newc
    chunks.push(Buffer.from(header, "ascii"), nameBytes, Buffer.alloc(pad4(110 + nameBytes.length)));
    chunks.push(Buffer.from(data.buffer, data.byteOffset, data.length), Buffer.alloc(pad4(data.length)));
  };
  const seen = new Set<string>();
  for (const e of entries) {
    const path = normalizeCpioPath(e.path);
    if (seen.has(path)) throw new TypevisorError("CPIO_DUPLICATE", `duplicate cpio entry: ${path}`);
    seen.add(path);
    switch (e.type) {
      case "dir":
        push(path, S_IFDIR | (e.mode ?? 0o755), new Uint8Array(0), 2, [0, 0]);
        break;
      case "file":
        push(path, S_IFREG | (e.mode ?? 0o644), e.data, 1, [0, 0]);
        break;
      case "symlink":
        push(path, S_IFLNK | 0o777, Buffer.from(e.target, "utf8"), 1, [0, 0]);
        break;
      case "char":
        push(path, S_IFCHR | (e.mode ?? 0o600), new Uint8Array(0), 1, [e.major, e.minor]);
        break;
    }
  }
  push("TRAILER!!!", 0, new Uint8Array(0), 1, [0, 0]);
  return Buffer.concat(chunks);
}

/**
 * Add the missing parent directories of every entry, in front of their first use (mode 0755).
 * An explicit dir entry listed after its children is dropped as a duplicate.
 */
export function withParents(entries: CpioEntry[]): CpioEntry[] {
  const out: CpioEntry[] = [];
  const emitted = new Set<string>();
  for (const e of entries) {
    const parts = normalizeCpioPath(e.path).split("/");
    for (let i = 1; i < parts.length; i++) {
      const d = parts.slice(0, i).join("/");
      if (!emitted.has(d)) {
        out.push({ type: "dir", path: d });
        emitted.add(d);
      }
    }
    if (e.type === "dir") {
      const d = normalizeCpioPath(e.path);
      if (emitted.has(d)) continue;
      emitted.add(d);
    }
    out.push(e);
  }
  return out;
}
