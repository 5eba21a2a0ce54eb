/**
 * The run loop on real KVM with tiny guests: port dispatch to the UART, the
 * ACPI power-off and reset paths, crash reporting, and pause/resume/stop
 * kicking vCPUs out of KVM_RUN. Runs wherever /dev/kvm exists (PVM included).
 */
import { existsSync, mkdtempSync, readFileSync, openSync, closeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { Vm } from "../../src/vmm/vm.js";
import { POWEROFF, RESET, SPIN_OUT, TRIPLE_FAULT, print, tinyGuest } from "./tiny-guest.js";

const hasKvm = existsSync("/dev/kvm");
const built = existsSync(new URL("../../dist/vmm/vcpu/worker.js", import.meta.url));
if (hasKvm && !built) throw new Error("run `npm run build` first: vCPU workers load from dist/");

function consoleFile() {
  const path = join(mkdtempSync(join(tmpdir(), "tv-")), "console");
  const fd = openSync(path, "w");
  return { fd, read: () => readFileSync(path, "utf8"), close: () => closeSync(fd) };
}

describe.skipIf(!hasKvm)("vCPU run loop (tiny guests on /dev/kvm)", () => {
  it("prints through the 16550A and powers off through the ACPI sleep register", async () => {
    const con = consoleFile();
    const vm = new Vm({ cpus: 1, memoryMiB: 64, consoleFd: con.fd, boot: tinyGuest([...print("hello from the guest\n"), ...POWEROFF]) });
    const result = await vm.run();
    const stats = vm.getStats();
    vm.destroy();
    con.close();
    expect(result).toEqual({ kind: "poweroff" });
    expect(con.read()).toBe("hello from the guest\n");
    expect(stats.vcpus[0]!.exits.io).toBeGreaterThanOrEqual(21);
  });

  it("reports a guest reset", async () => {
    const con = consoleFile();
    const vm = new Vm({ cpus: 1, memoryMiB: 64, consoleFd: con.fd, boot: tinyGuest(RESET) });
    expect(await vm.run()).toEqual({ kind: "reset" });
    vm.destroy();
    con.close();
  });

  it("turns a triple fault into a crash with a register dump", async () => {
    const con = consoleFile();
    const vm = new Vm({ cpus: 1, memoryMiB: 64, consoleFd: con.fd, boot: tinyGuest(TRIPLE_FAULT) });
    const result = await vm.run();
    vm.destroy();
    con.close();
    expect(result.kind).toBe("crash");
    if (result.kind === "crash") {
      expect(result.dump).toMatch(/rip=0x/);
    }
  });

  it("pauses a busy vCPU (kicking it out of KVM_RUN), resumes it, and stops it", async () => {
    const con = consoleFile();
    const vm = new Vm({ cpus: 2, memoryMiB: 64, consoleFd: con.fd, boot: tinyGuest(SPIN_OUT) });
    const done = vm.run();
    // Until the vCPUs run (a worker's start takes more than 300 ms on a loaded host), not a fixed delay.
    const end = Date.now() + 20_000;
    while (vm.getStats().totalExits <= 100 && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
    await vm.pause();
    const a = vm.getStats().totalExits;
    await new Promise((r) => setTimeout(r, 200));
    const b = vm.getStats().totalExits;
    expect(a).toBeGreaterThan(100);
    expect(b).toBe(a); // parked: no exits while paused
    vm.resume();
    await new Promise((r) => setTimeout(r, 200));
    expect(vm.getStats().totalExits).toBeGreaterThan(b);
    vm.stop();
    expect(await done).toEqual({ kind: "stopped" });
    vm.destroy();
    con.close();
  });

  it("rejects bad configuration before touching KVM", () => {
    expect(() => new Vm({ cpus: 0, memoryMiB: 64, consoleFd: 1, boot: tinyGuest(POWEROFF) })).toThrow(/--cpus/);
    expect(() => new Vm({ cpus: 1, memoryMiB: 8, consoleFd: 1, boot: tinyGuest(POWEROFF) })).toThrow(/--memory/);
  });
});
