/**
 * Lab test (real KVM): snapshot and restore of a Debian-kernel guest with 2 vCPUs, root on
 * virtio-blk. The guest keeps state only in RAM (a counting process, a tmpfs file of random
 * bytes with a known checksum); the VMM is snapshotted while it runs, killed, and a new VMM
 * restored from the snapshot two minutes later must continue that guest: the count goes on from
 * where it was (no new boot: the same boot id and uptime going on), the checksum matches, both
 * vCPUs run, the guest's clock is right, the disk takes writes and is clean (`e2fsck -fn`)
 * once the restored guest powers off, and the kernel logs no soft lockup.
 */
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdtempSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { runScriptArg } from "../../src/images/guest-init.js";
import { imagePaths } from "../../src/images/image.js";
import { ConsoleProcess } from "../helpers/console-process.js";
import { SYNC_TIMEOUT_MS } from "../helpers/sync-timeout.js";
import { unixApi } from "../helpers/unix-api.js";

const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
/** How long the snapshot sits on disk before the restore: the guest clock must catch up this much. */
const GAP_MS = 120_000;

/** A console command loop: each line typed is run, its output framed by markers. */
const SCRIPT = [
  "mkdir -p /run/t && mount -t tmpfs tmpfs /run/t",
  "dd if=/dev/urandom of=/run/t/ram bs=1M count=16 2>/dev/null",
  'echo "ram=$(md5sum /run/t/ram | cut -d" " -f1)"',
  // A counter that lives only in this process's memory (and a file on tmpfs it rewrites).
  "(i=0; while true; do i=$((i+1)); echo $i > /run/t/count; sleep 1; done) &",
  'echo "boot_id=$(cat /proc/sys/kernel/random/boot_id)"',
  'echo "clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"',
  'echo "typevisor-test: ready"',
  'while read -r line; do eval "$line"; echo "typevisor-test: done"; done',
].join("\n");

describe("snapshot and restore of a running guest under real KVM", () => {
  const dir = mkdtempSync(join(tmpdir(), "tv-snaplab-"));

  it("continues the guest where it was: RAM, processes, clock, both vCPUs, a consistent disk", async () => {
    const disk = join(dir, "root.ext4");
    copyFileSync(imagePaths("minimal").rootfs, disk);
    const snap = join(dir, "snap");
    const api1 = join(dir, "api1.sock");
    const a = new ConsoleProcess(process.execPath, [
      BIN, "run", "--no-lab", "--no-reboot", "--image", "minimal", "--cpus", "2", "--memory", "512",
      "--disk", disk, "--api-socket", api1, "--append", `root=/dev/vda ${runScriptArg(SCRIPT)}`,
    ]);
    let ram: string;
    let bootId: string;
    let countBefore: number;
    let skewBefore = 0;
    try {
      let at = await a.waitFor(/typevisor-test: ready/, 0, 900_000);
      console.log(`snapshot-lab: booted at ${a.seconds().toFixed(0)} s`);
      ram = /ram=([0-9a-f]{32})/.exec(a.output)?.[1] ?? "";
      bootId = /boot_id=([0-9a-f-]{36})/.exec(a.output)?.[1] ?? "";
      expect(ram).not.toBe("");
      // The guest's clock against the host's before the snapshot: the lab's nested, emulated CPU
      // makes a guest's own timekeeping drift by itself, which the restore must not be blamed for.
      a.type('echo "guest_then=$(date +%s)"\n');
      // Up to the line's end: the console's output can arrive split inside the number.
      at = await a.waitFor(/guest_then=\d+\r?\n/, at, 300_000);
      skewBefore = Number(/guest_then=(\d+)\r?\n/.exec(a.output)?.[1]) - Math.floor(Date.now() / 1000);
      at = await a.waitFor(/typevisor-test: done/, at, 300_000);
      // Some disk writes in flight while the snapshot is taken.
      a.type("dd if=/dev/urandom of=/before bs=1M count=4 2>/dev/null; sync; cat /run/t/count\n");
      const typed = at;
      at = await a.waitFor(/typevisor-test: done/, at, 300_000);
      countBefore = Number(/(\d+)\s*\r?\ntypevisor-test: done/.exec(a.output.slice(typed, at))?.[1]);
      expect(countBefore).toBeGreaterThan(0);
      const r = await unixApi(api1, "POST", "/snapshot", { path: snap });
      expect(r.status, JSON.stringify(r.body)).toBe(200);
      console.log(`snapshot-lab: snapshot took ${r.body.ms} ms, ${r.body.dataBytes} bytes of memory written`);
      expect(r.body.dataBytes).toBeLessThan(512 * 1024 * 1024);
    } finally {
      a.kill();
      await a.exited;
    }

    await new Promise((r) => setTimeout(r, GAP_MS));
    const api2 = join(dir, "api2.sock");
    const t0 = performance.now();
    const b = new ConsoleProcess(process.execPath, [BIN, "run", "--no-lab", "--no-reboot", "--restore", snap, "--api-socket", api2]);
    try {
      // The clock first, alone, read against the host's the moment it appears (what follows is slow on the lab's emulated CPU).
      b.type('echo "guest_now=$(date +%s)"\n');
      await b.waitFor(/guest_now=\d+\r?\n/, 0, 300_000);
      const hostNow = Math.floor(Date.now() / 1000);
      const check = [
        'echo "count=$(cat /run/t/count)"',
        'echo "ram=$(md5sum /run/t/ram | cut -d" " -f1)"',
        'echo "boot_id=$(cat /proc/sys/kernel/random/boot_id)"',
        'for c in 0 1; do taskset -c $c sh -c \'echo "pinned=$1:$(cut -d" " -f39 /proc/self/stat)"\' sh $c; done',
        "dd if=/dev/urandom of=/after bs=1M count=4 2>/dev/null; sync; echo written=$?",
      ].join("; ");
      b.type(`${check}\n`);
      await b.waitFor(/written=0[\s\S]*typevisor-test: done/, 0, 300_000);
      console.log(`snapshot-lab: restored guest answered ${((performance.now() - t0) / 1000).toFixed(1)} s after the VMM started`);
      const out = b.output;
      const count = Number(/count=(\d+)/.exec(out)?.[1]);
      // The counter went on from where it was (not from 1: that would be a new boot).
      expect(count).toBeGreaterThanOrEqual(countBefore);
      expect(out).toContain(`ram=${ram}`);
      expect(out).toContain(`boot_id=${bootId}`);
      const guestNow = Number(/guest_now=(\d+)/.exec(out)?.[1]);
      const skewAfter = guestNow - hostNow;
      console.log(`snapshot-lab: guest clock ${/clocksource=(\S+)/.exec(a.output)?.[1] ?? "?"}; skew before the snapshot ${skewBefore} s, after the restore ${skewAfter} s (gap ${GAP_MS / 1000} s)`);
      // The restore moved the clock on by exactly the time away: the guest's skew against the host
      // is what it was before the snapshot (the lab's guests run some seconds behind the host from
      // boot, so the absolute skew is not the restore's). Without the clock moved on the skew grows
      // by the whole gap (64 s after a 60 s gap, before the TSC was advanced too).
      expect(Math.abs(skewAfter - skewBefore), `guest ${guestNow} host ${hostNow}, skew before ${skewBefore}`).toBeLessThanOrEqual(10);
      expect(out).toContain("pinned=0:0");
      expect(out).toContain("pinned=1:1");
      expect(out).toContain("written=0");
      b.type("poweroff -f\n");
      expect(await b.exited).toBe(0);
      expect(out).not.toMatch(/soft lockup|rcu.*stall/i);
    } finally {
      b.kill();
    }
    // The disk the restored guest went on writing is consistent.
    execFileSync("e2fsck", ["-fn", disk], { stdio: "pipe", timeout: SYNC_TIMEOUT_MS });
    expect(existsSync(snap)).toBe(true);
  }, 2_400_000);
});
