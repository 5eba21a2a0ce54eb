import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { isTypevisorError } from "../../errors.js";
import { addressOf } from "../../sys/iov.js";
import { GuestMemory } from "./guest-memory.js";

// Two regions with a hole between them, packed back to back in one backing (like RAM below and above the 32-bit PCI hole).
const backing = new ArrayBuffer(0x6000);
const mem = new GuestMemory(backing, [
  { guestPhysAddr: 0x10000, size: 0x2000, hostOffset: 0x4000 },
  { guestPhysAddr: 0, size: 0x4000, hostOffset: 0 },
]);
const base = addressOf(new Uint8Array(backing));

describe("GuestMemory.tryHostAddress", () => {
  it("maps a range to where its bytes live in the backing, or refuses it exactly like slice()", () => {
    fc.assert(
      fc.property(fc.integer({ min: -2, max: 0x13000 }), fc.integer({ min: 0, max: 0x5000 }), (gpa, len) => {
        let sliceOk = true;
        try {
          mem.slice(gpa, len);
        } catch (e) {
          expect(isTypevisorError(e) && e.code === "GUEST_MEMORY_OUT_OF_RANGE").toBe(true);
          sliceOk = false;
        }
        if (!sliceOk) {
          expect(mem.tryHostAddress(gpa, len)).toBe(-1);
          return;
        }
        const expected = gpa >= 0x10000 ? base + 0x4000 + (gpa - 0x10000) : base + gpa;
        expect(mem.tryHostAddress(gpa, len)).toBe(expected);
        if (len > 0) expect(addressOf(mem.slice(gpa, len))).toBe(expected);
      }),
      { numRuns: 500 },
    );
  });

  it("refuses a range straddling the hole and non-integer or unsafe addresses", () => {
    expect(mem.tryHostAddress(0x3fff, 2)).toBe(-1);
    expect(mem.tryHostAddress(0.5, 1)).toBe(-1);
    expect(mem.tryHostAddress(2 ** 53, 1)).toBe(-1);
  });
});

describe("GuestMemory.dataView", () => {
  it("sees the same bytes as slice() over the same range, and refuses what slice() refuses", () => {
    fc.assert(
      fc.property(fc.integer({ min: -2, max: 0x13000 }), fc.integer({ min: 0, max: 0x5000 }), (gpa, len) => {
        let s: Uint8Array | undefined;
        try {
          s = mem.slice(gpa, len);
        } catch {
          expect(() => mem.dataView(gpa, len)).toThrow(/outside guest RAM/);
          return;
        }
        const v = mem.dataView(gpa, len);
        expect(v.byteLength).toBe(len);
        if (len > 0) {
          s[len - 1] = (s[len - 1]! + 1) & 0xff;
          expect(v.getUint8(len - 1)).toBe(s[len - 1]);
          expect(addressOf(new Uint8Array(v.buffer, v.byteOffset, len))).toBe(addressOf(s));
        }
      }),
      { numRuns: 300 },
    );
  });
});
