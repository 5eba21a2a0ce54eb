import { spawn, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import { afterEach, describe, expect, it } from "vitest";
import { parseStatFields, parseVmRss, processAlive, processCmdline, processStartTime, processUsage } from "./proc.js";

const children: ChildProcess[] = [];
afterEach(() => {
  for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
});

function sleeper(): ChildProcess & { pid: number } {
  const c = spawn("sleep", ["30"], { stdio: "ignore" });
  children.push(c);
  if (c.pid === undefined) throw new Error("sleep did not start");
  return c as ChildProcess & { pid: number };
}

describe("parseStatFields", () => {
  it("splits after the last ')' so a comm with spaces and parentheses does not shift fields", () => {
    const rest = Array.from({ length: 50 }, (_, i) => String(i + 3)); // fields 3..52 hold their own number
    rest[0] = "S";
    const f = parseStatFields(`1234 (a) b (c)) ${rest.join(" ")}\n`)!;
    expect(f[1]).toBe("1234");
    expect(f[2]).toBe("a) b (c)");
    expect(f[3]).toBe("S");
    expect(f[14]).toBe("14");
    expect(f[22]).toBe("22");
  });

  it("rejects a line without a comm", () => {
    expect(parseStatFields("garbage")).toBeUndefined();
  });
});

describe("parseVmRss", () => {
  it("reads kB as KiB, and 0 when absent (kernel threads)", () => {
    expect(parseVmRss("Name:\tx\nVmRSS:\t    2048 kB\nThreads: 1\n")).toBe(2048 * 1024);
    expect(parseVmRss("Name:\tkthreadd\nThreads: 1\n")).toBe(0);
  });
});

describe("readers on live processes", () => {
  it("read this process", () => {
    const start = processStartTime(process.pid);
    expect(start).toMatch(/^\d+$/);
    expect(processAlive(process.pid)).toBe(true);
    expect(processAlive(process.pid, start)).toBe(true);
    expect(processAlive(process.pid, `${start}1`)).toBe(false);
    expect(processCmdline(process.pid)?.[0]).toBeTruthy();
    const u = processUsage(process.pid)!;
    expect(u.cpuSeconds).toBeGreaterThan(0);
    expect(u.rssBytes).toBeGreaterThan(1 << 20);
  });

  it("read a spawned sleep, and see it gone after it dies (start time guards the pid)", async () => {
    const c = sleeper();
    // Under load the child may be seen between its fork and its exec for a moment (node's cmdline, no RSS of its own yet).
    for (const end = Date.now() + 5000; JSON.stringify(processCmdline(c.pid)) !== '["sleep","30"]' && Date.now() < end; ) await new Promise((r) => setTimeout(r, 10));
    const start = processStartTime(c.pid);
    expect(start).toBeDefined();
    expect(processCmdline(c.pid)).toEqual(["sleep", "30"]);
    expect(processAlive(c.pid, start)).toBe(true);
    // a later process has a later start time: the start time of ours tells them apart
    expect(BigInt(start!)).toBeGreaterThanOrEqual(BigInt(processStartTime(process.pid)!));
    expect(processUsage(c.pid)?.rssBytes).toBeGreaterThan(0);

    c.kill("SIGKILL");
    await once(c, "exit"); // node reaps it: the pid is free
    expect(processStartTime(c.pid)).toBeUndefined();
    expect(processAlive(c.pid)).toBe(false);
    expect(processAlive(c.pid, start)).toBe(false);
    expect(processCmdline(c.pid)).toBeUndefined();
    expect(processUsage(c.pid)).toBeUndefined();
  });

  it("treats an unreaped zombie as dead", async () => {
    // sh execs sleep 0 as a child it never waits for while it sleeps itself: a zombie grandchild
    const c = spawn("sh", ["-c", "sleep 0 & echo $!; exec sleep 5"], { stdio: ["ignore", "pipe", "ignore"] });
    children.push(c);
    const [line] = (await once(c.stdout!, "data")) as [Buffer];
    const zombie = Number(line.toString().trim());
    for (let i = 0; i < 100 && processAlive(zombie); i++) await new Promise((r) => setTimeout(r, 20));
    expect(processAlive(zombie)).toBe(false);
    expect(processStartTime(zombie)).toBeDefined(); // still in /proc until reaped
  });

  it("answers 'no such process' for pids that cannot exist", () => {
    for (const pid of [0, -1, 1.5, Number.NaN, 2 ** 40]) {
      expect(processStartTime(pid)).toBeUndefined();
      expect(processAlive(pid)).toBe(false);
      expect(processCmdline(pid)).toBeUndefined();
      expect(processUsage(pid)).toBeUndefined();
    }
  });
});
