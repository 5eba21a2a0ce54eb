/**
 * The file is the attacker: valid qcow2 images (ours and qemu-img's, 64 KiB and 512 B clusters,
 * with data) corrupted by random byte flips and by crafted values in every structure of
 * qcow2.txt (§Header, §Header extensions, §Cluster mapping, §Host cluster management,
 * §Compressed Clusters Descriptor). Whatever the file holds:
 * - opening it (openDisk + backendFromInit, read-only and read-write) fails with a
 *   TypevisorError (DISK_FORMAT, DISK_CHAIN, DISK_OPEN) or succeeds;
 * - every request (read, write, write-zeroes, discard, flush) returns 0 or -errno, never throws,
 *   and takes less than 2 s of CPU (and 10 s in all: a busy disk's fdatasync is not ours);
 * - the file grows by at most what the requests wrote (times a small factor for metadata);
 * - nothing outside the image file changes (a sibling canary file, the backing file), and the
 *   header (bytes 0..103) changes only as our writer itself changes it (a grown refcount table);
 * - the process's memory does not grow with what the file claims.
 */
import { execFileSync, spawnSync } from "node:child_process";
import { closeSync, existsSync, ftruncateSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TypevisorError } from "../../../errors.js";
import type { DiskBackend } from "../backend.js";
import { backendFromInit, openDisk } from "../open.js";
import { io, pattern, qemuCheck, qemuImg, readAll } from "../test-disk.js";
import { createQcow2 } from "./create.js";
import { entryOffset, L2, parseHeader, writeEntry } from "./format.js";
import { Qcow2Backend } from "./image.js";

const KiB = 1024;
const MiB = 1024 * 1024;
const root = mkdtempSync(join(tmpdir(), "tv-qcow2-hostile-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));
let runs = 0;
/** What the properties exercised: they must not pass vacuously (everything refused, every request failing). */
const stats = { opened: 0, refused: 0, errno: 0, ok: 0 };

// ---- the images and where their structures lie ----

interface Layout {
  cluster: number;
  clusterBits: number;
  fileSize: number;
  l1Off: number;
  l1Size: number;
  rtOff: number;
  rtClusters: number;
  refcountOrder: number;
  /** L2 tables and the L1 index each serves. */
  l2: { off: number; l1Index: number }[];
  blocks: number[];
  /** Allocated standard entries: where the entry lies in the file, the guest offset it maps, the host offset. */
  data: { at: number; guest: number; host: number }[];
  compressed: { at: number; guest: number }[];
  /** Entries that are zero (unallocated) in existing tables. */
  empty: { at: number; guest: number }[];
}

function layoutOf(img: Buffer): Layout {
  const h = parseHeader(img.subarray(0, Math.min(img.length, 64 * KiB)), img.length);
  const cluster = 2 ** h.clusterBits;
  const e = (at: number) => entryOffset(img.readUInt32BE(at), img.readUInt32BE(at + 4));
  const l: Layout = {
    cluster,
    clusterBits: h.clusterBits,
    fileSize: img.length,
    l1Off: h.l1TableOffset,
    l1Size: h.l1Size,
    rtOff: h.refcountTableOffset,
    rtClusters: h.refcountTableClusters,
    refcountOrder: h.refcountOrder,
    l2: [],
    blocks: [],
    data: [],
    compressed: [],
    empty: [],
  };
  for (let i = 0; i < (h.refcountTableClusters * cluster) / 8; i++) {
    const b = e(h.refcountTableOffset + i * 8);
    if (b !== 0) l.blocks.push(b);
  }
  const perTable = cluster / 8;
  for (let i = 0; i < h.l1Size; i++) {
    const off = e(h.l1TableOffset + i * 8);
    if (off === 0) continue;
    l.l2.push({ off, l1Index: i });
    for (let j = 0; j < perTable; j++) {
      const at = off + j * 8;
      const guest = (i * perTable + j) * cluster;
      if (guest >= h.size) break;
      const hi = img.readUInt32BE(at);
      const lo = img.readUInt32BE(at + 4);
      if ((hi & L2.COMPRESSED_HI) !== 0) l.compressed.push({ at, guest });
      else if (entryOffset(hi, lo) !== 0) l.data.push({ at, guest, host: entryOffset(hi, lo) });
      else l.empty.push({ at, guest });
    }
  }
  return l;
}

/** The images the properties corrupt, in the order beforeAll makes them. */
const BASE_NAMES = [
  "ours, 64 KiB clusters",
  "ours, 512 B clusters",
  "ours, overlay on a raw file",
  "qemu-img, 64 KiB clusters",
  "qemu-img, 512 B clusters",
  "qemu-img, compressed",
  "qemu-img, compressed, 512 B clusters",
] as const;

interface Base {
  name: string;
  bytes: Buffer;
  layout: Layout;
  /** A raw backing file this image names (relative, "base.raw"), copied next to it. */
  backing?: Buffer;
}
const bases: Base[] = [];

function ours(path: string, size: number, clusterBits: number, backing?: string): void {
  createQcow2(path, { size, clusterBits, ...(backing !== undefined ? { backing: { file: backing, format: "raw" as const } } : {}) });
  const d = openDisk(path, { format: "qcow2", readonly: false });
  const b = backendFromInit(d.init);
  const cl = 2 ** clusterBits;
  // Data in several tables, a zeroed range, a discarded one: every kind of entry.
  for (const [pos, len, seed] of [[0, 3 * cl, 1], [size / 2 - cl, 5 * cl + 512, 2], [size - 2 * cl, 2 * cl, 3], [size / 4, 64 * KiB, 4]] as const) {
    expect(io(b, pattern(len, pos, seed), pos, true)).toBe(0);
  }
  expect(b.writeZeroes(cl, cl)).toBe(0);
  expect(b.discard(size - 2 * cl, cl)).toBe(0);
  b.close();
  d.close();
}

beforeAll(() => {
  const dir = join(root, "bases");
  mkdirSync(dir);
  const raw = join(dir, "content.raw");
  // 3 MiB: patterned, a hole, patterned with a repetitive (compressible) part.
  writeFileSync(raw, Buffer.concat([pattern(MiB, 0, 7), Buffer.alloc(MiB), pattern(512 * KiB, 2 * MiB, 8), Buffer.alloc(512 * KiB, 0x61)]));
  const add = (name: string, path: string, backing?: Buffer) => {
    const bytes = readFileSync(path);
    bases.push({ name, bytes, layout: layoutOf(bytes), ...(backing !== undefined ? { backing } : {}) });
  };
  ours(join(dir, "ours64.qcow2"), 4 * MiB, 16);
  add("ours, 64 KiB clusters", join(dir, "ours64.qcow2"));
  ours(join(dir, "ours512.qcow2"), MiB, 9);
  add("ours, 512 B clusters", join(dir, "ours512.qcow2"));
  const baseRaw = pattern(MiB + 4096, 0, 5);
  writeFileSync(join(dir, "base.raw"), baseRaw);
  ours(join(dir, "overlay.qcow2"), 2 * MiB, 16, "base.raw");
  add("ours, overlay on a raw file", join(dir, "overlay.qcow2"), baseRaw);
  for (const [name, opts] of [
    ["qemu-img, 64 KiB clusters", ["-o", "cluster_size=65536"]],
    ["qemu-img, 512 B clusters", ["-o", "cluster_size=512"]],
    ["qemu-img, compressed", ["-c", "-o", "cluster_size=65536"]],
    ["qemu-img, compressed, 512 B clusters", ["-c", "-o", "cluster_size=512"]],
  ] as const) {
    const p = join(dir, `q${bases.length}.qcow2`);
    qemuImg(["convert", "-f", "raw", "-O", "qcow2", ...opts, raw, p]);
    add(name, p);
  }
  for (const b of bases) expect(b.layout.data.length + b.layout.compressed.length, b.name).toBeGreaterThan(0);
});

// ---- corruptions ----

/** Where a crafted offset points, resolved against the image's layout. */
const targetArb = fc.oneof(
  { arbitrary: fc.constantFrom("header", "header+512", "unaligned", "l1", "rt", "rb", "l2", "l2-last", "data", "eof", "eof+1", "eof+3", "last", "huge"), weight: 6 },
  { arbitrary: fc.integer({ min: 0, max: 2 ** 31 }).map((n) => n * 512), weight: 1 },
);
type Target = string | number;

function resolve(t: Target, l: Layout, pick: number): number {
  const eof = Math.ceil(l.fileSize / l.cluster) * l.cluster;
  const at = <T>(xs: T[]): T | undefined => (xs.length === 0 ? undefined : xs[pick % xs.length]);
  switch (t) {
    case "header": return 0;
    case "header+512": return 512;
    case "unaligned": return l.cluster > 512 ? l.cluster + 512 : l.cluster + 8;
    case "l1": return l.l1Off;
    case "rt": return l.rtOff;
    case "rb": return at(l.blocks) ?? 0;
    case "l2": return l.l2[0]?.off ?? 0;
    case "l2-last": return l.l2.at(-1)?.off ?? 0;
    case "data": return at(l.data)?.host ?? eof;
    case "eof": return eof;
    case "eof+1": return eof + l.cluster;
    case "eof+3": return eof + 3 * l.cluster;
    case "last": return Math.floor((l.fileSize - 1) / l.cluster) * l.cluster;
    case "huge": return 2 ** 55 - l.cluster;
    default: return t as number;
  }
}

const flipArb = fc.record({
  region: fc.constantFrom("header", "l1", "l2", "rt", "rb", "data", "any"),
  pick: fc.nat(),
  at: fc.nat(),
  xor: fc.integer({ min: 1, max: 255 }),
});

const w = <T>(arbitrary: fc.Arbitrary<T>, weight: number) => ({ arbitrary, weight });
const craftArb = fc.oneof(
  fc.record({ kind: fc.constant("h32" as const), field: fc.constantFrom(4, 16, 20, 32, 36, 56, 60, 96, 100), value: fc.oneof(fc.constantFrom(0, 1, 2, 3, 7, 8, 9, 21, 22, 31, 63, 64, 103, 104, 105, 112, 4096, 65536, 0x7fffffff, 0xffffffff), fc.nat()) }),
  fc.record({ kind: fc.constant("h64" as const), field: fc.constantFrom(8, 24, 40, 48, 64, 72, 80, 88), target: targetArb, pick: fc.nat(), raw: fc.option(fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }), { freq: 3 }) }),
  fc.record({ kind: fc.constant("l1" as const), index: fc.nat(), target: targetArb, pick: fc.nat(), flags: fc.constantFrom("copied", "plain", "reserved") }),
  // Table entries are where requests meet the file: most of the crafted cases.
  w(fc.record({ kind: fc.constant("l2" as const), which: fc.constantFrom("data", "compressed", "empty", "any"), pick: fc.nat(), target: targetArb, tpick: fc.nat(), flags: fc.constantFrom("copied", "plain", "zero", "zero-copied", "reserved") }), 4),
  w(fc.record({ kind: fc.constant("compressed" as const), which: fc.constantFrom("data", "compressed", "empty"), pick: fc.nat(), target: targetArb, tpick: fc.nat(), inSector: fc.oneof(fc.constant(0), fc.nat({ max: 511 })), sectors: fc.oneof(fc.constantFrom(0, 1, 2, 255), fc.nat()) }), 4),
  fc.record({ kind: fc.constant("rt" as const), index: fc.nat({ max: 7 }), target: targetArb, pick: fc.nat() }),
  fc.record({ kind: fc.constant("rb-fill" as const), pick: fc.nat(), byte: fc.constantFrom(0xff, 0x01, 0x80, 0) }),
  fc.record({ kind: fc.constant("rb-entry" as const), pick: fc.nat(), cluster: fc.nat({ max: 4096 }), value: fc.constantFrom(0, 1, 2, "max") }),
  fc.record({ kind: fc.constant("feature" as const), what: fc.constantFrom("incompat-unknown", "compression-type", "crypt", "cluster-bits-8", "cluster-bits-22", "refcount-order-7", "header-length-odd", "header-length-big", "dirty", "corrupt", "extended-l2", "external-data", "autoclear", "v2"), bit: fc.integer({ min: 5, max: 63 }) }),
  fc.record({ kind: fc.constant("backing" as const), name: fc.constantFrom("canary", "img.qcow2", "/dev/zero", "/proc/self/mem", "../canary", "nbd:localhost:1", "base.raw", "no-such-file", "."), offsetWhere: fc.constantFrom("end", "inside-header", "past-cluster"), sizeDelta: fc.constantFrom(0, 1, -1, 2000) }),
);
type Craft = typeof craftArb extends fc.Arbitrary<infer T> ? T : never;
type Flip = typeof flipArb extends fc.Arbitrary<infer T> ? T : never;

function regionOf(region: Flip["region"], l: Layout, pick: number): [number, number] {
  const c = l.cluster;
  switch (region) {
    case "header": return [0, Math.min(c, 512)];
    case "l1": return [l.l1Off, Math.max(8, l.l1Size * 8)];
    case "l2": return l.l2.length === 0 ? [0, c] : [l.l2[pick % l.l2.length]!.off, c];
    case "rt": return [l.rtOff, l.rtClusters * c];
    case "rb": return l.blocks.length === 0 ? [0, c] : [l.blocks[pick % l.blocks.length]!, c];
    case "data": return l.data.length === 0 ? [0, c] : [l.data[pick % l.data.length]!.host, c];
    default: return [0, l.fileSize];
  }
}

/** An L2/L1 descriptor's halves for `offset` with named flags. */
function entry(offset: number, flags: string): [number, number] {
  const b = Buffer.alloc(8);
  writeEntry(b, 0, offset % 2 ** 56);
  let hi = b.readUInt32BE(0);
  let lo = b.readUInt32BE(4);
  if (flags === "copied" || flags === "zero-copied") hi = (hi | L2.COPIED_HI) >>> 0;
  if (flags === "zero" || flags === "zero-copied") lo = (lo | L2.ZERO_LO) >>> 0;
  if (flags === "reserved") lo = (lo | 0x4) >>> 0;
  return [hi, lo];
}

/** Apply one crafted change to `img`; returns guest offsets worth aiming requests at. */
function craft(img: Buffer, l: Layout, c: Craft): number[] {
  const put64 = (at: number, v: bigint) => {
    if (at + 8 <= img.length) img.writeBigUInt64BE(v & (2n ** 64n - 1n), at);
  };
  const putHalves = (at: number, [hi, lo]: [number, number]) => {
    if (at + 8 <= img.length) {
      img.writeUInt32BE(hi >>> 0, at);
      img.writeUInt32BE(lo >>> 0, at + 4);
    }
  };
  const entries = (which: string) => (which === "data" ? l.data : which === "compressed" ? l.compressed : which === "empty" ? l.empty : [...l.data, ...l.compressed, ...l.empty]);
  switch (c.kind) {
    case "h32":
      img.writeUInt32BE(c.value >>> 0, c.field);
      return [];
    case "h64":
      put64(c.field, c.raw ?? BigInt(resolve(c.target, l, c.pick)));
      return [];
    case "l1": {
      const i = c.index % Math.max(1, l.l1Size);
      putHalves(l.l1Off + i * 8, c.flags === "reserved" ? [0x0100_0000, 0] : entry(resolve(c.target, l, c.pick), c.flags));
      return [i * (l.cluster / 8) * l.cluster];
    }
    case "l2": {
      const xs = entries(c.which);
      const e = xs[c.pick % Math.max(1, xs.length)];
      if (e === undefined) return [];
      putHalves(e.at, c.flags === "reserved" ? [0x0100_0000, 0] : entry(resolve(c.target, l, c.tpick), c.flags));
      return [e.guest];
    }
    case "compressed": {
      const xs = entries(c.which);
      const e = xs[c.pick % Math.max(1, xs.length)];
      if (e === undefined) return [];
      // §Compressed Clusters Descriptor: x = 62 - (cluster_bits - 8); offset in bits 0..x-1, sectors above.
      const x = BigInt(62 - (l.clusterBits - 8));
      const off = BigInt(resolve(c.target, l, c.tpick) + c.inSector) & ((1n << x) - 1n);
      const sectors = BigInt(c.sectors) & ((1n << (62n - x)) - 1n);
      put64(e.at, (1n << 62n) | (sectors << x) | off);
      return [e.guest];
    }
    case "rt":
      put64(l.rtOff + c.index * 8, BigInt(resolve(c.target, l, c.pick)));
      return [];
    case "rb-fill": {
      const b = l.blocks[c.pick % Math.max(1, l.blocks.length)];
      if (b !== undefined) img.fill(c.byte, b, b + l.cluster);
      return [];
    }
    case "rb-entry": {
      const b = l.blocks[c.pick % Math.max(1, l.blocks.length)];
      if (b === undefined) return [];
      const bits = 1 << l.refcountOrder;
      const perBlock = (l.cluster * 8) / bits;
      const i = c.cluster % perBlock;
      const block = img.subarray(b, b + l.cluster);
      if (bits >= 8) {
        const bytes = bits / 8;
        const v = c.value === "max" ? 2n ** BigInt(bits) - 1n : BigInt(c.value);
        for (let k = 0; k < bytes; k++) block[i * bytes + k] = Number((v >> BigInt(8 * (bytes - 1 - k))) & 0xffn);
      } else {
        const bit = i * bits;
        const v = c.value === "max" ? (1 << bits) - 1 : Number(c.value) & ((1 << bits) - 1);
        const mask = ((1 << bits) - 1) << (bit & 7);
        block[bit >> 3] = (block[bit >> 3]! & ~mask) | ((v << (bit & 7)) & mask);
      }
      return [];
    }
    case "feature": {
      const incompat = img.readBigUInt64BE(72);
      switch (c.what) {
        case "incompat-unknown": put64(72, incompat | (1n << BigInt(c.bit))); break;
        case "compression-type":
          // §Header: compression_type is byte 104, present when header_length > 104 (the next 8-byte step is 112).
          img.writeUInt32BE(112, 100);
          img[104] = 1;
          put64(72, incompat | (1n << 3n));
          break;
        case "crypt": img.writeUInt32BE(1, 32); break;
        case "cluster-bits-8": img.writeUInt32BE(8, 20); break;
        case "cluster-bits-22": img.writeUInt32BE(22, 20); break;
        case "refcount-order-7": img.writeUInt32BE(7, 96); break;
        case "header-length-odd": img.writeUInt32BE(105, 100); break;
        case "header-length-big": img.writeUInt32BE(l.cluster + 8, 100); break;
        case "dirty": put64(72, incompat | 1n); break;
        case "corrupt": put64(72, incompat | 2n); break;
        case "extended-l2": put64(72, incompat | 16n); break;
        case "external-data": put64(72, incompat | 4n); break;
        case "autoclear": put64(88, 2n ** 64n - 1n); break;
        case "v2": img.writeUInt32BE(2, 4); break;
      }
      return [];
    }
    case "backing": {
      const name = Buffer.from(c.name);
      const limit = Math.min(l.cluster, 64 * KiB);
      const at = c.offsetWhere === "end" ? limit - 64 : c.offsetWhere === "inside-header" ? 16 : limit - 4;
      name.copy(img, at, 0, Math.min(name.length, l.cluster - at));
      put64(8, BigInt(at));
      img.writeUInt32BE(Math.max(0, name.length + c.sizeDelta) >>> 0, 16);
      return [0];
    }
  }
}

// ---- requests ----

const opArb = fc.record({
  op: fc.constantFrom("read", "read", "read", "write", "write", "write", "zero", "discard", "flush"),
  /** Aim at a guest offset a crafted change concerns, at one that holds data, or anywhere. */
  near: fc.constantFrom("crafted", "crafted", "data", "anywhere"),
  /** Whole clusters from the aimed one's start (write-zeroes and discard deallocate only those). */
  whole: fc.boolean(),
  pick: fc.nat(),
  frac: fc.double({ min: 0, max: 1, noNaN: true }),
  delta: fc.integer({ min: -4, max: 4 }),
  sectors: fc.oneof(fc.integer({ min: 1, max: 8 }), fc.integer({ min: 1, max: 512 })),
});
type Op = typeof opArb extends fc.Arbitrary<infer T> ? T : never;

const OPEN_CODES = ["DISK_FORMAT", "DISK_CHAIN", "DISK_OPEN"];
/**
 * An operation's bound: 2 s of CPU (what a file could make us compute: loops sized by its
 * values), and 10 s of wall time (fdatasync on a disk busy with other work is not our time).
 */
const MAX_CPU_MS = 2000;
const MAX_WALL_MS = 10_000;

function timed<T>(what: string, f: () => T): T {
  const t0 = performance.now();
  const c0 = process.cpuUsage();
  const r = f();
  const c = process.cpuUsage(c0);
  const cpu = (c.user + c.system) / 1000;
  const wall = performance.now() - t0;
  if (cpu > MAX_CPU_MS || wall > MAX_WALL_MS) throw new Error(`${what} took ${cpu.toFixed(0)} ms of CPU, ${wall.toFixed(0)} ms in all`);
  return r;
}

function expectErrno(r: unknown, what: string): void {
  if (typeof r !== "number" || !Number.isInteger(r) || r > 0) throw new Error(`${what} returned ${String(r)}`);
}

/** Open (either mode); a refusal must be a TypevisorError with one of the open codes. */
function tryOpen(path: string, readonly: boolean): { b: DiskBackend; close: () => void } | undefined {
  let disk;
  try {
    disk = timed("openDisk", () => openDisk(path, { format: "qcow2", readonly }));
  } catch (e) {
    if (!(e instanceof TypevisorError) || !OPEN_CODES.includes(e.code)) throw new Error(`openDisk threw ${String(e)}`, { cause: e });
    return undefined;
  }
  try {
    const b = timed("backendFromInit", () => backendFromInit(disk.init));
    return {
      b,
      close: () => {
        timed("close", () => b.close());
        disk.close();
      },
    };
  } catch (e) {
    disk.close();
    if (!(e instanceof TypevisorError) || !OPEN_CODES.includes(e.code)) throw new Error(`backendFromInit threw ${String(e)}`, { cause: e });
    return undefined;
  }
}

/** One request; returns the bytes it may make the file grow by (0 for reads). */
function request(b: DiskBackend, o: Op, aim: { crafted: number[]; data: number[] }, cluster: number): number {
  const cap = b.capacity;
  if (cap < 512) return 0;
  const sectors = Math.floor(cap / 512);
  let sector = Math.min(sectors - 1, Math.floor(o.frac * sectors));
  const hot = o.near === "crafted" ? aim.crafted : o.near === "data" ? aim.data : [];
  if (hot.length > 0) {
    const at = hot[o.pick % hot.length]!;
    sector = o.whole ? Math.floor(at / cluster) * (cluster / 512) : Math.floor(at / 512) + o.delta;
    sector = Math.max(0, Math.min(sectors - 1, sector));
  }
  const pos = sector * 512;
  const len = Math.min(o.whole ? Math.ceil((o.sectors * 512) / cluster) * cluster : o.sectors * 512, cap - pos);
  const what = `${o.op} at ${pos} (${len} bytes)`;
  let r: number;
  switch (o.op) {
    case "read":
      r = timed(what, () => io(b, Buffer.alloc(len), pos, false));
      expectErrno(r, what);
      return 0;
    case "write":
      r = timed(what, () => io(b, pattern(len, pos, o.pick % 251), pos, true));
      break;
    case "zero":
      r = timed(what, () => b.writeZeroes(pos, len));
      break;
    case "discard":
      r = timed(what, () => b.discard(pos, len));
      break;
    default:
      r = timed(what, () => b.flush());
      expectErrno(r, what);
      return 0;
  }
  expectErrno(r, what);
  stats[r === 0 ? "ok" : "errno"]++;
  // A request allocates at most its clusters, an L2 table per table it spans and refcount blocks.
  const tables = Math.ceil(len / (cluster * (cluster / 8))) + 2;
  return len + (2 + tables + 2) * cluster;
}

const HEADER_FIXED = 104;

/** Bytes 0..103 may change only in the refcount table fields, to a table past what the file held. */
function expectHeaderKept(before: Buffer, after: Buffer, sizeAtOpen: number, cluster: number): void {
  for (let i = 0; i < HEADER_FIXED; i++) {
    if (i >= 48 && i < 60) continue;
    if (before[i] !== after[i]) throw new Error(`header byte ${i} changed from ${before[i]} to ${after[i]}`);
  }
  if (!before.subarray(48, 60).equals(after.subarray(48, 60))) {
    const off = Number(after.readBigUInt64BE(48));
    if (off < sizeAtOpen || off % cluster !== 0) throw new Error(`refcount table moved to ${off}, on top of what the file held (${sizeAtOpen} bytes)`);
  }
}

function readHead(path: string): Buffer {
  return readFileSync(path).subarray(0, HEADER_FIXED);
}

interface Session {
  readonly: boolean;
  flips: readonly Flip[];
  crafts: readonly Craft[];
  ops: Op[];
  reopen: boolean;
}

/**
 * One session on a corrupted copy of `base`; `under`: the corrupted image is the backing file
 * (read-only, opened through the chain) of a clean overlay of ours, which takes the requests.
 */
function runSession(base: Base, s: Session, under = false): void {
  const dir = join(root, `run-${runs++}`);
  mkdirSync(dir);
  try {
    const canary = pattern(8192, 0, runs);
    writeFileSync(join(dir, "canary"), canary);
    if (base.backing !== undefined) writeFileSync(join(dir, "base.raw"), base.backing);
    const img = Buffer.from(base.bytes);
    const l = base.layout;
    const aim = { crafted: [] as number[], data: [...l.data.map((d) => d.guest), ...l.compressed.map((d) => d.guest)] };
    for (const f of s.flips) {
      const [start, len] = regionOf(f.region, l, f.pick);
      const at = start + (f.at % Math.max(1, len));
      if (at < img.length) img[at]! ^= f.xor;
    }
    for (const c of s.crafts) aim.crafted.push(...craft(img, l, c));
    const path = join(dir, "img.qcow2");
    if (under) {
      writeFileSync(join(dir, "base.qcow2"), img);
      createQcow2(path, { size: 4 * MiB, clusterBits: 16, backing: { file: "base.qcow2", format: "qcow2" } });
    } else writeFileSync(path, img);
    const names = readdirSync(dir).sort();

    const h = tryOpen(path, s.readonly);
    stats[h === undefined ? "refused" : "opened"]++;
    let allowance = 0;
    const sizeAtOpen = statSync(path).size;
    const headAtOpen = readHead(path);
    if (h !== undefined) {
      try {
        const cluster = h.b instanceof Qcow2Backend ? 2 ** h.b.header.clusterBits : l.cluster;
        for (const o of s.ops) allowance += request(h.b, o, aim, cluster);
      } finally {
        h.close();
      }
      const grown = statSync(path).size - sizeAtOpen;
      const bound = allowance * 4 + MiB;
      if (grown > bound) throw new Error(`the file grew by ${grown} bytes, more than ${bound} for what was written`);
      expectHeaderKept(headAtOpen, readHead(path), sizeAtOpen, l.cluster);
      if (s.reopen) {
        // What we wrote into a hostile image is again hostile input: the same rules.
        const r = tryOpen(path, true);
        if (r !== undefined) {
          try {
            for (const o of s.ops.slice(0, 4)) request(r.b, { ...o, op: "read" }, aim, l.cluster);
          } finally {
            r.close();
          }
        }
      }
    }
    if (!readFileSync(join(dir, "canary")).equals(canary)) throw new Error("the canary file next to the image changed");
    if (base.backing !== undefined && !readFileSync(join(dir, "base.raw")).equals(base.backing)) throw new Error("the backing file changed");
    if (under && !readFileSync(join(dir, "base.qcow2")).equals(img)) throw new Error("the corrupted backing file changed");
    expect(readdirSync(dir).sort()).toEqual(names);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const sessionArb = (mode: "flips" | "crafts") =>
  fc.record({
    readonly: fc.boolean(),
    flips: mode === "flips" ? fc.array(flipArb, { minLength: 1, maxLength: 8 }) : fc.constant<Flip[]>([]),
    crafts: mode === "crafts" ? fc.array(craftArb, { minLength: 1, maxLength: 3 }) : fc.constant<Craft[]>([]),
    ops: fc.array(opArb, { minLength: 1, maxLength: 12 }),
    reopen: fc.boolean(),
  });

/** Runs per image and mode; QCOW2_HOSTILE_RUNS and QCOW2_HOSTILE_SEED explore further (fixed by default: no flakes). */
const RUNS = Number(process.env.QCOW2_HOSTILE_RUNS ?? 200);
const SEED = process.env.QCOW2_HOSTILE_SEED !== undefined ? Number(process.env.QCOW2_HOSTILE_SEED) : 0x5eed;

describe("a hostile qcow2 file", () => {
  let rssAtStart = 0;
  beforeAll(() => {
    rssAtStart = process.memoryUsage().rss;
  });
  afterAll(() => {
    expect(stats.opened, JSON.stringify(stats)).toBeGreaterThan(stats.refused / 2);
    expect(stats.ok, JSON.stringify(stats)).toBeGreaterThan(RUNS * 3);
    expect(stats.errno, JSON.stringify(stats)).toBeGreaterThan(RUNS * 3);
    // Nothing the files claimed was allocated: no table, cache or buffer sized by a header field.
    const grown = process.memoryUsage().rss - rssAtStart;
    expect(grown, `RSS grew by ${(grown / MiB).toFixed(0)} MiB`).toBeLessThan(200 * MiB);
  });

  for (const [i, name] of BASE_NAMES.entries()) {
    for (const mode of ["flips", "crafts"] as const) {
      it(`${name}, ${mode}: opens or is refused; requests return errnos, stay in the file, leave the header alone`, () => {
        const base = bases[i]!;
        expect(base.name).toBe(name);
        fc.assert(
          fc.property(sessionArb(mode), (s) => runSession(base, s)),
          { numRuns: RUNS, seed: SEED + i * 2 + (mode === "flips" ? 0 : 1) },
        );
      }, 60_000);
    }
  }
  // The same corruptions in a backing file under a clean overlay: reads through the chain and copies on write.
  for (const i of [0, 1, 5]) {
    it(`${BASE_NAMES[i]!} as the backing file of a clean overlay: the same rules`, () => {
      const base = bases[i]!;
      fc.assert(
        fc.property(fc.oneof(sessionArb("flips"), sessionArb("crafts")), (s) => runSession(base, s, true)),
        { numRuns: RUNS, seed: SEED + 100 + i },
      );
    }, 60_000);
  }
});

// ---- the cases the properties found, and the ones they cannot reach, one by one ----

/** A fresh directory holding `bytes` as img.qcow2 and a canary. */
function stage(bytes: Buffer, canaryBytes = 4096): { dir: string; path: string; canary: Buffer } {
  const dir = join(root, `case-${runs++}`);
  mkdirSync(dir);
  const canary = pattern(canaryBytes, 0, 99);
  writeFileSync(join(dir, "canary"), canary);
  const path = join(dir, "img.qcow2");
  writeFileSync(path, bytes);
  return { dir, path, canary };
}

function openRw(path: string): { b: DiskBackend; close: () => void } {
  const d = openDisk(path, { format: "qcow2", readonly: false });
  const b = backendFromInit(d.init);
  return {
    b,
    close: () => {
      b.close();
      d.close();
    },
  };
}

/** Our 4 MiB, 64 KiB-cluster image with guest clusters 0..2 written: one L2 table maps it all. */
function smallImage(): { bytes: Buffer; layout: Layout } {
  const base = bases[0]!;
  return { bytes: Buffer.from(base.bytes), layout: base.layout };
}

function compressedDescriptor(offset: number, sectors: number, clusterBits: number): bigint {
  const x = BigInt(62 - (clusterBits - 8));
  return (1n << 62n) | (BigInt(sectors) << x) | BigInt(offset);
}

describe("crafted entries, one at a time", () => {
  const C = 64 * KiB;

  for (const how of ["discard", "write-zeroes", "whole-cluster write"] as const) {
    it(`a compressed descriptor aimed at the header cannot get it freed and punched out (${how})`, () => {
      const { bytes, layout } = smallImage();
      const victim = layout.data[1]!;
      bytes.writeBigUInt64BE(compressedDescriptor(0, 0, 16), victim.at);
      const { path } = stage(bytes);
      const head = readFileSync(path).subarray(0, C);
      const h = openRw(path);
      const r = how === "discard" ? h.b.discard(victim.guest, C) : how === "write-zeroes" ? h.b.writeZeroes(victim.guest, C) : io(h.b, pattern(C, victim.guest, 5), victim.guest, true);
      expect(r).toBeLessThan(0);
      expect(h.b.flush()).toBe(0);
      h.close();
      expect(readFileSync(path).subarray(0, C).equals(head)).toBe(true);
    });
  }

  it("a compressed descriptor aimed past the end cannot free a cluster allocated later", () => {
    const { bytes, layout } = smallImage();
    const eof = Math.ceil(layout.fileSize / C) * C;
    const victim = layout.data[1]!;
    // The first cluster the writer allocates is the one at the old end of the file.
    bytes.writeBigUInt64BE(compressedDescriptor(eof, 0, 16), victim.at);
    const { path } = stage(bytes);
    const h = openRw(path);
    const data = pattern(C, 10 * C, 6);
    expect(io(h.b, data, 10 * C, true)).toBe(0);
    expect(h.b.discard(victim.guest, C)).toBeLessThan(0);
    expect(h.b.flush()).toBe(0);
    expect(readAll(h.b, 10 * C, C).equals(data)).toBe(true);
    h.close();
    // With the crafted entry put back to unallocated, the image is consistent: nothing we wrote was freed.
    const after = readFileSync(path);
    after.writeBigUInt64BE(0n, victim.at);
    writeFileSync(path, after);
    expect([0, 3]).toContain(qemuCheck(path).status);
  });

  it("a data entry aimed past the end cannot alias a cluster allocated later", () => {
    const { bytes, layout } = smallImage();
    const eof = Math.ceil(layout.fileSize / C) * C;
    const crafted = layout.empty.find((e) => e.guest === 5 * C)!;
    const [hi, lo] = entry(eof, "copied");
    bytes.writeUInt32BE(hi, crafted.at);
    bytes.writeUInt32BE(lo, crafted.at + 4);
    const { path } = stage(bytes);
    const h = openRw(path);
    // Guest cluster 10 would land at `eof`; then a write and a discard through cluster 5 would
    // overwrite it and free it. Every request through this table fails instead, or keeps them apart.
    const a = pattern(C, 10 * C, 7);
    const wa = io(h.b, a, 10 * C, true);
    const wb = io(h.b, pattern(C, 5 * C, 8), 5 * C, true);
    h.b.discard(5 * C, C);
    expect(h.b.flush()).toBe(0);
    if (wa === 0) {
      const back = Buffer.alloc(C);
      expect(io(h.b, back, 10 * C, false)).toBe(0);
      expect(back.equals(a)).toBe(true);
    }
    expect(wa < 0 || wb < 0).toBe(true);
    h.close();
  });

  // A request over several clusters is served as runs of clusters that follow each other on the
  // host (one preadv/pwritev each): the run must end where the next cluster is metadata or past
  // the end of the file, as a request for that cluster alone would be refused.
  for (const where of ["metadata", "past the end"] as const) {
    it(`a run of data clusters stops at a cluster that is ${where}: reads and in-place writes over it fail, nothing is overwritten`, () => {
      // An image whose metadata lies after data (512 B clusters: L2 tables between the data of
      // earlier tables), and two neighbouring entries of one table to craft.
      const base = bases.find((b) => b.name === "ours, 512 B clusters")!;
      const { bytes, layout } = { bytes: Buffer.from(base.bytes), layout: base.layout };
      const cl = layout.cluster;
      const meta = new Set([...layout.l2.map((t) => t.off), ...layout.blocks, layout.l1Off, layout.rtOff]);
      const eof = Math.ceil(layout.fileSize / cl) * cl;
      // The first cluster is a valid data cluster (a request for it alone succeeds); the second is metadata, or the end of the file.
      const first = where === "metadata" ? layout.data.find((d) => meta.has(d.host + cl))?.host : Math.max(...layout.data.map((d) => d.host));
      expect(first).toBeDefined();
      if (where === "past the end") expect(first! + cl).toBe(eof);
      const second = first! + cl;
      const e = layout.data.find((d) => d.at % cl < cl - 8 && !meta.has(d.host))!;
      for (const [at, host] of [[e.at, first!], [e.at + 8, second]] as const) {
        const [hi, lo] = entry(host, "copied");
        bytes.writeUInt32BE(hi, at);
        bytes.writeUInt32BE(lo, at + 4);
      }
      const { path } = stage(bytes);
      const before = readFileSync(path);
      const h = openRw(path);
      const back = Buffer.alloc(2 * cl);
      expect(io(h.b, back, e.guest, false)).toBeLessThan(0);
      expect(io(h.b, pattern(2 * cl, e.guest, 9), e.guest, true)).toBeLessThan(0);
      h.close();
      const after = readFileSync(path);
      if (where === "metadata") expect(after.subarray(second, second + cl).equals(before.subarray(second, second + cl))).toBe(true);
      else expect(after.length).toBeLessThanOrEqual(Math.max(before.length, second));
    });
  }

  it("a run of in-place writes stops at a neighbouring cluster that is shared (COPIED clear): that one is copied, its old bytes stay", () => {
    const { bytes, layout } = smallImage();
    // Two neighbouring entries of one table whose clusters follow each other on the host.
    const e0 = layout.data.find((d) => d.at % C < C - 8 && layout.data.some((n) => n.at === d.at + 8 && n.host === d.host + C))!;
    expect(e0).toBeDefined();
    const e1 = layout.data.find((n) => n.at === e0.at + 8)!;
    // The second is shared, as after a snapshot: COPIED clear and a refcount of 2 (qcow2.txt §Cluster mapping, bit 63).
    const [hi, lo] = entry(e1.host, "none");
    bytes.writeUInt32BE(hi, e1.at);
    bytes.writeUInt32BE(lo, e1.at + 4);
    expect(layout.refcountOrder).toBe(4);
    bytes.writeUInt16BE(2, layout.blocks[0]! + (e1.host / C) * 2);
    const { path } = stage(bytes);
    const old = Buffer.from(bytes.subarray(e1.host, e1.host + C));
    const h = openRw(path);
    const data = pattern(2 * C, e0.guest, 11);
    expect(io(h.b, data, e0.guest, true)).toBe(0);
    expect(h.b.flush()).toBe(0);
    expect(readAll(h.b, e0.guest, 2 * C).equals(data)).toBe(true);
    h.close();
    expect(readFileSync(path).subarray(e1.host, e1.host + C).equals(old)).toBe(true);
  });

  it("a refcount block that counts every cluster past the end does not push the file out", () => {
    const { bytes, layout } = smallImage();
    const blk = layout.blocks[0]!;
    bytes.fill(0xff, blk, blk + C);
    const { path } = stage(bytes);
    const size = statSync(path).size;
    const h = openRw(path);
    for (let i = 0; i < 8; i++) expect(io(h.b, pattern(C, (20 + i) * C, i), (20 + i) * C, true)).toBe(0);
    expect(h.b.flush()).toBe(0);
    expect(readAll(h.b, 20 * C, C).equals(pattern(C, 20 * C, 0))).toBe(true);
    h.close();
    expect(statSync(path).size - size).toBeLessThanOrEqual(10 * C);
  });

  it("the largest L1 and refcount tables the caps allow open in time, in memory, and work", () => {
    const { bytes, layout } = smallImage();
    // A sparse file: the L1 table moved to 64 MiB with 4 Mi entries (32 MiB, the cap), the
    // refcount table to 128 MiB with 128 clusters (8 MiB, the cap), their old entries copied.
    const l1At = 64 * MiB;
    const rtAt = 128 * MiB;
    const rtClusters = (8 * MiB) / C;
    const { path, dir } = stage(bytes);
    const before = openRw(path);
    const expected = readAll(before.b, 0, 4 * MiB);
    before.close();
    const fd = openSync(path, "r+");
    writeSync(fd, bytes, layout.l1Off, layout.l1Size * 8, l1At);
    writeSync(fd, bytes, layout.rtOff, C, rtAt);
    const head = Buffer.alloc(64);
    head.writeUInt32BE(4 * 1024 * 1024, 0);
    head.writeBigUInt64BE(BigInt(l1At), 4);
    head.writeBigUInt64BE(BigInt(rtAt), 12);
    head.writeUInt32BE(rtClusters, 20);
    writeSync(fd, head, 0, 24, 36);
    ftruncateSync(fd, rtAt + 8 * MiB);
    closeSync(fd);
    const rss = process.memoryUsage().rss;
    for (const readonly of [true, false]) {
      const d = timed("openDisk", () => openDisk(path, { format: "qcow2", readonly }));
      const b = timed("backendFromInit", () => backendFromInit(d.init));
      expect(readAll(b, 0, 4 * MiB).equals(expected)).toBe(true);
      expect(io(b, pattern(C, 30 * C, 9), 30 * C, true)).toBe(readonly ? -30 : 0);
      timed("close", () => b.close());
      d.close();
    }
    expect(process.memoryUsage().rss - rss).toBeLessThan(200 * MiB);
    expect(readdirSync(dir).sort()).toEqual(["canary", "img.qcow2"]);
  });
});

describe("backing file names are the file's choice", () => {
  /** An image whose header names `name` as its backing file (no format extension: probed, read-only). */
  function naming(name: string): { dir: string; path: string; canary: Buffer } {
    const { bytes } = smallImage();
    const n = Buffer.from(name);
    const at = 64 * KiB - 1024;
    n.copy(bytes, at);
    bytes.writeBigUInt64BE(BigInt(at), 8);
    bytes.writeUInt32BE(n.length, 16);
    return stage(bytes, 256 * KiB);
  }

  it("naming a host file reads it and never writes it", () => {
    const { dir, path, canary } = naming("canary");
    const h = openRw(path);
    // Guest cluster 3 is unallocated in the image: it reads the canary, and a write there copies on write.
    expect(readAll(h.b, 3 * 64 * KiB, 4096).equals(canary.subarray(3 * 64 * KiB, 3 * 64 * KiB + 4096))).toBe(true);
    expect(io(h.b, pattern(4096, 3 * 64 * KiB, 3), 3 * 64 * KiB, true)).toBe(0);
    expect(h.b.discard(0, 4 * MiB)).toBe(0);
    expect(h.b.writeZeroes(0, 4 * MiB)).toBe(0);
    h.close();
    expect(readFileSync(join(dir, "canary")).equals(canary)).toBe(true);
  });

  for (const name of ["/dev/zero", ".", "/proc/self/mem", "img.qcow2"]) {
    it(`naming ${name} is refused or harmless`, () => {
      const { path } = naming(name);
      try {
        const h = openRw(path);
        expect(h.b.flush()).toBe(0);
        h.close();
      } catch (e) {
        expect(e).toBeInstanceOf(TypevisorError);
        expect(OPEN_CODES).toContain((e as TypevisorError).code);
      }
    });
  }

  it("naming a FIFO is refused at once, not a VMM blocked in open(2) until a writer comes", () => {
    // In a child process: a regression blocks a thread in open(2), which no test timeout can end.
    const dist = fileURLToPath(new URL("../../../../dist/vmm/disk/open.js", import.meta.url));
    expect(existsSync(dist), `${dist} is missing: npm test builds it (npm run build) before vitest`).toBe(true);
    const { dir, path } = naming("fifo");
    execFileSync("mkfifo", [join(dir, "fifo")]);
    const script = join(dir, "open.mjs");
    writeFileSync(
      script,
      `import { openDisk } from ${JSON.stringify(new URL("../../../../dist/vmm/disk/open.js", import.meta.url).href)};
try { openDisk(${JSON.stringify(path)}, { format: "qcow2", readonly: true }); console.log("OPENED"); }
catch (e) { console.log("REFUSED " + e.code); }
`,
    );
    const r = spawnSync(process.execPath, [script], { encoding: "utf8", timeout: 10_000, killSignal: "SIGKILL" });
    expect(r.signal, "the child was still in open(2) after 10 s").toBeNull();
    expect(r.stdout.trim()).toBe("REFUSED DISK_CHAIN");
  });
});
