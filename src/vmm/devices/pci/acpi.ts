/**
 * The PCI host bridge as the DSDT describes it, so Linux finds the root bus
 * through ACPI (drivers/acpi/pci_root.c) without command-line help.
 *
 * `Device (PCI0)` goes inside `Scope (\_SB)`:
 * - _HID PNP0A08 (PCI Express root bridge) with _CID PNP0A03 (PCI root bridge),
 *   the pair the PCI Firmware Spec 3.3 §4.1.5 asks for when ECAM is provided;
 *   _SEG 0, _BBN 0, _UID 0.
 * - _CRS (ACPI 6.5 §6.2.2, §6.4.3.5): the bus range 0-255 (matching the MCFG
 *   entry), the configuration ports 0xCF8-0xCFF consumed by the bridge itself,
 *   the rest of the 16-bit I/O space forwarded as two windows around them (as
 *   QEMU and Cloud Hypervisor describe it), and the 32-bit memory window
 *   [PCI_MMIO32_START, PCI_MMIO32_END) in which BARs are allocated. Linux keeps
 *   firmware BAR assignments that lie inside a window and reassigns the rest.
 * No _ADR (a device has _HID or _ADR, not both: ACPI 6.5 §6.1), no _PRT (every
 * function interrupts through MSI-X; interrupt pins are 0).
 */
import * as aml from "../../arch/x86_64/acpi/aml.js";
import { PCI_MMIO32_END, PCI_MMIO32_START, PORT } from "../../arch/x86_64/layout.js";

/** Memory type-specific flags: bit 0 read-write, bits 2:1 = 0 non-cacheable (ACPI 6.5 Table 6.50). */
const MEM_READ_WRITE_NON_CACHEABLE = 0x01;
/** I/O type-specific flags: ISA and non-ISA ranges (ACPI 6.5 Table 6.51, _RNG = 3). */
const IO_ENTIRE_RANGE = 0x03;

/** The `Device (PCI0) {...}` term, relative to the enclosing `\_SB` scope. */
export function pciHostBridgeAml(): Uint8Array {
  const cfgPortsEnd = PORT.PCI_CONFIG_ADDRESS + 8;
  const crs = aml.resourceTemplate([
    aml.addressSpace(16, aml.ResourceType.BusNumber, 0, 256, 0),
    aml.ioPort(PORT.PCI_CONFIG_ADDRESS, PORT.PCI_CONFIG_ADDRESS, 1, 8),
    aml.addressSpace(16, aml.ResourceType.Io, 0, PORT.PCI_CONFIG_ADDRESS, IO_ENTIRE_RANGE),
    aml.addressSpace(16, aml.ResourceType.Io, cfgPortsEnd, 0x1_0000 - cfgPortsEnd, IO_ENTIRE_RANGE),
    aml.addressSpace(32, aml.ResourceType.Memory, PCI_MMIO32_START, PCI_MMIO32_END - PCI_MMIO32_START, MEM_READ_WRITE_NON_CACHEABLE),
  ]);
  return aml.device("PCI0", [
    aml.name("_HID", aml.eisaId("PNP0A08")),
    aml.name("_CID", aml.eisaId("PNP0A03")),
    aml.name("_SEG", aml.integer(0)),
    aml.name("_BBN", aml.integer(0)),
    aml.name("_UID", aml.integer(0)),
    aml.name("_CRS", crs),
  ]);
}
