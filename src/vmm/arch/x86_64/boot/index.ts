/**
 * Kernel loading for the x86_64 VMM: a bzImage through the Linux 64-bit boot
 * protocol, or an ELF vmlinux through the PVH entry. `loadKernel` validates
 * the image and computes every write first; guest memory is untouched unless
 * the whole plan is valid.
 */
import { Buffer } from "node:buffer";
import type { GuestMemory } from "../../../memory/guest-memory.js";
import { ACPI_START, CMDLINE_ADDR, CMDLINE_MAX, HIGH_MEMORY_START, MMIO_HOLE_START, PVH_INFO_ADDR, ZERO_PAGE_ADDR, ramRanges } from "../layout.js";
import { buildBootParams, encodeCmdline } from "./boot-params.js";
import { parseBzImage } from "./bzimage.js";
import { bootGdtWrites, identityPageTableWrites, linux64CpuState, pvhCpuState, type BootCpuState } from "./cpu-state.js";
import { e820Map, lowRamEnd, type E820Entry } from "./e820.js";
import { isElf, parseElf } from "./elf.js";
import { bootError, hex, kernelInvalid } from "./errors.js";
import { applyWrites, placeBzImageKernel, placeInitrd, type MemWrite, type Range } from "./placement.js";
import { buildPvhStartInfo } from "./pvh.js";

export type { BootCpuState, Segment } from "./cpu-state.js";
export type { E820Entry } from "./e820.js";
export { extractVmlinux } from "./lz4.js";
export { parseBzImage, type SetupHeader } from "./bzimage.js";
export { parseElf, type ElfImage } from "./elf.js";
export { e820Map } from "./e820.js";

export type KernelFormat = "bzimage" | "elf";

export interface LoadKernelOptions {
  kernel: Uint8Array;
  initrd?: Uint8Array;
  cmdline: string;
  memBytes: number;
  rsdpAddr: number;
}

export interface BootPlan {
  format: KernelFormat;
  protocol: "linux64" | "pvh";
  cpu: BootCpuState;
  e820: { addr: number; size: number; type: number }[];
  kernelVersion?: string;
  /** Where things were put (for logs and tests). */
  layout?: { kernel: Range; initrd?: Range; cmdline: Range; bootInfo: Range };
}

/**
 * Linux x86 COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h) is 2048 with the
 * NUL; PVH has no header to tell us, and the kernel would silently truncate.
 */
const PVH_CMDLINE_MAX_CHARS = 2047;

/** "bzimage" for a Linux setup header ("HdrS" at 0x202), "elf" for ELF; KERNEL_INVALID otherwise. */
export function detectKernelFormat(kernel: Uint8Array): KernelFormat {
  if (isElf(kernel)) return "elf";
  if (kernel.length >= 0x206 && kernel[0x202] === 0x48 && kernel[0x203] === 0x64 && kernel[0x204] === 0x72 && kernel[0x205] === 0x53) {
    return "bzimage";
  }
  throw kernelInvalid(`neither a bzImage (no "HdrS" at 0x202) nor an ELF vmlinux (${kernel.length} bytes)`);
}

function planKernel(opts: LoadKernelOptions): { plan: BootPlan; writes: MemWrite[] } {
  if (!Number.isSafeInteger(opts.rsdpAddr) || opts.rsdpAddr < 0) throw bootError("KERNEL_INVALID", `RSDP address ${opts.rsdpAddr} is invalid`);
  const e820 = e820Map(opts.memBytes);
  const format = detectKernelFormat(opts.kernel);
  const initrd = opts.initrd !== undefined && opts.initrd.length > 0 ? opts.initrd : undefined;
  return format === "bzimage" ? planBzImage(opts, initrd, e820) : planPvh(opts, initrd, e820);
}

/**
 * Every check loadKernel makes (format, header, placement of kernel and initrd
 * in `memBytes` of RAM, command line) without guest memory: lets a caller
 * reject bad input before it creates a VM, or before it hands the command to the lab.
 */
export function validateKernel(opts: Omit<LoadKernelOptions, "rsdpAddr">): BootPlan {
  return planKernel({ ...opts, rsdpAddr: ACPI_START }).plan;
}

/** Validates everything first (no guest memory is written if the image is bad), then loads. */
export function loadKernel(mem: GuestMemory, opts: LoadKernelOptions): BootPlan {
  for (const r of ramRanges(opts.memBytes)) {
    if (!mem.contains(r.start, r.size)) {
      throw bootError("MEMORY_TOO_SMALL", `guest memory does not back RAM [${hex(r.start)}, +${hex(r.size)}) of the ${opts.memBytes}-byte map`);
    }
  }
  const { plan, writes } = planKernel(opts);
  applyWrites(mem, writes);
  return plan;
}

function planBzImage(
  opts: LoadKernelOptions,
  initrd: Uint8Array | undefined,
  e820: E820Entry[],
): { plan: BootPlan; writes: MemWrite[] } {
  const hdr = parseBzImage(opts.kernel);
  const lowEnd = lowRamEnd(opts.memBytes);
  const kernel = placeBzImageKernel(hdr, lowEnd);
  const cmdline = encodeCmdline(opts.cmdline, Math.min(hdr.cmdlineSize, CMDLINE_MAX - 1));
  let initrdRange: Range | undefined;
  if (initrd !== undefined) {
    // initrd_addr_max is inclusive; the ramdisk fields are 32-bit unless ext_ fields are used (we stay below 4 GiB).
    const limit = Math.min(hdr.initrdAddrMax + 1, lowEnd);
    initrdRange = { addr: placeInitrd(initrd.length, limit, [{ addr: kernel.loadAddr, size: kernel.reserved }]), size: initrd.length };
  }
  const zeroPage = buildBootParams(opts.kernel, hdr, {
    cmdlineAddr: CMDLINE_ADDR,
    cmdlineSize: cmdline.length,
    initrd: initrdRange,
    rsdpAddr: opts.rsdpAddr,
    e820,
    kernelLoadAddr: kernel.loadAddr,
  });
  const writes: MemWrite[] = [
    ...bootGdtWrites(true),
    ...identityPageTableWrites(),
    { addr: ZERO_PAGE_ADDR, data: zeroPage },
    { addr: CMDLINE_ADDR, data: cmdline },
    { addr: kernel.loadAddr, data: opts.kernel.subarray(hdr.protectedModeOffset) },
  ];
  if (initrd !== undefined && initrdRange !== undefined) writes.push({ addr: initrdRange.addr, data: initrd });
  const plan: BootPlan = {
    format: "bzimage",
    protocol: "linux64",
    // boot.rst §64-bit Boot Protocol: the 64-bit entry is the load address + 0x200.
    cpu: linux64CpuState(kernel.loadAddr + 0x200, ZERO_PAGE_ADDR),
    e820,
    layout: {
      kernel: { addr: kernel.loadAddr, size: kernel.reserved },
      cmdline: { addr: CMDLINE_ADDR, size: cmdline.length },
      bootInfo: { addr: ZERO_PAGE_ADDR, size: zeroPage.length },
      ...(initrdRange !== undefined ? { initrd: initrdRange } : {}),
    },
  };
  if (hdr.kernelVersion !== undefined) plan.kernelVersion = hdr.kernelVersion;
  return { plan, writes };
}

function planPvh(opts: LoadKernelOptions, initrd: Uint8Array | undefined, e820: E820Entry[]): { plan: BootPlan; writes: MemWrite[] } {
  const elf = parseElf(opts.kernel);
  if (elf.pvhEntry === undefined) {
    throw kernelInvalid("ELF kernel has no PVH entry note (Xen XEN_ELFNOTE_PHYS32_ENTRY); only PVH is supported for ELF, build with CONFIG_PVH=y or use the bzImage");
  }
  const lowEnd = lowRamEnd(opts.memBytes);
  const ram = ramRanges(opts.memBytes);
  const writes: MemWrite[] = [];
  let kStart = Number.MAX_SAFE_INTEGER;
  let kEnd = 0;
  for (const s of elf.segments) {
    const end = s.paddr + s.memSize;
    // Below 1 MiB live our boot structures and the legacy area.
    if (s.paddr < HIGH_MEMORY_START) throw kernelInvalid(`ELF segment at ${hex(s.paddr)} lies below 1 MiB`);
    if (!ram.some((r) => s.paddr >= r.start && end <= r.start + r.size)) {
      // More memory would help only if the segment ends below the MMIO hole.
      if (end <= MMIO_HOLE_START) {
        throw bootError("MEMORY_TOO_SMALL", `ELF segment [${hex(s.paddr)}, ${hex(end)}) lies beyond guest RAM`, `give the VM more than ${Math.ceil(end / (1 << 20))} MiB of memory`);
      }
      throw kernelInvalid(`ELF segment [${hex(s.paddr)}, ${hex(end)}) lies outside guest RAM`);
    }
    writes.push({ addr: s.paddr, data: opts.kernel.subarray(s.fileOffset, s.fileOffset + s.fileSize) });
    if (s.memSize > s.fileSize) writes.push({ addr: s.paddr + s.fileSize, zero: s.memSize - s.fileSize });
    kStart = Math.min(kStart, s.paddr);
    kEnd = Math.max(kEnd, end);
  }
  const cmdline = encodeCmdline(opts.cmdline, PVH_CMDLINE_MAX_CHARS);
  let initrdRange: Range | undefined;
  if (initrd !== undefined) {
    const busy = elf.segments.map((s) => ({ addr: s.paddr, size: s.memSize }));
    initrdRange = { addr: placeInitrd(initrd.length, lowEnd, busy), size: initrd.length };
    writes.push({ addr: initrdRange.addr, data: initrd });
  }
  const startInfo = buildPvhStartInfo({ cmdlineAddr: CMDLINE_ADDR, rsdpAddr: opts.rsdpAddr, initrd: initrdRange, memmap: e820 });
  writes.push(...bootGdtWrites(false), { addr: PVH_INFO_ADDR, data: startInfo }, { addr: CMDLINE_ADDR, data: cmdline });
  const plan: BootPlan = {
    format: "elf",
    protocol: "pvh",
    cpu: pvhCpuState(elf.pvhEntry, PVH_INFO_ADDR),
    e820,
    layout: {
      kernel: { addr: kStart, size: kEnd - kStart },
      cmdline: { addr: CMDLINE_ADDR, size: cmdline.length },
      bootInfo: { addr: PVH_INFO_ADDR, size: startInfo.length },
      ...(initrdRange !== undefined ? { initrd: initrdRange } : {}),
    },
  };
  const version = findLinuxBanner(opts.kernel);
  if (version !== undefined) plan.kernelVersion = version;
  return { plan, writes };
}

/** The "Linux version ..." banner inside a vmlinux, for logs (init/version.c linux_banner). */
function findLinuxBanner(image: Uint8Array): string | undefined {
  const buf = Buffer.from(image.buffer, image.byteOffset, image.byteLength);
  const prefix = "Linux version ";
  const at = buf.indexOf(prefix, 0, "latin1");
  if (at < 0) return undefined;
  let end = at + prefix.length;
  const limit = Math.min(buf.length, end + 256);
  while (end < limit && buf[end]! >= 0x20 && buf[end]! <= 0x7e) end++;
  const s = buf.toString("latin1", at + prefix.length, end).trim();
  return s.length > 0 ? s : undefined;
}
