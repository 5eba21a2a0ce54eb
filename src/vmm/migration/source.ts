/**
 * The sending side of a live migration (pre-copy). Guest writes are logged by KVM while memory
 * is sent: round 0 sends every page that holds something, each later round the pages written
 * during the one before, until what is left can go within the downtime target at the
 * bandwidth measured so far (or the round limit). Then the VM is paused, the last dirty pages
 * and the whole vCPU/device state are sent, and once the destination says the state is in
 * place this side commits (sends GO) and the destination runs the VM.
 *
 * Until GO is sent, any failure (connection cut, destination error, cancel, timeout) stops
 * dirty logging and leaves the VM as it was: running if it ran. After GO the VM here never runs
 * again: if the destination's RUNNING does not arrive, the VM stays paused here and the error
 * says so (at most one copy of the guest ever runs).
 */
import { createHash } from "node:crypto";
import { closeSync, openSync } from "node:fs";
import type { Socket } from "node:net";
import { TypevisorError } from "../../errors.js";
import { forEachDataRun } from "../snapshot/memory.js";
import { encodeState } from "../snapshot/state-file.js";
import type { SnapshotConfig } from "../snapshot/state.js";
import type { Vm } from "../vm.js";
import { keepCompiledCode } from "../code-flush.js";
import { phase, takePhases } from "../phases.js";
import { startProfile, stopProfile } from "../profile.js";
import { niceEveryThread, niceHelperThreads } from "../threads/kernel.js";
import { MAX_NICE } from "../defaults.js";
import { gettid, setThreadNice } from "../../sys/libc.js";
import { exactRecord, isFiniteNumber } from "../plain-checks.js";
import { DIRTY_BLOCK_SIZE } from "../disk/dirty-blocks.js";
import type { DiskCopy } from "./disk-copy.js";
import { diskHeader, FRAME, FrameReader, frame, hello, jsonFrame, MAX_FRAME, PAGE, PageSetWriter, pagesHeader, send, SET_PAGES, STATE_PIECE, streamError, streamedMemory } from "./protocol.js";
import { openStream, parseEndpoint, type StreamTls } from "./transport.js";

export { parseEndpoint };

export interface MigrateRequest {
  /** "tcp:HOST:PORT" or "unix:PATH". */
  to: string;
  /** Pause-to-resume target: the last round is sent when it fits this at the measured bandwidth. */
  maxDowntimeMs?: number;
  /** Switch over after this many rounds whatever is left (no limit by default: auto-converge and the timeout decide). */
  maxRounds?: number;
  /** The whole migration must finish within this (else it is cancelled and the VM runs on here). */
  timeoutMs?: number;
  /** Send at most this many bytes per second (memory and disks); unlimited by default. */
  maxBandwidth?: number;
  /** Throttle vCPUs that dirty memory faster than it can be sent (default true). */
  autoConverge?: boolean;
  /** "shared" (default): both VMMs open the same disk files; "copy": the disks' contents go in the stream too. */
  disks?: "shared" | "copy";
  /** TLS with mutual authentication (transport.ts); without it TCP needs `plainTcp`. */
  tls?: StreamTls;
  plainTcp?: boolean;
}

export type MigrationPhase = "connecting" | "precopy" | "stopped" | "committed" | "completed" | "failed" | "cancelled";

/**
 * Where the switch-over's time went, in ms from the pause request (source clock), and the
 * destination's own steps in ms from its receipt of DONE (its clock; it sends them in RUNNING).
 */
export interface SwitchoverTimes {
  /** Before the pause (not part of it): SYNC sent to SYNCED back, the earlier rounds drained to the destination. */
  syncMs?: number;
  /** Every vCPU out of KVM_RUN and parked. */
  vcpusStopped: number;
  /** vCPU, interrupt-controller, clock and device state read (the device thread's reply included). */
  stateCaptured: number;
  /** The dirty log read once more (KVM_GET_DIRTY_LOG and the device thread's marks): what the last round sends. */
  dirtyTaken?: number;
  /** The last dirty pages sent (lastRoundBytes of them). */
  lastRoundSent: number;
  lastRoundBytes: number;
  /** "disks": "copy": the blocks written since the last round sent (lastDiskBytes of them). */
  disksSent?: number;
  /** Every disk's writes and cached metadata on storage: shared disks (the destination reads the same files), or copied qcow2 ones (the last pass reads their tables). */
  disksFlushed?: number;
  lastDiskBytes?: number;
  /** The state encoded and handed to the socket, and DONE after it (stateBytes of it). */
  stateSent: number;
  stateBytes: number;
  /** The destination's READY arrived (it applied the state and readied its devices). */
  ready: number;
  /** GO handed to the socket: from here the guest is the destination's. */
  goSent: number;
  /** The destination's RUNNING arrived: its vCPUs run. */
  running: number;
  destination?: DestinationTimes;
}

/** The destination's steps, ms after DONE arrived there. */
export interface DestinationTimes {
  stateDecoded: number;
  /** The device and vCPU threads, started when HELLO came, are up (a wait only when the stream was shorter than their start-up). */
  threadsReady: number;
  stateApplied: number;
  devicesRestored: number;
  readySent: number;
  goReceived: number;
  resumed: number;
}

export interface MigrationProgress {
  phase: MigrationPhase;
  round: number;
  bytesSent: number;
  /** Bytes found dirty at the start of the current round. */
  dirtyBytes: number;
  /** Bytes of the current round not sent yet (round 0: RAM not scanned yet, an upper bound). */
  bytesRemaining: number;
  /** Bytes per second measured over the pre-copy so far. */
  bandwidth: number;
  /** Bytes per second the guest dirtied during the last round. */
  dirtyRate: number;
  /** Expected pause at the measured bandwidth for what is dirty now. */
  expectedDowntimeMs: number;
  /** Share of time the vCPUs are kept out of the guest by auto-converge (0 when not throttled). */
  throttlePercent: number;
  /** The VM's pause, from pause to the destination's RUNNING (set once known). */
  downtimeMs?: number;
  /** Where the pause went (set once the switch-over ended). */
  switchover?: SwitchoverTimes;
  /** Disk copy ("disks": "copy"): bytes sent and the disks' dirty bytes left. */
  disks?: { bytesSent: number; dirtyBytes: number };
  error?: string;
  startedAt: string;
}

const DEFAULT_DOWNTIME_MS = 300;
const DEFAULT_TIMEOUT_MS = 600_000;
/** The switch-over comes with round 2 at the earliest: round 1 always runs beside the guest (see run()); `maxRounds` may end sooner. */
const MIN_ROUNDS_BEFORE_SWITCHOVER = 2;
/**
 * Rounds go on while they still shrink what the pause must send: after a round whose dirty bytes
 * were at most half the round's before it (and more than SHRINK_FLOOR), another follows, up to
 * round MAX_SHRINK_ROUNDS, even when the expected downtime is under the limit already. That
 * estimate counts only bytes at the pre-copy's bandwidth; every byte left for the pause is sent
 * with the guest stopped (lab, idle 256 MiB: the last round's 1.1 MB took 150-200 ms of it), and
 * a round of a shrinking set costs little more than the set itself. A guest that dirties memory
 * steadily does not shrink it, and switches over as before.
 */
const SHRINK_FACTOR = 0.5;
const SHRINK_FLOOR = 256 * 1024;
const MAX_SHRINK_ROUNDS = 8;
/** Pages per PAGES frame. */
const BATCH_PAGES = (MAX_FRAME - 64) / PAGE;
/**
 * Auto-converge, with the figures QEMU's cpu-throttle uses (migration parameters
 * cpu-throttle-initial 20, cpu-throttle-increment 10, max-cpu-throttle 99,
 * throttle-trigger-threshold 50): when a round dirtied more than half of what the round before
 * it sent, twice, the vCPUs are kept out of the guest for 20% of the time, then 10% more each
 * time it happens again, up to 99%.
 */
const THROTTLE_INITIAL = 20;
const THROTTLE_STEP = 10;
const THROTTLE_MAX = 99;
const THROTTLE_TRIGGER = 0.5;

const DESTINATION_TIMES = ["stateDecoded", "threadsReady", "stateApplied", "devicesRestored", "readySent", "goReceived", "resumed"] as const satisfies readonly (keyof DestinationTimes)[];

const isDestinationTimes = exactRecord(Object.fromEntries(DESTINATION_TIMES.map((k) => [k, isFiniteNumber])));

/** RUNNING's payload as DestinationTimes when it is exactly that (finite numbers, no other keys); only ever reported. */
function destinationTimes(payload: Buffer): DestinationTimes | undefined {
  if (payload.length === 0 || payload.length >= 4096) return undefined;
  let v: unknown;
  try {
    v = JSON.parse(payload.toString("utf8"));
  } catch {
    return undefined;
  }
  return isDestinationTimes(v) ? (v as DestinationTimes) : undefined;
}

export class OutgoingMigration {
  readonly progress: MigrationProgress = { phase: "connecting", round: 0, bytesSent: 0, dirtyBytes: 0, bytesRemaining: 0, bandwidth: 0, dirtyRate: 0, expectedDowntimeMs: 0, throttlePercent: 0, startedAt: new Date().toISOString() };
  private sock: Socket | undefined;
  private cancelled = false;
  private wake: (() => void) | undefined;
  /** "disks": "copy": the disks, and the blocks their writes change (marked by the device thread). */
  private copy: DiskCopy | undefined;
  /** Pacing (maxBandwidth): bytes sent since `paceStart`. */
  private paceStart = 0;
  private paceBytes = 0;
  /** Resolves when the migration ended: completed (the caller then ends this VMM) or not (the VM runs on here). */
  readonly done: Promise<MigrationProgress>;

  constructor(private readonly vm: Vm, private readonly config: SnapshotConfig, private readonly req: MigrateRequest) {
    this.done = this.run();
  }

  /**
   * After a completed migration, once the caller has reported it: this thread too goes to the
   * lowest priority for the VMM's teardown (the others went when the destination said RUNNING).
   */
  teardownLast(): void {
    if (this.progress.phase !== "completed") return;
    try {
      setThreadNice(gettid(), MAX_NICE);
    } catch {
      // best effort, as for the other threads
    }
  }

  /** Stop a migration that has not committed; the VM runs on here. */
  cancel(): boolean {
    if (this.progress.phase === "committed" || this.progress.phase === "completed") return false;
    this.cancelled = true;
    this.sock?.destroy();
    this.wake?.();
    return true;
  }

  private check(): void {
    if (this.cancelled) throw new TypevisorError("MIGRATION_CANCELLED", "cancelled");
  }

  /** Wait until `bytes` more may go at maxBandwidth (a token bucket that does not save up idle time). */
  private async pace(bytes: number): Promise<void> {
    this.progress.bytesSent += bytes;
    const limit = this.req.maxBandwidth;
    if (limit === undefined) return;
    const now = performance.now();
    this.paceBytes += bytes;
    const due = this.paceStart + (this.paceBytes * 1000) / limit;
    if (due > now) {
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, due - now);
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.wake = undefined;
      this.check();
    } else if (now - due > 100) {
      // Behind by more than a moment (the socket was slower than the limit): start over from now, no burst.
      this.paceStart = now;
      this.paceBytes = 0;
    }
  }

  private async run(): Promise<MigrationProgress> {
    const vm = this.vm;
    const wasRunning = vm.vmState === "running";
    const timer = setTimeout(() => {
      this.progress.error = `did not finish within ${this.req.timeoutMs ?? DEFAULT_TIMEOUT_MS} ms`;
      this.cancel();
    }, this.req.timeoutMs ?? DEFAULT_TIMEOUT_MS);
    let paused = false;
    /** Puts V8's helper threads back to their nice value (set during the pause), if they were changed. */
    let undoHelpers: (() => void) | undefined;
    // What runs first in the pause (the capture, the last round) is warmed by the rounds before it.
    const releaseCode = keepCompiledCode();
    phase("migrate");
    try {
      const sock = await this.connect();
      phase("connected");
      const reader = new FrameReader(sock);
      const regions = vm.memory.hostRegions;
      // Loaded only for a copy: the disks' modules (qcow2 and all) are the device thread's otherwise.
      if (this.req.disks === "copy") this.copy = new (await import("./disk-copy.js")).DiskCopy(this.config.devices.disks);
      const copy = this.copy;
      const diskSizes = copy?.disks.map((d) => ({ size: d.size, format: d.format }));
      await send(sock, jsonFrame(FRAME.HELLO, hello(this.config, regions.map((r) => ({ guestPhysAddr: r.guestPhysAddr, size: r.size })), diskSizes)));
      // The destination's threads start when HELLO arrives; the guest is paused only once they are up.
      const prepared = reader.expect(FRAME.PREPARED);
      prepared.catch(() => undefined);
      await vm.startDirtyLog();
      // Anything written from here on is in the log: round 0 may send a page that changes again; the next round resends it.
      vm.takeDirtyLog();
      phase("dirtyLogOn");
      // The guest before the stream: its vCPUs at the main thread's weight until the migration
      // ends (Vm.setVcpuNice; lowering a nice value needs CAP_SYS_NICE, without it nothing changes).
      vm.setVcpuNice(0);
      this.progress.phase = "precopy";
      const t0 = performance.now();
      this.paceStart = t0;
      this.progress.bytesRemaining = regions.reduce((n, r) => n + r.size, 0) + (copy?.totalBytes ?? 0);
      if (copy !== undefined && copy.disks.length > 0) {
        // From here every completed write is marked: what the copy below reads stale goes again in a round.
        await vm.deviceCommand({ command: "disks.dirtyLog", args: { buffers: copy.disks.map((d) => d.dirty.shared) } });
        this.progress.disks = { bytesSent: 0, dirtyBytes: 0 };
        await this.flushForCopy();
        await copy.copyAll(this.emitDisk(sock), () => this.check());
      }
      await this.sendAll(sock);
      phase("round0");
      // The state's checksum (encodeState) is the process's first SHA-256 otherwise, inside the
      // pause; OpenSSL's first use is slow (lab: tens to 100+ ms).
      createHash("sha256").update(Buffer.alloc(64)).digest("hex");
      // And what the capture asks KVM about every vCPU (the MSR list, XSAVE's size), asked now.
      vm.saveSet();
      // The device thread's part of the capture (its quiesce, each device's save(), the reply)
      // runs here once, its result thrown away: it read only, and its code ran first in the
      // pause otherwise (18-34 ms of it in the lab). A disk completes its requests in flight, as a
      // flush would. (A VM without devices answers NO_DEVICES: nothing to warm.)
      await vm.deviceCommand({ command: "snapshot" }).catch(() => undefined);
      // Usually long arrived (round 0 takes longer than a thread start); a tiny guest may wait here.
      await prepared;
      const maxDowntime = this.req.maxDowntimeMs ?? DEFAULT_DOWNTIME_MS;
      let roundStart = t0;
      /** bytesSent when the round before this one began (round 0's start: nothing). */
      let roundStartBytes = 0;
      let highDirty = 0;
      /** The dirty bytes the round before this one found (round 0: all it sent). */
      let previousDirty = this.progress.bytesSent;
      for (let round = 1; ; round++) {
        this.check();
        this.progress.round = round;
        phase(`round${round}`);
        // A copy: the next takeDirtyLog() reuses the same bitmaps.
        const dirty = vm.takeDirtyLog().map((b) => Uint8Array.from(b));
        phase(`round${round}-log`);
        const diskDirty = copy?.disks.map((d) => d.dirty.take()) ?? [];
        const now = performance.now();
        const pages = countBits(dirty);
        const diskBytes = diskDirty.reduce((n, b) => n + b.length, 0) * DIRTY_BLOCK_SIZE;
        if (this.progress.disks !== undefined) this.progress.disks.dirtyBytes = diskBytes;
        const dirtyBytes = pages * PAGE + diskBytes;
        this.progress.dirtyBytes = dirtyBytes;
        this.progress.bytesRemaining = dirtyBytes;
        this.progress.dirtyRate = now > roundStart ? Math.round((dirtyBytes * 1000) / (now - roundStart)) : 0;
        const secs = (now - t0) / 1000;
        this.progress.bandwidth = secs > 0 ? Math.round(this.progress.bytesSent / secs) : 0;
        this.progress.expectedDowntimeMs = this.progress.bandwidth > 0 ? Math.round((dirtyBytes * 1000) / this.progress.bandwidth) : 0;
        // Never straight after round 0: the last round and the state go out while the guest is
        // paused, and the code that sends them (the dirty-page scan, PAGE_SET, the frames' batching)
        // would otherwise run there for the first time. A round of what round 0's time dirtied
        // runs it once while the guest still runs, and leaves the last round less to send (lab,
        // idle 256 MiB: the last round took 250-300 ms for 1.4 MB when it was the first).
        const shrinking = dirtyBytes > SHRINK_FLOOR && dirtyBytes <= SHRINK_FACTOR * previousDirty && round < MAX_SHRINK_ROUNDS;
        previousDirty = dirtyBytes;
        const converged = round >= MIN_ROUNDS_BEFORE_SWITCHOVER && this.progress.expectedDowntimeMs <= maxDowntime && !shrinking;
        if (converged || (this.req.maxRounds !== undefined && round >= this.req.maxRounds)) {
          // The guest still runs: wait until the destination has read everything sent so far, so
          // the pause does not begin behind megabytes of earlier rounds in the socket buffers.
          // What the guest writes meanwhile is in the log the last round reads.
          const syncStart = performance.now();
          const seq = Buffer.alloc(4);
          seq.writeUInt32LE(round);
          startProfile();
          await send(sock, frame(FRAME.SYNC, seq));
          const synced = await reader.expect(FRAME.SYNCED);
          if (!synced.equals(seq)) throw streamError("SYNCED does not answer the SYNC sent");
          const syncMs = Math.round((performance.now() - syncStart) * 10) / 10;
          const s: SwitchoverTimes = { syncMs, vcpusStopped: 0, lastRoundSent: 0, lastRoundBytes: 0, stateCaptured: 0, stateSent: 0, stateBytes: 0, ready: 0, goSent: 0, running: 0 };
          const stoppedAt = performance.now();
          const at = (): number => Math.round((performance.now() - stoppedAt) * 10) / 10;
          // Shared disks: most of what the pause's flush would write goes now, while the guest runs.
          const sharedDisks = copy === undefined && this.config.devices.disks.length > 0;
          if (sharedDisks) await vm.deviceCommand({ command: "disks.flush" });
          // Stop the guest, then send what it wrote since the bitmap above was taken, and that bitmap's pages too.
          // The pause is this thread's: V8's background compiles and collections wait (kernel.ts).
          undoHelpers = niceHelperThreads(MAX_NICE);
          if (wasRunning) await vm.pause();
          paused = true;
          phase("paused");
          vm.setThrottle(0);
          this.progress.throttlePercent = 0;
          this.progress.phase = "stopped";
          s.vcpusStopped = at();
          // The state first: capturing it completes the disk requests in flight, whose data, used
          // elements and status bytes land in guest memory (marked by the device thread) and on
          // the disks; the last round below then carries them.
          const state = await vm.captureState(this.config, wasRunning ? "running" : "paused");
          s.stateCaptured = at();
          if (sharedDisks || copy?.needsFlush === true) {
            // Shared disks: the destination opens the same files and reads them (a qcow2 image's
            // tables too) once DONE is in; what this side wrote and caches must be there first,
            // and nothing is written here afterwards (the guest stays paused; QEMU inactivates
            // its block devices at this point). A failure fails the migration: the guest runs on here.
            // Copied qcow2 disks: the last pass reads the tables from storage (disk-copy.ts).
            await vm.deviceCommand({ command: "disks.flush" });
            s.disksFlushed = at();
          }
          phase("captured");
          const last = vm.takeDirtyLog();
          phase("lastLog");
          s.dirtyTaken = at();
          const before = this.progress.bytesSent;
          await this.sendDirty(sock, mergeBitmaps(dirty, last));
          s.lastRoundBytes = this.progress.bytesSent - before;
          s.lastRoundSent = at();
          if (copy !== undefined && copy.disks.length > 0) {
            // The capture completed every request in flight (each marked as it completed): the disks hold their last writes.
            const beforeDisks = this.progress.bytesSent;
            await copy.sendBlocks(diskDirty.map((b, i) => mergeSorted(b, copy.disks[i]!.dirty.take())), this.emitDisk(sock), () => this.check(), true);
            s.disksSent = at();
            s.lastDiskBytes = this.progress.bytesSent - beforeDisks;
          }
          const bytes = encodeState({ ...state, memory: streamedMemory(regions) });
          for (let off = 0; off < bytes.length; off += STATE_PIECE) await send(sock, frame(FRAME.STATE, bytes.subarray(off, Math.min(bytes.length, off + STATE_PIECE))));
          await send(sock, frame(FRAME.DONE));
          s.stateBytes = bytes.length;
          s.stateSent = at();
          this.progress.bytesRemaining = 0;
          await reader.expect(FRAME.READY);
          s.ready = at();
          this.check();
          // The point of no return: from here the guest runs there or nowhere.
          this.progress.phase = "committed";
          await send(sock, frame(FRAME.GO));
          s.goSent = at();
          let running: Buffer;
          try {
            running = await reader.expect(FRAME.RUNNING);
          } catch (e) {
            throw new TypevisorError("MIGRATION_UNKNOWN", `the destination took the VM but did not confirm it runs (${(e as Error).message}); the VM stays paused here: check the destination before resuming it`);
          }
          s.running = at();
          stopProfile("migration-source");
          // The guest runs there now; what is left here is teardown (guest memory unmapped, threads
          // ended). Where the destination shares this host's CPUs (a move within one host, the
          // one-CPU lab) or other VMs run here, that must not take CPU from guests: it goes last.
          // Every thread but this one now; this one once the caller has said the migration is
          // done (teardownLast), so that report does not wait behind the guests (in the lab it
          // came 357-381 ms after the destination's RUNNING: docs/migration.md).
          niceEveryThread(MAX_NICE, gettid());
          // The destination's own timings, when it sent them (only reported, never acted on).
          const d = destinationTimes(running);
          if (d !== undefined) s.destination = d;
          this.progress.switchover = s;
          this.progress.downtimeMs = Math.round(s.running);
          this.progress.phase = "completed";
          sock.end();
          // The VMM ends now: its device thread stops marking with it.
          this.copy = undefined;
          return this.progress;
        }
        // Auto-converge (QEMU's rule, see THROTTLE_*): a round that dirtied more than half of what the one before sent.
        const sentLastRound = this.progress.bytesSent - roundStartBytes;
        if (this.req.autoConverge !== false && dirtyBytes > THROTTLE_TRIGGER * sentLastRound && ++highDirty >= 2) {
          highDirty = 0;
          const pct = this.progress.throttlePercent === 0 ? THROTTLE_INITIAL : Math.min(THROTTLE_MAX, this.progress.throttlePercent + THROTTLE_STEP);
          this.progress.throttlePercent = pct;
          vm.setThrottle(pct);
        }
        roundStartBytes = this.progress.bytesSent;
        roundStart = now;
        await this.sendDiskBlocks(sock, diskDirty, false);
        await this.sendDirty(sock, dirty);
      }
    } catch (e) {
      const committed = this.progress.phase === "committed";
      this.progress.phase = this.cancelled && !committed ? "cancelled" : "failed";
      this.progress.error ??= (e as Error).message;
      this.sock?.destroy();
      try {
        vm.setThrottle(0);
        this.progress.throttlePercent = 0;
        vm.setVcpuNice();
        undoHelpers?.();
        vm.stopDirtyLog();
        this.stopDiskMarking();
      } catch {
        // the VM may be gone already
      }
      // Not committed: the guest goes on here as if nothing happened.
      const now: string = vm.vmState;
      if (!committed && paused && wasRunning && now === "paused") vm.resume();
      return this.progress;
    } finally {
      clearTimeout(timer);
      releaseCode();
      // TYPEVISOR_TRACE_PHASES=1: when each step began (bench/migrate relates them to the guest's peer).
      const marks = takePhases();
      if (marks !== undefined) process.stderr.write(`typevisor: source phases ${marks}\n`);
    }
  }

  /** "disks": "copy": a DISK_DATA frame, counted and paced. */
  private readonly emitDisk = (sock: Socket) => async (disk: number, off: number, data: Buffer): Promise<void> => {
    await send(sock, frame(FRAME.DISK_DATA, diskHeader(disk, off), data));
    if (this.progress.disks !== undefined) this.progress.disks.bytesSent += data.length;
    this.progress.bytesRemaining = Math.max(0, this.progress.bytesRemaining - data.length);
    await this.pace(data.length);
  };

  /** Before a pass over copied qcow2 disks: the device thread's cached tables on storage (disk-copy.ts). */
  private async flushForCopy(): Promise<void> {
    if (this.copy?.needsFlush === true) await this.vm.deviceCommand({ command: "disks.flush" });
  }

  /** "disks": "copy": the blocks in `blocks`, after the flush the readers need. */
  private async sendDiskBlocks(sock: Socket, blocks: number[][], final: boolean): Promise<void> {
    if (this.copy === undefined || blocks.every((b) => b.length === 0)) return;
    await this.flushForCopy();
    await this.copy.sendBlocks(blocks, this.emitDisk(sock), () => this.check(), final);
  }

  private stopDiskMarking(): void {
    if (this.copy === undefined) return;
    this.copy = undefined;
    this.vm.deviceCommand({ command: "disks.dirtyLog", args: { buffers: null } }).catch(() => undefined);
  }

  private connect(): Promise<Socket> {
    return openStream(this.req.to, { ...(this.req.tls !== undefined ? { tls: this.req.tls } : {}), ...(this.req.plainTcp === true ? { plainTcp: true } : {}) }, (s) => (this.sock = s));
  }

  /** Round 0: every page that holds something (the destination's memory starts as zeros). */
  private async sendAll(sock: Socket): Promise<void> {
    const pagemap = openSync("/proc/self/pagemap", "r");
    try {
      const sources = this.vm.memoryRegionSources;
      const runs: { gpa: number; bytes: Uint8Array }[] = [];
      for (const [i, r] of this.vm.memory.hostRegions.entries()) {
        forEachDataRun(pagemap, r, sources[i], (offset, bytes) => runs.push({ gpa: r.guestPhysAddr + offset, bytes }), (gpa, len) => this.vm.memory.trySlice(gpa, len));
        // Sent region by region: the views stay valid (the mapping does) and the page list stays small.
        for (const run of runs.splice(0)) {
          for (let off = 0; off < run.bytes.length; off += BATCH_PAGES * PAGE) {
            this.check();
            const part = run.bytes.subarray(off, Math.min(run.bytes.length, off + BATCH_PAGES * PAGE));
            await send(sock, frame(FRAME.PAGES, pagesHeader(run.gpa + off), part));
            await this.pace(part.length);
          }
        }
        this.progress.bytesRemaining = Math.max(0, this.progress.bytesRemaining - r.size);
      }
    } finally {
      closeSync(pagemap);
    }
  }

  /**
   * The pages set in `bitmaps` (one per slot), a PAGE_SET frame per window of SET_PAGES pages
   * that has any: which of them carry bytes (copied into the frame) and which became zero,
   * written by PageSetWriter in writes of about a MiB.
   */
  private async sendDirty(sock: Socket, bitmaps: Uint8Array[]): Promise<void> {
    const out = new PageSetWriter(sock);
    const memory = this.vm.memory;
    for (const [slot, r] of memory.hostRegions.entries()) {
      const bm = bitmaps[slot]!;
      const pages = r.size / PAGE;
      for (let w = 0; w < pages; w += SET_PAGES) {
        const n = Math.min(SET_PAGES, pages - w);
        // A clean window costs a look at its bitmap bytes: most of a big guest's bitmap is zeros.
        let any = false;
        for (let b = w >> 3, end = (w + n + 7) >> 3; b < end && !any; b++) any = bm[b] !== 0;
        if (!any) continue;
        this.check();
        // The VM's own views (memory.ts ExistingViews: a new view of all of RAM per round started
        // a full collection each time); a window is 1 MiB, inside one view's overlap.
        const gpa = r.guestPhysAddr + w * PAGE;
        await out.window(gpa, memory.slice(gpa, n * PAGE), bm, w >> 3, n);
        await this.pace(out.dataPages * PAGE);
        this.progress.bytesRemaining = Math.max(0, this.progress.bytesRemaining - (out.dataPages + out.zeroPages) * PAGE);
      }
    }
    await out.flush();
  }

}


function countBits(bitmaps: readonly Uint8Array[]): number {
  let n = 0;
  for (const bm of bitmaps) for (const b of bm) if (b !== 0) for (let v = b; v !== 0; v &= v - 1) n++;
  return n;
}

/** A copy of `a` with `b`'s bits added (the bitmaps of one slot each). */
function mergeBitmaps(a: readonly Uint8Array[], b: readonly Uint8Array[]): Uint8Array[] {
  return a.map((x, i) => {
    const out = Uint8Array.from(x);
    const y = b[i]!;
    for (let j = 0; j < out.length; j++) out[j]! |= y[j]!;
    return out;
  });
}

/** The union of two ascending lists of block numbers, ascending, without repeats. */
function mergeSorted(a: readonly number[], b: readonly number[]): number[] {
  const out: number[] = [];
  let i = 0;
  let j = 0;
  while (i < a.length || j < b.length) {
    const v = j >= b.length || (i < a.length && a[i]! <= b[j]!) ? a[i++]! : b[j++]!;
    if (out.length === 0 || out[out.length - 1] !== v) out.push(v);
  }
  return out;
}
