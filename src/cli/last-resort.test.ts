import { spawnSync } from "node:child_process";
import { describe, expect, it } from "vitest";

const MODULE = new URL("../../dist/cli/last-resort.js", import.meta.url).pathname;

/** A child process with the handler installed that throws from a timer, emits an unheard `error` and rejects a promise nobody awaits. */
const SCRIPT = `
import { installLastResort } from ${JSON.stringify(MODULE)};
import { EventEmitter } from "node:events";
import { pino } from "pino";
const reports = [];
const lr = installLastResort(pino({ level: "error" }, process.stderr), (kind, message) => reports.push(kind + ": " + message));
setTimeout(() => { throw new Error("boom in a timer"); }, 1);
setTimeout(() => new EventEmitter().emit("error", new Error("nobody listens")), 5);
setTimeout(() => { void Promise.reject(new Error("nobody awaits")); }, 10);
setTimeout(() => { console.log(JSON.stringify({ alive: true, faults: lr.faults(), reports })); }, 100);
`;

describe("the daemon's last-resort handler", () => {
  it("logs and reports what escaped every handler, and the process keeps running", () => {
    const r = spawnSync(process.execPath, ["--input-type=module", "-e", SCRIPT], { encoding: "utf8", timeout: 20_000, cwd: new URL("../..", import.meta.url).pathname });
    expect(r.status, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout.trim()) as { alive: boolean; faults: number; reports: string[] };
    expect(out).toEqual({
      alive: true,
      faults: 3,
      reports: ["uncaught exception: boom in a timer", "uncaught exception: nobody listens", "unhandled rejection: nobody awaits"],
    });
    // each fault is in the log with its stack, at error level
    expect(r.stderr.match(/last-resort handler caught/g)?.length).toBe(3);
    expect(r.stderr).toContain("boom in a timer");
  });

  it("without it, the same timer throw ends the process (the test can fail)", () => {
    const r = spawnSync(process.execPath, ["-e", "setTimeout(() => { throw new Error('boom'); }, 1); setTimeout(() => console.log('alive'), 100);"], { encoding: "utf8", timeout: 20_000 });
    expect(r.status).not.toBe(0);
    expect(r.stdout).not.toContain("alive");
  });
});
