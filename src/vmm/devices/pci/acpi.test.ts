import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import * as aml from "../../arch/x86_64/acpi/aml.js";
import { SDT_HEADER_LENGTH, SdtBuilder } from "../../arch/x86_64/acpi/sdt.js";
import { pciHostBridgeAml } from "./acpi.js";

/** A DSDT holding only `Scope (\_SB) { Device (PCI0) }`, as tables.ts would splice it. */
function testDsdt(): Uint8Array {
  const body = aml.scope("\\_SB_", [pciHostBridgeAml()]);
  const t = new SdtBuilder("DSDT", SDT_HEADER_LENGTH + body.length, 2, "TVSRPCI0");
  t.set(SDT_HEADER_LENGTH, body);
  return t.finish();
}

describe("pciHostBridgeAml", () => {
  it("is one Device term named PCI0 (ExtOpPrefix DeviceOp)", () => {
    const b = pciHostBridgeAml();
    expect([b[0], b[1]]).toEqual([0x5b, 0x82]);
    expect(String.fromCharCode(...b.subarray(0, 16))).toContain("PCI0");
  });
});

const iasl = spawnSync("iasl", ["-v"], { encoding: "utf8" });
const haveIasl = iasl.status === 0 || (iasl.stdout ?? "").includes("ACPI");

describe.skipIf(!haveIasl)("pciHostBridgeAml under ACPICA iasl -d", () => {
  const dir = mkdtempSync(join(tmpdir(), "typevisor-pci-acpi-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("disassembles cleanly with the IDs and resource windows Linux's pci_root needs", () => {
    const base = join(dir, "dsdt");
    writeFileSync(`${base}.dat`, testDsdt());
    const log = execFileSync("iasl", ["-d", `${base}.dat`], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
    const dsl = readFileSync(`${base}.dsl`, "utf8");
    expect(log + dsl).not.toMatch(/\bError\b|Invalid|Unknown|Warning/);
    expect(dsl).toMatch(/Device \(PCI0\)/);
    expect(dsl).toMatch(/Name \(_HID, EisaId \("PNP0A08"\)/);
    expect(dsl).toMatch(/Name \(_CID, EisaId \("PNP0A03"\)/);
    expect(dsl).toMatch(/Name \(_SEG, Zero\)/);
    expect(dsl).toMatch(/Name \(_BBN, Zero\)/);
    expect(dsl).toMatch(/Name \(_UID, Zero\)/);
    // Drop iasl's "// Range Minimum" style comments, then whitespace.
    const compact = dsl.replace(/\/\/[^\n]*/g, "").replace(/\s+/g, " ");
    expect(compact).toMatch(/WordBusNumber \(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0x0000, 0x0000, 0x00FF, 0x0000, 0x0100,/);
    expect(compact).toMatch(/IO \(Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08,/);
    expect(compact).toMatch(/WordIO \(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0x0000, 0x0000, 0x0CF7, 0x0000, 0x0CF8,/);
    expect(compact).toMatch(/WordIO \(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0x0000, 0x0D00, 0xFFFF, 0x0000, 0xF300,/);
    expect(compact).toMatch(/DWordMemory \(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, 0x00000000, 0xC0000000, 0xDFFFFFFF, 0x00000000, 0x20000000,/);
  });
});
