import * as fs from "node:fs";
import { TypevisorError } from "../../../../errors.js";
import { IoVec, RWF_NOWAIT } from "../../../../sys/iov.js";
import { EDQUOT, EINTR, EINVAL, EIO, ENOSPC, EOPNOTSUPP, errnoName, eventfdClear, mallocTrim } from "../../../../sys/libc.js";
import type { ActivateContext, VirtioDevice, VirtioDeviceInspect } from "../device.js";
import { featureBit, hasFeature, readConfigBytes, VIRTIO_F, VIRTIO_ID } from "../device.js";
import { gatherHost, readChain, writeChain } from "../queue/chain.js";
import type { ChainResult } from "../queue/runner.js";
import { activateQueues, DEFERRED, inspectQueues, serviceQueue } from "../queue/runner.js";
import type { DescriptorChain, GuestBuf, SplitQueue, SplitQueueState } from "../queue/split-queue.js";
import { QueueError } from "../queue/split-queue.js";
import type { DirtyBlocks } from "../../../disk/dirty-blocks.js";
import type { DiskBackend, DiskFormat, DiskInit } from "../../../disk/backend.js";
import { backendFromInit, openDisk, type OpenDisk } from "../../../disk/open.js";
import type { Qcow2Backend } from "../../../disk/qcow2/image.js";
import { syncData, transferAll, writeZeroes } from "./file-io.js";
import { IO_OP, ioRing, type IoRing } from "./io-ring.js";
import { BlockIoThread } from "./io-thread.js";
import { DISK, DISK_SLOT, diskCountersAt, type DiskCounters } from "../../../stats/layout.js";

/** virtio-blk feature bits (virtio 1.2 §5.2.3). */
export const VIRTIO_BLK_F = {
  SIZE_MAX: 1,
  SEG_MAX: 2,
  GEOMETRY: 4,
  RO: 5,
  BLK_SIZE: 6,
  FLUSH: 9,
  TOPOLOGY: 10,
  CONFIG_WCE: 11,
  MQ: 12,
  DISCARD: 13,
  WRITE_ZEROES: 14,
} as const;

/** Request types (virtio 1.2 §5.2.6). */
export const VIRTIO_BLK_T = { IN: 0, OUT: 1, FLUSH: 4, GET_ID: 8, GET_LIFETIME: 10, DISCARD: 11, WRITE_ZEROES: 13, SECURE_ERASE: 14 } as const;
/** Names of request types for messages. */
const OP_NAMES: Record<number, string> = { 0: "read", 1: "write", 4: "flush", 8: "get-id", 11: "discard", 13: "write-zeroes" };
/** Request status (virtio 1.2 §5.2.6). */
export const VIRTIO_BLK_S = { OK: 0, IOERR: 1, UNSUPP: 2 } as const;

export const SECTOR_SIZE = 512;
/** struct virtio_blk_req header: le32 type, le32 reserved, le64 sector (virtio 1.2 §5.2.6). */
const HEADER_SIZE = 16;
/** struct virtio_blk_discard_write_zeroes: le64 sector, le32 num_sectors, le32 flags. */
const SEGMENT_SIZE = 16;
const SEG_FLAG_UNMAP = 1;
/** VIRTIO_BLK_T_GET_ID answers a 20-byte serial, not NUL-terminated when 20 long (§5.2.6). */
export const BLK_ID_BYTES = 20;

/** Config space through unused1 (virtio 1.2 §5.2.4); secure erase and zoned fields are not offered. */
export const BLOCK_CONFIG_SIZE = 60;
const CFG = {
  capacity: 0,
  sizeMax: 8,
  segMax: 12,
  blkSize: 20,
  maxDiscardSectors: 36,
  maxDiscardSeg: 40,
  discardSectorAlignment: 44,
  maxWriteZeroesSectors: 48,
  maxWriteZeroesSeg: 52,
  writeZeroesMayUnmap: 56,
} as const;

/** statfs(2) f_type of the filesystems whose files live in memory (linux/magic.h). */
const TMPFS_MAGIC = 0x01021994;
const RAMFS_MAGIC = 0x858458f6;
function inMemoryFs(path: string): boolean {
  try {
    const t = fs.statfsSync(path).type;
    return t === TMPFS_MAGIC || t === RAMFS_MAGIC;
  } catch {
    return false;
  }
}


/**
 * How long an on-demand I/O thread may idle before it ends: each is a V8 isolate (~8 MiB of the
 * VMM's own memory, docs/benchmarks.md "Density"), and most VMs' disks idle most of the time.
 * QEMU's thread pool ends its idle workers after the same 10 s (util/thread-pool.c).
 */
export const IO_THREAD_IDLE_MS = 10_000;

/** The most an on-demand I/O thread's idle time grows to, as a multiple of its base (nextIoIdleMs). */
export const IO_THREAD_IDLE_MAX_FACTOR = 32;

/**
 * How long the next on-demand I/O thread may idle before it ends, given the last one's idle time
 * (`current`), the disk's base (`base`), and how long after the last one ended a request needed
 * a thread again (`sinceEnd`; Infinity: none has ended yet). Unlike QEMU's pthreads, our thread is
 * an isolate whose start costs ~0.1-0.2 s of CPU on a project machine and seconds in the lab: a
 * guest that writes every 12 s would start one five times a minute at a fixed 10 s. So a thread
 * needed again sooner than its idle time after it ended gets twice that time (up to
 * IO_THREAD_IDLE_MAX_FACTOR × base: one start per 5.3 min at most, for a 10 s base), and one not
 * needed for longer halves it back toward the base: a disk used in short bursts far apart still
 * gives its isolate's memory back.
 */
export function nextIoIdleMs(current: number, base: number, sinceEnd: number): number {
  if (!Number.isFinite(base)) return base;
  if (sinceEnd < current) return Math.min(current * 2, base * IO_THREAD_IDLE_MAX_FACTOR);
  return Math.max(current / 2, base);
}

/** How long after an I/O thread ended its memory is trimmed (its isolate is disposed of by then). */
const TRIM_AFTER_MS = 1000;

/** How long an on-demand I/O thread may take to come up before the disk gives up on it and stays on its device thread. */
const STARTING_GRACE_MS = 300_000;

/** Limits we announce, so one request cannot pin the main thread for long. */
const MAX_DISCARD_SECTORS = 1 << 22; // 2 GiB per segment: discard is a no-op (see below)
const MAX_DISCARD_SEG = 32;
const MAX_WRITE_ZEROES_SECTORS = 1 << 16; // 32 MiB per segment: we really write the zeroes
const MAX_WRITE_ZEROES_SEG = 1;

export interface BlockDeviceOptions {
  /** Disk image to open (read-write unless `readonly`), with its backing chain; the device owns and closes the fds. */
  path?: string;
  /** An fd of a raw image already open (the caller keeps ownership). */
  fd?: number;
  /**
   * The image's format. Undefined: raw, and a file that starts with the qcow2 magic is refused
   * (never guessed: see disk/open.ts).
   */
  format?: DiskFormat;
  readonly: boolean;
  /** GET_ID answer, up to 20 ASCII bytes. */
  serial?: string;
  /** Offer VIRTIO_BLK_F_DISCARD (read-write disks only). Default true. */
  discard?: boolean;
  /** Offer VIRTIO_BLK_F_WRITE_ZEROES (read-write disks only). Default true. */
  writeZeroes?: boolean;
  /** Queue size the device allows (power of 2). Default 256. */
  queueSize?: number;
  /**
   * Run reads, writes, flushes and write-zeroes on an I/O thread of this name (io-worker.ts)
   * instead of the calling thread, which then only walks rings: the VMM's device thread does,
   * so no disk wait stalls the other devices. Without it every request completes inside notify().
   * A file on tmpfs/ramfs gets no I/O thread (see inMemoryFilesInline).
   */
  ioThread?: string;
  /**
   * When the I/O thread starts. "on-demand" (default): when the disk first needs it (a write, a
   * flush, a read the page cache cannot serve), requests being served on the calling thread until
   * it is up (a read-only disk whose blocks are cached never needs one). "eager": at
   * construction (a thread started ahead, already paid for). Either way it ends after
   * ioThreadIdleMs without a request (more for a disk whose thread was soon needed again:
   * nextIoIdleMs), and starts again on the next need.
   */
  ioThreadStart?: "eager" | "on-demand";
  /** An on-demand I/O thread ends after this long without a request (ms; default IO_THREAD_IDLE_MS; Infinity: never): the base nextIoIdleMs grows from. */
  ioThreadIdleMs?: number;
  /**
   * Whether a file on tmpfs/ramfs is served on the calling thread even with `ioThread`: its
   * requests never wait for a disk (its pages are memory; fdatasync has nothing to do), so a trip
   * to another thread would only add latency (and a thread). Default true; tests turn it off.
   */
  inMemoryFilesInline?: boolean;
  /**
   * With an I/O thread: send every read there. By default a read is first tried on the calling
   * thread without waiting (from the page cache, readCached), and only one that would wait for
   * storage goes to the I/O thread.
   */
  readsOnIoThread?: boolean;
  /**
   * Called (on this device's thread) when a request failed because the host filesystem is full
   * (ENOSPC, or EDQUOT: over a quota): the request is held, not completed, and the device takes
   * no new ones until retryHeld(), as QEMU's werror=enospc does; the caller stops the vCPUs.
   * Once per stop: not again until retryHeld() ran. Without it such a request fails with IOERR.
   */
  onNoSpace?: (info: NoSpaceInfo) => void;
  /**
   * Where this disk counts its completed requests (DISK indices of the VMM's stats page:
   * stats/layout.ts), so GET /stats and the daemon read them without asking this thread.
   * Default: an array of its own.
   */
  counters?: Float64Array;
}

/** Why a disk stopped taking requests: its host file could not grow (NoSpace handling, BlockDeviceOptions.onNoSpace). */
export interface NoSpaceInfo {
  /** "ENOSPC" or "EDQUOT". */
  errno: string;
  /** The request that failed: read, write, flush, write-zeroes, discard. */
  op: string;
  /** The image path as opened. */
  path: string;
}

/** A failure that means "the host filesystem is full", which pauses instead of failing the request. */
export function isNoSpace(result: number): boolean {
  return result === -ENOSPC || result === -EDQUOT;
}

/** A host operation that failed, with its -errno (so handle() can tell a full disk from an I/O error). */
class DiskIoError extends TypevisorError {
  constructor(readonly errno: number) {
    super("DISK_IO", `disk I/O failed: ${errnoName(-errno)}`);
  }
}

/** A request on the I/O thread: what to answer when it is done. */
interface Pending {
  head: number;
  /** Guest address of the status byte. */
  status: number;
  /** Used length on success (IN: the whole writable part; else the status byte). */
  used: number;
  /** For the counters: 1 read, 2 write, 0 neither. */
  kind: 0 | 1 | 2;
  /** Bytes the request changes from sector on (writes, write-zeroes, discards): marked dirty when it completes. */
  written?: number;
  bytes: number;
  /** The request itself, to run again after a full disk (held). */
  chain: DescriptorChain;
  type: number;
  sector: number;
}

/** A request a full host filesystem stopped: done again by retryHeld(), never completed before. */
interface Held {
  chain: DescriptorChain;
  type: number;
  sector: number;
  status: number;
}

/** What a snapshot keeps of the block device (its backing file is re-opened by the caller). */
export interface BlockDeviceState {
  version: 1;
  /** Negotiated features as a hex string (bigint is not JSON). */
  features: string;
  activated: boolean;
  queues: (SplitQueueState | null)[];
}

/**
 * virtio-blk (virtio 1.2 §5.2) over a host file: preadv/pwritev straight into and out of guest
 * memory (no copy), on the disk's own I/O thread when `ioThread` is given, else in notify().
 * The I/O thread is there while the disk needs it (ioThreadStart): until it is up, and after it
 * ended for idling, requests are done in notify(), on the image this thread then holds.
 *
 * Choices: DISCARD is accepted and validated but does nothing (§5.2.6.2 lets the device "MAY
 * deallocate"; reads after discard are undefined for the driver). WRITE_ZEROES writes zero
 * bytes, so write_zeroes_may_unmap is 0. Node has no fallocate; PUNCH_HOLE/ZERO_RANGE via koffi
 * would make both cheap later.
 */
/** I/O counters of one disk (for the control API's GET /stats). */
export interface BlockStats extends DiskCounters {
  /**
   * The disk's I/O thread: "none" (served on the device thread), "idle" (none now: it starts when
   * the disk needs it), "starting" (requests still served on the device thread), "running", or
   * "failed" (gone; served on the device thread since).
   */
  ioThread: "none" | "idle" | "starting" | "running" | "failed";
}

export class BlockDevice implements VirtioDevice {
  readonly deviceType = VIRTIO_ID.BLOCK;
  readonly queueMaxSizes: readonly number[];
  readonly features: bigint;
  readonly configSize = BLOCK_CONFIG_SIZE;
  /** Disk size in bytes (a multiple of 512). */
  readonly capacityBytes: number;
  private readonly fd: number;
  /** The image and its chain as opened from `path` (closed by close()); undefined for a caller's fd. */
  private readonly opened: OpenDisk | undefined;
  private readonly diskInit: DiskInit;
  /** A raw image is served through the fd directly (page-cache reads here, preadv/pwritev); any other format through `backend`. */
  private readonly raw: boolean;
  /** The qcow2 backend on this thread: when there is no I/O thread, or after it failed. Never while the I/O thread owns the image. */
  private backend: DiskBackend | undefined;
  private readonly readonly: boolean;
  private readonly serial: Uint8Array | undefined;
  private readonly config: Buffer;
  private ctx: ActivateContext | undefined;
  private queues: (SplitQueue | undefined)[] = [];
  /** FLUSH offered but not negotiated: every write must be stable before completion (§5.2.6.2). */
  private writeThrough = true;
  /** The iovec array of a request done on this thread (one at a time). */
  private readonly iov = new IoVec();
  /** The I/O thread requests go to (it owns a qcow2 image's tables while it runs). */
  private io: BlockIoThread | undefined;
  /** An I/O thread started and not yet handed the disk (handOver): the image is still this thread's. */
  private starting: BlockIoThread | undefined;
  /** The I/O thread's name when the disk has one (started or not), and its ring, which outlives each thread. */
  private readonly ioThreadName: string | undefined;
  private readonly ring: IoRing | undefined;
  private readonly ioIdleMs: number;
  /** How long the current (or next) I/O thread may idle before it ends (nextIoIdleMs). */
  private idleNowMs: number;
  /** When the last on-demand I/O thread ended for idling (performance.now(); -Infinity: none yet). */
  private lastIdleEnd = -Infinity;
  /** When a request last went to the I/O thread, or its completions were last reaped (performance.now()). */
  private lastIoUse = 0;
  /** When to give malloc's free memory back after an I/O thread ended (performance.now(); 0: not due). */
  private trimDue = 0;
  /** Requests on the I/O thread, by slot. */
  private readonly pending: (Pending | undefined)[] = [];
  /** Poll this (the I/O thread's completion eventfd) and call onBackendReadable. */
  backendFds: readonly number[];
  /** Completed requests and their bytes (GET /stats), DISK indices; in the stats page when given one. */
  private readonly counters: Float64Array;
  private ioThreadFailed = false;
  /**
   * While a live migration copies this disk: the blocks written (marked as each write completes;
   * disk/dirty-blocks.ts). Set and cleared by the device thread's "disks.dirtyLog" command.
   */
  dirtyBlocks: DirtyBlocks | undefined;
  /** With an I/O thread: whether reads are first tried from the page cache here (readCached). */
  private nowaitReads = true;
  /** Requests a full host filesystem stopped, in the order they failed (holdOnNoSpace). */
  private readonly held: Held[] = [];
  /** onNoSpace was called and retryHeld has not run since. */
  private stoppedOnNoSpace = false;
  private readonly onNoSpace: ((info: NoSpaceInfo) => void) | undefined;

  /** @throws TypevisorError DISK_OPEN, DISK_TYPE, DISK_SIZE, DISK_SERIAL, DISK_OPTIONS */
  constructor(opts: BlockDeviceOptions) {
    this.counters = opts.counters ?? new Float64Array(DISK_SLOT);
    if (this.counters.length < DISK_SLOT) throw new TypevisorError("DISK_OPTIONS", `a disk's counters take ${DISK_SLOT} slots`);
    const queueSize = opts.queueSize ?? 256;
    if (!Number.isInteger(queueSize) || queueSize < 2 || queueSize > 32768 || (queueSize & (queueSize - 1)) !== 0) {
      throw new TypevisorError("DISK_OPTIONS", `virtio-blk queue size ${queueSize} is not a power of 2 in 2..32768`);
    }
    let serial: Uint8Array | undefined;
    if (opts.serial !== undefined) {
      serial = Buffer.from(opts.serial, "latin1");
      if (serial.length > BLK_ID_BYTES || !/^[\x20-\x7e]*$/.test(opts.serial)) {
        throw new TypevisorError("DISK_SERIAL", `disk serial must be at most ${BLK_ID_BYTES} printable ASCII characters`);
      }
    }
    if ((opts.path === undefined) === (opts.fd === undefined)) {
      throw new TypevisorError("DISK_OPTIONS", "give the disk as exactly one of path or fd");
    }
    let fd: number;
    if (opts.path !== undefined) {
      this.opened = openDisk(opts.path, { readonly: opts.readonly, ...(opts.format !== undefined ? { format: opts.format } : {}) });
      this.diskInit = this.opened.init;
      fd = this.diskInit.fd;
    } else {
      if (opts.format !== undefined && opts.format !== "raw") throw new TypevisorError("DISK_OPTIONS", "a disk given as an fd must be raw");
      fd = opts.fd!;
      this.opened = undefined;
      this.diskInit = { format: "raw", fd, path: `fd ${fd}`, readonly: opts.readonly };
    }
    this.raw = this.diskInit.format === "raw";
    let clusterBytes = SECTOR_SIZE;
    try {
      const name = opts.path ?? `fd ${fd}`;
      if (this.raw) {
        const st = fs.fstatSync(fd);
        if (!st.isFile()) throw new TypevisorError("DISK_TYPE", `disk image ${name} is not a regular file`);
        if (st.size % SECTOR_SIZE !== 0) {
          throw new TypevisorError("DISK_SIZE", `disk image ${name} is ${st.size} bytes, not a multiple of ${SECTOR_SIZE}`, {
            hint: "resize it to whole sectors, e.g. truncate -s %512 IMAGE",
          });
        }
        this.capacityBytes = st.size;
      } else {
        // Built here once to validate the image and learn its size; the I/O thread, when there is
        // one, builds its own (the tables are one thread's only) and this one is closed below.
        const b = backendFromInit(this.diskInit);
        this.backend = b;
        this.capacityBytes = b.capacity;
        clusterBytes = 2 ** (b as Qcow2Backend).header.clusterBits;
      }
    } catch (e) {
      this.backend?.close();
      this.opened?.close();
      throw e;
    }
    this.fd = fd;
    this.readonly = opts.readonly;
    this.serial = serial;
    this.queueMaxSizes = [queueSize];

    const discard = !opts.readonly && (opts.discard ?? true);
    const writeZeroes = !opts.readonly && (opts.writeZeroes ?? true);
    let f = featureBit(VIRTIO_F.VERSION_1) | featureBit(VIRTIO_F.INDIRECT_DESC) | featureBit(VIRTIO_F.EVENT_IDX);
    f |= featureBit(VIRTIO_BLK_F.FLUSH) | featureBit(VIRTIO_BLK_F.BLK_SIZE) | featureBit(VIRTIO_BLK_F.SEG_MAX);
    if (opts.readonly) f |= featureBit(VIRTIO_BLK_F.RO);
    if (discard) f |= featureBit(VIRTIO_BLK_F.DISCARD);
    if (writeZeroes) f |= featureBit(VIRTIO_BLK_F.WRITE_ZEROES);
    this.features = f;

    const c = Buffer.alloc(BLOCK_CONFIG_SIZE);
    c.writeBigUInt64LE(BigInt(this.capacityBytes / SECTOR_SIZE), CFG.capacity);
    // Header and status take two descriptors of a chain no longer than the queue (§2.7.5.3.1).
    c.writeUInt32LE(queueSize - 2, CFG.segMax);
    c.writeUInt32LE(SECTOR_SIZE, CFG.blkSize);
    if (discard) {
      c.writeUInt32LE(MAX_DISCARD_SECTORS, CFG.maxDiscardSectors);
      // qcow2 frees whole clusters, one range per request (one I/O thread slot): Linux then
      // sends cluster-aligned single ranges (discard_sector_alignment is its granularity).
      c.writeUInt32LE(this.raw ? MAX_DISCARD_SEG : 1, CFG.maxDiscardSeg);
      c.writeUInt32LE(this.raw ? 1 : clusterBytes / SECTOR_SIZE, CFG.discardSectorAlignment);
    }
    if (writeZeroes) {
      c.writeUInt32LE(MAX_WRITE_ZEROES_SECTORS, CFG.maxWriteZeroesSectors);
      c.writeUInt32LE(MAX_WRITE_ZEROES_SEG, CFG.maxWriteZeroesSeg);
      // qcow2 turns whole zeroed clusters into zero clusters (deallocated); raw writes the bytes.
      c.writeUInt8(this.raw ? 0 : 1, CFG.writeZeroesMayUnmap);
    }
    this.config = c;
    const inMemory = (opts.inMemoryFilesInline ?? true) && opts.path !== undefined && inMemoryFs(opts.path);
    this.ioThreadName = opts.ioThread !== undefined && !inMemory ? opts.ioThread : undefined;
    this.ring = this.ioThreadName !== undefined ? ioRing() : undefined;
    this.ioIdleMs = opts.ioThreadIdleMs ?? IO_THREAD_IDLE_MS;
    this.idleNowMs = this.ioIdleMs;
    try {
      if (this.ioThreadName !== undefined && opts.ioThreadStart === "eager") {
        // The I/O thread owns the image from here: no second backend may act on its tables.
        this.backend?.close();
        this.backend = undefined;
        this.io = new BlockIoThread(this.diskInit, this.ioThreadName, this.ring);
        this.io.open();
        this.lastIoUse = performance.now();
      }
    } catch (e) {
      this.opened?.close();
      throw new TypevisorError("DISK_IO_THREAD", `cannot start the I/O thread of disk ${opts.path ?? `fd ${fd}`}: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
    }
    this.backendFds = this.io !== undefined ? [this.io.eventfd] : [];
    this.nowaitReads = opts.readsOnIoThread !== true;
    this.onNoSpace = opts.onNoSpace;
  }

  /** Finish in-flight I/O, stop the I/O thread and close the backing file if the device opened it. */
  close(): void {
    this.starting?.close();
    this.starting = undefined;
    this.io?.close();
    this.pending.length = 0;
    this.backend?.close();
    this.backend = undefined;
    this.opened?.close();
  }

  /** The I/O thread's name and shared ring, while it has one (GET /threads reads the ring from the main thread). */
  get ioThreadRing(): { name: string; ring: SharedArrayBuffer } | undefined {
    return this.ring === undefined || this.ioThreadName === undefined ? undefined : { name: this.ioThreadName, ring: this.ring.sab };
  }

  /** Requests on the I/O thread not yet answered. */
  get inFlight(): number {
    return this.io?.inFlight ?? 0;
  }

  /**
   * Whether tick() has anything to watch: a trim due, an I/O thread starting or running (to end
   * when idle, or to drop when dead). Without, the device thread may sleep until an fd wakes it.
   */
  get needsTick(): boolean {
    return this.trimDue !== 0 || this.starting !== undefined || this.io !== undefined;
  }

  /**
   * About once a second (the device thread's loop): a disk whose I/O thread is gone while
   * requests wait on it gets them answered with IOERR and goes on without it, on the device
   * thread, rather than leaving the guest waiting forever.
   */
  tick(): void {
    if (this.trimDue !== 0 && performance.now() >= this.trimDue) {
      this.trimDue = 0;
      mallocTrim();
    }
    const s = this.starting;
    if (s !== undefined && !s.alive(STARTING_GRACE_MS)) {
      // It never came up (or died before the hand-over): the disk stays on this thread. Nothing
      // waits on a starting thread (its disk is served here meanwhile), so it gets long to start.
      s.close();
      this.starting = undefined;
      this.backendFds = [];
      this.ioThreadFailed = true;
    }
    const io = this.io;
    if (io === undefined) return;
    if (io.inFlight === 0) {
      if (this.held.length === 0 && performance.now() - this.lastIoUse >= this.idleNowMs) this.endIdleIoThread();
      return;
    }
    if (io.alive()) return;
    this.dropIoThread();
    // Raises the interrupt for the answers, and serves here what waited in the ring for a slot.
    this.notify(0);
  }

  /**
   * The I/O thread for a request that would wait for the storage: the running one, or undefined
   * while it starts (the caller serves the request itself). Starts it on first need; hands it the
   * disk once it is up.
   */
  private ioThread(): BlockIoThread | undefined {
    if (this.io !== undefined) return this.io;
    if (this.ioThreadName === undefined || this.ioThreadFailed) return undefined;
    const s = this.starting;
    if (s === undefined) {
      this.idleNowMs = nextIoIdleMs(this.idleNowMs, this.ioIdleMs, performance.now() - this.lastIdleEnd);
      try {
        this.starting = new BlockIoThread(this.diskInit, this.ioThreadName, this.ring);
        // Polled for the thread's first signal: it is up (onBackendReadable hands over then).
        this.backendFds = [this.starting.eventfd];
      } catch {
        this.ioThreadFailed = true;
      }
      return undefined;
    }
    if (!s.started) return undefined;
    this.handOver();
    return this.io;
  }

  /**
   * The started I/O thread takes the disk: a qcow2 image's tables, cached here until now, are
   * written back and synced first (close()), and the thread reads them from the file. No
   * request is in flight here: this thread serves one at a time, to its end.
   */
  private handOver(): void {
    const s = this.starting!;
    this.starting = undefined;
    this.backend?.close();
    this.backend = undefined;
    s.open();
    this.io = s;
    this.lastIoUse = performance.now();
  }

  /**
   * The I/O thread idled for idleNowMs: it writes back what it caches and ends (close()), and this
   * thread takes the disk again until the next request that needs one.
   */
  private endIdleIoThread(): void {
    const io = this.io!;
    const clean = io.close();
    this.io = undefined;
    this.lastIdleEnd = performance.now();
    this.backendFds = [];
    if (io.gone || !clean) this.ioThreadFailed = true;
    // The thread's isolate is torn down on its own thread after close(); its malloc arena keeps
    // what it freed resident until trimmed (host: ~1-2 MiB of the ~2.3 MiB an ended thread left).
    this.trimDue = performance.now() + TRIM_AFTER_MS;
    // A thread still stuck writing a qcow2 image's tables back may yet write them: this thread
    // must not act on the image beside it, so its requests fail (IOERR) rather than corrupt it.
    if (!this.raw) this.backend = clean ? this.backendAgain() : undefined;
  }

  /** A qcow2 backend built anew from the file (its tables as on disk now); undefined if that fails: requests then fail with IOERR (inline()). */
  private backendAgain(): DiskBackend | undefined {
    try {
      return backendFromInit(this.diskInit);
    } catch {
      return undefined;
    }
  }

  /** The I/O thread is gone: answer what is stuck on it (IOERR) and serve everything here from now on. */
  private dropIoThread(): void {
    const io = this.io;
    if (io === undefined) return;
    io.abandon((slot, result) => this.finish(slot, result));
    io.close();
    this.io = undefined;
    this.backendFds = [];
    this.ioThreadFailed = true;
    // The thread's cached tables went with it: the file holds what its last flush wrote.
    if (!this.raw) this.backend = this.backendAgain();
  }

  /** The I/O thread finished requests: answer them, then take what waited for a free slot. */
  onBackendReadable(fd: number): void {
    const s = this.starting;
    if (s !== undefined && fd === s.eventfd) {
      // Its first signal: it is up. Requests go to it from now on.
      eventfdClear(fd);
      if (s.started) this.handOver();
      return;
    }
    const io = this.io;
    if (io === undefined || fd !== io.eventfd) return;
    // Idle is counted from the last completion too: a flush that took longer than idleNowMs is not idling.
    this.lastIoUse = performance.now();
    io.reap((slot, result) => this.finish(slot, result));
    if (this.held.length > 0 && !this.stoppedOnNoSpace) this.drainHeld();
    this.notify(0);
  }

  readConfig(offset: number, size: number): bigint {
    return readConfigBytes(this.config, offset, size);
  }

  /** Nothing is writable: `writeback` exists only with VIRTIO_BLK_F_CONFIG_WCE, which we do not offer. */
  writeConfig(_offset: number, _size: number, _value: bigint): void {}

  activate(ctx: ActivateContext): void {
    this.start(ctx);
  }

  /** Resume from a snapshot: like activate, with the saved queue cursors. */
  restore(ctx: ActivateContext, state: BlockDeviceState): void {
    if (state.version !== 1) throw new TypevisorError("SNAPSHOT_VERSION", `virtio-blk state version ${String(state.version)} is not supported`);
    if (state.activated) this.start(ctx, state.queues);
  }

  private start(ctx: ActivateContext, saved?: readonly (SplitQueueState | null)[]): void {
    this.ctx = ctx;
    this.writeThrough = !hasFeature(ctx.features, VIRTIO_BLK_F.FLUSH);
    this.queues = activateQueues(ctx, this.queueMaxSizes, saved);
  }

  notify(q: number): void {
    const ctx = this.ctx;
    if (ctx === undefined) return;
    serviceQueue(ctx, q, this.queues[q], (chain) => this.handle(ctx, chain), this.canTake);
  }

  /** Whether a request can be popped now: always without an I/O thread, else while a slot is free. */
  private readonly canTake = (): boolean => this.held.length === 0 && (this.io === undefined || !this.io.full);

  /**
   * A request failed because the host filesystem is full: keep it (not completed: the guest
   * must not see a write done that is not on disk, nor an error for one that will succeed once
   * space is freed) and say so once. False (answer it as usual) for any other result, on a
   * read-only disk, and without an onNoSpace listener.
   */
  private holdOnNoSpace(result: number, type: number, chain: DescriptorChain, sector: number, status: number): boolean {
    if (!isNoSpace(result) || this.readonly || this.onNoSpace === undefined) return false;
    this.held.push({ chain, type, sector, status });
    if (!this.stoppedOnNoSpace) {
      this.stoppedOnNoSpace = true;
      this.onNoSpace({ errno: errnoName(-result), op: OP_NAMES[type] ?? `type ${type}`, path: this.diskInit.path });
    }
    return true;
  }

  /** Requests held for space, not yet done again. */
  get heldRequests(): number {
    return this.held.length;
  }

  /**
   * Space was freed (the VM is resumed): run the held requests again, in the order they failed,
   * then take what waited in the ring. A request that fails for space again is held again and
   * stops the disk again (onNoSpace), with the ones after it kept, in order.
   */
  retryHeld(): void {
    this.stoppedOnNoSpace = false;
    this.drainHeld();
    this.notify(0);
  }

  /**
   * Run held requests again while the disk is not stopped and the I/O thread has a free slot
   * (a qcow2 image lives on the I/O thread: a request must not fall back to this thread); the
   * rest go when slots free up (onBackendReadable). A request held again goes last: requests in
   * flight together have no order the driver may rely on (virtio 1.2 §2.7.8: used buffers need not follow the available order).
   */
  private drainHeld(): void {
    const ctx = this.ctx;
    const q = this.queues[0];
    if (ctx === undefined || q === undefined || q.broken !== undefined) return;
    while (this.held.length > 0 && !this.stoppedOnNoSpace && (this.io === undefined || !this.io.full)) {
      const h = this.held.shift()!;
      const used = this.run(ctx, h.chain, h.type, h.sector, h.status);
      if (used !== DEFERRED) q.pushUsed(h.chain.head, Math.min(used, h.chain.totalWrite));
    }
  }

  /**
   * Answer a request the I/O thread did (virtio 1.2 §5.2.6): status byte, then the used
   * element. The queue's interrupt is the caller's (onBackendReadable's notify).
   */
  private finish(slot: number, result: number): void {
    const p = this.pending[slot];
    this.pending[slot] = undefined;
    // Whatever the result: a failed write may have changed part of its range.
    if (p?.written !== undefined) this.dirtyBlocks?.mark(p.sector * SECTOR_SIZE, p.written);
    const ctx = this.ctx;
    const q = this.queues[0];
    if (p === undefined || ctx === undefined || q === undefined || q.broken !== undefined) return;
    if (this.holdOnNoSpace(result, p.type, p.chain, p.sector, p.status)) return;
    const ok = result === 0;
    ctx.mem.writeU8(p.status, ok ? VIRTIO_BLK_S.OK : VIRTIO_BLK_S.IOERR);
    if (ok) this.countDone(p.kind, p.bytes);
    q.pushUsed(p.head, ok ? p.used : 1);
  }

  /** A read or write completed with status OK: the GET /stats counters. */
  private countDone(kind: Pending["kind"], bytes: number): void {
    if (kind === 1) {
      const c = this.counters;
      c[DISK.READ_OPS] = c[DISK.READ_OPS]! + 1;
      c[DISK.READ_BYTES] = c[DISK.READ_BYTES]! + bytes;
    } else if (kind === 2) {
      const c = this.counters;
      c[DISK.WRITE_OPS] = c[DISK.WRITE_OPS]! + 1;
      c[DISK.WRITE_BYTES] = c[DISK.WRITE_BYTES]! + bytes;
    }
  }

  /** Where the queue stands, and how many requests wait on the I/O thread (GET /threads). */
  inspect(): VirtioDeviceInspect {
    return { queues: inspectQueues(this.queues, this.queueMaxSizes.length), inFlight: this.inFlight };
  }

  reset(): void {
    // The guest's buffers must not change under I/O once the driver thinks the device is reset.
    this.io?.drain(() => {});
    // A drain that found the thread gone: serve here from now on.
    if (this.io?.gone === true) this.dropIoThread();
    this.pending.length = 0;
    // The driver took its buffers back: held requests are never answered (nor were they done).
    this.held.length = 0;
    this.stoppedOnNoSpace = false;
    this.ctx = undefined;
    this.queues = [];
    this.writeThrough = true;
  }

  /** Wait for the requests on the I/O thread and answer them (used ring, interrupt). */
  private completeInFlight(): void {
    if (this.io === undefined || this.io.inFlight === 0) return;
    this.io.drain((slot, result) => this.finish(slot, result));
    if (this.io.gone) this.dropIoThread();
    const q = this.queues[0];
    if (this.ctx !== undefined && q !== undefined && q.broken === undefined && q.needsInterrupt()) this.ctx.interruptQueue(0);
  }

  /**
   * Run one operation on the I/O thread now and wait for it (nothing else in flight): its
   * result, or undefined when there is no I/O thread (or it is gone: then it was dropped).
   */
  private onIoThreadNow(op: number): number | undefined {
    this.completeInFlight();
    const io = this.io;
    if (io === undefined) return undefined;
    io.nextIov();
    io.submit(op, 0, 0, false);
    let result = -EIO;
    io.drain((_slot, r) => (result = r));
    if (!io.gone) return result;
    this.dropIoThread();
    // The thread and what it cached are gone: the operation cannot be said to have happened.
    return -EIO;
  }

  /**
   * Everything completed so far on stable storage, a qcow2 image's cached metadata included,
   * before this returns (0 or -errno). A live migration's source does this in the guest's pause,
   * before the destination reads the same files (QEMU: bdrv_inactivate_all before the last
   * device state); requests in flight are completed and answered first.
   */
  flushNow(): number {
    if (this.readonly) return 0;
    return this.onIoThreadNow(IO_OP.FLUSH) ?? this.syncInline();
  }

  /**
   * Read a qcow2 image's metadata again from the file, dropping what was read when the device
   * opened it (0 or -errno). An incoming live migration on shared storage opens the disks while
   * the source still writes them; the source writes its metadata back in the pause (flushNow)
   * and the destination rereads it before its guest runs (QEMU: bdrv_invalidate_cache). Only
   * before this device served a request: it drops its cache by writing it back, and a backend
   * that never wrote has nothing to write. Raw images cache nothing.
   */
  reopen(): number {
    if (this.raw) return 0;
    const r = this.onIoThreadNow(IO_OP.REOPEN);
    if (r !== undefined) return r;
    try {
      this.backend?.close();
      this.backend = backendFromInit(this.diskInit);
      return 0;
    } catch {
      this.backend = undefined; // requests fail with IOERR (inline())
      return -EIO;
    }
  }

  save(): BlockDeviceState {
    // In-flight requests are completed into the used ring first, so the cursors saved are final.
    this.completeInFlight();
    // A held request (after the drain: one may have just failed for space) was taken from the
    // ring and not answered: the saved cursors cannot say so.
    if (this.held.length > 0) throw new TypevisorError("DISK_HELD", `disk ${this.diskInit.path} has ${this.held.length} requests waiting for space on its filesystem; free space and resume first`);
    return {
      version: 1,
      features: (this.ctx?.features ?? 0n).toString(16),
      activated: this.ctx !== undefined,
      queues: this.queues.map((q) => q?.save() ?? null),
    };
  }

  /** One request (virtio 1.2 §5.2.6): header, data, status in the last writable byte. */
  private handle(ctx: ActivateContext, chain: DescriptorChain): ChainResult {
    // A request whose status cannot be returned or whose header is cut short is a driver bug,
    // not an I/O failure: the queue stops and the device asks for reset (§2.1.2).
    if (chain.totalRead < HEADER_SIZE) return new QueueError("VIRTIO_BLK_HEADER", `request ${chain.head} has ${chain.totalRead} readable bytes, less than the 16-byte header`);
    if (chain.totalWrite < 1) return new QueueError("VIRTIO_BLK_STATUS", `request ${chain.head} has no writable status byte`);
    const { type, sector } = this.header(ctx, chain);
    // The status is the chain's last writable byte (§5.2.6): the end of its last non-empty
    // writable buffer (empty ones are not kept), bounds-checked when the chain was popped.
    const last = chain.writable[chain.writable.length - 1]!;
    return this.run(ctx, chain, type, sector, last.addr + last.len - 1);
  }

  /** Execute a parsed request and write its status: the used length, or DEFERRED (on the I/O thread, or held for space). */
  private run(ctx: ActivateContext, chain: DescriptorChain, type: number, sector: number, statusAddr: number): number {
    let status: number;
    let used = 1;
    try {
      status = this.execute(ctx, chain, type, sector, statusAddr);
      if (status === DEFERRED) return DEFERRED;
      if (type === VIRTIO_BLK_T.IN && status === VIRTIO_BLK_S.OK) used = chain.totalWrite;
    } catch (e) {
      // The host filesystem is full: held, not answered (holdOnNoSpace).
      if (e instanceof DiskIoError && this.holdOnNoSpace(e.errno, type, chain, sector, statusAddr)) return DEFERRED;
      // Host I/O failed (EIO, file truncated under us): this request fails, the VM goes on.
      status = VIRTIO_BLK_S.IOERR;
    }
    const last = statusAddr;
    ctx.mem.writeU8(last, status);
    // len counts bytes written from the first writable byte (§2.7.8); for non-IN requests we
    // report just the status byte, the convention Linux, QEMU and Firecracker share.
    return used;
  }

  /**
   * Request type and sector (§5.2.6 header). Read in place when the first buffer holds the
   * whole header (every driver we know), else gathered; the sector is a Number, exact below
   * 2^53 and, above it, far past any disk (inRangeNum then refuses it), so no BigInt per request.
   */
  private header(ctx: ActivateContext, chain: DescriptorChain): { type: number; sector: number } {
    const first = chain.readable[0]!;
    if (first.len >= HEADER_SIZE) {
      return { type: ctx.mem.readU32(first.addr), sector: ctx.mem.readU32(first.addr + 12) * 2 ** 32 + ctx.mem.readU32(first.addr + 8) };
    }
    const hdr = readChain(ctx.mem, chain.readable, 0, HEADER_SIZE);
    return { type: hdr.readUInt32LE(0), sector: hdr.readUInt32LE(12) * 2 ** 32 + hdr.readUInt32LE(8) };
  }

  /** [sector, +bytes) inside the disk; sector is a Number (see header()), bytes < 2^32. */
  private inRangeNum(sector: number, bytes: number): boolean {
    return sector * SECTOR_SIZE + bytes <= this.capacityBytes;
  }

  private inRange(sector: bigint, bytes: number): boolean {
    return sector * BigInt(SECTOR_SIZE) + BigInt(bytes) <= BigInt(this.capacityBytes);
  }

  /** Completed read/write requests and bytes since construction. */
  stats(): BlockStats {
    const ioThread = this.io !== undefined ? "running" : this.ioThreadFailed ? "failed" : this.starting !== undefined ? "starting" : this.ioThreadName !== undefined ? "idle" : "none";
    return { ...diskCountersAt(this.counters, 0), ioThread };
  }

  /**
   * With an I/O thread, first try a read here without waiting for the disk (preadv2 RWF_NOWAIT:
   * EAGAIN unless every byte is in the page cache), the way io_uring tries a request inline
   * before it hands it to a worker: a cached read then costs no trip to the I/O thread and back,
   * and only reads that would wait for the storage go there. True when all `len` bytes were read.
   * A short read, EAGAIN or an error leaves the request to the I/O thread (a repeated read into
   * the same buffers is harmless: the guest sees them only on completion), and a file that
   * does not take RWF_NOWAIT (EOPNOTSUPP/EINVAL) is not asked again.
   */
  private readCached(bufs: readonly GuestBuf[], len: number, pos: number): boolean {
    if (this.ioThreadName === undefined || this.ioThreadFailed || !this.nowaitReads || !this.raw) return false;
    const iov = this.iov;
    iov.clear();
    if (!gatherHost(iov, bufs, 0, len)) {
      // More pieces than one preadv2 takes: not worth several tries; the I/O thread has it.
      iov.clear();
      return false;
    }
    let n = iov.preadv2(this.fd, pos, RWF_NOWAIT);
    while (n === -EINTR) n = iov.preadv2(this.fd, pos, RWF_NOWAIT);
    iov.clear();
    if (n === len) return true;
    if (n === -EOPNOTSUPP || n === -EINVAL) this.nowaitReads = false;
    return false;
  }

  /**
   * Hand a validated request to the I/O thread, if there is one and its buffers fit a slot's
   * iovec array (seg_max pieces do; a driver that sends more is served here, in pieces).
   */
  private offload(op: number, bufs: readonly GuestBuf[] | undefined, skip: number, len: number, pos: number, p: Pending): boolean {
    const io = this.ioThread();
    if (io === undefined || io.full) return false;
    if (bufs !== undefined && !gatherHost(io.nextIov(), bufs, skip, len)) return false;
    const slot = io.submit(op, pos, len, this.writeThrough && op !== IO_OP.READ && op !== IO_OP.FLUSH);
    this.pending[slot] = p;
    this.lastIoUse = performance.now();
    return true;
  }

  /** The request's status, or DEFERRED when the I/O thread took it (finish() answers it). */
  private execute(ctx: ActivateContext, chain: DescriptorChain, type: number, sector: number, status: number): number {
    const { IOERR, OK, UNSUPP } = VIRTIO_BLK_S;
    const head = chain.head;
    switch (type) {
      case VIRTIO_BLK_T.IN: {
        const len = chain.totalWrite - 1;
        if (len % SECTOR_SIZE !== 0 || !this.inRangeNum(sector, len)) return IOERR;
        if (!this.readCached(chain.writable, len, sector * SECTOR_SIZE)) {
          if (this.offload(IO_OP.READ, chain.writable, 0, len, sector * SECTOR_SIZE, { head, status, used: chain.totalWrite, kind: 1, bytes: len, chain, type, sector })) return DEFERRED;
          this.transfer("read", chain.writable, 0, len, sector * SECTOR_SIZE);
        }
        this.countDone(1, len);
        return OK;
      }
      case VIRTIO_BLK_T.OUT: {
        // §5.2.6.2: with RO offered, writes fail with IOERR and write nothing.
        if (this.readonly) return IOERR;
        const len = chain.totalRead - HEADER_SIZE;
        if (len % SECTOR_SIZE !== 0 || !this.inRangeNum(sector, len)) return IOERR;
        if (this.offload(IO_OP.WRITE, chain.readable, HEADER_SIZE, len, sector * SECTOR_SIZE, { head, status, used: 1, kind: 2, bytes: len, chain, type, sector, written: len })) return DEFERRED;
        try {
          this.transfer("write", chain.readable, HEADER_SIZE, len, sector * SECTOR_SIZE);
        } finally {
          this.dirtyBlocks?.mark(sector * SECTOR_SIZE, len);
        }
        this.stabilize();
        this.countDone(2, len);
        return OK;
      }
      case VIRTIO_BLK_T.FLUSH:
        if (this.readonly) return OK;
        // On the I/O thread, after every write submitted before it (one thread, in order).
        if (this.offload(IO_OP.FLUSH, undefined, 0, 0, 0, { head, status, used: 1, kind: 0, bytes: 0, chain, type, sector })) return DEFERRED;
        return this.check(this.syncInline());
      case VIRTIO_BLK_T.GET_ID: {
        if (this.serial === undefined) return UNSUPP;
        const id = new Uint8Array(BLK_ID_BYTES);
        id.set(this.serial);
        writeChain(ctx.mem, chain.writable, id.subarray(0, Math.min(BLK_ID_BYTES, chain.totalWrite - 1)));
        return OK;
      }
      case VIRTIO_BLK_T.DISCARD:
      case VIRTIO_BLK_T.WRITE_ZEROES:
        return this.discardOrZero(ctx, chain, type, status);
      default:
        return UNSUPP;
    }
  }

  /** DISCARD and WRITE_ZEROES (virtio 1.2 §5.2.6): validate every segment before acting on any. */
  private discardOrZero(ctx: ActivateContext, chain: DescriptorChain, type: number, status: number): number {
    const { IOERR, OK, UNSUPP } = VIRTIO_BLK_S;
    const zero = type === VIRTIO_BLK_T.WRITE_ZEROES;
    if (!hasFeature(this.features, zero ? VIRTIO_BLK_F.WRITE_ZEROES : VIRTIO_BLK_F.DISCARD)) return this.readonly ? IOERR : UNSUPP;
    if (this.readonly) return IOERR;
    const len = chain.totalRead - HEADER_SIZE;
    const maxSeg = zero ? MAX_WRITE_ZEROES_SEG : MAX_DISCARD_SEG;
    const maxSectors = zero ? MAX_WRITE_ZEROES_SECTORS : MAX_DISCARD_SECTORS;
    if (len === 0 || len % SEGMENT_SIZE !== 0 || len / SEGMENT_SIZE > maxSeg) return IOERR;
    const raw = readChain(ctx.mem, chain.readable, HEADER_SIZE, len);
    const segs: { sector: bigint; sectors: number }[] = [];
    for (let off = 0; off < len; off += SEGMENT_SIZE) {
      const sector = raw.readBigUInt64LE(off);
      const sectors = raw.readUInt32LE(off + 8);
      const flags = raw.readUInt32LE(off + 12);
      // §5.2.6.2: unknown flags -> UNSUPP; unmap on a discard -> UNSUPP.
      if ((flags & ~SEG_FLAG_UNMAP) !== 0 || (!zero && (flags & SEG_FLAG_UNMAP) !== 0)) return UNSUPP;
      if (sectors > maxSectors || !this.inRange(sector, sectors * SECTOR_SIZE)) return IOERR;
      segs.push({ sector, sectors });
    }
    // A raw file keeps discarded blocks (see the class comment); qcow2 frees the clusters.
    if (!zero && this.raw) return OK;
    // One segment (MAX_WRITE_ZEROES_SEG, and qcow2's max_discard_seg): on the I/O thread when there is one.
    const one = segs.length === 1 ? segs[0]! : undefined;
    const op = zero ? IO_OP.WRITE_ZEROES : IO_OP.DISCARD;
    if (one !== undefined && this.offload(op, undefined, 0, one.sectors * SECTOR_SIZE, Number(one.sector) * SECTOR_SIZE, { head: chain.head, status, used: 1, kind: 0, bytes: 0, chain, type, sector: Number(one.sector), written: one.sectors * SECTOR_SIZE })) return DEFERRED;
    for (const s of segs) {
      const pos = Number(s.sector) * SECTOR_SIZE;
      const len = s.sectors * SECTOR_SIZE;
      this.dirtyBlocks?.mark(pos, len);
      if (this.raw) this.check(writeZeroes(this.fd, this.iov, pos, len));
      else this.check(zero ? this.inline().writeZeroes(pos, len) : this.inline().discard(pos, len));
    }
    this.stabilize();
    return OK;
  }

  /** Without negotiated FLUSH the driver assumes writethrough: make the write stable now (§5.2.6.2). */
  private stabilize(): void {
    if (this.writeThrough) this.check(this.syncInline());
  }

  /** flush on this thread: fdatasync for raw, the backend's ordered metadata flush for qcow2. */
  private syncInline(): number {
    return this.raw ? syncData(this.fd) : this.inline().flush();
  }

  /** The backend on this thread (qcow2 without an I/O thread); a request without one fails. */
  private inline(): DiskBackend {
    if (this.backend === undefined) throw new TypevisorError("DISK_IO", "disk backend unavailable");
    return this.backend;
  }

  /** OK for 0; a failed host operation (-errno) throws, which fails this request with IOERR (handle()). */
  private check(result: number): number {
    if (result < 0) throw new DiskIoError(result);
    return VIRTIO_BLK_S.OK;
  }

  /**
   * One preadv/pwritev per request over the guest buffers themselves (a 1 MiB request is ~256
   * page-sized buffers: one syscall, not 256, and no view or object per page), IOV_MAX pieces
   * per call: bytes [skip, skip + len) of `bufs` to or from the disk at byte `pos`. The buffers'
   * host addresses come from the descriptor walk, which bounds-checked each buffer whole; we only
   * ever address inside them. Buffers that follow each other in host memory become one piece.
   * @throws TypevisorError on an I/O error or an end of file the request did not expect.
   */
  private transfer(dir: "read" | "write", bufs: readonly GuestBuf[], skip: number, len: number, pos: number): void {
    const write = dir === "write";
    if (!this.raw) {
      // Through the image's own mapping, in one call: a request past IOV_MAX pieces is refused.
      this.iov.clear();
      if (!gatherHost(this.iov, bufs, skip, len)) throw new TypevisorError("DISK_IO", "request has more pieces than one call takes");
      const b = this.inline();
      const r = write ? b.writev(this.iov, pos) : b.readv(this.iov, pos);
      this.iov.clear();
      this.check(r);
      return;
    }
    this.iov.clear();
    gatherHost(this.iov, bufs, skip, len, () => {
      const bytes = this.iov.bytes;
      this.check(transferAll(this.fd, this.iov, write, pos));
      pos += bytes;
      return true;
    });
    this.check(transferAll(this.fd, this.iov, write, pos));
  }
}
