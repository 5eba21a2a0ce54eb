/**
 * Lab tests (real KVM): the typevisor VMM boots unmodified Debian kernels.
 * Images are built on the host before the lab starts (`npm run test:lab`).
 */
import { spawnSync } from "node:child_process";
import { SYNC_TIMEOUT_MS } from "../helpers/sync-timeout.js";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { request } from "node:http";
import { getPriority, tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { parseGuestExit, runScriptArg, USERSPACE_UP_LINE } from "../../src/images/guest-init.js";
import { imagePaths } from "../../src/images/image.js";
import { extractVmlinux } from "../../src/vmm/arch/x86_64/boot/index.js";
import { ConsoleProcess } from "../helpers/console-process.js";

const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
/** The busybox shell prompt on the console (it may be followed by a cursor-position query). */
// eslint-disable-next-line no-control-regex -- ash follows its prompt with ESC[6n (cursor position query)
const PROMPT = /# (?:\x1b\[6n)?$/;
const img = imagePaths("minimal");
const running: ConsoleProcess[] = [];
afterEach(() => {
  for (const p of running.splice(0)) p.kill();
});

function tv(args: string[]): ConsoleProcess {
  const p = new ConsoleProcess(process.execPath, [BIN, "run", "--no-lab", "--no-reboot", ...args]);
  running.push(p);
  return p;
}

/** Boot, run `script` in the guest, and return its console output after it powered off. */
async function runScript(args: string[], script: string): Promise<{ code: number | null; out: string }> {
  const p = tv([...args, "--append", runScriptArg(script)]);
  const code = await p.exited;
  return { code, out: p.output };
}

// tscdl: CPUs that report the TSC-deadline timer (the VMM adds the bit when KVM emulates the mode).
const CPU_SCRIPT =
  'echo "cpus=$(grep -c ^processor /proc/cpuinfo) online=$(cat /sys/devices/system/cpu/online) tscdl=$(grep -c tsc_deadline_timer /proc/cpuinfo)"; grep MemTotal /proc/meminfo';

function memTotalKiB(out: string): number {
  return Number(/MemTotal:\s+(\d+) kB/.exec(out)?.[1] ?? NaN);
}

describe("typevisor run boots Debian kernels under real KVM", () => {
  it("cloud kernel (bzImage, 64-bit entry), 1 vCPU, 256 MiB: userspace, script, poweroff exits 0", async () => {
    const { code, out } = await runScript(["--image", "minimal", "--cpus", "1", "--memory", "256"], CPU_SCRIPT);
    expect(out).toContain(USERSPACE_UP_LINE);
    expect(out).toContain("cpus=1 online=0 tscdl=1");
    expect(parseGuestExit(out)).toBe(0);
    expect(memTotalKiB(out)).toBeGreaterThan(200 * 1024);
    expect(memTotalKiB(out)).toBeLessThan(256 * 1024);
    expect(code).toBe(0);
  });

  it("2 vCPUs and 2048 MiB: the guest sees both CPUs online and all its memory", async () => {
    const { code, out } = await runScript(["--image", "minimal", "--cpus", "2", "--memory", "2048"], CPU_SCRIPT);
    expect(out).toContain("cpus=2 online=0-1 tscdl=2");
    expect(memTotalKiB(out)).toBeGreaterThan(1900 * 1024);
    expect(code).toBe(0);
  });

  it("PVH entry: the cloud kernel's vmlinux (ELF with the Xen PVH note) boots", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tv-pvh-"));
    const vmlinux = join(dir, "vmlinux");
    writeFileSync(vmlinux, extractVmlinux(readFileSync(img.kernel)));
    const { code, out } = await runScript(["--kernel", vmlinux, "--initrd", img.initrd, "--cpus", "2", "--memory", "512"], CPU_SCRIPT);
    expect(out).toContain(USERSPACE_UP_LINE);
    expect(out).toContain("cpus=2 online=0-1");
    expect(code).toBe(0);
  });

  // The generic Debian kernel (linux-image-*-amd64) booting to userspace is proven by
  // vmgenid.lab.test.ts, which needs that kernel (CONFIG_VMGENID) and checks `uname -r`: one boot, not two.

  // One boot for the API socket's pause/resume and the guest's reboot (each boot is ~30 s of the lab group).
  it("pause and resume through the API socket leave the guest working; reboot restarts the VM; poweroff at the shell exits 0", async () => {
    const sock = join(mkdtempSync(join(tmpdir(), "tv-api-")), "vm.sock");
    const p = new ConsoleProcess(process.execPath, [BIN, "run", "--no-lab", "--image", "minimal", "--cpus", "2", "--memory", "256", "--vcpu-nice", "5", "--api-socket", sock]);
    running.push(p);
    let at = await p.waitFor(PROMPT);
    expect((await api(sock, "POST", "/pause")).status).toBe(200);
    expect(JSON.parse((await api(sock, "GET", "/vm")).body).state).toBe("paused");
    const before = JSON.parse((await api(sock, "GET", "/stats")).body).totalExits as number;
    await new Promise((r) => setTimeout(r, 1000));
    const after = JSON.parse((await api(sock, "GET", "/stats")).body).totalExits as number;
    expect(after).toBe(before);
    expect((await api(sock, "POST", "/pause")).status).toBe(409);
    expect((await api(sock, "POST", "/resume")).status).toBe(200);
    p.type("echo ok-$((40+2))\n");
    at = await p.waitFor(/ok-42/, at);
    const stats = JSON.parse((await api(sock, "GET", "/stats")).body);
    expect(stats.vcpus).toHaveLength(2);
    expect(stats.vcpus[0].exits.io).toBeGreaterThan(0);
    // --vcpu-nice 5 over the nice value the VMM inherited from this process.
    expect(stats.vcpus.map((v: { nice: number }) => v.nice)).toEqual([0, 1].map(() => Math.min(19, getPriority() + 5)));
    await p.waitFor(PROMPT, at);
    p.type("reboot\n");
    at = await p.waitFor(/guest reset; restarting the VM/, at);
    at = await p.waitFor(new RegExp(USERSPACE_UP_LINE), at);
    await p.waitFor(PROMPT, at);
    p.type("poweroff\n");
    expect(await p.exited).toBe(0);
  });

  it("rejects a kernel that is not a kernel with one line and exit 2, before any vCPU runs", () => {
    const dir = mkdtempSync(join(tmpdir(), "tv-bad-"));
    const bad = join(dir, "truncated");
    writeFileSync(bad, readFileSync(img.kernel).subarray(0, 4096));
    const r = spawnSync(process.execPath, [BIN, "run", "--no-lab", "--kernel", bad], { encoding: "utf8", timeout: SYNC_TIMEOUT_MS });
    expect(r.status).toBe(2);
    expect(r.stderr.trim().split("\n")[0]).toMatch(/^typevisor: error\[KERNEL_INVALID\]/);
  });
});

function api(sock: string, method: string, path: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath: sock, method, path }, (res) => {
      let body = "";
      res.on("data", (d: Buffer) => (body += d.toString()));
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on("error", reject);
    req.end();
  });
}
