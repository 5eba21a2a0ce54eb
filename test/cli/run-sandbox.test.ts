/**
 * `typevisor run --sandbox` (docs/security.md, "The VMM sandbox"): a VMM started by hand in the
 * daemon's sandbox, with every device kind on this host's /dev/kvm and the tiny guest: its own uid,
 * no capabilities, no_new_privs, the seccomp allowlist (and each vCPU thread's own filter on top:
 * Seccomp_filters in /proc), host files out of its view, forbidden calls refused from inside (the
 * --sandbox-probe hook), and it still serves its console, takes a snapshot and migrates over unix
 * to a second sandboxed VMM. Refused, with a clear message, when not root.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { createServer } from "node:net";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { BIN } from "../helpers/daemon.js";
import { TINY_KERNEL_BANNER, writeTinyKernel } from "../helpers/tiny-kernel.js";
import { unixApi } from "../helpers/unix-api.js";
import { consoleClient, type ConsoleClient } from "../helpers/console-client.js";
import { runCli } from "../helpers/cli.js";
import { JAIL_BIN, DEFAULT_UID_RANGE } from "../../src/control/sandbox/sandbox.js";
import { createQcow2 } from "../../src/vmm/disk/qcow2/create.js";
import { DEFAULT_VCPU_NICE } from "../../src/vmm/defaults.js";
import { CAN_GRANT_NICE } from "../helpers/privileges.js";

const root = process.getuid?.() === 0;
const ready = existsSync("/dev/kvm") && root && existsSync(JAIL_BIN);

async function until(what: string, cond: () => boolean | Promise<boolean>, ms = 60_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function status(path: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of readFileSync(path, "utf8").split("\n")) {
    const m = /^([A-Za-z_]+):\s*(.*)$/.exec(line);
    if (m !== null) out[m[1]!] = m[2]!.trim();
  }
  return out;
}

interface Run { child: ChildProcess; exited: Promise<number | null>; stderr: () => string; pid: () => number | undefined }

function run(args: string[], opts: { uid?: number } = {}): Run {
  const child = spawn(process.execPath, [BIN, "run", ...args], { stdio: ["ignore", "pipe", "pipe"], ...(opts.uid !== undefined ? { uid: opts.uid, gid: opts.uid } : {}) });
  let err = "";
  child.stderr!.on("data", (b: Buffer) => (err += b.toString()));
  child.stdout!.resume();
  const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
  return { child, exited, stderr: () => err, pid: () => { const m = /sandboxed VMM pid (\d+)/.exec(err); return m === null ? undefined : Number(m[1]); } };
}

describe("typevisor run --sandbox: refusals", () => {
  it("needs root, and --sandbox-uid/--sandbox-bind need --sandbox", async () => {
    const d = mkdtempSync(join(tmpdir(), "tvrsb-"));
    try {
      const k = join(d, "tiny.bin");
      writeTinyKernel(k);
      if (root) {
        // as an unprivileged user (nobody): a clear refusal, no VMM
        const r = run(["--sandbox", "--kernel", k, "--force-kvm", "--no-lab"], { uid: 65534 });
        expect(await r.exited).not.toBe(0);
        expect(r.stderr()).toMatch(/run --sandbox needs root/);
        // a directory others share is not given to the VMM whole; what was handed over by then is given back
        const disk = join(d, "disk.img");
        writeFileSync(disk, Buffer.alloc(65536), { mode: 0o600 });
        const r3 = await runCli(["run", "--sandbox", "--kernel", k, "--disk", disk, "--console-log", join("/tmp", `tvrsb-${process.pid}.log`), "--force-kvm", "--no-lab"]);
        expect(r3.status).not.toBe(0);
        expect(r3.stderr).toMatch(/the whole of \/tmp, a directory others share/);
        expect(statSync(disk).uid).toBe(0);
      }
      const r2 = await runCli(["run", "--sandbox-uid", "1900000000", "--kernel", k, "--force-kvm", "--no-lab"]);
      expect(r2.status).not.toBe(0);
      expect(r2.stderr).toMatch(/--sandbox-uid and --sandbox-bind need --sandbox/);
    } finally {
      rmSync(d, { recursive: true, force: true });
    }
  }, 60_000);
});

describe.skipIf(!ready)("typevisor run --sandbox (root, tiny guest, every device kind)", () => {
  const dir = mkdtempSync(join(tmpdir(), "tvrsb-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("jails the VMM (uid, caps, no_new_privs, seccomp with per-vCPU filters, no host files), which boots, snapshots and migrates over unix to another jailed VMM", async () => {
    const a = join(dir, "a");
    const b = join(dir, "b");
    const snaps = join(dir, "snaps");
    for (const d of [a, b, snaps]) mkdirSync(d, { mode: 0o700 });
    const kernel = join(a, "tiny.bin");
    writeTinyKernel(kernel);
    const raw = join(a, "raw.img");
    writeFileSync(raw, Buffer.alloc(1 << 20));
    const qcow = join(a, "disk.qcow2");
    createQcow2(qcow, { size: 4 << 20 });
    const secret = join(dir, "secret.txt");
    writeFileSync(secret, "host secret\n", { mode: 0o644 });
    const mig = join(b, "mig.sock");
    const src = run([
      "--sandbox", "--sandbox-bind", snaps, "--sandbox-bind", b,
      "--kernel", kernel, "--memory", "64", "--cpus", "2", "--force-kvm", "--no-lab",
      "--disk", raw, "--disk", `${qcow},format=qcow2`, "--net", "tap=tvrsb0", "--vsock", `cid=7,uds=${join(a, "v.sock")}`,
      "--rng", "--balloon",
      "--api-socket", join(a, "api.sock"), "--console-socket", join(a, "c.sock"), "--console-log", join(a, "console.log"), "--exit-file", join(a, "exit.json"),
      "--sandbox-probe", ["/etc/shadow", secret, "/dev/kvm"].join(","),
    ]);
    let dst: Run | undefined;
    let con: ConsoleClient | undefined;
    try {
      await until("the VMM's pid", () => src.pid() !== undefined || src.child.exitCode !== null);
      const pid = src.pid();
      expect(pid, src.stderr()).toBeDefined();
      await until("the console socket", () => existsSync(join(a, "c.sock")));
      con = await consoleClient(join(a, "c.sock"));
      await until("the banner", () => con!.text().includes(TINY_KERNEL_BANNER));

      // /proc of the VMM as the host sees it
      const st = status(`/proc/${pid!}/status`);
      const uid = Number(st["Uid"]!.split(/\s+/)[0]);
      expect(uid).toBeGreaterThanOrEqual(DEFAULT_UID_RANGE.base);
      expect(st["Uid"]!.split(/\s+/)).toEqual(Array(4).fill(String(uid)));
      for (const k of ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"]) expect(st[k], k).toBe("0000000000000000");
      expect(st["NoNewPrivs"]).toBe("1");
      expect(st["Seccomp"]).toBe("2");
      // the allowlist, the quiet clone3 filter, the no-exec filter; each vCPU thread adds its own
      expect(st["Seccomp_filters"]).toBe("3");
      await until("the vCPU threads named", () => readdirSync(`/proc/${pid!}/task`).filter((t) => readFileSync(`/proc/${pid!}/task/${t}/comm`, "utf8").startsWith("tv-vcpu")).length === 2);
      for (const t of readdirSync(`/proc/${pid!}/task`)) {
        const ts = status(`/proc/${pid!}/task/${t}/status`);
        // KVM's own kernel worker (kvm-nx-lpage-recovery) is a copy of the vCPU thread that made it; it runs no user code
        if (ts["Name"]!.startsWith("kvm-")) continue;
        expect(ts["Seccomp_filters"], `${t} ${ts["Name"]}`).toBe(ts["Name"]!.startsWith("tv-vcpu") ? "4" : "3");
      }
      // the disks are the sandbox uid's while it runs; its root holds no host /etc
      expect(statSync(raw).uid).toBe(uid);
      expect(readdirSync(`/proc/${pid!}/root/etc`)).toEqual(["ld.so.cache"]);
      expect(existsSync(`/proc/${pid!}/root${secret}`)).toBe(false);

      // from inside: host files absent, forbidden calls refused
      const line = src.stderr().split("\n").find((l) => l.startsWith("typevisor: sandbox probe "));
      expect(line, src.stderr()).toBeDefined();
      const probe = JSON.parse(line!.slice("typevisor: sandbox probe ".length)) as { open: Record<string, string>; syscalls: Record<string, string> };
      expect(probe.open["/etc/shadow"]).toBe("ENOENT");
      expect(probe.open[secret]).toBe("ENOENT");
      expect(probe.open["/dev/kvm"]).toBe("opened");
      for (const call of ["mount", "unshare", "keyctl", "bpf", "setns", "open_by_handle_at", "execve", "execveat"]) expect(probe.syscalls[call], call).toBe("EPERM");

      // the control API, a snapshot into the directory it was given
      expect((await unixApi(join(a, "api.sock"), "GET", "/vm")).body.state).toBe("running");
      const snap = await unixApi(join(a, "api.sock"), "POST", "/snapshot", { path: join(snaps, "s1") });
      expect(snap.status, JSON.stringify(snap.body)).toBe(200);
      expect(existsSync(join(snaps, "s1", "memory"))).toBe(true);
      con.sock.write("before");
      await until("the echo after the snapshot", () => con!.text().includes("before"));

      // A migration to a peer that never reads, cancelled: while it streams, the jailed VMM lifts its
      // vCPUs to its own nice value (no CAP_SYS_NICE: the jail's RLIMIT_NICE lets it take back what
      // it gave up), and puts them back after. Where this root cannot grant RLIMIT_NICE (no
      // CAP_SYS_RESOURCE, as in a container), nothing changes.
      const stall = join(b, "stall.sock");
      const stalled = createServer((x) => x.pause());
      await new Promise<void>((r) => stalled.listen(stall, r));
      chmodSync(stall, 0o777);
      try {
        const api = join(a, "api.sock");
        const vcpuNice = async (): Promise<number[]> => ((await unixApi(api, "GET", "/stats")).body as { vcpus: { nice: number }[] }).vcpus.map((v) => v.nice);
        const before = await vcpuNice();
        expect((await unixApi(api, "POST", "/migrate", { to: `unix:${stall}` })).status).toBe(202);
        await until("the transfer", async () => ["precopy", "stopped"].includes((await unixApi(api, "GET", "/migrate")).body.phase));
        const during = await vcpuNice();
        expect((await unixApi(api, "DELETE", "/migrate")).status).toBe(200);
        await until("the cancel", async () => (await unixApi(api, "GET", "/migrate")).body.phase === "cancelled");
        expect(during.map((n, i) => before[i]! - n)).toEqual(before.map(() => (CAN_GRANT_NICE ? DEFAULT_VCPU_NICE : 0)));
        expect(await vcpuNice()).toEqual(before);
      } finally {
        stalled.close();
      }
      con.sock.write("after-cancel");
      await until("the echo after the cancel", () => con!.text().includes("after-cancel"));

      // live migration over unix to a second sandboxed VMM (its own TAP and vsock socket, the same disks)
      // The same uid as the source, which must reach the destination's socket (its file and directory are that uid's)
      dst = run([
        "--sandbox", "--sandbox-uid", String(uid), "--incoming", `unix:${mig}`, "--force-kvm", "--no-lab",
        "--disk", raw, "--disk", `${qcow},format=qcow2`, "--net", "tap=tvrsb1", "--vsock", `cid=7,uds=${join(b, "v.sock")}`,
        "--api-socket", join(b, "api.sock"), "--console-socket", join(b, "c.sock"),
      ]);
      await until("the destination to listen", () => dst!.stderr().includes("waiting for a migration") || dst!.child.exitCode !== null);
      expect(dst.stderr()).toContain("waiting for a migration");
      const m = await unixApi(join(a, "api.sock"), "POST", "/migrate", { to: `unix:${mig}` });
      expect(m.status, JSON.stringify(m.body)).toBe(202);
      let migrated: unknown;
      await until("the source to end", async () => {
        migrated = (await unixApi(join(a, "api.sock"), "GET", "/migrate").catch(() => ({ body: "gone" }))).body;
        return src.child.exitCode !== null;
      }).catch((e: Error) => {
        throw new Error(`${e.message}: ${JSON.stringify(migrated)}\nsource: ${src.stderr()}\ndestination: ${dst!.stderr()}`);
      });
      expect(await src.exited, src.stderr()).toBe(0);
      expect(JSON.parse(readFileSync(join(a, "exit.json"), "utf8")).result).toBe("migrated");
      const con2 = await consoleClient(join(b, "c.sock"));
      con2.sock.write("after-move");
      await until("the echo at the destination", () => con2.text().includes("after-move"));
      const dpid = dst.pid()!;
      expect(status(`/proc/${dpid}/status`)["Seccomp"]).toBe("2");
      expect(Number(status(`/proc/${dpid}/status`)["Uid"]!.split(/\s+/)[0])).toBe(uid);
      con2.sock.destroy();
      // stopped through its API: the run ends, 0
      expect((await unixApi(join(b, "api.sock"), "POST", "/stop")).status).toBeLessThan(300);
      expect(await dst.exited, dst.stderr()).toBe(0);
      // the source gave its files back when it ended
      expect(statSync(join(a, "console.log")).isFile()).toBe(true);
    } finally {
      con?.sock.destroy();
      for (const r of [src, dst]) if (r !== undefined && r.child.exitCode === null) r.child.kill("SIGKILL");
      await src.exited;
      await dst?.exited;
    }
  }, 240_000);
});
