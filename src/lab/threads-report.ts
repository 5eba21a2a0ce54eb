/**
 * What every process in a place is doing, thread by thread, as text: the lab watchdog's view of
 * a stalled run. For each process: its command line and each thread's state, kernel wait channel
 * and system call (sys/proc-stat.ts). A typevisor VMM with a control socket (`--api-socket`) is
 * also asked for its own report (`GET /threads`: where each vCPU, the device thread and the disk
 * I/O threads are, and every virtqueue's indices), so a VMM that lost an interrupt or a kick shows
 * it here. Run inside the lab by its agent (`node dist/lab/threads-report.js`), and usable alone.
 */
import { readdirSync } from "node:fs";
import { threadStates, type ThreadState, type ThreadSyscall } from "../sys/proc-stat.js";
import { httpRequest } from "../sys/http-request.js";
import { processCmdline } from "../control/proc.js";

/** x86_64 system call numbers worth a name in a stall report (arch/x86/entry/syscalls/syscall_64.tbl). */
const SYSCALL_NAMES: Record<number, string> = {
  0: "read", 1: "write", 7: "poll", 16: "ioctl", 23: "select", 35: "nanosleep", 61: "wait4",
  202: "futex", 230: "clock_nanosleep", 232: "epoll_wait", 270: "pselect6", 271: "ppoll",
  281: "epoll_pwait", 295: "preadv", 296: "pwritev", 327: "preadv2", 328: "pwritev2", 441: "epoll_pwait2",
};

export function syscallText(s: ThreadSyscall | undefined): string {
  if (s === undefined) return "?";
  if (typeof s === "string") return s;
  const name = SYSCALL_NAMES[s.nr] ?? `syscall ${s.nr}`;
  return `${name}(${s.args.slice(0, 3).map((a) => "0x" + a.toString(16)).join(", ")}, ...)`;
}

/** One thread as a report line: tid, name, state, CPU time, wait channel, system call. */
export function threadLine(t: ThreadState): string {
  return `  ${String(t.tid).padStart(7)} ${t.comm.padEnd(16)} ${t.state} cpu ${t.cpuSeconds.toFixed(2)}s ${t.wchan.padEnd(24)} ${syscallText(t.syscall)}`;
}

/** One process, one thread a line. */
export function processReport(pid: number): string {
  const argv = processCmdline(pid) ?? [];
  return [`pid ${pid}: ${argv.join(" ").slice(0, 300) || "[kernel thread]"}`, ...threadStates(pid).map(threadLine)].join("\n");
}

/** `--api-socket PATH` of a typevisor VMM's argv (`typevisor run` by hand or from the daemon). */
export function apiSocketOf(argv: string[]): string | undefined {
  if (!argv.some((a) => a.endsWith("typevisor.js") || a === "typevisor")) return undefined;
  const i = argv.indexOf("--api-socket");
  return i >= 0 ? argv[i + 1] : argv.find((a) => a.startsWith("--api-socket="))?.slice("--api-socket=".length);
}

/** A VMM's GET /threads, pretty-printed, or why there is none. */
export async function vmmThreads(socketPath: string): Promise<string> {
  try {
    const a = await httpRequest({ socketPath, path: "/threads", method: "GET" }, undefined, 5000);
    const text = a.body.toString("utf8");
    try {
      return JSON.stringify(JSON.parse(text), null, 1);
    } catch {
      return `HTTP ${a.status}: ${text.slice(0, 2000)}`;
    }
  } catch (e) {
    return `no answer: ${(e as Error).message}`;
  }
}

/** Every user process (kernel threads left out: they have no command line) and every VMM's own report. */
export async function fullReport(): Promise<string> {
  const pids = readdirSync("/proc").filter((d) => /^\d+$/.test(d)).map(Number).sort((a, b) => a - b);
  const out: string[] = [];
  const vmms: { pid: number; socket: string }[] = [];
  for (const pid of pids) {
    const argv = processCmdline(pid);
    if (argv === undefined || argv.length === 0) continue;
    out.push(processReport(pid));
    const socket = apiSocketOf(argv);
    if (socket !== undefined) vmms.push({ pid, socket });
  }
  for (const v of vmms) out.push(`== VMM pid ${v.pid}: GET /threads on ${v.socket}\n${await vmmThreads(v.socket)}`);
  if (vmms.length === 0) out.push("== no typevisor VMM with a control socket is running");
  return out.join("\n");
}

// Run as a script: print the report and exit (even if a VMM's socket keeps a connection open).
if (process.argv[1] !== undefined && import.meta.url === new URL(`file://${process.argv[1]}`).href) {
  process.stdout.write((await fullReport()) + "\n", () => process.exit(0));
}
