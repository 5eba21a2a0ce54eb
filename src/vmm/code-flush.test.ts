/**
 * keepCompiledCode against V8 itself: a child node with `--stress-flush-code` (flush whatever
 * has aged, at every full collection) and `--trace-flush-bytecode` (a line per function
 * flushed), and full collections driven by external memory as a migration stream's reads drive
 * them. Held: nothing is flushed; released: flushing is back.
 */
import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { describe, expect, it } from "vitest";

const built = new URL("../../dist/vmm/code-flush.js", import.meta.url);
if (!existsSync(built)) throw new Error("run `npm run build` first: the child loads dist/");

const child = (mode: "hold" | "released" | "none"): number => {
  const script = `
    import { keepCompiledCode } from ${JSON.stringify(built.href)};
    const churn = () => { let keep = []; for (let i = 0; i < 16 * 4096; i++) { keep.push(Buffer.allocUnsafeSlow(65536)); if (keep.length > 64) keep = []; } };
    const release = ${JSON.stringify(mode)} === "none" ? () => {} : keepCompiledCode();
    (function ranOnce() { return 1; })();
    if (${JSON.stringify(mode)} === "released") { release(); release(); }
    churn();
    console.log("end");
  `;
  const out = execFileSync(process.execPath, ["--stress-flush-code", "--trace-flush-bytecode", "--input-type=module", "-e", script], { encoding: "utf8", timeout: 60_000 });
  expect(out).toContain("end");
  return out.split("\n").filter((l) => l.includes("discarding compiled metadata")).length;
};

describe("keepCompiledCode", () => {
  it("stops V8 flushing bytecode while held, and gives it back when released", () => {
    expect(child("none")).toBeGreaterThan(0);
    expect(child("hold")).toBe(0);
    expect(child("released")).toBeGreaterThan(0);
  }, 60_000);
});
