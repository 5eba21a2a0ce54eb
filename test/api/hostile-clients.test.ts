/**
 * Clients that misbehave on purpose, against a real daemon: nothing they send or do at any stage
 * may make it exit (issue: "a single HTTP request can make the daemon exit").
 */
import { execFileSync } from "node:child_process";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, statfsSync, statSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startDaemon, type TestDaemon } from "../helpers/daemon.js";
import { writeTinyKernel } from "../helpers/tiny-kernel.js";
import { vmmProcesses } from "../helpers/vmm-processes.js";

/** Send raw bytes on a fresh connection; resolve with what came back until the peer closed (or `waitMs`). */
function rawExchange(socketPath: string, bytes: string, opts: { closeAfterWrite?: boolean; waitMs?: number } = {}): Promise<string> {
  return new Promise((resolve) => {
    const s = connect(socketPath);
    let got = "";
    const done = (): void => {
      clearTimeout(t);
      s.destroy();
      resolve(got);
    };
    const t = setTimeout(done, opts.waitMs ?? 2000);
    s.on("data", (d: Buffer) => (got += d.toString("latin1")));
    s.on("error", done);
    s.on("close", done);
    s.on("connect", () => {
      s.write(bytes);
      if (opts.closeAfterWrite === true) done();
    });
  });
}

const upgrade = (path: string): string => `GET ${path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n`;

describe("hostile clients against a real daemon", () => {
  let d: TestDaemon;
  beforeAll(async () => {
    d = await startDaemon();
  });
  afterAll(async () => {
    await d.stop();
  });

  it("a malformed percent-encoding on the console-attach route is a 400, and the daemon lives", async () => {
    const answer = await rawExchange(d.socket, upgrade("/v1/vms/%E0%A4%A/console/attach"));
    expect(answer).toMatch(/^HTTP\/1\.1 400 /);
    expect(answer).toContain("application/problem+json");
    expect(await d.client.health()).toBeTruthy();
  });

  it("clients that hang up at once on a refused upgrade, many times over, leave the daemon serving", async () => {
    for (let i = 0; i < 50; i++) {
      await rawExchange(d.socket, upgrade(i % 2 === 0 ? "/v1/vms/nosuchvm/console/attach" : "/nowhere"), { closeAfterWrite: true });
    }
    expect(d.proc.exitCode).toBeNull();
    expect(await d.client.health()).toBeTruthy();
  });
});

describe("the data directory", () => {
  it("is made owner-only at start even when it existed with loose permissions", async () => {
    const home = mkdtempSync(join(tmpdir(), "tvd-loose-"));
    chmodSync(home, 0o755);
    const d = await startDaemon({ home });
    try {
      expect(statSync(home).mode & 0o777).toBe(0o700);
      expect(statSync(d.socket).mode & 0o077).toBe(0);
    } finally {
      await d.stop();
    }
  });
});

describe("a daemon killed halfway", () => {
  it("leaves nothing half-made after the next start: staging and unknown VM directories and stale sockets go, with events", async () => {
    const home = mkdtempSync(join(tmpdir(), "tvd-orphans-"));
    // what a SIGKILL at the wrong moment leaves: a create's staging directory with a big disk in it,
    // a VM directory renamed into place but never recorded, sockets of a VMM that is gone
    mkdirSync(join(home, "vms", "0123456789ab.creating"), { recursive: true });
    writeFileSync(join(home, "vms", "0123456789ab.creating", "disk0.raw"), Buffer.alloc(1 << 20));
    mkdirSync(join(home, "vms", "ba9876543210"), { recursive: true });
    mkdirSync(join(home, "run"), { recursive: true });
    writeFileSync(join(home, "run", "ba9876543210.api"), "");
    writeFileSync(join(home, "run", "ba9876543210.con"), "");
    const d = await startDaemon({ home });
    try {
      for (const p of ["vms/0123456789ab.creating", "vms/ba9876543210", "run/ba9876543210.api", "run/ba9876543210.con"]) expect(existsSync(join(home, p)), p).toBe(false);
      const cleanups = (await d.client.events()).filter((e) => e.type === "daemon.cleanup");
      expect(cleanups.map((e) => e.message).join("\n")).toMatch(/half-made VM directory .*0123456789ab\.creating/);
      expect(cleanups).toHaveLength(4);
    } finally {
      await d.stop();
    }
  });
});

describe("concurrent creates", () => {
  it("never allocate past the disk budget together, however they interleave", async () => {
    // An image with a real ext4 root: growing each VM's copy awaits e2fsck and resize2fs, so
    // creates of different names overlap between their admission and their inventory row.
    const dataHome = mkdtempSync(join(tmpdir(), "tvd-img-"));
    const img = join(dataHome, "images", "small");
    mkdirSync(img, { recursive: true });
    writeFileSync(join(img, "vmlinuz"), Buffer.alloc(4096));
    execFileSync("mkfs.ext4", ["-q", "-F", join(img, "rootfs.ext4"), "8M"], { timeout: 60_000 });
    const home = mkdtempSync(join(tmpdir(), "tvd-budget-"));
    const fs = statfsSync(home);
    const total = fs.blocks * fs.bsize;
    const perVm = 64 * 2 ** 20;
    // a budget of three and a half VMs' disks
    const ratio = (3.5 * perVm) / total;
    const d = await startDaemon({ home, args: ["--disk-overcommit", ratio.toPrecision(6)], env: { TYPEVISOR_HOME: dataHome } });
    try {
      const results = await Promise.allSettled(
        Array.from({ length: 8 }, (_, i) => d.client.createVm({ name: `race-${i}`, image: "small", memoryMiB: 64, diskSize: perVm })),
      );
      const made = results.filter((r) => r.status === "fulfilled").length;
      expect(made).toBe(3);
      for (const r of results) if (r.status === "rejected") expect(String(r.reason)).toMatch(/not enough disk/);
      const vms = await d.client.listVms();
      expect(vms.reduce((n, v) => n + v.disks.reduce((m, x) => m + x.sizeBytes, 0), 0)).toBeLessThanOrEqual(Math.floor(total * Number(ratio.toPrecision(6))));
    } finally {
      await d.stop();
    }
  }, 120_000);
});

describe.skipIf(!existsSync("/dev/kvm"))("a console client that stays attached", () => {
  it("does not hold the daemon up when it is told to stop", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tvd-attach-"));
    const kernel = join(dir, "tiny.bin");
    writeTinyKernel(kernel);
    const d = await startDaemon({ args: ["--force-kvm", "--allow-files", dir] });
    try {
      await d.client.createVm({ name: "held", kernel, memoryMiB: 64, rng: false }, { start: true });
      const attached = await d.client.attachConsole("held");
      attached.on("error", () => undefined);
      const exit = await Promise.race([d.stop("SIGTERM"), new Promise((r) => setTimeout(() => r("still running 15 s after SIGTERM"), 15_000))]);
      expect(exit, d.log().slice(-2000)).toBe(0);
      attached.destroy();
    } finally {
      await d.stop("SIGKILL");
      for (const pid of vmmProcesses(d.home)) process.kill(pid, "SIGKILL");
    }
  }, 60_000);
});
