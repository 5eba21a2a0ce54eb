/**
 * ACPI hardware-reduced power management registers, as announced in our FADT:
 * the Sleep Control and Sleep Status registers (ACPI 6.5 §4.8.3.7) and the
 * reset register (§4.8.3.6). Linux's `poweroff` writes SLP_TYP (from the
 * DSDT's \_S5 package) | SLP_EN; `reboot` writes RESET_VALUE to the reset
 * register.
 */
import { ACPI_RESET_VALUE, PORT } from "../../../arch/x86_64/layout.js";
import type { PioDevice } from "../../pio-bus.js";

/** SLP_TYP the DSDT's \_S5 object hands the OS (written as bits 4:2 of the control register). */
export const S5_SLP_TYP = 5;
const SLP_EN = 1 << 5;

export const ACPI_PM_BASE = PORT.ACPI_SLEEP_CONTROL;
export const ACPI_PM_LEN = 3;

export type PowerRequest = "poweroff" | "reset";

export class AcpiPm implements PioDevice {
  constructor(private readonly onRequest: (r: PowerRequest) => void) {}

  read(_offset: number, _size: number): number {
    return 0; // no wake events pending
  }

  write(offset: number, _size: number, value: number): void {
    const v = value & 0xff;
    if (offset === PORT.ACPI_SLEEP_CONTROL - ACPI_PM_BASE) {
      if ((v & SLP_EN) !== 0 && ((v >> 2) & 0x7) === S5_SLP_TYP) this.onRequest("poweroff");
    } else if (offset === PORT.ACPI_RESET - ACPI_PM_BASE) {
      if (v === ACPI_RESET_VALUE) this.onRequest("reset");
    }
  }
}
