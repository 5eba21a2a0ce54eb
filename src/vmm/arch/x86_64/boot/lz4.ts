/**
 * LZ4 "legacy frame" decompression, written from the format descriptions
 * (lz4 doc/lz4_Block_format.md and lz4_Frame_format.md §"Legacy frame").
 *
 * Why our own and not an npm package: the format is a page long, the
 * maintained packages are native addons or bundle the modern frame format we
 * do not need, and the input here is hostile (a user-supplied kernel), so we
 * want every bound visible: no read past the input, no write past a fixed
 * output limit, every malformed case a KERNEL_INVALID error.
 *
 * Debian kernels with CONFIG_KERNEL_LZ4 carry their vmlinux in this format,
 * followed by a 4-byte little-endian uncompressed size (Linux
 * scripts/Makefile.lib `size_append`, consumed in lib/decompress_unlz4.c).
 */
import { kernelInvalid, hex } from "./errors.js";
import { parseBzImage } from "./bzimage.js";

/** Legacy frame magic, little-endian bytes 02 21 4c 18. */
export const LZ4_LEGACY_MAGIC = 0x184c2102;
/** Every legacy block decompresses to at most 8 MiB (lz4_Frame_format.md §Legacy frame). */
export const LZ4_LEGACY_BLOCK_MAX = 8 << 20;
/** LZ4_compressBound(8 MiB): the largest a legacy block can be when compressed. */
const LZ4_LEGACY_COMPRESSED_MAX = LZ4_LEGACY_BLOCK_MAX + Math.floor(LZ4_LEGACY_BLOCK_MAX / 255) + 16;
/** Refuse to inflate anything bigger than this (a vmlinux is well under 256 MiB). */
export const VMLINUX_MAX = 512 << 20;

function u32(b: Uint8Array, off: number): number {
  return ((b[off]! | (b[off + 1]! << 8) | (b[off + 2]! << 16)) >>> 0) + b[off + 3]! * 0x1000000;
}

/**
 * Decompress one LZ4 block `src[start, end)` into `out` starting at `outPos`,
 * never writing at or past `outEnd`. Matches may only reach back into this
 * block's own output (legacy blocks are independent). Returns the new output
 * position.
 */
export function decompressLz4Block(src: Uint8Array, start: number, end: number, out: Uint8Array, outPos: number, outEnd: number): number {
  if (end > src.length || start > end || outEnd > out.length) throw kernelInvalid("LZ4 block bounds are inconsistent");
  const blockOut = outPos;
  let ip = start;
  let op = outPos;
  if (ip === end) throw kernelInvalid("LZ4 block is empty");
  while (ip < end) {
    const token = src[ip++]!;
    // Literal length: high nibble, 15 means "add following bytes until one is not 255".
    let litLen = token >>> 4;
    if (litLen === 15) {
      let b: number;
      do {
        if (ip >= end) throw kernelInvalid("LZ4 literal length runs past the end of the block");
        b = src[ip++]!;
        litLen += b;
      } while (b === 255);
    }
    if (litLen > end - ip) throw kernelInvalid("LZ4 literals run past the end of the block");
    if (litLen > outEnd - op) throw kernelInvalid("LZ4 output exceeds its size limit");
    out.set(src.subarray(ip, ip + litLen), op);
    ip += litLen;
    op += litLen;
    // The last sequence of a block has literals only.
    if (ip === end) break;
    if (end - ip < 2) throw kernelInvalid("LZ4 match offset is truncated");
    const offset = src[ip]! | (src[ip + 1]! << 8);
    ip += 2;
    if (offset === 0 || offset > op - blockOut) throw kernelInvalid(`LZ4 match offset ${offset} points before the block's output`);
    let matchLen = (token & 15) + 4;
    if ((token & 15) === 15) {
      let b: number;
      do {
        if (ip >= end) throw kernelInvalid("LZ4 match length runs past the end of the block");
        b = src[ip++]!;
        matchLen += b;
      } while (b === 255);
    }
    if (matchLen > outEnd - op) throw kernelInvalid("LZ4 output exceeds its size limit");
    let from = op - offset;
    if (offset >= matchLen) {
      out.copyWithin(op, from, from + matchLen);
      op += matchLen;
    } else {
      // Overlapping copy repeats the last `offset` bytes: must go byte by byte.
      for (let i = 0; i < matchLen; i++) out[op++] = out[from++]!;
    }
  }
  return op;
}

/**
 * Decompress a complete legacy frame (magic, then blocks each prefixed by
 * their compressed size; a repeated magic starts a concatenated frame).
 * `expectedSize`, when known, must match exactly; otherwise output is capped
 * at `maxOutput`.
 */
export function decompressLz4Legacy(input: Uint8Array, opts: { expectedSize?: number; maxOutput?: number } = {}): Uint8Array {
  const maxOutput = opts.expectedSize ?? opts.maxOutput ?? VMLINUX_MAX;
  if (!Number.isSafeInteger(maxOutput) || maxOutput < 0 || maxOutput > VMLINUX_MAX) {
    throw kernelInvalid(`LZ4 output size ${maxOutput} is beyond the ${VMLINUX_MAX}-byte limit`);
  }
  if (input.length < 4 || u32(input, 0) !== LZ4_LEGACY_MAGIC) throw kernelInvalid("LZ4 legacy frame magic 0x184c2102 not found");
  // With a known size, decode straight into the final buffer; otherwise grow
  // in block-sized steps so a tiny hostile input cannot make us allocate the cap.
  let out = new Uint8Array(opts.expectedSize ?? Math.min(maxOutput, LZ4_LEGACY_BLOCK_MAX));
  let op = 0;
  let ip = 4;
  while (ip < input.length) {
    if (input.length - ip < 4) throw kernelInvalid("LZ4 block size field is truncated");
    const size = u32(input, ip);
    ip += 4;
    if (size === LZ4_LEGACY_MAGIC) continue;
    if (size === 0 || size > LZ4_LEGACY_COMPRESSED_MAX) throw kernelInvalid(`LZ4 block size ${size} is invalid`);
    if (size > input.length - ip) throw kernelInvalid(`LZ4 block of ${size} bytes at ${hex(ip)} runs past the end of the input`);
    const limit = Math.min(maxOutput, op + LZ4_LEGACY_BLOCK_MAX);
    if (opts.expectedSize === undefined && out.length < limit) {
      const bigger = new Uint8Array(limit);
      bigger.set(out.subarray(0, op));
      out = bigger;
    }
    op = decompressLz4Block(input, ip, ip + size, out, op, limit);
    ip += size;
  }
  if (opts.expectedSize !== undefined && op !== opts.expectedSize) {
    throw kernelInvalid(`LZ4 payload decompressed to ${op} bytes, the image says ${opts.expectedSize}`);
  }
  return op === out.length ? out : out.slice(0, op);
}

const PAYLOAD_MAGICS: readonly [string, number[]][] = [
  ["gzip", [0x1f, 0x8b]],
  ["gzip", [0x1f, 0x9e]],
  ["bzip2", [0x42, 0x5a]],
  ["LZMA", [0x5d, 0x00]],
  ["XZ", [0xfd, 0x37]],
  ["ZSTD", [0x28, 0xb5]],
  ["uncompressed ELF", [0x7f, 0x45]],
];

/**
 * The vmlinux (ELF) inside an LZ4-compressed bzImage. The payload is found
 * through the setup header's payload_offset/payload_length (boot protocol
 * 2.08+, relative to the protected-mode code); its last 4 bytes are the
 * uncompressed size.
 */
export function extractVmlinux(bzImage: Uint8Array): Uint8Array {
  const hdr = parseBzImage(bzImage);
  if (hdr.payloadLength === 0) throw kernelInvalid("the setup header names no compressed payload (payload_length is 0)");
  const start = hdr.protectedModeOffset + hdr.payloadOffset;
  const payload = bzImage.subarray(start, start + hdr.payloadLength);
  if (payload.length < 8) throw kernelInvalid("compressed payload is too short");
  if (u32(payload, 0) !== LZ4_LEGACY_MAGIC) {
    const known = PAYLOAD_MAGICS.find(([, m]) => payload[0] === m[0] && payload[1] === m[1]);
    throw kernelInvalid(`payload is ${known ? known[0] : "in an unknown format"}; only LZ4 (legacy frame) payloads can be extracted`);
  }
  const expectedSize = u32(payload, payload.length - 4);
  if (expectedSize > VMLINUX_MAX) throw kernelInvalid(`payload claims ${expectedSize} uncompressed bytes, beyond the ${VMLINUX_MAX}-byte limit`);
  // LZ4 cannot expand more than ~255:1 (one extra length byte per 255 output bytes), so a
  // bigger claim is a lie; checking it first keeps a tiny hostile image from making us allocate.
  if (expectedSize > payload.length * 256) throw kernelInvalid(`payload claims ${expectedSize} uncompressed bytes from ${payload.length} compressed ones`);
  const vmlinux = decompressLz4Legacy(payload.subarray(0, payload.length - 4), { expectedSize });
  if (vmlinux.length < 4 || vmlinux[0] !== 0x7f || vmlinux[1] !== 0x45 || vmlinux[2] !== 0x4c || vmlinux[3] !== 0x46) {
    throw kernelInvalid("decompressed payload is not an ELF file");
  }
  return vmlinux;
}
