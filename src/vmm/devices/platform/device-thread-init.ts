/**
 * What the VMM hands its device thread, and what the thread says back. The
 * device thread owns the PCI bus, the virtio transports and device back ends;
 * it sees guest memory through its own view of the same mapping.
 */
import type { DeviceSpecs } from "../../device-specs.js";
import type { MemoryRegionSpec } from "../../memory/guest-memory.js";

export interface DeviceThreadInit {
  vmFd: number;
  memory: { address: bigint; length: number; layout: MemoryRegionSpec[] };
  /** vCPU -> device thread synchronous accesses (mailbox.ts). */
  mailbox: SharedArrayBuffer;
  /** Signalled by vCPUs (mailbox requests) and by the VMM (stop). */
  eventfd: number;
  vcpus: number;
  devices: DeviceSpecs;
  /** Int32 slot 0: 1 = stop. */
  control: SharedArrayBuffer;
}

/** A request from the VMM main thread (posted, then the eventfd is signalled so poll wakes up). */
export interface DeviceCommand {
  type: "command";
  id: number;
  /** "stats" (every device's counters), or a device-specific verb such as "balloon.setTarget". */
  command: string;
  args?: unknown;
}

export type DeviceThreadMessage =
  | { type: "ready"; devices: string[] }
  | { type: "reply"; id: number; ok: true; result: unknown }
  | { type: "reply"; id: number; ok: false; code: string; message: string }
  | { type: "error"; code: string; message: string }
  | { type: "warning"; message: string };
