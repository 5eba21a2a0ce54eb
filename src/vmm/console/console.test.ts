/**
 * The headless console's pure parts: the rotation plan (no file ever exceeds
 * the limit, no byte is lost or reordered, rotation happens only when a write
 * would not fit), then the real file rotation on a temporary directory.
 */
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { planAppend, RotatingLog } from "./rotating-log.js";

describe("planAppend", () => {
  /** Replay a plan: the sizes of every generation written (the last is the live file). */
  function replay(start: number, plans: LogPlanStep[], max: number): { files: number[]; written: number } {
    const files = [start];
    let written = 0;
    for (const step of plans) {
      for (const p of planAppend(files[files.length - 1]!, step.len, max)) {
        if (p.rotateBefore) files.push(0);
        files[files.length - 1]! += p.length;
        written += p.length;
      }
    }
    return { files, written };
  }
  interface LogPlanStep { len: number }

  it("never lets a file exceed the limit, loses nothing, rotates only when a write does not fit", () => {
    fc.assert(fc.property(
      fc.integer({ min: 64, max: 5000 }),
      fc.integer({ min: 0, max: 5000 }),
      fc.array(fc.integer({ min: 0, max: 6000 }), { maxLength: 12 }),
      (max, startRaw, lens) => {
        const start = Math.min(startRaw, max);
        const { files, written } = replay(start, lens.map((len) => ({ len })), max);
        expect(written).toBe(lens.reduce((a, b) => a + b, 0));
        for (const f of files) expect(f).toBeLessThanOrEqual(max);
        // Every rotated-away generation was non-empty.
        for (const f of files.slice(0, -1)) expect(f).toBeGreaterThan(0);
      },
    ));
  });

  it("appends in place while the write fits", () => {
    expect(planAppend(10, 90, 100)).toEqual([{ rotateBefore: false, length: 90 }]);
    expect(planAppend(10, 91, 100)).toEqual([{ rotateBefore: true, length: 91 }]);
    expect(planAppend(0, 250, 100)).toEqual([
      { rotateBefore: false, length: 100 }, { rotateBefore: true, length: 100 }, { rotateBefore: true, length: 50 },
    ]);
    expect(planAppend(5, 0, 100)).toEqual([]);
  });
});

describe("RotatingLog", () => {
  it("renames PATH to PATH.1 (replacing an older one) and starts a fresh PATH", () => {
    const dir = mkdtempSync(join(tmpdir(), "tv-log-"));
    const path = join(dir, "c.log");
    writeFileSync(`${path}.1`, "ancient");
    writeFileSync(path, "abc"); // appended to, not truncated
    const log = new RotatingLog(path, 1024);
    log.write(Buffer.alloc(1000, 0x61));
    expect(existsSync(`${path}.1`)).toBe(true);
    expect(readFileSync(`${path}.1`, "utf8")).toBe("ancient");
    log.write(Buffer.alloc(100, 0x62));
    expect(readFileSync(`${path}.1`, "utf8")).toBe("abc" + "a".repeat(1000));
    expect(readFileSync(path, "utf8")).toBe("b".repeat(100));
    log.write(Buffer.alloc(3000, 0x63));
    log.close();
    expect(statSync(path).size).toBeLessThanOrEqual(1024);
    expect(statSync(`${path}.1`).size).toBe(1024);
  });

  it("drops what a full disk refuses, says so once (onDrop) and goes on: /dev/full", () => {
    const codes: string[] = [];
    const log = new RotatingLog("/dev/full", 1 << 20, (c) => codes.push(c));
    log.write(Buffer.alloc(100, 0x61));
    log.write(Buffer.alloc(50, 0x61));
    log.close();
    expect(log.droppedBytes).toBe(150);
    expect(codes).toEqual(["ENOSPC"]);
  });

  // A real full file system: a tmpfs of 64 KiB (mounting needs root; CI runs as root).
  it.skipIf(process.getuid?.() !== 0)("on a file system that fills and is freed: what fitted is kept, the rest is counted, and a note comes before the next output", () => {
    const dir = mkdtempSync(join(tmpdir(), "tv-full-"));
    execFileSync("mount", ["-t", "tmpfs", "-o", "size=64k", "tmpfs", dir]);
    try {
      const path = join(dir, "c.log");
      const codes: string[] = [];
      const log = new RotatingLog(path, 1 << 20, (c) => codes.push(c));
      log.write(Buffer.from("before\n"));
      // fill what is left: 64 KiB less the log's one page
      writeFileSync(join(dir, "filler"), Buffer.alloc(60 * 1024));
      log.write(Buffer.alloc(8192, 0x62)); // the log's page has room for 4089 of these
      log.write(Buffer.alloc(100, 0x63));
      expect(codes).toEqual(["ENOSPC"]);
      const kept = statSync(path).size;
      expect(kept).toBe(4096);
      expect(log.droppedBytes).toBe(8192 + 100 - (4096 - 7));
      rmSync(join(dir, "filler"));
      log.write(Buffer.from("after\n"));
      log.close();
      const text = readFileSync(path, "latin1");
      expect(text.slice(kept)).toBe(`\r\n[typevisor: ${log.droppedBytes} bytes of console output dropped: the log could not be written]\r\nafter\n`);
      expect(text.slice(0, kept)).toBe("before\n" + "b".repeat(4089));
    } finally {
      execFileSync("umount", [dir]);
      rmSync(dir, { recursive: true });
    }
  });
});
