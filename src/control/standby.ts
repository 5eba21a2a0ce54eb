/**
 * A pool of standby VMMs (issue 15, "instant create"; docs/snapshots.md "Standby VMMs"): VMM
 * processes started ahead of need (`typevisor run --standby`), each with Node, the VMM's modules
 * and KVM access ready, waiting on their own API socket for `PUT /restore`. A VM that starts from
 * a saved state (a rollback, a clone of a memory snapshot, the restart after a snapshot) takes one
 * instead of starting a process: the standby becomes that VM, its socket and log are renamed into
 * the VM's places, and a new standby is started behind it. Every other start spawns as before.
 * The pool is filled once the inventory has a memory snapshot (want()), not before.
 *
 * Files live in `<home>/standby/`: `<k>.api` (socket), `<k>.log` (its stderr), `<k>.pid` (pid and
 * start time). A daemon killed leaves its standbys waiting: the next one ends them at start
 * (their pid files), and the pid file of one being adopted goes only once the VM's inventory row
 * names its pid, so a VMM adopted halfway is never left running unrecorded.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Logger } from "pino";
import { TYPEVISOR_BIN, vmmEnv } from "../engine/native.js";
import { VmmClient } from "../engine/vmm-client.js";
import { VMM_NODE_FLAGS } from "../vmm/isolates.js";
import { processAlive, processStartTime } from "./proc.js";

/** A standby VMM ready to be given a snapshot. */
export interface StandbyVmm {
  pid: number;
  child: ChildProcess;
  socket: string;
  log: string;
  pidFile: string;
}

interface Slot {
  key: string;
  child: ChildProcess;
  ready: boolean;
}

/** How long a standby may take to answer on its socket (Node's start-up: seconds on a loaded host). */
const READY_TIMEOUT_MS = 60_000;
/**
 * How long after a standby is taken the one behind it starts. A standby's start (Node, the VMM's
 * modules, its device, vCPU and disk I/O threads) is CPU time the VM just restored from the taken one needs
 * first for its own first seconds: on a small host, and in the lab's one emulated CPU, a standby
 * started at once delayed a clone's first console answer by seconds. A burst of restores larger
 * than the pool spawns VMMs for the rest meanwhile, as without a pool.
 */
export const STANDBY_REFILL_DELAY_MS = 5_000;

export class StandbyPool {
  private readonly slots = new Map<string, Slot>();
  private closed = false;
  private started = false;
  /** Kept filled only once a memory snapshot exists: a daemon that never restores pays for none. */
  private wanted = false;
  /** The refill after a take (STANDBY_REFILL_DELAY_MS), while it waits. */
  private refill: NodeJS.Timeout | undefined;
  readonly dir: string;

  constructor(private readonly opts: { home: string; size: number; forceKvm: boolean; log: Logger }) {
    this.dir = join(opts.home, "standby");
  }

  get size(): number {
    return this.opts.size;
  }

  /** Standbys ready now. */
  ready(): number {
    return [...this.slots.values()].filter((s) => s.ready).length;
  }

  /**
   * End what a previous daemon left (its standbys, and a VMM it was handing a VM when killed,
   * unless the inventory recorded it as that VM's: `known`), then fill the pool.
   */
  start(known: ReadonlySet<number> = new Set(), wanted = false): string[] {
    this.wanted = wanted;
    const ended: string[] = [];
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    for (const f of readdirSync(this.dir)) {
      if (!f.endsWith(".pid")) continue;
      const [pid, start] = readFileSync(join(this.dir, f), "utf8").trim().split(" ");
      if (pid !== undefined && /^\d+$/.test(pid) && !known.has(Number(pid)) && processAlive(Number(pid), start)) {
        try {
          process.kill(Number(pid), "SIGKILL");
          ended.push(`pid ${pid}`);
        } catch {
          /* gone meanwhile */
        }
      }
    }
    for (const f of readdirSync(this.dir)) rmSync(join(this.dir, f), { force: true });
    this.started = true;
    this.fill();
    return ended;
  }

  private fill(): void {
    // Only once start() has swept what a previous daemon left.
    while (this.started && this.wanted && !this.closed && this.slots.size < this.opts.size) this.spawnOne();
  }

  private spawnOne(): void {
    const key = randomBytes(4).toString("hex");
    const socket = join(this.dir, `${key}.api`);
    const log = openSync(join(this.dir, `${key}.log`), "a");
    let child: ChildProcess;
    try {
      // Detached and with the VMM's environment only, as every VMM (engine/native.ts spawnVmm).
      child = spawn(process.execPath, [...VMM_NODE_FLAGS, TYPEVISOR_BIN, "run", "--standby", "--no-lab", "--api-socket", socket, ...(this.opts.forceKvm ? ["--force-kvm"] : [])], {
        detached: true,
        stdio: ["ignore", log, log],
        env: vmmEnv("standby"),
      });
    } finally {
      closeSync(log);
    }
    child.unref();
    const slot: Slot = { key, child, ready: false };
    this.slots.set(key, slot);
    const pid = child.pid;
    if (pid === undefined) {
      this.slots.delete(key);
      child.once("error", (e) => this.opts.log.warn({ err: e.message }, "a standby VMM did not start"));
      return;
    }
    writeFileSync(join(this.dir, `${key}.pid`), `${pid} ${processStartTime(pid) ?? ""}\n`);
    child.once("exit", () => {
      if (this.slots.get(key) !== slot) return; // taken: the VM's now
      this.slots.delete(key);
      for (const ext of ["api", "log", "pid"]) rmSync(join(this.dir, `${key}.${ext}`), { force: true });
      // A standby that dies by itself is not restarted in a loop: the next take() starts one.
      if (!this.closed) this.opts.log.warn({ pid }, "a standby VMM exited");
    });
    void new VmmClient(socket).waitReady(Date.now() + READY_TIMEOUT_MS, () => child.exitCode === null && child.signalCode === null).then(
      () => {
        slot.ready = true;
      },
      (e: unknown) => {
        this.opts.log.warn({ err: (e as Error).message }, "a standby VMM did not answer: ended");
        child.kill("SIGKILL");
      },
    );
  }

  /** There is something to restore (a memory snapshot): keep the pool filled from now on. */
  want(): void {
    this.wanted = true;
    this.fill();
  }

  /** A ready standby, out of the pool (a new one is started behind it, STANDBY_REFILL_DELAY_MS later), or undefined. */
  take(): StandbyVmm | undefined {
    const slot = [...this.slots.values()].find((s) => s.ready && s.child.exitCode === null && s.child.signalCode === null);
    if (slot === undefined) {
      this.fill();
      return undefined;
    }
    this.slots.delete(slot.key);
    this.refill ??= setTimeout(() => {
      this.refill = undefined;
      this.fill();
    }, STANDBY_REFILL_DELAY_MS).unref();
    const d = this.dir;
    return { pid: slot.child.pid!, child: slot.child, socket: join(d, `${slot.key}.api`), log: join(d, `${slot.key}.log`), pidFile: join(d, `${slot.key}.pid`) };
  }

  /** Daemon shutdown: the standbys go (a VM taken from the pool is the VM's). */
  close(): void {
    this.closed = true;
    clearTimeout(this.refill);
    for (const s of this.slots.values()) {
      try {
        s.child.kill("SIGKILL");
      } catch {
        /* gone */
      }
    }
    this.slots.clear();
    if (existsSync(this.dir)) for (const f of readdirSync(this.dir)) rmSync(join(this.dir, f), { force: true });
  }
}
