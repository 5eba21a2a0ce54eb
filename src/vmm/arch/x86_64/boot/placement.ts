/**
 * Where the kernel and the initrd go in guest-physical memory, and the
 * write plan that puts them there. Everything is computed and checked first;
 * guest memory is only written by `applyWrites`, once the whole plan is known
 * to fit.
 */
import type { GuestMemory } from "../../../memory/guest-memory.js";
import { HIGH_MEMORY_START } from "../layout.js";
import type { SetupHeader } from "./bzimage.js";
import { bootError, hex, kernelInvalid } from "./errors.js";

export interface Range {
  addr: number;
  size: number;
}

/** One planned write: `data` copied to `addr`, or `zero` bytes cleared at `addr`. */
export type MemWrite = { addr: number; data: Uint8Array } | { addr: number; zero: number };

export const PAGE_SIZE = 0x1000;

export function writeLength(w: MemWrite): number {
  return "data" in w ? w.data.length : w.zero;
}

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}
function alignDown(n: number, a: number): number {
  return Math.floor(n / a) * a;
}
const MiB = 1 << 20;
function mib(n: number): string {
  return `${Math.ceil(n / MiB)} MiB`;
}

export interface KernelPlacement {
  /** Where the protected-mode code is copied; the 64-bit entry is this + 0x200. */
  loadAddr: number;
  /** [loadAddr, loadAddr + reserved): what the kernel may use before it reads the e820 map. */
  reserved: number;
}

/**
 * Place a bzImage's protected-mode kernel.
 *
 * boot.rst init_size: the kernel needs init_size bytes from its runtime start,
 * which is align_up(load, kernel_alignment) for a relocatable kernel and
 * pref_address otherwise. The decompressor also never runs below
 * LOAD_PHYSICAL_ADDR (= pref_address; arch/x86/boot/compressed/head_64.S,
 * startup_64 "Target address to relocate to"), so loading lower saves nothing.
 * We therefore load at pref_address (aligned): then the range the kernel
 * actually uses is exactly [load, load + init_size), which we check against RAM.
 * crosvm and QEMU load at 1 MiB and let the kernel move itself up; loading at
 * the runtime address spares that copy and makes the check exact.
 */
export function placeBzImageKernel(hdr: SetupHeader, lowRamEnd: number): KernelPlacement {
  let loadAddr: number;
  if (hdr.relocatable) {
    loadAddr = alignUp(Math.max(hdr.prefAddress, HIGH_MEMORY_START), hdr.kernelAlignment);
  } else {
    if (hdr.prefAddress < HIGH_MEMORY_START) throw kernelInvalid(`non-relocatable kernel wants to run at ${hex(hdr.prefAddress)}, below 1 MiB`);
    loadAddr = hdr.prefAddress;
  }
  const reserved = Math.max(hdr.initSize, hdr.protectedModeSize);
  const end = loadAddr + reserved;
  if (end > lowRamEnd) {
    throw bootError(
      "MEMORY_TOO_SMALL",
      `kernel needs [${hex(loadAddr)}, ${hex(end)}) (init_size ${mib(hdr.initSize)}) but RAM below 4 GiB ends at ${hex(lowRamEnd)}`,
      `give the VM more than ${mib(end)} of memory`,
    );
  }
  return { loadAddr, reserved };
}

/**
 * The highest page-aligned address for `size` bytes inside [lo, hi) that
 * overlaps none of `busy`; undefined when there is none.
 */
export function highestFreeSlot(size: number, lo: number, hi: number, busy: readonly Range[]): number | undefined {
  if (size <= 0 || hi - lo < size) return undefined;
  let candidate = alignDown(hi - size, PAGE_SIZE);
  while (candidate >= lo) {
    const end = candidate + size;
    const hit = busy.find((b) => b.size > 0 && candidate < b.addr + b.size && b.addr < end);
    if (hit === undefined) return candidate;
    candidate = alignDown(hit.addr - size, PAGE_SIZE);
  }
  return undefined;
}

/**
 * Place the initrd as high as possible below `limit` (boot.rst: initrd_addr_max
 * is the highest byte it may occupy; the kernel's own advice is "near end of
 * memory"), page aligned, above 1 MiB, clear of `busy` (the kernel's range).
 */
export function placeInitrd(size: number, limit: number, busy: readonly Range[]): number {
  const addr = highestFreeSlot(size, HIGH_MEMORY_START, limit, busy);
  if (addr === undefined) {
    const free = limit - HIGH_MEMORY_START - busy.reduce((n, b) => n + b.size, 0);
    throw bootError(
      "INITRD_TOO_LARGE",
      `initrd of ${size} bytes does not fit in guest memory below ${hex(limit)} beside the kernel (at most ${Math.max(0, free)} bytes free)`,
      "give the VM more memory or use a smaller initrd",
    );
  }
  return addr;
}

/** Every write is checked against guest RAM before the first one is made. */
export function checkWrites(mem: GuestMemory, writes: readonly MemWrite[]): void {
  for (const w of writes) {
    if (!mem.contains(w.addr, writeLength(w))) {
      throw bootError("MEMORY_TOO_SMALL", `boot data [${hex(w.addr)}, +${hex(writeLength(w))}) lies outside guest RAM`);
    }
  }
}

export function applyWrites(mem: GuestMemory, writes: readonly MemWrite[]): void {
  checkWrites(mem, writes);
  for (const w of writes) {
    if ("data" in w) mem.write(w.addr, w.data);
    else mem.fill(w.addr, w.zero, 0);
  }
}
