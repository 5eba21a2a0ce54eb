/**
 * Make a new, empty qcow2 version 3 image (qcow2.txt §Header), optionally an overlay on a
 * backing file: what the daemon makes a VM's disk of (a linked clone costs a few clusters
 * whatever its virtual size). Layout: header cluster, refcount table, refcount blocks, L1
 * table; everything else is allocated by the writer as the guest writes.
 */
import { closeSync, fsyncSync, ftruncateSync, openSync, unlinkSync, writeSync } from "node:fs";
import { TypevisorError } from "../../../errors.js";
import type { DiskFormat } from "../backend.js";
import { EXT, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS, QCOW2_MAGIC, V3_HEADER_LENGTH, writeEntry } from "./format.js";
import { setRefcount } from "./refcount-entry.js";

export interface CreateQcow2Options {
  /** Virtual size in bytes (a multiple of 512). */
  size: number;
  /** Default 16 (64 KiB clusters, as qemu-img). */
  clusterBits?: number;
  /** Default 4 (16-bit refcounts, as qemu-img). */
  refcountOrder?: number;
  /** The backing file as the header records it (relative names resolve against the new image's directory) and its format. */
  backing?: { file: string; format: DiskFormat };
}

const pad8 = (n: number) => Math.ceil(n / 8) * 8;

/** The image's bytes up to the end of its metadata (the L1 table is all zeros: left sparse). */
export function qcow2ImageBytes(opts: CreateQcow2Options): { head: Buffer; fileSize: number } {
  const bits = opts.clusterBits ?? 16;
  const order = opts.refcountOrder ?? 4;
  if (!Number.isInteger(bits) || bits < MIN_CLUSTER_BITS || bits > MAX_CLUSTER_BITS) throw new TypevisorError("DISK_OPTIONS", `cluster size 2^${bits} is outside 512 B..2 MiB`);
  if (!Number.isInteger(order) || order < 0 || order > 6) throw new TypevisorError("DISK_OPTIONS", `refcount order ${order} is outside 0..6`);
  if (!Number.isSafeInteger(opts.size) || opts.size <= 0 || opts.size % 512 !== 0) throw new TypevisorError("DISK_SIZE", `disk size ${opts.size} is not a positive multiple of 512 bytes`);
  const cluster = 2 ** bits;
  const l1Size = Math.ceil(opts.size / cluster / (cluster / 8));
  if (l1Size * 8 > MAX_L1_BYTES) throw new TypevisorError("DISK_SIZE", `a ${opts.size}-byte disk needs an L1 table above ${MAX_L1_BYTES} bytes at ${cluster}-byte clusters`);
  const l1Clusters = Math.ceil((l1Size * 8) / cluster);
  const perBlock = (cluster * 8) >> order;
  // Refcount blocks to count every metadata cluster, and table clusters to point at the blocks.
  let blocks = 1;
  let tableClusters = 1;
  for (;;) {
    const total = 1 + tableClusters + blocks + l1Clusters;
    const b = Math.ceil(total / perBlock);
    const t = Math.ceil((b * 8) / cluster);
    if (b === blocks && t === tableClusters) break;
    blocks = b;
    tableClusters = t;
  }
  const tableAt = cluster;
  const blocksAt = tableAt + tableClusters * cluster;
  const l1At = blocksAt + blocks * cluster;
  const metaClusters = 1 + tableClusters + blocks + l1Clusters;

  const head = Buffer.alloc(l1At);
  // §Header (version 3, 104 bytes, then extensions and the backing name inside cluster 0).
  head.writeUInt32BE(QCOW2_MAGIC, 0);
  head.writeUInt32BE(3, 4);
  head.writeUInt32BE(bits, 20);
  head.writeBigUInt64BE(BigInt(opts.size), 24);
  head.writeUInt32BE(l1Size, 36);
  head.writeBigUInt64BE(BigInt(l1At), 40);
  head.writeBigUInt64BE(BigInt(tableAt), 48);
  head.writeUInt32BE(tableClusters, 56);
  head.writeUInt32BE(order, 96);
  head.writeUInt32BE(V3_HEADER_LENGTH, 100);
  let at = V3_HEADER_LENGTH;
  if (opts.backing !== undefined) {
    const name = Buffer.from(opts.backing.file, "utf8");
    if (name.length === 0 || name.length > MAX_BACKING_NAME || name.includes(0)) throw new TypevisorError("DISK_OPTIONS", `backing file name must be 1..${MAX_BACKING_NAME} bytes without NUL`);
    const fmt = Buffer.from(opts.backing.format, "latin1");
    head.writeUInt32BE(EXT.BACKING_FORMAT, at);
    head.writeUInt32BE(fmt.length, at + 4);
    fmt.copy(head, at + 8);
    at += 8 + pad8(fmt.length);
    at += 8; // end of the extensions (type 0, length 0)
    if (at + name.length > cluster) throw new TypevisorError("DISK_OPTIONS", `backing file name does not fit in a ${cluster}-byte header cluster`);
    name.copy(head, at);
    head.writeBigUInt64BE(BigInt(at), 8);
    head.writeUInt32BE(name.length, 16);
  }
  // §Host cluster management: table entries for the blocks, refcount 1 for every metadata cluster.
  for (let i = 0; i < blocks; i++) writeEntry(head, tableAt + i * 8, blocksAt + i * cluster);
  for (let c = 0; c < metaClusters; c++) {
    const block = head.subarray(blocksAt + Math.floor(c / perBlock) * cluster, blocksAt + (Math.floor(c / perBlock) + 1) * cluster);
    setRefcount(block, c % perBlock, order, 1);
  }
  return { head, fileSize: metaClusters * cluster };
}

/**
 * Create `path` (which must not exist) as an empty qcow2 image; on failure nothing is left.
 * @throws TypevisorError DISK_OPTIONS, DISK_SIZE, DISK_CREATE
 */
export function createQcow2(path: string, opts: CreateQcow2Options): void {
  const { head, fileSize } = qcow2ImageBytes(opts);
  let fd: number;
  try {
    fd = openSync(path, "wx", 0o600);
  } catch (e) {
    throw new TypevisorError("DISK_CREATE", `cannot create ${path}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, { cause: e });
  }
  try {
    writeSync(fd, head, 0, head.length, 0);
    ftruncateSync(fd, fileSize);
    fsyncSync(fd);
    closeSync(fd);
  } catch (e) {
    closeSync(fd);
    unlinkSync(path);
    throw new TypevisorError("DISK_CREATE", `cannot write ${path}: ${(e as Error).message}`, { cause: e });
  }
}
