/**
 * Live migration between two VMM processes on this host, with the tiny test kernel on the host's
 * /dev/kvm (--force-kvm): the guest answers on the destination's console after the move and the
 * source ends with result "migrated"; every way a migration can fail before the switch-over
 * leaves the source VM running; a hostile stream gets one clear error and no VM at the
 * destination. (A Debian guest under real KVM: migration.lab.test.ts.)
 */
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { TINY_KERNEL_BANNER, writeTinyKernel } from "../helpers/tiny-kernel.js";
import { checkDiskPattern, DISK_GUEST_DONE, MEM_DIRTIER_UP, writeDiskGuest, writeMemDirtier } from "../helpers/disk-guest.js";
import { unixApi } from "../helpers/unix-api.js";
import { killVmm, startVmm, type Vmm } from "../helpers/vmm-process.js";
import { consoleClient as connectConsole, type ConsoleClient } from "../helpers/console-client.js";
import { FRAME, frame, hello, MAX_STATE_FRAMES, pageSetHead, pagesHeader, setPageBit } from "../../src/vmm/migration/protocol.js";
import { DEFAULT_VCPU_NICE } from "../../src/vmm/defaults.js";
import { threadNice } from "../../src/sys/libc.js";
import { oneTimeCertificate, type OneTimeCert } from "../../src/control/migration-tls.js";
import { connect as tlsConnect } from "node:tls";

const hasKvm = existsSync("/dev/kvm");
const dir = mkdtempSync(join(tmpdir(), "tv-mig-"));
const kernel = join(dir, "tiny.bzImage");
writeTinyKernel(kernel);
const dirtier = join(dir, "dirtier.bzImage");
writeMemDirtier(dirtier);
const writer = join(dir, "writer.bzImage");
writeDiskGuest(writer);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function until(what: string, cond: () => boolean | Promise<boolean>, ms = 20_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

const start = (name: string, args: string[]): Vmm => startVmm(dir, name, args);

/** The console client once the VMM has made its socket. */
async function consoleClient(path: string): Promise<ConsoleClient> {
  await until(`console socket ${path}`, () => existsSync(path));
  return connectConsole(path);
}

/** A source VM running the tiny guest, its console answering. */
async function source(name: string): Promise<{ vm: Vmm; con: ConsoleClient }> {
  const vm = start(name, ["--kernel", kernel, "--memory", "64", "--cpus", "2", "--rng"]);
  const con = await consoleClient(vm.sock);
  await until("the banner", () => con.text().includes(TINY_KERNEL_BANNER));
  return { vm, con };
}

/** The disk-writer guest at `dst` wrote to the end of its qcow2 `image` and powered off: the image is clean and every sector holds its pattern. */
async function writtenToTheEnd(dst: Vmm, con: ConsoleClient, image: string): Promise<void> {
  expect(await dst.exited, `${dst.stderr()}\n${con.text().slice(-300)}`).toBe(0);
  expect(con.text()).toContain(DISK_GUEST_DONE);
  const check = spawnSync("qemu-img", ["check", image], { encoding: "utf8", timeout: 60_000 });
  expect(check.status, `${check.stdout}${check.stderr}`).toBe(0);
  const raw = `${image}.end.raw`;
  execFileSync("qemu-img", ["convert", "-O", "raw", image, raw], { timeout: 60_000 });
  expect(checkDiskPattern(readFileSync(raw))).toBeUndefined();
}

/** The nice values of a process's threads that Node leaves named `node`, but its main thread: V8's helpers (threads/kernel.ts). */
function helperNices(pid: number): number[] {
  return readdirSync(`/proc/${pid}/task`)
    .filter((t) => t !== String(pid) && readFileSync(`/proc/${pid}/task/${t}/comm`, "utf8").trim() === "node")
    .map((t) => threadNice(Number(t)));
}

async function stillAnswers(con: ConsoleClient, word: string): Promise<void> {
  con.sock.write(word);
  await until(`the echo of ${word}`, () => con.text().includes(word));
}


/** One-time credentials for each end (what the daemons make: control/migration-tls.ts). */
/** The source's migration ends as failed, and its VM runs on here and answers (`word` echoed). */
async function failedAndRunsOn(src: { vm: Vmm; con: ConsoleClient }, word: string): Promise<void> {
  let last: unknown;
  await until("the migration to fail", async () => {
    last = (await unixApi(src.vm.api, "GET", "/migrate")).body;
    return (last as { phase: string }).phase === "failed";
  }).catch((e: Error) => {
    throw new Error(`${e.message}: ${JSON.stringify(last)} ${src.vm.stderr()}`);
  });
  expect((await unixApi(src.vm.api, "GET", "/vm")).body.state).toBe("running");
  await stillAnswers(src.con, word);
}

async function certPair(): Promise<{ src: OneTimeCert; dst: OneTimeCert }> {
  return { src: await oneTimeCertificate("source"), dst: await oneTimeCertificate("destination") };
}

/** `run --incoming` flags for `mine`, accepting the source whose certificate has `peer` as fingerprint. */
function tlsFlags(mine: OneTimeCert, peer: string): string[] {
  const d = mkdtempSync(join(dir, "tls-"));
  writeFileSync(join(d, "cert.pem"), mine.cert);
  writeFileSync(join(d, "key.pem"), mine.key, { mode: 0o600 });
  return ["--tls-cert", join(d, "cert.pem"), "--tls-key", join(d, "key.pem"), "--tls-peer-fingerprint", peer];
}

/** A TLS client without a certificate: the destination cuts it off (the handshake may finish first: TLS 1.3 checks the client's certificate after). */
async function refusedWithoutCert(endpoint: string): Promise<void> {
  const [, host, port] = /^tcp:(.+):(\d+)$/.exec(endpoint)!;
  await new Promise<void>((resolve) => {
    const s = tlsConnect({ host: host!, port: Number(port), rejectUnauthorized: false });
    s.on("secureConnect", () => s.write(Buffer.concat(helloFrame())));
    s.on("error", () => resolve());
    s.on("close", () => resolve());
  });
}

/** A PAGE_SET head for the window at `gpa` with these pages' bits set. */
const pageSetWith = (gpa: number, data: number[], zero: number[]): Buffer => {
  const h = pageSetHead(gpa);
  for (const k of data) setPageBit(h, k, false);
  for (const k of zero) setPageBit(h, k, true);
  return h;
};
const helloFrame = (): Uint8Array[] => {
  const regions = [{ guestPhysAddr: 0, size: 64 * 1024 * 1024 }];
  return frame(FRAME.HELLO, Buffer.from(JSON.stringify(hello({ cpus: 1, memoryMiB: 64, devices: { disks: [], nets: [], rng: false } }, regions))));
};

describe.skipIf(!hasKvm)("live migration (tiny kernel, --force-kvm)", () => {
  it.each(["unix", "tcp-tls"] as const)("moves a running guest over %s: it answers at the destination, the source ends as migrated", async (kind) => {
    const src = await source(`src-${kind}`);
    const endpoint = kind === "unix" ? `unix:${join(dir, `mig-${kind}.sock`)}` : `tcp:127.0.0.1:${47000 + Math.floor(Math.random() * 1000)}`;
    // Over TCP: TLS, each side pinning the other's one-time certificate.
    const tls = kind === "unix" ? undefined : await certPair();
    const dst = start(`dst-${kind}`, ["--incoming", endpoint, ...(tls !== undefined ? tlsFlags(tls.dst, tls.src.fingerprint) : [])]);
    try {
      await until("the destination to listen", () => dst.stderr().includes("waiting for a migration"));
      // Its control socket listens already (bound before the stream, outside the guest's pause)
      // but answers only once the VM runs here: a request now waits for the arrival.
      const early = unixApi(dst.api, "GET", "/vm");
      let answeredEarly = false;
      void early.then(() => (answeredEarly = true), () => undefined);
      if (tls !== undefined) {
        // A client with no certificate is refused before the destination reads a byte of it; the destination waits on.
        await refusedWithoutCert(endpoint);
        await until("the refusal in the destination's log", () => /refused a migration connection/.test(dst.stderr()));
        expect(dst.child.exitCode).toBeNull();
      }
      await stillAnswers(src.con, "before");
      expect(answeredEarly).toBe(false);
      const r = await unixApi(src.vm.api, "POST", "/migrate", { to: endpoint, ...(tls !== undefined ? { tls: { cert: tls.src.cert, key: tls.src.key, peerFingerprint: tls.dst.fingerprint } } : {}) });
      expect(r.status, JSON.stringify(r.body)).toBe(202);
      expect(await src.vm.exited, src.vm.stderr()).toBe(0);
      expect(JSON.parse(readFileSync(src.vm.exit, "utf8")).result).toBe("migrated");
      expect(src.vm.stderr()).toMatch(/migrated to .* \(downtime \d+ ms/);
      // The destination's RUNNING carried its own step times, and the source took them as such.
      expect(src.vm.stderr()).toMatch(/destination \(ms from DONE\): state decoded [\d.]+, threads up [\d.]+/);
      const con = await consoleClient(dst.sock);
      await stillAnswers(con, "after-move");
      expect(con.text()).not.toContain(TINY_KERNEL_BANNER);
      const vm = (await unixApi(dst.api, "GET", "/vm")).body;
      expect(vm.state).toBe("running");
      expect(vm.cpus).toBe(2);
      // The request made while it waited was answered once the VM arrived, for the VM that runs.
      const first = await early;
      expect(first.status).toBe(200);
      expect(first.body.cpus).toBe(2);
      con.sock.destroy();
    } finally {
      await killVmm(src.vm);
      await killVmm(dst);
    }
  }, 60_000);

  it("over TCP: refuses plain TCP unless asked; a destination with the wrong certificate gets nothing and the source runs on", async () => {
    const src = await source("src-wrongcert");
    const { src: mine, dst: theirs } = await certPair();
    const imposter = await oneTimeCertificate("imposter");
    const endpoint = `tcp:127.0.0.1:${48000 + Math.floor(Math.random() * 1000)}`;
    // The imposter has the real source's fingerprint pinned: it would take the stream, but its own certificate is not the one the source expects.
    const dst = start("dst-imposter", ["--incoming", endpoint, ...tlsFlags(imposter, mine.fingerprint)]);
    try {
      const plain = await unixApi(src.vm.api, "POST", "/migrate", { to: endpoint });
      expect(plain.status).toBe(400);
      expect(JSON.stringify(plain.body)).toMatch(/TLS|plainTcp/);
      expect((await unixApi(src.vm.api, "POST", "/migrate", { to: endpoint, tls: { cert: mine.cert, key: "not a key", peerFingerprint: theirs.fingerprint } })).status).toBe(400);
      await until("the destination to listen", () => dst.stderr().includes("waiting for a migration"));
      const r = await unixApi(src.vm.api, "POST", "/migrate", { to: endpoint, tls: { cert: mine.cert, key: mine.key, peerFingerprint: theirs.fingerprint } });
      expect(r.status, JSON.stringify(r.body)).toBe(202);
      let last: { phase?: string; error?: string; bytesSent?: number } = {};
      await until("the migration to fail", async () => (last = (await unixApi(src.vm.api, "GET", "/migrate")).body).phase === "failed");
      expect(last.error).toMatch(/not the expected peer.*fingerprint/);
      expect(last.bytesSent).toBe(0);
      expect((await unixApi(src.vm.api, "GET", "/vm")).body.state).toBe("running");
      await stillAnswers(src.con, "after-imposter");
      expect(dst.child.exitCode).toBeNull(); // the imposter got no stream: it still waits
    } finally {
      await killVmm(src.vm);
      await killVmm(dst);
    }
  }, 60_000);

  it("a destination whose control socket cannot be bound fails before it takes a stream, not after the source paused", async () => {
    const endpoint = join(dir, "nosock-mig.sock");
    const r = spawnSync(process.execPath, [new URL("../../bin/typevisor.js", import.meta.url).pathname, "run", "--force-kvm", "--no-lab", "--incoming", `unix:${endpoint}`, "--api-socket", join(dir, "no-such-dir", "api.sock")], { encoding: "utf8", timeout: 60_000 });
    expect(r.status, r.stderr).not.toBe(0);
    expect(r.stderr).toMatch(/cannot listen on .*api\.sock/);
    expect(r.stderr).not.toContain("waiting for a migration");
    expect(existsSync(endpoint)).toBe(false);
  }, 60_000);

  it("a destination told to stop (SIGTERM) while it waits ends at once, exit 0 and \"stopped\", and leaves no socket", async () => {
    const endpoint = join(dir, "stop-wait.sock");
    const dst = start("dst-stop-wait", ["--incoming", `unix:${endpoint}`]);
    try {
      await until("the destination to listen", () => dst.stderr().includes("waiting for a migration"));
      dst.child.kill("SIGTERM");
      const code = await Promise.race([dst.exited, new Promise<string>((r) => setTimeout(() => r("still waiting 20 s after SIGTERM"), 20_000))]);
      expect(code, dst.stderr()).toBe(0);
      expect(dst.stderr()).toContain("stopped before a migration came in");
      expect(JSON.parse(readFileSync(dst.exit, "utf8"))).toMatchObject({ code: 0, result: "stopped" });
      expect(existsSync(endpoint)).toBe(false);
      expect(existsSync(dst.api)).toBe(false);
    } finally {
      await killVmm(dst);
    }
  }, 60_000);

  it("a destination stopped while the stream comes in cuts it: it exits 0 with no VM, and the source runs on", async () => {
    const src = await source("src-stop-mid");
    const endpoint = join(dir, "stop-mid.sock");
    const dst = start("dst-stop-mid", ["--incoming", `unix:${endpoint}`]);
    try {
      await until("the destination to listen", () => dst.stderr().includes("waiting for a migration"));
      // Paced to 2 MiB/s, so the first round (the tiny guest's few MiB) takes seconds.
      expect((await unixApi(src.vm.api, "POST", "/migrate", { to: `unix:${endpoint}`, maxBandwidth: 2 * 1024 * 1024 })).status).toBe(202);
      await until("pages on their way", async () => ((await unixApi(src.vm.api, "GET", "/migrate")).body as { bytesSent: number }).bytesSent > 0);
      dst.child.kill("SIGTERM");
      expect(await dst.exited, dst.stderr()).toBe(0);
      expect(JSON.parse(readFileSync(dst.exit, "utf8"))).toMatchObject({ code: 0, result: "stopped" });
      await failedAndRunsOn(src, "after-dst-stop");
    } finally {
      await killVmm(src.vm);
      await killVmm(dst);
    }
  }, 60_000);

  it("keeps the VM running at the source when the destination dies mid-stream", async () => {
    const src = await source("src-die");
    const path = join(dir, "die.sock");
    // A destination that takes a little of the stream and then vanishes.
    const server = createServer((s) => {
      let n = 0;
      s.on("data", (d: Buffer) => {
        n += d.length;
        if (n > 10_000) s.destroy();
      });
    });
    await new Promise<void>((r) => server.listen(path, r));
    try {
      expect((await unixApi(src.vm.api, "POST", "/migrate", { to: `unix:${path}` })).status).toBe(202);
      await failedAndRunsOn(src, "still-here");
    } finally {
      server.close();
      await killVmm(src.vm);
    }
  }, 60_000);

  it("keeps the VM running when the destination refuses the state, and after a cancel", async () => {
    const src = await source("src-refuse");
    const path = join(dir, "refuse.sock");
    // Says it is prepared, reads every frame (answering SYNC as a destination does), then answers ERROR where READY belongs.
    const server = createServer((s) => {
      s.write(Buffer.concat(frame(FRAME.PREPARED)));
      let buf = Buffer.alloc(0);
      s.on("data", (d: Buffer) => {
        buf = Buffer.concat([buf, d]);
        while (buf.length >= 8 && buf.length >= 8 + buf.readUInt32LE(4)) {
          const type = buf.readUInt32LE(0);
          const payload = buf.subarray(8, 8 + buf.readUInt32LE(4));
          buf = buf.subarray(8 + payload.length);
          if (type === FRAME.SYNC) s.write(Buffer.concat(frame(FRAME.SYNCED, payload)));
          if (type === FRAME.DONE) s.write(Buffer.concat(frame(FRAME.ERROR, Buffer.from("no room here"))));
        }
      });
    });
    await new Promise<void>((r) => server.listen(path, r));
    const stall = join(dir, "stall.sock");
    // Accepts and never reads: the source blocks on a full socket until cancelled.
    const stalled = createServer((s) => s.pause());
    await new Promise<void>((r) => stalled.listen(stall, r));
    try {
      expect((await unixApi(src.vm.api, "POST", "/migrate", { to: `unix:${path}` })).status).toBe(202);
      await until("the refusal", async () => (await unixApi(src.vm.api, "GET", "/migrate")).body.phase === "failed");
      expect((await unixApi(src.vm.api, "GET", "/migrate")).body.error).toContain("no room here");
      // The pause set V8's helper threads at nice 19 (as root, who may undo it): back where they were.
      const pid = src.vm.child.pid!;
      expect(helperNices(pid)).toEqual(helperNices(pid).map(() => threadNice(pid)));
      await stillAnswers(src.con, "after-refusal");

      expect((await unixApi(src.vm.api, "POST", "/migrate", { to: `unix:${stall}` })).status).toBe(202);
      // A tiny guest's few pages fit in the socket's buffer: the source may already wait, paused, for READY.
      await until("the transfer", async () => ["precopy", "stopped"].includes((await unixApi(src.vm.api, "GET", "/migrate")).body.phase));
      // While it streams, the vCPUs run at the main thread's weight (root may lower a nice value);
      // after the cancel, at their own +3 again.
      const vcpuNice = async (): Promise<number[]> => ((await unixApi(src.vm.api, "GET", "/stats")).body as { vcpus: { nice: number }[] }).vcpus.map((v) => v.nice);
      const during = await vcpuNice();
      expect((await unixApi(src.vm.api, "DELETE", "/migrate")).status).toBe(200);
      await until("the cancel", async () => (await unixApi(src.vm.api, "GET", "/migrate")).body.phase === "cancelled");
      const after = await vcpuNice();
      expect(after.map((n, i) => n - during[i]!)).toEqual(after.map(() => (process.getuid?.() === 0 ? DEFAULT_VCPU_NICE : 0)));
      await stillAnswers(src.con, "after-cancel");
      expect((await unixApi(src.vm.api, "POST", "/migrate", { to: "ftp:nowhere" })).status).toBe(400);
    } finally {
      server.close();
      stalled.close();
      await killVmm(src.vm);
    }
  }, 60_000);

  it("a destination whose source vanishes after READY ends with an error, not a VM and not a hang", async () => {
    // A real state to send: a snapshot of the tiny guest (with a device, so the destination's device thread starts before READY).
    const src = await source("src-for-state");
    const snap = join(dir, "state-snap");
    try {
      expect((await unixApi(src.vm.api, "POST", "/snapshot", { path: snap })).status).toBe(200);
    } finally {
      await killVmm(src.vm);
    }
    const stateFile = readFileSync(join(snap, "state.json"));
    const config = JSON.parse(stateFile.subarray(stateFile.indexOf(0x0a) + 1).toString("utf8")).config;
    const path = join(dir, "vanish.sock");
    const dst = start("dst-vanish", ["--incoming", `unix:${path}`]);
    await until("the destination to listen", () => dst.stderr().includes("waiting for a migration"));
    const s = connect(path);
    let got = Buffer.alloc(0);
    s.on("data", (d: Buffer) => {
      got = Buffer.concat([got, d]);
      // PREPARED {20, 0} comes first, then READY {16, 0}: vanish instead of sending GO.
      if (got.length >= 16 && got.readUInt32LE(8) === FRAME.READY) s.destroy();
    });
    s.on("error", () => undefined);
    for (const b of frame(FRAME.HELLO, Buffer.from(JSON.stringify(hello(config, [{ guestPhysAddr: 0, size: 64 * 1024 * 1024 }]))))) s.write(b);
    for (const b of frame(FRAME.STATE, stateFile)) s.write(b);
    for (const b of frame(FRAME.DONE)) s.write(b);
    try {
      expect(await dst.exited, dst.stderr()).toBe(2);
      expect(got.readUInt32LE(0)).toBe(FRAME.PREPARED);
      expect(got.readUInt32LE(8)).toBe(FRAME.READY);
      expect(dst.stderr()).toMatch(/MIGRATION_PEER|closed/);
    } finally {
      s.destroy();
      await killVmm(dst);
    }
  }, 60_000);

  /** The memory-dirtying guest's passes, as its console printed them so far. */
  const passes = (text: string): number[] => [...text.matchAll(/tv-dirty: pass (\d+)/g)].map((m) => Number(m[1]));

  it("throttles a guest that dirties memory faster than the link takes it (auto-converge) until it converges; every page arrives", async () => {
    const src = start("src-dirty", ["--kernel", dirtier, "--memory", "128", "--cpus", "1"]);
    const con = await consoleClient(src.sock);
    const endpoint = `unix:${join(dir, "dirty.sock")}`;
    const dst = start("dst-dirty", ["--incoming", endpoint]);
    try {
      await until("the dirtier", () => con.text().includes(MEM_DIRTIER_UP) && passes(con.text()).length > 0);
      await until("the destination to listen", () => dst.stderr().includes("waiting for a migration"));
      // 64 MiB rewritten every pass, a link of 48 MiB/s: without a throttle no round ever gets small enough.
      const r = await unixApi(src.api, "POST", "/migrate", { to: endpoint, maxBandwidth: 48 * 1024 * 1024, maxDowntimeMs: 200 });
      expect(r.status, JSON.stringify(r.body)).toBe(202);
      let throttle = 0;
      let last: unknown;
      for (;;) {
        const p = await unixApi(src.api, "GET", "/migrate").catch(() => undefined);
        if (p === undefined) break; // the source has gone: migrated
        last = p.body;
        throttle = Math.max(throttle, (p.body as { throttlePercent: number }).throttlePercent);
        if (["completed", "failed", "cancelled"].includes((p.body as { phase: string }).phase)) break;
        await new Promise((res) => setTimeout(res, 100));
      }
      console.log(JSON.stringify(last));
      expect(await src.exited, src.stderr()).toBe(0);
      expect(throttle).toBeGreaterThan(0);
      const lastPass = Math.max(...passes(con.text()));
      const con2 = await consoleClient(dst.sock);
      await until("the dirtier to go on at the destination", () => passes(con2.text()).some((n) => n > lastPass), 60_000);
      expect(con2.text()).not.toContain("MISMATCH");
      con2.sock.destroy();
    } finally {
      con.sock.destroy();
      await killVmm(src);
      await killVmm(dst);
    }
  }, 180_000);

  it("copies a raw disk the guest writes during the migration (\"disks\": \"copy\"): the destination's disk holds the source's bytes", async () => {
    const srcDisk = join(dir, "copy-src.raw");
    const dstDisk = join(dir, "copy-dst.raw");
    writeFileSync(srcDisk, "");
    truncateSync(srcDisk, 128 * 1024 * 1024);
    const src = start("src-copy", ["--kernel", writer, "--memory", "64", "--disk", srcDisk]);
    const con = await consoleClient(src.sock);
    const endpoint = `unix:${join(dir, "copy.sock")}`;
    // A path that does not exist yet: the destination makes it, as large as the source's disk.
    // Paused there, so the two files can be compared as they were at the switch-over.
    const dst = start("dst-copy", ["--incoming", endpoint, "--disk", dstDisk, "--paused"]);
    try {
      await until("the destination to listen", () => dst.stderr().includes("waiting for a migration"));
      await until("the guest's first writes", () => /tv-disk: (\d+) MiB/.test(con.text()), 90_000);
      const r = await unixApi(src.api, "POST", "/migrate", { to: endpoint, disks: "copy" });
      expect(r.status, JSON.stringify(r.body)).toBe(202);
      expect(await src.exited, src.stderr()).toBe(0);
      expect(JSON.parse(readFileSync(src.exit, "utf8")).result, `${src.stderr()}\n${con.text().slice(-300)}`).toBe("migrated");
      // The guest was writing all along: blocks written during the copy went again in later rounds.
      expect(src.stderr()).toMatch(/disks [\d.]+ \(\d+ B\)/);
      const a = readFileSync(srcDisk);
      const b = readFileSync(dstDisk);
      expect(b.length).toBe(a.length);
      expect(b.equals(a)).toBe(true);
      // And what it wrote is the guest's pattern, up to where it had got.
      const written = Number(/tv-disk: (\d+) MiB/.exec(con.text())![1]) * 1024 * 1024;
      expect(checkDiskPattern(b.subarray(0, written))).toBeUndefined();
    } finally {
      con.sock.destroy();
      await killVmm(src);
      await killVmm(dst);
    }
  }, 180_000);

  it("copies a qcow2 overlay the guest writes during the migration: the destination's own image holds what the source's chain did, then the guest writes on there", async () => {
    // A raw base with data the guest has not overwritten yet at the switch-over (its last 4 MiB).
    const base = join(dir, "copyq-base.raw");
    writeFileSync(base, Buffer.concat([Buffer.alloc(4 * 1024 * 1024), Buffer.alloc(4 * 1024 * 1024, 0x5a)]));
    const srcDisk = join(dir, "copyq-src.qcow2");
    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, srcDisk, "8M"], { timeout: 30_000 });
    const dstDisk = join(dir, "copyq-dst.qcow2");
    const src = start("src-copyq", ["--kernel", writer, "--memory", "64", "--disk", `${srcDisk},format=qcow2`]);
    const con = await consoleClient(src.sock);
    const endpoint = `unix:${join(dir, "copyq.sock")}`;
    const dst = start("dst-copyq", ["--incoming", endpoint, "--disk", dstDisk, "--paused"]);
    let dcon: ConsoleClient | undefined;
    try {
      await until("the destination to listen", () => dst.stderr().includes("waiting for a migration"));
      await until("the guest's first writes", () => /tv-disk: [1-9]\d* MiB/.test(con.text()), 90_000);
      const r = await unixApi(src.api, "POST", "/migrate", { to: endpoint, disks: "copy" });
      expect(r.status, JSON.stringify(r.body)).toBe(202);
      expect(await src.exited, src.stderr()).toBe(0);
      expect(JSON.parse(readFileSync(src.exit, "utf8")).result, `${src.stderr()}\n${dst.stderr()}\n${con.text().slice(-300)}`).toBe("migrated");
      // Paused at the destination: both images as they were at the switch-over.
      const info = JSON.parse(execFileSync("qemu-img", ["info", "-U", "--output=json", dstDisk], { encoding: "utf8", timeout: 30_000 })) as { format: string; "virtual-size": number; "backing-filename"?: string };
      expect(info).toMatchObject({ format: "qcow2", "virtual-size": 8 * 1024 * 1024 });
      expect(info["backing-filename"]).toBeUndefined();
      const check = spawnSync("qemu-img", ["check", "-U", dstDisk], { encoding: "utf8", timeout: 60_000 });
      expect(check.status, `${check.stdout}${check.stderr}`).toBe(0);
      const a = join(dir, "copyq-src.raw");
      const b = join(dir, "copyq-dst.raw");
      execFileSync("qemu-img", ["convert", "-U", "-O", "raw", srcDisk, a], { timeout: 60_000 });
      execFileSync("qemu-img", ["convert", "-U", "-O", "raw", dstDisk, b], { timeout: 60_000 });
      const ours = readFileSync(b);
      expect(ours.equals(readFileSync(a))).toBe(true);
      expect(ours.subarray(7 * 1024 * 1024).every((x) => x === 0x5a)).toBe(true);
      // The copy holds only what the chain had (allocated clusters), not the whole virtual size as data.
      const allocated = JSON.parse(execFileSync("qemu-img", ["map", "-U", "--output=json", dstDisk], { encoding: "utf8", timeout: 30_000 })) as { length: number; data: boolean }[];
      const dataBytes = allocated.filter((m) => m.data).reduce((n, m) => n + m.length, 0);
      expect(dataBytes).toBeLessThan(8 * 1024 * 1024);
      // Resumed, the guest writes on into its copy, to the end, and powers off.
      dcon = await consoleClient(dst.sock);
      expect((await unixApi(dst.api, "POST", "/resume")).status).toBe(200);
      await writtenToTheEnd(dst, dcon, dstDisk);
    } finally {
      con.sock.destroy();
      dcon?.sock.destroy();
      await killVmm(src);
      await killVmm(dst);
    }
  }, 180_000);

  // Shared storage with a qcow2 image: both VMMs open one file, and each caches its metadata (L1,
  // L2 tables, refcounts, where the next cluster goes). The source must write its cache back before
  // the destination runs, and the destination must read the metadata again then, not use what it
  // read when it opened the disk at HELLO (QEMU: bdrv_inactivate_all at the source, bdrv_invalidate_cache at
  // the destination). The guest allocates clusters on both sides of the move.
  it("moves a guest writing a shared qcow2 disk: it writes on at the destination; qemu-img check is clean and every sector holds its pattern", async () => {
    const disk = join(dir, "shared.qcow2");
    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", disk, "8M"], { timeout: 30_000 });
    const src = start("src-q", ["--kernel", writer, "--memory", "64", "--disk", `${disk},format=qcow2`]);
    const con = await consoleClient(src.sock);
    const endpoint = `unix:${join(dir, "shared-q.sock")}`;
    const dst = start("dst-q", ["--incoming", endpoint]);
    let dcon: ConsoleClient | undefined;
    try {
      await until("the destination to listen", () => dst.stderr().includes("waiting for a migration"));
      await until("the guest's first writes", () => /tv-disk: [1-9]\d* MiB/.test(con.text()), 90_000);
      const r = await unixApi(src.api, "POST", "/migrate", { to: endpoint });
      expect(r.status, JSON.stringify(r.body)).toBe(202);
      expect(await src.exited, src.stderr()).toBe(0);
      expect(JSON.parse(readFileSync(src.exit, "utf8")).result, src.stderr()).toBe("migrated");
      const before = Number(/tv-disk: (\d+) MiB(?![\s\S]*tv-disk: \d+ MiB)/.exec(con.text())?.[1] ?? 0);
      expect(before, con.text().slice(-300)).toBeLessThan(8);
      // At the destination the guest goes on to the end of its disk, flushes and powers off.
      dcon = await consoleClient(dst.sock);
      await writtenToTheEnd(dst, dcon, disk);
    } finally {
      con.sock.destroy();
      dcon?.sock.destroy();
      await killVmm(src);
      await killVmm(dst);
    }
  }, 180_000);

  it("refuses to copy a disk over a destination file that holds data, and the source runs on", async () => {
    const srcDisk = join(dir, "refuse-src.raw");
    const dstDisk = join(dir, "refuse-dst.raw");
    writeFileSync(srcDisk, "");
    truncateSync(srcDisk, 8 * 1024 * 1024);
    writeFileSync(dstDisk, Buffer.alloc(512, "precious"));
    const src = start("src-refuse-disk", ["--kernel", kernel, "--memory", "64", "--disk", srcDisk]);
    const con = await consoleClient(src.sock);
    const endpoint = `unix:${join(dir, "refuse-disk.sock")}`;
    const dst = start("dst-refuse-disk", ["--incoming", endpoint, "--disk", dstDisk]);
    try {
      await until("the banner", () => con.text().includes(TINY_KERNEL_BANNER));
      await until("the destination to listen", () => dst.stderr().includes("waiting for a migration"));
      expect((await unixApi(src.api, "POST", "/migrate", { to: endpoint, disks: "copy" })).status).toBe(202);
      expect(await dst.exited).toBe(2);
      expect(dst.stderr()).toContain("is not empty");
      expect(readFileSync(dstDisk).equals(Buffer.alloc(512, "precious"))).toBe(true);
      await until("the failure", async () => (await unixApi(src.api, "GET", "/migrate")).body.phase === "failed");
      await stillAnswers(con, "still-mine");
    } finally {
      con.sock.destroy();
      await killVmm(src);
      await killVmm(dst);
    }
  }, 60_000);

  it.each([
    ["garbage", [Buffer.from("GET / HTTP/1.1\r\n\r\n")], /unknown frame type|MIGRATION_STREAM/],
    ["an oversized frame", [Buffer.from([2, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f])], /over the \d+-byte limit/],
    ["pages outside RAM", [...helloFrame(), ...frame(FRAME.PAGES, pagesHeader(0x1_0000_0000), Buffer.alloc(4096, 1))], /outside guest RAM/],
    ["a PAGE_SET page outside RAM", [...helloFrame(), ...frame(FRAME.PAGE_SET, pageSetWith(0xffff_f000_0000, [0], []), Buffer.alloc(4096, 1))], /page 0 lies outside guest RAM/],
    ["a PAGE_SET whose bitmap names more pages than it carries", [...helloFrame(), ...frame(FRAME.PAGE_SET, pageSetWith(0, [0, 1], [5]), Buffer.alloc(4096, 1))], /names 2 pages of data and carries 4096 bytes/],
    ["a PAGE_SET page both data and zero", [...helloFrame(), ...frame(FRAME.PAGE_SET, pageSetWith(0, [3], [3]), Buffer.alloc(4096, 1))], /page 3 is both data and zero/],
    ["a truncated stream", [...helloFrame(), ...frame(FRAME.STATE, Buffer.from("typevisor-snapshot 1 bytes=5 sha256=00\n{}")), ...frame(FRAME.DONE)], /SNAPSHOT_INVALID|bad header|checksum/],
    ["disk data for a disk HELLO did not announce", [...helloFrame(), ...frame(FRAME.DISK_DATA, Buffer.alloc(16), Buffer.alloc(512, 1))], /DISK_DATA for disk 0; HELLO copies 0 disks/],
    ["a SYNC of the wrong size", [...helloFrame(), ...frame(FRAME.SYNC, Buffer.alloc(4096))], /SYNC of 4096 bytes/],
    // Every piece is kept until DONE: a byte a frame would cost an object (and a socket read) per byte.
    ["the state in a byte a frame", [...helloFrame(), Buffer.concat(Array.from({ length: MAX_STATE_FRAMES + 1 }, () => Buffer.concat(frame(FRAME.STATE, Buffer.from("x")))))], /over \d+ STATE frames/],
    ["HELLO with another machine's regions", [...frame(FRAME.HELLO, Buffer.from(JSON.stringify(hello({ cpus: 1, memoryMiB: 64, devices: { disks: [], nets: [], rng: false } }, [{ guestPhysAddr: 0, size: 4096 }]))))], /do not match/],
  ] as const)("a destination sent %s ends with one clear error and no VM", async (_name, bytes, message) => {
    const path = join(dir, `hostile-${Math.random().toString(36).slice(2)}.sock`);
    const dst = start("dst-hostile", ["--incoming", `unix:${path}`]);
    await until("the destination to listen", () => dst.stderr().includes("waiting for a migration"));
    const s = connect(path);
    s.on("error", () => undefined);
    for (const b of bytes) s.write(b);
    try {
      expect(await dst.exited, dst.stderr()).toBe(2);
      expect(dst.stderr()).toMatch(message);
      expect(JSON.parse(readFileSync(dst.exit, "utf8")).result).toBe("error");
    } finally {
      s.destroy();
      await killVmm(dst);
    }
  }, 30_000);
});
