/**
 * Reading threads and processes from /proc (proc(5)), free of any layer above: the control plane
 * uses it for VMM processes, the VMM for its own threads, the lab watchdog for QEMU's.
 */
import { readdirSync, readFileSync } from "node:fs";

/**
 * USER_HZ, the unit of the tick counts in /proc/PID/stat (proc(5): "measured in clock ticks
 * (divide by sysconf(_SC_CLK_TCK))"). Linux fixes USER_HZ at 100 for user space on every
 * architecture we run on, whatever the kernel's internal HZ, so no `getconf CLK_TCK` round trip.
 */
export const CLK_TCK = 100;

/**
 * The fields of a /proc/PID/stat line, numbered as in proc(5) (1 = pid, 2 = comm, 3 = state, ...),
 * so `fields[22]` is starttime. comm (field 2) is in parentheses and may itself hold spaces and
 * parentheses ("(a) b)"), so the fields after it are split from the LAST ')'.
 */
export function parseStatFields(line: string): string[] | undefined {
  const open = line.indexOf("(");
  const close = line.lastIndexOf(")");
  if (open < 0 || close < open) return undefined;
  const rest = line.slice(close + 1).trim().split(/\s+/);
  // index 0 unused, so that indices match proc(5)'s 1-based field numbers
  return ["", line.slice(0, open).trim(), line.slice(open + 1, close), ...rest];
}

/**
 * /proc/PID/task/TID/syscall (proc(5)): the system call a blocked thread is in, with its six
 * arguments; "running" while it runs; "-1 sp pc" when it is blocked outside a system call.
 */
export type ThreadSyscall = { nr: number; args: bigint[] } | "running" | "none";

export function parseSyscall(text: string): ThreadSyscall | undefined {
  const t = text.trim();
  if (t === "running") return "running";
  const parts = t.split(/\s+/);
  if (parts[0] === "-1") return "none";
  const nr = Number(parts[0]);
  if (!Number.isInteger(nr) || nr < 0 || parts.length < 7) return undefined;
  try {
    return { nr, args: parts.slice(1, 7).map((a) => BigInt(a)) };
  } catch {
    return undefined;
  }
}

export interface ThreadState {
  tid: number;
  comm: string;
  /** The state letter of proc(5) stat field 3: R running, S sleeping, D uninterruptible, T stopped, ... */
  state: string;
  /** Kernel function the thread sleeps in ("" while it runs or when the kernel hides it). */
  wchan: string;
  /** Undefined where the kernel does not show it (another user's process without ptrace access). */
  syscall: ThreadSyscall | undefined;
  /** User and system CPU time so far, seconds. */
  cpuSeconds: number;
}

function read(path: string): string | undefined {
  try {
    return readFileSync(path, "utf8");
  } catch {
    // the thread exited while we read, or the file is not ours to read
    return undefined;
  }
}

/** Every thread of a process (`"self"` for this one), in tid order; [] for a process that is gone. */
export function threadStates(pid: number | "self"): ThreadState[] {
  const dir = `/proc/${pid}/task`;
  let tids: number[];
  try {
    tids = readdirSync(dir).map(Number).filter((n) => Number.isInteger(n)).sort((a, b) => a - b);
  } catch {
    return [];
  }
  const out: ThreadState[] = [];
  for (const tid of tids) {
    const f = parseStatFields(read(`${dir}/${tid}/stat`) ?? "");
    if (f === undefined) continue;
    const wchan = (read(`${dir}/${tid}/wchan`) ?? "").trim();
    const sc = read(`${dir}/${tid}/syscall`);
    out.push({
      tid,
      comm: f[2] ?? "",
      state: f[3] ?? "?",
      wchan: wchan === "0" ? "" : wchan,
      syscall: sc === undefined ? undefined : parseSyscall(sc),
      cpuSeconds: (Number(f[14]) + Number(f[15])) / CLK_TCK,
    });
  }
  return out;
}
