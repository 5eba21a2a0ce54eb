import { expect } from "vitest";
import { PCI_ECAM_START } from "../../../arch/x86_64/layout.js";
import type { PciBus } from "../../pci/bus.js";

/** Where the driver's MMIO accesses go: a PciBus, or anything that serves them the same way (a device thread's mailbox). */
export type MmioTarget = Pick<PciBus, "handleMmio">;
import { PCI_REG } from "../../pci/config-space.js";
import type { QueueConfig } from "../device.js";
import { COMMON, VIRTIO_PCI_CAP, VIRTIO_STATUS as S } from "./caps.js";
import { MSIX_BAR } from "./transport.js";

interface Region {
  bar: number;
  offset: number;
  length: number;
  extra: number;
}

/**
 * Test helper playing a guest's virtio-pci driver for the function in `slot` of `bus`:
 * configuration through ECAM, registers through MMIO at whatever the BARs say, as Linux's
 * virtio_pci_modern does.
 */
export class PciDriver {
  readonly caps = new Map<number, Region>();
  msixCap = 0;

  constructor(
    readonly bus: MmioTarget,
    readonly slot: number,
  ) {
    // pci_find_capability / virtio_pci_find_capability: walk the list.
    let p = this.cfgRead(PCI_REG.CAPABILITIES_POINTER, 1);
    // An absent function reads all ones: 0xff is no capability, and the walk is bounded either way.
    for (let n = 0; p !== 0 && p !== 0xff && n < 48; n++) {
      const id = this.cfgRead(p, 1);
      if (id === 0x11) this.msixCap = p;
      if (id === 0x09) {
        const type = this.cfgRead(p + 3, 1);
        if (!this.caps.has(type)) this.caps.set(type, { bar: this.cfgRead(p + 4, 1), offset: this.cfgRead(p + 8, 4), length: this.cfgRead(p + 12, 4), extra: p });
      }
      p = this.cfgRead(p + 1, 1);
    }
  }

  cfgRead(reg: number, size: number): number {
    const d = new Uint8Array(size);
    this.bus.handleMmio(PCI_ECAM_START + (this.slot << 15) + reg, d, false);
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + d[i]!;
    return v;
  }
  cfgWrite(reg: number, size: number, v: number): void {
    const d = new Uint8Array(size);
    for (let i = 0; i < size; i++) d[i] = Math.floor(v / 2 ** (8 * i)) & 0xff;
    this.bus.handleMmio(PCI_ECAM_START + (this.slot << 15) + reg, d, true);
  }
  barBase(bar: number): number {
    const lo = this.cfgRead(PCI_REG.BAR0 + 4 * bar, 4);
    const hi = (lo & 6) === 4 ? this.cfgRead(PCI_REG.BAR0 + 4 * bar + 4, 4) : 0;
    return hi * 2 ** 32 + ((lo & ~0xf) >>> 0);
  }
  addr(type: number, off: number): number {
    const r = this.caps.get(type)!;
    return this.barBase(r.bar) + r.offset + off;
  }
  read(type: number, off: number, size: number): number {
    const d = new Uint8Array(size);
    expect(this.bus.handleMmio(this.addr(type, off), d, false)).toBe(true);
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + d[i]!;
    return v;
  }
  write(type: number, off: number, size: number, v: number): void {
    const d = new Uint8Array(size);
    for (let i = 0; i < size; i++) d[i] = Math.floor(v / 2 ** (8 * i)) & 0xff;
    expect(this.bus.handleMmio(this.addr(type, off), d, true)).toBe(true);
  }
  common(off: number, size: number): number {
    return this.read(VIRTIO_PCI_CAP.COMMON_CFG, off, size);
  }
  setCommon(off: number, size: number, v: number): void {
    this.write(VIRTIO_PCI_CAP.COMMON_CFG, off, size, v);
  }
  status(): number {
    return this.common(COMMON.DEVICE_STATUS, 1);
  }
  addStatus(bits: number): void {
    this.setCommon(COMMON.DEVICE_STATUS, 1, this.status() | bits);
  }
  deviceFeatures(): bigint {
    this.setCommon(COMMON.DEVICE_FEATURE_SELECT, 4, 0);
    const lo = this.common(COMMON.DEVICE_FEATURE, 4);
    this.setCommon(COMMON.DEVICE_FEATURE_SELECT, 4, 1);
    const hi = this.common(COMMON.DEVICE_FEATURE, 4);
    return (BigInt(hi) << 32n) | BigInt(lo);
  }
  setDriverFeatures(f: bigint): void {
    this.setCommon(COMMON.DRIVER_FEATURE_SELECT, 4, 0);
    this.setCommon(COMMON.DRIVER_FEATURE, 4, Number(f & 0xffff_ffffn));
    this.setCommon(COMMON.DRIVER_FEATURE_SELECT, 4, 1);
    this.setCommon(COMMON.DRIVER_FEATURE, 4, Number(f >> 32n));
  }
  /** pci_enable_device + pci_set_master + MSI-X enable with every vector programmed and unmasked. */
  enableMsix(vectors: number): void {
    this.cfgWrite(PCI_REG.COMMAND, 2, this.cfgRead(PCI_REG.COMMAND, 2) | 0x6);
    this.cfgWrite(this.msixCap + 2, 2, 0xc000);
    const table = this.barBase(MSIX_BAR);
    for (let v = 0; v < vectors; v++) {
      const e = (o: number, val: number): void => {
        const d = new Uint8Array(4);
        new DataView(d.buffer).setUint32(0, val, true);
        this.bus.handleMmio(table + v * 16 + o, d, true);
      };
      e(0, 0xfee0_0000 + (v << 12));
      e(4, 0);
      e(8, 0x40 + v);
      e(12, 0);
    }
    this.cfgWrite(this.msixCap + 2, 2, 0x8000);
  }
  setupQueue(q: number, size: number, base: number, vector: number): void {
    this.setCommon(COMMON.QUEUE_SELECT, 2, q);
    this.setCommon(COMMON.QUEUE_SIZE, 2, size);
    const w64 = (off: number, v: number): void => {
      this.setCommon(off, 4, v % 2 ** 32);
      this.setCommon(off + 4, 4, Math.floor(v / 2 ** 32));
    };
    w64(COMMON.QUEUE_DESC, base);
    w64(COMMON.QUEUE_DRIVER, base + 16 * size);
    w64(COMMON.QUEUE_DEVICE, base + 0x1000 * Math.ceil((16 * size + 6 + 2 * size) / 0x1000));
    this.setCommon(COMMON.QUEUE_MSIX_VECTOR, 2, vector);
  }
  /** Program queue `q` where a QueueDriver placed it (`c`), give it MSI-X `vector`, enable it (§4.1.5.1.3). */
  placeQueue(q: number, c: QueueConfig, vector: number): void {
    this.setCommon(COMMON.QUEUE_SELECT, 2, q);
    this.setCommon(COMMON.QUEUE_SIZE, 2, c.size);
    for (const [off, v] of [[COMMON.QUEUE_DESC, c.descAddr], [COMMON.QUEUE_DRIVER, c.driverAddr], [COMMON.QUEUE_DEVICE, c.deviceAddr]] as const) {
      this.setCommon(off, 4, v % 2 ** 32);
      this.setCommon(off + 4, 4, Math.floor(v / 2 ** 32));
    }
    this.setCommon(COMMON.QUEUE_MSIX_VECTOR, 2, vector);
    this.setCommon(COMMON.QUEUE_ENABLE, 2, 1);
  }
  /** Kick queue `q` with a write to its notify address (§4.1.4.4: cap offset + queue_notify_off x multiplier). */
  kick(q: number): void {
    this.setCommon(COMMON.QUEUE_SELECT, 2, q);
    const off = this.common(COMMON.QUEUE_NOTIFY_OFF, 2);
    const mult = this.cfgRead(this.caps.get(VIRTIO_PCI_CAP.NOTIFY_CFG)!.extra + 16, 4);
    this.write(VIRTIO_PCI_CAP.NOTIFY_CFG, off * mult, 2, q);
  }
  /** Write one MSI-X table dword of `vector` (field 0-3: address lo, hi, data, vector control). */
  msixEntry(vector: number, field: number, value: number): void {
    const d = new Uint8Array(4);
    new DataView(d.buffer).setUint32(0, value, true);
    this.bus.handleMmio(this.barBase(MSIX_BAR) + vector * 16 + field * 4, d, true);
  }
  /** The whole virtio_dev_probe + vp_modern_find_vqs sequence up to FEATURES_OK. */
  negotiate(features?: bigint): void {
    this.enableMsix(3);
    this.setCommon(COMMON.DEVICE_STATUS, 1, 0);
    expect(this.status()).toBe(0);
    this.addStatus(S.ACKNOWLEDGE);
    this.addStatus(S.DRIVER);
    this.setDriverFeatures(features ?? this.deviceFeatures());
    this.addStatus(S.FEATURES_OK);
  }
}
