/**
 * A VMM gets signals while it builds its VM: the CPU profiler's SIGPROF, SIGWINCH from a resized
 * terminal, SIGCHLD. A system call that sleeps interruptibly then returns EINTR, having done
 * nothing (signal(7)); on this project's PVM hosts KVM_CREATE_VM is one of them (seen: "error
 * [SYSCALL_FAILED]: KVM_CREATE_VM failed: EINTR" in one start of five under `--cpu-prof`). The VMM
 * must try such a call again, not fail the VM. Node's CPU profiler sends SIGPROF to the main thread
 * every `--cpu-prof-interval` microseconds, so a start under it meets signals at every step.
 */
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { until } from "../helpers/daemon.js";
import { TINY_KERNEL_BANNER, writeTinyKernel } from "../helpers/tiny-kernel.js";

const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
const hasKvm = existsSync("/dev/kvm");
const dir = mkdtempSync(join(tmpdir(), "tv-signals-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const kernel = join(dir, "tiny.bzImage");
writeTinyKernel(kernel);

/** One VMM start under a SIGPROF every 20 µs: its stderr and whether the guest printed its banner. */
async function startUnderSigprof(i: number): Promise<{ banner: boolean; stderr: string }> {
  const log = join(dir, `console-${i}.log`);
  const child = spawn(process.execPath, ["--cpu-prof", "--cpu-prof-dir", join(dir, "prof"), "--cpu-prof-interval", "20", BIN, "run", "--force-kvm", "--no-lab", "--kernel", kernel, "--memory", "64", "--console-log", log], { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise((r) => child.on("exit", r));
  let banner = false;
  try {
    await until("the banner, or the VMM's end", () => (banner = existsSync(log) && readFileSync(log, "latin1").includes(TINY_KERNEL_BANNER)) || child.exitCode !== null, 30_000);
  } finally {
    child.kill("SIGKILL");
    await exited;
  }
  return { banner, stderr };
}

describe.skipIf(!hasKvm)("a VMM started under a storm of signals (tiny kernel, --force-kvm)", () => {
  it("boots every time: a call a signal interrupted is made again", async () => {
    for (let i = 0; i < 8; i++) {
      const r = await startUnderSigprof(i);
      expect(r.stderr).not.toMatch(/EINTR/);
      expect(r.banner, `start ${i}: ${r.stderr}`).toBe(true);
    }
  }, 120_000);
});
