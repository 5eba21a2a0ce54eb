/**
 * A VMM's stats page in memory (layout.ts): mapped once per process by the main thread, from the
 * file `run --stats-file` names (MAP_SHARED, so whoever reads the file reads these counters) or,
 * without one, anonymous memory. Threads that count into it (the device thread) map a view of
 * the same address; nothing else is shared, and no write to it is a system call.
 */
import { closeSync, constants, fstatSync, ftruncateSync, openSync, writeSync } from "node:fs";
import { TypevisorError } from "../../errors.js";
import * as libc from "../../sys/libc.js";
import { DISK_SLOT, diskSlot, HEADER, MAX_DISKS, MAX_NICS, NIC_SLOT, nicSlot, readStatsPage, STARTED_AT, STATS_MAGIC, STATS_PAGE_BYTES, STATS_VERSION, type StatsReading } from "./layout.js";

/** Where a page lives, as a thread is told (posted to a worker). */
export interface StatsPageRef {
  address: bigint;
}

export class StatsPage {
  readonly u32: Uint32Array;
  readonly f64: Float64Array;

  private constructor(readonly ref: StatsPageRef) {
    // Safe: the mapping is STATS_PAGE_BYTES long and never unmapped while the process lives
    // (create; backWith replaces it in place), so a view of it on any thread stays valid.
    const buf = libc.view(libc.pointerAt(ref.address), STATS_PAGE_BYTES);
    this.u32 = new Uint32Array(buf);
    this.f64 = new Float64Array(buf);
  }

  /** The page at `ref`, mapped by this process's main thread (create). */
  static attach(ref: StatsPageRef): StatsPage {
    return new StatsPage(ref);
  }

  /** A new page of anonymous shared memory (zeros), mapped for the rest of the process's life. */
  static create(): StatsPage {
    const m = libc.mmap(STATS_PAGE_BYTES, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED | libc.MAP_ANONYMOUS);
    return new StatsPage({ address: m.address });
  }

  /**
   * From now on the page is the file `path` (created if missing, 0600; not a symlink; a regular
   * file), so whoever reads the file reads these counters: the file is emptied, given the page's
   * current bytes, and mapped MAP_SHARED over the page's own address in one mmap(2) (MAP_FIXED),
   * so every thread's view of the page stays valid and now writes to the file. Counts made
   * between the copy and the mapping would be lost: this is done before the VM runs (`run`, or a
   * standby's PUT /restore). Nothing shrinks the file afterwards (its owner gave it to this VMM
   * alone), so no access to the mapping falls past its end (SIGBUS).
   */
  backWith(path: string): void {
    let fd: number;
    try {
      fd = openSync(path, constants.O_RDWR | constants.O_CREAT | constants.O_NOFOLLOW | constants.O_NONBLOCK, 0o600);
    } catch (e) {
      throw new TypevisorError("INVALID_ARGUMENT", `--stats-file ${path}: ${(e as Error).message}`);
    }
    try {
      if (!fstatSync(fd).isFile()) throw new TypevisorError("INVALID_ARGUMENT", `--stats-file ${path} is not a regular file`);
      // Emptied first: a page left by an earlier VMM must not show its counters as ours.
      ftruncateSync(fd, 0);
      writeSync(fd, new Uint8Array(this.u32.buffer, this.u32.byteOffset, STATS_PAGE_BYTES), 0, STATS_PAGE_BYTES, 0);
      // Safe: [address, +STATS_PAGE_BYTES) is this page's own mapping (create), replaced whole.
      libc.mmapFixed(this.ref.address, STATS_PAGE_BYTES, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, fd, 0);
    } finally {
      closeSync(fd); // the mapping keeps the file
    }
  }

  /**
   * Say how many disks and NICs count into the page, and mark it set up (the magic last: a
   * reader takes a page without it as not yet there). Their counters start at 0.
   */
  setDevices(disks: number, nics: number): void {
    if (disks > MAX_DISKS || nics > MAX_NICS) throw new TypevisorError("INVALID_ARGUMENT", `the stats page counts at most ${MAX_DISKS} disks and ${MAX_NICS} NICs`);
    this.f64.fill(0, diskSlot(0), nicSlot(MAX_NICS));
    this.u32[HEADER.VERSION] = STATS_VERSION;
    this.u32[HEADER.DISKS] = disks;
    this.u32[HEADER.NICS] = nics;
    Atomics.store(this.u32, HEADER.MAGIC, STATS_MAGIC);
  }

  /** Disk `i`'s counters (DISK indices), a view into the page. */
  disk(i: number): Float64Array {
    if (i >= MAX_DISKS) throw new TypevisorError("INVALID_ARGUMENT", `the stats page counts at most ${MAX_DISKS} disks`);
    return this.f64.subarray(diskSlot(i), diskSlot(i) + DISK_SLOT);
  }

  /** NIC `i`'s counters (NIC indices), a view into the page. */
  nic(i: number): Float64Array {
    if (i >= MAX_NICS) throw new TypevisorError("INVALID_ARGUMENT", `the stats page counts at most ${MAX_NICS} NICs`);
    return this.f64.subarray(nicSlot(i), nicSlot(i) + NIC_SLOT);
  }

  setStartedAt(ms: number): void {
    this.f64[STARTED_AT] = ms;
  }

  /** Something a supervisor watches changed (the VM's state, console output being dropped): count it (HEADER.CHANGES). */
  noteChange(): void {
    Atomics.add(this.u32, HEADER.CHANGES, 1);
  }

  read(): StatsReading | undefined {
    return readStatsPage(this.u32, this.f64);
  }
}

let processPage: StatsPage | undefined;

/** This process's page (a VMM process has one: its VM's, across the guest's reboots), made on first use. */
export function processStatsPage(): StatsPage {
  processPage ??= StatsPage.create();
  return processPage;
}
