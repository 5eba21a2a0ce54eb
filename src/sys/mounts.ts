/**
 * Which mounted file system holds a path, and how full it is: for errors that must name the full
 * file system ("no space left on /var/lib/typevisor (ext4, 0 B free of 20 GiB)") and for anything
 * else that reads the mount table.
 */
import { existsSync, readFileSync, realpathSync, statfsSync } from "node:fs";
import { dirname } from "node:path";

export interface MountEntry {
  mountPoint: string;
  fsType: string;
  superOptions: string[];
}

/** mountinfo escapes space, tab, newline and backslash in paths as octal (\040, \011, \012, \134). */
function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/**
 * /proc/PID/mountinfo (proc(5)): "id parent major:minor root mount-point options [optional...] -
 * fstype source super-options"; the optional fields vary in number, so fstype is found after "-".
 */
export function parseMountinfo(text: string): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of text.split("\n")) {
    const f = line.split(" ");
    const dash = f.indexOf("-", 6);
    const mountPoint = f[4];
    const fsType = f[dash + 1];
    if (dash < 0 || mountPoint === undefined || fsType === undefined) continue;
    out.push({ mountPoint: unescapeMount(mountPoint), fsType, superOptions: (f[dash + 3] ?? "").split(",") });
  }
  return out;
}

export interface FilesystemInfo {
  mountPoint: string;
  fsType: string;
  totalBytes: number;
  /** What an unprivileged writer may still use (statfs f_bavail). */
  freeBytes: number;
}

/**
 * The file system `path` lives on: its nearest existing ancestor, symlinks resolved, matched to the
 * longest mount point (the last such entry wins: a later mount over the same point hides earlier
 * ones). Undefined when none of that can be read; callers use it for messages, never for decisions.
 */
export function filesystemOf(path: string, mountinfo?: string): FilesystemInfo | undefined {
  try {
    let p = path;
    while (!existsSync(p) && dirname(p) !== p) p = dirname(p);
    const real = realpathSync(p);
    let best: MountEntry | undefined;
    for (const m of parseMountinfo(mountinfo ?? readFileSync("/proc/self/mountinfo", "utf8"))) {
      const under = m.mountPoint === "/" || real === m.mountPoint || real.startsWith(m.mountPoint + "/");
      if (under && (best === undefined || m.mountPoint.length >= best.mountPoint.length)) best = m;
    }
    if (best === undefined) return undefined;
    const s = statfsSync(real);
    return { mountPoint: best.mountPoint, fsType: best.fsType, totalBytes: s.blocks * s.bsize, freeBytes: s.bavail * s.bsize };
  } catch {
    return undefined;
  }
}
