/**
 * Refcount block entries of any width (qcow2.txt §Host cluster management: refcount_bits =
 * 1 << refcount_order, 1 to 64 bits). Widths of 8 bits and more are big-endian like every qcow2
 * number; narrower ones are packed with bit 0 as the least significant bit of the byte.
 * Values are Numbers: we only ever store 0 and 1, and a larger count read from a 64-bit entry is
 * clamped (it only has to compare as "more than one").
 */
export function getRefcount(block: Buffer, index: number, order: number): number {
  const bits = 1 << order;
  switch (bits) {
    case 8:
      return block[index]!;
    case 16:
      return block.readUInt16BE(index * 2);
    case 32:
      return block.readUInt32BE(index * 4);
    case 64: {
      const v = block.readBigUInt64BE(index * 8);
      return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v);
    }
    default: {
      const at = index * bits;
      return (block[at >> 3]! >> (at & 7)) & ((1 << bits) - 1);
    }
  }
}

/** The largest count an entry of this order holds. */
export function maxRefcount(order: number): number {
  const bits = 1 << order;
  return bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1;
}

export function setRefcount(block: Buffer, index: number, order: number, value: number): void {
  const bits = 1 << order;
  switch (bits) {
    case 8:
      block[index] = value;
      return;
    case 16:
      block.writeUInt16BE(value, index * 2);
      return;
    case 32:
      block.writeUInt32BE(value, index * 4);
      return;
    case 64:
      block.writeBigUInt64BE(BigInt(value), index * 8);
      return;
    default: {
      const at = index * bits;
      const mask = ((1 << bits) - 1) << (at & 7);
      block[at >> 3] = (block[at >> 3]! & ~mask) | ((value << (at & 7)) & mask);
    }
  }
}
