/**
 * A pool of standby VMMs (issue 15, "instant create"; docs/snapshots.md "Standby VMMs"): VMM
 * processes started ahead of need (`typevisor run --standby`), each with Node, the VMM's modules
 * and KVM access ready, waiting on their own API socket for `PUT /restore`. A VM that starts from
 * a saved state (a rollback, a clone of a memory snapshot, the restart after a snapshot) takes one
 * instead of starting a process: the standby becomes that VM, its socket and log are renamed into
 * the VM's places, and a new standby is started behind it. Every other start spawns as before.
 * The pool is filled once the inventory has a memory snapshot (want()), not before.
 *
 * Every standby is started for the pool's template: the memory snapshot restored last (before
 * any restore, the first one saved; at the daemon's start, the newest). It builds that
 * snapshot's VM ahead (`run --standby --template`: its state in place, its memory mapped), so a
 * restore of the template only gives the VM its console and back ends; a restore of another
 * snapshot builds its VM as before.
 *
 * Under the VMM sandbox (`jail` given) each standby is jailed for one memory snapshot, the
 * pool's template (docs/security.md "Standby VMMs in the sandbox"): it runs as a uid of its own
 * with that snapshot's group, and the daemon binds the VM's files into its view when it hands it
 * a VM (`<k>.d`, the hand-off directory; manager.ts fromJailedStandby). Only a restore of that
 * snapshot can take it.
 *
 * Files live in `<home>/standby/`: `<k>.api` (socket), `<k>.log` (its stderr), `<k>.pid` (pid and
 * start time), jailed also `<k>.con` (the console socket it will serve), `<k>.d` and `<k>.d.root`
 * (its jail's root). A daemon killed leaves its standbys waiting: the next one ends them at start
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
  /** Jailed: its uid, its console socket (bound by the daemon) and its hand-off directory. */
  jail?: { key: string; uid: number; consoleSocket: string; handoff: string; fdSocket: number };
}

/** A memory snapshot standbys are started for: its id and saved state's directory. */
export interface StandbyTemplate {
  id: string;
  dir: string;
}

/** How the pool starts and ends jailed standbys (the daemon's sandbox: manager.ts). */
export interface StandbyJailer {
  /** Start a jailed `run --standby` for `template` with these files; resolves with the waiter and the VMM's pid and uid. */
  spawn(key: string, template: StandbyTemplate, files: { socket: string; consoleSocket: string; log: string; handoff: string }): Promise<{ child: ChildProcess; pid: number; uid: number; fdSocket: number }>;
  /** A jailed standby that was not taken is gone: its uid and its hand-off directory are released. */
  release(key: string, handoff: string): void;
  /** At start: what a previous daemon's jailed standbys left (uids, hand-off directories and their mounts). */
  sweep(dir: string): void;
}

interface Slot {
  key: string;
  child: ChildProcess | undefined;
  pid: number | undefined;
  ready: boolean;
  template?: string;
  uid?: number;
  /** Jailed: the daemon's end of the socket the VM's TAPs are sent on. */
  fdSocket?: number;
}

/**
 * How long after a standby is taken the one behind it starts. A standby's start (Node, the VMM's
 * modules, its device, vCPU and disk I/O threads) is CPU time the VM just restored from the taken one needs
 * first for its own first seconds: on a small host, and in the lab's one emulated CPU, a standby
 * started at once delayed a clone's first console answer by seconds. A burst of restores larger
 * than the pool spawns VMMs for the rest meanwhile, as without a pool.
 */
export const STANDBY_REFILL_DELAY_MS = 5_000;

/** A jailed standby's TAP socket (the daemon's end), once. */
function closeFd(s: Slot): void {
  if (s.fdSocket === undefined) return;
  try {
    closeSync(s.fdSocket);
  } catch {
    // closed already
  }
  s.fdSocket = undefined;
}

export class StandbyPool {
  private readonly slots = new Map<string, Slot>();
  /** Keys of standbys handed a VM whose process has not ended yet (their exit is the VM's). */
  private readonly taken = new Set<string>();
  private closed = false;
  private started = false;
  /** Kept filled only once a memory snapshot exists: a daemon that never restores pays for none. */
  private wanted = false;
  /** The refill after a take (STANDBY_REFILL_DELAY_MS), while it waits. */
  private refill: NodeJS.Timeout | undefined;
  /** The memory snapshot standbys are started for (jailed: the one they may serve). */
  private template: StandbyTemplate | undefined;
  readonly dir: string;

  /**
   * `readyTimeoutMs`: how long a standby may take to answer on its socket, the daemon's
   * --start-timeout as for any VMM. A standby answers only once its VM is built ahead (Node's
   * start-up, the VMM's modules, the template's state and memory map), and one ended for not
   * answering is not started again until a restore. A fixed 60 s was too short for the lab in stop
   * 38's CI run (2026-12-07): no jailed standby was ready in the 300 s snapshots.lab waited.
   */
  constructor(private readonly opts: { home: string; size: number; forceKvm: boolean; log: Logger; readyTimeoutMs: number; jail?: StandbyJailer }) {
    this.dir = join(opts.home, "standby");
  }

  private files(key: string): { socket: string; consoleSocket: string; log: string; handoff: string; pidFile: string } {
    const d = this.dir;
    return { socket: join(d, `${key}.api`), consoleSocket: join(d, `${key}.con`), log: join(d, `${key}.log`), handoff: join(d, `${key}.d`), pidFile: join(d, `${key}.pid`) };
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
    // Hand-off directories (mounts) first: the files bound there must not be reached by a removal.
    this.opts.jail?.sweep(this.dir);
    for (const f of readdirSync(this.dir)) if (!f.endsWith(".d") && !f.endsWith(".d.root")) rmSync(join(this.dir, f), { force: true });
    this.started = true;
    this.fill();
    return ended;
  }

  private fill(): void {
    // Only once start() has swept what a previous daemon left.
    if (this.opts.jail !== undefined && this.template === undefined) return;
    while (this.started && this.wanted && !this.closed && this.slots.size < this.opts.size) this.spawnOne();
  }

  private spawnOne(): void {
    const key = randomBytes(4).toString("hex");
    if (this.opts.jail !== undefined) {
      this.spawnJailed(key, this.opts.jail, this.template!);
      return;
    }
    const socket = join(this.dir, `${key}.api`);
    const log = openSync(join(this.dir, `${key}.log`), "a");
    let child: ChildProcess;
    try {
      // Detached and with the VMM's environment only, as every VMM (engine/native.ts spawnVmm).
      child = spawn(process.execPath, [
        ...VMM_NODE_FLAGS, TYPEVISOR_BIN, "run", "--standby", "--no-lab", "--api-socket", socket,
        ...(this.template !== undefined ? ["--template", this.template.dir] : []),
        ...(this.opts.forceKvm ? ["--force-kvm"] : []),
      ], {
        detached: true,
        stdio: ["ignore", log, log],
        env: vmmEnv("standby"),
      });
    } finally {
      closeSync(log);
    }
    child.unref();
    const slot: Slot = { key, child, pid: child.pid, ready: false, ...(this.template !== undefined ? { template: this.template.id } : {}) };
    this.slots.set(key, slot);
    if (child.pid === undefined) {
      this.slots.delete(key);
      child.once("error", (e) => this.opts.log.warn({ err: e.message }, "a standby VMM did not start"));
      return;
    }
    this.watch(slot, child, child.pid);
  }

  /** A jailed standby for `template` (StandbyJailer.spawn); its slot counts from now, so fill() does not start another meanwhile. */
  private spawnJailed(key: string, jail: StandbyJailer, template: StandbyTemplate): void {
    const slot: Slot = { key, child: undefined, pid: undefined, ready: false, template: template.id };
    this.slots.set(key, slot);
    const f = this.files(key);
    jail.spawn(key, template, f).then(
      ({ child, pid, uid, fdSocket }) => {
        child.unref();
        slot.child = child;
        slot.pid = pid;
        slot.uid = uid;
        slot.fdSocket = fdSocket;
        if (this.slots.get(key) !== slot) {
          // The pool closed or changed template meanwhile.
          closeFd(slot);
          child.once("exit", () => {
            try {
              jail.release(key, f.handoff);
            } catch (e) {
              this.opts.log.warn({ err: (e as Error).message }, "could not release a jailed standby's files");
            }
          });
          child.kill("SIGKILL");
          return;
        }
        this.watch(slot, child, pid);
      },
      (e: unknown) => {
        if (this.slots.get(key) === slot) this.slots.delete(key);
        this.opts.log.warn({ err: (e as Error).message }, "a jailed standby VMM did not start");
        try {
          jail.release(key, f.handoff);
        } catch (err) {
          this.opts.log.warn({ err: (err as Error).message }, "could not release a jailed standby's files");
        }
      },
    );
  }

  /** Its pid file, its end (not taken: its files go), and its readiness (its socket answers). */
  private watch(slot: Slot, child: ChildProcess, pid: number): void {
    const key = slot.key;
    const f = this.files(key);
    writeFileSync(f.pidFile, `${pid} ${processStartTime(pid) ?? ""}\n`);
    child.once("exit", () => {
      if (this.taken.delete(key)) return; // the VM's now: its files went with it
      const ended = this.slots.get(key) !== slot; // by want() changing the template, or close()
      this.slots.delete(key);
      closeFd(slot);
      for (const x of [f.socket, f.consoleSocket, f.log, f.pidFile]) rmSync(x, { force: true });
      if (this.opts.jail !== undefined) {
        try {
          this.opts.jail.release(key, f.handoff);
        } catch (e) {
          this.opts.log.warn({ err: (e as Error).message }, "could not release a jailed standby's files");
        }
      }
      // A standby that dies by itself is not restarted in a loop: the next take() starts one.
      if (!this.closed && !ended) this.opts.log.warn({ pid }, "a standby VMM exited");
    });
    void new VmmClient(f.socket).waitReady(Date.now() + this.opts.readyTimeoutMs, () => child.exitCode === null && child.signalCode === null).then(
      () => {
        slot.ready = true;
      },
      (e: unknown) => {
        this.opts.log.warn({ err: (e as Error).message }, "a standby VMM did not answer: ended");
        child.kill("SIGKILL");
      },
    );
  }

  /**
   * There is something to restore (a memory snapshot): keep the pool filled from now on.
   * `template` is the snapshot the standbys are started for from now on; without `retarget`, only
   * when the pool has no template yet (a snapshot saved does not take the pool from the one being
   * cloned: a restore does). Jailed standbys of another template are ended (they could serve no
   * restore); unjailed ones stay, and serve any restore, only without a VM built ahead.
   */
  want(template?: StandbyTemplate, opts: { retarget: boolean } = { retarget: true }): void {
    this.wanted = true;
    if (template !== undefined && template.id !== this.template?.id && (opts.retarget || this.template === undefined)) {
      this.template = template;
      if (this.opts.jail !== undefined) {
        for (const [key, s] of [...this.slots]) {
          if (s.template === template.id) continue;
          this.slots.delete(key);
          s.child?.kill("SIGKILL"); // its exit handler releases its files
        }
      }
    }
    this.fill();
  }

  /**
   * `exists` says which snapshots are still there: standbys started for one that is gone end (the
   * VM built ahead maps its memory file, which would keep its space on disk), and when it was the
   * template, none is started for it again (jailed: none at all until the next want()).
   */
  dropTemplateUnless(exists: (snapId: string) => boolean): void {
    if (this.template !== undefined && !exists(this.template.id)) this.template = undefined;
    for (const [key, s] of [...this.slots]) {
      if (s.template === undefined || exists(s.template)) continue;
      this.slots.delete(key);
      s.child?.kill("SIGKILL");
    }
    this.fill();
  }

  /** The template standbys are started for now. */
  templateId(): string | undefined {
    return this.template?.id;
  }

  /**
   * A ready standby, out of the pool (a new one is started behind it, STANDBY_REFILL_DELAY_MS
   * later), or undefined: one started for `template` (the snapshot being restored), else,
   * unjailed, any. Jailed, only one started for it.
   */
  take(template?: string): StandbyVmm | undefined {
    const live = [...this.slots.values()].filter((s) => s.ready && s.child !== undefined && s.child.exitCode === null && s.child.signalCode === null);
    const slot = live.find((s) => s.template === template) ?? (this.opts.jail === undefined ? live[0] : undefined);
    if (slot === undefined) {
      this.fill();
      return undefined;
    }
    this.slots.delete(slot.key);
    this.taken.add(slot.key);
    this.refill ??= setTimeout(() => {
      this.refill = undefined;
      this.fill();
    }, STANDBY_REFILL_DELAY_MS).unref();
    const f = this.files(slot.key);
    return {
      pid: slot.pid!, child: slot.child!, socket: f.socket, log: f.log, pidFile: f.pidFile,
      ...(this.opts.jail !== undefined ? { jail: { key: slot.key, uid: slot.uid!, consoleSocket: f.consoleSocket, handoff: f.handoff, fdSocket: slot.fdSocket! } } : {}),
    };
  }

  /** Daemon shutdown: the standbys go (a VM taken from the pool is the VM's). */
  close(): void {
    this.closed = true;
    clearTimeout(this.refill);
    const ending = [...this.slots.values()];
    this.slots.clear();
    for (const s of ending) {
      try {
        s.child?.kill("SIGKILL");
      } catch {
        /* gone */
      }
      closeFd(s);
      // Jailed: its mounts go now, not when its exit is seen (the daemon may be gone by then).
      if (this.opts.jail !== undefined) {
        try {
          this.opts.jail.release(s.key, this.files(s.key).handoff);
        } catch (e) {
          this.opts.log.warn({ err: (e as Error).message }, "could not release a jailed standby's files");
        }
      }
    }
    if (existsSync(this.dir)) for (const f of readdirSync(this.dir)) if (!f.endsWith(".d") && !f.endsWith(".d.root")) rmSync(join(this.dir, f), { force: true });
  }
}
