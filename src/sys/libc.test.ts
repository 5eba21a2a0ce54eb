import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { parseStatFields } from "../control/proc.js";
import * as libc from "./libc.js";

/** The mappings of this process that overlap [start, end), from /proc/self/maps. */
function mapsOverlapping(start: bigint, end: bigint): string[] {
  return readFileSync("/proc/self/maps", "utf8")
    .split("\n")
    .filter((l) => {
      const m = /^([0-9a-f]+)-([0-9a-f]+) /.exec(l);
      return m !== null && BigInt(`0x${m[1]}`) < end && BigInt(`0x${m[2]}`) > start;
    });
}

describe("mmapAligned", () => {
  it("returns a usable mapping that starts on the alignment, and munmap releases all of it", () => {
    const align = 2 * 1024 * 1024;
    for (const length of [4096, align, 3 * align + 8192]) {
      const m = libc.mmapAligned(length, align, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE);
      try {
        expect(m.address % BigInt(align)).toBe(0n);
        expect(m.length).toBe(length);
        const bytes = new Uint8Array(libc.view(m.pointer, length));
        bytes[0] = 7;
        bytes[length - 1] = 9;
        expect(bytes[0]! + bytes[length - 1]!).toBe(16);
        // One mapping covers all of it (the kernel may merge it with a neighbour, so not "starts here").
        expect(mapsOverlapping(m.address, m.address + BigInt(length))).toHaveLength(1);
      } finally {
        libc.munmap(m);
      }
      expect(mapsOverlapping(m.address, m.address + BigInt(length))).toEqual([]);
    }
  });
});

/** Field 19 of /proc/PID/stat: the nice value (proc(5)). */
const procNice = (pid: number): number => Number(parseStatFields(readFileSync(`/proc/${pid}/stat`, "utf8"))![19]);

describe("threadNice / setThreadNice", () => {
  it("read and raise another task's nice value, as the kernel reports it", async () => {
    const child = spawn("sleep", ["30"], { stdio: "ignore" });
    try {
      const pid = child.pid!;
      const before = libc.threadNice(pid);
      expect(before).toBe(procNice(pid));
      const target = Math.min(19, before + 4);
      libc.setThreadNice(pid, target);
      expect(libc.threadNice(pid)).toBe(target);
      expect(procNice(pid)).toBe(target);
    } finally {
      child.kill();
    }
  });

  it("fail with the errno for a thread that does not exist", () => {
    // pid_max is at most 2^22 (proc(5)), so this id names nothing.
    expect(() => libc.threadNice(0x7fff_fff0)).toThrow(/ESRCH/);
    expect(() => libc.setThreadNice(0x7fff_fff0, 5)).toThrow(/ESRCH/);
  });
});
