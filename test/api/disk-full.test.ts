/**
 * A full disk under a real daemon and real VMMs (issue: "Disk full anywhere: a clear error naming
 * the full filesystem, no request answers 500 for it, the VMM keeps running with its console log
 * dropping output and says so"). The data directory is a real tmpfs of a few MiB that a filler
 * file fills to the last block; mounting it needs root (CI runs as root).
 */
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, statfsSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { ApiError } from "../../src/api/client.js";
import { startDaemon, until, type TestDaemon } from "../helpers/daemon.js";
import { vmmProcesses } from "../helpers/vmm-processes.js";
import { VmmClient } from "../../src/engine/vmm-client.js";
import { writeTinyKernel, TINY_KERNEL_BANNER } from "../helpers/tiny-kernel.js";

const hasKvm = existsSync("/dev/kvm");
const built = existsSync(new URL("../../dist/cli/main.js", import.meta.url));
const root = process.getuid?.() === 0;

/** Fill the file system at `dir` to its last byte with one file; returns its path. */
function fill(dir: string): string {
  const filler = join(dir, "filler");
  try {
    execFileSync("dd", ["if=/dev/zero", `of=${filler}`, "bs=64k"], { stdio: "ignore", timeout: 30_000 });
  } catch {
    /* dd stops with ENOSPC: that is the point */
  }
  // the last partial block too
  try {
    execFileSync("dd", ["if=/dev/zero", `of=${filler}`, "bs=512", "oflag=append", "conv=notrunc"], { stdio: "ignore", timeout: 30_000 });
  } catch {
    /* full */
  }
  return filler;
}

async function refusal(p: Promise<unknown>): Promise<ApiError> {
  const e = await p.then(
    () => new Error("succeeded on a full disk"),
    (x: unknown) => x,
  );
  if (!(e instanceof ApiError)) throw e;
  return e;
}

describe.skipIf(!hasKvm || !built || !root)("a full data disk under a real daemon", () => {
  const mnt = mkdtempSync(join(tmpdir(), "tv-full-"));
  const dir = mkdtempSync(join(tmpdir(), "tv-full-files-"));
  const kernel = join(dir, "tiny.bin");
  const initrd = join(dir, "initrd");
  let d: TestDaemon | undefined;
  let mounted = false;

  afterAll(async () => {
    await d?.stop("SIGKILL");
    for (const pid of vmmProcesses(join(mnt, "home"))) process.kill(pid, "SIGKILL");
    if (mounted) await until("the tmpfs unmounted", () => {
      try {
        execFileSync("umount", [mnt], { stdio: "ignore" });
        return true;
      } catch {
        return undefined; // its VMMs are still exiting
      }
    });
    rmSync(mnt, { recursive: true, force: true });
    rmSync(dir, { recursive: true, force: true });
  });

  it("answers 507 naming the file system, keeps the VM and its VMM running, drops console output and says so, and recovers when space is freed", async () => {
    execFileSync("mount", ["-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", mnt]);
    mounted = true;
    writeTinyKernel(kernel);
    writeFileSync(initrd, Buffer.alloc(2 << 20, 1));
    // an image whose root filesystem the daemon copies (a raw disk) or makes a base of (qcow2)
    const img = join(dir, "data", "images", "small");
    mkdirSync(img, { recursive: true });
    writeTinyKernel(join(img, "vmlinuz"));
    execFileSync("mkfs.ext4", ["-q", "-F", join(img, "rootfs.ext4"), "4M"], { timeout: 60_000 });
    const home = join(mnt, "home");
    const args = ["--force-kvm", "--allow-files", dir];
    d = await startDaemon({ home, args, env: { TYPEVISOR_HOME: join(dir, "data") } });
    const c = d.client;
    await c.createVm({ name: "a", kernel, memoryMiB: 64, rng: false });
    await c.startVm("a");
    const console1 = await c.attachConsole("a");
    await until("banner", async () => (await c.console("a")).toString().includes(TINY_KERNEL_BANNER) || undefined);

    const filler = fill(mnt);
    expect(statfsSync(mnt).bavail).toBe(0);

    // Every request that needs space says which file system is full: 507 DISK_FULL, never 500.
    for (const [what, p] of [
      ["create (kernel copy)", () => c.createVm({ name: "b", kernel, memoryMiB: 64, rng: false })],
      ["create (initrd copy)", () => c.createVm({ name: "c", kernel, initrd, memoryMiB: 64, rng: false })],
      ["stop (inventory write)", () => c.stopVm("a")],
      ["pause (inventory write)", () => c.pauseVm("a")],
    ] as const) {
      const e = await refusal(p());
      expect([what, e.status, e.code], e.message).toEqual([what, 507, "DISK_FULL"]);
      expect(e.message).toContain(`no space left on ${mnt} (tmpfs`);
    }
    // A copy of a known size is refused before it starts, saying how much is free.
    for (const [what, p] of [
      ["create (raw disk from an image)", () => c.createVm({ name: "e", image: "small", diskFormat: "raw", memoryMiB: 64, rng: false })],
      ["create (the image's base)", () => c.createVm({ name: "f", image: "small", memoryMiB: 64, rng: false })],
    ] as const) {
      const e = await refusal(p());
      expect([what, e.status, e.code], e.message).toEqual([what, 409, "INSUFFICIENT_RESOURCES"]);
      expect(e.message).toMatch(/not enough free disk in .*: the image's root filesystem needs \d+ bytes, 0 free/);
    }
    // a refused pause left the VMM running, as the inventory says
    expect((await new VmmClient((await c.getVm("a")).apiSocket).info()).state).toBe("running");
    // a failed create leaves nothing behind
    expect(readdirSync(join(home, "vms")).filter((f) => f.endsWith(".creating"))).toEqual([]);
    expect((await c.listVms()).map((v) => `${v.name}=${v.state}`)).toEqual(["a=running"]);

    // The guest echoes what is typed; its console log cannot take it (past the log's last page,
    // which had room): dropped, and the VMM says so (GET /vm, which the daemon's watchdog reads).
    console1.write("x".repeat(6000));
    await until("the VMM reports dropped console output", async () => ((await c.getVm("a")).consoleDroppedBytes ?? 0) >= 6000 - 4096 || undefined, 15_000);
    const a = await c.getVm("a");
    expect(a.unresponsive).toBeUndefined();
    expect(a.state).toBe("running");
    expect(d.proc.exitCode).toBeNull();

    // Space comes back: everything works again, the log notes the gap, and the lost events are counted.
    rmSync(filler);
    console1.write("after\r");
    await until("the note and the new output in the console log", async () => {
      const log = (await c.console("a")).toString();
      return /x\r\n\[typevisor: \d+ bytes of console output dropped: the log could not be written\]\r\n(x*)after/.test(log) || undefined;
    }, 15_000);
    console1.destroy();
    await c.createVm({ name: "b", kernel, memoryMiB: 64, rng: false });
    // vm.console-dropped came while the inventory could not take it: in the daemon's log, and
    // counted in the next event it could record
    expect(d.log()).toMatch(/"event":"vm.console-dropped".*event not recorded/);
    const lost = (await c.events({ limit: 1000 })).find((e) => e.type === "daemon.events-lost");
    expect(lost?.data?.["lost"]).toBeGreaterThanOrEqual(1);
    await c.stopVm("a");
    expect((await c.listVms()).map((v) => `${v.name}=${v.state}`).sort()).toEqual(["a=stopped", "b=defined"]);
  }, 120_000);

  it("a daemon told to stop while its disk is full exits, and starts again on it", async () => {
    const filler = fill(mnt);
    const stopped = await Promise.race([d!.stop("SIGTERM"), new Promise((r) => setTimeout(() => r("still running after 20 s"), 20_000))]);
    expect(stopped, d!.log().slice(-3000)).toBe(0);
    d = await startDaemon({ home: join(mnt, "home"), args: ["--force-kvm", "--allow-files", dir], env: { TYPEVISOR_HOME: join(dir, "data") } });
    expect((await d.client.listVms()).map((v) => v.name).sort()).toEqual(["a", "b"]);
    rmSync(filler);
    // started while full: its start-up events could not be recorded, and that is said once it can be
    const before = (await d.client.events({ limit: 1000 })).filter((e) => e.type === "daemon.events-lost").length;
    await d.client.removeVm("b");
    expect((await d.client.events({ limit: 1000 })).filter((e) => e.type === "daemon.events-lost").length).toBe(before + 1);
  }, 120_000);
});
