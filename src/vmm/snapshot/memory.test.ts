/**
 * writeMemoryFile on real anonymous mappings of this process: what /proc/self/pagemap says and
 * what the pages hold decide what is written. Pages never touched and pages touched but zero
 * must be holes; any page with a non-zero byte anywhere (also past the few words the scan looks
 * at first) must be in the file, byte for byte, at its region's offset.
 */
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import * as libc from "../../sys/libc.js";
import { writeMemoryFile } from "./memory.js";

const PAGE = 4096;
const dir = mkdtempSync(join(tmpdir(), "tv-snapmem-"));
const maps: libc.Mapping[] = [];
afterAll(() => {
  for (const m of maps) libc.munmap(m);
  rmSync(dir, { recursive: true, force: true });
});

function region(pages: number): { bytes: Uint8Array; hostAddress: number } {
  const m = libc.mmap(pages * PAGE, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE);
  maps.push(m);
  // Safe: a view of the whole mapping made just above, unmapped only in afterAll.
  return { bytes: new Uint8Array(libc.view(m.pointer, pages * PAGE)), hostAddress: Number(m.address) };
}

/** Offsets of the data (non-hole) ranges of a file, page by page. */
function dataPages(path: string, pages: number): number[] {
  const fd = openSync(path, "r");
  try {
    const out: number[] = [];
    for (let p = 0; p < pages; p++) {
      const at = libc.lseek(fd, p * PAGE, libc.SEEK_DATA);
      if (at === p * PAGE) out.push(p);
    }
    return out;
  } finally {
    closeSync(fd);
  }
}

describe("writeMemoryFile", () => {
  it("writes exactly the pages that hold a non-zero byte, wherever it is, and leaves the rest as holes", () => {
    const a = region(16);
    for (let i = 0; i < PAGE; i++) a.bytes[i] = (i * 7 + 1) & 0xff; // page 0: data from its first byte
    a.bytes[PAGE] = 0; // page 1: present, all zero
    a.bytes[3 * PAGE + PAGE - 1] = 0x5a; // page 3: only its last byte
    a.bytes[4 * PAGE + 64] = 0x01; // page 4: first non-zero just past the first 16 words
    a.bytes[5 * PAGE] = 0; // page 5: present, zero, between two written pages
    a.bytes[6 * PAGE] = 0xff; // page 6: only its first byte
    // pages 2 and 7-15: never touched
    const b = region(4);
    b.bytes[2 * PAGE + 100] = 0x42; // region 1, page 2

    const path = join(dir, "memory");
    const r = writeMemoryFile(path, [
      { guestPhysAddr: 0, size: 16 * PAGE, hostAddress: a.hostAddress },
      { guestPhysAddr: 0x1_0000_0000, size: 4 * PAGE, hostAddress: b.hostAddress },
    ], [undefined, undefined]);

    expect(r.layout.regions).toEqual([
      { guestPhysAddr: 0, size: 16 * PAGE, fileOffset: 0 },
      { guestPhysAddr: 0x1_0000_0000, size: 4 * PAGE, fileOffset: 16 * PAGE },
    ]);
    expect(r.layout.bytes).toBe(20 * PAGE);
    expect(r.dataBytes).toBe(5 * PAGE);
    const file = readFileSync(path);
    expect(file.length).toBe(20 * PAGE);
    expect(file.subarray(0, 16 * PAGE).equals(a.bytes)).toBe(true);
    expect(file.subarray(16 * PAGE).equals(b.bytes)).toBe(true);
    expect(dataPages(path, 20)).toEqual([0, 3, 4, 6, 18]);
  });
});
