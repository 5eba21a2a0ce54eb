/**
 * Vm.rehearseApply: an incoming migration's destination runs applyState's code once on its own
 * never-run state while memory streams in (migration/destination.ts). It must change nothing: the
 * vCPU reads back as it was, the VM still takes its real state once, and the guest then goes on
 * from that state as if no rehearsal had happened. A tiny guest on this host's /dev/kvm.
 */
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { decodeState, encodeState } from "../../src/vmm/snapshot/state.js";
import { Vm } from "../../src/vmm/vm.js";
import { POWEROFF, print, tinyGuest } from "./tiny-guest.js";

const hasKvm = existsSync("/dev/kvm");
const built = existsSync(new URL("../../dist/vmm/vcpu/worker.js", import.meta.url));
if (hasKvm && !built) throw new Error("run `npm run build` first: vCPU workers load from dist/");

const dir = mkdtempSync(join(tmpdir(), "tv-rehearse-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const MEMORY_MIB = 64;
const CONFIG = { cpus: 1, memoryMiB: MEMORY_MIB, devices: { disks: [], nets: [], rng: false } };
const DONE = "counted down\n";
// mov ecx, 20000; l: out 0x80, al; loop l; print; power off. Paused inside the loop, it must finish it.
const CODE = [0xb9, 0x20, 0x4e, 0x00, 0x00, 0xe6, 0x80, 0xe2, 0xfc, ...print(DONE), ...POWEROFF];

describe.skipIf(!hasKvm)("Vm.rehearseApply (tiny guest on /dev/kvm)", () => {
  it("puts back the VM's own state unchanged, and the real state applied after it runs on", async () => {
    const path = join(dir, "console");
    const fd = openSync(path, "w");
    const a = new Vm({ cpus: 1, memoryMiB: MEMORY_MIB, consoleFd: fd, boot: tinyGuest(CODE) });
    const aDone = a.run();
    const end = Date.now() + 20_000;
    while (a.getStats().totalExits <= 10 && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
    await a.pause();
    const state = await a.captureState(CONFIG, "running");
    const image = Uint8Array.from(a.memory.slice(0, MEMORY_MIB * 2 ** 20));
    a.stop();
    const aEnd = await aDone;
    a.destroy();
    // Paused inside the count-down: the copy has the rest of it to do.
    expect(aEnd.kind).not.toBe("poweroff");
    expect(readFileSync(path, "latin1")).not.toContain(DONE);

    const b = new Vm({ cpus: 1, memoryMiB: MEMORY_MIB, consoleFd: fd, boot: { kind: "incoming" } });
    try {
      await b.prestart();
      const before = await b.captureState(CONFIG, "paused");
      b.rehearseApply(decodeState(encodeState({ ...before, memory: null }), "a sample"));
      const after = await b.captureState(CONFIG, "paused");
      const v0 = before.vcpus[0]!;
      const v1 = after.vcpus[0]!;
      expect(v1.regs).toEqual(v0.regs);
      expect(v1.sregs).toEqual(v0.sregs);
      expect(v1.mpState).toBe(v0.mpState);
      expect(after.vm?.ioapic).toBe(before.vm?.ioapic);
      expect(after.platform).toEqual(before.platform);
      b.memory.write(0, image);
      b.applyState({ ...state, memory: null }, { what: "the paused guest's state" });
      // Once only, as without a rehearsal.
      expect(() => b.applyState({ ...state, memory: null }, { what: "again" })).toThrow(expect.objectContaining({ code: "VM_STATE" }));
      const r = await b.run();
      expect(r.kind).toBe("poweroff");
      expect(readFileSync(path, "latin1")).toContain(DONE);
    } finally {
      b.destroy();
      closeSync(fd);
    }
  });
});
