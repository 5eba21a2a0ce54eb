/**
 * A real typevisor daemon for tests: `node bin/typevisor.js daemon` in its own
 * home directory, reached through the exported TypevisorClient.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { TypevisorClient } from "../../src/api/client.js";

/** bin/typevisor.js, found upwards from here (this file also runs compiled from dist-bench/test/helpers). */
function findBin(): string {
  for (let up = "../../"; up.length < 16; up += "../") {
    const p = new URL(`${up}bin/typevisor.js`, import.meta.url).pathname;
    if (existsSync(p)) return p;
  }
  throw new Error("bin/typevisor.js not found above " + import.meta.url);
}
export const BIN = findBin();

export interface TestDaemon {
  home: string;
  socket: string;
  client: TypevisorClient;
  proc: ChildProcess;
  log: () => string;
  /** SIGTERM (default) or SIGKILL, and wait for the exit. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/**
 * How long a daemon may take to answer its first health request. In the lab everything runs under
 * emulation on one CPU, beside the guests a test already started: node alone takes seconds there.
 */
const START_TIMEOUT_MS = process.env["TYPEVISOR_IN_LAB"] === "1" ? 120_000 : 20_000;

/** `prefix`: a command the daemon runs under (e.g. `ip netns exec NS`: a daemon in another network namespace). */
export async function startDaemon(opts: { home?: string; socket?: string; args?: string[]; env?: Record<string, string>; prefix?: string[] } = {}): Promise<TestDaemon> {
  const home = opts.home ?? mkdtempSync(join(tmpdir(), "tvd-"));
  const socket = opts.socket ?? join(home, "typevisor.sock");
  let out = "";
  const argv = [BIN, "daemon", "--home", home, "--usage-interval", "1", ...(opts.socket !== undefined ? ["--socket", opts.socket] : []), ...(opts.args ?? [])];
  const [cmd, ...pre] = opts.prefix ?? [];
  const proc = spawn(cmd ?? process.execPath, cmd !== undefined ? [...pre, process.execPath, ...argv] : argv, {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, ...opts.env },
  });
  proc.stdout!.on("data", (d: Buffer) => (out += d.toString()));
  proc.stderr!.on("data", (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
  const client = new TypevisorClient({ socketPath: socket });
  const deadline = Date.now() + START_TIMEOUT_MS;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`daemon exited ${proc.exitCode}: ${out}`);
    if (existsSync(socket)) {
      try {
        await client.health();
        break;
      } catch {
        /* not yet */
      }
    }
    if (Date.now() > deadline) throw new Error(`daemon did not come up within ${START_TIMEOUT_MS / 1000} s: ${out}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    home,
    socket,
    client,
    proc,
    log: () => out,
    async stop(signal: NodeJS.Signals = "SIGTERM") {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      return exited;
    },
  };
}

/**
 * The longest pause between two looks in `until`. A look is often a request to a daemon (a VM's
 * whole console log, its row): in the lab, where every instruction is emulated on one CPU, a look
 * every 100 ms through a guest's minute-long boot took a share of that CPU from the guest and the
 * VMMs it waited on. There the pause grows from 100 ms to 1 s; on the host it stays 100 ms.
 */
const UNTIL_MAX_PAUSE_MS = process.env["TYPEVISOR_IN_LAB"] === "1" ? 1000 : 100;

export async function until<T>(what: string, fn: () => Promise<T | undefined> | T | undefined, timeoutMs = 15_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  let pause = 100;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined && v !== false) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last !== undefined ? `: ${String(last)}` : ""}`);
    await new Promise((r) => setTimeout(r, Math.min(pause, Math.max(0, deadline - Date.now()) + 1)));
    pause = Math.min(UNTIL_MAX_PAUSE_MS, Math.round(pause * 1.5));
  }
}

/** The port of a daemon's HTTPS listener (`--listen HOST:0`), from its ready line, which may come just after the socket answers. */
export async function tcpPort(d: TestDaemon): Promise<number> {
  const m = await until("the daemon's tcp address in its log", () => /"tcp":\{"host":"[^"]+","port":(\d+)\}/.exec(d.log()) ?? undefined);
  return Number(m[1]);
}
