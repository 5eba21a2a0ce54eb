/**
 * struct boot_params, the "zero page" (Documentation/arch/x86/zero-page.rst,
 * arch/x86/include/uapi/asm/bootparam.h), for the 64-bit boot protocol
 * (boot.rst §"64-bit Boot Protocol"): zeroed, the image's setup header copied
 * in at 0x1f1, then the loader's fields filled.
 */
import { bootError, hex } from "./errors.js";
import type { E820Entry } from "./e820.js";
import { LOADFLAG_CAN_USE_HEAP, OFF, SETUP_HEADER_OFFSET, type SetupHeader } from "./bzimage.js";

export const BOOT_PARAMS_SIZE = 4096;
/** zero-page.rst offsets. */
export const BP = {
  ACPI_RSDP_ADDR: 0x070,
  EXT_RAMDISK_IMAGE: 0x0c0,
  EXT_RAMDISK_SIZE: 0x0c4,
  EXT_CMD_LINE_PTR: 0x0c8,
  E820_ENTRIES: 0x1e8,
  E820_TABLE: 0x2d0,
} as const;
export const E820_ENTRY_SIZE = 20;
/** E820_MAX_ENTRIES_ZEROPAGE (bootparam.h). */
export const E820_MAX_ENTRIES_ZEROPAGE = 128;
/** boot.rst: "type_of_loader 0xFF: undefined" — the right value for a boot loader without an assigned ID. */
export const TYPE_OF_LOADER_UNDEFINED = 0xff;
/**
 * heap_end_ptr is the end of the setup heap relative to the real-mode code,
 * minus 0x200 (boot.rst sample: heap_end 0xe000). The 64-bit entry skips the
 * real-mode setup, but the header should still be consistent.
 */
export const HEAP_END_PTR = 0xe000 - 0x200;
/** acpi_rsdp_addr is read by the kernel from protocol 2.14 on. */
const PROTOCOL_ACPI_RSDP = 0x020e;

export interface BootParamsInput {
  cmdlineAddr: number;
  cmdlineSize: number;
  initrd: { addr: number; size: number } | undefined;
  rsdpAddr: number;
  e820: readonly E820Entry[];
  /** Where the protected-mode kernel was loaded (code32_start for a relocated kernel). */
  kernelLoadAddr: number;
}

/** Build the zero page; pure (no guest memory touched). */
export function buildBootParams(image: Uint8Array, hdr: SetupHeader, input: BootParamsInput): Uint8Array {
  if (input.e820.length > E820_MAX_ENTRIES_ZEROPAGE) {
    throw bootError("KERNEL_INVALID", `e820 map has ${input.e820.length} entries, the zero page holds ${E820_MAX_ENTRIES_ZEROPAGE}`);
  }
  const bp = new Uint8Array(BOOT_PARAMS_SIZE);
  const dv = new DataView(bp.buffer);
  // boot.rst: copy the setup header from 0x1f1 to 0x202 + byte at 0x201.
  bp.set(image.subarray(SETUP_HEADER_OFFSET, hdr.headerEnd), SETUP_HEADER_OFFSET);

  dv.setUint16(OFF.VID_MODE, 0xffff, true); // "normal" video mode
  bp[OFF.TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED;
  bp[OFF.LOADFLAGS] = hdr.loadflags | LOADFLAG_CAN_USE_HEAP;
  dv.setUint16(OFF.HEAP_END_PTR, HEAP_END_PTR, true);
  // boot.rst code32_start: a loader that puts a relocatable kernel elsewhere sets it to the load address.
  dv.setUint32(OFF.CODE32_START, input.kernelLoadAddr >>> 0, true);

  // setup_data (0x250/8) is a loader-written list head (boot.rst, "write (special)"); we pass none,
  // so an image that ships a nonzero value must not send the kernel chasing it.
  dv.setBigUint64(OFF.SETUP_DATA, 0n, true);
  split32(dv, OFF.CMD_LINE_PTR, BP.EXT_CMD_LINE_PTR, input.cmdlineAddr);
  if (input.initrd !== undefined) {
    split32(dv, OFF.RAMDISK_IMAGE, BP.EXT_RAMDISK_IMAGE, input.initrd.addr);
    split32(dv, OFF.RAMDISK_SIZE, BP.EXT_RAMDISK_SIZE, input.initrd.size);
  }
  if (hdr.version >= PROTOCOL_ACPI_RSDP && input.rsdpAddr !== 0) {
    dv.setBigUint64(BP.ACPI_RSDP_ADDR, BigInt(input.rsdpAddr), true);
  }

  bp[BP.E820_ENTRIES] = input.e820.length;
  input.e820.forEach((e, i) => {
    const off = BP.E820_TABLE + i * E820_ENTRY_SIZE;
    dv.setBigUint64(off, BigInt(e.addr), true);
    dv.setBigUint64(off + 8, BigInt(e.size), true);
    dv.setUint32(off + 16, e.type, true);
  });
  return bp;
}

/** Low 32 bits in the header field, high 32 bits in the ext_ field (zero-page.rst). */
function split32(dv: DataView, lowOff: number, highOff: number, value: number): void {
  if (!Number.isSafeInteger(value) || value < 0) throw bootError("KERNEL_INVALID", `boot_params value ${hex(value)} is out of range`);
  dv.setUint32(lowOff, value % 0x1_0000_0000, true);
  dv.setUint32(highOff, Math.floor(value / 0x1_0000_0000), true);
}

/**
 * The command line as NUL-terminated bytes, checked against the kernel's
 * limit (boot.rst cmdline_size: "at most cmdline_size characters", without
 * the NUL) and the space at CMDLINE_ADDR.
 */
export function encodeCmdline(cmdline: string, maxChars: number): Uint8Array {
  if (cmdline.includes("\0")) throw bootError("CMDLINE_INVALID", "kernel command line contains a NUL character");
  const bytes = new TextEncoder().encode(cmdline);
  if (bytes.length > maxChars) {
    throw bootError("CMDLINE_TOO_LONG", `kernel command line is ${bytes.length} bytes, the kernel accepts at most ${maxChars}`);
  }
  const out = new Uint8Array(bytes.length + 1);
  out.set(bytes);
  return out;
}
