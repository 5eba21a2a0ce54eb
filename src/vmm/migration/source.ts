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
import { closeSync, openSync } from "node:fs";
import type { Socket } from "node:net";
import { TypevisorError } from "../../errors.js";
import { forEachDataRun, isZeroPage } from "../snapshot/memory.js";
import { encodeState, type SnapshotConfig } from "../snapshot/state.js";
import * as libc from "../../sys/libc.js";
import type { Vm } from "../vm.js";
import { FRAME, FrameReader, frame, hello, jsonFrame, MAX_FRAME, PAGE, pagesHeader, send, zerosPayload } from "./protocol.js";
import { openStream, parseEndpoint, type StreamTls } from "./transport.js";

export { parseEndpoint };

export interface MigrateRequest {
  /** "tcp:HOST:PORT" or "unix:PATH". */
  to: string;
  /** Pause-to-resume target: the last round is sent when it fits this at the measured bandwidth. */
  maxDowntimeMs?: number;
  /** Give up pre-copy rounds after this many and send the rest paused. */
  maxRounds?: number;
  /** The whole migration must finish within this (else it is cancelled and the VM runs on here). */
  timeoutMs?: number;
  /** TLS with mutual authentication (transport.ts); without it TCP needs `plainTcp`. */
  tls?: StreamTls;
  plainTcp?: boolean;
}

export type MigrationPhase = "connecting" | "precopy" | "stopped" | "committed" | "completed" | "failed" | "cancelled";

export interface MigrationProgress {
  phase: MigrationPhase;
  round: number;
  bytesSent: number;
  /** Bytes found dirty in the last round. */
  dirtyBytes: number;
  /** Bytes per second measured over the pre-copy so far. */
  bandwidth: number;
  /** Expected pause at the measured bandwidth for what is dirty now. */
  expectedDowntimeMs: number;
  /** The VM's pause, from pause to the destination's RUNNING (set once known). */
  downtimeMs?: number;
  error?: string;
  startedAt: string;
}

const DEFAULT_DOWNTIME_MS = 300;
const DEFAULT_ROUNDS = 30;
const DEFAULT_TIMEOUT_MS = 600_000;
/** Pages per PAGES frame. */
const BATCH_PAGES = (MAX_FRAME - 64) / PAGE;

export class OutgoingMigration {
  readonly progress: MigrationProgress = { phase: "connecting", round: 0, bytesSent: 0, dirtyBytes: 0, bandwidth: 0, expectedDowntimeMs: 0, startedAt: new Date().toISOString() };
  private sock: Socket | undefined;
  private cancelled = false;
  /** Resolves when the migration ended: completed (the caller then ends this VMM) or not (the VM runs on here). */
  readonly done: Promise<MigrationProgress>;

  constructor(private readonly vm: Vm, private readonly config: SnapshotConfig, private readonly req: MigrateRequest) {
    this.done = this.run();
  }

  /** Stop a migration that has not committed; the VM runs on here. */
  cancel(): boolean {
    if (this.progress.phase === "committed" || this.progress.phase === "completed") return false;
    this.cancelled = true;
    this.sock?.destroy();
    return true;
  }

  private check(): void {
    if (this.cancelled) throw new TypevisorError("MIGRATION_CANCELLED", "cancelled");
  }

  private async run(): Promise<MigrationProgress> {
    const vm = this.vm;
    const wasRunning = vm.vmState === "running";
    const timer = setTimeout(() => {
      this.progress.error = `did not finish within ${this.req.timeoutMs ?? DEFAULT_TIMEOUT_MS} ms`;
      this.cancel();
    }, this.req.timeoutMs ?? DEFAULT_TIMEOUT_MS);
    let paused = false;
    try {
      const sock = await this.connect();
      const reader = new FrameReader(sock);
      const regions = vm.memory.hostRegions;
      await send(sock, jsonFrame(FRAME.HELLO, hello(this.config, regions.map((r) => ({ guestPhysAddr: r.guestPhysAddr, size: r.size })))));
      await vm.startDirtyLog();
      // Anything written from here on is in the log: round 0 may send a page that changes again; the next round resends it.
      vm.takeDirtyLog();
      this.progress.phase = "precopy";
      const t0 = performance.now();
      await this.sendAll(sock);
      const maxDowntime = this.req.maxDowntimeMs ?? DEFAULT_DOWNTIME_MS;
      for (let round = 1; ; round++) {
        this.check();
        this.progress.round = round;
        // A copy: the next takeDirtyLog() reuses the same bitmaps.
        const dirty = vm.takeDirtyLog().map((b) => Uint8Array.from(b));
        const pages = countBits(dirty);
        this.progress.dirtyBytes = pages * PAGE;
        const secs = (performance.now() - t0) / 1000;
        this.progress.bandwidth = secs > 0 ? Math.round(this.progress.bytesSent / secs) : 0;
        this.progress.expectedDowntimeMs = this.progress.bandwidth > 0 ? Math.round((pages * PAGE * 1000) / this.progress.bandwidth) : 0;
        if (this.progress.expectedDowntimeMs <= maxDowntime || round >= (this.req.maxRounds ?? DEFAULT_ROUNDS)) {
          // Stop the guest, then send what it wrote since the bitmap above was taken, and that bitmap's pages too.
          if (wasRunning) await vm.pause();
          paused = true;
          this.progress.phase = "stopped";
          const stoppedAt = performance.now();
          const last = vm.takeDirtyLog();
          await this.sendDirty(sock, mergeBitmaps(dirty, last));
          const state = await vm.captureState(this.config, wasRunning ? "running" : "paused");
          const bytes = encodeState({ ...state, memory: { file: "memory", bytes: regions.reduce((n, r) => n + r.size, 0), regions: layoutOf(regions) } });
          for (let off = 0; off < bytes.length; off += MAX_FRAME - 64) await send(sock, frame(FRAME.STATE, bytes.subarray(off, Math.min(bytes.length, off + MAX_FRAME - 64))));
          await send(sock, frame(FRAME.DONE));
          await reader.expect(FRAME.READY);
          this.check();
          // The point of no return: from here the guest runs there or nowhere.
          this.progress.phase = "committed";
          await send(sock, frame(FRAME.GO));
          try {
            await reader.expect(FRAME.RUNNING);
          } catch (e) {
            throw new TypevisorError("MIGRATION_UNKNOWN", `the destination took the VM but did not confirm it runs (${(e as Error).message}); the VM stays paused here: check the destination before resuming it`);
          }
          this.progress.downtimeMs = Math.round(performance.now() - stoppedAt);
          this.progress.phase = "completed";
          sock.end();
          return this.progress;
        }
        await this.sendDirty(sock, dirty);
      }
    } catch (e) {
      const committed = this.progress.phase === "committed";
      this.progress.phase = this.cancelled && !committed ? "cancelled" : "failed";
      this.progress.error ??= (e as Error).message;
      this.sock?.destroy();
      try {
        vm.stopDirtyLog();
      } catch {
        // the VM may be gone already
      }
      // Not committed: the guest goes on here as if nothing happened.
      const now: string = vm.vmState;
      if (!committed && paused && wasRunning && now === "paused") vm.resume();
      return this.progress;
    } finally {
      clearTimeout(timer);
    }
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
        forEachDataRun(pagemap, r, sources[i], (offset, bytes) => runs.push({ gpa: r.guestPhysAddr + offset, bytes }));
        // Sent region by region: the views stay valid (the mapping does) and the page list stays small.
        for (const run of runs.splice(0)) {
          for (let off = 0; off < run.bytes.length; off += BATCH_PAGES * PAGE) {
            this.check();
            const part = run.bytes.subarray(off, Math.min(run.bytes.length, off + BATCH_PAGES * PAGE));
            await send(sock, frame(FRAME.PAGES, pagesHeader(run.gpa + off), part));
            this.progress.bytesSent += part.length;
          }
        }
      }
    } finally {
      closeSync(pagemap);
    }
  }

  /** The pages set in `bitmaps` (one per slot): runs of non-zero pages as PAGES, zero pages as ZEROS. */
  private async sendDirty(sock: Socket, bitmaps: Uint8Array[]): Promise<void> {
    for (const [slot, r] of this.vm.memory.hostRegions.entries()) {
      const bm = bitmaps[slot]!;
      const pages = r.size / PAGE;
      // Safe: a view of the region's own mapping, which stays mapped while the VM exists.
      const mem = new Uint8Array(libc.view(libc.pointerAt(BigInt(r.hostAddress)), r.size));
      let p = 0;
      while (p < pages) {
        if ((bm[p >> 3]! & (1 << (p & 7))) === 0) {
          p++;
          continue;
        }
        const zero = isZeroPage(mem, p * PAGE);
        let q = p + 1;
        while (q < pages && q - p < BATCH_PAGES && (bm[q >> 3]! & (1 << (q & 7))) !== 0 && isZeroPage(mem, q * PAGE) === zero) q++;
        this.check();
        if (zero) await send(sock, frame(FRAME.ZEROS, zerosPayload(r.guestPhysAddr + p * PAGE, q - p)));
        else {
          const part = mem.subarray(p * PAGE, q * PAGE);
          await send(sock, frame(FRAME.PAGES, pagesHeader(r.guestPhysAddr + p * PAGE), part));
          this.progress.bytesSent += part.length;
        }
        p = q;
      }
    }
  }
}

function layoutOf(regions: readonly { guestPhysAddr: number; size: number }[]): { guestPhysAddr: number; size: number; fileOffset: number }[] {
  let off = 0;
  return regions.map((r) => {
    const out = { guestPhysAddr: r.guestPhysAddr, size: r.size, fileOffset: off };
    off += r.size;
    return out;
  });
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
