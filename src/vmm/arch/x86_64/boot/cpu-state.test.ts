import { describe, expect, it } from "vitest";
import { BOOT_GDT_ADDR, BOOT_IDT_ADDR, PD_ADDR, PML4_ADDR } from "../layout.js";
import { encodeDescriptor, linux64CpuState, pvhCpuState, writeBootGdt, writeIdentityPageTables } from "./cpu-state.js";
import { RecordingMemory } from "./test-fixtures.js";

describe("boot GDT", () => {
  it("encodes the flat descriptors Linux itself uses for __BOOT_CS/__BOOT_DS", () => {
    // Linux arch/x86/boot/compressed/head_64.S gdt64: .quad 0x00af9a000000ffff (__KERNEL_CS, 64-bit)
    // and 0x00cf92000000ffff (__KERNEL_DS); ours are the same with the accessed bit set (type 0xb / 0x3).
    const long = linux64CpuState(0x1000200, 0x7000).sregs;
    expect(encodeDescriptor(long.cs)).toBe(0x00af9b000000ffffn);
    expect(encodeDescriptor(long.ds)).toBe(0x00cf93000000ffffn);
    // 32-bit code for PVH: head_64.S gdt: 0x00cf9a000000ffff (__KERNEL32_CS), accessed.
    expect(encodeDescriptor(pvhCpuState(0x1000000, 0x6000).sregs.cs)).toBe(0x00cf9b000000ffffn);
  });

  it("writeBootGdt lays out null, TSS, code at 0x10 and data at 0x18 below the IDT", () => {
    const mem = new RecordingMemory(1 << 20);
    writeBootGdt(mem, true);
    const s = linux64CpuState(0x1000200, 0x7000).sregs;
    expect(mem.readU64(BOOT_GDT_ADDR)).toBe(0n);
    expect(mem.readU64(BOOT_GDT_ADDR + 0x10)).toBe(encodeDescriptor(s.cs));
    expect(mem.readU64(BOOT_GDT_ADDR + 0x18)).toBe(encodeDescriptor(s.ds));
    expect(mem.readU64(BOOT_GDT_ADDR + s.tr.selector)).toBe(encodeDescriptor(s.tr));
    expect(BOOT_GDT_ADDR + s.gdt.limit + 1).toBeLessThanOrEqual(BOOT_IDT_ADDR);
    for (const w of mem.writes) expect(w.addr + w.len).toBeLessThanOrEqual(PML4_ADDR);
  });
});

describe("identity page tables", () => {
  it("map every 2 MiB page of the first 4 GiB to itself", () => {
    const mem = new RecordingMemory(1 << 20);
    writeIdentityPageTables(mem);
    const pml4e = mem.readU64(PML4_ADDR);
    expect(pml4e & 3n).toBe(3n);
    const pdpt = Number(pml4e & ~0xfffn);
    for (let g = 0; g < 4; g++) {
      const pdpte = mem.readU64(pdpt + g * 8);
      expect(pdpte & 3n).toBe(3n);
      const pd = Number(pdpte & ~0xfffn);
      expect(pd).toBe(PD_ADDR + g * 0x1000);
      for (let i = 0; i < 512; i++) {
        const pde = mem.readU64(pd + i * 8);
        expect(pde & 0x83n).toBe(0x83n); // present, writable, 2 MiB page
        expect(Number(pde & ~0x1fffffn)).toBe(g * 2 ** 30 + i * 2 ** 21);
      }
    }
    expect(mem.readU64(pdpt + 4 * 8)).toBe(0n);
  });
});
