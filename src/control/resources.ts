/**
 * Host capacity and what the VMs on it may be given. Each resource has a budget, the host's
 * capacity times an overcommit ratio (memory less a reserve for the host itself and the daemon);
 * a VM is admitted only while the sum of allocations stays within every budget. "Used" is what
 * the host actually consumes (proc(5): /proc/stat, /proc/meminfo; statfs(2)), reported beside it:
 * with overcommit, allocated may exceed used, and that gap is what the ratio bets on.
 */
import { readFileSync, statfsSync } from "node:fs";
import { availableParallelism, totalmem } from "node:os";
import { TypevisorError } from "../errors.js";
import { formatBytes, MiB, parseSize } from "../size.js";

export interface HostCapacity {
  cpus: number;
  memoryBytes: number;
  /** Size of the file system holding the data directory (VM disks live there). */
  diskBytes: number;
  /** What an unprivileged writer may still use on it (statfs f_bavail). */
  diskFreeBytes: number;
}

function errno(e: unknown): string | undefined {
  return (e as NodeJS.ErrnoException | undefined)?.code;
}

function statfsOf(dataDir: string): { total: number; free: number; used: number } {
  try {
    const s = statfsSync(dataDir);
    // f_bfree counts blocks reserved for root too; f_bavail is what a non-root VMM can write
    return { total: s.blocks * s.bsize, free: s.bavail * s.bsize, used: (s.blocks - s.bfree) * s.bsize };
  } catch (e) {
    const message = `cannot read the file system of the data directory ${dataDir}: ${(e as Error).message}`;
    throw new TypevisorError(errno(e) === "ENOENT" ? "FILE_NOT_FOUND" : "HOST_RESOURCES", message, { cause: e });
  }
}

export function discoverHost(dataDir: string): HostCapacity {
  const fsInfo = statfsOf(dataDir);
  // availableParallelism honours the CPU affinity mask (taskset, cpusets), unlike os.cpus().length
  return { cpus: availableParallelism(), memoryBytes: totalmem(), diskBytes: fsInfo.total, diskFreeBytes: fsInfo.free };
}

export interface OvercommitPolicy {
  /** vCPUs allowed per host CPU. */
  cpu: number;
  /** Guest memory allowed per byte of host memory (after the reserve). */
  memory: number;
  /** Disk image bytes allowed per byte of the data file system (images are sparse). */
  disk: number;
  /** Memory kept back for the host and the daemon, never given to VMs. */
  reservedMemoryBytes: number;
}


/**
 * vCPUs mostly wait (on I/O, on the guest's idle loop), so 4 per CPU is a common, safe default;
 * memory is not overcommitted by default: a guest touching all its RAM must not push the host
 * into its OOM killer.
 */
export const DEFAULT_POLICY: OvercommitPolicy = Object.freeze({ cpu: 4, memory: 1.0, disk: 1.0, reservedMemoryBytes: 256 * MiB });

const MAX_RATIO = 64;
const POLICY_KEYS = ["cpu", "memory", "disk"] as const;

function parseRatio(key: string, v: string | number): number {
  const n = typeof v === "number" ? v : v.trim() === "" ? Number.NaN : Number(v.trim());
  if (!Number.isFinite(n) || n <= 0 || n > MAX_RATIO) {
    throw new TypevisorError("INVALID_ARGUMENT", `overcommit ratio for ${key} must be a number above 0 and at most ${MAX_RATIO}, not ${JSON.stringify(v)}`, {
      hint: "a ratio of 1 gives VMs exactly the host's capacity; 4 lets them ask for four times it; 0.5 half",
    });
  }
  return n;
}

/** A policy from user input (CLI flags, config): missing ratios take DEFAULT_POLICY's. */
export function parsePolicy(input: Partial<Record<"cpu" | "memory" | "disk", string | number>>, reservedMemory?: string): OvercommitPolicy {
  for (const key of Object.keys(input)) {
    if (!(POLICY_KEYS as readonly string[]).includes(key)) {
      throw new TypevisorError("INVALID_ARGUMENT", `unknown overcommit resource "${key}"`, { hint: `overcommit applies to ${POLICY_KEYS.join(", ")}` });
    }
  }
  const ratio = (key: (typeof POLICY_KEYS)[number]): number => {
    const v = input[key];
    return v === undefined ? DEFAULT_POLICY[key] : parseRatio(key, v);
  };
  return {
    cpu: ratio("cpu"),
    memory: ratio("memory"),
    disk: ratio("disk"),
    reservedMemoryBytes: reservedMemory === undefined ? DEFAULT_POLICY.reservedMemoryBytes : parseSize(reservedMemory),
  };
}

export interface Allocation {
  cpus: number;
  memoryBytes: number;
  diskBytes: number;
}

/** What VMs may be given in total under the policy. */
export function budget(host: HostCapacity, policy: OvercommitPolicy): Allocation {
  return {
    cpus: host.cpus * policy.cpu,
    memoryBytes: Math.max(0, Math.floor(host.memoryBytes * policy.memory) - policy.reservedMemoryBytes),
    diskBytes: Math.floor(host.diskBytes * policy.disk),
  };
}

/** Numbers for people: integers as they are, fractions to at most two places. */
function num(n: number): string {
  return Number.isInteger(n) ? String(n) : String(Number(n.toFixed(2)));
}

/** A ratio always shows a decimal point, so it reads as a ratio: 1 -> "1.0", 1.25 -> "1.25". */
function ratioText(r: number): string {
  return Number.isInteger(r) ? r.toFixed(1) : num(r);
}

function checkRequest(request: Allocation): void {
  for (const [k, v] of Object.entries(request)) {
    if (!Number.isFinite(v) || v < 0) throw new TypevisorError("INVALID_ARGUMENT", `resource request ${k} must be a non-negative number, not ${v}`);
  }
}

/**
 * Admit `request` on top of `allocated` only if every resource named in `what` stays within its
 * budget. Throws INSUFFICIENT_RESOURCES naming each resource that is short, what is free, and how
 * the budget came about, so the user can tell "host too small" from "policy too strict".
 */
export function checkAllocation(
  host: HostCapacity,
  policy: OvercommitPolicy,
  allocated: Allocation,
  request: Allocation,
  what: { cpu?: boolean; memory?: boolean; disk?: boolean },
): void {
  checkRequest(request);
  const b = budget(host, policy);
  const short: string[] = [];
  if (what.cpu === true && allocated.cpus + request.cpus > b.cpus) {
    const free = Math.max(0, b.cpus - allocated.cpus);
    short.push(`not enough CPUs: asked ${num(request.cpus)}, ${num(free)} free of ${num(b.cpus)} budget (${num(host.cpus)} host × overcommit ${ratioText(policy.cpu)})`);
  }
  if (what.memory === true && allocated.memoryBytes + request.memoryBytes > b.memoryBytes) {
    const free = Math.max(0, b.memoryBytes - allocated.memoryBytes);
    const how = `(${formatBytes(host.memoryBytes)} host × overcommit ${ratioText(policy.memory)} − ${formatBytes(policy.reservedMemoryBytes)} reserved)`;
    // Larger than the whole budget: no amount of stopping other VMs helps, so say that.
    short.push(
      request.memoryBytes > b.memoryBytes
        ? `not enough memory: asked ${formatBytes(request.memoryBytes)}, more than this host can back at all: ${formatBytes(b.memoryBytes)} budget ${how}`
        : `not enough memory: asked ${formatBytes(request.memoryBytes)}, ${formatBytes(free)} free of ${formatBytes(b.memoryBytes)} budget ${how}`,
    );
  }
  if (what.disk === true && allocated.diskBytes + request.diskBytes > b.diskBytes) {
    const free = Math.max(0, b.diskBytes - allocated.diskBytes);
    short.push(
      `not enough disk: asked ${formatBytes(request.diskBytes)}, ${formatBytes(free)} free of ${formatBytes(b.diskBytes)} budget ` +
        `(${formatBytes(host.diskBytes)} host × overcommit ${ratioText(policy.disk)})`,
    );
  }
  if (short.length > 0) {
    throw new TypevisorError("INSUFFICIENT_RESOURCES", short.join("; "), {
      hint: "stop or shrink other VMs, ask for less, or raise the overcommit ratio of the daemon's policy",
    });
  }
}

export interface ResourceLine {
  /** What the host has. */
  capacity: number;
  /** What VMs may be given in total (capacity × ratio, memory less the reserve). */
  budget: number;
  /** What VMs have been given. */
  allocated: number;
  /** What the host actually consumes now (all processes, not only VMs). */
  used: number;
  /** budget − allocated, never below 0 (a policy made stricter can leave allocated > budget). */
  free: number;
}

export interface ResourceReport {
  cpu: ResourceLine;
  memory: ResourceLine;
  disk: ResourceLine;
  overcommit: OvercommitPolicy;
}

export function report(host: HostCapacity, policy: OvercommitPolicy, allocated: Allocation, used: { cpus: number; memoryBytes: number; diskBytes: number }): ResourceReport {
  const b = budget(host, policy);
  const line = (capacity: number, bud: number, alloc: number, u: number): ResourceLine => ({ capacity, budget: bud, allocated: alloc, used: u, free: Math.max(0, bud - alloc) });
  return {
    cpu: line(host.cpus, b.cpus, allocated.cpus, used.cpus),
    memory: line(host.memoryBytes, b.memoryBytes, allocated.memoryBytes, used.memoryBytes),
    disk: line(host.diskBytes, b.diskBytes, allocated.diskBytes, used.diskBytes),
    overcommit: { ...policy },
  };
}

/** Cumulative CPU time counters of the host (the "cpu" line of /proc/stat), in clock ticks. */
export interface CpuSample {
  busyTicks: number;
  totalTicks: number;
  /** Online CPUs when sampled (the cpuN lines). */
  cpus: number;
}

/**
 * The aggregate "cpu" line of /proc/stat (proc(5)): user nice system idle iowait irq softirq steal
 * guest guest_nice. guest and guest_nice are already counted in user and nice, so they are left
 * out; steal (time the hypervisor below us gave to others) is neither ours busy nor ours idle,
 * but it is time, so it counts in the total.
 */
export function parseProcStat(text: string): CpuSample {
  const lines = text.split("\n");
  const cpu = lines.find((l) => /^cpu\s/.test(l));
  const v = cpu?.trim().split(/\s+/).slice(1).map(Number) ?? [];
  if (v.length < 4 || v.some((n) => !Number.isFinite(n))) throw new TypevisorError("HOST_RESOURCES", "cannot parse the cpu line of /proc/stat");
  const at = (i: number): number => v[i] ?? 0;
  const busy = at(0) + at(1) + at(2) + at(5) + at(6);
  const idle = at(3) + at(4);
  return { busyTicks: busy, totalTicks: busy + idle + at(7), cpus: lines.filter((l) => /^cpu\d+\s/.test(l)).length };
}

/** /proc/meminfo fields in bytes (the kernel writes "kB" and means KiB). */
export function parseMeminfo(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const m of text.matchAll(/^(\w+(?:\(\w+\))?):\s+(\d+)(?:\s*kB)?$/gm)) {
    const unit = m[0].endsWith("kB") ? 1024 : 1;
    out.set(m[1]!, Number(m[2]) * unit);
  }
  return out;
}

/** Busy CPUs averaged over the time between two samples. */
export function busyCpus(prev: CpuSample, now: CpuSample): number {
  const total = now.totalTicks - prev.totalTicks;
  if (total <= 0) return 0;
  return ((now.busyTicks - prev.busyTicks) / total) * now.cpus;
}

/**
 * What the host consumes now. CPU is an average: over the time since `prev` (pass the returned
 * sample back on the next call), or since boot on the first call.
 */
export function hostUsed(dataDir: string, prev?: CpuSample): { used: { cpus: number; memoryBytes: number; diskBytes: number }; sample: CpuSample } {
  const sample = parseProcStat(readFileSync("/proc/stat", "utf8"));
  const mem = parseMeminfo(readFileSync("/proc/meminfo", "utf8"));
  const total = mem.get("MemTotal") ?? 0;
  // MemAvailable (Linux 3.14+) estimates what could be given out without swapping: page cache
  // that can be dropped is not "used"
  const available = mem.get("MemAvailable") ?? mem.get("MemFree") ?? 0;
  const zero: CpuSample = { busyTicks: 0, totalTicks: 0, cpus: sample.cpus };
  return {
    used: { cpus: busyCpus(prev ?? zero, sample), memoryBytes: Math.max(0, total - available), diskBytes: statfsOf(dataDir).used },
    sample,
  };
}

