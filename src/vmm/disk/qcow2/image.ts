/**
 * A qcow2 image as a DiskBackend (QEMU's docs/interop/qcow2.txt; sections cited as §Name):
 * version 3 read and write, version 2 read; any cluster size from 512 B to 2 MiB; refcounts of
 * any width; backing files; zero clusters; compressed (deflate) clusters read; discard and
 * write-zeroes that deallocate whole clusters. Runs on one thread (the disk's I/O thread).
 *
 * Ordering (what makes a VMM killed at any moment leave at most leaked clusters): a write to an
 * unallocated cluster allocates a new one at the end of the file (its refcount set in a dirty
 * refcount block), writes the data there, and points the L2 entry at it in the cached table
 * only. flushMetadata() then writes refcount blocks, syncs, writes the L2 tables, syncs, writes
 * the L1 entries that changed, syncs, and only then applies the frees of clusters the tables
 * stopped pointing at (refcounts.ts). Everything since the last guest flush may be lost, as
 * with QEMU's default writeback cache; nothing flushed is.
 *
 * The file is hostile: every table offset is checked at open (aligned, inside the file, not on
 * top of other metadata); a data cluster that points into metadata or past the end fails its
 * request with EIO instead of being written; sizes come from the header only after its caps.
 */
import { fstatSync } from "node:fs";
import { constants as zlibConstants, inflateRawSync } from "node:zlib";
import { addressOf, IoVec } from "../../../sys/iov.js";
import { EIO, fallocate, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, ftruncate } from "../../../sys/libc.js";
import { transferAll } from "../../devices/virtio/block/file-io.js";
import { addRange, type DataRange, type DiskBackend } from "../backend.js";
import { compressedRange, DiskFormatError, entryOffset, INCOMPAT, L2, parseHeader, standardReservedBits, writeEntry, type Qcow2Header } from "./format.js";
import { errnoOf, IoFailure, MetaIo } from "./io.js";
import { L2Cache, type L2Table } from "./l2-cache.js";
import { Refcounts } from "./refcounts.js";

const EROFS = 30;
/** Bytes of L2 tables kept in memory: 8 MiB maps 64 GiB of disk at 64 KiB clusters. */
const L2_CACHE_BYTES = 8 * 1024 * 1024;
/** How much of the file's start the header is read from (extensions and backing name live in cluster 0). */
const HEADER_READ = 64 * 1024;

const enum Kind {
  Unallocated,
  Zero,
  Data,
  Compressed,
}

/** An L2 entry as it was before a write changed it (write(): undone if the data write fails). */
class Undo {
  constructor(
    readonly table: L2Table,
    readonly at: number,
    readonly hi: number,
    readonly lo: number,
  ) {}
}

/** A cluster's mapping: its kind, and for Data the host offset and whether it may be written in place. */
class Mapping {
  constructor(
    readonly kind: Kind,
    readonly host: number,
    readonly inPlace: boolean,
    readonly hi: number,
    readonly lo: number,
  ) {}
}

/*
 * One instance of each, made first, with values past 2^31: V8 gives an object's field the
 * representation of the first value stored in it, and a later value that does not fit (an L2
 * entry's high word with the COPIED bit, a host offset past 2 GiB) replaces the class's hidden
 * class and deoptimizes every function of the request path that ran on it, which then recompiles
 * in the middle of the guest's I/O (seen as `wrong map` bailouts in bench/disk's timed phases:
 * docs/benchmarks.md). Fields made for doubles from the start also take small integers.
 */
new Mapping(Kind.Unallocated, 2 ** 52, false, 2 ** 32 - 1, 2 ** 32 - 1);
new Undo({ buf: Buffer.alloc(0), dirty: false }, 0, 2 ** 32 - 1, 2 ** 32 - 1);
/** A cluster whose L2 table does not exist (its L1 entry is empty). */
const UNALLOCATED = new Mapping(Kind.Unallocated, 0, false, 0, 0);

export interface Qcow2OpenOptions {
  readonly: boolean;
  /** The image unallocated clusters read from (already open, read-only). */
  backing?: DiskBackend;
  /** For messages. */
  path: string;
  /** L2 tables the cache holds (default: 8 MiB of them, at least 16); tests make it small to force eviction. */
  l2CacheTables?: number;
}

export class Qcow2Backend implements DiskBackend {
  readonly format = "qcow2";
  readonly capacity: number;
  readonly header: Qcow2Header;
  private readonly io: MetaIo;
  private readonly cluster: number;
  private readonly l2Entries: number;
  private readonly l1: Buffer;
  private readonly l1Dirty = new Set<number>();
  private readonly l2: L2Cache;
  /** L2 tables this session made or wrote: their entries past the file's original end are our allocations (refusePastEnd). */
  private readonly ownTables = new Set<number>();
  private readonly refs: Refcounts | undefined;
  /** Clusters (by index) that hold metadata: never written as data. */
  private readonly metadata = new Set<number>();
  private fileSize: number;
  /** The file's size when it was opened: compressed data (which we never write) lies below it. */
  private readonly openSize: number;
  /** Host ranges the tables stopped pointing at, freed once those tables are on disk. */
  private pendingFrees: { off: number; bytes: number }[] = [];
  private readonly backing: DiskBackend | undefined;
  private readonly sub = new IoVec();
  /** One-piece iovecs over the bounce and zero buffers (made once: an IoVec's default storage is 16 KiB). */
  private readonly bounceIov = new IoVec(new Uint8Array(256));
  private readonly zerosIov = new IoVec(new Uint8Array(256));
  /** One cluster of scratch for copy-on-write and decompression; off V8's heap, never moves. */
  private readonly bounce: Buffer;
  private readonly bounceAddress: number;
  private readonly zeros: Buffer;
  private readonly zerosAddress: number;
  private readonly readonly: boolean;
  private closed = false;

  /** @throws DiskFormatError for a file we cannot or will not open; TypevisorError DISK_IO when it cannot be read. */
  constructor(private readonly fd: number, opts: Qcow2OpenOptions) {
    this.io = new MetaIo(fd);
    this.fileSize = fstatSync(fd).size;
    this.openSize = this.fileSize;
    const first = Buffer.alloc(Math.min(HEADER_READ, this.fileSize));
    try {
      this.io.read(first, 0, "the header");
    } catch (e) {
      throw new DiskFormatError(`cannot read the qcow2 header of ${opts.path}: ${(e as Error).message}`);
    }
    const h = parseHeader(first, this.fileSize);
    this.header = h;
    this.readonly = opts.readonly;
    this.cluster = 2 ** h.clusterBits;
    this.l2Entries = this.cluster / 8;
    this.capacity = h.size;
    this.backing = opts.backing;
    if (h.backingFile !== undefined && opts.backing === undefined) throw new DiskFormatError(`${opts.path} has a backing file (${h.backingFile}) that was not opened`);

    if (!opts.readonly) {
      const hint = "open it read-only, or repair it: qemu-img check -r all IMAGE";
      if (h.version === 2) throw new DiskFormatError(`${opts.path} is qcow2 version 2, which typevisor opens read-only`, "upgrade it: qemu-img amend -o compat=1.1 IMAGE");
      if ((h.incompatible & (1n << BigInt(INCOMPAT.DIRTY))) !== 0n) throw new DiskFormatError(`${opts.path} is marked dirty (its refcounts may be wrong)`, hint);
      if ((h.incompatible & (1n << BigInt(INCOMPAT.CORRUPT))) !== 0n) throw new DiskFormatError(`${opts.path} is marked corrupt`, hint);
      if (h.nbSnapshots > 0) throw new DiskFormatError(`${opts.path} has ${h.nbSnapshots} internal snapshots, which typevisor does not write`, "open it read-only, or remove them: qemu-img snapshot -d NAME IMAGE");
    }

    const cl = (off: number) => Math.floor(off / this.cluster);
    this.metadata.add(0);
    const l1Clusters = Math.ceil((h.l1Size * 8) / this.cluster);
    for (let i = 0; i < l1Clusters; i++) this.claim(cl(h.l1TableOffset) + i, "the L1 table");
    for (let i = 0; i < h.refcountTableClusters; i++) this.claim(cl(h.refcountTableOffset) + i, "the refcount table");

    this.l1 = Buffer.alloc(h.l1Size * 8);
    this.io.read(this.l1, h.l1TableOffset, "the L1 table");
    if (!opts.readonly) {
      this.refs = new Refcounts(this.io, { clusterBits: h.clusterBits, refcountOrder: h.refcountOrder, tableOffset: h.refcountTableOffset, tableClusters: h.refcountTableClusters }, this.fileSize);
      for (const b of this.refs.blockOffsets(this.fileSize)) this.claim(cl(b), "a refcount block");
      this.refs.onMetadata = (off, n) => {
        for (let i = 0; i < n; i++) this.metadata.add(cl(off) + i);
      };
    }
    // L2 tables: aligned, inside the file, each once, on no other metadata (§Cluster mapping).
    for (let i = 0; i < h.l1Size; i++) {
      const hi = this.l1.readUInt32BE(i * 8);
      const lo = this.l1.readUInt32BE(i * 8 + 4);
      const off = entryOffset(hi, lo);
      if ((lo & 0x1ff) !== 0 || (hi & 0x7f00_0000) !== 0) throw new DiskFormatError(`qcow2 L1 entry ${i} has reserved bits set`);
      if (off === 0) continue;
      if (off % this.cluster !== 0 || off + this.cluster > this.fileSize) throw new DiskFormatError(`qcow2 L1 entry ${i} points at ${off}, not a cluster inside the file`);
      this.claim(cl(off), `L2 table ${i}`);
    }
    this.l2 = new L2Cache(opts.l2CacheTables !== undefined ? Math.max(1, opts.l2CacheTables) : Math.max(16, Math.floor(L2_CACHE_BYTES / this.cluster)));
    this.bounce = Buffer.alloc(this.cluster);
    this.bounceAddress = addressOf(this.bounce);
    this.zeros = Buffer.alloc(this.cluster);
    this.zerosAddress = addressOf(this.zeros);

    // §Header autoclear_features: a writer that does not maintain them (bitmaps) clears them first.
    if (!opts.readonly && h.autoclear !== 0n) {
      const b = Buffer.alloc(8);
      this.io.write(b, 88, "the header's autoclear features");
      this.io.sync();
    }
  }

  /** Mark cluster `c` as metadata, refusing an overlap with metadata seen before (the header included). */
  private claim(c: number, what: string): void {
    if (this.metadata.has(c)) throw new DiskFormatError(`qcow2 ${what} overlaps other metadata (cluster ${c})`);
    this.metadata.add(c);
  }

  // ---- mapping ----

  private loadL2(off: number): L2Table {
    const t = this.l2.get(off);
    if (t !== undefined) return t;
    if (this.l2.needsFlush()) this.flushMetadata();
    const buf = Buffer.alloc(this.cluster);
    this.io.read(buf, off, "an L2 table");
    if (this.refs !== undefined && !this.ownTables.has(off)) this.refusePastEnd(buf, off);
    const table = { buf, dirty: false };
    this.l2.put(off, table);
    return table;
  }

  /**
   * A table this session has not written may not point at or past the file's end at open: that
   * is where our allocations go, so such an entry (refused only while the file was shorter)
   * later aliased a cluster we handed to another guest cluster or table entry, and freeing it
   * through the crafted entry dropped a live cluster's refcount to 0 and punched it out. The
   * whole table is refused (EIO for every request it maps); a valid image never has one.
   */
  private refusePastEnd(buf: Buffer, off: number): void {
    for (let at = 0; at < buf.length; at += 8) {
      const hi = buf.readUInt32BE(at);
      if ((hi & L2.COMPRESSED_HI) === 0 && entryOffset(hi, buf.readUInt32BE(at + 4)) >= this.openSize) {
        throw new IoFailure(-EIO, `L2 table at ${off} entry ${at / 8} points past the end of the file`);
      }
    }
  }

  /** The L2 table for guest cluster `gc`, or undefined when its L1 entry is empty. */
  private tableFor(gc: number): L2Table | undefined {
    const l1i = Math.floor(gc / this.l2Entries);
    const off = entryOffset(this.l1.readUInt32BE(l1i * 8), this.l1.readUInt32BE(l1i * 8 + 4));
    return off === 0 ? undefined : this.loadL2(off);
  }

  /** The L2 table for `gc`, made (zeroed, dirty, L1 entry dirty) when there is none. */
  private tableForWrite(gc: number): L2Table {
    const t = this.tableFor(gc);
    if (t !== undefined) return t;
    if (this.l2.needsFlush()) this.flushMetadata();
    const l1i = Math.floor(gc / this.l2Entries);
    const off = this.refs!.alloc();
    this.metadata.add(off / this.cluster);
    const table = { buf: Buffer.alloc(this.cluster), dirty: true };
    this.ownTables.add(off);
    // A fresh table past the old end of the file: it must be written even if nothing else is.
    this.l2.put(off, table);
    writeEntry(this.l1, l1i * 8, off, L2.COPIED_HI);
    this.l1Dirty.add(l1i);
    return table;
  }

  private map(gc: number): Mapping {
    const t = this.tableFor(gc);
    if (t === undefined) return UNALLOCATED;
    const at = (gc % this.l2Entries) * 8;
    return this.classify(t.buf.readUInt32BE(at), t.buf.readUInt32BE(at + 4), gc);
  }

  /** An L2 entry's meaning (§Cluster mapping); an invalid one is an IoFailure (EIO) for the request. */
  private classify(hi: number, lo: number, gc: number): Mapping {
    if ((hi & L2.COMPRESSED_HI) !== 0) {
      // Checked here, not only when inflating: overwriting or discarding the cluster frees these
      // bytes without reading them, and a descriptor aimed at the header, at other metadata or past
      // the end (at clusters allocated later) dropped that cluster's refcount to 0 and punched a
      // hole in it: a crafted entry plus a guest discard wiped the header. Compressed data lies
      // after the header, inside the file as opened, on no metadata (qcow2.txt §Compressed Clusters
      // Descriptor; QEMU allocates it in clusters of its own).
      const r = compressedRange(hi, lo, this.header.clusterBits);
      const first = Math.floor(r.offset / this.cluster);
      const last = Math.floor((r.offset + r.bytes - 1) / this.cluster);
      let bad = r.offset < this.cluster || r.offset >= this.openSize || last >= Math.ceil(this.openSize / this.cluster) || r.bytes > 2 * this.cluster + 512;
      for (let c = first; !bad && c <= last; c++) bad = this.metadata.has(c);
      if (bad) throw new IoFailure(-EIO, `compressed guest cluster ${gc} lies outside the file's data`);
      return new Mapping(Kind.Compressed, 0, false, hi, lo);
    }
    if (standardReservedBits(hi, lo)) throw new IoFailure(-EIO, `L2 entry of guest cluster ${gc} has reserved bits set`);
    if (this.header.version === 3 && (lo & L2.ZERO_LO) !== 0) return new Mapping(Kind.Zero, 0, false, hi, lo);
    const host = entryOffset(hi, lo);
    if (host === 0) {
      // Offset 0 with bit 63 set means "host cluster 0" only with an external data file (refused at open).
      if ((hi & L2.COPIED_HI) !== 0) throw new IoFailure(-EIO, `L2 entry of guest cluster ${gc} points at the header`);
      return new Mapping(Kind.Unallocated, 0, false, hi, lo);
    }
    if (host % this.cluster !== 0) throw new IoFailure(-EIO, `L2 entry of guest cluster ${gc} is not cluster-aligned`);
    const c = host / this.cluster;
    // Never data on metadata or past the file (a crafted table must not turn a guest write into a
    // header write, or grow the file to a size of its choosing). A last cluster may end past it.
    if (this.metadata.has(c) || host >= this.fileSize) throw new IoFailure(-EIO, `guest cluster ${gc} maps to host ${host}, which is metadata or past the end`);
    return new Mapping(Kind.Data, host, (hi & L2.COPIED_HI) !== 0, hi, lo);
  }

  /**
   * Check every L2 table and entry now, as a request would (classify): an image brought from
   * elsewhere (`image import`) is refused at once for a crafted table rather than failing a
   * guest's read later. Reads metadata only.
   * @throws IoFailure (an L2 table or entry the backend would refuse)
   */
  verify(): void {
    for (let i = 0; i < this.header.l1Size; i++) {
      const off = entryOffset(this.l1.readUInt32BE(i * 8), this.l1.readUInt32BE(i * 8 + 4));
      if (off === 0) continue;
      const t = this.loadL2(off);
      this.refusePastEnd(t.buf, off);
      for (let j = 0; j < this.l2Entries; j++) {
        const gc = i * this.l2Entries + j;
        if (gc * this.cluster >= this.capacity) break;
        this.classify(t.buf.readUInt32BE(j * 8), t.buf.readUInt32BE(j * 8 + 4), gc);
      }
    }
  }

  /**
   * What of [pos, pos + len) may hold data (DiskBackend.dataRanges): data and compressed clusters,
   * and under unallocated ones (a whole L2 table's span at once when its L1 entry is empty) what
   * the backing file lists; zero clusters, and clusters unallocated without a backing file or past
   * its end, are left out. Reads metadata only; an entry the backend refuses throws (IoFailure).
   */
  dataRanges(pos: number, len: number): DataRange[] {
    const out: DataRange[] = [];
    const end = Math.min(pos + len, this.capacity);
    const fromBacking = (p: number, n: number): void => {
      const inside = this.backing === undefined ? 0 : Math.max(0, Math.min(n, this.backing.capacity - p));
      if (inside > 0) for (const r of this.backing!.dataRanges(p, inside)) addRange(out, r.offset, r.length);
    };
    let p = pos;
    while (p < end) {
      const gc = Math.floor(p / this.cluster);
      const l1i = Math.floor(gc / this.l2Entries);
      if (entryOffset(this.l1.readUInt32BE(l1i * 8), this.l1.readUInt32BE(l1i * 8 + 4)) === 0) {
        // No L2 table: the whole span it would map is unallocated.
        const spanEnd = Math.min(end, (l1i + 1) * this.l2Entries * this.cluster);
        fromBacking(p, spanEnd - p);
        p = spanEnd;
        continue;
      }
      const n = Math.min(this.cluster - (p % this.cluster), end - p);
      const m = this.map(gc);
      if (m.kind === Kind.Data || m.kind === Kind.Compressed) addRange(out, p, n);
      else if (m.kind === Kind.Unallocated) fromBacking(p, n);
      p += n;
    }
    return out;
  }

  // ---- reads ----

  readv(iov: IoVec, pos: number): number {
    try {
      this.read(iov, 0, iov.bytes, pos);
      return 0;
    } catch (e) {
      return errnoOf(e);
    }
  }

  /** Bytes [skip, skip + len) of `iov` from guest offset `pos`, merging runs of contiguous data clusters. */
  private read(iov: IoVec, skip: number, len: number, pos: number): void {
    let done = 0;
    while (done < len) {
      const p = pos + done;
      const gc = Math.floor(p / this.cluster);
      const m = this.map(gc);
      let n = Math.min(this.cluster - (p % this.cluster), len - done);
      if (m.kind === Kind.Data) {
        // Extend over the following clusters while they are data right after this one on the host.
        n = this.dataRun(gc, m.host, p % this.cluster, n, len - done, false);
        this.readData(iov, skip + done, n, m.host + (p % this.cluster));
      } else if (m.kind === Kind.Zero) {
        while (done + n < len && this.map(gc + Math.ceil((p % this.cluster + n) / this.cluster)).kind === Kind.Zero) n += Math.min(this.cluster, len - done - n);
        this.slice(iov, skip + done, n).fillZero();
      } else if (m.kind === Kind.Unallocated) {
        // One backing-file read for a run of unallocated clusters (a sequential read of a fresh
        // overlay); without an L2 table, all of that table's span is unallocated at once.
        if (m === UNALLOCATED) n = Math.min(len - done, (Math.floor(gc / this.l2Entries) + 1) * this.l2Entries * this.cluster - p);
        while (done + n < len && this.map(gc + Math.ceil((p % this.cluster + n) / this.cluster)).kind === Kind.Unallocated) n += Math.min(this.cluster, len - done - n);
        this.readBacking(iov, skip + done, n, p);
      } else {
        this.decompress(m, gc);
        this.slice(iov, skip + done, n).copyIn(this.bounce.subarray(p % this.cluster, (p % this.cluster) + n));
      }
      done += n;
    }
  }

  /**
   * How far a run that starts `inOff` bytes into data cluster `gc` (at `host`, `n` bytes so far)
   * extends, up to `max` bytes, over the clusters after it that are data at the next host
   * cluster (and may be written in place, when `inPlace`). Reads the entries of gc's own L2
   * table directly, with the checks classify() makes for data (no reserved bits, not zero or
   * compressed, not metadata, inside the file), and without an object per cluster; a cluster
   * that fails them, or one in the next table, ends the run and is mapped (and refused) on its own.
   */
  private dataRun(gc: number, host: number, inOff: number, n: number, max: number, inPlace: boolean): number {
    const t = this.tableFor(gc);
    if (t === undefined) return n;
    const tableEnd = (Math.floor(gc / this.l2Entries) + 1) * this.l2Entries;
    const zeroFlag = this.header.version === 3 ? L2.ZERO_LO : 0;
    for (let g = gc + 1; n < max && g < tableEnd; g++) {
      const at = (g % this.l2Entries) * 8;
      const hi = t.buf.readUInt32BE(at);
      const lo = t.buf.readUInt32BE(at + 4);
      if ((hi & L2.COMPRESSED_HI) !== 0 || (lo & zeroFlag) !== 0 || standardReservedBits(hi, lo)) break;
      if (inPlace && (hi & L2.COPIED_HI) === 0) break;
      const h = entryOffset(hi, lo);
      if (h !== host + inOff + n || h >= this.fileSize || this.metadata.has(h / this.cluster)) break;
      n += Math.min(this.cluster, max - n);
    }
    return n;
  }

  /** Host bytes [host, host + len) into `iov`; what lies past the end of the file reads as zeros (a last cluster QEMU wrote short). */
  private readData(iov: IoVec, skip: number, len: number, host: number): void {
    const inside = Math.max(0, Math.min(len, this.fileSize - host));
    if (inside > 0) {
      this.check(transferAll(this.fd, this.slice(iov, skip, inside), false, host), "reading data");
    }
    if (inside < len) {
      this.slice(iov, skip + inside, len - inside).fillZero();
    }
  }

  /**
   * The pieces of `iov` that cover its bytes [skip, skip + len): `iov` itself when that is all of
   * it (one mapping for the whole request: the usual case, no copy of up to IOV_MAX entries), else
   * a copy of the part in `this.sub`. Either may be consumed by the transfer (DiskBackend.readv).
   */
  private slice(iov: IoVec, skip: number, len: number): IoVec {
    if (skip === 0 && len === iov.bytes) return iov;
    this.sub.clear();
    if (!iov.sliceInto(this.sub, skip, len)) throw new IoFailure(-EIO, "request has too many pieces");
    return this.sub;
  }

  /** Unallocated: the backing file's bytes where it has them, zeros past its end or without one. */
  private readBacking(iov: IoVec, skip: number, len: number, pos: number): void {
    const inside = this.backing === undefined ? 0 : Math.max(0, Math.min(len, this.backing.capacity - pos));
    if (inside > 0) {
      this.check(this.backing!.readv(this.slice(iov, skip, inside), pos), "reading the backing file");
    }
    if (inside < len) {
      this.slice(iov, skip + inside, len - inside).fillZero();
    }
  }

  /** A compressed cluster (§Compressed Clusters Descriptor) inflated into the bounce buffer. */
  private decompress(m: Mapping, gc: number): void {
    const { offset, bytes } = compressedRange(m.hi, m.lo, this.header.clusterBits);
    if (offset >= this.fileSize || bytes > 2 * this.cluster + 512 || offset < this.cluster) throw new IoFailure(-EIO, `compressed guest cluster ${gc} lies outside the file`);
    const raw = Buffer.alloc(Math.min(bytes, this.fileSize - offset));
    this.io.read(raw, offset, "a compressed cluster");
    let out: Buffer;
    try {
      // Raw deflate (no zlib header), stopping at one cluster; trailing bytes belong to the next.
      out = inflateRawSync(raw, { finishFlush: zlibConstants.Z_SYNC_FLUSH, maxOutputLength: this.cluster });
    } catch {
      throw new IoFailure(-EIO, `compressed guest cluster ${gc} does not inflate`);
    }
    if (out.length !== this.cluster) throw new IoFailure(-EIO, `compressed guest cluster ${gc} inflates to ${out.length} bytes, not ${this.cluster}`);
    out.copy(this.bounce);
  }

  /** The whole old content of guest cluster `gc` (as mapped by `m`) into the bounce buffer; false when it is all zeros. */
  private oldContent(m: Mapping, gc: number): boolean {
    const start = gc * this.cluster;
    switch (m.kind) {
      case Kind.Zero:
        return false;
      case Kind.Compressed:
        this.decompress(m, gc);
        return true;
      case Kind.Data: {
        this.bounce.fill(0);
        this.io.read(this.bounce.subarray(0, Math.min(this.cluster, this.fileSize - m.host)), m.host, "a cluster to copy");
        return true;
      }
      default: {
        const inside = this.backing === undefined ? 0 : Math.max(0, Math.min(this.cluster, this.backing.capacity - start));
        if (inside === 0) return false;
        this.bounce.fill(0, inside);
        const v = this.bounceIov;
        v.clear();
        v.push(this.bounceAddress, inside);
        this.check(this.backing!.readv(v, start), "reading the backing file");
        return true;
      }
    }
  }

  // ---- writes ----

  writev(iov: IoVec, pos: number): number {
    if (this.readonly) return -EROFS;
    try {
      this.write(iov, 0, iov.bytes, pos);
      return 0;
    } catch (e) {
      return errnoOf(e);
    } finally {
      this.coverAllocations();
    }
  }

  /** The file reaches past every cluster handed out (fresh clusters read as zeros, never as a short read). */
  private coverAllocations(): void {
    const end = this.refs?.nextFree ?? 0;
    if (end > this.fileSize) {
      if (ftruncate(this.fd, end) === 0) this.fileSize = end;
    }
  }

  private write(iov: IoVec, skip: number, len: number, pos: number): void {
    let done = 0;
    // A run of whole new clusters that lie one after another on the host: one pwritev. Their L2
    // entries are set when they are allocated (tables being dirty then stay in the cache), and
    // undone when the data cannot be written (ENOSPC): the entries must never point at clusters
    // that do not hold the data, and the guest will write this request again (a disk-full pause).
    let run: { host: number; skip: number; len: number; undo: Undo[]; frees: number } | undefined;
    const flushRun = () => {
      if (run === undefined) return;
      const r = run;
      run = undefined;
      const res = transferAll(this.fd, this.slice(iov, r.skip, r.len), true, r.host);
      if (res < 0) {
        this.undo(r.undo, r.frees, r.host, r.len);
        throw new IoFailure(res, "writing data");
      }
      // The write grew the file: coverAllocations() need not (one ftruncate less per request).
      this.fileSize = Math.max(this.fileSize, r.host + r.len);
    };
    try {
      while (done < len) {
        // Loading a table may flush metadata first: the run's data must be on the host before
        // any L2 entry that points at it is.
        if (this.l2.needsFlush()) flushRun();
        const p = pos + done;
        const gc = Math.floor(p / this.cluster);
        const inOff = p % this.cluster;
        const m = this.map(gc);
        let n = Math.min(this.cluster - inOff, len - done);
        if (m.kind === Kind.Data && m.inPlace) {
          flushRun();
          n = this.dataRun(gc, m.host, inOff, n, len - done, true);
          this.check(transferAll(this.fd, this.slice(iov, skip + done, n), true, m.host + inOff), "writing data");
          this.fileSize = Math.max(this.fileSize, m.host + inOff + n);
          done += n;
          continue;
        }
        // Copy on write into a new cluster (§Cluster mapping: unallocated, zero, compressed, or shared).
        if (n !== this.cluster) flushRun();
        const table = this.tableForWrite(gc);
        const host = this.refs!.alloc();
        if (n === this.cluster) {
          if (run === undefined || run.host + run.len !== host) {
            try {
              flushRun();
            } catch (e) {
              this.undo([], this.pendingFrees.length, host, this.cluster);
              throw e;
            }
            run = { host, skip: skip + done, len: 0, undo: [], frees: this.pendingFrees.length };
          }
          run.len += n;
          run.undo.push(this.entryUndo(table, gc));
        } else {
          let written = false;
          try {
            const hasOld = this.oldContent(m, gc);
            this.sub.clear();
            // A fresh cluster past the old end of the file reads as zeros: zero head and tail need no write.
            if (hasOld && inOff > 0) this.sub.push(this.bounceAddress, inOff);
            const at = hasOld ? host : host + inOff;
            if (!iov.sliceInto(this.sub, skip + done, n)) throw new IoFailure(-EIO, "request has too many pieces");
            if (hasOld && inOff + n < this.cluster) this.sub.push(this.bounceAddress + inOff + n, this.cluster - inOff - n);
            this.check(transferAll(this.fd, this.sub, true, at), "writing data");
            written = true;
          } finally {
            // Nothing points at the new cluster yet: give it back rather than leak it.
            if (!written) this.undo([], this.pendingFrees.length, host, this.cluster);
          }
        }
        this.setEntry(table, gc, host, L2.COPIED_HI, 0, m);
        done += n;
      }
  flushRun();
    } catch (e) {
      // Anything that fails with a run pending (an allocation, a hostile entry): its entries go back.
      const r = run as typeof run | undefined;
      run = undefined;
      if (r !== undefined) this.undo(r.undo, r.frees, r.host, r.len);
      throw e;
    }
  }

  /** What guest cluster `gc`'s L2 entry holds now, to put back if the write that changes it fails. */
  private entryUndo(table: L2Table, gc: number): Undo {
    const at = (gc % this.l2Entries) * 8;
    return new Undo(table, at, table.buf.readUInt32BE(at), table.buf.readUInt32BE(at + 4));
  }

  /**
   * A data write failed (ENOSPC, EIO): the entries that were to point at the new clusters get
   * their old values back, the frees queued with them are dropped (the old clusters stay in
   * use), and the new clusters' refcounts go back to 0 with their space punched out. Nothing on
   * disk points at them (the tables reach the disk only at a flush, after the data), so this
   * breaks no ordering rule; the allocator never hands them out again this session.
   */
  private undo(entries: readonly Undo[], frees: number, host: number, bytes: number): void {
    for (const u of entries) {
      u.table.buf.writeUInt32BE(u.hi, u.at);
      u.table.buf.writeUInt32BE(u.lo, u.at + 4);
    }
    this.pendingFrees.length = Math.min(this.pendingFrees.length, frees);
    try {
      for (const c of this.refs!.release(host, bytes)) fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, c, this.cluster);
    } catch {
      // A refcount block that cannot be read: the clusters stay counted (leaked, not lost).
    }
  }

  /** Point guest cluster `gc` somewhere new (in the cached table) and queue the free of what it pointed at. */
  private setEntry(table: L2Table, gc: number, host: number, hi: number, lo: number, old: Mapping): void {
    writeEntry(table.buf, (gc % this.l2Entries) * 8, host, hi, lo);
    this.l2.markDirty(table);
    if (old.kind === Kind.Data) this.pendingFrees.push({ off: old.host, bytes: this.cluster });
    else if (old.kind === Kind.Compressed) {
      const r = compressedRange(old.hi, old.lo, this.header.clusterBits);
      this.pendingFrees.push({ off: r.offset, bytes: r.bytes });
    }
  }

  writeZeroes(pos: number, len: number): number {
    return this.deallocate(pos, len, true);
  }

  discard(pos: number, len: number): number {
    return this.deallocate(pos, len, false);
  }

  /**
   * Whole clusters become zero clusters (with a backing file: reads must not fall through to it)
   * or unallocated (without one: they read as zeros anyway), their old clusters freed after the
   * next metadata flush. Write-zeroes also zeroes the partial clusters at either end; discard
   * leaves them (virtio 1.2 §5.2.6.2: what a discarded range reads is unspecified).
   */
  private deallocate(pos: number, len: number, zero: boolean): number {
    if (this.readonly) return -EROFS;
    try {
      let done = 0;
      while (done < len) {
        const p = pos + done;
        const gc = Math.floor(p / this.cluster);
        const n = Math.min(this.cluster - (p % this.cluster), len - done);
        if (n < this.cluster) {
          if (zero) {
            const v = this.zerosIov;
            v.clear();
            v.push(this.zerosAddress, n);
            this.write(v, 0, n, p);
          }
        } else {
          const m = this.map(gc);
          const needZeroFlag = this.backing !== undefined && p < this.backing.capacity;
          if (m.kind === Kind.Zero || (m.kind === Kind.Unallocated && !needZeroFlag)) {
            done += n;
            continue;
          }
          const table = this.tableForWrite(gc);
          this.setEntry(table, gc, 0, 0, needZeroFlag ? L2.ZERO_LO : 0, m);
        }
        done += n;
      }
      return 0;
    } catch (e) {
      return errnoOf(e);
    } finally {
      this.coverAllocations();
    }
  }

  // ---- flush ----

  private get metadataDirty(): boolean {
    return this.l1Dirty.size > 0 || this.l2.dirty || (this.refs?.dirty ?? false) || this.pendingFrees.length > 0;
  }

  /** Refcounts, sync, L2 tables, sync, L1 entries, sync, then the frees (see the file comment). */
  private flushMetadata(): void {
    const refs = this.refs;
    if (refs === undefined) return;
    refs.writeDirty();
    this.io.sync();
    const tables = this.l2.dirtyTables();
    for (const [off, t] of tables) {
      this.io.write(t.buf, off, "an L2 table");
      this.l2.markClean(t);
      this.ownTables.add(off);
    }
    if (this.l1Dirty.size > 0) {
      // A new L2 table is on disk before the L1 entry that makes it live.
      if (tables.length > 0) this.io.sync();
      for (const i of this.l1Dirty) this.io.write(this.l1.subarray(i * 8, i * 8 + 8), this.header.l1TableOffset + i * 8, "an L1 entry");
      this.l1Dirty.clear();
    }
    this.io.sync();
    const frees = this.pendingFrees;
    this.pendingFrees = [];
    for (const f of frees) {
      for (const c of refs.release(f.off, f.bytes)) {
        // Give the space back (the cluster is never handed out again in this session).
        fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, c, this.cluster);
      }
    }
  }

  flush(): number {
    if (this.readonly) return 0;
    try {
      if (this.metadataDirty) this.flushMetadata();
      else this.io.sync();
      return 0;
    } catch (e) {
      return errnoOf(e);
    }
  }

  /** Write back and sync everything (the frees included), then drop the caches. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.readonly || this.refs === undefined) return;
    try {
      this.flushMetadata();
      this.refs.writeDirty();
      this.io.sync();
    } catch {
      // Nothing to tell: the image keeps what its last flush wrote (at most leaked clusters).
    }
  }

  private check(r: number, what: string): void {
    if (r < 0) throw new IoFailure(r, what);
  }
}
