/**
 * Metrics history in the inventory (docs/control-plane.md, "Metrics history and alerts"): host and
 * per-VM usage in rolling resolutions, as Proxmox VE's RRD keeps them — 10 s buckets for a day,
 * 5 min for 30 days, 1 h for a year. Each sample is added to the bucket of every resolution it falls
 * in (a sum and a count per bucket: the average is sum/count, updated by one UPSERT, never by
 * reading back), and buckets older than their resolution's retention are deleted, so the table
 * holds at most retention/step + 1 buckets per resolution per VM, whatever the uptime.
 *
 * The clock is injected (tests simulate a year in seconds).
 */
import type Database from "better-sqlite3";
import { TypevisorError } from "../errors.js";

export interface Resolution {
  /** Bucket width, seconds. */
  step: number;
  /** How long its buckets are kept, seconds. */
  keep: number;
}

export const RESOLUTIONS: readonly Resolution[] = [
  { step: 10, keep: 86_400 },
  { step: 300, keep: 30 * 86_400 },
  { step: 3600, keep: 365 * 86_400 },
];

export const STEPS = RESOLUTIONS.map((r) => r.step) as readonly number[];

/** Points one answer may carry: enough for an hour at 10 s, a day at 5 min, a month at 1 h. */
export const MAX_POINTS = 2000;

/** Buckets one scope can hold at most: retention/step plus the bucket in progress, per resolution. */
export const MAX_BUCKETS_PER_SCOPE = RESOLUTIONS.reduce((a, r) => a + r.keep / r.step + 1, 0);

/** Pruning runs at most this often (clock seconds): a few extra 10 s buckets, not a DELETE per sample. */
const PRUNE_EVERY_S = 60;

/** The host's history is kept under this scope; a VM's under its id (names can be reused). */
export const HOST_SCOPE = "host";

/** One sample: gauges now, rates computed from counters (RateTracker), the VM's state. */
export interface MetricSample {
  cpuPercent?: number;
  memoryBytes?: number;
  /** Bytes per second; absent when the counters could not be read this time (a busy VMM). */
  io?: { diskReadBps: number; diskWriteBps: number; netRxBps: number; netTxBps: number };
  state?: string;
}

export interface HistoryPoint {
  /** The bucket's start. */
  t: string;
  /** Usage samples averaged in it (0: only the state is known, the VM had no VMM). */
  samples: number;
  cpuPercent?: number;
  memoryBytes?: number;
  diskReadBps?: number;
  diskWriteBps?: number;
  netRxBps?: number;
  netTxBps?: number;
  /** The last state seen in the bucket (VMs only). */
  state?: string;
}

interface RawBucket {
  bucket: number;
  n: number;
  cpu: number;
  mem: number;
  n_io: number;
  disk_r: number;
  disk_w: number;
  net_rx: number;
  net_tx: number;
  state: string | null;
}

export class MetricsHistory {
  private lastPrune = -Infinity;
  private readonly upsert: Database.Statement;

  constructor(
    private readonly db: Database.Database,
    private readonly now: () => number = Date.now,
  ) {
    this.upsert = db.prepare(`
      INSERT INTO metrics (scope, step, bucket, n, cpu, mem, n_io, disk_r, disk_w, net_rx, net_tx, state)
      VALUES (@scope, @step, @bucket, @n, @cpu, @mem, @nIo, @diskR, @diskW, @netRx, @netTx, @state)
      ON CONFLICT (scope, step, bucket) DO UPDATE SET
        n = n + excluded.n, cpu = cpu + excluded.cpu, mem = mem + excluded.mem,
        n_io = n_io + excluded.n_io, disk_r = disk_r + excluded.disk_r, disk_w = disk_w + excluded.disk_w,
        net_rx = net_rx + excluded.net_rx, net_tx = net_tx + excluded.net_tx,
        state = coalesce(excluded.state, state)`);
  }

  /** Adds one tick's samples (one transaction), then prunes if it is time. */
  record(samples: readonly { scope: string; sample: MetricSample }[]): void {
    const nowMs = this.now();
    const t = Math.floor(nowMs / 1000);
    this.db.transaction(() => {
      for (const { scope, sample: s } of samples) {
        const usage = s.cpuPercent !== undefined && s.memoryBytes !== undefined;
        for (const r of RESOLUTIONS) {
          this.upsert.run({
            scope,
            step: r.step,
            bucket: t - (t % r.step),
            n: usage ? 1 : 0,
            cpu: usage ? s.cpuPercent! : 0,
            mem: usage ? s.memoryBytes! : 0,
            nIo: s.io !== undefined ? 1 : 0,
            diskR: s.io?.diskReadBps ?? 0,
            diskW: s.io?.diskWriteBps ?? 0,
            netRx: s.io?.netRxBps ?? 0,
            netTx: s.io?.netTxBps ?? 0,
            state: s.state ?? null,
          });
        }
      }
      if (t - this.lastPrune >= PRUNE_EVERY_S) {
        this.lastPrune = t;
        const del = this.db.prepare("DELETE FROM metrics WHERE step = ? AND bucket < ?");
        for (const r of RESOLUTIONS) del.run(r.step, t - r.keep);
      }
    })();
  }

  /** A removed VM's history goes with it. */
  forget(scope: string): void {
    this.db.prepare("DELETE FROM metrics WHERE scope = ?").run(scope);
  }

  rows(): number {
    return (this.db.prepare("SELECT count(*) AS n FROM metrics").get() as { n: number }).n;
  }

  /**
   * The buckets of `scope` between `from` and `to` (ms). Without `step`: the finest resolution
   * that still holds `from` and answers in at most MAX_POINTS (the coarsest otherwise, with `from`
   * moved up so it does). An explicit `step` that would give more than MAX_POINTS is refused.
   * @throws TypevisorError INVALID_REQUEST
   */
  query(scope: string, opts: { from?: number; to?: number; step?: number }): { step: number; from: string; to: string; points: HistoryPoint[] } {
    const nowMs = this.now();
    const to = Math.min(opts.to ?? nowMs, nowMs);
    let from = opts.from ?? to - 3600_000;
    if (from > to) throw new TypevisorError("INVALID_REQUEST", `from (${new Date(from).toISOString()}) is after to (${new Date(to).toISOString()})`);
    let step: number;
    if (opts.step !== undefined) {
      if (!STEPS.includes(opts.step)) throw new TypevisorError("INVALID_REQUEST", `step must be one of ${STEPS.join(", ")} seconds (got ${opts.step})`);
      step = opts.step;
      if ((to - from) / 1000 / step > MAX_POINTS) {
        throw new TypevisorError("INVALID_REQUEST", `${Math.ceil((to - from) / 1000 / step)} points at step ${step} s: at most ${MAX_POINTS} per answer`, {
          hint: "a larger step, a shorter range, or no step (the daemon chooses)",
        });
      }
    } else {
      const fits = RESOLUTIONS.find((r) => from >= nowMs - r.keep * 1000 && (to - from) / 1000 / r.step <= MAX_POINTS);
      const coarsest = RESOLUTIONS[RESOLUTIONS.length - 1]!;
      step = (fits ?? coarsest).step;
      if (fits === undefined) from = Math.max(from, to - MAX_POINTS * coarsest.step * 1000);
    }
    const fromS = Math.floor(from / 1000);
    const rows = this.db
      .prepare("SELECT * FROM metrics WHERE scope = ? AND step = ? AND bucket >= ? AND bucket <= ? ORDER BY bucket LIMIT ?")
      .all(scope, step, fromS - (fromS % step), Math.floor(to / 1000), MAX_POINTS + 1) as RawBucket[];
    return { step, from: new Date(from).toISOString(), to: new Date(to).toISOString(), points: rows.map(pointOf) };
  }
}

function round(n: number, digits: number): number {
  const f = 10 ** digits;
  return Math.round(n * f) / f;
}

function pointOf(r: RawBucket): HistoryPoint {
  return {
    t: new Date(r.bucket * 1000).toISOString(),
    samples: r.n,
    ...(r.n > 0 ? { cpuPercent: round(r.cpu / r.n, 1), memoryBytes: Math.round(r.mem / r.n) } : {}),
    ...(r.n_io > 0
      ? { diskReadBps: Math.round(r.disk_r / r.n_io), diskWriteBps: Math.round(r.disk_w / r.n_io), netRxBps: Math.round(r.net_rx / r.n_io), netTxBps: Math.round(r.net_tx / r.n_io) }
      : {}),
    ...(r.state !== null ? { state: r.state } : {}),
  };
}

/**
 * Per-second rates from cumulative counters. A counter lower than the one before is a reset (the
 * VMM restarted and counts from 0 again): the increase is then the new value, as Prometheus's
 * rate() takes it, never a negative rate. The first value of a key gives no rate.
 */
export class RateTracker {
  private readonly prev = new Map<string, { atMs: number; value: number }>();

  rate(key: string, value: number, atMs: number): number | undefined {
    const p = this.prev.get(key);
    this.prev.set(key, { atMs, value });
    if (p === undefined || atMs <= p.atMs) return undefined;
    const increase = value >= p.value ? value - p.value : value;
    return increase / ((atMs - p.atMs) / 1000);
  }

  /** Forgets every key that starts with `prefix` (a VM removed or its VMM gone). */
  forget(prefix: string): void {
    for (const k of this.prev.keys()) if (k.startsWith(prefix)) this.prev.delete(k);
  }
}
