/**
 * GET /threads on real KVM (any /dev/kvm, PVM included), through the control API's real server
 * on a unix socket: tiny guests whose vCPU exits continuously (through the device-thread mailbox,
 * or on the vCPU thread), a device thread with a disk and an entropy device, the disk's I/O
 * thread, and a device thread made to stop answering (debug.stall really blocks it).
 */
import { closeSync, existsSync, mkdtempSync, openSync, statfsSync, writeFileSync } from "node:fs";
import type { Server } from "node:http";
import { request } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { startControlServer } from "../../src/vmm/api/server.js";
import { Vm, type ThreadsReport } from "../../src/vmm/vm.js";
import { PCI_SPIN, SPIN_OUT, tinyGuest } from "./tiny-guest.js";

const hasKvm = existsSync("/dev/kvm");
const built = existsSync(new URL("../../dist/vmm/vcpu/worker.js", import.meta.url));
if (hasKvm && !built) throw new Error("run `npm run build` first: vCPU workers load from dist/");

const dir = mkdtempSync(join(tmpdir(), "tv-threads-"));
const TMPFS = 0x01021994;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function get<T>(socketPath: string, path: string): Promise<{ status: number; body: T; ms: number }> {
  const start = Date.now();
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, method: "GET", path }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (d: string) => (text += d));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body: JSON.parse(text) as T, ms: Date.now() - start }));
    });
    req.on("error", reject);
    req.end();
  });
}

/** The control API in front of `vm`, as `typevisor run --api-socket` serves it. */
/** A running Vm (console to /dev/null) behind a real control server, torn down by the test's cleanups. */
async function runServed(config: (consoleFd: number) => ConstructorParameters<typeof Vm>[0], name: string): Promise<{ vm: Vm; sock: string }> {
  const con = openSync("/dev/null", "w");
  const vm = new Vm(config(con));
  const done = vm.run();
  const { sock, server } = await serve(vm, name);
  cleanups.push(async () => {
    server.close();
    vm.stop();
    await done;
    vm.destroy();
    closeSync(con);
  });
  return { vm, sock };
}

async function serve(vm: Vm, name: string): Promise<{ sock: string; server: Server }> {
  const sock = join(dir, `${name}.sock`);
  const server = await startControlServer(sock, {
    info: () => ({ state: vm.vmState }),
    stats: async () => ({ ...vm.getStats(), io: await vm.ioStats() }),
    registers: () => vm.registers(),
    devices: async () => vm.deviceCommand({ command: "devices" }),
    balloon: () => Promise.reject(new Error("no balloon")),
    threads: () => vm.threads(),
    pause: () => vm.pause(),
    snapshot: () => Promise.reject(new Error("no snapshots here")),
    resume: () => vm.resume(),
    stop: () => vm.stop(),
    reboot: () => vm.reset(),
  });
  return { sock, server };
}

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

/** A VM with a disk and virtio-rng whose vCPU 0 reads the PCI data port forever (mailbox exits). */
async function deviceVm(name: string, cpus = 1): Promise<{ vm: Vm; sock: string; disk: string }> {
  const disk = join(dir, `${name}.img`);
  writeFileSync(disk, Buffer.alloc(1 << 20));
  const { vm, sock } = await runServed((con) => ({ cpus, memoryMiB: 64, consoleFd: con, boot: tinyGuest(PCI_SPIN), devices: { disks: [{ path: disk, readonly: false }], nets: [], rng: true }, debugDeviceCommands: true }), name);
  // Wait until the vCPU is exiting (its worker loads, then the device thread answers each read).
  const end = Date.now() + 20_000;
  while (vm.getStats().totalExits < 100) {
    if (Date.now() > end) throw new Error("the vCPU never ran");
    await sleep(20);
  }
  return { vm, sock, disk };
}

describe.skipIf(!hasKvm)("GET /threads (tiny guests on /dev/kvm)", () => {
  it("reports each vCPU's phase and exits, the device thread and its queues, the disk's I/O thread, and the kernel's threads", async () => {
    const { vm, sock, disk } = await deviceVm("all", 2);
    const a = await get<ThreadsReport>(sock, "/threads");
    await sleep(600);
    const b = await get<ThreadsReport>(sock, "/threads");
    expect(a.status).toBe(200);
    expect(a.body.state).toBe("running");

    // vCPU 0 spins on the PCI data port: in KVM_RUN or in that io exit (maybe waiting on the mailbox), exits growing.
    const [v0a, v1a] = a.body.vcpus;
    const [v0b, v1b] = b.body.vcpus;
    expect(["run", "exit"]).toContain(v0b!.phase);
    expect(v0b!.exits).toBeGreaterThan(v0a!.exits);
    expect(v0b!.exit).toMatchObject({ reason: "io", address: "0xcfc", write: false, size: 4 });
    expect(v0b!.tid).toBeGreaterThan(0);
    // vCPU 1 is an AP waiting for INIT/SIPI inside KVM_RUN: no exits, and its time in run grows.
    expect(v1b).toMatchObject({ phase: "run", exits: 0, exit: null });
    // At least 300 of the 600 ms slept (not "a + 300": a CI run on a loaded 2-core machine saw
    // a = 322, b = 472, the AP's KVM_RUN entered anew in between, still without an exit).
    expect(v1a!.phase).toBe("run");
    expect(v1b!.phaseMs).toBeGreaterThanOrEqual(300);

    // The device thread answers with every device and queue (the tiny guest drives none: all off).
    const dev = b.body.devices!;
    expect(dev.answering).toBe(true);
    expect(dev.answerMs).toBeLessThan(1000);
    expect(["poll", "mailbox", "command"]).toContain(dev.phase);
    expect(dev.passes).toBeGreaterThan(a.body.devices!.passes);
    expect(dev.pci!.map((d) => d.name)).toEqual([`virtio-blk ${disk}`, "virtio-rng"]);
    for (const d of dev.pci!) {
      expect(d).toMatchObject({ status: 0, statusBits: [], needsReset: null, isr: 0, msix: { enabled: false, functionMasked: false }, configVector: null });
      expect(d.queues).toEqual([{ index: 0, enabled: false, size: 256, vector: null, active: false }]);
    }
    expect(dev.pci![0]!.inFlight).toBe(0);

    // The disk's I/O thread, from its ring (none on tmpfs: such a disk is served on the device
    // thread). It starts when the disk first needs it, and the tiny guest drives no disk: idle.
    const io = b.body.ioThreads;
    expect(io).toHaveLength(1);
    if (statfsSync(disk).type === TMPFS) expect(io[0]).toMatchObject({ state: "none", name: null });
    else expect(io[0]).toMatchObject({ disk: `virtio-blk ${disk}`, name: "tv-blk0", state: "idle", tid: null, busy: false, inFlight: 0, current: null, completed: 0, deviceInFlight: 0 });

    // The kernel's view: every VMM thread by name, with the tids the board published.
    const k = b.body.kernel!;
    const byName = (comm: string) => k.filter((t) => t.comm === comm);
    expect(byName("tv-vcpu0").map((t) => t.tid)).toEqual([v0b!.tid]);
    expect(byName("tv-vcpu1").map((t) => t.tid)).toEqual([v1b!.tid]);
    expect(byName("tv-devices").map((t) => t.tid)).toEqual([dev.tid]);
    expect(byName("tv-blk0")).toEqual([]);
    for (const t of k) expect(t.state).toMatch(/^[A-Za-z]$/);
    // The idle AP sleeps in KVM_RUN: an ioctl.
    expect(byName("tv-vcpu1")[0]!.syscall).toBe(16);

    // Paused vCPUs say so, with the time since they parked.
    await vm.pause();
    await sleep(300);
    const p = await get<ThreadsReport>(sock, "/threads");
    for (const v of p.body.vcpus) {
      expect(v.phase).toBe("paused");
      expect(v.phaseMs).toBeGreaterThanOrEqual(250);
    }
    vm.resume();
  }, 60_000);

  it("says answering: false within about 1 s when the device thread is stuck, and the API goes on answering", async () => {
    const { vm, sock } = await deviceVm("stuck");
    const stalled = vm.deviceCommand({ command: "debug.stall", args: { ms: 3000 } });
    await sleep(200);
    const [t, info] = await Promise.all([get<ThreadsReport>(sock, "/threads"), get<{ state: string }>(sock, "/vm")]);
    expect(t.ms).toBeLessThan(1500);
    expect(info.ms).toBeLessThan(500);
    expect(info.body.state).toBe("running");
    const dev = t.body.devices!;
    expect(dev).toMatchObject({ answering: false, pci: null, phase: "command" });
    expect(dev.answerMs).toBeGreaterThanOrEqual(900);
    expect(dev.phaseMs).toBeGreaterThanOrEqual(700);
    // The vCPU's PCI read waits for the stuck thread: an io exit in the mailbox, not moving.
    expect(t.body.vcpus[0]).toMatchObject({ phase: "exit", exit: { reason: "io", address: "0xcfc", mailbox: true } });
    expect(t.body.vcpus[0]!.phaseMs).toBeGreaterThanOrEqual(250);
    // What the main thread reads itself is still there.
    expect(t.body.ioThreads).toHaveLength(1);
    expect(t.body.kernel!.some((k) => k.comm === "tv-devices")).toBe(true);

    // A second look while it is still stuck does not pile up another request, and says the same.
    const again = await get<ThreadsReport>(sock, "/threads");
    expect(again.ms).toBeLessThan(1500);
    expect(again.body.devices).toMatchObject({ answering: false, phase: "command" });
    expect(again.body.devices!.phaseMs).toBeGreaterThan(dev.phaseMs);

    expect((await stalled).stalledMs).toBeGreaterThanOrEqual(2900);
    const after = await get<ThreadsReport>(sock, "/threads");
    expect(after.body.devices!.answering).toBe(true);
    // Unstuck, the vCPU's read is answered and it goes on exiting.
    let later = after;
    for (let i = 0; i < 20 && later.body.vcpus[0]!.exits <= t.body.vcpus[0]!.exits; i++) {
      await sleep(100);
      later = await get<ThreadsReport>(sock, "/threads");
    }
    expect(later.body.vcpus[0]!.exits).toBeGreaterThan(t.body.vcpus[0]!.exits);
  }, 60_000);

  it("without devices: no device thread, a vCPU exiting on the vCPU thread", async () => {
    const { vm, sock } = await runServed((con) => ({ cpus: 1, memoryMiB: 64, consoleFd: con, boot: tinyGuest(SPIN_OUT) }), "plain");
    while (vm.getStats().totalExits < 100) await sleep(20);
    const r = await get<ThreadsReport>(sock, "/threads");
    expect(r.body.devices).toBeNull();
    expect(r.body.ioThreads).toEqual([]);
    expect(r.body.vcpus[0]).toMatchObject({ exit: { reason: "io", address: "0x80", write: true, size: 1, mailbox: false } });
    expect(r.ms).toBeLessThan(1000);
  }, 30_000);
});
