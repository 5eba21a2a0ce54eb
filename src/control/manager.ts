/**
 * The VM manager: the daemon's core. It owns the inventory (Store), turns
 * user actions into state-machine transitions (state.ts), starts one VMM
 * process per VM through the native engine, watches those processes, applies
 * resource policy (resources.ts) and cgroup limits (cgroups.ts), collects
 * usage, and records every lifecycle change as an event.
 *
 * Concurrency: every action and every process exit for one VM runs through
 * that VM's queue, so two requests never interleave halfway.
 */
import { readStatsChanges, readStatsFile } from "./stats-page.js";
import { EventEmitter } from "node:events";
import { copyFile, rm } from "node:fs/promises";
import { closeSync, constants, existsSync, fstatSync, mkdirSync, openSync, readdirSync, readFileSync, readlinkSync, realpathSync, renameSync, rmSync, statfsSync, statSync, unlinkSync, writeFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { dirname, join, sep } from "node:path";
import type { ChildProcess } from "node:child_process";
import type { Logger } from "pino";
import { z } from "zod";
import { TypevisorError } from "../errors.js";
import { imagePaths, imagesDir } from "../images/dirs.js";
import { parseManifest } from "../images/manifest.js";
import { diskArg, netArg, spawnVmm, type VmmLaunch } from "../engine/native.js";
import { readRegularNoFollow } from "../sys/untrusted-file.js";
import { sendFds } from "../sys/scm-rights.js";
import { openTap, setLinkUp } from "../sys/tap.js";
import { filesystemOf } from "../sys/mounts.js";
import { allocateUid, spawnSandboxed, type SandboxOptions } from "./sandbox/sandbox.js";
import { basesDir } from "./bases.js";
import { VmmClient } from "../engine/vmm-client.js";
import { kvmHostKind } from "../kvm/kvm.js";
import { DEFAULT_CMDLINE, vmmOverheadBytes } from "../vmm/defaults.js";
import { VmCgroup, detectCgroupV2, type CgroupSupport } from "./cgroups.js";
import { createQcow2 } from "../vmm/disk/qcow2/create.js";
import { diskFullError } from "./disk-full.js";
import { ensureBase, ensureDiskImageBase, leftoverBaseFiles, removeUnusedBases } from "./bases.js";
import { loadDiskImage, type DiskImageManifest } from "../images/import.js";
import { allocatedBytes, blankDisk, diskFromImage, roundUpToSector } from "./disks.js";
import { homePaths, vmPaths } from "./paths.js";
import { processAlive, processesWith, processStartTime, processUsage } from "./proc.js";
import { checkAllocation, discoverHost, hostUsed, report, type Allocation, type CpuSample, type OvercommitPolicy, type ResourceReport } from "./resources.js";
import { parseSize } from "../size.js";
import { diskAddSpec, vmSpec, type EventRecord, type VmExit, type VmInfo, type VmSpec, type VmState, type VmUsage } from "./spec.js";
import { assertAction, assertTransition, isActive, type VmAction } from "./state.js";
import { Store, type DiskRow, type VmRow } from "./store.js";
import { AlertEngine, AlertRules, type AlertChange, type AlertRule, type AlertRuleSpec, type FiringAlert, type Observation } from "./alerts.js";
import type { AuditLog } from "./audit.js";
import { Webhooks, type WebhookStatus } from "./webhooks.js";
import { HOST_SCOPE, MetricsHistory, RateTracker, type HistoryPoint, type MetricSample } from "./history.js";
import { Snapshots, chainOf } from "./snapshots.js";
import { StandbyPool, type StandbyVmm } from "./standby.js";
import { adoptStandbyUid, handVmFiles, hasSandboxUid, JailedStandbys, sealHandoff } from "./sandbox/jailed-standby.js";
import { Migrations, type PeerConnector } from "./migration.js";
import { checkPoolPath, checkPoolQuota, claimPool, releasePool, DEFAULT_POOL, poolDiskPath, poolReport, poolSpec, quotaOf, sweepPool, type PoolDisk, type PoolInfo, type PoolRow } from "./pools.js";

export interface ManagerConfig {
  home: string;
  /** Where `image` names resolve (typevisor image build). */
  imagesHome?: string;
  policy: OvercommitPolicy;
  forceKvm: boolean;
  consoleLogSize: number;
  startTimeoutMs: number;
  stopTimeoutMs: number;
  usageIntervalMs: number;
  logger: Logger;
  /** Run each VMM in its sandbox (sandbox/sandbox.ts); undefined: as the daemon's own child, unconfined. */
  sandbox?: SandboxOptions;
  /** Do not use cgroups even where cgroup v2 is there. */
  noCgroups?: boolean;
  /** The base of what the cgroup allows beyond guest RAM (Node, device thread, buffers); per-vCPU and page-table shares are added (vmm/defaults.ts vmmOverheadBytes). */
  vmmOverheadBytes?: number;
  /** Real paths of the directories a spec's kernel and initrd may come from (--allow-files); none by default. */
  allowedDirs?: string[];
  /** URLs each alert.firing and alert.resolved event is POSTed to (webhooks.ts). */
  alertWebhooks?: string[];
  /** The first retry's delay; each next one doubles (default 1 s). */
  webhookRetryBaseMs?: number;
  /** Standby VMMs kept ready for restores (standby.ts); default 1 where KVM is hardware, else 0. */
  standbyVmms?: number;
  /** How this daemon reaches another for a live migration (the API client; control/migration.ts). */
  migrationPeer?: PeerConnector;
}

/** Biggest disk we will create: far past any host here, well short of a typo's 10^18. */
const MAX_DISK_BYTES = 64 * 2 ** 40;
const RESTART_WINDOW_MS = 10 * 60_000;
/** Disks a VM may have: one PCI slot each, beside its other devices (31 slots). */
const MAX_DISKS = 16;

const RESTART_MAX = 5;

/** N of a disk file named disk<N>.<fmt> or <id>-disk<N>.<fmt> (-1 for anything else). */
function diskIndex(path: string): number {
  const m = /disk(\d+)\.(?:raw|qcow2)$/.exec(path);
  return m === null ? -1 : Number(m[1]);
}

/** A VMM process just spawned (spawnProcess): pid undefined when the spawn failed (its "error" says why). */
interface Spawned {
  child: ChildProcess;
  pid: number | undefined;
  /** The uid its sandbox runs it as. */
  sandboxUid?: number;
}

interface Live {
  pid: number;
  child?: ChildProcess;
  /** Resolved when the process has exited and its exit is recorded. */
  exited: Promise<void>;
  markExited: () => void;
  /** Resolved as soon as the process is seen dead (before its exit is recorded through the VM's queue). */
  died: Promise<{ code: number | null; signal: string | null }>;
  dead: boolean;
  /** For VMMs this daemon did not start (re-attached after a restart): liveness polling. */
  poll?: NodeJS.Timeout;
  /** The watchdog's last answer from this VMM (what it watches for), its wait and next check. */
  /** `changes`: the VMM's stats page's change counter when the last check was asked (undefined: no page). */
  health?: { seen: string; everyMs: number; nextAt: number; changes: number | undefined };
  /** Health checks asked of this VMM (the typevisor_vm_health_checks metric). */
  healthChecks?: number;
  cgroup?: VmCgroup;
  prevCpu?: { at: number; cpuSeconds: number };
  /** Since when its control API has not answered (the watchdog); undefined while it answers. */
  unresponsiveSince?: string;
  /** A health check of this VMM is under way (one at a time per VMM). */
  checking?: boolean;
  /** Guest console output the VMM reported dropped (its console log's disk full), from the watchdog. */
  consoleDroppedBytes?: number;
  /** Why the VMM paused the VM by itself (a full disk), until it is resumed. */
  pauseReason?: VmmPauseReason;
  /** Stopped by a snapshot or rollback (snapshots.ts endVmm): its exit is that operation's, not a stop or a crash. */
  handedOver?: boolean;
}

/** GET /vm of a VMM as far as the daemon reads it (vmm/vm.ts PauseReason; every field untrusted). */
interface VmmPauseReason {
  kind?: string;
  errno?: string;
  disk?: string;
  filesystem?: { mountPoint?: string; type?: string; freeBytes?: number; sizeBytes?: number };
  message: string;
  at?: string;
}
interface VmmInfo {
  state?: string;
  pauseReason?: VmmPauseReason | null;
  consoleDroppedBytes?: unknown;
}

/** How often the watchdog asks each running VMM, and how long an answer may take. */
const HEALTH_INTERVAL_MS = 2000;
/**
 * The longest wait between two health checks of one VMM, reached while its answers stay the same
 * (each unchanged answer doubles the wait; any change, or no answer, brings it back to
 * HEALTH_INTERVAL_MS). A check costs both processes a request over the VMM's socket: ~1.5 ms of
 * CPU on a project machine, tens of ms on the KVM lab's emulated CPU, where ten idle VMs checked
 * every 2 s took a measurable share of it (docs/benchmarks.md, "An idle VMM's wake-ups"). What
 * the checks watch for does not wait for the wait: the VMM counts each change of it in its stats
 * page, which the watchdog reads every tick (a file read), and a VMM whose count moved is asked at once.
 */
const HEALTH_MAX_INTERVAL_MS = 8000;
const HEALTH_TIMEOUT_MS = 3000;

function zodMessage(e: z.ZodError): string {
  return e.issues.map((i) => `${i.path.length > 0 ? i.path.join(".") : "spec"}: ${i.message}`).join("; ");
}

export function parseVmSpec(input: unknown): VmSpec {
  const r = vmSpec.safeParse(input);
  if (!r.success) throw new TypevisorError("INVALID_REQUEST", zodMessage(r.error));
  return r.data;
}

export class VmManager extends EventEmitter {
  readonly store: Store;
  readonly cgroups: CgroupSupport;
  private readonly live = new Map<string, Live>();
  /** Jailed standbys' uids and mounts (under the sandbox only). */
  private readonly jailer: JailedStandbys | undefined;
  private readonly queues = new Map<string, Promise<unknown>>();
  private readonly usage = new Map<string, VmUsage>();
  /** Usage history (history.ts), fed by collectUsage. */
  readonly history: MetricsHistory;
  private readonly rates = new RateTracker();
  /** Alert rules (the inventory's) and their evaluation (alerts.ts). */
  private readonly alertRules: AlertRules;
  private readonly alerts = new AlertEngine();
  private readonly webhooks: Webhooks;
  private readonly restartTimes = new Map<string, number[]>();
  private usageTimer: NodeJS.Timeout | undefined;
  private audit: AuditLog | undefined;
  private healthTimer: NodeJS.Timeout | undefined;
  private hostCpu: CpuSample | undefined;
  private hostCpuUsed = 0;
  private closing = false;
  /** Events the inventory could not take since the last one it did (a full disk): reported once it can. */
  private eventsLost = 0;
  private readonly log: Logger;
  /** Resources of creates between their admission and their inventory row (allocated() counts them). */
  private readonly reservations = new Set<Allocation>();
  /** Virtual disk bytes of creates and disk adds between their admission and their inventory row, by pool (poolAllocated() counts them). */
  private readonly poolReservations = new Set<{ pool: string; bytes: number }>();
  /** Snapshots, rollback and clones (snapshots.ts). */
  readonly snapshots: Snapshots;
  /** VMMs started ahead of need, which restores take (standby.ts); none kept when its size is 0. */
  readonly standby: StandbyPool;
  /** Live migration to and from other daemons (migration.ts). */
  readonly migrations: Migrations;

  constructor(readonly config: ManagerConfig) {
    super();
    this.setMaxListeners(0);
    const hp = homePaths(config.home);
    mkdirSync(hp.vms, { recursive: true, mode: 0o700 });
    mkdirSync(hp.run, { recursive: true, mode: 0o700 });
    this.store = new Store(hp.db);
    this.history = new MetricsHistory(this.store.db);
    this.alertRules = new AlertRules(this.store.db);
    this.webhooks = new Webhooks(config.alertWebhooks ?? [], {
      baseDelayMs: config.webhookRetryBaseMs ?? 1000,
      attempts: 5,
      onGiveUp: (url, e, message) =>
        this.daemonEvent("alert.webhook-failed", `webhook ${url} did not take event ${e.seq} (${e.type}) after 5 attempts: ${message}`, { url, seq: e.seq, error: message }),
    });
    this.ensureDefaultPool(hp.vms);
    this.cgroups = config.noCgroups === true ? { available: false, controllers: [], reason: "turned off (--no-cgroups)" } : detectCgroupV2();
    this.log = config.logger;
    this.snapshots = new Snapshots({
      home: config.home,
      log: config.logger,
      store: this.store,
      serial: (name, fn) => this.serial(name, fn),
      row: (name) => this.row(name),
      get: (name) => this.get(name),
      event: (type, vm, message, data) => this.event(type, vm, message, data),
      endVmm: (name) => this.endVmm(name),
      startVmm: (name, restore) => this.startLocked(name, false, restore),
      resume: (name) => this.resume(name),
      reserveDisk: (bytes) => {
        checkAllocation(discoverHost(this.config.home), this.config.policy, this.allocated(), { cpus: 0, memoryBytes: 0, diskBytes: bytes }, { disk: true });
        const reservation: Allocation = { cpus: 0, memoryBytes: 0, diskBytes: bytes };
        this.reservations.add(reservation);
        return () => this.reservations.delete(reservation);
      },
      insertVm: (row) => this.store.insertVm(row),
      removeUnusedBases: () => this.removeUnusedBases(),
      snapshotWithMemory: (id, dir) => this.standby.want({ id, dir }, { retarget: false }),
      snapshotsRemoved: () => this.standby.dropTemplateUnless((id) => this.snapshots.exists(id)),
      ...(config.sandbox !== undefined ? { sandboxId: (owner: string) => allocateUid(this.store.db, owner, config.sandbox!.uidBase, config.sandbox!.uidCount) } : {}),
    });
    // Under the sandbox each standby is jailed for one memory snapshot (sandbox/jailed-standby.ts).
    const standbys = config.standbyVmms ?? (kvmHostKind() === "hardware" ? 1 : 0);
    const sandbox = config.sandbox;
    this.jailer = sandbox !== undefined ? new JailedStandbys({ db: this.store.db, home: config.home, sandbox, forceKvm: config.forceKvm, templateGroup: (t) => this.snapshots.shareForRestore(t.dir, "")! }) : undefined;
    this.standby = new StandbyPool({ home: config.home, size: standbys, forceKvm: config.forceKvm, log: config.logger, readyTimeoutMs: config.startTimeoutMs, ...(this.jailer !== undefined ? { jail: this.jailer } : {}) });
    this.migrations = new Migrations({
      home: config.home,
      log: config.logger,
      store: this.store,
      sandboxed: config.sandbox !== undefined,
      allowedDirs: config.allowedDirs ?? [],
      imagesHome: config.imagesHome,
      startTimeoutMs: config.startTimeoutMs,
      serial: (name, fn) => this.serial(name, fn),
      row: (name) => this.row(name),
      event: (type, vm, message, data) => this.event(type, vm, message, data),
      setState: (name, to) => void this.setState(name, to),
      startIncoming: (name, incoming) => this.startIncoming(name, incoming),
      vmm: (id) => {
        const l = this.live.get(id);
        return l === undefined ? undefined : { alive: !l.dead, died: l.died };
      },
      kill: (pid) => kill(pid),
      peer: config.migrationPeer,
    });
  }

  // ---- queries ------------------------------------------------------------

  list(): VmInfo[] {
    return this.store.listVms().map((r) => this.info(r));
  }

  get(name: string): VmInfo {
    return this.info(this.row(name));
  }

  private row(name: string): VmRow {
    const r = this.store.getVm(name);
    if (r === undefined) throw new TypevisorError("VM_NOT_FOUND", `no VM named ${name}`, { hint: "typevisor vm ls lists them" });
    return r;
  }

  private info(r: VmRow): VmInfo {
    const p = vmPaths(this.config.home, r.id);
    const live = this.live.get(r.id);
    const since = live?.unresponsiveSince;
    const pause = live?.pauseReason;
    return {
      id: r.id,
      name: r.name,
      state: r.state,
      spec: r.spec as unknown as Record<string, unknown>,
      createdAt: r.createdAt,
      updatedAt: r.updatedAt,
      ...(r.runtime !== undefined ? { pid: r.runtime.pid, startedAt: r.runtime.startedAt } : {}),
      disks: r.disks.map((d) => ({ ...d, name: `disk${diskIndex(d.path)}`, format: d.format ?? "raw", pool: d.pool ?? DEFAULT_POOL, allocatedBytes: allocatedBytes(d.path) })),
      consoleLog: p.consoleLog,
      apiSocket: p.apiSocket,
      ...(r.lastExit !== undefined ? { lastExit: r.lastExit } : {}),
      restarts: r.restarts,
      ...(r.runtime?.cgroup !== undefined ? { cgroup: r.runtime.cgroup } : {}),
      ...(r.runtime?.sandboxUid !== undefined && isActive(r.state) ? { sandbox: { uid: r.runtime.sandboxUid } } : {}),
      ...(since !== undefined ? { unresponsive: { since } } : {}),
      ...(live?.consoleDroppedBytes !== undefined ? { consoleDroppedBytes: live.consoleDroppedBytes } : {}),
      ...(r.state === "paused" && pause !== undefined ? { pauseReason: { kind: pause.kind ?? "disk-full", message: pause.message, ...(pause.disk !== undefined ? { disk: pause.disk } : {}), ...(pause.filesystem?.mountPoint !== undefined ? { filesystem: pause.filesystem.mountPoint } : {}) } } : {}),
    };
  }

  /** The latest usage sample of a running VM. */
  stats(name: string): VmUsage | undefined {
    const r = this.row(name);
    return this.usage.get(r.id);
  }

  allUsage(): { vm: VmInfo; usage: VmUsage | undefined }[] {
    return this.store.listVms().map((r) => ({ vm: this.info(r), usage: this.usage.get(r.id) }));
  }

  /** Health checks (GET /vm) asked of each VM's running VMM so far, by VM name. */
  healthChecks(): { vm: string; checks: number }[] {
    return this.store.listVms().flatMap((r) => {
      const live = this.live.get(r.id);
      return live === undefined || live.dead ? [] : [{ vm: r.name, checks: live.healthChecks ?? 0 }];
    });
  }

  /** The daemon's own log and, for a VM, its VMM's log and console log (GET /v1/logs, logs.ts). */
  logPaths(name?: string): { daemon: string; vmm?: string; console?: string } {
    const daemon = homePaths(this.config.home).daemonLog;
    if (name === undefined) return { daemon };
    const p = vmPaths(this.config.home, this.row(name).id);
    return { daemon, vmm: p.vmmLog, console: p.consoleLog };
  }

  consolePaths(name: string): { log: string; socket: string; state: VmState } {
    const r = this.row(name);
    const p = vmPaths(this.config.home, r.id);
    return { log: p.consoleLog, socket: p.consoleSocket, state: r.state };
  }

  events(opts: { afterSeq?: number; vm?: string; limit?: number }): EventRecord[] {
    return this.store.events(opts);
  }

  host(): ResourceReport & { cgroups: CgroupSupport; vms: Record<VmState, number>; standbyVmms: { size: number; ready: number; template?: string } } {
    const host = discoverHost(this.config.home);
    // Memory and disk are read now; CPU is the average over the last usage interval.
    const { used } = hostUsed(this.config.home);
    const vms: Record<VmState, number> = { defined: 0, starting: 0, running: 0, paused: 0, stopping: 0, stopped: 0, crashed: 0, migrating: 0, incoming: 0 };
    for (const r of this.store.listVms()) vms[r.state]++;
    return { ...report(host, this.config.policy, this.allocated(), { ...used, cpus: this.hostCpuUsed }), cgroups: this.cgroups, vms, standbyVmms: { size: this.standby.size, ready: this.standby.ready(), ...(this.standby.templateId() !== undefined ? { template: this.standby.templateId()! } : {}) } };
  }

  /** CPU and memory of VMs that hold a VMM; disk of every VM. */
  private allocated(except?: string): Allocation {
    const a: Allocation = { cpus: 0, memoryBytes: 0, diskBytes: 0 };
    // creates admitted but not yet in the inventory hold their share too
    for (const r of this.reservations) {
      a.cpus += r.cpus;
      a.memoryBytes += r.memoryBytes;
      a.diskBytes += r.diskBytes;
    }
    for (const r of this.store.listVms()) {
      if (r.name === except) continue;
      // The host's disk budget is the home's filesystem: disks in other pools are on theirs (pools.ts).
      for (const d of r.disks) if ((d.pool ?? DEFAULT_POOL) === DEFAULT_POOL) a.diskBytes += d.sizeBytes;
      if (isActive(r.state)) {
        a.cpus += r.spec.cpus;
        a.memoryBytes += r.spec.memoryMiB * 2 ** 20;
      }
    }
    return a;
  }

  // ---- per-VM serialisation --------------------------------------------

  private serial<T>(name: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.queues.get(name) ?? Promise.resolve();
    // Every operation goes through here: a full disk met anywhere in one is said as such (DISK_FULL, 507).
    const run = (): Promise<T> => fn().catch((e: unknown) => {
      throw diskFullError(e, homePaths(this.config.home).db);
    });
    const next = prev.then(run, run);
    const tail = next.catch(() => undefined);
    this.queues.set(name, tail);
    void tail.then(() => {
      if (this.queues.get(name) === tail) this.queues.delete(name);
    });
    return next;
  }

  private event(type: string, vm: string | undefined, message: string, data?: Record<string, unknown>): void {
    let e: EventRecord;
    try {
      e = this.store.addEvent({ type, ...(vm !== undefined ? { vm } : {}), message, ...(data !== undefined ? { data } : {}) });
    } catch (err) {
      // An event that cannot be recorded (the inventory's disk is full) must not fail the
      // operation that emits it, which has already happened: the daemon's log keeps it.
      this.eventsLost++;
      this.log.error({ event: type, vm, ...data, err: (diskFullError(err, homePaths(this.config.home).db) as Error).message }, `event not recorded: ${message}`);
      return;
    }
    this.log.info({ event: type, vm, ...data }, message);
    this.emit("event", e);
    if (type === "alert.firing" || type === "alert.resolved") this.webhooks.deliver(e);
    // a crash is an alert at once, not at the next usage sample (it may be restarted by then)
    if (vm !== undefined && (type === "vm.crashed" || type === "vm.restarting")) {
      this.alertEvents(this.alerts.fireNow({ rule: "vm-crashed", subject: `vm:${vm}`, vm, severity: "critical", message: type === "vm.crashed" ? `VM ${vm} crashed` : `VM ${vm} crashed and is being restarted` }));
    }
    if (this.eventsLost > 0) {
      const lost = this.eventsLost;
      this.eventsLost = 0;
      this.daemonEvent("daemon.events-lost", `${lost} event(s) could not be recorded in the inventory (see the daemon's log)`, { lost });
    }
  }

  private setState(name: string, to: VmState, extra: Parameters<Store["updateVm"]>[1] = {}): VmRow {
    const cur = this.row(name);
    if (cur.state !== to) assertTransition(cur.state, to);
    return this.store.updateVm(name, { ...extra, state: to });
  }

  // ---- create / remove --------------------------------------------------

  async create(input: unknown): Promise<VmInfo> {
    const spec = parseVmSpec(input);
    // The files allowedFile() opened for this create: copied from, then closed whatever happens.
    const opened: number[] = [];
    return this.serial(spec.name, async () => {
      try {
        return await this.createLocked(spec, opened);
      } finally {
        for (const fd of opened.splice(0)) closeSync(fd);
      }
    });
  }

  /** create() under the name's lock: check everything, reserve, assemble in staging, rename, insert. */
  private async createLocked(spec: VmSpec, opened: number[]): Promise<VmInfo> {
    if (this.store.getVm(spec.name) !== undefined) throw new TypevisorError("VM_EXISTS", `a VM named ${spec.name} already exists`);
    const host = discoverHost(this.config.home);
    const diskBytes = spec.diskSize === undefined ? undefined : typeof spec.diskSize === "number" ? spec.diskSize : parseSize(spec.diskSize);
    if (diskBytes !== undefined && diskBytes > MAX_DISK_BYTES) {
      throw new TypevisorError("INVALID_REQUEST", `diskSize: ${diskBytes} bytes is more than the ${MAX_DISK_BYTES / 2 ** 40} TiB a VM disk may have`);
    }
    // Everything is checked before anything is created.
    let boot: { kernel: string; initrd?: string; rootfs?: string; rootfsSha256?: string; cmdline?: string; diskImage?: DiskImageManifest & { path: string } };
    const diskImage = spec.image !== undefined ? loadDiskImage(spec.image, this.config.imagesHome) : undefined;
    if (diskImage !== undefined) {
      // An imported disk image (image import): a disk, no kernel of its own.
      if (spec.kernel === undefined) throw new TypevisorError("INVALID_REQUEST", `image ${spec.image!} is an imported disk image without a kernel: give kernel (and initrd) to boot it`);
      if (spec.diskFormat === "raw") throw new TypevisorError("INVALID_REQUEST", `image ${spec.image!} is an imported disk image: its VMs are linked clones (diskFormat qcow2)`);
      boot = { kernel: this.allowedFile(spec.kernel, opened), ...(spec.initrd !== undefined ? { initrd: this.allowedFile(spec.initrd, opened) } : {}), diskImage };
    } else if (spec.image !== undefined && spec.kernel !== undefined) {
      throw new TypevisorError("INVALID_REQUEST", "give either image or kernel, not both (only an imported disk image takes a kernel)");
    } else if (spec.image !== undefined) {
      const ip = imagePaths(spec.image, this.config.imagesHome);
      if (!existsSync(ip.kernel) || !existsSync(ip.rootfs)) {
        throw new TypevisorError("IMAGE_NOT_FOUND", `no image named ${spec.image}`, { hint: `build it: typevisor image build ${spec.image}` });
      }
      // The image says how its kernel wants to boot (e.g. `quiet`); a manifest-less image gets the default.
      const cmdline = existsSync(ip.manifest) ? parseManifest(readFileSync(ip.manifest, "utf8"), ip.manifest).cmdline : undefined;
      const manifest = existsSync(ip.manifest) ? parseManifest(readFileSync(ip.manifest, "utf8"), ip.manifest) : undefined;
      const rootfsSha256 = manifest?.files["rootfs.ext4"]?.sha256;
      boot = { kernel: ip.kernel, ...(existsSync(ip.initrd) ? { initrd: ip.initrd } : {}), rootfs: ip.rootfs, ...(rootfsSha256 !== undefined ? { rootfsSha256 } : {}), ...(cmdline !== undefined ? { cmdline } : {}) };
    } else {
      boot = { kernel: this.allowedFile(spec.kernel!, opened), ...(spec.initrd !== undefined ? { initrd: this.allowedFile(spec.initrd, opened) } : {}) };
    }
    const rootfsBytes = boot.rootfs !== undefined ? statSync(boot.rootfs).size : (boot.diskImage?.virtualSize ?? 0);
    const newDisk = boot.rootfs !== undefined || boot.diskImage !== undefined ? Math.max(diskBytes ?? 0, rootfsBytes) : (diskBytes ?? 0);
    const pool = this.poolRow(spec.pool);
    const inDefault = pool.name === DEFAULT_POOL;
    checkAllocation(host, this.config.policy, this.allocated(), { cpus: spec.cpus, memoryBytes: spec.memoryMiB * 2 ** 20, diskBytes: inDefault ? newDisk : 0 }, { disk: true });
    // A VM bigger than the whole budget could never start: say so now.
    checkAllocation(host, this.config.policy, { cpus: 0, memoryBytes: 0, diskBytes: 0 }, { cpus: spec.cpus, memoryBytes: spec.memoryMiB * 2 ** 20, diskBytes: 0 }, { cpu: true, memory: true });
    // What the base copy takes in the home: the root filesystem, or an imported image's file (not its virtual size).
    const copyBytes = boot.diskImage !== undefined ? boot.diskImage.file.size : rootfsBytes;
    if (copyBytes > host.diskFreeBytes) {
      throw new TypevisorError("INSUFFICIENT_RESOURCES", `not enough free disk in ${this.config.home}: the image's ${boot.diskImage !== undefined ? "disk" : "root filesystem"} needs ${copyBytes} bytes, ${host.diskFreeBytes} free`);
    }

    // Admitted: the disk is reserved now, in the same turn of the event loop as the check, so a
    // create of another name that runs while this one copies and grows its disk sees it.
    const reservation: Allocation = { cpus: 0, memoryBytes: 0, diskBytes: inDefault ? newDisk : 0 };
    // The pool's quota: checked and reserved in the same synchronous step, as the budget above.
    const poolReservation = { pool: pool.name, bytes: newDisk };
    if (newDisk > 0) checkPoolQuota(pool, this.poolAllocated(pool.name), newDisk);
    this.reservations.add(reservation);
    this.poolReservations.add(poolReservation);
    // A disk in another pool is made there under a temporary name and renamed with the VM's directory.
    const outside: { tmp: string; path: string }[] = [];
    try {
      const id = randomBytes(6).toString("hex");
      const p = vmPaths(this.config.home, id);
      const staging = `${p.dir}.creating`;
      mkdirSync(staging, { recursive: true, mode: 0o700 });
      try {
        // The VM owns copies of its kernel and initrd: rebuilding or removing the image later does not change it.
        // Off the event loop: an initrd can be hundreds of MiB, and other requests must go on meanwhile.
        await copyFile(boot.kernel, `${staging}/vmlinuz`);
        if (boot.initrd !== undefined) await copyFile(boot.initrd, `${staging}/initrd.img`);
        if (boot.cmdline !== undefined) writeFileSync(`${staging}/cmdline`, boot.cmdline);
        const disks: VmRow["disks"] = [];
        // Where disk 0 is made, and where it will be: the VM's directory (the default pool), or the pool's.
        const where = (format: "raw" | "qcow2"): { dest: string; path: string; pool?: string } => {
          if (inDefault) return { dest: `${staging}/disk0.${format}`, path: `${p.dir}/disk0.${format}` };
          const path = poolDiskPath(pool, id, 0, format);
          outside.push({ tmp: `${path}.creating`, path });
          return { dest: `${path}.creating`, path, pool: pool.name };
        };
        if (boot.diskImage !== undefined) {
          // A linked clone of an imported disk image: an overlay on the daemon's read-only copy of it.
          const img = boot.diskImage;
          const size = roundUpToSector(Math.max(diskBytes ?? 0, img.virtualSize));
          const base = await ensureDiskImageBase(this.config.home, img.path, img.file.sha256, img.format);
          const w = where("qcow2");
          createQcow2(w.dest, { size, backing: { file: base, format: img.format } });
          disks.push({ path: w.path, sizeBytes: size, image: spec.image!, format: "qcow2", backing: base, ...(w.pool !== undefined ? { pool: w.pool } : {}) });
        } else if (boot.rootfs !== undefined && spec.diskFormat === "raw") {
          const w = where("raw");
          const size = await diskFromImage(boot.rootfs, w.dest, diskBytes);
          disks.push({ path: w.path, sizeBytes: size, image: spec.image!, format: "raw", ...(w.pool !== undefined ? { pool: w.pool } : {}) });
        } else if (boot.rootfs !== undefined) {
          // A linked clone: a qcow2 overlay on the image's base, whose filesystem already fills the size.
          const size = diskBytes === undefined ? rootfsBytes : roundUpToSector(diskBytes);
          if (size < rootfsBytes) throw new TypevisorError("DISK_SIZE", `disk size ${size} bytes is smaller than the image's root filesystem (${rootfsBytes} bytes)`);
          const base = await ensureBase(this.config.home, boot.rootfs, boot.rootfsSha256, size);
          const w = where("qcow2");
          createQcow2(w.dest, { size, backing: { file: base, format: "raw" } });
          disks.push({ path: w.path, sizeBytes: size, image: spec.image!, format: "qcow2", backing: base, ...(w.pool !== undefined ? { pool: w.pool } : {}) });
        } else if (diskBytes !== undefined && spec.diskFormat === "raw") {
          const w = where("raw");
          const size = blankDisk(w.dest, diskBytes);
          disks.push({ path: w.path, sizeBytes: size, format: "raw", ...(w.pool !== undefined ? { pool: w.pool } : {}) });
        } else if (diskBytes !== undefined) {
          const w = where("qcow2");
          const size = roundUpToSector(diskBytes);
          createQcow2(w.dest, { size });
          disks.push({ path: w.path, sizeBytes: size, format: "qcow2", ...(w.pool !== undefined ? { pool: w.pool } : {}) });
        }
        renameSync(staging, p.dir);
        for (const o of outside) renameSync(o.tmp, o.path);
        const now = new Date().toISOString();
        try {
          this.store.insertVm({ id, name: spec.name, spec, state: "defined", createdAt: now, updatedAt: now, dir: p.dir, disks, restarts: 0 });
        } catch (e) {
          rmSync(p.dir, { recursive: true, force: true });
          throw e;
        }
      } catch (e) {
        await rm(staging, { recursive: true, force: true });
        for (const o of outside) for (const f of [o.tmp, o.path]) rmSync(f, { force: true });
        throw e;
      }
      this.event("vm.created", spec.name, `VM ${spec.name} created`, { id, cpus: spec.cpus, memoryMiB: spec.memoryMiB });
      return this.get(spec.name);
    } finally {
      // the inventory row (or nothing, on failure) holds it from here
      this.reservations.delete(reservation);
      this.poolReservations.delete(poolReservation);
    }
  }

  async remove(name: string, opts: { force?: boolean } = {}): Promise<void> {
    const q = this.store.quarantinedRow(name);
    if (q !== undefined) {
      // Nothing in it can be trusted but its name and directory: drop both (a VMM it may have had
      // runs on until it exits; its sockets are swept at the next start).
      await this.serial(name, async () => {
        this.store.deleteVm(name);
        if (q.dir.startsWith(homePaths(this.config.home).vms + sep)) rmSync(q.dir, { recursive: true, force: true });
        this.event("vm.removed", name, `VM ${name} removed (its inventory row could not be read)`);
      });
      return;
    }
    const r = this.row(name);
    if (opts.force === true && isActive(r.state)) await this.stop(name, { force: true });
    await this.serial(name, async () => {
      const cur = this.row(name);
      assertAction(name, cur.state, "remove");
      this.store.deleteVm(name);
      this.snapshots.forgetVm(cur.id);
      this.standby.dropTemplateUnless((id) => this.snapshots.exists(id));
      this.removeSockets(cur.id);
      this.usage.delete(cur.id);
      this.history.forget(cur.id);
      this.rates.forget(`${cur.id}:`);
      // Off the event loop: a VM's directory and its disks in other pools may hold gigabytes (an
      // interrupted rm leaves files no row names, which the start-up sweep removes).
      await rm(cur.dir, { recursive: true, force: true });
      await Promise.all(cur.disks.filter((d) => (d.pool ?? DEFAULT_POOL) !== DEFAULT_POOL).map((d) => rm(d.path, { force: true })));
      this.event("vm.removed", name, `VM ${name} removed`);
      await this.removeUnusedBases();
    });
  }

  /**
   * Bases no VM stands on any more go (bases.ts). Not while a create is under way: it may have
   * made or found a base that no inventory row names yet (each create holds a reservation); nor
   * while a quarantined row's disks cannot be read.
   */
  private async removeUnusedBases(): Promise<void> {
    // A quarantined row may stand on any base: keep them all while one is there.
    if (this.reservations.size > 0 || this.store.quarantined().length > 0) return;
    // Snapshot layers and what they stand on go first; a base under any kept layer stays.
    await this.snapshots.gc();
    const inUse = new Set([...this.store.listVms().flatMap((r) => r.disks.flatMap((d) => chainOf(d))), ...this.snapshots.referencedFiles()]);
    for (const p of await removeUnusedBases(this.config.home, inUse)) this.daemonEvent("daemon.cleanup", `removed base image ${p}: no VM uses it`, { path: p });
  }

  // ---- storage pools (pools.ts) --------------------------------------------

  /** The default pool is the home's vms/ directory: made (or moved with the home) at every start. */
  private ensureDefaultPool(vmsDir: string): void {
    const path = realpathSync(vmsDir);
    const cur = this.store.getPool(DEFAULT_POOL);
    if (cur?.path === path) return;
    if (cur !== undefined) this.store.deletePool(DEFAULT_POOL);
    this.store.insertPool({ name: DEFAULT_POOL, path, quotaBytes: null, createdAt: new Date().toISOString() });
  }

  private poolRow(name: string): PoolRow {
    const p = this.store.getPool(name);
    if (p === undefined) throw new TypevisorError("POOL_NOT_FOUND", `no storage pool named ${name}`, { hint: "typevisor pool ls lists them" });
    return p;
  }

  /** Every VM disk with its VM's name (pool accounting). */
  private poolDisks(): PoolDisk[] {
    return this.store.listVms().flatMap((r) => r.disks.map((d) => ({ vm: r.name, path: d.path, sizeBytes: d.sizeBytes, ...(d.pool !== undefined ? { pool: d.pool } : {}) })));
  }

  /** Virtual disk bytes given in `pool`: its disks and the admitted creates and adds not yet recorded. */
  private poolAllocated(pool: string): number {
    let n = 0;
    for (const r of this.poolReservations) if (r.pool === pool) n += r.bytes;
    for (const d of this.poolDisks()) if ((d.pool ?? DEFAULT_POOL) === pool) n += d.sizeBytes;
    return n;
  }

  private poolReserved(pool: string): number {
    let n = 0;
    for (const r of this.poolReservations) if (r.pool === pool) n += r.bytes;
    return n;
  }

  listPools(): PoolInfo[] {
    const disks = this.poolDisks();
    return this.store.listPools().map((p) => poolReport(p, disks, this.poolReserved(p.name)));
  }

  getPool(name: string): PoolInfo {
    return poolReport(this.poolRow(name), this.poolDisks(), this.poolReserved(name));
  }

  /** A new pool on an existing directory (checked: pools.ts checkPoolPath). */
  createPool(input: unknown): PoolInfo {
    const r = poolSpec.safeParse(input);
    if (!r.success) throw new TypevisorError("INVALID_REQUEST", zodMessage(r.error));
    const spec = r.data;
    const quotaBytes = quotaOf(spec);
    if (this.store.getPool(spec.name) !== undefined) throw new TypevisorError("POOL_EXISTS", `a pool named ${spec.name} already exists`);
    const reserved = [this.config.home, imagesDir(this.config.imagesHome)];
    const path = checkPoolPath(spec.path, reserved, this.store.listPools());
    claimPool(path, this.config.home);
    try {
      this.store.insertPool({ name: spec.name, path, quotaBytes, createdAt: new Date().toISOString() });
    } catch (e) {
      releasePool(path);
      throw e;
    }
    this.daemonEvent("pool.created", `storage pool ${spec.name} created at ${path}${quotaBytes !== null ? ` with a quota of ${quotaBytes} bytes` : ""}`, { pool: spec.name, path, quotaBytes });
    return this.getPool(spec.name);
  }

  /** Forget a pool (its directory and files stay); refused while any disk is in it. */
  removePool(name: string): void {
    const p = this.poolRow(name);
    if (name === DEFAULT_POOL) throw new TypevisorError("POOL_IN_USE", "the default pool is the daemon's own and cannot be removed");
    const vms = [...new Set(this.poolDisks().filter((d) => d.pool === name).map((d) => d.vm))].sort();
    if (vms.length > 0 || this.poolReserved(name) > 0) {
      throw new TypevisorError("POOL_IN_USE", `pool ${name} has disks of ${vms.length > 0 ? `VM${vms.length > 1 ? "s" : ""} ${vms.join(", ")}` : "a VM being created"}`, { hint: "remove those VMs or their disks first" });
    }
    this.store.deletePool(name);
    releasePool(p.path);
    this.daemonEvent("pool.removed", `storage pool ${name} removed (${p.path} left as it is)`, { pool: name, path: p.path });
  }

  // ---- extra disks (vm disk add|rm) ---------------------------------------

  /**
   * A blank disk more for a VM without a VMM: qcow2 (thin) or raw (sparse), in a pool (its quota
   * checked and reserved in one step, as at create); the VMM gets it as the next virtio-blk
   * device at the next start. Named disk<N>, N the lowest index no disk of the VM has.
   */
  addDisk(name: string, input: unknown): Promise<VmInfo> {
    const r = diskAddSpec.safeParse(input);
    if (!r.success) return Promise.reject(new TypevisorError("INVALID_REQUEST", zodMessage(r.error)));
    const spec = r.data;
    return this.serial(name, async () => {
      const vm = this.row(name);
      assertAction(name, vm.state, "change disks of");
      const bytes = roundUpToSector(typeof spec.size === "number" ? spec.size : parseSize(spec.size));
      if (bytes > MAX_DISK_BYTES) throw new TypevisorError("INVALID_REQUEST", `size: ${bytes} bytes is more than the ${MAX_DISK_BYTES / 2 ** 40} TiB a VM disk may have`);
      if (vm.disks.length >= MAX_DISKS) throw new TypevisorError("INVALID_REQUEST", `VM ${name} has ${vm.disks.length} disks, the most a VM may have`);
      const pool = this.poolRow(spec.pool);
      const inDefault = pool.name === DEFAULT_POOL;
      if (inDefault) checkAllocation(discoverHost(this.config.home), this.config.policy, this.allocated(), { cpus: 0, memoryBytes: 0, diskBytes: bytes }, { disk: true });
      checkPoolQuota(pool, this.poolAllocated(pool.name), bytes);
      const reservation = { pool: pool.name, bytes };
      this.poolReservations.add(reservation);
      try {
        const used = new Set(vm.disks.map((d) => diskIndex(d.path)));
        let index = 1;
        while (used.has(index)) index++;
        const path = inDefault ? join(vm.dir, `disk${index}.${spec.format}`) : poolDiskPath(pool, vm.id, index, spec.format);
        const tmp = `${path}.creating`;
        try {
          if (spec.format === "qcow2") createQcow2(tmp, { size: bytes });
          else blankDisk(tmp, bytes);
          renameSync(tmp, path);
          const disk: DiskRow = { path, sizeBytes: bytes, format: spec.format, ...(inDefault ? {} : { pool: pool.name }) };
          this.store.setDisks(name, [...vm.disks, disk]);
        } catch (e) {
          rmSync(tmp, { force: true });
          rmSync(path, { force: true });
          throw e;
        }
        this.event("vm.disk-added", name, `VM ${name}: disk${index} added (${spec.format}, ${bytes} bytes, pool ${pool.name})`, { disk: `disk${index}`, path, sizeBytes: bytes, format: spec.format, pool: pool.name });
      } finally {
        this.poolReservations.delete(reservation);
      }
      return this.get(name);
    });
  }

  /** Remove disk `disk` (disk<N> or N) of a VM without a VMM, with its file; not disk0, which it boots from. */
  removeDisk(name: string, disk: string): Promise<VmInfo> {
    return this.serial(name, async () => {
      const vm = this.row(name);
      assertAction(name, vm.state, "change disks of");
      const m = /^(?:disk)?(\d{1,3})$/.exec(disk);
      const index = m === null ? -1 : Number(m[1]);
      const d = vm.disks.find((x) => diskIndex(x.path) === index);
      if (d === undefined) throw new TypevisorError("DISK_NOT_FOUND", `VM ${name} has no disk ${disk}`, { hint: `its disks: ${vm.disks.map((x) => `disk${diskIndex(x.path)}`).join(", ") || "none"} (typevisor vm show ${name})` });
      if (index === 0) throw new TypevisorError("VM_STATE", `disk0 is the disk VM ${name} boots from; it goes with the VM (typevisor vm rm ${name})`);
      this.store.setDisks(name, vm.disks.filter((x) => x !== d));
      rmSync(d.path, { force: true });
      this.event("vm.disk-removed", name, `VM ${name}: disk${index} removed (${d.path})`, { disk: `disk${index}`, path: d.path, pool: d.pool ?? DEFAULT_POOL });
      return this.get(name);
    });
  }

  // ---- start ------------------------------------------------------------

  start(name: string): Promise<VmInfo> {
    return this.serial(name, () => this.startLocked(name, false));
  }

  /** `restore`: from a saved state (snapshots.ts), running or paused as it was saved, instead of booting. */
  private async startLocked(name: string, restart: boolean, restore?: { dir: string; paused: boolean }): Promise<VmInfo> {
    const r = this.row(name);
    assertAction(name, r.state, "start");
    if (!this.config.forceKvm) {
      const kind = kvmHostKind();
      if (kind !== "hardware") {
        throw new TypevisorError("KVM_UNSUITABLE", kind === "pvm" ? "this host's /dev/kvm is PVM (software nested virtualization), which cannot boot stock kernels" : "this host has no /dev/kvm", {
          hint: "run the daemon on a KVM host (here: inside the lab, npm run lab -- typevisor daemon), or start it with --force-kvm for purpose-built guests",
        });
      }
    }
    const host = discoverHost(this.config.home);
    checkAllocation(host, this.config.policy, this.allocated(name), { cpus: r.spec.cpus, memoryBytes: r.spec.memoryMiB * 2 ** 20, diskBytes: 0 }, { cpu: true, memory: true });
    const p = vmPaths(this.config.home, r.id);
    for (const f of [p.exitFile, p.apiSocket, p.consoleSocket]) if (existsSync(f)) unlinkSync(f);

    const spec = r.spec;
    const imageCmdline = existsSync(`${r.dir}/cmdline`) ? readFileSync(`${r.dir}/cmdline`, "utf8").trim() : DEFAULT_CMDLINE;
    // An imported disk image has no command line of its own, nor a known root (a partition, often): the spec says (append root=...).
    const fromDiskImage = spec.image !== undefined && spec.kernel !== undefined;
    const base = spec.cmdline ?? (spec.image !== undefined && !fromDiskImage ? `${imageCmdline} root=/dev/vda` : DEFAULT_CMDLINE);
    const launch: VmmLaunch = {
      id: r.id,
      kernel: `${r.dir}/vmlinuz`,
      ...(existsSync(`${r.dir}/initrd.img`) ? { initrd: `${r.dir}/initrd.img` } : {}),
      cmdline: spec.append !== undefined ? `${base} ${spec.append}` : base,
      cpus: spec.cpus,
      memoryMiB: spec.memoryMiB,
      memoryOvercommit: this.config.policy.memory,
      disks: r.disks.map((d, i) => ({ path: d.path, format: d.format ?? "raw", serial: `${r.name}-${i}`.slice(0, 20) })),
      nets: spec.nets,
      rng: spec.rng,
      balloon: spec.balloon,
      apiSocket: p.apiSocket,
      consoleLog: p.consoleLog,
      consoleLogSize: this.config.consoleLogSize,
      consoleSocket: p.consoleSocket,
      exitFile: p.exitFile,
      statsFile: p.statsFile,
      vmmLog: p.vmmLog,
      forceKvm: this.config.forceKvm,
      ...(restore !== undefined ? { restore } : {}),
    };
    this.setState(name, "starting");
    this.event(restart ? "vm.restarting" : "vm.starting", name, restart ? `VM ${name} restarting after a crash` : restore !== undefined ? `VM ${name} starting from a saved state` : `VM ${name} starting`, restore !== undefined ? { restore: restore.dir } : undefined);

    let cgroup: VmCgroup | undefined;
    if (this.cgroups.available) {
      try {
        cgroup = VmCgroup.create(this.cgroups, `vm-${r.id}`, {
          cpuMaxCpus: spec.cpus,
          // Guest RAM plus what the VMM itself needs for this many vCPUs and this much RAM (defaults.ts).
          memoryMaxBytes: spec.memoryMiB * 2 ** 20 + vmmOverheadBytes(spec.cpus, spec.memoryMiB * 2 ** 20, this.config.vmmOverheadBytes),
          ...(spec.cpuWeight !== undefined ? { cpuWeight: spec.cpuWeight } : {}),
        });
      } catch (e) {
        this.failStart(name, `cgroup: ${(e as Error).message}`);
        throw e;
      }
    }

    const sb = this.config.sandbox;
    // An earlier VMM's page must not be read as this one's (the new VMM makes its own; the sandbox's is made by vmFileBinds).
    rmSync(p.statsFile, { force: true });
    // A restore takes a standby VMM when one is ready (no process start to wait for); under the sandbox a jailed one of this snapshot.
    const adopted: { child: ChildProcess; pidFile: string; pid?: number; sandboxUid?: number } | undefined =
      restore === undefined ? undefined : sb === undefined ? await this.fromStandby(launch, cgroup) : await this.fromJailedStandby(launch, cgroup);
    let proc: Spawned;
    if (adopted !== undefined) {
      proc = { child: adopted.child, pid: adopted.pid ?? adopted.child.pid, ...(adopted.sandboxUid !== undefined ? { sandboxUid: adopted.sandboxUid } : {}) };
    } else {
      try {
        // A restore under the sandbox: the saved state readable by one group, which this VMM is given (jailed-state.ts).
        const restoreGroup = restore !== undefined && sb !== undefined ? this.snapshots.shareForRestore(restore.dir, r.id) : undefined;
        proc = await this.spawnProcess(launch, cgroup, restoreGroup);
      } catch (e) {
        cgroup?.remove();
        this.failStart(name, `${sb !== undefined ? "sandbox: " : ""}${(e as Error).message}`);
        throw e;
      }
    }
    const { child, pid } = proc;
    if (pid === undefined) {
      cgroup?.remove();
      const why = await new Promise<string>((res) => child.once("error", (e) => res(e.message)));
      this.failStart(name, `cannot start the VMM process: ${why}`);
      throw new TypevisorError("VMM_SPAWN", `cannot start the VMM process: ${why}`);
    }
    const live = this.adoptProcess(name, r.id, proc, pid, cgroup);
    // Recorded: the VM's now (until here the pool's pid file had it, for a daemon killed meanwhile).
    if (adopted !== undefined) rmSync(adopted.pidFile, { force: true });
    try {
      await new VmmClient(p.apiSocket).waitReady(Date.now() + this.config.startTimeoutMs, () => !live.dead);
    } catch (e) {
      // Dead already: the exit handler records why. Alive but mute: end it.
      if (!live.dead) {
        try {
          process.kill(pid, "SIGKILL");
        } catch {
          /* gone meanwhile */
        }
      }
      // We hold this VM's queue, so record the exit here: the exit handler queued behind us then finds nothing to do.
      const { code, signal } = await live.died;
      await this.recordExit(name, r.id, live, code, signal);
      const why = this.row(name).lastExit?.reason ?? (e as Error).message;
      throw new TypevisorError("VM_START_FAILED", `VM ${name} did not start: ${why}`, { hint: `its VMM log: ${p.vmmLog}` });
    }
    if (this.row(name).state !== "starting") return this.get(name); // stopped/crashed meanwhile
    if (restore !== undefined && !restore.paused) {
      // A state saved paused (the daemon pauses a VM before saving it: snapshots.ts) comes back
      // paused; this restore asks for it running.
      const c = new VmmClient(p.apiSocket);
      // Its API answers a moment before its vCPUs are set going ("created").
      let state = (await c.info()).state;
      for (const end = Date.now() + this.config.startTimeoutMs; state === "created" && Date.now() < end; state = (await c.info()).state) await new Promise((res) => setTimeout(res, 20));
      if (state === "paused") await c.resume();
    }
    if (restore?.paused === true) {
      this.setState(name, "paused");
      this.event("vm.paused", name, `VM ${name} restored paused (pid ${pid})`, { pid });
      return this.get(name);
    }
    this.setState(name, "running");
    this.event("vm.running", name, `VM ${name} running (pid ${pid})`, { pid });
    return this.get(name);
  }

  /** `launch`'s VMM process: in its sandbox when the daemon sandboxes (spawnJailed), else a plain child. */
  private async spawnProcess(launch: VmmLaunch, cgroup: VmCgroup | undefined, restoreGroup?: number): Promise<Spawned> {
    const sb = this.config.sandbox;
    if (sb === undefined) {
      const child = spawnVmm(launch);
      return { child, pid: child.pid };
    }
    const s = await this.spawnJailed(launch, sb, cgroup, restoreGroup);
    return { child: s.child, pid: s.pid, sandboxUid: s.uid };
  }

  /** A VMM process that started: into its cgroup, tracked (its exit recorded), its runtime in the inventory. */
  private adoptProcess(name: string, id: string, proc: Spawned, pid: number, cgroup: VmCgroup | undefined): Live {
    try {
      cgroup?.addProcess(pid);
    } catch (e) {
      this.log.warn({ vm: name, err: (e as Error).message }, "could not move the VMM into its cgroup");
    }
    const live = this.track(name, id, pid, proc.child, cgroup);
    this.store.updateVm(name, {
      runtime: { pid, pidStartTime: processStartTime(pid) ?? "", startedAt: new Date().toISOString(), ...(cgroup !== undefined ? { cgroup: cgroup.path } : {}), ...(proc.sandboxUid !== undefined ? { sandboxUid: proc.sandboxUid } : {}) },
    });
    return live;
  }

  /** `launch`'s VMM in its sandbox (sandbox/sandbox.ts): the VM's uid, its jail root and out/ directory, its cgroup. */
  private spawnJailed(launch: VmmLaunch, sb: SandboxOptions, cgroup: VmCgroup | undefined, restoreGroup?: number): ReturnType<typeof spawnSandboxed> {
    const p = vmPaths(this.config.home, launch.id);
    const bases = basesDir(this.config.home) + sep;
    return spawnSandboxed(launch, {
      uid: allocateUid(this.store.db, launch.id, sb.uidBase, sb.uidCount), root: p.jailRoot, outDir: p.outDir,
      ...(restoreGroup !== undefined ? { restoreGroup } : {}),
      ...(cgroup !== undefined ? { cgroup: cgroup.path } : {}), ...(sb.probe !== undefined ? { probe: sb.probe } : {}),
      allowedBacking: (f) => f.startsWith(bases) || this.snapshots.isLayer(f),
    });
  }

  /**
   * The VMM of a VM being migrated here (migration.ts): `run --incoming` with this host's back
   * ends, in the VM's cgroup, tracked like any VMM (its exit: recordEnd → migrations.vmmEnded);
   * jailed as any start is (its stream then comes over a unix socket in out/, relayed by this
   * daemon: migration-relay.ts). Its API socket answers only once the VM runs here, so nothing
   * waits for it here.
   */
  private async startIncoming(name: string, incoming: NonNullable<VmmLaunch["incoming"]>): Promise<{ pid: number; alive: () => boolean }> {
    const r = this.row(name);
    const spec = r.spec;
    const p = vmPaths(this.config.home, r.id);
    const host = discoverHost(this.config.home);
    // Disks copied in the stream are made in the VM's directory here: they take this home's disk budget.
    const copied = r.disks.filter((d) => d.path.startsWith(p.dir + "/")).reduce((n, d) => n + d.sizeBytes, 0);
    checkAllocation(host, this.config.policy, this.allocated(name), { cpus: spec.cpus, memoryBytes: spec.memoryMiB * 2 ** 20, diskBytes: copied }, { cpu: true, memory: true, disk: copied > 0 });
    const launch: VmmLaunch = {
      id: r.id, kernel: "", cmdline: "", cpus: spec.cpus, memoryMiB: spec.memoryMiB,
      disks: r.disks.map((d, i) => ({ path: d.path, format: d.format ?? "raw", serial: `${r.name}-${i}`.slice(0, 20) })),
      nets: spec.nets, rng: spec.rng, balloon: spec.balloon,
      apiSocket: p.apiSocket, consoleLog: p.consoleLog, consoleLogSize: this.config.consoleLogSize, consoleSocket: p.consoleSocket,
      exitFile: p.exitFile, statsFile: p.statsFile, vmmLog: p.vmmLog, forceKvm: this.config.forceKvm, incoming,
    };
    const cgroup = this.cgroups.available
      ? VmCgroup.create(this.cgroups, `vm-${r.id}`, { cpuMaxCpus: spec.cpus, memoryMaxBytes: spec.memoryMiB * 2 ** 20 + vmmOverheadBytes(spec.cpus, spec.memoryMiB * 2 ** 20, this.config.vmmOverheadBytes), ...(spec.cpuWeight !== undefined ? { cpuWeight: spec.cpuWeight } : {}) })
      : undefined;
    let proc: Spawned;
    try {
      rmSync(p.statsFile, { force: true });
      proc = await this.spawnProcess(launch, cgroup);
    } catch (e) {
      cgroup?.remove();
      throw e;
    }
    const pid = proc.pid;
    if (pid === undefined) {
      cgroup?.remove();
      throw new TypevisorError("VMM_SPAWN", "cannot start the incoming VMM process");
    }
    const live = this.adoptProcess(name, r.id, proc, pid, cgroup);
    return { pid, alive: () => !live.dead };
  }

  /**
   * A restore through a standby VMM (standby.ts): `PUT /restore` with what `run --restore` would
   * be given, then its socket and log renamed into the VM's places (a listening unix socket keeps
   * working under its new name: connect(2) finds it by path). Undefined when none is ready, or
   * the restore failed there (that standby is ended, and the caller spawns as usual, which says why).
   */
  private async fromStandby(l: VmmLaunch, cgroup: VmCgroup | undefined): Promise<{ child: ChildProcess; pidFile: string } | undefined> {
    if (l.restore === undefined) return undefined;
    // The standbys are started for the memory snapshot restored last from now on (standby.ts).
    const template = this.snapshots.memorySnapshotAt(l.restore.dir);
    if (template !== undefined) this.standby.want(template);
    const sb = this.standby.take(template?.id);
    if (sb === undefined) return undefined;
    try {
      // Where its files go (a new VM's output directory may not be there yet).
      for (const f of [l.consoleLog, l.exitFile, l.vmmLog]) mkdirSync(dirname(f), { recursive: true, mode: 0o700 });
      // Before the restore: guest memory it touches is charged to the VM's cgroup, not the daemon's.
      cgroup?.addProcess(sb.pid);
      await this.restoreInto(sb, l, l.restore);
      return { child: sb.child, pidFile: sb.pidFile };
    } catch (e) {
      this.log.warn({ vm: l.id, err: (e as Error).message }, "a restore through a standby VMM failed; starting a VMM for it");
      kill(sb.pid);
      for (const f of [sb.socket, sb.log, sb.pidFile]) rmSync(f, { force: true });
      return undefined;
    }
  }

  /**
   * `PUT /restore` to standby `sb` with what `run --restore` would be given for `l` (`extra`: a
   * jailed standby's netFds), then its control socket and log renamed into the VM's places (a
   * listening unix socket keeps working under its new name).
   */
  private async restoreInto(sb: StandbyVmm, l: VmmLaunch, restore: NonNullable<VmmLaunch["restore"]>, extra: { netFds?: number } = {}): Promise<void> {
    await new VmmClient(sb.socket, this.config.startTimeoutMs).call("PUT", "/restore", {
      snapshot: restore.dir, id: l.id, kernel: l.kernel, ...(l.initrd !== undefined ? { initrd: l.initrd } : {}), consoleLog: l.consoleLog, consoleLogSize: String(l.consoleLogSize), consoleSocket: l.consoleSocket, exitFile: l.exitFile,
      ...(l.statsFile !== undefined ? { statsFile: l.statsFile } : {}),
      disks: l.disks.map(diskArg), nets: l.nets.map(netArg), ...extra, paused: restore.paused,
    });
    renameSync(sb.socket, l.apiSocket);
    if (existsSync(l.vmmLog)) renameSync(l.vmmLog, `${l.vmmLog}.1`);
    renameSync(sb.log, l.vmmLog);
  }

  /**
   * A restore of a memory snapshot through a jailed standby started for it (sandbox/jailed-standby.ts):
   * the VM takes the standby's uid, its files are bound into the standby's view, then `PUT /restore`
   * as fromStandby, and its sockets (bound by this daemon) and log renamed into the VM's places.
   * Its TAPs are opened here and sent over the standby's socket (SCM_RIGHTS). Undefined, and a fresh
   * jail is started by the caller, when the restore is of no memory snapshot, the VM has a uid
   * already (a rollback of a VM that ran), none is ready for that snapshot (the pool then turns to
   * it), a file lies outside the home, or the restore failed there (that standby is ended).
   */
  private async fromJailedStandby(l: VmmLaunch, cgroup: VmCgroup | undefined): Promise<{ child: ChildProcess; pidFile: string; pid: number; sandboxUid: number } | undefined> {
    const template = l.restore !== undefined ? this.snapshots.memorySnapshotAt(l.restore.dir) : undefined;
    if (template === undefined || l.restore === undefined || hasSandboxUid(this.store.db, l.id)) return undefined;
    // Shared with the snapshot's group before a standby of it is taken (a fresh jail does it too).
    this.snapshots.shareForRestore(l.restore.dir, l.id);
    const sb = this.standby.take(template.id);
    if (sb?.jail === undefined) {
      this.standby.want(template); // the next restores are of this one
      return undefined;
    }
    const j = sb.jail;
    let fdSocketOpen = true;
    const p = vmPaths(this.config.home, l.id);
    const bases = basesDir(this.config.home) + sep;
    try {
      if (!handVmFiles(l, { uid: j.uid, home: this.config.home, handoff: j.handoff, outDir: p.outDir, allowedBacking: (f) => f.startsWith(bases) || this.snapshots.isLayer(f) })) throw new TypevisorError("SANDBOX", "a file of the VM lies outside the daemon's home, or inside another of its files: it cannot be handed to a standby");
      // The standby's namespace has its copies now: none stays mounted here.
      sealHandoff(j.handoff, join(dirname(p.outDir), "standby-handoff"));
      if (!adoptStandbyUid(this.store.db, l.id, j.key)) throw new TypevisorError("SANDBOX", "the VM has a sandbox uid already");
      mkdirSync(dirname(l.vmmLog), { recursive: true, mode: 0o700 });
      // Its TAPs, opened here in the host's network namespace (as for a fresh jail), sent as descriptors.
      if (l.nets.length > 0) {
        const taps: number[] = [];
        try {
          for (const n of l.nets) {
            const t = openTap(n.tap);
            taps.push(t.fd);
            if (t.created) setLinkUp(t.name);
          }
          sendFds(j.fdSocket, taps);
        } finally {
          for (const fd of taps) closeSync(fd);
        }
      }
      cgroup?.addProcess(sb.pid);
      await this.restoreInto(sb, l, l.restore, l.nets.length > 0 ? { netFds: l.nets.length } : {});
      fdSocketOpen = false;
      closeSync(j.fdSocket);
      renameSync(j.consoleSocket, l.consoleSocket);
      return { child: sb.child, pidFile: sb.pidFile, pid: sb.pid, sandboxUid: j.uid };
    } catch (e) {
      this.log.warn({ vm: l.id, err: (e as Error).message }, "a restore through a jailed standby VMM failed; starting a VMM for it");
      kill(sb.pid);
      if (fdSocketOpen) closeSync(j.fdSocket);
      sb.child.once("exit", () => {
        try {
          this.jailer?.release(j.key, j.handoff);
        } catch (err) {
          this.log.warn({ vm: l.id, err: (err as Error).message }, "could not detach a jailed standby's hand-off mounts");
        }
      });
      for (const f of [sb.socket, j.consoleSocket, sb.log, sb.pidFile]) rmSync(f, { force: true });
      return undefined;
    }
  }

  /**
   * End the VM's VMM for a snapshot or rollback (snapshots.ts), in the VM's queue: asked to stop
   * (its writes reach the disk files), SIGKILL after the stop timeout. Its exit is recorded as
   * neither a stop nor a crash: the VM is left stopped, with no events, for the operation to
   * start again.
   */
  private async endVmm(name: string): Promise<void> {
    const r = this.row(name);
    const live = this.live.get(r.id);
    if (live !== undefined && !live.dead) {
      live.handedOver = true;
      try {
        await this.client(r).stop();
      } catch (e) {
        this.log.warn({ vm: name, err: (e as Error).message }, "stop through the VMM API failed; killing it");
        kill(live.pid);
      }
      const t = setTimeout(() => kill(live.pid), this.config.stopTimeoutMs);
      await live.died;
      clearTimeout(t);
    }
    if (live !== undefined) {
      if (this.live.get(r.id) === live) this.live.delete(r.id);
      this.removeCgroup(name, live.cgroup);
    }
    this.usage.delete(r.id);
    this.removeSockets(r.id);
    // running/paused → stopped, no VMM: what startLocked starts from.
    this.store.updateVm(name, { state: "stopped", runtime: null });
  }

  private failStart(name: string, reason: string): void {
    this.setState(name, "crashed", { runtime: null, lastExit: { result: "error", code: null, signal: null, reason, at: new Date().toISOString() } });
    this.event("vm.crashed", name, `VM ${name} failed to start: ${reason}`, { reason });
  }

  /** Watch a VMM process: our child (exit event) or, after a daemon restart, any process (polling). */
  private track(name: string, id: string, pid: number, child: ChildProcess | undefined, cgroup: VmCgroup | undefined): Live {
    let markExited!: () => void;
    const exited = new Promise<void>((res) => (markExited = res));
    let markDied!: (v: { code: number | null; signal: string | null }) => void;
    const died = new Promise<{ code: number | null; signal: string | null }>((res) => (markDied = res));
    const live: Live = { pid, exited, markExited, died, dead: false, ...(child !== undefined ? { child } : {}), ...(cgroup !== undefined ? { cgroup } : {}) };
    this.live.set(id, live);
    const onExit = (code: number | null, signal: string | null): void => {
      if (live.dead) return;
      live.dead = true;
      markDied({ code, signal });
      if (live.poll !== undefined) clearInterval(live.poll);
      // endVmm() records this exit itself
      if (live.handedOver === true) return live.markExited();
      void this.serial(name, async () => this.recordExit(name, id, live, code, signal)).finally(() => live.markExited());
    };
    if (child !== undefined) {
      child.once("exit", (code, signal) => onExit(code, signal));
    } else {
      const startTime = processStartTime(pid);
      live.poll = setInterval(() => {
        if (!processAlive(pid, startTime)) onExit(null, null);
      }, 500);
    }
    return live;
  }

  private readExitFile(id: string): { code?: number; result?: string; reason?: string } | undefined {
    const f = vmPaths(this.config.home, id).exitFile;
    try {
      // The VMM's own output (a sandboxed VMM owns its directory): no symlink or FIFO is followed.
      return JSON.parse(readRegularNoFollow(f, 64 * 1024).toString("utf8")) as { code?: number; result?: string; reason?: string };
    } catch {
      return undefined;
    }
  }

  private async recordExit(name: string, id: string, live: Live, code: number | null, signal: string | null): Promise<void> {
    this.live.delete(id);
    this.usage.delete(id);
    this.removeCgroup(name, live.cgroup);
    this.recordEnd(name, id, live.pid, code, signal);
  }

  /**
   * A host file a spec names (kernel, initrd), as its real path, if it is a regular file under an
   * --allow-files directory. The daemon runs as root and copies what it is given into a VM whose
   * guest can print it: any other path is refused, with the same answer whether it exists or not
   * (the answer must not tell what is on the host). Symlinks are resolved before the check.
   */
  private allowedFile(f: string, fds: number[]): string {
    const refuse = (): TypevisorError =>
      new TypevisorError("PATH_NOT_ALLOWED", `${f} is not a file this daemon may read for a VM`, {
        hint: "boot an image (image build, --image), or start the daemon with --allow-files DIR for kernels under DIR",
      });
    const dirs = this.config.allowedDirs ?? [];
    const allowed = (p: string) => dirs.some((d) => p.startsWith(d.endsWith(sep) ? d : d + sep));
    let real: string;
    try {
      real = realpathSync(f);
    } catch {
      throw refuse();
    }
    if (!allowed(real)) throw refuse();
    // Opened once, and the file opened is what is checked and copied: a path swapped for a symlink
    // between the check and the copy (a race a local user could run) cannot lead anywhere else.
    // O_NOFOLLOW refuses a last component turned symlink; /proc/self/fd/N names the opened file
    // itself, so the directories above cannot be swapped either. O_NONBLOCK: a FIFO must not hang us.
    let fd: number;
    try {
      fd = openSync(real, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
    } catch {
      throw refuse();
    }
    fds.push(fd);
    const opened = `/proc/self/fd/${fd}`;
    let ok = false;
    try {
      ok = fstatSync(fd).isFile() && allowed(readlinkSync(opened));
    } catch {
      ok = false;
    }
    if (!ok) throw refuse();
    return opened;
  }


  /** The VMM's control and console sockets (run/<id>.api, run/<id>.con). */
  private removeSockets(id: string): void {
    const p = vmPaths(this.config.home, id);
    for (const f of [p.apiSocket, p.consoleSocket]) rmSync(f, { force: true });
  }

  /**
   * What a daemon killed halfway left behind, removed at start with an event each: a VM directory
   * still being created (`<id>.creating`), one the inventory does not know (killed between its
   * rename and its row), sockets in run/ of VMs that are gone or no longer run.
   */
  private async sweepOrphans(): Promise<void> {
    const hp = homePaths(this.config.home);
    const rows = this.store.listVms();
    // A quarantined row's directory is kept: it may be all that is left of that VM.
    const quarantined = this.store.quarantined();
    for (const q of quarantined) this.daemonEvent("daemon.quarantine", `VM ${q.name}: its inventory row cannot be read (${q.reason}); left alone (vm rm removes it)`, { vm: q.name, id: q.id, reason: q.reason });
    // VMs that migrated away: their disks in this daemon's pools are the destination's now (migration.ts).
    const known = new Set([...rows.map((r) => r.id), ...quarantined.map((q) => q.id), ...this.migrations.departed()]);
    const running = new Set(rows.filter((r) => isActive(r.state) && r.runtime !== undefined).map((r) => r.id));
    const gone = (what: string, path: string): void => {
      rmSync(path, { recursive: true, force: true });
      this.daemonEvent("daemon.cleanup", `removed ${what} ${path}`, { path });
    };
    for (const f of readdirSync(hp.vms)) {
      if (f.endsWith(".creating")) gone("a half-made VM directory (a create was interrupted)", join(hp.vms, f));
      else if (!known.has(f)) gone("a VM directory the inventory does not know", join(hp.vms, f));
    }
    for (const f of readdirSync(hp.run)) {
      const id = f.replace(/\.(api|con)$/, "");
      if (!running.has(id)) gone("a socket of a VMM that no longer runs", join(hp.run, f));
    }
    for (const f of leftoverBaseFiles(this.config.home)) gone("a half-made base image (a create was interrupted)", f);
    // Disks in other pools whose create was interrupted, or whose VM the inventory does not know.
    if (quarantined.length === 0) {
      for (const pool of this.store.listPools()) {
        if (pool.name === DEFAULT_POOL) continue;
        for (const f of sweepPool(pool, known, this.config.home)) this.daemonEvent("daemon.cleanup", `removed ${f} from pool ${pool.name}: no VM has it (a create or disk add was interrupted)`, { path: f, pool: pool.name });
      }
    }
    for (const cg of VmCgroup.removeLeftovers(this.cgroups, new Set([...running].map((id) => `vm-${id}`)))) {
      this.daemonEvent("daemon.cleanup", `removed the cgroup ${cg} of a VMM that no longer runs`, { path: cg });
    }
    await this.removeUnusedBases();
  }

  private removeCgroup(name: string, cg: VmCgroup | undefined): void {
    try {
      cg?.remove();
    } catch (e) {
      this.log.warn({ vm: name, err: (e as Error).message }, "cgroup not removed");
    }
  }

  /**
   * How a VMM ended, into the inventory (state, last exit, event, restart), if the VM's recorded
   * runtime is still the one that ended: `pid`, or none recorded when `pid` is undefined.
   */
  private recordEnd(name: string, id: string, pid: number | undefined, code: number | null, signal: string | null): void {
    const cur = this.store.getVm(name);
    if (cur === undefined || cur.id !== id || cur.runtime?.pid !== pid) return; // removed, or a newer VMM
    // a VMM killed outright could not remove its own sockets
    this.removeSockets(id);
    const file = this.readExitFile(id);
    if (cur.state === "migrating" || cur.state === "incoming") {
      // A migration's VMM: its end is the migration's to judge (migration.ts), not a stop or a crash.
      if (cur.state === "migrating") this.store.updateVm(name, { runtime: null, lastExit: { result: (file?.result ?? "killed") as VmExit["result"], code: file?.code ?? code, signal, ...(file?.reason !== undefined ? { reason: file.reason } : {}), at: new Date().toISOString() } });
      this.migrations.vmmEnded(this.row(name), file?.result);
      return;
    }
    const clean = file !== undefined && (file.result === "poweroff" || file.result === "stopped" || file.result === "reset" || file.result === "migrated") && (file.code ?? code) === 0;
    const asked = cur.state === "stopping";
    const exit: VmExit = {
      result: file?.result !== undefined ? (file.result as VmExit["result"]) : "killed",
      code: file?.code ?? code,
      signal,
      ...(file?.reason !== undefined ? { reason: file.reason } : file === undefined ? { reason: signal !== null ? `the VMM process was killed by ${signal}` : "the VMM process died without saying why (killed?)" } : {}),
      at: new Date().toISOString(),
    };
    if (asked || clean) {
      this.setState(name, "stopped", { runtime: null, lastExit: exit });
      this.event("vm.stopped", name, asked ? `VM ${name} stopped` : `VM ${name} stopped: the guest powered off`, { result: exit.result });
      return;
    }
    this.setState(name, "crashed", { runtime: null, lastExit: exit });
    this.event("vm.crashed", name, `VM ${name} crashed: ${exit.reason ?? exit.result}`, { result: exit.result, code: exit.code, signal });
    if (cur.spec.restart === "on-crash" && !this.closing) this.scheduleRestart(name);
  }

  private scheduleRestart(name: string): void {
    const now = Date.now();
    const times = (this.restartTimes.get(name) ?? []).filter((t) => now - t < RESTART_WINDOW_MS);
    if (times.length >= RESTART_MAX) {
      this.event("vm.restart-gave-up", name, `VM ${name} crashed ${times.length} times in ${RESTART_WINDOW_MS / 60000} minutes: not restarting it again`);
      return;
    }
    times.push(now);
    this.restartTimes.set(name, times);
    const delay = 500 * 2 ** (times.length - 1);
    setTimeout(() => {
      if (this.closing) return;
      void this.serial(name, async () => {
        const r = this.store.getVm(name);
        if (r?.state !== "crashed") return;
        this.store.updateVm(name, { restarts: r.restarts + 1 });
        await this.startLocked(name, true);
      }).catch((e: unknown) => this.log.error({ vm: name, err: (e as Error).message }, "automatic restart failed"));
    }, delay).unref();
  }

  // ---- running-VM actions ----------------------------------------------

  private client(r: VmRow): VmmClient {
    return new VmmClient(vmPaths(this.config.home, r.id).apiSocket);
  }

  private simple(name: string, action: VmAction, call: (c: VmmClient) => Promise<void>, to: VmState, type: string, message: string): Promise<VmInfo> {
    return this.serial(name, async () => {
      const r = this.row(name);
      assertAction(name, r.state, action);
      // The inventory first: a write that fails (its disk full) leaves the VMM as it was, and a
      // VMM that refuses puts the row back. A daemon killed in between is reconciled at re-attach,
      // which takes the VMM's own state.
      if (to !== r.state) this.setState(name, to);
      try {
        await call(this.client(r));
      } catch (e) {
        if (to !== r.state) this.store.updateVm(name, { state: r.state });
        throw e;
      }
      this.event(type, name, message);
      return this.get(name);
    });
  }

  pause(name: string): Promise<VmInfo> {
    return this.simple(name, "pause", (c) => c.pause(), "paused", "vm.paused", `VM ${name} paused`);
  }

  resume(name: string): Promise<VmInfo> {
    return this.simple(name, "resume", async (c) => {
      await c.resume();
      const live = this.live.get(this.row(name).id);
      if (live !== undefined) live.pauseReason = undefined;
    }, "running", "vm.resumed", `VM ${name} resumed`);
  }

  reboot(name: string): Promise<VmInfo> {
    return this.simple(name, "reboot", (c) => c.reboot(), "running", "vm.rebooted", `VM ${name} rebooted`);
  }

  /**
   * Stop: ask the VMM to stop (it ends its vCPUs and exits; the guest is not
   * asked, like pulling the plug after its writes reached the disk file);
   * after `timeoutMs`, or at once with `force`, SIGKILL.
   */
  async stop(name: string, opts: { force?: boolean; timeoutMs?: number } = {}): Promise<VmInfo> {
    let wait: Promise<void> | undefined;
    let pid = 0;
    await this.serial(name, async () => {
      const r = this.row(name);
      assertAction(name, r.state, opts.force === true ? "kill" : "stop");
      const live = this.live.get(r.id);
      if (r.state !== "stopping") this.setState(name, "stopping");
      this.event("vm.stopping", name, `VM ${name} stopping${opts.force === true ? " (forced)" : ""}`);
      if (live === undefined) {
        // No process known (it died while nothing watched): record it as stopped.
        this.setState(name, "stopped", { runtime: null });
        this.event("vm.stopped", name, `VM ${name} stopped`);
        return;
      }
      pid = live.pid;
      wait = live.exited;
      if (opts.force === true) {
        kill(pid);
      } else {
        try {
          await this.client(r).stop();
        } catch (e) {
          this.log.warn({ vm: name, err: (e as Error).message }, "stop through the VMM API failed; killing it");
          kill(pid);
        }
      }
    });
    if (wait !== undefined) {
      const timeout = opts.timeoutMs ?? this.config.stopTimeoutMs;
      const t = setTimeout(() => kill(pid), timeout);
      await wait;
      clearTimeout(t);
    }
    return this.get(name);
  }

  // ---- daemon start and stop -------------------------------------------

  /**
   * After a daemon (re)start: every VM the inventory says has a VMM is
   * checked against reality. A live VMM with the same pid start time and a
   * responding API socket is re-attached; a dead one is recorded as stopped or
   * crashed from its exit file. Nothing is started here; a start or stop the
   * previous daemon was killed in the middle of is finished (finishStart, finishStop).
   */
  async reattach(): Promise<void> {
    // All at once: each VMM is asked its state with a 10 s deadline, and VMMs still coming up (or
    // busy on a loaded host) asked one after the other kept the API down for 10 s each
    // (fault-injection test: past 20 s with two or three).
    // Snapshots and rollbacks a killed daemon left halfway: their files first, their VMMs once re-attached.
    const followUps = this.snapshots.recoverFiles();
    await Promise.all(this.store.listVms().filter((r) => isActive(r.state)).map((r) => this.reattachOne(r)));
    await this.snapshots.finishRecovery(followUps);
    await this.migrations.recover();
    await this.sweepOrphans();
    // A previous daemon's standbys end (and one it was handing a VM when killed); new ones start.
    const recorded = new Set(this.store.listVms().flatMap((r) => (r.runtime !== undefined ? [r.runtime.pid] : [])));
    // The pool's template: the newest memory snapshot (standby.ts); none kept without one.
    const template = this.snapshots.newestWithMemory();
    for (const p of this.standby.start(recorded)) this.daemonEvent("daemon.cleanup", `ended a standby VMM a previous daemon left (${p})`, {});
    if (template !== undefined) this.standby.want(template);
  }

  /** reattach() for one VM the inventory says has a VMM. */
  private async reattachOne(r: VmRow): Promise<void> {
    const rt = r.runtime;
    const alive = rt !== undefined && processAlive(rt.pid, rt.pidStartTime === "" ? undefined : rt.pidStartTime);
    if (rt === undefined || !alive) {
      // A daemon killed between spawnVmm and recording its pid leaves a VMM no row names: it
      // would run on as an orphan (fault-injection test), holding memory outside every budget,
      // beside a VM recorded as crashed. The start never completed: end it, then record that.
      for (const pid of processesWith(vmPaths(this.config.home, r.id).apiSocket, "TYPEVISOR_VM_ID", r.id)) {
        if (pid === rt?.pid) continue;
        this.log.warn({ vm: r.name, pid }, "killing a VMM the previous daemon started but never recorded");
        kill(pid);
        for (let i = 0; i < 100 && processAlive(pid); i++) await new Promise((res) => setTimeout(res, 20));
      }
      // Nothing to track: remove what the dead VMM left behind and record how it ended.
      if (rt?.cgroup !== undefined) this.removeCgroup(r.name, VmCgroup.open(this.cgroups, `vm-${r.id}`));
      await this.serial(r.name, async () => this.recordEnd(r.name, r.id, rt?.pid, null, null));
      return;
    }
    const cg = rt.cgroup !== undefined && this.cgroups.available ? VmCgroup.open(this.cgroups, `vm-${r.id}`) : undefined;
    const live = this.track(r.name, r.id, rt.pid, undefined, cg);
    let vmmState: string | undefined;
    try {
      vmmState = (await this.client(r).info()).state;
    } catch (e) {
      this.log.warn({ vm: r.name, err: (e as Error).message }, "re-attached VMM does not answer on its API socket");
    }
    const want: VmState | undefined = vmmState === "paused" ? "paused" : vmmState === "running" ? "running" : undefined;
    if (want !== undefined && want !== r.state && (r.state === "running" || r.state === "paused" || r.state === "starting")) this.setState(r.name, want);
    this.event("vm.reattached", r.name, `VM ${r.name} re-attached (pid ${rt.pid}, ${this.row(r.name).state})`, { pid: rt.pid });
    // The request that had this VM starting or stopping died with the previous daemon (a SIGKILL
    // while its VMM came up, or between "stopping" and the stop reaching the VMM), and nothing
    // else would move it on: its VMM would run, and hold its CPUs and memory, in a state only a
    // forced stop leaves (fault-injection test). Finish what was asked, in the VM's queue.
    const now = this.row(r.name).state;
    if (now === "starting") void this.serial(r.name, () => this.finishStart(r.name, r.id, live)).catch((e: unknown) => this.log.error({ vm: r.name, err: (e as Error).message }, "finishing an interrupted start failed"));
    if (now === "stopping") this.finishStop(r.name, r.id, live);
  }

  /** The rest of startLocked for a re-attached VMM still coming up: running once its API answers; ended if it never does. */
  private async finishStart(name: string, id: string, live: Live): Promise<void> {
    try {
      await new VmmClient(vmPaths(this.config.home, id).apiSocket).waitReady(Date.now() + this.config.startTimeoutMs, () => !live.dead);
    } catch {
      // Dead already: its exit is recorded behind us in the queue. Alive but mute: end it, as a start would.
      if (!live.dead) kill(live.pid);
      return;
    }
    const r = this.store.getVm(name);
    if (r?.id !== id || r.state !== "starting" || live.dead) return;
    this.setState(name, "running");
    this.event("vm.running", name, `VM ${name} running (pid ${live.pid}, its start finished after a daemon restart)`, { pid: live.pid });
  }

  /** The rest of stop() for a re-attached VMM: ask it again (a second ask is harmless), SIGKILL after the stop timeout. */
  private finishStop(name: string, id: string, live: Live): void {
    void this.serial(name, async () => {
      try {
        await new VmmClient(vmPaths(this.config.home, id).apiSocket).stop();
      } catch (e) {
        this.log.warn({ vm: name, err: (e as Error).message }, "stop through the VMM API failed; killing it");
        kill(live.pid);
      }
    }).then(() => {
      // Its exit is recorded by the poll (track), as "stopped": the VM is in stopping.
      const t = setTimeout(() => kill(live.pid), this.config.stopTimeoutMs);
      t.unref();
      void live.died.then(() => clearTimeout(t));
    });
  }

  /**
   * The watchdog: each running or paused VMM is asked GET /vm, every HEALTH_INTERVAL_MS while its
   * answers change and less often (up to HEALTH_MAX_INTERVAL_MS) while they do not, all at once
   * and each on its own deadline, so one that hangs slows no other. No answer within
   * HEALTH_TIMEOUT_MS marks it unresponsive (vm.unresponsive, VmInfo.unresponsive); the next
   * answer clears it (vm.responsive). A VMM that died is the exit path's business, not this one's.
   */
  private startWatchdog(): void {
    this.healthTimer = setInterval(() => {
      const now = Date.now();
      for (const r of this.store.listVms()) {
        const live = this.live.get(r.id);
        if (live === undefined || live.dead || live.checking === true || (r.state !== "running" && r.state !== "paused")) continue;
        // Read before asking: a change made while the answer is on its way moves the count again, and is checked next tick.
        const changes = readStatsChanges(vmPaths(this.config.home, r.id).statsFile);
        if (live.health !== undefined && now < live.health.nextAt && changes === live.health.changes) continue;
        live.checking = true;
        live.healthChecks = (live.healthChecks ?? 0) + 1;
        void this.client(r)
          .call<VmmInfo>("GET", "/vm", undefined, HEALTH_TIMEOUT_MS)
          .then(
            (answer) => {
              this.noteConsoleDrops(r.name, live, answer);
              this.notePause(r.name, r.id, live, answer);
              // What the checks watch for: the VMM's state, a pause of its own, console output dropped.
              const seen = `${String(answer.state)}|${String(answer.pauseReason?.at ?? "")}|${String(answer.consoleDroppedBytes ?? 0)}`;
              const every = live.health?.seen === seen && live.unresponsiveSince === undefined ? Math.min(HEALTH_MAX_INTERVAL_MS, live.health.everyMs * 2) : HEALTH_INTERVAL_MS;
              // Due half a tick early: the watchdog ticks every HEALTH_INTERVAL_MS, and a 4 s wait
              // must be the second tick from now, not the third.
              live.health = { seen, everyMs: every, nextAt: Date.now() + every - HEALTH_INTERVAL_MS / 2, changes };
              if (live.unresponsiveSince === undefined) return;
              live.unresponsiveSince = undefined;
              this.event("vm.responsive", r.name, `VM ${r.name}'s VMM answers again`, { pid: live.pid });
            },
            (e: unknown) => {
              live.health = undefined;
              if (live.dead || live.unresponsiveSince !== undefined || !processAlive(live.pid)) return;
              live.unresponsiveSince = new Date().toISOString();
              this.event("vm.unresponsive", r.name, `VM ${r.name}'s VMM (pid ${live.pid}) does not answer on its control socket: ${(e as Error).message}`, { pid: live.pid });
            },
          )
          .finally(() => {
            live.checking = false;
          });
      }
    }, HEALTH_INTERVAL_MS);
    this.healthTimer.unref();
  }

  /** The VMM says (GET /vm consoleDroppedBytes) how much guest output its console log could not take. */
  private noteConsoleDrops(name: string, live: Live, answer: VmmInfo | undefined): void {
    const n = answer?.consoleDroppedBytes;
    if (typeof n !== "number" || !Number.isSafeInteger(n) || n <= (live.consoleDroppedBytes ?? 0)) return;
    // One event when dropping starts, not one per check while the disk stays full.
    if (live.consoleDroppedBytes === undefined) this.event("vm.console-dropped", name, `VM ${name}'s console log cannot be written (its disk is full): guest output is being dropped`, { pid: live.pid });
    live.consoleDroppedBytes = n;
  }

  /**
   * The VMM paused the VM by itself (a disk's filesystem is full: its write is held, not failed;
   * vmm/vm.ts PauseReason): record the VM as paused with a vm.paused event that says why and
   * names the filesystem; `vm resume` runs the held writes again once space is freed.
   */
  private notePause(name: string, id: string, live: Live, answer: VmmInfo | undefined): void {
    const said = answer?.pauseReason;
    if (answer?.state !== "paused" || said === undefined || said === null || typeof said.message !== "string") return;
    // A VMM's answer is untrusted (its guest may have taken it over): only short strings and numbers go into the inventory.
    const str = (v: unknown, max = 512): string | undefined => (typeof v === "string" ? v.slice(0, max) : undefined);
    const fs = typeof said.filesystem === "object" && said.filesystem !== null ? said.filesystem : {};
    const reason: VmmPauseReason = {
      message: said.message.slice(0, 2048),
      ...(str(said.kind, 32) !== undefined ? { kind: str(said.kind, 32)! } : {}),
      ...(str(said.errno, 32) !== undefined ? { errno: str(said.errno, 32)! } : {}),
      ...(str(said.disk) !== undefined ? { disk: str(said.disk)! } : {}),
      ...(str(said.at, 64) !== undefined ? { at: str(said.at, 64)! } : {}),
      filesystem: {
        ...(str(fs.mountPoint) !== undefined ? { mountPoint: str(fs.mountPoint)! } : {}),
        ...(str(fs.type, 64) !== undefined ? { type: str(fs.type, 64)! } : {}),
        ...(typeof fs.freeBytes === "number" ? { freeBytes: fs.freeBytes } : {}),
      },
    };
    // A sandboxed VMM sees each disk as a mount of its own (a bind of that one file): the file
    // system is named as the host sees it, for a disk the inventory says is this VM's.
    const hostFs = this.config.sandbox !== undefined && reason.disk !== undefined && this.store.getVm(name)?.disks.some((d) => d.path === reason.disk) === true ? filesystemOf(reason.disk) : undefined;
    if (hostFs !== undefined) {
      const seen = reason.filesystem?.mountPoint;
      if (seen !== undefined) reason.message = reason.message.split(`the filesystem ${seen} (`).join(`the filesystem ${hostFs.mountPoint} (`);
      reason.filesystem = { ...reason.filesystem, mountPoint: hostFs.mountPoint };
    }
    if (live.pauseReason?.at === reason.at) return;
    void this.serial(name, async () => {
      const cur = this.store.getVm(name);
      if (cur?.id !== id || live.dead || live.pauseReason?.at === reason.at) return;
      // Already paused (by the user, or recorded before a daemon restart): shown, no second event.
      if (cur.state === "paused") live.pauseReason = reason;
      if (cur.state !== "running") return;
      // Remembered only once recorded: an inventory on the same full disk refuses the write, and
      // the next check tries again (until then the VM cannot be resumed through the daemon).
      this.setState(name, "paused");
      live.pauseReason = reason;
      this.event("vm.paused", name, `VM ${name} paused by its VMM: ${reason.message}`, {
        reason: reason.kind ?? "disk-full", errno: reason.errno, disk: reason.disk, filesystem: reason.filesystem?.mountPoint, fsType: reason.filesystem?.type, freeBytes: reason.filesystem?.freeBytes,
      });
    }).catch((e: unknown) => this.log.warn({ vm: name, err: (e as Error).message }, "recording a pause for a full disk failed"));
  }

  startUsageCollection(): void {
    this.startWatchdog();
    const tick = (): void => {
      void this.collectUsage().catch((e: unknown) => this.log.warn({ err: (e as Error).message }, "usage collection failed"));
    };
    tick();
    this.usageTimer = setInterval(tick, this.config.usageIntervalMs);
    this.usageTimer.unref();
  }

  private async collectUsage(): Promise<void> {
    const { used, sample } = hostUsed(this.config.home, this.hostCpu);
    const firstHostSample = this.hostCpu === undefined;
    if (this.hostCpu !== undefined) this.hostCpuUsed = used.cpus;
    this.hostCpu = sample;
    const samples: { scope: string; sample: MetricSample }[] = [];
    const hostIo = { diskReadBps: 0, diskWriteBps: 0, netRxBps: 0, netTxBps: 0 };
    for (const r of this.store.listVms()) {
      const live = this.live.get(r.id);
      // every VM's state goes into its history; usage only with a VMM
      const vmSample: MetricSample = { state: r.state };
      samples.push({ scope: r.id, sample: vmSample });
      if (live === undefined || live.dead || !isActive(r.state)) continue;
      const pu = processUsage(live.pid);
      if (pu === undefined) continue;
      let memoryBytes = pu.rssBytes;
      if (live.cgroup !== undefined) {
        try {
          memoryBytes = live.cgroup.usage().memoryBytes;
        } catch {
          /* cgroup gone: fall back to RSS */
        }
      }
      const now = Date.now();
      const cpuKnown = live.prevCpu !== undefined && now > live.prevCpu.at;
      const cpuPercent = live.prevCpu !== undefined && now > live.prevCpu.at ? ((pu.cpuSeconds - live.prevCpu.cpuSeconds) / ((now - live.prevCpu.at) / 1000)) * 100 : 0;
      live.prevCpu = { at: now, cpuSeconds: pu.cpuSeconds };
      let io: { diskReadBytes?: number; diskWriteBytes?: number; netRxBytes?: number; netTxBytes?: number } = {};
      let uptimeMs = 0;
      let ioRead = false;
      if (r.state === "running" || r.state === "paused") {
        // The VMM's stats page first: a file read, which wakes none of the VMM's threads (a
        // request cost the VMM ~0.5 ms of CPU and this daemon ~1 ms on a project machine, every
        // interval, for every VM). A VMM without one (started by an older daemon) is asked.
        const page = readStatsFile(vmPaths(this.config.home, r.id).statsFile);
        if (page !== undefined) {
          io = page.totals;
          uptimeMs = page.startedAtMs === undefined ? 0 : Math.max(0, now - page.startedAtMs);
          ioRead = true;
        } else if (live.unresponsiveSince === undefined) {
          // an unresponsive VMM is the watchdog's: asking it here would hold up every VM after it
          try {
            const s = await this.client(r).stats();
            io = s.io ?? {};
            uptimeMs = s.uptimeMs ?? 0;
            ioRead = s.io !== undefined;
          } catch {
            /* a busy or stopping VMM: keep the process figures */
          }
        }
      }
      // the first sample of a VMM has no CPU interval yet: it would average a 0 into its bucket
      if (cpuKnown) {
        vmSample.cpuPercent = Math.max(0, cpuPercent);
        vmSample.memoryBytes = memoryBytes;
      }
      if (ioRead) {
        // Keyed by the VMM's pid too: a new VMM's counters start from 0 (RateTracker also takes a
        // counter going backwards as a reset). No rate when they could not be read: a missing
        // reading is not a drop to 0.
        const key = `${r.id}:${live.pid}:`;
        const rate = (f: string, v: number | undefined): number | undefined => (v === undefined ? undefined : this.rates.rate(key + f, v, now));
        const rates = [rate("dr", io.diskReadBytes), rate("dw", io.diskWriteBytes), rate("rx", io.netRxBytes), rate("tx", io.netTxBytes)];
        if (rates.every((x) => x !== undefined)) {
          const [dr, dw, rx, tx] = rates as number[];
          vmSample.io = { diskReadBps: dr!, diskWriteBps: dw!, netRxBps: rx!, netTxBps: tx! };
          hostIo.diskReadBps += dr!;
          hostIo.diskWriteBps += dw!;
          hostIo.netRxBps += rx!;
          hostIo.netTxBps += tx!;
        }
      }
      this.usage.set(r.id, {
        at: new Date(now).toISOString(),
        cpuSeconds: pu.cpuSeconds,
        cpuPercent: Math.max(0, Math.round(cpuPercent * 10) / 10),
        memoryBytes,
        diskReadBytes: io.diskReadBytes ?? 0,
        diskWriteBytes: io.diskWriteBytes ?? 0,
        netRxBytes: io.netRxBytes ?? 0,
        netTxBytes: io.netTxBytes ?? 0,
        uptimeMs,
      });
    }
    if (!firstHostSample) {
      // The host: CPU busy over the interval as a share of all its CPUs, memory in use, and the
      // VMs' I/O summed (what the guests did, not the host's own devices).
      samples.push({ scope: HOST_SCOPE, sample: { cpuPercent: sample.cpus > 0 ? (used.cpus / sample.cpus) * 100 : 0, memoryBytes: used.memoryBytes, io: hostIo } });
    }
    try {
      this.history.record(samples);
    } catch (e) {
      // a full disk must not stop sampling (the live figures and the watchdog go on)
      this.log.warn({ err: (e as Error).message }, "metrics history not recorded");
    }
    const byId = new Map(samples.map((x) => [x.scope, x.sample]));
    const obs: Observation = {
      host: { memoryBytes: used.memoryBytes, memoryTotalBytes: discoverHost(this.config.home).memoryBytes },
      vms: this.store.listVms().map((r) => {
        const live = this.live.get(r.id);
        const sample = byId.get(r.id);
        return {
          name: r.name,
          state: r.state,
          ...(sample !== undefined ? { sample } : {}),
          unresponsive: live?.unresponsiveSince !== undefined && !live.dead,
          pausedDiskFull: r.state === "paused" && live?.pauseReason !== undefined && (live.pauseReason.kind ?? "disk-full") === "disk-full",
        };
      }),
      // statfs only (listPools() would also stat every disk file, each sample)
      pools: this.store.listPools().flatMap((p) => {
        try {
          const st = statfsSync(p.path);
          return [{ name: p.name, capacityBytes: st.blocks * st.bsize, freeBytes: st.bavail * st.bsize }];
        } catch {
          return []; // the directory is gone: pool ls shows it
        }
      }),
    };
    if (this.audit !== undefined) obs.audit = { failing: this.audit.failing, failures: this.audit.failures };
    this.alertEvents(this.alerts.evaluate(obs, this.alertRules.list()));
  }

  /** The built-in `audit-write` alert watches this audit log: fired at its first failed write, resolved by the next sample after one succeeds. */
  watchAudit(audit: AuditLog): void {
    this.audit = audit;
    audit.onFailure((err) => {
      this.log.error({ err: err.message }, "the audit log cannot be written");
      this.alertEvents(this.alerts.fireNow({ rule: "audit-write", subject: "audit", severity: "critical", message: `the audit log cannot be written: ${err.message}` }));
    });
  }

  private alertEvents(changes: AlertChange[]): void {
    for (const c of changes) {
      const a = c.alert;
      this.event(`alert.${c.kind}`, a.vm, `${a.severity} alert ${a.rule}${a.vm === undefined ? ` (${a.subject})` : ""}: ${a.message}`, { ...a });
    }
  }

  /** What each alert webhook did last. */
  webhookStatus(): WebhookStatus[] {
    return this.webhooks.status();
  }

  /** The alerts firing now. */
  firingAlerts(): FiringAlert[] {
    return this.alerts.current();
  }

  listAlertRules(): AlertRule[] {
    return this.alertRules.list();
  }

  addAlertRule(spec: AlertRuleSpec): AlertRule {
    if (spec.vm !== undefined) this.row(spec.vm);
    const r = this.alertRules.add(spec);
    this.daemonEvent("alert.rule-added", `alert rule ${r.name} added: ${r.metric} above ${r.above}${r.forSeconds > 0 ? ` for ${r.forSeconds} s` : ""} (${r.severity})${r.vm !== undefined ? ` on VM ${r.vm}` : ""}`, { rule: r.name });
    return r;
  }

  removeAlertRule(name: string): void {
    this.alertRules.remove(name);
    this.daemonEvent("alert.rule-removed", `alert rule ${name} removed`, { rule: name });
  }

  /**
   * Usage history of a VM (by name) or, without one, of the host (history.ts).
   * @throws TypevisorError VM_NOT_FOUND, INVALID_REQUEST
   */
  metricsHistory(opts: { vm?: string; from?: number; to?: number; step?: number }): { vm?: string; step: number; from: string; to: string; points: HistoryPoint[] } {
    const scope = opts.vm !== undefined ? this.row(opts.vm).id : HOST_SCOPE;
    const q = this.history.query(scope, { ...(opts.from !== undefined ? { from: opts.from } : {}), ...(opts.to !== undefined ? { to: opts.to } : {}), ...(opts.step !== undefined ? { step: opts.step } : {}) });
    return { ...(opts.vm !== undefined ? { vm: opts.vm } : {}), ...q };
  }

  /** Daemon shutdown: VMs keep running unless `stopVms`. */
  async close(opts: { stopVms?: boolean } = {}): Promise<void> {
    this.closing = true;
    this.standby.close();
    if (this.usageTimer !== undefined) clearInterval(this.usageTimer);
    if (this.healthTimer !== undefined) clearInterval(this.healthTimer);
    this.webhooks.close();
    if (opts.stopVms === true) {
      await Promise.all(
        this.store
          .listVms()
          .filter((r) => r.state === "running" || r.state === "paused" || r.state === "starting")
          .map((r) => this.stop(r.name).catch((e: unknown) => this.log.error({ vm: r.name, err: (e as Error).message }, "stop at shutdown failed"))),
      );
    }
    for (const l of this.live.values()) {
      if (l.poll !== undefined) clearInterval(l.poll);
      l.child?.removeAllListeners("exit");
    }
    this.live.clear();
    this.store.close();
  }

  daemonEvent(type: string, message: string, data?: Record<string, unknown>): void {
    this.event(type, undefined, message, data);
  }
}

function kill(pid: number): void {
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    /* already gone */
  }
}
