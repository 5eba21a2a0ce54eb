/**
 * Storage pools: directories VM disks live in, each with an optional quota on the virtual size
 * of its disks. The `default` pool is the daemon's own `vms/` (a VM's disks beside its other
 * files, as before pools); an operator adds others (`typevisor pool create fast --path /srv/nvme
 * --quota 500G`) and a VM's disks go there with `--pool`. A disk in another pool is the file
 * `<pool>/<vm id>-disk<N>.<format>`.
 *
 * Each pool reports its filesystem's capacity and free bytes (statfs), the virtual size of its
 * disks (allocated), the bytes those files take (used) and its overcommit (allocated over the
 * quota, or over the capacity without one). A disk past the quota is refused at admission, in
 * the same step that reserves it (VmManager), so creates running side by side cannot together
 * pass it. The quota bounds what VMs may be given, not what the filesystem has: with thin disks
 * a filesystem can still fill up, and then the VM pauses (docs/storage.md).
 *
 * A pool's path is operator input and the daemon runs as root: it must be an absolute path to an
 * existing directory, is stored as its real path (symlinks resolved), and may not be inside,
 * above, or the same as another pool or the daemon's own directories.
 */
import { readdirSync, readFileSync, realpathSync, rmSync, statfsSync, statSync, writeFileSync } from "node:fs";
import { join, normalize, sep } from "node:path";
import { z } from "zod";
import { TypevisorError } from "../errors.js";
import { formatBytes, parseSize } from "../size.js";
import { allocatedBytes } from "./disks.js";
import { NAME_PATTERN, sizeField } from "./spec.js";

export const DEFAULT_POOL = "default";

export const poolName = z
  .string()
  .regex(NAME_PATTERN, "a pool name is 1-63 lower-case letters, digits and '-', starting with a letter or digit")
  .describe("storage pool name");

export const poolSpec = z
  .object({
    name: poolName,
    path: z.string().min(1).max(4096).startsWith("/", "a pool path must be absolute").describe("an existing directory on the host (stored with symlinks resolved)"),
    quota: sizeField.optional().describe("the most virtual disk size the pool's disks may add up to (none: the filesystem's size)"),
  })
  .strict();
export type PoolSpecInput = z.input<typeof poolSpec>;

export const poolInfo = z.object({
  name: z.string(),
  path: z.string(),
  quotaBytes: z.number().nullable().describe("the cap on the virtual size of its disks; null: none"),
  capacityBytes: z.number().describe("size of the filesystem the pool is on"),
  freeBytes: z.number().describe("what is still free on that filesystem (statfs f_bavail)"),
  allocatedBytes: z.number().describe("virtual size of the disks in the pool"),
  usedBytes: z.number().describe("bytes the disks' files take on the host now"),
  availableBytes: z.number().describe("what another disk may still be given: quota (or capacity) minus allocated, never below 0"),
  overcommit: z.number().describe("allocated / (quota, or capacity without one): above 1, thin disks promise more than there is"),
  disks: z.number().int(),
  vms: z.array(z.string()).describe("VMs with a disk in the pool"),
  createdAt: z.string(),
});
export type PoolInfo = z.infer<typeof poolInfo>;

export interface PoolRow {
  name: string;
  path: string;
  quotaBytes: number | null;
  createdAt: string;
}

/** A disk as the pool accounting sees it. */
export interface PoolDisk {
  vm: string;
  path: string;
  sizeBytes: number;
  pool?: string;
}

function within(child: string, parent: string): boolean {
  return child === parent || child.startsWith(parent.endsWith(sep) ? parent : parent + sep);
}

/**
 * The real path of a directory an operator names for a pool, checked. `reserved`: the daemon's
 * own directories (its home, the image store); `pools`: the pools there are.
 * @throws TypevisorError INVALID_REQUEST, POOL_PATH
 */
export function checkPoolPath(path: string, reserved: readonly string[], pools: readonly PoolRow[]): string {
  if (!path.startsWith("/")) throw new TypevisorError("INVALID_REQUEST", `pool path ${path} is not absolute`);
  if (normalize(path) !== path.replace(/\/+$/, "") && normalize(path) !== path) throw new TypevisorError("INVALID_REQUEST", `pool path ${path} has "." or ".." or repeated "/" in it; give it plainly`);
  let real: string;
  try {
    real = realpathSync(path);
  } catch {
    throw new TypevisorError("POOL_PATH", `pool path ${path} does not exist`, { hint: "create the directory first (mkdir -p)" });
  }
  if (!statSync(real).isDirectory()) throw new TypevisorError("POOL_PATH", `pool path ${path} is not a directory`);
  if (real === "/") throw new TypevisorError("POOL_PATH", "a pool cannot be the root directory");
  for (const r of reserved) {
    let rr = r;
    try {
      rr = realpathSync(r);
    } catch {
      // not there yet: compare as given
    }
    if (within(real, rr) || within(rr, real)) throw new TypevisorError("POOL_PATH", `pool path ${real} overlaps the daemon's own directory ${rr}`);
  }
  for (const p of pools) {
    if (within(real, p.path) || within(p.path, real)) throw new TypevisorError("POOL_PATH", `pool path ${real} overlaps pool ${p.name} (${p.path})`);
  }
  return real;
}

/** The quota of a spec in bytes, or null. */
export function quotaOf(spec: z.output<typeof poolSpec>): number | null {
  if (spec.quota === undefined) return null;
  const q = typeof spec.quota === "number" ? spec.quota : parseSize(spec.quota);
  if (!Number.isSafeInteger(q) || q <= 0) throw new TypevisorError("INVALID_REQUEST", `quota: ${String(spec.quota)} is not a positive size`);
  return q;
}

/** A pool's figures from its row, the disks in it (by pool name; none = default) and reservations. */
export function poolReport(p: PoolRow, disks: readonly PoolDisk[], reservedBytes: number): PoolInfo {
  const mine = disks.filter((d) => (d.pool ?? DEFAULT_POOL) === p.name);
  let capacityBytes = 0;
  let freeBytes = 0;
  try {
    const s = statfsSync(p.path);
    capacityBytes = s.blocks * s.bsize;
    freeBytes = s.bavail * s.bsize;
  } catch {
    // The directory is gone: nothing to give.
  }
  const allocated = mine.reduce((n, d) => n + d.sizeBytes, 0) + reservedBytes;
  const limit = p.quotaBytes ?? capacityBytes;
  return {
    name: p.name,
    path: p.path,
    quotaBytes: p.quotaBytes,
    capacityBytes,
    freeBytes,
    allocatedBytes: allocated,
    usedBytes: mine.reduce((n, d) => n + allocatedBytes(d.path), 0),
    availableBytes: Math.max(0, limit - allocated),
    overcommit: limit > 0 ? Math.round((allocated / limit) * 100) / 100 : 0,
    disks: mine.length,
    vms: [...new Set(mine.map((d) => d.vm))].sort(),
    createdAt: p.createdAt,
  };
}

/**
 * Admit `bytes` more virtual disk in pool `p` or throw INSUFFICIENT_RESOURCES saying how much is
 * free. Only a quota limits it: without one, thin disks may promise more than the filesystem has.
 */
export function checkPoolQuota(p: PoolRow, allocated: number, bytes: number): void {
  if (p.quotaBytes === null || allocated + bytes <= p.quotaBytes) return;
  const free = Math.max(0, p.quotaBytes - allocated);
  throw new TypevisorError("INSUFFICIENT_RESOURCES", `not enough space in pool ${p.name}: asked ${formatBytes(bytes)}, ${formatBytes(free)} free of its ${formatBytes(p.quotaBytes)} quota (${formatBytes(allocated)} allocated to its disks)`, {
    hint: `ask for less, remove disks from pool ${p.name}, or use another pool (typevisor pool ls)`,
  });
}

/** Where disk `index` of VM `id` lives in a pool other than the default. */
export function poolDiskPath(pool: PoolRow, id: string, index: number, format: "raw" | "qcow2"): string {
  return join(pool.path, `${id}-disk${index}.${format}`);
}

/**
 * A pool's directory holds `.typevisor-pool` naming the daemon home that owns it: two daemons
 * (two homes) must not share one pool, or one's start-up sweep would take the other's disks for
 * leftovers. Written at pool create, removed at pool rm.
 */
const MARKER = ".typevisor-pool";

/** The home that owns pool directory `dir`, if one does. */
export function poolOwner(dir: string): string | undefined {
  try {
    const v = JSON.parse(readFileSync(join(dir, MARKER), "utf8")) as { home?: unknown };
    return typeof v.home === "string" ? v.home : "an unreadable owner";
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "ENOENT" ? undefined : "an unreadable owner";
  }
}

/** Claim `dir` for the daemon at `home` (refused when another daemon's). @throws TypevisorError POOL_PATH */
export function claimPool(dir: string, home: string): void {
  const owner = poolOwner(dir);
  if (owner !== undefined && owner !== home) throw new TypevisorError("POOL_PATH", `${dir} is a pool of another typevisor daemon (${owner}): two daemons must not share a pool`, { hint: `if that daemon is gone, remove ${join(dir, MARKER)}` });
  writeFileSync(join(dir, MARKER), `${JSON.stringify({ home })}\n`, { mode: 0o600 });
}

export function releasePool(dir: string): void {
  rmSync(join(dir, MARKER), { force: true });
}

/** Files in a pool that look like ours (`<12 hex>-disk<N>.<fmt>[.creating]`) but belong to no VM in `known` (ids); removed, returned. */
export function sweepPool(pool: PoolRow, known: ReadonlySet<string>, home: string): string[] {
  const out: string[] = [];
  // Only a pool this daemon owns: another's files are not ours to judge.
  if (poolOwner(pool.path) !== home) return out;
  let names: string[];
  try {
    names = readdirSync(pool.path);
  } catch {
    return out;
  }
  for (const f of names) {
    const m = /^([0-9a-f]{12})-disk\d+\.(?:raw|qcow2)(\.creating)?$/.exec(f);
    if (m === null) continue;
    if (m[2] !== undefined || !known.has(m[1]!)) {
      rmSync(join(pool.path, f), { force: true });
      out.push(join(pool.path, f));
    }
  }
  return out;
}
