/** How often a thread of another process woke: what tests of idle processes count. */
import { readdirSync, readFileSync } from "node:fs";

const status = (pid: number, tid: number): string => readFileSync(`/proc/${pid}/task/${tid}/status`, "utf8");

/**
 * Context switches of thread `tid` of process `pid` (the main thread: tid = pid), voluntary and
 * not: each wake-up from a sleep is one (proc(5), /proc/PID/task/TID/status).
 */
export function contextSwitches(pid: number, tid = pid): number {
  const s = status(pid, tid);
  return Number(/\nvoluntary_ctxt_switches:\s+(\d+)/.exec(s)![1]) + Number(/nonvoluntary_ctxt_switches:\s+(\d+)/.exec(s)![1]);
}

/** The tid of the thread of `pid` named `name` (its comm), if it has one. */
export function threadNamed(pid: number, name: string): number | undefined {
  return readdirSync(`/proc/${pid}/task`).map(Number).find((t) => new RegExp(`^Name:\\s+${name}$`, "m").test(status(pid, t)));
}
