/**
 * Set-up file of the unit tests (vitest.config.ts): a test that fails by timing out prints, in
 * lines that start with `test-diag:` (which bin/test-all.js keeps among the failure lines a CI
 * run's tail shows), every process this test worker started that still runs, thread by thread.
 * Without it a VMM that hung under a CI run's load ends as "Test timed out" and nothing else.
 * One line per process (its threads joined), each cut to what the tail can hold.
 */
import { readdirSync, readFileSync } from "node:fs";
import { beforeEach } from "vitest";
import { processCmdline } from "../../src/control/proc.js";
import { parseStatFields, threadStates } from "../../src/sys/proc-stat.js";
import { syscallText } from "../../src/lab/threads-report.js";
import { diagLine } from "./diag-line.js";

/** Every live descendant of `root` (children before grandchildren). */
function descendants(root: number): number[] {
  const parent = new Map<number, number>();
  for (const e of readdirSync("/proc")) {
    const pid = Number(e);
    if (!Number.isInteger(pid)) continue;
    try {
      const f = parseStatFields(readFileSync(`/proc/${pid}/stat`, "utf8"));
      if (f !== undefined) parent.set(pid, Number(f[4]));
    } catch {
      // gone meanwhile
    }
  }
  const out: number[] = [];
  for (let frontier = [root]; frontier.length > 0;) {
    const next = [...parent].filter(([, pp]) => frontier.includes(pp)).map(([p]) => p);
    out.push(...next);
    frontier = next;
  }
  return out;
}

/** One process as one line: its command line's start, then each thread's name, state, wait channel and system call. */
function processLine(pid: number): string {
  const argv = (processCmdline(pid) ?? []).map((a) => a.replace(/^.*\/(bin|dist)\//, "")).join(" ").slice(0, 160);
  // Threads alike (a pool's idle workers) counted once: "4x node S futex_do_wait futex".
  const alike = new Map<string, number>();
  for (const t of threadStates(pid)) {
    const k = `${t.comm} ${t.state} ${t.wchan || "-"} ${syscallText(t.syscall).replace(/\(.*$/, "")}`;
    alike.set(k, (alike.get(k) ?? 0) + 1);
  }
  return diagLine(`pid ${pid} (${argv})`, [...alike].map(([k, n]) => (n > 1 ? `${n}x ${k}` : k)).join("; "));
}

beforeEach((ctx) => {
  ctx.onTestFailed(({ task }) => {
    const errors = task.result?.errors ?? [];
    if (!errors.some((e) => /timed out/i.test(String(e.message)))) return;
    const lines = descendants(process.pid).map(processLine);
    console.log([diagLine(`"${task.name}" timed out; processes it left running`, String(lines.length)), ...lines].join("\n"));
  });
});
