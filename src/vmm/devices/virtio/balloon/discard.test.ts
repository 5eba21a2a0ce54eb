import { readFileSync } from "node:fs";
import { afterAll, describe, expect, it } from "vitest";
import * as libc from "../../../../sys/libc.js";
import { GuestMemory, type HostRegion } from "../../../memory/guest-memory.js";
import { featureBit, VIRTIO_F } from "../device.js";
import { QueueDriver } from "../queue/driver.js";
import { BalloonDevice, INFLATEQ, VIRTIO_BALLOON_F } from "./balloon.js";
import { HOST_PAGE_SIZE, makeDiscard } from "./discard.js";

/*
 * Against a real private anonymous mapping, as the VMM's guest memory is: discarded pages read
 * back as zeros and leave the mapping's resident set.
 */
const MiB = 1 << 20;
const LEN = 8 * MiB;
const HIGH = 0x1_0000_0000;
/** The two guest regions over the two halves of one test mapping (the VMM maps each region on its own). */
const layout = (m: libc.Mapping): HostRegion[] => [
  { guestPhysAddr: 0, size: 4 * MiB, hostAddress: Number(m.address) },
  { guestPhysAddr: HIGH, size: 4 * MiB, hostAddress: Number(m.address) + 4 * MiB },
];
const maps: libc.Mapping[] = [];
afterAll(() => maps.forEach((m) => libc.munmap(m)));

function anonMapping(): { m: libc.Mapping; bytes: Uint8Array } {
  const m = libc.mmap(LEN, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS);
  maps.push(m);
  const bytes = new Uint8Array(libc.view(m.pointer, LEN));
  bytes.fill(0xab); // touch every page
  return { m, bytes };
}

/** Rss in KiB of the /proc/self/smaps entry containing `addr`. */
function rssKiB(addr: bigint): number {
  const lines = readFileSync("/proc/self/smaps", "utf8").split("\n");
  let inside = false;
  for (const line of lines) {
    const head = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
    if (head !== null) {
      inside = addr >= BigInt(`0x${head[1]!}`) && addr < BigInt(`0x${head[2]!}`);
      continue;
    }
    const rss = /^Rss:\s+(\d+) kB/.exec(line);
    if (inside && rss !== null) return Number(rss[1]);
  }
  throw new Error(`no smaps entry for 0x${addr.toString(16)}`);
}

const codeOf = (fn: () => void): string => {
  try {
    fn();
  } catch (e) {
    return (e as { code?: string }).code ?? "?";
  }
  return "";
};

describe("makeDiscard", () => {
  it("zeroes the discarded guest range and drops it from RSS, nothing outside it", () => {
    const { m, bytes } = anonMapping();
    const discard = makeDiscard(layout(m));
    const before = rssKiB(m.address);
    expect(before).toBeGreaterThanOrEqual(LEN / 1024 - 64);

    discard(0x1000, 2 * MiB); // low region
    discard(HIGH + MiB, 3 * MiB); // high region, to its end
    expect(bytes[0xfff]).toBe(0xab);
    expect(bytes.subarray(0x1000, 0x1000 + 2 * MiB).every((b) => b === 0)).toBe(true);
    expect(bytes[0x1000 + 2 * MiB]).toBe(0xab);
    expect(bytes[5 * MiB - 1]).toBe(0xab);
    expect(bytes.subarray(5 * MiB).every((b) => b === 0)).toBe(true);

    const after = rssKiB(m.address);
    expect(before - after).toBeGreaterThanOrEqual(((5 * MiB) / 1024) * 0.95);
    // Pages refault as zeros on write, like a guest reusing deflated memory.
    bytes[0x1000] = 7;
    expect(bytes[0x1000]).toBe(7);
  });

  it("drops only whole host pages inside the range and refuses ranges outside the layout", () => {
    const { m, bytes } = anonMapping();
    const discard = makeDiscard(layout(m));
    discard(0x300800, 0x1000); // no whole page inside
    expect(bytes.subarray(0x300800, 0x301800).every((b) => b === 0xab)).toBe(true);
    discard(0x300800, 0x2000); // exactly page 0x301000
    expect(bytes[0x300fff]).toBe(0xab);
    expect(bytes.subarray(0x301000, 0x302000).every((b) => b === 0)).toBe(true);
    expect(bytes[0x302000]).toBe(0xab);
    discard(0x10000, 0);

    expect(codeOf(() => discard(4 * MiB - 4096, 8192))).toBe("BALLOON_DISCARD_RANGE"); // straddles the end of region 0
    expect(codeOf(() => discard(4 * MiB, 4096))).toBe("BALLOON_DISCARD_RANGE"); // hole
    expect(codeOf(() => discard(HIGH + 4 * MiB, 4096))).toBe("BALLOON_DISCARD_RANGE");
    expect(codeOf(() => discard(-4096, 4096))).toBe("BALLOON_DISCARD_RANGE");
    expect(codeOf(() => discard(0, -1))).toBe("BALLOON_DISCARD_RANGE");
    expect(codeOf(() => discard(0.5, 4096))).toBe("BALLOON_DISCARD_RANGE");
    expect(bytes.subarray(4 * MiB - 4096, 4 * MiB + 4096).every((b) => b === 0xab)).toBe(true);

    expect(codeOf(() => makeDiscard([{ guestPhysAddr: 0, size: MiB, hostAddress: Number(m.address) + 1 }]))).toBe("BALLOON_DISCARD_RANGE");
    expect(codeOf(() => makeDiscard([{ guestPhysAddr: 0, size: MiB, hostAddress: 0 }]))).toBe("BALLOON_DISCARD_RANGE");
    expect(codeOf(() => makeDiscard([{ guestPhysAddr: 0, size: 0, hostAddress: Number(m.address) }]))).toBe("BALLOON_DISCARD_RANGE");
    expect(HOST_PAGE_SIZE).toBeGreaterThanOrEqual(4096);
  });

  it("end to end: the balloon inflating guest pages frees them on the host", () => {
    const { m, bytes } = anonMapping();
    const mem = GuestMemory.mapped(layout(m));
    const dev = new BalloonDevice({ discard: makeDiscard(layout(m)), maxPages: LEN / 4096 });
    mem.fill(0, QueueDriver.footprint(8)); // queue area
    const drv = new QueueDriver(mem, 8, 0);
    const ctx = {
      mem,
      queues: [drv.config, { size: 0, descAddr: 0, driverAddr: 0, deviceAddr: 0 }],
      features: featureBit(VIRTIO_F.VERSION_1) | featureBit(VIRTIO_BALLOON_F.STATS_VQ),
      interruptQueue: () => undefined,
      interruptConfig: () => undefined,
      needsReset: (r: string) => {
        throw new Error(r);
      },
    };
    dev.activate(ctx);
    // PFNs of 1 MiB of the low region and 1 MiB of the high one.
    const pfns = [...Array.from({ length: 256 }, (_, i) => 0x200 + i), ...Array.from({ length: 256 }, (_, i) => HIGH / 4096 + 0x100 + i)];
    const list = new Uint8Array(4 * pfns.length);
    pfns.forEach((p, i) => new DataView(list.buffer).setUint32(4 * i, p, true));
    mem.write(0x10000, list);
    const before = rssKiB(m.address);
    drv.publish(drv.addChain([{ addr: 0x10000, len: list.length }]));
    dev.notify(INFLATEQ);
    expect(drv.takeUsed()).toHaveLength(1);
    expect(dev.counters()).toMatchObject({ inflatedPages: 512, invalidPfns: 0, discardErrors: 0 });
    expect(bytes.subarray(0x200000, 0x300000).every((b) => b === 0)).toBe(true);
    expect(bytes.subarray(5 * MiB, 6 * MiB).every((b) => b === 0)).toBe(true);
    expect(bytes[0x1fffff]).toBe(0xab);
    expect(bytes[6 * MiB]).toBe(0xab);
    expect(before - rssKiB(m.address)).toBeGreaterThanOrEqual(2 * 1024 * 0.95);
  });
});
