// Lab test: QEMU with real KVM (inside the lab) boots the minimal image built on the host by
// `typevisor image build minimal` (the lab's root is read-only: images cannot be built in here).
import { spawn, type ChildProcessWithoutNullStreams } from "node:child_process";
import { copyFileSync, existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeAll, describe, expect, it } from "vitest";
import { hostKvmKind } from "../lab/kvm-kind.js";
import { EXIT_LINE_PREFIX, parseGuestExit, ROOTFS_UP_LINE, runScriptArg, USERSPACE_UP_LINE } from "./guest-init.js";
import { imagePaths, loadImage } from "./image.js";
import { microvm } from "../../test/helpers/qemu-microvm.js";

const WAIT_MS = 150_000;

/** QEMU with the guest's serial console on its stdin/stdout. */
class SerialGuest {
  output = "";
  readonly exited: Promise<number | null>;
  private readonly child: ChildProcessWithoutNullStreams;
  private readonly t0 = performance.now();
  private waiters: (() => void)[] = [];

  constructor(args: string[]) {
    this.child = spawn("qemu-system-x86_64", args, { stdio: ["pipe", "pipe", "pipe"] });
    const onData = (d: Buffer): void => {
      this.output += d.toString("utf8");
      for (const w of this.waiters) w();
    };
    this.child.stdout.on("data", onData);
    this.child.stderr.on("data", onData);
    this.exited = new Promise((resolve) => this.child.on("exit", (code) => resolve(code)));
  }

  seconds(): number {
    return (performance.now() - this.t0) / 1000;
  }

  /** Wait until `re` matches output after offset `from`; returns the index after the match. */
  async waitFor(re: RegExp, from = 0, timeoutMs = WAIT_MS): Promise<number> {
    const find = (): number | undefined => {
      const m = new RegExp(re.source, re.flags.replace("g", "")).exec(this.output.slice(from));
      return m === null ? undefined : from + m.index + m[0].length;
    };
    const hit = find();
    if (hit !== undefined) return hit;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`timed out waiting for ${re} after ${this.seconds().toFixed(1)} s; console:\n${this.output.slice(-3000)}`)), timeoutMs);
      const check = (): void => {
        const at = find();
        if (at === undefined) return;
        clearTimeout(timer);
        this.waiters = this.waiters.filter((w) => w !== check);
        resolve(at);
      };
      this.waiters.push(check);
      void this.exited.then(() => {
        check();
        clearTimeout(timer);
        reject(new Error(`QEMU exited while waiting for ${re}; console:\n${this.output.slice(-3000)}`));
      });
    });
  }

  type(text: string): void {
    this.child.stdin.write(text);
  }

  kill(): void {
    this.child.kill("SIGKILL");
  }
}

describe("minimal image under QEMU -accel kvm (lab)", () => {
  const paths = imagePaths("minimal");
  let guest: SerialGuest | undefined;
  let cmdline = "";

  beforeAll(async () => {
    expect(hostKvmKind(), "lab tests need hardware-like KVM: run them with `npm run test:lab`").toBe("hardware");
    expect(existsSync(paths.manifest), `no minimal image at ${paths.dir}: run \`typevisor image build minimal\` on the host first`).toBe(true);
    cmdline = (await loadImage("minimal")).cmdline;
  });

  afterEach(() => {
    guest?.kill();
    guest = undefined;
  });

  it("boots to a shell prompt on the serial console, runs a command, and powers off", async () => {
    const g = (guest = new SerialGuest(microvm(paths.kernel, paths.initrd, cmdline)));
    let at = await g.waitFor(new RegExp(USERSPACE_UP_LINE));
    const upAt = g.seconds();
    at = await g.waitFor(/typevisor:\/[^\n]*# /, at);
    const promptAt = g.seconds();
    g.type("echo hello-$((6*7))\n");
    await g.waitFor(/\nhello-42\r?\n/, at);
    g.type("poweroff\n");
    const code = await Promise.race([g.exited, new Promise<string>((r) => setTimeout(() => r("still running"), 60_000))]);
    expect(code).toBe(0);
    console.log(`microvm+kvm in the lab: userspace up at ${upAt.toFixed(1)} s, shell prompt at ${promptAt.toFixed(1)} s, powered off at ${g.seconds().toFixed(1)} s`);
  });

  it("runs a typevisor.run= script and reports its exit code", async () => {
    const script = "echo script-says-$((40+2)); exit 3";
    const g = (guest = new SerialGuest(microvm(paths.kernel, paths.initrd, `${cmdline} ${runScriptArg(script)}`)));
    await g.waitFor(new RegExp(`${EXIT_LINE_PREFIX}\\d+`));
    expect(await g.exited).toBe(0);
    expect(g.output).toContain("script-says-42");
    expect(parseGuestExit(g.output)).toBe(3);
    expect(g.output.split(USERSPACE_UP_LINE).length - 1).toBe(1);
    console.log(`typevisor.run in the initramfs: exit reported and QEMU gone at ${g.seconds().toFixed(1)} s`);
  });

  it("mounts rootfs.ext4 given as root=/dev/vda and runs the script there", async () => {
    const dir = mkdtempSync(join(tmpdir(), "tv-rootfs-"));
    try {
      const disk = join(dir, "rootfs.ext4");
      copyFileSync(paths.rootfs, disk); // the guest mounts it read-write
      const script = "test -e /etc/typevisor/rootfs && grep -q '^/dev/vda / ext4' /proc/mounts && echo on-rootfs; exit 7";
      const g = (guest = new SerialGuest(
        microvm(paths.kernel, paths.initrd, `${cmdline} root=/dev/vda ${runScriptArg(script)}`, [
          "-drive", `file=${disk},if=none,id=root,format=raw`,
          "-device", "virtio-blk-device,drive=root",
        ]),
      ));
      await g.waitFor(new RegExp(`${EXIT_LINE_PREFIX}\\d+`));
      expect(await g.exited).toBe(0);
      expect(g.output).toContain(ROOTFS_UP_LINE);
      expect(g.output).toContain("on-rootfs");
      expect(parseGuestExit(g.output)).toBe(7);
      console.log(`root=/dev/vda (virtio-mmio): exit reported and QEMU gone at ${g.seconds().toFixed(1)} s`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
