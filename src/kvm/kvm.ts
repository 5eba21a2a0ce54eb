/**
 * Typed wrappers over the KVM fd hierarchy (KVM API: system -> VM -> vCPU), in
 * the shape of rust-vmm's kvm-ioctls: each method is one ioctl, checks its
 * result and throws a SysError carrying errno.
 */
import { existsSync } from "node:fs";
import { TypevisorError } from "../errors.js";
import * as libc from "../sys/libc.js";
import { CAP, KVM, KVM_API_VERSION, KVM_PIT_SPEAKER_DUMMY, SIZEOF } from "./ioctls.js";
import {
  decodeCpuid2, decodeMsrs, decodeRegs, decodeSregs, encodeCpuid2, encodeMsrs, encodeRegs, encodeSregs,
  type KvmCpuidEntry, type KvmRegs, type KvmSregs, type MsrEntry,
} from "./structs.js";

export type KvmHostKind = "none" | "pvm" | "hardware";

/**
 * What backs /dev/kvm here. PVM (software nested virtualization) cannot boot
 * stock kernels (kvm-lab.md), so callers warn and offer the lab instead.
 */
export function kvmHostKind(root = "/"): KvmHostKind {
  const at = (rel: string): string => (root.endsWith("/") ? root : `${root}/`) + rel;
  if (!existsSync(at("dev/kvm"))) return "none";
  if (existsSync(at("sys/module/kvm_pvm"))) return "pvm";
  return "hardware";
}

/** A struct handed to the kernel must be exactly its size: the kernel copies sizeof(struct) from the pointer. */
function checkSize(b: Uint8Array, size: number, what: string): void {
  if (b.length !== size) throw new TypevisorError("KVM_STATE", `struct ${what} of ${b.length} bytes, ${size} expected`);
}

export class Kvm {
  readonly fd: number;

  constructor(path = "/dev/kvm") {
    try {
      this.fd = libc.open(path, libc.O_RDWR);
    } catch (e) {
      throw new TypevisorError("KVM_UNAVAILABLE", `cannot open ${path}: ${(e as Error).message}`, {
        cause: e,
        hint: "the host needs KVM (kvm-intel/kvm-amd loaded, and read/write access to /dev/kvm), or use the lab: npm run lab -- <command>",
      });
    }
    const v = libc.ioctlValue(this.fd, KVM.GET_API_VERSION, 0, "KVM_GET_API_VERSION");
    if (v !== KVM_API_VERSION) {
      throw new TypevisorError("KVM_API_VERSION", `KVM API version ${v}, expected ${KVM_API_VERSION}`);
    }
  }

  checkExtension(cap: number): number {
    return libc.ioctlValue(this.fd, KVM.CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION");
  }

  vcpuMmapSize(): number {
    return libc.ioctlValue(this.fd, KVM.GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
  }

  maxVcpus(): number {
    return this.checkExtension(CAP.MAX_VCPUS) || this.checkExtension(CAP.NR_VCPUS) || 4;
  }

  /** KVM_GET_SUPPORTED_CPUID, growing the buffer on E2BIG (KVM API §4.46). */
  supportedCpuid(): KvmCpuidEntry[] {
    for (let cap = 128; cap <= 4096; cap *= 2) {
      const buf = encodeCpuid2([], cap);
      try {
        libc.ioctl(this.fd, KVM.GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID");
        return decodeCpuid2(buf);
      } catch (e) {
        if (e instanceof libc.SysError && e.errno === 7 /* E2BIG */) continue;
        throw e;
      }
    }
    throw new TypevisorError("KVM_CPUID", "KVM_GET_SUPPORTED_CPUID returned too many entries");
  }

  /**
   * The MSRs KVM saves and restores for a vCPU (KVM API §4.3 KVM_GET_MSR_INDEX_LIST): the
   * hardware MSRs it virtualizes plus the ones it emulates (kvmclock, async PF, ...). Called
   * with room for none first: the kernel answers E2BIG with the count it needs.
   */
  msrIndexList(): number[] {
    const probe = new Uint8Array(SIZEOF.kvm_msr_list);
    const dv0 = new DataView(probe.buffer);
    try {
      libc.ioctl(this.fd, KVM.GET_MSR_INDEX_LIST, probe, "KVM_GET_MSR_INDEX_LIST");
    } catch (e) {
      if (!(e instanceof libc.SysError && e.errno === 7 /* E2BIG */)) throw e;
    }
    const n = dv0.getUint32(0, true);
    // Safe: the kernel writes at most nmsrs (n) indices after the header, and the buffer holds exactly that.
    const b = new Uint8Array(SIZEOF.kvm_msr_list + 4 * n);
    const dv = new DataView(b.buffer);
    dv.setUint32(0, n, true);
    libc.ioctl(this.fd, KVM.GET_MSR_INDEX_LIST, b, "KVM_GET_MSR_INDEX_LIST");
    const got = dv.getUint32(0, true);
    return Array.from({ length: Math.min(got, n) }, (_, i) => dv.getUint32(4 + 4 * i, true));
  }

  createVm(): VmFd {
    const fd = libc.ioctlValue(this.fd, KVM.CREATE_VM, 0, "KVM_CREATE_VM");
    return new VmFd(fd);
  }

  close(): void {
    libc.close(this.fd);
  }
}

export class VmFd {
  private readonly msiBuf = new Uint8Array(SIZEOF.kvm_msi);
  private readonly msiView = new DataView(this.msiBuf.buffer);

  constructor(readonly fd: number) {}

  setUserMemoryRegion(slot: number, guestPhysAddr: number, size: number, userspaceAddr: bigint, flags = 0): void {
    const b = new Uint8Array(SIZEOF.kvm_userspace_memory_region);
    const dv = new DataView(b.buffer);
    dv.setUint32(0, slot, true);
    dv.setUint32(4, flags, true);
    dv.setBigUint64(8, BigInt(guestPhysAddr), true);
    dv.setBigUint64(16, BigInt(size), true);
    dv.setBigUint64(24, userspaceAddr, true);
    libc.ioctl(this.fd, KVM.SET_USER_MEMORY_REGION, b, "KVM_SET_USER_MEMORY_REGION");
  }

  /**
   * KVM_ENABLE_CAP on the VM (KVM API §4.37): `args` go into args[0..3]. The struct is built
   * here and only read by the kernel during the call.
   */
  enableCap(cap: number, args: readonly number[] = []): void {
    if (args.length > 4) throw new TypevisorError("KVM_ENABLE_CAP", "KVM_ENABLE_CAP takes at most 4 arguments");
    const b = new Uint8Array(SIZEOF.kvm_enable_cap);
    const dv = new DataView(b.buffer);
    dv.setUint32(0, cap, true);
    args.forEach((a, i) => dv.setBigUint64(8 + 8 * i, BigInt(a), true));
    libc.ioctl(this.fd, KVM.ENABLE_CAP, b, "KVM_ENABLE_CAP");
  }

  setTssAddr(addr: number): void {
    libc.ioctlValue(this.fd, KVM.SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR");
  }

  setIdentityMapAddr(addr: number): void {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, BigInt(addr), true);
    libc.ioctl(this.fd, KVM.SET_IDENTITY_MAP_ADDR, b, "KVM_SET_IDENTITY_MAP_ADDR");
  }

  /** In-kernel PIC + IOAPIC + LAPICs, with KVM's default GSI routing (KVM API §4.24). */
  createIrqchip(): void {
    libc.ioctlValue(this.fd, KVM.CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP");
  }

  /** In-kernel i8254 PIT; port 0x61 served by a dummy speaker (KVM API §4.68). */
  createPit2(): void {
    const b = new Uint8Array(SIZEOF.kvm_pit_config);
    new DataView(b.buffer).setUint32(0, KVM_PIT_SPEAKER_DUMMY, true);
    libc.ioctl(this.fd, KVM.CREATE_PIT2, b, "KVM_CREATE_PIT2");
  }

  /** Drive a GSI line (KVM API §4.25). Callable from any thread. */
  irqLine(gsi: number, level: 0 | 1): void {
    const b = new Uint8Array(SIZEOF.kvm_irq_level);
    const dv = new DataView(b.buffer);
    dv.setUint32(0, gsi, true);
    dv.setUint32(4, level, true);
    libc.ioctl(this.fd, KVM.IRQ_LINE, b, "KVM_IRQ_LINE");
  }

  /** Inject one MSI (KVM API §4.71 KVM_SIGNAL_MSI). Returns false if the guest has it masked/blocked. */
  signalMsi(addressLo: number, addressHi: number, data: number): boolean {
    // One struct per VmFd, reused: this runs once per completion batch on the device thread.
    const b = this.msiBuf;
    const dv = this.msiView;
    dv.setUint32(0, addressLo >>> 0, true);
    dv.setUint32(4, addressHi >>> 0, true);
    dv.setUint32(8, data >>> 0, true);
    return libc.ioctl(this.fd, KVM.SIGNAL_MSI, b, "KVM_SIGNAL_MSI") > 0;
  }

  /**
   * Let a guest write to `addr` (MMIO, `len` bytes, any value) signal `eventfd`
   * inside KVM without an exit to userspace (KVM API §4.59 KVM_IOEVENTFD).
   */
  ioeventfd(addr: number, len: number, eventfd: number, deassign = false): void {
    const b = new Uint8Array(SIZEOF.kvm_ioeventfd);
    const dv = new DataView(b.buffer);
    dv.setBigUint64(0, 0n, true); // datamatch (unused)
    dv.setBigUint64(8, BigInt(addr), true);
    dv.setUint32(16, len, true);
    dv.setInt32(20, eventfd, true);
    dv.setUint32(24, deassign ? 1 << 2 : 0, true); // KVM_IOEVENTFD_FLAG_DEASSIGN
    libc.ioctl(this.fd, KVM.IOEVENTFD, b, "KVM_IOEVENTFD");
  }

  /** One in-kernel interrupt controller's state (KVM API §4.26 KVM_GET_IRQCHIP): the whole struct kvm_irqchip. */
  getIrqchip(chipId: number): Uint8Array {
    const b = new Uint8Array(SIZEOF.kvm_irqchip);
    new DataView(b.buffer).setUint32(0, chipId, true);
    libc.ioctl(this.fd, KVM.GET_IRQCHIP, b, "KVM_GET_IRQCHIP");
    return b;
  }

  /** KVM API §4.27; `state` is a struct kvm_irqchip (its chip_id says which), read by the kernel during the call. */
  setIrqchip(state: Uint8Array): void {
    checkSize(state, SIZEOF.kvm_irqchip, "kvm_irqchip");
    libc.ioctl(this.fd, KVM.SET_IRQCHIP, state, "KVM_SET_IRQCHIP");
  }

  /** The PIT's channels (KVM API §4.75 KVM_GET_PIT2). */
  getPit2(): Uint8Array {
    return this.getStruct(KVM.GET_PIT2, SIZEOF.kvm_pit_state2, "KVM_GET_PIT2");
  }

  setPit2(state: Uint8Array): void {
    checkSize(state, SIZEOF.kvm_pit_state2, "kvm_pit_state2");
    libc.ioctl(this.fd, KVM.SET_PIT2, state, "KVM_SET_PIT2");
  }

  /** The kvmclock (KVM API §4.55 KVM_GET_CLOCK): clock (ns), flags, and with KVM_CLOCK_REALTIME the host's wall time. */
  getClock(): Uint8Array {
    return this.getStruct(KVM.GET_CLOCK, SIZEOF.kvm_clock_data, "KVM_GET_CLOCK");
  }

  /** KVM API §4.56: with KVM_CLOCK_REALTIME in flags, KVM adds the wall time elapsed since `realtime` to `clock`. */
  setClock(state: Uint8Array): void {
    checkSize(state, SIZEOF.kvm_clock_data, "kvm_clock_data");
    libc.ioctl(this.fd, KVM.SET_CLOCK, state, "KVM_SET_CLOCK");
  }

  private getStruct(req: number, size: number, name: string): Uint8Array {
    const b = new Uint8Array(size);
    libc.ioctl(this.fd, req, b, name);
    return b;
  }

  /**
   * Fetch and clear slot `slot`'s dirty-page bitmap (KVM API §4.8 KVM_GET_DIRTY_LOG; the slot
   * must have KVM_MEM_LOG_DIRTY_PAGES). Safe: `bitmap` is a mapping of at least one bit per page
   * of the slot, rounded up to 64 bits, owned by the caller for the call.
   */
  getDirtyLog(slot: number, bitmap: libc.Mapping): void {
    const b = new Uint8Array(SIZEOF.kvm_dirty_log);
    const dv = new DataView(b.buffer);
    dv.setUint32(0, slot, true);
    dv.setBigUint64(8, bitmap.address, true);
    libc.ioctl(this.fd, KVM.GET_DIRTY_LOG, b, "KVM_GET_DIRTY_LOG");
  }

  createVcpu(id: number): VcpuFd {
    const fd = libc.ioctlValue(this.fd, KVM.CREATE_VCPU, id, "KVM_CREATE_VCPU");
    return new VcpuFd(fd, id);
  }

  close(): void {
    libc.close(this.fd);
  }
}

export class VcpuFd {
  constructor(readonly fd: number, readonly id: number) {}

  getRegs(): KvmRegs {
    const b = new Uint8Array(SIZEOF.kvm_regs);
    libc.ioctl(this.fd, KVM.GET_REGS, b, "KVM_GET_REGS");
    return decodeRegs(b);
  }

  setRegs(r: KvmRegs): void {
    libc.ioctl(this.fd, KVM.SET_REGS, encodeRegs(r), "KVM_SET_REGS");
  }

  getSregsRaw(): Uint8Array {
    const b = new Uint8Array(SIZEOF.kvm_sregs);
    libc.ioctl(this.fd, KVM.GET_SREGS, b, "KVM_GET_SREGS");
    return b;
  }

  getSregs(): KvmSregs {
    return decodeSregs(this.getSregsRaw());
  }

  setSregs(s: KvmSregs): void {
    libc.ioctl(this.fd, KVM.SET_SREGS, encodeSregs(s, this.getSregsRaw()), "KVM_SET_SREGS");
  }

  /** KVM_SET_SREGS with a whole struct kvm_sregs as KVM_GET_SREGS gave it (a snapshot's). */
  setSregsRaw(raw: Uint8Array): void {
    checkSize(raw, SIZEOF.kvm_sregs, "kvm_sregs");
    libc.ioctl(this.fd, KVM.SET_SREGS, raw, "KVM_SET_SREGS");
  }

  /** KVM_SET_MSRS: how many of `entries`, in order, KVM took (it stops at the first it refuses). */
  setMsrsPartial(entries: readonly MsrEntry[]): number {
    return libc.ioctl(this.fd, KVM.SET_MSRS, encodeMsrs(entries), "KVM_SET_MSRS");
  }

  setFpu(fpu: Uint8Array): void {
    libc.ioctl(this.fd, KVM.SET_FPU, fpu, "KVM_SET_FPU");
  }

  setMsrs(entries: readonly MsrEntry[]): void {
    const n = libc.ioctl(this.fd, KVM.SET_MSRS, encodeMsrs(entries), "KVM_SET_MSRS");
    if (n !== entries.length) {
      const bad = entries[n];
      throw new TypevisorError("KVM_SET_MSRS", `KVM refused MSR 0x${bad?.index.toString(16) ?? "?"} (${n}/${entries.length} set)`);
    }
  }

  setCpuid(entries: readonly KvmCpuidEntry[]): void {
    libc.ioctl(this.fd, KVM.SET_CPUID2, encodeCpuid2(entries), "KVM_SET_CPUID2");
  }

  /**
   * The MSRs in `indices` that KVM can read for this vCPU (KVM API §4.18 KVM_GET_MSRS): the
   * kernel stops at the first it cannot read and says how many it did, so that one is left
   * out and the rest asked again.
   */
  getMsrs(indices: readonly number[]): MsrEntry[] {
    const out: MsrEntry[] = [];
    let rest = indices.map((index) => ({ index, data: 0n }));
    while (rest.length > 0) {
      // Safe: nmsrs in the header is rest.length and the buffer holds that many entries.
      const b = encodeMsrs(rest);
      const n = libc.ioctl(this.fd, KVM.GET_MSRS, b, "KVM_GET_MSRS");
      out.push(...decodeMsrs(b, n));
      rest = rest.slice(n + 1);
    }
    return out;
  }

  getCpuid(): KvmCpuidEntry[] {
    for (let cap = 128; cap <= 4096; cap *= 2) {
      const buf = encodeCpuid2([], cap);
      try {
        libc.ioctl(this.fd, KVM.GET_CPUID2, buf, "KVM_GET_CPUID2");
        return decodeCpuid2(buf);
      } catch (e) {
        if (e instanceof libc.SysError && e.errno === 7 /* E2BIG */) continue;
        throw e;
      }
    }
    throw new TypevisorError("KVM_CPUID", "KVM_GET_CPUID2 returned too many entries");
  }

  getMpState(): number {
    const b = this.getStruct(KVM.GET_MP_STATE, SIZEOF.kvm_mp_state, "KVM_GET_MP_STATE");
    return new DataView(b.buffer).getUint32(0, true);
  }

  setMpState(state: number): void {
    const b = new Uint8Array(SIZEOF.kvm_mp_state);
    new DataView(b.buffer).setUint32(0, state, true);
    libc.ioctl(this.fd, KVM.SET_MP_STATE, b, "KVM_SET_MP_STATE");
  }

  /**
   * The FPU/SSE/AVX... state in XSAVE format (KVM API §4.42/§4.43). `size` is KVM_CAP_XSAVE2's
   * answer when it is over 4096 (KVM_GET_XSAVE2 then fills that much), else 4096.
   */
  getXsave(size: number): Uint8Array {
    return size > SIZEOF.kvm_xsave ? this.getStruct(KVM.GET_XSAVE2, size, "KVM_GET_XSAVE2") : this.getStruct(KVM.GET_XSAVE, SIZEOF.kvm_xsave, "KVM_GET_XSAVE");
  }

  /** Safe for any size of at least 4096: KVM_SET_XSAVE reads 4096 bytes, or KVM_CAP_XSAVE2's size once enabled, never more than it asked for. */
  setXsave(state: Uint8Array): void {
    if (state.length < SIZEOF.kvm_xsave) throw new TypevisorError("KVM_STATE", `kvm_xsave of ${state.length} bytes, at least ${SIZEOF.kvm_xsave} needed`);
    libc.ioctl(this.fd, KVM.SET_XSAVE, state, "KVM_SET_XSAVE");
  }

  getXcrs(): Uint8Array {
    return this.getStruct(KVM.GET_XCRS, SIZEOF.kvm_xcrs, "KVM_GET_XCRS");
  }

  setXcrs(state: Uint8Array): void {
    checkSize(state, SIZEOF.kvm_xcrs, "kvm_xcrs");
    libc.ioctl(this.fd, KVM.SET_XCRS, state, "KVM_SET_XCRS");
  }

  getDebugregs(): Uint8Array {
    return this.getStruct(KVM.GET_DEBUGREGS, SIZEOF.kvm_debugregs, "KVM_GET_DEBUGREGS");
  }

  setDebugregs(state: Uint8Array): void {
    checkSize(state, SIZEOF.kvm_debugregs, "kvm_debugregs");
    libc.ioctl(this.fd, KVM.SET_DEBUGREGS, state, "KVM_SET_DEBUGREGS");
  }

  /** Pending exceptions, interrupts, NMIs and SMIs (KVM API §4.31 KVM_GET_VCPU_EVENTS). */
  getVcpuEvents(): Uint8Array {
    return this.getStruct(KVM.GET_VCPU_EVENTS, SIZEOF.kvm_vcpu_events, "KVM_GET_VCPU_EVENTS");
  }

  setVcpuEvents(state: Uint8Array): void {
    checkSize(state, SIZEOF.kvm_vcpu_events, "kvm_vcpu_events");
    libc.ioctl(this.fd, KVM.SET_VCPU_EVENTS, state, "KVM_SET_VCPU_EVENTS");
  }

  /** The guest's TSC frequency in kHz (KVM API §4.79 KVM_GET_TSC_KHZ). */
  getTscKhz(): number {
    return libc.ioctlValue(this.fd, KVM.GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ");
  }

  setTscKhz(khz: number): void {
    libc.ioctlValue(this.fd, KVM.SET_TSC_KHZ, khz, "KVM_SET_TSC_KHZ");
  }

  /**
   * The guest-physical address of `linear` through this vCPU's page tables as they are now (KVM
   * API §4.15 KVM_TRANSLATE), or undefined where nothing is mapped. Safe: the kernel reads and
   * writes only the 24-byte struct, which lives for the call.
   */
  translate(linear: bigint): bigint | undefined {
    const b = new Uint8Array(SIZEOF.kvm_translation);
    const dv = new DataView(b.buffer);
    dv.setBigUint64(0, BigInt.asUintN(64, linear), true);
    libc.ioctl(this.fd, KVM.TRANSLATE, b, "KVM_TRANSLATE");
    return b[16] !== 0 ? dv.getBigUint64(8, true) : undefined;
  }

  /**
   * Tell the guest's kvmclock that the vCPU was stopped by the host (KVM API §4.85
   * KVM_KVMCLOCK_CTRL): its soft-lockup watchdog then does not count the pause. EINVAL when the
   * guest has not set up kvmclock on this vCPU, which callers may ignore.
   */
  kvmclockCtrl(): void {
    libc.ioctlValue(this.fd, KVM.KVMCLOCK_CTRL, 0, "KVM_KVMCLOCK_CTRL");
  }

  private getStruct(req: number, size: number, name: string): Uint8Array {
    const b = new Uint8Array(size);
    libc.ioctl(this.fd, req, b, name);
    return b;
  }

  getLapic(): Uint8Array {
    const b = new Uint8Array(SIZEOF.kvm_lapic_state);
    libc.ioctl(this.fd, KVM.GET_LAPIC, b, "KVM_GET_LAPIC");
    return b;
  }

  setLapic(state: Uint8Array): void {
    checkSize(state, SIZEOF.kvm_lapic_state, "kvm_lapic_state");
    libc.ioctl(this.fd, KVM.SET_LAPIC, state, "KVM_SET_LAPIC");
  }

  close(): void {
    libc.close(this.fd);
  }
}
