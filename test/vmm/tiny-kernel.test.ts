/**
 * The tiny test kernel (test/helpers/tiny-kernel.ts) through the real bzImage
 * loader and the Vm class, on any /dev/kvm (PVM included): banner, echo of
 * serial input through its UART interrupt, and the three command keys.
 */
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { parseStatFields } from "../../src/control/proc.js";
import { parseBzImage, validateKernel } from "../../src/vmm/arch/x86_64/boot/index.js";
import { Vm } from "../../src/vmm/vm.js";
import { TINY_KERNEL_BANNER, TINY_KERNEL_KEYS, tinyKernelImage } from "../helpers/tiny-kernel.js";

const hasKvm = existsSync("/dev/kvm");
const built = existsSync(new URL("../../dist/vmm/vcpu/worker.js", import.meta.url));
if (hasKvm && !built) throw new Error("run `npm run build` first: vCPU workers load from dist/");

function consoleFile() {
  const path = join(mkdtempSync(join(tmpdir(), "tv-tk-")), "console");
  const fd = openSync(path, "w");
  return { fd, read: () => readFileSync(path, "utf8"), close: () => closeSync(fd) };
}

async function until(what: string, cond: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function boot(consoleFd: number, vcpuNice?: number): Vm {
  return new Vm({ cpus: 1, memoryMiB: 64, consoleFd, boot: { kind: "linux", kernel: tinyKernelImage(), cmdline: "" }, ...(vcpuNice !== undefined ? { vcpuNice } : {}) });
}

/** Nice value (field 19 of stat) of this process's threads named `comm`, and of the calling thread. */
function threadNices(comm: string): { named: number[]; self: number } {
  const nice = (stat: string) => Number(parseStatFields(stat)![19]);
  const named = readdirSync("/proc/self/task")
    .filter((t) => readFileSync(`/proc/self/task/${t}/comm`, "utf8").trim() === comm)
    .map((t) => nice(readFileSync(`/proc/self/task/${t}/stat`, "utf8")));
  return { named, self: nice(readFileSync("/proc/thread-self/stat", "utf8")) };
}

describe("tiny kernel image", () => {
  it("is a bzImage our loader accepts, entered at load address + 0x200 in 64-bit mode", () => {
    const img = tinyKernelImage();
    const hdr = parseBzImage(img);
    expect(hdr.version).toBe(0x020f);
    expect(hdr.xloadflags & 1).toBe(1);
    expect(hdr.kernelVersion).toMatch(/tiny-guest/);
    const plan = validateKernel({ kernel: img, cmdline: "", memBytes: 64 << 20 });
    expect(plan.protocol).toBe("linux64");
    expect(plan.cpu.regs.rip).toBe(plan.layout!.kernel.addr + 0x200);
  });
});

describe.skipIf(!hasKvm)("tiny kernel on /dev/kvm", () => {
  it("prints its banner, echoes serial input, and powers off on Ctrl-D", async () => {
    const con = consoleFile();
    const vm = boot(con.fd);
    const done = vm.run();
    await until("banner", () => con.read() === TINY_KERNEL_BANNER);
    vm.sendInput(new TextEncoder().encode("echo me\n"));
    await until("echo", () => con.read() === `${TINY_KERNEL_BANNER}echo me\n`);
    vm.sendInput(Uint8Array.of(TINY_KERNEL_KEYS.POWEROFF));
    expect(await done).toEqual({ kind: "poweroff" });
    const exits = vm.getStats().totalExits;
    vm.destroy();
    con.close();
    // Interrupt-driven: a handful of exits per byte, no polling loop.
    expect(exits).toBeLessThan(500);
  });

  it("runs its vCPU thread nicer than the thread that started it by the configured offset", async () => {
    for (const [offset, expected] of [[undefined, 3], [0, 0], [5, 5]] as const) {
      const con = consoleFile();
      const vm = boot(con.fd, offset);
      const done = vm.run();
      await until("banner", () => con.read() === TINY_KERNEL_BANNER);
      const { named, self } = threadNices("tv-vcpu0");
      const stats = vm.getStats().vcpus[0]!;
      vm.sendInput(Uint8Array.of(TINY_KERNEL_KEYS.POWEROFF));
      expect(await done).toEqual({ kind: "poweroff" });
      vm.destroy();
      con.close();
      const want = Math.min(19, self + expected);
      expect(named).toEqual([want]);
      expect(stats.nice).toBe(want);
      expect(stats.niceError).toBeUndefined();
    }
  });

  it("resets on Ctrl-R", async () => {
    const con = consoleFile();
    const vm = boot(con.fd);
    const done = vm.run();
    await until("banner", () => con.read() === TINY_KERNEL_BANNER);
    vm.sendInput(Uint8Array.of(TINY_KERNEL_KEYS.RESET));
    expect(await done).toEqual({ kind: "reset" });
    vm.destroy();
    con.close();
  });

  it("crashes (triple fault) on Ctrl-G", async () => {
    const con = consoleFile();
    const vm = boot(con.fd);
    const done = vm.run();
    await until("banner", () => con.read() === TINY_KERNEL_BANNER);
    vm.sendInput(Uint8Array.of(TINY_KERNEL_KEYS.CRASH));
    const result = await done;
    vm.destroy();
    con.close();
    expect(result.kind).toBe("crash");
  });

  it("is rebooted from the host (Vm.reset) like a guest reset", async () => {
    const con = consoleFile();
    const vm = boot(con.fd);
    const done = vm.run();
    await until("banner", () => con.read() === TINY_KERNEL_BANNER);
    vm.reset();
    expect(await done).toEqual({ kind: "reset" });
    vm.destroy();
    con.close();
  });
});
