/**
 * MSI-X (PCI Local Bus 3.0 §6.8.2): a capability in configuration space whose
 * Message Control holds the enable and function-mask bits, plus a table of
 * {address, data, vector control} entries and a Pending Bit Array that live in
 * a memory BAR.
 *
 * `fire(vector)` is the device's interrupt: delivered through `deliver` (the VMM
 * maps it to KVM_SIGNAL_MSI or an irqfd route) when MSI-X is enabled and neither
 * the function nor the vector is masked; otherwise the vector's pending bit is
 * set and the message goes out as soon as it is unmasked (§6.8.2.9, §6.8.2.10).
 */
import { TypevisorError } from "../../../errors.js";
import type { PciConfigSpace } from "./config-space.js";

export const PCI_CAP_ID_MSIX = 0x11;
/** Bytes per table entry: address low, address high, data, vector control (§6.8.2.5-8). */
export const MSIX_ENTRY_SIZE = 16;
/** The architectural maximum: Table Size is 11 bits, encoded N-1 (§6.8.2.3). */
export const MSIX_MAX_VECTORS = 2048;

/** Message Control bits (§6.8.2.3). */
const CTRL_ENABLE = 1 << 15;
const CTRL_FUNCTION_MASK = 1 << 14;
/** Vector Control bit 0 (§6.8.2.8); the other bits are reserved. */
const VECTOR_MASKED = 1;

export interface MsixEntry {
  address: bigint;
  data: number;
  masked: boolean;
}

export type MsixFireResult = "delivered" | "pending" | "disabled" | "invalid";

export interface MsixOptions {
  /** Number of table entries, 1..2048. */
  vectors: number;
  /** Send one MSI: the 64-bit address as two 32-bit halves, and the 32-bit data word. */
  deliver(addressLo: number, addressHi: number, data: number): void;
  /** Something the routing depends on changed: an entry (its index) or Message Control (undefined). */
  onUpdate?(vector: number | undefined): void;
}

/** Where the table and PBA live: BAR index (BIR) and offset, each 8-byte aligned (§6.8.2.4, §6.8.2.5). */
export interface MsixPlacement {
  tableBar: number;
  tableOffset: number;
  pbaBar: number;
  pbaOffset: number;
}

/** Plain state for snapshots. */
export interface MsixState {
  enabled: boolean;
  functionMasked: boolean;
  /** Per vector: [address low, address high, data, vector control]. */
  table: number[];
  pending: number[];
}

export class Msix {
  readonly vectors: number;
  private readonly table: Uint32Array;
  private readonly pending: Uint8Array;
  private enabledBit = false;
  private functionMaskBit = false;
  private readonly deliver: (addressLo: number, addressHi: number, data: number) => void;
  private readonly onUpdate: ((vector: number | undefined) => void) | undefined;
  /** The capability once attached, so reset() clears Message Control there too. */
  private cap: { config: PciConfigSpace; offset: number } | undefined;

  constructor(opts: MsixOptions) {
    if (!Number.isInteger(opts.vectors) || opts.vectors < 1 || opts.vectors > MSIX_MAX_VECTORS) {
      throw new TypevisorError("PCI_MSIX_VECTORS", `MSI-X vector count ${opts.vectors} is not 1..${MSIX_MAX_VECTORS}`);
    }
    this.vectors = opts.vectors;
    this.table = new Uint32Array(opts.vectors * 4);
    this.pending = new Uint8Array(opts.vectors);
    this.deliver = opts.deliver;
    this.onUpdate = opts.onUpdate;
    this.reset();
  }

  /** Bytes of the table and of the PBA (one bit per vector in QWORDs, §6.8.2.10). */
  get tableSize(): number {
    return this.vectors * MSIX_ENTRY_SIZE;
  }
  get pbaSize(): number {
    return Math.ceil(this.vectors / 64) * 8;
  }

  get enabled(): boolean {
    return this.enabledBit;
  }
  get functionMasked(): boolean {
    return this.functionMaskBit;
  }

  /** Power-on state: disabled, every vector masked (§6.8.2.8), nothing pending. */
  reset(): void {
    this.table.fill(0);
    for (let v = 0; v < this.vectors; v++) this.table[v * 4 + 3] = VECTOR_MASKED;
    this.pending.fill(0);
    this.enabledBit = false;
    this.functionMaskBit = false;
    if (this.cap !== undefined) {
      const { config, offset } = this.cap;
      config.setU16(offset + 2, config.getU16(offset + 2) & ~(CTRL_ENABLE | CTRL_FUNCTION_MASK));
    }
  }

  /**
   * Add the capability to `config` (12 bytes: control, table offset/BIR, PBA
   * offset/BIR) with only Enable and Function Mask writable. Returns its offset.
   */
  attach(config: PciConfigSpace, at: MsixPlacement): number {
    const body = new Uint8Array(10);
    const view = new DataView(body.buffer);
    view.setUint16(0, this.vectors - 1, true);
    view.setUint32(2, (at.tableOffset & ~7) | (at.tableBar & 7), true);
    view.setUint32(6, (at.pbaOffset & ~7) | (at.pbaBar & 7), true);
    const wmask = new Uint8Array(10);
    wmask[1] = (CTRL_ENABLE | CTRL_FUNCTION_MASK) >>> 8;
    const off = config.addCapability(PCI_CAP_ID_MSIX, body, wmask);
    this.cap = { config, offset: off };
    config.addHook({
      start: off + 2,
      length: 2,
      afterWrite: () => this.setControl(config.getU16(off + 2)),
    });
    return off;
  }

  private setControl(ctrl: number): void {
    const enabled = (ctrl & CTRL_ENABLE) !== 0;
    const fmask = (ctrl & CTRL_FUNCTION_MASK) !== 0;
    if (enabled === this.enabledBit && fmask === this.functionMaskBit) return;
    this.enabledBit = enabled;
    this.functionMaskBit = fmask;
    this.onUpdate?.(undefined);
    for (let v = 0; v < this.vectors; v++) this.flushPending(v);
  }

  entry(vector: number): MsixEntry | undefined {
    if (!this.valid(vector)) return undefined;
    const i = vector * 4;
    return {
      address: (BigInt(this.table[i + 1]!) << 32n) | BigInt(this.table[i]!),
      data: this.table[i + 2]!,
      masked: (this.table[i + 3]! & VECTOR_MASKED) !== 0,
    };
  }

  isPending(vector: number): boolean {
    return this.valid(vector) && this.pending[vector] === 1;
  }

  /** Whether a message for `vector` would go out now (enabled, function and vector unmasked). */
  canDeliver(vector: number): boolean {
    return this.valid(vector) && this.enabledBit && !this.functionMaskBit && (this.table[vector * 4 + 3]! & VECTOR_MASKED) === 0;
  }

  /** Raise `vector`. */
  fire(vector: number): MsixFireResult {
    if (!this.valid(vector)) return "invalid";
    // With MSI-X disabled the function would use INTx; the message is simply not sent (§6.8.2.3).
    if (!this.enabledBit) return "disabled";
    if (!this.canDeliver(vector)) {
      this.pending[vector] = 1;
      return "pending";
    }
    this.send(vector);
    return "delivered";
  }

  private valid(vector: number): boolean {
    return Number.isInteger(vector) && vector >= 0 && vector < this.vectors;
  }

  /** Straight from the table words: this runs once per interrupt, so no entry object and no BigInt. */
  private send(vector: number): void {
    const i = vector * 4;
    this.deliver(this.table[i]!, this.table[i + 1]!, this.table[i + 2]!);
  }

  private flushPending(vector: number): void {
    if (this.pending[vector] === 1 && this.canDeliver(vector)) {
      this.pending[vector] = 0;
      this.send(vector);
    }
  }

  // -------------------------------------------------------------------------
  // BAR-side accesses. Software uses aligned DWORD or QWORD accesses
  // (§6.8.2 "...must be DWORD or QWORD aligned"); anything else reads 0 and is dropped.

  tableRead(offset: number, data: Uint8Array): void {
    data.fill(0);
    if (!aligned(offset, data.length) || offset + data.length > this.tableSize) return;
    const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
    for (let p = 0; p < data.length; p += 4) view.setUint32(p, this.table[(offset + p) / 4]!, true);
  }

  tableWrite(offset: number, data: Uint8Array): void {
    if (!aligned(offset, data.length) || offset + data.length > this.tableSize) return;
    const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
    const vector = Math.floor(offset / MSIX_ENTRY_SIZE);
    for (let p = 0; p < data.length; p += 4) {
      const dw = (offset + p) / 4;
      const field = dw & 3;
      let v = view.getUint32(p, true);
      // Address bits 1:0 are zero for DWORD alignment (§6.8.2.6); vector control keeps only Mask.
      if (field === 0) v &= ~3;
      if (field === 3) v &= VECTOR_MASKED;
      this.table[dw] = v >>> 0;
    }
    this.onUpdate?.(vector);
    this.flushPending(vector);
  }

  pbaRead(offset: number, data: Uint8Array): void {
    data.fill(0);
    if (!aligned(offset, data.length) || offset + data.length > this.pbaSize) return;
    for (let byte = 0; byte < data.length; byte++) {
      let b = 0;
      for (let bit = 0; bit < 8; bit++) {
        const v = (offset + byte) * 8 + bit;
        if (v < this.vectors && this.pending[v] === 1) b |= 1 << bit;
      }
      data[byte] = b;
    }
  }

  /** The PBA is read-only (§6.8.2.10). */
  pbaWrite(): void {}

  /**
   * Put back a save() of a table of the same size, as the guest left it: entries (through the
   * same masks as tableWrite: address bits 1:0 zero, vector control keeps only Mask), pending
   * bits, and Enable / Function Mask (also in Message Control, so config reads agree). Nothing
   * is delivered here: a vector pending in the snapshot goes out when the guest unmasks it, as
   * it would have (§6.8.2.9).
   * @throws TypevisorError SNAPSHOT_INVALID when the sizes differ from this table's
   */
  restore(state: MsixState): void {
    if (state.table.length !== this.vectors * 4 || state.pending.length !== this.vectors) {
      throw new TypevisorError("SNAPSHOT_INVALID", `MSI-X state has ${state.table.length / 4} entries and ${state.pending.length} pending bits; this function has ${this.vectors} vectors`);
    }
    for (let dw = 0; dw < state.table.length; dw++) {
      let v = state.table[dw]! >>> 0;
      if ((dw & 3) === 0) v &= ~3;
      if ((dw & 3) === 3) v &= VECTOR_MASKED;
      this.table[dw] = v >>> 0;
    }
    for (let v = 0; v < this.vectors; v++) this.pending[v] = state.pending[v] === 1 ? 1 : 0;
    this.enabledBit = state.enabled;
    this.functionMaskBit = state.functionMasked;
    if (this.cap !== undefined) {
      const { config, offset } = this.cap;
      const ctrl = config.getU16(offset + 2) & ~(CTRL_ENABLE | CTRL_FUNCTION_MASK);
      config.setU16(offset + 2, ctrl | (state.enabled ? CTRL_ENABLE : 0) | (state.functionMasked ? CTRL_FUNCTION_MASK : 0));
    }
    this.onUpdate?.(undefined);
  }

  save(): MsixState {
    return {
      enabled: this.enabledBit,
      functionMasked: this.functionMaskBit,
      table: [...this.table],
      pending: [...this.pending],
    };
  }
}

function aligned(offset: number, size: number): boolean {
  return (size === 4 || size === 8) && Number.isSafeInteger(offset) && offset >= 0 && offset % size === 0;
}
