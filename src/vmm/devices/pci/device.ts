/**
 * What the PCI bus needs from a function: its configuration space and its
 * memory BARs. BAR accesses carry the bytes of the MMIO exit unchanged
 * (`data.length` is the access size, little-endian), so a device decodes sizes
 * it understands and answers anything else without throwing.
 */
import { PciConfigSpace, type PciBarSpec, type PciHeaderInit } from "./config-space.js";

export interface PciDevice {
  /** Configuration space: the bus routes mechanism #1 and ECAM accesses here. */
  readonly config: PciConfigSpace;
  /** The memory BARs this function implements (fixed for its lifetime). */
  readonly bars: readonly PciBarSpec[];
  /** Fill `data` from BAR `bar` at `offset` (offset + data.length <= that BAR's size). */
  barRead(bar: number, offset: number, data: Uint8Array): void;
  barWrite(bar: number, offset: number, data: Uint8Array): void;
}

/** PCI class codes used here (PCI Code and ID Assignment 1.x §1). */
export const PCI_CLASS = {
  HOST_BRIDGE: 0x06_00_00,
  STORAGE_OTHER: 0x01_80_00,
  NETWORK_ETHERNET: 0x02_00_00,
  COMMUNICATION_OTHER: 0x07_80_00,
  OTHER: 0xff_00_00,
} as const;

/**
 * The host bridge's identity. 8086:0d57 is the ID Cloud Hypervisor gives its
 * virtual PCIe host bridge, and EDK2's CloudHv firmware recognises it; Linux has
 * no quirk or driver bound to it (unlike QEMU's 8086:29c0 Q35 MCH or the 440FX
 * IDs, which pull in chipset quirks for hardware we do not emulate), so the guest
 * treats it as a plain host bridge. Revision 0.
 */
export const HOST_BRIDGE_ID = { vendorId: 0x8086, deviceId: 0x0d57 } as const;

/** A function with only a configuration header: the host bridge at 00:00.0. */
export class PciHostBridge implements PciDevice {
  readonly config: PciConfigSpace;
  readonly bars: readonly PciBarSpec[] = [];

  constructor(init: Partial<PciHeaderInit> = {}) {
    this.config = new PciConfigSpace({
      vendorId: HOST_BRIDGE_ID.vendorId,
      deviceId: HOST_BRIDGE_ID.deviceId,
      classCode: PCI_CLASS.HOST_BRIDGE,
      revisionId: 0,
      ...init,
    });
  }

  barRead(_bar: number, _offset: number, data: Uint8Array): void {
    data.fill(0xff);
  }
  barWrite(): void {}
}

/** Read a little-endian unsigned value of 1, 2, 4 or 8 bytes. Other sizes: undefined. */
export function leRead(data: Uint8Array): number | bigint | undefined {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  switch (data.length) {
    case 1:
      return view.getUint8(0);
    case 2:
      return view.getUint16(0, true);
    case 4:
      return view.getUint32(0, true);
    case 8:
      return view.getBigUint64(0, true);
    default:
      return undefined;
  }
}

/** Store `value` little-endian into all of `data` (truncating); bytes past 8 are zero. */
export function leWrite(data: Uint8Array, value: number | bigint): void {
  let v = typeof value === "bigint" ? BigInt.asUintN(64, value) : BigInt(Math.trunc(Number.isFinite(value) ? value : 0)) & 0xffff_ffff_ffff_ffffn;
  for (let i = 0; i < data.length; i++) {
    data[i] = Number(v & 0xffn);
    v >>= 8n;
  }
}
