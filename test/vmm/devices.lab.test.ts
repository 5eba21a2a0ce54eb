/**
 * Lab tests (real KVM): virtio-blk and virtio-rng over PCI with MSI-X, seen by
 * an unmodified Debian guest. The disk's contents are checked from the host
 * with e2fsprogs' debugfs (a reader nobody here wrote).
 */
import { execFileSync } from "node:child_process";
import { SYNC_TIMEOUT_MS } from "../helpers/sync-timeout.js";
import { createHash } from "node:crypto";
import { copyFileSync, mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { parseGuestExit, runScriptArg } from "../../src/images/guest-init.js";
import { imagePaths } from "../../src/images/image.js";
import { ConsoleProcess } from "../helpers/console-process.js";

const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
const img = imagePaths("minimal");
const running: ConsoleProcess[] = [];
afterEach(() => {
  for (const p of running.splice(0)) p.kill();
});

const sockets = mkdtempSync(join(tmpdir(), "tv-devices-api-"));
let boots = 0;

// Each boot has an API socket so that a guest that hangs is reported with the VMM's own view of
// its threads and virtqueues (ConsoleProcess.exit).
async function boot(args: string[], script: string, append = ""): Promise<{ code: number | null; out: string }> {
  const cmdline = `${append} ${runScriptArg(script)}`.trim();
  const sock = join(sockets, `api-${boots++}.sock`);
  const p = new ConsoleProcess(process.execPath, [BIN, "run", "--no-lab", "--no-reboot", "--image", "minimal", "--memory", "256", "--api-socket", sock, ...args, "--append", cmdline]);
  running.push(p);
  const code = await p.exit();
  return { code, out: p.output };
}

const sha256 = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

describe("virtio devices over PCI under real KVM", () => {
  const dir = mkdtempSync(join(tmpdir(), "tv-disk-"));
  const disk = join(dir, "root.ext4");

  it("root on virtio-blk: a file written in the guest survives power-off, bit for bit, and boots again", async () => {
    copyFileSync(img.rootfs, disk);
    const write = await boot(
      ["--disk", `${disk},serial=tv-root-1`],
      [
        "dd if=/dev/urandom of=/data.bin bs=1M count=6 2>/dev/null",
        'echo "sum=$(sha256sum /data.bin | cut -d" " -f1)"',
        'echo "serial=$(cat /sys/block/vda/serial)"',
        "sync",
      ].join("; "),
      "root=/dev/vda",
    );
    expect(write.out).toContain("typevisor-guest: rootfs up");
    expect(parseGuestExit(write.out)).toBe(0);
    expect(write.code).toBe(0);
    expect(write.out).toContain("serial=tv-root-1");
    const sum = /sum=([0-9a-f]{64})/.exec(write.out)?.[1];
    expect(sum).toBeDefined();

    // The host reads the file out of the ext4 image with debugfs.
    const out = join(dir, "data.bin");
    execFileSync("debugfs", ["-R", `dump /data.bin ${out}`, disk], { stdio: "ignore", timeout: SYNC_TIMEOUT_MS });
    expect(sha256(readFileSync(out))).toBe(sum);
    expect(execFileSync("e2fsck", ["-fn", disk], { encoding: "utf8", timeout: SYNC_TIMEOUT_MS })).toMatch(/clean|files/);

    const again = await boot(["--disk", disk], 'echo "sum=$(sha256sum /data.bin | cut -d" " -f1)"', "root=/dev/vda");
    expect(again.out).toContain(`sum=${sum}`);
    expect(again.code).toBe(0);
  });

  // One boot for two devices (each boot is ~30 s of the lab group): a read-only disk and virtio-rng.
  it("a read-only disk refuses writes in the guest and is not modified; virtio-rng feeds /dev/hwrng", async () => {
    const ro = join(dir, "ro.img");
    copyFileSync(img.rootfs, ro);
    const before = sha256(readFileSync(ro));
    const r = await boot(
      ["--disk", `${ro},readonly=on`, "--rng"],
      'echo "ro=$(cat /sys/block/vda/ro)"; if dd if=/dev/zero of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null; then echo write=ok; else echo write=refused; fi; ' +
        'echo "rng=$(cat /sys/class/misc/hw_random/rng_current) bytes=$(head -c 4096 /dev/hwrng | wc -c)"',
    );
    expect(r.out).toContain("ro=1");
    expect(r.out).toContain("write=refused");
    expect(r.out).toMatch(/rng=virtio_rng\.\d+ bytes=4096/);
    expect(r.code).toBe(0);
    expect(sha256(readFileSync(ro))).toBe(before);
  });
});
