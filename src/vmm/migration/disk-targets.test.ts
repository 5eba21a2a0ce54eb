/**
 * The destination's copied disks (disk-targets.ts): what file a copy may go into (never one that
 * holds data), and a qcow2 copy written through our backend that qemu-img finds clean and thin.
 */
import { closeSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import type { DiskSpec } from "../device-specs.js";
import { createQcow2 } from "../disk/qcow2/create.js";
import { qemuCheck, qemuImg } from "../disk/test-disk.js";
import { createDiskTargets, finishDiskTargets, removeDiskTargets, writeDiskData } from "./disk-targets.js";

const dir = mkdtempSync(join(tmpdir(), "tv-dtgt-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const MiB = 1024 * 1024;
let n = 0;
const path = (name: string): string => join(dir, `${n++}-${name}`);
const spec = (p: string): DiskSpec[] => [{ path: p, readonly: false }];

describe("copied disks at the destination", () => {
  it.each([
    ["a path that does not exist yet", (p: string) => p],
    ["an empty file", (p: string) => (writeFileSync(p, ""), p)],
    ["a blank qcow2 image of the disk's size", (p: string) => (createQcow2(p, { size: 8 * MiB }), p)],
  ] as const)("a qcow2 copy into %s: data lands, zeros stay unallocated, qemu-img check is clean", (_what, make) => {
    const p = make(path("copy.qcow2"));
    const list = spec(p);
    const t = createDiskTargets(list, [{ size: 8 * MiB, format: "qcow2" }]);
    expect(list[0]!.format).toBe("qcow2");
    writeDiskData(t[0]!, 0, Buffer.alloc(MiB, 0x71));
    writeDiskData(t[0]!, 4 * MiB, Buffer.alloc(MiB));
    writeDiskData(t[0]!, 6 * MiB + 4096, Buffer.alloc(8192, 0x72));
    finishDiskTargets(t);
    closeSync(t[0]!.fd);
    expect(qemuCheck(p).status).toBe(0);
    const raw = path("copy.raw");
    qemuImg(["convert", "-U", "-f", "qcow2", "-O", "raw", p, raw]);
    const want = Buffer.alloc(8 * MiB);
    want.fill(0x71, 0, MiB);
    want.fill(0x72, 6 * MiB + 4096, 6 * MiB + 4096 + 8192);
    expect(readFileSync(raw).equals(want)).toBe(true);
    const map = JSON.parse(qemuImg(["map", "-U", "--output=json", p])) as { start: number; length: number; data: boolean }[];
    expect(map.filter((m) => m.data).reduce((s, m) => s + m.length, 0)).toBe(MiB + 64 * 1024);
  });

  it.each([
    ["a raw file with data", "raw", (p: string) => writeFileSync(p, Buffer.alloc(512, 1))],
    ["a qcow2 image with a cluster allocated", "qcow2", (p: string) => (createQcow2(p, { size: 8 * MiB }), qemuImg(["convert", "-n", "-f", "raw", "-O", "qcow2", writeRaw(), p]))],
    ["a blank qcow2 image of another size", "qcow2", (p: string) => createQcow2(p, { size: 16 * MiB })],
    ["a blank qcow2 image with a backing file", "qcow2", (p: string) => createQcow2(p, { size: 8 * MiB, backing: { file: writeRaw(), format: "raw" } })],
  ] as const)("refuses %s, and leaves it as it was", (_what, format, make) => {
    const p = path("taken");
    make(p);
    const before = readFileSync(p);
    expect(() => createDiskTargets(spec(p), [{ size: 8 * MiB, format }])).toThrow(expect.objectContaining({ code: "MIGRATION_DISKS" }));
    expect(readFileSync(p).equals(before)).toBe(true);
  });

  it("a failed migration removes a copy it made and empties one it was given", () => {
    const made = path("made.qcow2");
    const given = path("given.qcow2");
    writeFileSync(given, "");
    const t = createDiskTargets([...spec(made), ...spec(given)], [{ size: MiB, format: "qcow2" }, { size: MiB, format: "qcow2" }]);
    writeDiskData(t[0]!, 0, Buffer.alloc(65536, 1));
    removeDiskTargets(t);
    expect(() => readFileSync(made)).toThrow();
    expect(readFileSync(given).length).toBe(0);
  });
});

/** A raw file with data in its first cluster (a source for qemu-img, a backing file). */
function writeRaw(): string {
  const p = path("data.raw");
  const b = Buffer.alloc(8 * MiB);
  b.fill(9, 0, 65536);
  writeFileSync(p, b);
  return p;
}
