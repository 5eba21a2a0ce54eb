/**
 * The per-vCPU CPUID table: KVM_GET_SUPPORTED_CPUID's list (what KVM and the host
 * can offer) filtered into what one vCPU of this VM reports via KVM_SET_CPUID2.
 *
 * The guest is one socket of `cpus` cores, one thread per core, APIC ID = vCPU
 * index. Everything that describes topology is rewritten so the leaves agree
 * with each other and with the MADT (acpi/tables.ts): leaf 1, leaf 4 and leaves
 * 0xB/0x1F (Intel), and 0x80000001/0x80000008/0x8000001D/0x8000001E (AMD, the
 * vendor of this project's hosts). Host-only features the VMM does not back are
 * cleared (power management leaf 6, the PMU leaf 0xA). Everything else is kept
 * as KVM reports it, including the KVM paravirtual leaves 0x40000000.. (the
 * "KVMKVMKVM" signature and feature bits that make the guest use kvm-clock).
 * Only entries already in KVM's list are emitted, except the subleaves of
 * 0xB/0x1F, which are generated (KVM lists only subleaf 0 with the
 * significant-index flag and expects the VMM to describe its topology).
 */
import { TypevisorError } from "../../../errors.js";
import type { KvmCpuidEntry } from "../../../kvm/structs.js";
import { MAX_VCPUS } from "../../defaults.js";

/** One CPUID entry, field for field struct kvm_cpuid_entry2 (KVM API §4.46): defined once, in kvm/. */
export type CpuidEntry = KvmCpuidEntry;

/** kvm_cpuid_entry2.flags: the subleaf (ECX input) selects the entry. */
export const KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1;

/** Matches acpi/tables.ts MAX_CPUS; past 254 the 8-bit fields saturate and leaf 0xB/0x1F carry the 32-bit x2APIC IDs. */
export const CPUID_MAX_CPUS = MAX_VCPUS;

const bit = (n: number): number => (1 << n) >>> 0;

/** ceil(log2(n)) for n >= 1: the APIC-ID bits that select a core (0 for one CPU). */
export function coreIdBits(cpus: number): number {
  let shift = 0;
  while (1 << shift < cpus) shift++;
  return shift;
}

/** "AuthenticAMD" in leaf 0 EBX/EDX/ECX. */
function isAmd(entries: readonly CpuidEntry[]): boolean {
  const leaf0 = entries.find((e) => e.function === 0);
  return leaf0 !== undefined && leaf0.ebx === 0x68747541 && leaf0.edx === 0x69746e65 && leaf0.ecx === 0x444d4163;
}

/**
 * Extended topology subleaves for leaf 0xB or 0x1F (Intel SDM vol. 2A, CPUID leaf
 * 0BH / 1FH): level 0 SMT (1 thread, shift 0), level 1 Core (`cpus` logical
 * processors, shift = ceil(log2 cpus), so x2APIC ID >> shift = package 0), then an
 * invalid level (type 0) that ends the enumeration. EDX = x2APIC ID on every subleaf.
 */
function extendedTopology(fn: number, flags: number, vcpuId: number, cpus: number): CpuidEntry[] {
  const shift = coreIdBits(cpus);
  const level = (index: number, eax: number, ebx: number, type: number): CpuidEntry => ({
    function: fn,
    index,
    flags: flags | KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    eax,
    ebx,
    // ECX[7:0] level number (= input ECX), ECX[15:8] level type (1 SMT, 2 Core, 0 invalid).
    ecx: ((type << 8) | index) >>> 0,
    edx: vcpuId >>> 0,
  });
  return [level(0, 0, 1, 1), level(1, shift, cpus, 2), level(2, 0, 0, 0)];
}

/**
 * Turn KVM_GET_SUPPORTED_CPUID's list into vCPU `vcpuId`'s KVM_SET_CPUID2 list for
 * a VM of `cpus` vCPUs. Pure: the input is not modified.
 * @throws TypevisorError CPUID_TOPOLOGY when cpus or vcpuId is out of range.
 */
export function filterCpuid(supported: readonly CpuidEntry[], opts: { vcpuId: number; cpus: number; tscDeadline?: boolean }): CpuidEntry[] {
  const { vcpuId, cpus } = opts;
  if (!Number.isInteger(cpus) || cpus < 1 || cpus > CPUID_MAX_CPUS) {
    throw new TypevisorError("CPUID_TOPOLOGY", `CPUID topology supports 1 to ${CPUID_MAX_CPUS} vCPUs, got ${cpus}`);
  }
  if (!Number.isInteger(vcpuId) || vcpuId < 0 || vcpuId >= cpus) {
    throw new TypevisorError("CPUID_TOPOLOGY", `vCPU id ${vcpuId} is outside 0..${cpus - 1}`);
  }
  const amd = isAmd(supported);
  const shift = coreIdBits(cpus);
  const out: CpuidEntry[] = [];
  const topologyDone = new Set<number>();

  for (const src of supported) {
    const e: CpuidEntry = { ...src };
    switch (e.function) {
      case 0x1:
        // EBX[31:24] initial APIC ID; EBX[23:16] max addressable logical processor
        // IDs in the package (software rounds it up to a power of two, SDM vol. 2A
        // CPUID leaf 01H, so `cpus` yields the same 2^shift IDs as leaf 0xB);
        // EBX[15:8] CLFLUSH line size and [7:0] brand index stay as KVM reports.
        // Both are 8 bits: past 255 the count saturates and the ID is its low byte (the x2APIC
        // ID is in leaf 0xB/0x1F EDX, which Linux reads whenever the leaf is there).
        e.ebx = ((e.ebx & 0xffff) | (Math.min(cpus, 255) << 16) | ((vcpuId & 0xff) << 24)) >>> 0;
        // ECX[31]: running under a hypervisor (the guest then looks at 0x40000000).
        // x2APIC (ECX[21]) is left as KVM reports it. TSC-deadline (ECX[24]) is not in KVM's
        // list: its LAPIC emulates the mode when it is in the kernel, and the VMM says so
        // (KVM API, KVM_CAP_TSC_DEADLINE_TIMER), as QEMU does. Without it Linux programs its
        // LAPIC timer through the one-shot initial-count register instead.
        e.ecx = (e.ecx | bit(31)) >>> 0;
        if (opts.tscDeadline === true) e.ecx = (e.ecx | bit(24)) >>> 0;
        // EDX[28] HTT: "max APIC IDs field is valid"; 0 means one logical processor per package.
        e.edx = cpus > 1 ? (e.edx | bit(28)) >>> 0 : (e.edx & ~bit(28)) >>> 0;
        break;
      case 0x4:
        // Deterministic cache parameters (SDM vol. 2A CPUID leaf 04H), per subleaf
        // with a cache type: EAX[31:26] = addressable core IDs in the package - 1
        // (6 bits, saturating at 64; Linux uses leaf 0xB beyond that), EAX[25:14] =
        // addressable IDs sharing this cache - 1: L1/L2 are per core (one thread: 0),
        // L3 and beyond are shared by the whole package.
        if ((e.eax & 0x1f) !== 0) {
          const cacheLevel = (e.eax >>> 5) & 0x7;
          const sharing = cacheLevel >= 3 ? (1 << shift) - 1 : 0;
          e.eax = ((e.eax & 0x3fff) | (sharing << 14) | ((Math.min(cpus, 64) - 1) << 26)) >>> 0;
        }
        break;
      case 0x6:
        // Thermal and power management: keep only EAX[2] ARAT (the APIC timer runs in
        // every C-state, which holds for KVM's emulated LAPIC timer). Digital thermal
        // sensor, HWP, energy-performance bias and the rest need MSRs the VMM does not emulate.
        e.eax &= bit(2);
        e.ebx = 0;
        e.ecx = 0;
        e.edx = 0;
        break;
      case 0xa:
        // Architectural performance monitoring: off. A vPMU ties the guest to the host's
        // counters (not portable across hosts for snapshot/migration, and the vCPU
        // exits on every counter MSR access); nothing in the boot path wants it.
        e.eax = 0;
        e.ebx = 0;
        e.ecx = 0;
        e.edx = 0;
        break;
      case 0xb:
      case 0x1f:
        // Extended topology: replace KVM's entry (or entries) with our levels, once.
        if (!topologyDone.has(e.function)) {
          topologyDone.add(e.function);
          out.push(...extendedTopology(e.function, e.flags, vcpuId, cpus));
        }
        continue;
      case 0x80000001:
        // AMD ECX[1] CmpLegacy (AMD APM vol. 3, CPUID Fn8000_0001 ECX): set on
        // multi-core packages, so HTT + leaf 1 EBX[23:16] count cores. Reserved on Intel.
        if (amd) e.ecx = cpus > 1 ? (e.ecx | bit(1)) >>> 0 : (e.ecx & ~bit(1)) >>> 0;
        break;
      case 0x80000008:
        // AMD ECX[15:12] ApicIdSize = core-ID bits in the APIC ID, ECX[7:0] NC = cores
        // - 1 (AMD APM vol. 3, CPUID Fn8000_0008 ECX). EAX (address sizes) kept. Reserved on Intel.
        // NC is 8 bits and saturates past 256 cores; ApicIdSize (4 bits, at most 12 here) still
        // says how many APIC-ID bits number them.
        if (amd) e.ecx = ((e.ecx & ~0xf0ff) | (shift << 12) | Math.min(cpus - 1, 255)) >>> 0;
        break;
      case 0x8000001d:
        // AMD cache topology (Fn8000_001D EAX[25:14] NumSharingCache - 1): L1/L2
        // private to a core (one thread), L3 shared by every vCPU.
        if ((e.eax & 0x1f) !== 0) {
          const cacheLevel = (e.eax >>> 5) & 0x7;
          const sharing = cacheLevel >= 3 ? cpus - 1 : 0;
          e.eax = ((e.eax & ~(0xfff << 14)) | (sharing << 14)) >>> 0;
        }
        break;
      case 0x8000001e:
        // AMD extended APIC ID (Fn8000_001E): EAX = extended APIC ID, EBX[7:0] core
        // ID, EBX[15:8] threads per core - 1 = 0, ECX[7:0] node ID 0, ECX[10:8]
        // nodes per processor - 1 = 0. KVM reports zeros: the host's values would lie.
        e.eax = vcpuId >>> 0;
        e.ebx = vcpuId & 0xff;
        e.ecx = 0;
        e.edx = 0;
        break;
      default:
        break;
    }
    out.push(e);
  }
  return out;
}
