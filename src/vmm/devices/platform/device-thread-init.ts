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

export type DeviceThreadMessage =
  | { type: "ready"; devices: string[] }
  | { type: "error"; code: string; message: string }
  | { type: "warning"; message: string };
