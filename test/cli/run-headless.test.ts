/**
 * `typevisor run` as a supervisor starts it: headless (stdin /dev/null, output
 * to files), the tiny test kernel on this host's /dev/kvm (--force-kvm), its
 * console on a rotating log and a unix socket, the control API, and an exit
 * file. Runs the real CLI from dist/.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { TINY_KERNEL_BANNER, TINY_KERNEL_KEYS, writeTinyKernel } from "../helpers/tiny-kernel.js";
import { unixApi } from "../helpers/unix-api.js";
import { consoleClient } from "../helpers/console-client.js";
import { contextSwitches, threadNamed } from "../helpers/thread-wakeups.js";
import { parseStatsPage } from "../../src/vmm/stats/layout.js";

const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
const hasKvm = existsSync("/dev/kvm");
const dir = mkdtempSync(join(tmpdir(), "tv-headless-"));
const kernel = join(dir, "tiny.bzImage");
writeTinyKernel(kernel);

async function until(what: string, cond: () => boolean, ms = 15_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

function start(run: string, extra: string[] = [], umask?: string): { child: ChildProcess; exited: Promise<number | null>; stderr: () => string; files: { log: string; sock: string; api: string; exit: string } } {
  const d = mkdtempSync(join(dir, `${run}-`));
  const files = { log: join(d, "c.log"), sock: join(d, "c.sock"), api: join(d, "api.sock"), exit: join(d, "exit.json") };
  // with `umask`, through a shell that sets it first, as a caller's login shell would
  const [cmd, pre] = umask === undefined ? [process.execPath, []] : ["sh", ["-c", `umask ${umask} && exec "$@"`, "sh", process.execPath]];
  const child = spawn(cmd, [
    ...pre,
    BIN, "run", "--kernel", kernel, "--memory", "64", "--force-kvm", "--no-lab", "--id", run,
    "--console-log", files.log, "--console-log-size", "4K", "--console-socket", files.sock,
    "--api-socket", files.api, "--exit-file", files.exit, ...extra,
  ], { stdio: ["ignore", "pipe", "pipe"] });
  let err = "";
  child.stderr!.on("data", (b: Buffer) => (err += b.toString()));
  child.stdout!.on("data", (b: Buffer) => (err += `[stdout] ${b.toString()}`));
  const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
  return { child, exited, stderr: () => err, files };
}



const readIf = (p: string): string => (existsSync(p) ? readFileSync(p, "utf8") : "");

describe.skipIf(!hasKvm)("typevisor run, headless (tiny kernel, --force-kvm)", () => {
  it("makes its control and console sockets owner-only even under umask 000", async () => {
    const vm = start("um", [], "000");
    try {
      await until("both sockets", () => existsSync(vm.files.api) && existsSync(vm.files.sock));
      for (const p of [vm.files.api, vm.files.sock]) expect(statSync(p).mode & 0o777, p).toBe(0o600);
    } finally {
      vm.child.kill("SIGKILL");
      await vm.exited;
    }
  });

  it("logs, rotates, serves the console socket and the API, reboots, and records a power-off", async () => {
    const vm = start("t1");
    const f = vm.files;
    try {
      await until("the banner in the console log", () => readIf(f.log).includes(TINY_KERNEL_BANNER));
      expect(vm.stderr()).not.toContain("[stdout]"); // the terminal is not the console
      const c = await consoleClient(f.sock);
      c.sock.write("hello over the socket\n");
      await until("the echo", () => c.text().includes("hello over the socket\n"));

      const info = await unixApi(f.api, "GET", "/vm");
      expect(info.status).toBe(200);
      expect(info.body).toMatchObject({ id: "t1", state: "running" });
      const stats = await unixApi(f.api, "GET", "/stats");
      expect(stats.status).toBe(200);
      expect((stats.body as { io: Record<string, unknown> }).io).toMatchObject({
        diskReadBytes: 0, diskWriteBytes: 0, diskReadOps: 0, diskWriteOps: 0, netRxBytes: 0, netTxBytes: 0, netRxPackets: 0, netTxPackets: 0,
      });

      // More than 4K of echo: the log rotates and neither generation exceeds 4K.
      const line = "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopq\n";
      const lines = 80; // 5120 bytes
      for (let i = 0; i < lines; i++) c.sock.write(line);
      await until("all echoes", () => c.text().split(line).length - 1 >= lines, 30_000);
      await until("rotation", () => existsSync(`${f.log}.1`));
      expect(statSync(f.log).size).toBeLessThanOrEqual(4096);
      expect(statSync(`${f.log}.1`).size).toBeLessThanOrEqual(4096);

      const before = c.text().length;
      const rb = await unixApi(f.api, "POST", "/reboot");
      expect(rb.status).toBe(202);
      await until("the banner after POST /reboot", () => c.text().slice(before).includes(TINY_KERNEL_BANNER));
      expect((await unixApi(f.api, "GET", "/vm")).body).toMatchObject({ id: "t1", boots: 2 });

      c.sock.write(Uint8Array.of(TINY_KERNEL_KEYS.POWEROFF));
      expect(await vm.exited, vm.stderr()).toBe(0);
      const rec = JSON.parse(readFileSync(f.exit, "utf8")) as Record<string, unknown>;
      expect(rec).toMatchObject({ code: 0, result: "poweroff" });
      expect(new Date(rec["at"] as string).getTime()).toBeGreaterThan(Date.now() - 60_000);
      expect(existsSync(f.sock)).toBe(false);
      expect(existsSync(f.api)).toBe(false); // net.Server removes its socket file on close
    } finally {
      if (vm.child.exitCode === null) vm.child.kill("SIGKILL");
    }
  }, 90_000);

  it("serves GET /threads: the idle vCPU in KVM_RUN, its exits growing with console input, the device thread and the kernel's threads", async () => {
    const vm = start("t4", ["--rng"]);
    try {
      await until("the banner", () => readIf(vm.files.log).includes(TINY_KERNEL_BANNER));
      type Threads = { vcpus: { tid: number; phase: string; phaseMs: number; exits: number }[]; devices: { tid: number; answering: boolean; pci: { name: string }[] }; kernel: { tid: number; comm: string }[] };
      const a = await unixApi(vm.files.api, "GET", "/threads");
      expect(a.status).toBe(200);
      const before = a.body as Threads;
      // The tiny guest idles in `hlt`, which KVM serves in the kernel: the vCPU sits in KVM_RUN.
      expect(before.vcpus[0]).toMatchObject({ phase: "run" });
      expect(before.devices).toMatchObject({ answering: true, pci: [{ name: "virtio-rng" }] });
      const comms = new Map(before.kernel.map((t) => [t.comm, t.tid]));
      expect(comms.get("tv-vcpu0")).toBe(before.vcpus[0]!.tid);
      expect(comms.get("tv-devices")).toBe(before.devices.tid);
      const c = await consoleClient(vm.files.sock);
      c.sock.write("threads\n");
      await until("the echo", () => c.text().includes("threads\n"));
      const after = (await unixApi(vm.files.api, "GET", "/threads")).body as Threads;
      expect(after.vcpus[0]!.exits).toBeGreaterThan(before.vcpus[0]!.exits);
      c.sock.destroy();
      vm.child.kill("SIGTERM");
      expect(await vm.exited, vm.stderr()).toBe(0);
    } finally {
      if (vm.child.exitCode === null) vm.child.kill("SIGKILL");
    }
  }, 30_000);

  it("lets its threads sleep while the guest idles: no main-thread sampler 4 times a second, no device-thread poll every second", async () => {
    const stats = join(mkdtempSync(join(dir, "t6s-")), "stats");
    // A balloon too (without statistics polling): it has no timed work either.
    const vm = start("t6", ["--rng", "--balloon", "--stats-file", stats]);
    try {
      await until("the banner", () => readIf(vm.files.log).includes(TINY_KERNEL_BANNER));
      const pid = vm.child.pid!;
      const switches = (tid: number): number => contextSwitches(pid, tid);
      const devices = threadNamed(pid, "tv-devices");
      expect(devices).toBeDefined();
      // Past the start's one-off work (the malloc trim 10 s in) and the sampler's back-off (to 8 s).
      await new Promise((r) => setTimeout(r, 12_000));
      const a = [switches(pid), switches(devices!)];
      await new Promise((r) => setTimeout(r, 4000));
      // Before: a sampler every 250 ms made 16 here, a poll timeout every second 4; now 0-1 each.
      expect(switches(pid) - a[0]!).toBeLessThanOrEqual(3);
      expect(switches(devices!) - a[1]!).toBeLessThanOrEqual(1);
      // GET /stats reads the counters from the stats page: it does not wake the device thread
      // (before: one command, so one wake-up, per request).
      const b = switches(devices!);
      for (let i = 0; i < 10; i++) expect((await unixApi(vm.files.api, "GET", "/stats")).body).toMatchObject({ io: { disks: [], nets: [] } });
      expect(switches(devices!) - b).toBeLessThanOrEqual(1);
      // The same counters in the file, for a supervisor: set up, no devices counting, started now.
      const page = parseStatsPage(readFileSync(stats));
      expect(page).toMatchObject({ disks: [], nics: [], totals: { diskReadBytes: 0, netRxBytes: 0 } });
      expect(Date.now() - page!.startedAtMs!).toBeGreaterThan(10_000);
      expect(Date.now() - page!.startedAtMs!).toBeLessThan(40_000);
      // Both still answer: GET /threads asks the device thread through its eventfd.
      const t = await unixApi(vm.files.api, "GET", "/threads");
      expect(t.body).toMatchObject({ vcpus: [{ phase: "run" }], devices: { answering: true, phase: "poll" } });
      vm.child.kill("SIGTERM");
      expect(await vm.exited, vm.stderr()).toBe(0);
    } finally {
      if (vm.child.exitCode === null) vm.child.kill("SIGKILL");
    }
  }, 40_000);

  it("records result stopped when killed with SIGTERM", async () => {
    const vm = start("t2");
    try {
      await until("the banner", () => readIf(vm.files.log).includes(TINY_KERNEL_BANNER));
      vm.child.kill("SIGTERM");
      expect(await vm.exited, vm.stderr()).toBe(0);
      expect(JSON.parse(readFileSync(vm.files.exit, "utf8"))).toMatchObject({ code: 0, result: "stopped" });
    } finally {
      if (vm.child.exitCode === null) vm.child.kill("SIGKILL");
    }
  }, 30_000);

  it("records a guest crash (exit 1)", async () => {
    const vm = start("t3");
    try {
      await until("the banner", () => readIf(vm.files.log).includes(TINY_KERNEL_BANNER));
      const c = await consoleClient(vm.files.sock);
      c.sock.write(Uint8Array.of(TINY_KERNEL_KEYS.CRASH));
      expect(await vm.exited, vm.stderr()).toBe(1);
      expect(JSON.parse(readFileSync(vm.files.exit, "utf8"))).toMatchObject({ code: 1, result: "crash" });
    } finally {
      if (vm.child.exitCode === null) vm.child.kill("SIGKILL");
    }
  }, 30_000);
});

describe("typevisor run rejects bad headless options with one line", () => {
  it.each([
    ["--console-log-size 1Q", ["--console-log", join(dir, "x.log"), "--console-log-size", "1Q"], /error\[INVALID_ARGUMENT\]: --console-log-size: invalid size "1Q": not a number with an optional unit/],
    ["--id a/b", ["--id", "a/b"], /error\[INVALID_ARGUMENT\]: --id must be/],
    ["--console-log-size without --console-log", ["--console-log-size", "4K"], /needs --console-log/],
  ])("%s", (_name, args, expected) => {
    const exitFile = join(dir, `exit-${Math.random().toString(36).slice(2)}.json`);
    const r = spawnSync(process.execPath, [BIN, "run", "--kernel", kernel, "--force-kvm", "--no-lab", "--exit-file", exitFile, ...args], { encoding: "utf8", timeout: 20_000 });
    expect(r.status, r.stderr).toBe(2);
    // One error line, and at most a hint under it.
    const lines = r.stderr.trim().split("\n");
    expect(lines[0]).toMatch(expected);
    expect(lines.slice(1).every((l) => l.startsWith("  hint: "))).toBe(true);
    expect(lines.length).toBeLessThanOrEqual(2);
    // A supervisor learns of it from the exit file too.
    expect(JSON.parse(readFileSync(exitFile, "utf8"))).toMatchObject({ code: 2, result: "error" });
  });
});
