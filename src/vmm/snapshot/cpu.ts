/**
 * Saving and restoring what KVM holds for a VM: each vCPU's registers and in-kernel state, the
 * in-kernel PIC, IOAPIC and PIT, and the kvmclock. Called only while every vCPU is out of
 * KVM_RUN (paused, or not started yet): KVM's getters on a running vCPU would wait for it.
 *
 * Restore order (KVM API §4 and what Firecracker and QEMU do, verified by restoring Debian
 * guests under KVM): CPUID first (KVM checks later state against the features it allows), then
 * MP_STATE, REGS, SREGS (which carry the APIC base: before LAPIC), XSAVE, XCRS, DEBUGREGS, LAPIC,
 * the MSRs with IA32_TSC before TSC_DEADLINE (a deadline is relative to the TSC it was set
 * against), VCPU_EVENTS last (pending exceptions and interrupts on top of all of it), and
 * KVMCLOCK_CTRL before the first KVM_RUN so the guest's watchdogs do not count the gap. The VM's
 * PIT, clock and interrupt controllers are set after the vCPUs (the IOAPIC's routes reach
 * LAPICs that must exist).
 */
import { TypevisorError } from "../../errors.js";
import { CAP, IRQCHIP, KVM_CLOCK, SIZEOF } from "../../kvm/ioctls.js";
import type { Kvm, VcpuFd, VmFd } from "../../kvm/kvm.js";
import { REG_NAMES, type KvmCpuidEntry, type KvmRegs, type MsrEntry } from "../../kvm/structs.js";
import { SysError } from "../../sys/libc.js";
import { b64, fromB64, hex } from "./state-file.js";
import type { VcpuState, VmKvmState } from "./state.js";

const MSR_IA32_TSC = 0x10;
const MSR_IA32_TSC_DEADLINE = 0x6e0;
/**
 * MTRRs (Intel SDM vol. 3 §11.11): the guest programs them at boot and KVM's index list does
 * not always carry them; without them a restored guest's memory could turn uncached.
 */
const MTRR_MSRS = [0x2ff, 0x250, 0x258, 0x259, ...Array.from({ length: 8 }, (_, i) => 0x268 + i), ...Array.from({ length: 16 }, (_, i) => 0x200 + i)];
/** IA32_MCG_CTL: listed by KVM, but writing it back is refused unless the guest has MCG_CTL_P (Firecracker leaves it out too). */
const NOT_SAVED = new Set([0x17b]);

/** The MSRs to save for every vCPU: KVM's list and the MTRRs, TSC first and TSC_DEADLINE last. */
export function msrsToSave(kvm: Kvm): number[] {
  const all = new Set([...kvm.msrIndexList(), ...MTRR_MSRS].filter((i) => !NOT_SAVED.has(i)));
  return [...all].sort((a, b) => rank(a) - rank(b) || a - b);
}
const rank = (i: number): number => (i === MSR_IA32_TSC ? 0 : i === MSR_IA32_TSC_DEADLINE ? 2 : 1);

export interface CpuCaps {
  /** KVM_CAP_XSAVE2's size (0 without it). */
  xsave2: number;
  xcrs: boolean;
}

export function cpuCaps(kvm: Kvm): CpuCaps {
  return { xsave2: kvm.checkExtension(CAP.XSAVE2), xcrs: kvm.checkExtension(CAP.XCRS) > 0 };
}

/**
 * `cpuid`: the table this vCPU was given (KVM_SET_CPUID2). Saved as given rather than read back
 * with KVM_GET_CPUID2, which on some hosts (PVM) answers with the host's own leaves instead.
 */
export function saveVcpu(vcpu: VcpuFd, msrs: readonly number[], caps: CpuCaps, cpuid: readonly KvmCpuidEntry[]): VcpuState {
  const regs = vcpu.getRegs();
  let tscKhz: number | null = null;
  try {
    tscKhz = vcpu.getTscKhz();
  } catch {
    // A host without a known TSC frequency: the restore then takes the host's.
  }
  return {
    id: vcpu.id,
    mpState: vcpu.getMpState(),
    regs: Object.fromEntries(REG_NAMES.map((r) => [r, hex(regs[r])])) as VcpuState["regs"],
    sregs: b64(vcpu.getSregsRaw()),
    xsave: b64(vcpu.getXsave(caps.xsave2)),
    xcrs: caps.xcrs ? b64(vcpu.getXcrs()) : null,
    debugregs: b64(vcpu.getDebugregs()),
    lapic: b64(vcpu.getLapic()),
    msrs: vcpu.getMsrs(msrs).map((m) => ({ index: m.index, data: hex(m.data) })),
    events: b64(vcpu.getVcpuEvents()),
    cpuid: [...cpuid],
    tscKhz,
  };
}

/**
 * Put `s` back into a vCPU made for it. Returns the MSRs KVM would not take (the rest are set):
 * the caller says so rather than failing a restore over a model-specific register.
 */
export function restoreVcpu(vcpu: VcpuFd, s: VcpuState, advanceNs = 0n): number[] {
  vcpu.setCpuid(s.cpuid);
  if (s.tscKhz !== null) {
    const here = safe(() => vcpu.getTscKhz());
    // A different frequency needs TSC scaling (KVM_CAP_TSC_CONTROL); without it KVM refuses and the guest's clock would drift.
    if (here !== undefined && here !== s.tscKhz) vcpu.setTscKhz(s.tscKhz);
  }
  vcpu.setMpState(s.mpState);
  const regs = Object.fromEntries(REG_NAMES.map((r) => [r, BigInt(s.regs[r])])) as KvmRegs;
  vcpu.setRegs(regs);
  vcpu.setSregsRaw(fromB64(s.sregs));
  vcpu.setXsave(fromB64(s.xsave));
  if (s.xcrs !== null) vcpu.setXcrs(fromB64(s.xcrs));
  vcpu.setDebugregs(fromB64(s.debugregs));
  vcpu.setLapic(fromB64(s.lapic));
  // The guest's TSC moves on by the time the VM was away, as its wall clock does: a guest whose
  // clocksource is the TSC (Linux prefers it over kvm-clock when the TSC is invariant) would
  // otherwise run behind by that much. Every vCPU gets the same advance, so their TSCs stay in step.
  const khz = BigInt(s.tscKhz ?? safe(() => vcpu.getTscKhz()) ?? 0);
  const ticks = advanceNs > 0n ? (advanceNs * khz) / 1_000_000n : 0n;
  const refused = setMsrsEach(vcpu, s.msrs.map((m) => ({ index: m.index, data: m.index === MSR_IA32_TSC ? BigInt(m.data) + ticks : BigInt(m.data) })));
  vcpu.setVcpuEvents(fromB64(s.events));
  return refused;
}

const MP_STATE_RUNNABLE = 0;
const OPCODE_HLT = 0xf4;
const RFLAGS_IF = 1n << 9n;
const EFER_LMA = 1 << 10;

/**
 * Complete a HLT that a restored vCPU was about to execute with interrupts off, as if it had
 * returned at once. Returns true when it moved RIP past one.
 *
 * Why: a Linux guest waiting on a paravirtual spinlock (kvm_wait() in arch/x86/kernel/kvm.c)
 * runs HLT with interrupts off and trusts the lock's releaser to wake it with KVM_HC_KICK_CPU
 * (Documentation/virt/kvm/x86/hypercalls.rst). KVM keeps that kick as a flag beside the vCPU
 * that no state ioctl carries out: KVM_GET_MP_STATE folds it in only for a vCPU already halted.
 * A vCPU caught by the snapshot between the kick and its HLT therefore came back without the
 * kick, and halted for good: the lab saw a restored Debian guest whose second CPU sat "idling at
 * native_halt" under RCU stall reports while the first waited for the lock.
 *
 * Why it is safe: resuming after a HLT with interrupts off is what an NMI does (SDM vol. 3
 * §6.7.1: the handler returns to the instruction after HLT), so guest code cannot rely on such a
 * HLT never returning; kvm_wait()'s caller re-checks the lock, and every other halt() in Linux
 * loops. A vCPU with interrupts on is left alone: its next interrupt wakes it.
 *
 * `readByte`: one byte of guest memory at a guest-physical address (undefined outside RAM).
 */
export function completePendingHalt(vcpu: VcpuFd, readByte: (gpa: bigint) => number | undefined): boolean {
  if (vcpu.getMpState() !== MP_STATE_RUNNABLE) return false;
  const regs = vcpu.getRegs();
  if ((regs.rflags & RFLAGS_IF) !== 0n) return false;
  const sregs = vcpu.getSregs();
  // The linear address of the next instruction (SDM vol. 3 §3.4.4: CS's base is ignored in 64-bit mode).
  const linear = (sregs.efer & EFER_LMA) !== 0 ? regs.rip : (BigInt(sregs.cs.base) + regs.rip) & 0xffff_ffffn;
  let gpa: bigint | undefined;
  try {
    gpa = vcpu.translate(linear);
  } catch (e) {
    // A KVM without KVM_TRANSLATE (not x86's): the state goes back as saved.
    if (e instanceof SysError) return false;
    throw e;
  }
  if (gpa === undefined || readByte(gpa) !== OPCODE_HLT) return false;
  vcpu.setRegs({ ...regs, rip: regs.rip + 1n });
  return true;
}

/** KVM_SET_MSRS stops at the first MSR it refuses: skip that one, set the rest, in order. */
function setMsrsEach(vcpu: VcpuFd, entries: MsrEntry[]): number[] {
  const refused: number[] = [];
  let rest = entries;
  while (rest.length > 0) {
    const n = vcpu.setMsrsPartial(rest);
    if (n >= rest.length) break;
    refused.push(rest[n]!.index);
    rest = rest.slice(n + 1);
  }
  return refused;
}

/** Tell the guest's kvmclock the vCPU was stopped (EINVAL: the guest has no kvmclock on it). */
export function markClockPaused(vcpu: VcpuFd): void {
  try {
    vcpu.kvmclockCtrl();
  } catch (e) {
    if (!(e instanceof SysError)) throw e;
  }
}

export function saveVmKvm(vm: VmFd): VmKvmState {
  return {
    picMaster: b64(vm.getIrqchip(IRQCHIP.PIC_MASTER)),
    picSlave: b64(vm.getIrqchip(IRQCHIP.PIC_SLAVE)),
    ioapic: b64(vm.getIrqchip(IRQCHIP.IOAPIC)),
    pit2: b64(vm.getPit2()),
    clock: b64(vm.getClock()),
    savedAtNs: hex(wallNs()),
  };
}

/**
 * Put the VM-wide state back. The kvmclock: with `keepClock` the guest's clock continues from
 * where it was saved (it lags by the time the snapshot sat on disk); otherwise it is moved
 * forward by the wall time since the save, so `date` in the guest is right at once: through
 * KVM_CLOCK_REALTIME where the saved clock carries the host's wall time (KVM API §4.56), else by
 * adding the elapsed time ourselves.
 */
export function restoreVmKvm(vm: VmFd, kvm: Kvm, s: VmKvmState, keepClock: boolean): void {
  for (const [chip, data] of [[IRQCHIP.PIC_MASTER, s.picMaster], [IRQCHIP.PIC_SLAVE, s.picSlave], [IRQCHIP.IOAPIC, s.ioapic]] as const) {
    const b = fromB64(data);
    // The chip_id inside the blob must be the one it is restored as: a swapped blob would program the wrong controller.
    if (new DataView(b.buffer).getUint32(0, true) !== chip) throw new TypevisorError("SNAPSHOT_INVALID", `interrupt controller state ${chip} carries another chip's id`);
    vm.setIrqchip(b);
  }
  vm.setPit2(fromB64(s.pit2));
  const clock = fromB64(s.clock);
  const dv = new DataView(clock.buffer);
  const flags = dv.getUint32(8, true);
  const canRealtime = (kvm.checkExtension(CAP.ADJUST_CLOCK) & KVM_CLOCK.REALTIME) !== 0;
  const out = new Uint8Array(SIZEOF.kvm_clock_data);
  const ov = new DataView(out.buffer);
  if (keepClock) {
    ov.setBigUint64(0, dv.getBigUint64(0, true), true);
  } else if ((flags & KVM_CLOCK.REALTIME) !== 0 && canRealtime) {
    ov.setBigUint64(0, dv.getBigUint64(0, true), true);
    ov.setUint32(8, KVM_CLOCK.REALTIME, true);
    ov.setBigUint64(16, dv.getBigUint64(16, true), true);
  } else {
    const elapsed = wallNs() - BigInt(s.savedAtNs);
    ov.setBigUint64(0, dv.getBigUint64(0, true) + (elapsed > 0n ? elapsed : 0n), true);
  }
  vm.setClock(out);
}

/** Nanoseconds of wall time since the state was saved (0 if the host's clock says it lies in the future). */
export function elapsedSinceSave(s: VmKvmState): bigint {
  const d = wallNs() - BigInt(s.savedAtNs);
  return d > 0n ? d : 0n;
}

function wallNs(): bigint {
  return BigInt(Date.now()) * 1_000_000n;
}

function safe<T>(f: () => T): T | undefined {
  try {
    return f();
  } catch {
    return undefined;
  }
}

/** Feature leaves a guest may have used (CPUID.1, .7.0, .0xD.1, .0x80000001) and their registers. */
const FEATURE_LEAVES: { fn: number; index: number; regs: ("eax" | "ebx" | "ecx" | "edx")[] }[] = [
  { fn: 1, index: 0, regs: ["ecx", "edx"] },
  { fn: 7, index: 0, regs: ["ebx", "ecx", "edx"] },
  { fn: 0xd, index: 1, regs: ["eax"] },
  { fn: 0x80000001, index: 0, regs: ["ecx", "edx"] },
];

/**
 * The CPU features the saved vCPU offered its guest that this host's KVM would not offer the same
 * vCPU (`here`: filterCpuid of this host for the same topology). Leaf 1 ECX bit 27 (OSXSAVE)
 * mirrors the guest's CR4 and is left out. Empty: the guest can run here.
 */
export function missingCpuFeatures(saved: readonly KvmCpuidEntry[], here: readonly KvmCpuidEntry[]): string[] {
  const missing: string[] = [];
  for (const leaf of FEATURE_LEAVES) {
    const a = saved.find((e) => e.function === leaf.fn && e.index === leaf.index);
    if (a === undefined) continue;
    const b = here.find((e) => e.function === leaf.fn && e.index === leaf.index);
    for (const r of leaf.regs) {
      let lost = (a[r] & ~(b?.[r] ?? 0)) >>> 0;
      if (leaf.fn === 1 && r === "ecx") lost = (lost & ~(1 << 27)) >>> 0;
      for (let bit = 0; bit < 32; bit++) if ((lost >>> bit) & 1) missing.push(`CPUID.${leaf.fn.toString(16)}${leaf.index !== 0 ? `.${leaf.index}` : ""}:${r.toUpperCase()}[${bit}]`);
    }
  }
  return missing;
}


