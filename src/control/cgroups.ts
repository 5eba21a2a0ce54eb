/**
 * Per-VM CPU and memory limits through cgroup v2 (Documentation/admin-guide/cgroup-v2.rst). Every
 * VMM process gets its own cgroup, <mount>/typevisor/<name>: its cpu.max, cpu.weight and memory.max
 * bound what one VM can take from its neighbours, and its counters (cpu.stat, memory.current,
 * memory.events) say what it took, including guest RAM, which the VMM's RSS hides until touched.
 */
import { accessSync, constants, existsSync, mkdirSync, readdirSync, readFileSync, rmdirSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { TypevisorError } from "../errors.js";
import { parseMountinfo } from "../sys/mounts.js";

export interface CgroupSupport {
  available: boolean;
  /** Where the cgroup2 hierarchy is mounted (absent if there is none). */
  mount?: string;
  /** Controllers the hierarchy's root offers (its cgroup.controllers). */
  controllers: string[];
  /** Why it is not available, in words for the user. */
  reason?: string;
}

/** The controllers VM limits need: cpu (cpu.max, cpu.weight) and memory (memory.max). */
export const REQUIRED_CONTROLLERS = ["cpu", "memory"] as const;
/** The folder under the mount that holds every VM's cgroup. */
export const PARENT = "typevisor";
const NAME = /^[a-z0-9-]{1,64}$/;

function readControllers(mount: string): string[] | undefined {
  try {
    return readFileSync(join(mount, "cgroup.controllers"), "utf8").trim().split(/\s+/).filter((c) => c !== "");
  } catch {
    return undefined;
  }
}

/**
 * Find a cgroup2 mount whose root offers the cpu and memory controllers, and that we may write
 * (creating cgroups needs root or a delegated subtree). On a hybrid host (cgroup v1 hierarchies
 * for the controllers, an empty cgroup2 at /sys/fs/cgroup/unified for systemd) the controllers are
 * bound to v1 and cannot appear in v2: cgroup-v2.rst "a controller can be attached to only one
 * hierarchy". Then it is not available, and the reason says which controllers are missing where.
 */
export function detectCgroupV2(mountinfo?: string): CgroupSupport {
  let text = mountinfo;
  if (text === undefined) {
    try {
      text = readFileSync("/proc/self/mountinfo", "utf8");
    } catch (e) {
      return { available: false, controllers: [], reason: `cannot read /proc/self/mountinfo: ${(e as Error).message}` };
    }
  }
  const mounts = parseMountinfo(text);
  const v2 = mounts.filter((m) => m.fsType === "cgroup2").map((m) => ({ mount: m.mountPoint, controllers: readControllers(m.mountPoint) ?? [] }));
  if (v2.length === 0) {
    return { available: false, controllers: [], reason: "no cgroup2 file system is mounted (mount one: mount -t cgroup2 none /sys/fs/cgroup)" };
  }
  const hasAll = (c: string[]): boolean => REQUIRED_CONTROLLERS.every((r) => c.includes(r));
  const chosen = v2.find((m) => hasAll(m.controllers)) ?? v2.find((m) => m.mount === "/sys/fs/cgroup") ?? v2[0]!;
  const base = { mount: chosen.mount, controllers: chosen.controllers };
  const missing = REQUIRED_CONTROLLERS.filter((r) => !chosen.controllers.includes(r));
  if (missing.length > 0) {
    // a controller held by a v1 hierarchy names it in that mount's super options ("rw,memory")
    const inV1 = missing.map((c) => ({ c, at: mounts.find((m) => m.fsType === "cgroup" && m.superOptions.includes(c))?.mountPoint }));
    const v1 = inV1.filter((x) => x.at !== undefined).map((x) => `${x.c} at ${x.at}`);
    const has = chosen.controllers.length > 0 ? chosen.controllers.join(" ") : "none";
    return {
      available: false,
      ...base,
      reason:
        `cgroup2 at ${chosen.mount} lacks the ${missing.join(" and ")} controller${missing.length > 1 ? "s" : ""} (it has: ${has})` +
        (v1.length > 0 ? `; cgroup v1 holds ${v1.join(", ")} (a hybrid host: boot with systemd.unified_cgroup_hierarchy=1 for cgroup v2 alone)` : ""),
    };
  }
  try {
    accessSync(chosen.mount, constants.W_OK);
  } catch (e) {
    return { available: false, ...base, reason: `cannot create cgroups under ${chosen.mount}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message} (the daemon must run as root)` };
  }
  return { available: true, ...base };
}

export interface CgroupLimits {
  /** Relative CPU share against other VMs, 1..10000 (cpu.weight; the kernel's default is 100). */
  cpuWeight?: number;
  /** Hard CPU cap in CPUs, e.g. 0.5 or 2 (cpu.max "quota period" with quota = cpus × period). */
  cpuMaxCpus?: number;
  /** Hard memory cap (memory.max): past it the kernel reclaims, then OOM-kills inside the cgroup. */
  memoryMaxBytes?: number;
}

/** cpu.max period: the kernel's default, 100 ms (cgroup-v2.rst "cpu.max"). */
export const CPU_PERIOD_USEC = 100_000;
/** The kernel refuses quotas below 1 ms. */
const MIN_QUOTA_USEC = 1000;

function errnoOf(e: unknown): string | undefined {
  return (e as NodeJS.ErrnoException | undefined)?.code;
}

const ROOT_HINT = "the daemon must run as root (or own a delegated cgroup subtree) to set VM limits";

function cgroupError(action: string, e: unknown, busy?: string): TypevisorError {
  const code = errnoOf(e);
  if (code === "EBUSY" && busy !== undefined) return new TypevisorError("CGROUP", `cannot ${action}: ${busy} (EBUSY)`, { cause: e });
  const why: Record<string, string> = {
    EACCES: "permission denied",
    EPERM: "permission denied",
    EROFS: "the cgroup file system is mounted read-only",
    EINVAL: "the kernel rejected the value",
    ENOENT: "no such file (is the controller enabled for this cgroup?)",
    ENODEV: "no such device (is the controller enabled for this cgroup?)",
    EOPNOTSUPP: "not supported by this kernel",
    ESRCH: "no such process",
    // cgroup-v2.rst "No Internal Process Constraint": outside the root, a cgroup cannot both hold
    // processes and hand controllers to children
    EBUSY: "busy: a cgroup other than the root cannot both hold processes and enable controllers for its children",
  };
  const detail = (code !== undefined ? why[code] : undefined) ?? (e as Error).message;
  return new TypevisorError("CGROUP", `cannot ${action}: ${detail}${code !== undefined ? ` (${code})` : ""}`, {
    cause: e,
    ...(code === "EACCES" || code === "EPERM" || code === "EROFS" ? { hint: ROOT_HINT } : {}),
  });
}

function write(file: string, value: string): void {
  try {
    writeFileSync(file, value);
  } catch (e) {
    throw cgroupError(`write "${value}" to ${file}`, e);
  }
}

function read(file: string): string {
  try {
    return readFileSync(file, "utf8");
  } catch (e) {
    throw cgroupError(`read ${file}`, e);
  }
}

/** A flat keyed file ("key value" per line: cpu.stat, memory.events, cgroup.events). */
export function parseFlatKeyed(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split("\n")) {
    const [k, v] = line.trim().split(/\s+/);
    if (k !== undefined && k !== "" && v !== undefined && /^\d+$/.test(v)) out.set(k, Number(v));
  }
  return out;
}

/** Give `dir`'s children the controllers VM limits need (cgroup.subtree_control "+cpu +memory"). */
function enableControllers(dir: string): void {
  const have = read(join(dir, "cgroup.subtree_control")).trim().split(/\s+/);
  const missing = REQUIRED_CONTROLLERS.filter((c) => !have.includes(c));
  if (missing.length > 0) write(join(dir, "cgroup.subtree_control"), missing.map((c) => `+${c}`).join(" "));
}

function checkName(name: string): void {
  if (!NAME.test(name)) {
    throw new TypevisorError("INVALID_ARGUMENT", `invalid cgroup name ${JSON.stringify(name)}: 1-64 lower-case letters, digits and '-'`);
  }
}

function mountOf(support: CgroupSupport): string {
  if (!support.available || support.mount === undefined) {
    throw new TypevisorError("CGROUP", `cgroup v2 is not available: ${support.reason ?? "no cgroup2 mount"}`, {
      hint: "VMs run without limits here; for limits, boot the host with cgroup v2 alone (systemd.unified_cgroup_hierarchy=1)",
    });
  }
  return support.mount;
}

function checkLimits(l: CgroupLimits): void {
  const bad = (what: string, v: number, rule: string): TypevisorError => new TypevisorError("INVALID_ARGUMENT", `cgroup ${what} must be ${rule}, not ${v}`);
  if (l.cpuWeight !== undefined && (!Number.isInteger(l.cpuWeight) || l.cpuWeight < 1 || l.cpuWeight > 10000)) throw bad("cpu weight", l.cpuWeight, "an integer from 1 to 10000");
  if (l.cpuMaxCpus !== undefined && (!Number.isFinite(l.cpuMaxCpus) || l.cpuMaxCpus * CPU_PERIOD_USEC < MIN_QUOTA_USEC)) {
    throw bad("CPU cap", l.cpuMaxCpus, `a number of CPUs of at least ${MIN_QUOTA_USEC / CPU_PERIOD_USEC}`);
  }
  if (l.memoryMaxBytes !== undefined && (!Number.isSafeInteger(l.memoryMaxBytes) || l.memoryMaxBytes <= 0)) throw bad("memory cap", l.memoryMaxBytes, "a positive whole number of bytes");
}

export class VmCgroup {
  private constructor(
    readonly name: string,
    /** The cgroup's directory: <mount>/typevisor/<name>. */
    readonly path: string,
  ) {}

  /**
   * Make (or reuse, if empty: a leftover from a crash) the VM's cgroup and set its limits. The root
   * hands cpu and memory to <mount>/typevisor, which hands them on to the VMs; /typevisor itself
   * holds no processes, as the no-internal-process rule requires (the root is exempt).
   */
  static create(support: CgroupSupport, name: string, limits: CgroupLimits): VmCgroup {
    checkName(name);
    checkLimits(limits);
    const mount = mountOf(support);
    const parent = join(mount, PARENT);
    enableControllers(mount);
    mkdirCgroup(parent);
    enableControllers(parent);
    const path = join(parent, name);
    const existed = existsSync(path);
    mkdirCgroup(path);
    const cg = new VmCgroup(name, path);
    if (existed) {
      const pids = cg.processes();
      if (pids.length > 0) throw new TypevisorError("CGROUP", `cgroup ${path} already exists with processes ${pids.join(", ")}: is another VMM using the name ${name}?`);
    }
    cg.setLimits(limits);
    return cg;
  }

  /** The VM's existing cgroup (after a daemon restart), or undefined. */
  static open(support: CgroupSupport, name: string): VmCgroup | undefined {
    checkName(name);
    if (!support.available || support.mount === undefined) return undefined;
    const path = join(support.mount, PARENT, name);
    return isDir(path) ? new VmCgroup(name, path) : undefined;
  }

  /** Names of the VM cgroups that exist (to find leftovers after a daemon restart). */
  static list(support: CgroupSupport): string[] {
    if (!support.available || support.mount === undefined) return [];
    const parent = join(support.mount, PARENT);
    if (!isDir(parent)) return [];
    return readdirSync(parent).filter((n) => NAME.test(n) && isDir(join(parent, n))).sort();
  }

  /** Move a process (all its threads) into this cgroup. */
  addProcess(pid: number): void {
    if (!Number.isSafeInteger(pid) || pid <= 0) throw new TypevisorError("INVALID_ARGUMENT", `invalid pid ${pid}`);
    write(join(this.path, "cgroup.procs"), String(pid));
  }

  /** Processes in the cgroup (cgroup.procs; exited processes are not listed, even unreaped ones). */
  processes(): number[] {
    return read(join(this.path, "cgroup.procs")).split("\n").filter((l) => l !== "").map(Number);
  }

  /** Whether any live process is in the cgroup (cgroup.events "populated"). */
  populated(): boolean {
    return parseFlatKeyed(read(join(this.path, "cgroup.events"))).get("populated") === 1;
  }

  /** Change limits; those left undefined stay as they are. */
  setLimits(limits: CgroupLimits): void {
    checkLimits(limits);
    if (limits.memoryMaxBytes !== undefined) write(join(this.path, "memory.max"), String(limits.memoryMaxBytes));
    if (limits.cpuMaxCpus !== undefined) write(join(this.path, "cpu.max"), `${Math.round(limits.cpuMaxCpus * CPU_PERIOD_USEC)} ${CPU_PERIOD_USEC}`);
    if (limits.cpuWeight !== undefined) write(join(this.path, "cpu.weight"), String(limits.cpuWeight));
  }

  /**
   * CPU time (cpu.stat usage_usec), memory charged now (memory.current), its high-water mark
   * (memory.peak, Linux 5.19+) and how often the OOM killer struck inside (memory.events oom_kill).
   */
  usage(): { cpuSeconds: number; memoryBytes: number; memoryPeakBytes?: number; oomKills?: number } {
    const cpu = parseFlatKeyed(read(join(this.path, "cpu.stat")));
    const memoryBytes = Number(read(join(this.path, "memory.current")).trim());
    const peakFile = join(this.path, "memory.peak");
    const peak = existsSync(peakFile) ? Number(read(peakFile).trim()) : undefined;
    const eventsFile = join(this.path, "memory.events");
    const oomKills = existsSync(eventsFile) ? parseFlatKeyed(read(eventsFile)).get("oom_kill") : undefined;
    return {
      cpuSeconds: (cpu.get("usage_usec") ?? 0) / 1e6,
      memoryBytes,
      ...(peak !== undefined && Number.isFinite(peak) ? { memoryPeakBytes: peak } : {}),
      ...(oomKills !== undefined ? { oomKills } : {}),
    };
  }

  /**
   * VM cgroups (<mount>/typevisor/vm-*) that a daemon killed before it could remove them left
   * behind: those not named in `keep` and holding no process are removed; their paths returned.
   * One with processes is left (another daemon's VMM, or one still exiting).
   */
  static removeLeftovers(support: CgroupSupport, keep: ReadonlySet<string>): string[] {
    if (!support.available) return [];
    const parent = join(mountOf(support), PARENT);
    if (!existsSync(parent)) return [];
    const removed: string[] = [];
    for (const name of readdirSync(parent)) {
      if (!name.startsWith("vm-") || keep.has(name)) continue;
      const cg = new VmCgroup(name, join(parent, name));
      try {
        if (!statSync(cg.path).isDirectory() || cg.processes().length > 0) continue;
        cg.remove();
        removed.push(cg.path);
      } catch {
        // busy or gone meanwhile: the next start tries again
      }
    }
    return removed;
  }

  /** Remove the cgroup; it must hold no processes. Removing one already gone is not an error. */
  remove(): void {
    try {
      rmdirSync(this.path);
    } catch (e) {
      const code = errnoOf(e);
      if (code === "ENOENT") return;
      if (code === "EBUSY" || code === "ENOTEMPTY") {
        let pids: number[] = [];
        try {
          pids = this.processes();
        } catch {
          /* report the rmdir error below */
        }
        if (pids.length > 0) {
          throw new TypevisorError("CGROUP", `cannot remove cgroup ${this.path}: processes ${pids.join(", ")} are still in it`, { cause: e, hint: "stop the VM's processes first" });
        }
      }
      throw cgroupError(`remove cgroup ${this.path}`, e, "it still has child cgroups");
    }
  }
}

function isDir(p: string): boolean {
  try {
    return statSync(p).isDirectory();
  } catch {
    return false;
  }
}

function mkdirCgroup(path: string): void {
  try {
    mkdirSync(path);
  } catch (e) {
    if (errnoOf(e) !== "EEXIST") throw cgroupError(`create cgroup ${path}`, e);
  }
}
