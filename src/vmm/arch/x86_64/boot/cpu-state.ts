/**
 * The boot CPU's initial state for both entries, plus the memory it relies on:
 * the boot GDT and, for the 64-bit entry, identity-mapped page tables.
 *
 * - Linux 64-bit boot protocol (boot.rst §"64-bit Boot Protocol"): 64-bit mode,
 *   paging on, the kernel/zero page/cmdline identity-mapped, a GDT with 4 GiB
 *   flat __BOOT_CS (0x10, execute/read) and __BOOT_DS (0x18, read/write),
 *   CS = __BOOT_CS, DS = ES = SS = __BOOT_DS, interrupts off, %rsi = boot_params.
 * - PVH (Xen docs/misc/pvh.pandoc): 32-bit protected mode, paging off, cr0 only
 *   PE among the writeable bits, cr4 = 0, flat 32-bit cs/ds/es, tr a 32-bit TSS
 *   with base 0 and limit 0x67, eflags IF/TF/VM clear, %ebx = hvm_start_info.
 */
import type { GuestMemory } from "../../../memory/guest-memory.js";
import { applyWrites, type MemWrite } from "./placement.js";
import type { KvmSegment } from "../../../../kvm/structs.js";
import { BOOT_GDT_ADDR, BOOT_IDT_ADDR, BOOT_STACK_POINTER, PD_ADDR, PDPT_ADDR, PML4_ADDR } from "../layout.js";

/** KVM's struct kvm_segment, field for field (KVM API §4.13 KVM_GET_SREGS): one definition, in kvm/. */
export type Segment = KvmSegment;

export interface BootCpuState {
  regs: { rip: number; rsp: number; rbp: number; rsi: number; rbx: number; rflags: number };
  sregs: {
    cs: Segment;
    ds: Segment;
    es: Segment;
    fs: Segment;
    gs: Segment;
    ss: Segment;
    tr: Segment;
    ldt: Segment;
    gdt: { base: number; limit: number };
    idt: { base: number; limit: number };
    cr0: number;
    cr3: number;
    cr4: number;
    efer: number;
  };
}

// Intel SDM vol. 3 §2.5 (CR0/CR4), §2.2.1 (EFER).
export const CR0_PE = 1 << 0;
export const CR0_ET = 1 << 4;
export const CR0_PG = 0x8000_0000;
export const CR4_PAE = 1 << 5;
export const EFER_LME = 1 << 8;
export const EFER_LMA = 1 << 10;
/** RFLAGS bit 1 is reserved and always 1 (SDM vol. 1 §3.4.3); IF, TF, VM clear. */
export const RFLAGS_RESERVED = 0x2;

/** Boot GDT selectors: Linux's __BOOT_CS/__BOOT_DS (arch/x86/include/asm/segment.h, GDT_ENTRY_BOOT_CS = 2). */
export const BOOT_TSS_SELECTOR = 0x08;
export const BOOT_CS = 0x10;
export const BOOT_DS = 0x18;
/** null, TSS, code, data: 4 descriptors of 8 bytes; they fit exactly below BOOT_IDT_ADDR. */
export const BOOT_GDT_ENTRIES = 4;

// Segment descriptor types (SDM vol. 3 §3.4.5.1, §3.5): code execute/read accessed, data read/write accessed, busy TSS.
const TYPE_CODE_XR_ACCESSED = 0xb;
const TYPE_DATA_RW_ACCESSED = 0x3;
const TYPE_TSS_BUSY = 0xb;

function flat(selector: number, type: number, long: boolean): Segment {
  return {
    base: 0,
    limit: 0xffff_ffff,
    selector,
    type,
    present: 1,
    dpl: 0,
    // In 64-bit code segments L=1 requires D=0 (SDM vol. 3 §5.2.1).
    db: long && type === TYPE_CODE_XR_ACCESSED ? 0 : 1,
    s: 1,
    l: long && type === TYPE_CODE_XR_ACCESSED ? 1 : 0,
    g: 1,
    avl: 0,
  };
}

/** TR: pvh.pandoc asks for a TSS with base 0 and limit 0x67; KVM wants it present and busy. */
function bootTss(): Segment {
  return { base: 0, limit: 0x67, selector: BOOT_TSS_SELECTOR, type: TYPE_TSS_BUSY, present: 1, dpl: 0, db: 0, s: 0, l: 0, g: 0, avl: 0 };
}

/** LDT unused: KVM takes an unusable segment as present = 0. */
function noLdt(): Segment {
  return { base: 0, limit: 0, selector: 0, type: 0x2, present: 0, dpl: 0, db: 0, s: 0, l: 0, g: 0, avl: 0 };
}

/** The 8-byte descriptor for `seg` (SDM vol. 3 §3.4.5, Figure 3-8). */
export function encodeDescriptor(seg: Segment): bigint {
  const limit = seg.g ? Math.floor(seg.limit / 0x1000) : seg.limit;
  const base = BigInt(seg.base >>> 0);
  const lim = BigInt(limit & 0xfffff);
  const access = BigInt((seg.type & 0xf) | ((seg.s & 1) << 4) | ((seg.dpl & 3) << 5) | ((seg.present & 1) << 7));
  const flags = BigInt((seg.avl & 1) | ((seg.l & 1) << 1) | ((seg.db & 1) << 2) | ((seg.g & 1) << 3));
  return (
    (lim & 0xffffn) |
    ((base & 0xffffffn) << 16n) |
    (access << 40n) |
    (((lim >> 16n) & 0xfn) << 48n) |
    (flags << 52n) |
    (((base >> 24n) & 0xffn) << 56n)
  );
}

/**
 * Write the boot GDT: [0] null, [1] TSS (0x08), [2] code (0x10), [3] data (0x18).
 * The descriptors are encoded from the same Segment values we hand KVM, so the
 * GDT and the hidden segment state agree if the guest reloads a selector.
 * In long mode a TSS descriptor would be 16 bytes; nothing loads TR from this
 * table (KVM takes TR from sregs, Linux installs its own GDT and TSS), and
 * the 32 bytes below BOOT_IDT_ADDR have no room for it, so entry 1 keeps the
 * 8-byte 32-bit form in both modes.
 */
export function bootGdtWrites(long: boolean): MemWrite[] {
  const segs = [encodeDescriptor(bootTss()), encodeDescriptor(flat(BOOT_CS, TYPE_CODE_XR_ACCESSED, long)), encodeDescriptor(flat(BOOT_DS, TYPE_DATA_RW_ACCESSED, long))];
  const gdt = new Uint8Array(BOOT_GDT_ENTRIES * 8);
  const dv = new DataView(gdt.buffer);
  segs.forEach((d, i) => dv.setBigUint64((i + 1) * 8, d, true));
  // IDT limit 0: an exception before the kernel installs its own IDT shuts the VM down, visibly.
  return [
    { addr: BOOT_GDT_ADDR, data: gdt },
    { addr: BOOT_IDT_ADDR, data: new Uint8Array(8) },
  ];
}

// Page-table entry bits (SDM vol. 3 §4.5, Tables 4-15 to 4-18).
const PTE_PRESENT = 1n;
const PTE_WRITE = 2n;
const PTE_PS = 0x80n;
const PAGE_2M = 0x20_0000;

/**
 * Identity-map [0, 4 GiB) with 2 MiB pages: PML4[0] -> PDPT, PDPT[0..3] -> 4 PDs,
 * 512 entries each. Covers everything the 64-bit protocol asks to be mapped
 * (we place the kernel, zero page and cmdline below the 3 GiB MMIO hole).
 */
export function identityPageTableWrites(): MemWrite[] {
  const pml4 = new Uint8Array(0x1000);
  const pdpt = new Uint8Array(0x1000);
  const pds = new Uint8Array(4 * 0x1000);
  const pml4v = new DataView(pml4.buffer);
  const pdptv = new DataView(pdpt.buffer);
  const pdsv = new DataView(pds.buffer);
  pml4v.setBigUint64(0, BigInt(PDPT_ADDR) | PTE_PRESENT | PTE_WRITE, true);
  for (let i = 0; i < 4; i++) {
    pdptv.setBigUint64(i * 8, BigInt(PD_ADDR + i * 0x1000) | PTE_PRESENT | PTE_WRITE, true);
    for (let j = 0; j < 512; j++) {
      const phys = BigInt((i * 512 + j) * PAGE_2M);
      pdsv.setBigUint64(i * 0x1000 + j * 8, phys | PTE_PRESENT | PTE_WRITE | PTE_PS, true);
    }
  }
  return [
    { addr: PML4_ADDR, data: pml4 },
    { addr: PDPT_ADDR, data: pdpt },
    { addr: PD_ADDR, data: pds },
  ];
}

/** Write the boot GDT (and the empty IDT) into guest memory: for custom guests that skip loadKernel. */
export function writeBootGdt(mem: GuestMemory, long: boolean): void {
  applyWrites(mem, bootGdtWrites(long));
}

/** Write the identity page tables into guest memory: for custom guests that skip loadKernel. */
export function writeIdentityPageTables(mem: GuestMemory): void {
  applyWrites(mem, identityPageTableWrites());
}

function sregsFor(long: boolean): BootCpuState["sregs"] {
  const code = flat(BOOT_CS, TYPE_CODE_XR_ACCESSED, long);
  const data = flat(BOOT_DS, TYPE_DATA_RW_ACCESSED, long);
  return {
    cs: code,
    ds: { ...data },
    es: { ...data },
    fs: { ...data },
    gs: { ...data },
    ss: { ...data },
    tr: bootTss(),
    ldt: noLdt(),
    gdt: { base: BOOT_GDT_ADDR, limit: BOOT_GDT_ENTRIES * 8 - 1 },
    idt: { base: BOOT_IDT_ADDR, limit: 0 },
    // `>>> 0`: JS bitwise results are signed 32-bit, and PG is bit 31.
    cr0: (long ? CR0_PE | CR0_ET | CR0_PG : CR0_PE | CR0_ET) >>> 0,
    cr3: long ? PML4_ADDR : 0,
    cr4: long ? CR4_PAE : 0,
    efer: long ? EFER_LME | EFER_LMA : 0,
  };
}

/** 64-bit entry: rip = load address + 0x200, rsi = zero page. */
export function linux64CpuState(entry: number, zeroPage: number): BootCpuState {
  return {
    regs: { rip: entry, rsp: BOOT_STACK_POINTER, rbp: BOOT_STACK_POINTER, rsi: zeroPage, rbx: 0, rflags: RFLAGS_RESERVED },
    sregs: sregsFor(true),
  };
}

/** PVH entry: 32-bit, paging off, ebx = hvm_start_info. The kernel sets up its own stack. */
export function pvhCpuState(entry: number, startInfo: number): BootCpuState {
  return {
    regs: { rip: entry, rsp: 0, rbp: 0, rsi: 0, rbx: startInfo, rflags: RFLAGS_RESERVED },
    sregs: sregsFor(false),
  };
}
