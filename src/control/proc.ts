/**
 * What the control plane learns about a VMM process from /proc (proc(5)): is it still the process
 * we started, its command line, and what it costs the host. Every reader answers `undefined` for a
 * process that does not exist (or vanished while being read): a VMM can exit at any moment.
 */
import { readdirSync, readFileSync } from "node:fs";
import { CLK_TCK, parseStatFields } from "../sys/proc-stat.js";

// Re-exported: the control plane and its tests read /proc through this module.
export { CLK_TCK, parseStatFields };

function readProc(pid: number, file: string): string | undefined {
  // pids come from the inventory: anything but a positive integer names no process
  if (!Number.isSafeInteger(pid) || pid <= 0) return undefined;
  try {
    return readFileSync(`/proc/${pid}/${file}`, "utf8");
  } catch {
    // ENOENT (no such process), ESRCH (it exited while we read): both mean "not there"
    return undefined;
  }
}

function statFields(pid: number): string[] | undefined {
  const text = readProc(pid, "stat");
  return text === undefined ? undefined : parseStatFields(text);
}

/**
 * Field 22 of /proc/PID/stat: when the process started, in clock ticks after boot. With the pid it
 * identifies a process for the life of the host (a pid alone is reused once the process exits).
 */
export function processStartTime(pid: number): string | undefined {
  const f = statFields(pid);
  const start = f?.[22];
  return start !== undefined && /^\d+$/.test(start) ? start : undefined;
}

/**
 * The process exists, has not exited (a zombie, state Z, or dead, X, waits only to be reaped), and,
 * when `startTime` is given, is the same process that had it: not a newer one that got the pid.
 */
export function processAlive(pid: number, startTime?: string): boolean {
  const f = statFields(pid);
  if (f === undefined) return false;
  const state = f[3];
  if (state === undefined || state === "Z" || state === "X" || state === "x") return false;
  return startTime === undefined || f[22] === startTime;
}

/** argv of the process (/proc/PID/cmdline, NUL-separated); [] for a zombie or kernel thread. */
export function processCmdline(pid: number): string[] | undefined {
  const text = readProc(pid, "cmdline");
  if (text === undefined) return undefined;
  const args = text.split("\0");
  if (args[args.length - 1] === "") args.pop();
  return args;
}

export interface ProcessUsage {
  /** User plus system CPU time consumed so far (proc(5) stat fields 14 utime and 15 stime). */
  cpuSeconds: number;
  /** Resident set size (VmRSS in /proc/PID/status); 0 for a process with no memory (kernel thread). */
  rssBytes: number;
}

/** VmRSS from /proc/PID/status text, in bytes (the kernel reports kB, meaning KiB). */
export function parseVmRss(status: string): number {
  const m = /^VmRSS:\s+(\d+)\s*kB$/m.exec(status);
  return m === null ? 0 : Number(m[1]) * 1024;
}

export function processUsage(pid: number): ProcessUsage | undefined {
  const f = statFields(pid);
  const status = readProc(pid, "status");
  if (f === undefined || status === undefined) return undefined;
  const utime = Number(f[14]);
  const stime = Number(f[15]);
  if (!Number.isFinite(utime) || !Number.isFinite(stime)) return undefined;
  return { cpuSeconds: (utime + stime) / CLK_TCK, rssBytes: parseVmRss(status) };
}

/**
 * Live processes whose argv contains `arg` and whose environment has `key=value`: a VMM the
 * daemon spawned but had no time to record (killed between the spawn and the inventory write) is
 * found by its TYPEVISOR_VM_ID and its control socket path, which only it has.
 */
export function processesWith(arg: string, key: string, value: string): number[] {
  const out: number[] = [];
  for (const p of readdirSync("/proc")) {
    if (!/^\d+$/.test(p)) continue;
    const pid = Number(p);
    if (pid === process.pid || !(processCmdline(pid) ?? []).includes(arg)) continue;
    if (!(readProc(pid, "environ") ?? "").split("\0").includes(`${key}=${value}`)) continue;
    if (processAlive(pid)) out.push(pid);
  }
  return out;
}
