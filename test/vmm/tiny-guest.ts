/**
 * Tiny purpose-built guests, assembled here as machine code, for fast tests of
 * the run loop on any KVM (including this project's PVM hosts, where stock
 * kernels cannot boot). They start in 64-bit mode with the same GDT and
 * identity page tables the Linux 64-bit entry uses.
 */
import { bootGdtWrites, identityPageTableWrites, linux64CpuState } from "../../src/vmm/arch/x86_64/boot/cpu-state.js";
import { applyWrites } from "../../src/vmm/arch/x86_64/boot/placement.js";
import { PDPT_ADDR, ZERO_PAGE_ADDR } from "../../src/vmm/arch/x86_64/layout.js";
import type { GuestMemory } from "../../src/vmm/memory/guest-memory.js";
import type { BootSource } from "../../src/vmm/vm.js";

export const CODE_ADDR = 0x100000;

const movDx = (port: number) => [0x66, 0xba, port & 0xff, port >> 8];
const movAl = (v: number) => [0xb0, v & 0xff];
const OUT_DX_AL = 0xee;
const HLT = 0xf4;
const JMP_SELF = [0xeb, 0xfe];

/** Print `text` on COM1, one `out` per byte. */
export function print(text: string): number[] {
  const code = movDx(0x3f8);
  for (const b of Buffer.from(text)) code.push(...movAl(b), OUT_DX_AL);
  return code;
}

/** ACPI sleep control: SLP_TYP=5 | SLP_EN, as Linux's poweroff writes it. */
export const POWEROFF = [...movDx(0x600), ...movAl((5 << 2) | 0x20), OUT_DX_AL, HLT, ...JMP_SELF];
/** ACPI reset register write. */
export const RESET = [...movDx(0x602), ...movAl(0x01), OUT_DX_AL, HLT, ...JMP_SELF];
/** Forever: out 0x80, al; jmp back. A busy guest that exits continuously. */
export const SPIN_OUT = [0xe6, 0x80, 0xeb, 0xfc];
/**
 * Forever: mov dx, 0xcfc; in eax, dx; jmp back. Each read of the PCI configuration data port is
 * an io exit the vCPU forwards to the device thread through the mailbox (a VM with devices).
 */
export const PCI_SPIN = [...movDx(0xcfc), 0xed, 0xeb, 0xfd];
/** ud2 with an empty IDT: #UD -> #DF -> triple fault. */
export const TRIPLE_FAULT = [0x0f, 0x0b];

export function tinyGuest(code: number[]): BootSource {
  return {
    kind: "custom",
    setup: (mem: GuestMemory) => {
      applyWrites(mem, [...bootGdtWrites(true), ...identityPageTableWrites()]);
      mem.write(CODE_ADDR, Uint8Array.from(code));
      return linux64CpuState(CODE_ADDR, ZERO_PAGE_ADDR);
    },
  };
}

/** movabs rax, imm64 */
export const movRaxImm = (v: bigint): number[] => [0x48, 0xb8, ...u64(v)];
/** movabs [addr64], rax */
export const storeRax = (addr: number): number[] => [0x48, 0xa3, ...u64(BigInt(addr))];
/** movabs rax, [addr64] */
export const loadRax = (addr: number): number[] => [0x48, 0xa1, ...u64(BigInt(addr))];

function u64(v: bigint): number[] {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt.asUintN(64, v));
  return [...b];
}

/**
 * A tiny guest whose page tables also identity-map guest-physical [4 GiB, 4 GiB + highGiB GiB)
 * (2 MiB pages, PDs placed at 0x30000), so its code can reach RAM above the MMIO hole.
 */
export function tinyGuestHigh(code: number[], highGiB: number): BootSource {
  const PD_HIGH = 0x30000;
  return {
    kind: "custom",
    setup: (mem: GuestMemory) => {
      applyWrites(mem, [...bootGdtWrites(true), ...identityPageTableWrites()]);
      for (let i = 0; i < highGiB; i++) {
        const pd = PD_HIGH + i * 0x1000;
        mem.writeU64(PDPT_ADDR + (4 + i) * 8, BigInt(pd) | 3n); // present | writable
        for (let j = 0; j < 512; j++) mem.writeU64(pd + j * 8, BigInt((4 + i) * 2 ** 30 + j * 2 ** 21) | 0x83n); // present | writable | 2 MiB
      }
      mem.write(CODE_ADDR, Uint8Array.from(code));
      return linux64CpuState(CODE_ADDR, ZERO_PAGE_ADDR);
    },
  };
}
