/**
 * The bzImage setup header (Linux boot protocol, Documentation/arch/x86/boot.rst
 * §"The Real-Mode Kernel Header"; struct setup_header in
 * arch/x86/include/uapi/asm/bootparam.h). Offsets below are file offsets,
 * which equal offsets inside struct boot_params for the header fields.
 *
 * We only boot through the 64-bit entry, so we require protocol 2.12+
 * (xloadflags) with XLF_KERNEL_64, and a bzImage (LOADED_HIGH).
 */
import { kernelInvalid, hex } from "./errors.js";

export const SETUP_HEADER_OFFSET = 0x1f1;
/** boot.rst: the setup header ends at 0x202 + the byte at 0x201 (the jump's displacement). */
export const SETUP_HEADER_JUMP = 0x200;
/** boot_params reserves [0x1f1, 0x290) for the header (bootparam.h: _pad7 up to edd_mbr_sig_buffer). */
export const SETUP_HEADER_HOLE_END = 0x290;

export const OFF = {
  SETUP_SECTS: 0x1f1,
  SYSSIZE: 0x1f4,
  VID_MODE: 0x1fa,
  BOOT_FLAG: 0x1fe,
  JUMP: 0x200,
  HEADER: 0x202,
  VERSION: 0x206,
  KERNEL_VERSION: 0x20e,
  TYPE_OF_LOADER: 0x210,
  LOADFLAGS: 0x211,
  CODE32_START: 0x214,
  RAMDISK_IMAGE: 0x218,
  RAMDISK_SIZE: 0x21c,
  HEAP_END_PTR: 0x224,
  CMD_LINE_PTR: 0x228,
  INITRD_ADDR_MAX: 0x22c,
  KERNEL_ALIGNMENT: 0x230,
  RELOCATABLE_KERNEL: 0x234,
  MIN_ALIGNMENT: 0x235,
  XLOADFLAGS: 0x236,
  CMDLINE_SIZE: 0x238,
  PAYLOAD_OFFSET: 0x248,
  PAYLOAD_LENGTH: 0x24c,
  SETUP_DATA: 0x250,
  PREF_ADDRESS: 0x258,
  INIT_SIZE: 0x260,
} as const;

/** "HdrS" little-endian. */
export const HDRS_MAGIC = 0x53726448;
export const BOOT_FLAG_MAGIC = 0xaa55;
/** Protocol 2.12: first with xloadflags (and so XLF_KERNEL_64). */
export const MIN_PROTOCOL = 0x020c;
export const LOADFLAG_LOADED_HIGH = 0x01;
export const LOADFLAG_CAN_USE_HEAP = 0x80;
export const XLF_KERNEL_64 = 0x01;
export const XLF_CAN_BE_LOADED_ABOVE_4G = 0x02;
/** End of the last field we read (init_size, 0x260/4). */
const REQUIRED_HEADER_END = OFF.INIT_SIZE + 4;

export interface SetupHeader {
  /** Protocol version, e.g. 0x020f for 2.15. */
  version: number;
  /** setup_sects with 0 already replaced by 4. */
  setupSects: number;
  /** File offset of the protected-mode kernel: (setup_sects + 1) * 512. */
  protectedModeOffset: number;
  /** Bytes of protected-mode kernel in the file (everything after the setup code). */
  protectedModeSize: number;
  /** File offset one past the setup header (0x202 + byte at 0x201). */
  headerEnd: number;
  loadflags: number;
  xloadflags: number;
  relocatable: boolean;
  kernelAlignment: number;
  /** Highest address the initrd may occupy (inclusive, boot.rst initrd_addr_max). */
  initrdAddrMax: number;
  cmdlineSize: number;
  payloadOffset: number;
  payloadLength: number;
  prefAddress: number;
  initSize: number;
  /** The kernel_version string, when the header points at a printable one. */
  kernelVersion: string | undefined;
}

/**
 * Parse and validate the setup header of `image`. Every malformed or truncated
 * case throws TypevisorError KERNEL_INVALID saying what is wrong.
 */
export function parseBzImage(image: Uint8Array): SetupHeader {
  if (image.length < OFF.VERSION + 2) throw kernelInvalid(`file is ${image.length} bytes, too short for a Linux setup header`);
  const dv = new DataView(image.buffer, image.byteOffset, image.byteLength);
  if (dv.getUint32(OFF.HEADER, true) !== HDRS_MAGIC) throw kernelInvalid('no "HdrS" signature at 0x202: not a bzImage');
  const version = dv.getUint16(OFF.VERSION, true);
  if (version < MIN_PROTOCOL) {
    throw kernelInvalid(`boot protocol ${version >> 8}.${version & 0xff} is older than 2.12 (no 64-bit entry)`);
  }
  if (image[OFF.JUMP] !== 0xeb) throw kernelInvalid(`no short jump at 0x200 (found ${hex(image[OFF.JUMP]!)}): header length unknown`);
  const headerEnd = OFF.HEADER + image[OFF.JUMP + 1]!;
  if (headerEnd < REQUIRED_HEADER_END) throw kernelInvalid(`setup header ends at ${hex(headerEnd)}, before init_size (0x264) for protocol 2.12+`);
  if (headerEnd > SETUP_HEADER_HOLE_END) throw kernelInvalid(`setup header ends at ${hex(headerEnd)}, past its 0x290 limit in boot_params`);
  if (image.length < headerEnd) throw kernelInvalid(`file is truncated inside the setup header (${image.length} bytes, header ends at ${hex(headerEnd)})`);
  if (dv.getUint16(OFF.BOOT_FLAG, true) !== BOOT_FLAG_MAGIC) throw kernelInvalid("boot_flag at 0x1fe is not 0xAA55");

  const loadflags = image[OFF.LOADFLAGS]!;
  if ((loadflags & LOADFLAG_LOADED_HIGH) === 0) throw kernelInvalid("loadflags lacks LOADED_HIGH: a zImage, not a bzImage");
  const xloadflags = dv.getUint16(OFF.XLOADFLAGS, true);
  if ((xloadflags & XLF_KERNEL_64) === 0) throw kernelInvalid("xloadflags lacks XLF_KERNEL_64: no 64-bit entry point");

  const rawSects = image[OFF.SETUP_SECTS]!;
  const setupSects = rawSects === 0 ? 4 : rawSects;
  const protectedModeOffset = (setupSects + 1) * 512;
  if (image.length <= protectedModeOffset) {
    throw kernelInvalid(`file is ${image.length} bytes but the protected-mode kernel starts at ${hex(protectedModeOffset)} (setup_sects ${setupSects})`);
  }
  const protectedModeSize = image.length - protectedModeOffset;
  // syssize (2.04+: 32 bits) counts 16-byte paragraphs of protected-mode code.
  const sysBytes = dv.getUint32(OFF.SYSSIZE, true) * 16;
  if (sysBytes === 0) throw kernelInvalid("syssize is 0");
  if (sysBytes > protectedModeSize) {
    throw kernelInvalid(`file is truncated: syssize says ${sysBytes} bytes of protected-mode kernel, the file has ${protectedModeSize}`);
  }

  const relocatable = image[OFF.RELOCATABLE_KERNEL]! !== 0;
  const kernelAlignment = dv.getUint32(OFF.KERNEL_ALIGNMENT, true);
  if (relocatable && (kernelAlignment === 0 || (kernelAlignment & (kernelAlignment - 1)) !== 0 || kernelAlignment < 0x1000)) {
    throw kernelInvalid(`kernel_alignment ${hex(kernelAlignment)} is not a power of two of at least 4 KiB`);
  }
  const prefBig = dv.getBigUint64(OFF.PREF_ADDRESS, true);
  if (prefBig > BigInt(Number.MAX_SAFE_INTEGER)) throw kernelInvalid(`pref_address ${hex(prefBig)} is out of range`);
  const prefAddress = Number(prefBig);
  if (!relocatable && prefAddress === 0) throw kernelInvalid("kernel is not relocatable and has no pref_address");
  const initSize = dv.getUint32(OFF.INIT_SIZE, true);
  if (initSize === 0) throw kernelInvalid("init_size is 0");
  const cmdlineSize = dv.getUint32(OFF.CMDLINE_SIZE, true);
  const initrdAddrMax = dv.getUint32(OFF.INITRD_ADDR_MAX, true);

  const payloadOffset = dv.getUint32(OFF.PAYLOAD_OFFSET, true);
  const payloadLength = dv.getUint32(OFF.PAYLOAD_LENGTH, true);
  if (payloadLength !== 0 && payloadOffset + payloadLength > protectedModeSize) {
    throw kernelInvalid(
      `payload [${hex(payloadOffset)}, +${hex(payloadLength)}) lies outside the ${protectedModeSize}-byte protected-mode kernel (file truncated?)`,
    );
  }

  return {
    version,
    setupSects,
    protectedModeOffset,
    protectedModeSize,
    headerEnd,
    loadflags,
    xloadflags,
    relocatable,
    kernelAlignment,
    initrdAddrMax,
    cmdlineSize,
    payloadOffset,
    payloadLength,
    prefAddress,
    initSize,
    kernelVersion: readKernelVersion(image, dv, protectedModeOffset),
  };
}

/**
 * boot.rst kernel_version (0x20e/2): if nonzero, the string is at this value
 * + 0x200 in the file, inside the setup code. Only a NUL-terminated printable
 * string is returned; anything else is ignored (it is only for logs).
 */
function readKernelVersion(image: Uint8Array, dv: DataView, setupEnd: number): string | undefined {
  const ptr = dv.getUint16(OFF.KERNEL_VERSION, true);
  if (ptr === 0) return undefined;
  const start = ptr + 0x200;
  const end = Math.min(setupEnd, start + 256);
  let s = "";
  for (let i = start; i < end; i++) {
    const c = image[i]!;
    if (c === 0) return s.length > 0 ? s : undefined;
    if (c < 0x20 || c > 0x7e) return undefined;
    s += String.fromCharCode(c);
  }
  return undefined;
}
