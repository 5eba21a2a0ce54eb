// Unit tests: detection on this host and on made-up mount tables, and VmCgroup's file protocol
// against a plain directory standing in for cgroupfs. The real kernel side (limits enforced, OOM
// kills counted) is in cgroups.lab.test.ts, inside the lab where cgroup v2 has its controllers.
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { detectCgroupV2, parseFlatKeyed, VmCgroup, type CgroupSupport } from "./cgroups.js";
import { parseMountinfo } from "../sys/mounts.js";
import { thrown } from "../../test/helpers/thrown.js";

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), "tv-cgroups-"));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

const line = (id: number, mountPoint: string, fsType: string, superOpts: string): string =>
  `${id} 1 0:${id} / ${mountPoint} rw,relatime shared:${id} - ${fsType} ${fsType} ${superOpts}`;

describe("detectCgroupV2", () => {
  it("on this host agrees with /proc/self/mountinfo", () => {
    const s = detectCgroupV2();
    const v2 = parseMountinfo(readFileSync("/proc/self/mountinfo", "utf8")).filter((m) => m.fsType === "cgroup2");
    if (v2.length === 0) {
      expect(s.available).toBe(false);
      expect(s.reason).toMatch(/no cgroup2/);
      return;
    }
    expect(v2.map((m) => m.mountPoint)).toContain(s.mount);
    const controllers = readFileSync(join(s.mount!, "cgroup.controllers"), "utf8").trim().split(/\s+/).filter((c) => c !== "");
    expect(s.controllers).toEqual(controllers);
    if (s.available) {
      expect(s.controllers).toEqual(expect.arrayContaining(["cpu", "memory"]));
      expect(s.reason).toBeUndefined();
    } else {
      expect(s.reason).toBeTruthy();
      for (const c of ["cpu", "memory"]) if (!controllers.includes(c)) expect(s.reason).toContain(c);
    }
  });

  it("reports a host without cgroup2", () => {
    const s = detectCgroupV2(`${line(20, "/proc", "proc", "rw")}\n`);
    expect(s).toEqual({ available: false, controllers: [], reason: expect.stringMatching(/no cgroup2 file system is mounted/) });
  });

  it("reports a hybrid host: the controllers are held by cgroup v1", () => {
    mkdirSync(join(dir, "unified"));
    writeFileSync(join(dir, "unified", "cgroup.controllers"), "hugetlb\n");
    const s = detectCgroupV2([line(31, "/sys/fs/cgroup/cpu", "cgroup", "rw,cpu"), line(35, "/sys/fs/cgroup/memory", "cgroup", "rw,memory"), line(41, join(dir, "unified"), "cgroup2", "rw")].join("\n"));
    expect(s.available).toBe(false);
    expect(s.mount).toBe(join(dir, "unified"));
    expect(s.controllers).toEqual(["hugetlb"]);
    expect(s.reason).toBe(
      `cgroup2 at ${join(dir, "unified")} lacks the cpu and memory controllers (it has: hugetlb); ` +
        "cgroup v1 holds cpu at /sys/fs/cgroup/cpu, memory at /sys/fs/cgroup/memory (a hybrid host: boot with systemd.unified_cgroup_hierarchy=1 for cgroup v2 alone)",
    );
  });

  it("accepts a cgroup2 root with cpu and memory (and a path with a space)", () => {
    const m = join(dir, "cg root");
    mkdirSync(m);
    writeFileSync(join(m, "cgroup.controllers"), "cpuset cpu io memory pids\n");
    const s = detectCgroupV2(line(41, m.replace(" ", "\\040"), "cgroup2", "rw"));
    expect(s).toEqual({ available: true, mount: m, controllers: ["cpuset", "cpu", "io", "memory", "pids"] });
  });
});

describe("parseFlatKeyed", () => {
  it("reads key-value lines", () => {
    const m = parseFlatKeyed("usage_usec 1500000\nuser_usec 1000000\n\nnr_throttled 3\n");
    expect(m.get("usage_usec")).toBe(1_500_000);
    expect(m.get("nr_throttled")).toBe(3);
  });
});

/** A directory laid out like a cgroup2 root after the kernel made the files we read. */
function fakeRoot(): CgroupSupport {
  writeFileSync(join(dir, "cgroup.controllers"), "cpu memory\n");
  writeFileSync(join(dir, "cgroup.subtree_control"), "");
  mkdirSync(join(dir, "typevisor"));
  writeFileSync(join(dir, "typevisor", "cgroup.subtree_control"), "memory\n");
  return { available: true, mount: dir, controllers: ["cpu", "memory"] };
}

describe("VmCgroup (file protocol on a stand-in directory)", () => {
  it("create enables cpu and memory down the tree and writes the limits", () => {
    const s = fakeRoot();
    const cg = VmCgroup.create(s, "vm-1a2b", { cpuMaxCpus: 0.5, memoryMaxBytes: 64 << 20, cpuWeight: 200 });
    const at = (f: string): string => readFileSync(join(dir, f), "utf8");
    expect(cg.path).toBe(join(dir, "typevisor", "vm-1a2b"));
    expect(at("cgroup.subtree_control")).toBe("+cpu +memory");
    expect(at("typevisor/cgroup.subtree_control")).toBe("+cpu"); // memory was already on
    expect(at("typevisor/vm-1a2b/cpu.max")).toBe("50000 100000");
    expect(at("typevisor/vm-1a2b/memory.max")).toBe(String(64 << 20));
    expect(at("typevisor/vm-1a2b/cpu.weight")).toBe("200");

    cg.setLimits({ cpuMaxCpus: 3 });
    expect(at("typevisor/vm-1a2b/cpu.max")).toBe("300000 100000");
    expect(at("typevisor/vm-1a2b/memory.max")).toBe(String(64 << 20));

    cg.addProcess(4242);
    expect(at("typevisor/vm-1a2b/cgroup.procs")).toBe("4242");
    expect(VmCgroup.open(s, "vm-1a2b")?.path).toBe(cg.path);
    expect(VmCgroup.open(s, "vm-none")).toBeUndefined();
    expect(VmCgroup.list(s)).toEqual(["vm-1a2b"]);
  });

  it("reads usage from cpu.stat, memory.current, memory.peak and memory.events", () => {
    const s = fakeRoot();
    const cg = VmCgroup.create(s, "vm", {});
    writeFileSync(join(cg.path, "cpu.stat"), "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n");
    writeFileSync(join(cg.path, "memory.current"), "1048576\n");
    expect(cg.usage()).toEqual({ cpuSeconds: 2.5, memoryBytes: 1048576 });
    writeFileSync(join(cg.path, "memory.peak"), "2097152\n");
    writeFileSync(join(cg.path, "memory.events"), "low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\noom_group_kill 0\n");
    expect(cg.usage()).toEqual({ cpuSeconds: 2.5, memoryBytes: 1048576, memoryPeakBytes: 2097152, oomKills: 1 });
  });

  it("refuses to reuse a cgroup that still has processes, and to remove one", () => {
    const s = fakeRoot();
    mkdirSync(join(dir, "typevisor", "vm-busy"));
    writeFileSync(join(dir, "typevisor", "vm-busy", "cgroup.procs"), "101\n102\n");
    const e = thrown(() => VmCgroup.create(s, "vm-busy", {}));
    expect(e.code).toBe("CGROUP");
    expect(e.message).toMatch(/already exists with processes 101, 102/);
    const r = thrown(() => VmCgroup.open(s, "vm-busy")!.remove());
    expect(r.code).toBe("CGROUP");
    expect(r.message).toMatch(/processes 101, 102 are still in it/);
  });

  it("removing a cgroup that is gone is fine", () => {
    const s = fakeRoot();
    const cg = VmCgroup.create(s, "vm-gone", {});
    rmSync(cg.path, { recursive: true });
    expect(() => cg.remove()).not.toThrow();
    expect(thrown(() => cg.usage()).code).toBe("CGROUP");
  });

  it("turns file errors into CGROUP errors naming the file", () => {
    const s = fakeRoot();
    const cg = VmCgroup.create(s, "vm-x", {});
    mkdirSync(join(cg.path, "cgroup.procs")); // writing it now fails (EISDIR)
    const e = thrown(() => cg.addProcess(1));
    expect(e.code).toBe("CGROUP");
    expect(e.message).toContain(join(cg.path, "cgroup.procs"));
    expect(e.message).toContain("EISDIR");
  });

  it("validates names and limits, and needs cgroup v2", () => {
    const s = fakeRoot();
    for (const name of ["", "../x", "VM", "a/b", "a_b", "x".repeat(65)]) expect(thrown(() => VmCgroup.create(s, name, {})).code).toBe("INVALID_ARGUMENT");
    for (const l of [{ cpuWeight: 0 }, { cpuWeight: 10001 }, { cpuWeight: 1.5 }, { cpuMaxCpus: 0 }, { cpuMaxCpus: 0.001 }, { cpuMaxCpus: Number.NaN }, { memoryMaxBytes: 0 }, { memoryMaxBytes: 1.5 }]) {
      expect(thrown(() => VmCgroup.create(s, "vm", l)).code).toBe("INVALID_ARGUMENT");
    }
    const off: CgroupSupport = { available: false, controllers: [], reason: "no cgroup2 file system is mounted" };
    const e = thrown(() => VmCgroup.create(off, "vm", {}));
    expect(e.code).toBe("CGROUP");
    expect(e.message).toBe("cgroup v2 is not available: no cgroup2 file system is mounted");
    expect(VmCgroup.open(off, "vm")).toBeUndefined();
    expect(VmCgroup.list(off)).toEqual([]);
  });
});
