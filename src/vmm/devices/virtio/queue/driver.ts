import type { GuestMemory } from "../../../memory/guest-memory.js";
import type { QueueConfig } from "../device.js";
import { VIRTQ_DESC_F } from "./split-queue.js";

/**
 * The DRIVER side of one split virtqueue (virtio 1.2 §2.7.13): it lays out the descriptor table
 * and rings in memory, adds chains and reads back the used ring. For tests, and for a device
 * thread's rehearsal of its queue code on scratch memory (net/rehearse.ts). Deliberately simple
 * (descriptors handed out round-robin); tests that want garbage write descriptors and indices
 * directly with writeDesc / setAvailIdx.
 */
export interface DriverBuf {
  addr: number;
  len: number;
  write?: boolean;
}

export interface UsedElem {
  id: number;
  len: number;
}

export class QueueDriver {
  readonly config: QueueConfig;
  private nextDesc = 0;
  private availIdx = 0;
  private lastUsed = 0;

  /** Places the queue at `base`: table, then avail ring, then used ring (4-aligned). */
  constructor(
    private readonly mem: GuestMemory,
    size: number,
    base: number,
  ) {
    const descAddr = base;
    const driverAddr = descAddr + 16 * size;
    const deviceAddr = (driverAddr + 6 + 2 * size + 3) & ~3;
    this.config = { size, descAddr, driverAddr, deviceAddr };
  }

  /** Bytes the queue structures occupy from `base`. */
  static footprint(size: number): number {
    return 16 * size + ((6 + 2 * size + 3) & ~3) + 6 + 8 * size;
  }

  writeDesc(table: number, idx: number, addr: number | bigint, len: number, flags: number, next: number): void {
    const d = table + 16 * idx;
    this.mem.writeU64(d, BigInt(addr));
    this.mem.writeU32(d + 8, len >>> 0);
    this.mem.writeU16(d + 12, flags & 0xffff);
    this.mem.writeU16(d + 14, next & 0xffff);
  }

  /** Chain `bufs` through consecutive main-table descriptors; returns the head (not yet published). */
  addChain(bufs: readonly DriverBuf[]): number {
    const size = this.config.size;
    const head = this.nextDesc;
    bufs.forEach((b, i) => {
      const idx = (head + i) % size;
      const last = i === bufs.length - 1;
      const flags = (b.write === true ? VIRTQ_DESC_F.WRITE : 0) | (last ? 0 : VIRTQ_DESC_F.NEXT);
      this.writeDesc(this.config.descAddr, idx, b.addr, b.len, flags, (idx + 1) % size);
    });
    this.nextDesc = (head + Math.max(1, bufs.length)) % size;
    return head;
  }

  /** Put `bufs` in an indirect table at `tableAddr`, referenced by one main descriptor; returns the head. */
  addIndirectChain(bufs: readonly DriverBuf[], tableAddr: number): number {
    bufs.forEach((b, i) => {
      const last = i === bufs.length - 1;
      const flags = (b.write === true ? VIRTQ_DESC_F.WRITE : 0) | (last ? 0 : VIRTQ_DESC_F.NEXT);
      this.writeDesc(tableAddr, i, b.addr, b.len, flags, i + 1);
    });
    const head = this.nextDesc;
    this.writeDesc(this.config.descAddr, head, tableAddr, 16 * bufs.length, VIRTQ_DESC_F.INDIRECT, 0);
    this.nextDesc = (head + 1) % this.config.size;
    return head;
  }

  /** Make `head` available: ring entry first, then idx (virtio 1.2 §2.7.13.2-3). */
  publish(head: number): void {
    const size = this.config.size;
    this.mem.writeU16(this.config.driverAddr + 4 + 2 * (this.availIdx % size), head);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    this.mem.writeU16(this.config.driverAddr + 2, this.availIdx);
  }

  /** Overwrite the avail idx with anything (adversarial tests). */
  setAvailIdx(idx: number): void {
    this.availIdx = idx & 0xffff;
    this.mem.writeU16(this.config.driverAddr + 2, this.availIdx);
  }

  setAvailFlags(flags: number): void {
    this.mem.writeU16(this.config.driverAddr, flags);
  }

  setUsedEvent(v: number): void {
    this.mem.writeU16(this.config.driverAddr + 4 + 2 * this.config.size, v);
  }

  get availEvent(): number {
    return this.mem.readU16(this.config.deviceAddr + 4 + 8 * this.config.size);
  }

  get usedIdx(): number {
    return this.mem.readU16(this.config.deviceAddr + 2);
  }

  /** Used elements added since the last call. */
  takeUsed(): UsedElem[] {
    const out: UsedElem[] = [];
    const size = this.config.size;
    while (this.lastUsed !== this.usedIdx) {
      const e = this.config.deviceAddr + 4 + 8 * (this.lastUsed % size);
      out.push({ id: this.mem.readU32(e), len: this.mem.readU32(e + 4) });
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
    }
    return out;
  }
}
