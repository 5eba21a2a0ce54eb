/**
 * Lab test (real KVM): live migration of a Debian-kernel guest (2 vCPUs, root on virtio-blk on
 * storage both "hosts" see) from a VMM on the lab's own network to a VMM in another network
 * namespace, the stream over TCP across a veth pair. The guest prints a counter every 100 ms:
 * after the move the destination's console goes on counting from where the source stopped (no
 * restart), the source VMM ends as migrated, and the disk takes writes at the destination and is
 * clean afterwards (`e2fsck -fn`).
 */
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runScriptArg } from "../../src/images/guest-init.js";
import { imagePaths } from "../../src/images/image.js";
import { ConsoleProcess } from "../helpers/console-process.js";
import { SYNC_TIMEOUT_MS } from "../helpers/sync-timeout.js";
import { unixApi } from "../helpers/unix-api.js";

const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
const NS = "tvmigb";
const ADDR_A = "10.77.0.1";
const ADDR_B = "10.77.0.2";
const ip = (...args: string[]): void => void execFileSync("ip", args, { timeout: SYNC_TIMEOUT_MS, stdio: "pipe" });

const SCRIPT = [
  "(i=0; while true; do i=$((i+1)); echo \"tick=$i\"; sleep 0.1; done) &",
  'echo "typevisor-test: ready"',
  'while read -r line; do eval "$line"; echo "typevisor-test: done"; done',
].join("\n");

describe("live migration of a running guest between two network namespaces under real KVM", () => {
  const dir = mkdtempSync(join(tmpdir(), "tv-miglab-"));
  beforeAll(() => {
    ip("netns", "add", NS);
    ip("link", "add", "tvmig0", "type", "veth", "peer", "name", "tvmig1");
    ip("link", "set", "tvmig1", "netns", NS);
    ip("addr", "add", `${ADDR_A}/24`, "dev", "tvmig0");
    ip("link", "set", "tvmig0", "up");
    ip("netns", "exec", NS, "ip", "addr", "add", `${ADDR_B}/24`, "dev", "tvmig1");
    ip("netns", "exec", NS, "ip", "link", "set", "tvmig1", "up");
    ip("netns", "exec", NS, "ip", "link", "set", "lo", "up");
  });
  afterAll(() => {
    try {
      ip("link", "del", "tvmig0");
    } catch {
      // gone with the namespace
    }
    ip("netns", "del", NS);
  });

  it("moves the guest: the counter goes on at the destination, the disk stays consistent", async () => {
    const disk = join(dir, "root.ext4");
    copyFileSync(imagePaths("minimal").rootfs, disk);
    const apiA = join(dir, "a.sock");
    const apiB = join(dir, "b.sock");
    const a = new ConsoleProcess(process.execPath, [
      BIN, "run", "--no-lab", "--no-reboot", "--image", "minimal", "--cpus", "2", "--memory", "512",
      "--disk", disk, "--api-socket", apiA, "--append", `root=/dev/vda ${runScriptArg(SCRIPT)}`,
    ]);
    const b = new ConsoleProcess("ip", ["netns", "exec", NS, process.execPath, BIN, "run", "--no-lab", "--no-reboot", "--incoming", `tcp:${ADDR_B}:7070`, "--plain-tcp", "--disk", disk, "--api-socket", apiB]);
    try {
      await a.waitFor(/typevisor-test: ready/, 0, 900_000);
      await a.waitFor(/tick=20\b/, 0, 120_000);
      await b.waitFor(/waiting for a migration/, 0, 300_000);
      console.log(`migration-lab: source booted at ${a.seconds().toFixed(0)} s`);
      const r = await unixApi(apiA, "POST", "/migrate", { to: `tcp:${ADDR_B}:7070`, plainTcp: true });
      expect(r.status, JSON.stringify(r.body)).toBe(202);
      expect(await a.exited, a.output.slice(-2000)).toBe(0);
      const moved = /migrated to .* \(downtime (\d+) ms, (\d+) bytes in (\d+) rounds\)/.exec(a.output);
      expect(moved, a.output.slice(-2000)).not.toBeNull();
      console.log(`migration-lab: downtime ${moved?.[1]} ms, ${moved?.[2]} bytes in ${moved?.[3]} rounds`);
      const ticksA = [...a.output.matchAll(/tick=(\d+)/g)].map((m) => Number(m[1]));
      const lastA = Math.max(...ticksA);
      // The destination goes on counting from where the source stopped.
      await b.waitFor(new RegExp(`tick=${lastA + 5}\\b`), 0, 300_000);
      const ticksB = [...b.output.matchAll(/tick=(\d+)/g)].map((m) => Number(m[1]));
      expect(Math.min(...ticksB)).toBeGreaterThanOrEqual(lastA - 1);
      expect(ticksB).not.toContain(1);
      b.type("dd if=/dev/urandom of=/moved bs=1M count=4 2>/dev/null; sync; echo written=$?\n");
      await b.waitFor(/written=0/, 0, 300_000);
      b.type("poweroff -f\n");
      expect(await b.exited).toBe(0);
    } finally {
      a.kill();
      b.kill();
    }
    execFileSync("e2fsck", ["-fn", disk], { stdio: "pipe", timeout: SYNC_TIMEOUT_MS });
  }, 2_400_000);
});
