/**
 * The state file's vCPU lists (MSRs, CPUID) are checked by one loop each (flatList in state.ts),
 * not by an object schema per entry. zod's own strict object schema is the oracle: for any JSON a
 * hostile file could hold, both must take and refuse the same lists.
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { z } from "zod";
import { SIZEOF } from "../../kvm/ioctls.js";
import { decodeState, encodeState, VcpuStateSchema, type SnapshotState, type VcpuState } from "./state.js";

const b64 = (n: number): string => Buffer.alloc(n, 0x5a).toString("base64");
const hex = "0x1f";

function vcpu(over: Partial<Record<keyof VcpuState, unknown>> = {}): Record<string, unknown> {
  return {
    id: 0,
    mpState: 0,
    regs: Object.fromEntries(["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags"].map((r) => [r, hex])),
    sregs: b64(SIZEOF.kvm_sregs),
    xsave: b64(SIZEOF.kvm_xsave),
    xcrs: null,
    debugregs: b64(SIZEOF.kvm_debugregs),
    lapic: b64(SIZEOF.kvm_lapic_state),
    msrs: [{ index: 0x10, data: "0x1234" }, { index: 0xc0000080, data: "0xd01" }],
    events: b64(SIZEOF.kvm_vcpu_events),
    cpuid: [{ function: 0, index: 0, flags: 0, eax: 0xd, ebx: 0x68747541, ecx: 0x444d4163, edx: 0x69746e65 }],
    tscKhz: 2_000_000,
    ...over,
  };
}

const u32 = z.number().int().min(0).max(0xffff_ffff);
const oracle = {
  msrs: z.array(z.strictObject({ index: u32, data: z.string().regex(/^0x[0-9a-f]{1,16}$/) })).max(4096),
  cpuid: z.array(z.strictObject({ function: u32, index: u32, flags: u32, eax: u32, ebx: u32, ecx: u32, edx: u32 })).max(4096),
};

/** Values near every check's edge, and JSON's other kinds. */
const field = fc.oneof(
  fc.constantFrom(0, 1, 0xffff_ffff, 0x1_0000_0000, -1, 1.5, Number.NaN, "0x0", "0xffffffffffffffff", "0x1ffffffffffffffff", "0X1", "12", "", null, true, [], {}),
  fc.integer(),
  fc.string({ maxLength: 20 }),
);
const keys = ["index", "data", "function", "flags", "eax", "ebx", "ecx", "edx", "__proto__", "toString", "extra"];
const entry = (names: readonly string[]) =>
  fc.oneof(
    // The right keys with values of any kind: the common hostile case.
    fc.tuple(...names.map(() => field)).map((vs) => Object.fromEntries(names.map((n, i) => [n, vs[i]]))),
    // Keys missing, added or swapped.
    fc.dictionary(fc.constantFrom(...keys), field, { maxKeys: 9 }),
    fc.constantFrom(null, 7, "x", [] as unknown[]),
  );

describe("the state's MSR and CPUID lists", () => {
  it("a valid vCPU state passes, and round-trips through the state file", () => {
    const v = vcpu();
    expect(VcpuStateSchema.parse(v)).toEqual(v);
    const state = { version: 1, createdAt: "now", runState: "paused", config: { cpus: 1, memoryMiB: 64, devices: { disks: [], nets: [], rng: false } }, memory: null, vcpus: [v], vm: null, platform: null, devices: null };
    expect(decodeState(encodeState(state as unknown as SnapshotState), "a test").vcpus[0]).toEqual(v);
  });

  it.each([
    ["an MSR with an extra key", { msrs: [{ index: 1, data: hex, reserved: 0 }] }],
    ["an MSR without data", { msrs: [{ index: 1 }] }],
    ["an MSR index past 32 bits", { msrs: [{ index: 2 ** 32, data: hex }] }],
    ["an MSR's data as a number", { msrs: [{ index: 1, data: 5 }] }],
    ["an MSR's data past 64 bits", { msrs: [{ index: 1, data: "0x1ffffffffffffffff" }] }],
    ["a null MSR", { msrs: [null] }],
    ["MSRs as an object", { msrs: { 0: { index: 1, data: hex } } }],
    ["4097 MSRs", { msrs: Array.from({ length: 4097 }, () => ({ index: 1, data: hex })) }],
    ["a CPUID entry with a negative register", { cpuid: [{ function: 0, index: 0, flags: 0, eax: -1, ebx: 0, ecx: 0, edx: 0 }] }],
    ["a CPUID entry with a fraction", { cpuid: [{ function: 0.5, index: 0, flags: 0, eax: 0, ebx: 0, ecx: 0, edx: 0 }] }],
    ["a CPUID entry as an array", { cpuid: [[0, 0, 0, 0, 0, 0, 0]] }],
  ])("refuses %s, naming the field", (_what, over) => {
    const r = VcpuStateSchema.safeParse(vcpu(over));
    expect(r.success).toBe(false);
    expect(r.error?.issues[0]?.path[0]).toBe(Object.keys(over)[0]);
  });

  it("takes and refuses exactly what zod's strict object schema does (fast-check)", () => {
    for (const name of ["msrs", "cpuid"] as const) {
      const names = name === "msrs" ? ["index", "data"] : ["function", "index", "flags", "eax", "ebx", "ecx", "edx"];
      fc.assert(
        fc.property(fc.array(entry(names), { maxLength: 6 }), (list) => {
          // Through JSON, as a state file's lists come (a "__proto__" key becomes an own key there).
          const parsed = JSON.parse(JSON.stringify(list)) as unknown;
          const ours = VcpuStateSchema.shape[name].safeParse(parsed).success;
          expect(ours).toBe(oracle[name].safeParse(parsed).success);
        }),
        { numRuns: 2000 },
      );
    }
  });
});
