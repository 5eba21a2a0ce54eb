import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import { execFileSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { parseLabArgs } from "./cli.js";
import { hostKvmKind, isInLab } from "./kvm-kind.js";
import { findOnPath, labQemuArgs, QEMU, runInLab } from "./lab.js";
import { shQuote } from "./spec.js";

const BIN = fileURLToPath(new URL("../../bin/typevisor.js", import.meta.url));

describe("hostKvmKind", () => {
  it("tells none, pvm and hardware apart from /dev/kvm and /sys/module/kvm_pvm", () => {
    const root = mkdtempSync(join(tmpdir(), "tv-root-"));
    try {
      expect(hostKvmKind(root)).toBe("none");
      mkdirSync(join(root, "dev"));
      writeFileSync(join(root, "dev", "kvm"), "");
      expect(hostKvmKind(root)).toBe("hardware");
      mkdirSync(join(root, "sys", "module", "kvm_pvm"), { recursive: true });
      expect(hostKvmKind(root)).toBe("pvm");
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  it("isInLab reads TYPEVISOR_IN_LAB", () => {
    expect(isInLab({ TYPEVISOR_IN_LAB: "1" })).toBe(true);
    expect(isInLab({})).toBe(false);
  });
});

describe("lab command line", () => {
  it("accepts the command with or without a leading --", () => {
    expect(parseLabArgs(["--", "sh", "-c", "echo --"])).toEqual(["sh", "-c", "echo --"]);
    expect(parseLabArgs(["sh", "--"])).toEqual(["sh", "--"]);
  });

  it("QEMU gets the kvm-lab recipe: q35, TCG, EPYC, no NIC, host root read-only over virtfs", () => {
    const a = labQemuArgs({ kernel: "/k", initrd: "/i", release: "r", package: "p" }, {
      memoryMiB: 512,
      cpus: 1,
      append: "x",
      ports: { kernelLog: "/l/k,1.log", agentSocket: "/s/agent", qmpSocket: "/s/qmp" },
    }).join(" ");
    expect(a).toContain("-M q35 -accel tcg");
    expect(a).toContain("-cpu EPYC -smp 1 -m 512");
    expect(a).toContain("-nic none");
    expect(a).toMatch(/-virtfs local,path=\/,mount_tag=hostroot,security_model=none,readonly=on/);
    // the command's terminal, the kernel log (a comma in a path doubled, as QemuOpts wants), the agent, QMP
    expect(a).toContain("-serial mon:stdio -chardev file,id=tvklog,path=/l/k,,1.log -serial chardev:tvklog");
    expect(a).toContain("-chardev socket,id=tvagent,path=/s/agent,server=on,wait=off -device isa-serial,chardev=tvagent,iobase=0x3e8,irq=5");
    expect(a).toContain("-qmp unix:/s/qmp,server=on,wait=off");
  });
});

describe("runInLab errors", () => {
  it("says how to install QEMU when qemu-system-x86_64 is not on PATH", async () => {
    const empty = mkdtempSync(join(tmpdir(), "tv-path-"));
    try {
      await expect(runInLab(["true"], { env: { PATH: empty } })).rejects.toMatchObject({ code: "LAB_QEMU_MISSING", hint: expect.stringContaining("qemu-system-x86") });
    } finally {
      rmSync(empty, { recursive: true, force: true });
    }
  });

  it("refuses an empty command and bad sizing knobs", async () => {
    await expect(runInLab([])).rejects.toMatchObject({ code: "LAB_NO_COMMAND" });
    await expect(runInLab(["true"], { env: { ...process.env, TYPEVISOR_LAB_MEMORY: "lots" } })).rejects.toMatchObject({ code: "LAB_BAD_ENV" });
    await expect(runInLab(["true"], { env: { ...process.env, TYPEVISOR_LAB_SILENCE: "-1" } })).rejects.toMatchObject({ code: "LAB_BAD_ENV" });
    await expect(runInLab(["true"], { env: { ...process.env, TYPEVISOR_LAB_APPEND: "x".repeat(1025) } })).rejects.toMatchObject({ code: "LAB_BAD_ENV" });
    await expect(runInLab(["true"], { env: { ...process.env, TYPEVISOR_LAB_HEARTBEAT_MS: "-5" } })).rejects.toMatchObject({ code: "LAB_BAD_ENV" });
  });
});

// A real lab boot (about a minute): QEMU and the Debian kernel the lab uses, from the host's packages.
/** A stream that keeps what the lab's command printed. */
function collector(): { sink: Writable; text: () => string } {
  let output = "";
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      output += chunk.toString("utf8");
      cb();
    },
  });
  return { sink, text: () => output };
}

describe.runIf(findOnPath(QEMU) !== undefined)("an interactive command, in a real lab", () => {
  it("gives its exit code back after its session hung its terminal up (the exit marker goes out on a fresh open)", async () => {
    const { sink, text } = collector();
    // interactive: the command owns ttyS0 as its controlling terminal (setsid -c), as `npm start` does
    const code = await runInLab(["sh", "-c", "tty; exit 7"], { output: sink, tty: { columns: 80, rows: 24 }, interactive: true, env: process.env });
    expect(text()).toContain("/dev/ttyS0");
    expect(code).toBe(7);
  }, 180_000);
});

describe.runIf(findOnPath(QEMU) !== undefined)("the silence watchdog, in a real lab", () => {
  it("diagnoses a command that goes silent and fails it with LAB_SILENT, the kernel's messages kept apart", async () => {
    const { sink, text } = collector();
    // a real typevisor VMM (headless, a control socket) runs in the lab while the command is silent
    execFileSync(process.execPath, [BIN, "image", "build", "minimal"], { stdio: "ignore", timeout: 300_000 });
    const vmm = `${shQuote(process.execPath)} ${shQuote(BIN)} run --no-lab --image minimal --memory 256 --rng --api-socket /tmp/tvw.sock --console-log /tmp/tvw.log`;
    const err = await runInLab(["sh", "-c", `echo before-the-silence; ${vmm} & sleep 1000; echo never`], { output: sink, silenceSec: 45, env: process.env }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(err).toMatchObject({ code: "LAB_SILENT", message: expect.stringContaining("went silent") });
    const message = (err as Error).message;
    const console = /lab console log: (\S+);/.exec(message)?.[1];
    const kernel = /lab kernel log: (\S+)$/.exec(message)?.[1];
    expect(console).toBeDefined();
    expect(kernel).toBeDefined();
    // the command's output is its own: no kernel messages in it
    expect(text()).toBe("before-the-silence\n");
    const log = readFileSync(console!, "utf8");
    // QEMU's threads with their system calls, the lab CPU's APIC timer, the lab's timers and threads
    expect(log).toMatch(/CPU 0\/TCG .*futex|CPU 0\/TCG .* R /);
    // QEMU's main loop: running, or in ppoll with the timeout read from its memory
    expect(log).toMatch(/qemu-system-x86 +[RS] .*(running|ppoll\(.*timeout \d+\.\d+ s)/);
    expect(log).toContain("== (qemu) info lapic");
    expect(log).toMatch(/LVTT\s+0x[0-9a-f]+/);
    expect(log).toContain("== /proc/timer_list");
    expect(log).toMatch(/hrtimer_nanosleep\s+clock_nanosleep/);
    // the VMM found by its --api-socket, and its own report of its threads
    expect(log).toMatch(/== VMM pid \d+: GET \/threads on \/tmp\/tvw\.sock/);
    expect(log).toMatch(/"vcpus": \[/);
    expect(log).toMatch(/"phase": "(run|exit|paused)"/);
    expect(log).toMatch(/"comm": "tv-devices"/);
    const klog = readFileSync(kernel!, "utf8");
    expect(klog).toContain("Linux version");
    // SysRq pressed on the lab's keyboard through QMP reached its kernel
    expect(klog).toContain("sysrq: Show Blocked State");
    expect(klog).toContain("sysrq: Show backtrace of all active CPUs");
    rmSync(console!, { force: true });
    rmSync(kernel!, { force: true });
  }, 420_000);
});
