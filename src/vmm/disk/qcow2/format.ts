/**
 * The qcow2 on-disk format: header, header extensions and table entries, as QEMU's
 * docs/interop/qcow2.txt describes them (section names are cited as "qcow2.txt §Header" and so
 * on). Everything here is pure: bytes in, validated values out. A header is hostile input: every
 * offset and size is checked against the file and against fixed caps before anything is sized by
 * it, so a crafted file gives a DiskFormatError at open, never a huge allocation or a read past
 * the tables.
 */
import { TypevisorError } from "../../../errors.js";

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const V2_HEADER_LENGTH = 72;
export const V3_HEADER_LENGTH = 104;
export const MIN_CLUSTER_BITS = 9; // 512 B (§Header cluster_bits)
export const MAX_CLUSTER_BITS = 21; // 2 MiB: QEMU's implementation limit, ours too
/** QEMU's limits on the L1 table (32 MiB) and the refcount table (8 MiB): §Header size, §Host cluster management. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024;
/** Host offsets are bits 9-55 of an entry (§Cluster mapping); a JS number holds them exactly below 2^53. */
export const MAX_HOST_OFFSET = 2 ** 53;
export const MAX_BACKING_NAME = 1023;

/** incompatible_features bits (§Header bytes 72-79). */
export const INCOMPAT = { DIRTY: 0, CORRUPT: 1, EXTERNAL_DATA: 2, COMPRESSION_TYPE: 3, EXTENDED_L2: 4 } as const;
/** compatible_features bit 0 (§Header bytes 80-87). */
export const COMPAT_LAZY_REFCOUNTS = 0;
/** Header extension types (§Header extensions). */
export const EXT = { END: 0, BACKING_FORMAT: 0xe2792aca, FEATURE_NAMES: 0x6803f857, BITMAPS: 0x23852875, CRYPTO: 0x0537be77, DATA_FILE: 0x44415441 } as const;

/** A header that cannot be opened: not qcow2, a feature we do not implement, or a hostile value. */
export class DiskFormatError extends TypevisorError {
  constructor(message: string, hint?: string) {
    super("DISK_FORMAT", message, hint !== undefined ? { hint } : undefined);
  }
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  /** Virtual disk size in bytes. */
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  /** Feature bitmaps as bigint (all 64 bits matter). */
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** From the header extensions: */
  backingFormat: string | undefined;
  backingFile: string | undefined;
  /** Feature names the image declares (incompatible bits only), for error messages. */
  incompatibleNames: Map<number, string>;
}

const bit = (n: number): bigint => 1n << BigInt(n);

/** A 64-bit big-endian field as a Number, refusing values a Number cannot hold exactly. */
function u64(b: Buffer, at: number, what: string): number {
  const v = b.readBigUInt64BE(at);
  if (v >= BigInt(MAX_HOST_OFFSET)) throw new DiskFormatError(`qcow2 ${what} ${v} is too large`);
  return Number(v);
}

/** Whether `b` starts with the qcow2 magic (a raw disk may, by the guest's doing: never probe a writable one). */
export function hasQcow2Magic(b: Uint8Array): boolean {
  return b.length >= 4 && b[0] === 0x51 && b[1] === 0x46 && b[2] === 0x49 && b[3] === 0xfb;
}

/**
 * Parse and validate the header in `first` (the file's first cluster or its first 64 KiB,
 * whichever is smaller; at least the header and its extensions) of a file of `fileSize` bytes.
 * @throws DiskFormatError
 */
export function parseHeader(first: Buffer, fileSize: number): Qcow2Header {
  if (first.length < V2_HEADER_LENGTH || first.readUInt32BE(0) !== QCOW2_MAGIC) throw new DiskFormatError("not a qcow2 image (no QFI\\xfb magic)");
  const version = first.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw new DiskFormatError(`qcow2 version ${version} is not supported (2 and 3 are)`);
  const clusterBits = first.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw new DiskFormatError(`qcow2 cluster_bits ${clusterBits} is outside ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS} (512 B to 2 MiB clusters)`);
  }
  const cluster = 2 ** clusterBits;
  const h: Qcow2Header = {
    version,
    backingFileOffset: u64(first, 8, "backing_file_offset"),
    backingFileSize: first.readUInt32BE(16),
    clusterBits,
    size: u64(first, 24, "size"),
    cryptMethod: first.readUInt32BE(32),
    l1Size: first.readUInt32BE(36),
    l1TableOffset: u64(first, 40, "l1_table_offset"),
    refcountTableOffset: u64(first, 48, "refcount_table_offset"),
    refcountTableClusters: first.readUInt32BE(56),
    nbSnapshots: first.readUInt32BE(60),
    snapshotsOffset: u64(first, 64, "snapshots_offset"),
    incompatible: 0n,
    compatible: 0n,
    autoclear: 0n,
    refcountOrder: 4,
    headerLength: V2_HEADER_LENGTH,
    compressionType: 0,
    backingFormat: undefined,
    backingFile: undefined,
    incompatibleNames: new Map(),
  };
  if (version === 3) {
    if (first.length < V3_HEADER_LENGTH) throw new DiskFormatError("qcow2 v3 header is cut short");
    h.incompatible = first.readBigUInt64BE(72);
    h.compatible = first.readBigUInt64BE(80);
    h.autoclear = first.readBigUInt64BE(88);
    h.refcountOrder = first.readUInt32BE(96);
    h.headerLength = first.readUInt32BE(100);
    if (h.headerLength < V3_HEADER_LENGTH || h.headerLength % 8 !== 0 || h.headerLength > Math.min(cluster, first.length)) {
      throw new DiskFormatError(`qcow2 header_length ${h.headerLength} is not a multiple of 8 in ${V3_HEADER_LENGTH}..cluster size`);
    }
    // §Additional fields: compression_type is present when header_length covers byte 104.
    if (h.headerLength > 104) h.compressionType = first.readUInt8(104);
  }
  if (h.refcountOrder > 6) throw new DiskFormatError(`qcow2 refcount_order ${h.refcountOrder} is above 6 (64-bit refcounts)`);
  if (h.cryptMethod !== 0) throw new DiskFormatError("encrypted qcow2 images are not supported", "decrypt it first: qemu-img convert -O qcow2 --object secret,... -f qcow2 IMAGE PLAIN");
  parseExtensions(first, h, cluster);

  // Incompatible features (§Header bytes 72-79): refuse what we do not implement, and any unknown bit.
  const known = bit(INCOMPAT.DIRTY) | bit(INCOMPAT.CORRUPT) | bit(INCOMPAT.EXTERNAL_DATA) | bit(INCOMPAT.COMPRESSION_TYPE) | bit(INCOMPAT.EXTENDED_L2);
  const unknown = h.incompatible & ~known;
  if (unknown !== 0n) {
    const bits = [...Array(64).keys()].filter((i) => (unknown & bit(i)) !== 0n);
    const names = bits.map((i) => h.incompatibleNames.get(i) ?? `bit ${i}`);
    throw new DiskFormatError(`qcow2 image uses unknown incompatible features: ${names.join(", ")}`);
  }
  if ((h.incompatible & bit(INCOMPAT.EXTERNAL_DATA)) !== 0n) throw new DiskFormatError("qcow2 images with an external data file are not supported");
  if ((h.incompatible & bit(INCOMPAT.EXTENDED_L2)) !== 0n) throw new DiskFormatError("qcow2 images with extended L2 entries (subclusters) are not supported", "convert it: qemu-img convert -O qcow2 IMAGE NEW");
  if ((h.incompatible & bit(INCOMPAT.COMPRESSION_TYPE)) !== 0n || h.compressionType !== 0) {
    throw new DiskFormatError(`qcow2 compression type ${h.compressionType} is not supported (zlib is)`, "convert it: qemu-img convert -O qcow2 IMAGE NEW");
  }

  // Tables inside the file and within the caps (§Header, §Host cluster management, §Cluster mapping).
  const aligned = (off: number) => off % cluster === 0;
  if (h.l1TableOffset === 0 || !aligned(h.l1TableOffset)) throw new DiskFormatError(`qcow2 l1_table_offset ${h.l1TableOffset} is not a cluster boundary`);
  if (h.l1Size * 8 > MAX_L1_BYTES) throw new DiskFormatError(`qcow2 l1_size ${h.l1Size} is above ${MAX_L1_BYTES / 8} entries`);
  if (h.l1TableOffset + h.l1Size * 8 > fileSize) throw new DiskFormatError("qcow2 L1 table lies past the end of the file");
  const l2Entries = cluster / 8;
  const needL1 = Math.ceil(h.size / cluster / l2Entries);
  if (h.l1Size < needL1) throw new DiskFormatError(`qcow2 l1_size ${h.l1Size} cannot map a ${h.size}-byte disk (needs ${needL1})`);
  if (h.refcountTableOffset === 0 || !aligned(h.refcountTableOffset)) throw new DiskFormatError(`qcow2 refcount_table_offset ${h.refcountTableOffset} is not a cluster boundary`);
  if (h.refcountTableClusters === 0 || h.refcountTableClusters * cluster > MAX_REFCOUNT_TABLE_BYTES) {
    throw new DiskFormatError(`qcow2 refcount_table_clusters ${h.refcountTableClusters} is 0 or above ${MAX_REFCOUNT_TABLE_BYTES} bytes`);
  }
  if (h.refcountTableOffset + h.refcountTableClusters * cluster > fileSize) throw new DiskFormatError("qcow2 refcount table lies past the end of the file");
  if (h.size % 512 !== 0) throw new DiskFormatError(`qcow2 virtual size ${h.size} is not a multiple of 512`);
  if (h.nbSnapshots > 0 && (!aligned(h.snapshotsOffset) || h.snapshotsOffset === 0 || h.snapshotsOffset >= fileSize)) {
    throw new DiskFormatError(`qcow2 snapshots_offset ${h.snapshotsOffset} is not a cluster inside the file`);
  }
  if (h.backingFileOffset !== 0) {
    if (h.backingFileSize === 0 || h.backingFileSize > MAX_BACKING_NAME) throw new DiskFormatError(`qcow2 backing file name length ${h.backingFileSize} is not in 1..${MAX_BACKING_NAME}`);
    const end = h.backingFileOffset + h.backingFileSize;
    if (end > Math.min(cluster, first.length)) throw new DiskFormatError("qcow2 backing file name lies outside the first cluster");
    h.backingFile = first.toString("utf8", h.backingFileOffset, end);
    if (h.backingFile.includes("\0")) throw new DiskFormatError("qcow2 backing file name holds a NUL byte");
  }
  return h;
}

/** §Header extensions: type, length, data padded to 8, until type 0 or the end of the first cluster. */
function parseExtensions(first: Buffer, h: Qcow2Header, cluster: number): void {
  const limit = Math.min(cluster, first.length);
  let at = h.headerLength;
  const seen = new Set<number>();
  while (at + 8 <= limit) {
    const type = first.readUInt32BE(at);
    const len = first.readUInt32BE(at + 4);
    if (type === EXT.END) return;
    const data = at + 8;
    if (data + len > limit) throw new DiskFormatError(`qcow2 header extension 0x${type.toString(16)} runs past the first cluster`);
    if (seen.has(type)) throw new DiskFormatError(`qcow2 header extension 0x${type.toString(16)} appears twice`);
    seen.add(type);
    if (type === EXT.BACKING_FORMAT) h.backingFormat = first.toString("latin1", data, data + len);
    else if (type === EXT.FEATURE_NAMES) {
      // §Feature name table: 48-byte entries: type, bit, 46-byte name.
      for (let e = data; e + 48 <= data + len; e += 48) {
        if (first[e] === 0) h.incompatibleNames.set(first[e + 1]!, first.toString("latin1", e + 2, e + 48).replace(/\0.*$/s, ""));
      }
    } else if (type === EXT.CRYPTO) throw new DiskFormatError("encrypted qcow2 images are not supported");
    else if (type === EXT.DATA_FILE) throw new DiskFormatError("qcow2 images with an external data file are not supported");
    at = data + Math.ceil(len / 8) * 8;
  }
}

/**
 * L2 entry fields (§Cluster mapping), read as two 32-bit halves so the hot path never makes a
 * BigInt: `hi` holds bits 32-63, `lo` bits 0-31.
 */
export const L2 = {
  /** Bit 63: refcount exactly one (written in place). */
  COPIED_HI: 0x8000_0000,
  /** Bit 62: compressed cluster. */
  COMPRESSED_HI: 0x4000_0000,
  /** Standard descriptor bit 0: reads as zeros (v3). */
  ZERO_LO: 1,
  /** Bits 9-55 of a standard descriptor: the host offset. */
  OFFSET_HI_MASK: 0x00ff_ffff,
  OFFSET_LO_MASK: 0xffff_fe00,
} as const;

/** The host offset in a standard L2 (or L1, refcount table) entry's halves. */
export function entryOffset(hi: number, lo: number): number {
  return (hi & L2.OFFSET_HI_MASK) * 2 ** 32 + ((lo & L2.OFFSET_LO_MASK) >>> 0);
}

/** Reserved bits of a standard L2 descriptor (1-8, 56-61) that must be zero. */
export function standardReservedBits(hi: number, lo: number): boolean {
  return (lo & 0x1fe) !== 0 || (hi & 0x3f00_0000) !== 0;
}

/** A compressed cluster descriptor (§Compressed Clusters Descriptor): where its bytes lie. */
export function compressedRange(hi: number, lo: number, clusterBits: number): { offset: number; bytes: number } {
  const x = 62 - (clusterBits - 8);
  const v = ((BigInt(hi & 0x3fff_ffff) << 32n) | BigInt(lo >>> 0)) & ((1n << 62n) - 1n);
  const offset = Number(v & ((1n << BigInt(x)) - 1n));
  const extra = Number(v >> BigInt(x));
  // The data starts at `offset` and ends inside the `extra`-th 512-byte sector after offset's own.
  const end = (Math.floor(offset / 512) + extra + 1) * 512;
  return { offset, bytes: end - offset };
}

/** Write a 64-bit entry from a host offset and flag halves. */
export function writeEntry(b: Buffer, at: number, offset: number, flagsHi = 0, flagsLo = 0): void {
  b.writeUInt32BE((Math.floor(offset / 2 ** 32) | flagsHi) >>> 0, at);
  b.writeUInt32BE(((offset >>> 0) | flagsLo) >>> 0, at + 4);
}
