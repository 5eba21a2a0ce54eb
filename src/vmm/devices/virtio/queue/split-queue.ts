import { TypevisorError } from "../../../../errors.js";
import type { DirtyLog, GuestMemory } from "../../../memory/guest-memory.js";
import type { QueueConfig, QueueInspect } from "../device.js";

/** Descriptor flags (virtio 1.2 §2.7.5). */
export const VIRTQ_DESC_F = { NEXT: 1, WRITE: 2, INDIRECT: 4 } as const;
/** Available ring flag (virtio 1.2 §2.7.6): the driver asks for no used-buffer interrupts. */
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
/** Largest split queue (virtio 1.2 §2.7: "The maximum Queue Size value is 32768"). */
export const MAX_QUEUE_SIZE = 32768;
/**
 * Largest indirect table we walk. The spec bounds it only by `len / 16`, and a 4 GiB `len`
 * would let a guest make one pop walk 2^28 descriptors; 32768 entries (the largest legal
 * queue) is far beyond what any driver builds (Linux: seg_max + 2).
 */
export const MAX_INDIRECT_ENTRIES = 32768;
/** virtio 1.2 §2.7.5: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total". */
const MAX_CHAIN_BYTES = 2 ** 32;
const DESC_SIZE = 16;
/** The 32-bit boundary: buffers above it count in inspect().highBuffers. */
const FOUR_GIB = 2 ** 32;
/** 2^53 / 2^32: a descriptor address whose high word reaches this is not a safe integer. */
const HI_LIMIT = 2 ** 21;

/** "0x..." of a 64-bit value given as two 32-bit halves (for messages). */
function hex64(hi: number, lo: number): string {
  return `0x${hi === 0 ? lo.toString(16) : hi.toString(16) + lo.toString(16).padStart(8, "0")}`;
}

/** One guest buffer of a chain: guest-physical address and length, already bounds-checked. */
export interface GuestBuf {
  addr: number;
  len: number;
  /** Host virtual address of `addr` (GuestMemory.tryHostAddress), for iovecs handed to the kernel. */
  host: number;
}

/** A validated descriptor chain (virtio 1.2 §2.7.5): readable buffers first, then writable ones. */
export interface DescriptorChain {
  /** Head index: what goes back in the used ring. */
  head: number;
  readable: GuestBuf[];
  writable: GuestBuf[];
  totalRead: number;
  totalWrite: number;
}

/** The driver broke a split-ring rule; the queue is unusable until reset (virtio 1.2 §2.1.2). */
export class QueueError extends TypevisorError {
  constructor(code: string, message: string) {
    super(code, message);
    this.name = "QueueError";
  }
}

/** What a snapshot keeps of a queue besides its config: the device's own cursors. */
export interface SplitQueueState {
  config: QueueConfig;
  nextAvail: number;
  nextUsed: number;
}

export interface SplitQueueOptions {
  /** VIRTIO_F_EVENT_IDX negotiated (virtio 1.2 §2.7.7, §2.7.10). */
  eventIdx: boolean;
  /** VIRTIO_F_INDIRECT_DESC negotiated (virtio 1.2 §2.7.5.3). */
  indirect: boolean;
}

/*
 * Memory ordering. The driver runs on other CPUs and writes the rings concurrently. On x86
 * (TSO) loads are not reordered with loads and stores not with stores, and V8 emits our
 * DataView accesses in program order, so "read avail idx, then the ring entry, then the
 * descriptors" and "write the used element, then the used idx" need no fence (virtio 1.2
 * §2.7.13: the device sets len before idx). The one reordering TSO allows is a later load
 * passing an earlier store; where the protocol needs store->load order (publish avail_event
 * or used idx, then read the driver's idx/used_event: virtio 1.2 §2.7.10) we issue a full
 * fence: a seq-cst Atomics op, which V8 compiles to a locked instruction on x86-64 that
 * orders all memory accesses, not just the ones to its own buffer.
 */
const fenceWord = new Int32Array(new SharedArrayBuffer(4));
function fullFence(): void {
  Atomics.store(fenceWord, 0, 0);
}

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/**
 * The device side of one split virtqueue (virtio 1.2 §2.7) over guest memory.
 *
 * Everything in the rings is guest-controlled: indices, heads, descriptors and lengths are
 * checked before use, and any violation is returned as a QueueError (never thrown) that
 * sticks until the queue is rebuilt: the device reports it with needsReset.
 */
export class SplitQueue {
  readonly config: Readonly<QueueConfig>;
  private readonly mem: GuestMemory;
  private readonly opts: SplitQueueOptions;
  private nextAvail = 0;
  private nextUsed = 0;
  /** Used idx at the last needsInterrupt() decision (virtio 1.2 §2.7.10 "old" index). */
  private signalledUsed = 0;
  /** Non-empty buffers popped at or above 4 GiB (inspect(): GET /threads). */
  private highBuffers = 0;
  private failure: QueueError | undefined;
  /*
   * Live views of the three ring areas, made once: check() proved each lies inside one guest RAM
   * region, and the guest cannot move them without a reset (virtio 1.2 §4.1.4.3.2: queue
   * addresses are written before the queue is enabled), which rebuilds the queue. Going through
   * GuestMemory per field would search the regions four times per descriptor; here every access
   * is a DataView read at an offset bounded by the queue size (indices are taken mod size).
   */
  private readonly desc: DataView;
  private readonly avail: DataView;
  private readonly used: DataView;

  /** @throws QueueError (code VIRTQ_CONFIG) when the driver placed the queue badly. */
  constructor(mem: GuestMemory, config: QueueConfig, opts: SplitQueueOptions) {
    const err = SplitQueue.check(mem, config);
    if (err !== undefined) throw err;
    this.mem = mem;
    this.config = { ...config };
    this.opts = { ...opts };
    this.desc = mem.dataView(config.descAddr, DESC_SIZE * config.size);
    this.avail = mem.dataView(config.driverAddr, 6 + 2 * config.size);
    this.used = mem.dataView(config.deviceAddr, 6 + 8 * config.size);
  }

  /** Why `config` cannot be used as a split queue in `mem`, or undefined when it can. */
  static check(mem: GuestMemory, c: QueueConfig): QueueError | undefined {
    const bad = (what: string): QueueError => new QueueError("VIRTQ_CONFIG", `virtqueue ${what}`);
    // virtio 1.2 §2.7: Queue Size is a power of 2, at most 32768 (ring indices wrap at 2^16).
    if (!isPowerOfTwo(c.size) || c.size > MAX_QUEUE_SIZE) return bad(`size ${c.size} is not a power of 2 in 1..32768`);
    // virtio 1.2 §2.7.1 alignment: descriptor table 16, available ring 2, used ring 4.
    if (c.descAddr % 16 !== 0) return bad("descriptor table is not 16-byte aligned");
    if (c.driverAddr % 2 !== 0) return bad("available ring is not 2-byte aligned");
    if (c.deviceAddr % 4 !== 0) return bad("used ring is not 4-byte aligned");
    // Sizes per §2.7 (with the EVENT_IDX trailer, which costs nothing to require).
    if (!mem.contains(c.descAddr, DESC_SIZE * c.size)) return bad("descriptor table is outside guest RAM");
    if (!mem.contains(c.driverAddr, 6 + 2 * c.size)) return bad("available ring is outside guest RAM");
    if (!mem.contains(c.deviceAddr, 6 + 8 * c.size)) return bad("used ring is outside guest RAM");
    // Each area is read in place through one view. With the VMM's view geometry (2 MiB of
    // overlap, guest-memory.ts) every area of a legal queue (at most 512 KiB) is one view
    // wherever it lies; only a geometry with less overlap than that can refuse here.
    for (const [what, addr, len] of [["descriptor table", c.descAddr, DESC_SIZE * c.size], ["available ring", c.driverAddr, 6 + 2 * c.size], ["used ring", c.deviceAddr, 6 + 8 * c.size]] as const) {
      if (mem.trySlice(addr, len) === undefined) return bad(`${what} crosses two host views of guest memory`);
    }
    return undefined;
  }

  /** Rebuild a queue from a snapshot. @throws QueueError when the state does not fit `mem`. */
  static restore(mem: GuestMemory, state: SplitQueueState, opts: SplitQueueOptions): SplitQueue {
    const q = new SplitQueue(mem, state.config, opts);
    q.nextAvail = state.nextAvail & 0xffff;
    q.nextUsed = state.nextUsed & 0xffff;
    q.signalledUsed = q.nextUsed;
    return q;
  }

  save(): SplitQueueState {
    return { config: { ...this.config }, nextAvail: this.nextAvail, nextUsed: this.nextUsed };
  }

  /** Where the queue stands (QueueInspect); reads guest memory, changes nothing. */
  inspect(): QueueInspect {
    const availIdx = this.avail.getUint16(2, true);
    const availFlags = this.avail.getUint16(0, true);
    const eventIdx = this.opts.eventIdx;
    const usedEvent = eventIdx ? this.avail.getUint16(this.usedEventOffset, true) : null;
    return {
      nextAvail: this.nextAvail,
      availIdx,
      waiting: (availIdx - this.nextAvail) & 0xffff,
      usedIdx: this.used.getUint16(2, true),
      nextUsed: this.nextUsed,
      signalledUsed: this.signalledUsed,
      eventIdx,
      availFlags,
      usedEvent,
      availEvent: eventIdx ? this.used.getUint16(this.availEventOffset, true) : null,
      // With EVENT_IDX the next push (used idx nextUsed + 1) interrupts iff it crosses used_event,
      // i.e. used_event == nextUsed (§2.7.10 vring_need_event with old = nextUsed).
      interruptsSuppressed: usedEvent !== null ? usedEvent !== this.nextUsed : (availFlags & VIRTQ_AVAIL_F_NO_INTERRUPT) !== 0,
      broken: this.failure?.message ?? null,
      highBuffers: this.highBuffers,
    };
  }

  /** The sticky error, once the driver broke the rules. */
  get broken(): QueueError | undefined {
    return this.failure;
  }

  // Offsets inside the ring views (virtio 1.2 §2.7.6, §2.7.8: flags, idx, ring[size], event).
  private get usedEventOffset(): number {
    return 4 + 2 * this.config.size;
  }
  private get availEventOffset(): number {
    return 4 + 8 * this.config.size;
  }

  private fail(code: string, message: string): QueueError {
    this.failure = new QueueError(code, message);
    return this.failure;
  }

  /** Mark the queue broken for a device-level rule the driver broke (e.g. a request without a status byte). */
  poison(err: QueueError): QueueError {
    this.failure ??= err;
    return this.failure;
  }

  /** Available entries not yet popped, or a QueueError when the driver's idx is impossible. */
  pending(): number | QueueError {
    if (this.failure !== undefined) return this.failure;
    const availIdx = this.avail.getUint16(2, true);
    const n = (availIdx - this.nextAvail) & 0xffff;
    // The driver can only have `size` buffers outstanding; more means a corrupt idx
    // (virtio 1.2 §2.7.6: idx only grows, by the number of heads it placed).
    if (n > this.config.size) {
      return this.fail("VIRTQ_AVAIL_IDX", `available idx ${availIdx} is ${n} entries ahead of ${this.nextAvail}, queue size ${this.config.size}`);
    }
    return n;
  }

  /**
   * Take the next available descriptor chain (virtio 1.2 §2.7.13.1 read from the device side).
   * Returns undefined when the ring is empty and a QueueError when the driver broke a rule;
   * a bad chain is consumed, and the queue stays broken.
   */
  pop(): DescriptorChain | undefined | QueueError {
    const n = this.pending();
    if (typeof n !== "number") return n;
    if (n === 0) return undefined;
    const size = this.config.size;
    const head = this.avail.getUint16(4 + 2 * (this.nextAvail % size), true);
    this.nextAvail = (this.nextAvail + 1) & 0xffff;
    if (head >= size) return this.fail("VIRTQ_HEAD", `chain head ${head} is outside the queue of size ${size}`);
    return this.walk(head);
  }

  /** Walk and validate the chain starting at `head` (virtio 1.2 §2.7.5, §2.7.5.3). */
  private walk(head: number): DescriptorChain | QueueError {
    const mem = this.mem;
    const readable: GuestBuf[] = [];
    const writable: GuestBuf[] = [];
    let totalRead = 0;
    let totalWrite = 0;
    let table = this.desc;
    let tableLen = this.config.size;
    let indirect = false;
    let idx = head;
    let count = 0;
    let sawWritable = false;
    for (;;) {
      if (idx >= tableLen) {
        return this.fail("VIRTQ_NEXT", `descriptor index ${idx} is outside its table of ${tableLen}`);
      }
      // A chain longer than its table must revisit an entry: that is a loop (§2.7.5.2).
      if (++count > tableLen) return this.fail("VIRTQ_LOOP", `descriptor chain from head ${head} loops or exceeds ${tableLen} entries`);
      // struct virtq_desc (§2.7.5): le64 addr, le32 len, le16 flags, le16 next. The address is
      // read as two halves into a Number (no BigInt per descriptor): exact up to 2^53, and an
      // address with any of the top 11 bits set is refused below as outside guest RAM.
      const d = DESC_SIZE * idx;
      const addrLo = table.getUint32(d, true);
      const addrHi = table.getUint32(d + 4, true);
      const len = table.getUint32(d + 8, true);
      const flags = table.getUint16(d + 12, true);
      const next = table.getUint16(d + 14, true);
      const addr = addrHi < HI_LIMIT ? addrHi * 2 ** 32 + addrLo : -1;

      if ((flags & VIRTQ_DESC_F.INDIRECT) !== 0) {
        // §2.7.5.3.1: only when negotiated, never nested, never with NEXT; the device
        // ignores WRITE on the descriptor that refers to the table.
        if (!this.opts.indirect) return this.fail("VIRTQ_INDIRECT", "indirect descriptor without VIRTIO_F_INDIRECT_DESC");
        if (indirect) return this.fail("VIRTQ_INDIRECT", "indirect descriptor inside an indirect table");
        if ((flags & VIRTQ_DESC_F.NEXT) !== 0) return this.fail("VIRTQ_INDIRECT", "indirect descriptor with NEXT set");
        if (len === 0 || len % DESC_SIZE !== 0) return this.fail("VIRTQ_INDIRECT", `indirect table length ${len} is not a non-zero multiple of 16`);
        if (len / DESC_SIZE > MAX_INDIRECT_ENTRIES) return this.fail("VIRTQ_INDIRECT", `indirect table of ${len / DESC_SIZE} entries exceeds ${MAX_INDIRECT_ENTRIES}`);
        if (addr < 0 || !mem.contains(addr, len)) {
          return this.fail("VIRTQ_BUFFER", `indirect table at ${hex64(addrHi, addrLo)} (${len} bytes) is outside guest RAM`);
        }
        // A view of the table for this chain only: the driver may reuse the memory afterwards.
        // At most 512 KiB, so one view with the VMM's geometry (see check()).
        const t = mem.trySlice(addr, len);
        if (t === undefined) return this.fail("VIRTQ_BUFFER", `indirect table at ${hex64(addrHi, addrLo)} (${len} bytes) crosses two host views of guest memory`);
        table = new DataView(t.buffer, t.byteOffset, len);
        tableLen = len / DESC_SIZE;
        indirect = true;
        idx = 0;
        count = 0;
        continue;
      }

      // One region lookup per buffer, which also gives the host address block I/O needs.
      const host = addr < 0 ? -1 : mem.tryHostAddress(addr, len);
      if (host < 0) {
        return this.fail("VIRTQ_BUFFER", `buffer at ${hex64(addrHi, addrLo)} (${len} bytes) is outside guest RAM`);
      }
      if ((flags & VIRTQ_DESC_F.WRITE) !== 0) {
        totalWrite += len;
        sawWritable = true;
        // Zero-length buffers carry nothing; keeping them out spares every consumer the case.
        if (len > 0) {
          writable.push({ addr, len, host });
          if (addr >= FOUR_GIB) this.highBuffers++;
        }
      } else {
        // §2.7.4.2 / §2.7.5: device-readable descriptors come before device-writable ones.
        if (sawWritable) return this.fail("VIRTQ_ORDER", `readable descriptor after a writable one in chain ${head}`);
        totalRead += len;
        if (len > 0) {
          readable.push({ addr, len, host });
          if (addr >= FOUR_GIB) this.highBuffers++;
        }
      }
      if (totalRead + totalWrite > MAX_CHAIN_BYTES) return this.fail("VIRTQ_LENGTH", `descriptor chain ${head} is longer than 2^32 bytes`);
      if ((flags & VIRTQ_DESC_F.NEXT) === 0) break;
      idx = next;
    }
    return { head, readable, writable, totalRead, totalWrite };
  }

  /**
   * Return a chain to the driver (virtio 1.2 §2.7.8): write the used element, then bump the
   * used idx; the element is stored first so the driver never sees an idx covering a stale
   * element (x86 keeps the two stores in order, see the note on fullFence).
   */
  pushUsed(head: number, lenWritten: number): void {
    const size = this.config.size;
    const slot = 4 + 8 * (this.nextUsed % size);
    this.used.setUint32(slot, head >>> 0, true);
    this.used.setUint32(slot + 4, Math.min(Math.max(0, Math.floor(lenWritten)), 0xffffffff), true);
    this.nextUsed = (this.nextUsed + 1) & 0xffff;
    this.used.setUint16(2, this.nextUsed, true);
    const log = this.mem.dirtyLog;
    if (log !== undefined) this.logUsed(log, head, slot);
  }

  /**
   * Dirty tracking (GuestMemory.dirtyLog): the used element and idx just written, and the
   * writable buffers of the chain returned, found by walking it again (the driver may not touch
   * a chain until it is used, §2.7.13; one it changed anyway marks its own pages, or none). The
   * walk's side effects (the sticky failure, the >4 GiB count) are undone: this only reads.
   */
  private logUsed(log: DirtyLog, head: number, slot: number): void {
    const base = this.config.deviceAddr;
    log.mark(base + 2, 2);
    log.mark(base + slot, 8);
    if (head >= this.config.size) return;
    const failure = this.failure;
    const high = this.highBuffers;
    const chain = this.walk(head);
    this.failure = failure;
    this.highBuffers = high;
    if (chain instanceof QueueError) return;
    for (const b of chain.writable) log.mark(b.addr, b.len);
  }

  /**
   * Whether the driver wants an interrupt for what was pushed since the last call
   * (virtio 1.2 §2.7.7.2 / §2.7.10): with EVENT_IDX, when the used idx crossed used_event;
   * without, unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT.
   */
  needsInterrupt(): boolean {
    const now = this.nextUsed;
    const old = this.signalledUsed;
    this.signalledUsed = now;
    if (now === old) return false;
    // Our used idx store must be visible before we read the driver's suppression state,
    // or we could miss the driver re-enabling interrupts in between (store->load order).
    fullFence();
    if (this.opts.eventIdx) {
      const usedEvent = this.avail.getUint16(this.usedEventOffset, true);
      return ((now - usedEvent - 1) & 0xffff) < ((now - old) & 0xffff);
    }
    return (this.avail.getUint16(0, true) & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
  }

  /**
   * Ask the driver to notify on its next buffer and say whether buffers arrived meanwhile.
   * With EVENT_IDX we publish avail_event = our next avail index (virtio 1.2 §2.7.10) and must
   * re-read avail idx after a fence: a buffer added between our last pop and the store would
   * otherwise get no notification and sit forever. Without EVENT_IDX we never suppress
   * notifications (used flags stay 0), so there is nothing to re-arm.
   * Returns true when the caller should keep popping.
   */
  armNotification(): boolean {
    if (this.failure !== undefined) return false;
    if (!this.opts.eventIdx) return false;
    this.used.setUint16(this.availEventOffset, this.nextAvail, true);
    this.mem.dirtyLog?.mark(this.config.deviceAddr + this.availEventOffset, 2);
    fullFence();
    const n = this.pending();
    return typeof n === "number" && n > 0;
  }
}
