/**
 * The big-VM limits as the control plane applies them: the spec takes what any VMM takes
 * (vmm/defaults.ts), a VMM is told the daemon's memory overcommit, and a VM's cgroup allows
 * the VMM's own memory for its vCPUs and its RAM's page tables.
 */
import { describe, expect, it } from "vitest";
import { vmmArgs, type VmmLaunch } from "../engine/native.js";
import { MAX_MEMORY_MIB, MAX_VCPUS, vmmOverheadBytes } from "../vmm/defaults.js";
import { vmSpec } from "./spec.js";

const MiB = 2 ** 20;
const GiB = 2 ** 30;

describe("VM spec limits", () => {
  it("accepts 1..MAX_VCPUS vCPUs and up to MAX_MEMORY_MIB, refuses one more of either", () => {
    const ok = (cpus: number, memoryMiB: number) => vmSpec.safeParse({ name: "big", image: "minimal", cpus, memoryMiB }).success;
    expect(ok(MAX_VCPUS, 12 * 1024)).toBe(true);
    expect(ok(16, MAX_MEMORY_MIB)).toBe(true);
    expect(ok(MAX_VCPUS + 1, 256)).toBe(false);
    expect(ok(1, MAX_MEMORY_MIB + 1)).toBe(false);
    expect(ok(0, 256)).toBe(false);
    expect(MAX_VCPUS).toBe(4096);
    expect(MAX_MEMORY_MIB).toBe(4 * 1024 * 1024);
  });
});

describe("vmmOverheadBytes", () => {
  it("is the base plus 16 MiB per vCPU plus two page tables' worth of guest RAM (1/256)", () => {
    expect(vmmOverheadBytes(1, 256 * MiB)).toBe(384 * MiB + 16 * MiB + 1 * MiB);
    expect(vmmOverheadBytes(16, 12 * GiB)).toBe(384 * MiB + 256 * MiB + 48 * MiB);
    expect(vmmOverheadBytes(2, 1 * GiB, 100 * MiB)).toBe(100 * MiB + 32 * MiB + 4 * MiB);
    // Monotonic in both.
    expect(vmmOverheadBytes(3, GiB)).toBeGreaterThan(vmmOverheadBytes(2, GiB));
    expect(vmmOverheadBytes(2, 2 * GiB)).toBeGreaterThan(vmmOverheadBytes(2, GiB));
  });
});

describe("vmmArgs", () => {
  const launch: VmmLaunch = {
    id: "vm1", kernel: "/k", cmdline: "c", cpus: 16, memoryMiB: 12288, disks: [], nets: [], rng: false, balloon: false,
    apiSocket: "/a", consoleLog: "/l", consoleLogSize: 1024, consoleSocket: "/s", exitFile: "/e", vmmLog: "/v", forceKvm: false,
  };
  it("passes the daemon's memory overcommit to the VMM, which refuses more than host memory × it", () => {
    const args = vmmArgs({ ...launch, memoryOvercommit: 1.5 });
    expect(args.slice(args.indexOf("--memory"), args.indexOf("--memory") + 4)).toEqual(["--memory", "12288", "--memory-overcommit", "1.5"]);
    expect(vmmArgs(launch)).not.toContain("--memory-overcommit");
  });
});
