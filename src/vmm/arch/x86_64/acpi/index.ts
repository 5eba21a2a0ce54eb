/**
 * ACPI tables for the x86_64 guest (hardware-reduced ACPI): see tables.ts for
 * the layout and the platform decisions, aml.ts for the DSDT encoder.
 */
export {
  buildAcpiTables,
  writeAcpiTables,
  MAX_CPUS,
  S5_SLP_TYP,
  S5_SLEEP_CONTROL_VALUE,
  type AcpiOptions,
  type AcpiBlob,
  type AcpiTableInfo,
  type PciEcam,
} from "./tables.js";
