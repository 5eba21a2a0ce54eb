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
  decodeCpuid2, decodeRegs, decodeSregs, encodeCpuid2, encodeMsrs, encodeRegs, encodeSregs,
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

  getLapic(): Uint8Array {
    const b = new Uint8Array(SIZEOF.kvm_lapic_state);
    libc.ioctl(this.fd, KVM.GET_LAPIC, b, "KVM_GET_LAPIC");
    return b;
  }

  setLapic(state: Uint8Array): void {
    libc.ioctl(this.fd, KVM.SET_LAPIC, state, "KVM_SET_LAPIC");
  }

  close(): void {
    libc.close(this.fd);
  }
}
