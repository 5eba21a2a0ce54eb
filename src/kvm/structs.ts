/**
 * Encoders/decoders between plain data and the x86_64 KVM structs
 * (arch/x86/include/uapi/asm/kvm.h). Plain data in, bytes out: the same
 * objects are what a snapshot will save.
 */
import { SIZEOF } from "./ioctls.js";

export interface KvmSegment {
  base: number;
  limit: number;
  selector: number;
  type: number;
  present: number;
  dpl: number;
  db: number;
  s: number;
  l: number;
  g: number;
  avl: number;
  unusable?: number;
}

export interface KvmDtable {
  base: number;
  limit: number;
}

export interface KvmSregs {
  cs: KvmSegment; ds: KvmSegment; es: KvmSegment; fs: KvmSegment; gs: KvmSegment; ss: KvmSegment;
  tr: KvmSegment; ldt: KvmSegment;
  gdt: KvmDtable; idt: KvmDtable;
  cr0: number; cr2: number; cr3: number; cr4: number; cr8: number; efer: number; apicBase: number;
}

export const REG_NAMES = [
  "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
  "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
] as const;
export type RegName = (typeof REG_NAMES)[number];
/** struct kvm_regs as bigints (64-bit values do not fit a JS number). */
export type KvmRegs = Record<RegName, bigint>;

const SEG_ORDER = ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"] as const;

function big(n: number): bigint {
  return BigInt(n);
}

export function encodeRegs(r: KvmRegs): Uint8Array {
  const b = new Uint8Array(SIZEOF.kvm_regs);
  const dv = new DataView(b.buffer);
  REG_NAMES.forEach((name, i) => dv.setBigUint64(i * 8, BigInt.asUintN(64, r[name]), true));
  return b;
}

export function decodeRegs(b: Uint8Array): KvmRegs {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const out = {} as KvmRegs;
  REG_NAMES.forEach((name, i) => (out[name] = dv.getBigUint64(i * 8, true)));
  return out;
}

function writeSeg(dv: DataView, off: number, s: KvmSegment): void {
  dv.setBigUint64(off, big(s.base), true);
  dv.setUint32(off + 8, s.limit >>> 0, true);
  dv.setUint16(off + 12, s.selector, true);
  dv.setUint8(off + 14, s.type);
  dv.setUint8(off + 15, s.present);
  dv.setUint8(off + 16, s.dpl);
  dv.setUint8(off + 17, s.db);
  dv.setUint8(off + 18, s.s);
  dv.setUint8(off + 19, s.l);
  dv.setUint8(off + 20, s.g);
  dv.setUint8(off + 21, s.avl);
  dv.setUint8(off + 22, s.unusable ?? 0);
}

function readSeg(dv: DataView, off: number): KvmSegment {
  return {
    base: Number(dv.getBigUint64(off, true)),
    limit: dv.getUint32(off + 8, true),
    selector: dv.getUint16(off + 12, true),
    type: dv.getUint8(off + 14),
    present: dv.getUint8(off + 15),
    dpl: dv.getUint8(off + 16),
    db: dv.getUint8(off + 17),
    s: dv.getUint8(off + 18),
    l: dv.getUint8(off + 19),
    g: dv.getUint8(off + 20),
    avl: dv.getUint8(off + 21),
    unusable: dv.getUint8(off + 22),
  };
}

// Offsets inside struct kvm_sregs: 8 segments of 24 bytes, two dtables of 16, then control registers.
const SREGS_GDT = 192;
const SREGS_IDT = 208;
const SREGS_CR0 = 224;

/** Read-modify-write: `base` is the current KVM_GET_SREGS bytes (keeps the interrupt bitmap). */
export function encodeSregs(s: KvmSregs, base: Uint8Array = new Uint8Array(SIZEOF.kvm_sregs)): Uint8Array {
  const b = base.slice();
  const dv = new DataView(b.buffer);
  SEG_ORDER.forEach((name, i) => writeSeg(dv, i * 24, s[name]));
  dv.setBigUint64(SREGS_GDT, big(s.gdt.base), true);
  dv.setUint16(SREGS_GDT + 8, s.gdt.limit, true);
  dv.setBigUint64(SREGS_IDT, big(s.idt.base), true);
  dv.setUint16(SREGS_IDT + 8, s.idt.limit, true);
  const crs = [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apicBase];
  crs.forEach((v, i) => dv.setBigUint64(SREGS_CR0 + i * 8, big(v), true));
  return b;
}

export function decodeSregs(b: Uint8Array): KvmSregs {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const seg = (i: number) => readSeg(dv, i * 24);
  const cr = (i: number) => Number(dv.getBigUint64(SREGS_CR0 + i * 8, true));
  return {
    cs: seg(0), ds: seg(1), es: seg(2), fs: seg(3), gs: seg(4), ss: seg(5), tr: seg(6), ldt: seg(7),
    gdt: { base: Number(dv.getBigUint64(SREGS_GDT, true)), limit: dv.getUint16(SREGS_GDT + 8, true) },
    idt: { base: Number(dv.getBigUint64(SREGS_IDT, true)), limit: dv.getUint16(SREGS_IDT + 8, true) },
    cr0: cr(0), cr2: cr(1), cr3: cr(2), cr4: cr(3), cr8: cr(4), efer: cr(5), apicBase: cr(6),
  };
}

/** struct kvm_fpu with the x87 control word and MXCSR at their reset values (SDM vol. 1 §8.1.5, §10.2.3). */
export function encodeBootFpu(): Uint8Array {
  const b = new Uint8Array(SIZEOF.kvm_fpu);
  const dv = new DataView(b.buffer);
  dv.setUint16(128, 0x37f, true); // fcw
  dv.setUint32(408, 0x1f80, true); // mxcsr
  return b;
}

export interface MsrEntry {
  index: number;
  data: bigint;
}

export function encodeMsrs(entries: readonly MsrEntry[]): Uint8Array {
  const b = new Uint8Array(SIZEOF.kvm_msrs + entries.length * SIZEOF.kvm_msr_entry);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, entries.length, true);
  entries.forEach((e, i) => {
    const off = SIZEOF.kvm_msrs + i * SIZEOF.kvm_msr_entry;
    dv.setUint32(off, e.index, true);
    dv.setBigUint64(off + 8, e.data, true);
  });
  return b;
}

/** The entries of a struct kvm_msrs the kernel filled (its nmsrs says how many it read). */
export function decodeMsrs(b: Uint8Array, count: number): MsrEntry[] {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const out: MsrEntry[] = [];
  for (let i = 0; i < count; i++) {
    const off = SIZEOF.kvm_msrs + i * SIZEOF.kvm_msr_entry;
    out.push({ index: dv.getUint32(off, true), data: dv.getBigUint64(off + 8, true) });
  }
  return out;
}

export interface KvmCpuidEntry {
  function: number;
  index: number;
  flags: number;
  eax: number;
  ebx: number;
  ecx: number;
  edx: number;
}

export function encodeCpuid2(entries: readonly KvmCpuidEntry[], capacity = entries.length): Uint8Array {
  const b = new Uint8Array(SIZEOF.kvm_cpuid2 + capacity * SIZEOF.kvm_cpuid_entry2);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, Math.max(capacity, entries.length), true);
  entries.forEach((e, i) => {
    const off = SIZEOF.kvm_cpuid2 + i * SIZEOF.kvm_cpuid_entry2;
    dv.setUint32(off, e.function >>> 0, true);
    dv.setUint32(off + 4, e.index >>> 0, true);
    dv.setUint32(off + 8, e.flags >>> 0, true);
    dv.setUint32(off + 12, e.eax >>> 0, true);
    dv.setUint32(off + 16, e.ebx >>> 0, true);
    dv.setUint32(off + 20, e.ecx >>> 0, true);
    dv.setUint32(off + 24, e.edx >>> 0, true);
  });
  return b;
}

export function decodeCpuid2(b: Uint8Array): KvmCpuidEntry[] {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const n = dv.getUint32(0, true);
  const out: KvmCpuidEntry[] = [];
  for (let i = 0; i < n; i++) {
    const off = SIZEOF.kvm_cpuid2 + i * SIZEOF.kvm_cpuid_entry2;
    if (off + SIZEOF.kvm_cpuid_entry2 > b.byteLength) break;
    out.push({
      function: dv.getUint32(off, true),
      index: dv.getUint32(off + 4, true),
      flags: dv.getUint32(off + 8, true),
      eax: dv.getUint32(off + 12, true),
      ebx: dv.getUint32(off + 16, true),
      ecx: dv.getUint32(off + 20, true),
      edx: dv.getUint32(off + 24, true),
    });
  }
  return out;
}
