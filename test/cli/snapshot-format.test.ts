/**
 * What `vm snapshot ls` prints (the tree) and how a restore is launched (`run --restore` flags),
 * without a daemon.
 */
import { describe, expect, it } from "vitest";
import { formatSnapshotTree } from "../../src/cli/snapshot.js";
import type { SnapshotInfo } from "../../src/control/snapshots.js";
import { vmmArgs, type VmmLaunch } from "../../src/engine/native.js";

const snap = (name: string, parent: string | undefined, extra: Partial<SnapshotInfo> = {}): SnapshotInfo => ({
  id: name, name, vm: "web", ...(parent !== undefined ? { parent } : {}), createdAt: "2026-12-05T10:00:00.000Z",
  memory: false, vmState: "stopped", sizeBytes: 1024, current: false, disks: [], ...extra,
});

describe("formatSnapshotTree", () => {
  it("draws children under their parent, siblings oldest first, and marks the current one", () => {
    const out = formatSnapshotTree([
      snap("base", undefined),
      snap("a", "base", { memory: true, vmState: "running" }),
      snap("a1", "a"),
      snap("b", "base", { current: true }),
      snap("other-root", undefined),
    ]);
    const lines = out.split("\n");
    const width = lines[0]!.indexOf("CREATED");
    const names = lines.slice(1, -1).map((l) => l.slice(0, width).trimEnd());
    expect(names).toEqual(["base", "├─ a", "│  └─ a1", "└─ b *", "other-root"]);
    expect(out).toMatch(/├─ a\s.*yes \(running\)/);
  });

  it("keeps a snapshot whose parent is not in the list, and escapes a description's control characters", () => {
    const out = formatSnapshotTree([snap("x", "gone", { description: "evil\x1b[2Jline" })]);
    expect(out).toMatch(/^x\s/m);
    expect(out).not.toContain("\x1b");
  });
});

describe("vmmArgs for a restore", () => {
  const launch: VmmLaunch = {
    id: "vm1", kernel: "/k", cmdline: "c", cpus: 2, memoryMiB: 512,
    disks: [{ path: "/d/disk0.qcow2", format: "qcow2", serial: "web-0" }], nets: [{ tap: "tap1", mac: "52:54:00:00:00:01" }], rng: true, balloon: false,
    apiSocket: "/a", consoleLog: "/l", consoleLogSize: 1024, consoleSocket: "/s", exitFile: "/e", vmmLog: "/v", forceKvm: true,
  };
  it("gives the snapshot and this VM's sockets and back ends, not a machine (the snapshot has it)", () => {
    const args = vmmArgs({ ...launch, restore: { dir: "/snap", paused: true } });
    expect(args.slice(0, 6)).toEqual(["run", "--no-lab", "--id", "vm1", "--restore", "/snap"]);
    for (const f of ["--cmdline", "--cpus", "--memory", "--rng"]) expect(args).not.toContain(f);
    // The kernel given is what a guest reboot boots: this VM's own copy, not the snapshot's source's.
    expect(args.slice(args.indexOf("--kernel"), args.indexOf("--kernel") + 2)).toEqual(["--kernel", "/k"]);
    expect(args).toEqual(expect.arrayContaining(["--disk", "/d/disk0.qcow2,format=qcow2,serial=web-0", "--net", "tap=tap1,mac=52:54:00:00:00:01", "--paused", "--force-kvm", "--api-socket", "/a"]));
    expect(vmmArgs({ ...launch, restore: { dir: "/snap", paused: false } })).not.toContain("--paused");
  });
});
