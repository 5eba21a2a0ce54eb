/**
 * parseDevicesState: the schema a snapshot's device state (snapshot.ts DevicesState) must pass
 * before anything is built from it. Apart from snapshot.ts because it needs zod, which a device
 * thread loads only when it restores (snapshot/state-file.ts says what zod costs per isolate).
 */
import { z } from "zod";
import { TypevisorError } from "../../../errors.js";
import { MSIX_MAX_VECTORS } from "../pci/msix.js";
import { PCI_SLOTS } from "../pci/bus.js";
import { PCI_CONFIG_SIZE } from "../pci/config-space.js";
import type { BalloonDeviceState } from "../virtio/balloon/balloon.js";
import type { BlockDeviceState } from "../virtio/block/block.js";
import { MAX_FRAME, VNET_HDR_LEN, type NetDeviceState } from "../virtio/net/net.js";
import { MAX_QUEUE_SIZE, type VirtioPciState } from "../virtio/pci/transport.js";
import type { SplitQueueState } from "../virtio/queue/split-queue.js";
import type { RngDeviceState } from "../virtio/rng/rng.js";
import type { VsockDeviceState } from "../virtio/vsock/vsock.js";
import type { DevicesState } from "./snapshot.js";

// Every bound is the architectural one (or what the device model can hold), so a state
// this VMM saved always passes, and nothing unbounded gets through.

const int = (min: number, max: number) => z.number().int().min(min).max(max);
const u8 = int(0, 0xff);
const u16 = int(0, 0xffff);
const u32 = int(0, 0xffff_ffff);
/** A guest-physical address or any other 64-bit register, as "0x..." (exact: never a JS number). */
const hex64 = z.string().regex(/^0x[0-9a-f]{1,16}$/, "is not a 64-bit hex value (0x...)");
/** Device states write features as bare hex. */
const hexFeatures = z.string().regex(/^[0-9a-f]{1,16}$/, "is not a 64-bit hex value");
/** Base64 of at most `max` bytes (the exact length is checked where the bytes are used). */
const base64 = (max: number) =>
  z
    .string()
    .max(Math.ceil(max / 3) * 4)
    .regex(/^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/, "is not base64");
/** A guest-physical address held as a Number by the device models: exact below 2^53. */
const gpa = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);

/** virtio-pci supports at most 1024 queues (one notify address each in a 4 KiB page, transport.ts). */
const MAX_QUEUES = 1024;

const msixSchema = z.strictObject({
  enabled: z.boolean(),
  functionMasked: z.boolean(),
  table: z.array(u32).max(MSIX_MAX_VECTORS * 4),
  pending: z.array(int(0, 1)).max(MSIX_MAX_VECTORS),
});

const transportSchema = z.strictObject({
  status: u8,
  deviceFeatureSelect: u32,
  driverFeatureSelect: u32,
  driverFeatures: hex64,
  configMsixVector: u16,
  configGeneration: u8,
  queueSelect: u16,
  isr: int(0, 3),
  queues: z.array(z.strictObject({ size: u16, msixVector: u16, enabled: z.boolean(), desc: hex64, driver: hex64, device: hex64 })).max(MAX_QUEUES),
  msix: msixSchema,
  config: base64(PCI_CONFIG_SIZE),
}) satisfies z.ZodType<VirtioPciState>;

const queueStateSchema = z.strictObject({
  config: z.strictObject({ size: int(1, MAX_QUEUE_SIZE), descAddr: gpa, driverAddr: gpa, deviceAddr: gpa }),
  nextAvail: u16,
  nextUsed: u16,
}) satisfies z.ZodType<SplitQueueState>;

/** Every device here has at most 3 queues; 8 leaves room without leaving it unbounded. */
const queuesSchema = z.array(queueStateSchema.nullable()).max(8);
const common = { version: z.literal(1), features: hexFeatures, activated: z.boolean(), queues: queuesSchema };

const blockSchema = z.strictObject(common) satisfies z.ZodType<BlockDeviceState>;
const rngSchema = z.strictObject(common) satisfies z.ZodType<RngDeviceState>;
const netSchema = z.strictObject({ ...common, stash: base64(VNET_HDR_LEN + MAX_FRAME).optional() }) satisfies z.ZodType<NetDeviceState>;
const vsockSchema = z.strictObject({ ...common, guestCid: u32, udsPath: z.string().max(4096), openConnections: int(0, 1 << 20) }) satisfies z.ZodType<VsockDeviceState>;
const balloonSchema = z.strictObject({
  ...common,
  numPages: u32,
  actual: u32,
  stats: z.strictObject({
    updatedAt: z.number().min(0).max(Number.MAX_SAFE_INTEGER),
    values: z.record(z.string().max(64), z.number().finite()).refine((v) => Object.keys(v).length <= 64, "has more than 64 statistics"),
  }),
}) satisfies z.ZodType<BalloonDeviceState>;

const entry = { name: z.string().max(4096), slot: int(1, PCI_SLOTS - 1), transport: transportSchema };

const devicesStateSchema = z.strictObject({
  version: z.literal(1),
  bus: z.strictObject({ configAddress: u32, hostBridge: base64(PCI_CONFIG_SIZE) }),
  devices: z
    .array(
      z.discriminatedUnion("kind", [
        z.strictObject({ ...entry, kind: z.literal("block"), device: blockSchema }),
        z.strictObject({ ...entry, kind: z.literal("net"), device: netSchema }),
        z.strictObject({ ...entry, kind: z.literal("rng"), device: rngSchema }),
        z.strictObject({ ...entry, kind: z.literal("vsock"), device: vsockSchema }),
        z.strictObject({ ...entry, kind: z.literal("balloon"), device: balloonSchema }),
      ]),
    )
    .max(PCI_SLOTS - 1),
}) satisfies z.ZodType<DevicesState>;

/**
 * Check that `x` (decoded JSON from a snapshot) is a DevicesState: shape, ranges, lengths.
 * @throws TypevisorError SNAPSHOT_INVALID naming the first field that is wrong
 */
export function parseDevicesState(x: unknown): DevicesState {
  const r = devicesStateSchema.safeParse(x);
  if (!r.success) {
    const first = r.error.issues[0];
    const where = first === undefined || first.path.length === 0 ? "" : ` at ${first.path.map(String).join(".")}`;
    throw new TypevisorError("SNAPSHOT_INVALID", `the snapshot's device state is invalid${where}: ${first?.message ?? "does not match the schema"}`);
  }
  return r.data as DevicesState;
}
