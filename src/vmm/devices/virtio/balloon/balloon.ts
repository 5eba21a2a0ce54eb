import { TypevisorError } from "../../../../errors.js";
import type { GuestMemory } from "../../../memory/guest-memory.js";
import { isU32 } from "../../../plain-checks.js";
import type { ActivateContext, VirtioDevice, VirtioDeviceInspect } from "../device.js";
import { featureBit, hasFeature, VIRTIO_F, VIRTIO_ID } from "../device.js";
import { readChain } from "../queue/chain.js";
import { activateQueues, inspectQueues, serviceQueue } from "../queue/runner.js";
import type { DescriptorChain, SplitQueue, SplitQueueState } from "../queue/split-queue.js";
import { QueueError } from "../queue/split-queue.js";

/** Device-specific feature bits (virtio 1.2 §5.5.3). MUST_TELL_HOST (0) is deliberately not offered. */
export const VIRTIO_BALLOON_F = { MUST_TELL_HOST: 0, STATS_VQ: 1, DEFLATE_ON_OOM: 2 } as const;

/** Queue numbers (virtio 1.2 §5.5.2). statsq exists only with STATS_VQ; we offer nothing after it. */
export const INFLATEQ = 0;
export const DEFLATEQ = 1;
export const STATSQ = 2;

/**
 * The balloon's unit is always 4 KiB, whatever the guest's page size (virtio 1.2 §5.5.6:
 * page frame numbers are addresses shifted right by 12, VIRTIO_BALLOON_PFN_SHIFT in Linux).
 */
export const BALLOON_PAGE_SIZE = 4096;

/** Config space (virtio 1.2 §5.5.4): le32 num_pages, le32 actual. Later fields need features we do not offer. */
export const BALLOON_CONFIG_SIZE = 8;
const CFG_NUM_PAGES = 0;
const CFG_ACTUAL = 4;

/**
 * Statistic tags (virtio 1.2 §5.5.6.3). 0-9 are in the spec; 10-15 are Linux extensions
 * (uapi virtio_balloon.h, Linux 6.12+) that recent guests send, so we name them too.
 */
export const BALLOON_STAT_TAGS: Readonly<Record<number, string>> = {
  0: "SWAP_IN",
  1: "SWAP_OUT",
  2: "MAJFLT",
  3: "MINFLT",
  4: "MEMFREE",
  5: "MEMTOT",
  6: "AVAIL",
  7: "CACHES",
  8: "HTLB_PGALLOC",
  9: "HTLB_PGFAIL",
  10: "OOM_KILL",
  11: "ALLOC_STALL",
  12: "ASYNC_SCAN",
  13: "DIRECT_SCAN",
  14: "ASYNC_RECLAIM",
  15: "DIRECT_RECLAIM",
};

/** One statistic is packed { le16 tag; le64 val } (virtio 1.2 §5.5.6.3). */
export const STAT_ENTRY_SIZE = 10;
/**
 * We read at most this many entries of a stats buffer: Linux sends one per tag it knows (16
 * today) and the buffer length is guest-controlled, so a huge one must not cost us a huge copy.
 */
export const MAX_STAT_ENTRIES = 64;
/**
 * PFNs taken from one inflate/deflate buffer. Linux sends at most 256 per buffer
 * (VIRTIO_BALLOON_ARRAY_PFNS_MAX); a guest posting a buffer over all of its RAM must not
 * stall the device thread. PFNs past the cap are acknowledged but not discarded (counted).
 */
export const MAX_PFNS_PER_BUFFER = 16384;

export type DiscardFn = (gpa: number, len: number) => void;

export interface BalloonDeviceOptions {
  /** Release host memory behind [gpa, gpa+len) (page aligned, inside guest RAM); see discard.ts. */
  discard: DiscardFn;
  /** Guest RAM in 4 KiB pages: the largest target setTarget accepts. */
  maxPages: number;
  /** Ask the guest for fresh statistics this often (through tick()); 0 or absent = only on requestStats(). */
  statsPollSeconds?: number;
  /** Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may take pages back under memory pressure (§5.5.6.1). */
  deflateOnOom?: boolean;
  /** Queue size the device allows (power of 2). Default 128. */
  queueSize?: number;
  /** Clock for stats().updatedAt and polling, in ms. Default Date.now. */
  now?: () => number;
}

export interface BalloonStats {
  /** When the guest last delivered statistics (ms, from `now`); 0 = never. */
  updatedAt: number;
  /** Tag name -> value as the guest reported it (bytes for sizes, counts for events). */
  values: Record<string, number>;
}

export interface BalloonCounters {
  /** 4 KiB pages handed to discard (inflate). */
  inflatedPages: number;
  /** 4 KiB page numbers the guest took back (deflate). */
  deflatedPages: number;
  /** Inflate PFNs outside guest RAM (skipped). */
  invalidPfns: number;
  /** PFNs past MAX_PFNS_PER_BUFFER or trailing bytes that are not a whole PFN (ignored). */
  ignoredPfns: number;
  /** discard calls that threw (the pages stay resident). */
  discardErrors: number;
  /** Statistics entries with a tag we do not know (ignored). */
  unknownStatTags: number;
}

export interface BalloonDeviceState {
  version: 1;
  features: string;
  activated: boolean;
  numPages: number;
  actual: number;
  stats: BalloonStats;
  /** The held stats buffer is not saved: statsq's nextAvail is rewound so restore pops it again. */
  queues: (SplitQueueState | null)[];
}

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/**
 * virtio-balloon (virtio 1.2 §5.5), the traditional balloon: the host sets a target
 * (num_pages), the guest driver takes that many pages away from its allocator and lists them
 * on the inflate queue; the host drops their backing (discard). Deflated pages need no work:
 * discarded anonymous memory refaults as zeros on the next access, and without MUST_TELL_HOST
 * the driver may reuse them at once (§5.5.6.1). With STATS_VQ the guest reports memory
 * statistics through one buffer the device holds and hands back when it wants fresh values.
 *
 * Everything from the guest is hostile: PFNs outside RAM are skipped and counted, stats
 * buffers of any shape are parsed without throwing, and nothing ever throws out of notify.
 */
export class BalloonDevice implements VirtioDevice {
  readonly deviceType = VIRTIO_ID.BALLOON;
  readonly queueMaxSizes: readonly number[];
  readonly features: bigint;
  readonly configSize = BALLOON_CONFIG_SIZE;

  private readonly discard: DiscardFn;
  /** Guest RAM in 4 KiB pages: the largest target (and, in a snapshot, num_pages) accepted. */
  readonly maxPages: number;
  private readonly pollMs: number;
  private readonly now: () => number;

  private ctx: ActivateContext | undefined;
  private queues: (SplitQueue | undefined)[] = [];
  private numPages = 0;
  private actual = 0;
  /** Head of the stats buffer the driver posted and we keep until we want a refresh (§5.5.6.3). */
  private heldStats: number | undefined;
  /** When the held buffer was last refilled or requested (ms), for statsPollSeconds. */
  private lastStatsAt = 0;
  private lastStats: BalloonStats = { updatedAt: 0, values: {} };
  private readonly count: BalloonCounters = { inflatedPages: 0, deflatedPages: 0, invalidPfns: 0, ignoredPfns: 0, discardErrors: 0, unknownStatTags: 0 };

  /** @throws TypevisorError BALLOON_OPTIONS */
  constructor(opts: BalloonDeviceOptions) {
    const size = opts.queueSize ?? 128;
    if (!isPowerOfTwo(size) || size > 32768) throw new TypevisorError("BALLOON_OPTIONS", `virtio-balloon queue size ${size} is not a power of 2 in 1..32768`);
    // num_pages is a le32 (§5.5.4), so a target can never exceed 2^32-1 pages (16 TiB).
    if (!isU32(opts.maxPages)) throw new TypevisorError("BALLOON_OPTIONS", `virtio-balloon maxPages ${opts.maxPages} is not an integer in 0..4294967295`);
    const poll = opts.statsPollSeconds ?? 0;
    if (!Number.isFinite(poll) || poll < 0 || poll > 86400) throw new TypevisorError("BALLOON_OPTIONS", `virtio-balloon statsPollSeconds ${poll} is not in 0..86400`);
    this.discard = opts.discard;
    this.maxPages = opts.maxPages;
    this.pollMs = poll * 1000;
    this.now = opts.now ?? Date.now;
    this.queueMaxSizes = [size, size, size];
    let f = featureBit(VIRTIO_F.VERSION_1) | featureBit(VIRTIO_F.INDIRECT_DESC) | featureBit(VIRTIO_F.EVENT_IDX) | featureBit(VIRTIO_BALLOON_F.STATS_VQ);
    if (opts.deflateOnOom === true) f |= featureBit(VIRTIO_BALLOON_F.DEFLATE_ON_OOM);
    this.features = f;
  }

  // --- host side -----------------------------------------------------------------------

  /**
   * Ask the guest to hold `pages` 4 KiB pages in its balloon. The device changes num_pages and
   * signals a configuration change (§5.5.6); the driver re-reads it and moves `actual`
   * towards it at its own pace.
   * @throws TypevisorError BALLOON_TARGET when `pages` is not an integer in 0..maxPages
   */
  setTarget(pages: number): void {
    if (!Number.isInteger(pages) || pages < 0 || pages > this.maxPages) {
      throw new TypevisorError("BALLOON_TARGET", `balloon target ${pages} pages is not an integer in 0..${this.maxPages} (guest RAM in 4 KiB pages)`);
    }
    if (pages === this.numPages) return;
    this.numPages = pages;
    // Before DRIVER_OK there is nobody to notify: Linux reads num_pages when it comes up.
    this.ctx?.interruptConfig();
  }

  /** The target last set (num_pages). */
  targetPages(): number {
    return this.numPages;
  }

  /** Pages the driver says it holds (`actual`, written by the driver; §5.5.4). Guest-reported, not verified. */
  actualPages(): number {
    return this.actual;
  }

  /**
   * Hand the held stats buffer back so the driver refills it (§5.5.6.3); fresh values arrive
   * later, when the driver kicks statsq, and show in stats(). False when there is no buffer to
   * return (STATS_VQ not negotiated, driver not up, or a refresh already requested).
   */
  requestStats(): boolean {
    const ctx = this.ctx;
    const q = this.queues[STATSQ];
    const head = this.heldStats;
    if (ctx === undefined || q === undefined || q.broken !== undefined || head === undefined) return false;
    this.heldStats = undefined;
    this.lastStatsAt = this.now();
    try {
      q.pushUsed(head, 0);
      if (q.needsInterrupt()) ctx.interruptQueue(STATSQ);
    } catch (e) {
      // The ring was validated at activation; memory that vanished under us fails the queue, not the VMM.
      ctx.needsReset(`queue ${STATSQ}: ${q.poison(new QueueError("VIRTQ_INTERNAL", e instanceof Error ? e.message : String(e))).message}`);
      return false;
    }
    return true;
  }

  /** The last statistics the guest delivered (a copy). */
  stats(): BalloonStats {
    return { updatedAt: this.lastStats.updatedAt, values: { ...this.lastStats.values } };
  }

  /** Inflate/deflate/validation counters since construction (a copy). */
  counters(): BalloonCounters {
    return { ...this.count };
  }

  /**
   * Call periodically (the device thread does, at least once a second): with statsPollSeconds
   * set, returns the stats buffer to the guest when the interval has passed.
   */
  tick(now: number = this.now()): void {
    if (this.pollMs === 0 || this.heldStats === undefined) return;
    if (now - this.lastStatsAt >= this.pollMs) this.requestStats();
  }

  /**
   * How long until tick() has work (ms, 0: now), or -1 while it has none to come: no polling, or
   * no buffer held to hand back (the guest's next one arrives as a kick, which wakes the device
   * thread anyway). So the device thread sleeps without a timeout under an idle balloon. At most
   * the poll interval, whatever the wall clock did meanwhile.
   */
  msUntilTick(now: number = this.now()): number {
    if (this.pollMs === 0 || this.heldStats === undefined || this.ctx === undefined || this.queues[STATSQ]?.broken !== undefined) return -1;
    return Math.min(this.pollMs, Math.max(0, this.lastStatsAt + this.pollMs - now));
  }

  // --- VirtioDevice ------------------------------------------------------------------------

  readConfig(offset: number, size: number): bigint {
    let v = 0n;
    for (let i = size - 1; i >= 0; i--) v = (v << 8n) | BigInt(this.configByte(offset + i));
    return v;
  }

  private configByte(at: number): number {
    if (at >= CFG_NUM_PAGES && at < CFG_NUM_PAGES + 4) return (this.numPages >>> (8 * (at - CFG_NUM_PAGES))) & 0xff;
    if (at >= CFG_ACTUAL && at < CFG_ACTUAL + 4) return (this.actual >>> (8 * (at - CFG_ACTUAL))) & 0xff;
    return 0;
  }

  /** Only `actual` is driver-writable (§5.5.4); bytes of a write that fall elsewhere are dropped. */
  writeConfig(offset: number, size: number, value: bigint): void {
    let a = this.actual;
    for (let i = 0; i < size; i++) {
      const at = offset + i;
      if (at < CFG_ACTUAL || at >= CFG_ACTUAL + 4) continue;
      const shift = 8 * (at - CFG_ACTUAL);
      const byte = Number((value >> BigInt(8 * i)) & 0xffn);
      a = ((a & ~(0xff << shift)) | (byte << shift)) >>> 0;
    }
    this.actual = a;
  }

  activate(ctx: ActivateContext): void {
    this.start(ctx);
  }

  restore(ctx: ActivateContext, state: BalloonDeviceState): void {
    if (state.version !== 1) throw new TypevisorError("SNAPSHOT_VERSION", `virtio-balloon state version ${String(state.version)} is not supported`);
    if (!isU32(state.numPages) || state.numPages > this.maxPages || !isU32(state.actual)) {
      throw new TypevisorError("SNAPSHOT_STATE", "virtio-balloon state has num_pages/actual out of range");
    }
    this.numPages = state.numPages;
    this.actual = state.actual;
    this.lastStats = { updatedAt: state.stats.updatedAt, values: { ...state.stats.values } };
    if (!state.activated) return;
    this.start(ctx, state.queues);
    // The stats buffer the guest posted before the snapshot was rewound into the avail ring by
    // save(); the driver will not kick again for it, so take it back now.
    this.receiveStats(ctx);
  }

  private start(ctx: ActivateContext, saved?: readonly (SplitQueueState | null)[]): void {
    this.ctx = ctx;
    this.heldStats = undefined;
    this.lastStatsAt = this.now();
    // statsq exists only when STATS_VQ is negotiated (§5.5.2); a driver that enabled queue 2
    // without it gets no stats service from us.
    const max = hasFeature(ctx.features, VIRTIO_BALLOON_F.STATS_VQ) ? this.queueMaxSizes : this.queueMaxSizes.slice(0, 2);
    this.queues = activateQueues(ctx, max, saved);
  }

  notify(q: number): void {
    const ctx = this.ctx;
    if (ctx === undefined) return;
    if (q === INFLATEQ) serviceQueue(ctx, q, this.queues[q], (chain) => this.inflate(ctx.mem, chain));
    else if (q === DEFLATEQ) serviceQueue(ctx, q, this.queues[q], (chain) => this.deflate(chain));
    else if (q === STATSQ) this.receiveStats(ctx);
  }

  /** Where the queues stand (GET /threads). */
  inspect(): VirtioDeviceInspect {
    return { queues: inspectQueues(this.queues, this.queueMaxSizes.length) };
  }

  reset(): void {
    this.ctx = undefined;
    this.queues = [];
    this.heldStats = undefined;
    // A new driver starts with an empty balloon; the host's target stands.
    this.actual = 0;
  }

  save(): BalloonDeviceState {
    return {
      version: 1,
      features: (this.ctx?.features ?? 0n).toString(16),
      activated: this.ctx !== undefined,
      numPages: this.numPages,
      actual: this.actual,
      stats: this.stats(),
      queues: this.queues.map((q, i) => {
        const st = q?.save() ?? null;
        // The held stats chain was the last one popped: rewinding makes restore pop it again.
        if (st !== null && i === STATSQ && this.heldStats !== undefined) st.nextAvail = (st.nextAvail - 1) & 0xffff;
        return st;
      }),
    };
  }

  // --- queues --------------------------------------------------------------------------------

  /**
   * One inflate buffer: an array of le32 PFNs (§5.5.6). Every page must lie in guest RAM (a
   * guest must not make us madvise host memory that is not its own); runs of consecutive
   * PFNs become one discard call. Discard happens before the chain is used, because Linux
   * waits for the used buffer before it considers the pages gone (tell_host).
   */
  private inflate(mem: GuestMemory, chain: DescriptorChain): number {
    const usable = Math.min(Math.floor(chain.totalRead / 4), MAX_PFNS_PER_BUFFER);
    this.count.ignoredPfns += Math.ceil(chain.totalRead / 4) - usable;
    const bytes = readChain(mem, chain.readable, 0, usable * 4);
    const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    let runStart = -1;
    let runEnd = -1; // exclusive, in PFNs
    for (let i = 0; i + 4 <= bytes.length; i += 4) {
      const pfn = dv.getUint32(i, true);
      const gpa = pfn * BALLOON_PAGE_SIZE;
      if (!mem.contains(gpa, BALLOON_PAGE_SIZE)) {
        this.count.invalidPfns++;
        continue;
      }
      // Extend only while the whole run stays inside one region (regions may be adjacent).
      if (pfn === runEnd && mem.contains(runStart * BALLOON_PAGE_SIZE, (runEnd + 1 - runStart) * BALLOON_PAGE_SIZE)) {
        runEnd++;
        continue;
      }
      this.flushRun(runStart, runEnd);
      runStart = pfn;
      runEnd = pfn + 1;
    }
    this.flushRun(runStart, runEnd);
    return 0;
  }

  private flushRun(start: number, end: number): void {
    if (start < 0 || end <= start) return;
    try {
      this.discard(start * BALLOON_PAGE_SIZE, (end - start) * BALLOON_PAGE_SIZE);
      this.count.inflatedPages += end - start;
    } catch {
      // The pages stay resident: the guest loses nothing, the host saves nothing.
      this.count.discardErrors++;
    }
  }

  /** Deflate: nothing to undo (discarded pages refault as zeros); acknowledge and count. */
  private deflate(chain: DescriptorChain): number {
    this.count.deflatedPages += Math.floor(chain.totalRead / 4);
    return 0;
  }

  /**
   * statsq (§5.5.6.3): the driver posts one buffer of statistics and waits; we keep it and
   * return it (requestStats) when we want newer values, then it refills it and posts again.
   * Each buffer that arrives is parsed at once.
   */
  private receiveStats(ctx: ActivateContext): void {
    const q = this.queues[STATSQ];
    if (q === undefined || q.broken !== undefined) return;
    try {
      do {
        for (;;) {
          const chain = q.pop();
          if (chain === undefined) break;
          if (chain instanceof QueueError) {
            ctx.needsReset(`queue ${STATSQ}: ${chain.message}`);
            return;
          }
          // Linux keeps one buffer in flight; a second one replaces the first, which goes back
          // unread so the driver never waits forever on it.
          if (this.heldStats !== undefined) q.pushUsed(this.heldStats, 0);
          this.heldStats = chain.head;
          this.lastStatsAt = this.now();
          this.parseStats(ctx.mem, chain);
        }
      } while (q.armNotification());
    } catch (e) {
      ctx.needsReset(`queue ${STATSQ}: ${q.poison(new QueueError("VIRTQ_INTERNAL", e instanceof Error ? e.message : String(e))).message}`);
    } finally {
      try {
        if (q.needsInterrupt()) ctx.interruptQueue(STATSQ);
      } catch {
        // Validated ring addresses; nothing sensible to do if that read fails.
      }
    }
  }

  /**
   * Packed { le16 tag; le64 val } entries from the readable part; a trailing partial entry and
   * unknown tags are ignored, the length read is capped. Values above 2^53 lose precision
   * (no real counter gets there).
   */
  private parseStats(mem: GuestMemory, chain: DescriptorChain): void {
    const n = Math.min(Math.floor(chain.totalRead / STAT_ENTRY_SIZE), MAX_STAT_ENTRIES);
    const bytes = readChain(mem, chain.readable, 0, n * STAT_ENTRY_SIZE);
    const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const values: Record<string, number> = {};
    for (let off = 0; off + STAT_ENTRY_SIZE <= bytes.length; off += STAT_ENTRY_SIZE) {
      const name = BALLOON_STAT_TAGS[dv.getUint16(off, true)];
      if (name === undefined) {
        this.count.unknownStatTags++;
        continue;
      }
      values[name] = Number(dv.getBigUint64(off + 2, true));
    }
    this.lastStats = { updatedAt: this.now(), values };
  }
}
