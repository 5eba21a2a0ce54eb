/**
 * KVM ioctl request numbers (linux/kvm.h; the encoding is asm-generic/ioctl.h:
 * dir<<30 | size<<16 | type<<8 | nr, with KVMIO = 0xAE). Computed from the
 * struct sizes rather than written as magic hex, so a wrong size shows here.
 */
const KVMIO = 0xae;
const NONE = 0;
const WRITE = 1;
const READ = 2;

function ioc(dir: number, nr: number, size: number): number {
  // >>> 0 keeps the value an unsigned 32-bit number (dir<<30 overflows int32).
  return ((dir << 30) | (size << 16) | (KVMIO << 8) | nr) >>> 0;
}
const io = (nr: number) => ioc(NONE, nr, 0);
const iow = (nr: number, size: number) => ioc(WRITE, nr, size);
const ior = (nr: number, size: number) => ioc(READ, nr, size);
const iowr = (nr: number, size: number) => ioc(READ | WRITE, nr, size);

/** Struct sizes on x86_64 (linux/kvm.h, arch/x86/include/uapi/asm/kvm.h). */
export const SIZEOF = {
  kvm_userspace_memory_region: 32,
  kvm_regs: 144,
  kvm_sregs: 312,
  kvm_fpu: 416,
  kvm_msrs: 8,
  kvm_msr_entry: 16,
  kvm_cpuid2: 8,
  kvm_cpuid_entry2: 40,
  kvm_lapic_state: 1024,
  kvm_irq_level: 8,
  kvm_pit_config: 64,
  kvm_irqfd: 32,
  kvm_ioeventfd: 64,
  kvm_mp_state: 4,
  /** struct kvm_translation: linear_address, physical_address (u64), valid, writeable, usermode, pad[5] (u8). */
  kvm_translation: 24,
  kvm_msi: 32,
  kvm_dirty_log: 16,
  kvm_clock_data: 48,
  /** struct kvm_xsave: region[1024] u32 (KVM_GET_XSAVE2 may hand back more: KVM_CAP_XSAVE2). */
  kvm_xsave: 4096,
  /** struct kvm_xcrs: nr_xcrs, flags, xcrs[16] {xcr, reserved, value}, padding[16] u64. */
  kvm_xcrs: 392,
  /** struct kvm_debugregs: db[4], dr6, dr7, flags, reserved[9] (u64 each). */
  kvm_debugregs: 128,
  kvm_vcpu_events: 64,
  /** struct kvm_irqchip: chip_id, pad, a 512-byte union (PIC or IOAPIC state). */
  kvm_irqchip: 520,
  /** struct kvm_pit_state2: channels[3] (24 bytes each), flags, reserved[9]. */
  kvm_pit_state2: 112,
  kvm_msr_list: 4,
  /** struct kvm_enable_cap: cap, flags, args[4], pad[64]. */
  kvm_enable_cap: 104,
} as const;

export const KVM = {
  GET_API_VERSION: io(0x00),
  CREATE_VM: io(0x01),
  CHECK_EXTENSION: io(0x03),
  GET_VCPU_MMAP_SIZE: io(0x04),
  GET_MSR_INDEX_LIST: iowr(0x02, SIZEOF.kvm_msr_list),
  GET_SUPPORTED_CPUID: iowr(0x05, SIZEOF.kvm_cpuid2),
  CREATE_VCPU: io(0x41),
  GET_DIRTY_LOG: iow(0x42, SIZEOF.kvm_dirty_log),
  SET_USER_MEMORY_REGION: iow(0x46, SIZEOF.kvm_userspace_memory_region),
  SET_TSS_ADDR: io(0x47),
  SET_IDENTITY_MAP_ADDR: iow(0x48, 8),
  CREATE_IRQCHIP: io(0x60),
  GET_IRQCHIP: iowr(0x62, SIZEOF.kvm_irqchip),
  // _IOR although it writes: a historical mistake linux/kvm.h keeps for ABI's sake.
  SET_IRQCHIP: ior(0x63, SIZEOF.kvm_irqchip),
  IRQ_LINE: iow(0x61, SIZEOF.kvm_irq_level),
  IRQFD: iow(0x76, SIZEOF.kvm_irqfd),
  CREATE_PIT2: iow(0x77, SIZEOF.kvm_pit_config),
  IOEVENTFD: iow(0x79, SIZEOF.kvm_ioeventfd),
  SIGNAL_MSI: iow(0xa5, SIZEOF.kvm_msi),
  SET_CLOCK: iow(0x7b, SIZEOF.kvm_clock_data),
  GET_CLOCK: ior(0x7c, SIZEOF.kvm_clock_data),
  GET_PIT2: ior(0x9f, SIZEOF.kvm_pit_state2),
  SET_PIT2: iow(0xa0, SIZEOF.kvm_pit_state2),
  ENABLE_CAP: iow(0xa3, SIZEOF.kvm_enable_cap),
  RUN: io(0x80),
  GET_REGS: ior(0x81, SIZEOF.kvm_regs),
  SET_REGS: iow(0x82, SIZEOF.kvm_regs),
  GET_SREGS: ior(0x83, SIZEOF.kvm_sregs),
  SET_SREGS: iow(0x84, SIZEOF.kvm_sregs),
  GET_MSRS: iowr(0x88, SIZEOF.kvm_msrs),
  SET_MSRS: iow(0x89, SIZEOF.kvm_msrs),
  GET_FPU: ior(0x8c, SIZEOF.kvm_fpu),
  SET_FPU: iow(0x8d, SIZEOF.kvm_fpu),
  GET_LAPIC: ior(0x8e, SIZEOF.kvm_lapic_state),
  SET_LAPIC: iow(0x8f, SIZEOF.kvm_lapic_state),
  SET_CPUID2: iow(0x90, SIZEOF.kvm_cpuid2),
  GET_CPUID2: iowr(0x91, SIZEOF.kvm_cpuid2),
  TRANSLATE: iowr(0x85, SIZEOF.kvm_translation),
  GET_MP_STATE: ior(0x98, SIZEOF.kvm_mp_state),
  SET_MP_STATE: iow(0x99, SIZEOF.kvm_mp_state),
  GET_VCPU_EVENTS: ior(0x9f, SIZEOF.kvm_vcpu_events),
  SET_VCPU_EVENTS: iow(0xa0, SIZEOF.kvm_vcpu_events),
  GET_DEBUGREGS: ior(0xa1, SIZEOF.kvm_debugregs),
  SET_DEBUGREGS: iow(0xa2, SIZEOF.kvm_debugregs),
  SET_TSC_KHZ: io(0xa2),
  GET_TSC_KHZ: io(0xa3),
  GET_XSAVE: ior(0xa4, SIZEOF.kvm_xsave),
  SET_XSAVE: iow(0xa5, SIZEOF.kvm_xsave),
  GET_XCRS: ior(0xa6, SIZEOF.kvm_xcrs),
  SET_XCRS: iow(0xa7, SIZEOF.kvm_xcrs),
  KVMCLOCK_CTRL: io(0xad),
  GET_XSAVE2: ior(0xcf, SIZEOF.kvm_xsave),
} as const;

/** KVM_CHECK_EXTENSION capability numbers (linux/kvm.h). */
export const CAP = {
  IRQCHIP: 0,
  HLT: 1,
  USER_MEMORY: 3,
  SET_TSS_ADDR: 4,
  EXT_CPUID: 7,
  NR_VCPUS: 9,
  ADJUST_CLOCK: 39,
  VCPU_EVENTS: 41,
  DEBUGREGS: 50,
  XSAVE: 55,
  XCRS: 56,
  TSC_CONTROL: 60,
  GET_TSC_KHZ: 61,
  KVMCLOCK_CTRL: 76,
  XSAVE2: 208,
  PIT2: 33,
  IRQFD: 32,
  IOEVENTFD: 36,
  MAX_VCPUS: 66,
  TSC_DEADLINE_TIMER: 72,
  X2APIC_API: 129,
  IMMEDIATE_EXIT: 136,
} as const;

/** KVM_CAP_X2APIC_API flags (KVM API §7.7). */
export const X2APIC_API = {
  /** MSI routes and LAPIC state carry 32-bit x2APIC IDs. */
  USE_32BIT_IDS: 1 << 0,
  /** In x2APIC mode, destination 0xff is APIC ID 255, not broadcast. */
  DISABLE_BROADCAST_QUIRK: 1 << 1,
} as const;

/** The only API version KVM has ever had (KVM API §4.1). */
export const KVM_API_VERSION = 12;

/** kvm_run.exit_reason values (linux/kvm.h). */
export const EXIT = {
  UNKNOWN: 0,
  EXCEPTION: 1,
  IO: 2,
  HYPERCALL: 3,
  DEBUG: 4,
  HLT: 5,
  MMIO: 6,
  IRQ_WINDOW_OPEN: 7,
  SHUTDOWN: 8,
  FAIL_ENTRY: 9,
  INTR: 10,
  SET_TPR: 11,
  TPR_ACCESS: 12,
  NMI: 16,
  INTERNAL_ERROR: 17,
  SYSTEM_EVENT: 24,
} as const;

export const EXIT_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(EXIT).map(([k, v]) => [v, k.toLowerCase()]),
);

/** KVM_SYSTEM_EVENT types. */
export const SYSTEM_EVENT = { SHUTDOWN: 1, RESET: 2, CRASH: 3 } as const;

export const KVM_PIT_SPEAKER_DUMMY = 1;
/** kvm_userspace_memory_region.flags: log the guest's writes to the slot (KVM API §4.35). */
export const KVM_MEM_LOG_DIRTY_PAGES = 1;

/** struct kvm_clock_data flags (KVM API §4.55 KVM_GET_CLOCK). */
export const KVM_CLOCK = { TSC_STABLE: 2, REALTIME: 4, HOST_TSC: 8 } as const;

/** KVM_GET_IRQCHIP chip ids (linux/kvm.h). */
export const IRQCHIP = { PIC_MASTER: 0, PIC_SLAVE: 1, IOAPIC: 2 } as const;
export const KVM_IOEVENTFD_FLAG_PIO = 1 << 1;
