/**
 * The headless console's pure parts: the rotation plan (no file ever exceeds
 * the limit, no byte is lost or reordered, rotation happens only when a write
 * would not fit), then the real file rotation on a temporary directory.
 */
import { existsSync, mkdtempSync, readFileSync, statSync, writeFileSync } from "node:fs";
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
});
