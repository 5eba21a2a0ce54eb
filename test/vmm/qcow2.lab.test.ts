/**
 * Lab test (real KVM): an unmodified Debian guest with its root filesystem on our qcow2, a chain
 * base (raw, the minimal image's rootfs) <- overlay <- overlay, judged by QEMU's own tools and by
 * QEMU itself: `qemu-img check` on what we wrote, e2fsprogs' debugfs on what `qemu-img convert`
 * reads out of it, and QEMU (`-accel kvm`, in the same lab) booting the chain we built.
 */
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { loadImage, imagePaths } from "../../src/images/image.js";
import { parseGuestExit, runScriptArg } from "../../src/images/guest-init.js";
import { createQcow2 } from "../../src/vmm/disk/qcow2/create.js";
import { ConsoleProcess } from "../helpers/console-process.js";
import { microvm } from "../helpers/qemu-microvm.js";
import { SYNC_TIMEOUT_MS } from "../helpers/sync-timeout.js";

const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
const img = imagePaths("minimal");
const dir = mkdtempSync(join(tmpdir(), "tv-qcow2-lab-"));
const running: ConsoleProcess[] = [];
afterEach(() => {
  for (const p of running.splice(0)) p.kill();
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function ours(disk: string, script: string): Promise<{ code: number | null; out: string }> {
  const p = new ConsoleProcess(process.execPath, [BIN, "run", "--no-lab", "--no-reboot", "--image", "minimal", "--memory", "256", "--disk", disk, "--append", `root=/dev/vda ${runScriptArg(script)}`]);
  running.push(p);
  return { code: await p.exit(), out: p.output };
}

async function qemu(disk: string, script: string): Promise<{ code: number | null; out: string }> {
  const cmdline = (await loadImage("minimal")).cmdline;
  const p = new ConsoleProcess("qemu-system-x86_64", microvm(img.kernel, img.initrd, `${cmdline} root=/dev/vda ${runScriptArg(script)}`, ["-drive", `file=${disk},if=none,id=root,format=qcow2`, "-device", "virtio-blk-device,drive=root"]));
  running.push(p);
  return { code: await p.exit(), out: p.output };
}

const sha256 = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");
const run = (cmd: string, args: string[]) => execFileSync(cmd, args, { encoding: "utf8", timeout: SYNC_TIMEOUT_MS, stdio: ["ignore", "pipe", "pipe"] });
/** `qemu-img check`'s exit status: 0 clean, 3 leaked clusters only, 2 corruption, 1 errors. */
function check(path: string): number {
  try {
    run("qemu-img", ["check", "-f", "qcow2", path]);
    return 0;
  } catch (e) {
    return (e as { status: number }).status;
  }
}

describe("root filesystem on qcow2 under real KVM", () => {
  it("base <- overlay <- overlay: our writes pass qemu-img check, read back on the host and in QEMU, and QEMU's read back in ours", async () => {
    const base = img.rootfs;
    const baseBefore = statSync(base);
    const ov1 = join(dir, "ov1.qcow2");
    createQcow2(ov1, { size: baseBefore.size, backing: { file: base, format: "raw" } });
    const created = statSync(ov1).size;
    expect(created).toBeLessThan(1024 * 1024);

    // 1. Ours writes 6 MiB and deletes a file (discard reaches the qcow2 when the guest trims).
    const w = await ours(`${ov1},format=qcow2`, [
      "dd if=/dev/urandom of=/data.bin bs=1M count=6 2>/dev/null",
      'echo "sum=$(sha256sum /data.bin | cut -d" " -f1)"',
      "dd if=/dev/urandom of=/junk.bin bs=1M count=4 2>/dev/null; sync; rm /junk.bin; sync",
      "fstrim -v / 2>&1 || echo fstrim-unavailable",
      "sync",
    ].join("; "));
    expect(parseGuestExit(w.out), w.out.slice(-3000)).toBe(0);
    expect(w.code).toBe(0);
    const sum = /sum=([0-9a-f]{64})/.exec(w.out)?.[1];
    expect(sum).toBeDefined();
    const grown = statSync(ov1);
    console.log(`qcow2 lab: overlay ${created} B at creation, ${grown.size} B after the guest wrote 6 MiB (${grown.blocks * 512} B allocated)`);
    expect(check(ov1)).toBe(0);
    // The base was opened read-only and never written.
    const baseAfter = statSync(base);
    expect([baseAfter.size, baseAfter.mtimeMs]).toEqual([baseBefore.size, baseBefore.mtimeMs]);
    // What QEMU reads out of our image holds the file, bit for bit, on a clean ext4.
    const raw = join(dir, "ov1.raw");
    run("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", ov1, raw]);
    const out = join(dir, "data.bin");
    run("debugfs", ["-R", `dump /data.bin ${out}`, raw]);
    expect(sha256(readFileSync(out))).toBe(sum);
    expect(run("e2fsck", ["-fn", raw])).toMatch(/clean|files/);
    rmSync(raw);

    // 2. A second overlay on ours, booted by QEMU: it reads our data and writes its own.
    const ov2 = join(dir, "ov2.qcow2");
    createQcow2(ov2, { size: baseBefore.size, backing: { file: "ov1.qcow2", format: "qcow2" } });
    const q = await qemu(ov2, ['echo "qsum=$(sha256sum /data.bin | cut -d" " -f1)"', "echo written-by-qemu > /qemu.txt", "sync"].join("; "));
    expect(q.out, q.out.slice(-3000)).toContain(`qsum=${sum}`);
    expect(parseGuestExit(q.out)).toBe(0);
    expect(check(ov2)).toBe(0);

    // 3. Ours boots the three-level chain and sees both.
    const r = await ours(`${ov2},format=qcow2`, 'echo "sum=$(sha256sum /data.bin | cut -d" " -f1)"; cat /qemu.txt');
    expect(r.out, r.out.slice(-3000)).toContain(`sum=${sum}`);
    expect(r.out).toContain("written-by-qemu");
    expect(parseGuestExit(r.out)).toBe(0);
    expect(check(ov2)).toBe(0);
    expect(check(ov1)).toBe(0);
  });

  it("a qcow2 file given without format=qcow2 is refused, and the file is left alone", async () => {
    const ov = join(dir, "plain.qcow2");
    createQcow2(ov, { size: statSync(img.rootfs).size, backing: { file: img.rootfs, format: "raw" } });
    const before = sha256(readFileSync(ov));
    const r = await ours(ov, "true");
    expect(r.code).not.toBe(0);
    expect(r.out).toMatch(/DISK_FORMAT/);
    expect(r.out).toMatch(/format=qcow2/);
    expect(sha256(readFileSync(ov))).toBe(before);
  });
});
