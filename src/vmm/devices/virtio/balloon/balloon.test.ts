import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { isTypevisorError } from "../../../../errors.js";
import type { MemoryRegionSpec } from "../../../memory/guest-memory.js";
import { GuestMemory } from "../../../memory/guest-memory.js";
import type { ActivateContext } from "../device.js";
import { featureBit, hasFeature, VIRTIO_F, VIRTIO_ID } from "../device.js";
import type { DriverBuf } from "../queue/driver.js";
import { QueueDriver } from "../queue/driver.js";
import { fuzzCase, runFuzzCase, FUZZ_MEM } from "../queue/test-fuzz.js";
import type { BalloonDeviceOptions } from "./balloon.js";
import { BalloonDevice, DEFLATEQ, INFLATEQ, MAX_PFNS_PER_BUFFER, MAX_STAT_ENTRIES, STATSQ, VIRTIO_BALLOON_F } from "./balloon.js";

/*
 * Guest RAM for these tests: two regions adjacent in guest-physical space but not in the host
 * backing (a run of PFNs must not be discarded across them as one range), a hole, then a
 * third region.
 */
const MiB = 1 << 20;
const LAYOUT: MemoryRegionSpec[] = [
  { guestPhysAddr: 0, size: MiB, hostOffset: 0 },
  { guestPhysAddr: MiB, size: MiB, hostOffset: 2 * MiB },
  { guestPhysAddr: 4 * MiB, size: MiB / 2, hostOffset: MiB },
];
const RAM_PAGES = (2 * MiB + MiB / 2) / 4096;
const QSIZE = 8;
const QBASE = [0x0, 0x1000, 0x2000];
const DATA = 0x10000;
const ALL = featureBit(VIRTIO_F.VERSION_1) | featureBit(VIRTIO_BALLOON_F.STATS_VQ) | featureBit(VIRTIO_BALLOON_F.DEFLATE_ON_OOM);

interface Rig {
  dev: BalloonDevice;
  mem: GuestMemory;
  drv: QueueDriver[];
  ctx: ActivateContext;
  discards: [number, number][];
  interrupts: number[];
  configInterrupts: number;
  resets: string[];
  clock: { t: number };
}

function rig(opts: Partial<BalloonDeviceOptions> = {}, features = ALL, queues = 3): Rig {
  const mem = new GuestMemory(new ArrayBuffer(3 * MiB), LAYOUT);
  const drv = QBASE.slice(0, queues).map((b) => new QueueDriver(mem, QSIZE, b));
  const discards: [number, number][] = [];
  const clock = { t: 1_000_000 };
  const r: Rig = {
    dev: new BalloonDevice({ discard: (gpa, len) => discards.push([gpa, len]), maxPages: RAM_PAGES, now: () => clock.t, ...opts }),
    mem,
    drv,
    discards,
    interrupts: [],
    configInterrupts: 0,
    resets: [],
    clock,
    ctx: undefined as unknown as ActivateContext,
  };
  r.ctx = {
    mem,
    queues: drv.map((d) => d.config),
    features: features & r.dev.features,
    interruptQueue: (q) => r.interrupts.push(q),
    interruptConfig: () => r.configInterrupts++,
    needsReset: (m) => r.resets.push(m),
  };
  return r;
}

function pfnBytes(pfns: readonly number[]): Uint8Array {
  const b = new Uint8Array(4 * pfns.length);
  const dv = new DataView(b.buffer);
  pfns.forEach((p, i) => dv.setUint32(4 * i, p >>> 0, true));
  return b;
}

function statBytes(entries: readonly [number, bigint][]): Uint8Array {
  const b = new Uint8Array(10 * entries.length);
  const dv = new DataView(b.buffer);
  entries.forEach(([tag, val], i) => {
    dv.setUint16(10 * i, tag, true);
    dv.setBigUint64(10 * i + 2, val, true);
  });
  return b;
}

/** Put `data` at `addr` and post it on queue `q` as one readable buffer (or split at `cuts`). */
function post(r: Rig, q: number, addr: number, data: Uint8Array, cuts: number[] = []): number {
  r.mem.write(addr, data);
  const bufs: DriverBuf[] = [];
  let from = 0;
  for (const c of [...cuts, data.length]) {
    bufs.push({ addr: addr + from, len: c - from });
    from = c;
  }
  const head = r.drv[q]!.addChain(bufs);
  r.drv[q]!.publish(head);
  return head;
}

// A Linux guest's first report (update_balloon_stats): sizes in bytes, events as counts.
const LINUX_STATS: [number, bigint][] = [
  [0, 0n],
  [1, 0n],
  [2, 312n],
  [3, 48_211n],
  [4, 1_690_812_416n],
  [5, 2_061_631_488n],
  [6, 1_802_440_704n],
  [7, 121_470_976n],
  [8, 0n],
  [9, 0n],
];

describe("BalloonDevice", () => {
  it("is device type 5 with inflate, deflate and stats queues and an 8-byte config", () => {
    const dev = new BalloonDevice({ discard: () => undefined, maxPages: 1000 });
    expect(dev.deviceType).toBe(VIRTIO_ID.BALLOON);
    expect(dev.queueMaxSizes).toEqual([128, 128, 128]);
    expect(dev.configSize).toBe(8);
    expect(hasFeature(dev.features, VIRTIO_F.VERSION_1)).toBe(true);
    expect(hasFeature(dev.features, VIRTIO_BALLOON_F.STATS_VQ)).toBe(true);
    expect(hasFeature(dev.features, VIRTIO_BALLOON_F.MUST_TELL_HOST)).toBe(false);
    expect(hasFeature(dev.features, VIRTIO_BALLOON_F.DEFLATE_ON_OOM)).toBe(false);
    expect(hasFeature(new BalloonDevice({ discard: () => undefined, maxPages: 1, deflateOnOom: true }).features, VIRTIO_BALLOON_F.DEFLATE_ON_OOM)).toBe(true);
    expect(() => new BalloonDevice({ discard: () => undefined, maxPages: -1 })).toThrow(/maxPages/);
    expect(() => new BalloonDevice({ discard: () => undefined, maxPages: 2 ** 32 })).toThrow(/maxPages/);
    expect(() => new BalloonDevice({ discard: () => undefined, maxPages: 1, queueSize: 3 })).toThrow(/power of 2/);
    expect(() => new BalloonDevice({ discard: () => undefined, maxPages: 1, statsPollSeconds: -1 })).toThrow(/statsPollSeconds/);
  });

  it("inflate: discards runs of consecutive PFNs in one call, never across regions, skips PFNs outside RAM", () => {
    const r = rig();
    r.dev.activate(r.ctx);
    const pfns = [0x20, 0x21, 0x22, 0x50, 0xff, 0x100, 0x101, 0x300, 0xffffffff, 0x400, 0x401, 0x480];
    // Split so one PFN straddles two descriptors.
    const head = post(r, INFLATEQ, DATA, pfnBytes(pfns), [6, 20]);
    r.dev.notify(INFLATEQ);
    expect(r.discards).toEqual([
      [0x20000, 3 * 4096],
      [0x50000, 4096],
      [0xff000, 4096],
      [0x100000, 2 * 4096],
      [0x400000, 2 * 4096],
    ]);
    expect(r.drv[INFLATEQ]!.takeUsed()).toEqual([{ id: head, len: 0 }]);
    expect(r.interrupts).toEqual([INFLATEQ]);
    // 0x300 is in the hole, 0xffffffff far beyond RAM, 0x480 just past the last region.
    expect(r.dev.counters()).toMatchObject({ inflatedPages: 9, invalidPfns: 3, ignoredPfns: 0 });
    expect(r.resets).toEqual([]);
  });

  it("inflate: a trailing partial PFN is ignored and discard failures are counted, not thrown", () => {
    const r = rig({
      discard: () => {
        throw new Error("madvise failed");
      },
    });
    r.dev.activate(r.ctx);
    const data = new Uint8Array(10);
    data.set(pfnBytes([1, 2]));
    post(r, INFLATEQ, DATA, data);
    expect(() => r.dev.notify(INFLATEQ)).not.toThrow();
    expect(r.drv[INFLATEQ]!.takeUsed()).toHaveLength(1);
    expect(r.dev.counters()).toMatchObject({ inflatedPages: 0, discardErrors: 1, ignoredPfns: 1 });
  });

  it("inflate: a buffer longer than MAX_PFNS_PER_BUFFER is read only up to the cap", () => {
    const r = rig();
    r.dev.activate(r.ctx);
    const pfns = Array.from({ length: MAX_PFNS_PER_BUFFER + 5 }, (_, i) => i % 256);
    post(r, INFLATEQ, 0x80000, pfnBytes(pfns));
    r.dev.notify(INFLATEQ);
    expect(r.dev.counters().ignoredPfns).toBe(5);
    expect(r.discards.reduce((n, [, len]) => n + len / 4096, 0)).toBe(MAX_PFNS_PER_BUFFER);
  });

  it("deflate: acknowledged with nothing discarded", () => {
    const r = rig();
    r.dev.activate(r.ctx);
    const head = post(r, DEFLATEQ, DATA, pfnBytes([0x20, 0x21, 0xffffffff]));
    r.dev.notify(DEFLATEQ);
    expect(r.drv[DEFLATEQ]!.takeUsed()).toEqual([{ id: head, len: 0 }]);
    expect(r.discards).toEqual([]);
    expect(r.dev.counters().deflatedPages).toBe(3);
  });

  it("setTarget updates num_pages and raises the config interrupt; the driver writes only actual", () => {
    const r = rig();
    r.dev.setTarget(100); // before DRIVER_OK: stored, nobody to notify
    expect(r.configInterrupts).toBe(0);
    r.dev.activate(r.ctx);
    expect(r.dev.readConfig(0, 4)).toBe(100n);
    r.dev.setTarget(RAM_PAGES);
    expect(r.configInterrupts).toBe(1);
    expect(r.dev.readConfig(0, 4)).toBe(BigInt(RAM_PAGES));
    r.dev.setTarget(RAM_PAGES); // unchanged: no interrupt
    expect(r.configInterrupts).toBe(1);
    for (const bad of [-1, RAM_PAGES + 1, 1.5, Number.NaN]) {
      let code = "";
      try {
        r.dev.setTarget(bad);
      } catch (e) {
        if (isTypevisorError(e)) code = e.code;
      }
      expect(code).toBe("BALLOON_TARGET");
    }

    r.dev.writeConfig(4, 4, 0x1234n); // virtio_cwrite_le(actual)
    expect(r.dev.actualPages()).toBe(0x1234);
    r.dev.writeConfig(0, 4, 7n); // num_pages is the device's
    expect(r.dev.targetPages()).toBe(RAM_PAGES);
    r.dev.writeConfig(5, 1, 0xabn);
    expect(r.dev.actualPages()).toBe(0xab34);
    r.dev.writeConfig(0, 8, 0x0000_0099_0000_0001n); // the actual half of a wide write lands
    expect(r.dev.actualPages()).toBe(0x99);
    expect(r.dev.readConfig(0, 8)).toBe((0x99n << 32n) | BigInt(RAM_PAGES));
    expect(r.dev.readConfig(4, 2)).toBe(0x99n);
    expect(r.dev.readConfig(8, 4)).toBe(0n);
  });

  it("stats: holds the driver's buffer, returns it on requestStats, and reads the refill", () => {
    const r = rig();
    r.dev.activate(r.ctx);
    expect(r.dev.stats()).toEqual({ updatedAt: 0, values: {} });
    // Linux posts its first report while probing (init_vqs) and kicks.
    const head = post(r, STATSQ, DATA, statBytes(LINUX_STATS));
    r.dev.notify(STATSQ);
    expect(r.drv[STATSQ]!.takeUsed()).toEqual([]); // held, not returned
    expect(r.dev.stats()).toEqual({
      updatedAt: 1_000_000,
      values: { SWAP_IN: 0, SWAP_OUT: 0, MAJFLT: 312, MINFLT: 48211, MEMFREE: 1690812416, MEMTOT: 2061631488, AVAIL: 1802440704, CACHES: 121470976, HTLB_PGALLOC: 0, HTLB_PGFAIL: 0 },
    });

    r.clock.t += 5000;
    expect(r.dev.requestStats()).toBe(true);
    expect(r.drv[STATSQ]!.takeUsed()).toEqual([{ id: head, len: 0 }]);
    expect(r.interrupts).toEqual([STATSQ]);
    expect(r.dev.requestStats()).toBe(false); // nothing held until the driver reposts

    // The driver's stats_request callback refills the same buffer and reposts it.
    const fresh = LINUX_STATS.map(([t, v]): [number, bigint] => [t, t === 4 ? 1_000_000_000n : v]);
    fresh.push([10, 2n]); // OOM_KILL (Linux 6.12+)
    r.clock.t += 20;
    post(r, STATSQ, DATA, statBytes(fresh));
    r.dev.notify(STATSQ);
    const s = r.dev.stats();
    expect(s.updatedAt).toBe(1_005_020);
    expect(s.values.MEMFREE).toBe(1_000_000_000);
    expect(s.values.OOM_KILL).toBe(2);
    expect(r.dev.requestStats()).toBe(true);
  });

  it("stats: odd lengths, unknown tags, huge and split buffers are parsed safely", () => {
    const r = rig();
    r.dev.activate(r.ctx);
    const b = new Uint8Array(25); // two whole entries and 5 stray bytes
    b.set(statBytes([
      [4, 4096n],
      [0xbeef, 1n],
    ]));
    post(r, STATSQ, DATA, b, [3, 13]);
    r.dev.notify(STATSQ);
    expect(r.dev.stats().values).toEqual({ MEMFREE: 4096 });
    expect(r.dev.counters().unknownStatTags).toBe(1);

    // A second buffer while one is held: the old one goes back, the new one is kept.
    const big = statBytes(Array.from({ length: 5000 }, (_, i): [number, bigint] => [i % 16, BigInt(i)]));
    post(r, STATSQ, 0x40000, big);
    r.dev.notify(STATSQ);
    expect(r.drv[STATSQ]!.takeUsed()).toHaveLength(1);
    // Only MAX_STAT_ENTRIES entries were read: the last value seen for tag 0 is from entry 48.
    expect(r.dev.stats().values.SWAP_IN).toBe(Math.floor((MAX_STAT_ENTRIES - 1) / 16) * 16);
    expect(r.dev.stats().values.MEMFREE).toBe(Math.floor((MAX_STAT_ENTRIES - 1 - 4) / 16) * 16 + 4);

    // Empty buffer: no values, but a report nonetheless.
    r.clock.t += 1;
    post(r, STATSQ, DATA, new Uint8Array(0));
    r.dev.notify(STATSQ);
    expect(r.dev.stats()).toEqual({ updatedAt: r.clock.t, values: {} });
    expect(r.resets).toEqual([]);
  });

  it("without STATS_VQ there is no stats queue", () => {
    const r = rig({}, featureBit(VIRTIO_F.VERSION_1), 3);
    r.dev.activate(r.ctx);
    post(r, STATSQ, DATA, statBytes(LINUX_STATS));
    r.dev.notify(STATSQ);
    expect(r.dev.stats().updatedAt).toBe(0);
    expect(r.dev.requestStats()).toBe(false);
    // inflate and deflate still work
    post(r, INFLATEQ, DATA, pfnBytes([3]));
    r.dev.notify(INFLATEQ);
    expect(r.discards).toEqual([[0x3000, 4096]]);
  });

  it("tick() requests stats every statsPollSeconds", () => {
    const r = rig({ statsPollSeconds: 2 });
    r.dev.activate(r.ctx);
    post(r, STATSQ, DATA, statBytes(LINUX_STATS));
    r.dev.notify(STATSQ);
    // The device thread's poll timeout: until the request is due, bounded by the interval.
    expect(r.dev.msUntilTick(r.clock.t + 500)).toBe(1500);
    expect(r.dev.msUntilTick(r.clock.t - 1e9)).toBe(2000); // a wall clock set back
    r.dev.tick(r.clock.t + 1999);
    expect(r.drv[STATSQ]!.takeUsed()).toEqual([]);
    expect(r.dev.msUntilTick(r.clock.t + 2000)).toBe(0);
    r.dev.tick(r.clock.t + 2000);
    expect(r.drv[STATSQ]!.takeUsed()).toHaveLength(1);
    // Nothing held: nothing to time (the guest's answer comes as a kick).
    expect(r.dev.msUntilTick(r.clock.t + 10000)).toBe(-1);
    r.dev.tick(r.clock.t + 10000);
    expect(r.drv[STATSQ]!.takeUsed()).toEqual([]);
    // Without polling, tick does nothing and nothing is timed.
    const q = rig();
    q.dev.activate(q.ctx);
    post(q, STATSQ, DATA, statBytes(LINUX_STATS));
    q.dev.notify(STATSQ);
    expect(q.dev.msUntilTick(q.clock.t)).toBe(-1);
    q.dev.tick(q.clock.t + 1e9);
    expect(q.drv[STATSQ]!.takeUsed()).toEqual([]);
  });

  it("reset keeps the target, empties actual and drops the held buffer; nothing runs before activation", () => {
    const r = rig();
    expect(() => r.dev.notify(INFLATEQ)).not.toThrow();
    expect(r.dev.requestStats()).toBe(false);
    r.dev.setTarget(50);
    r.dev.activate(r.ctx);
    r.dev.writeConfig(4, 4, 50n);
    post(r, STATSQ, DATA, statBytes(LINUX_STATS));
    r.dev.notify(STATSQ);
    r.dev.reset();
    expect(r.dev.targetPages()).toBe(50);
    expect(r.dev.actualPages()).toBe(0);
    expect(r.dev.requestStats()).toBe(false);
    expect(r.dev.save()).toMatchObject({ activated: false, numPages: 50, actual: 0, queues: [] });
  });

  it("save/restore: plain data; the held stats buffer is taken back after restore", () => {
    const r = rig();
    r.dev.activate(r.ctx);
    r.dev.setTarget(77);
    r.dev.writeConfig(4, 4, 60n);
    post(r, INFLATEQ, DATA, pfnBytes([1]));
    r.dev.notify(INFLATEQ);
    const head = post(r, STATSQ, 0x20000, statBytes(LINUX_STATS));
    r.dev.notify(STATSQ);
    const state = JSON.parse(JSON.stringify(r.dev.save())) as ReturnType<BalloonDevice["save"]>;
    expect(state).toMatchObject({ version: 1, activated: true, numPages: 77, actual: 60 });
    expect(state.queues[STATSQ]).toMatchObject({ nextAvail: 0, nextUsed: 0 });

    // A second device on the same guest memory continues where the first stopped.
    const dev2 = new BalloonDevice({ discard: () => undefined, maxPages: RAM_PAGES, now: () => 5 });
    dev2.restore(r.ctx, state);
    expect(dev2.targetPages()).toBe(77);
    expect(dev2.actualPages()).toBe(60);
    expect(dev2.stats().values.MEMTOT).toBe(2061631488);
    expect(dev2.requestStats()).toBe(true);
    expect(r.drv[STATSQ]!.takeUsed()).toEqual([{ id: head, len: 0 }]);
    expect(r.drv[INFLATEQ]!.takeUsed()).toHaveLength(1);

    expect(() => dev2.restore(r.ctx, { ...state, numPages: RAM_PAGES + 1 })).toThrow(/out of range/);
    expect(() => dev2.restore(r.ctx, { ...state, version: 2 as 1 })).toThrow(/version/);
  });

  it("hostile PFN arrays never throw and never discard outside guest RAM (property)", () => {
    const pfn = fc.oneof(
      { weight: 4, arbitrary: fc.integer({ min: 0, max: 0x4ff }) },
      { weight: 1, arbitrary: fc.constantFrom(0xff, 0x100, 0x1ff, 0x200, 0x3ff, 0x400, 0x47f, 0x480, 0xfffff, 0xffffffff) },
      { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffffffff }) },
    );
    fc.assert(
      fc.property(
        fc.array(pfn, { maxLength: 300 }),
        fc.integer({ min: 0, max: 3 }),
        fc.array(fc.integer({ min: 0, max: 1200 }), { maxLength: 4 }),
        fc.boolean(),
        (pfns, extra, rawCuts, deflate) => {
          const r = rig();
          r.dev.activate(r.ctx);
          const data = new Uint8Array(4 * pfns.length + extra);
          data.set(pfnBytes(pfns));
          data.fill(0xff, 4 * pfns.length);
          const cuts = [...new Set(rawCuts.filter((c) => c > 0 && c < data.length))].sort((a, b) => a - b);
          const q = deflate ? DEFLATEQ : INFLATEQ;
          const head = post(r, q, 0x40000, data, cuts);
          expect(() => r.dev.notify(q)).not.toThrow();
          expect(r.drv[q]!.takeUsed()).toEqual([{ id: head, len: 0 }]);
          expect(r.resets).toEqual([]);
          const discarded = new Set<number>();
          for (const [gpa, len] of r.discards) {
            expect(gpa % 4096).toBe(0);
            expect(len % 4096).toBe(0);
            expect(len).toBeGreaterThan(0);
            expect(r.mem.contains(gpa, len)).toBe(true);
            for (let a = gpa; a < gpa + len; a += 4096) discarded.add(a / 4096);
          }
          const valid = new Set(pfns.filter((p) => r.mem.contains(p * 4096, 4096)));
          expect(discarded).toEqual(deflate ? new Set() : valid);
          if (!deflate) expect(r.dev.counters().invalidPfns).toBe(pfns.filter((p) => !valid.has(p)).length);
        },
      ),
      { numRuns: 300 },
    );
  });

  it("hostile stats buffers never throw and keep at most MAX_STAT_ENTRIES known tags (property)", () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 2000 }), fc.array(fc.integer({ min: 0, max: 2000 }), { maxLength: 4 }), (data, rawCuts) => {
        const r = rig();
        r.dev.activate(r.ctx);
        const cuts = [...new Set(rawCuts.filter((c) => c > 0 && c < data.length))].sort((a, b) => a - b);
        post(r, STATSQ, 0x40000, data, cuts);
        expect(() => r.dev.notify(STATSQ)).not.toThrow();
        const s = r.dev.stats();
        expect(s.updatedAt).toBe(r.clock.t);
        expect(Object.keys(s.values).length).toBeLessThanOrEqual(16);
        for (const v of Object.values(s.values)) expect(Number.isFinite(v) && v >= 0).toBe(true);
        expect(r.dev.requestStats()).toBe(true);
        expect(r.resets).toEqual([]);
      }),
      { numRuns: 200 },
    );
  });

  it("on adversarial inflate rings: never throws, writes only the used ring, discards only in RAM (property)", () => {
    const good = (mem: GuestMemory, drv: QueueDriver) => {
      mem.write(0x3000, pfnBytes([2, 3]));
      const head = drv.addChain([{ addr: 0x3000, len: 8 }]);
      return { head, check: (len: number) => expect(len).toBe(0) };
    };
    fc.assert(
      fc.property(fuzzCase([0, 1, 2, 0xffffffff]), (c) => {
        const bad: [number, number][] = [];
        const dev = new BalloonDevice({
          maxPages: FUZZ_MEM / 4096,
          discard: (gpa, len) => {
            if (gpa < 0 || len <= 0 || gpa + len > FUZZ_MEM || gpa % 4096 !== 0 || len % 4096 !== 0) bad.push([gpa, len]);
          },
        });
        runFuzzCase(dev, c, good);
        expect(bad).toEqual([]);
      }),
      { numRuns: 200 },
    );
  });
});
