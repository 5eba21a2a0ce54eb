import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { filesystemOf, parseMountinfo } from "./mounts.js";

const line = (id: number, mountPoint: string, fsType: string): string => `${id} 1 0:${id} / ${mountPoint} rw,relatime shared:${id} - ${fsType} ${fsType} rw`;

describe("parseMountinfo", () => {
  it("finds fstype after the optional fields and unescapes octal in paths", () => {
    const m = parseMountinfo(`36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue\n41 1 0:41 / /sys/fs/cgroup rw,relatime shared:41 - cgroup2 cgroup2 rw,nsdelegate\n`);
    expect(m).toEqual([
      { mountPoint: "/mnt two", fsType: "ext3", superOptions: ["rw", "errors=continue"] },
      { mountPoint: "/sys/fs/cgroup", fsType: "cgroup2", superOptions: ["rw", "nsdelegate"] },
    ]);
  });
});

describe("filesystemOf", () => {
  it("takes the longest mount point that holds the path's nearest existing ancestor, the last of equals", () => {
    const dir = mkdtempSync(join(tmpdir(), "tv-mounts-"));
    try {
      mkdirSync(`${dir}x`);
      const table = [line(1, "/", "ext4"), line(2, dir, "xfs"), line(3, dir, "tmpfs")].join("\n");
      expect(filesystemOf(join(dir, "not", "yet", "made"), table)).toMatchObject({ mountPoint: dir, fsType: "tmpfs" });
      // a mount point is a prefix only up to a slash
      expect(filesystemOf(`${dir}x`, table)).toMatchObject({ mountPoint: "/", fsType: "ext4" });
    } finally {
      rmSync(dir, { recursive: true });
      rmSync(`${dir}x`, { recursive: true });
    }
  });

  it("on this host gives /proc's own mount and real sizes", () => {
    expect(filesystemOf("/proc/self/status")).toMatchObject({ mountPoint: "/proc", fsType: "proc" });
    const root = filesystemOf("/");
    expect(root?.mountPoint).toBe("/");
    expect(root?.totalBytes).toBeGreaterThan(0);
  });
});
