import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { DIRTY_PAGE_SIZE, DirtyLog, GuestMemory } from "../../../memory/guest-memory.js";
import { addressOf, IoVec } from "../../../../sys/iov.js";
import { bufsLength, chainSlices, gatherHost, readChain, writeChain } from "./chain.js";
import type { DescriptorChain, SplitQueueOptions } from "./split-queue.js";
import { QueueError, SplitQueue, VIRTQ_DESC_F } from "./split-queue.js";
import { QueueDriver } from "./driver.js";

const MEM = 64 * 1024;
const DATA = 0x4000;
const { NEXT, WRITE, INDIRECT } = VIRTQ_DESC_F;

function mkMem(n = MEM): GuestMemory {
  return new GuestMemory(new ArrayBuffer(n), [{ guestPhysAddr: 0, size: n, hostOffset: 0 }]);
}

function setup(size = 8, opts: Partial<SplitQueueOptions> = {}) {
  const mem = mkMem();
  const drv = new QueueDriver(mem, size, 0);
  const q = new SplitQueue(mem, drv.config, { eventIdx: false, indirect: false, ...opts });
  return { mem, drv, q };
}

function expectChain(r: DescriptorChain | undefined | QueueError): DescriptorChain {
  if (r === undefined || r instanceof QueueError) throw new Error(`expected a chain, got ${r === undefined ? "nothing" : r.code}`);
  return r;
}

function expectError(r: DescriptorChain | undefined | QueueError, code: string): void {
  expect(r).toBeInstanceOf(QueueError);
  expect((r as QueueError).code).toBe(code);
}

describe("SplitQueue config", () => {
  it("refuses sizes that are not powers of two, misaligned rings and rings outside RAM", () => {
    const mem = mkMem();
    const ok = { size: 8, descAddr: 0, driverAddr: 0x100, deviceAddr: 0x200 };
    expect(SplitQueue.check(mem, ok)).toBeUndefined();
    for (const bad of [
      { ...ok, size: 6 },
      { ...ok, size: 0 },
      { ...ok, size: 65536 },
      { ...ok, descAddr: 8 },
      { ...ok, driverAddr: 0x101 },
      { ...ok, deviceAddr: 0x202 },
      { ...ok, deviceAddr: MEM - 8 },
      { ...ok, descAddr: MEM - 16 },
    ]) {
      expect(SplitQueue.check(mem, bad)?.code).toBe("VIRTQ_CONFIG");
      expect(() => new SplitQueue(mem, bad, { eventIdx: false, indirect: false })).toThrow(QueueError);
    }
  });
});

describe("SplitQueue.pop", () => {
  it("returns nothing on an empty ring, then a chain split into readable and writable parts", () => {
    const { mem, drv, q } = setup();
    expect(q.pop()).toBeUndefined();
    const head = drv.addChain([
      { addr: DATA, len: 16 },
      { addr: DATA + 0x100, len: 100 },
      { addr: DATA + 0x200, len: 0, write: true },
      { addr: DATA + 0x300, len: 513, write: true },
    ]);
    drv.publish(head);
    const c = expectChain(q.pop());
    expect(c).toEqual({
      head,
      readable: [
        { addr: DATA, len: 16, host: mem.tryHostAddress(DATA, 16) },
        { addr: DATA + 0x100, len: 100, host: mem.tryHostAddress(DATA + 0x100, 100) },
      ],
      writable: [{ addr: DATA + 0x300, len: 513, host: mem.tryHostAddress(DATA + 0x300, 513) }],
      totalRead: 116,
      totalWrite: 513,
    });
    expect(q.pop()).toBeUndefined();
  });

  it("follows the avail idx across the 16-bit wrap", () => {
    const { mem, drv } = setup(4);
    const q = SplitQueue.restore(mem, { config: drv.config, nextAvail: 0xfffe, nextUsed: 0xfffe }, { eventIdx: false, indirect: false });
    drv.setAvailIdx(0xfffe);
    const heads: number[] = [];
    for (let i = 0; i < 4; i++) {
      const h = drv.addChain([{ addr: DATA + i * 16, len: 8, write: true }]);
      // QueueDriver writes the ring slot from its own idx, which we moved to 0xfffe.
      drv.publish(h);
      heads.push(h);
    }
    expect(mem.readU16(drv.config.driverAddr + 2)).toBe(2);
    for (const h of heads) {
      const c = expectChain(q.pop());
      expect(c.head).toBe(h);
      q.pushUsed(c.head, 8);
    }
    expect(q.pop()).toBeUndefined();
    expect(drv.usedIdx).toBe(2);
    expect(q.save()).toEqual({ config: drv.config, nextAvail: 2, nextUsed: 2 });
  });

  it("rejects a driver claiming more new entries than the queue holds, and stays broken", () => {
    const { drv, q } = setup(8);
    drv.setAvailIdx(9);
    expectError(q.pop(), "VIRTQ_AVAIL_IDX");
    drv.setAvailIdx(1);
    expectError(q.pop(), "VIRTQ_AVAIL_IDX");
    expect(q.broken?.code).toBe("VIRTQ_AVAIL_IDX");
    expect(q.armNotification()).toBe(false);
  });

  it("accepts exactly `size` new entries", () => {
    const { drv, q } = setup(4);
    for (let i = 0; i < 4; i++) drv.publish(drv.addChain([{ addr: DATA, len: 1 }]));
    for (let i = 0; i < 4; i++) expectChain(q.pop());
    expect(q.pop()).toBeUndefined();
  });

  it.each([
    ["head outside the table", (d: QueueDriver) => d.publish(9), "VIRTQ_HEAD"],
    ["next outside the table", (d: QueueDriver) => (d.writeDesc(0, 0, DATA, 8, NEXT, 8), d.publish(0)), "VIRTQ_NEXT"],
    ["a loop", (d: QueueDriver) => (d.writeDesc(0, 0, DATA, 8, NEXT, 1), d.writeDesc(0, 1, DATA, 8, NEXT, 0), d.publish(0)), "VIRTQ_LOOP"],
    ["a self loop", (d: QueueDriver) => (d.writeDesc(0, 3, DATA, 8, NEXT | WRITE, 3), d.publish(3)), "VIRTQ_LOOP"],
    ["readable after writable", (d: QueueDriver) => d.publish(d.addChain([{ addr: DATA, len: 8, write: true }, { addr: DATA, len: 8 }])), "VIRTQ_ORDER"],
    ["readable after an empty writable", (d: QueueDriver) => d.publish(d.addChain([{ addr: DATA, len: 0, write: true }, { addr: DATA, len: 8 }])), "VIRTQ_ORDER"],
    ["a buffer past the end of RAM", (d: QueueDriver) => d.publish(d.addChain([{ addr: MEM - 4, len: 8 }])), "VIRTQ_BUFFER"],
    ["a 64-bit address", (d: QueueDriver) => (d.writeDesc(0, 0, 0xffff_ffff_ffff_f000n, 8, 0, 0), d.publish(0)), "VIRTQ_BUFFER"],
    ["INDIRECT without the feature", (d: QueueDriver) => d.publish(d.addIndirectChain([{ addr: DATA, len: 8 }], 0x2000)), "VIRTQ_INDIRECT"],
  ])("rejects %s", (_name, build, code) => {
    const { drv, q } = setup(8);
    build(drv);
    expectError(q.pop(), code);
    expect(q.broken?.code).toBe(code);
  });

  it("refuses a chain longer than 2^32 bytes in total (§2.7.5)", () => {
    // 65 aliases of one 64 MiB backing: each descriptor can be 64 MiB and still lie in RAM.
    const region = 64 << 20;
    const backing = new ArrayBuffer(region);
    const regions = Array.from({ length: 66 }, (_, i) => ({ guestPhysAddr: i * region, size: region, hostOffset: 0 }));
    const mem = new GuestMemory(backing, regions);
    const drv = new QueueDriver(mem, 128, 0);
    const q = new SplitQueue(mem, drv.config, { eventIdx: false, indirect: false });
    const bufs = Array.from({ length: 65 }, (_, i) => ({ addr: (i + 1) * region, len: region, write: true }));
    drv.publish(drv.addChain(bufs));
    expectError(q.pop(), "VIRTQ_LENGTH");
  });
});

describe("indirect descriptors (§2.7.5.3)", () => {
  const TABLE = 0x2000;

  it("walks a table, ignoring WRITE on the referring descriptor", () => {
    const { mem, drv, q } = setup(8, { indirect: true });
    const head = drv.addIndirectChain(
      [
        { addr: DATA, len: 16 },
        { addr: DATA + 16, len: 32, write: true },
      ],
      TABLE,
    );
    drv.writeDesc(drv.config.descAddr, head, TABLE, 32, INDIRECT | WRITE, 0);
    drv.publish(head);
    const c = expectChain(q.pop());
    expect(c.readable).toEqual([{ addr: DATA, len: 16, host: mem.tryHostAddress(DATA, 16) }]);
    expect(c.writable).toEqual([{ addr: DATA + 16, len: 32, host: mem.tryHostAddress(DATA + 16, 32) }]);
  });

  it("accepts direct descriptors followed by one indirect descriptor", () => {
    const { mem, drv, q } = setup(8, { indirect: true });
    drv.writeDesc(TABLE, 0, DATA + 64, 4, WRITE, 0);
    drv.writeDesc(0, 0, DATA, 16, NEXT, 1);
    drv.writeDesc(0, 1, TABLE, 16, INDIRECT, 0);
    drv.publish(0);
    const c = expectChain(q.pop());
    expect(c.totalRead).toBe(16);
    expect(c.writable).toEqual([{ addr: DATA + 64, len: 4, host: mem.tryHostAddress(DATA + 64, 4) }]);
  });

  it("lets an indirect table be longer than the queue", () => {
    const { drv, q } = setup(2, { indirect: true });
    const bufs = Array.from({ length: 20 }, (_, i) => ({ addr: DATA + i * 8, len: 8, write: true }));
    drv.publish(drv.addIndirectChain(bufs, TABLE));
    expect(expectChain(q.pop()).totalWrite).toBe(160);
  });

  it.each([
    ["nested", (d: QueueDriver) => (d.writeDesc(TABLE, 0, TABLE, 16, INDIRECT, 0), d.writeDesc(0, 0, TABLE, 16, INDIRECT, 0))],
    ["NEXT with INDIRECT", (d: QueueDriver) => (d.writeDesc(TABLE, 0, DATA, 8, 0, 0), d.writeDesc(0, 0, TABLE, 16, INDIRECT | NEXT, 1))],
    ["length not a multiple of 16", (d: QueueDriver) => d.writeDesc(0, 0, TABLE, 24, INDIRECT, 0)],
    ["zero length", (d: QueueDriver) => d.writeDesc(0, 0, TABLE, 0, INDIRECT, 0)],
    ["table outside RAM", (d: QueueDriver) => d.writeDesc(0, 0, MEM - 16, 32, INDIRECT, 0)],
    ["loop inside the table", (d: QueueDriver) => (d.writeDesc(TABLE, 0, DATA, 8, NEXT, 1), d.writeDesc(TABLE, 1, DATA, 8, NEXT, 0), d.writeDesc(0, 0, TABLE, 32, INDIRECT, 0))],
    ["next past the table end", (d: QueueDriver) => (d.writeDesc(TABLE, 0, DATA, 8, NEXT, 2), d.writeDesc(TABLE, 2, DATA, 8, 0, 0), d.writeDesc(0, 0, TABLE, 32, INDIRECT, 0))],
  ])("rejects %s", (_name, build) => {
    const { drv, q } = setup(8, { indirect: true });
    build(drv);
    drv.publish(0);
    const r = q.pop();
    expect(r).toBeInstanceOf(QueueError);
  });
});

describe("used ring and notifications", () => {
  it("writes the element then the idx; len is clamped to u32", () => {
    const { drv, q } = setup(4);
    q.pushUsed(3, 77);
    q.pushUsed(1, 2 ** 40);
    expect(drv.takeUsed()).toEqual([
      { id: 3, len: 77 },
      { id: 1, len: 0xffffffff },
    ]);
  });

  it("without EVENT_IDX honours VIRTQ_AVAIL_F_NO_INTERRUPT", () => {
    const { drv, q } = setup(4);
    expect(q.needsInterrupt()).toBe(false); // nothing used yet
    q.pushUsed(0, 1);
    expect(q.needsInterrupt()).toBe(true);
    expect(q.needsInterrupt()).toBe(false); // already signalled
    drv.setAvailFlags(1);
    q.pushUsed(1, 1);
    expect(q.needsInterrupt()).toBe(false);
  });

  it("with EVENT_IDX interrupts only when used idx crosses used_event (§2.7.10)", () => {
    const { drv, q } = setup(8, { eventIdx: true });
    drv.setAvailFlags(1); // must be ignored with EVENT_IDX
    drv.setUsedEvent(0);
    q.pushUsed(0, 1); // idx 0 -> 1 crosses used_event 0
    expect(q.needsInterrupt()).toBe(true);
    q.pushUsed(1, 1);
    expect(q.needsInterrupt()).toBe(false);
    drv.setUsedEvent(3); // wants one when entry 3 is written
    q.pushUsed(2, 1);
    expect(q.needsInterrupt()).toBe(false);
    q.pushUsed(3, 1);
    q.pushUsed(4, 1);
    expect(q.needsInterrupt()).toBe(true); // batch 2..5 covers entry 3
  });

  it("armNotification publishes avail_event and reports late arrivals", () => {
    const { drv, q } = setup(8, { eventIdx: true });
    drv.publish(drv.addChain([{ addr: DATA, len: 1 }]));
    expectChain(q.pop());
    expect(q.armNotification()).toBe(false);
    expect(drv.availEvent).toBe(1);
    drv.publish(drv.addChain([{ addr: DATA, len: 1 }]));
    expect(q.armNotification()).toBe(true);
  });

  it("save/restore keeps the cursors", () => {
    const { mem, drv, q } = setup(8);
    for (let i = 0; i < 3; i++) drv.publish(drv.addChain([{ addr: DATA, len: 1, write: true }]));
    q.pushUsed(expectChain(q.pop()).head, 1);
    const st = JSON.parse(JSON.stringify(q.save())) as ReturnType<SplitQueue["save"]>;
    const q2 = SplitQueue.restore(mem, st, { eventIdx: false, indirect: false });
    expect(expectChain(q2.pop()).head).toBe(1);
    q2.pushUsed(1, 1);
    expect(drv.takeUsed().map((u) => u.id)).toEqual([0, 1]);
  });
});

describe("inspect (GET /threads)", () => {
  it("shows the device's cursors and the rings as they are in guest memory, changing nothing", () => {
    const { drv, q } = setup(8);
    for (let i = 0; i < 3; i++) drv.publish(drv.addChain([{ addr: DATA + 16 * i, len: 16, write: true }]));
    const c = expectChain(q.pop());
    q.pushUsed(c.head, 16);
    expect(q.inspect()).toEqual({
      nextAvail: 1, availIdx: 3, waiting: 2, usedIdx: 1, nextUsed: 1, signalledUsed: 0,
      eventIdx: false, availFlags: 0, usedEvent: null, availEvent: null, interruptsSuppressed: false, broken: null, highBuffers: 0,
    });
    // Reading it twice pops nothing and decides no interrupt.
    expect(q.inspect().waiting).toBe(2);
    expect(q.needsInterrupt()).toBe(true);
    expect(q.inspect().signalledUsed).toBe(1);
    drv.setAvailFlags(1);
    expect(q.inspect()).toMatchObject({ availFlags: 1, interruptsSuppressed: true });
    // A corrupt idx shows as it is; the error once the device has met it.
    drv.setAvailIdx(200);
    expect(q.inspect()).toMatchObject({ availIdx: 200, waiting: 199, broken: null });
    q.pop();
    expect(q.inspect().broken).toMatch(/available idx 200/);
  });

  it("with EVENT_IDX: used_event decides whether the next used buffer interrupts, avail_event what the device asked for", () => {
    const { drv, q } = setup(8, { eventIdx: true });
    drv.publish(drv.addChain([{ addr: DATA, len: 16, write: true }]));
    const c = expectChain(q.pop());
    q.armNotification();
    drv.setUsedEvent(0);
    expect(q.inspect()).toMatchObject({ eventIdx: true, usedEvent: 0, availEvent: 1, interruptsSuppressed: false });
    q.pushUsed(c.head, 16);
    // used_event 0 is behind the used idx 1: the driver is not waiting for the next one (it polls, or has not caught up).
    expect(q.inspect()).toMatchObject({ usedIdx: 1, usedEvent: 0, interruptsSuppressed: true });
    drv.setUsedEvent(1);
    expect(q.inspect().interruptsSuppressed).toBe(false);
  });
});

describe("chain helpers", () => {
  it("read, write and slice across buffers with offsets and clipping", () => {
    const mem = mkMem();
    const bufs = [
      { addr: 0x100, len: 3 },
      { addr: 0x200, len: 5 },
    ];
    expect(bufsLength(bufs)).toBe(8);
    expect(writeChain(mem, bufs, Uint8Array.of(1, 2, 3, 4, 5, 6, 7, 8, 9, 10), 1)).toBe(7);
    expect([...mem.read(0x100, 3)]).toEqual([0, 1, 2]);
    expect([...mem.read(0x200, 5)]).toEqual([3, 4, 5, 6, 7]);
    expect([...readChain(mem, bufs, 2, 4)]).toEqual([2, 3, 4, 5]);
    expect([...readChain(mem, bufs, 7, 100)]).toEqual([7]);
    expect(readChain(mem, bufs, 9, 4).length).toBe(0);
    const views = chainSlices(mem, bufs, 2, 2);
    expect(views.map((v) => v.length)).toEqual([1, 1]);
    views[1]![0] = 99; // live view
    expect(mem.readU8(0x200)).toBe(99);
  });
});

describe("pop on random descriptor tables (property)", () => {
  it("never throws; every chain lies in RAM, is ordered and adds up", () => {
    const size = 8;
    const desc = fc.record({
      addr: fc.oneof(fc.integer({ min: 0, max: MEM + 64 }), fc.bigInt({ min: 0n, max: (1n << 64n) - 1n })),
      len: fc.oneof(fc.integer({ min: 0, max: 64 }), fc.constantFrom(16, 32, 48, 0xffffffff, MEM)),
      flags: fc.oneof(fc.integer({ min: 0, max: 7 }), fc.integer({ min: 0, max: 0xffff })),
      next: fc.integer({ min: 0, max: size + 2 }),
    });
    fc.assert(
      fc.property(
        fc.array(desc, { minLength: size, maxLength: size }),
        fc.array(fc.integer({ min: 0, max: size + 1 }), { minLength: size, maxLength: size }),
        fc.integer({ min: 0, max: 0xffff }),
        fc.boolean(),
        (descs, ring, availIdx, indirect) => {
          const mem = mkMem();
          const drv = new QueueDriver(mem, size, 0);
          descs.forEach((d, i) => drv.writeDesc(0, i, BigInt(d.addr), d.len, d.flags, d.next));
          // Also scatter descriptors where indirect tables may point.
          descs.forEach((d, i) => drv.writeDesc(0x400, i, BigInt(d.addr), d.len, d.flags, (d.next + 1) % 12));
          ring.forEach((h, i) => mem.writeU16(drv.config.driverAddr + 4 + 2 * i, h));
          drv.setAvailIdx(availIdx);
          const q = new SplitQueue(mem, drv.config, { eventIdx: false, indirect });
          for (let i = 0; i < size + 2; i++) {
            const r = q.pop();
            if (r === undefined || r instanceof QueueError) break;
            expect(r.head).toBeLessThan(size);
            for (const b of [...r.readable, ...r.writable]) expect(mem.contains(b.addr, b.len)).toBe(true);
            expect(bufsLength(r.readable)).toBe(r.totalRead);
            expect(bufsLength(r.writable)).toBe(r.totalWrite);
            expect(r.totalRead + r.totalWrite).toBeLessThanOrEqual(2 ** 32);
          }
        },
      ),
      { numRuns: 300 },
    );
  });
});

describe("descriptor addresses as two 32-bit halves (property)", () => {
  it("accepts exactly the 64-bit addresses whose buffer lies in RAM, above 4 GiB too, and never throws", () => {
    // RAM at [0, 32 KiB) and [4 GiB, 4 GiB + 32 KiB): the high word matters, and values near
    // 2^53 and 2^64 must be refused, not rounded into RAM by a lossy conversion.
    const half = MEM / 2;
    const HIGH = 2n ** 32n;
    const mem2 = () =>
      new GuestMemory(new ArrayBuffer(MEM), [
        { guestPhysAddr: 0, size: half, hostOffset: 0 },
        { guestPhysAddr: 2 ** 32, size: half, hostOffset: half },
      ]);
    const near = (base: bigint) => fc.bigInt({ min: base > 64n ? base - 64n : 0n, max: base + BigInt(half) + 64n });
    const addr = fc.oneof(
      near(0x2000n),
      near(HIGH),
      fc.bigInt({ min: 2n ** 53n - 64n, max: 2n ** 53n + 64n }).map((a) => a & ((1n << 64n) - 1n)),
      near(2n ** 53n + HIGH),
      fc.bigInt({ min: (1n << 64n) - 64n, max: (1n << 64n) - 1n }),
      fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
    );
    const inRam = (a: bigint, len: number): boolean => {
      const end = a + BigInt(len);
      return (end <= BigInt(half)) || (a >= HIGH && end <= HIGH + BigInt(half));
    };
    fc.assert(
      fc.property(addr, fc.integer({ min: 0, max: 128 }), fc.boolean(), (a, len, viaIndirect) => {
        const mem = mem2();
        const drv = new QueueDriver(mem, 8, 0);
        if (viaIndirect) {
          drv.writeDesc(0x400, 0, a, len, WRITE, 0);
          drv.writeDesc(0, 0, 0x400, 16, INDIRECT, 0);
        } else {
          drv.writeDesc(0, 0, a, len, WRITE, 0);
        }
        drv.publish(0);
        const q = new SplitQueue(mem, drv.config, { eventIdx: false, indirect: true });
        const r = q.pop();
        if (inRam(a, len)) {
          const c = expectChain(r);
          expect(c.totalWrite).toBe(len);
          if (len > 0) expect(c.writable).toEqual([{ addr: Number(a), len, host: mem.tryHostAddress(Number(a), len) }]);
        } else {
          expectError(r, "VIRTQ_BUFFER");
          expect((r as QueueError).message).toContain(`0x${a.toString(16)} `);
        }
      }),
      { numRuns: 1000 },
    );
  });
});

describe("chains across regions and host views (property)", () => {
  it("buffers anywhere in RAM, across view boundaries, low and above 4 GiB: read, written and gathered as iovecs exactly", () => {
    // Low RAM [0, 8 KiB) holds the queue; high RAM [4 GiB, 4 GiB + 8 KiB). Views of 512 bytes
    // overlapping by 64 (the VMM's are 2 GiB and 2 MiB): every boundary within reach of a buffer.
    const LOW = 8192;
    const HIGH = 2 ** 32;
    const geometry = { step: 512, overlap: 64 };
    const backing = new ArrayBuffer(2 * LOW);
    const base = addressOf(new Uint8Array(backing));
    const hostOf = (gpa: number) => (gpa >= HIGH ? LOW + gpa - HIGH : gpa);
    const boundary = fc.oneof(
      ...[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16].map((k) => fc.integer({ min: -3, max: 3 }).map((d) => k * 512 + d)),
      ...[0, 1, 2, 3].map((k) => fc.integer({ min: -3, max: 3 }).map((d) => k * 512 + 64 + d)),
    );
    const buf = fc.record({
      high: fc.boolean(),
      at: fc.oneof(boundary, fc.integer({ min: 0, max: LOW })),
      len: fc.oneof(fc.integer({ min: 0, max: 40 }), fc.integer({ min: 500, max: 1600 }), fc.constant(LOW)),
      write: fc.boolean(),
    });
    fc.assert(
      fc.property(fc.array(buf, { minLength: 1, maxLength: 6 }), fc.integer({ min: 0, max: 255 }), (raw, seed) => {
        new Uint8Array(backing).fill(0);
        const mem = new GuestMemory(backing, [
          { guestPhysAddr: 0, size: LOW, hostOffset: 0 },
          { guestPhysAddr: HIGH, size: LOW, hostOffset: LOW },
        ], geometry);
        const drv = new QueueDriver(mem, 8, 0x100);
        const q = new SplitQueue(mem, drv.config, { eventIdx: false, indirect: false });
        // Readable first (§2.7.4.2); the queue's own area [0x100, 0x400) is left alone.
        const bufs = [...raw.filter((b) => !b.write), ...raw.filter((b) => b.write)].map((b) => ({
          addr: (b.high ? HIGH : 0) + Math.max(0x400, Math.min(b.at, LOW)),
          len: b.len,
          write: b.write,
        }));
        for (let i = 0; i < 2 * LOW; i++) new Uint8Array(backing)[i] = (i * 11 + seed) & 0xff;
        new Uint8Array(backing).fill(0, 0x100, 0x400);
        drv.publish(drv.addChain(bufs));
        const inRam = (b: { addr: number; len: number }) => (b.addr >= HIGH ? b.addr + b.len <= HIGH + LOW : b.addr + b.len <= LOW);
        const r = q.pop();
        if (!bufs.every(inRam)) {
          expectError(r, "VIRTQ_BUFFER");
          return;
        }
        const c = expectChain(r);
        expect(q.inspect().highBuffers).toBe(bufs.filter((b) => b.len > 0 && b.addr >= HIGH).length);
        const model = new Uint8Array(backing).slice();
        const concat = (list: typeof bufs) => Buffer.concat(list.map((b) => model.subarray(hostOf(b.addr), hostOf(b.addr) + b.len)));
        const readable = bufs.filter((b) => !b.write);
        const writable = bufs.filter((b) => b.write);
        // Reading: the bytes the driver put there, in chain order, whatever views a buffer crosses.
        expect(Buffer.from(readChain(mem, c.readable, 0, c.totalRead)).equals(concat(readable))).toBe(true);
        expect(Buffer.concat(chainSlices(mem, c.readable, 0, c.totalRead)).equals(concat(readable))).toBe(true);
        // iovecs: one host range per buffer, exactly where its bytes live.
        const iov = new IoVec();
        expect(gatherHost(iov, c.writable, 0, c.totalWrite)).toBe(true);
        let expectedBytes = 0;
        for (const b of c.writable) {
          expect(b.host).toBe(base + hostOf(b.addr));
          expectedBytes += b.len;
        }
        expect(iov.bytes).toBe(expectedBytes);
        // Writing: exactly the writable buffers change, nothing else.
        const data = Uint8Array.from({ length: c.totalWrite }, (_, i) => (i * 7 + seed + 1) & 0xff);
        expect(writeChain(mem, c.writable, data)).toBe(c.totalWrite);
        const after = new Uint8Array(backing);
        const expected = model.slice();
        let at = 0;
        for (const b of writable.filter((w) => w.len > 0)) {
          expected.set(data.subarray(at, at + b.len), hostOf(b.addr));
          at += b.len;
        }
        expect(Buffer.from(after).equals(Buffer.from(expected))).toBe(true);
      }),
      { numRuns: 300 },
    );
  });

  it("refuses a queue whose rings would need two views, instead of throwing (a geometry with less overlap than a ring)", () => {
    const mem = new GuestMemory(new ArrayBuffer(MEM), [{ guestPhysAddr: 0, size: MEM, hostOffset: 0 }], { step: 4096, overlap: 16 });
    const drv = new QueueDriver(mem, 8, 4096 - 64);
    expect(() => new SplitQueue(mem, drv.config, { eventIdx: false, indirect: false })).toThrow(/crosses two host views/);
    expect(SplitQueue.check(mem, new QueueDriver(mem, 8, 0).config)).toBeUndefined();
  });
});

describe("dirty tracking (GuestMemory.dirtyLog)", () => {
  const page = (a: number): number => Math.floor(a / DIRTY_PAGE_SIZE);

  it("off by default: nothing is marked; on: a returned chain marks its writable buffers and the used ring, not its readable ones", () => {
    const { mem, drv, q } = setup(8, { indirect: true });
    // A chain taken before the log is on (a disk request in flight when migration starts) is marked when it is returned.
    const early = drv.addChain([{ addr: 0x5000, len: 16 }, { addr: 0x6000, len: 8192, write: true }]);
    drv.publish(early);
    const c1 = expectChain(q.pop());
    const log = DirtyLog.create(MEM);
    mem.dirtyLog = log;
    expect(log.take()).toEqual([]);
    q.pushUsed(c1.head, 8192);
    expect(log.take()).toEqual([page(drv.config.deviceAddr), page(0x6000), page(0x7000)].sort((a, b) => a - b));
    // Indirect: the table's writable entries count, the table itself (read-only to the device) does not.
    const head = drv.addIndirectChain([{ addr: 0x8000, len: 4 }, { addr: 0x9000, len: 1, write: true }], 0xa000);
    drv.publish(head);
    const c2 = expectChain(q.pop());
    // (The test's driver writes through the same GuestMemory: forget its marks before each look.)
    log.take();
    // A driver that rewrites a chain before it is used (against §2.7.13) gets its own pages marked, and the queue is not poisoned by the second look.
    drv.writeDesc(drv.config.descAddr, head, 0xffff_0000, 16, INDIRECT, 0);
    log.take();
    q.pushUsed(c2.head, 1);
    expect(q.broken).toBeUndefined();
    expect(log.take()).toEqual([page(drv.config.deviceAddr)]);
    drv.writeDesc(drv.config.descAddr, head, 0xa000, 32, INDIRECT, 0);
    log.take();
    q.pushUsed(c2.head, 1);
    expect(log.take()).toEqual([page(drv.config.deviceAddr), page(0x9000)].sort((a, b) => a - b));
    // Writes through GuestMemory mark too; with the log off again, nothing does.
    mem.writeU8(0xc000, 1);
    mem.write(0xd000 - 2, new Uint8Array(4));
    expect(log.take()).toEqual([page(0xc000), page(0xd000)]);
    mem.dirtyLog = undefined;
    mem.writeU32(0xe000, 1);
    q.pushUsed(c1.head, 1);
    expect(log.take()).toEqual([]);
  });

  it("DirtyLog: marks every page a range touches, ignores pages past its end, take() clears", () => {
    const log = DirtyLog.create(10 * DIRTY_PAGE_SIZE);
    log.mark(DIRTY_PAGE_SIZE - 1, 2);
    log.mark(9 * DIRTY_PAGE_SIZE, 1 << 20);
    log.mark(3 * DIRTY_PAGE_SIZE, 0);
    expect(log.isDirty(0)).toBe(true);
    expect(log.isDirty(3)).toBe(false);
    expect(log.take()).toEqual([0, 1, 9, ...Array.from({ length: 22 }, (_, i) => 10 + i)]);
    expect(log.take()).toEqual([]);
  });
});
