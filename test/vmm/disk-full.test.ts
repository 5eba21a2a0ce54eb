/**
 * A VM whose disk's filesystem fills up mid-write (QEMU's werror=enospc): a real VMM process
 * (`typevisor run` from dist/) on this host's KVM, a tiny guest that writes its whole disk
 * through virtio-blk (test/fixtures/disk-writer.c), the disk on a real tmpfs with a size= limit
 * and a ballast file. The VMM pauses the VM (vCPUs stopped) and says why on GET /vm; after the
 * ballast goes, POST /resume lets the held write and the rest finish: every sector the guest
 * wrote is in the file, and the qcow2 image is clean for `qemu-img check`. Needs root (mount).
 */
import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createQcow2 } from "../../src/vmm/disk/qcow2/create.js";
import { qemuCheck, qemuRaw } from "../../src/vmm/disk/test-disk.js";
import { checkDiskPattern, DISK_GUEST_DONE, writeDiskGuest } from "../helpers/disk-guest.js";
import { unixApi } from "../helpers/unix-api.js";

const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
const dir = mkdtempSync(join(tmpdir(), "tv-diskfull-"));
const mnt = join(dir, "mnt");
const kernel = join(dir, "disk-writer.bzImage");
const MiB = 1024 * 1024;

beforeAll(() => {
  writeDiskGuest(kernel);
  mkdirSync(mnt);
  execFileSync("mount", ["-t", "tmpfs", "-o", "size=12m,mode=0700", "tv-diskfull", mnt]);
});
afterAll(() => {
  try {
    execFileSync("umount", [mnt]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});


async function until<T>(what: string, get: () => T | undefined | Promise<T | undefined>, ms = 60_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await get();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

for (const format of ["qcow2", "raw"] as const) {
  describe(`a ${format} disk on a filesystem that fills up`, () => {
    it("pauses the VM with the reason on GET /vm; resume after freeing space finishes every write", async () => {
      const img = join(mnt, `disk.${format}`);
      if (format === "qcow2") createQcow2(img, { size: 8 * MiB });
      else {
        writeFileSync(img, "");
        truncateSync(img, 8 * MiB);
      }
      const ballast = join(mnt, "ballast");
      writeFileSync(ballast, Buffer.alloc(8 * MiB, 1));
      const d = mkdtempSync(join(dir, `${format}-`));
      const files = { log: join(d, "console.log"), api: join(d, "api.sock"), exit: join(d, "exit.json") };
      const child = spawn(process.execPath, [
        BIN, "run", "--kernel", kernel, "--memory", "64", "--force-kvm", "--no-lab",
        "--disk", `${img},format=${format}`, "--console-log", files.log, "--api-socket", files.api, "--exit-file", files.exit,
      ], { stdio: ["ignore", "pipe", "pipe"] });
      let stderr = "";
      child.stderr!.on("data", (b: Buffer) => (stderr += b.toString()));
      const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
      try {
        const info = await until("the VMM to pause for the full disk", async () => {
          if (!existsSync(files.api)) return undefined;
          const r = await unixApi(files.api, "GET", "/vm").catch(() => undefined);
          return r?.body?.state === "paused" ? r.body : undefined;
        });
        expect(info.pauseReason).toMatchObject({ kind: "disk-full", errno: "ENOSPC", op: "write", disk: img, filesystem: { mountPoint: mnt, type: "tmpfs" } });
        expect(info.pauseReason.message).toContain(`the filesystem ${mnt} (tmpfs) is full`);
        expect(stderr).toContain(`typevisor: disk ${img}: the filesystem ${mnt} (tmpfs) is full`);
        const console1 = readFileSync(files.log, "utf8");
        expect(console1).not.toContain(DISK_GUEST_DONE);
        expect(console1).not.toContain("I/O error");
        // Paused means stopped: the guest makes no progress.
        await new Promise((r) => setTimeout(r, 500));
        expect(readFileSync(files.log, "utf8")).toBe(console1);

        rmSync(ballast);
        expect((await unixApi(files.api, "POST", "/resume")).status).toBe(200);
        expect(await exited).toBe(0);
        const out = readFileSync(files.log, "utf8");
        expect(out).toContain(DISK_GUEST_DONE);
        expect(out).not.toContain("I/O error");
        expect(JSON.parse(readFileSync(files.exit, "utf8"))).toMatchObject({ result: "poweroff" });
        const disk = format === "qcow2" ? qemuRaw(img, join(dir, "check.raw")) : readFileSync(img);
        expect(disk.length).toBe(8 * MiB);
        expect(checkDiskPattern(disk)).toBeUndefined();
        if (format === "qcow2") expect(qemuCheck(img)).toMatchObject({ status: 0 });
      } finally {
        child.kill("SIGKILL");
        await exited;
        rmSync(ballast, { force: true });
        rmSync(img, { force: true });
      }
    }, 120_000);
  });
}
