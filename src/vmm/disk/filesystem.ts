/**
 * Which filesystem a file lives on, for messages a person acts on ("the filesystem /srv/pool
 * (tmpfs) is full: 0 B free of 8.0 MiB"): its mount point and type from /proc/self/mountinfo
 * (proc(5): field 5 the mount point, octal-escaped; after the " - " separator the type and the
 * source), the longest mount point that contains the file's real path; sizes from statfs(2).
 */
import { readFileSync, realpathSync, statfsSync } from "node:fs";
import { dirname, sep } from "node:path";

export interface FilesystemInfo {
  mountPoint: string;
  /** e.g. ext4, xfs, tmpfs; "unknown" when /proc is not there. */
  type: string;
  /** What is mounted (a device, or the filesystem's name for virtual ones). */
  source: string;
  sizeBytes: number;
  /** What an unprivileged writer may still use (f_bavail). */
  freeBytes: number;
}

/** mountinfo escapes space, tab, newline and backslash as \ooo (octal). */
function unescape(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/** Mount points and their type and source from mountinfo text; later lines (mounted over) win. */
export function parseMountinfo(text: string): { mountPoint: string; type: string; source: string }[] {
  const out: { mountPoint: string; type: string; source: string }[] = [];
  for (const line of text.split("\n")) {
    const parts = line.split(" ");
    const dash = parts.indexOf("-");
    if (dash < 6 || parts.length < dash + 3) continue;
    out.push({ mountPoint: unescape(parts[4]!), type: parts[dash + 1]!, source: unescape(parts[dash + 2]!) });
  }
  return out;
}

/** The filesystem holding `path` (a file or directory that exists, or the nearest existing parent). */
export function filesystemOf(path: string): FilesystemInfo {
  let real = path;
  for (let p = path; ; p = dirname(p)) {
    try {
      real = realpathSync(p);
      break;
    } catch {
      if (dirname(p) === p) break;
    }
  }
  let best = { mountPoint: "/", type: "unknown", source: "unknown" };
  try {
    for (const m of parseMountinfo(readFileSync("/proc/self/mountinfo", "utf8"))) {
      const inside = m.mountPoint === "/" || real === m.mountPoint || real.startsWith(m.mountPoint.endsWith(sep) ? m.mountPoint : m.mountPoint + sep);
      // Equal length: a later mount on the same point hides the earlier one.
      if (inside && m.mountPoint.length >= best.mountPoint.length) best = m;
    }
  } catch {
    // No /proc: the root, type unknown.
  }
  let sizeBytes = 0;
  let freeBytes = 0;
  try {
    const s = statfsSync(real);
    sizeBytes = s.blocks * s.bsize;
    freeBytes = s.bavail * s.bsize;
  } catch {
    // Gone meanwhile: sizes unknown (0).
  }
  return { ...best, sizeBytes, freeBytes };
}
