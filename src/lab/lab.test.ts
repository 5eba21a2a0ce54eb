import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { parseLabArgs } from "./cli.js";
import { hostKvmKind, isInLab } from "./kvm-kind.js";
import { labQemuArgs, runInLab } from "./lab.js";

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
    const a = labQemuArgs({ kernel: "/k", initrd: "/i", release: "r", package: "p" }, { memoryMiB: 512, cpus: 1, append: "x" }).join(" ");
    expect(a).toContain("-M q35 -accel tcg");
    expect(a).toContain("-cpu EPYC -smp 1 -m 512");
    expect(a).toContain("-nic none");
    expect(a).toMatch(/-virtfs local,path=\/,mount_tag=hostroot,security_model=none,readonly=on/);
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
  });
});
