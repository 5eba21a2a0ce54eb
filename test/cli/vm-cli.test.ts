/**
 * The `typevisor vm|host|events` commands end to end: a real daemon (in a
 * temporary home) with real VMM processes booting the tiny test kernel on
 * this host's /dev/kvm (--force-kvm), driven by the real CLI from dist/ as a
 * user or a script would: output, --json and exit codes.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runCli, type Run } from "../helpers/cli.js";
import { TINY_KERNEL_BANNER, writeTinyKernel } from "../helpers/tiny-kernel.js";

const ROOT = new URL("../..", import.meta.url).pathname;
const BIN = join(ROOT, "bin/typevisor.js");
const hasKvm = existsSync("/dev/kvm");

/** Newest modification time under a directory, sources only. */
function newest(dir: string): number {
  let t = 0;
  for (const f of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, f.name);
    if (f.isDirectory()) t = Math.max(t, newest(p));
    else if (f.name.endsWith(".ts") && !f.name.endsWith(".test.ts")) t = Math.max(t, statSync(p).mtimeMs);
  }
  return t;
}

describe.skipIf(!hasKvm)("typevisor vm/host/events against a real daemon", () => {
  // Short: the daemon's sockets live under it, and sun_path is 108 bytes.
  const dir = mkdtempSync(join(tmpdir(), "tvc-"));
  const home = join(dir, "h");
  let daemon: ChildProcess | undefined;
  let daemonLog = "";

  /** Run the CLI; `input` becomes its stdin (a pipe, so not a terminal). */
  function tv(args: string[], opts: { input?: string; connection?: boolean } = {}): Promise<Run> {
    return runCli([...args, ...(opts.connection === false ? [] : ["--home", home])], { cwd: dir, stdoutEncoding: "latin1", ...(opts.input !== undefined ? { input: opts.input } : {}) });
  }

  async function until<T>(what: string, probe: () => Promise<T | undefined>, ms = 10_000): Promise<T> {
    const end = Date.now() + ms;
    for (;;) {
      const v = await probe();
      if (v !== undefined) return v;
      if (Date.now() > end) throw new Error(`timed out waiting for ${what}\ndaemon log:\n${daemonLog.slice(-3000)}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  beforeAll(async () => {
    // The daemon's VMMs load their vCPU workers from dist/: build it when a source is newer (npm test builds first anyway).
    const built = join(ROOT, "dist/cli/vm.js");
    if (!existsSync(built) || statSync(built).mtimeMs < newest(join(ROOT, "src"))) {
      const b = spawnSync("npm", ["run", "build"], { cwd: ROOT, encoding: "utf8" });
      if (b.status !== 0) throw new Error(`npm run build failed:\n${b.stdout}${b.stderr}`);
    }
    writeTinyKernel(join(dir, "tiny.bzImage"));
    daemon = spawn(process.execPath, [BIN, "daemon", "--home", home, "--force-kvm", "--allow-files", dir, "--usage-interval", "1", "--log-level", "warn"], { stdio: ["ignore", "pipe", "pipe"] });
    daemon.stdout!.on("data", (b: Buffer) => (daemonLog += b.toString()));
    daemon.stderr!.on("data", (b: Buffer) => (daemonLog += b.toString()));
    await until("the daemon's socket", async () => (existsSync(join(home, "typevisor.sock")) ? true : undefined));
  }, 60_000);

  afterAll(async () => {
    // No VMM may outlive the test: remove every VM (that stops it), then kill any VMM left by pid.
    const pids: number[] = [];
    const ls = await tv(["vm", "ls", "--json"]).catch(() => undefined);
    if (ls?.status === 0) {
      for (const vm of (JSON.parse(ls.stdout) as { vms: { name: string; pid?: number }[] }).vms) {
        if (vm.pid !== undefined) pids.push(vm.pid);
        await tv(["vm", "rm", "--force", vm.name]);
      }
    }
    if (daemon !== undefined && daemon.exitCode === null) {
      const exited = new Promise((r) => daemon!.once("exit", r));
      daemon.kill("SIGTERM");
      await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
      if (daemon.exitCode === null) daemon.kill("SIGKILL");
    }
    for (const pid of pids) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        /* already gone */
      }
    }
    rmSync(dir, { recursive: true, force: true });
  }, 30_000);

  it("creates and starts a VM (kernel path relative to the caller), listed as running", async () => {
    const r = await tv(["vm", "create", "vm1", "--kernel", "tiny.bzImage", "--memory", "64", "--disk-size", "8M", "--start"]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toBe("vm1: running\n");
    expect(r.stderr).toBe(""); // no progress line: stderr is not a terminal

    const ls = await tv(["vm", "ls", "--json"]);
    expect(ls.status).toBe(0);
    const vms = (JSON.parse(ls.stdout) as { vms: { name: string; state: string; spec: { kernel: string }; disks: { sizeBytes: number }[] }[] }).vms;
    expect(vms).toHaveLength(1);
    expect(vms[0]).toMatchObject({ name: "vm1", state: "running", spec: { kernel: join(dir, "tiny.bzImage") } });
    expect(vms[0]!.disks[0]!.sizeBytes).toBe(8 * 2 ** 20);

    const table = await tv(["vm", "ls"]);
    expect(table.stdout.split("\n")[0]).toMatch(/^NAME\s+STATE\s+CPUS\s+MEMORY\s+DISK\s+PID\s+UPTIME$/);
    expect(table.stdout).toMatch(/^vm1\s+running\s+1\s+64\.0 MiB\s+8\.0 MiB\s+\d+\s+\S+$/m);

    const show = await tv(["vm", "show", "vm1"]);
    expect(show.stdout).toMatch(/^state:\s+running$/m);
    expect(show.stdout).toMatch(/^console log:\s+\//m);
  });

  it("shows the console log and talks to the serial console through a pipe", async () => {
    await until("the banner in vm logs", async () => {
      const r = await tv(["vm", "logs", "vm1"]);
      return r.stdout.includes(TINY_KERNEL_BANNER) ? true : undefined;
    });
    const c = await tv(["vm", "console", "vm1"], { input: "hello" });
    expect(c.status, c.stderr).toBe(0);
    expect(c.stdout).toContain("hello"); // the guest echoes serial input
  });

  it("vm logs shows what the guest printed with its escape sequences made visible, unless --raw", async () => {
    // the tiny guest echoes what it is sent: it prints an ESC sequence of our choosing (no BEL:
    // 0x07 is its crash key), an OSC title change ended by ST and a colour
    const c = await tv(["vm", "console", "vm1"], { input: "\x1b]0;pwned\x1b\\\x1b[31mred" });
    expect(c.status, c.stderr).toBe(0);
    const safe = await until("the echo in vm logs", async () => {
      const r = await tv(["vm", "logs", "vm1"]);
      return r.stdout.includes("red") ? r.stdout : undefined;
    });
    expect(safe).toContain("\\x1b]0;pwned\\x1b\\\\x1b[31mred");
    expect(safe).not.toContain("\x1b");
    const raw = await tv(["vm", "logs", "vm1", "--raw"]);
    expect(raw.stdout).toContain("\x1b]0;pwned\x1b\\\x1b[31mred");
  });

  it("reports usage after a sample or two, and the host's resources", async () => {
    const mem = await until("a usage sample", async () => {
      const r = await tv(["vm", "stats", "vm1", "--json"]);
      const u = (JSON.parse(r.stdout) as { usage?: { memoryBytes: number } }).usage;
      return u !== undefined && u.memoryBytes > 0 ? u.memoryBytes : undefined;
    });
    expect(mem).toBeGreaterThan(0);
    const stats = await tv(["vm", "stats", "vm1"]);
    expect(stats.stdout).toMatch(/^memory:\s+[\d.]+ [KMG]iB$/m);

    const host = await tv(["host", "--json"]);
    expect(host.status).toBe(0);
    const h = JSON.parse(host.stdout) as Record<string, { capacity: number; allocated: number }>;
    for (const k of ["cpu", "memory", "disk"]) expect(h[k]!.capacity).toBeGreaterThan(0);
    expect(h["memory"]!.allocated).toBe(64 * 2 ** 20);
    const table = await tv(["host"]);
    expect(table.stdout).toMatch(/^RESOURCE\s+CAPACITY\s+BUDGET\s+ALLOCATED\s+USED\s+FREE$/m);
    expect(table.stdout).toMatch(/^vms:\s+1 \(1 running\)$/m);
  });

  it("pauses, resumes, reboots, stops and starts, printing the new state; conflicts exit 4", async () => {
    const follow = spawn(process.execPath, [BIN, "events", "-f", "--json", "--vm", "vm1", "--home", home], { stdio: ["ignore", "pipe", "pipe"] });
    let followed = "";
    follow.stdout.on("data", (b: Buffer) => (followed += b.toString()));
    const followExit = new Promise<number | null>((r) => follow.on("exit", (code) => r(code)));
    await new Promise((r) => setTimeout(r, 700)); // let it subscribe

    for (const [args, out] of [
      [["pause", "vm1"], "vm1: paused"],
      [["resume", "vm1"], "vm1: running"],
      [["reboot", "vm1"], "vm1: running"],
      [["stop", "vm1", "--timeout", "5"], "vm1: stopped"],
    ] as const) {
      const r = await tv(["vm", ...args]);
      expect(r.status, `${args.join(" ")}: ${r.stderr}`).toBe(0);
      expect(r.stdout).toBe(`${out}\n`);
    }
    const paused = await tv(["vm", "pause", "vm1"]);
    expect(paused.status).toBe(4);
    expect(paused.stderr).toMatch(/^typevisor: error\[VM_STATE\]: cannot pause VM vm1: it is stopped/);
    const exists = await tv(["vm", "create", "vm1", "--kernel", "tiny.bzImage", "--memory", "64"]);
    expect(exists.status).toBe(4);

    const started = await tv(["vm", "start", "vm1"]);
    expect(started.status, started.stderr).toBe(0);
    expect(started.stdout).toBe("vm1: running\n");
    const rm = await tv(["vm", "rm", "vm1"]);
    expect(rm.status).toBe(4); // running: needs --force

    await until("vm.stopped in the followed stream", async () => (followed.includes('"vm.stopped"') ? true : undefined), 5000);
    follow.kill("SIGINT");
    expect(await followExit).toBe(0);
    const types = followed.trim().split("\n").map((l) => (JSON.parse(l) as { type: string }).type);
    expect(types).toEqual(expect.arrayContaining(["vm.paused", "vm.resumed", "vm.rebooted", "vm.stopped"]));
  });

  it("lists events as NDJSON and as lines", async () => {
    const r = await tv(["events", "--json"]);
    expect(r.status).toBe(0);
    const events = r.stdout.trim().split("\n").map((l) => JSON.parse(l) as { type: string; vm?: string });
    expect(events.filter((e) => e.vm === "vm1").map((e) => e.type)).toEqual(expect.arrayContaining(["vm.created", "vm.running"]));
    const lines = await tv(["events", "--vm", "vm1"]);
    expect(lines.stdout.split("\n")[0]).toMatch(/^TIME\s+TYPE\s+VM\s+MESSAGE$/);
    expect(lines.stdout).toMatch(/ vm\.created\s+vm1\s+VM vm1 created$/m);
  });

  it("removes a running VM with --force; then it is not found (exit 3)", async () => {
    const rm = await tv(["vm", "rm", "--force", "vm1"]);
    expect(rm.status, rm.stderr).toBe(0);
    expect(rm.stdout).toBe("vm1: removed\n");
    for (const args of [["vm", "show", "vm1"], ["vm", "start", "vm1"], ["vm", "logs", "vm1"]]) {
      const r = await tv(args);
      expect(r.status, args.join(" ")).toBe(3);
      expect(r.stderr).toMatch(/^typevisor: error\[VM_NOT_FOUND\]: no VM named vm1/);
    }
  });

  it("rejects bad input with exit 2 and one line", async () => {
    for (const [args, message] of [
      [["vm", "create", "../x", "--kernel", "tiny.bzImage"], /error\[INVALID_REQUEST\]: .*name/],
      [["vm", "create", "x", "--kernel", "tiny.bzImage", "--memory", "abc"], /error\[INVALID_ARGUMENT\]: --memory must be a whole number of MiB \(got "abc"\)/],
      [["vm", "create", "x", "--kernel", "tiny.bzImage", "--cpus", "0"], /error\[INVALID_REQUEST\]: .*cpus/],
      [["vm", "create", "x", "--kernel", "tiny.bzImage", "--disk-size", "lots"], /error\[INVALID_REQUEST\]: .*diskSize/],
      [["vm", "stop", "x", "--timeout", "soon"], /error\[INVALID_ARGUMENT\]: --timeout/],
      [["vm", "console", "x", "--detach-key", "q"], /error\[INVALID_ARGUMENT\]: --detach-key/],
    ] as const) {
      const r = await tv([...args]);
      expect(r.status, `${args.join(" ")}: ${r.stderr}`).toBe(2);
      expect(r.stderr.split("\n")[0]).toMatch(message);
      expect(r.stderr).not.toMatch(/\n\s+at /);
    }
    const ls = await tv(["vm", "ls", "--json"]);
    expect(JSON.parse(ls.stdout)).toEqual({ vms: [] }); // nothing half-created
  });

  it("pool create|ls|show|rm and vm disk add|rm: output and exit codes", async () => {
    const pdir = join(dir, "pool");
    mkdirSync(pdir);
    const c = await tv(["pool", "create", "cli-p", "--path", pdir, "--quota", "16M"]);
    expect(c.status, c.stderr).toBe(0);
    expect(c.stdout).toBe(`pool cli-p created at ${pdir}\n`);
    expect((await tv(["pool", "create", "bad", "--path", "relative/dir"])).status).toBe(2);
    const ls = await tv(["pool", "ls"]);
    expect(ls.stdout.split("\n")[0]).toMatch(/^NAME\s+PATH\s+CAPACITY\s+QUOTA\s+ALLOCATED\s+USED\s+AVAILABLE\s+OVERCOMMIT\s+DISKS$/);
    expect(ls.stdout).toMatch(/^cli-p\s+\S+\s+.*16\.0 MiB\s+0 B\s+.*16\.0 MiB\s+0x\s+0$/m);
    expect(ls.stdout).toMatch(/^default\s/m);
    expect((await tv(["vm", "create", "vm-p", "--kernel", "tiny.bzImage", "--memory", "64", "--disk-size", "4M", "--pool", "cli-p"])).status).toBe(0);
    const big = await tv(["vm", "disk", "add", "vm-p", "--size", "20M", "--pool", "cli-p"]);
    expect(big.status).toBe(4);
    expect(big.stderr).toMatch(/error\[INSUFFICIENT_RESOURCES\]: not enough space in pool cli-p: asked 20\.0 MiB, 12\.0 MiB free of its 16\.0 MiB quota/);
    const add = await tv(["vm", "disk", "add", "vm-p", "--size", "4M", "--pool", "cli-p", "--format", "raw"]);
    expect(add.status, add.stderr).toBe(0);
    expect(add.stdout).toMatch(/^vm-p: disk1 added\n {2}disk1 {2}\S+-disk1\.raw {2}raw {2}4\.0 MiB virtual, .* allocated {2}pool cli-p\n$/);
    expect((await tv(["vm", "disk", "add", "vm-p", "--size", "1M", "--format", "vmdk"])).status).toBe(2);
    expect((await tv(["vm", "show", "vm-p"])).stdout).toMatch(/^ {2}disk0 .*-disk0\.qcow2 {2}qcow2 {2}4\.0 MiB virtual, .* pool cli-p$/m);
    const show = await tv(["pool", "show", "cli-p"]);
    expect(show.stdout).toMatch(/^allocated:\s+8\.0 MiB \(virtual size of its disks\)$/m);
    expect(show.stdout).toMatch(/^vms:\s+vm-p$/m);
    const busy = await tv(["pool", "rm", "cli-p"]);
    expect(busy.status).toBe(4);
    expect(busy.stderr).toMatch(/error\[POOL_IN_USE\]: pool cli-p has disks of VM vm-p/);
    expect((await tv(["vm", "disk", "rm", "vm-p", "disk7"])).status).toBe(3);
    const rm = await tv(["vm", "disk", "rm", "vm-p", "disk1"]);
    expect(rm.stdout).toBe("vm-p: disk1 removed\n");
    expect((await tv(["vm", "rm", "vm-p"])).status).toBe(0);
    expect((await tv(["pool", "rm", "cli-p"])).stdout).toBe("pool cli-p removed\n");
    expect((await tv(["pool", "show", "cli-p"])).status).toBe(3);
  });

  it("exits 5 when no daemon answers", async () => {
    const r = await tv(["vm", "ls", "--socket", join(dir, "nobody.sock")], { connection: false });
    expect(r.status).toBe(5);
    expect(r.stderr).toMatch(/^typevisor: error\[DAEMON_UNREACHABLE\]: no typevisor daemon answers at .*nobody\.sock/);
  });
});
