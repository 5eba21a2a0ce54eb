/**
 * Does a daemon's inventory match the host? What the API says (VMs, their states, pids, disks,
 * the resource accounting) against what is really there: VMM processes in /proc, VM directories,
 * sockets, bases, cgroups. Every mismatch comes back as one sentence, so a test that expects []
 * says exactly what is wrong (issue: "no orphan, no lost VM, no leaked budget").
 */
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import type { TypevisorClient } from "../../src/api/client.js";
import { basesDir } from "../../src/control/bases.js";
import { PARENT } from "../../src/control/cgroups.js";
import { homePaths, vmPaths } from "../../src/control/paths.js";
import { ACTIVE_STATES } from "../../src/control/state.js";
import type { VmInfo, VmState } from "../../src/control/spec.js";
import { VmmClient } from "../../src/engine/vmm-client.js";

export interface VmmProcess {
  pid: number;
  /** TYPEVISOR_VM_ID from its environment (the daemon gives every VMM its VM's id there). */
  id: string | undefined;
}

function readProc(pid: string, file: string): string | undefined {
  try {
    return readFileSync(`/proc/${pid}/${file}`, "utf8");
  } catch {
    return undefined; // gone meanwhile, or not ours to read
  }
}

/** State letter of /proc/PID/stat (after the parenthesised comm, which may itself hold spaces). */
function procState(pid: string): string | undefined {
  const stat = readProc(pid, "stat");
  return stat?.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
}

/**
 * Live VMM processes of `home` anywhere on the host: those whose control socket lies in its run/,
 * and those whose TYPEVISOR_VM_ID is one of `ids` (a VMM of this home however it was started).
 * Zombies are dead: they wait only for a parent (after a daemon SIGKILL, init) to reap them.
 */
export function vmmProcesses(home: string, ids: ReadonlySet<string> = new Set()): VmmProcess[] {
  const marker = `\0--api-socket\0${homePaths(home).run}/`;
  const out: VmmProcess[] = [];
  for (const pid of readdirSync("/proc")) {
    if (!/^\d+$/.test(pid) || Number(pid) === process.pid) continue;
    const cmdline = readProc(pid, "cmdline");
    if (cmdline === undefined || cmdline === "") continue;
    // The sandbox helper that waits for a sandboxed VMM (docs/security.md) carries its command line
    // and environment: it is not a second VMM, and it exits with the one it waits for.
    if (cmdline.split("\0")[0]!.endsWith("/typevisor-jail")) continue;
    const env = (readProc(pid, "environ") ?? "").split("\0");
    const id = env.find((kv) => kv.startsWith("TYPEVISOR_VM_ID="))?.slice("TYPEVISOR_VM_ID=".length);
    if (!cmdline.includes(marker) && (id === undefined || !ids.has(id))) continue;
    const state = procState(pid);
    if (state === undefined || state === "Z" || state === "X") continue;
    out.push({ pid: Number(pid), id });
  }
  return out;
}

/** The cgroup v2 directory the daemon gives VM `id` (cgroups.ts: <mount>/typevisor/vm-<id>). */
export function vmCgroupDir(mount: string, id: string): string {
  return join(mount, PARENT, `vm-${id}`);
}

function list(dir: string): string[] {
  return existsSync(dir) ? readdirSync(dir).sort() : [];
}

const isActive = (s: VmState): boolean => ACTIVE_STATES.includes(s);

/** What the VMM itself says its state is (GET /vm), or why it did not say. */
async function vmmState(apiSocket: string): Promise<string> {
  try {
    return (await new VmmClient(apiSocket, 3000).info()).state ?? "(no state)";
  } catch (e) {
    return `(no answer: ${(e as Error).message})`;
  }
}

export interface HostStateOptions {
  home: string;
  client: TypevisorClient;
  /**
   * Ids of every VM this home has had: their VMM processes and cgroups are looked for even
   * after the inventory forgot them (a VM lost from the inventory leaves no other trace of its id).
   */
  knownIds?: ReadonlySet<string>;
}

/** Every way the host and the daemon's inventory disagree now; [] when they match exactly. */
export async function hostDiscrepancies(o: HostStateOptions): Promise<string[]> {
  const { home, client } = o;
  const out: string[] = [];
  const vms = await client.listVms();
  const host = await client.host();
  const hp = homePaths(home);
  const byId = new Map(vms.map((v) => [v.id, v]));
  const ids = new Set([...(o.knownIds ?? []), ...byId.keys()]);
  const label = (v: VmInfo): string => `VM ${v.name} (${v.id}, ${v.state}${v.pid !== undefined ? `, pid ${v.pid}` : ""})`;

  // Directories: one per row, a row per directory; nothing half-made.
  const dirs = list(hp.vms);
  for (const v of vms) if (!dirs.includes(v.id)) out.push(`${label(v)}: its directory ${join(hp.vms, v.id)} is missing`);
  for (const d of dirs) {
    if (d.endsWith(".creating")) out.push(`staging directory ${join(hp.vms, d)} left behind (an interrupted create)`);
    else if (!byId.has(d)) out.push(`directory ${join(hp.vms, d)} belongs to no VM in the inventory`);
  }
  for (const v of vms) for (const disk of v.disks) if (!existsSync(disk.path)) out.push(`${label(v)}: its disk ${disk.path} is missing`);

  // Bases: exactly those some disk stands on.
  const used = new Set(vms.flatMap((v) => v.disks.flatMap((d) => (d.backing !== undefined ? [d.backing] : []))));
  const bases = list(basesDir(home)).map((f) => join(basesDir(home), f));
  for (const b of bases) if (!used.has(b)) out.push(`base ${b} is used by no VM${b.endsWith(".tmp") ? " (a half-made base)" : ""}`);
  for (const b of used) if (!bases.includes(b)) out.push(`base ${b} is missing but ${vms.filter((v) => v.disks.some((d) => d.backing === b)).map((v) => v.name).join(", ")} stand on it`);

  // Processes: an active VM has exactly its one VMM; every VMM belongs to an active VM with its pid.
  const procs = vmmProcesses(home, ids);
  for (const v of vms) {
    const mine = procs.filter((p) => p.id === v.id);
    if (isActive(v.state)) {
      if (v.pid === undefined) out.push(`${label(v)}: active but no pid recorded`);
      else if (!mine.some((p) => p.pid === v.pid)) out.push(`${label(v)}: no live VMM process with pid ${v.pid} and TYPEVISOR_VM_ID=${v.id}`);
    } else if (v.pid !== undefined) {
      out.push(`${label(v)}: not active but a pid is recorded`);
    }
  }
  for (const p of procs) {
    const v = p.id !== undefined ? byId.get(p.id) : undefined;
    if (v === undefined) out.push(`orphan VMM process ${p.pid} (TYPEVISOR_VM_ID=${p.id ?? "none"}): no VM in the inventory has that id`);
    else if (!isActive(v.state) || v.pid !== p.pid) out.push(`orphan VMM process ${p.pid} of ${label(v)}: the inventory does not record it as that VM's VMM`);
  }

  // What each VMM says against what the inventory says: a re-attached VM must not stay
  // "starting" while its guest runs, nor "running" while its VMM is paused.
  for (const v of vms) {
    if (!isActive(v.state) || v.pid === undefined || !procs.some((p) => p.pid === v.pid)) continue;
    const said = await vmmState(vmPaths(home, v.id).apiSocket);
    if ((v.state === "running" || v.state === "paused") && said !== v.state) out.push(`${label(v)}: its VMM says it is ${said}`);
    // With no request under way nothing moves a VM out of starting or stopping but its VMM's exit:
    // one that stays there holds its budget with no end in sight.
    if (v.state === "starting" || v.state === "stopping") out.push(`${label(v)}: still ${v.state} with no request under way (its VMM says it is ${said})`);
  }

  // Sockets: only active VMs have them.
  for (const f of list(hp.run)) {
    const id = f.replace(/\.(api|con)$/, "");
    const v = byId.get(id);
    if (v === undefined) out.push(`socket ${join(hp.run, f)} belongs to no VM in the inventory`);
    else if (!isActive(v.state)) out.push(`socket ${join(hp.run, f)} left behind by ${label(v)}`);
  }

  // cgroups (where the daemon uses them): one per VM with a VMM, holding that VMM; none of VMs without.
  if (host.cgroups.available && host.cgroups.mount !== undefined) {
    for (const id of ids) {
      const dir = vmCgroupDir(host.cgroups.mount, id);
      const v = byId.get(id);
      const there = existsSync(dir);
      if (there && (v === undefined || !isActive(v.state))) out.push(`cgroup ${dir} left behind by ${v !== undefined ? label(v) : `a VM that is gone (${id})`}`);
      if (v !== undefined && isActive(v.state) && v.cgroup !== undefined) {
        if (!there) out.push(`${label(v)}: its cgroup ${v.cgroup} is missing`);
        else if (v.pid !== undefined && !(readProc(String(v.pid), "cgroup") ?? "").includes(`/${PARENT}/vm-${id}`)) out.push(`${label(v)}: its VMM is not in its cgroup ${dir}`);
      }
    }
  }

  // The budget: what the daemon says is allocated is what the rows imply (no create in flight).
  const active = vms.filter((v) => isActive(v.state));
  const num = (x: unknown): number => (typeof x === "number" ? x : Number.NaN);
  const want = {
    cpus: active.reduce((n, v) => n + num(v.spec["cpus"]), 0),
    memoryBytes: active.reduce((n, v) => n + num(v.spec["memoryMiB"]) * 2 ** 20, 0),
    diskBytes: vms.reduce((n, v) => n + v.disks.reduce((m, d) => m + d.sizeBytes, 0), 0),
  };
  if (host.cpu.allocated !== want.cpus) out.push(`CPU allocated ${host.cpu.allocated}, but the active VMs have ${want.cpus}`);
  if (host.memory.allocated !== want.memoryBytes) out.push(`memory allocated ${host.memory.allocated}, but the active VMs have ${want.memoryBytes}`);
  if (host.disk.allocated !== want.diskBytes) out.push(`disk allocated ${host.disk.allocated}, but the VMs' disks sum to ${want.diskBytes}`);
  const counts: Record<string, number> = {};
  for (const v of vms) counts[v.state] = (counts[v.state] ?? 0) + 1;
  for (const [state, n] of Object.entries(host.vms)) if (n !== (counts[state] ?? 0)) out.push(`the host report counts ${n} VMs ${state}, the list ${counts[state] ?? 0}`);
  return out;
}

/**
 * hostDiscrepancies once the host has settled: a VMM that was already exiting when the daemon
 * came back is noticed by polling (every 500 ms), so a mismatch must last `timeoutMs` to count.
 */
export async function settledDiscrepancies(o: HostStateOptions, timeoutMs = 15_000, onTransient?: (found: string[]) => void): Promise<string[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const found = await hostDiscrepancies(o);
    if (found.length === 0 || Date.now() > deadline) return found;
    onTransient?.(found);
    await new Promise((r) => setTimeout(r, 250));
  }
}
