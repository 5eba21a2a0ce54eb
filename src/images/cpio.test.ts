import { execFileSync, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import { normalizeCpioPath, withParents, writeNewc, type CpioEntry } from "./cpio.js";

const hasCpio = spawnSync("cpio", ["--version"]).status === 0;

/** Debian's cpio reads back what we wrote. */
function cpioList(archive: Buffer): string[] {
  return execFileSync("cpio", ["-itv", "--quiet"], { input: archive, env: { ...process.env, LC_ALL: "C", TZ: "UTC" } })
    .toString()
    .trim()
    .split("\n");
}

function cpioCat(archive: Buffer, path: string): Buffer {
  return execFileSync("cpio", ["-i", "--to-stdout", "--quiet", path], { input: archive });
}

describe("writeNewc", () => {
  it.skipIf(!hasCpio)("writes archives Debian's cpio lists and extracts byte-exact, for every name/data padding", () => {
    const entries: CpioEntry[] = [{ type: "dir", path: "d", mode: 0o750 }];
    const datas = new Map<string, Buffer>();
    // name lengths 1..8 and data lengths 0..8 cover every padding case of the 4-byte alignment
    for (let n = 1; n <= 8; n++) {
      const name = `d/${"x".repeat(n)}`;
      const data = randomBytes(n + (n % 3) - 1);
      datas.set(name, data);
      entries.push({ type: "file", path: name, data, mode: 0o640 });
    }
    entries.push({ type: "symlink", path: "d/link", target: "/bin/busybox" });
    entries.push({ type: "char", path: "console", major: 5, minor: 1 });
    const archive = writeNewc(entries);
    expect(archive.length % 4).toBe(0);
    const listing = cpioList(archive);
    expect(listing).toHaveLength(entries.length);
    expect(listing[0]).toMatch(/^drwxr-x---\s+2 root\s+root\s+0 .* d$/);
    expect(listing.find((l) => l.endsWith(" d/link -> /bin/busybox"))).toMatch(/^lrwxrwxrwx/);
    expect(listing.find((l) => l.endsWith(" console"))).toMatch(/^crw-------\s+1 root\s+root\s+5,\s+1 /);
    for (const [name, data] of datas) {
      expect(listing.find((l) => l.endsWith(` ${name}`))).toMatch(new RegExp(`^-rw-r-----\\s+1 root\\s+root\\s+${data.length} `));
      expect(cpioCat(archive, name).equals(data)).toBe(true);
    }
  });

  it("starts with the newc magic and ends with the trailer", () => {
    const archive = writeNewc([{ type: "file", path: "/init", data: Buffer.from("#!/bin/sh\n") }]);
    expect(archive.subarray(0, 6).toString()).toBe("070701");
    expect(archive.includes(Buffer.from("TRAILER!!!\0"))).toBe(true);
    // name "init\0": namesize field (chars 94..101 of the header) is 5
    expect(parseInt(archive.subarray(94, 102).toString(), 16)).toBe(5);
  });

  it("rejects duplicate entries, '..' and empty paths", () => {
    expect(() => writeNewc([{ type: "dir", path: "a" }, { type: "dir", path: "/a/" }])).toThrow(/duplicate/);
    expect(() => normalizeCpioPath("a/../../etc")).toThrow(/bad path/);
    expect(() => normalizeCpioPath("/")).toThrow(/bad path/);
    expect(normalizeCpioPath("/./lib//modules/")).toBe("lib/modules");
  });
});

describe("withParents", () => {
  it("adds each missing parent once, before its first child", () => {
    const out = withParents([
      { type: "file", path: "lib/modules/k/a.ko", data: Buffer.alloc(1) },
      { type: "file", path: "lib/modules/k/b.ko", data: Buffer.alloc(1) },
      { type: "dir", path: "lib" },
    ]);
    const paths = out.map((e) => e.path);
    expect(paths).toEqual(["lib", "lib/modules", "lib/modules/k", "lib/modules/k/a.ko", "lib/modules/k/b.ko"]);
  });
});
