import { mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { DaemonLogFile, LineSplitter, MAX_LINE, parseDaemonLine, readLogs } from "./logs.js";

const dirs: string[] = [];
function dir(): string {
  const d = mkdtempSync(join(tmpdir(), "tvlogs-"));
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

const line = (o: Record<string, unknown>): string => `${JSON.stringify({ level: 30, time: Date.parse("2026-01-01T00:00:00Z"), pid: 1, msg: "m", ...o })}\n`;

describe("daemon log", () => {
  it("rotates by size, keeps one generation, and reads both back in order", () => {
    const path = join(dir(), "daemon.log");
    const f = new DaemonLogFile(path, 2048);
    for (let i = 0; i < 100; i++) f.write(line({ msg: `line ${i}`, n: i }));
    f.close();
    expect(statSync(path).size).toBeLessThanOrEqual(2048);
    expect(statSync(`${path}.1`).size).toBeLessThanOrEqual(2048);
    const got = readLogs({ daemon: path }, { limit: 10_000 });
    const ns = got.map((l) => l.fields?.["n"] as number);
    // the newest lines survive, in order, with no gap inside what is kept
    expect(ns.at(-1)).toBe(99);
    expect(ns).toEqual(ns.map((_, i) => ns[0]! + i));
    expect(readLogs({ daemon: path }, { limit: 3 }).map((l) => l.msg)).toEqual(["line 97", "line 98", "line 99"]);
  });

  it("skips what is not one of its JSON lines and filters by VM, level, time and text", () => {
    const path = join(dir(), "daemon.log");
    writeFileSync(
      path,
      [
        "not json\n",
        "[1,2]\n",
        '{"time":"yesterday","msg":"no time"}\n',
        line({ msg: "VM a starting", vm: "a", event: "vm.starting" }),
        line({ level: 50, msg: "boom", vm: "b", err: "ENOSPC" }),
        line({ time: Date.parse("2026-02-01T00:00:00Z"), msg: "later" }),
      ].join(""),
    );
    const all = readLogs({ daemon: path }, { limit: 100 });
    expect(all.map((l) => l.msg)).toEqual(["VM a starting", "boom", "later"]);
    expect(all[1]).toEqual({ time: "2026-01-01T00:00:00.000Z", level: "error", source: "daemon", vm: "b", msg: "boom", fields: { err: "ENOSPC" } });
    expect(readLogs({ daemon: path }, { vm: "a", limit: 100 }).map((l) => l.msg)).toEqual(["VM a starting"]);
    expect(readLogs({ daemon: path }, { level: "warn", limit: 100 }).map((l) => l.msg)).toEqual(["boom"]);
    expect(readLogs({ daemon: path }, { since: Date.parse("2026-01-15T00:00:00Z"), limit: 100 }).map((l) => l.msg)).toEqual(["later"]);
    // fields are searched too, case-insensitively
    expect(readLogs({ daemon: path }, { contains: "enospc", limit: 100 }).map((l) => l.msg)).toEqual(["boom"]);
  });

  it("shows a named VM's VMM log, untimed, after the daemon's lines", () => {
    const d = dir();
    writeFileSync(join(d, "daemon.log"), line({ msg: "VM a started", vm: "a" }));
    writeFileSync(join(d, "vmm.log"), "typevisor: vcpu 0 exited\n\x1b[2Jweird\n");
    const got = readLogs({ daemon: join(d, "daemon.log"), vmm: join(d, "vmm.log") }, { vm: "a", limit: 100 });
    expect(got.map((l) => [l.source, l.time === null, l.msg])).toEqual([
      ["daemon", false, "VM a started"],
      ["vmm", true, "typevisor: vcpu 0 exited"],
      ["vmm", true, "\x1b[2Jweird"],
    ]);
    writeFileSync(join(d, "console.log"), "guest says hi\r\n");
    const paths = { daemon: join(d, "daemon.log"), vmm: join(d, "vmm.log"), console: join(d, "console.log") };
    // the console only when asked; vmm and console only for a named VM
    expect(readLogs(paths, { vm: "a", limit: 100 }).some((l) => l.source === "console")).toBe(false);
    expect(readLogs(paths, { vm: "a", limit: 100, sources: ["console"] }).map((l) => [l.source, l.msg])).toEqual([["console", "guest says hi"]]);
    expect(readLogs(paths, { limit: 100, sources: ["console", "vmm"] })).toEqual([]);
  });

  it("cuts runaway lines and parses nothing it should not", () => {
    const got: string[] = [];
    const s = new LineSplitter((l) => got.push(l));
    s.push("ab");
    s.push("c\nd");
    s.push("x".repeat(MAX_LINE + 5));
    s.push("\n");
    expect(got[0]).toBe("abc");
    expect(got[1]!.length).toBe(MAX_LINE);
    expect(parseDaemonLine('{"time":1e400,"msg":"x"}')).toBeUndefined();
    expect(parseDaemonLine(`{"time":1,"msg":"${"y".repeat(MAX_LINE * 5)}"}`)).toBeUndefined();
    expect(parseDaemonLine('{"time":1,"msg":7}')?.msg).toBe("");
  });
});
