/**
 * The VMM sandbox (docs/security.md, "The VMM sandbox"), proven on real VMM processes of a real
 * daemon run as root, with tiny guests on this host's /dev/kvm: each VMM runs as its own
 * unprivileged uid, with no capabilities, no_new_privs and a seccomp filter, in its own
 * namespaces; from inside (the VMM's --sandbox-probe hook, run by the VMM process itself) the host's
 * files, the inventory and the other VM's disk cannot be opened and denied system calls fail with
 * EPERM; its console, control socket and exit record still work through what the daemon handed it.
 */
import { parseStatsPage } from "../../src/vmm/stats/layout.js";
import { existsSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { getPriority, tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startDaemon, until, type TestDaemon } from "../helpers/daemon.js";
import { CAN_GRANT_NICE } from "../helpers/privileges.js";
import { runCli } from "../helpers/cli.js";
import { writeTinyKernel } from "../helpers/tiny-kernel.js";
import { JAIL_BIN, DEFAULT_UID_RANGE } from "../../src/control/sandbox/sandbox.js";
import { vmPaths } from "../../src/control/paths.js";
import { VMM_NODE_FLAGS } from "../../src/vmm/isolates.js";

const root = process.getuid?.() === 0;
const ready = existsSync("/dev/kvm") && root && existsSync(JAIL_BIN);

function status(pid: number | string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of readFileSync(`/proc/${pid}/status`, "utf8").split("\n")) {
    const m = /^([A-Za-z_]+):\s*(.*)$/.exec(line);
    if (m !== null) out[m[1]!] = m[2]!.trim();
  }
  return out;
}

function probeOf(vmmLog: string): { open: Record<string, string>; syscalls: Record<string, string>; status: Record<string, string> } {
  const line = readFileSync(vmmLog, "utf8").split("\n").find((l) => l.startsWith("typevisor: sandbox probe "));
  if (line === undefined) throw new Error(`no probe line in ${vmmLog}: ${readFileSync(vmmLog, "utf8")}`);
  return JSON.parse(line.slice("typevisor: sandbox probe ".length)) as ReturnType<typeof probeOf>;
}

describe.skipIf(!ready)("the VMM sandbox (root, tiny guests, real VMMs)", () => {
  let d: TestDaemon;
  let dir: string;
  let kernel: string;
  let secret: string;

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "tvsb-"));
    kernel = join(dir, "tiny.bin");
    writeTinyKernel(kernel);
    secret = join(dir, "secret.txt");
    writeFileSync(secret, "the host's secret\n", { mode: 0o644 });
    const home = mkdtempSync(join(tmpdir(), "tvd-"));
    // The probe: host files, the inventory, and (below) the other VM's disk; the VMM opens each itself.
    d = await startDaemon({ home, args: ["--force-kvm", "--allow-files", dir, "--sandbox-probe", ["/etc/shadow", "/etc/passwd", secret, join(home, "typevisor.db"), "/dev/kvm", "/proc/1/environ"].join(",")] });
  }, 60_000);

  afterAll(async () => {
    if (d === undefined) return;
    for (const vm of await d.client.listVms().catch(() => [])) if (vm.state === "running") await d.client.stopVm(vm.name, { force: true }).catch(() => undefined);
    await d.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it("runs each VMM as its own uid with no capabilities, no_new_privs, seccomp, limits and namespaces of its own", async () => {
    const a = await d.client.createVm({ name: "a", kernel, memoryMiB: 64, diskSize: "1M" }, { start: true });
    // b has a NIC: the daemon creates its TAP and hands it over (the VMM has neither the privilege nor the network namespace)
    const b = await d.client.createVm({ name: "b", kernel, memoryMiB: 64, diskSize: "1M", nets: [{ tap: "tvsbtest0" }] }, { start: true });
    expect(a.state).toBe("running");
    expect(b.state).toBe("running");
    const sa = status(a.pid!);
    const sb = status(b.pid!);
    const uidA = Number(sa["Uid"]!.split(/\s+/)[0]);
    // real, effective, saved and filesystem uid: all the VM's; the same for the gid; no groups
    expect(sa["Uid"]!.split(/\s+/)).toEqual([String(uidA), String(uidA), String(uidA), String(uidA)]);
    expect(sa["Gid"]!.split(/\s+/)).toEqual([String(uidA), String(uidA), String(uidA), String(uidA)]);
    expect(sa["Groups"]).toBe("");
    expect(uidA).toBeGreaterThanOrEqual(DEFAULT_UID_RANGE.base);
    expect(uidA).toBeLessThan(DEFAULT_UID_RANGE.base + DEFAULT_UID_RANGE.count);
    expect(Number(sb["Uid"]!.split(/\s+/)[0])).not.toBe(uidA);
    // vm show and the API's VM object say which uid each VMM runs as
    expect(a.sandbox).toEqual({ uid: uidA });
    expect((await d.client.getVm("b")).sandbox?.uid).toBe(Number(sb["Uid"]!.split(/\s+/)[0]));
    const shown = await runCli(["vm", "show", "a", "--socket", d.socket]).then((r) => r.stdout);
    expect(shown).toMatch(new RegExp(`^sandbox:?\\s+uid ${uidA} \\(gid ${uidA}\\)`, "m"));
    // Node started with the VMM's isolate limits, as every VMM the daemon starts (vmm/isolates.ts)
    for (const pid of [a.pid!, b.pid!]) expect(readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0")).toEqual(expect.arrayContaining([...VMM_NODE_FLAGS]));
    for (const s of [sa, sb]) {
      for (const k of ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"]) expect(s[k], k).toBe("0000000000000000");
      expect(s["NoNewPrivs"]).toBe("1");
      expect(s["Seccomp"]).toBe("2"); // SECCOMP_MODE_FILTER
      // the allowlist, the quiet clone3 filter and the no-exec filter; a vCPU thread adds its own (below)
      expect(s["Seccomp_filters"]).toBe("3");
      // PID 1 of its own PID namespace (NSpid: the host's pid, then the namespace's)
      expect(s["NSpid"]!.split(/\s+/).at(-1)).toBe("1");
    }
    await until("a's vCPU thread", () => (readdirSync(`/proc/${a.pid!}/task`).some((t) => readFileSync(`/proc/${a.pid!}/task/${t}/comm`, "utf8").startsWith("tv-vcpu")) ? true : undefined));
    for (const t of readdirSync(`/proc/${a.pid!}/task`)) {
      const ts = status(`${a.pid!}/task/${t}`);
      if (ts["Name"]!.startsWith("kvm-")) continue; // KVM's kernel worker, a copy of the vCPU thread that made it
      expect(ts["Seccomp_filters"], ts["Name"]).toBe(ts["Name"]!.startsWith("tv-vcpu") ? "4" : "3");
    }
    for (const ns of ["mnt", "pid", "net", "ipc", "uts"]) {
      expect(readlinkSync(`/proc/${a.pid!}/ns/${ns}`), ns).not.toBe(readlinkSync(`/proc/self/ns/${ns}`));
      expect(readlinkSync(`/proc/${a.pid!}/ns/${ns}`), ns).not.toBe(readlinkSync(`/proc/${b.pid!}/ns/${ns}`));
    }
    const limits = readFileSync(`/proc/${a.pid!}/limits`, "utf8");
    expect(limits).toMatch(/^Max open files\s+4096\s+4096/m);
    expect(limits).toMatch(/^Max core file size\s+0\s+0/m);
    // RLIMIT_NICE at this process's nice value: the VMM may take back what it gives up (its vCPUs'
    // nice offset), and no more. Granting it needs CAP_SYS_RESOURCE, which a container's root may
    // lack: then the VMM runs with the limit it inherited.
    const nice = CAN_GRANT_NICE ? 20 - getPriority() : Number(/^Max nice priority\s+(\d+)/m.exec(readFileSync("/proc/self/limits", "utf8"))![1]);
    expect(limits).toMatch(new RegExp(`^Max nice priority\\s+${nice}\\s+${nice}\\s`, "m"));
    // The uid is recorded in the inventory, and the VM's disk is its uid's.
    expect(statSync(a.disks[0]!.path).uid).toBe(uidA);
    // its root holds only what it was given (a fresh /dev, /proc, /tmp, the system's /usr, ...)
    // /etc holds the dynamic linker's cache and nothing else
    expect(readdirSync(`/proc/${a.pid!}/root/etc`)).toEqual(["ld.so.cache"]);
    expect(readdirSync(`/proc/${a.pid!}/root/dev`).sort()).toEqual(["full", "kvm", "null", "random", "urandom", "zero"]);
  }, 120_000);

  it("from inside, the VMM cannot open host files, the inventory or another VM's disk, and denied system calls fail", async () => {
    const a = await d.client.getVm("a");
    const b = await d.client.getVm("b");
    const pa = vmPaths(d.home, a.id);
    await until("a's probe report", () => (readFileSync(pa.vmmLog, "utf8").includes("sandbox probe") ? true : undefined));
    const probe = probeOf(pa.vmmLog);
    for (const f of ["/etc/shadow", "/etc/passwd", secret, join(d.home, "typevisor.db")]) expect(probe.open[f], f).toBe("ENOENT");
    // what it was given is there: /dev/kvm (its own node), and /proc is its own PID namespace's
    expect(probe.open["/dev/kvm"]).toBe("opened");
    expect(probe.open["/proc/1/environ"]).toBe("opened"); // PID 1 is the VMM itself
    for (const call of ["mount", "unshare", "keyctl", "bpf", "setns", "open_by_handle_at", "execve", "execveat"]) expect(probe.syscalls[call], call).toBe("EPERM");
    expect(probe.status["CapEff"]).toBe("0000000000000000");
    expect(probe.status["Seccomp"]).toBe("2");
    // The other VM's disk: not in a's view at all (b's own path, checked from a's root)
    const bDisk = b.disks[0]!.path;
    expect(existsSync(bDisk)).toBe(true);
    expect(existsSync(`/proc/${a.pid!}/root${bDisk}`)).toBe(false);
    expect(existsSync(`/proc/${a.pid!}/root${a.disks[0]!.path}`)).toBe(true);
  }, 60_000);

  it("the console, the control socket and the exit record work through what the daemon handed over", async () => {
    await until("a's banner on its console", async () => ((await d.client.console("a")).toString().includes("tiny-guest: up") ? true : undefined));
    const stopped = await d.client.stopVm("a");
    expect(stopped.state).toBe("stopped");
    // the exit record, written by the VMM in the directory it owns, read by the daemon
    expect(stopped.lastExit?.result).toBe("stopped");
    // started again: the same uid (recorded), a fresh sandbox
    const again = await d.client.startVm("a");
    expect(again.state).toBe("running");
    // the stats page, made by the daemon, the VM's uid's to write, in the daemon's directory: the jailed VMM counts into it
    const stats = vmPaths(d.home, again.id).statsFile;
    expect(statSync(stats).uid).toBe(again.sandbox?.uid);
    const page = await until("the jailed VMM's stats page", async () => parseStatsPage(readFileSync(stats)));
    expect(page).toMatchObject({ disks: [{ readBytes: expect.any(Number) }], nics: [] });
  }, 60_000);

  it("a symlink the VMM puts where its console log was is not followed by the daemon", async () => {
    const a = await d.client.getVm("a");
    const pa = vmPaths(d.home, a.id);
    await until("a's banner", async () => ((await d.client.console("a")).toString().includes("tiny-guest: up") ? true : undefined));
    // what a VMM taken over could do in the directory it owns
    rmSync(pa.consoleLog);
    symlinkSync(secret, pa.consoleLog);
    const shown = (await d.client.console("a")).toString();
    expect(shown).not.toContain("the host's secret");
  }, 60_000);
});
