// Lab test: the kernel side of per-VM cgroups. Runs as root inside the lab, whose init mounts
// cgroup2 on /sys/fs/cgroup with every controller (no v1 hierarchy there): cpu.max throttles,
// memory.max OOM-kills inside the cgroup only, and remove() waits for the cgroup to be empty.
import { spawn, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { TypevisorError } from "../errors.js";
import { detectCgroupV2, parseFlatKeyed, VmCgroup } from "./cgroups.js";
import { processAlive } from "./proc.js";

const MiB = 1 << 20;
const NAME = `lab-${process.pid}`;
const children: ChildProcess[] = [];
let cg: VmCgroup | undefined;

afterAll(() => {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
  try {
    cg?.remove();
  } catch {
    /* the test that failed says why */
  }
});

async function waitFor(cond: () => boolean, what: string, ms = 15_000): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > ms) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function started(c: ChildProcess): number {
  children.push(c);
  if (c.pid === undefined) throw new Error("child did not start");
  return c.pid;
}

function exited(c: ChildProcess): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  if (c.exitCode !== null || c.signalCode !== null) return Promise.resolve({ code: c.exitCode, signal: c.signalCode });
  return once(c, "exit").then(([code, signal]) => ({ code: code as number | null, signal: signal as NodeJS.Signals | null }));
}

/** A node child that allocates (and touches) N MiB per line of input, then says so. */
const ALLOCATOR = `
const kept = [];
let buf = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (d) => {
  buf += d;
  for (let i; (i = buf.indexOf("\\n")) >= 0; ) {
    const mib = Number(buf.slice(0, i));
    buf = buf.slice(i + 1);
    for (let k = 0; k < mib; k++) kept.push(Buffer.alloc(1 << 20, 1));
    process.stdout.write("allocated " + mib + "\\n");
  }
});
process.stdout.write("ready\\n");
`;

describe("per-VM cgroup (cgroup v2 in the lab)", () => {
  it("finds cgroup v2 with cpu and memory", () => {
    const s = detectCgroupV2();
    expect(s.reason).toBeUndefined();
    expect(s).toMatchObject({ available: true, mount: "/sys/fs/cgroup" });
    expect(s.controllers).toEqual(expect.arrayContaining(["cpu", "memory"]));
  });

  it("creates the cgroup with its limits", () => {
    const s = detectCgroupV2();
    cg = VmCgroup.create(s, NAME, { memoryMaxBytes: 64 * MiB, cpuMaxCpus: 0.5 });
    expect(cg.path).toBe(`/sys/fs/cgroup/typevisor/${NAME}`);
    expect(readFileSync("/sys/fs/cgroup/cgroup.subtree_control", "utf8").split(/\s+/)).toEqual(expect.arrayContaining(["cpu", "memory"]));
    expect(readFileSync("/sys/fs/cgroup/typevisor/cgroup.subtree_control", "utf8").split(/\s+/)).toEqual(expect.arrayContaining(["cpu", "memory"]));
    expect(readFileSync(join(cg.path, "memory.max"), "utf8").trim()).toBe(String(64 * MiB));
    expect(readFileSync(join(cg.path, "cpu.max"), "utf8").trim()).toBe("50000 100000");
    expect(VmCgroup.open(s, NAME)?.path).toBe(cg.path);
    expect(VmCgroup.list(s)).toContain(NAME);
  });

  it("takes a process, and will not be removed while it lives", async () => {
    // sleep itself, not `sh -c`: a shell may fork it before the move and leave an orphan behind.
    const c = spawn("sleep", ["30"], { stdio: "ignore" });
    const pid = started(c);
    cg!.addProcess(pid);
    expect(cg!.processes()).toEqual([pid]);
    expect(cg!.populated()).toBe(true);
    let err: unknown;
    try {
      cg!.remove();
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(TypevisorError);
    expect((err as TypevisorError).code).toBe("CGROUP");
    expect((err as TypevisorError).message).toContain(String(pid));
    c.kill("SIGKILL");
    await exited(c);
    await waitFor(() => !cg!.populated(), "the cgroup to empty");
    expect(cg!.processes()).toEqual([]);
  });

  it("throttles a busy loop to half a CPU (cpu.max)", async () => {
    const c = spawn("sh", ["-c", "while :; do :; done"], { stdio: "ignore" });
    const pid = started(c);
    cg!.addProcess(pid);
    const t0 = performance.now();
    const before = cg!.usage().cpuSeconds;
    await new Promise((r) => setTimeout(r, 2000));
    const used = cg!.usage().cpuSeconds - before;
    const wall = (performance.now() - t0) / 1000;
    const stat = parseFlatKeyed(readFileSync(join(cg!.path, "cpu.stat"), "utf8"));
    c.kill("SIGKILL");
    await exited(c);
    expect(used).toBeGreaterThan(0);
    // quota 50 ms per 100 ms period: at most half the wall time, plus one period of slack
    expect(used).toBeLessThanOrEqual(wall * 0.5 + 0.1);
    expect(stat.get("nr_throttled")).toBeGreaterThan(0);
    await waitFor(() => !cg!.populated(), "the cgroup to empty");
  });

  it("charges a child's memory, and OOM-kills it past memory.max while this process survives", async () => {
    const c = spawn(process.execPath, ["-e", ALLOCATOR], { stdio: ["pipe", "pipe", "inherit"] });
    const pid = started(c);
    let out = "";
    c.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
    c.stdin!.on("error", () => undefined); // EPIPE once the OOM killer has struck
    await waitFor(() => out.includes("ready\n"), "the allocator to start", 60_000);
    cg!.addProcess(pid);
    expect(cg!.processes()).toEqual([pid]);
    const oomBefore = cg!.usage().oomKills ?? 0;

    // pages a process touches after the move are charged to its new cgroup (some of the 32 MiB
    // may reuse heap pages malloc already had, charged where the child started: hence only 16)
    c.stdin!.write("32\n");
    await waitFor(() => out.includes("allocated 32\n"), "32 MiB to be allocated");
    const small = cg!.usage();
    expect(small.memoryBytes).toBeGreaterThanOrEqual(16 * MiB);
    expect(small.memoryBytes).toBeLessThanOrEqual(64 * MiB);

    c.stdin!.write("200\n");
    const end = await Promise.race([exited(c), new Promise<"timeout">((r) => setTimeout(() => r("timeout"), 60_000))]);
    expect(end).toEqual({ code: null, signal: "SIGKILL" });
    expect(out).not.toContain("allocated 200");
    const after = cg!.usage();
    expect(after.oomKills ?? 0).toBeGreaterThanOrEqual(oomBefore + 1);
    if (after.memoryPeakBytes !== undefined) expect(after.memoryPeakBytes).toBeLessThanOrEqual(65 * MiB);
    // the OOM killer chose inside the cgroup: this process, outside it, is untouched
    expect(processAlive(process.pid)).toBe(true);
    expect(readFileSync("/proc/self/cgroup", "utf8")).not.toContain(NAME);
  });

  it("is removed once empty", async () => {
    await waitFor(() => !cg!.populated(), "the cgroup to empty");
    cg!.remove();
    const s = detectCgroupV2();
    expect(VmCgroup.open(s, NAME)).toBeUndefined();
    expect(VmCgroup.list(s)).not.toContain(NAME);
    cg!.remove(); // already gone: no error
    cg = undefined;
  });

  it("removeLeftovers removes empty VM cgroups not kept, and leaves kept and busy ones", async () => {
    const s = detectCgroupV2();
    const limits = { cpuWeight: 100 };
    const gone = VmCgroup.create(s, `vm-gone${process.pid}`, limits);
    const kept = VmCgroup.create(s, `vm-kept${process.pid}`, limits);
    const busy = VmCgroup.create(s, `vm-busy${process.pid}`, limits);
    const child = spawn("sleep", ["30"], { stdio: "ignore" });
    children.push(child);
    busy.addProcess(child.pid!);
    const removed = VmCgroup.removeLeftovers(s, new Set([kept.name]));
    expect(removed).toContain(gone.path);
    expect(removed).not.toContain(kept.path);
    expect(removed).not.toContain(busy.path);
    expect(VmCgroup.list(s)).toEqual(expect.arrayContaining([kept.name, busy.name]));
    expect(VmCgroup.list(s)).not.toContain(gone.name);
    child.kill("SIGKILL");
    await waitFor(() => !busy.populated(), "the busy cgroup to empty");
    busy.remove();
    kept.remove();
  });
});
