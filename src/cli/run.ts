/**
 * `typevisor run`: one VM in this process, its serial console on the terminal.
 * Exit status: 0 when the guest powers off (or is stopped through the API),
 * 1 when it crashes, 2 for bad input. A guest reboot restarts the VM unless
 * --no-reboot.
 */
import { existsSync, readFileSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Server } from "node:http";
import { Option, type Command } from "commander";
import { TypevisorError } from "../errors.js";
import { imagePaths } from "../images/dirs.js";
import { kvmHostKind } from "../kvm/kvm.js";
import { validateKernel } from "../vmm/arch/x86_64/boot/index.js";
import { parseBalloonSpec, parseDiskSpec, parseNetSpec, parseVsockSpec, type DeviceSpecs } from "../vmm/device-specs.js";
import { startControlServer } from "../vmm/api/server.js";
import { DEFAULT_CMDLINE } from "../vmm/defaults.js";
import { Vm, validateConfig, type VmExitResult } from "../vmm/vm.js";


export interface RunOptions {
  image?: string;
  kernel?: string;
  initrd?: string;
  cmdline?: string;
  append?: string;
  cpus: string;
  memory: string;
  reboot: boolean;
  apiSocket?: string;
  lab: boolean;
  disk: string[];
  net: string[];
  rng: boolean;
  balloon?: string | boolean;
  vsock?: string;
}

/** Ctrl-A x quits, as in QEMU's -nographic console. */
const ESCAPE = 0x01;

function defaultVsockPath(): string {
  const dir = process.env["XDG_RUNTIME_DIR"] !== undefined && process.env["XDG_RUNTIME_DIR"] !== "" ? process.env["XDG_RUNTIME_DIR"] : tmpdir();
  return join(dir, `typevisor-vsock-${process.pid}.sock`);
}

function parseIntArg(name: string, v: string): number {
  if (!/^\d+$/.test(v.trim())) throw new TypevisorError("INVALID_ARGUMENT", `${name} must be a whole number (got "${v}")`);
  return Number(v);
}

function readInput(path: string, what: string): Uint8Array {
  try {
    const st = statSync(path);
    if (!st.isFile()) throw new TypevisorError("INVALID_ARGUMENT", `${what} ${path} is not a regular file`);
    return readFileSync(path);
  } catch (e) {
    if (e instanceof TypevisorError) throw e;
    const code = (e as NodeJS.ErrnoException).code;
    throw new TypevisorError("FILE_NOT_FOUND", `${what} ${path}: ${code === "ENOENT" ? "no such file" : (e as Error).message}`);
  }
}

export interface ResolvedBoot {
  kernel: Uint8Array;
  initrd?: Uint8Array;
  cmdline: string;
}

export async function resolveBoot(o: RunOptions): Promise<ResolvedBoot> {
  if (o.image !== undefined && o.kernel !== undefined) {
    throw new TypevisorError("INVALID_ARGUMENT", "give either --image or --kernel, not both");
  }
  if (o.cmdline !== undefined && o.append !== undefined) {
    throw new TypevisorError("INVALID_ARGUMENT", "give either --cmdline (replaces) or --append (adds), not both");
  }
  let kernelPath: string;
  let initrdPath = o.initrd;
  if (o.image !== undefined) {
    const p = imagePaths(o.image);
    if (!existsSync(p.kernel)) {
      throw new TypevisorError("IMAGE_NOT_FOUND", `no image named ${o.image} (${p.dir} has no kernel)`, {
        hint: `build it: typevisor image build ${o.image === "minimal" ? "minimal" : "minimal (the one recipe so far)"}`,
      });
    }
    kernelPath = p.kernel;
    initrdPath ??= p.initrd;
  } else if (o.kernel !== undefined) {
    kernelPath = o.kernel;
  } else {
    throw new TypevisorError("INVALID_ARGUMENT", "nothing to boot: give --image NAME or --kernel PATH", {
      hint: "typevisor image build minimal && typevisor run --image minimal",
    });
  }
  const cmdline = o.cmdline ?? (o.append !== undefined ? `${DEFAULT_CMDLINE} ${o.append}` : DEFAULT_CMDLINE);
  return {
    kernel: readInput(kernelPath, "kernel"),
    ...(initrdPath !== undefined ? { initrd: readInput(initrdPath, "initrd") } : {}),
    cmdline,
  };
}

export async function runCommand(o: RunOptions, log: (line: string) => void): Promise<number> {
  const cpus = parseIntArg("--cpus", o.cpus);
  const memoryMiB = parseIntArg("--memory", o.memory);
  validateConfig({ cpus, memoryMiB });
  const devices: DeviceSpecs = {
    disks: o.disk.map(parseDiskSpec),
    nets: o.net.map(parseNetSpec),
    rng: o.rng,
    ...(o.balloon !== undefined ? { balloon: parseBalloonSpec(o.balloon === true ? "" : String(o.balloon)) } : {}),
    ...(o.vsock !== undefined ? { vsock: parseVsockSpec(o.vsock, defaultVsockPath()) } : {}),
  };
  let firstBoot: ResolvedBoot | undefined = await resolveBoot(o);
  // Reject a bad kernel, initrd or command line here, before a VM exists or the lab boots.
  validateKernel({ ...firstBoot, memBytes: memoryMiB * 1024 * 1024 });
  const cmdline = firstBoot.cmdline;

  const kind = kvmHostKind();
  if (kind !== "hardware") {
    const why = kind === "pvm"
      ? "this host's /dev/kvm is PVM (software nested virtualization), which cannot boot stock Linux kernels"
      : "this host has no /dev/kvm";
    if (!o.lab) throw new TypevisorError("KVM_UNSUITABLE", why, { hint: "drop --no-lab to run inside the KVM lab, or use a host with hardware virtualization" });
    return -1; // the caller re-runs this command inside the lab
  }

  const stdin = process.stdin;
  const tty = stdin.isTTY === true;
  let current: Vm | undefined;
  let server: Server | undefined;
  let stopRequested = false;
  let escape = false;
  const onInput = (chunk: Buffer): void => {
    if (tty) {
      for (const b of chunk) {
        if (escape) {
          escape = false;
          if (b === 0x78 /* x */) {
            stopRequested = true;
            current?.stop();
            return;
          }
        } else if (b === ESCAPE) {
          escape = true;
          continue;
        }
        current?.sendInput(Uint8Array.of(b));
      }
    } else {
      current?.sendInput(chunk);
    }
  };
  if (tty) stdin.setRawMode(true);
  stdin.on("data", onInput);
  const onSignal = (): void => {
    stopRequested = true;
    current?.stop();
  };
  process.on("SIGTERM", onSignal);
  process.on("SIGINT", onSignal);

  // Say where host programs reach the guest's vsock before anything boots (the console is the guest's after that).
  if (devices.vsock !== undefined) log(`typevisor: vsock cid=${devices.vsock.cid}: connect to ${devices.vsock.uds} ("CONNECT <port>\n"); guest connections to port P reach ${devices.vsock.uds}_P`);
  try {
    for (let boots = 1; ; boots++) {
      const vm = new Vm({
        cpus, memoryMiB, consoleFd: 1, devices,
        // The files are read again for each boot rather than held in the heap for the VM's lifetime.
        boot: { kind: "linux", ...(firstBoot ?? (await resolveBoot(o))) },
      });
      current = vm;
      firstBoot = undefined;
      if (o.apiSocket !== undefined && server === undefined) {
        server = await startControlServer(o.apiSocket, {
          info: () => ({ state: current?.vmState, cpus, memoryMiB, cmdline, boots, pid: process.pid, devices: current?.devices ?? [] }),
          stats: () => current?.getStats(),
          registers: () => current?.registers(),
          balloon: async (method, body) => {
            if (current === undefined) throw new TypevisorError("VM_STATE", "no VM");
            if (method === "PUT") return current.deviceCommand("balloon.setTarget", body);
            if (method === "POST") return current.deviceCommand("balloon.requestStats");
            return current.deviceCommand("balloon.stats");
          },
          devices: async () => ((current?.devices.length ?? 0) > 0 ? current?.deviceCommand("devices") : []),
          pause: async () => current?.pause(),
          resume: () => current?.resume(),
          stop: () => {
            stopRequested = true;
            current?.stop();
          },
        });
      }
      let result: VmExitResult;
      try {
        result = await vm.run();
      } finally {
        vm.destroy();
      }
      if (result.kind === "reset" && o.reboot && !stopRequested) {
        log(`typevisor: guest reset; restarting the VM (boot ${boots + 1})`);
        continue;
      }
      switch (result.kind) {
        case "poweroff":
        case "stopped":
          return 0;
        case "reset":
          log("typevisor: guest reset (--no-reboot): exiting");
          return 0;
        case "crash":
          log(`typevisor: guest crashed: ${result.reason}`);
          if (result.dump !== undefined) log(result.dump);
          return 1;
      }
    }
  } finally {
    stdin.off("data", onInput);
    if (tty) stdin.setRawMode(false);
    stdin.pause();
    process.off("SIGTERM", onSignal);
    process.off("SIGINT", onSignal);
    server?.close();
  }
}

export function registerRunCommand(program: Command, onLab: (argv: string[]) => Promise<number>): void {
  program
    .command("run")
    .description("boot one VM with the typevisor VMM, its serial console on this terminal (Ctrl-A x quits)")
    .option("--image <name>", "boot an image built with `typevisor image build`")
    .option("--kernel <path>", "kernel to boot: bzImage, or an ELF vmlinux with a PVH entry note")
    .option("--initrd <path>", "initramfs to load with the kernel")
    .option("--cmdline <str>", `kernel command line, replacing the default "${DEFAULT_CMDLINE}"`)
    .option("--append <str>", "text appended to the default kernel command line")
    .option("--cpus <n>", "number of vCPUs", "1")
    .option("--memory <MiB>", "guest memory in MiB", "256")
    .option("--no-reboot", "exit when the guest reboots instead of restarting it")
    .option("--disk <spec>", "virtio-blk disk: PATH[,readonly=on][,serial=ID] (repeatable; the first is /dev/vda)", (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option("--net <spec>", "virtio-net on a TAP device: tap=NAME[,mac=MAC] (repeatable; the TAP is created if absent and we may)", (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option("--rng", "virtio-rng entropy device fed from the host's getrandom", false)
    .option("--vsock <spec>", "virtio-vsock: cid=N[,uds=PATH]; host programs connect to PATH and send \"CONNECT <port>\\n\", guest connections to host port P reach PATH_P")
    .option("--balloon [spec]", "virtio-balloon with statistics: [stats=SECONDS][,deflate-on-oom=on]; the API socket sets its size")
    .option("--api-socket <path>", "serve the control API on this unix socket (pause, resume, stop, stats, devices, balloon, registers; docs/vmm.md)")
    .addOption(new Option("--no-lab", "fail instead of running inside the KVM lab when this host cannot boot stock kernels"))
    .action(async (opts: RunOptions, cmd: Command) => {
      const code = await runCommand(opts, (l) => process.stderr.write(l + "\n"));
      if (code === -1) {
        process.exitCode = await onLab(cmd.parent?.args ?? []);
      } else {
        process.exitCode = code;
      }
    });
}
