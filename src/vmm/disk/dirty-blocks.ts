/**
 * Which blocks of a disk were written, for a live migration that copies the disk ("disks":
 * "copy"): one bit per 64 KiB block of the guest-visible disk, in a SharedArrayBuffer the disk's
 * device (device thread) marks and the migration (main thread) takes. A block is marked when a
 * write, write-zeroes or discard to it *completes* (not when it is submitted): a copy that read
 * the block before the write landed then finds the bit set again and sends the block once more.
 */
export const DIRTY_BLOCK_SIZE = 64 * 1024;

export class DirtyBlocks {
  readonly words: Int32Array;

  constructor(readonly shared: SharedArrayBuffer) {
    this.words = new Int32Array(shared);
  }

  /** A map for a disk of `capacity` bytes. */
  static create(capacity: number): DirtyBlocks {
    return new DirtyBlocks(new SharedArrayBuffer(Math.max(4, Math.ceil(Math.ceil(capacity / DIRTY_BLOCK_SIZE) / 32) * 4)));
  }

  /** Mark the blocks of [pos, pos + len) (blocks past the map are ignored). */
  mark(pos: number, len: number): void {
    if (len <= 0 || pos < 0) return;
    const last = Math.min(Math.floor((pos + len - 1) / DIRTY_BLOCK_SIZE), this.words.length * 32 - 1);
    for (let b = Math.floor(pos / DIRTY_BLOCK_SIZE); b <= last; b++) Atomics.or(this.words, b >>> 5, 1 << (b & 31));
  }

  /** How many blocks are marked now (without clearing them). */
  count(): number {
    let n = 0;
    for (let w = 0; w < this.words.length; w++) for (let v = Atomics.load(this.words, w); v !== 0; v &= v - 1) n++;
    return n;
  }

  /** The marked block numbers, ascending, clearing them (a word at a time, atomically: a mark made meanwhile stays for the next call). */
  take(): number[] {
    const out: number[] = [];
    for (let w = 0; w < this.words.length; w++) {
      if (Atomics.load(this.words, w) === 0) continue;
      const bits = Atomics.exchange(this.words, w, 0);
      for (let b = 0; b < 32; b++) if ((bits & (1 << b)) !== 0) out.push(w * 32 + b);
    }
    return out;
  }
}
