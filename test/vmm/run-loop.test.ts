/**
 * The run loop on real KVM with tiny guests: port dispatch to the UART, the
 * ACPI power-off and reset paths, crash reporting, and pause/resume/stop
 * kicking vCPUs out of KVM_RUN. Runs wherever /dev/kvm exists (PVM included).
 */
import { existsSync, mkdtempSync, readFileSync, openSync, closeSync } from "node:fs";
import { tmpdir, totalmem } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { MAX_VCPUS, Vm } from "../../src/vmm/vm.js";
import { POWEROFF, RESET, SPIN_OUT, TRIPLE_FAULT, loadRax, movRaxImm, print, storeRax, tinyGuest, tinyGuestHigh } from "./tiny-guest.js";

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

  it("with devices, the vCPU threads start beside the device thread and wait for it: paused then, the guest runs only once resumed", async () => {
    const con = consoleFile();
    const vm = new Vm({ cpus: 2, memoryMiB: 64, consoleFd: con.fd, boot: tinyGuest([...print("ran\n"), ...POWEROFF]), devices: { disks: [], nets: [], rng: true } });
    const done = vm.run();
    // Asked while the device thread is still starting (run() has not awaited anything yet).
    await vm.pause();
    expect(vm.vmState).toBe("paused");
    await new Promise((r) => setTimeout(r, 1500));
    expect(con.read()).toBe("");
    vm.resume();
    expect(await done).toEqual({ kind: "poweroff" });
    expect(con.read()).toBe("ran\n");
    vm.destroy();
    con.close();
  });

  it("with devices that fail to start, run() fails and the vCPU threads started beside them are gone", async () => {
    const con = consoleFile();
    const vm = new Vm({ cpus: 2, memoryMiB: 64, consoleFd: con.fd, boot: tinyGuest([...print("ran\n"), ...POWEROFF]), devices: { disks: [{ path: join(tmpdir(), "tv-no-such-disk.raw"), readonly: true }], nets: [], rng: false } });
    await expect(vm.run()).rejects.toThrow(/tv-no-such-disk/);
    expect(vm.vmState).toBe("stopped");
    expect(con.read()).toBe("");
    vm.destroy();
    con.close();
  });

  it("runs a guest with 8 GiB: the guest and the VMM see the same bytes below and above 4 GiB, across the VMM's 2 GiB views", async () => {
    const GiB = 2 ** 30;
    const con = consoleFile();
    // Low RAM [0, 3 GiB), high RAM [4 GiB, 9 GiB): the high region's views start at 4, 6 and 8 GiB.
    const spots = [4 * GiB, 6 * GiB - 4, 6 * GiB + 2 * 2 ** 20 - 4, 8 * GiB - 8, 7 * GiB - 8];
    const code: number[] = [];
    spots.forEach((a, i) => code.push(...movRaxImm(0x1122334455667700n + BigInt(i)), ...storeRax(a)));
    // Copy a value the VMM put at 7 GiB + 8 down to low RAM, and one from low RAM up to the last qword.
    code.push(...loadRax(7 * GiB + 8), ...storeRax(0x200000), ...loadRax(0x200008), ...storeRax(9 * GiB - 8));
    code.push(...print("done\n"), ...POWEROFF);
    const vm = new Vm({ cpus: 1, memoryMiB: 8192, consoleFd: con.fd, boot: tinyGuestHigh(code, 5) });
    try {
      expect(vm.memory.hostRegions.map((r) => [r.guestPhysAddr, r.size])).toEqual([[0, 3 * GiB], [4 * GiB, 5 * GiB]]);
      vm.memory.writeU64(7 * GiB + 8, 0xfeedfacecafebeefn);
      vm.memory.writeU64(0x200008, 0x0badc0ffee0ddf00n);
      expect(await vm.run()).toEqual({ kind: "poweroff" });
      expect(con.read()).toBe("done\n");
      spots.forEach((a, i) => expect(vm.memory.readU64(a)).toBe(0x1122334455667700n + BigInt(i)));
      expect(vm.memory.readU64(0x200000)).toBe(0xfeedfacecafebeefn);
      expect(vm.memory.readU64(9 * GiB - 8)).toBe(0x0badc0ffee0ddf00n);
    } finally {
      vm.destroy();
      con.close();
    }
  });

  it("refuses more memory than the host can back, and CPUs past KVM's limit, before a VM exists", () => {
    const hostMiB = Math.floor(totalmem() / 2 ** 20);
    expect(() => new Vm({ cpus: 1, memoryMiB: hostMiB + 1024, consoleFd: 1, boot: tinyGuest(POWEROFF) })).toThrow(/more than this host can back/);
    expect(() => new Vm({ cpus: 1, memoryMiB: hostMiB + 1024, memoryOvercommit: 0.5, consoleFd: 1, boot: tinyGuest(POWEROFF) })).toThrow(/× overcommit 0.5/);
    expect(() => new Vm({ cpus: MAX_VCPUS + 1, memoryMiB: 64, consoleFd: 1, boot: tinyGuest(POWEROFF) })).toThrow(/--cpus 4097 exceeds/);
  });

  it("rejects bad configuration before touching KVM", () => {
    expect(() => new Vm({ cpus: 0, memoryMiB: 64, consoleFd: 1, boot: tinyGuest(POWEROFF) })).toThrow(/--cpus/);
    expect(() => new Vm({ cpus: 1, memoryMiB: 8, consoleFd: 1, boot: tinyGuest(POWEROFF) })).toThrow(/--memory/);
  });
});
