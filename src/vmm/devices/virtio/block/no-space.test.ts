import { execFileSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createQcow2 } from "../../../disk/qcow2/create.js";
import { pattern, qemuCheck, qemuRaw } from "../../../disk/test-disk.js";
import { featureBit, VIRTIO_F } from "../device.js";
import { QueueDriver, type DriverBuf } from "../queue/driver.js";
import { harness } from "../queue/test-fuzz.js";
import { settle } from "./test-block.js";
import { BlockDevice, VIRTIO_BLK_F, VIRTIO_BLK_S, VIRTIO_BLK_T, type NoSpaceInfo } from "./block.js";

/*
 * A disk whose host filesystem fills up mid-write (QEMU's werror=enospc): a real tmpfs with a
 * size= limit gives real ENOSPC. The write that fails is held, not completed and not failed; the
 * device takes nothing new from the ring until retryHeld(); once space is freed every write the
 * guest saw completed is in the file, and a qcow2 image is clean for qemu-img. Served on the
 * device thread (tmpfs files are, by default) and on an I/O thread (io-worker.ts from dist/:
 * `npm run build` first). Needs root, for mount(8).
 */
const dir = fs.mkdtempSync(path.join(os.tmpdir(), "tv-nospace-"));
const mnt = path.join(dir, "mnt");
const KiB = 1024;
const MiB = 1024 * KiB;
const FEATURES = featureBit(VIRTIO_F.VERSION_1) | featureBit(VIRTIO_F.INDIRECT_DESC) | featureBit(VIRTIO_BLK_F.FLUSH);

beforeAll(() => {
  fs.mkdirSync(mnt);
  // 1 MiB of tmpfs: a few dozen 32 KiB writes fill it.
  execFileSync("mount", ["-t", "tmpfs", "-o", "size=1m,mode=0700", "tv-nospace", mnt]);
});
afterAll(() => {
  try {
    execFileSync("umount", [mnt]);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

/** Write requests with data at 0x2000 (32 KiB in 4 KiB pieces), header 0x1000, status 0xf000; a read at 0xe000 with header 0x1100, status 0xf001. */
function rig(dev: BlockDevice) {
  const { h, drv } = harness(dev, FEATURES, (m) => new QueueDriver(m, 64, 0));
  dev.activate(h.ctx);
  const pieces = (at: number, len: number, write: boolean): DriverBuf[] => Array.from({ length: Math.ceil(len / 4096) }, (_, i) => ({ addr: at + i * 4096, len: Math.min(4096, len - i * 4096), write }));
  const publish = (hdr: number, status: number, type: number, sector: number, data: DriverBuf[]): void => {
    h.mem.writeU32(hdr, type);
    h.mem.writeU32(hdr + 4, 0);
    h.mem.writeU64(hdr + 8, BigInt(sector));
    h.mem.writeU8(status, 0xee);
    drv.publish(drv.addChain([{ addr: hdr, len: 16 }, ...data, { addr: status, len: 1, write: true }]));
    dev.notify(0);
    settle(dev);
  };
  return {
    h,
    drv,
    /** A write of `data` at `sector`; its status byte (0xee: not answered). */
    write(sector: number, data: Buffer): number {
      h.mem.write(0x2000, data);
      publish(0x1000, 0xf000, VIRTIO_BLK_T.OUT, sector, pieces(0x2000, data.length, false));
      return h.mem.readU8(0xf000);
    },
    /** Publish a 4 KiB read of `sector` into 0xe000 beside whatever is outstanding; its status byte. */
    read(sector: number): number {
      publish(0x1100, 0xf001, VIRTIO_BLK_T.IN, sector, pieces(0xe000, 4096, true));
      return h.mem.readU8(0xf001);
    },
    flush(): number {
      publish(0x1000, 0xf000, VIRTIO_BLK_T.FLUSH, 0, []);
      return h.mem.readU8(0xf000);
    },
  };
}

const CHUNK = 32 * KiB;
const SECTORS = CHUNK / 512;

for (const format of ["raw", "qcow2"] as const) {
  for (const where of ["the device thread", "an I/O thread"] as const) {
    describe(`a ${format} disk whose filesystem fills up, served on ${where}`, () => {
      it("holds the write that found no space, takes nothing new, and finishes it once space is freed; nothing is lost", () => {
        const tag = `${format}-${where === "an I/O thread" ? "io" : "inline"}`;
        const img = path.join(mnt, `${tag}.img`);
        // A qcow2 overlay on a base outside the full filesystem: 32 KiB writes into 64 KiB clusters copy the rest from the base.
        const base = pattern(2 * MiB, 0, 9);
        const basePath = path.join(dir, `${tag}.base`);
        if (format === "qcow2") {
          fs.writeFileSync(basePath, base);
          createQcow2(img, { size: 2 * MiB, backing: { file: basePath, format: "raw" } });
        } else {
          fs.writeFileSync(img, "");
          fs.truncateSync(img, 2 * MiB);
        }
        const model = format === "qcow2" ? Buffer.from(base) : Buffer.alloc(2 * MiB);
        // The rest of the filesystem is taken by a ballast file, so a few hundred KiB of writes fill it.
        const ballast = path.join(mnt, `${tag}.ballast`);
        fs.writeFileSync(ballast, Buffer.alloc(640 * KiB, 1));
        const stops: NoSpaceInfo[] = [];
        const dev = new BlockDevice({
          path: img, readonly: false, ...(format === "qcow2" ? { format } : {}),
          ...(where === "an I/O thread" ? { ioThread: "tv-blk-nospace", ioThreadStart: "eager", inMemoryFilesInline: false } : {}),
          onNoSpace: (i) => stops.push(i),
        });
        let heldAt = -1;
        try {
          const r = rig(dev);
          for (let i = 0; i < 48 && heldAt < 0; i++) {
            const data = pattern(CHUNK, i * CHUNK, 3);
            const st = r.write(i * SECTORS, data);
            if (st === 0xee) {
              heldAt = i;
              expect(r.drv.takeUsed()).toEqual([]);
            } else {
              expect(st).toBe(VIRTIO_BLK_S.OK);
              r.drv.takeUsed();
            }
            data.copy(model, i * CHUNK);
          }
          // It filled up, and said so once, naming the disk.
          expect(heldAt).toBeGreaterThan(0);
          expect(stops).toEqual([{ errno: "ENOSPC", op: "write", path: img }]);
          expect(dev.heldRequests).toBe(1);
          // A snapshot cannot say a request is taken and unanswered: refused until it is done.
          expect(() => dev.save()).toThrow(expect.objectContaining({ code: "DISK_HELD" }));
          // Stopped: a read published now waits in the ring.
          expect(r.read(0)).toBe(0xee);
          expect(r.drv.takeUsed()).toEqual([]);
          // Retried without space (a resume too early): held again, and said again. The read
          // may go meanwhile (the disk runs again until the write fails again: on an I/O thread it
          // is taken before that), but the write is not answered.
          dev.retryHeld();
          settle(dev);
          expect(stops.length).toBe(2);
          expect(r.h.mem.readU8(0xf000)).toBe(0xee);
          const used = r.drv.takeUsed();
          expect(used.filter((u) => u.len !== 4097)).toEqual([]);
          // Space freed: the held write and the waiting read complete.
          fs.rmSync(ballast);
          dev.retryHeld();
          settle(dev);
          expect(r.h.mem.readU8(0xf000)).toBe(VIRTIO_BLK_S.OK);
          expect(r.h.mem.readU8(0xf001)).toBe(VIRTIO_BLK_S.OK);
          expect(used.length + r.drv.takeUsed().length).toBe(2);
          expect(Buffer.from(r.h.mem.read(0xe000, 4096)).equals(model.subarray(0, 4096))).toBe(true);
          expect(dev.heldRequests).toBe(0);
          // And the disk goes on as before.
          const more = pattern(CHUNK, (heldAt + 1) * CHUNK, 4);
          expect(r.write((heldAt + 1) * SECTORS, more)).toBe(VIRTIO_BLK_S.OK);
          more.copy(model, (heldAt + 1) * CHUNK);
          expect(r.flush()).toBe(VIRTIO_BLK_S.OK);
        } finally {
          dev.close();
          fs.rmSync(ballast, { force: true });
        }
        const got = format === "qcow2" ? qemuRaw(img, path.join(dir, `${tag}.check.raw`)) : fs.readFileSync(img);
        try {
          expect(got.equals(model)).toBe(true);
          if (format === "qcow2") expect(qemuCheck(img)).toMatchObject({ status: 0 });
        } finally {
          fs.rmSync(img);
        }
      });
    });
  }
}

describe("a full filesystem without an onNoSpace listener", () => {
  it("fails the write with IOERR, as before", () => {
    const img = path.join(mnt, "plain.img");
    fs.writeFileSync(img, "");
    fs.truncateSync(img, 2 * MiB);
    const ballast = path.join(mnt, "plain.ballast");
    fs.writeFileSync(ballast, Buffer.alloc(900 * KiB, 1));
    const dev = new BlockDevice({ path: img, readonly: false });
    try {
      const r = rig(dev);
      const statuses: number[] = [];
      for (let i = 0; i < 8; i++) statuses.push(r.write(i * SECTORS, pattern(CHUNK, 0, 1)));
      expect(statuses).toContain(VIRTIO_BLK_S.IOERR);
      expect(statuses).not.toContain(0xee);
    } finally {
      dev.close();
      fs.rmSync(ballast);
      fs.rmSync(img);
    }
  });
});
