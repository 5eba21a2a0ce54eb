/**
 * MSR values for a vCPU at boot. Linux expects architectural reset values for
 * the syscall MSRs and, without firmware to program MTRRs, a write-back default
 * memory type so it does not run uncached (Intel SDM vol. 3 §11.11.2.1,
 * IA32_MTRR_DEF_TYPE: E=bit 11, type 6 = WB). Fast strings on (MISC_ENABLE
 * bit 0), as firmware leaves it.
 */
import type { MsrEntry } from "../../../kvm/structs.js";

export const MSR = {
  IA32_TSC: 0x10,
  IA32_SYSENTER_CS: 0x174,
  IA32_SYSENTER_ESP: 0x175,
  IA32_SYSENTER_EIP: 0x176,
  IA32_MISC_ENABLE: 0x1a0,
  IA32_MTRR_DEF_TYPE: 0x2ff,
  STAR: 0xc000_0081,
  LSTAR: 0xc000_0082,
  CSTAR: 0xc000_0083,
  SYSCALL_MASK: 0xc000_0084,
  KERNEL_GS_BASE: 0xc000_0102,
} as const;

export function bootMsrs(): MsrEntry[] {
  return [
    { index: MSR.IA32_SYSENTER_CS, data: 0n },
    { index: MSR.IA32_SYSENTER_ESP, data: 0n },
    { index: MSR.IA32_SYSENTER_EIP, data: 0n },
    { index: MSR.STAR, data: 0n },
    { index: MSR.CSTAR, data: 0n },
    { index: MSR.KERNEL_GS_BASE, data: 0n },
    { index: MSR.SYSCALL_MASK, data: 0n },
    { index: MSR.LSTAR, data: 0n },
    { index: MSR.IA32_TSC, data: 0n },
    { index: MSR.IA32_MISC_ENABLE, data: 1n },
    { index: MSR.IA32_MTRR_DEF_TYPE, data: (1n << 11n) | 6n },
  ];
}
