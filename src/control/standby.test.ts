/**
 * The standby pool's readiness wait (standby.ts): a standby counts as ready once its socket
 * answers, within the daemon's start timeout, and one that does not answer by then is ended. The
 * standbys here are real processes on real unix sockets, started through the pool's jailer hook:
 * a small HTTP server that answers GET /vm only after a delay, as a standby that builds its
 * template's VM before it listens does.
 */
import { spawn } from "node:child_process";
import { mkdtempSync, openSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import { afterEach, describe, expect, it } from "vitest";
import { until } from "../../test/helpers/daemon.js";
import { processAlive } from "./proc.js";
import { StandbyPool, type StandbyJailer } from "./standby.js";

/** A jailer whose standbys answer `delayMs` after they start. */
function slowJailer(delayMs: number, pids: number[]): StandbyJailer {
  return {
    spawn: async (_key, _template, files) => {
      const script = `setTimeout(() => require("node:http").createServer((q, r) => { r.setHeader("content-type", "application/json"); r.end(JSON.stringify({ state: "standby", pid: process.pid })); }).listen(${JSON.stringify(files.socket)}), ${delayMs});`;
      const child = spawn(process.execPath, ["-e", script], { stdio: "ignore" });
      await new Promise((r) => child.once("spawn", r));
      pids.push(child.pid!);
      return { child, pid: child.pid!, uid: 0, fdSocket: openSync("/dev/null", "r") };
    },
    release: () => undefined,
    sweep: () => undefined,
  };
}

describe("standby pool: readiness within the start timeout", () => {
  const pools: StandbyPool[] = [];
  const dirs: string[] = [];
  afterEach(() => {
    for (const p of pools.splice(0)) p.close();
    for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
  });

  const pool = (delayMs: number, readyTimeoutMs: number, pids: number[]): StandbyPool => {
    const home = mkdtempSync(join(tmpdir(), "tvstandby-"));
    dirs.push(home);
    const p = new StandbyPool({ home, size: 1, forceKvm: false, log: pino({ level: "silent" }), readyTimeoutMs, jail: slowJailer(delayMs, pids) });
    pools.push(p);
    p.start();
    p.want({ id: "snap1", dir: join(home, "snap1") });
    return p;
  };

  it("a standby that answers late but within the timeout is kept, and ready once it answers", async () => {
    const pids: number[] = [];
    const p = pool(1500, 20_000, pids);
    expect(p.ready()).toBe(0);
    const t0 = Date.now();
    await until("the standby counted ready", () => p.ready() === 1, 15_000);
    expect(p.ready()).toBe(1);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(1000);
    expect(pids.length).toBe(1);
    expect(processAlive(pids[0]!)).toBe(true);
  });

  it("one that does not answer within the timeout is ended, and not counted", async () => {
    const pids: number[] = [];
    const p = pool(30_000, 800, pids);
    await until("the standby ended", () => pids.length === 1 && !processAlive(pids[0]!), 10_000);
    expect(pids.length).toBe(1);
    expect(processAlive(pids[0]!)).toBe(false);
    expect(p.ready()).toBe(0);
  });
});
