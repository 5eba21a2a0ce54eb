/**
 * Set-up file of the lab group (vitest.lab.config.ts): a test still running REPORT_BEFORE_MS
 * before its own timeout (the group's is 600 s; a test may set a longer one), and at least
 * STALL_REPORT_MS into its run, prints, before vitest's timeout ends it, every process in the lab
 * thread by thread, each typevisor VMM's own GET /threads, and the console tail of every guest
 * the test still runs. Without it a hung test ends with "Test timed out" and nothing else (the
 * lab watchdog only sees a silent run, and the timeout fires first). The slowest healthy test of
 * the group took 438 s of its 2400 s on 2026-12-05; the default's tests stay under 320 s.
 */
import { afterEach, beforeEach } from "vitest";
import { fullReport } from "../../src/lab/threads-report.js";
import { ConsoleProcess } from "./console-process.js";

export const STALL_REPORT_MS = 480_000;
const REPORT_BEFORE_MS = 120_000;

let timer: NodeJS.Timeout | undefined;

beforeEach((ctx) => {
  const name = ctx.task.name;
  const at = Math.max(STALL_REPORT_MS, ctx.task.timeout - REPORT_BEFORE_MS);
  timer = setTimeout(() => void report(name, at), at);
});

afterEach(() => {
  clearTimeout(timer);
  timer = undefined;
});

async function report(name: string, at: number): Promise<void> {
  const parts = [`==== lab stall report: "${name}" still running after ${at / 1000} s`];
  try {
    parts.push(await fullReport());
  } catch (e) {
    parts.push(`process report failed: ${(e as Error).message}`);
  }
  for (const p of ConsoleProcess.live) parts.push(`==== console of ${p.child.spawnargs.slice(0, 4).join(" ")} ... (pid ${p.child.pid ?? "?"}), last 4000 chars:\n${p.output.slice(-4000)}`);
  console.log(parts.join("\n"));
}
