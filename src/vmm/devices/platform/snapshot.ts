/**
 * The device thread's part of a VM snapshot: the PCI bus, and for every virtio device its
 * virtio-pci transport (PCI configuration space, MSI-X table and PBA, common configuration and
 * queue registers) and its device state (queue cursors and what the device keeps of its own).
 *
 * A snapshot file is hostile input. parseDevicesState checks its shape with a schema (every
 * number's range, every array's and string's length) before anything is built from it;
 * restoreDevices then checks it against the devices built from this VMM's DeviceSpecs (same
 * kinds in the same slots, queue counts, MSI-X table sizes, features the device offers, queue
 * rings inside guest RAM) before it changes any of them. What survives both checks is only state
 * a guest could have brought about itself with its own register writes, so a crafted snapshot
 * can confuse nothing but that guest.
 *
 * Back ends are not in the snapshot: disk paths, TAP names, the MAC, the vsock CID and socket
 * come from the DeviceSpecs given at restore, so a clone can get its own.
 */
import { TypevisorError } from "../../../errors.js";
import type { PciBus, PciBusState } from "../pci/bus.js";
import { PCI_CONFIG_SIZE } from "../pci/config-space.js";
import { BalloonDevice, type BalloonDeviceState } from "../virtio/balloon/balloon.js";
import { BlockDevice, type BlockDeviceState } from "../virtio/block/block.js";
import type { ActivateContext } from "../virtio/device.js";
import { NetDevice, VNET_HDR_LEN, type NetDeviceState } from "../virtio/net/net.js";
import { VIRTIO_STATUS } from "../virtio/pci/caps.js";
import type { VirtioPciDevice, VirtioPciState } from "../virtio/pci/transport.js";
import { RngDevice, type RngDeviceState } from "../virtio/rng/rng.js";
import { VsockDevice, type VsockDeviceState } from "../virtio/vsock/vsock.js";

export type DeviceKind = "block" | "net" | "rng" | "vsock" | "balloon";

/** One device of a DevicesState, its `device` typed by `kind`. */
export type DeviceSnapshot = { name: string; slot: number; transport: VirtioPciState } & (
  | { kind: "block"; device: BlockDeviceState }
  | { kind: "net"; device: NetDeviceState }
  | { kind: "rng"; device: RngDeviceState }
  | { kind: "vsock"; device: VsockDeviceState }
  | { kind: "balloon"; device: BalloonDeviceState }
);

/**
 * Everything the device thread owns, as plain JSON (64-bit values as hex strings, byte images as
 * base64): what the "snapshot" command answers and DeviceThreadInit.restore takes back.
 */
export interface DevicesState {
  version: 1;
  bus: PciBusState;
  /** In plug order (the order DeviceSpecs lists them: disks, nets, rng, vsock, balloon). */
  devices: DeviceSnapshot[];
}

/** A device as the device thread plugged it: what saveDevices and restoreDevices work on. */
export interface PluggedDevice {
  name: string;
  kind: DeviceKind;
  slot: number;
  transport: VirtioPciDevice;
}

// The schemas that check a state before restoreDevices sees it are in snapshot-schema.ts
// (parseDevicesState), which loads zod: a device thread that never restores does not.

// ---------------------------------------------------------------------------------------------
// Save and restore.

/**
 * Every device's state, then the bus's. Each device saves before its transport: a disk answers
 * its requests in flight first (BlockDevice.save), which can raise an MSI-X vector or set its
 * pending bit, and the transport's state must include that. The caller quiesces first (vCPUs
 * paused, queue kicks served).
 * @throws TypevisorError DISK_HELD when a disk holds requests for space (BlockDevice.save)
 */
export function saveDevices(plugged: readonly PluggedDevice[], bus: PciBus): DevicesState {
  const devices = plugged.map((p): DeviceSnapshot => {
    const base = { name: p.name, slot: p.slot };
    const dev = p.transport.device;
    if (p.kind === "block" && dev instanceof BlockDevice) return { ...base, kind: "block", device: dev.save(), transport: p.transport.save() };
    if (p.kind === "net" && dev instanceof NetDevice) return { ...base, kind: "net", device: dev.save(), transport: p.transport.save() };
    if (p.kind === "rng" && dev instanceof RngDevice) return { ...base, kind: "rng", device: dev.save(), transport: p.transport.save() };
    if (p.kind === "vsock" && dev instanceof VsockDevice) return { ...base, kind: "vsock", device: dev.save(), transport: p.transport.save() };
    if (p.kind === "balloon" && dev instanceof BalloonDevice) return { ...base, kind: "balloon", device: dev.save(), transport: p.transport.save() };
    throw new TypevisorError("SNAPSHOT_DEVICE", `device ${p.name} is not a ${p.kind} device`);
  });
  return { version: 1, bus: bus.save(), devices };
}

const live = (status: number): boolean => (status & (VIRTIO_STATUS.DRIVER_OK | VIRTIO_STATUS.DEVICE_NEEDS_RESET)) === VIRTIO_STATUS.DRIVER_OK;

/** Why `s` does not fit the device `p` (already known to be of the same kind and slot), or undefined. */
function deviceProblem(p: PluggedDevice, s: DeviceSnapshot): string | undefined {
  const t = p.transport.restoreProblem(s.transport);
  if (t !== undefined) return t;
  const dev = p.transport.device;
  const d = s.device;
  if (d.queues.length > dev.queueMaxSizes.length) return `${d.queues.length} device queues saved, the device has ${dev.queueMaxSizes.length}`;
  if (live(s.transport.status)) {
    // The driver set DRIVER_OK and the device served it: the device must have been activated.
    if (!d.activated) return "the transport is live (DRIVER_OK) but the device was not activated";
    for (const [i, q] of d.queues.entries()) {
      if (q === null) continue;
      // The device's queue must be the one the transport registers describe (what restore hands it).
      const r = s.transport.queues[i]!;
      if (!r.enabled || q.config.size !== r.size || BigInt(q.config.descAddr) !== BigInt(r.desc) || BigInt(q.config.driverAddr) !== BigInt(r.driver) || BigInt(q.config.deviceAddr) !== BigInt(r.device)) {
        return `queue ${i}: the device's ring does not match the transport's queue registers`;
      }
    }
  }
  if (s.kind === "balloon" && dev instanceof BalloonDevice && s.device.numPages > dev.maxPages) return `balloon target ${s.device.numPages} pages exceeds guest RAM (${dev.maxPages} pages)`;
  if (s.kind === "net" && s.device.stash !== undefined && Buffer.from(s.device.stash, "base64").length < VNET_HDR_LEN) return "the saved receive frame is shorter than its virtio_net_hdr";
  return undefined;
}

/** Hand `s.device` to the device's own restore (its kind was checked against the plugged device). */
function restoreDevice(p: PluggedDevice, s: DeviceSnapshot, ctx: ActivateContext): void {
  const dev = p.transport.device;
  if (s.kind === "block" && dev instanceof BlockDevice) dev.restore(ctx, s.device);
  else if (s.kind === "net" && dev instanceof NetDevice) dev.restore(ctx, s.device);
  else if (s.kind === "rng" && dev instanceof RngDevice) dev.restore(ctx, s.device);
  else if (s.kind === "vsock" && dev instanceof VsockDevice) dev.restore(ctx, s.device);
  else if (s.kind === "balloon" && dev instanceof BalloonDevice) dev.restore(ctx, s.device);
  else throw new TypevisorError("SNAPSHOT_MISMATCH", `device ${p.name} is not a ${s.kind} device`);
}

/**
 * Put `state` (from parseDevicesState) back into the devices built from this VMM's specs, on
 * `bus`. First everything is checked (SNAPSHOT_MISMATCH: not the same devices in the same
 * slots; SNAPSHOT_INVALID: a state that does not fit its device), then each transport is
 * restored, handing live devices their state instead of activating them, and last the bus,
 * whose decode rebuild moves the BARs (and with them, through its listeners, the ioeventfds)
 * to where the guest had programmed them.
 *
 * `step`, when given, is told as each step ends (the VMM's phase trace).
 *
 * Last, each live device's enabled queues are looked at once (VirtioPciTransport
 * serveRestoredQueues); restoreDevicesThen leaves that to the function it returns, for a caller
 * that answers first (a migration's destination: device-thread.ts "restore").
 *
 * Restoring can raise interrupts (virtio-net's announce request, vsock's TRANSPORT_RESET event,
 * queues with work already published): the interrupt controller and every vCPU's LAPIC must be
 * restored before this runs, or the messages are lost.
 */
export function restoreDevices(plugged: readonly PluggedDevice[], bus: PciBus, state: DevicesState, step?: (done: string) => void): void {
  restoreDevicesThen(plugged, bus, state, step)();
}

/** restoreDevices without the queues' first look: the returned function does it (call it once, soon). */
export function restoreDevicesThen(plugged: readonly PluggedDevice[], bus: PciBus, state: DevicesState, step?: (done: string) => void): () => void {
  const mismatch = (m: string): TypevisorError =>
    new TypevisorError("SNAPSHOT_MISMATCH", `the snapshot's devices do not match this VM's: ${m}`, { hint: "restore with the same kinds and number of disks, NICs, rng, vsock and balloon as the snapshotted VM" });
  const want = state.devices.map((d) => `${d.kind}@${d.slot}`).join(", ");
  const have = plugged.map((p) => `${p.kind}@${p.slot}`).join(", ");
  if (want !== have) throw mismatch(`snapshot has [${want}], this VM has [${have}]`);
  const bridge = Buffer.from(state.bus.hostBridge, "base64").length;
  if (bridge !== PCI_CONFIG_SIZE) throw new TypevisorError("SNAPSHOT_INVALID", `the snapshot's host bridge configuration space is ${bridge} bytes, not ${PCI_CONFIG_SIZE}`);
  state.devices.forEach((s, i) => {
    const problem = deviceProblem(plugged[i]!, s);
    if (problem !== undefined) throw new TypevisorError("SNAPSHOT_INVALID", `the snapshot's state for ${plugged[i]!.name} (slot ${s.slot}) is invalid: ${problem}`);
  });
  step?.("checked");
  state.devices.forEach((s, i) => {
    const p = plugged[i]!;
    p.transport.restore(s.transport, (ctx) => {
      step?.(`${p.name}: transport`);
      restoreDevice(p, s, ctx);
      step?.(`${p.name}: device`);
    });
  });
  bus.restore(state.bus);
  step?.("bus");
  return () => {
    for (const p of plugged) p.transport.serveRestoredQueues();
    step?.("queues served");
  };
}
