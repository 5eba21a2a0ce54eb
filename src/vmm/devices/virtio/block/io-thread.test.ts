import { createHash, randomBytes } from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import fc from "fast-check";
import { afterAll, describe, expect, it } from "vitest";
import { pollIn } from "../../../../sys/libc.js";
import { featureBit, VIRTIO_F } from "../device.js";
import { QueueDriver, type DriverBuf } from "../queue/driver.js";
import { fuzzCase, harness, runFuzzCase } from "../queue/test-fuzz.js";
import { goodRead } from "./test-requests.js";
import { BlockDevice, VIRTIO_BLK_F, VIRTIO_BLK_S, VIRTIO_BLK_T } from "./block.js";
import { CTL, SLOTS, SLOT_IOV, ioRing, ioRingStatus } from "./io-ring.js";
import { sleepMs, waitIoThreadUp } from "./test-block.js";

/*
 * virtio-blk with its file I/O on a real I/O thread (io-worker.ts, from dist/: `npm run build`
 * first, as `npm test` does): requests are answered when the device thread's side reaps the
 * completion eventfd, as the VMM's device thread does in its poll loop.
 */
const dir = fs.mkdtempSync(path.join(os.tmpdir(), "tv-blkio-"));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
let n = 0;
const SECTORS = 2048; // 1 MiB
function image(): { file: string; content: Buffer } {
  const file = path.join(dir, `disk${n++}.img`);
  const content = randomBytes(SECTORS * 512);
  fs.writeFileSync(file, content);
  return { file, content };
}
const sha = (file: string): string => createHash("sha256").update(fs.readFileSync(file)).digest("hex");

/** A device on `file` whose every read and write goes through its own I/O thread. */
const onThread = (file: string, readonly = false): BlockDevice =>
  new BlockDevice({ path: file, readonly, ioThread: "tv-blk-test", ioThreadStart: "eager", readsOnIoThread: true, inMemoryFilesInline: false });

/** Reap completions until the device has answered everything it handed its I/O thread. */
function settle(dev: BlockDevice): void {
  const fd = dev.backendFds[0]!;
  for (let waited = 0; dev.inFlight > 0; ) {
    if (pollIn([fd], 100).length === 0 && (waited += 100) > 10_000) throw new Error("I/O thread did not complete in 10 s");
    dev.onBackendReadable(fd);
  }
}

const FEATURES = featureBit(VIRTIO_F.VERSION_1) | featureBit(VIRTIO_F.EVENT_IDX) | featureBit(VIRTIO_F.INDIRECT_DESC) | featureBit(VIRTIO_BLK_F.FLUSH) | featureBit(VIRTIO_BLK_F.WRITE_ZEROES) | featureBit(VIRTIO_BLK_F.DISCARD);
const QSIZE = 128; // 41 three-descriptor chains at once
const area = (i: number): number => 0x4000 + i * 0x400;

interface Req {
  type: number;
  sector: bigint;
  data: DriverBuf[];
}

/** Requests laid out one per 1 KiB area from 0x4000 (header at +0, data from +0x10, status at +0x3ff) in the harness's 64 KiB. */
function rig(dev: BlockDevice) {
  const { h, drv } = harness(dev, FEATURES, (m) => new QueueDriver(m, QSIZE, 0));
  dev.activate(h.ctx);
  return {
    h,
    drv,
    mem: h.mem,
    area,
    /** Publish all of `reqs` at once, notify once, settle; statuses by request index and the used elements. */
    run(reqs: Req[]): { status: number[]; used: { id: number; len: number }[] } {
      const heads = reqs.map((r, i) => {
        const a = area(i);
        h.mem.writeU32(a, r.type);
        h.mem.writeU32(a + 4, 0);
        h.mem.writeU64(a + 8, r.sector);
        h.mem.writeU8(a + 0x3ff, 0xee);
        return drv.addChain([{ addr: a, len: 16 }, ...r.data, { addr: a + 0x3ff, len: 1, write: true }]);
      });
      for (const hd of heads) drv.publish(hd);
      dev.notify(0);
      settle(dev);
      return { status: reqs.map((_, i) => h.mem.readU8(area(i) + 0x3ff)), used: drv.takeUsed() };
    },
  };
}

describe("virtio-blk on an I/O thread", () => {
  it("reads and writes through the I/O thread: data, used lengths, counters and interrupts as on the device thread", () => {
    const img = image();
    const dev = onThread(img.file);
    try {
      const r = rig(dev);
      expect(dev.backendFds).toHaveLength(1);
      const a0 = r.area(0);
      const a1 = r.area(1);
      r.mem.write(a1 + 0x10, Buffer.alloc(512, 0x5a));
      r.mem.write(0xd000, Buffer.alloc(512, 0x5a));
      const { status, used } = r.run([
        { type: VIRTIO_BLK_T.IN, sector: 8n, data: [{ addr: a0 + 0x10, len: 512, write: true }, { addr: 0xc000, len: 1536, write: true }] },
        { type: VIRTIO_BLK_T.OUT, sector: 100n, data: [{ addr: a1 + 0x10, len: 512 }, { addr: 0xd000, len: 512 }] },
        { type: VIRTIO_BLK_T.FLUSH, sector: 0n, data: [] },
      ]);
      expect(status).toEqual([VIRTIO_BLK_S.OK, VIRTIO_BLK_S.OK, VIRTIO_BLK_S.OK]);
      expect(used.map((u) => u.len).sort((x, y) => x - y)).toEqual([1, 1, 2049]);
      expect(Buffer.concat([r.mem.read(a0 + 0x10, 512), r.mem.read(0xc000, 1536)]).equals(img.content.subarray(8 * 512, 12 * 512))).toBe(true);
      expect(fs.readFileSync(img.file).subarray(100 * 512, 102 * 512).every((b) => b === 0x5a)).toBe(true);
      expect(dev.stats()).toEqual({ readBytes: 2048, writeBytes: 1024, readOps: 1, writeOps: 1, ioThread: "running" });
      expect(r.h.interrupts.length).toBeGreaterThan(0);
      expect(r.h.resets).toEqual([]);
    } finally {
      dev.close();
    }
  });

  it(`takes ${SLOTS + 9} requests published at once: ${SLOTS} in flight, the rest wait in the ring and all complete in order of submission`, () => {
    const img = image();
    const dev = onThread(img.file);
    try {
      const r = rig(dev);
      const count = SLOTS + 9;
      const reqs: Req[] = [];
      for (let i = 0; i < count; i++) {
        r.mem.write(r.area(i) + 0x10, Buffer.alloc(512, i));
        reqs.push({ type: VIRTIO_BLK_T.OUT, sector: BigInt(i), data: [{ addr: r.area(i) + 0x10, len: 512 }] });
      }
      dev.notify(0); // nothing published yet: a no-op
      const { status, used } = r.run(reqs);
      expect(status).toEqual(Array(count).fill(VIRTIO_BLK_S.OK));
      expect(used).toHaveLength(count);
      // One I/O thread does them in FIFO order, so they are answered in the order they were published.
      expect(used.map((u) => u.id)).toEqual(Array.from({ length: count }, (_, i) => i * 3));
      const file = fs.readFileSync(img.file);
      for (let i = 0; i < count; i++) expect(file.subarray(i * 512, (i + 1) * 512).every((b) => b === (i & 0xff))).toBe(true);
      expect(dev.inFlight).toBe(0);
    } finally {
      dev.close();
    }
  });

  it("WRITE_ZEROES runs on the I/O thread; GET_ID, DISCARD and bad requests are answered at once", () => {
    const img = image();
    const dev = new BlockDevice({ path: img.file, readonly: false, serial: "abc", ioThread: "tv-blk-test", ioThreadStart: "eager", readsOnIoThread: true, inMemoryFilesInline: false });
    try {
      const r = rig(dev);
      const seg = r.area(0) + 0x10;
      r.mem.writeU64(seg, 16n);
      r.mem.writeU32(seg + 8, 64);
      r.mem.writeU32(seg + 12, 0);
      const { status } = r.run([
        { type: VIRTIO_BLK_T.WRITE_ZEROES, sector: 0n, data: [{ addr: seg, len: 16 }] },
        { type: VIRTIO_BLK_T.GET_ID, sector: 0n, data: [{ addr: r.area(1) + 0x10, len: 20, write: true }] },
        { type: VIRTIO_BLK_T.IN, sector: BigInt(SECTORS), data: [{ addr: r.area(2) + 0x10, len: 512, write: true }] },
        { type: 99, sector: 0n, data: [] },
      ]);
      expect(status).toEqual([VIRTIO_BLK_S.OK, VIRTIO_BLK_S.OK, VIRTIO_BLK_S.IOERR, VIRTIO_BLK_S.UNSUPP]);
      const file = fs.readFileSync(img.file);
      expect(file.subarray(16 * 512, 80 * 512).every((b) => b === 0)).toBe(true);
      expect(file.subarray(80 * 512).equals(img.content.subarray(80 * 512))).toBe(true);
      expect(Buffer.from(r.mem.read(r.area(1) + 0x10, 3)).toString()).toBe("abc");
    } finally {
      dev.close();
    }
  });

  it(`a request of more pieces than a slot holds (${SLOT_IOV}) is served on the device thread, in full`, () => {
    const img = image();
    const dev = onThread(img.file, true);
    try {
      const r = rig(dev);
      const pieces = SLOT_IOV + 64;
      // 16-byte pieces 32 bytes apart: never merged into one iovec entry.
      const data: DriverBuf[] = Array.from({ length: pieces }, (_, i) => ({ addr: 0x8000 + 32 * i, len: 16, write: true }));
      const base = r.area(0);
      r.mem.writeU32(base, VIRTIO_BLK_T.IN);
      r.mem.writeU64(base + 8, 4n);
      const head = r.drv.addIndirectChain([{ addr: base, len: 16 }, ...data, { addr: base + 0x3ff, len: 1, write: true }], 0xc000);
      r.drv.publish(head);
      dev.notify(0);
      expect(dev.inFlight).toBe(0);
      expect(r.drv.takeUsed()).toEqual([{ id: head, len: 16 * pieces + 1 }]);
      const want = img.content.subarray(4 * 512, 4 * 512 + 16 * pieces);
      for (let i = 0; i < pieces; i++) expect(Buffer.from(r.mem.read(0x8000 + 32 * i, 16)).equals(want.subarray(16 * i, 16 * i + 16))).toBe(true);
    } finally {
      dev.close();
    }
  });

  it("a read whose data is in the page cache is answered at once on the calling thread; the rest go to the I/O thread", () => {
    const img = image();
    const dev = new BlockDevice({ path: img.file, readonly: false, ioThread: "tv-blk-test", ioThreadStart: "eager", inMemoryFilesInline: false });
    try {
      const r = rig(dev);
      fs.readFileSync(img.file); // in the page cache (the file was just written anyway)
      r.mem.writeU32(r.area(0), VIRTIO_BLK_T.IN);
      r.mem.writeU64(r.area(0) + 8, 40n);
      r.mem.writeU32(r.area(1), VIRTIO_BLK_T.OUT);
      r.mem.writeU64(r.area(1) + 8, 41n);
      r.drv.publish(r.drv.addChain([{ addr: r.area(0), len: 16 }, { addr: r.area(0) + 0x10, len: 512, write: true }, { addr: r.area(0) + 0x3ff, len: 1, write: true }]));
      r.drv.publish(r.drv.addChain([{ addr: r.area(1), len: 16 }, { addr: r.area(1) + 0x10, len: 512 }, { addr: r.area(1) + 0x3ff, len: 1, write: true }]));
      dev.notify(0);
      // The read is done (the used ring has it before any completion was reaped); the write is on the I/O thread.
      expect(dev.inFlight).toBe(1);
      expect(r.drv.takeUsed()).toEqual([{ id: 0, len: 513 }]);
      expect(Buffer.from(r.mem.read(r.area(0) + 0x10, 512)).equals(img.content.subarray(40 * 512, 41 * 512))).toBe(true);
      settle(dev);
      expect(r.drv.takeUsed()).toEqual([{ id: 3, len: 1 }]);
      expect(dev.stats()).toEqual({ readBytes: 512, writeBytes: 512, readOps: 1, writeOps: 1, ioThread: "running" });
    } finally {
      dev.close();
    }
  });

  it.runIf(fs.existsSync("/dev/shm") && fs.statfsSync("/dev/shm").type === 0x01021994)("a disk on tmpfs (/dev/shm) gets no I/O thread: its requests never wait for a disk and are done at once", () => {
    const file = path.join(fs.mkdtempSync("/dev/shm/tv-blkio-"), "disk.img");
    const content = randomBytes(64 * 512);
    fs.writeFileSync(file, content);
    const dev = new BlockDevice({ path: file, readonly: false, ioThread: "tv-blk-test", ioThreadStart: "eager" });
    try {
      expect(dev.backendFds).toEqual([]);
      expect(dev.stats().ioThread).toBe("none");
      const r = rig(dev);
      const { status, used } = r.run([
        { type: VIRTIO_BLK_T.IN, sector: 5n, data: [{ addr: r.area(0) + 0x10, len: 512, write: true }] },
        { type: VIRTIO_BLK_T.OUT, sector: 6n, data: [{ addr: r.area(0) + 0x10, len: 512 }] },
        { type: VIRTIO_BLK_T.FLUSH, sector: 0n, data: [] },
      ]);
      expect(status).toEqual([VIRTIO_BLK_S.OK, VIRTIO_BLK_S.OK, VIRTIO_BLK_S.OK]);
      expect(used.map((u) => u.id)).toEqual([0, 3, 6]);
      expect(fs.readFileSync(file).subarray(6 * 512, 7 * 512).equals(content.subarray(5 * 512, 6 * 512))).toBe(true);
    } finally {
      dev.close();
      fs.rmSync(path.dirname(file), { recursive: true, force: true });
    }
  });

  it("a host I/O failure on the I/O thread fails that request with IOERR and the disk goes on", () => {
    const img = image();
    const dev = onThread(img.file);
    try {
      const r = rig(dev);
      fs.truncateSync(img.file, 100 * 512); // shrunk under the device: reads past it hit end of file
      const { status } = r.run([
        { type: VIRTIO_BLK_T.IN, sector: 200n, data: [{ addr: r.area(0) + 0x10, len: 512, write: true }] },
        { type: VIRTIO_BLK_T.IN, sector: 10n, data: [{ addr: r.area(1) + 0x10, len: 512, write: true }] },
      ]);
      expect(status).toEqual([VIRTIO_BLK_S.IOERR, VIRTIO_BLK_S.OK]);
      expect(Buffer.from(r.mem.read(r.area(1) + 0x10, 512))).toEqual(img.content.subarray(10 * 512, 11 * 512));
      expect(dev.stats().readOps).toBe(1);
    } finally {
      dev.close();
    }
  });

  it("reset waits for requests in flight and answers none of them afterwards", () => {
    const img = image();
    const dev = onThread(img.file);
    try {
      const r = rig(dev);
      const reqs = Array.from({ length: 8 }, (_, i) => r.drv.addChain([{ addr: r.area(i), len: 16 }, { addr: r.area(i) + 0x10, len: 512, write: true }, { addr: r.area(i) + 0x3ff, len: 1, write: true }]));
      for (let i = 0; i < 8; i++) {
        r.mem.writeU32(r.area(i), VIRTIO_BLK_T.IN);
        r.mem.writeU64(r.area(i) + 8, BigInt(i * 4));
      }
      for (const hd of reqs) r.drv.publish(hd);
      dev.notify(0);
      dev.reset();
      expect(dev.inFlight).toBe(0);
      // Everything the I/O thread was given is done (the data is there), but nothing is in the used ring.
      for (let i = 0; i < 8; i++) expect(Buffer.from(r.mem.read(r.area(i) + 0x10, 512)).equals(img.content.subarray(i * 4 * 512, (i * 4 + 1) * 512))).toBe(true);
      expect(r.drv.takeUsed()).toEqual([]);
      dev.onBackendReadable(dev.backendFds[0]!); // a late eventfd wake-up after reset: nothing to answer
      expect(r.drv.takeUsed()).toEqual([]);
    } finally {
      dev.close();
    }
  });
});

describe("virtio-blk with an on-demand I/O thread", () => {
  it("starts no thread for reads the page cache serves; starts one for a write, serves it here meanwhile, hands over, and ends it after idling", () => {
    const img = image();
    const model = Buffer.from(img.content);
    const dev = new BlockDevice({ path: img.file, readonly: false, ioThread: "tv-blk-od", inMemoryFilesInline: false, ioThreadIdleMs: 200 });
    try {
      const ring = ioRing(dev.ioThreadRing!.ring);
      expect(dev.stats().ioThread).toBe("idle");
      expect(ioRingStatus(ring)).toMatchObject({ active: false, tid: 0, submitted: 0, completed: 0 });
      const r = rig(dev);
      fs.readFileSync(img.file); // in the page cache
      const read = (sector: bigint) => r.run([{ type: VIRTIO_BLK_T.IN, sector, data: [{ addr: r.area(0) + 0x10, len: 512, write: true }] }]);
      const write = (sector: number, byte: number) => {
        r.mem.write(r.area(1) + 0x10, Buffer.alloc(512, byte));
        model.fill(byte, sector * 512, (sector + 1) * 512);
        return r.run([{ type: VIRTIO_BLK_T.OUT, sector: BigInt(sector), data: [{ addr: r.area(1) + 0x10, len: 512 }] }, { type: VIRTIO_BLK_T.FLUSH, sector: 0n, data: [] }]);
      };
      expect(read(7n).status).toEqual([VIRTIO_BLK_S.OK]);
      expect(Buffer.from(r.mem.read(r.area(0) + 0x10, 512)).equals(model.subarray(7 * 512, 8 * 512))).toBe(true);
      expect(dev.stats().ioThread).toBe("idle");
      // A write needs the thread: it starts, and the write and its flush are done here meanwhile.
      expect(write(9, 0x11).status).toEqual([VIRTIO_BLK_S.OK, VIRTIO_BLK_S.OK]);
      expect(dev.stats().ioThread).toBe("starting");
      expect(dev.backendFds).toHaveLength(1);
      waitIoThreadUp(dev);
      expect(ioRingStatus(ring).active).toBe(true);
      expect(ioRingStatus(ring).tid).toBeGreaterThan(0);
      expect(write(10, 0x22).status).toEqual([VIRTIO_BLK_S.OK, VIRTIO_BLK_S.OK]);
      expect(ioRingStatus(ring).completed).toBe(2);
      // Busy within the idle time: it stays.
      dev.tick();
      expect(dev.stats().ioThread).toBe("running");
      sleepMs(250);
      dev.tick();
      expect(dev.stats().ioThread).toBe("idle");
      expect(dev.backendFds).toEqual([]);
      expect(ioRingStatus(ring)).toMatchObject({ active: false, tid: 0, completed: 2 });
      // It comes back on the next need; the ring's counters run on from the first thread's.
      expect(write(11, 0x33).status).toEqual([VIRTIO_BLK_S.OK, VIRTIO_BLK_S.OK]);
      waitIoThreadUp(dev);
      expect(write(12, 0x44).status).toEqual([VIRTIO_BLK_S.OK, VIRTIO_BLK_S.OK]);
      expect(ioRingStatus(ring)).toMatchObject({ active: true, completed: 4 });
      expect(dev.stats()).toMatchObject({ writeOps: 4, readOps: 1, ioThread: "running" });
    } finally {
      dev.close();
    }
    expect(fs.readFileSync(img.file).equals(model)).toBe(true);
  });

  it("a thread needed again soon after it idled out gets twice the idle time before it ends again", () => {
    const img = image();
    const dev = new BlockDevice({ path: img.file, readonly: false, ioThread: "tv-blk-od", inMemoryFilesInline: false, ioThreadIdleMs: 300 });
    try {
      const r = rig(dev);
      const write = (sector: number) => {
        r.mem.write(r.area(0) + 0x10, Buffer.alloc(512, sector));
        expect(r.run([{ type: VIRTIO_BLK_T.OUT, sector: BigInt(sector), data: [{ addr: r.area(0) + 0x10, len: 512 }] }]).status).toEqual([VIRTIO_BLK_S.OK]);
      };
      write(1);
      waitIoThreadUp(dev);
      write(2);
      sleepMs(350);
      dev.tick();
      expect(dev.stats().ioThread).toBe("idle");
      // Needed again at once: the new thread may idle 600 ms.
      write(3);
      waitIoThreadUp(dev);
      write(4);
      sleepMs(350);
      dev.tick();
      expect(dev.stats().ioThread).toBe("running");
      sleepMs(300);
      dev.tick();
      expect(dev.stats().ioThread).toBe("idle");
    } finally {
      dev.close();
    }
  });

  it("a thread started with the device (a spare, already paid for) stays while used and ends after idling too", () => {
    const img = image();
    const dev = new BlockDevice({ path: img.file, readonly: false, ioThread: "tv-blk-od", ioThreadStart: "eager", inMemoryFilesInline: false, ioThreadIdleMs: 300 });
    try {
      const r = rig(dev);
      dev.tick();
      expect(dev.stats().ioThread).toBe("running");
      r.mem.write(r.area(0) + 0x10, Buffer.alloc(512, 0x6d));
      expect(r.run([{ type: VIRTIO_BLK_T.OUT, sector: 4n, data: [{ addr: r.area(0) + 0x10, len: 512 }] }]).status).toEqual([VIRTIO_BLK_S.OK]);
      dev.tick();
      expect(dev.stats().ioThread).toBe("running");
      sleepMs(350);
      dev.tick();
      expect(dev.stats().ioThread).toBe("idle");
      expect(fs.readFileSync(img.file).subarray(4 * 512, 5 * 512).every((b) => b === 0x6d)).toBe(true);
    } finally {
      dev.close();
    }
  });

  it("a device closed while its thread starts ends that thread, which never touched the image", () => {
    const img = image();
    const dev = new BlockDevice({ path: img.file, readonly: false, ioThread: "tv-blk-od", inMemoryFilesInline: false });
    const r = rig(dev);
    r.mem.write(r.area(0) + 0x10, Buffer.alloc(512, 0x5c));
    expect(r.run([{ type: VIRTIO_BLK_T.OUT, sector: 3n, data: [{ addr: r.area(0) + 0x10, len: 512 }] }]).status).toEqual([VIRTIO_BLK_S.OK]);
    expect(dev.stats().ioThread).toBe("starting");
    const ring = ioRing(dev.ioThreadRing!.ring);
    dev.close();
    expect(ioRingStatus(ring)).toMatchObject({ active: false, tid: 0 });
    expect(fs.readFileSync(img.file).subarray(3 * 512, 4 * 512).every((b) => b === 0x5c)).toBe(true);
  });
});

describe("virtio-blk whose I/O thread is gone", () => {
  /** A device whose I/O thread has started (stored its tid) and then ended, as a crashed worker would. */
  async function deadThread(file: string): Promise<BlockDevice> {
    const dev = onThread(file);
    // Private handles reached the way TypeScript allows for tests: the device has no "kill" API.
    const io = dev["io"]!;
    for (let waited = 0; Atomics.load(io["ring"].ctl, CTL.TID) === 0; waited += 10) {
      if (waited > 10_000) throw new Error("I/O thread did not start in 10 s");
      await new Promise((r) => setTimeout(r, 10));
    }
    expect(io.alive()).toBe(true);
    await io["worker"].terminate();
    expect(io.alive()).toBe(false);
    return dev;
  }

  it("tick() answers the requests stuck on it with IOERR, and the disk goes on without it", async () => {
    const img = image();
    const dev = await deadThread(img.file);
    try {
      const r = rig(dev);
      const fd = dev.backendFds[0]!;
      for (let i = 0; i < 3; i++) {
        r.mem.writeU32(r.area(i), VIRTIO_BLK_T.IN);
        r.mem.writeU64(r.area(i) + 8, BigInt(i));
        r.mem.writeU8(r.area(i) + 0x3ff, 0xee);
        r.drv.publish(r.drv.addChain([{ addr: r.area(i), len: 16 }, { addr: r.area(i) + 0x10, len: 512, write: true }, { addr: r.area(i) + 0x3ff, len: 1, write: true }]));
      }
      dev.notify(0);
      expect(dev.inFlight).toBe(3);
      expect(pollIn([fd], 200)).toEqual([]); // nobody will complete them
      const irqs = r.h.interrupts.length;
      dev.tick();
      expect(dev.inFlight).toBe(0);
      expect(dev.backendFds).toEqual([]);
      expect(dev.stats().ioThread).toBe("failed");
      expect([0, 1, 2].map((i) => r.mem.readU8(r.area(i) + 0x3ff))).toEqual([VIRTIO_BLK_S.IOERR, VIRTIO_BLK_S.IOERR, VIRTIO_BLK_S.IOERR]);
      expect(r.drv.takeUsed()).toEqual([{ id: 0, len: 1 }, { id: 3, len: 1 }, { id: 6, len: 1 }]);
      expect(r.h.interrupts.length).toBeGreaterThan(irqs);
      // Served on the calling thread from now on, at once.
      const { status } = r.run([{ type: VIRTIO_BLK_T.IN, sector: 7n, data: [{ addr: r.area(0) + 0x10, len: 512, write: true }] }]);
      expect(status).toEqual([VIRTIO_BLK_S.OK]);
      expect(Buffer.from(r.mem.read(r.area(0) + 0x10, 512)).equals(img.content.subarray(7 * 512, 8 * 512))).toBe(true);
      expect(r.h.resets).toEqual([]);
    } finally {
      dev.close();
    }
  });

  it("tick() leaves a live thread alone; reset does not wait forever on a dead one, and the disk goes on without it", async () => {
    const img = image();
    const live = onThread(img.file);
    try {
      const r = rig(live);
      live.tick();
      expect(r.run([{ type: VIRTIO_BLK_T.IN, sector: 1n, data: [{ addr: r.area(0) + 0x10, len: 512, write: true }] }]).status).toEqual([VIRTIO_BLK_S.OK]);
      expect(live.stats().ioThread).toBe("running");
    } finally {
      live.close();
    }
    const dev = await deadThread(img.file);
    try {
      const r = rig(dev);
      r.mem.writeU32(r.area(0), VIRTIO_BLK_T.IN);
      r.drv.publish(r.drv.addChain([{ addr: r.area(0), len: 16 }, { addr: r.area(0) + 0x10, len: 512, write: true }, { addr: r.area(0) + 0x3ff, len: 1, write: true }]));
      dev.notify(0);
      expect(dev.inFlight).toBe(1);
      const t0 = Date.now();
      dev.reset(); // one liveness wait (1 s), then it gives up on the thread
      expect(Date.now() - t0).toBeLessThan(5000);
      expect(dev.inFlight).toBe(0);
      expect(r.drv.takeUsed()).toEqual([]);
      expect(dev.stats().ioThread).toBe("failed");
      expect(dev.backendFds).toEqual([]);
      // The driver sets the device up again: requests are served on the calling thread.
      const again = rig(dev);
      expect(again.run([{ type: VIRTIO_BLK_T.IN, sector: 9n, data: [{ addr: again.area(0) + 0x10, len: 512, write: true }] }]).status).toEqual([VIRTIO_BLK_S.OK]);
      expect(Buffer.from(again.mem.read(again.area(0) + 0x10, 512)).equals(img.content.subarray(9 * 512, 10 * 512))).toBe(true);
    } finally {
      dev.close();
    }
  });
});

describe("virtio-blk on an I/O thread: snapshot", () => {
  it("save() answers the requests in flight first, so the saved cursors cover them, and raises the interrupt", () => {
    const img = image();
    const dev = onThread(img.file);
    try {
      const r = rig(dev);
      for (let i = 0; i < 8; i++) {
        r.mem.writeU32(r.area(i), VIRTIO_BLK_T.IN);
        r.mem.writeU64(r.area(i) + 8, BigInt(i));
        r.drv.publish(r.drv.addChain([{ addr: r.area(i), len: 16 }, { addr: r.area(i) + 0x10, len: 512, write: true }, { addr: r.area(i) + 0x3ff, len: 1, write: true }]));
      }
      dev.notify(0);
      const irqs = r.h.interrupts.length;
      const st = dev.save();
      expect(dev.inFlight).toBe(0);
      expect(st.queues[0]).toMatchObject({ nextAvail: 8, nextUsed: 8 });
      expect(r.drv.takeUsed()).toHaveLength(8);
      expect(r.h.interrupts.length).toBeGreaterThan(irqs);
      for (let i = 0; i < 8; i++) expect(r.mem.readU8(r.area(i) + 0x3ff)).toBe(VIRTIO_BLK_S.OK);
    } finally {
      dev.close();
    }
  });
});

describe("virtio-blk on an I/O thread, adversarial rings (property)", () => {
  const types = Object.values(VIRTIO_BLK_T);
  /** One hostile-ring case against a fresh device with its own I/O thread on `file`. */
  const fuzzOnThread = (file: string, readonly: boolean, c: Parameters<typeof runFuzzCase>[1]): void => {
    const dev = onThread(file, readonly);
    try {
      runFuzzCase(dev, c, goodRead(file), () => settle(dev));
    } finally {
      dev.close();
    }
  };
  // Fewer runs than the device-thread property: each case starts a thread.
  it("read-write disk: never throws, writes only where allowed, still serves reads", () => {
    const { file } = image();
    fc.assert(
      fc.property(fuzzCase(types), (c) => {
        fuzzOnThread(file, false, c);
        expect(fs.statSync(file).size).toBe(SECTORS * 512);
      }),
      { numRuns: 100 },
    );
  });

  it("read-only disk: the file never changes", () => {
    const { file } = image();
    const hash = sha(file);
    fc.assert(
      fc.property(fuzzCase(types), (c) => {
        fuzzOnThread(file, true, c);
        expect(sha(file)).toBe(hash);
      }),
      { numRuns: 100 },
    );
  });
});
