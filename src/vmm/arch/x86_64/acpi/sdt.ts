/**
 * Byte-level helpers shared by the ACPI tables: the System Description Table
 * header (ACPI 6.5 §5.2.6), checksums (§5.2.5.3, §5.2.6) and Generic Address
 * Structures (§5.2.3.2). Tables are built as plain byte arrays so they can be
 * checked without guest memory.
 */

/** OEMID in every header (6 bytes) and the FADT hypervisor vendor identity (8 bytes). */
export const OEM_ID = "TYPVSR";
export const CREATOR_ID = "TVSR";
export const CREATOR_REVISION = 1;
export const OEM_REVISION = 1;
export const SDT_HEADER_LENGTH = 36;

/** Write ASCII `s` into `buf` at `off`, padded with spaces to `len` (ACPI IDs are space-padded). */
export function writeAscii(buf: Uint8Array, off: number, s: string, len: number): void {
  const padded = s.padEnd(len, " ");
  for (let i = 0; i < len; i++) buf[off + i] = padded.charCodeAt(i) & 0x7f;
}

/** The byte that makes `buf[start, end)` sum to zero modulo 256, given that byte is currently 0. */
export function checksumByte(buf: Uint8Array, start = 0, end = buf.length): number {
  let sum = 0;
  for (let i = start; i < end; i++) sum = (sum + buf[i]!) & 0xff;
  return (0x100 - sum) & 0xff;
}

/** Sum of `buf[start, end)` modulo 256 (0 for a valid table). */
export function byteSum(buf: Uint8Array, start = 0, end = buf.length): number {
  let sum = 0;
  for (let i = start; i < end; i++) sum = (sum + buf[i]!) & 0xff;
  return sum;
}

/**
 * A table under construction: a fixed-size little-endian buffer with the SDT
 * header filled in; `finish()` sets the checksum (header offset 9).
 */
export class SdtBuilder {
  readonly bytes: Uint8Array;
  private readonly view: DataView;

  constructor(signature: string, length: number, revision: number, oemTableId: string) {
    this.bytes = new Uint8Array(length);
    this.view = new DataView(this.bytes.buffer);
    writeAscii(this.bytes, 0, signature, 4);
    this.u32(4, length);
    this.u8(8, revision);
    writeAscii(this.bytes, 10, OEM_ID, 6);
    writeAscii(this.bytes, 16, oemTableId, 8);
    this.u32(24, OEM_REVISION);
    writeAscii(this.bytes, 28, CREATOR_ID, 4);
    this.u32(32, CREATOR_REVISION);
  }

  u8(off: number, v: number): void {
    this.view.setUint8(off, v);
  }
  u16(off: number, v: number): void {
    this.view.setUint16(off, v, true);
  }
  u32(off: number, v: number): void {
    this.view.setUint32(off, v, true);
  }
  u64(off: number, v: number): void {
    this.view.setBigUint64(off, BigInt(v), true);
  }
  set(off: number, data: Uint8Array): void {
    this.bytes.set(data, off);
  }

  finish(): Uint8Array {
    this.bytes[9] = 0;
    this.bytes[9] = checksumByte(this.bytes);
    return this.bytes;
  }
}

/** Generic Address Structure address space IDs (ACPI 6.5 §5.2.3.2, Table 5.1). */
export const AddressSpaceId = { SystemMemory: 0, SystemIo: 1 } as const;
/** GAS Access Size: 1 = byte access. */
export const AccessSize = { Byte: 1, Word: 2, DWord: 3, QWord: 4 } as const;

/** A 12-byte Generic Address Structure. */
export function gas(spaceId: number, bitWidth: number, bitOffset: number, accessSize: number, address: number): Uint8Array {
  const out = new Uint8Array(12);
  const view = new DataView(out.buffer);
  out[0] = spaceId;
  out[1] = bitWidth;
  out[2] = bitOffset;
  out[3] = accessSize;
  view.setBigUint64(4, BigInt(address), true);
  return out;
}

/** An 8-bit System I/O register at `port`, as the FADT reset and sleep registers are here. */
export function ioPortGas8(port: number): Uint8Array {
  return gas(AddressSpaceId.SystemIo, 8, 0, AccessSize.Byte, port);
}
