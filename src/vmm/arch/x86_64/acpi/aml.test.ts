import fc from "fast-check";
import { describe, expect, it } from "vitest";
import * as aml from "./aml.js";

/** Decode a PkgLength per ACPI 6.5 §20.2.4 (independent of the encoder's loop). */
function decodePkgLength(b: Uint8Array): { value: number; size: number } {
  const lead = b[0]!;
  const follow = lead >> 6;
  if (follow === 0) return { value: lead & 0x3f, size: 1 };
  let v = lead & 0x0f;
  for (let i = 0; i < follow; i++) v |= b[1 + i]! << (4 + 8 * i);
  return { value: v >>> 0, size: 1 + follow };
}

describe("AML encoder", () => {
  it("PkgLength counts itself and uses the shortest form", () => {
    expect([...aml.pkgLength(0)]).toEqual([0x01]);
    expect([...aml.pkgLength(62)]).toEqual([0x3f]);
    // 63 + 2 = 65 = 0x41: lead 0x41 (1 follower, low nibble 1), follower 0x04.
    expect([...aml.pkgLength(63)]).toEqual([0x41, 0x04]);
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 2 ** 28 - 5 }), (n) => {
        const enc = aml.pkgLength(n);
        const { value, size } = decodePkgLength(enc);
        return size === enc.length && value === n + size && (size === 1 || (enc[0]! & 0x30) === 0);
      }),
    );
    expect(() => aml.pkgLength(2 ** 28)).toThrow(/PkgLength/);
  });

  it("integers use Zero/One/Ones and the shortest prefix", () => {
    expect([...aml.integer(0)]).toEqual([0x00]);
    expect([...aml.integer(1)]).toEqual([0x01]);
    expect([...aml.integer(5)]).toEqual([0x0a, 0x05]);
    expect([...aml.integer(0x3f8)]).toEqual([0x0b, 0xf8, 0x03]);
    expect([...aml.integer(0xe000_0000)]).toEqual([0x0c, 0x00, 0x00, 0x00, 0xe0]);
    expect([...aml.integer(0x1_0000_0000)]).toEqual([0x0e, 0, 0, 0, 0, 1, 0, 0, 0]);
    expect([...aml.integer(0xffff_ffff_ffff_ffffn)]).toEqual([0xff]);
    expect(() => aml.integer(-1)).toThrow(/AML integer/);
  });

  it("EISA IDs match the values ASL compilers produce", () => {
    // Well-known compressed IDs: PNP0A03 = 0x030AD041, PNP0501 = 0x0105D041.
    expect([...aml.eisaId("PNP0A03")]).toEqual([0x0c, 0x41, 0xd0, 0x0a, 0x03]);
    expect([...aml.eisaId("PNP0501")]).toEqual([0x0c, 0x41, 0xd0, 0x05, 0x01]);
    expect(() => aml.eisaId("pnp0501")).toThrow(/EISA/);
  });

  it("names: segments padded, root, dual and multi prefixes", () => {
    expect(String.fromCharCode(...aml.nameSeg("_SB"))).toBe("_SB_");
    expect([...aml.nameString("\\_SB_.PCI0")]).toEqual([0x5c, 0x2e, ...Buffer.from("_SB_PCI0")]);
    expect([...aml.nameString("\\_SB_.PCI0.ISA_")]).toEqual([0x5c, 0x2f, 3, ...Buffer.from("_SB_PCI0ISA_")]);
    expect([...aml.nameString("^COM1")]).toEqual([0x5e, ...Buffer.from("COM1")]);
    expect(() => aml.nameSeg("1ABC")).toThrow(/name segment/);
    expect(() => aml.nameSeg("ABCDE")).toThrow(/name segment/);
  });

  it("Name(_S5_, Package(){5, 0}) encodes as ACPI 6.5 §20.2.5 describes", () => {
    expect([...aml.name("\\_S5_", aml.pkg([aml.integer(5), aml.integer(0)]))]).toEqual([
      0x08, 0x5c, ...Buffer.from("_S5_"), 0x12, 0x05, 0x02, 0x0a, 0x05, 0x00,
    ]);
  });

  it("resource descriptors have their fixed layouts", () => {
    expect([...aml.ioPort(0x3f8, 0x3f8, 1, 8)]).toEqual([0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]);
    expect([...aml.irqNoFlags([4])]).toEqual([0x22, 0x10, 0x00]);
    expect(aml.addressSpace(16, aml.ResourceType.BusNumber, 0, 256, 0).length).toBe(3 + 13);
    expect(aml.addressSpace(32, aml.ResourceType.Memory, 0xc000_0000, 0x2000_0000, 1).length).toBe(3 + 23);
    expect(aml.addressSpace(64, aml.ResourceType.Memory, 2 ** 36, 2 ** 34, 1).length).toBe(3 + 43);
    expect(() => aml.addressSpace(16, aml.ResourceType.Io, 0xff00, 0x1000, 3)).toThrow(/out of range/);
    const rt = aml.resourceTemplate([aml.irqNoFlags([4])]);
    expect([...rt.slice(-2)]).toEqual([0x79, 0x00]);
  });

  it("methods, If/LEqual/Notify and ArgN encode as ACPI 6.5 §20.2.5 describes", () => {
    // Method(_EVT, 1) { If (Arg0 == 5) { Notify(\_SB_.VGEN, 0x80) } }
    const body = aml.ifThen(aml.lEqual(aml.arg(0), aml.integer(5)), [aml.notify("\\_SB_.VGEN", 0x80)]);
    const notify = [0x86, 0x5c, 0x2e, ...Buffer.from("_SB_VGEN"), 0x0a, 0x80];
    const ifBody = [0x93, 0x68, 0x0a, 0x05, ...notify];
    expect([...body]).toEqual([0xa0, ifBody.length + 1, ...ifBody]);
    const m = aml.method("_EVT", [body], { args: 1 });
    expect([...m]).toEqual([0x14, 4 + 1 + body.length + 1, ...Buffer.from("_EVT"), 0x01, ...body]);
    expect([...aml.methodReturning("_STA", aml.integer(0x0f), { serialized: true })]).toEqual([0x14, 0x09, ...Buffer.from("_STA"), 0x08, 0xa4, 0x0a, 0x0f]);
    expect([...aml.arg(6)]).toEqual([0x6e]);
    expect(() => aml.arg(7)).toThrow(/Arg7/);
    expect(() => aml.notify("\\_SB_.VGEN", 0x100)).toThrow(/Notify value/);
    expect(() => aml.method("_EVT", [], { args: 8 })).toThrow(/0-7 arguments/);
  });

  it("Extended Interrupt Descriptor: consumer, edge/level, polarity, sharing, GSIs as DWords", () => {
    expect([...aml.extendedInterrupt({ edge: true, activeLow: false, shared: false }, [5])]).toEqual([0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0, 0, 0]);
    expect([...aml.extendedInterrupt({ edge: false, activeLow: true, shared: true }, [16, 0x1_0000])]).toEqual([
      0x89, 0x0a, 0x00, 0x0d, 0x02, 0x10, 0, 0, 0, 0, 0, 0x01, 0,
    ]);
    expect(() => aml.extendedInterrupt({ edge: true, activeLow: false, shared: false }, [])).toThrow(/1-255/);
    expect(() => aml.extendedInterrupt({ edge: true, activeLow: false, shared: false }, [-1])).toThrow(/out of range/);
  });
});
