/**
 * Every thread of this process as the kernel sees it (/proc/self/task/TID, proc(5)): a thread
 * stuck in the kernel shows here even though it cannot publish anything itself. The same files
 * sys/proc-stat.ts threadStates reads, parsed by it, but with asynchronous reads: the main
 * thread does not wait on procfs either.
 */
import { readdirSync, readFileSync } from "node:fs";
import { readdir, readFile } from "node:fs/promises";
import { setThreadNice, threadNice } from "../../sys/libc.js";
import { CLK_TCK, parseStatFields, parseSyscall } from "../../sys/proc-stat.js";

export interface KernelThread {
  tid: number;
  /** Thread name (tv-vcpu0, tv-devices, tv-blk0, node, ...), at most 15 bytes. */
  comm: string;
  /** State letter of stat field 3: R running, S sleeping, D uninterruptible (disk, ...), T stopped, Z zombie. */
  state: string;
  /** Kernel function a sleeping thread waits in ("" while it runs, or where the kernel hides it). */
  wchan: string;
  /** The system call it is in (x86_64 number: 16 ioctl, 7 poll, 202 futex, ...); "running"; null outside one or when hidden. */
  syscall: number | "running" | null;
  /** User plus system CPU time so far, seconds: a thread that burns CPU against one that waits. */
  cpuSeconds: number;
}

async function read(path: string): Promise<string | undefined> {
  try {
    return await readFile(path, "utf8");
  } catch {
    // the thread ended meanwhile, or the file is not ours to read
    return undefined;
  }
}

/** Every thread of this process, in tid order. */
export async function kernelThreads(): Promise<KernelThread[]> {
  const dir = "/proc/self/task";
  let tids: number[];
  try {
    tids = (await readdir(dir)).map(Number).filter((n) => Number.isInteger(n) && n > 0).sort((a, b) => a - b);
  } catch {
    return [];
  }
  const threads = await Promise.all(
    tids.map(async (tid): Promise<KernelThread | undefined> => {
      const [stat, wchan, syscall] = await Promise.all([read(`${dir}/${tid}/stat`), read(`${dir}/${tid}/wchan`), read(`${dir}/${tid}/syscall`)]);
      const f = stat === undefined ? undefined : parseStatFields(stat);
      if (f === undefined) return undefined;
      const w = (wchan ?? "").trim();
      const sc = syscall === undefined ? undefined : parseSyscall(syscall);
      return {
        tid,
        comm: f[2] ?? "",
        state: f[3] ?? "?",
        wchan: w === "0" ? "" : w,
        syscall: sc === undefined || sc === "none" ? null : sc === "running" ? sc : sc.nr,
        cpuSeconds: (Number(f[14]) + Number(f[15])) / CLK_TCK,
      };
    }),
  );
  return threads.filter((t): t is KernelThread => t !== undefined);
}

/** This process's thread ids (/proc/self/task), or undefined where /proc cannot be read (a jail without it). */
function ownThreadIds(): number[] | undefined {
  try {
    return readdirSync("/proc/self/task").map(Number).filter((n) => Number.isInteger(n) && n > 0);
  } catch {
    return undefined;
  }
}

/**
 * Give every thread of this process nice value `nice` (setpriority(2) per thread: on Linux a
 * nice value is a thread's own), but thread `except` when given. Best effort: a thread that
 * ended meanwhile, or a /proc this process cannot read (a jail without it), is skipped. Returns
 * how many threads took it.
 */
export function niceEveryThread(nice: number, except?: number): number {
  const tids = ownThreadIds();
  if (tids === undefined) return 0;
  let done = 0;
  for (const tid of tids) {
    if (tid === except) continue;
    try {
      setThreadNice(tid, nice);
      done++;
    } catch {
      // ended meanwhile
    }
  }
  return done;
}

/** CAP_SYS_NICE's bit in a capability set (linux/capability.h). */
const CAP_SYS_NICE = 23n;

/**
 * Whether this process may lower a thread's nice value back to `nice`: with CAP_SYS_NICE in its
 * effective set (capabilities(7); /proc/self/status CapEff), or where RLIMIT_NICE allows it
 * (setrlimit(2): down to 20 - its soft limit; /proc/self/limits "Max nice priority"), as
 * systemd's LimitNICE= or prlimit(1) can give a VMM. The daemon's jailed VMMs have neither yet.
 */
export function mayLowerNice(nice: number): boolean {
  try {
    const m = /^CapEff:\s*([0-9a-f]+)$/m.exec(readFileSync("/proc/self/status", "utf8"));
    if (m !== null && ((BigInt(`0x${m[1]}`) >> CAP_SYS_NICE) & 1n) === 1n) return true;
    const l = /^Max nice priority\s+(\d+|unlimited)\s/m.exec(readFileSync("/proc/self/limits", "utf8"));
    return l !== null && (l[1] === "unlimited" || nice >= 20 - Number(l[1]));
  } catch {
    return false;
  }
}

/**
 * V8's helper threads at nice `nice` for a while: the threads Node leaves named `node` other than
 * the main thread (V8's platform workers, which run its background compiles and its concurrent
 * GC, and libuv's pool), not the VMM's named threads. Measured in a migration's pause in the lab
 * (bench/migrate, BENCH_TIMELINE=1), those helpers took 20-80 % of the one CPU in 50 ms steps
 * while both sides' main threads waited for it, for code and garbage of a pause that runs once.
 * At nice 19 they run when nothing else wants the CPU; the main thread's code does not wait for
 * them (concurrent compiles finish when they can; a collection the helpers have not finished the
 * main thread finishes itself).
 *
 * Returns the undo (each thread back to the nice value it had), or undefined when nothing was
 * changed: putting a lower nice value back needs CAP_SYS_NICE or RLIMIT_NICE (mayLowerNice), and
 * helpers left at 19 for a VM's life would starve its compiles on a busy host, so without either
 * this does nothing.
 */
export function niceHelperThreads(nice: number): (() => void) | undefined {
  const tids = ownThreadIds();
  if (tids === undefined) return undefined;
  const helpers: { tid: number; was: number }[] = [];
  for (const tid of tids) {
    if (tid === process.pid) continue;
    try {
      if (readFileSync(`/proc/self/task/${tid}/comm`, "utf8").trim() === "node") helpers.push({ tid, was: threadNice(tid) });
    } catch {
      // ended meanwhile
    }
  }
  if (helpers.length === 0 || !mayLowerNice(Math.min(...helpers.map((h) => h.was)))) return undefined;
  const before = new Map<number, number>();
  for (const { tid, was } of helpers) {
    try {
      setThreadNice(tid, nice);
      before.set(tid, was);
    } catch {
      // ended meanwhile
    }
  }
  let undone = false;
  return () => {
    if (undone) return;
    undone = true;
    for (const [tid, was] of before) {
      try {
        setThreadNice(tid, was);
      } catch {
        // ended meanwhile
      }
    }
  };
}
