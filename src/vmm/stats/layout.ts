/**
 * The stats page: one 4 KiB page of a VMM's counters, shared memory that its owner reads
 * without asking the VMM. The device thread counts each completed disk request and each frame
 * into it as it goes (plain stores, one writer per counter); the VMM's main thread reads it for
 * GET /stats, and a daemon that gave the VMM a file to map (`run --stats-file`) reads that file
 * with one pread: neither wakes a VMM thread. Sampling a VM's I/O every few seconds was a request
 * over the control socket each time, waking the VMM's main thread and its device thread
 * (docs/benchmarks.md, "A daemon's usage sampling").
 *
 * Layout (little-endian, as every host typevisor runs on: x86_64):
 *
 *   bytes 0-3     magic "TVST" (0x54535654 read as a u32): written last by the VMM, so a page
 *                 without it is one no VMM has set up yet
 *   bytes 4-7     version (1)
 *   bytes 8-11    disks in use (at most MAX_DISKS)
 *   bytes 12-15   NICs in use (at most MAX_NICS)
 *   bytes 16-23   f64: when the VM last started running (ms since the epoch; 0: not yet)
 *   bytes 24-27   changes: counts up whenever something a supervisor watches through the control
 *                 API changes (the VM's state, with a pause of the VMM's own; console output
 *                 starting to be dropped), so it asks then, not only on its own schedule
 *   bytes 64-     MAX_DISKS disk slots of DISK_SLOT f64 each, then MAX_NICS NIC slots of NIC_SLOT
 *
 * A page is written by a process a guest may have taken over: its reader checks every field
 * (parseStatsPage) and takes nothing it did not check. Pure data, no native code: the daemon
 * imports this to read the file.
 */

export const STATS_PAGE_BYTES = 4096;
export const STATS_MAGIC = 0x54535654;
export const STATS_VERSION = 1;
/** A VM's virtio devices sit on one PCI bus of 32 slots: no VM has more disks or NICs than that. */
export const MAX_DISKS = 32;
export const MAX_NICS = 32;

/** u32 indices of the header. */
export const HEADER = { MAGIC: 0, VERSION: 1, DISKS: 2, NICS: 3, CHANGES: 6 } as const;
/** f64 index of the start time. */
export const STARTED_AT = 2;

/** f64 indices inside a disk's slot (BlockDevice's counters). */
export const DISK = { READ_BYTES: 0, WRITE_BYTES: 1, READ_OPS: 2, WRITE_OPS: 3 } as const;
export const DISK_SLOT = 4;
/** f64 indices inside a NIC's slot (NetDevice's counters). */
export const NIC = { RX_PACKETS: 0, RX_BYTES: 1, RX_DROPPED: 2, TX_PACKETS: 3, TX_BYTES: 4, TX_DROPPED: 5 } as const;
export const NIC_SLOT = 6;

/** The header's bytes, before the first disk slot. */
export const STATS_HEADER_BYTES = 64;
/** f64 index of disk slot `i`. */
export const diskSlot = (i: number): number => STATS_HEADER_BYTES / 8 + i * DISK_SLOT;
/** f64 index of NIC slot `i`. */
export const nicSlot = (i: number): number => diskSlot(MAX_DISKS) + i * NIC_SLOT;
// The layout must fit its page (checked once, at load).
if (nicSlot(MAX_NICS) * 8 > STATS_PAGE_BYTES) throw new Error("stats page layout exceeds its page");

/** A disk's counters as GET /stats reports them. */
export interface DiskCounters {
  readBytes: number;
  writeBytes: number;
  readOps: number;
  writeOps: number;
}

/** A NIC's counters as GET /stats reports them. */
export interface NicCounters {
  rxPackets: number;
  rxBytes: number;
  /** Host -> guest frames dropped: too big for the guest's buffers, unusable header, device not ready. */
  rxDropped: number;
  txPackets: number;
  txBytes: number;
  /** Guest -> host chains dropped: malformed, oversized, or refused by the TAP. */
  txDropped: number;
}

/** The disk counters of the slot at f64 index `s` (DISK indices from there). */
export function diskCountersAt(f64: Float64Array, s: number): DiskCounters {
  return { readBytes: f64[s + DISK.READ_BYTES]!, writeBytes: f64[s + DISK.WRITE_BYTES]!, readOps: f64[s + DISK.READ_OPS]!, writeOps: f64[s + DISK.WRITE_OPS]! };
}

/** The NIC counters of the slot at f64 index `s` (NIC indices from there). */
export function nicCountersAt(f64: Float64Array, s: number): NicCounters {
  return {
    rxPackets: f64[s + NIC.RX_PACKETS]!, rxBytes: f64[s + NIC.RX_BYTES]!, rxDropped: f64[s + NIC.RX_DROPPED]!,
    txPackets: f64[s + NIC.TX_PACKETS]!, txBytes: f64[s + NIC.TX_BYTES]!, txDropped: f64[s + NIC.TX_DROPPED]!,
  };
}

/** Counters summed over a VM's devices (GET /stats `io`, the daemon's usage). */
export interface IoTotals {
  diskReadBytes: number;
  diskWriteBytes: number;
  diskReadOps: number;
  diskWriteOps: number;
  netRxBytes: number;
  netTxBytes: number;
  netRxPackets: number;
  netTxPackets: number;
}

export interface StatsReading {
  disks: DiskCounters[];
  nics: NicCounters[];
  totals: IoTotals;
  /** When the VM last started running (ms since the epoch), or undefined before it has. */
  startedAtMs: number | undefined;
  /** The change counter (HEADER.CHANGES). */
  changes: number;
}

/** A counter as written: a whole number of events or bytes, below 2^53. */
const counter = (x: number): boolean => Number.isSafeInteger(x) && x >= 0;

/**
 * The counters of a page as its VMM wrote them, or undefined for a page that is not one: too
 * short, no magic (not set up yet), another version, device counts out of range, or any counter
 * that is not a whole number in [0, 2^53). `bytes` is copied from, never kept.
 */
export function parseStatsPage(bytes: Uint8Array): StatsReading | undefined {
  if (bytes.length < STATS_PAGE_BYTES) return undefined;
  // A copy: aligned for the typed views, and a writer changing the page meanwhile changes nothing here.
  const page = new ArrayBuffer(STATS_PAGE_BYTES);
  new Uint8Array(page).set(bytes.subarray(0, STATS_PAGE_BYTES));
  return readStatsPage(new Uint32Array(page), new Float64Array(page));
}

/**
 * The change counter alone, from a page's first STATS_HEADER_BYTES (a watchdog's frequent look),
 * or undefined for a page that is not one (no magic, another version).
 */
export function parseStatsChanges(bytes: Uint8Array): number | undefined {
  if (bytes.length < STATS_HEADER_BYTES) return undefined;
  const b = Buffer.from(bytes.buffer, bytes.byteOffset, STATS_HEADER_BYTES);
  if (b.readUInt32LE(HEADER.MAGIC * 4) !== STATS_MAGIC || b.readUInt32LE(HEADER.VERSION * 4) !== STATS_VERSION) return undefined;
  return b.readUInt32LE(HEADER.CHANGES * 4);
}

/** parseStatsPage over the page's own views (the VMM reading its own page: no copy). */
export function readStatsPage(u32: Uint32Array, f64: Float64Array): StatsReading | undefined {
  if (u32[HEADER.MAGIC] !== STATS_MAGIC || u32[HEADER.VERSION] !== STATS_VERSION) return undefined;
  const nDisks = u32[HEADER.DISKS]!;
  const nNics = u32[HEADER.NICS]!;
  if (nDisks > MAX_DISKS || nNics > MAX_NICS) return undefined;
  const started = f64[STARTED_AT]!;
  if (!counter(started)) return undefined;
  const disks: DiskCounters[] = [];
  for (let i = 0; i < nDisks; i++) {
    const d = diskCountersAt(f64, diskSlot(i));
    if (!Object.values(d).every(counter)) return undefined;
    disks.push(d);
  }
  const nics: NicCounters[] = [];
  for (let i = 0; i < nNics; i++) {
    const n = nicCountersAt(f64, nicSlot(i));
    if (!Object.values(n).every(counter)) return undefined;
    nics.push(n);
  }
  // Sums of at most 32 counters below 2^53 stay finite (below 2^58): a hostile page can make them large, never NaN.
  const sum = <T>(xs: T[], f: (x: T) => number): number => xs.reduce((n, x) => n + f(x), 0);
  return {
    disks,
    nics,
    totals: {
      diskReadBytes: sum(disks, (d) => d.readBytes),
      diskWriteBytes: sum(disks, (d) => d.writeBytes),
      diskReadOps: sum(disks, (d) => d.readOps),
      diskWriteOps: sum(disks, (d) => d.writeOps),
      netRxBytes: sum(nics, (n) => n.rxBytes),
      netTxBytes: sum(nics, (n) => n.txBytes),
      netRxPackets: sum(nics, (n) => n.rxPackets),
      netTxPackets: sum(nics, (n) => n.txPackets),
    },
    startedAtMs: started === 0 ? undefined : started,
    changes: u32[HEADER.CHANGES]!,
  };
}
