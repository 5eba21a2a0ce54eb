/**
 * A full disk, wherever it shows (a copy into the data directory, a disk being made, the SQLite
 * inventory), becomes one typed error that names the full file system: the operator learns which
 * mount to free, and the API answers 507 Insufficient Storage (RFC 4918 §11.5) instead of 500.
 */
import { TypevisorError } from "../errors.js";
import { formatBytes } from "../size.js";
import { filesystemOf } from "../sys/mounts.js";

/** ENOSPC (no blocks or inodes left), EDQUOT (a quota), SQLite's SQLITE_FULL (its write hit either). */
export function isDiskFull(e: unknown): boolean {
  const code = (e as { code?: unknown } | null | undefined)?.code;
  return code === "ENOSPC" || code === "EDQUOT" || code === "SQLITE_FULL";
}

/**
 * `e` as DISK_FULL when it is a full disk, else `e` itself. The path is the one the failed call
 * names (Node's fs errors carry `dest`, then `path`), else `fallback` (the inventory's file for SQLite).
 */
export function diskFullError(e: unknown, fallback: string): unknown {
  if (!isDiskFull(e) || e instanceof TypevisorError) return e;
  const err = e as { dest?: unknown; path?: unknown; code: string };
  const path = typeof err.dest === "string" && !err.dest.startsWith("/proc/") ? err.dest : typeof err.path === "string" && !err.path.startsWith("/proc/") ? err.path : fallback;
  const fs = filesystemOf(path);
  const where = fs !== undefined ? `${fs.mountPoint} (${fs.fsType}, ${formatBytes(fs.freeBytes)} free of ${formatBytes(fs.totalBytes)})` : `the file system of ${path}`;
  const why = err.code === "EDQUOT" ? "a disk quota is exhausted on" : "no space left on";
  return new TypevisorError("DISK_FULL", `${why} ${where}, writing ${path}`, {
    cause: e,
    hint: "free space on that file system (or raise the quota), then retry",
  });
}
