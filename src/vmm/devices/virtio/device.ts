import type { GuestMemory } from "../../memory/guest-memory.js";

/** Device types (virtio 1.2 §5). */
export const VIRTIO_ID = { NET: 1, BLOCK: 2, CONSOLE: 3, RNG: 4, BALLOON: 5, VSOCK: 19 } as const;

/** Feature bits common to all devices (virtio 1.2 §6). */
export const VIRTIO_F = { INDIRECT_DESC: 28, EVENT_IDX: 29, VERSION_1: 32, ACCESS_PLATFORM: 33, RING_PACKED: 34 } as const;

/** Where the driver placed one queue (plain data; what a snapshot saves). */
export interface QueueConfig {
  size: number;
  descAddr: number;
  driverAddr: number;
  deviceAddr: number;
}

/**
 * Where one queue stands, for a report of a stalled VM (GET /threads): the device's cursors and
 * the indices and suppression fields as they are in guest memory now. Reading it changes nothing.
 */
export interface QueueInspect {
  /** The device's next available index: the next entry it will pop. */
  nextAvail: number;
  /** The driver's avail idx in guest memory: `availIdx - nextAvail` entries wait for the device. */
  availIdx: number;
  /** Available entries not yet taken (mod 2^16; over `size` means a corrupt idx). */
  waiting: number;
  /** The used idx in guest memory (the device's own `nextUsed` unless the guest wrote over it). */
  usedIdx: number;
  nextUsed: number;
  /** The used idx when the device last decided whether to interrupt (needsInterrupt). */
  signalledUsed: number;
  /** VIRTIO_F_EVENT_IDX negotiated: the event fields below count, the flags do not. */
  eventIdx: boolean;
  /** The driver's avail flags: bit 0 asks for no used-buffer interrupts (without EVENT_IDX). */
  availFlags: number;
  /** EVENT_IDX: the driver wants an interrupt once the used idx passes this. */
  usedEvent: number | null;
  /** EVENT_IDX: the device wants a kick once the avail idx passes this. */
  availEvent: number | null;
  /**
   * Whether the driver has asked for no interrupt for the next used buffer: without EVENT_IDX,
   * its NO_INTERRUPT flag; with it, used_event lies behind the used idx already pushed (the next
   * push would not cross it unless the driver moves it).
   */
  interruptsSuppressed: boolean;
  /** The sticky error once the driver broke the rules, else null. */
  broken: string | null;
  /**
   * Buffers the device took from this queue (non-empty, since the queue was built) that lie at or
   * above 4 GiB: where a guest with more memory than the 32-bit space puts them (Linux allocates
   * from ZONE_NORMAL, above 4 GiB, first). Shows that I/O reaches guest RAM above the MMIO hole.
   */
  highBuffers: number;
}

/** What a device tells of itself for GET /threads (plain data). */
export interface VirtioDeviceInspect {
  /** Index = queue number; null for a queue the device has not built (not enabled, or not activated). */
  queues: (QueueInspect | null)[];
  /** Requests taken from the rings and not answered yet (a disk's requests on its I/O thread). */
  inFlight?: number;
}

/** What the transport gives a device when the driver sets DRIVER_OK. */
export interface ActivateContext {
  mem: GuestMemory;
  /** Index = queue number; only enabled queues are present (others have size 0). */
  queues: QueueConfig[];
  /** Negotiated features. */
  features: bigint;
  /** Raise the used-buffer interrupt for queue `q` (the transport maps it to the MSI-X vector). */
  interruptQueue(q: number): void;
  /** Raise the configuration-change interrupt. */
  interruptConfig(): void;
  /** The device found the driver broke the rules: the transport sets DEVICE_NEEDS_RESET (virtio 1.2 §2.1.2) and notifies. */
  needsReset(reason: string): void;
}

export interface VirtioDevice {
  readonly deviceType: number;
  /** Maximum size of each queue; its length is the number of queues. */
  readonly queueMaxSizes: readonly number[];
  /** Features the device offers (include VIRTIO_F.VERSION_1). */
  readonly features: bigint;
  /** Device-specific configuration space (virtio 1.2 §4.1.4.6): read `size` (1,2,4,8) bytes at `offset`; out of range reads 0. */
  readConfig(offset: number, size: number): bigint;
  writeConfig(offset: number, size: number, value: bigint): void;
  /** Length of the config space in bytes. */
  readonly configSize: number;
  activate(ctx: ActivateContext): void;
  /** The driver notified queue `q` (available buffers). Process what is there; never throw. */
  notify(q: number): void;
  /** Device reset by the driver (status 0): drop queue state, keep backing resources. */
  reset(): void;
  /** Plain serializable state for snapshots. */
  save(): unknown;
  /**
   * Host fds the device thread polls for readability (e.g. a TAP fd), each
   * only while backendWanted(fd) is not false: poll is level-triggered, so an
   * fd whose data the device cannot take yet would make it spin.
   */
  readonly backendFds?: readonly number[];
  /** False while the device cannot take input from `fd` (no guest buffers): the device thread leaves it out of poll. */
  backendWanted?(fd: number): boolean;
  /** Called on the device thread when one of backendFds is readable. Never throws. */
  onBackendReadable?(fd: number): void;
  /** Where the device's queues stand (GET /threads); reads, changes nothing. */
  inspect?(): VirtioDeviceInspect;
}

/**
 * A little-endian read of `size` (1, 2, 4, 8) bytes at `offset` of a device's
 * config space held as bytes (virtio 1.2 §4.1.4.6); anything out of range or
 * oddly sized reads 0 rather than throwing.
 */
export function readConfigBytes(config: Uint8Array, offset: number, size: number): bigint {
  if (![1, 2, 4, 8].includes(size) || !Number.isInteger(offset) || offset < 0 || offset + size > config.length) return 0n;
  let v = 0n;
  for (let i = size - 1; i >= 0; i--) v = (v << 8n) | BigInt(config[offset + i] ?? 0);
  return v;
}

/** `1n << BigInt(bit)`: a feature bit as a mask. */
export function featureBit(bit: number): bigint {
  return 1n << BigInt(bit);
}

/** True when `bit` is set in `features`. */
export function hasFeature(features: bigint, bit: number): boolean {
  return (features & featureBit(bit)) !== 0n;
}
