import type { KvmRegs, KvmSregs } from "../../kvm/structs.js";

const hex = (v: bigint | number, w = 16) => "0x" + v.toString(16).padStart(w, "0");

/** A compact register dump for the log of a crashed guest. */
export function formatRegisterDump(r: KvmRegs, s: KvmSregs): string {
  const g = (names: (keyof KvmRegs)[]) => names.map((n) => `${n.padEnd(3)}=${hex(r[n])}`).join(" ");
  return [
    g(["rip", "rsp", "rbp", "rflags"]),
    g(["rax", "rbx", "rcx", "rdx"]),
    g(["rsi", "rdi", "r8", "r9"]),
    g(["r10", "r11", "r12", "r13"]),
    g(["r14", "r15"]),
    `cr0=${hex(s.cr0)} cr2=${hex(s.cr2)} cr3=${hex(s.cr3)} cr4=${hex(s.cr4)} efer=${hex(s.efer)}`,
    `cs=${hex(s.cs.selector, 4)} base=${hex(s.cs.base)} l=${s.cs.l} db=${s.cs.db}  ss=${hex(s.ss.selector, 4)}`,
    `gdt=${hex(s.gdt.base)}/${s.gdt.limit} idt=${hex(s.idt.base)}/${s.idt.limit}`,
  ].join("\n");
}
