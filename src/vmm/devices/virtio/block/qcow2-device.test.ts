import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { createQcow2 } from "../../../disk/qcow2/create.js";
import { pattern, qemuCheck, qemuImg } from "../../../disk/test-disk.js";
import { featureBit, hasFeature, VIRTIO_F } from "../device.js";
import { QueueDriver, type DriverBuf } from "../queue/driver.js";
import { harness } from "../queue/test-fuzz.js";
import { settle, sleepMs, waitIoThreadUp } from "./test-block.js";
import { BlockDevice, VIRTIO_BLK_F, VIRTIO_BLK_S, VIRTIO_BLK_T } from "./block.js";

/*
 * virtio-blk over a qcow2 overlay on a raw base, on the device thread and on a real I/O thread
 * (io-worker.ts from dist/: `npm run build` first, as `npm test` does); qemu-img judges the file.
 */
const dir = fs.mkdtempSync(path.join(os.tmpdir(), "tv-blkq-"));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
let n = 0;
const MiB = 1024 * 1024;
const FEATURES = featureBit(VIRTIO_F.VERSION_1) | featureBit(VIRTIO_F.INDIRECT_DESC) | featureBit(VIRTIO_BLK_F.FLUSH) | featureBit(VIRTIO_BLK_F.WRITE_ZEROES) | featureBit(VIRTIO_BLK_F.DISCARD);

function overlay(): { img: string; base: Buffer } {
  const basePath = path.join(dir, `base${n}.raw`);
  const base = pattern(2 * MiB, 0, 5);
  fs.writeFileSync(basePath, base);
  const img = path.join(dir, `ov${n++}.qcow2`);
  createQcow2(img, { size: 4 * MiB, backing: { file: path.basename(basePath), format: "raw" } });
  return { img, base };
}

/** `qemu-img check` finds the image clean, and QEMU reads it as `model`. */
function qemuAgrees(img: string, model: Buffer): void {
  expect(qemuCheck(img).status).toBe(0);
  const raw = path.join(dir, `check${n++}.raw`);
  qemuImg(["convert", "-f", "qcow2", "-O", "raw", img, raw]);
  expect(fs.readFileSync(raw).equals(model)).toBe(true);
}

/** One request at a time: header at 0x1000, data from 0x2000 (up to 48 KiB in 4 KiB pieces), status at 0xf000. */
function rig(dev: BlockDevice) {
  const { h, drv } = harness(dev, FEATURES, (m) => new QueueDriver(m, 64, 0));
  dev.activate(h.ctx);
  const req = (type: number, sector: number, data: DriverBuf[]): number => {
    h.mem.writeU32(0x1000, type);
    h.mem.writeU32(0x1004, 0);
    h.mem.writeU64(0x1008, BigInt(sector));
    h.mem.writeU8(0xf000, 0xee);
    drv.publish(drv.addChain([{ addr: 0x1000, len: 16 }, ...data, { addr: 0xf000, len: 1, write: true }]));
    dev.notify(0);
    settle(dev);
    drv.takeUsed();
    return h.mem.readU8(0xf000);
  };
  const pieces = (len: number, write: boolean): DriverBuf[] => Array.from({ length: Math.ceil(len / 4096) }, (_, i) => ({ addr: 0x2000 + i * 4096, len: Math.min(4096, len - i * 4096), write }));
  return {
    write(sector: number, data: Buffer): number {
      h.mem.write(0x2000, data);
      return req(VIRTIO_BLK_T.OUT, sector, pieces(data.length, false));
    },
    read(sector: number, len: number): Buffer {
      expect(req(VIRTIO_BLK_T.IN, sector, pieces(len, true))).toBe(VIRTIO_BLK_S.OK);
      return Buffer.from(h.mem.read(0x2000, len));
    },
    segment(type: number, sector: number, sectors: number, flags = 0): number {
      h.mem.writeU64(0x2000, BigInt(sector));
      h.mem.writeU32(0x2008, sectors);
      h.mem.writeU32(0x200c, flags);
      return req(type, 0, [{ addr: 0x2000, len: 16 }]);
    },
    flush: () => req(VIRTIO_BLK_T.FLUSH, 0, []),
  };
}

for (const where of ["the device thread", "an I/O thread"] as const) {
  describe(`virtio-blk on a qcow2 overlay, served on ${where}`, () => {
    const open = (img: string, readonly = false) =>
      new BlockDevice({ path: img, format: "qcow2", readonly, ...(where === "an I/O thread" ? { ioThread: "tv-blk-q", ioThreadStart: "eager", inMemoryFilesInline: false } : {}) });

    it("shows the virtual size, reads the backing file through, writes copy on write, zeroes and discards free clusters; qemu-img agrees", () => {
      const { img, base } = overlay();
      const model = Buffer.alloc(4 * MiB);
      base.copy(model);
      const dev = open(img);
      try {
        expect(dev.capacityBytes).toBe(4 * MiB);
        expect(hasFeature(dev.features, VIRTIO_BLK_F.DISCARD)).toBe(true);
        const r = rig(dev);
        expect(r.read(10, 8192).equals(model.subarray(5120, 5120 + 8192))).toBe(true);
        // A 6 KiB write across a cluster edge inside the backed part, then one past the base's end.
        const a = pattern(6144, 1, 7);
        expect(r.write(124, a)).toBe(VIRTIO_BLK_S.OK);
        a.copy(model, 124 * 512);
        const b = pattern(40960, 2, 8);
        expect(r.write(5000, b)).toBe(VIRTIO_BLK_S.OK);
        b.copy(model, 5000 * 512);
        expect(r.read(120, 8192).equals(model.subarray(120 * 512, 120 * 512 + 8192))).toBe(true);
        // Zero one whole cluster and a partial range; discard another whole cluster.
        expect(r.segment(VIRTIO_BLK_T.WRITE_ZEROES, 256, 256)).toBe(VIRTIO_BLK_S.OK);
        model.fill(0, 256 * 512, 512 * 512);
        expect(r.segment(VIRTIO_BLK_T.WRITE_ZEROES, 130, 3)).toBe(VIRTIO_BLK_S.OK);
        model.fill(0, 130 * 512, 133 * 512);
        expect(r.segment(VIRTIO_BLK_T.DISCARD, 1024, 128)).toBe(VIRTIO_BLK_S.OK);
        // What a discarded range reads is the device's choice.
        r.read(1024, 32768).copy(model, 1024 * 512);
        r.read(1088, 32768).copy(model, 1088 * 512);
        expect(r.flush()).toBe(VIRTIO_BLK_S.OK);
        expect(r.read(0, 49152).equals(model.subarray(0, 49152))).toBe(true);
      } finally {
        dev.close();
      }
      qemuAgrees(img, model);
      // The base was never written.
      expect(fs.readFileSync(path.join(dir, `base${n - 2}.raw`)).equals(base)).toBe(true);
    });

    it("a write without FLUSH negotiated is on disk when it completes (writethrough), metadata included", () => {
      const { img } = overlay();
      const dev = open(img);
      try {
        const { h, drv } = harness(dev, FEATURES & ~featureBit(VIRTIO_BLK_F.FLUSH), (m) => new QueueDriver(m, 16, 0));
        dev.activate(h.ctx);
        h.mem.writeU32(0x1000, VIRTIO_BLK_T.OUT);
        h.mem.writeU64(0x1008, 2048n);
        h.mem.write(0x2000, Buffer.alloc(4096, 0x42));
        drv.publish(drv.addChain([{ addr: 0x1000, len: 16 }, { addr: 0x2000, len: 4096 }, { addr: 0xf000, len: 1, write: true }]));
        dev.notify(0);
        settle(dev);
        expect(h.mem.readU8(0xf000)).toBe(VIRTIO_BLK_S.OK);
        // Without closing the device: QEMU already sees the write.
        const raw = path.join(dir, `wt${n++}.raw`);
        qemuImg(["convert", "-U", "-f", "qcow2", "-O", "raw", img, raw]);
        expect(fs.readFileSync(raw).subarray(2048 * 512, 2048 * 512 + 4096).every((x) => x === 0x42)).toBe(true);
      } finally {
        dev.close();
      }
    });

    it("two devices on one file, as a live migration's two ends: after the first's flushNow() and the second's reopen(), the second reads every write and allocates past them", () => {
      const { img, base } = overlay();
      const model = Buffer.alloc(4 * MiB);
      base.copy(model);
      const a = open(img);
      // The destination opens the file at HELLO, while the source still writes it.
      const b = open(img);
      try {
        const ra = rig(a);
        // A new cluster and its L2 table: in a's cache only, until its flush.
        const w1 = pattern(32768, 0, 11);
        expect(ra.write(0, w1)).toBe(VIRTIO_BLK_S.OK);
        w1.copy(model, 0);
        expect(a.flushNow()).toBe(0);
        expect(b.reopen()).toBe(0);
        const rb = rig(b);
        expect(rb.read(0, 32768).equals(w1)).toBe(true);
        // A cluster b allocates now lies past a's: neither overwrites the other.
        const w2 = pattern(32768, 3 * MiB, 12);
        expect(rb.write((3 * MiB) / 512, w2)).toBe(VIRTIO_BLK_S.OK);
        w2.copy(model, 3 * MiB);
        expect(rb.flush()).toBe(VIRTIO_BLK_S.OK);
        expect(rb.read(0, 32768).equals(w1)).toBe(true);
      } finally {
        // The source ends after the destination runs: it has nothing left to write.
        a.close();
        b.close();
      }
      expect(qemuCheck(img).status).toBe(0);
      const raw = path.join(dir, `two${n++}.raw`);
      qemuImg(["convert", "-f", "qcow2", "-O", "raw", img, raw]);
      expect(fs.readFileSync(raw).equals(model)).toBe(true);
    });

    it("a read-only overlay offers RO, fails writes, and leaves the file as it was", () => {
      const { img } = overlay();
      const before = fs.readFileSync(img);
      const dev = open(img, true);
      try {
        expect(hasFeature(dev.features, VIRTIO_BLK_F.RO)).toBe(true);
        const r = rig(dev);
        expect(r.write(0, Buffer.alloc(512, 1))).toBe(VIRTIO_BLK_S.IOERR);
      } finally {
        dev.close();
      }
      expect(fs.readFileSync(img).equals(before)).toBe(true);
    });
  });
}

describe("virtio-blk refuses to guess a format", () => {
  it("an on-demand I/O thread takes the image over from the device thread and gives it back after idling, the tables written back each time; qemu-img agrees", () => {
    const { img, base } = overlay();
    const model = Buffer.alloc(4 * MiB);
    base.copy(model);
    const dev = new BlockDevice({ path: img, format: "qcow2", readonly: false, ioThread: "tv-blk-od", inMemoryFilesInline: false, ioThreadIdleMs: 200 });
    const put = (r: ReturnType<typeof rig>, sector: number, len: number, seed: number) => {
      const d = pattern(len, seed, 3);
      expect(r.write(sector, d)).toBe(VIRTIO_BLK_S.OK);
      d.copy(model, sector * 512);
    };
    const same = (r: ReturnType<typeof rig>) => {
      for (const [sector, len] of [[0, 49152], [120, 8192], [5000, 40960]] as const) expect(r.read(sector, len).equals(model.subarray(sector * 512, sector * 512 + len))).toBe(true);
    };
    try {
      expect(dev.stats().ioThread).toBe("idle");
      expect(dev.backendFds).toEqual([]);
      const r = rig(dev);
      // The first request starts the thread and is done here meanwhile, on the device thread's tables.
      put(r, 124, 6144, 1);
      expect(dev.stats().ioThread).toBe("starting");
      put(r, 5000, 8192, 2);
      waitIoThreadUp(dev);
      // The thread read the tables the device thread wrote back at the hand-over.
      same(r);
      put(r, 5016, 20480, 3);
      expect(r.flush()).toBe(VIRTIO_BLK_S.OK);
      same(r);
      sleepMs(250);
      dev.tick();
      expect(dev.stats().ioThread).toBe("idle");
      expect(dev.backendFds).toEqual([]);
      expect(dev.ioThreadRing).toBeDefined();
      // Back on the device thread, from the tables the thread wrote back as it ended.
      same(r);
      put(r, 200, 4096, 4);
      waitIoThreadUp(dev);
      put(r, 300, 16384, 5);
      same(r);
    } finally {
      dev.close();
    }
    qemuAgrees(img, model);
  });

  it("a qcow2 file opened without format=qcow2 is refused with a hint", () => {
    const { img } = overlay();
    expect(() => new BlockDevice({ path: img, readonly: false })).toThrow(expect.objectContaining({ code: "DISK_FORMAT", hint: expect.stringContaining("format=qcow2") }));
  });
});
