/**
 * qcow2 reference counts (qcow2.txt §Host cluster management) and the cluster allocator of a
 * writable image. The refcount table lives in memory whole (at most 8 MiB, the header's cap);
 * refcount blocks are cached, written back when evicted or when the image flushes.
 *
 * Crash safety, as `qemu-img check` judges an image after the VMM is killed at any moment (at
 * most leaked clusters, never a cluster in use with a refcount of 0, never a refcount of 0
 * reused while something still points there):
 * - a cluster's refcount reaches the file before anything that points at it: increments sit in
 *   dirty blocks that the image writes (and syncs) before it writes its L2 and L1 tables;
 * - decrements are applied only after the tables that stopped pointing there are on disk
 *   (the image keeps them pending until its flush has written those tables);
 * - freed clusters are never handed out again in the same session: the allocator only moves
 *   forward from the end of the file, so nothing can point at a cluster twice;
 * - a new refcount block, and a grown refcount table, are written and synced before the entry
 *   (or header) that makes them live.
 */
import { DiskFormatError, entryOffset, writeEntry } from "./format.js";
import { MetaIo } from "./io.js";
import { getRefcount, maxRefcount, setRefcount } from "./refcount-entry.js";

/** Refcount blocks kept in memory (each one cluster); a 64 KiB block covers 2 GiB at 16 bits. */
const BLOCK_CACHE = 64;

interface Block {
  buf: Buffer;
  dirty: boolean;
}

export interface RefcountLayout {
  clusterBits: number;
  refcountOrder: number;
  tableOffset: number;
  tableClusters: number;
}

export class Refcounts {
  private readonly cluster: number;
  private readonly order: number;
  /** Entries per refcount block. */
  private readonly perBlock: number;
  private table: Buffer;
  tableOffset: number;
  tableClusters: number;
  private readonly blocks = new Map<number, Block>();
  /** The next host offset the allocator tries: only ever grows (see the file comment). */
  nextFree: number;
  /** Called with each cluster that becomes metadata (a refcount block or table). */
  onMetadata: (offset: number, clusters: number) => void = () => {};

  constructor(private readonly io: MetaIo, layout: RefcountLayout, fileSize: number) {
    this.cluster = 2 ** layout.clusterBits;
    this.order = layout.refcountOrder;
    this.perBlock = (this.cluster * 8) >> layout.refcountOrder;
    this.tableOffset = layout.tableOffset;
    this.tableClusters = layout.tableClusters;
    this.table = Buffer.alloc(layout.tableClusters * this.cluster);
    io.read(this.table, layout.tableOffset, "the refcount table");
    this.nextFree = Math.ceil(fileSize / this.cluster) * this.cluster;
  }

  /** Every refcount block offset in the table, checked aligned and inside `fileSize`. @throws DiskFormatError */
  blockOffsets(fileSize: number): number[] {
    const out: number[] = [];
    for (let i = 0; i < this.table.length / 8; i++) {
      const off = this.entry(i);
      if (off === 0) continue;
      if (off % this.cluster !== 0 || off + this.cluster > fileSize) throw new DiskFormatError(`qcow2 refcount block ${i} at ${off} is not a cluster inside the file`);
      out.push(off);
    }
    return out;
  }

  private entry(i: number): number {
    return entryOffset(this.table.readUInt32BE(i * 8), this.table.readUInt32BE(i * 8 + 4));
  }

  /** The refcount block covering host offset `off`, or undefined when none is allocated (all counts 0). */
  private block(off: number): Block | undefined {
    const i = Math.floor(off / this.cluster / this.perBlock);
    if (i >= this.table.length / 8) return undefined;
    const at = this.entry(i);
    if (at === 0) return undefined;
    let b = this.blocks.get(at);
    if (b !== undefined) {
      // LRU: most recently used last.
      this.blocks.delete(at);
      this.blocks.set(at, b);
      return b;
    }
    const buf = Buffer.alloc(this.cluster);
    this.io.read(buf, at, "a refcount block");
    b = { buf, dirty: false };
    this.blocks.set(at, b);
    this.evict();
    return b;
  }

  private evict(): void {
    while (this.blocks.size > BLOCK_CACHE) {
      const [at, b] = this.blocks.entries().next().value as [number, Block];
      // Writing a block early is always safe: it holds only increments and decrements whose
      // ordering rules were met when they were made (file comment).
      if (b.dirty) this.io.write(b.buf, at, "a refcount block");
      this.blocks.delete(at);
    }
  }

  private index(off: number): number {
    return Math.floor(off / this.cluster) % this.perBlock;
  }

  get(off: number): number {
    const b = this.block(off);
    return b === undefined ? 0 : getRefcount(b.buf, this.index(off), this.order);
  }

  /** Change the count of an existing-block cluster by `delta` (never below 0, never past the width's maximum). */
  private add(off: number, delta: number): void {
    const b = this.block(off);
    if (b === undefined) {
      if (delta < 0) return; // nothing was counted there
      throw new Error("refcount block missing for an increment");
    }
    const i = this.index(off);
    const v = getRefcount(b.buf, i, this.order);
    const next = Math.min(maxRefcount(this.order), Math.max(0, v + delta));
    if (next === v) return;
    setRefcount(b.buf, i, this.order, next);
    b.dirty = true;
  }

  /** Set the count of an existing-block cluster to exactly 1. */
  private setOne(off: number): void {
    const b = this.block(off);
    if (b === undefined) throw new Error("refcount block missing for an allocation");
    const i = this.index(off);
    if (getRefcount(b.buf, i, this.order) === 1) return;
    setRefcount(b.buf, i, this.order, 1);
    b.dirty = true;
  }

  /**
   * One free cluster, its refcount set to 1 (in a dirty block: on disk before the caller's
   * tables, see the file comment); makes refcount blocks and grows the table as needed.
   */
  alloc(): number {
    for (;;) {
      const off = this.nextFree;
      this.nextFree += this.cluster;
      const ti = Math.floor(off / this.cluster / this.perBlock);
      if (ti >= this.table.length / 8) {
        this.nextFree = off;
        this.grow(ti + 1);
        continue;
      }
      if (this.entry(ti) === 0) {
        // No block covers this range yet: this cluster becomes that block, counting itself.
        const buf = Buffer.alloc(this.cluster);
        setRefcount(buf, this.index(off), this.order, 1);
        this.io.write(buf, off, "a new refcount block");
        this.io.sync();
        const e = Buffer.alloc(8);
        writeEntry(e, 0, off);
        this.io.write(e, this.tableOffset + ti * 8, "a refcount table entry");
        this.io.sync();
        e.copy(this.table, ti * 8);
        this.blocks.set(off, { buf, dirty: false });
        this.evict();
        this.onMetadata(off, 1);
        continue;
      }
      // Not `skip it when its count is not 0`: nothing can point at or past the end of the file
      // at open (tables and data there are refused) and nothing we made lies at or past
      // nextFree, so a count there is a leftover or a crafted one. Skipping such clusters let a
      // refcount block full of 0xff push the allocator (and the file's size) 2 GiB out per block.
      this.setOne(off);
      return off;
    }
  }

  /** `clusters` contiguous free clusters (new L1 or refcount tables), each with refcount 1. */
  allocContiguous(clusters: number): number {
    for (;;) {
      const first = this.alloc();
      let n = 1;
      while (n < clusters) {
        const next = this.alloc();
        if (next !== first + n * this.cluster) {
          // Something (a new refcount block) landed in between: start again after it; what was
          // taken so far is leaked (counted, unused), which `qemu-img check` reports but accepts.
          break;
        }
        n++;
      }
      if (n === clusters) return first;
    }
  }

  /**
   * The refcount table is full: write a bigger one after everything, with blocks for the
   * clusters it and those blocks occupy, sync, point the header at it, sync, then free the old
   * one (qcow2.txt §Host cluster management: the table is contiguous).
   */
  private grow(minEntries: number): void {
    const oldEntries = this.table.length / 8;
    const perCluster = this.cluster / 8;
    const entries = Math.max(minEntries + 1, oldEntries * 2);
    const clusters = Math.ceil(entries / perCluster);
    const start = this.nextFree;
    // Blocks for the ranges [start, end) covers that have none; each block added may need another.
    let blocks = 0;
    let needed: number[] = [];
    for (;;) {
      const end = start + (clusters + blocks) * this.cluster;
      needed = [];
      for (let r = Math.floor(start / this.cluster / this.perBlock); r * this.perBlock * this.cluster < end; r++) {
        if (r >= oldEntries || this.entry(r) === 0) needed.push(r);
      }
      if (needed.length <= blocks) break;
      blocks = needed.length;
    }
    const table = Buffer.alloc(clusters * this.cluster);
    this.table.copy(table, 0, 0, this.table.length);
    const end = start + (clusters + blocks) * this.cluster;
    const newBlocks = new Map<number, Buffer>();
    needed.forEach((r, j) => {
      const at = start + (clusters + j) * this.cluster;
      writeEntry(table, r * 8, at);
      newBlocks.set(r, Buffer.alloc(this.cluster));
    });
    // Count every cluster of [start, end) once: in a new block, or in an old one.
    for (let off = start; off < end; off += this.cluster) {
      const r = Math.floor(off / this.cluster / this.perBlock);
      const nb = newBlocks.get(r);
      if (nb !== undefined) setRefcount(nb, this.index(off), this.order, 1);
      else this.setOne(off); // past nextFree: an old count there is stale (see alloc)
    }
    for (const [r, buf] of newBlocks) this.io.write(buf, entryOffset(table.readUInt32BE(r * 8), table.readUInt32BE(r * 8 + 4)), "a new refcount block");
    this.writeDirty();
    this.io.write(table, start, "the new refcount table");
    this.io.sync();
    const h = Buffer.alloc(12);
    writeEntry(h, 0, start);
    h.writeUInt32BE(clusters, 8);
    this.io.write(h, 48, "the header's refcount table fields");
    this.io.sync();
    const oldOffset = this.tableOffset;
    const oldClusters = this.tableClusters;
    this.table = table;
    this.tableOffset = start;
    this.tableClusters = clusters;
    this.nextFree = end;
    this.onMetadata(start, clusters);
    for (const [r, buf] of newBlocks) {
      const at = entryOffset(table.readUInt32BE(r * 8), table.readUInt32BE(r * 8 + 4));
      this.blocks.set(at, { buf, dirty: false });
      this.onMetadata(at, 1);
    }
    this.evict();
    // The header no longer points at the old table (synced above): its clusters are free.
    for (let i = 0; i < oldClusters; i++) this.add(oldOffset + i * this.cluster, -1);
  }

  /** Drop one reference from each host cluster that [off, off + bytes) touches. */
  release(off: number, bytes: number): number[] {
    const freed: number[] = [];
    const first = Math.floor(off / this.cluster) * this.cluster;
    for (let c = first; c < off + bytes; c += this.cluster) {
      this.add(c, -1);
      if (this.get(c) === 0) freed.push(c);
    }
    return freed;
  }

  /** Write every dirty block (the caller syncs). */
  writeDirty(): void {
    for (const [at, b] of this.blocks) {
      if (!b.dirty) continue;
      this.io.write(b.buf, at, "a refcount block");
      b.dirty = false;
    }
  }

  get dirty(): boolean {
    for (const b of this.blocks.values()) if (b.dirty) return true;
    return false;
  }
}
