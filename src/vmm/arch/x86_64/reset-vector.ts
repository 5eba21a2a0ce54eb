/**
 * A firmware-style reset vector at F000:FFF0 (physical 0xffff0).
 *
 * We boot kernels directly and ship no BIOS, but Linux can still jump there:
 * on a hardware-reduced ACPI platform it prefers an EFI reboot
 * (arch/x86/kernel/reboot.c: efi_reboot_required() is true when
 * acpi_gbl_reduced_hardware), and without EFI it falls through to
 * machine_real_restart(), which drops to real mode and far-jumps to
 * F000:FFF0, where a PC's BIOS would reset the board (Intel SDM vol. 3
 * §9.1.4). Our stub does what that BIOS would end with: it writes the ACPI
 * reset register, which the VMM turns into a VM reset.
 */
import type { GuestMemory } from "../../memory/guest-memory.js";
import { ACPI_RESET_VALUE, PORT, RESET_VECTOR_ADDR } from "./layout.js";

/** 16-bit code: mov dx, PORT.ACPI_RESET; mov al, ACPI_RESET_VALUE; out dx, al; 1: hlt; jmp 1b. */
export function resetVectorCode(): Uint8Array {
  return Uint8Array.of(
    0xba, PORT.ACPI_RESET & 0xff, PORT.ACPI_RESET >> 8,
    0xb0, ACPI_RESET_VALUE,
    0xee,
    0xf4,
    0xeb, 0xfd,
  );
}

export function writeResetVector(mem: GuestMemory): void {
  mem.write(RESET_VECTOR_ADDR, resetVectorCode());
}
