/**
 * Snapshots, rollback and clones of VMs (issue 15, "Daemon"; docs/snapshots.md).
 *
 * Disks: every VM disk is a qcow2 external overlay chain (qcow2.txt §"Header": backing_file).
 * Taking a snapshot freezes each disk's top file into a read-only layer (a rename: instant,
 * whatever the disk's size) and puts a new empty overlay on it under the disk's own name, which
 * the VM goes on writing; the snapshot row names its layers. Rollback puts a new empty overlay on
 * the snapshot's layers and throws the current top away. A linked clone is an overlay on a
 * snapshot's layers; a full clone a flattened copy of them (`qemu-img convert`). Layers live in
 * `<home>/layers/` (or `<pool>/layers/` for disks in another pool: a rename does not cross
 * filesystems) and are files nobody owns alone: one is kept while any VM disk or snapshot stands
 * on it (each records its whole chain) and removed by gc() when the last one goes, as the bases
 * below them are (bases.ts).
 *
 * Memory: a snapshot of a VM with a VMM saves its state through the VMM (`POST /snapshot`) into
 * `<home>/snapshots/<id>/`. The running VMM holds its disk's top file open, so it cannot go on
 * on a new overlay: it is paused, saved, stopped, its disks are switched, and a new VMM restores
 * the saved state on the new overlays (`run --restore DIR --disk NEW`). The guest sees a pause.
 * A disk-only snapshot of a running VM goes the same way through a state that is thrown away
 * once the new VMM runs (its disks are then exactly as at the pause: crash-consistent at worst).
 *
 * Crash safety: each snapshot and rollback writes its plan (snapshot_ops) before it touches a
 * file, and every file it makes first has a temporary name; the inventory row that makes the
 * result real is written in one transaction with the plan's "committed" mark. A daemon killed
 * midway finds the plan at its next start (recoverFiles, then finishRecovery once VMMs are
 * re-attached): before the commit, everything is put back (the VM's disks as they were, its VMM
 * restored from the state saved for it if it had been stopped, or resumed if it was paused for
 * the save); after it, what is left (removing the old top, starting the VMM) is finished. A
 * rollback whose VMM was already stopped is finished rather than undone (the state the user
 * asked to throw away is gone either way).
 */
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { chmodSync, existsSync, lstatSync, mkdirSync, readdirSync, renameSync, rmSync, statSync } from "node:fs";
import { copyFile, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { promisify } from "node:util";
import type { Logger } from "pino";
import { z } from "zod";
import { TypevisorError } from "../errors.js";
import { VmmClient } from "../engine/vmm-client.js";
import { createQcow2 } from "../vmm/disk/qcow2/create.js";
import { MAX_CHAIN_DEPTH } from "../vmm/disk/open.js";
import { allocatedBytes } from "./disks.js";
import { adoptJailSave, prepareJailSave, removeJailSave, shareWithGroup } from "./jailed-state.js";
import { snapshotOwner } from "./sandbox/sandbox.js";
import { vmPaths } from "./paths.js";
import { DEFAULT_POOL } from "./pools.js";
import { NAME_PATTERN, netSpec, vmName, type VmInfo, type VmSpec } from "./spec.js";
import { isActive } from "./state.js";
import type { DiskRow, Store, VmRow } from "./store.js";

const run = promisify(execFile);

// ---- API shapes -----------------------------------------------------------------

export const snapshotName = z.string().regex(NAME_PATTERN, "a snapshot name is 1-63 lower-case letters, digits and '-', starting with a letter or digit");

export const snapshotCreateSpec = z
  .object({
    name: snapshotName,
    memory: z.boolean().optional().describe("save the guest's memory and devices too, so a rollback finds it running (default: when the VM has a VMM); false: disks only"),
    description: z.string().max(1024).optional(),
  })
  .strict();

export const cloneSpec = z
  .object({
    name: vmName.describe("the new VM"),
    snapshot: snapshotName.optional().describe("clone this snapshot of the source (default: a snapshot named clone-NEW taken now)"),
    full: z.boolean().default(false).describe("a full copy of the disks instead of overlays on the snapshot's layers"),
    nets: z.array(netSpec).max(8).optional().describe("the clone's NICs: its own TAPs (required when the source has NICs; a MAC is made when not given)"),
    start: z.boolean().default(false).describe("start the clone of a disk-only snapshot (a clone of a memory snapshot always starts, running from the saved state)"),
  })
  .strict();

export const snapshotParams = z.object({ name: vmName, snapshot: snapshotName }).strict();

export const snapshotInfo = z.object({
  id: z.string(),
  name: z.string(),
  vm: z.string(),
  parent: z.string().optional().describe("the snapshot the VM stood on when this one was taken"),
  createdAt: z.string(),
  description: z.string().optional(),
  memory: z.boolean().describe("a saved memory and device state goes with it: rollback and clones find the VM running"),
  vmState: z.enum(["running", "paused", "stopped"]).describe("the VM's state when it was taken"),
  sizeBytes: z.number().describe("bytes its disk layers and saved state take on the host"),
  current: z.boolean().describe("the VM stands on it now: taken last, or rolled back to (the next snapshot's parent)"),
  disks: z.array(z.object({ name: z.string(), layer: z.string(), format: z.enum(["raw", "qcow2"]), sizeBytes: z.number(), allocatedBytes: z.number() })),
});
export const snapshotList = z.object({ snapshots: z.array(snapshotInfo) });
export type SnapshotInfo = z.infer<typeof snapshotInfo>;
export type SnapshotCreateInput = z.input<typeof snapshotCreateSpec>;
export type CloneInput = z.input<typeof cloneSpec>;

// ---- the inventory --------------------------------------------------------------

/** One disk's frozen layer in a snapshot: `chain` lists every file below it, nearest first. */
interface SnapshotLayer {
  index: number;
  layer: string;
  format: "raw" | "qcow2";
  sizeBytes: number;
  chain: string[];
  pool?: string;
  image?: string;
}

type SavedState = "running" | "paused" | "stopped";

interface SnapshotRow {
  id: string;
  vmId: string;
  name: string;
  parent?: string;
  createdAt: string;
  description?: string;
  memory: boolean;
  vmState: SavedState;
  sizeBytes: number;
  disks: SnapshotLayer[];
}

interface RawSnapshot {
  id: string;
  vm_id: string;
  name: string;
  parent: string | null;
  created_at: string;
  description: string | null;
  memory: number;
  vm_state: string;
  size_bytes: number;
  disks: string;
}

function snapshotOf(r: RawSnapshot): SnapshotRow {
  return {
    id: r.id,
    vmId: r.vm_id,
    name: r.name,
    ...(r.parent !== null ? { parent: r.parent } : {}),
    createdAt: r.created_at,
    ...(r.description !== null ? { description: r.description } : {}),
    memory: r.memory === 1,
    vmState: r.vm_state as SavedState,
    sizeBytes: r.size_bytes,
    disks: JSON.parse(r.disks) as SnapshotLayer[],
  };
}

/** One disk's switch to a new top: `tmp` is made first, then `top` goes (to `layer` or `trash`), then `tmp` becomes `newTop`. */
interface DiskSwap {
  index: number;
  top: string;
  newTop: string;
  tmp: string;
  /** What the new top stands on, and what is below that. */
  backing: string;
  backingFormat: "raw" | "qcow2";
  chain: string[];
  sizeBytes: number;
  /** A snapshot: where the old top is frozen. */
  layer?: string;
  /** A rollback: where the old top waits to be removed. */
  trash?: string;
}

interface SnapshotPlan {
  kind: "snapshot";
  vm: string;
  vmId: string;
  snapId: string;
  name: string;
  description?: string;
  parent?: string;
  memory: boolean;
  vmState: SavedState;
  /**
   * Where the VMM saves (`snapshots/<op>.op/state`, in a directory of the plan's own, where the
   * VMM also makes its temporary one): the snapshot's state (memory), or a state only for the
   * VMM's restart (disk-only).
   */
  saveDir?: string;
  /** Under the sandbox: where the jailed VMM saves (`vms/<id>/out/<op>.op/state`), as uid `uid`; moved to saveDir once it has ended. */
  jail?: { save: string; uid: number };
  phase: "begun" | "saved" | "committed" | "reverted";
  swaps: DiskSwap[];
}

interface RollbackPlan {
  kind: "rollback";
  vm: string;
  vmId: string;
  snapId: string;
  hadVmm: boolean;
  restore?: { dir: string; paused: boolean };
  phase: "begun" | "vmm-ended" | "committed";
  swaps: DiskSwap[];
}

type Plan = SnapshotPlan | RollbackPlan;

/** What the manager lends this module (manager.ts builds it): the VM's queue, its rows and its VMM. */
export interface SnapshotHost {
  home: string;
  log: Logger;
  store: Store;
  serial<T>(name: string, fn: () => Promise<T>): Promise<T>;
  row(name: string): VmRow;
  get(name: string): VmInfo;
  event(type: string, vm: string, message: string, data?: Record<string, unknown>): void;
  /** Stop the VM's VMM for a snapshot or rollback: its exit is this module's, recorded as neither a stop nor a crash; the VM is left stopped. */
  endVmm(name: string): Promise<void>;
  /** Start the VM's VMM (its state must allow a start), booting, or restoring a saved state. */
  startVmm(name: string, restore?: { dir: string; paused: boolean }): Promise<VmInfo>;
  resume(name: string): Promise<VmInfo>;
  /** Admit `diskBytes` more in the default pool (the host's disk budget); returns the reservation's release. */
  reserveDisk(diskBytes: number): () => void;
  /** A new VM row made by a clone. */
  insertVm(row: VmRow): void;
  /**
   * Set when VMMs run in the sandbox (sandbox/sandbox.ts): the uid of a VM's VMM, or the group of
   * a memory snapshot (`snapshotOwner(id)`), from the sandbox's range (jailed-state.ts).
   */
  sandboxId?: (owner: string) => number;
  /** Memory snapshot `snapId` exists now: restores will come (the standby pool fills: standby.ts). */
  snapshotWithMemory(snapId: string, stateDir: string): void;
  /** Snapshots were removed (a jailed standby pool's template may be gone: standby.ts). */
  snapshotsRemoved(): void;
  /** Bases no VM disk or snapshot stands on any more go (manager.ts, bases.ts). */
  removeUnusedBases(): Promise<void>;
}

/** Files below the VM disk's top, nearest first. */
export function chainOf(d: DiskRow): string[] {
  return d.chain ?? (d.backing !== undefined ? [d.backing] : []);
}

/** N of disk<N>.<fmt> or <id>-disk<N>.<fmt> */
function diskIndexOf(path: string): number {
  const m = /disk(\d+)\.(?:raw|qcow2)$/.exec(path);
  return m === null ? -1 : Number(m[1]);
}

/** Leave room below the VMM's limit (vmm/disk/open.ts) for a clone's own overlay and a snapshot of it. */
const MAX_LAYERS = MAX_CHAIN_DEPTH - 4;
/** POST /snapshot writes guest memory: give it time (a 4 GiB guest at 100 MB/s takes 40 s). */
const SAVE_TIMEOUT_MS = 600_000;

/** A fault-injection seam for tests: the daemon dies (SIGKILL) at the named step (TYPEVISOR_CRASH_AT). */
function crashPoint(step: string): void {
  if (process.env["TYPEVISOR_CRASH_AT"] === step) process.kill(process.pid, "SIGKILL");
}

/** What recovery leaves for after VMMs are re-attached: resume, or restart from a saved state. */
interface FollowUp {
  opId: string;
  vm: string;
  vmId: string;
  /** The VM was paused for a save: resume it if its VMM still runs. */
  resume: boolean;
  /** Start its VMM if it has none: from this saved state, or booting (`dir` undefined). */
  start?: { dir?: string; paused: boolean };
  /** A snapshot plan of a jailed VMM: its save, moved before a start from it (if that VMM has ended), and its out/<op>.op removed. */
  plan?: SnapshotPlan;
}

export class Snapshots {
  /** Files a clone under way uses (a snapshot removed meanwhile keeps them until it ends). */
  private readonly pins = new Map<symbol, string[]>();

  constructor(private readonly host: SnapshotHost) {}

  private get db(): Store["db"] {
    return this.host.store.db;
  }

  // ---- paths ----

  private layersDir(pool: string | undefined): string {
    if ((pool ?? DEFAULT_POOL) === DEFAULT_POOL) return join(this.host.home, "layers");
    const p = this.host.store.getPool(pool!);
    if (p === undefined) throw new TypevisorError("POOL_NOT_FOUND", `no storage pool named ${pool!}`);
    return join(p.path, "layers");
  }

  private statesDir(): string {
    return join(this.host.home, "snapshots");
  }

  stateDir(snapId: string): string {
    return join(this.statesDir(), snapId);
  }

  // ---- rows ----

  private rows(vmId: string): SnapshotRow[] {
    return (this.db.prepare("SELECT * FROM snapshots WHERE vm_id = ? ORDER BY created_at, id").all(vmId) as RawSnapshot[]).map(snapshotOf);
  }

  private allRows(): SnapshotRow[] {
    return (this.db.prepare("SELECT * FROM snapshots").all() as RawSnapshot[]).map(snapshotOf);
  }

  private rowNamed(vm: VmRow, name: string): SnapshotRow {
    const r = this.db.prepare("SELECT * FROM snapshots WHERE vm_id = ? AND name = ?").get(vm.id, name) as RawSnapshot | undefined;
    if (r === undefined) throw new TypevisorError("SNAPSHOT_NOT_FOUND", `VM ${vm.name} has no snapshot named ${name}`, { hint: `typevisor vm snapshot ls ${vm.name}` });
    return snapshotOf(r);
  }

  private ops(): { id: string; plan: Plan }[] {
    return (this.db.prepare("SELECT id, plan FROM snapshot_ops ORDER BY started_at").all() as { id: string; plan: string }[]).map((o) => ({ id: o.id, plan: JSON.parse(o.plan) as Plan }));
  }

  private saveOp(id: string, plan: Plan): void {
    this.db.prepare("INSERT INTO snapshot_ops (id, vm_id, plan, started_at) VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET plan = excluded.plan").run(id, plan.vmId, JSON.stringify(plan), new Date().toISOString());
  }

  private deleteOp(id: string): void {
    this.db.prepare("DELETE FROM snapshot_ops WHERE id = ?").run(id);
  }

  /** The snapshot the VM stands on now: taken last, or rolled back to (the next one's parent). */
  private currentOf(vm: VmRow, rows: SnapshotRow[]): SnapshotRow | undefined {
    const head = this.db.prepare("SELECT snapshot_id FROM snapshot_heads WHERE vm_id = ?").get(vm.id) as { snapshot_id: string } | undefined;
    return head === undefined ? undefined : rows.find((s) => s.id === head.snapshot_id);
  }

  private setHead(vmId: string, snapId: string | undefined): void {
    if (snapId === undefined) this.db.prepare("DELETE FROM snapshot_heads WHERE vm_id = ?").run(vmId);
    else this.db.prepare("INSERT INTO snapshot_heads (vm_id, snapshot_id) VALUES (?, ?) ON CONFLICT(vm_id) DO UPDATE SET snapshot_id = excluded.snapshot_id").run(vmId, snapId);
  }

  private info(vm: VmRow, s: SnapshotRow, rows: SnapshotRow[], current: SnapshotRow | undefined): SnapshotInfo {
    const parent = s.parent !== undefined ? rows.find((p) => p.id === s.parent) : undefined;
    const disks = s.disks.map((d) => ({ name: `disk${d.index}`, layer: d.layer, format: d.format, sizeBytes: d.sizeBytes, allocatedBytes: allocatedBytes(d.layer) }));
    return {
      id: s.id,
      name: s.name,
      vm: vm.name,
      ...(parent !== undefined ? { parent: parent.name } : {}),
      createdAt: s.createdAt,
      ...(s.description !== undefined ? { description: s.description } : {}),
      memory: s.memory,
      vmState: s.vmState,
      sizeBytes: disks.reduce((a, d) => a + d.allocatedBytes, 0) + (s.memory ? dirBytes(this.stateDir(s.id)) : 0),
      current: current?.id === s.id,
      disks,
    };
  }

  // ---- queries ----

  /** A frozen layer of a snapshot (a backing file a sandboxed VMM may be given, as a base). */
  isLayer(path: string): boolean {
    const dirs = [join(this.host.home, "layers"), ...this.host.store.listPools().filter((p) => p.name !== DEFAULT_POOL).map((p) => join(p.path, "layers"))];
    return dirs.some((d) => path.startsWith(d + "/")) && !path.slice(path.lastIndexOf("/") + 1).includes("..");
  }

  /**
   * Under the sandbox, before a VMM restores the state in `dir` for VM `vmId`: the group that may
   * read it (a memory snapshot's own group, or the VM's gid for a state saved only to restart it),
   * given the directory (jailed-state.ts shareWithGroup). Undefined without the sandbox.
   */
  /** The memory snapshot whose saved state `dir` is, if it is one (not a state saved only to restart a VM). */
  memorySnapshotAt(dir: string): { id: string; dir: string } | undefined {
    const snap = this.allRows().find((s) => s.memory && this.stateDir(s.id) === dir);
    return snap !== undefined ? { id: snap.id, dir } : undefined;
  }

  /** Whether snapshot `snapId` is still in the inventory. */
  exists(snapId: string): boolean {
    return this.db.prepare("SELECT 1 FROM snapshots WHERE id = ?").get(snapId) !== undefined;
  }

  shareForRestore(dir: string, vmId: string): number | undefined {
    const id = this.host.sandboxId;
    if (id === undefined) return undefined;
    const snap = this.allRows().find((s) => s.memory && this.stateDir(s.id) === dir);
    const gid = id(snap !== undefined ? snapshotOwner(snap.id) : vmId);
    shareWithGroup(dir, gid);
    return gid;
  }

  /** A jailed VMM's save (plan.jail) moved into the daemon's plan directory, once that VMM has ended; idempotent. */
  private adoptSave(plan: SnapshotPlan): void {
    if (plan.jail === undefined || plan.saveDir === undefined || existsSync(plan.saveDir)) return;
    try {
      lstatSync(plan.jail.save);
    } catch {
      return; // nothing saved there
    }
    adoptJailSave(plan.jail.save, plan.saveDir, plan.jail.uid);
  }

  /** The jailed VMM's `out/<op>.op`, removed as its uid (jailed-state.ts). */
  private async dropJailSave(plan: SnapshotPlan): Promise<void> {
    if (plan.jail !== undefined) await removeJailSave(dirname(plan.jail.save), plan.jail.uid);
  }

  /** The memory snapshot taken last, if any (what the standby pool starts for at the daemon's start: standby.ts). */
  newestWithMemory(): { id: string; dir: string } | undefined {
    const r = this.db.prepare("SELECT id FROM snapshots WHERE memory = 1 ORDER BY created_at DESC, rowid DESC LIMIT 1").get() as { id: string } | undefined;
    return r !== undefined ? { id: r.id, dir: this.stateDir(r.id) } : undefined;
  }

  list(vmName: string): SnapshotInfo[] {
    const vm = this.host.row(vmName);
    const rows = this.rows(vm.id);
    const current = this.currentOf(vm, rows);
    return rows.map((s) => this.info(vm, s, rows, current));
  }

  get(vmName: string, name: string): SnapshotInfo {
    const vm = this.host.row(vmName);
    const rows = this.rows(vm.id);
    return this.info(vm, this.rowNamed(vm, name), rows, this.currentOf(vm, rows));
  }

  /** Every file a VM disk, a snapshot, a plan under way or a clone stands on: what gc() and the bases sweep keep. */
  referencedFiles(): Set<string> {
    const keep = new Set<string>();
    for (const vm of this.host.store.listVms()) for (const d of vm.disks) for (const f of [d.path, ...chainOf(d)]) keep.add(f);
    for (const s of this.allRows()) {
      keep.add(this.stateDir(s.id));
      for (const d of s.disks) for (const f of [d.layer, ...d.chain]) keep.add(f);
    }
    for (const { plan } of this.ops()) {
      for (const w of plan.swaps) for (const f of [w.top, w.newTop, w.tmp, w.backing, ...w.chain, w.layer, w.trash]) if (f !== undefined) keep.add(f);
      if (plan.kind === "snapshot") {
        keep.add(this.stateDir(plan.snapId));
        if (plan.saveDir !== undefined) keep.add(dirname(plan.saveDir));
      }
      if (plan.kind === "rollback" && plan.restore !== undefined) keep.add(plan.restore.dir);
    }
    for (const files of this.pins.values()) for (const f of files) keep.add(f);
    return keep;
  }

  // ---- create ----

  create(vmName: string, input: unknown): Promise<SnapshotInfo> {
    const r = snapshotCreateSpec.safeParse(input);
    if (!r.success) return Promise.reject(invalid(r.error));
    return this.host.serial(vmName, () => this.createLocked(vmName, r.data));
  }

  private async createLocked(vmName: string, spec: z.output<typeof snapshotCreateSpec>): Promise<SnapshotInfo> {
    const vm = this.host.row(vmName);
    this.assertIdle(vm);
    if (vm.state === "starting" || vm.state === "stopping") throw new TypevisorError("VM_STATE", `cannot snapshot VM ${vm.name}: it is ${vm.state}`, { hint: "wait until it is running or stopped" });
    const hasVmm = vm.state === "running" || vm.state === "paused";
    if (spec.memory === true && !hasVmm) throw new TypevisorError("VM_STATE", `VM ${vm.name} is ${vm.state}: it has no memory to save`, { hint: "take a disk-only snapshot (--no-memory), or start it first" });
    const memory = spec.memory ?? hasVmm;
    const rows = this.rows(vm.id);
    if (rows.some((s) => s.name === spec.name)) throw new TypevisorError("SNAPSHOT_EXISTS", `VM ${vm.name} already has a snapshot named ${spec.name}`);
    const deepest = Math.max(0, ...vm.disks.map((d) => chainOf(d).length));
    if (deepest + 1 > MAX_LAYERS) {
      throw new TypevisorError("SNAPSHOT_CHAIN", `VM ${vm.name}'s disks stand on ${deepest} layers already, the most a disk may have`, { hint: "clone it with --full (a flat copy) and go on from the clone" });
    }
    const snapId = randomBytes(6).toString("hex");
    const opId = randomBytes(6).toString("hex");
    const vmState: SavedState = hasVmm ? (vm.state as "running" | "paused") : "stopped";
    const parent = this.currentOf(vm, rows);
    const plan: SnapshotPlan = {
      kind: "snapshot", vm: vm.name, vmId: vm.id, snapId, name: spec.name,
      ...(spec.description !== undefined ? { description: spec.description } : {}),
      ...(parent !== undefined ? { parent: parent.id } : {}),
      memory, vmState,
      ...(hasVmm ? { saveDir: join(this.statesDir(), `${opId}.op`, "state") } : {}),
      // A jailed VMM writes only its own output directory: it saves there, the daemon moves it (jailed-state.ts).
      ...(hasVmm && this.host.sandboxId !== undefined ? { jail: { save: join(vmPaths(this.host.home, vm.id).outDir, `${opId}.op`, "state"), uid: this.host.sandboxId(vm.id) } } : {}),
      phase: "begun",
      swaps: vm.disks.map((d) => {
        const index = diskIndexOf(d.path);
        const newTop = d.path.replace(/\.raw$/, ".qcow2");
        return {
          index, top: d.path, newTop, tmp: `${newTop}.${opId}.tmp`,
          layer: join(this.layersDir(d.pool), `${snapId}-disk${index}.${d.format ?? "raw"}`),
          backing: join(this.layersDir(d.pool), `${snapId}-disk${index}.${d.format ?? "raw"}`),
          backingFormat: d.format ?? "raw",
          chain: chainOf(d),
          sizeBytes: d.sizeBytes,
        };
      }),
    };
    // The plan first: from here a daemon killed at any point is put right at its next start.
    this.saveOp(opId, plan);
    crashPoint("snapshot:planned");
    let vmmEnded = false;
    try {
      if (hasVmm) {
        mkdirSync(dirname(plan.saveDir!), { recursive: true, mode: 0o700 });
        if (plan.jail !== undefined) prepareJailSave(dirname(plan.jail.save), plan.jail.uid);
        const client = new VmmClient(vmPaths(this.host.home, vm.id).apiSocket);
        // Paused before the save and kept so until the VMM is gone: nothing the guest does after
        // the saved moment may reach the disk that is frozen with it.
        if (vm.state === "running") await client.pause();
        await client.call("POST", "/snapshot", { path: plan.jail?.save ?? plan.saveDir, memory: true }, SAVE_TIMEOUT_MS);
        plan.phase = "saved";
        this.saveOp(opId, plan);
        crashPoint("snapshot:saved");
        await this.host.endVmm(vm.name);
        vmmEnded = true;
        crashPoint("snapshot:vmm-ended");
        // Its VMM gone, nothing of its uid runs: what it saved is checked and becomes the daemon's.
        this.adoptSave(plan);
      }
      for (const w of plan.swaps) {
        mkdirSync(dirname(w.layer!), { recursive: true, mode: 0o700 });
        this.swap(w);
        crashPoint("snapshot:frozen");
      }
      if (memory) renameSync(plan.saveDir!, this.stateDir(snapId));
      crashPoint("snapshot:state-taken");
      const disks = vm.disks.map((d, i) => ({ ...d, path: plan.swaps[i]!.newTop, format: "qcow2" as const, backing: plan.swaps[i]!.layer!, chain: [plan.swaps[i]!.layer!, ...chainOf(d)] }));
      const layers: SnapshotLayer[] = vm.disks.map((d, i) => ({
        index: plan.swaps[i]!.index, layer: plan.swaps[i]!.layer!, format: d.format ?? "raw", sizeBytes: d.sizeBytes, chain: chainOf(d),
        ...(d.pool !== undefined ? { pool: d.pool } : {}), ...(d.image !== undefined ? { image: d.image } : {}),
      }));
      const size = layers.reduce((a, l) => a + allocatedBytes(l.layer), 0) + (memory ? dirBytes(this.stateDir(snapId)) : 0);
      plan.phase = "committed";
      // One transaction: the snapshot exists, the VM stands on its new tops, and the plan says so, or none of it.
      this.db.transaction(() => {
        this.db
          .prepare("INSERT INTO snapshots (id, vm_id, name, parent, created_at, description, memory, vm_state, size_bytes, disks) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
          .run(snapId, vm.id, spec.name, parent?.id ?? null, new Date().toISOString(), spec.description ?? null, memory ? 1 : 0, vmState, size, JSON.stringify(layers));
        this.host.store.setDisks(vm.name, disks);
        this.setHead(vm.id, snapId);
        this.saveOp(opId, plan);
      })();
      crashPoint("snapshot:committed");
    } catch (e) {
      await this.undoSnapshot(opId, plan, vmmEnded);
      throw e;
    }
    this.host.event("vm.snapshot-created", vm.name, `VM ${vm.name}: snapshot ${spec.name} taken (${memory ? "disks and memory" : "disks only"})`, { snapshot: spec.name, id: snapId, memory });
    if (memory) this.host.snapshotWithMemory(snapId, this.stateDir(snapId));
    await this.restartAfterSnapshot(opId, plan);
    return this.get(vm.name, spec.name);
  }

  /** After the commit: the VMM back on the new tops, from the state just saved. */
  private async restartAfterSnapshot(opId: string, plan: SnapshotPlan): Promise<void> {
    try {
      if (plan.vmState !== "stopped") {
        const dir = plan.memory ? this.stateDir(plan.snapId) : plan.saveDir!;
        await this.host.startVmm(plan.vm, { dir, paused: plan.vmState === "paused" }).catch((e: unknown) => {
          // The snapshot is there; say so with the failure (the VM is left crashed, its disks on the new overlays).
          throw new TypevisorError("VM_START_FAILED", `snapshot ${plan.name} was taken, but VM ${plan.vm} did not start again from it: ${(e as Error).message}`, { hint: `typevisor vm start ${plan.vm} boots it; vm snapshot rollback ${plan.vm} ${plan.name} tries the restore again` });
        });
      }
    } finally {
      if (plan.saveDir !== undefined) await rm(dirname(plan.saveDir), { recursive: true, force: true });
      await this.dropJailSave(plan);
      this.deleteOp(opId);
    }
  }

  /** A snapshot that failed before its commit: everything back as it was, the VMM too. */
  private async undoSnapshot(opId: string, plan: SnapshotPlan, vmmEnded: boolean): Promise<void> {
    for (const w of plan.swaps) this.unswap(w);
    this.unrenameState(plan);
    try {
      if (vmmEnded) this.adoptSave(plan);
      if (vmmEnded && plan.saveDir !== undefined && existsSync(join(plan.saveDir, "state.json"))) {
        await this.host.startVmm(plan.vm, { dir: plan.saveDir, paused: plan.vmState === "paused" });
      } else if (!vmmEnded && plan.vmState === "running" && this.host.row(plan.vm).state === "running") {
        // the pause before the save is ours to undo
        await new VmmClient(vmPaths(this.host.home, plan.vmId).apiSocket).resume().catch(() => undefined);
      }
    } catch (e) {
      this.host.log.error({ vm: plan.vm, err: (e as Error).message }, "the VMM did not come back after a failed snapshot");
    } finally {
      if (plan.saveDir !== undefined) rmSync(dirname(plan.saveDir), { recursive: true, force: true });
      await this.dropJailSave(plan);
      this.deleteOp(opId);
    }
  }

  /** The saved state back where the VMM saved it, if the snapshot had already taken it as its own (then none is left there). */
  private unrenameState(plan: SnapshotPlan): void {
    const taken = this.stateDir(plan.snapId);
    if (plan.saveDir !== undefined && !existsSync(plan.saveDir) && existsSync(taken)) renameSync(taken, plan.saveDir);
    rmSync(taken, { recursive: true, force: true });
  }

  /**
   * Switch one disk to a new empty overlay on `w.backing`: made under its temporary name first,
   * then the old top goes (frozen read-only into its layer, or aside to be removed), then the
   * overlay takes the disk's name. Each step is one rename: unswap() can tell how far it got.
   */
  private swap(w: DiskSwap): void {
    createQcow2(w.tmp, { size: w.sizeBytes, backing: { file: w.backing, format: w.backingFormat } });
    const to = w.layer ?? w.trash!;
    renameSync(w.top, to);
    // A layer stays as it is for as long as anything stands on it.
    if (w.layer !== undefined) chmodSync(w.layer, 0o444);
    renameSync(w.tmp, w.newTop);
  }

  /** Undo swap() from wherever it stopped: the old top back under its name, the new overlay gone. */
  private unswap(w: DiskSwap): void {
    const moved = w.layer ?? w.trash!;
    if (existsSync(moved)) {
      // The new overlay took the disk's name already (no temporary left): it goes.
      if (!existsSync(w.tmp)) rmSync(w.newTop, { force: true });
      chmodSync(moved, 0o600);
      renameSync(moved, w.top);
    }
    rmSync(w.tmp, { force: true });
  }

  // ---- rollback ----

  rollback(vmName: string, name: string): Promise<VmInfo> {
    return this.host.serial(vmName, () => this.rollbackLocked(vmName, name));
  }

  private async rollbackLocked(vmName: string, name: string): Promise<VmInfo> {
    const vm = this.host.row(vmName);
    this.assertIdle(vm);
    const s = this.rowNamed(vm, name);
    if (vm.state === "starting" || vm.state === "stopping") throw new TypevisorError("VM_STATE", `cannot roll VM ${vm.name} back: it is ${vm.state}`, { hint: "wait until it is running or stopped" });
    const have = vm.disks.map((d) => `disk${diskIndexOf(d.path)}`).sort().join(", ");
    const had = s.disks.map((d) => `disk${d.index}`).sort().join(", ");
    if (have !== had) {
      throw new TypevisorError("SNAPSHOT_MISMATCH", `snapshot ${name} has disks ${had || "none"}, VM ${vm.name} has ${have || "none"} now`, { hint: "add or remove disks to match (vm disk add|rm) first" });
    }
    if (s.memory && !existsSync(join(this.stateDir(s.id), "state.json"))) throw new TypevisorError("SNAPSHOT_BROKEN", `snapshot ${name}'s saved state is missing (${this.stateDir(s.id)})`);
    const opId = randomBytes(6).toString("hex");
    const hadVmm = isActive(vm.state);
    const plan: RollbackPlan = {
      kind: "rollback", vm: vm.name, vmId: vm.id, snapId: s.id, hadVmm,
      ...(s.memory ? { restore: { dir: this.stateDir(s.id), paused: s.vmState === "paused" } } : {}),
      phase: "begun",
      swaps: vm.disks.map((d) => {
        const index = diskIndexOf(d.path);
        const l = s.disks.find((x) => x.index === index)!;
        const newTop = d.path.replace(/\.raw$/, ".qcow2");
        return { index, top: d.path, newTop, tmp: `${newTop}.${opId}.tmp`, trash: `${d.path}.${opId}.old`, backing: l.layer, backingFormat: l.format, chain: l.chain, sizeBytes: l.sizeBytes };
      }),
    };
    this.saveOp(opId, plan);
    crashPoint("rollback:planned");
    try {
      if (hadVmm) {
        await this.host.endVmm(vm.name);
        plan.phase = "vmm-ended";
        this.saveOp(opId, plan);
        crashPoint("rollback:vmm-ended");
      }
      this.commitRollback(opId, plan, vm);
    } catch (e) {
      // Undone if its VMM still runs; with the VMM gone there is nothing to go back to (the
      // failure is reported, the VM is left stopped on its old disks).
      for (const w of plan.swaps) this.unswap(w);
      this.deleteOp(opId);
      throw e;
    }
    this.host.event("vm.rolled-back", vm.name, `VM ${vm.name} rolled back to snapshot ${name}`, { snapshot: name, id: s.id, memory: s.memory });
    return this.finishRollback(opId, plan);
  }

  /** The disks switched and the switch recorded (one transaction with the plan's commit mark). */
  private commitRollback(opId: string, plan: RollbackPlan, vm: VmRow): void {
    for (const w of plan.swaps) {
      this.swap(w);
      crashPoint("rollback:swapped");
    }
    const disks = vm.disks.map((d, i) => {
      const w = plan.swaps[i]!;
      return { ...d, path: w.newTop, format: "qcow2" as const, backing: w.backing, chain: [w.backing, ...w.chain] };
    });
    plan.phase = "committed";
    this.db.transaction(() => {
      this.host.store.setDisks(vm.name, disks);
      this.setHead(vm.id, plan.snapId);
      this.saveOp(opId, plan);
    })();
    crashPoint("rollback:committed");
  }

  /** After the commit: the old tops removed, the VM running from the snapshot's state (or booted, if it ran). */
  private async finishRollback(opId: string, plan: RollbackPlan): Promise<VmInfo> {
    for (const w of plan.swaps) rmSync(w.trash!, { force: true });
    try {
      if (plan.restore !== undefined) return await this.host.startVmm(plan.vm, plan.restore);
      if (plan.hadVmm) return await this.host.startVmm(plan.vm);
      return this.host.get(plan.vm);
    } finally {
      this.deleteOp(opId);
    }
  }

  // ---- remove ----

  remove(vmName: string, name: string): Promise<void> {
    return this.host.serial(vmName, async () => {
      const vm = this.host.row(vmName);
      this.assertIdle(vm);
      const s = this.rowNamed(vm, name);
      // Its children now hang from its parent; its layers stay while a disk or snapshot stands on them (gc).
      this.db.transaction(() => {
        this.db.prepare("UPDATE snapshots SET parent = ? WHERE parent = ?").run(s.parent ?? null, s.id);
        this.db.prepare("DELETE FROM snapshots WHERE id = ?").run(s.id);
        // The VM stood on it: it now stands on what it was taken on.
        if (this.currentOf(vm, [s])?.id === s.id) this.setHead(vm.id, s.parent);
      })();
      this.host.snapshotsRemoved();
      // A layer one file stands on is merged into that file, when no VMM reads it (then freed by gc).
      let merged = 0;
      for (const l of s.disks) if (await this.merge(vm, l)) merged++;
      const freed = await this.gc();
      const kept = s.disks.length - freed.filter((f) => s.disks.some((l) => l.layer === f)).length;
      this.host.event(
        "vm.snapshot-removed", vm.name,
        `VM ${vm.name}: snapshot ${name} removed${merged > 0 ? ` (${merged} layer(s) merged into the one above)` : ""}${kept > 0 ? ` (${kept} layer(s) kept: more than one disk or snapshot, or a running VM, stands on them)` : ""}`,
        { snapshot: name, id: s.id, freed, merged },
      );
      await this.host.removeUnusedBases();
    });
  }

  /**
   * Merge layer `l` (of a snapshot being removed) into the one file that stands on it, so it can
   * be freed: `qemu-img rebase` (safe mode) copies into that file what it read through `l`, then
   * points it at what is below `l`. Only when exactly one file stands on it, no plan or clone under
   * way names it, and no VMM reads either (a VM's writable top only of this VM, stopped: we hold
   * its queue). A daemon killed during the rebase leaves the file's content as it was (each copied
   * cluster holds what it read through `l`, which is kept: the inventory still names it).
   */
  private async merge(vm: VmRow, l: SnapshotLayer): Promise<boolean> {
    const vms = this.host.store.listVms();
    const deps: { path: string; top?: VmRow }[] = [];
    for (const r of vms) for (const d of r.disks) if (chainOf(d)[0] === l.layer) deps.push({ path: d.path, top: r });
    for (const x of this.allRows()) for (const d of x.disks) if (d.chain[0] === l.layer) deps.push({ path: d.layer });
    if (deps.length !== 1) return false;
    const dep = deps[0]!;
    if (dep.top !== undefined && (dep.top.id !== vm.id || isActive(dep.top.state))) return false;
    if (vms.some((r) => isActive(r.state) && r.disks.some((d) => [d.path, ...chainOf(d)].includes(l.layer)))) return false;
    if ([...this.pins.values()].some((f) => f.includes(l.layer)) || this.ops().length > 0) return false;
    const below = l.chain[0];
    try {
      const fmt = below === undefined ? undefined : ((JSON.parse((await run("qemu-img", ["info", "--output=json", "-f", l.format, l.layer], { timeout: 60_000 })).stdout) as { "backing-filename-format"?: string })["backing-filename-format"] ?? "raw");
      if (dep.top === undefined) chmodSync(dep.path, 0o600);
      try {
        await run("qemu-img", ["rebase", "-f", "qcow2", ...(below === undefined ? ["-b", ""] : ["-b", below, "-F", fmt!]), dep.path], { timeout: 3_600_000 });
      } finally {
        if (dep.top === undefined) chmodSync(dep.path, 0o444);
      }
    } catch (e) {
      this.host.log.warn({ vm: vm.name, layer: l.layer, err: (e as { stderr?: string; message: string }).stderr ?? (e as Error).message }, "merging a removed snapshot's layer failed: it is kept");
      return false;
    }
    // Nothing names the layer any more: every chain that had it goes on below it.
    this.db.transaction(() => {
      for (const r of vms) {
        if (!r.disks.some((d) => chainOf(d).includes(l.layer))) continue;
        this.host.store.setDisks(r.name, r.disks.map((d) => {
          const chain = chainOf(d).filter((f) => f !== l.layer);
          const { backing: _b, chain: _c, ...rest } = d;
          return { ...rest, ...(chain[0] !== undefined ? { backing: chain[0], chain } : {}) };
        }));
      }
      for (const x of this.allRows()) {
        if (!x.disks.some((d) => d.chain.includes(l.layer))) continue;
        this.db.prepare("UPDATE snapshots SET disks = ? WHERE id = ?").run(JSON.stringify(x.disks.map((d) => ({ ...d, chain: d.chain.filter((f) => f !== l.layer) }))), x.id);
      }
    })();
    return true;
  }

  /** A VM removed: its snapshots go with it (their layers stay while a clone stands on them). */
  forgetVm(vmId: string): void {
    this.db.transaction(() => {
      this.db.prepare("DELETE FROM snapshots WHERE vm_id = ?").run(vmId);
      this.db.prepare("DELETE FROM snapshot_heads WHERE vm_id = ?").run(vmId);
      this.db.prepare("DELETE FROM snapshot_ops WHERE vm_id = ?").run(vmId);
    })();
  }

  /**
   * Remove layers and saved states nothing stands on any more (referencedFiles), and what an
   * interrupted operation left behind that no plan names. Not while a row cannot be read: it may
   * stand on any of them.
   */
  async gc(): Promise<string[]> {
    if (this.host.store.quarantined().length > 0) return [];
    const keep = this.referencedFiles();
    const doomed: string[] = [];
    const dirs = [join(this.host.home, "layers"), ...this.host.store.listPools().filter((p) => p.name !== DEFAULT_POOL).map((p) => join(p.path, "layers"))];
    for (const d of dirs) {
      if (!existsSync(d)) continue;
      for (const f of readdirSync(d)) if (!keep.has(join(d, f))) doomed.push(join(d, f));
    }
    if (existsSync(this.statesDir())) for (const f of readdirSync(this.statesDir())) if (!keep.has(join(this.statesDir(), f))) doomed.push(join(this.statesDir(), f));
    // Layers are read-only files: rm removes them whatever their mode (we own the directory).
    await Promise.all(doomed.map((f) => rm(f, { recursive: true, force: true })));
    return doomed;
  }

  // ---- clone ----

  /**
   * A new VM from a snapshot of `src` (one taken now, named clone-NEW, without --snapshot): its
   * disks overlays on the snapshot's layers (linked) or flat copies of them (--full); its own
   * MACs and TAPs. A memory snapshot's clone starts at once from the saved state.
   */
  async clone(srcName: string, input: unknown): Promise<VmInfo> {
    const parsed = cloneSpec.safeParse(input);
    if (!parsed.success) throw invalid(parsed.error);
    const spec = parsed.data;
    if (spec.name === srcName) throw new TypevisorError("VM_EXISTS", `a VM named ${spec.name} already exists`);
    if (this.host.store.getVm(spec.name) !== undefined) throw new TypevisorError("VM_EXISTS", `a VM named ${spec.name} already exists`);
    const src = this.host.row(srcName);
    const srcNets = src.spec.nets;
    if (srcNets.length > 0 && spec.nets === undefined) {
      throw new TypevisorError("INVALID_REQUEST", `VM ${src.name} has ${srcNets.length} NIC(s): give the clone its own TAP for each (--net tap=NAME)`, { hint: "two VMs cannot share a TAP" });
    }
    const snapName = spec.snapshot ?? `clone-${spec.name}`.slice(0, 63);
    if (spec.snapshot === undefined) await this.create(srcName, { name: snapName, description: `taken for the clone ${spec.name}` });
    // The snapshot's files are pinned for the clone (a snapshot rm meanwhile leaves them until it ends).
    const pin = Symbol(spec.name);
    const s = await this.host.serial(srcName, async () => {
      const vm = this.host.row(srcName);
      const row = this.rowNamed(vm, snapName);
      this.pins.set(pin, [this.stateDir(row.id), ...row.disks.flatMap((d) => [d.layer, ...d.chain])]);
      return row;
    });
    try {
      const nets = spec.nets ?? [];
      if (s.memory && nets.length !== srcNets.length) {
        throw new TypevisorError("INVALID_REQUEST", `snapshot ${snapName} has ${srcNets.length} NIC(s) running: its clone needs as many (--net), not ${nets.length}`);
      }
      const withMacs = nets.map((n) => ({ ...n, mac: n.mac ?? randomMac() }));
      const created = await this.host.serial(spec.name, () => this.makeClone(src, s, spec.name, spec.full, withMacs));
      this.host.event("vm.cloned", spec.name, `VM ${spec.name} cloned from ${src.name}'s snapshot ${snapName} (${spec.full ? "full copy" : "linked"})`, { source: src.name, snapshot: snapName, full: spec.full });
      if (s.memory) return await this.host.serial(spec.name, () => this.host.startVmm(spec.name, { dir: this.stateDir(s.id), paused: s.vmState === "paused" }));
      if (spec.start) return await this.host.serial(spec.name, () => this.host.startVmm(spec.name));
      return created;
    } finally {
      this.pins.delete(pin);
    }
  }

  /** The clone's directory assembled in `<id>.creating` and renamed into place, then its row (as create does: the start-up sweep removes a half-made one). */
  private async makeClone(src: VmRow, s: SnapshotRow, name: string, full: boolean, nets: { tap: string; mac: string }[]): Promise<VmInfo> {
    if (this.host.store.getVm(name) !== undefined) throw new TypevisorError("VM_EXISTS", `a VM named ${name} already exists`);
    const release = this.host.reserveDisk(s.disks.reduce((a, d) => a + d.sizeBytes, 0));
    try {
      const id = randomBytes(6).toString("hex");
      const p = vmPaths(this.host.home, id);
      const staging = `${p.dir}.creating`;
      mkdirSync(staging, { recursive: true, mode: 0o700 });
      try {
        for (const f of ["vmlinuz", "initrd.img", "cmdline"]) if (existsSync(join(src.dir, f))) await copyFile(join(src.dir, f), join(staging, f));
        const disks: DiskRow[] = [];
        for (const l of s.disks) {
          const dest = join(staging, `disk${l.index}.qcow2`);
          const path = join(p.dir, `disk${l.index}.qcow2`);
          if (full) {
            // A flat copy of the whole chain (only the clusters with data are written).
            await run("qemu-img", ["convert", "-f", l.format, "-O", "qcow2", l.layer, dest], { timeout: 3_600_000 }).catch((e: { code?: string; stderr?: string; message: string }) => {
              if (e.code === "ENOENT") throw new TypevisorError("MISSING_TOOL", "a full clone needs qemu-img", { hint: "apt-get install qemu-utils" });
              throw new TypevisorError("CLONE_COPY", `copying ${l.layer}: ${(e.stderr ?? e.message).trim()}`);
            });
            disks.push({ path, sizeBytes: l.sizeBytes, format: "qcow2", ...(l.image !== undefined ? { image: l.image } : {}) });
          } else {
            createQcow2(dest, { size: l.sizeBytes, backing: { file: l.layer, format: l.format } });
            disks.push({ path, sizeBytes: l.sizeBytes, format: "qcow2", backing: l.layer, chain: [l.layer, ...l.chain], ...(l.image !== undefined ? { image: l.image } : {}) });
          }
        }
        renameSync(staging, p.dir);
        const now = new Date().toISOString();
        const spec: VmSpec = { ...src.spec, name, pool: DEFAULT_POOL, nets };
        try {
          this.host.insertVm({ id, name, spec, state: "defined", createdAt: now, updatedAt: now, dir: p.dir, disks, restarts: 0 });
        } catch (e) {
          rmSync(p.dir, { recursive: true, force: true });
          throw e;
        }
      } catch (e) {
        await rm(staging, { recursive: true, force: true });
        throw e;
      }
      this.host.event("vm.created", name, `VM ${name} created (a clone of ${src.name})`, { id, cpus: src.spec.cpus, memoryMiB: src.spec.memoryMiB, source: src.name });
      return this.host.get(name);
    } finally {
      release();
    }
  }

  // ---- recovery ----

  /** A VM with a plan under way (possible only while its queue is held, or before recovery ran). */
  private assertIdle(vm: VmRow): void {
    if (this.ops().some((o) => o.plan.vmId === vm.id)) throw new TypevisorError("VM_STATE", `VM ${vm.name} has a snapshot or rollback under way`, { hint: "try again in a moment" });
  }

  /**
   * At daemon start, before VMMs are re-attached: every plan a killed daemon left is brought to
   * an end on disk (undone before its commit, finished after it); what needs the VMM (a resume,
   * a start from a saved state) is returned for finishRecovery.
   */
  recoverFiles(): FollowUp[] {
    const out: FollowUp[] = [];
    for (const { id, plan } of this.ops()) {
      const vm = this.host.store.listVms().find((r) => r.id === plan.vmId);
      if (vm === undefined) {
        this.deleteOp(id);
        continue;
      }
      try {
        out.push(plan.kind === "snapshot" ? this.recoverSnapshot(id, plan) : this.recoverRollback(id, plan, vm));
      } catch (e) {
        this.host.log.error({ vm: plan.vm, err: (e as Error).message }, `recovering an interrupted ${plan.kind} failed`);
      }
    }
    return out;
  }

  private recoverSnapshot(id: string, plan: SnapshotPlan): FollowUp {
    if (plan.phase === "committed") {
      // Complete: only the VMM's restart was left.
      const dir = plan.memory ? this.stateDir(plan.snapId) : plan.saveDir;
      this.host.event("vm.snapshot-created", plan.vm, `VM ${plan.vm}: snapshot ${plan.name} completed after a daemon restart`, { snapshot: plan.name, id: plan.snapId });
      return { opId: id, vm: plan.vm, vmId: plan.vmId, resume: false, ...(plan.vmState !== "stopped" && dir !== undefined ? { start: { dir, paused: plan.vmState === "paused" } } : {}), ...(plan.jail !== undefined ? { plan } : {}) };
    }
    if (plan.phase !== "reverted") {
      for (const w of plan.swaps) this.unswap(w);
      this.unrenameState(plan);
      plan.phase = "reverted";
      this.saveOp(id, plan);
      this.host.event("vm.snapshot-failed", plan.vm, `VM ${plan.vm}: snapshot ${plan.name} was interrupted by a daemon restart and undone`, { snapshot: plan.name });
    }
    // Its VMM, if the snapshot had stopped it, comes back from the state saved for it on the disks it
    // had (a jailed VMM's save is moved in finishRecovery, once it is known that VMM has ended).
    const saved = plan.saveDir !== undefined && (existsSync(join(plan.saveDir, "state.json")) || plan.jail !== undefined);
    return {
      opId: id, vm: plan.vm, vmId: plan.vmId, resume: plan.vmState === "running",
      ...(plan.vmState !== "stopped" && saved ? { start: { dir: plan.saveDir!, paused: plan.vmState === "paused" } } : {}),
      ...(plan.jail !== undefined ? { plan } : {}),
    };
  }

  private recoverRollback(id: string, plan: RollbackPlan, vm: VmRow): FollowUp {
    if (plan.phase === "begun") {
      for (const w of plan.swaps) this.unswap(w);
      this.deleteOp(id);
      return { opId: id, vm: plan.vm, vmId: plan.vmId, resume: false };
    }
    if (plan.phase === "vmm-ended") {
      // The VMM is gone: finish what was asked, from the start (the disks back as they were, then switched).
      for (const w of plan.swaps) this.unswap(w);
      this.commitRollback(id, plan, vm);
    }
    for (const w of plan.swaps) rmSync(w.trash!, { force: true });
    this.host.event("vm.rolled-back", plan.vm, `VM ${plan.vm}: rollback completed after a daemon restart`, { id: plan.snapId });
    return { opId: id, vm: plan.vm, vmId: plan.vmId, resume: false, ...(plan.restore !== undefined ? { start: plan.restore } : plan.hadVmm ? { start: { paused: false } } : {}) };
  }

  /** After re-attach: resume what a save had paused, start from its saved state what a plan had stopped; then the plans go. */
  async finishRecovery(followUps: FollowUp[]): Promise<void> {
    for (const f of followUps) {
      try {
        const vm = this.host.store.listVms().find((r) => r.id === f.vmId);
        if (vm === undefined) continue;
        if (isActive(vm.state)) {
          if (f.resume && vm.state === "paused") await this.host.resume(vm.name);
        } else if (f.start !== undefined && (vm.state === "stopped" || vm.state === "crashed" || vm.state === "defined")) {
          const { dir, paused } = f.start;
          // Not re-attached: its VMM has ended, and what it saved may be moved now.
          if (f.plan !== undefined && f.plan.phase !== "committed") this.adoptSave(f.plan);
          if (dir === undefined || existsSync(join(dir, "state.json"))) await this.host.serial(vm.name, () => this.host.startVmm(vm.name, dir !== undefined ? { dir, paused } : undefined));
        }
      } catch (e) {
        this.host.log.error({ vm: f.vm, err: (e as Error).message }, "restarting a VM after an interrupted snapshot or rollback failed");
      } finally {
        if (f.plan !== undefined) await this.dropJailSave(f.plan);
        this.deleteOp(f.opId);
      }
    }
    await this.gc();
  }
}

function invalid(e: z.ZodError): TypevisorError {
  return new TypevisorError("INVALID_REQUEST", e.issues.map((i) => `${i.path.length > 0 ? i.path.join(".") : "body"}: ${i.message}`).join("; "));
}

/** A locally administered unicast MAC (IEEE 802 §8.2.2: bit 1 of the first octet set, bit 0 clear) in QEMU's 52:54:00 range. */
function randomMac(): string {
  return ["52", "54", "00", ...[...randomBytes(3)].map((b) => b.toString(16).padStart(2, "0"))].join(":");
}

/** Bytes the files of a directory take on the host. */
function dirBytes(dir: string): number {
  try {
    return readdirSync(dir).reduce((a, f) => a + statSync(join(dir, f)).blocks * 512, 0);
  } catch {
    return 0;
  }
}

