import { Buffer } from "node:buffer";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { TypevisorError } from "../../../../errors.js";
import type { GuestMemory } from "../../../memory/guest-memory.js";
import { BOOT_GDT_ADDR, CMDLINE_ADDR, HIGH_MEMORY_START, PVH_INFO_ADDR, ZERO_PAGE_ADDR } from "../layout.js";
import { detectKernelFormat, e820Map, extractVmlinux, loadKernel, parseBzImage, parseElf, type BootPlan, type Segment } from "./index.js";
import { RecordingMemory, fakeBzImage, fakeElf, findDebianKernel, readIfPresent } from "./test-fixtures.js";

const MiB = 1 << 20;
const RSDP = 0xe0000;

function same(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.compare(a, b) === 0;
}
function errorOf(f: () => unknown): TypevisorError | undefined {
  try {
    f();
  } catch (e) {
    if (e instanceof TypevisorError) return e;
    throw e;
  }
  return undefined;
}
function randomBytes(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  let x = seed;
  for (let i = 0; i < n; i++) {
    x = (x * 1664525 + 1013904223) >>> 0;
    out[i] = x >>> 24;
  }
  return out;
}
function cstring(mem: GuestMemory, addr: number): string {
  let s = "";
  for (let a = addr; ; a++) {
    const c = mem.readU8(a);
    if (c === 0) return s;
    s += String.fromCharCode(c);
  }
}

/** Walk 4-level paging with 2 MiB leaves (SDM vol. 3 §4.5) to translate a linear address. */
function translate(mem: GuestMemory, cr3: number, va: number): number | undefined {
  const idx = (shift: number) => Math.floor(va / 2 ** shift) % 512;
  const pml4e = mem.readU64(cr3 + idx(39) * 8);
  if ((pml4e & 1n) === 0n) return undefined;
  const pdpte = mem.readU64(Number(pml4e & 0xffffffffff000n) + idx(30) * 8);
  if ((pdpte & 1n) === 0n) return undefined;
  const pde = mem.readU64(Number(pdpte & 0xffffffffff000n) + idx(21) * 8);
  if ((pde & 1n) === 0n || (pde & 0x80n) === 0n) return undefined;
  return Number(pde & 0xfffffffe00000n) + (va % (2 * MiB));
}

/** Decode an 8-byte segment descriptor (SDM vol. 3 §3.4.5) into kvm_segment terms. */
function decodeDescriptor(d: bigint): Omit<Segment, "selector"> {
  const n = (shift: bigint, bits: bigint) => Number((d >> shift) & ((1n << bits) - 1n));
  const rawLimit = n(0n, 16n) | (n(48n, 4n) << 16);
  const g = n(55n, 1n);
  return {
    base: n(16n, 24n) | (n(56n, 8n) * 2 ** 24),
    limit: g ? rawLimit * 0x1000 + 0xfff : rawLimit,
    type: n(40n, 4n),
    s: n(44n, 1n),
    dpl: n(45n, 2n),
    present: n(47n, 1n),
    avl: n(52n, 1n),
    l: n(53n, 1n),
    db: n(54n, 1n),
    g,
  };
}
function expectGdtMatches(mem: GuestMemory, plan: BootPlan): void {
  for (const seg of [plan.cpu.sregs.cs, plan.cpu.sregs.ds, plan.cpu.sregs.ss, plan.cpu.sregs.tr]) {
    expect(seg.selector % 8).toBe(0);
    expect(seg.selector).toBeLessThanOrEqual(plan.cpu.sregs.gdt.limit);
    const { selector: _sel, ...want } = seg;
    expect(decodeDescriptor(mem.readU64(plan.cpu.sregs.gdt.base + seg.selector))).toEqual(want);
  }
}

/** Fields the loader writes (boot.rst "write" fields); everything else in the header is copied from the image. */
const LOADER_WRITTEN = [
  [0x1fa, 2],
  [0x210, 2],
  [0x214, 4],
  [0x218, 8],
  [0x224, 2],
  [0x228, 4],
  [0x250, 8],
] as const;
function loaderWritten(off: number): boolean {
  return LOADER_WRITTEN.some(([o, n]) => off >= o && off < o + n);
}

function checkBzImageLoad(mem: GuestMemory, image: Uint8Array, plan: BootPlan, opts: { cmdline: string; initrd?: Uint8Array; memBytes: number }): void {
  const hdr = parseBzImage(image);
  const zp = mem.read(ZERO_PAGE_ADDR, 4096);
  const dv = new DataView(zp.buffer);
  expect(plan.format).toBe("bzimage");
  expect(plan.protocol).toBe("linux64");

  // Setup header copied from the image up to 0x202 + byte at 0x201, except the loader's fields.
  const end = 0x202 + image[0x201]!;
  for (let off = 0x1f1; off < end; off++) if (!loaderWritten(off)) expect(zp[off], `header byte ${off.toString(16)}`).toBe(image[off]);
  expect(zp[0x210]).toBe(0xff); // type_of_loader
  expect(zp[0x211]).toBe(image[0x211]! | 0x80); // LOADED_HIGH kept, CAN_USE_HEAP set
  expect(dv.getUint16(0x224, true)).toBeGreaterThan(0); // heap_end_ptr
  expect(dv.getUint16(0x1fa, true)).toBe(0xffff);
  expect(dv.getBigUint64(0x250, true)).toBe(0n); // setup_data: none

  // Kernel at a kernel_alignment-aligned address >= pref_address, entry at +0x200, whole init_size inside RAM.
  const load = plan.layout!.kernel.addr;
  expect(load % hdr.kernelAlignment).toBe(0);
  expect(load).toBeGreaterThanOrEqual(hdr.prefAddress);
  expect(load + hdr.initSize).toBeLessThanOrEqual(opts.memBytes);
  expect(dv.getUint32(0x214, true)).toBe(load); // code32_start
  expect(plan.cpu.regs.rip).toBe(load + 0x200);
  expect(same(mem.slice(load, image.length - hdr.protectedModeOffset), image.subarray(hdr.protectedModeOffset))).toBe(true);

  // Command line.
  const cmdPtr = dv.getUint32(0x228, true) + dv.getUint32(0xc8, true) * 2 ** 32;
  expect(cmdPtr).toBe(CMDLINE_ADDR);
  expect(cstring(mem, cmdPtr)).toBe(opts.cmdline);

  // Initrd: where the zero page says, page aligned, under initrd_addr_max, clear of the kernel.
  const rdAddr = dv.getUint32(0x218, true) + dv.getUint32(0xc0, true) * 2 ** 32;
  const rdSize = dv.getUint32(0x21c, true) + dv.getUint32(0xc4, true) * 2 ** 32;
  if (opts.initrd !== undefined) {
    expect(rdSize).toBe(opts.initrd.length);
    expect(rdAddr % 4096).toBe(0);
    expect(rdAddr).toBeGreaterThanOrEqual(HIGH_MEMORY_START);
    expect(rdAddr + rdSize - 1).toBeLessThanOrEqual(hdr.initrdAddrMax);
    expect(rdAddr >= load + hdr.initSize || rdAddr + rdSize <= load).toBe(true);
    expect(same(mem.slice(rdAddr, rdSize), opts.initrd)).toBe(true);
  } else {
    expect(rdAddr).toBe(0);
    expect(rdSize).toBe(0);
  }

  // ACPI RSDP (2.14+) and the e820 table.
  if (hdr.version >= 0x020e) expect(dv.getBigUint64(0x70, true)).toBe(BigInt(RSDP));
  const n = zp[0x1e8]!;
  const table = Array.from({ length: n }, (_, i) => ({
    addr: Number(dv.getBigUint64(0x2d0 + i * 20, true)),
    size: Number(dv.getBigUint64(0x2d0 + i * 20 + 8, true)),
    type: dv.getUint32(0x2d0 + i * 20 + 16, true),
  }));
  expect(table).toEqual(e820Map(opts.memBytes));
  expect(plan.e820).toEqual(table);

  // CPU state: long mode, identity-mapped kernel/zero page/cmdline (boot.rst §64-bit Boot Protocol).
  const s = plan.cpu.sregs;
  expect((s.cr0 & 0x80000001) >>> 0).toBe(0x80000001);
  expect(s.cr0).toBeGreaterThan(0);
  expect(s.cr4 & 0x20).toBe(0x20);
  expect(s.efer & 0x500).toBe(0x500);
  expect(s.cs.selector).toBe(0x10);
  expect(s.cs.l).toBe(1);
  expect(s.cs.db).toBe(0);
  for (const seg of [s.ds, s.es, s.ss]) expect(seg.selector).toBe(0x18);
  expect(plan.cpu.regs.rsi).toBe(ZERO_PAGE_ADDR);
  expect(plan.cpu.regs.rflags & 0x200).toBe(0); // IF clear
  expect(s.idt.limit).toBe(0);
  for (const va of [plan.cpu.regs.rip, load + hdr.initSize - 1, ZERO_PAGE_ADDR, CMDLINE_ADDR, plan.cpu.regs.rsp, 0xbfffffff, 0xffffffff]) {
    expect(translate(mem, s.cr3, va)).toBe(va);
  }
  expectGdtMatches(mem, plan);
}

describe("detectKernelFormat", () => {
  it("tells a bzImage from an ELF and rejects anything else", () => {
    expect(detectKernelFormat(fakeBzImage())).toBe("bzimage");
    expect(detectKernelFormat(fakeElf({ segments: [{ paddr: 0x1000000, data: new Uint8Array(8) }] }))).toBe("elf");
    expect(errorOf(() => detectKernelFormat(new Uint8Array(4096)))?.code).toBe("KERNEL_INVALID");
    expect(errorOf(() => detectKernelFormat(new Uint8Array(0)))?.code).toBe("KERNEL_INVALID");
  });
});

describe("loadKernel: bzImage, synthetic", () => {
  const memBytes = 64 * MiB;

  it("builds boot_params, loads kernel, cmdline and initrd, and sets up long mode", () => {
    const mem = new RecordingMemory(memBytes);
    const image = fakeBzImage({ initSize: 0x900000, prefAddress: 0x1000000n, pmSize: 0x30000 });
    const initrd = randomBytes(300_001, 9);
    const cmdline = "console=ttyS0 root=/dev/vda panic=-1";
    const plan = loadKernel(mem, { kernel: image, initrd, cmdline, memBytes, rsdpAddr: RSDP });
    checkBzImageLoad(mem, image, plan, { cmdline, initrd, memBytes });
    expect(plan.kernelVersion).toBe("6.1.0-fake (test@typevisor) #1 SMP");
    for (const w of mem.writes) expect(w.addr + w.len).toBeLessThanOrEqual(memBytes);
  });

  it("realigns a pref_address that is not kernel_alignment-aligned, and works without an initrd", () => {
    const mem = new RecordingMemory(memBytes);
    const image = fakeBzImage({ prefAddress: 0x1100000n, kernelAlignment: 0x200000 });
    new DataView(image.buffer).setBigUint64(0x250, 0x1234n, true); // a setup_data pointer the image should not carry
    const plan = loadKernel(mem, { kernel: image, cmdline: "", memBytes, rsdpAddr: RSDP });
    expect(plan.layout!.kernel.addr).toBe(0x1200000);
    checkBzImageLoad(mem, image, plan, { cmdline: "", memBytes });
  });

  it("puts the initrd below the kernel when there is no room above it", () => {
    const mem = new RecordingMemory(memBytes);
    const image = fakeBzImage({ initSize: 40 * MiB, prefAddress: 0x1000000n });
    const initrd = randomBytes(9 * MiB, 1);
    const plan = loadKernel(mem, { kernel: image, initrd, cmdline: "x", memBytes, rsdpAddr: RSDP });
    expect(plan.layout!.initrd!.addr + initrd.length).toBeLessThanOrEqual(plan.layout!.kernel.addr);
    checkBzImageLoad(mem, image, plan, { cmdline: "x", initrd, memBytes });
  });

  it("fails with a typed error and writes nothing when something does not fit", () => {
    const cases: [string, () => Parameters<typeof loadKernel>[1]][] = [
      ["CMDLINE_TOO_LONG", () => ({ kernel: fakeBzImage({ cmdlineSize: 16 }), cmdline: "x".repeat(17), memBytes, rsdpAddr: RSDP })],
      ["CMDLINE_INVALID", () => ({ kernel: fakeBzImage(), cmdline: "a\0b", memBytes, rsdpAddr: RSDP })],
      ["INITRD_TOO_LARGE", () => ({ kernel: fakeBzImage(), initrd: new Uint8Array(60 * MiB), cmdline: "", memBytes, rsdpAddr: RSDP })],
      ["INITRD_TOO_LARGE", () => ({ kernel: fakeBzImage({ initrdAddrMax: 0x1ffffff }), initrd: new Uint8Array(16 * MiB), cmdline: "", memBytes, rsdpAddr: RSDP })],
      ["MEMORY_TOO_SMALL", () => ({ kernel: fakeBzImage({ initSize: 60 * MiB }), cmdline: "", memBytes, rsdpAddr: RSDP })],
      ["MEMORY_TOO_SMALL", () => ({ kernel: fakeBzImage(), cmdline: "", memBytes: 1 * MiB, rsdpAddr: RSDP })],
      ["MEMORY_TOO_SMALL", () => ({ kernel: fakeBzImage(), cmdline: "", memBytes: 128 * MiB, rsdpAddr: RSDP })],
      ["KERNEL_INVALID", () => ({ kernel: fakeBzImage().subarray(0, 5000), cmdline: "", memBytes, rsdpAddr: RSDP })],
      ["KERNEL_INVALID", () => ({ kernel: fakeBzImage({ version: 0x0209 }), cmdline: "", memBytes, rsdpAddr: RSDP })],
    ];
    for (const [code, opts] of cases) {
      const mem = new RecordingMemory(memBytes);
      expect(errorOf(() => loadKernel(mem, opts()))?.code, code).toBe(code);
      expect(mem.writes).toEqual([]);
    }
  });

  it("property: initrd placement is aligned, inside RAM and initrd_addr_max, and clear of the kernel, or a typed error", () => {
    const mem = new RecordingMemory(48 * MiB);
    fc.assert(
      fc.property(
        fc.integer({ min: 4, max: 48 }),
        fc.integer({ min: 1, max: 40 * MiB }),
        fc.integer({ min: 1, max: 32 }),
        fc.integer({ min: 2, max: 47 }),
        (memMiB, initrdSize, initMiB, maxMiB) => {
          mem.writes.length = 0;
          const image = fakeBzImage({ initSize: initMiB * MiB, pmSize: 0x1000, initrdAddrMax: maxMiB * MiB - 1 });
          const initrd = new Uint8Array(initrdSize);
          const memBytes = memMiB * MiB;
          const err = errorOf(() => {
            const plan = loadKernel(mem, { kernel: image, initrd, cmdline: "", memBytes, rsdpAddr: RSDP });
            const k = plan.layout!.kernel;
            const rd = plan.layout!.initrd!;
            expect(rd.addr % 4096).toBe(0);
            expect(rd.addr).toBeGreaterThanOrEqual(HIGH_MEMORY_START);
            expect(rd.addr + rd.size).toBeLessThanOrEqual(Math.min(memBytes, maxMiB * MiB));
            expect(rd.addr >= k.addr + k.size || rd.addr + rd.size <= k.addr).toBe(true);
            expect(k.addr + k.size).toBeLessThanOrEqual(memBytes);
            for (const w of mem.writes) expect(w.addr + w.len).toBeLessThanOrEqual(memBytes);
          });
          if (err !== undefined) {
            expect(["INITRD_TOO_LARGE", "MEMORY_TOO_SMALL"]).toContain(err.code);
            expect(mem.writes).toEqual([]);
          }
        },
      ),
      { numRuns: 150 },
    );
  });

  it("property: mutated or truncated headers give TypevisorError and no writes, or writes inside RAM only", () => {
    const memBytes = 32 * MiB;
    const mem = new RecordingMemory(memBytes);
    const image = fakeBzImage({ pmSize: 0x2000, initSize: 0x200000 });
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.integer({ min: 0x1e0, max: 0x27f }), fc.integer({ min: 0, max: 255 })), { maxLength: 10 }),
        fc.integer({ min: 0, max: image.length }),
        (muts, cut) => {
          mem.writes.length = 0;
          const m = image.slice(0, cut);
          for (const [off, v] of muts) if (off < m.length) m[off] = v;
          try {
            loadKernel(mem, { kernel: m, initrd: new Uint8Array(4096), cmdline: "console=ttyS0", memBytes, rsdpAddr: RSDP });
            for (const w of mem.writes) expect(w.addr >= 0 && w.addr + w.len <= memBytes).toBe(true);
          } catch (e) {
            expect(e).toBeInstanceOf(TypevisorError);
            expect(mem.writes).toEqual([]);
          }
        },
      ),
      { numRuns: 400 },
    );
  });
});

describe("loadKernel: PVH ELF, synthetic", () => {
  const memBytes = 64 * MiB;
  const text = randomBytes(5000, 2);
  const data = randomBytes(777, 3);
  const elf = fakeElf({
    segments: [
      { paddr: 0x1000000, data: text },
      { paddr: 0x1400000, data, memSize: 0x5000 },
    ],
    pvhEntry: 0x1000100,
  });

  it("loads segments at p_paddr, zeroes bss, writes hvm_start_info, and enters 32-bit protected mode", () => {
    const mem = new RecordingMemory(memBytes);
    mem.fill(0x1400000, 0x5000, 0xaa); // stale bytes that must be cleared as bss
    const initrd = randomBytes(123_457, 4);
    const cmdline = "console=ttyS0 quiet";
    const plan = loadKernel(mem, { kernel: elf, initrd, cmdline, memBytes, rsdpAddr: RSDP });
    expect(plan.format).toBe("elf");
    expect(plan.protocol).toBe("pvh");
    expect(same(mem.slice(0x1000000, text.length), text)).toBe(true);
    expect(same(mem.slice(0x1400000, data.length), data)).toBe(true);
    expect(mem.slice(0x1400000 + data.length, 0x5000 - data.length).every((b) => b === 0)).toBe(true);

    // Xen arch-x86/hvm/start_info.h.
    const si = PVH_INFO_ADDR;
    expect(mem.readU32(si)).toBe(0x336ec578);
    expect(mem.readU32(si + 4)).toBe(1);
    expect(mem.readU32(si + 12)).toBe(1); // nr_modules
    expect(cstring(mem, Number(mem.readU64(si + 24)))).toBe(cmdline);
    expect(Number(mem.readU64(si + 32))).toBe(RSDP);
    const mod = Number(mem.readU64(si + 16));
    const rdAddr = Number(mem.readU64(mod));
    const rdSize = Number(mem.readU64(mod + 8));
    expect(rdSize).toBe(initrd.length);
    expect(rdAddr % 4096).toBe(0);
    expect(same(mem.slice(rdAddr, rdSize), initrd)).toBe(true);
    for (const [a, n] of [
      [0x1000000, text.length],
      [0x1400000, 0x5000],
    ] as const) {
      expect(rdAddr >= a + n || rdAddr + rdSize <= a).toBe(true);
    }
    const mm = Number(mem.readU64(si + 40));
    const entries = mem.readU32(si + 48);
    const memmap = Array.from({ length: entries }, (_, i) => ({
      addr: Number(mem.readU64(mm + i * 24)),
      size: Number(mem.readU64(mm + i * 24 + 8)),
      type: mem.readU32(mm + i * 24 + 16),
    }));
    expect(memmap).toEqual(e820Map(memBytes));
    // The start info, its module list and memory map stay below the zero page.
    expect(mm + entries * 24).toBeLessThanOrEqual(ZERO_PAGE_ADDR);

    // Xen docs/misc/pvh.pandoc entry state.
    const { regs, sregs } = plan.cpu;
    expect(regs.rip).toBe(0x1000100);
    expect(regs.rbx).toBe(PVH_INFO_ADDR);
    expect(sregs.cr0 & 1).toBe(1);
    expect(sregs.cr0 & 0x80000000).toBe(0);
    expect(sregs.cr4).toBe(0);
    expect(sregs.efer).toBe(0);
    expect(regs.rflags & ((1 << 17) | (1 << 9) | (1 << 8))).toBe(0);
    for (const seg of [sregs.cs, sregs.ds, sregs.es]) {
      expect([seg.base, seg.limit, seg.db, seg.l, seg.present]).toEqual([0, 0xffffffff, 1, 0, 1]);
    }
    expect([sregs.tr.base, sregs.tr.limit, sregs.tr.s]).toEqual([0, 0x67, 0]);
    expect(sregs.gdt.base).toBe(BOOT_GDT_ADDR);
    expectGdtMatches(mem, plan);
  });

  it("rejects an ELF without the PVH note, segments below 1 MiB or beyond RAM, writing nothing", () => {
    const cases: [string, Uint8Array, number][] = [
      ["KERNEL_INVALID", fakeElf({ segments: [{ paddr: 0x1000000, data: text }] }), memBytes],
      ["KERNEL_INVALID", fakeElf({ segments: [{ paddr: 0x80000, data: text }], pvhEntry: 0x80000 }), memBytes],
      ["MEMORY_TOO_SMALL", fakeElf({ segments: [{ paddr: 0x1000000, data: text, memSize: 64 * MiB }], pvhEntry: 0x1000000 }), memBytes],
      ["KERNEL_INVALID", fakeElf({ segments: [{ paddr: 0xc0000000, data: text }], pvhEntry: 0xc0000000 }), memBytes],
      ["KERNEL_INVALID", elf.subarray(0, elf.length - 6000), memBytes],
      ["INITRD_TOO_LARGE", elf, 24 * MiB],
    ];
    for (const [code, kernel, mb] of cases) {
      const mem = new RecordingMemory(mb);
      const initrd = code === "INITRD_TOO_LARGE" ? new Uint8Array(20 * MiB) : undefined;
      expect(errorOf(() => loadKernel(mem, { kernel, cmdline: "", memBytes: mb, rsdpAddr: RSDP, ...(initrd ? { initrd } : {}) }))?.code, code).toBe(code);
      expect(mem.writes).toEqual([]);
    }
  });

  it("property: mutated ELF files give TypevisorError and no writes, or writes inside RAM only", () => {
    const mem = new RecordingMemory(memBytes);
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.nat(0x200), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 8 }), (muts) => {
        mem.writes.length = 0;
        const m = elf.slice();
        for (const [i, v] of muts) m[i] = v;
        try {
          loadKernel(mem, { kernel: m, cmdline: "", memBytes, rsdpAddr: RSDP });
          for (const w of mem.writes) expect(w.addr >= 0 && w.addr + w.len <= memBytes).toBe(true);
        } catch (e) {
          expect(e).toBeInstanceOf(TypevisorError);
          expect(mem.writes).toEqual([]);
        }
      }),
      { numRuns: 300 },
    );
  });
});

describe("loadKernel: real Debian kernels", () => {
  const memBytes = 256 * MiB;
  const cloud = findDebianKernel("cloud");
  const generic = findDebianKernel("generic");
  const initrd = randomBytes(3 * MiB + 123, 5);

  it.skipIf(cloud === undefined)(`cloud bzImage through the 64-bit entry (${cloud ?? "set TYPEVISOR_TEST_KERNEL"})`, () => {
    const image = readIfPresent(cloud)!;
    const mem = new RecordingMemory(memBytes);
    const cmdline = "console=ttyS0 panic=-1";
    const plan = loadKernel(mem, { kernel: image, initrd, cmdline, memBytes, rsdpAddr: RSDP });
    checkBzImageLoad(mem, image, plan, { cmdline, initrd, memBytes });
    expect(plan.kernelVersion).toContain(cloud!.replace(/.*vmlinuz-/, ""));
  });

  it.skipIf(cloud === undefined)("cloud vmlinux (extracted from the bzImage) through the PVH entry", () => {
    const vmlinux = extractVmlinux(readIfPresent(cloud)!);
    const elf = parseElf(vmlinux);
    const mem = new RecordingMemory(memBytes);
    const plan = loadKernel(mem, { kernel: vmlinux, initrd, cmdline: "console=ttyS0", memBytes, rsdpAddr: RSDP });
    expect(plan.protocol).toBe("pvh");
    expect(plan.cpu.regs.rip).toBe(elf.pvhEntry);
    expect(plan.cpu.regs.rbx).toBe(PVH_INFO_ADDR);
    for (const s of elf.segments) {
      expect(same(mem.slice(s.paddr, s.fileSize), vmlinux.subarray(s.fileOffset, s.fileOffset + s.fileSize))).toBe(true);
    }
    const rd = plan.layout!.initrd!;
    for (const s of elf.segments) expect(rd.addr >= s.paddr + s.memSize || rd.addr + rd.size <= s.paddr).toBe(true);
    expect(plan.kernelVersion).toContain(cloud!.replace(/.*vmlinuz-/, ""));
  });

  it.skipIf(generic === undefined)(`generic bzImage through the 64-bit entry (${generic ?? "set TYPEVISOR_TEST_KERNEL_GENERIC"})`, () => {
    const image = readIfPresent(generic)!;
    const mem = new RecordingMemory(memBytes);
    const plan = loadKernel(mem, { kernel: image, initrd, cmdline: "console=ttyS0", memBytes, rsdpAddr: RSDP });
    checkBzImageLoad(mem, image, plan, { cmdline: "console=ttyS0", initrd, memBytes });
  });

  it.skipIf(cloud === undefined)("a truncated real kernel is rejected before any write", () => {
    const image = readIfPresent(cloud)!;
    const mem = new RecordingMemory(memBytes);
    expect(errorOf(() => loadKernel(mem, { kernel: image.subarray(0, image.length >> 1), cmdline: "", memBytes, rsdpAddr: RSDP }))?.code).toBe("KERNEL_INVALID");
    expect(mem.writes).toEqual([]);
  });
});
