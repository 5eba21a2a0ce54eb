import fc from "fast-check";
import { expect } from "vitest";
import { GuestMemory } from "../../../memory/guest-memory.js";
import type { ActivateContext, VirtioDevice } from "../device.js";
import { featureBit, VIRTIO_F } from "../device.js";
import { type DescriptorChain, QueueError, SplitQueue } from "./split-queue.js";
import { QueueDriver } from "./driver.js";

/**
 * Test helper: adversarial rings for any device, and the invariants every device must keep
 * on them (never throw; writes only into the writable buffers of chains it completed and into
 * the used ring; used len within the chain's writable length; still serves a well-formed
 * request afterwards, possibly after the reset it asked for).
 *
 * Layout: queue at 0, indirect tables in [INDIRECT_AREA, DATA_AREA), buffers in the data area,
 * so what the device writes never changes the chains a reference walker reads.
 */
export const FUZZ_MEM = 64 * 1024;
export const QSIZE = 8;
export const INDIRECT_AREA = 0x1000;
export const DATA_AREA = 0x2000;
const SLOT = 512;

export interface FuzzDesc {
  addr: number | bigint;
  len: number;
  flags: number;
  next: number;
}

export interface FuzzCase {
  descs: FuzzDesc[];
  indirect: FuzzDesc[];
  ring: number[];
  availIdx: number;
  availFlags: number;
  usedEvent: number;
  eventIdx: boolean;
  indirectFeature: boolean;
  /** Per 512-byte data slot: what a device reads there (request header or payload). */
  slots: { type: number; sector: bigint; words: bigint[] }[];
}

const slotAddr = fc.integer({ min: 0, max: (FUZZ_MEM - DATA_AREA) / SLOT - 1 }).map((k) => DATA_AREA + k * SLOT);
const anyAddr = fc.oneof(
  { weight: 6, arbitrary: slotAddr },
  { weight: 2, arbitrary: fc.tuple(slotAddr, fc.integer({ min: 1, max: SLOT - 1 })).map(([a, o]) => a + o) },
  { weight: 1, arbitrary: fc.integer({ min: INDIRECT_AREA, max: DATA_AREA - 16 }).map((a) => a & ~15) },
  { weight: 1, arbitrary: fc.constantFrom(FUZZ_MEM - 1, FUZZ_MEM, FUZZ_MEM + 4096, 2 ** 40) },
  { weight: 1, arbitrary: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }) },
);
const anyLen = fc.oneof(
  { weight: 3, arbitrary: fc.constantFrom(0, 1, 15, 16, 17, 32, 512, 513, 1024, 1536, 2048) },
  { weight: 2, arbitrary: fc.integer({ min: 0, max: 4096 }) },
  { weight: 1, arbitrary: fc.constantFrom(0xffffffff, FUZZ_MEM, 0x80000000) },
);
const anyFlags = fc.oneof({ weight: 8, arbitrary: fc.integer({ min: 0, max: 7 }) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffff }) });
const fuzzDesc = (maxNext: number): fc.Arbitrary<FuzzDesc> => fc.record({ addr: anyAddr, len: anyLen, flags: anyFlags, next: fc.integer({ min: 0, max: maxNext }) });

/**
 * Descriptor tables that mostly look like real requests: (readable 16, data, writable status)
 * triples over data slots, with occasional wrong flags, lengths or links, so devices get past
 * the ring checks into their request handling.
 */
const likelyDescs: fc.Arbitrary<FuzzDesc[]> = fc
  .array(
    fc.record({
      addr: slotAddr,
      dataLen: fc.constantFrom(512, 1024, 512, 1024, 0, 100, 16, 20, 32),
      dataWrite: fc.boolean(),
      noise: fc.oneof({ weight: 12, arbitrary: fc.constant(null) }, { weight: 1, arbitrary: fuzzDesc(QSIZE + 1) }),
    }),
    { minLength: QSIZE, maxLength: QSIZE },
  )
  .map((rs) =>
    rs.map((r, i): FuzzDesc => {
      if (r.noise !== null) return r.noise;
      const role = i === QSIZE - 1 ? 2 : i % 3;
      const next = i + 1;
      if (role === 0) return { addr: r.addr, len: 16, flags: 1, next };
      if (role === 1) return { addr: r.addr + 256, len: r.dataLen, flags: 1 | (r.dataWrite ? 2 : 0), next };
      return { addr: r.addr + 511, len: 1, flags: 2, next: 0 };
    }),
  );

export function fuzzCase(types: readonly number[]): fc.Arbitrary<FuzzCase> {
  return fc.record({
    descs: fc.oneof({ weight: 1, arbitrary: fc.array(fuzzDesc(QSIZE + 1), { minLength: QSIZE, maxLength: QSIZE }) }, { weight: 3, arbitrary: likelyDescs }),
    indirect: fc.array(fuzzDesc(20), { minLength: 16, maxLength: 16 }),
    ring: fc.array(
      fc.oneof(
        { weight: 20, arbitrary: fc.constantFrom(0, 3, 6) },
        { weight: 2, arbitrary: fc.integer({ min: 0, max: QSIZE - 1 }) },
        { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffff }) },
      ),
      {
      minLength: QSIZE,
      maxLength: QSIZE,
    }),
    availIdx: fc.oneof({ weight: 9, arbitrary: fc.integer({ min: 0, max: QSIZE }) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffff }) }),
    availFlags: fc.integer({ min: 0, max: 3 }),
    usedEvent: fc.integer({ min: 0, max: 0xffff }),
    eventIdx: fc.boolean(),
    indirectFeature: fc.boolean(),
    slots: fc.array(
      fc.record({
        type: fc.oneof({ weight: 9, arbitrary: fc.constantFrom(...types) }, { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffffffff }) }),
        sector: fc.oneof({ weight: 8, arbitrary: fc.bigInt({ min: 0n, max: 80n }) }, { weight: 1, arbitrary: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }) }),
        words: fc.array(fc.oneof(fc.bigInt({ min: 0n, max: 80n }), fc.bigInt({ min: 0n, max: (1n << 64n) - 1n })), { minLength: 6, maxLength: 6 }),
      }),
      { minLength: (FUZZ_MEM - DATA_AREA) / SLOT, maxLength: (FUZZ_MEM - DATA_AREA) / SLOT },
    ),
  });
}

export interface Harness {
  mem: GuestMemory;
  ctx: ActivateContext;
  resets: string[];
  interrupts: number[];
}

export function harness(device: VirtioDevice, features: bigint, build: (mem: GuestMemory) => QueueDriver): { h: Harness; drv: QueueDriver } {
  const mem = new GuestMemory(new ArrayBuffer(FUZZ_MEM), [{ guestPhysAddr: 0, size: FUZZ_MEM, hostOffset: 0 }]);
  const drv = build(mem);
  const resets: string[] = [];
  const interrupts: number[] = [];
  const ctx: ActivateContext = {
    mem,
    queues: [drv.config],
    features: features & device.features,
    interruptQueue: (q) => interrupts.push(q),
    interruptConfig: () => undefined,
    needsReset: (r) => resets.push(r),
  };
  return { h: { mem, ctx, resets, interrupts }, drv };
}

/** A well-formed request a device must still serve: builds it, and checks its completion. */
export type GoodRequest = (mem: GuestMemory, drv: QueueDriver) => { head: number; check: (usedLen: number) => void };

/**
 * Run one adversarial case against a fresh `device` and assert the common invariants.
 * `settle`: for a device that completes requests later (on an I/O thread), wait until it has
 * answered everything it took; called after every notify.
 */
export function runFuzzCase(device: VirtioDevice, c: FuzzCase, good: GoodRequest, settle?: () => void): void {
  const inOrder = settle === undefined;
  settle ??= () => {};
  let features = featureBit(VIRTIO_F.VERSION_1);
  if (c.eventIdx) features |= featureBit(VIRTIO_F.EVENT_IDX);
  if (c.indirectFeature) features |= featureBit(VIRTIO_F.INDIRECT_DESC);
  const { h, drv } = harness(device, features | (device.features & ~(featureBit(VIRTIO_F.EVENT_IDX) | featureBit(VIRTIO_F.INDIRECT_DESC))), (m) => new QueueDriver(m, QSIZE, 0));
  const { mem } = h;
  c.descs.forEach((d, i) => drv.writeDesc(drv.config.descAddr, i, BigInt(d.addr), d.len, d.flags, d.next));
  c.indirect.forEach((d, i) => drv.writeDesc(INDIRECT_AREA, i, BigInt(d.addr), d.len, d.flags, d.next));
  c.slots.forEach((s, i) => {
    const a = DATA_AREA + i * SLOT;
    mem.writeU32(a, s.type);
    mem.writeU64(a + 8, s.sector);
    s.words.forEach((w, j) => mem.writeU64(a + 16 + 8 * j, w));
  });
  c.ring.forEach((head, i) => mem.writeU16(drv.config.driverAddr + 4 + 2 * i, head));
  drv.setAvailFlags(c.availFlags);
  drv.setUsedEvent(c.usedEvent);
  drv.setAvailIdx(c.availIdx);

  device.activate(h.ctx);
  const before = new GuestMemory(mem.read(0, FUZZ_MEM).buffer, [{ guestPhysAddr: 0, size: FUZZ_MEM, hostOffset: 0 }]);
  expect(() => {
    device.notify(0);
    settle();
    device.notify(0);
    settle();
    device.notify(7); // no such queue
  }).not.toThrow();

  // Replay the chains on the memory as it was: a device that completes as it goes must have
  // completed the first ones the reference pops, in order. One that completes later (settle
  // given) may answer in any order (virtio 1.2 §2.7.8), and drops what was in flight when the
  // queue broke (as QEMU does), so its used elements are matched by head to distinct chains
  // among all the reference pops before an error.
  const ref = new SplitQueue(before, drv.config, { eventIdx: c.eventIdx, indirect: c.indirectFeature });
  const usedRing = { addr: drv.config.deviceAddr, len: 6 + 8 * QSIZE };
  const allowed: { addr: number; len: number }[] = [usedRing];
  const completed: { u: { id: number; len: number }; chain: DescriptorChain }[] = [];
  let rejected: string | undefined;
  const usedElems = drv.takeUsed();
  const chains: DescriptorChain[] = [];
  for (let i = 0; i < (inOrder ? usedElems.length : QSIZE); i++) {
    const chain = ref.pop();
    if (chain === undefined || chain instanceof QueueError) {
      if (inOrder) rejected = String(chain?.code);
      break;
    }
    chains.push(chain);
    // Data of a request in flight when the queue broke has landed although it is never answered.
    if (!inOrder) allowed.push(...chain.writable);
  }
  for (const u of usedElems) {
    const i = inOrder ? 0 : chains.findIndex((ch) => ch.head === u.id);
    const chain = chains.splice(Math.max(i, 0), 1)[0];
    if (chain === undefined) {
      rejected ??= "no chain for a used element";
      continue;
    }
    completed.push({ u, chain });
    if (inOrder) allowed.push(...chain.writable);
  }
  // A driver may hand the device its own used ring as a writable buffer; then a later request's
  // data can overwrite an earlier used element, as the driver asked. Only compare the elements
  // when no completed buffer overlaps the used ring.
  const overlapsUsed = completed.some(({ chain }) => chain.writable.some((b) => b.addr < usedRing.addr + usedRing.len && usedRing.addr < b.addr + b.len));
  if (!overlapsUsed) {
    if (rejected !== undefined) throw new Error(`device completed a chain the reference rejects: ${rejected}`);
    for (const { u, chain } of completed) {
      expect(u.id).toBe(chain.head);
      expect(u.len).toBeLessThanOrEqual(chain.totalWrite);
    }
  }
  const now = mem.slice(0, FUZZ_MEM);
  const old = before.slice(0, FUZZ_MEM);
  for (let i = 0; i < FUZZ_MEM; i++) {
    if (now[i] !== old[i] && !allowed.some((b) => i >= b.addr && i < b.addr + b.len)) {
      throw new Error(`device wrote guest byte 0x${i.toString(16)} outside the writable buffers it completed`);
    }
  }

  // Then a well-formed request still completes, on the same queue or after the reset asked for.
  let d2 = drv;
  if (h.resets.length > 0) {
    device.reset();
    mem.fill(0, QueueDriver.footprint(QSIZE));
    d2 = new QueueDriver(mem, QSIZE, 0);
    device.activate(h.ctx);
  } else {
    d2.setAvailIdx(c.availIdx);
  }
  const resetsBefore = h.resets.length;
  const { head, check } = good(mem, d2);
  d2.publish(head);
  device.notify(0);
  settle();
  expect(h.resets.length).toBe(resetsBefore);
  const used = d2.takeUsed();
  expect(used.map((u) => u.id)).toEqual([head]);
  check(used[0]!.len);
}
