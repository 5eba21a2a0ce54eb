/**
 * Every thread of this process as the kernel sees it (/proc/self/task/TID, proc(5)): a thread
 * stuck in the kernel shows here even though it cannot publish anything itself. The same files
 * sys/proc-stat.ts threadStates reads, parsed by it, but with asynchronous reads: the main
 * thread does not wait on procfs either.
 */
import { readdirSync } from "node:fs";
import { readdir, readFile } from "node:fs/promises";
import { setThreadNice } from "../../sys/libc.js";
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

/**
 * Give every thread of this process nice value `nice` (setpriority(2) per thread: on Linux a
 * nice value is a thread's own). Best effort: a thread that ended meanwhile, or a /proc this
 * process cannot read (a jail without it), is skipped. Returns how many threads took it.
 */
export function niceEveryThread(nice: number): number {
  let tids: number[];
  try {
    tids = readdirSync("/proc/self/task").map(Number).filter((n) => Number.isInteger(n) && n > 0);
  } catch {
    return 0;
  }
  let done = 0;
  for (const tid of tids) {
    try {
      setThreadNice(tid, nice);
      done++;
    } catch {
      // ended meanwhile
    }
  }
  return done;
}
