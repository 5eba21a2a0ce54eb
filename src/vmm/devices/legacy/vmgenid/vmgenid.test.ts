import { describe, expect, it } from "vitest";
import { IRQ, VMGENID_ADDR, VMGENID_SIZE } from "../../../arch/x86_64/layout.js";
import { GuestMemory } from "../../../memory/guest-memory.js";
import { newGeneration, writeGenerationId } from "./vmgenid.js";

function lowMemory(): GuestMemory {
  return new GuestMemory(new ArrayBuffer(0x100000), [{ guestPhysAddr: 0, size: 0x100000, hostOffset: 0 }]);
}

/** Records what reaches KVM_IRQ_LINE, in order (the VmFd method newGeneration calls). */
function lines(): { calls: [number, number][]; irqLine: (gsi: number, level: 0 | 1) => void } {
  const calls: [number, number][] = [];
  return { calls, irqLine: (gsi, level) => void calls.push([gsi, level]) };
}

describe("VM generation ID", () => {
  it("a cold boot writes 16 random bytes at VMGENID_ADDR and nothing around them", () => {
    const mem = lowMemory();
    const id = writeGenerationId(mem);
    expect(id).toHaveLength(VMGENID_SIZE);
    expect(mem.read(VMGENID_ADDR, VMGENID_SIZE)).toEqual(id);
    expect(mem.read(VMGENID_ADDR - 16, 16).every((b) => b === 0)).toBe(true);
    expect(mem.read(VMGENID_ADDR + VMGENID_SIZE, 16).every((b) => b === 0)).toBe(true);
    // Random, not a constant: a second VM gets another ID.
    expect(writeGenerationId(lowMemory())).not.toEqual(id);
  });

  it("a new generation replaces the ID, then pulses the GED's GSI high and low (an edge)", () => {
    const mem = lowMemory();
    const first = writeGenerationId(mem);
    const vm = lines();
    const next = newGeneration(mem, vm);
    expect(next).not.toEqual(first);
    expect(mem.read(VMGENID_ADDR, VMGENID_SIZE)).toEqual(next);
    expect(vm.calls).toEqual([
      [IRQ.GED, 1],
      [IRQ.GED, 0],
    ]);
  });

  it("every generation differs (16 random bytes each time)", () => {
    const mem = lowMemory();
    const seen = new Set<string>();
    for (let i = 0; i < 200; i++) seen.add(Buffer.from(newGeneration(mem, lines())).toString("hex"));
    expect(seen.size).toBe(200);
  });

  it("refuses an ID of the wrong size, and memory without the reserved address, with typed errors", () => {
    expect(() => writeGenerationId(lowMemory(), new Uint8Array(8))).toThrow(expect.objectContaining({ code: "VMGENID_SIZE" }));
    const small = new GuestMemory(new ArrayBuffer(0x10000), [{ guestPhysAddr: 0, size: 0x10000, hostOffset: 0 }]);
    const vm = lines();
    expect(() => newGeneration(small, vm)).toThrow(/outside guest RAM/);
    // No interrupt announces an ID that was not written.
    expect(vm.calls).toEqual([]);
  });
});
