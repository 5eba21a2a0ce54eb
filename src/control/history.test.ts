import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { HOST_SCOPE, MAX_BUCKETS_PER_SCOPE, MAX_POINTS, MetricsHistory, RateTracker, RESOLUTIONS } from "./history.js";
import { Store } from "./store.js";

function setup(): { store: Store; h: MetricsHistory; clock: { ms: number } } {
  const store = new Store(join(mkdtempSync(join(tmpdir(), "tvh-")), "t.db"));
  // a year of samples in one test: durability is not what is tested here
  store.db.pragma("synchronous = OFF");
  const clock = { ms: Date.UTC(2026, 0, 1) };
  return { store, h: new MetricsHistory(store.db, () => clock.ms), clock };
}

describe("metrics history", () => {
  it("averages the samples of a bucket (sum and count), per resolution", () => {
    const { h, clock } = setup();
    const t0 = clock.ms;
    for (const [i, cpu] of [10, 20, 60].entries()) {
      clock.ms = t0 + i * 3000; // 0, 3, 6 s: one 10 s bucket
      h.record([{ scope: "vm1", sample: { cpuPercent: cpu, memoryBytes: 1000 * (i + 1), io: { diskReadBps: 100, diskWriteBps: 0, netRxBps: 3, netTxBps: 1 }, state: i === 2 ? "paused" : "running" } }]);
    }
    clock.ms = t0 + 12_000; // the next 10 s bucket, same 5 min one; the counters were not readable
    h.record([{ scope: "vm1", sample: { cpuPercent: 90, memoryBytes: 8000, state: "running" } }]);
    const fine = h.query("vm1", { from: t0, step: 10 });
    expect(fine.points).toEqual([
      { t: new Date(t0).toISOString(), samples: 3, cpuPercent: 30, memoryBytes: 2000, diskReadBps: 100, diskWriteBps: 0, netRxBps: 3, netTxBps: 1, state: "paused" },
      { t: new Date(t0 + 10_000).toISOString(), samples: 1, cpuPercent: 90, memoryBytes: 8000, state: "running" },
    ]);
    const coarse = h.query("vm1", { from: t0, step: 300 });
    expect(coarse.points).toHaveLength(1);
    expect(coarse.points[0]).toMatchObject({ samples: 4, cpuPercent: 45, memoryBytes: 3500, diskReadBps: 100 });
    // a state-only sample (no VMM) counts in no average
    clock.ms = t0 + 14_000;
    h.record([{ scope: "vm1", sample: { state: "stopped" } }]);
    expect(h.query("vm1", { from: t0, step: 10 }).points[1]).toMatchObject({ samples: 1, cpuPercent: 90, state: "stopped" });
    expect(h.query(HOST_SCOPE, { from: t0 }).points).toEqual([]);
  });

  it("stays bounded: a year of samples keeps at most retention/step + 1 buckets per resolution", () => {
    const { store, h, clock } = setup();
    const t0 = clock.ms;
    const year = 365 * 86_400_000;
    // every 5 min for the year, then every 10 s for its last two days: each resolution full
    const sample = { cpuPercent: 5, memoryBytes: 1, state: "running" };
    for (clock.ms = t0; clock.ms < t0 + year - 2 * 86_400_000; clock.ms += 300_000) h.record([{ scope: "a", sample }]);
    for (; clock.ms < t0 + year; clock.ms += 10_000) h.record([{ scope: "a", sample }]);
    const rows = h.rows();
    expect(MAX_BUCKETS_PER_SCOPE).toBe(8641 + 8641 + 8761);
    // pruning runs each minute: up to 6 extra 10 s buckets, 1 of the others
    expect(rows).toBeLessThanOrEqual(MAX_BUCKETS_PER_SCOPE + 6 + 1 + 1);
    expect(rows).toBeGreaterThan(MAX_BUCKETS_PER_SCOPE - 20);
    for (const r of RESOLUTIONS) {
      const n = (store.db.prepare("SELECT count(*) AS n FROM metrics WHERE step = ?").get(r.step) as { n: number }).n;
      expect(n).toBeLessThanOrEqual(r.keep / r.step + 1 + (r.step === 10 ? 6 : 1));
      expect(n).toBeGreaterThan(r.keep / r.step - 10);
    }
    // the oldest hour bucket kept is within a year of now
    const oldest = (store.db.prepare("SELECT min(bucket) AS b FROM metrics WHERE step = 3600").get() as { b: number }).b;
    expect(oldest * 1000).toBeGreaterThanOrEqual(clock.ms - 365 * 86_400_000 - 3600_000 - 60_000);
    h.forget("a");
    expect(h.rows()).toBe(0);
  }, 120_000);

  it("bounds the points per answer: an explicit step too fine is refused, none chooses one", () => {
    const { h, clock } = setup();
    const day = 86_400_000;
    expect(() => h.query("a", { from: clock.ms - day, to: clock.ms, step: 10 })).toThrow(expect.objectContaining({ code: "INVALID_REQUEST" }));
    expect(() => h.query("a", { from: clock.ms, to: clock.ms - 1 })).toThrow(expect.objectContaining({ code: "INVALID_REQUEST" }));
    expect(() => h.query("a", { step: 60 })).toThrow(expect.objectContaining({ code: "INVALID_REQUEST" }));
    expect(h.query("a", { from: clock.ms - 3600_000 }).step).toBe(10);
    expect(h.query("a", { from: clock.ms - day }).step).toBe(300);
    expect(h.query("a", { from: clock.ms - 30 * day }).step).toBe(3600);
    // older than 10 s buckets are kept: 5 min, even for a short range
    expect(h.query("a", { from: clock.ms - 2 * day, to: clock.ms - 2 * day + 600_000 }).step).toBe(300);
    const year = h.query("a", { from: clock.ms - 365 * day });
    expect(year.step).toBe(3600);
    expect((Date.parse(year.to) - Date.parse(year.from)) / 3600_000).toBeLessThanOrEqual(MAX_POINTS);
  });
});

describe("rates from counters", () => {
  it("a counter going backwards is a reset (a VMM restart), never a negative rate", () => {
    const r = new RateTracker();
    expect(r.rate("k", 1000, 0)).toBeUndefined();
    expect(r.rate("k", 3000, 2000)).toBe(1000);
    expect(r.rate("k", 500, 3000)).toBe(500); // restarted: 500 bytes since
    expect(r.rate("k", 700, 4000)).toBe(200);
    expect(r.rate("k", 700, 4000)).toBeUndefined(); // no time passed
    r.forget("k");
    expect(r.rate("k", 900, 5000)).toBeUndefined();
  });
});
