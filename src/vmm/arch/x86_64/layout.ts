/**
 * The x86_64 guest-physical memory map and fixed addresses, in one place.
 *
 * Low memory follows the PC convention Linux expects (boot protocol, "The
 * Linux/x86 Boot Protocol" §"Memory layout"): usable RAM up to the EBDA at
 * 0x9fc00, the legacy VGA/BIOS area reserved up to 1 MiB, and the ACPI RSDP in
 * 0xe0000-0xfffff where Linux also scans for it (ACPI 6.5 §5.2.5.1).
 * A 1 GiB hole below 4 GiB holds device MMIO (PCI BARs, IOAPIC, LAPIC);
 * RAM beyond it continues at 4 GiB.
 */

/** Real-mode IVT/BDA page: left zero. */
export const BOOT_GDT_ADDR = 0x500;
export const BOOT_IDT_ADDR = 0x520;
/** PVH `struct hvm_start_info` and its memory map follow it. */
export const PVH_INFO_ADDR = 0x6000;
/** The "zero page": `struct boot_params` for the bzImage 64-bit entry. */
export const ZERO_PAGE_ADDR = 0x7000;
/** Initial stack pointer for the boot CPU (grows down below the page tables). */
export const BOOT_STACK_POINTER = 0x8ff0;
/** Identity-mapped page tables for the 64-bit entry: PML4, PDPT, then 4 PDs (4 GiB of 2 MiB pages). */
export const PML4_ADDR = 0x9000;
export const PDPT_ADDR = 0xa000;
export const PD_ADDR = 0xb000;
/** Kernel command line (NUL-terminated). */
export const CMDLINE_ADDR = 0x20000;
export const CMDLINE_MAX = 0x10000;
/** End of conventional low RAM; the EBDA starts here. */
export const EBDA_START = 0x9fc00;
/** Reserved legacy area (VGA, option ROMs, BIOS) up to 1 MiB. */
export const LEGACY_AREA_START = 0xa0000;
/**
 * The 16-byte Virtual Machine Generation ID (Microsoft "Virtual Machine Generation ID"
 * specification; devices/legacy/vmgenid): the last 16 bytes below the ACPI tables, inside
 * the legacy area e820 reserves, so the guest never allocates it as RAM. Not 2 KiB aligned on
 * purpose: Linux probes 0xc8000-0xdffff for option ROMs at every 2 KiB (arch/x86/kernel/probe_roms.c),
 * and a random ID starting with 0x55 0xAA must not look like one. 8-byte aligned, within one page.
 */
export const VMGENID_ADDR = 0xdfff0;
export const VMGENID_SIZE = 16;
/** ACPI tables live here (RSDP first, 16-byte aligned), inside the reserved BIOS area. */
export const ACPI_START = 0xe0000;
/** The real-mode reset vector F000:FFF0 (SDM vol. 3 §9.1.4); the last 16 bytes below 1 MiB are not ACPI's. */
export const RESET_VECTOR_ADDR = 0xffff0;
export const ACPI_END = RESET_VECTOR_ADDR;
/** Where protected-mode kernel code is loaded (bzImage), 1 MiB per the boot protocol. */
export const HIGH_MEMORY_START = 0x100000;

/** Start of the MMIO hole below 4 GiB; RAM stops here and resumes at 4 GiB. */
export const MMIO_HOLE_START = 0xc000_0000;
export const MMIO_HOLE_END = 0x1_0000_0000;
/** PCI MMIO window for 32-bit BARs (issue: virtio over PCI), below the fixed devices. */
export const PCI_MMIO32_START = 0xc000_0000;
export const PCI_MMIO32_END = 0xe000_0000;
/** PCI Express ECAM (MCFG), 256 buses x 1 MiB. */
export const PCI_ECAM_START = 0xe000_0000;
export const PCI_ECAM_SIZE = 0x1000_0000;
/** IOAPIC and local APIC default bases (Intel SDM vol. 3 §10.4.1; 82093AA datasheet). */
export const IOAPIC_ADDR = 0xfec0_0000;
export const LAPIC_ADDR = 0xfee0_0000;
/** KVM_SET_TSS_ADDR needs three pages inside guest-physical space that is not RAM (KVM API §4.38). */
export const KVM_TSS_ADDR = 0xfffb_d000;
/** KVM_SET_IDENTITY_MAP_ADDR: one page, just below the TSS. */
export const KVM_IDENTITY_MAP_ADDR = 0xfffb_c000;

/** 4 GiB: where RAM beyond the hole continues. */
export const HIGH_RAM_START = 0x1_0000_0000;

/** I/O ports of the platform devices the VMM emulates. */
export const PORT = {
  /** 16550A UARTs (COM1 is the console). */
  COM1: 0x3f8,
  COM2: 0x2f8,
  /** i8042 keyboard controller: data and command/status; 0xFE on 0x64 resets the machine. */
  I8042_DATA: 0x60,
  I8042_COMMAND: 0x64,
  /**
   * ACPI hardware-reduced sleep control/status registers and reset register
   * (ACPI 6.5 §4.8.3.7, §4.8.3.6); announced in the FADT.
   */
  ACPI_SLEEP_CONTROL: 0x600,
  ACPI_SLEEP_STATUS: 0x601,
  ACPI_RESET: 0x602,
  /** PCI configuration mechanism #1 (address at 0xcf8, data at 0xcfc-0xcff). */
  PCI_CONFIG_ADDRESS: 0xcf8,
  PCI_CONFIG_DATA: 0xcfc,
} as const;

/** Value the guest writes to PORT.ACPI_RESET to reset (FADT RESET_VALUE). */
export const ACPI_RESET_VALUE = 0x1;

/**
 * ISA IRQ lines (= IOAPIC GSIs with KVM's default routing). GED is the ACPI Generic Event
 * Device's edge-triggered line (devices/legacy/vmgenid): 5, the first ISA line no PC device
 * claims here (0 PIT, 1 keyboard, 2 cascade, 3/4 serial, 8 RTC, 9 SCI, 12 mouse, 14/15 IDE);
 * Firecracker picks the same first free legacy GSI.
 */
export const IRQ = { COM1: 4, COM2: 3, GED: 5, ACPI_SCI: 9 } as const;

export interface RamRange {
  start: number;
  size: number;
}

/**
 * Split `memBytes` of guest RAM around the MMIO hole: [0, min(mem, 3 GiB)) and,
 * when larger, [4 GiB, 4 GiB + rest).
 */
export function ramRanges(memBytes: number): RamRange[] {
  const low = Math.min(memBytes, MMIO_HOLE_START);
  const ranges: RamRange[] = [{ start: 0, size: low }];
  if (memBytes > low) ranges.push({ start: HIGH_RAM_START, size: memBytes - low });
  return ranges;
}
