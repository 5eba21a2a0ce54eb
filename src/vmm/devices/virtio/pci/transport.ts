/**
 * virtio-pci "modern" transport (virtio 1.2 §4.1) around a VirtioDevice.
 *
 * BAR layout, following QEMU's so guests and tools see a familiar device:
 * - BAR 1, 32-bit, 4 KiB or more: MSI-X table at 0 and PBA at 0x800 (or the next
 *   2 KiB boundary past the table). A BAR of its own, because PCI 3.0 §6.8.2
 *   forbids other registers in a 4 KiB page holding MSI-X structures, and it
 *   keeps BAR 4's layout independent of the vector count.
 * - BAR 4+5, 64-bit, 16 KiB, one 4 KiB page per structure: common config at
 *   0x0000, ISR at 0x1000, device config at 0x2000, notifications at 0x3000.
 *   Not prefetchable: reading the ISR clears it, and PCI 3.0 §6.2.5.1 allows
 *   prefetching only where reads have no side effects. BAR 0 stays unused (QEMU
 *   puts the legacy I/O interface there; this device is modern-only).
 * Notifications: notify_off_multiplier = 4 and queue_notify_off = queue index,
 * so queue q is kicked by a write at 0x3000 + 4q: one address per queue, one
 * ioeventfd each (`notifyAddress`).
 *
 * Everything the guest writes is hostile: accesses of the wrong size, offset or
 * value are ignored (writes) or read as zero; nothing here throws on guest input.
 */
import { TypevisorError } from "../../../../errors.js";
import type { GuestMemory } from "../../../memory/guest-memory.js";
import { PCI_CONFIG_SIZE, PCI_REG, PCI_STATUS, PciConfigSpace, type PciBarSpec } from "../../pci/config-space.js";
import { PCI_CLASS, leRead, leWrite, type PciDevice } from "../../pci/device.js";
import { Msix, type MsixState } from "../../pci/msix.js";
import { VIRTIO_F, VIRTIO_ID, type ActivateContext, type QueueConfig, type QueueInspect, type VirtioDevice } from "../device.js";
import {
  COMMON,
  PCI_CAP_ID_VNDR,
  TRANSPORT_UNSUPPORTED_FEATURES,
  VIRTIO_ISR,
  VIRTIO_MSI_NO_VECTOR,
  VIRTIO_PCI_CAP,
  VIRTIO_PCI_DEVICE_ID_BASE,
  VIRTIO_PCI_REVISION,
  VIRTIO_PCI_SUBSYSTEM_BASE,
  VIRTIO_PCI_VENDOR_ID,
  VIRTIO_STATUS,
  virtioCapBody,
} from "./caps.js";

export const MSIX_BAR = 1;
export const VIRTIO_BAR = 4;
export const VIRTIO_BAR_SIZE = 0x4000;
export const REGION = {
  COMMON: 0x0000,
  ISR: 0x1000,
  DEVICE: 0x2000,
  NOTIFY: 0x3000,
  /** Each structure owns one page of BAR 4. */
  SIZE: 0x1000,
} as const;
export const NOTIFY_OFF_MULTIPLIER = 4;
/** The split ring's largest queue (virtio 1.2 §2.7). */
export const MAX_QUEUE_SIZE = 32768;

export interface VirtioPciOptions {
  device: VirtioDevice;
  mem: GuestMemory;
  /** Send one MSI, its 64-bit address as two 32-bit halves (the VMM maps it to KVM_SIGNAL_MSI). */
  deliverMsi(addressLo: number, addressHi: number, data: number): void;
  /** An MSI-X entry (its index) or Message Control (undefined) changed: irqfd routes may need updating. */
  onMsixUpdate?(vector: number | undefined): void;
  /** MSI-X table size; default one per queue plus one for configuration changes (what Linux asks for first). */
  msixVectors?: number;
  /** PCI class code; default by device type. */
  classCode?: number;
}

interface QueueState {
  size: number;
  msixVector: number;
  enabled: boolean;
  desc: bigint;
  driver: bigint;
  device: bigint;
}

/** Plain state for snapshots (bigints as hex strings so it survives JSON). */
export interface VirtioPciState {
  status: number;
  deviceFeatureSelect: number;
  driverFeatureSelect: number;
  driverFeatures: string;
  configMsixVector: number;
  configGeneration: number;
  queueSelect: number;
  isr: number;
  queues: { size: number; msixVector: number; enabled: boolean; desc: string; driver: string; device: string }[];
  msix: MsixState;
  /** The 4 KiB PCI configuration space, base64 (restore takes only its guest-writable bits back). */
  config: string;
}

/** An MSI-X vector as GET /threads shows it: whether the guest masked it and whether a message waits on the mask. */
export interface VectorInspect {
  vector: number;
  masked: boolean;
  pending: boolean;
}

/** One queue of a VirtioPciInspect: the transport's registers, then (`active`) the device's ring state. */
export type QueueRegistersInspect = { index: number; enabled: boolean; size: number; vector: VectorInspect | null } & ({ active: false } | ({ active: true } & QueueInspect));

/** Where a virtio-pci device stands, for a report of a stalled VM (GET /threads). */
export interface VirtioPciInspect {
  /** Device status register and its bits by name (virtio 1.2 §2.1). */
  status: number;
  statusBits: string[];
  needsReset: string | null;
  /** ISR status (read-to-clear by the guest): bit 0 queue, bit 1 configuration (§4.1.4.5). */
  isr: number;
  /** Negotiated features (hex). */
  features: string;
  msix: { enabled: boolean; functionMasked: boolean };
  configVector: VectorInspect | null;
  /** Requests the device took and has not answered (a disk's requests on its I/O thread), when it says. */
  inFlight?: number;
  queues: QueueRegistersInspect[];
}

const S = VIRTIO_STATUS;
const bit = (n: number): bigint => 1n << BigInt(n);

function defaultClass(deviceType: number): number {
  switch (deviceType) {
    case VIRTIO_ID.NET:
      return PCI_CLASS.NETWORK_ETHERNET;
    case VIRTIO_ID.BLOCK:
      return PCI_CLASS.STORAGE_OTHER;
    case VIRTIO_ID.CONSOLE:
    case VIRTIO_ID.VSOCK:
      return PCI_CLASS.COMMUNICATION_OTHER;
    default:
      return PCI_CLASS.OTHER;
  }
}

const isPow2 = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;

export class VirtioPciDevice implements PciDevice {
  readonly config: PciConfigSpace;
  readonly bars: readonly PciBarSpec[];
  readonly msix: Msix;
  readonly device: VirtioDevice;
  /** Features offered to the driver: the device's, plus VERSION_1, minus what this transport lacks. */
  readonly offeredFeatures: bigint;

  private readonly mem: GuestMemory;
  private readonly numQueues: number;
  private readonly pbaOffset: number;

  private status = 0;
  private deviceFeatureSelect = 0;
  private driverFeatureSelect = 0;
  private driverFeatures = 0n;
  private configMsixVector = VIRTIO_MSI_NO_VECTOR;
  private configGeneration = 0;
  private queueSelect = 0;
  private isr = 0;
  private queues: QueueState[] = [];
  /** Why DEVICE_NEEDS_RESET was set (for logs and stats); cleared by reset. */
  needsResetReason: string | undefined;
  /** Bumped at every reset: callbacks handed to an earlier activation become no-ops. */
  private epoch = 0;

  /**
   * @throws TypevisorError VIRTIO_PCI_UNSUPPORTED (or a PCI_* code) for a device this
   * transport cannot present (more than 1024 queues, config space over 4 KiB): VMM configuration bugs.
   */
  constructor(opts: VirtioPciOptions) {
    const dev = opts.device;
    this.device = dev;
    this.mem = opts.mem;
    this.numQueues = dev.queueMaxSizes.length;
    if (this.numQueues * NOTIFY_OFF_MULTIPLIER > REGION.SIZE) throw new TypevisorError("VIRTIO_PCI_UNSUPPORTED", `virtio-pci supports at most ${REGION.SIZE / NOTIFY_OFF_MULTIPLIER} queues`);
    if (dev.configSize > REGION.SIZE) throw new TypevisorError("VIRTIO_PCI_UNSUPPORTED", `virtio device config of ${dev.configSize} bytes exceeds ${REGION.SIZE}`);
    for (const m of dev.queueMaxSizes) {
      if (!Number.isInteger(m) || m < 1 || m > MAX_QUEUE_SIZE) throw new TypevisorError("VIRTIO_PCI_UNSUPPORTED", `virtio queue maximum ${m} is not 1..${MAX_QUEUE_SIZE}`);
    }
    this.offeredFeatures = (dev.features | bit(VIRTIO_F.VERSION_1)) & ~TRANSPORT_UNSUPPORTED_FEATURES & 0xffff_ffff_ffff_ffffn;

    this.msix = new Msix({
      vectors: opts.msixVectors ?? this.numQueues + 1,
      deliver: opts.deliverMsi,
      ...(opts.onMsixUpdate !== undefined ? { onUpdate: opts.onMsixUpdate } : {}),
    });
    this.pbaOffset = Math.max(0x800, Math.ceil(this.msix.tableSize / 0x800) * 0x800);
    let msixBarSize = 0x1000;
    while (msixBarSize < this.pbaOffset + this.msix.pbaSize) msixBarSize *= 2;

    this.config = new PciConfigSpace({
      vendorId: VIRTIO_PCI_VENDOR_ID,
      deviceId: VIRTIO_PCI_DEVICE_ID_BASE + dev.deviceType,
      classCode: opts.classCode ?? defaultClass(dev.deviceType),
      revisionId: VIRTIO_PCI_REVISION,
      subsystemVendorId: VIRTIO_PCI_VENDOR_ID,
      subsystemId: VIRTIO_PCI_SUBSYSTEM_BASE + dev.deviceType,
    });
    const bars: PciBarSpec[] = [
      { index: MSIX_BAR, size: msixBarSize, is64: false, prefetchable: false },
      { index: VIRTIO_BAR, size: VIRTIO_BAR_SIZE, is64: true, prefetchable: false },
    ];
    for (const b of bars) this.config.addBar(b);
    this.bars = bars;

    this.msix.attach(this.config, { tableBar: MSIX_BAR, tableOffset: 0, pbaBar: MSIX_BAR, pbaOffset: this.pbaOffset });
    const cap = (type: number, offset: number, length: number, extra?: Uint8Array): number =>
      this.config.addCapability(PCI_CAP_ID_VNDR, virtioCapBody(type, VIRTIO_BAR, offset, length, extra));
    cap(VIRTIO_PCI_CAP.COMMON_CFG, REGION.COMMON, COMMON.LENGTH);
    const mult = new Uint8Array(4);
    new DataView(mult.buffer).setUint32(0, NOTIFY_OFF_MULTIPLIER, true);
    cap(VIRTIO_PCI_CAP.NOTIFY_CFG, REGION.NOTIFY, Math.max(1, this.numQueues) * NOTIFY_OFF_MULTIPLIER, mult);
    cap(VIRTIO_PCI_CAP.ISR_CFG, REGION.ISR, 1);
    // A device without configuration fields has no DEVICE_CFG capability (§4.1.4.6 "if present").
    if (dev.configSize > 0) cap(VIRTIO_PCI_CAP.DEVICE_CFG, REGION.DEVICE, dev.configSize);
    this.addPciCfgCap();
    this.resetState();
  }

  // -------------------------------------------------------------------------
  // VIRTIO_PCI_CAP_PCI_CFG (§4.1.4.9): a window into the BARs through config space.

  private addPciCfgCap(): void {
    const body = virtioCapBody(VIRTIO_PCI_CAP.PCI_CFG, 0, 0, 0, new Uint8Array(4));
    const wmask = new Uint8Array(body.length);
    wmask[2] = 0xff; // bar
    wmask.fill(0xff, 6, 18); // offset, length, pci_cfg_data
    const off = this.config.addCapability(PCI_CAP_ID_VNDR, body, wmask);
    const dataOff = off + 16;
    const target = (): { bar: number; offset: number; length: number } | undefined => {
      const bar = this.config.getU8(off + 4);
      const offset = this.config.getU32(off + 8);
      const length = this.config.getU32(off + 12);
      // §4.1.4.9.1: only 1, 2 or 4 bytes, naturally aligned, inside a BAR we have.
      if (length !== 1 && length !== 2 && length !== 4) return undefined;
      if (offset % length !== 0) return undefined;
      const spec = this.bars.find((b) => b.index === bar);
      if (spec === undefined || offset + length > spec.size) return undefined;
      return { bar, offset, length };
    };
    this.config.addHook({
      start: dataOff,
      length: 4,
      beforeRead: () => {
        const t = target();
        if (t === undefined) return;
        const data = new Uint8Array(t.length);
        this.barRead(t.bar, t.offset, data);
        this.config.setU32(dataOff, 0);
        for (let i = 0; i < t.length; i++) this.config.setU8(dataOff + i, data[i]!);
      },
      afterWrite: () => {
        const t = target();
        if (t === undefined) return;
        const data = new Uint8Array(t.length);
        for (let i = 0; i < t.length; i++) data[i] = this.config.getU8(dataOff + i);
        this.barWrite(t.bar, t.offset, data);
      },
    });
  }

  // -------------------------------------------------------------------------
  // Public helpers for the VMM.

  /** Where the driver kicks `queue`: BAR and offset (add the BAR's address for an ioeventfd). */
  notifyAddress(queue: number): { bar: number; offset: number } | undefined {
    if (!Number.isInteger(queue) || queue < 0 || queue >= this.numQueues) return undefined;
    return { bar: VIRTIO_BAR, offset: REGION.NOTIFY + queue * NOTIFY_OFF_MULTIPLIER };
  }

  /**
   * The driver kicked `queue` through its ioeventfd: the same as a write to that queue's notify
   * register (§4.1.4.4), without decoding a BAR access per kick.
   */
  queueNotify(queue: number): void {
    if (Number.isInteger(queue) && queue >= 0 && queue < this.numQueues) this.notify(queue);
  }

  /** Where the device stands (VirtioPciInspect). Reads only: the ISR is not cleared, nothing is delivered. */
  inspect(): VirtioPciInspect {
    const vector = (v: number): VectorInspect | null => (v === VIRTIO_MSI_NO_VECTOR ? null : { vector: v, masked: this.msix.entry(v)?.masked ?? true, pending: this.msix.isPending(v) });
    const dev = this.device.inspect?.();
    return {
      status: this.status,
      statusBits: (Object.keys(S) as (keyof typeof S)[]).filter((k) => (this.status & S[k]) !== 0),
      needsReset: this.needsResetReason ?? null,
      isr: this.isr,
      features: `0x${this.driverFeatures.toString(16)}`,
      msix: { enabled: this.msix.enabled, functionMasked: this.msix.functionMasked },
      configVector: vector(this.configMsixVector),
      ...(dev?.inFlight !== undefined ? { inFlight: dev.inFlight } : {}),
      queues: this.queues.map((q, index) => {
        const ring = dev?.queues[index] ?? null;
        const regs = { index, enabled: q.enabled, size: q.size, vector: vector(q.msixVector) };
        return ring === null ? { ...regs, active: false as const } : { ...regs, active: true as const, ...ring };
      }),
    };
  }

  get deviceStatus(): number {
    return this.status;
  }

  /** Device configuration changed on the host side (e.g. disk resized): new generation, config interrupt (§4.1.4.3.1). */
  configChanged(): void {
    this.configGeneration = (this.configGeneration + 1) & 0xff;
    this.signalConfig();
  }

  // -------------------------------------------------------------------------
  // BAR access.

  barRead(bar: number, offset: number, data: Uint8Array): void {
    data.fill(0);
    if (bar === MSIX_BAR) {
      if (offset < this.msix.tableSize) this.msix.tableRead(offset, data);
      else if (offset >= this.pbaOffset) this.msix.pbaRead(offset - this.pbaOffset, data);
      return;
    }
    if (bar !== VIRTIO_BAR || !Number.isSafeInteger(offset) || offset < 0) return;
    const region = offset - (offset % REGION.SIZE);
    const rel = offset - region;
    if (rel + data.length > REGION.SIZE) return;
    switch (region) {
      case REGION.COMMON:
        this.commonRead(rel, data);
        return;
      case REGION.ISR:
        // Read-to-clear (§4.1.4.5.1); only byte 0 holds the ISR.
        if (rel === 0) {
          data[0] = this.isr;
          this.isr = 0;
          this.config.setInterruptStatus(false);
        }
        return;
      case REGION.DEVICE:
        this.deviceConfigRead(rel, data);
        return;
      default:
        return;
    }
  }

  barWrite(bar: number, offset: number, data: Uint8Array): void {
    if (bar === MSIX_BAR) {
      if (offset < this.msix.tableSize) this.msix.tableWrite(offset, data);
      return;
    }
    if (bar !== VIRTIO_BAR || !Number.isSafeInteger(offset) || offset < 0) return;
    const region = offset - (offset % REGION.SIZE);
    const rel = offset - region;
    if (rel + data.length > REGION.SIZE) return;
    switch (region) {
      case REGION.COMMON:
        this.commonWrite(rel, data);
        return;
      case REGION.DEVICE:
        this.deviceConfigWrite(rel, data);
        return;
      case REGION.NOTIFY:
        this.notify(Math.floor(rel / NOTIFY_OFF_MULTIPLIER));
        return;
      default:
        return;
    }
  }

  // -------------------------------------------------------------------------
  // Common configuration (§4.1.4.3).

  private selectedQueue(): QueueState | undefined {
    return this.queues[this.queueSelect];
  }

  /** Reads compose from the current field values, so any width or offset reads what the layout says. */
  private commonRead(rel: number, data: Uint8Array): void {
    if (rel + data.length > COMMON.LENGTH) return;
    const img = new Uint8Array(COMMON.LENGTH);
    const v = new DataView(img.buffer);
    v.setUint32(COMMON.DEVICE_FEATURE_SELECT, this.deviceFeatureSelect, true);
    const dfs = this.deviceFeatureSelect;
    v.setUint32(COMMON.DEVICE_FEATURE, dfs <= 1 ? Number((this.offeredFeatures >> BigInt(32 * dfs)) & 0xffff_ffffn) : 0, true);
    v.setUint32(COMMON.DRIVER_FEATURE_SELECT, this.driverFeatureSelect, true);
    const drs = this.driverFeatureSelect;
    v.setUint32(COMMON.DRIVER_FEATURE, drs <= 1 ? Number((this.driverFeatures >> BigInt(32 * drs)) & 0xffff_ffffn) : 0, true);
    v.setUint16(COMMON.CONFIG_MSIX_VECTOR, this.configMsixVector, true);
    v.setUint16(COMMON.NUM_QUEUES, this.numQueues, true);
    v.setUint8(COMMON.DEVICE_STATUS, this.status);
    v.setUint8(COMMON.CONFIG_GENERATION, this.configGeneration);
    v.setUint16(COMMON.QUEUE_SELECT, this.queueSelect, true);
    const q = this.selectedQueue();
    // A queue_select past num_queues reads queue_size 0: "not available" (§4.1.4.3.2).
    if (q !== undefined) {
      v.setUint16(COMMON.QUEUE_SIZE, q.size, true);
      v.setUint16(COMMON.QUEUE_MSIX_VECTOR, q.msixVector, true);
      v.setUint16(COMMON.QUEUE_ENABLE, q.enabled ? 1 : 0, true);
      v.setUint16(COMMON.QUEUE_NOTIFY_OFF, this.queueSelect, true);
      v.setBigUint64(COMMON.QUEUE_DESC, q.desc, true);
      v.setBigUint64(COMMON.QUEUE_DRIVER, q.driver, true);
      v.setBigUint64(COMMON.QUEUE_DEVICE, q.device, true);
    }
    data.set(img.subarray(rel, rel + data.length));
  }

  /**
   * Writes must use each field's natural width (§4.1.3.1); 64-bit fields also
   * take two 32-bit halves, as Linux writes them. Any other write is ignored.
   */
  private commonWrite(rel: number, data: Uint8Array): void {
    const raw = leRead(data);
    if (raw === undefined) return;
    const size = data.length;
    const n = typeof raw === "bigint" ? 0 : raw;
    const q = this.selectedQueue();
    // Queue configuration is frozen once the queue is enabled or the device is live.
    const queueWritable = q !== undefined && !q.enabled && (this.status & S.DRIVER_OK) === 0;
    switch (`${rel}/${size}`) {
      case `${COMMON.DEVICE_FEATURE_SELECT}/4`:
        this.deviceFeatureSelect = n;
        return;
      case `${COMMON.DRIVER_FEATURE_SELECT}/4`:
        this.driverFeatureSelect = n;
        return;
      case `${COMMON.DRIVER_FEATURE}/4`: {
        // Features are negotiated before FEATURES_OK and frozen after (§3.1.1 steps 4-5).
        if ((this.status & (S.FEATURES_OK | S.DRIVER_OK)) !== 0 || this.driverFeatureSelect > 1) return;
        const shift = BigInt(32 * this.driverFeatureSelect);
        this.driverFeatures = (this.driverFeatures & ~(0xffff_ffffn << shift)) | (BigInt(n) << shift);
        return;
      }
      case `${COMMON.CONFIG_MSIX_VECTOR}/2`:
        this.configMsixVector = this.checkVector(n);
        return;
      case `${COMMON.DEVICE_STATUS}/1`:
        this.writeStatus(n);
        return;
      case `${COMMON.QUEUE_SELECT}/2`:
        this.queueSelect = n;
        return;
      case `${COMMON.QUEUE_SIZE}/2`:
        // Validated against the maximum (and power of two for split rings) at DRIVER_OK,
        // when the ring format is known (§2.7, §2.8).
        if (queueWritable) q.size = n;
        return;
      case `${COMMON.QUEUE_MSIX_VECTOR}/2`:
        if (q !== undefined) q.msixVector = this.checkVector(n);
        return;
      case `${COMMON.QUEUE_ENABLE}/2`:
        // Only 1 means anything: the driver MUST NOT write 0 (§4.1.4.3.2) without VIRTIO_F_RING_RESET.
        if (queueWritable && n === 1) q.enabled = true;
        return;
      default:
        break;
    }
    if (!queueWritable) return;
    for (const [base, field] of [
      [COMMON.QUEUE_DESC, "desc"],
      [COMMON.QUEUE_DRIVER, "driver"],
      [COMMON.QUEUE_DEVICE, "device"],
    ] as const) {
      if (rel === base && size === 8 && typeof raw === "bigint") q[field] = raw;
      else if ((rel === base || rel === base + 4) && size === 4) {
        const shift = rel === base ? 0n : 32n;
        q[field] = (q[field] & ~(0xffff_ffffn << shift)) | (BigInt(n) << shift);
      }
    }
  }

  /** A vector the table does not have maps to NO_VECTOR, which the driver reads back as the failure (§4.1.5.1.2). */
  private checkVector(v: number): number {
    return v < this.msix.vectors ? v : VIRTIO_MSI_NO_VECTOR;
  }

  private writeStatus(value: number): void {
    const v = value & 0xff;
    if (v === 0) {
      this.resetState();
      return;
    }
    const old = this.status;
    // The driver never clears bits (§2.1.2) and never sets DEVICE_NEEDS_RESET.
    let next = old | (v & ~S.DEVICE_NEEDS_RESET);
    if ((next & S.FEATURES_OK) !== 0 && (old & S.FEATURES_OK) === 0 && !this.featuresAcceptable()) {
      // §3.1.1 step 5-6: FEATURES_OK does not stick; the driver reads that back and fails.
      next &= ~S.FEATURES_OK;
    }
    this.status = next;
    if ((next & S.DRIVER_OK) !== 0 && (old & S.DRIVER_OK) === 0) this.activate();
  }

  /** Only offered features, and VERSION_1 (a modern-only device cannot serve a legacy driver, §6.1). */
  private featuresAcceptable(): boolean {
    return (this.driverFeatures & ~this.offeredFeatures) === 0n && (this.driverFeatures & bit(VIRTIO_F.VERSION_1)) !== 0n;
  }

  private activate(): void {
    if ((this.status & S.FEATURES_OK) === 0) {
      this.setNeedsReset("DRIVER_OK without FEATURES_OK");
      return;
    }
    const problem = queueProblem(this.queues, this.driverFeatures, this.device.queueMaxSizes, this.mem);
    if (problem !== undefined) {
      this.setNeedsReset(problem);
      return;
    }
    try {
      this.device.activate(this.activateContext());
    } catch (e) {
      this.setNeedsReset(`device activation failed: ${e instanceof Error ? e.message : String(e)}`);
      return;
    }
    // A driver may post buffers and kick before DRIVER_OK (Linux's virtio_balloon primes its stats
    // queue in init_vqs, before virtio_device_ready); those kicks found no active device. Look at
    // every enabled queue once now, so nothing posted early waits for a kick that never comes.
    this.notifyEnabled();
  }

  private notifyEnabled(): void {
    this.queues.forEach((q, i) => {
      if (q.enabled) this.notify(i);
    });
  }

  /** What the device gets at DRIVER_OK (or restore): the queues as configured, callbacks that die with this activation. */
  private activateContext(): ActivateContext {
    const epoch = this.epoch;
    const live = (): boolean => epoch === this.epoch;
    const queues: QueueConfig[] = this.queues.map((q) =>
      q.enabled ? { size: q.size, descAddr: Number(q.desc), driverAddr: Number(q.driver), deviceAddr: Number(q.device) } : { size: 0, descAddr: 0, driverAddr: 0, deviceAddr: 0 },
    );
    return {
      mem: this.mem,
      queues,
      features: this.driverFeatures,
      interruptQueue: (q) => {
        if (live()) this.signalQueue(q);
      },
      interruptConfig: () => {
        if (live()) this.configChanged();
      },
      needsReset: (reason) => {
        if (live()) this.setNeedsReset(reason);
      },
    };
  }

  private setNeedsReset(reason: string): void {
    if ((this.status & S.DEVICE_NEEDS_RESET) !== 0) return;
    this.needsResetReason = reason;
    this.status |= S.DEVICE_NEEDS_RESET;
    // §2.1.2: with DRIVER_OK set, the device MUST then send a configuration change notification.
    if ((this.status & S.DRIVER_OK) !== 0) this.signalConfig();
  }

  /** Status 0: reset the device and every queue (§2.4, §4.1.4.3.2); MSI-X is PCI state and stays. */
  private resetState(): void {
    this.epoch++;
    this.status = 0;
    this.needsResetReason = undefined;
    this.deviceFeatureSelect = 0;
    this.driverFeatureSelect = 0;
    this.driverFeatures = 0n;
    this.configMsixVector = VIRTIO_MSI_NO_VECTOR;
    this.queueSelect = 0;
    this.isr = 0;
    this.config.setInterruptStatus(false);
    this.queues = this.device.queueMaxSizes.map((max) => ({ size: max, msixVector: VIRTIO_MSI_NO_VECTOR, enabled: false, desc: 0n, driver: 0n, device: 0n }));
    try {
      this.device.reset();
    } catch {
      // A device that cannot reset is a device bug; the transport state is clean regardless.
    }
  }

  // -------------------------------------------------------------------------
  // Notifications and interrupts.

  private notify(q: number): void {
    if ((this.status & (S.DRIVER_OK | S.DEVICE_NEEDS_RESET | S.FAILED)) !== S.DRIVER_OK) return;
    const state = this.queues[q];
    if (state === undefined || !state.enabled) return;
    try {
      this.device.notify(q);
    } catch (e) {
      this.setNeedsReset(`queue ${q} notify failed: ${e instanceof Error ? e.message : String(e)}`);
    }
  }

  private signalQueue(q: number): void {
    const state = this.queues[q];
    if (state === undefined) return;
    if (this.msix.enabled) {
      if (state.msixVector !== VIRTIO_MSI_NO_VECTOR) this.msix.fire(state.msixVector);
      return;
    }
    // Without MSI-X the ISR carries the cause (§4.1.4.5.1); INTx itself is not wired (pin 0).
    this.isr |= VIRTIO_ISR.QUEUE;
    this.config.setInterruptStatus(true);
  }

  private signalConfig(): void {
    // The configuration bit is set whether or not MSI-X is on (§4.1.4.5.1).
    this.isr |= VIRTIO_ISR.CONFIG;
    if (this.msix.enabled) {
      if (this.configMsixVector !== VIRTIO_MSI_NO_VECTOR) this.msix.fire(this.configMsixVector);
    } else {
      this.config.setInterruptStatus(true);
    }
  }

  // -------------------------------------------------------------------------
  // Device configuration (§4.1.4.6): passed through, bounded by configSize.

  private deviceConfigRead(rel: number, data: Uint8Array): void {
    const size = data.length;
    if (![1, 2, 4, 8].includes(size) || rel + size > this.device.configSize) return;
    try {
      leWrite(data, this.device.readConfig(rel, size));
    } catch {
      data.fill(0);
    }
  }

  private deviceConfigWrite(rel: number, data: Uint8Array): void {
    const raw = leRead(data);
    if (raw === undefined || rel + data.length > this.device.configSize) return;
    try {
      this.device.writeConfig(rel, data.length, BigInt(raw));
    } catch {
      // A device rejecting a config write drops it; the guest sees no change.
    }
  }

  save(): VirtioPciState {
    const hex = (v: bigint): string => `0x${v.toString(16)}`;
    return {
      status: this.status,
      deviceFeatureSelect: this.deviceFeatureSelect,
      driverFeatureSelect: this.driverFeatureSelect,
      driverFeatures: hex(this.driverFeatures),
      configMsixVector: this.configMsixVector,
      configGeneration: this.configGeneration,
      queueSelect: this.queueSelect,
      isr: this.isr,
      queues: this.queues.map((q) => ({ size: q.size, msixVector: q.msixVector, enabled: q.enabled, desc: hex(q.desc), driver: hex(q.driver), device: hex(q.device) })),
      msix: this.msix.save(),
      config: Buffer.from(this.config.snapshot()).toString("base64"),
    };
  }

  /**
   * Why `state` cannot be put back into this transport, or undefined when it can. Everything a
   * guest could not have brought about itself is refused: a queue count or MSI-X table of
   * another device, vectors past the table, features not offered, DRIVER_OK without
   * FEATURES_OK, and (for a live device) enabled queues that are not legal rings inside guest
   * RAM. Changes nothing.
   */
  restoreProblem(state: VirtioPciState): string | undefined {
    if (state.queues.length !== this.numQueues) return `${state.queues.length} queues saved, the device has ${this.numQueues}`;
    if (state.msix.table.length !== this.msix.vectors * 4 || state.msix.pending.length !== this.msix.vectors) return `an MSI-X table of ${Math.floor(state.msix.table.length / 4)} vectors saved, the device has ${this.msix.vectors}`;
    const vectorOk = (v: number): boolean => v === VIRTIO_MSI_NO_VECTOR || (v >= 0 && v < this.msix.vectors);
    if (!vectorOk(state.configMsixVector)) return `config MSI-X vector ${state.configMsixVector} is not in the table of ${this.msix.vectors}`;
    for (const [i, q] of state.queues.entries()) {
      if (!vectorOk(q.msixVector)) return `queue ${i}: MSI-X vector ${q.msixVector} is not in the table of ${this.msix.vectors}`;
    }
    const config = Buffer.from(state.config, "base64");
    if (config.length !== PCI_CONFIG_SIZE) return `PCI configuration space of ${config.length} bytes, not ${PCI_CONFIG_SIZE}`;
    const features = BigInt(state.driverFeatures);
    if ((state.status & S.FEATURES_OK) !== 0 && ((features & ~this.offeredFeatures) !== 0n || (features & bit(VIRTIO_F.VERSION_1)) === 0n)) {
      return `features 0x${features.toString(16)} were not offered (0x${this.offeredFeatures.toString(16)})`;
    }
    if (live(state.status)) {
      if ((state.status & S.FEATURES_OK) === 0) return "DRIVER_OK without FEATURES_OK";
      const problem = queueProblem(toRegs(state), features, this.device.queueMaxSizes, this.mem);
      if (problem !== undefined) return problem;
    }
    return undefined;
  }

  /**
   * Put back a save() (virtio 1.2 §2.1 status, §4.1.4.3 common configuration, PCI configuration
   * space and MSI-X), replacing whatever this transport held: the guest-writable bits of
   * configuration space (BAR addresses, command register: the bus's decode is the caller's to
   * refresh), the MSI-X table and pending bits, the transport registers and every queue's.
   * A device that was live (DRIVER_OK and not DEVICE_NEEDS_RESET) is handed to
   * `restoreDevice(ctx)` instead of activate(), with the same context activate() would get.
   * The caller then runs serveRestoredQueues().
   * @throws TypevisorError SNAPSHOT_INVALID (restoreProblem), or whatever restoreDevice throws
   */
  restore(state: VirtioPciState, restoreDevice: (ctx: ActivateContext) => void): void {
    const problem = this.restoreProblem(state);
    if (problem !== undefined) throw new TypevisorError("SNAPSHOT_INVALID", `virtio-pci state: ${problem}`);
    const config = Buffer.from(state.config, "base64");
    // A fresh device (and epoch) first: nothing of what this transport did before survives.
    this.resetState();
    this.config.restoreWritable(config);
    this.config.setInterruptStatus((config.readUInt16LE(PCI_REG.STATUS) & PCI_STATUS.INTERRUPT) !== 0);
    this.msix.restore(state.msix);
    this.status = state.status & 0xff;
    this.deviceFeatureSelect = state.deviceFeatureSelect >>> 0;
    this.driverFeatureSelect = state.driverFeatureSelect >>> 0;
    this.driverFeatures = BigInt(state.driverFeatures);
    this.configMsixVector = state.configMsixVector;
    this.configGeneration = state.configGeneration & 0xff;
    this.queueSelect = state.queueSelect & 0xffff;
    this.isr = state.isr & (VIRTIO_ISR.QUEUE | VIRTIO_ISR.CONFIG);
    this.queues = toRegs(state);
    if ((this.status & S.DEVICE_NEEDS_RESET) !== 0) this.needsResetReason = "the device needed a reset when the snapshot was taken";
    if (!live(this.status)) return;
    restoreDevice(this.activateContext());
  }

  /**
   * After restore(): every enabled queue of a live device is looked at once, as after DRIVER_OK,
   * so buffers the driver published while its kick was in flight at the snapshot are not left
   * waiting. Apart from restore() so a migration's destination runs it after its reply, outside
   * the guest's pause: it is a kick come late, which the guest cannot tell from one come early.
   */
  serveRestoredQueues(): void {
    if (live(this.status)) this.notifyEnabled();
  }
}

/** DRIVER_OK without DEVICE_NEEDS_RESET: the device was activated and still serves its queues. */
function live(status: number): boolean {
  return (status & (S.DRIVER_OK | S.DEVICE_NEEDS_RESET)) === S.DRIVER_OK;
}

function toRegs(state: VirtioPciState): QueueState[] {
  return state.queues.map((q) => ({ size: q.size, msixVector: q.msixVector, enabled: q.enabled, desc: BigInt(q.desc), driver: BigInt(q.driver), device: BigInt(q.device) }));
}

/** Why the enabled queues cannot be used, or undefined when they can (virtio 1.2 §2.7, §2.8, §4.1.4.3.2). */
function queueProblem(queueRegs: readonly QueueState[], driverFeatures: bigint, maxSizes: readonly number[], mem: GuestMemory): string | undefined {
  const packed = (driverFeatures & bit(VIRTIO_F.RING_PACKED)) !== 0n;
  for (let i = 0; i < queueRegs.length; i++) {
    const q = queueRegs[i]!;
    if (!q.enabled) continue;
    const max = maxSizes[i]!;
    if (q.size < 1 || q.size > max) return `queue ${i}: size ${q.size} is not 1..${max}`;
    // Split rings are a power of two in size; packed rings need not be (§2.7 vs §2.8).
    if (!packed && !isPow2(q.size)) return `queue ${i}: split ring size ${q.size} is not a power of two`;
    const areas: [string, bigint, number, number][] = packed
      ? [
          ["descriptor ring", q.desc, 16, 16 * q.size],
          ["driver event suppression", q.driver, 4, 4],
          ["device event suppression", q.device, 4, 4],
        ]
      : [
          ["descriptor table", q.desc, 16, 16 * q.size],
          ["available ring", q.driver, 2, 6 + 2 * q.size],
          ["used ring", q.device, 4, 6 + 8 * q.size],
        ];
    for (const [name, addr, align, len] of areas) {
      if (addr % BigInt(align) !== 0n) return `queue ${i}: ${name} at 0x${addr.toString(16)} is not ${align}-byte aligned`;
      if (addr > BigInt(Number.MAX_SAFE_INTEGER) || !mem.contains(Number(addr), len)) {
        return `queue ${i}: ${name} at 0x${addr.toString(16)} (+${len}) is outside guest RAM`;
      }
    }
  }
  return undefined;
}
