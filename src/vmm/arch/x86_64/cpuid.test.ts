import { readFileSync } from "node:fs";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { isTypevisorError } from "../../../errors.js";
import { CPUID_MAX_CPUS, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, filterCpuid, type CpuidEntry } from "./cpuid.js";

/**
 * A real KVM_GET_SUPPORTED_CPUID list (ioctl 0xc008ae05 on /dev/kvm, read with a
 * koffi script on a project machine, Nov 2026): an AMD EPYC host whose /dev/kvm
 * is the kvm_pvm module (kvm-lab.md).
 */
const AMD_PVM: CpuidEntry[] = JSON.parse(
  readFileSync(new URL("./cpuid.fixture-pvm-epyc.json", import.meta.url), "utf8"),
) as CpuidEntry[];

/**
 * Intel variant for the Intel-only leaf 4: the same list with the vendor string
 * "GenuineIntel" and leaf 4 subleaves shaped as an Intel host reports them
 * (L1d, L1i, L2, L3 of an 8-core/16-thread part; SDM vol. 2A CPUID leaf 04H).
 * Synthetic: no Intel KVM host was available.
 */
const INTEL_LIKE: CpuidEntry[] = AMD_PVM.flatMap((e): CpuidEntry[] => {
  if (e.function === 0) return [{ ...e, ebx: 0x756e6547, edx: 0x49656e69, ecx: 0x6c65746e }];
  if (e.function !== 4) return [e];
  const sub = (index: number, eax: number, ebx: number, ecx: number): CpuidEntry => ({
    function: 4, index, flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX, eax, ebx, ecx, edx: 0,
  });
  return [
    sub(0, 0x1c004121, 0x01c0003f, 0x3f),
    sub(1, 0x1c004122, 0x01c0003f, 0x3f),
    sub(2, 0x1c004143, 0x01c0003f, 0x3ff),
    sub(3, 0x1c03c163, 0x03c0003f, 0x3fff),
    sub(4, 0, 0, 0),
  ];
});

const get = (list: readonly CpuidEntry[], fn: number, index = 0): CpuidEntry => {
  const e = list.find((x) => x.function === fn && x.index === index);
  if (e === undefined) throw new Error(`no leaf 0x${fn.toString(16)}.${index}`);
  return e;
};

/**
 * Linux's reading of leaf 0xB (arch/x86/kernel/cpu/topology.c, detect_extended_topology):
 * walk subleaves until level type 0; SMT and core shifts; package = x2APIC ID >> core shift.
 */
function linuxTopology(list: readonly CpuidEntry[], fn: number): { x2apicId: number; coreShift: number; package: number; cores: number } {
  const smt = get(list, fn, 0);
  if (smt.ebx === 0 || ((smt.ecx >> 8) & 0xff) !== 1) throw new Error("no SMT level");
  let coreShift = smt.eax & 0x1f;
  let cores = smt.ebx & 0xffff;
  for (let i = 1; ; i++) {
    const l = get(list, fn, i);
    const type = (l.ecx >> 8) & 0xff;
    if (type === 0) break;
    if (type === 2) {
      coreShift = l.eax & 0x1f;
      cores = l.ebx & 0xffff;
    }
  }
  return { x2apicId: smt.edx, coreShift, package: smt.edx >>> coreShift, cores };
}

const key = (e: CpuidEntry): string => `${e.function.toString(16)}.${e.index}`;

describe("filterCpuid on a real KVM list (AMD, PVM host)", () => {
  it("every vCPU gets its own APIC ID in leaves 1, 0xB and 0x8000001E, one package of N cores", () => {
    fc.assert(
      fc.property(
        fc.oneof(fc.integer({ min: 1, max: 300 }), fc.integer({ min: 1, max: CPUID_MAX_CPUS }), fc.constantFrom(254, 255, 256, 257, CPUID_MAX_CPUS))
          .chain((cpus) => fc.tuple(fc.constant(cpus), fc.oneof(fc.integer({ min: 0, max: cpus - 1 }), fc.constant(cpus - 1)))),
        ([cpus, vcpuId]) => {
          const out = filterCpuid(AMD_PVM, { vcpuId, cpus });
          const l1 = get(out, 1);
          // 8-bit fields: the ID's low byte, the count saturating at 255 (the x2APIC ID is in 0xB).
          expect(l1.ebx >>> 24).toBe(vcpuId & 0xff);
          expect((l1.ebx >>> 16) & 0xff).toBe(Math.min(cpus, 255));
          expect((l1.edx >>> 28) & 1).toBe(cpus > 1 ? 1 : 0);
          const topo = linuxTopology(out, 0xb);
          expect(topo).toEqual({ x2apicId: vcpuId, coreShift: Math.ceil(Math.log2(cpus)), package: 0, cores: cpus });
          for (const e of out.filter((x) => x.function === 0xb)) expect(e.edx).toBe(vcpuId);
          expect(get(out, 0x8000001e).eax).toBe(vcpuId);
          expect(get(out, 0x8000001e).ebx & 0xff).toBe(vcpuId & 0xff);
          // AMD: NC = cores - 1 (saturating), ApicIdSize = core-ID bits.
          const l88 = get(out, 0x80000008);
          expect(l88.ecx & 0xff).toBe(Math.min(cpus - 1, 255));
          expect((l88.ecx >>> 12) & 0xf).toBe(Math.ceil(Math.log2(cpus)));
          expect(l88.eax).toBe(get(AMD_PVM, 0x80000008).eax);
        },
      ),
      { numRuns: 200 },
    );
  });

  it("invents no leaf except the documented 0xB subleaves", () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: CPUID_MAX_CPUS }), (cpus) => {
        const out = filterCpuid(AMD_PVM, { vcpuId: cpus - 1, cpus });
        const known = new Set(AMD_PVM.map(key));
        const added = out.filter((e) => !known.has(key(e))).map(key);
        expect(added).toEqual(["b.1", "b.2"]);
        expect(new Set(out.map(key)).size).toBe(out.length);
        for (const e of out) for (const r of [e.eax, e.ebx, e.ecx, e.edx]) expect(r >>> 0).toBe(r);
      }),
    );
  });

  it("offers TSC-deadline (leaf 1 ECX[24]) only when the caller says KVM emulates it, and changes nothing else", () => {
    // Real KVM leaves the bit out of KVM_GET_SUPPORTED_CPUID (the lab's 6.1 kernel does); this PVM list has it.
    const kvmList = AMD_PVM.map((e) => (e.function === 1 ? { ...e, ecx: (e.ecx & ~(1 << 24)) >>> 0 } : e));
    const off = filterCpuid(kvmList, { vcpuId: 0, cpus: 1 });
    const on = filterCpuid(kvmList, { vcpuId: 0, cpus: 1, tscDeadline: true });
    expect((get(on, 1).ecx >>> 24) & 1).toBe(1);
    expect((get(off, 1).ecx >>> 24) & 1).toBe(0);
    expect({ ...get(on, 1), ecx: (get(on, 1).ecx & ~(1 << 24)) >>> 0 }).toEqual(get(off, 1));
    expect(on.filter((e) => e.function !== 1)).toEqual(off.filter((e) => e.function !== 1));
  });

  it("keeps the KVM paravirtual leaves, sets the hypervisor bit, masks PM and PMU leaves", () => {
    const out = filterCpuid(AMD_PVM, { vcpuId: 0, cpus: 2 });
    const sig = get(out, 0x40000000);
    const text = Buffer.alloc(12);
    text.writeUInt32LE(sig.ebx, 0);
    text.writeUInt32LE(sig.ecx, 4);
    text.writeUInt32LE(sig.edx, 8);
    expect(text.toString("latin1")).toBe("KVMKVMKVM\0\0\0");
    expect(get(out, 0x40000001)).toEqual(get(AMD_PVM, 0x40000001));
    expect(get(out, 1).ecx >>> 31).toBe(1);
    // x2APIC and TSC-deadline exactly as KVM reported them when the caller adds nothing.
    expect(get(out, 1).ecx & ((1 << 21) | (1 << 24))).toBe(get(AMD_PVM, 1).ecx & ((1 << 21) | (1 << 24)));
    expect(get(out, 6)).toMatchObject({ eax: 4, ebx: 0, ecx: 0, edx: 0 });
    expect(get(out, 0xa)).toMatchObject({ eax: 0, ebx: 0, ecx: 0, edx: 0 });
    // L1/L2 private, L3 shared by both vCPUs (Fn8000_001D EAX[25:14]).
    expect((get(out, 0x8000001d, 0).eax >>> 14) & 0xfff).toBe(0);
    expect((get(out, 0x8000001d, 3).eax >>> 14) & 0xfff).toBe(1);
    // Untouched leaves are byte-for-byte what KVM reported.
    for (const fn of [0, 7, 0xd, 0x80000000, 0x80000021]) expect(get(out, fn)).toEqual(get(AMD_PVM, fn));
  });

  it("does not modify its input", () => {
    const before = JSON.stringify(AMD_PVM);
    filterCpuid(AMD_PVM, { vcpuId: 3, cpus: 4 });
    expect(JSON.stringify(AMD_PVM)).toBe(before);
  });

  it("rejects a bad topology with CPUID_TOPOLOGY", () => {
    for (const opts of [{ vcpuId: 0, cpus: 0 }, { vcpuId: 2, cpus: 2 }, { vcpuId: -1, cpus: 2 }, { vcpuId: 0, cpus: CPUID_MAX_CPUS + 1 }]) {
      try {
        filterCpuid(AMD_PVM, opts);
        expect.unreachable();
      } catch (e) {
        expect(isTypevisorError(e) && e.code).toBe("CPUID_TOPOLOGY");
      }
    }
  });
});

describe("filterCpuid, Intel-shaped leaves", () => {
  it("leaf 4 counts the package's cores and shares only L3", () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: CPUID_MAX_CPUS }), (cpus) => {
        const out = filterCpuid(INTEL_LIKE, { vcpuId: 0, cpus });
        const shift = Math.ceil(Math.log2(cpus));
        for (const index of [0, 1, 2, 3]) {
          const e = get(out, 4, index);
          // Linux (intel_num_cpu_cores): cores = (EAX >> 26) + 1; SDM rounds up to a power of two.
          expect((e.eax >>> 26) + 1).toBe(Math.min(cpus, 64));
          expect(((e.eax >>> 14) & 0xfff) + 1).toBe(index === 3 ? 2 ** shift : 1);
          expect(e.eax & 0x3fff).toBe(get(INTEL_LIKE, 4, index).eax & 0x3fff);
        }
        expect(get(out, 4, 4).eax).toBe(0);
        // AMD-only fields are left alone on Intel.
        expect(get(out, 0x80000008).ecx).toBe(get(INTEL_LIKE, 0x80000008).ecx);
        expect(get(out, 0x80000001).ecx).toBe(get(INTEL_LIKE, 0x80000001).ecx);
      }),
      { numRuns: 100 },
    );
  });

  it("fills leaf 0x1F like 0xB when KVM lists it", () => {
    const withV2 = [...INTEL_LIKE, { function: 0x1f, index: 0, flags: 1, eax: 0, ebx: 0, ecx: 0, edx: 0 }];
    const out = filterCpuid(withV2, { vcpuId: 5, cpus: 6 });
    expect(linuxTopology(out, 0x1f)).toEqual({ x2apicId: 5, coreShift: 3, package: 0, cores: 6 });
    expect(out.filter((e) => e.function === 0x1f).map((e) => e.index)).toEqual([0, 1, 2]);
  });
});
