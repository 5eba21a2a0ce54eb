/**
 * The thread board: where each VMM thread publishes what it is doing, in one SharedArrayBuffer
 * the main thread reads whenever it likes (GET /threads), without asking the thread and without
 * stopping it. One row per thread: rows 0..cpus-1 are the vCPUs, row `cpus` the device thread.
 *
 * A row's first 32 bytes are seen as 8 Int32 words and as 4 Float64s over the same memory:
 *
 *   Int32 0  STATE  the state word: phase code (bits 0-7) and what the phase is about (below)
 *   Int32 1  SEQ    the device thread's passes through its poll loop (vCPUs: unused, their
 *                   exit counters in the stats buffer tell the same)
 *   Int32 2  TID    the thread's kernel thread id, stored once when it starts
 *   F64   2  ADDR   vCPU: port or MMIO address of its last io/mmio exit
 *   F64   3  SINCE  clockMs() when the thread entered its phase, for the phases that are stamped
 *
 * vCPU state word: bits 8-15 the KVM exit reason, bit 16 write (io out / mmio write), bits
 * 17-20 the access size, bit 21 waiting for the device thread (mailbox). The vCPU writes it with
 * plain stores, a couple per exit and nothing else: `run` before KVM_RUN, `exit` with the reason
 * (and ADDR for io/mmio) after. No clock is read per exit, so `run` and `exit` carry no stamp:
 * the reader derives how long a vCPU has been in one from its word and exit count not moving
 * between its own observations (PhaseWatch). Rare transitions (starting, paused, finished) are
 * stamped.
 *
 * Device thread state word: bits 8-15 the device (its index on the bus, plug order), bits
 * 16-31 the queue. Every phase is stamped: the thread reads the clock once before poll and
 * once after (it read it after poll already), and a phase entered while serving one wake-up
 * carries the wake-up's stamp.
 *
 * Words are single aligned stores, so a reader never sees half of one; a row's words may come
 * from two neighbouring transitions (no lock on the hot path), which a report of "where it is"
 * can live with.
 */

/**
 * Bytes per row: 32 used, padded to two cache lines so no two threads ever store into the same
 * line. With 32-byte rows a vCPU and the device thread shared one, and every mailbox round trip
 * paid for the line moving between their CPUs (measured: about 200 ns more user time per
 * mailbox exit); the adjacent-line prefetcher pairs lines, hence two.
 */
export const ROW_BYTES = 128;
/** The part of a row in use. */
const ROW_USED = 32;
/** Int32 word indices inside a row. */
export const WORD = { STATE: 0, SEQ: 1, TID: 2 } as const;
/** Float64 indices inside a row (bytes 16-31). */
export const SLOT = { ADDR: 2, SINCE: 3 } as const;

/**
 * Phase codes, the one table: vCPU phases, then the device thread's. Names are what GET
 * /threads reports.
 */
export const PHASE = {
  none: 0,
  /** The thread is being created or loads its code. */
  starting: 1,
  /** vCPU: inside KVM_RUN (the guest runs, or halts in the kernel). */
  run: 2,
  /** vCPU: handling an exit in user space. */
  exit: 3,
  /** vCPU: parked (POST /pause). */
  paused: 4,
  /** The thread's loop has ended. */
  finished: 5,
  /** Device thread: waiting in poll(2) (1 s timeout). */
  poll: 6,
  /** Device thread: serving vCPU accesses from the mailbox (PCI config, BAR registers). */
  mailbox: 7,
  /** Device thread: a queue kick (device, queue). */
  notify: 8,
  /** Device thread: a back end's fd is readable (device): a TAP, a disk's I/O completions. */
  backend: 9,
  /** Device thread: serving a command from the main thread. */
  command: 10,
  /** Device thread: the once-a-second checks (I/O thread liveness, balloon statistics). */
  tick: 11,
  /** Device thread: shutting down (waits for disk I/O in flight). */
  stopping: 12,
} as const;
export type PhaseName = keyof typeof PHASE;
export type PhaseCode = (typeof PHASE)[PhaseName];

const NAMES: PhaseName[] = [];
for (const [name, code] of Object.entries(PHASE) as [PhaseName, PhaseCode][]) NAMES[code] = name;

/** The name of a phase code; "none" for a code the table does not have. */
export function phaseName(code: number): PhaseName {
  return NAMES[code] ?? "none";
}

/** The phases a vCPU enters per exit: never stamped (no clock on the hot path). */
export function isStamped(code: number): boolean {
  return code !== PHASE.run && code !== PHASE.exit;
}

const PHASE_MASK = 0xff;
const MAILBOX_BIT = 1 << 21;

/** A vCPU's state word. */
export function vcpuWord(phase: PhaseCode, reason = 0, write = false, size = 0): number {
  return phase | ((reason & 0xff) << 8) | (write ? 1 << 16 : 0) | ((size & 0xf) << 17);
}

/** The same word in another phase (run after an exit keeps the exit's details: the last one handled). */
export function withPhase(word: number, phase: PhaseCode): number {
  return (word & ~PHASE_MASK & ~MAILBOX_BIT) | phase;
}

/** The exit word, marked as waiting for the device thread's answer. */
export function withMailbox(word: number): number {
  return word | MAILBOX_BIT;
}

export interface VcpuWord {
  phase: PhaseName;
  /** KVM exit reason of the exit being handled (phase exit) or the last one handled. */
  reason: number;
  write: boolean;
  size: number;
  /** Waiting for the device thread to answer a PCI access. */
  mailbox: boolean;
}

export function decodeVcpuWord(word: number): VcpuWord {
  return {
    phase: phaseName(word & PHASE_MASK),
    reason: (word >>> 8) & 0xff,
    write: (word & (1 << 16)) !== 0,
    size: (word >>> 17) & 0xf,
    mailbox: (word & MAILBOX_BIT) !== 0,
  };
}

/** The device thread's state word. */
export function deviceWord(phase: PhaseCode, device = 0, queue = 0): number {
  return phase | ((device & 0xff) << 8) | ((queue & 0xffff) << 16);
}

export interface DeviceWord {
  phase: PhaseName;
  device: number;
  queue: number;
}

export function decodeDeviceWord(word: number): DeviceWord {
  return { phase: phaseName(word & PHASE_MASK), device: (word >>> 8) & 0xff, queue: (word >>> 16) & 0xffff };
}

/*
 * One monotonic clock for every thread, in ms: performance.now() counts from each thread's own
 * origin, so each thread's copy of this module pins its offset to process.hrtime (the process's
 * CLOCK_MONOTONIC) once; afterwards a stamp costs one performance.now() and no allocation.
 */
const CLOCK_BASE = Number(process.hrtime.bigint()) / 1e6 - performance.now();
export function clockMs(): number {
  return CLOCK_BASE + performance.now();
}

/** A board for `vcpus` vCPUs and the device thread, every row `starting` from now. */
export function createBoard(vcpus: number): SharedArrayBuffer {
  const sab = new SharedArrayBuffer((vcpus + 1) * ROW_BYTES);
  const now = clockMs();
  for (let r = 0; r <= vcpus; r++) {
    const row = boardRow(sab, r);
    row.f64[SLOT.SINCE] = now;
    row.i32[WORD.STATE] = r < vcpus ? vcpuWord(PHASE.starting) : deviceWord(PHASE.starting);
  }
  return sab;
}

/** Row of the device thread on a board made for `vcpus` vCPUs. */
export const deviceRow = (vcpus: number): number => vcpus;

/** A writer's (or reader's) views of one row. */
export interface BoardRow {
  i32: Int32Array;
  f64: Float64Array;
}

export function boardRow(sab: SharedArrayBuffer, row: number): BoardRow {
  return { i32: new Int32Array(sab, row * ROW_BYTES, ROW_USED / 4), f64: new Float64Array(sab, row * ROW_BYTES, ROW_USED / 8) };
}

/** Enter a stamped phase (not for the per-exit ones): the stamp first, so a reader never pairs the new word with the old stamp. */
export function enterStamped(row: BoardRow, word: number, now = clockMs()): void {
  row.f64[SLOT.SINCE] = now;
  Atomics.store(row.i32, WORD.STATE, word);
}

/** What a row holds right now. */
export interface RowSnapshot {
  word: number;
  seq: number;
  tid: number;
  addr: number;
  since: number;
}

export function readRow(row: BoardRow): RowSnapshot {
  return {
    word: Atomics.load(row.i32, WORD.STATE),
    seq: Atomics.load(row.i32, WORD.SEQ),
    tid: Atomics.load(row.i32, WORD.TID),
    addr: row.f64[SLOT.ADDR]!,
    since: row.f64[SLOT.SINCE]!,
  };
}

/**
 * How long something has shown the same state, from the reader's own observations: for the
 * phases nobody stamps (a vCPU's run/exit, a disk I/O thread's request). Each observation
 * passes the state word and a counter that moves with every transition (exits, completed
 * requests); the answer is the time since the pair was first seen unchanged, so it is a lower
 * bound, as fine as the observations are frequent (the VMM samples every SAMPLE_MS while the
 * threads move, less often while they do not: nextSampleMs).
 */
export class PhaseWatch {
  private readonly seen = new Map<string, { word: number; count: number; since: number }>();
  /** Observations that found a pair it had not seen (the sampler's cue to look again soon). */
  changes = 0;

  observe(key: string, word: number, count: number, now = clockMs()): number {
    const last = this.seen.get(key);
    if (last !== undefined && last.word === word && last.count === count) return Math.max(0, now - last.since);
    this.seen.set(key, { word, count, since: now });
    this.changes++;
    return 0;
  }

  forget(): void {
    this.seen.clear();
  }
}

/** How often the VMM's main thread observes the board for PhaseWatch while something moves. */
export const SAMPLE_MS = 250;
/** The longest wait between two observations, reached while nothing moves (an idle guest). */
export const SAMPLE_MAX_MS = 8000;

/**
 * The wait before the next observation: SAMPLE_MS after one that saw a change, twice the last
 * wait (up to SAMPLE_MAX_MS) after one that saw none. An idle VMM then wakes its main thread
 * about once in 8 s instead of four times a second: each wake is a timer, a few objects and, in
 * time, a young-generation collection, which an emulated CPU (the KVM lab) pays ~1 ms of CPU
 * for, times every idle VMM on the host (docs/benchmarks.md). A phase that starts while the wait
 * is long is first seen up to SAMPLE_MAX_MS late, so its time is a lower bound by that much more;
 * GET /threads observes when asked, so a report's time covers at least its own wait.
 */
export function nextSampleMs(lastMs: number, changed: boolean): number {
  return changed ? SAMPLE_MS : Math.min(SAMPLE_MAX_MS, Math.max(SAMPLE_MS, lastMs * 2));
}
