/**
 * `typevisor run`: one VM in this process, its serial console on the terminal
 * or, headless (--console-log / --console-socket), on a rotating log file and
 * a unix socket, as a supervisor that spawns one VMM process per VM needs.
 * Exit status: 0 when the guest powers off (or is stopped through the API or
 * SIGTERM), 1 when it crashes, 2 for bad input. A guest reboot restarts the
 * VM unless --no-reboot. --exit-file records how the process ended.
 */
import { processStatsPage } from "../vmm/stats/page.js";
import { existsSync, renameSync, unlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import type { Server } from "node:http";
import { Option, type Command } from "commander";
import { isTypevisorError, TypevisorError } from "../errors.js";
import { exitCodeFor } from "./exit-codes.js";
import { imagePaths } from "../images/dirs.js";
import { kvmHostKind } from "../kvm/kvm.js";
import { validateKernel } from "../vmm/arch/x86_64/boot/index.js";
import { parseBalloonSpec, parseDiskSpec, parseNetSpec, parseVsockSpec, type DeviceSpecs } from "../vmm/device-specs.js";
import type { ControlTarget, SwitchableTarget } from "../vmm/api/server.js";
import { DEFAULT_CMDLINE, DEFAULT_VCPU_NICE, MAX_NICE, MAX_VCPUS, MIN_MEMORY_MIB } from "../vmm/defaults.js";
import { validateConfig, type Vm, type VmExitResult } from "../vmm/vm.js";
import { bootVm, readBootPayload, restoreVm, type BootPayload, type MachineConfig, type PreparedRestore, type RestoreOverrides } from "../vmm/builder.js";
import { ConsolePipe } from "../vmm/console/console-pipe.js";
import { LOG_SIZE_LIMITS } from "../vmm/console/rotating-log.js";
import { parseSize } from "../size.js";
import { sandboxProbe } from "../vmm/sandbox-probe.js";
import { installFilter, noExecFilter } from "../sys/seccomp.js";
import { endPrestarted } from "../vmm/threads/spawn.js";

/** Console input kept while the VM is being built: what a person or a script types at once, not a stream. */
const EARLY_INPUT_MAX = 64 * 1024;

export interface RunOptions {
  image?: string;
  kernel?: string;
  initrd?: string;
  cmdline?: string;
  append?: string;
  cpus: string;
  memory: string;
  /** Nice offset of the vCPU threads (default DEFAULT_VCPU_NICE). */
  vcpuNice?: string;
  /** Guest memory allowed per byte of host memory (default 1). */
  memoryOvercommit?: string;
  reboot: boolean;
  apiSocket?: string;
  lab: boolean;
  disk: string[];
  net: string[];
  rng: boolean;
  balloon?: string | boolean;
  vsock?: string;
  /** The VM's identity for a supervisor (GET /vm `id`, visible in the process's command line). */
  id?: string;
  consoleLog?: string;
  /** Rotation size of --console-log (default 1M). */
  consoleLogSize?: string;
  consoleSocket?: string;
  exitFile?: string;
  /** Map the VMM's I/O counters onto this file (stats/page.ts): a supervisor reads them without asking the VMM. */
  statsFile?: string;
  /** Run on a PVM /dev/kvm instead of refusing or re-running in the lab (purpose-built guests boot there). */
  forceKvm?: boolean;
  /** Start from this snapshot directory instead of booting. */
  restore?: string;
  /** Leave the vCPUs parked once the VM is built (POST /resume starts them). */
  paused?: boolean;
  /** A restore keeps the guest clock where it was saved instead of moving it to now. */
  keepClock?: boolean;
  /** Wait for a live migration on tcp:ADDR:PORT or unix:PATH instead of booting. */
  incoming?: string;
  /** The incoming stream's TLS (vmm/migration/transport.ts): this side's certificate and key, the source's CA or fingerprint. */
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  tlsPeerFingerprint?: string;
  /** Accept the incoming stream over TCP without TLS. */
  plainTcp?: boolean;
  /** Wait on --api-socket for PUT /restore instead of booting (standby.ts). */
  standby?: boolean;
  /** Not flags: a standby VMM's API server, which this run answers on instead of opening its own, and who to tell once the VM is built. */
  attach?: { target: SwitchableTarget; onBuilt: () => void };
  /** The API socket, already bound at --api-socket and listening, inherited as this fd (the daemon's sandbox). */
  apiSocketFd?: string;
  /** The console socket, the same way. */
  consoleSocketFd?: string;
  /** With --standby: a snapshot whose VM to build ahead (builder.ts prepareRestore); its restore then takes that VM. */
  template?: string;
  /** Not a flag: what a standby prepared for its template. */
  prepared?: PreparedRestore;
  /** A jailed standby: the socket its daemon sends the VM's TAP descriptors on (standby.ts). */
  handoffFd?: string;
  /** Test hook of the daemon's sandbox: paths to try to open and denied system calls to try, reported on stderr. */
  sandboxProbe?: string;
  /** Install a seccomp filter refusing execve/execveat on every thread (the daemon's sandbox). */
  seccompNoExec?: boolean;
  /** Each vCPU thread installs its own narrower seccomp filter before its first KVM_RUN (the sandbox). */
  seccompVcpu?: boolean;
  /** Run this VMM in the daemon's sandbox (run-sandbox.ts; root only). */
  sandbox?: boolean;
  /** With --sandbox: the VMM's uid and gid (default: a free one of the daemon's default range). */
  sandboxUid?: string;
  /** With --sandbox: more directories the VMM may read and write (where POST /snapshot may write). */
  sandboxBind?: string[];
}

/** How the VMM process ended, as --exit-file records it. */
export type RunResult = "poweroff" | "stopped" | "reset" | "crash" | "error" | "migrated";

export interface ExitRecord {
  code: number;
  result: RunResult;
  reason?: string;
  /** ISO 8601 time of the exit. */
  at: string;
}

/** VM ids: DNS-label-like, so they are safe in file names, socket paths and process listings. */
export const VM_ID_PATTERN = /^[a-z0-9][a-z0-9-]{0,62}$/;

export function parseVmId(v: string): string {
  if (!VM_ID_PATTERN.test(v)) {
    throw new TypevisorError("INVALID_ARGUMENT", `--id must be 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit (got "${v}")`);
  }
  return v;
}

export const DEFAULT_CONSOLE_LOG_SIZE = "1M";

/**
 * Write `record` to `path` atomically (a temporary file in the same directory,
 * then rename(2)): a supervisor polling for the file never reads half of it.
 */
export function writeExitFile(path: string, record: ExitRecord): void {
  const tmp = `${path}.tmp-${process.pid}`;
  writeFileSync(tmp, JSON.stringify(record) + "\n", { mode: 0o640 });
  renameSync(tmp, path);
}


/** Ctrl-A x quits, as in QEMU's -nographic console. */
const ESCAPE = 0x01;

function defaultVsockPath(): string {
  const dir = process.env["XDG_RUNTIME_DIR"] !== undefined && process.env["XDG_RUNTIME_DIR"] !== "" ? process.env["XDG_RUNTIME_DIR"] : tmpdir();
  return join(dir, `typevisor-vsock-${process.pid}.sock`);
}

/** A descriptor inherited from the supervisor; it needs the socket's path too (messages, GET /vm). */
export function parseFdArg(name: string, v: string, path: string | undefined): number {
  const fd = parseIntArg(name, v);
  if (fd < 3) throw new TypevisorError("INVALID_ARGUMENT", `${name} must be 3 or more (0-2 are stdio)`);
  if (path === undefined) throw new TypevisorError("INVALID_ARGUMENT", `${name} needs the socket's path too (${name.replace("-fd", "")} PATH)`);
  return fd;
}

function parseIntArg(name: string, v: string): number {
  if (!/^\d+$/.test(v.trim())) throw new TypevisorError("INVALID_ARGUMENT", `${name} must be a whole number (got "${v}")`);
  return Number(v);
}

/** A positive decimal ratio such as 1, 1.5 or 0.25 (validateConfig bounds it). */
function parseRatioArg(name: string, v: string): number {
  if (!/^\d+(\.\d+)?$/.test(v.trim())) throw new TypevisorError("INVALID_ARGUMENT", `${name} must be a positive number such as 1 or 1.5 (got "${v}")`);
  return Number(v);
}

/** The kernel, initrd and command line to boot, by path (read by the builder). */
export function resolveBootPaths(o: RunOptions): NonNullable<MachineConfig["boot"]> {
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
    throw new TypevisorError("INVALID_ARGUMENT", "nothing to boot: give --image NAME or --kernel PATH (or --restore DIR)", {
      hint: "typevisor image build minimal && typevisor run --image minimal",
    });
  }
  const cmdline = o.cmdline ?? (o.append !== undefined ? `${DEFAULT_CMDLINE} ${o.append}` : DEFAULT_CMDLINE);
  return { kernel: resolve(kernelPath), ...(initrdPath !== undefined ? { initrd: resolve(initrdPath) } : {}), cmdline };
}

/**
 * Run the VM (or return -1: re-run in the lab). With --exit-file, every way out
 * of here except -1 leaves a record, written before returning or rethrowing.
 */
export async function runCommand(o: RunOptions, log: (line: string) => void): Promise<number> {
  const exitFile = o.exitFile;
  if (exitFile !== undefined) {
    // A record left by an earlier run of the same VM must not be mistaken for this run's.
    try {
      unlinkSync(exitFile);
    } catch {
      // none
    }
  }
  const record = (code: number, result: RunResult, reason?: string): void => {
    if (exitFile === undefined) return;
    try {
      writeExitFile(exitFile, { code, result, ...(reason !== undefined ? { reason } : {}), at: new Date().toISOString() });
    } catch (e) {
      log(`typevisor: cannot write --exit-file ${exitFile}: ${(e as Error).message}`);
    }
  };
  let outcome: { code: number; result: RunResult; reason?: string } | -1;
  try {
    outcome = await runVm(o, log);
  } catch (e) {
    record(exitCodeFor(e), "error", e instanceof Error ? e.message : String(e));
    throw e;
  }
  if (outcome === -1) return -1;
  record(outcome.code, outcome.result, outcome.reason);
  return outcome.code;
}

async function runVm(o: RunOptions, log: (line: string) => void): Promise<{ code: number; result: RunResult; reason?: string } | -1> {
  if (o.restore !== undefined && o.incoming !== undefined) throw new TypevisorError("INVALID_ARGUMENT", "give either --restore or --incoming, not both");
  // A restore and an incoming migration both take the machine from elsewhere: only back ends are given here.
  const restoring = o.restore !== undefined || o.incoming !== undefined;
  // The incoming stream's security, checked before anything is built (the files read now: a daemon may remove them once we listen).
  // The stream's module (and the schema library it needs) only for a VMM that has a stream.
  const streamFlags = o.incoming !== undefined || o.plainTcp === true || [o.tlsCert, o.tlsKey, o.tlsCa, o.tlsPeerFingerprint].some((f) => f !== undefined);
  const transport = streamFlags ? await import("../vmm/migration/transport.js") : undefined;
  const incomingTls = transport?.streamTlsFromFiles({ cert: o.tlsCert, key: o.tlsKey, ca: o.tlsCa, peerFingerprint: o.tlsPeerFingerprint });
  if ((incomingTls !== undefined || o.plainTcp === true) && o.incoming === undefined) throw new TypevisorError("INVALID_ARGUMENT", "--tls-* and --plain-tcp are for --incoming");
  if (incomingTls !== undefined && o.plainTcp === true) throw new TypevisorError("INVALID_ARGUMENT", "give either TLS (--tls-cert ...) or --plain-tcp, not both");
  if (o.incoming !== undefined) transport?.checkedEndpoint(o.incoming, { ...(incomingTls !== undefined ? { tls: incomingTls } : {}), ...(o.plainTcp === true ? { plainTcp: true } : {}) });
  const vcpuNice = o.vcpuNice !== undefined ? parseIntArg("--vcpu-nice", o.vcpuNice) : undefined;
  const memoryOvercommit = o.memoryOvercommit !== undefined ? parseRatioArg("--memory-overcommit", o.memoryOvercommit) : undefined;
  const id = o.id !== undefined ? parseVmId(o.id) : undefined;
  if (o.consoleLogSize !== undefined && o.consoleLog === undefined) {
    throw new TypevisorError("INVALID_ARGUMENT", "--console-log-size needs --console-log PATH");
  }
  const logSize = parseSize(o.consoleLogSize ?? DEFAULT_CONSOLE_LOG_SIZE, { what: "--console-log-size", ...LOG_SIZE_LIMITS });
  const apiSocketFd = o.apiSocketFd !== undefined ? parseFdArg("--api-socket-fd", o.apiSocketFd, o.apiSocket) : undefined;
  const consoleSocketFd = o.consoleSocketFd !== undefined ? parseFdArg("--console-socket-fd", o.consoleSocketFd, o.consoleSocket) : undefined;
  // Before anything reads guest-controlled input: from here on this process cannot exec.
  if (o.seccompNoExec === true) installFilter(noExecFilter());
  if (o.sandboxProbe !== undefined) log(`typevisor: sandbox probe ${JSON.stringify(sandboxProbe(o.sandboxProbe.split(",").filter((x) => x !== "")))}`);
  // A socket handed over as a descriptor is bound already: its directory need not be in our view.
  for (const [flag, path] of [["--console-log", o.consoleLog], ["--console-socket", consoleSocketFd === undefined ? o.consoleSocket : undefined], ["--exit-file", o.exitFile], ["--stats-file", o.statsFile]] as const) {
    if (path !== undefined && !existsSync(dirname(path))) throw new TypevisorError("INVALID_ARGUMENT", `${flag} ${path}: directory ${dirname(path)} does not exist`);
  }
  const devices: DeviceSpecs = {
    disks: o.disk.map((d) => parseDiskSpec(d, { mayNotExist: o.incoming !== undefined })),
    nets: o.net.map(parseNetSpec),
    rng: o.rng,
    ...(o.balloon !== undefined ? { balloon: parseBalloonSpec(o.balloon === true ? "" : String(o.balloon)) } : {}),
    ...(o.vsock !== undefined ? { vsock: parseVsockSpec(o.vsock, defaultVsockPath()) } : {}),
  };
  let config: MachineConfig;
  let firstBoot: BootPayload | undefined;
  let overrides: RestoreOverrides | undefined;
  if (restoring) {
    // The snapshot says what the machine is; only back ends (and how its threads run) may change.
    for (const [flag, given] of [["--image", o.image], ["--cmdline", o.cmdline], ["--append", o.append], ["--balloon", o.balloon]] as const) {
      if (given !== undefined) throw new TypevisorError("INVALID_ARGUMENT", `${flag} cannot be combined with ${o.restore !== undefined ? "--restore" : "--incoming"}: the VM comes as it was`);
    }
    // --kernel/--initrd here name what a guest reboot boots, in place of the snapshot's paths
    // (a clone's own copies: its source's may be gone, or outside its sandbox).
    if (o.initrd !== undefined && o.kernel === undefined) throw new TypevisorError("INVALID_ARGUMENT", `--initrd with ${o.restore !== undefined ? "--restore" : "--incoming"} needs --kernel (the pair a reboot boots)`);
    if (o.rng) throw new TypevisorError("INVALID_ARGUMENT", `--rng cannot be combined with ${o.restore !== undefined ? "--restore" : "--incoming"}: the VM comes with its devices`);
    overrides = {
      disks: devices.disks, nets: devices.nets,
      ...(devices.vsock !== undefined ? { vsock: devices.vsock } : {}),
      ...(o.kernel !== undefined ? { rebootKernel: { kernel: o.kernel, ...(o.initrd !== undefined ? { initrd: o.initrd } : {}) } } : {}),
      ...(vcpuNice !== undefined ? { vcpuNice } : {}),
      ...(memoryOvercommit !== undefined ? { memoryOvercommit } : {}),
    };
    config = { cpus: 0, memoryMiB: 0, devices }; // replaced by the snapshot's once read (restoreVm)
  } else {
    const cpus = parseIntArg("--cpus", o.cpus);
    const memoryMiB = parseIntArg("--memory", o.memory);
    validateConfig({ cpus, memoryMiB, vcpuNice: vcpuNice ?? DEFAULT_VCPU_NICE, memoryOvercommit: memoryOvercommit ?? 1 });
    config = {
      cpus, memoryMiB, devices, boot: resolveBootPaths(o),
      vcpuNice: vcpuNice ?? DEFAULT_VCPU_NICE, memoryOvercommit: memoryOvercommit ?? 1,
    };
    firstBoot = readBootPayload(config);
    // Reject a bad kernel, initrd or command line here, before a VM exists or the lab boots.
    validateKernel({ ...firstBoot, cmdline: config.boot!.cmdline, memBytes: memoryMiB * 1024 * 1024 });
  }

  const kind = kvmHostKind();
  if (kind === "none" && o.forceKvm === true) {
    throw new TypevisorError("KVM_UNSUITABLE", "this host has no /dev/kvm (--force-kvm needs one)");
  }
  // PVM runs purpose-built guests (kvm-lab.md); --force-kvm is for those (tests, the control plane's tiny VMs).
  if (kind !== "hardware" && !(kind === "pvm" && o.forceKvm === true)) {
    const why = kind === "pvm"
      ? "this host's /dev/kvm is PVM (software nested virtualization), which cannot boot stock Linux kernels"
      : "this host has no /dev/kvm";
    if (!o.lab) throw new TypevisorError("KVM_UNSUITABLE", why, { hint: "drop --no-lab to run inside the KVM lab, use --force-kvm for a purpose-built guest, or use a host with hardware virtualization" });
    return -1; // the caller re-runs this command inside the lab
  }
  // Before any VM is built: from here on the devices count into the file.
  if (o.statsFile !== undefined) processStatsPage().backWith(o.statsFile);

  let current: Vm | undefined;
  // Console input that arrives while the VM is still being built (a restore reads and checks its
  // state file asynchronously): kept, up to a bound, and typed into the VM once it exists.
  let early: Uint8Array[] = [];
  let earlyBytes = 0;
  const sendInput = (b: Uint8Array): void => {
    if (current !== undefined) current.sendInput(b);
    else if (earlyBytes + b.length <= EARLY_INPUT_MAX) {
      early.push(Uint8Array.from(b));
      earlyBytes += b.length;
    }
  };
  let server: Server | undefined;
  let served = false;
  let migration: import("../vmm/migration/source.js").OutgoingMigration | undefined;
  let migrated = false;
  let stopRequested = false;
  // Headless: the console is a pipe fanned out to the log and socket; the terminal stays out of it.
  const headless = o.consoleLog !== undefined || o.consoleSocket !== undefined;
  if (headless) {
    // A supervised VMM's stdout and stderr are a log file on the data disk: a full disk must not
    // kill the VM (Node throws an unhandled 'error' for a failed write to either, when the file is
    // a SyncWriteStream: a first line into an empty log on a full tmpfs needs a page it cannot get).
    process.stdout.on("error", () => undefined);
    process.stderr.on("error", () => undefined);
  }
  const consolePipe = headless
    ? await ConsolePipe.open({
      ...(o.consoleLog !== undefined
        ? { log: { path: o.consoleLog, maxBytes: logSize, onDrop: (code: string) => {
          log(`typevisor: console log ${o.consoleLog}: ${code}: dropping guest output until it can be written (the log notes how much)`);
          processStatsPage().noteChange(); // GET /vm's consoleDroppedBytes starts to grow: a supervisor asks now
        } } }
        : {}),
      ...(o.consoleSocket !== undefined ? { socket: { path: o.consoleSocket, ...(consoleSocketFd !== undefined ? { fd: consoleSocketFd } : {}) } } : {}),
      onInput: sendInput,
    })
    : undefined;
  const consoleFd = consolePipe?.writeFd ?? 1;

  const stdin = process.stdin;
  const tty = !headless && stdin.isTTY === true;
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
        sendInput(Uint8Array.of(b));
      }
    } else {
      sendInput(chunk);
    }
  };
  if (!headless) {
    if (tty) stdin.setRawMode(true);
    stdin.on("data", onInput);
  }
  // A stop before there is a VM (a destination waiting for its migration) ends the wait.
  const stopping = new AbortController();
  const onSignal = (): void => {
    stopRequested = true;
    current?.stop();
    stopping.abort();
  };
  process.on("SIGTERM", onSignal);
  process.on("SIGINT", onSignal);

  if (kind === "pvm") log("typevisor: --force-kvm: running on this host's PVM /dev/kvm (purpose-built guests only; stock kernels fail)");
  // Say where host programs reach the guest's vsock before anything boots (the console is the guest's after that).
  if (devices.vsock !== undefined && !restoring) log(`typevisor: vsock cid=${devices.vsock.cid}: connect to ${devices.vsock.uds} ("CONNECT <port>\n"); guest connections to port P reach ${devices.vsock.uds}_P`);
  // Outside the loop: the API server is created on the first boot and must report later ones.
  let bootCount = 0;
  // What the control socket (--api-socket) serves: it reads `current` at each request, so one
  // target serves every boot, and a server started before the VM exists (an incoming migration).
  const controlTarget = (): ControlTarget => ({
    // pauseReason: set while the VMM paused the VM by itself (a disk's filesystem is full).
    info: () => ({ id: id ?? null, state: current?.vmState, cpus: config.cpus, memoryMiB: config.memoryMiB, cmdline: config.boot?.cmdline ?? null, restoredFrom: o.restore ?? null, boots: bootCount, pid: process.pid, devices: current?.devices ?? [], pauseReason: current?.pauseReason ?? null, consoleDroppedBytes: consolePipe?.droppedBytes ?? 0 }),
    stats: async () => {
      const vmNow = current;
      if (vmNow === undefined) return undefined;
      return { ...vmNow.getStats(), io: await vmNow.ioStats() };
    },
    registers: () => current?.registers(),
    balloon: async (method, body) => {
      if (current === undefined) throw new TypevisorError("VM_STATE", "no VM");
      if (method === "PUT") {
        if (body === undefined) throw new TypevisorError("INVALID_REQUEST", "PUT /balloon needs a target");
        return current.deviceCommand({ command: "balloon.setTarget", args: body });
      }
      if (method === "POST") return current.deviceCommand({ command: "balloon.requestStats" });
      return current.deviceCommand({ command: "balloon.stats" });
    },
    devices: async () => ((current?.devices.length ?? 0) > 0 ? current?.deviceCommand({ command: "devices" }) : []),
    threads: async () => {
      if (current === undefined) throw new TypevisorError("VM_STATE", "no VM");
      return current.threads();
    },
    pause: async () => current?.pause(),
    migrate: async (method, body) => {
      if (method === "GET") {
        if (migration === undefined) throw new TypevisorError("NOT_FOUND", "no migration has been started");
        return migration.progress;
      }
      if (method === "DELETE") {
        if (migration === undefined || !migration.cancel()) throw new TypevisorError("VM_STATE", "no migration that can still be cancelled");
        return migration.progress;
      }
      if (current === undefined || stopRequested) throw new TypevisorError("VM_STATE", "the VM is stopping");
      if (migration !== undefined && ["connecting", "precopy", "stopped", "committed"].includes(migration.progress.phase)) throw new TypevisorError("VM_STATE", "a migration is already under way");
      const { OutgoingMigration } = await import("../vmm/migration/source.js");
      const { checkedEndpoint } = await import("../vmm/migration/transport.js");
      const req = body as import("../vmm/api/server.js").MigrateBody;
      // The endpoint and its security (TCP needs TLS or plainTcp) refused here, with a 400, not later as a failed migration.
      checkedEndpoint(req.to, req);
      const m = new OutgoingMigration(current, config, req);
      migration = m;
      void m.done.then((p) => {
        if (p.phase === "completed") {
          // The guest runs at the destination now: this VMM ends.
          log(`typevisor: migrated to ${req.to} (downtime ${p.downtimeMs ?? "?"} ms, ${p.bytesSent} bytes in ${p.round} rounds)`);
          if (p.switchover !== undefined) log(`typevisor: migration switch-over (ms from pause): ${switchoverLine(p.switchover)}`);
          m.teardownLast();
          migrated = true;
          stopRequested = true;
          current?.stop();
        } else log(`typevisor: migration to ${req.to} ${p.phase}: ${p.error ?? ""}`);
      });
      return m.progress;
    },
    snapshot: async (req) => {
      if (current === undefined || stopRequested) throw new TypevisorError("VM_STATE", "the VM is stopping");
      return current.snapshot(resolve(req.path), {
        config,
        ...(req.memory !== undefined ? { memory: req.memory } : {}),
        ...(req.base !== undefined ? { base: resolve(req.base) } : {}),
        ...(req.track !== undefined ? { track: req.track } : {}),
      });
    },
    resume: () => current?.resume(),
    stop: () => {
      stopRequested = true;
      current?.stop();
    },
    reboot: () => {
      if (current === undefined || stopRequested) throw new TypevisorError("VM_STATE", "the VM is stopping");
      current.reset();
    },
  });
  try {
    for (let boots = 1; ; boots++) {
      bootCount = boots;
      const host = { consoleFd, onPaused: (r: { message: string }) => log(`typevisor: ${r.message}`), ...(o.seccompVcpu === true ? { vcpuSeccomp: true } : {}) };
      let vm: Vm;
      let onStarted: (() => void) | undefined;
      if (boots === 1 && o.incoming !== undefined) {
        const { receiveMigration } = await import("../vmm/migration/destination.js");
        // The control socket listens before the stream is accepted, and answers once the vCPUs
        // run here: its start-up (module loading, the bind) is not in the guest's pause (in the
        // lab it was most of the time from GO to the vCPUs' release), and a socket that cannot be
        // bound fails the migration before the source ever pauses.
        let arrived: { resolve: () => void; reject: (e: Error) => void } | undefined;
        if (o.apiSocket !== undefined && o.attach === undefined) {
          const until = new Promise<void>((resolve, reject) => (arrived = { resolve, reject }));
          const { startControlServer } = await import("../vmm/api/server.js");
          server = await startControlServer(o.apiSocket, controlTarget(), apiSocketFd, { until });
          served = true;
        }
        let incoming: Awaited<ReturnType<typeof receiveMigration>>;
        try {
          incoming = await receiveMigration(o.incoming, overrides ?? {}, host, log, { ...(incomingTls !== undefined ? { tls: incomingTls } : {}), ...(o.plainTcp === true ? { plainTcp: true } : {}) }, { signal: stopping.signal });
        } catch (e) {
          arrived?.reject(e as Error);
          // Told to stop while it waited: no VM came, and none was lost (the source runs on).
          if (isTypevisorError(e) && e.code === "MIGRATION_STOPPED") {
            log(`typevisor: ${e.message}`);
            return { code: 0, result: "stopped", reason: e.message };
          }
          throw e;
        }
        vm = incoming.vm;
        config = incoming.config;
        const running = incoming.running;
        onStarted = () => {
          running();
          arrived?.resolve();
        };
        log("typevisor: migration received; the VM runs here now");
      } else if (boots === 1 && o.restore !== undefined) {
        const restored = await restoreVm(o.restore, overrides ?? {}, host, { keepClock: o.keepClock === true, ...(o.prepared !== undefined ? { prepared: o.prepared } : {}) });
        vm = restored.vm;
        config = restored.config;
        if (restored.builtAhead) log(`typevisor: restore: into the VM this standby built ahead for ${o.restore}`);
        for (const w of vm.restoreWarnings) log(`typevisor: restore: ${w}`);
      } else {
        // The files are read again for each boot rather than held in the heap for the VM's lifetime.
        vm = bootVm(config, host, firstBoot);
      }
      current = vm;
      for (const b of early) vm.sendInput(b);
      early = [];
      earlyBytes = 0;
      firstBoot = undefined;
      // A stop (signal or API) that arrived while this VM was being built: it runs no guest code.
      if (stopRequested) vm.stop();
      if (o.apiSocket !== undefined && server === undefined && !served) {
        served = true;
        const target = controlTarget();
        if (o.attach !== undefined) {
          // A standby VMM: its socket now answers for this VM.
          o.attach.target.current = target;
          o.attach.onBuilt();
        } else {
          // Loaded only here: a VMM without a control socket never loads the HTTP server (issue 19).
          const { startControlServer } = await import("../vmm/api/server.js");
          server = await startControlServer(o.apiSocket, target, apiSocketFd);
        }
      }
      let result: VmExitResult;
      try {
        result = await vm.run({ ...(boots === 1 && o.paused === true ? { paused: true } : {}), ...(onStarted !== undefined ? { onStarted } : {}) });
      } finally {
        vm.destroy();
      }
      if (result.kind === "reset" && o.reboot && !stopRequested) {
        log(`typevisor: guest reset; restarting the VM (boot ${boots + 1})`);
        continue;
      }
      switch (result.kind) {
        case "poweroff":
          return { code: 0, result: "poweroff" };
        case "stopped":
          return { code: 0, result: migrated ? "migrated" : "stopped" };
        case "reset":
          if (stopRequested) return { code: 0, result: "stopped" };
          log("typevisor: guest reset (--no-reboot): exiting");
          return { code: 0, result: "reset" };
        case "crash":
          log(`typevisor: guest crashed: ${result.reason}`);
          if (result.dump !== undefined) log(result.dump);
          return { code: 1, result: "crash", reason: result.reason };
      }
    }
  } finally {
    if (!headless) {
      stdin.off("data", onInput);
      if (tty) stdin.setRawMode(false);
      stdin.pause();
    }
    process.off("SIGTERM", onSignal);
    process.off("SIGINT", onSignal);
    server?.close();
    // Everything the guest printed reaches the log and the socket clients before the process exits.
    await consolePipe?.close();
  }
}

export function registerRunCommand(program: Command, onLab: (argv: string[]) => Promise<number>): void {
  program
    .command("run")
    .description("boot one VM with the typevisor VMM, its serial console on this terminal (Ctrl-A x quits) or, with --console-log/--console-socket, headless")
    .option("--image <name>", "boot an image built with `typevisor image build`")
    .option("--restore <dir>", "start from a snapshot (POST /snapshot on the API socket) instead of booting: the guest continues where it was; --disk/--net/--vsock replace its back ends in order (a clone's own disk, TAP, MAC, CID)")
    .option("--paused", "leave the vCPUs stopped once the VM is built (POST /resume on the API socket starts them)", false)
    .option("--keep-clock", "with --restore: keep the guest's clock where it was saved instead of moving it to now", false)
    .option("--kernel <path>", "kernel to boot: bzImage, or an ELF vmlinux with a PVH entry note (with --restore: the kernel a guest reboot boots, in place of the snapshot's)")
    .option("--initrd <path>", "initramfs to load with the kernel (with --restore: with --kernel, the pair a guest reboot boots)")
    .option("--cmdline <str>", `kernel command line, replacing the default "${DEFAULT_CMDLINE}"`)
    .option("--append <str>", "text appended to the default kernel command line")
    .option("--cpus <n>", `number of vCPUs, 1 to the host's KVM limit (KVM_CAP_MAX_VCPUS, at most ${MAX_VCPUS})`, "1")
    .option("--memory <MiB>", `guest memory in MiB, ${MIN_MEMORY_MIB} to what the host can back (physical memory × --memory-overcommit)`, "256")
    .option("--memory-overcommit <ratio>", "guest memory allowed per byte of the host's physical memory (default 1; the daemon passes its policy's)")
    .option("--vcpu-nice <n>", `run the vCPU threads this much nicer than the VMM's device threads, 0-${MAX_NICE} (default ${DEFAULT_VCPU_NICE}): where they share a CPU, a guest's I/O request then runs at once instead of after the guest idles (docs/vmm.md)`)
    .option("--no-reboot", "exit when the guest reboots instead of restarting it")
    .option("--disk <spec>", "virtio-blk disk: PATH[,format=raw|qcow2][,readonly=on][,serial=ID] (repeatable; the first is /dev/vda; a qcow2 file needs format=qcow2)", (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option("--net <spec>", "virtio-net on a TAP device: tap=NAME[,mac=MAC] (repeatable; the TAP is created if absent and we may)", (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option("--rng", "virtio-rng entropy device fed from the host's getrandom", false)
    .option("--vsock <spec>", "virtio-vsock: cid=N[,uds=PATH]; host programs connect to PATH and send \"CONNECT <port>\\n\", guest connections to host port P reach PATH_P")
    .option("--balloon [spec]", "virtio-balloon with statistics: [stats=SECONDS][,deflate-on-oom=on]; the API socket sets its size")
    .option("--api-socket <path>", "serve the control API on this unix socket (pause, resume, stop, reboot, stats, devices, balloon, registers, threads; docs/vmm.md)")
    .option("--id <id>", "the VM's identity ([a-z0-9][a-z0-9-]{0,62}): GET /vm reports it, and it shows in the process's command line")
    .option("--console-log <path>", "append the guest's serial output to this file (headless: the terminal is not the console)")
    .option("--console-log-size <size>", `rotate --console-log when it would exceed SIZE (bytes or K/M/G; default ${DEFAULT_CONSOLE_LOG_SIZE}): PATH becomes PATH.1`)
    .option("--console-socket <path>", "serve the serial console on this unix socket: clients get output from when they connect, what they send is typed into the guest (headless)")
    .option("--exit-file <path>", 'on exit, write {"code","result":"poweroff|stopped|reset|crash|error","reason"?,"at"} here atomically')
    .option("--stats-file <path>", "keep the VM's disk and network counters in this file, one 4 KiB page the VMM updates in place (the layout: docs/vmm.md), so a supervisor reads them without asking the VMM")
    .addOption(new Option("--api-socket-fd <n>", "the --api-socket, already bound and listening, inherited as this descriptor (the daemon's sandbox binds it: the VMM cannot)").hideHelp())
    .addOption(new Option("--console-socket-fd <n>", "the --console-socket, the same way").hideHelp())
    .addOption(new Option("--handoff-fd <n>", "with --standby: a unix socket on which the daemon's sandbox sends the restored VM's TAP descriptors").hideHelp())
    .addOption(new Option("--seccomp-no-exec", "refuse execve and execveat from here on, on every thread (seccomp; the daemon's sandbox passes it)").hideHelp())
    .addOption(new Option("--seccomp-vcpu", "each vCPU thread narrows itself with its own seccomp filter before it runs the guest (the sandbox passes it)").hideHelp())
    .addOption(new Option("--sandbox-probe <paths>", "test hook: try to open these paths (comma-separated) and a few denied system calls, and report on stderr").hideHelp())
    .option("--sandbox", "run the VMM in the sandbox the daemon gives its VMMs (root only): its own uid, no capabilities, its own namespaces and root, the seccomp allowlist (docs/security.md)", false)
    .option("--sandbox-uid <uid>", "with --sandbox: the VMM's uid and gid (default: the highest free one of 1900000000-1900065535)")
    .option("--sandbox-bind <dir>", "with --sandbox: a directory the VMM may also read and write, e.g. where POST /snapshot writes (repeatable; the directories of --console-log, --exit-file, --stats-file, --vsock's socket and --incoming unix: are given already)", (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option("--force-kvm", "run on this host's /dev/kvm even when it is PVM (purpose-built guests only) instead of refusing or using the lab", false)
    .addOption(new Option("--no-lab", "fail instead of running inside the KVM lab when this host cannot boot stock kernels"))
    .option("--incoming <endpoint>", "wait for one live migration on tcp:ADDR:PORT or unix:PATH and run the VM it brings (--disk/--net/--vsock give this host's back ends, in order; when the source copies its disks, each --disk names a file to create or an empty one); the source sends it with POST /migrate. Over TCP: TLS (--tls-*) or --plain-tcp")
    .option("--tls-cert <file>", "--incoming: this side's TLS certificate (PEM); the source must present the certificate --tls-peer-fingerprint or --tls-ca names")
    .option("--tls-key <file>", "--incoming: the TLS certificate's private key (PEM)")
    .option("--tls-ca <file>", "--incoming: accept a source whose certificate this CA (PEM) signed")
    .option("--tls-peer-fingerprint <sha256>", "--incoming: accept only a source whose certificate has this SHA-256 fingerprint")
    .option("--plain-tcp", "--incoming tcp:...: accept the stream without TLS (the guest's memory crosses the network in the clear)")
    .option("--standby", "start a VMM ahead of need: wait on --api-socket for PUT /restore {\"snapshot\": DIR, ...} and become that VM (docs/snapshots.md)", false)
    .option("--template <dir>", "with --standby: a memory snapshot whose VM to build ahead (state in place, memory mapped), so a PUT /restore of it only gives that VM its console and back ends (docs/snapshots.md)")
    .action(async (opts: RunOptions, cmd: Command) => {
      const log = (l: string): void => void process.stderr.write(l + "\n");
      if (opts.sandbox !== true && (opts.sandboxUid !== undefined || (opts.sandboxBind ?? []).length > 0)) throw new TypevisorError("INVALID_ARGUMENT", "--sandbox-uid and --sandbox-bind need --sandbox");
      if (opts.template !== undefined && opts.standby !== true) throw new TypevisorError("INVALID_ARGUMENT", "--template is for --standby (a restore names its snapshot with --restore)");
      let code: number;
      try {
        code = opts.sandbox === true
          ? await (await import("./run-sandbox.js")).runSandboxed(opts, log)
          : opts.standby === true ? await (await import("./standby.js")).standbyCommand(opts, log) : await runCommand(opts, log);
      } finally {
        // Threads started early (cli/early-threads.ts) that no VM took: this run ended before its
        // VM ran, or runs it inside the lab instead.
        endPrestarted();
      }
      if (code === -1) {
        process.exitCode = await onLab(cmd.parent?.args ?? []);
      } else {
        process.exitCode = code;
      }
    });
}

/** The switch-over's steps on one line (docs/migration.md "Downtime"). */
function switchoverLine(s: import("../vmm/migration/source.js").SwitchoverTimes): string {
  const d = s.destination;
  return `${s.syncMs !== undefined ? `(before it: in-flight rounds drained in ${s.syncMs}) ` : ""}vcpus stopped ${s.vcpusStopped}, state captured ${s.stateCaptured},${s.disksFlushed !== undefined ? ` disks flushed ${s.disksFlushed},` : ""}${s.dirtyTaken !== undefined ? ` dirty log read ${s.dirtyTaken},` : ""} last round ${s.lastRoundSent} (${s.lastRoundBytes} B)${s.disksSent !== undefined ? `, disks ${s.disksSent} (${s.lastDiskBytes ?? 0} B)` : ""}, state sent ${s.stateSent} (${s.stateBytes} B), READY ${s.ready}, GO ${s.goSent}, RUNNING ${s.running}` +
    (d !== undefined ? `; destination (ms from DONE): state decoded ${d.stateDecoded}, threads up ${d.threadsReady}, applied ${d.stateApplied}, devices restored ${d.devicesRestored}, READY sent ${d.readySent}, GO ${d.goReceived}, resumed ${d.resumed}` : "");
}
