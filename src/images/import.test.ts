import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdtempSync, openSync, closeSync, readdirSync, readFileSync, rmSync, writeFileSync, writeSync, readSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { pattern, qemuImg } from "../vmm/disk/test-disk.js";
import { importImage, listDiskImages, loadDiskImage } from "./import.js";

/*
 * `image import`: images made by qemu-img come in as they are; a hostile file (a backing file
 * naming a host file, a crafted table, a size that is not whole sectors, a FIFO) is refused and
 * leaves nothing in the store.
 */
const dir = mkdtempSync(join(tmpdir(), "tv-import-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const home = join(dir, "home");
const MiB = 1024 * 1024;
let n = 0;

async function refused(p: Promise<unknown>): Promise<{ code: string; message: string }> {
  try {
    await p;
  } catch (e) {
    return { code: (e as { code: string }).code, message: (e as Error).message };
  }
  throw new Error("not refused");
}

/** A qcow2 image qemu-img made from a 2 MiB raw pattern. */
function qcow2(): { file: string; raw: Buffer } {
  const raw = pattern(2 * MiB, 0, 11);
  const r = join(dir, `src${n}.raw`);
  writeFileSync(r, raw);
  const file = join(dir, `src${n++}.qcow2`);
  qemuImg(["convert", "-f", "raw", "-O", "qcow2", r, file]);
  return { file, raw };
}

const storeIsClean = (): void => expect(readdirSync(join(home, "images")).filter((f) => f.startsWith("."))).toEqual([]);

describe("image import", () => {
  it("takes a qcow2 image qemu-img made (format detected), checks it, and stores it with its virtual size", async () => {
    const { file, raw } = qcow2();
    const m = await importImage("cloud", file, { home });
    expect(m).toMatchObject({ name: "cloud", kind: "disk", format: "qcow2", virtualSize: 2 * MiB, source: file });
    const stored = loadDiskImage("cloud", home)!;
    expect(stored.path).toBe(join(home, "images", "cloud", "disk.qcow2"));
    expect(createHash("sha256").update(readFileSync(stored.path)).digest("hex")).toBe(m.file.sha256);
    const back = join(dir, "back.raw");
    qemuImg(["convert", "-f", "qcow2", "-O", "raw", stored.path, back]);
    expect(readFileSync(back).equals(raw)).toBe(true);
    expect(listDiskImages(home).map((x) => x.name)).toEqual(["cloud"]);
    expect(await refused(importImage("cloud", file, { home }))).toMatchObject({ code: "IMAGE_EXISTS" });
    storeIsClean();
  });

  it("takes a raw disk (detected), whole sectors only", async () => {
    const f = join(dir, "disk.raw");
    writeFileSync(f, pattern(MiB, 0, 2));
    expect(await importImage("plain", f, { home })).toMatchObject({ format: "raw", virtualSize: MiB });
    const odd = join(dir, "odd.raw");
    writeFileSync(odd, Buffer.alloc(1000));
    expect(await refused(importImage("odd", odd, { home }))).toMatchObject({ code: "IMAGE_IMPORT", message: expect.stringContaining("512-byte sectors") });
    expect(existsSync(join(home, "images", "odd"))).toBe(false);
    storeIsClean();
  });

  it("refuses a qcow2 image with a backing file: its name would point at a host file", async () => {
    const { file } = qcow2();
    const overlay = join(dir, "overlay.qcow2");
    qemuImg(["create", "-f", "qcow2", "-b", file, "-F", "qcow2", overlay]);
    const r = await refused(importImage("ov", overlay, { home }));
    expect(r).toMatchObject({ code: "IMAGE_IMPORT", message: expect.stringContaining(`has a backing file ("${file}")`) });
    // Said as raw, it is a raw disk that happens to hold a qcow2 header: nothing is followed.
    const padded = join(dir, "overlay-padded");
    const bytes = readFileSync(overlay);
    writeFileSync(padded, Buffer.concat([bytes, Buffer.alloc(512 - (bytes.length % 512))]));
    const asRaw = await importImage("ov-raw", padded, { home, format: "raw" });
    expect(asRaw.format).toBe("raw");
    expect(existsSync(join(home, "images", "ov"))).toBe(false);
    storeIsClean();
  });

  it("refuses a crafted L2 entry (reserved bits) found by our own reader before any guest reads it", async () => {
    const { file } = qcow2();
    const fd = openSync(file, "r+");
    try {
      const h = Buffer.alloc(64);
      readSync(fd, h, 0, 64, 0);
      const l1 = Number(h.readBigUInt64BE(40));
      const e = Buffer.alloc(8);
      readSync(fd, e, 0, 8, l1);
      const l2 = Number(e.readBigUInt64BE(0) & 0x00ff_ffff_ffff_fe00n);
      // Entry 5 of the first L2 table: a data cluster with reserved bits 1-8 set.
      const cur = Buffer.alloc(8);
      readSync(fd, cur, 0, 8, l2 + 5 * 8);
      cur.writeUInt8(cur.readUInt8(7) | 0x1e, 7);
      writeSync(fd, cur, 0, 8, l2 + 5 * 8);
    } finally {
      closeSync(fd);
    }
    const r = await refused(importImage("crafted", file, { home }));
    expect(r).toMatchObject({ code: "IMAGE_IMPORT", message: expect.stringContaining("reserved bits") });
    expect(existsSync(join(home, "images", "crafted"))).toBe(false);
    storeIsClean();
  });

  it("refuses what is not a regular file (a FIFO does not hang it) and a file that is not there", async () => {
    const fifo = join(dir, "fifo");
    execFileSync("mkfifo", [fifo]);
    expect(await refused(importImage("fifo", fifo, { home }))).toMatchObject({ code: "IMAGE_IMPORT", message: expect.stringContaining("not a regular file") });
    expect(await refused(importImage("none", join(dir, "none"), { home }))).toMatchObject({ code: "IMAGE_IMPORT" });
    expect(await refused(importImage("../x", join(dir, "none"), { home }))).toMatchObject({ code: "IMAGE_BAD_NAME" });
    storeIsClean();
  });
});
