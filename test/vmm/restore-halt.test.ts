/**
 * A vCPU restored in the window between a paravirtual spinlock's kick and its HLT with interrupts
 * off (Linux kvm_wait()) must go on: KVM keeps the kick beside the vCPU, out of every state ioctl,
 * so a restore that put the vCPU back just as saved halted it for good (a Debian guest in the lab
 * hung with its second CPU "idling at native_halt"). A tiny guest on this host's /dev/kvm is put
 * in exactly that state through the same applyState() a snapshot restore and an incoming
 * migration use. A HLT with interrupts on is left to wait for its interrupt.
 */
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { Vm } from "../../src/vmm/vm.js";
import { CODE_ADDR, POWEROFF, print, tinyGuest } from "./tiny-guest.js";

const hasKvm = existsSync("/dev/kvm");
const built = existsSync(new URL("../../dist/vmm/vcpu/worker.js", import.meta.url));
if (hasKvm && !built) throw new Error("run `npm run build` first: vCPU workers load from dist/");

const dir = mkdtempSync(join(tmpdir(), "tv-halt-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const MEMORY_MIB = 64;
const RFLAGS_IF = 1n << 9n;

// cli; a loop of out 0x80 (where the first VM is paused: it exits, so the test sees it run); hlt
// (where the restored vCPU is put); print; power off.
const LOOP = [CODE_ADDR + 1, CODE_ADDR + 3];
const HLT_AT = CODE_ADDR + 5;
const PAST = "past the halt\n";
const CODE = [0xfa, 0xe6, 0x80, 0xeb, 0xfc, 0xf4, ...print(PAST), ...POWEROFF];

/**
 * A VM restored from a capture of the tiny guest, its vCPU set at the HLT with RFLAGS.IF as `ifFlag`
 * and runnable. Resolves with how run() ended, or "still halted" after `ms`.
 */
async function restoreAtHalt(name: string, ifFlag: boolean, ms: number): Promise<{ outcome: string; console: string }> {
  const path = join(dir, name);
  const fd = openSync(path, "w");
  const a = new Vm({ cpus: 1, memoryMiB: MEMORY_MIB, consoleFd: fd, boot: tinyGuest(CODE) });
  const aDone = a.run();
  // Until the vCPU runs the loop (a worker's start takes seconds on a loaded host), not a fixed delay.
  const end = Date.now() + 20_000;
  while (a.getStats().totalExits <= 10 && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
  await a.pause();
  const state = await a.captureState({ cpus: 1, memoryMiB: MEMORY_MIB, devices: { disks: [], nets: [], rng: false } }, "running");
  const image = Uint8Array.from(a.memory.slice(0, MEMORY_MIB * 2 ** 20));
  a.stop();
  await aDone;
  a.destroy();
  const v0 = state.vcpus[0]!;
  // The first VM was in its loop, past the cli: the guest's page tables and GDT are in place.
  expect(LOOP).toContain(Number(BigInt(v0.regs.rip)));
  const rflags = (BigInt(v0.regs.rflags) & ~RFLAGS_IF) | (ifFlag ? RFLAGS_IF : 0n);
  const atHalt = { ...state, memory: null, vcpus: [{ ...v0, mpState: 0, regs: { ...v0.regs, rip: `0x${HLT_AT.toString(16)}`, rflags: `0x${rflags.toString(16)}` } }] };

  const b = new Vm({ cpus: 1, memoryMiB: MEMORY_MIB, consoleFd: fd, boot: { kind: "incoming" } });
  try {
    b.memory.write(0, image);
    b.applyState(atHalt, { what: "the test's state" });
    const done = b.run();
    const outcome = await Promise.race([done.then((r) => r.kind), new Promise<string>((r) => setTimeout(() => r("still halted"), ms))]);
    if (outcome === "still halted") {
      b.stop();
      await done;
    }
    return { outcome, console: readFileSync(path, "latin1") };
  } finally {
    b.destroy();
    closeSync(fd);
  }
}

describe.skipIf(!hasKvm)("a vCPU restored just before a HLT (tiny guest on /dev/kvm)", () => {
  it("with interrupts off (a kvm_wait() whose kick was in flight): it goes on past the HLT and the guest powers off", async () => {
    const r = await restoreAtHalt("off", false, 15_000);
    expect(r.outcome).toBe("poweroff");
    expect(r.console).toContain(PAST);
  });

  it("with interrupts on: it is left at the HLT, waiting for an interrupt that never comes", async () => {
    const r = await restoreAtHalt("on", true, 2_000);
    expect(r.outcome).toBe("still halted");
    expect(r.console).not.toContain(PAST);
  });
});
