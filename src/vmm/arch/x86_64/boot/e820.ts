/**
 * The guest's physical memory map, as the e820 table in boot_params
 * (Documentation/arch/x86/zero-page.rst, 0x2d0 e820_table) and as the PVH
 * memmap (hvm_memmap_table_entry types share the e820 values).
 */
import {
  EBDA_START,
  HIGH_MEMORY_START,
  MMIO_HOLE_START,
  PCI_ECAM_SIZE,
  PCI_ECAM_START,
  ramRanges,
} from "../layout.js";
import { bootError, hex } from "./errors.js";

export const E820_RAM = 1;
export const E820_RESERVED = 2;

export interface E820Entry {
  addr: number;
  size: number;
  type: number;
}

/**
 * The smallest guest we accept: low memory, the first MiB and 1 MiB above it
 * (loadKernel checks the real need, the kernel's init_size, separately).
 */
export const MIN_MEM_BYTES = 2 * HIGH_MEMORY_START;

/**
 * The map for `memBytes` of RAM laid out as layout.ts `ramRanges` does:
 * - RAM [0, EBDA_START): conventional memory below the EBDA;
 * - reserved [EBDA_START, 1 MiB): EBDA, VGA, option ROMs, BIOS; the ACPI
 *   tables at ACPI_START live here, where Linux scans for the RSDP (ACPI 6.5 §5.2.5.1);
 * - RAM [1 MiB, min(mem, MMIO_HOLE_START));
 * - reserved PCIe ECAM: Linux only trusts MCFG when the ECAM window is
 *   reserved in e820 or by a motherboard resource (arch/x86/pci/mmconfig-shared.c);
 * - RAM above 4 GiB for the rest.
 */
export function e820Map(memBytes: number): E820Entry[] {
  if (!Number.isSafeInteger(memBytes) || memBytes < MIN_MEM_BYTES) {
    throw bootError("MEMORY_TOO_SMALL", `guest memory of ${memBytes} bytes is below the ${MIN_MEM_BYTES}-byte minimum`);
  }
  const map: E820Entry[] = [
    { addr: 0, size: EBDA_START, type: E820_RAM },
    { addr: EBDA_START, size: HIGH_MEMORY_START - EBDA_START, type: E820_RESERVED },
  ];
  for (const r of ramRanges(memBytes)) {
    if (r.start === 0) {
      map.push({ addr: HIGH_MEMORY_START, size: r.size - HIGH_MEMORY_START, type: E820_RAM });
    } else {
      map.push({ addr: r.start, size: r.size, type: E820_RAM });
    }
  }
  map.push({ addr: PCI_ECAM_START, size: PCI_ECAM_SIZE, type: E820_RESERVED });
  return map.sort((a, b) => a.addr - b.addr);
}

/** End of RAM below the MMIO hole: where everything the loader places must end. */
export function lowRamEnd(memBytes: number): number {
  return Math.min(memBytes, MMIO_HOLE_START);
}

export function describeE820(map: readonly E820Entry[]): string {
  return map.map((e) => `[${hex(e.addr)}-${hex(e.addr + e.size - 1)}] ${e.type === E820_RAM ? "usable" : "reserved"}`).join(", ");
}
