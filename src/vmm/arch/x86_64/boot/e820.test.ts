import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { ACPI_START, EBDA_START, HIGH_RAM_START, MMIO_HOLE_START, PCI_ECAM_START, VMGENID_ADDR, VMGENID_SIZE, ramRanges } from "../layout.js";
import { E820_RAM, E820_RESERVED, MIN_MEM_BYTES, e820Map } from "./e820.js";

const MiB = 1 << 20;
const GiB = 1 << 30;

describe("e820Map", () => {
  it("lays out 256 MiB as low RAM, the reserved legacy area, and RAM from 1 MiB", () => {
    const m = e820Map(256 * MiB);
    expect(m.filter((e) => e.type === E820_RAM)).toEqual([
      { addr: 0, size: EBDA_START, type: E820_RAM },
      { addr: MiB, size: 255 * MiB, type: E820_RAM },
    ]);
    // The ACPI tables sit inside a reserved range.
    expect(m.some((e) => e.type === E820_RESERVED && e.addr <= ACPI_START && ACPI_START < e.addr + e.size)).toBe(true);
  });

  it("reserves the VM generation ID: inside RAM KVM backs, never usable, clear of the ACPI tables and of option-ROM probe points", () => {
    const m = e820Map(256 * MiB);
    const end = VMGENID_ADDR + VMGENID_SIZE;
    expect(m.some((e) => e.type === E820_RESERVED && e.addr <= VMGENID_ADDR && end <= e.addr + e.size)).toBe(true);
    expect(m.some((e) => e.type === E820_RAM && e.addr < end && VMGENID_ADDR < e.addr + e.size)).toBe(false);
    // Backed by the low RAM region (the guest reads it through its direct map), in one page.
    expect(ramRanges(256 * MiB).some((r) => r.start <= VMGENID_ADDR && end <= r.start + r.size)).toBe(true);
    expect(Math.floor(VMGENID_ADDR / 4096)).toBe(Math.floor((end - 1) / 4096));
    expect(VMGENID_ADDR % 8).toBe(0);
    // Linux reads a ROM signature at every 2 KiB in 0xc8000-0xdffff (arch/x86/kernel/probe_roms.c).
    for (let a = VMGENID_ADDR; a < end; a++) expect(a % 2048).not.toBe(0);
    // The ACPI tables grow upwards from ACPI_START, above it.
    expect(end).toBeLessThanOrEqual(ACPI_START);
  });

  it("continues RAM at 4 GiB above the MMIO hole", () => {
    const m = e820Map(4 * GiB);
    const high = m.find((e) => e.addr === HIGH_RAM_START);
    expect(high).toEqual({ addr: HIGH_RAM_START, size: 4 * GiB - MMIO_HOLE_START, type: E820_RAM });
  });

  it("rejects less than the minimum", () => {
    expect(() => e820Map(MIN_MEM_BYTES - 1)).toThrow(expect.objectContaining({ code: "MEMORY_TOO_SMALL" }));
  });

  it("for any size: sorted, disjoint, RAM equals ramRanges minus the legacy hole, nothing RAM in the MMIO hole", () => {
    fc.assert(
      fc.property(fc.integer({ min: MIN_MEM_BYTES, max: 64 * GiB }), (mem) => {
        const m = e820Map(mem);
        for (let i = 1; i < m.length; i++) expect(m[i - 1]!.addr + m[i - 1]!.size).toBeLessThanOrEqual(m[i]!.addr);
        const ram = m.filter((e) => e.type === E820_RAM);
        const ramBytes = ram.reduce((n, e) => n + e.size, 0);
        expect(ramBytes).toBe(mem - (MiB - EBDA_START));
        for (const e of ram) {
          expect(ramRanges(mem).some((r) => e.addr >= r.start && e.addr + e.size <= r.start + r.size)).toBe(true);
          expect(e.addr + e.size <= MMIO_HOLE_START || e.addr >= HIGH_RAM_START).toBe(true);
        }
        expect(m.some((e) => e.addr === PCI_ECAM_START && e.type === E820_RESERVED)).toBe(true);
      }),
    );
  });
});
