/**
 * Virtual Machine Generation ID (Microsoft, "Virtual Machine Generation ID", 2012; Linux
 * drivers/virt/vmgenid.c) and the ACPI Generic Event Device that announces its changes.
 *
 * The generation ID is 16 random bytes at a fixed guest-physical address (layout.ts
 * VMGENID_ADDR, inside the e820-reserved legacy area, so the guest never uses it as RAM).
 * Every restore of a snapshot writes a new one and raises the GED's interrupt: the guest's
 * ACPI interpreter runs the GED's _EVT, which notifies the VMGenID device (Notify 0x80), and
 * Linux's driver reads the new ID and reseeds its random number generator with it
 * (add_vmfork_randomness), so two clones of one snapshot stop sharing RNG state.
 *
 * The DSDT (acpi/tables.ts) holds both devices under \_SB:
 * - `VGEN`: _HID "VMGENCTR" (the ID Linux matches; Hyper-V added it as a _CID to the
 *   specification's "VM_Gen_Counter"), _CID "VM_Gen_Counter" and _DDN as the specification
 *   names it, and the ADDR method the specification requires: a Package of two integers,
 *   the low and high 32 bits of the ID's physical address.
 * - `GED_`: _HID "ACPI0013" (ACPI 6.5 §5.6.9), _CRS with one edge-triggered, active-high
 *   Extended Interrupt on IRQ.GED, and _EVT(Arg0 = GSI) that notifies VGEN when Arg0 is that
 *   GSI (Linux drivers/acpi/evged.c calls _EVT with the GSI when no _Exx method exists).
 * No memory or I/O is decoded: the device has no registers, and nothing the guest writes is read.
 */
import { randomBytes } from "node:crypto";
import { TypevisorError } from "../../../../errors.js";
import type { VmFd } from "../../../../kvm/kvm.js";
import * as aml from "../../../arch/x86_64/acpi/aml.js";
import { IRQ, VMGENID_ADDR, VMGENID_SIZE } from "../../../arch/x86_64/layout.js";
import type { GuestMemory } from "../../../memory/guest-memory.js";

/** The VMGenID device's path in the DSDT. */
export const VMGENID_PATH = "\\_SB_.VGEN";
/** ACPI 6.5 §5.6.6: 0x80 is the first device-specific notification value; the specification uses it. */
export const VMGENID_NOTIFY = 0x80;

/** `Device (VGEN)`, relative to the enclosing `\_SB` scope. */
export function vmgenidAml(): Uint8Array {
  const low = VMGENID_ADDR % 2 ** 32;
  const high = Math.floor(VMGENID_ADDR / 2 ** 32);
  return aml.device("VGEN", [
    aml.name("_HID", aml.string("VMGENCTR")),
    aml.name("_CID", aml.string("VM_Gen_Counter")),
    aml.name("_DDN", aml.string("VM_Gen_Counter")),
    aml.method("ADDR", [aml.returnValue(aml.pkg([aml.integer(low), aml.integer(high)]))]),
  ]);
}

/** `Device (GED_)`, relative to the enclosing `\_SB` scope. */
export function gedAml(): Uint8Array {
  return aml.device("GED_", [
    aml.name("_HID", aml.string("ACPI0013")),
    aml.name("_UID", aml.integer(0)),
    aml.name("_CRS", aml.resourceTemplate([aml.extendedInterrupt({ edge: true, activeLow: false, shared: false }, [IRQ.GED])])),
    aml.method("_EVT", [aml.ifThen(aml.lEqual(aml.arg(0), aml.integer(IRQ.GED)), [aml.notify(VMGENID_PATH, VMGENID_NOTIFY)])], { args: 1 }),
  ]);
}

/**
 * Write a generation ID (fresh random bytes unless given) where the guest's ADDR method
 * points; returns it. A cold boot calls this before any vCPU runs: the driver reads the ID
 * when it probes, and there is nothing to announce.
 */
export function writeGenerationId(mem: GuestMemory, id: Uint8Array = new Uint8Array(randomBytes(VMGENID_SIZE))): Uint8Array {
  if (id.length !== VMGENID_SIZE) throw new TypevisorError("VMGENID_SIZE", `a generation ID is ${VMGENID_SIZE} bytes, not ${id.length}`);
  mem.write(VMGENID_ADDR, id);
  return id;
}

/**
 * A new generation: write a fresh ID and pulse the GED's GSI (edge-triggered, as the _CRS
 * says), so the guest's driver picks it up. Call it after a restore has put back the
 * IOAPIC and every LAPIC, before the vCPUs run: the interrupt then waits in the IOAPIC/LAPIC
 * and is the first thing the guest handles. A guest that has no such device (a snapshot
 * from before it existed) has the GSI masked and never reads the reserved bytes.
 */
export function newGeneration(mem: GuestMemory, vm: Pick<VmFd, "irqLine">, id?: Uint8Array): Uint8Array {
  const written = writeGenerationId(mem, id);
  vm.irqLine(IRQ.GED, 1);
  vm.irqLine(IRQ.GED, 0);
  return written;
}
