import { createHash, randomBytes } from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import fc from "fast-check";
import { afterAll, beforeEach, describe, expect, it } from "vitest";
import { isTypevisorError } from "../../../../errors.js";
import type { GuestMemory } from "../../../memory/guest-memory.js";
import { featureBit, hasFeature, VIRTIO_F } from "../device.js";
import { QueueDriver } from "../queue/driver.js";
import type { DriverBuf } from "../queue/driver.js";
import { fuzzCase, harness, runFuzzCase } from "../queue/test-fuzz.js";
import { goodRead } from "./test-requests.js";
import type { Harness } from "../queue/test-fuzz.js";
import { BlockDevice, BLOCK_CONFIG_SIZE, IO_THREAD_IDLE_MAX_FACTOR, nextIoIdleMs, VIRTIO_BLK_F, VIRTIO_BLK_S, VIRTIO_BLK_T } from "./block.js";

const dir = fs.mkdtempSync(path.join(os.tmpdir(), "tv-blk-"));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
let n = 0;
const SECTORS = 64;

function image(bytes = SECTORS * 512): { file: string; content: Buffer } {
  const file = path.join(dir, `disk${n++}.img`);
  const content = randomBytes(bytes);
  fs.writeFileSync(file, content);
  return { file, content };
}
const sha = (file: string): string => createHash("sha256").update(fs.readFileSync(file)).digest("hex");

const HDR = 0x8000;
const DATA = 0x9000;
const STATUS = 0xf000;
const ALL = featureBit(VIRTIO_F.VERSION_1) | featureBit(VIRTIO_F.INDIRECT_DESC) | featureBit(VIRTIO_F.EVENT_IDX) | (0xffffn << 0n);

function writeHeader(mem: GuestMemory, type: number, sector: bigint, at = HDR): void {
  mem.writeU32(at, type);
  mem.writeU32(at + 4, 0);
  mem.writeU64(at + 8, sector);
}

interface Rig {
  dev: BlockDevice;
  h: Harness;
  drv: QueueDriver;
  mem: GuestMemory;
  /** Submit one request and return [status, used len]. */
  submit(type: number, sector: bigint, data: DriverBuf[], opts?: { status?: boolean }): [number, number];
}

function rig(dev: BlockDevice, features = ALL): Rig {
  const { h, drv } = harness(dev, features, (m) => new QueueDriver(m, 16, 0));
  dev.activate(h.ctx);
  const mem = h.mem;
  return {
    dev,
    h,
    drv,
    mem,
    submit(type, sector, data, opts = {}) {
      writeHeader(mem, type, sector);
      mem.writeU8(STATUS, 0xee);
      const bufs: DriverBuf[] = [{ addr: HDR, len: 16 }, ...data];
      if (opts.status !== false) bufs.push({ addr: STATUS, len: 1, write: true });
      drv.publish(drv.addChain(bufs));
      dev.notify(0);
      const used = drv.takeUsed();
      if (used.length === 0) return [-1, -1];
      expect(used).toHaveLength(1);
      return [mem.readU8(STATUS), used[0]!.len];
    },
  };
}

describe("BlockDevice construction and config", () => {
  it("refuses images whose size is not a multiple of 512 (DISK_SIZE)", () => {
    const { file } = image(1000);
    let err: unknown;
    try {
      new BlockDevice({ path: file, readonly: true });
    } catch (e) {
      err = e;
    }
    expect(isTypevisorError(err) && err.code).toBe("DISK_SIZE");
  });

  it("refuses a directory, a missing file, a long serial, both path and fd", () => {
    const code = (f: () => unknown): string | false => {
      try {
        f();
        return false;
      } catch (e) {
        return isTypevisorError(e) && e.code;
      }
    };
    expect(code(() => new BlockDevice({ path: dir, readonly: true }))).toBe("DISK_TYPE");
    expect(code(() => new BlockDevice({ path: path.join(dir, "nope"), readonly: true }))).toBe("DISK_OPEN");
    expect(code(() => new BlockDevice({ path: image().file, readonly: true, serial: "x".repeat(21) }))).toBe("DISK_SERIAL");
    expect(code(() => new BlockDevice({ path: image().file, fd: 0, readonly: true }))).toBe("DISK_OPTIONS");
  });

  it("offers RO without DISCARD/WRITE_ZEROES on a read-only disk; config has capacity, seg_max, blk_size", () => {
    const ro = new BlockDevice({ path: image().file, readonly: true });
    const rw = new BlockDevice({ path: image().file, readonly: false });
    expect(hasFeature(ro.features, VIRTIO_BLK_F.RO)).toBe(true);
    expect(hasFeature(ro.features, VIRTIO_BLK_F.DISCARD)).toBe(false);
    expect(hasFeature(rw.features, VIRTIO_BLK_F.RO)).toBe(false);
    for (const b of [VIRTIO_BLK_F.DISCARD, VIRTIO_BLK_F.WRITE_ZEROES, VIRTIO_BLK_F.FLUSH, VIRTIO_BLK_F.BLK_SIZE, VIRTIO_BLK_F.SEG_MAX]) {
      expect(hasFeature(rw.features, b)).toBe(true);
    }
    expect(hasFeature(rw.features, VIRTIO_F.VERSION_1)).toBe(true);
    expect(rw.configSize).toBe(BLOCK_CONFIG_SIZE);
    expect(rw.readConfig(0, 8)).toBe(BigInt(SECTORS));
    expect(rw.readConfig(0, 4)).toBe(BigInt(SECTORS));
    expect(rw.readConfig(12, 4)).toBe(254n);
    expect(rw.readConfig(20, 4)).toBe(512n);
    expect(rw.readConfig(52, 4)).toBe(1n); // max_write_zeroes_seg
    expect(ro.readConfig(36, 4)).toBe(0n); // no discard limits without DISCARD
    expect(rw.readConfig(BLOCK_CONFIG_SIZE - 2, 4)).toBe(0n);
    expect(rw.readConfig(0, 3)).toBe(0n);
    rw.writeConfig(0, 8, 5n);
    expect(rw.readConfig(0, 8)).toBe(BigInt(SECTORS));
    ro.close();
    rw.close();
  });
});

describe("BlockDevice requests", () => {
  let img: { file: string; content: Buffer };
  beforeEach(() => {
    img = image();
  });

  it("reads sectors into split buffers byte for byte (IN), and raises the interrupt", () => {
    const r = rig(new BlockDevice({ path: img.file, readonly: true }));
    const [st, len] = r.submit(VIRTIO_BLK_T.IN, 5n, [
      { addr: DATA, len: 512, write: true },
      { addr: DATA + 0x1000, len: 1024, write: true },
    ]);
    expect(st).toBe(VIRTIO_BLK_S.OK);
    expect(len).toBe(1537);
    expect(Buffer.from(r.mem.read(DATA, 512))).toEqual(img.content.subarray(5 * 512, 6 * 512));
    expect(Buffer.from(r.mem.read(DATA + 0x1000, 1024))).toEqual(img.content.subarray(6 * 512, 8 * 512));
    expect(r.h.interrupts).toEqual([0]);
  });

  it("takes a header split over several buffers and a status at the end of a shared writable buffer", () => {
    const r = rig(new BlockDevice({ path: img.file, readonly: true }));
    writeHeader(r.mem, VIRTIO_BLK_T.IN, 7n);
    // header as 5 + 11 bytes in two places; data and status share one writable buffer.
    r.mem.write(DATA + 0x3000, r.mem.read(HDR + 5, 11));
    r.mem.writeU8(DATA + 0x2000 + 512, 0xee);
    r.drv.publish(r.drv.addChain([{ addr: HDR, len: 5 }, { addr: DATA + 0x3000, len: 11 }, { addr: DATA + 0x2000, len: 513, write: true }]));
    r.dev.notify(0);
    expect(r.drv.takeUsed()).toEqual([{ id: 0, len: 513 }]);
    expect(r.mem.readU8(DATA + 0x2000 + 512)).toBe(VIRTIO_BLK_S.OK);
    expect(Buffer.from(r.mem.read(DATA + 0x2000, 512))).toEqual(img.content.subarray(7 * 512, 8 * 512));
  });

  it("range check on 64-bit sectors matches exact arithmetic (property), and refuses without touching data", () => {
    const r = rig(new BlockDevice({ path: img.file, readonly: false }));
    const edge = fc.constantFrom(0n, BigInt(SECTORS - 2), BigInt(SECTORS - 1), BigInt(SECTORS), 2n ** 53n - 1n, 2n ** 53n, 2n ** 53n + 1n, 2n ** 55n, 2n ** 64n - 1n);
    fc.assert(
      fc.property(fc.oneof(edge, fc.bigInt({ min: 0n, max: 2n ** 64n - 1n })), fc.integer({ min: 1, max: 3 }), fc.boolean(), (sector, sectors, write) => {
        const before = fs.readFileSync(img.file);
        r.mem.fill(DATA, 512 * sectors, 0x5a);
        const [st] = r.submit(write ? VIRTIO_BLK_T.OUT : VIRTIO_BLK_T.IN, sector, [{ addr: DATA, len: 512 * sectors, write: !write }]);
        const ok = sector * 512n + BigInt(512 * sectors) <= BigInt(SECTORS * 512);
        expect(st).toBe(ok ? VIRTIO_BLK_S.OK : VIRTIO_BLK_S.IOERR);
        if (!ok) {
          // Buffer.equals, not toEqual: vitest's deep equality walks a buffer element by element,
          // which made this property take tens of seconds on a loaded machine.
          expect(fs.readFileSync(img.file).equals(before)).toBe(true);
          expect(r.mem.read(DATA, 512 * sectors).every((b) => b === 0x5a)).toBe(true);
        }
      }),
      { numRuns: 200 },
    );
  });

  it("reads a request of more than IOV_MAX buffers in full (batched preadv)", () => {
    const r = rig(new BlockDevice({ path: img.file, readonly: true }));
    writeHeader(r.mem, VIRTIO_BLK_T.IN, 3n);
    const n = 1056; // 1056 x 16 bytes = 33 sectors, over IOV_MAX (1024) buffers
    const bufs: DriverBuf[] = [{ addr: HDR, len: 16 }];
    for (let i = 0; i < n; i++) bufs.push({ addr: DATA + 16 * i, len: 16, write: true });
    bufs.push({ addr: STATUS, len: 1, write: true });
    r.drv.publish(r.drv.addIndirectChain(bufs, 0x1000));
    r.dev.notify(0);
    expect(r.drv.takeUsed()).toEqual([{ id: 0, len: 16 * n + 1 }]);
    expect(r.mem.readU8(STATUS)).toBe(VIRTIO_BLK_S.OK);
    expect(Buffer.from(r.mem.read(DATA, 16 * n))).toEqual(img.content.subarray(3 * 512, 36 * 512));
  });

  it("answers IOERR when the file was truncated under the device (short read resumed, then EOF)", () => {
    const r = rig(new BlockDevice({ path: img.file, readonly: false }));
    fs.truncateSync(img.file, 3 * 512 + 100);
    const [st] = r.submit(VIRTIO_BLK_T.IN, 2n, [
      { addr: DATA, len: 512, write: true },
      { addr: DATA + 0x1000, len: 512, write: true },
      { addr: DATA + 0x2000, len: 512, write: true },
    ]);
    expect(st).toBe(VIRTIO_BLK_S.IOERR);
    // What could be read arrived where it belongs before the device gave up.
    expect(Buffer.from(r.mem.read(DATA, 512))).toEqual(img.content.subarray(2 * 512, 3 * 512));
    expect(Buffer.from(r.mem.read(DATA + 0x1000, 100))).toEqual(img.content.subarray(3 * 512, 3 * 512 + 100));
  });

  it("writes sectors (OUT) to the file, and FLUSH succeeds", () => {
    const r = rig(new BlockDevice({ path: img.file, readonly: false }));
    const data = randomBytes(1024);
    r.mem.write(DATA, data.subarray(0, 100));
    r.mem.write(DATA + 0x800, data.subarray(100));
    const [st, len] = r.submit(VIRTIO_BLK_T.OUT, 62n, [
      { addr: DATA, len: 100 },
      { addr: DATA + 0x800, len: 924 },
    ]);
    expect([st, len]).toEqual([VIRTIO_BLK_S.OK, 1]);
    const expected = Buffer.from(img.content);
    data.copy(expected, 62 * 512);
    expect(fs.readFileSync(img.file)).toEqual(expected);
    expect(r.submit(VIRTIO_BLK_T.FLUSH, 0n, [])).toEqual([VIRTIO_BLK_S.OK, 1]);
  });

  it("counts completed reads and writes (ops and payload bytes) for GET /stats, not failed ones", () => {
    const dev = new BlockDevice({ path: img.file, readonly: false });
    const r = rig(dev);
    expect(dev.stats()).toEqual({ readBytes: 0, writeBytes: 0, readOps: 0, writeOps: 0, ioThread: "none" });
    r.submit(VIRTIO_BLK_T.IN, 0n, [{ addr: DATA, len: 1024, write: true }]);
    r.submit(VIRTIO_BLK_T.OUT, 2n, [{ addr: DATA, len: 512 }]);
    r.submit(VIRTIO_BLK_T.OUT, 3n, [{ addr: DATA, len: 1536 }]);
    r.submit(VIRTIO_BLK_T.FLUSH, 0n, []);
    expect(r.submit(VIRTIO_BLK_T.IN, BigInt(SECTORS), [{ addr: DATA, len: 512, write: true }])[0]).toBe(VIRTIO_BLK_S.IOERR);
    expect(dev.stats()).toEqual({ readBytes: 1024, writeBytes: 2048, readOps: 1, writeOps: 2, ioThread: "none" });
  });

  it("fails writes to a read-only disk with IOERR and leaves the file alone", () => {
    const before = sha(img.file);
    const r = rig(new BlockDevice({ path: img.file, readonly: true }));
    r.mem.fill(DATA, 512, 0x55);
    expect(r.submit(VIRTIO_BLK_T.OUT, 0n, [{ addr: DATA, len: 512 }])[0]).toBe(VIRTIO_BLK_S.IOERR);
    expect(r.submit(VIRTIO_BLK_T.WRITE_ZEROES, 0n, [{ addr: DATA, len: 16 }])[0]).toBe(VIRTIO_BLK_S.IOERR);
    expect(sha(img.file)).toBe(before);
  });

  it("answers IOERR for out-of-range sectors and unaligned lengths, UNSUPP for unknown types", () => {
    const r = rig(new BlockDevice({ path: img.file, readonly: false }));
    const w = (len: number): DriverBuf[] => [{ addr: DATA, len, write: true }];
    expect(r.submit(VIRTIO_BLK_T.IN, BigInt(SECTORS - 1), w(1024))[0]).toBe(VIRTIO_BLK_S.IOERR);
    expect(r.submit(VIRTIO_BLK_T.IN, BigInt(SECTORS - 1), w(512))[0]).toBe(VIRTIO_BLK_S.OK);
    expect(r.submit(VIRTIO_BLK_T.IN, (1n << 64n) - 1n, w(512))[0]).toBe(VIRTIO_BLK_S.IOERR);
    expect(r.submit(VIRTIO_BLK_T.IN, 0n, w(100))[0]).toBe(VIRTIO_BLK_S.IOERR);
    expect(r.submit(VIRTIO_BLK_T.OUT, 1n << 55n, [{ addr: DATA, len: 512 }])[0]).toBe(VIRTIO_BLK_S.IOERR);
    expect(r.submit(VIRTIO_BLK_T.OUT, 0n, [{ addr: DATA, len: 511 }])[0]).toBe(VIRTIO_BLK_S.IOERR);
    expect(r.submit(99, 0n, w(512))).toEqual([VIRTIO_BLK_S.UNSUPP, 1]);
    expect(r.submit(VIRTIO_BLK_T.GET_ID, 0n, w(20))[0]).toBe(VIRTIO_BLK_S.UNSUPP); // no serial configured
    expect(fs.readFileSync(img.file)).toEqual(img.content);
    expect(r.h.resets).toEqual([]);
  });

  it("GET_ID returns the serial padded to 20 bytes", () => {
    const r = rig(new BlockDevice({ path: img.file, readonly: true, serial: "tv-disk-1" }));
    r.mem.fill(DATA, 32, 0xaa);
    expect(r.submit(VIRTIO_BLK_T.GET_ID, 0n, [{ addr: DATA, len: 20, write: true }])[0]).toBe(VIRTIO_BLK_S.OK);
    const id = Buffer.alloc(20);
    id.write("tv-disk-1");
    expect(Buffer.from(r.mem.read(DATA, 21))).toEqual(Buffer.concat([id, Buffer.of(0xaa)]));
  });

  it("WRITE_ZEROES zeroes the range; DISCARD validates and keeps data; flags per §5.2.6.2", () => {
    const r = rig(new BlockDevice({ path: img.file, readonly: false }));
    const seg = (sector: bigint, count: number, flags: number, at = DATA): void => {
      r.mem.writeU64(at, sector);
      r.mem.writeU32(at + 8, count);
      r.mem.writeU32(at + 12, flags);
    };
    seg(10n, 3, 1);
    expect(r.submit(VIRTIO_BLK_T.WRITE_ZEROES, 0n, [{ addr: DATA, len: 16 }])[0]).toBe(VIRTIO_BLK_S.OK);
    const expected = Buffer.from(img.content);
    expected.fill(0, 10 * 512, 13 * 512);
    expect(fs.readFileSync(img.file)).toEqual(expected);

    seg(0n, 2, 0);
    expect(r.submit(VIRTIO_BLK_T.DISCARD, 0n, [{ addr: DATA, len: 16 }])[0]).toBe(VIRTIO_BLK_S.OK);
    seg(0n, 2, 1); // unmap on discard
    expect(r.submit(VIRTIO_BLK_T.DISCARD, 0n, [{ addr: DATA, len: 16 }])[0]).toBe(VIRTIO_BLK_S.UNSUPP);
    seg(0n, 2, 4); // unknown flag
    expect(r.submit(VIRTIO_BLK_T.WRITE_ZEROES, 0n, [{ addr: DATA, len: 16 }])[0]).toBe(VIRTIO_BLK_S.UNSUPP);
    seg(BigInt(SECTORS - 1), 2, 0); // past the end
    expect(r.submit(VIRTIO_BLK_T.WRITE_ZEROES, 0n, [{ addr: DATA, len: 16 }])[0]).toBe(VIRTIO_BLK_S.IOERR);
    seg(0n, 1, 0);
    seg(4n, 1, 0, DATA + 16); // two segments, max_write_zeroes_seg is 1
    expect(r.submit(VIRTIO_BLK_T.WRITE_ZEROES, 0n, [{ addr: DATA, len: 32 }])[0]).toBe(VIRTIO_BLK_S.IOERR);
    expect(r.submit(VIRTIO_BLK_T.DISCARD, 0n, [{ addr: DATA, len: 24 }])[0]).toBe(VIRTIO_BLK_S.IOERR);
    expect(fs.readFileSync(img.file)).toEqual(expected);
  });

  it("without negotiated FLUSH, writes still land (writethrough)", () => {
    const r = rig(new BlockDevice({ path: img.file, readonly: false }), featureBit(VIRTIO_F.VERSION_1));
    r.mem.fill(DATA, 512, 7);
    expect(r.submit(VIRTIO_BLK_T.OUT, 0n, [{ addr: DATA, len: 512 }])[0]).toBe(VIRTIO_BLK_S.OK);
    expect(fs.readFileSync(img.file).subarray(0, 512)).toEqual(Buffer.alloc(512, 7));
  });

  it("serves a request in an indirect table", () => {
    const r = rig(new BlockDevice({ path: img.file, readonly: true }));
    writeHeader(r.mem, VIRTIO_BLK_T.IN, 2n);
    const head = r.drv.addIndirectChain(
      [
        { addr: HDR, len: 16 },
        { addr: DATA, len: 512, write: true },
        { addr: STATUS, len: 1, write: true },
      ],
      0x7000,
    );
    r.drv.publish(head);
    r.dev.notify(0);
    expect(r.drv.takeUsed()).toEqual([{ id: head, len: 513 }]);
    expect(Buffer.from(r.mem.read(DATA, 512))).toEqual(img.content.subarray(1024, 1536));
  });

  it("asks for reset on a request with no status byte or a short header, and stops that queue", () => {
    for (const bad of ["status", "header"] as const) {
      const r = rig(new BlockDevice({ path: img.file, readonly: true }));
      if (bad === "status") {
        expect(r.submit(VIRTIO_BLK_T.IN, 0n, [{ addr: DATA, len: 512 }], { status: false })).toEqual([-1, -1]);
      } else {
        r.drv.publish(r.drv.addChain([{ addr: HDR, len: 8 }, { addr: STATUS, len: 1, write: true }]));
        r.dev.notify(0);
      }
      expect(r.h.resets).toHaveLength(1);
      expect(r.submit(VIRTIO_BLK_T.IN, 0n, [{ addr: DATA, len: 512, write: true }])).toEqual([-1, -1]);
      expect(r.h.resets).toHaveLength(1);
      // After the driver resets the device, it works again.
      r.dev.reset();
      r.mem.fill(0, QueueDriver.footprint(16));
      const drv = new QueueDriver(r.mem, 16, 0);
      r.dev.activate(r.h.ctx);
      writeHeader(r.mem, VIRTIO_BLK_T.IN, 1n);
      drv.publish(drv.addChain([{ addr: HDR, len: 16 }, { addr: DATA, len: 512, write: true }, { addr: STATUS, len: 1, write: true }]));
      r.dev.notify(0);
      expect(drv.takeUsed()).toHaveLength(1);
      expect(r.mem.readU8(STATUS)).toBe(VIRTIO_BLK_S.OK);
    }
  });

  it("EVENT_IDX: no interrupt until used_event is reached", () => {
    const r = rig(new BlockDevice({ path: img.file, readonly: true }));
    r.drv.setUsedEvent(1);
    r.submit(VIRTIO_BLK_T.IN, 0n, [{ addr: DATA, len: 512, write: true }]);
    expect(r.h.interrupts).toEqual([]);
    r.submit(VIRTIO_BLK_T.IN, 0n, [{ addr: DATA, len: 512, write: true }]);
    expect(r.h.interrupts).toEqual([0]);
    expect(r.drv.availEvent).toBe(2);
  });

  it("save/restore continues where the queue was", () => {
    const r = rig(new BlockDevice({ path: img.file, readonly: true }));
    r.submit(VIRTIO_BLK_T.IN, 0n, [{ addr: DATA, len: 512, write: true }]);
    const state = JSON.parse(JSON.stringify(r.dev.save())) as ReturnType<BlockDevice["save"]>;
    expect(state.queues[0]).toMatchObject({ nextAvail: 1, nextUsed: 1 });
    const dev2 = new BlockDevice({ path: img.file, readonly: true });
    dev2.restore(r.h.ctx, state);
    writeHeader(r.mem, VIRTIO_BLK_T.IN, 3n);
    r.drv.publish(r.drv.addChain([{ addr: HDR, len: 16 }, { addr: DATA, len: 512, write: true }, { addr: STATUS, len: 1, write: true }]));
    dev2.notify(0);
    expect(r.drv.takeUsed()).toHaveLength(1);
    expect(Buffer.from(r.mem.read(DATA, 512))).toEqual(img.content.subarray(3 * 512, 4 * 512));
  });
});

describe("BlockDevice on adversarial rings (property)", () => {
  const types = Object.values(VIRTIO_BLK_T);
  it("read-only disk: never throws, writes only where allowed, never modifies the file", () => {
    const { file } = image();
    const hash = sha(file);
    fc.assert(
      fc.property(fuzzCase(types), (c) => {
        const dev = new BlockDevice({ path: file, readonly: true, serial: "fuzz" });
        try {
          runFuzzCase(dev, c, goodRead(file));
        } finally {
          dev.close();
        }
        expect(sha(file)).toBe(hash);
      }),
      { numRuns: 200 },
    );
  });

  it("read-write disk: never throws, writes only where allowed, still serves reads", () => {
    const { file } = image();
    fc.assert(
      fc.property(fuzzCase(types), (c) => {
        const dev = new BlockDevice({ path: file, readonly: false });
        try {
          runFuzzCase(dev, c, goodRead(file));
        } finally {
          dev.close();
        }
        expect(fs.statSync(file).size).toBe(SECTORS * 512);
      }),
      { numRuns: 200 },
    );
  });
});

describe("an on-demand I/O thread's idle time (nextIoIdleMs)", () => {
  it("doubles for a thread needed again within its idle time, halves back otherwise, and stays within [base, 32 x base]", () => {
    const base = 10_000;
    expect(nextIoIdleMs(base, base, Infinity)).toBe(base); // the first thread
    expect(nextIoIdleMs(base, base, 2_000)).toBe(20_000); // a write 12 s after the last: its thread ended 2 s before
    expect(nextIoIdleMs(20_000, base, 2_000)).toBe(40_000);
    expect(nextIoIdleMs(320_000, base, 1)).toBe(320_000); // the cap
    expect(nextIoIdleMs(40_000, base, 60_000)).toBe(20_000); // quiet for longer than it waited
    expect(nextIoIdleMs(base, base, 60_000)).toBe(base);
    expect(nextIoIdleMs(Infinity, Infinity, 0)).toBe(Infinity); // never ends
    // Whatever the gaps, it stays in bounds; a guest writing every P ms stops restarting the thread after a few starts.
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 60_000 }), fc.array(fc.integer({ min: 0, max: 10_000_000 }), { maxLength: 50 }), (b, gaps) => {
        let idle = b;
        for (const g of gaps) {
          idle = nextIoIdleMs(idle, b, g);
          if (idle < b || idle > b * IO_THREAD_IDLE_MAX_FACTOR) return false;
        }
        return true;
      }),
    );
    // A guest that writes every 12 s, against a 10 s base: its thread ends 10 s after a write and is
    // needed 2 s later; from the second start on it may idle 20 s and so stays.
    let idle = base;
    let starts = 0;
    let alive = false;
    let lastEnd = -Infinity;
    for (let t = 0; t < 600_000; t += 12_000) {
      if (alive && 12_000 >= idle) {
        alive = false;
        lastEnd = t - 12_000 + idle;
      }
      if (!alive) {
        idle = nextIoIdleMs(idle, base, t - lastEnd);
        alive = true;
        starts++;
      }
    }
    expect(starts).toBe(2);
  });
});
