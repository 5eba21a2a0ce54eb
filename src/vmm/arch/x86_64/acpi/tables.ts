/**
 * The guest's ACPI tables: hardware-reduced ACPI (ACPI 6.5 §4.1), as Cloud
 * Hypervisor and Firecracker present it, so stock Linux finds every CPU, the
 * IOAPIC and LAPICs (MADT), powers off through the sleep control register
 * (FADT + DSDT \_S5_), reboots through the reset register, and learns of a new
 * VM generation (DSDT VGEN and GED_ devices) after a snapshot restore.
 *
 * Layout from `baseAddr` (ACPI_START, where Linux also scans for the RSDP per
 * ACPI 6.5 §5.2.5.1), each piece 16-byte aligned:
 *   RSDP -> XSDT -> FADT, MADT, [MCFG] ; FADT.X_DSDT -> DSDT
 * There is no RSDT (RSDP rev 2 readers use the XSDT) and no FACS (optional
 * when HW_REDUCED_ACPI is set, ACPI 6.5 §5.2.9 FIRMWARE_CTRL).
 */
import { TypevisorError } from "../../../../errors.js";
import type { GuestMemory } from "../../../memory/guest-memory.js";
import { ACPI_END, ACPI_RESET_VALUE, ACPI_START, IOAPIC_ADDR, IRQ, LAPIC_ADDR, PORT } from "../layout.js";
import { MAX_VCPUS } from "../../../defaults.js";
import * as aml from "./aml.js";
import { gedAml, vmgenidAml } from "../../../devices/legacy/vmgenid/vmgenid.js";
import { OEM_ID, SDT_HEADER_LENGTH, SdtBuilder, checksumByte, ioPortGas8, writeAscii } from "./sdt.js";

/** PCI Express ECAM window announced in the MCFG (PCI Firmware 3.3 §4.1.2). */
export interface PciEcam {
  /** Base of the ECAM region for bus 0 of this segment (MCFG "Base Address"). */
  base: number;
  segment: number;
  startBus: number;
  endBus: number;
}

export interface AcpiOptions {
  /** Number of vCPUs; APIC ID = vCPU index. */
  cpus: number;
  /** Write an MCFG and reserve the ECAM range as a motherboard resource (PNP0C02). */
  pciEcam?: PciEcam;
  /** More device objects for the \_SB scope, already AML-encoded (e.g. the PCI host bridge). */
  sbDevices?: readonly Uint8Array[];
}

export interface AcpiTableInfo {
  signature: string;
  addr: number;
  length: number;
}

export interface AcpiBlob {
  rsdpAddr: number;
  /** Bytes to place at `rsdpAddr` (the lowest address used). */
  blob: Uint8Array;
  tables: AcpiTableInfo[];
}

/**
 * Up to MAX_VCPUS (vmm/defaults.ts). vCPUs 0..254 are Processor Local APIC structures (an 8-bit
 * ID; 0xFF is the xAPIC broadcast ID, Intel SDM vol. 3A §11.6.2.1); from APIC ID 255 on they are
 * Processor Local x2APIC structures, as ACPI 6.5 §5.2.12.12 requires for IDs of 255 and above.
 */
export const MAX_CPUS = MAX_VCPUS;
/** The most vCPUs a guest gets without x2APIC: 254, so CPUID leaf 1's 8-bit count and every APIC ID stay in xAPIC's range. */
export const XAPIC_MAX_CPUS = 254;

/** SLP_TYP the DSDT's \_S5_ announces; see buildDsdt. */
export const S5_SLP_TYP = 5;
/**
 * What Linux writes to the sleep control register to enter S5: SLP_TYP in bits
 * 4:2 plus SLP_EN (bit 5) (ACPI 6.5 §4.8.3.7). The sleep-control device matches on it.
 */
export const S5_SLEEP_CONTROL_VALUE = (S5_SLP_TYP << 2) | (1 << 5);

/** Hypervisor Vendor Identity in the FADT (ACPI 6.5 §5.2.9, offset 268). */
export const HYPERVISOR_VENDOR_ID = "TYPVISOR";

function acpiError(code: string, message: string): TypevisorError {
  return new TypevisorError(code, message);
}

const align16 = (n: number): number => Math.ceil(n / 16) * 16;

// ---------------------------------------------------------------------------
// RSDP (ACPI 6.5 §5.2.5.3)

export const RSDP_LENGTH = 36;

export function buildRsdp(xsdtAddr: number): Uint8Array {
  const b = new Uint8Array(RSDP_LENGTH);
  const v = new DataView(b.buffer);
  writeAscii(b, 0, "RSD PTR ", 8);
  writeAscii(b, 9, OEM_ID, 6);
  b[15] = 2; // Revision 2: ACPI 2.0+ RSDP with XsdtAddress.
  v.setUint32(16, 0, true); // RsdtAddress: none; the XSDT is authoritative.
  v.setUint32(20, RSDP_LENGTH, true);
  v.setBigUint64(24, BigInt(xsdtAddr), true);
  // Checksum covers the ACPI 1.0 part (first 20 bytes); extended checksum all 36.
  b[8] = checksumByte(b, 0, 20);
  b[32] = checksumByte(b, 0, RSDP_LENGTH);
  return b;
}

// ---------------------------------------------------------------------------
// XSDT (ACPI 6.5 §5.2.8)

export function buildXsdt(entries: readonly number[]): Uint8Array {
  const t = new SdtBuilder("XSDT", SDT_HEADER_LENGTH + 8 * entries.length, 1, "TVSRXSDT");
  entries.forEach((addr, i) => t.u64(SDT_HEADER_LENGTH + 8 * i, addr));
  return t.finish();
}

// ---------------------------------------------------------------------------
// FADT (ACPI 6.5 §5.2.9, Table 5.9)

export const FADT_LENGTH = 276;

/** FADT Flags bits (ACPI 6.5 Table 5.10). */
export const FADT_FLAGS = {
  PWR_BUTTON: 1 << 4,
  SLP_BUTTON: 1 << 5,
  RESET_REG_SUP: 1 << 10,
  HW_REDUCED_ACPI: 1 << 20,
} as const;

/** IA-PC Boot Architecture Flags (ACPI 6.5 §5.2.9.3, Table 5.11). */
export const IAPC_BOOT_ARCH = {
  LEGACY_DEVICES: 1 << 0,
  I8042: 1 << 1,
  VGA_NOT_PRESENT: 1 << 2,
  MSI_NOT_SUPPORTED: 1 << 3,
  PCIE_ASPM_CONTROLS: 1 << 4,
  CMOS_RTC_NOT_PRESENT: 1 << 5,
} as const;

export function buildFadt(dsdtAddr: number): Uint8Array {
  const t = new SdtBuilder("FACP", FADT_LENGTH, 6, "TVSRFACP");
  // SCI_INT: unused with HW_REDUCED_ACPI (Linux installs no SCI handler and skips
  // the SCI IOAPIC setup on reduced-hardware platforms), but point it at the
  // platform's reserved SCI line rather than 0, so an OS that did configure it as
  // level/active-low would not reprogram GSI 0, the PIT's timer input.
  t.u16(46, IRQ.ACPI_SCI);
  // IAPC_BOOT_ARCH: VGA Not Present (there is no VGA, so Linux must not poke
  // 0xa0000/0x3c0 ports) and the 8042 bit left CLEAR on purpose: Linux then marks
  // the i8042 "firmware absent" (arch/x86/kernel/acpi/boot.c acpi_parse_fadt)
  // and, with no PNP0303 device in the DSDT, the i8042 driver gives up without
  // probing the ports directly, which costs ~0.5 s of controller timeouts
  // against an i8042 that only emulates reset. Reboot does not depend on this
  // flag: Linux tries the FADT reset register first (reboot=acpi is the x86
  // default) and its keyboard-controller fallback (0xFE to port 0x64) ignores it.
  // LEGACY_DEVICES stays clear: no ISA devices beyond what the DSDT lists.
  // MSI is supported (virtio-pci uses MSI-X), so that bit stays clear.
  // CMOS RTC Not Present: the VMM emulates no MC146818; without this bit Linux
  // registers rtc_cmos anyway (arch/x86/kernel/rtc.c add_rtc_cmos) and its probe
  // of the absent chip cost ~3 s of a lab boot. Wall-clock time comes from kvmclock.
  t.u16(109, IAPC_BOOT_ARCH.VGA_NOT_PRESENT | IAPC_BOOT_ARCH.CMOS_RTC_NOT_PRESENT);
  // Flags: hardware-reduced ACPI; reset register supported; power and sleep
  // buttons are not fixed-feature buttons (there are no PM1 blocks to hold them).
  t.u32(112, FADT_FLAGS.HW_REDUCED_ACPI | FADT_FLAGS.RESET_REG_SUP | FADT_FLAGS.PWR_BUTTON | FADT_FLAGS.SLP_BUTTON);
  // RESET_REG / RESET_VALUE (ACPI 6.5 §4.8.3.6): 8-bit System I/O register.
  t.set(116, ioPortGas8(PORT.ACPI_RESET));
  t.u8(128, ACPI_RESET_VALUE);
  // FADT Minor Version: 5 with revision 6 = ACPI 6.5.
  t.u8(131, 5);
  // X_DSDT only: the 32-bit DSDT field must be zero when X_DSDT is used (ACPI 6.5 Table 5.9).
  t.u64(140, dsdtAddr);
  // SLEEP_CONTROL_REG / SLEEP_STATUS_REG (ACPI 6.5 §4.8.3.7): 8-bit System I/O
  // registers; Linux requires both to be non-zero before it offers S5 on a
  // reduced-hardware platform (acpi_sleep_state_supported()).
  t.set(244, ioPortGas8(PORT.ACPI_SLEEP_CONTROL));
  t.set(256, ioPortGas8(PORT.ACPI_SLEEP_STATUS));
  const vendor = new Uint8Array(8);
  writeAscii(vendor, 0, HYPERVISOR_VENDOR_ID, 8);
  t.set(268, vendor);
  return t.finish();
}

// ---------------------------------------------------------------------------
// MADT (ACPI 6.5 §5.2.12)

export const MADT_TYPE = { LOCAL_APIC: 0, IO_APIC: 1, INTERRUPT_SOURCE_OVERRIDE: 2, LOCAL_APIC_NMI: 4, LOCAL_X2APIC: 9, LOCAL_X2APIC_NMI: 10 } as const;

/**
 * The IOAPIC's MADT ID. 0, which is also what KVM's in-kernel IOAPIC ID register
 * reads after reset, so table and device agree. It does not clash with LAPIC ID 0
 * in any way that matters: x86_64 Linux only requires IOAPIC IDs to be unique
 * among IOAPICs (the shared APIC-bus ID space is a P6/82489DX-era constraint
 * handled only by 32-bit kernels), and KVM's register holds only 4 bits, so an
 * ID of `cpus` would not even round-trip past 15 CPUs. QEMU and Cloud Hypervisor use 0 too.
 */
export const IOAPIC_ID = 0;

export function buildMadt(cpus: number): Uint8Array {
  const xapic = Math.min(cpus, XAPIC_MAX_CPUS + 1);
  const x2apic = cpus - xapic;
  const entriesLength = 8 * xapic + 16 * x2apic + 12 + 6 + (x2apic > 0 ? 12 : 0);
  // Revision 5, as Cloud Hypervisor emits; only structures defined since ACPI 1.0/4.0 are used.
  const t = new SdtBuilder("APIC", 44 + entriesLength, 5, "TVSRMADT");
  t.u32(36, LAPIC_ADDR);
  // PCAT_COMPAT: set, because KVM_CREATE_IRQCHIP really instantiates the dual
  // 8259 PICs beside the IOAPIC; the flag tells the OS they exist and must be
  // masked when it switches to APIC mode (ACPI 6.5 Table 5.20).
  t.u32(40, 1);
  let off = 44;
  for (let cpu = 0; cpu < xapic; cpu++) {
    // Processor Local APIC (ACPI 6.5 §5.2.12.2): UID = APIC ID = vCPU index; Enabled.
    // Online Capable (bit 1) must be zero when Enabled is set.
    t.u8(off, MADT_TYPE.LOCAL_APIC);
    t.u8(off + 1, 8);
    t.u8(off + 2, cpu);
    t.u8(off + 3, cpu);
    t.u32(off + 4, 1);
    off += 8;
  }
  for (let cpu = xapic; cpu < cpus; cpu++) {
    // Processor Local x2APIC (ACPI 6.5 §5.2.12.12): 2 reserved bytes, the 32-bit x2APIC ID
    // (= vCPU index, what KVM gives vCPU n and CPUID leaf 0xB reports), flags Enabled, UID.
    t.u8(off, MADT_TYPE.LOCAL_X2APIC);
    t.u8(off + 1, 16);
    t.u32(off + 4, cpu);
    t.u32(off + 8, 1);
    t.u32(off + 12, cpu);
    off += 16;
  }
  // I/O APIC (ACPI 6.5 §5.2.12.3): 24 pins from GSI 0.
  t.u8(off, MADT_TYPE.IO_APIC);
  t.u8(off + 1, 12);
  t.u8(off + 2, IOAPIC_ID);
  t.u32(off + 4, IOAPIC_ADDR);
  t.u32(off + 8, 0);
  off += 12;
  // No Interrupt Source Overrides. KVM's default GSI routing (KVM_CREATE_IRQCHIP
  // without KVM_SET_GSI_ROUTING) connects GSI n to IOAPIC pin n for n < 24, and
  // the in-kernel PIT (KVM_CREATE_PIT2) raises GSI 0, so the timer arrives on
  // pin 0: exactly the identity mapping an OS assumes for ISA IRQs without an
  // override. QEMU's "IRQ0 -> GSI2" override is only right because QEMU installs
  // its own routing that sends GSI 0 to pin 2; emitting it here would make Linux
  // wait for timer interrupts on pin 2 that never come. The COM1 IRQ 4 and every
  // other ISA line are likewise identity-mapped, edge/active-high.
  // Local APIC NMI (ACPI 6.5 §5.2.12.7): LINT1 of every processor (UID 0xFF) is
  // the NMI input, as on PCs; flags edge-triggered (bits 3:2 = 01), active high (bits 1:0 = 01).
  t.u8(off, MADT_TYPE.LOCAL_APIC_NMI);
  t.u8(off + 1, 6);
  t.u8(off + 2, 0xff);
  t.u16(off + 3, 0x0005);
  t.u8(off + 5, 1);
  off += 6;
  if (x2apic > 0) {
    // Local x2APIC NMI (ACPI 6.5 §5.2.12.13) for the processors declared as x2APIC: UID
    // 0xFFFFFFFF = all of them, LINT1, same flags.
    t.u8(off, MADT_TYPE.LOCAL_X2APIC_NMI);
    t.u8(off + 1, 12);
    t.u16(off + 2, 0x0005);
    t.u32(off + 4, 0xffffffff);
    t.u8(off + 8, 1);
  }
  return t.finish();
}

// ---------------------------------------------------------------------------
// MCFG (PCI Firmware Specification 3.3 §4.1.2)

function checkEcam(e: PciEcam): void {
  const ok =
    Number.isSafeInteger(e.base) &&
    e.base >= 0 &&
    e.base % (1 << 20) === 0 &&
    Number.isInteger(e.segment) &&
    e.segment >= 0 &&
    e.segment <= 0xffff &&
    Number.isInteger(e.startBus) &&
    Number.isInteger(e.endBus) &&
    e.startBus >= 0 &&
    e.startBus <= e.endBus &&
    e.endBus <= 0xff &&
    e.base + (e.endBus + 1) * (1 << 20) <= 2 ** 32;
  if (!ok) {
    throw acpiError(
      "ACPI_PCI_ECAM_INVALID",
      `PCI ECAM window (base 0x${e.base.toString(16)}, segment ${e.segment}, buses ${e.startBus}-${e.endBus}) must be 1 MiB aligned, below 4 GiB, with 0 <= startBus <= endBus <= 255`,
    );
  }
}

export function buildMcfg(e: PciEcam): Uint8Array {
  // Header, 8 reserved bytes, then one 16-byte allocation structure.
  const t = new SdtBuilder("MCFG", SDT_HEADER_LENGTH + 8 + 16, 1, "TVSRMCFG");
  const off = SDT_HEADER_LENGTH + 8;
  t.u64(off, e.base);
  t.u16(off + 8, e.segment);
  t.u8(off + 10, e.startBus);
  t.u8(off + 11, e.endBus);
  return t.finish();
}

// ---------------------------------------------------------------------------
// DSDT (ACPI 6.5 §5.2.11.1)

/** The DSDT's AML body (without header), exported for tests of the encoder output. */
export function dsdtBody(opts: AcpiOptions): Uint8Array {
  const terms: Uint8Array[] = [];
  // \_S5_ (ACPI 6.5 §7.4.2): {SLP_TYPa, SLP_TYPb}. With a hardware-reduced
  // sleep control register only SLP_TYPa is used, written to bits 4:2. Nothing
  // fixes its value for S5 (it is platform-defined); 5 mirrors the state number
  // and is what Cloud Hypervisor's device expects too. SLP_TYPb = 0 (unused).
  terms.push(aml.name("\\_S5_", aml.pkg([aml.integer(S5_SLP_TYP), aml.integer(0)])));

  const sb: Uint8Array[] = [];
  // COM1 as an ACPI PNP device: Linux's 8250_pnp then takes port and IRQ from
  // _CRS instead of the legacy table's auto-IRQ probing, which costs a few
  // hundred milliseconds of boot on a VM, and the range shows up claimed in /proc/ioports.
  sb.push(
    aml.device("COM1", [
      aml.name("_HID", aml.eisaId("PNP0501")),
      aml.name("_UID", aml.integer(1)),
      aml.name("_CRS", aml.resourceTemplate([aml.ioPort(PORT.COM1, PORT.COM1, 1, 8), aml.irqNoFlags([IRQ.COM1])])),
    ]),
  );
  if (opts.pciEcam !== undefined) {
    const e = opts.pciEcam;
    const start = e.base + e.startBus * (1 << 20);
    const length = (e.endBus - e.startBus + 1) * (1 << 20);
    // Linux accepts an MCFG window only if it is reserved, preferably as an ACPI
    // motherboard resource (PNP0C02 _CRS; PCI Firmware 3.3 §4.1.2 note).
    sb.push(
      aml.device("MRES", [
        aml.name("_HID", aml.eisaId("PNP0C02")),
        aml.name("_UID", aml.integer(0)),
        aml.name("_CRS", aml.resourceTemplate([aml.memory32Fixed(false, start, length)])),
      ]),
    );
  }
  // Every VM has a Virtual Machine Generation ID and the Generic Event Device that announces
  // a new one after a restore (devices/legacy/vmgenid; the ID lives at VMGENID_ADDR).
  sb.push(vmgenidAml(), gedAml());
  sb.push(...(opts.sbDevices ?? []));
  terms.push(aml.scope("\\_SB_", sb));
  return aml.concat(terms);
}

export function buildDsdt(opts: AcpiOptions): Uint8Array {
  const body = dsdtBody(opts);
  // Revision 2: integers are 64 bits wide (ACPI 6.5 §5.2.11.1).
  const t = new SdtBuilder("DSDT", SDT_HEADER_LENGTH + body.length, 2, "TVSRDSDT");
  t.set(SDT_HEADER_LENGTH, body);
  return t.finish();
}

// ---------------------------------------------------------------------------

function checkOptions(opts: AcpiOptions): void {
  if (!Number.isInteger(opts.cpus) || opts.cpus < 1 || opts.cpus > MAX_CPUS) {
    throw acpiError("ACPI_CPU_COUNT", `ACPI tables support 1 to ${MAX_CPUS} vCPUs, got ${opts.cpus}`);
  }
  if (opts.pciEcam !== undefined) checkEcam(opts.pciEcam);
}

/**
 * Build all tables for a guest, laid out from `baseAddr` (16-byte aligned, inside
 * [ACPI_START, ACPI_END)); pure, so tests need no guest memory.
 * @throws TypevisorError ACPI_CPU_COUNT, ACPI_PCI_ECAM_INVALID, ACPI_BASE_ADDRESS, ACPI_TABLES_TOO_LARGE
 */
export function buildAcpiTables(opts: AcpiOptions, baseAddr: number = ACPI_START): AcpiBlob {
  checkOptions(opts);
  if (!Number.isSafeInteger(baseAddr) || baseAddr % 16 !== 0 || baseAddr < ACPI_START || baseAddr >= ACPI_END) {
    throw acpiError(
      "ACPI_BASE_ADDRESS",
      `ACPI tables must start 16-byte aligned inside 0x${ACPI_START.toString(16)}-0x${ACPI_END.toString(16)}, got 0x${baseAddr.toString(16)}`,
    );
  }
  const dsdt = buildDsdt(opts);
  const madt = buildMadt(opts.cpus);
  const mcfg = opts.pciEcam !== undefined ? buildMcfg(opts.pciEcam) : undefined;

  const xsdtEntries = mcfg !== undefined ? 3 : 2;
  const xsdtLength = SDT_HEADER_LENGTH + 8 * xsdtEntries;
  const xsdtAddr = baseAddr + align16(RSDP_LENGTH);
  const fadtAddr = xsdtAddr + align16(xsdtLength);
  const madtAddr = fadtAddr + align16(FADT_LENGTH);
  let next = madtAddr + align16(madt.length);
  const mcfgAddr = next;
  if (mcfg !== undefined) next += align16(mcfg.length);
  const dsdtAddr = next;
  const end = dsdtAddr + dsdt.length;
  if (end > ACPI_END) {
    throw acpiError(
      "ACPI_TABLES_TOO_LARGE",
      `ACPI tables need ${end - baseAddr} bytes from 0x${baseAddr.toString(16)}, past the end of the ACPI area at 0x${ACPI_END.toString(16)}`,
    );
  }

  const fadt = buildFadt(dsdtAddr);
  const xsdt = buildXsdt(mcfg !== undefined ? [fadtAddr, madtAddr, mcfgAddr] : [fadtAddr, madtAddr]);
  const rsdp = buildRsdp(xsdtAddr);

  const blob = new Uint8Array(end - baseAddr);
  const tables: AcpiTableInfo[] = [];
  const place = (signature: string, addr: number, bytes: Uint8Array): void => {
    blob.set(bytes, addr - baseAddr);
    tables.push({ signature, addr, length: bytes.length });
  };
  place("RSDP", baseAddr, rsdp);
  place("XSDT", xsdtAddr, xsdt);
  place("FACP", fadtAddr, fadt);
  place("APIC", madtAddr, madt);
  if (mcfg !== undefined) place("MCFG", mcfgAddr, mcfg);
  place("DSDT", dsdtAddr, dsdt);
  return { rsdpAddr: baseAddr, blob, tables };
}

/**
 * Build the tables and write them to guest memory at ACPI_START. The loader
 * passes `rsdpAddr` to the kernel (boot_params.acpi_rsdp_addr, PVH
 * hvm_start_info.rsdp_paddr); Linux would also find it by scanning 0xE0000-0xFFFFF.
 */
export function writeAcpiTables(mem: GuestMemory, opts: AcpiOptions): { rsdpAddr: number; tables: AcpiTableInfo[] } {
  const { rsdpAddr, blob, tables } = buildAcpiTables(opts, ACPI_START);
  mem.write(rsdpAddr, blob);
  return { rsdpAddr, tables };
}
