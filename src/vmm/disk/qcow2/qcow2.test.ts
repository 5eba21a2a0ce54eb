/**
 * Our qcow2 against QEMU's: images qemu-img makes read as QEMU reads them, images we write pass
 * `qemu-img check` and convert back to what we wrote. qemu-img is Debian's (qemu-utils).
 */
import { execFileSync } from "node:child_process";
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, writeFileSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { afterAll, describe, expect, it } from "vitest";
import type { DiskBackend } from "../backend.js";
import { backendFromInit, openDisk, type OpenDisk } from "../open.js";
import { io, pattern, qemuCheck, qemuImg, qemuRaw, readAll } from "../test-disk.js";
import { createQcow2 } from "./create.js";

const dir = mkdtempSync(join(tmpdir(), "tv-qcow2-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;
const file = (name: string) => join(dir, `${n++}-${name}`);

function open(path: string, readonly: boolean, format: "qcow2" | "raw" = "qcow2"): { disk: OpenDisk; b: DiskBackend; done: () => void } {
  const disk = openDisk(path, { format, readonly });
  const b = backendFromInit(disk.init);
  return {
    disk,
    b,
    done: () => {
      b.close();
      disk.close();
    },
  };
}

const MiB = 1024 * 1024;

describe("qcow2 images QEMU made read as QEMU reads them", () => {
  const raw = file("base.raw");
  // 8 MiB: patterned first half with a zero hole in the middle, then zeros.
  const content = Buffer.concat([pattern(3 * MiB, 0, 1), Buffer.alloc(MiB), pattern(MiB - 4096, 4 * MiB, 2), Buffer.alloc(3 * MiB + 4096)]);
  writeFileSync(raw, content);

  for (const [name, opts] of [
    ["64 KiB clusters", ["-o", "cluster_size=65536"]],
    ["2 MiB clusters", ["-o", "cluster_size=2097152"]],
    ["512 B clusters", ["-o", "cluster_size=512"]],
    ["compressed", ["-c"]],
    ["version 2 (compat=0.10)", ["-o", "compat=0.10"]],
    ["8-bit refcounts", ["-o", "refcount_bits=8"]],
  ] as const) {
    it(`qemu-img convert ${name}`, () => {
      const img = file("img.qcow2");
      qemuImg(["convert", "-f", "raw", "-O", "qcow2", ...opts, raw, img]);
      const { b, done } = open(img, true);
      try {
        expect(b.capacity).toBe(content.length);
        expect(readAll(b, 0, content.length).equals(content)).toBe(true);
        // Unaligned pieces across cluster edges.
        expect(readAll(b, 3 * MiB - 1536, 8192).equals(content.subarray(3 * MiB - 1536, 3 * MiB - 1536 + 8192))).toBe(true);
      } finally {
        done();
      }
    });
  }

  it("zero clusters and a raw backing file, as qemu-io wrote them", () => {
    const img = file("overlay.qcow2");
    qemuImg(["create", "-f", "qcow2", "-b", raw, "-F", "raw", img]);
    execQemuIo(img, ["write -P 0x5a 1M 64k", "write -z 2M 128k", "write -P 0x11 7M 4k"]);
    const expected = qemuRaw(img, file("raw"));
    const { b, done } = open(img, true);
    try {
      expect(readAll(b, 0, content.length).equals(expected)).toBe(true);
    } finally {
      done();
    }
  });
});

function execQemuIo(img: string, cmds: string[]): void {
  const args = ["-f", "qcow2"];
  for (const c of cmds) args.push("-c", c);
  args.push(img);
  execFileSync("qemu-io", args, { stdio: "ignore", timeout: 60_000 });
}

describe("qcow2 images we write pass qemu-img check and read back in QEMU", () => {
  it("an empty image we create is clean and has the size and backing it was given", () => {
    const base = file("base.raw");
    writeFileSync(base, pattern(MiB, 0, 3));
    const img = file("new.qcow2");
    createQcow2(img, { size: 64 * MiB, backing: { file: base, format: "raw" } });
    expect(qemuCheck(img).status).toBe(0);
    const info = JSON.parse(qemuImg(["info", "--output=json", img])) as { "virtual-size": number; "backing-filename": string; "backing-filename-format": string };
    expect(info["virtual-size"]).toBe(64 * MiB);
    expect(info["backing-filename"]).toBe(base);
    expect(info["backing-filename-format"]).toBe("raw");
    expect(statSync(img).size).toBeLessThan(1024 * 1024);
  });

  for (const [name, clusterBits, refcountOrder] of [
    ["64 KiB clusters, 16-bit refcounts", 16, 4],
    ["512 B clusters (the refcount table grows)", 9, 4],
    ["4 KiB clusters, 1-bit refcounts", 12, 0],
    ["2 MiB clusters, 64-bit refcounts", 21, 6],
  ] as const) {
    it(`random writes, zeroes and discards over a backing file: ${name}`, () => {
      const size = 6 * MiB;
      const base = file("base.qcow2");
      const baseRaw = file("base.raw");
      writeFileSync(baseRaw, pattern(4 * MiB, 0, 9));
      qemuImg(["convert", "-f", "raw", "-O", "qcow2", baseRaw, base]);
      fc.assert(
        fc.property(
          fc.array(
            fc.record({
              op: fc.constantFrom("write", "write", "write", "zero", "discard", "flush", "reopen"),
              sector: fc.integer({ min: 0, max: size / 512 - 1 }),
              sectors: fc.integer({ min: 1, max: 600 }),
              seed: fc.integer({ min: 1, max: 1000 }),
            }),
            { minLength: 1, maxLength: 25 },
          ),
          (ops) => {
            const img = file("ov.qcow2");
            createQcow2(img, { size, clusterBits, refcountOrder, backing: { file: base, format: "qcow2" } });
            const model = Buffer.alloc(size);
            readFileSync(baseRaw).copy(model);
            let h = open(img, false);
            try {
              for (const o of ops) {
                const pos = o.sector * 512;
                const len = Math.min(o.sectors * 512, size - pos);
                if (o.op === "write") {
                  const data = pattern(len, pos, o.seed);
                  expect(io(h.b, data, pos, true)).toBe(0);
                  data.copy(model, pos);
                } else if (o.op === "zero") {
                  expect(h.b.writeZeroes(pos, len)).toBe(0);
                  model.fill(0, pos, pos + len);
                } else if (o.op === "discard") {
                  expect(h.b.discard(pos, len)).toBe(0);
                  // What a discarded range reads is unspecified: take what we read as the model's.
                  readAll(h.b, pos, len).copy(model, pos);
                } else if (o.op === "flush") {
                  expect(h.b.flush()).toBe(0);
                } else {
                  h.done();
                  h = open(img, false);
                }
              }
              expect(readAll(h.b, 0, size).equals(model)).toBe(true);
            } finally {
              h.done();
            }
            const check = qemuCheck(img);
            expect(check.report, JSON.stringify(check.report)).toMatchObject({ "check-errors": 0 });
            expect(check.status).toBe(0);
            expect(qemuRaw(img, file("raw")).equals(model)).toBe(true);
            rmSync(img);
          },
        ),
        { numRuns: clusterBits === 21 ? 5 : 15 },
      );
    });
  }
});

describe("what openDisk refuses", () => {
  it("a qcow2 file given without a format (a raw disk the guest wrote a header into must not become qcow2)", () => {
    const img = file("q.qcow2");
    createQcow2(img, { size: MiB });
    expect(() => openDisk(img, { readonly: false })).toThrow(expect.objectContaining({ code: "DISK_FORMAT", hint: expect.stringContaining("format=qcow2") }));
    // Said to be raw, it is a raw disk: its bytes, header and all.
    const h = open(img, false, "raw");
    expect(h.b.capacity).toBe(statSync(img).size);
    h.done();
  });

  it("a backing chain that loops", () => {
    const a = file("a.qcow2");
    const b = file("b.qcow2");
    createQcow2(a, { size: MiB, backing: { file: b, format: "qcow2" } });
    createQcow2(b, { size: MiB, backing: { file: a, format: "qcow2" } });
    expect(() => openDisk(a, { format: "qcow2", readonly: true })).toThrow(expect.objectContaining({ code: "DISK_CHAIN" }));
  });

  it("a missing backing file, named relative to the overlay", () => {
    const a = file("a.qcow2");
    createQcow2(a, { size: MiB, backing: { file: "no-such-base.raw", format: "raw" } });
    expect(() => openDisk(a, { format: "qcow2", readonly: true })).toThrow(/no-such-base\.raw/);
  });

  it("writing a version 2 image, a dirty one, or one with internal snapshots", () => {
    const v2 = file("v2.qcow2");
    qemuImg(["create", "-f", "qcow2", "-o", "compat=0.10", v2, "1M"]);
    expect(() => open(v2, false)).toThrow(expect.objectContaining({ code: "DISK_FORMAT", message: expect.stringContaining("version 2") }));
    open(v2, true).done();
    const snap = file("snap.qcow2");
    qemuImg(["create", "-f", "qcow2", snap, "1M"]);
    qemuImg(["snapshot", "-c", "s1", snap]);
    expect(() => open(snap, false)).toThrow(/internal snapshots/);
    const dirty = file("dirty.qcow2");
    createQcow2(dirty, { size: MiB });
    const fd = openSync(dirty, "r+");
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(1n);
    writeSync(fd, b, 0, b.length, 72);
    closeSync(fd);
    expect(() => open(dirty, false)).toThrow(/dirty/);
  });
});

describe("dataRanges: what a copy of a disk must send", () => {
  it("lists data and compressed clusters and the backing file's data under unallocated ones; zero clusters and holes are left out; everything else reads as zeros", () => {
    // A sparse raw base: data at [0, 1 MiB) and [5 MiB, 5.5 MiB), a hole between.
    const base = file("ranges-base.raw");
    writeFileSync(base, "");
    const fd = openSync(base, "r+");
    writeSync(fd, pattern(MiB, 0, 7), 0, MiB, 0);
    writeSync(fd, pattern(MiB / 2, 5 * MiB, 8), 0, MiB / 2, 5 * MiB);
    closeSync(fd);
    execFileSync("truncate", ["-s", "6M", base]);
    const img = file("ranges.qcow2");
    qemuImg(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, img, "16M"]);
    // QEMU writes: data at 3 MiB (allocated, over the base's hole), zeroes the base's first 128 KiB
    // (zero clusters), data past the base's end at 10 MiB.
    execFileSync("qemu-io", ["-f", "qcow2", "-c", "write -P 0x33 3M 128k", "-c", "write -z 0 128k", "-c", "write -P 0x44 10M 64k", img], { timeout: 30_000 });
    const { b, done } = open(img, true);
    try {
      const ranges = b.dataRanges(0, b.capacity);
      expect(ranges).toEqual([
        { offset: 128 * 1024, length: MiB - 128 * 1024 },
        { offset: 3 * MiB, length: 128 * 1024 },
        { offset: 5 * MiB, length: MiB / 2 },
        { offset: 10 * MiB, length: 64 * 1024 },
      ]);
      // Outside the ranges the disk reads as zeros; a window in the middle clips.
      const all = readAll(b, 0, b.capacity);
      const covered = Buffer.alloc(all.length);
      for (const r of ranges) all.copy(covered, r.offset, r.offset, r.offset + r.length);
      expect(covered.equals(all)).toBe(true);
      expect(b.dataRanges(3 * MiB + 4096, MiB)).toEqual([{ offset: 3 * MiB + 4096, length: 128 * 1024 - 4096 }]);
    } finally {
      done();
    }
    // The raw base alone: its extents (tmpfs and ext4 report holes; a filesystem that does not lists it whole).
    const r = open(base, true, "raw");
    try {
      const ranges = r.b.dataRanges(0, r.b.capacity);
      expect(ranges[0]?.offset).toBe(0);
      const all = readAll(r.b, 0, r.b.capacity);
      const covered = Buffer.alloc(all.length);
      for (const x of ranges) all.copy(covered, x.offset, x.offset, x.offset + x.length);
      expect(covered.equals(all)).toBe(true);
    } finally {
      r.done();
    }
  });
});
