/**
 * Snapshot and restore through the real CLI and API socket, with the tiny test kernel on this
 * host's /dev/kvm (--force-kvm): the guest's serial interrupt path (IOAPIC route, LAPIC, IDT,
 * UART state) must survive a snapshot, a kill, and a restore in a new process, since the
 * restored guest only answers typed bytes if all of it came back. Bad snapshots must fail with
 * one clear line before any vCPU runs. (Debian guests are proven in the lab: snapshot.lab.test.ts.)
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, writeFileSync, truncateSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it, onTestFailed } from "vitest";
import { diagLine } from "../helpers/diag-line.js";
import { TINY_KERNEL_BANNER, writeTinyKernel } from "../helpers/tiny-kernel.js";
import { unixApi } from "../helpers/unix-api.js";
import { killVmm, startVmm, type Vmm } from "../helpers/vmm-process.js";
import { until as pollUntil } from "../helpers/daemon.js";
import { consoleClient as connectConsole, type ConsoleClient } from "../helpers/console-client.js";
import { cpSync, rmSync } from "node:fs";
import { VMGENID_ADDR, VMGENID_SIZE } from "../../src/vmm/arch/x86_64/layout.js";
import { decodeState, SNAPSHOT_FILES } from "../../src/vmm/snapshot/state.js";

/** The VM generation ID as a snapshot saved it: guest memory at VMGENID_ADDR, read from the memory file. */
function savedGenerationId(snapDir: string): string {
  const state = decodeState(readFileSync(join(snapDir, SNAPSHOT_FILES.state)), snapDir);
  const r = state.memory!.regions.find((x) => x.guestPhysAddr <= VMGENID_ADDR && VMGENID_ADDR + VMGENID_SIZE <= x.guestPhysAddr + x.size)!;
  const mem = readFileSync(join(snapDir, SNAPSHOT_FILES.memory));
  const at = r.fileOffset + VMGENID_ADDR - r.guestPhysAddr;
  return mem.subarray(at, at + VMGENID_SIZE).toString("hex");
}

const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
const hasKvm = existsSync("/dev/kvm");
const dir = mkdtempSync(join(tmpdir(), "tv-snap-"));
const kernel = join(dir, "tiny.bzImage");
writeTinyKernel(kernel);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** test/helpers/daemon.ts's poll, with this file's longer default (a restore under load). */
const until = (what: string, cond: () => boolean, ms = 20_000): Promise<boolean> => pollUntil(what, cond, ms);

const start = (name: string, args: string[]): Vmm => startVmm(dir, name, args);

/** The console client once the VMM has made its socket. */
async function consoleClient(path: string): Promise<ConsoleClient> {
  await until(`console socket ${path}`, () => existsSync(path));
  return connectConsole(path);
}

const readIf = (p: string): string => (existsSync(p) ? readFileSync(p, "latin1") : "");

const kill = killVmm;

/** `run --standby` on `api`: the process, its stderr so far, and its exit code once it ends. */
function startStandby(api: string, extra: string[] = []): { child: ChildProcess; err: () => string; exited: Promise<number | null> } {
  const child = spawn(process.execPath, [BIN, "run", "--standby", "--force-kvm", "--no-lab", "--api-socket", api, ...extra], { stdio: ["ignore", "pipe", "pipe"] });
  let err = "";
  child.stderr.on("data", (b: Buffer) => (err += b.toString()));
  const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
  // What it said, in the lines a CI run's tail keeps (a hang is otherwise only "timed out").
  onTestFailed(() => console.log(diagLine(`standby pid ${child.pid ?? "?"} (exit ${child.exitCode ?? "none yet"}) said`, err.slice(-700))));
  return { child, err: () => err, exited };
}

/**
 * Until the standby says it waits: that line comes once its socket listens and its template's VM
 * is built. Its socket file alone appears before both (bound, then the line written, and stderr
 * read here later still): a check of the line right after the file was seen failed in CI.
 */
const onStandby = (err: () => string): Promise<boolean> => until("the standby on its socket", () => err().includes("typevisor: on standby at"));

/** The restored guest echoes `word` on `sock`; then the VMM on `api` is stopped and exits 0. */
async function echoThenStop(api: string, sock: string, word: string, exited: Promise<number | null>): Promise<void> {
  const c = await consoleClient(sock);
  c.sock.write(word);
  await until("the echo", () => c.text().includes(word));
  c.sock.destroy();
  expect((await unixApi(api, "POST", "/stop")).status).toBe(202);
  expect(await exited).toBe(0);
}

describe.skipIf(!hasKvm)("snapshot and restore (tiny kernel, --force-kvm)", () => {
  const snap = join(dir, "snap1");

  it("saves a running guest, which runs on; a new VMM restored from it continues the guest without booting", async () => {
    // With a device, so the device thread's state goes through the snapshot too.
    const a = start("a", ["--kernel", kernel, "--memory", "64", "--cpus", "2", "--rng"]);
    try {
      await until("the banner", () => readIf(a.log).includes(TINY_KERNEL_BANNER));
      const c = await consoleClient(a.sock);
      c.sock.write("before");
      await until("the echo", () => c.text().includes("before"));
      const r = await unixApi(a.api, "POST", "/snapshot", { path: snap });
      expect(r.status, JSON.stringify(r.body)).toBe(200);
      expect(r.body.memoryBytes).toBe(64 * 1024 * 1024);
      // Sparse: the tiny guest touched a few pages, not 64 MiB.
      expect(r.body.dataBytes).toBeLessThan(8 * 1024 * 1024);
      expect(statSync(join(snap, "memory")).blocks * 512).toBeLessThan(8 * 1024 * 1024);
      // The guest runs on after the snapshot.
      expect((await unixApi(a.api, "GET", "/vm")).body.state).toBe("running");
      c.sock.write("after");
      await until("the echo after the snapshot", () => c.text().includes("after"));
      // The directory exists now: a second snapshot there is refused, not merged.
      expect((await unixApi(a.api, "POST", "/snapshot", { path: snap })).status).toBe(409);
      c.sock.destroy();
    } finally {
      await kill(a);
    }

    const b = start("b", ["--restore", snap]);
    try {
      const c = await consoleClient(b.sock);
      const vm = await until("the API", () => existsSync(b.api)).then(() => unixApi(b.api, "GET", "/vm"));
      expect(vm.body.restoredFrom).toBe(snap);
      expect(vm.body.cpus).toBe(2);
      c.sock.write("restored");
      await until("the restored guest's echo", () => c.text().includes("restored"), 20_000);
      // It did not boot again: no banner in the new VMM's console.
      expect(readIf(b.log)).not.toContain(TINY_KERNEL_BANNER);
      expect(b.stderr()).not.toContain("restore: vCPU");
      c.sock.destroy();
    } finally {
      await kill(b);
    }
  }, 90_000);

  it("can be snapshotted again after a restore (pages still in the old memory file are carried over); the restore was a new VM generation", async () => {
    const b = start("b2", ["--restore", snap]);
    const snap2 = join(dir, "snap2");
    try {
      await until("the API", () => existsSync(b.api));
      const r = await unixApi(b.api, "POST", "/snapshot", { path: snap2 });
      expect(r.status, JSON.stringify(r.body)).toBe(200);
    } finally {
      await kill(b);
    }
    // The cold boot wrote a random generation ID; the restore wrote another (devices/legacy/vmgenid).
    const [first, second] = [savedGenerationId(snap), savedGenerationId(snap2)];
    expect(first).not.toBe("0".repeat(2 * VMGENID_SIZE));
    expect(second).not.toBe("0".repeat(2 * VMGENID_SIZE));
    expect(second).not.toBe(first);
    const c3 = start("c3", ["--restore", snap2]);
    try {
      const c = await consoleClient(c3.sock);
      c.sock.write("second");
      await until("the twice-restored guest's echo", () => c.text().includes("second"));
      c.sock.destroy();
    } finally {
      await kill(c3);
    }
  }, 90_000);

  it("starts paused with --paused and runs on POST /resume", async () => {
    const b = start("p", ["--restore", snap, "--paused"]);
    try {
      const c = await consoleClient(b.sock);
      await until("the API", () => existsSync(b.api));
      expect((await unixApi(b.api, "GET", "/vm")).body.state).toBe("paused");
      c.sock.write("x");
      await new Promise((r) => setTimeout(r, 500));
      expect(c.text()).toBe("");
      expect((await unixApi(b.api, "POST", "/resume")).status).toBe(200);
      await until("the echo once resumed", () => c.text().includes("x"));
      c.sock.destroy();
    } finally {
      await kill(b);
    }
  }, 60_000);

  it("a standby VMM becomes the snapshot's VM on PUT /restore, on the same socket", async () => {
    const d = mkdtempSync(join(dir, "standby-"));
    const api = join(d, "api.sock");
    const sock = join(d, "c.sock");
    const { child, err, exited } = startStandby(api);
    try {
      await onStandby(err);
      expect((await unixApi(api, "GET", "/vm")).body.state).toBe("standby");
      // Its threads while it waits: the device thread and one vCPU thread are among them (started ahead).
      const before = new Set(readdirSync(`/proc/${child.pid}/task`).map(Number));
      expect((await unixApi(api, "POST", "/pause")).status).toBe(409);
      expect((await unixApi(api, "PUT", "/restore", { snapshot: snap, bogus: 1 })).status).toBe(400);
      const r = await unixApi(api, "PUT", "/restore", { snapshot: snap, consoleSocket: sock, id: "from-standby" });
      expect(r.status, `${JSON.stringify(r.body)} ${err()}`).toBe(200);
      const vm = (await unixApi(api, "GET", "/vm")).body;
      expect(vm.state).toBe("running");
      expect(vm.id).toBe("from-standby");
      // The VM's device thread and first vCPU thread are the ones the standby started before the
      // request; its second vCPU (the snapshot's VM has 2) started with the VM.
      const threads = async (): Promise<{ devices: { tid: number | null } | null; vcpus: { tid: number | null }[] }> => (await unixApi(api, "GET", "/threads")).body;
      await pollUntil("every thread's tid published", async () => {
        const t = await threads();
        return t.devices?.tid != null && t.vcpus.length === 2 && t.vcpus.every((v) => v.tid !== null) ? true : undefined;
      }, 20_000);
      const t = await threads();
      expect(before.has(t.devices!.tid!), "the device thread was started ahead").toBe(true);
      expect(before.has(t.vcpus[0]!.tid!), "vCPU 0's thread was started ahead").toBe(true);
      expect(before.has(t.vcpus[1]!.tid!), "vCPU 1's thread started with the VM").toBe(false);
      const c = await consoleClient(sock);
      c.sock.write("standby");
      await until("the echo", () => c.text().includes("standby"));
      // Only once: the VMM is a VM now.
      expect((await unixApi(api, "PUT", "/restore", { snapshot: snap })).status).toBe(409);
      c.sock.destroy();
      expect((await unixApi(api, "POST", "/stop")).status).toBe(202);
      expect(await exited).toBe(0);
    } finally {
      child.kill("SIGKILL");
    }
  }, 60_000);

  it("a standby VMM's spare threads serve the restored VM: its disk's I/O thread too", async () => {
    const d = mkdtempSync(join(dir, "standby-disk-"));
    // Not on tmpfs (a disk there is served on the device thread, with no I/O thread of its own).
    const disk = join(d, "disk.raw");
    writeFileSync(disk, "");
    truncateSync(disk, 8 * 1024 * 1024);
    const withDisk = join(d, "snap");
    const a = start("sd", ["--kernel", kernel, "--memory", "64", "--disk", disk]);
    try {
      await until("the banner", () => readIf(a.log).includes(TINY_KERNEL_BANNER));
      // The tiny guest drives no disk: its I/O thread, started on demand, never started.
      await pollUntil("the source's disk", async () => ((await unixApi(a.api, "GET", "/threads")).body.ioThreads?.[0]?.state === "idle" ? true : undefined), 20_000);
      expect((await unixApi(a.api, "POST", "/snapshot", { path: withDisk })).status).toBe(200);
    } finally {
      await kill(a);
    }
    const api = join(d, "api.sock");
    const { child, err } = startStandby(api);
    try {
      await onStandby(err);
      await pollUntil("the standby answering", async () => ((await unixApi(api, "GET", "/vm")).status === 200 ? true : undefined), 20_000);
      const before = new Set(readdirSync(`/proc/${child.pid}/task`).map(Number));
      const r = await unixApi(api, "PUT", "/restore", { snapshot: withDisk, disks: [disk], consoleSocket: join(d, "c.sock") });
      expect(r.status, `${JSON.stringify(r.body)} ${err()}`).toBe(200);
      const io = await pollUntil("the I/O thread's tid", async () => {
        const t = (await unixApi(api, "GET", "/threads")).body as { ioThreads: { state: string; tid: number | null }[] };
        return t.ioThreads[0]?.state === "running" ? t.ioThreads[0].tid ?? undefined : undefined;
      }, 20_000);
      expect(before.has(io), "the disk's I/O thread was started ahead").toBe(true);
    } finally {
      child.kill("SIGKILL");
    }
  }, 60_000);

  /** The mappings of `pid` (/proc/PID/smaps) of the file `path`, with their resident KiB. */
  function fileMappings(pid: number, path: string): { inode: number; rssKiB: number }[] {
    const out: { inode: number; rssKiB: number }[] = [];
    let cur: { inode: number; rssKiB: number } | undefined;
    for (const line of readFileSync(`/proc/${pid}/smaps`, "utf8").split("\n")) {
      const head = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ (\d+)\s+(.*)$/.exec(line);
      if (head !== null) {
        cur = head[2] === path ? { inode: Number(head[1]), rssKiB: 0 } : undefined;
        if (cur !== undefined) out.push(cur);
      } else if (cur !== undefined && line.startsWith("Rss:")) cur.rssKiB = Number(/(\d+)/.exec(line)![1]);
    }
    return out;
  }

  it("a standby started for a template (--template) builds its VM ahead, and its restore takes that VM", async () => {
    const d = mkdtempSync(join(dir, "standby-template-"));
    const api = join(d, "api.sock");
    const sock = join(d, "c.sock");
    const { child, err, exited } = startStandby(api, ["--template", snap]);
    try {
      await onStandby(err);
      expect(err()).toContain(`a VM built for ${snap}`);
      // Before any request: the template's memory mapped, and the pages its guest had written in
      // place in this process's page tables already (populated), one mapping per RAM region.
      const mem = join(snap, SNAPSHOT_FILES.memory);
      const ahead = fileMappings(child.pid!, mem);
      expect(ahead.length).toBeGreaterThan(0);
      expect(ahead.reduce((a, m) => a + m.rssKiB, 0)).toBeGreaterThan(64);
      const r = await unixApi(api, "PUT", "/restore", { snapshot: snap, consoleSocket: sock });
      expect(r.status, `${JSON.stringify(r.body)} ${err()}`).toBe(200);
      expect(err()).toContain(`restore: into the VM this standby built ahead for ${snap}`);
      // The same mappings serve the restored VM: no second one of the file was made.
      expect(fileMappings(child.pid!, mem).length).toBe(ahead.length);
      expect((await unixApi(api, "GET", "/vm")).body.restoredFrom).toBe(snap);
      await echoThenStop(api, sock, "templ", exited);
    } finally {
      child.kill("SIGKILL");
    }
  }, 60_000);

  it("a standby started for one template restores another snapshot, or a replaced template, from the files asked for", async () => {
    const d = mkdtempSync(join(dir, "standby-other-"));
    // A copy of snap is another snapshot (other inode); the template then has its memory file replaced.
    const other = join(d, "other");
    cpSync(snap, other, { recursive: true });
    const templ = join(d, "templ");
    cpSync(snap, templ, { recursive: true });
    for (const [name, asked, change] of [
      ["other", other, () => undefined],
      ["replaced", templ, () => {
        const m = join(templ, SNAPSHOT_FILES.memory);
        cpSync(m, `${m}.new`);
        rmSync(m);
        cpSync(`${m}.new`, m);
        rmSync(`${m}.new`);
      }],
    ] as const) {
      const api = join(d, `${name}.sock`);
      const sock = join(d, `${name}.c.sock`);
      const { child, err, exited } = startStandby(api, ["--template", templ]);
      try {
        await onStandby(err);
        expect(err()).toContain("a VM built for");
        const ahead = fileMappings(child.pid!, join(templ, SNAPSHOT_FILES.memory));
        expect(ahead.length).toBeGreaterThan(0);
        change();
        const r = await unixApi(api, "PUT", "/restore", { snapshot: asked, consoleSocket: sock });
        expect(r.status, `${JSON.stringify(r.body)} ${err()}`).toBe(200);
        // The VM built ahead is gone; the restored one maps the file asked for, as it is now.
        const now = fileMappings(child.pid!, join(asked, SNAPSHOT_FILES.memory));
        expect(now.length).toBeGreaterThan(0);
        const ino = statSync(join(asked, SNAPSHOT_FILES.memory)).ino;
        expect(now.every((m) => m.inode === ino), name).toBe(true);
        expect(err()).not.toContain("built ahead");
        if (name === "other") expect(fileMappings(child.pid!, join(templ, SNAPSHOT_FILES.memory))).toEqual([]);
        await echoThenStop(api, sock, name, exited);
      } finally {
        child.kill("SIGKILL");
      }
    }
  }, 90_000);

  it("a standby whose template cannot be read says so and still serves restores", async () => {
    const d = mkdtempSync(join(dir, "standby-notempl-"));
    const api = join(d, "api.sock");
    const sock = join(d, "c.sock");
    const { child, err, exited } = startStandby(api, ["--template", join(dir, "nowhere")]);
    try {
      await onStandby(err);
      expect(err()).toMatch(/template .*nowhere not made ready/);
      const r = await unixApi(api, "PUT", "/restore", { snapshot: snap, consoleSocket: sock });
      expect(r.status, `${JSON.stringify(r.body)} ${err()}`).toBe(200);
      await echoThenStop(api, sock, "plain", exited);
    } finally {
      child.kill("SIGKILL");
    }
  }, 60_000);

  it("a standby VMM answers a bad snapshot with the error and exits 2", async () => {
    const d = mkdtempSync(join(dir, "standby-bad-"));
    const api = join(d, "api.sock");
    const { child, err, exited } = startStandby(api);
    try {
      await onStandby(err);
      const r = await unixApi(api, "PUT", "/restore", { snapshot: join(dir, "nowhere") });
      expect(r.status).toBe(400);
      expect(r.body.code).toBe("SNAPSHOT_NOT_FOUND");
      expect(await exited).toBe(2);
    } finally {
      child.kill("SIGKILL");
    }
  }, 60_000);

  function damaged(name: string, change: (d: string) => void): string {
    const d = join(dir, name);
    cpSync(snap, d, { recursive: true });
    change(d);
    return d;
  }

  it.each([
    ["truncated", (d: string) => truncateSync(join(d, "state.json"), statSync(join(d, "state.json")).size - 100), /truncated/],
    ["flipped", (d: string) => {
      const b = readFileSync(join(d, "state.json"));
      b.writeUInt8(b.readUInt8(b.length - 500) ^ 0x01, b.length - 500);
      writeFileSync(join(d, "state.json"), b);
    }, /checksum/],
    ["version", (d: string) => {
      const b = readFileSync(join(d, "state.json"), "latin1");
      writeFileSync(join(d, "state.json"), b.replace(/^typevisor-snapshot 1 /, "typevisor-snapshot 9 "), "latin1");
    }, /version 9/],
    ["memory", (d: string) => truncateSync(join(d, "memory"), 4096), /memory file is 4096 bytes/],
    ["missing", (d: string) => rmSync(join(d, "state.json")), /not a snapshot/],
  ] as const)("refuses a %s snapshot with one line and exit 2, before any vCPU runs", async (name, change, message) => {
    const d = damaged(`bad-${name}`, change);
    const v = start(`bad-${name}`, ["--restore", d]);
    const code = await v.exited;
    expect(code, v.stderr()).toBe(2);
    expect(v.stderr()).toMatch(message);
    expect(v.stderr().trim().split("\n").filter((l) => !l.startsWith("  ")).length, v.stderr()).toBeLessThanOrEqual(2);
    expect(readIf(v.log)).toBe("");
  }, 30_000);
});
