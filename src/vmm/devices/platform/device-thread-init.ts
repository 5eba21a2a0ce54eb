/**
 * What the VMM hands its device thread, and what the two say to each other. The device thread
 * owns the PCI bus, the virtio transports and device back ends; it sees guest memory through
 * its own view of the same mapping. Commands and their answers are one typed union each side
 * shares (DeviceRequest, DeviceReplies).
 */
import type { DeviceSpecs } from "../../device-specs.js";
import type { HostRegion } from "../../memory/guest-memory.js";
import type { BalloonCounters, BalloonStats } from "../virtio/balloon/balloon.js";
import type { BlockStats } from "../virtio/block/block.js";
import type { NetStats } from "../virtio/net/net.js";
import type { VirtioPciInspect } from "../virtio/pci/transport.js";
import type { DevicesState } from "./snapshot.js";
import type { IoTotals } from "../../stats/layout.js";
import type { StatsPageRef } from "../../stats/page.js";

export type { DevicesState } from "./snapshot.js";

export interface DeviceThreadInit {
  vmFd: number;
  /** Guest RAM: each region's host mapping (the VMM keeps them mapped while this thread runs). */
  memory: HostRegion[];
  /** vCPU -> device thread synchronous accesses (mailbox.ts). */
  mailbox: SharedArrayBuffer;
  /** Signalled by vCPUs (mailbox requests) and by the VMM (stop). */
  eventfd: number;
  vcpus: number;
  devices: DeviceSpecs;
  /** Int32 slot 0: 1 = stop. */
  control: SharedArrayBuffer;
  /** The thread board (threads/board.ts); this thread publishes its phase in row `deviceRow(vcpus)`. */
  board: SharedArrayBuffer;
  /**
   * The VMM's stats page (stats/page.ts), mapped by the main thread for the process's lifetime:
   * disk `i` and NIC `i` count into its slots `i` (set up, and zeroed, by the main thread first).
   */
  statsPage: StatsPageRef;
  /** Accept the debug.* commands (tests of a device thread that does not answer). */
  debugCommands?: boolean;
  /**
   * Restore from a snapshot: the devices are built from `devices` as always (back ends, MAC, CID
   * from there), then this state (checked again with parseDevicesState) is put back before
   * "ready"; a snapshot of other devices is an "error" message with code SNAPSHOT_MISMATCH, a
   * state that does not fit them SNAPSHOT_INVALID. Start the thread only after the irqchip and
   * every vCPU's LAPIC are restored: restoring raises interrupts (snapshot.ts restoreDevices).
   */
  restore?: DevicesState;
  /**
   * Build the devices and open their back ends but leave their state for a later "restore"
   * command: an incoming migration starts this thread while memory is still arriving, so the
   * thread's start-up is not part of the guest's pause.
   */
  deferRestore?: boolean;
  /**
   * A DirtyLog's buffer (memory/guest-memory.ts): when given, every guest page this thread's
   * devices write is marked in it (the VMM's half of live migration's dirty tracking; KVM's log has
   * the vCPUs' half). Absent: no tracking, no cost.
   */
  dirtyLog?: SharedArrayBuffer;
}

/** Disk and network traffic summed over the VM's virtio devices (counted by the back ends into the stats page). */
export type { IoTotals } from "../../stats/layout.js";

export interface IoStats extends IoTotals {
  disks: ({ name: string } & BlockStats)[];
  nets: ({ name: string } & NetStats)[];
}

/** A device on the PCI bus as GET /devices shows it. */
export interface PciDeviceSummary {
  name: string;
  slot: number;
  status: number;
  needsReset: string | null;
}

export interface BalloonReport extends BalloonStats {
  targetPages: number;
  actualPages: number;
  counters: BalloonCounters;
}

/** The device thread's own answer for GET /threads: every device's transport and queues, and each disk's I/O thread as it sees it. */
export interface DeviceThreadReport {
  devices: ({ name: string; slot: number } & VirtioPciInspect)[];
  disks: { name: string; ioThread: BlockStats["ioThread"]; inFlight: number }[];
}

/** What the main thread can ask of the device thread. */
export type DeviceRequest =
  | { command: "devices" }
  | { command: "threads" }
  | { command: "balloon.setTarget"; args: { pages: number } }
  | { command: "balloon.requestStats" }
  | { command: "balloon.stats" }
  /** Space was freed: every disk stopped by a full filesystem runs its held requests again (BlockDevice.retryHeld). */
  | { command: "disks.retry" }
  /** Start (a DirtyLog's buffer) or stop (null) marking the pages the devices write: live migration. */
  | { command: "dirtyLog"; args: { buffer: SharedArrayBuffer | null } }
  /**
   * Quiesce and save every device (snapshot.ts saveDevices); only while every vCPU is paused.
   * Kicks already signalled are served, disk requests in flight are completed into the used
   * rings; the devices keep working afterwards (the VM may resume).
   */
  | { command: "snapshot" }
  /**
   * An incoming migration's devices (started with `deferRestore` while the memory streamed in):
   * put this state back now (checked with parseDevicesState, as `restore` is); once only, after
   * the irqchip and every vCPU's LAPIC are restored.
   */
  | { command: "restore"; args: { state: unknown } }
  /**
   * A live migration copying the disks: start (one DirtyBlocks buffer per disk, in --disk order)
   * or stop (null) marking the blocks each disk's writes change (disk/dirty-blocks.ts).
   */
  | { command: "disks.dirtyLog"; args: { buffers: SharedArrayBuffer[] | null } }
  /**
   * A live migration on shared storage, source side, guest paused: every disk's completed
   * writes and cached metadata on stable storage now (BlockDevice.flushNow). Fails (DISK_IO,
   * naming the disks) when any disk could not.
   */
  | { command: "disks.flush" }
  /**
   * An incoming live migration on shared storage, before its guest runs: every qcow2 disk reads
   * its metadata again, as the source left it (BlockDevice.reopen). Fails as disks.flush does.
   */
  | { command: "disks.reopen" }
  /** Block the device thread for `ms` (only with DeviceThreadInit.debugCommands): a stuck device thread, for tests. */
  | { command: "debug.stall"; args: { ms: number } };

/** The answer to each request. */
export interface DeviceReplies {
  devices: PciDeviceSummary[];
  threads: DeviceThreadReport;
  "balloon.setTarget": BalloonReport;
  "balloon.requestStats": { requested: boolean };
  "balloon.stats": BalloonReport;
  "disks.retry": { held: number };
  dirtyLog: { on: boolean };
  restore: { restored: true };
  "disks.dirtyLog": { disks: number };
  "disks.flush": { disks: number };
  "disks.reopen": { disks: number };
  snapshot: DevicesState;
  "debug.stall": { stalledMs: number };
}

export type DeviceCommandName = DeviceRequest["command"];

/** A request from the VMM main thread (posted, then the eventfd is signalled so poll wakes up). */
export type DeviceCommand = DeviceRequest & { type: "command"; id: number };

/** A disk as the device thread reports it at start-up: its I/O thread's shared ring, if it has one. */
export interface DiskThreadInfo {
  name: string;
  ioThread: { name: string; ring: SharedArrayBuffer } | null;
}

export type DeviceThreadMessage =
  /** `nets`: the NICs' names in order (NIC `i` counts into the stats page's slot `i`; disks likewise in `disks`). */
  | { type: "ready"; devices: string[]; disks: DiskThreadInfo[]; nets: string[] }
  | { type: "reply"; id: number; ok: true; result: DeviceReplies[DeviceCommandName] }
  | { type: "reply"; id: number; ok: false; code: string; message: string }
  | { type: "error"; code: string; message: string }
  /** A disk stopped because its host filesystem is full (BlockDeviceOptions.onNoSpace): the VMM pauses the vCPUs. */
  | { type: "no-space"; disk: number; path: string; errno: string; op: string }
  | { type: "warning"; message: string };
