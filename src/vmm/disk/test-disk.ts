/**
 * Test helpers for disk backends: whole-buffer reads and writes, and QEMU's own tools
 * (qemu-img from Debian's qemu-utils) as the judge of what we write and the maker of what we read.
 */
import { execFileSync, spawnSync } from "node:child_process";
import { readFileSync, rmSync } from "node:fs";
import { addressOf, IoVec } from "../../sys/iov.js";
import type { DiskBackend } from "./backend.js";

/** Read or write all of `buf` at `pos` through `b`; returns 0 or -errno. `buf` must be larger than 64 bytes (off V8's heap). */
export function io(b: DiskBackend, buf: Buffer, pos: number, write: boolean): number {
  const v = new IoVec();
  // Requests of at most 1 MiB in pieces of at most 4 KiB, as a guest's would be (256 pieces fit a request).
  for (let req = 0; req < buf.length; req += 1024 * 1024) {
    v.clear();
    const end = Math.min(buf.length, req + 1024 * 1024);
    for (let at = req; at < end; at += 4096) v.push(addressOf(buf) + at, Math.min(4096, end - at));
    const r = write ? b.writev(v, pos + req) : b.readv(v, pos + req);
    if (r !== 0) return r;
  }
  return 0;
}

export function readAll(b: DiskBackend, pos: number, len: number): Buffer {
  const buf = Buffer.alloc(len);
  const r = io(b, buf, pos, false);
  if (r !== 0) throw new Error(`read at ${pos} failed: ${r}`);
  return buf;
}

export function qemuImg(args: string[]): string {
  return execFileSync("qemu-img", args, { encoding: "utf8", timeout: 120_000, stdio: ["ignore", "pipe", "pipe"] });
}

/**
 * `qemu-img check`: its exit status (0 clean, 1 could not check, 2 corrupt, 3 leaked clusters only)
 * and JSON report. stderr is dropped: qemu-img prints a line there per leaked cluster, and with
 * 512 B clusters tens of thousands of them overflowed a pipe buffer (no status, no report).
 */
export function qemuCheck(path: string): { status: number | null; report: { "check-errors"?: number; leaks?: number; corruptions?: number } } {
  const r = spawnSync("qemu-img", ["check", "--output=json", "-f", "qcow2", path], { encoding: "utf8", timeout: 120_000, stdio: ["ignore", "pipe", "ignore"], maxBuffer: 64 * 1024 * 1024 });
  let report = {};
  try {
    report = JSON.parse(r.stdout || "{}") as object;
  } catch {
    // the status says it
  }
  return { status: r.status, report };
}

/** What QEMU reads from an image: `qemu-img convert -O raw` into `scratch` (removed after). */
export function qemuRaw(path: string, scratch: string): Buffer {
  qemuImg(["convert", "-f", "qcow2", "-O", "raw", path, scratch]);
  const b = readFileSync(scratch);
  rmSync(scratch);
  return b;
}

/** A deterministic pattern: byte i of it depends on seed and on the absolute disk offset. */
export function pattern(len: number, pos: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) {
    const x = (pos + i) * 2654435761 + seed * 40503;
    b[i] = (x ^ (x >>> 13)) & 0xff;
  }
  return b;
}
