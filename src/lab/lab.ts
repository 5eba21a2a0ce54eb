/**
 * The KVM lab: a Debian kernel booted under QEMU's TCG emulator with nested SVM, which gives a
 * real /dev/kvm (kvm-amd with nested paging) to a command run inside it, with the host root
 * mounted read-only under a tmpfs overlay. Recipe and measurements: docs/lab.md and kvm-lab.md.
 */
import { spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { createWriteStream, existsSync, mkdtempSync, rmSync, type WriteStream } from "node:fs";
import { mkdir, readdir, rename, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { delimiter, join } from "node:path";
import type { Writable } from "node:stream";
import { TypevisorError } from "../errors.js";
import { writeNewc, withParents, type CpioEntry } from "../images/cpio.js";
import { fetchPackage, kernelImage, kernelRelease, KERNEL_PACKAGE, tempName, type Progress } from "../images/debian.js";
import { cacheDir } from "../images/dirs.js";
import { busyboxEntries, busyboxPath, moduleEntries, skeletonEntries } from "../images/initramfs.js";
import { indexModules, resolveLoadOrder } from "../images/kmod.js";
import { agentScript } from "./agent.js";
import { ConsoleFilter } from "./console.js";
import { agentReport, qemuThreadsReport, qmpReport } from "./diagnose.js";
import { startHeartbeat } from "./heartbeat.js";
import { LAB_INIT, LAB_MODULES } from "./init.js";
import { passedEnv, specScript } from "./spec.js";

export const QEMU = "qemu-system-x86_64";

export interface LabKernel {
  kernel: string;
  initrd: string;
  release: string;
  package: string;
}

type Env = Record<string, string | undefined>;

function labDir(cache: string): string {
  return join(cache, "lab");
}

/** Fetch the generic Debian kernel and busybox, and build (once) the lab initramfs for them. */
export async function prepareLab(opts: { cache?: string; progress?: Progress } = {}): Promise<LabKernel> {
  const cache = opts.cache ?? cacheDir();
  const fetchOpts = { cache, ...(opts.progress !== undefined ? { progress: opts.progress } : {}) };
  // the generic kernel, not -cloud: only it has 9p (kvm-lab.md)
  const kpkg = await fetchPackage("linux-image-amd64", { ...fetchOpts, concrete: KERNEL_PACKAGE });
  const bb = await fetchPackage("busybox-static", fetchOpts);
  const release = await kernelRelease(kpkg);
  const key = createHash("sha256").update(JSON.stringify([LAB_INIT, LAB_MODULES, kpkg.version, bb.version])).digest("hex").slice(0, 12);
  const dir = labDir(cache);
  await mkdir(dir, { recursive: true });
  const initrd = join(dir, `initramfs-${release}-${key}.cpio`);
  if (!existsSync(initrd)) {
    opts.progress?.(`building the lab initramfs for ${release}`);
    const modules = await resolveLoadOrder(await indexModules(kpkg.root, release), LAB_MODULES);
    const entries: CpioEntry[] = [
      ...skeletonEntries(),
      ...(await busyboxEntries(busyboxPath(bb))),
      ...(await moduleEntries(release, modules)),
      { type: "file", path: "init", data: Buffer.from(LAB_INIT), mode: 0o755 },
    ];
    const tmp = tempName(initrd);
    await writeFile(tmp, writeNewc(withParents(entries)));
    await rename(tmp, initrd);
    // older initramfs builds are dead weight
    for (const f of await readdir(dir)) if (f.startsWith("initramfs-") && join(dir, f) !== initrd) await rm(join(dir, f), { force: true });
  }
  return { kernel: await kernelImage(kpkg), initrd, release, package: `${kpkg.name} ${kpkg.version}` };
}

export interface LabOptions {
  /** Lab RAM in MiB (default $TYPEVISOR_LAB_MEMORY or 16384: the 12 GiB guest of big-vm.lab.test.ts and the bench plus node; QEMU allocates it lazily, so only what guests touch costs host memory). */
  memoryMiB?: number;
  /** Lab vCPUs (default $TYPEVISOR_LAB_CPUS or 1: kvm-lab.md saw a panic with 2). */
  cpus?: number;
  /** Whole-run limit in seconds (default $TYPEVISOR_LAB_TIMEOUT or 3600). */
  timeoutSec?: number;
  /** Limit from QEMU start to command start, seconds (default 180). */
  bootTimeoutSec?: number;
  /**
   * Fail with LAB_SILENT, after collecting a diagnosis into the log, when a non-interactive command
   * prints nothing for this many seconds (default $TYPEVISOR_LAB_SILENCE or 600; 0: never).
   */
  silenceSec?: number;
  cwd?: string;
  env?: Env;
  cache?: string;
  /** Command output (stdout and stderr arrive merged over the serial console). */
  output?: Writable;
  /** Lab status lines (booting, boot time); default none. */
  progress?: Progress;
  /** Terminal size to give the command (`COLSxROWS`), or undefined for a pipe (no tty). */
  tty?: { columns: number; rows: number };
  /**
   * Forward this process's stdin (raw) to the command, which then owns the lab console as its
   * controlling terminal. Default: when `tty` is given and stdin is a terminal. QEMU's -nographic
   * keys stay active: Ctrl-A x quits the lab (the run then resolves with 130).
   */
  interactive?: boolean;
  /** Called when the command starts, with the ms since QEMU was spawned. */
  onStart?: (bootMs: number) => void;
}

function envInt(env: Env, name: string, dflt: number, min: number, max: number): number {
  const raw = env[name];
  if (raw === undefined || raw === "") return dflt;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min || n > max) {
    throw new TypevisorError("LAB_BAD_ENV", `${name}=${raw} is not an integer between ${min} and ${max}`);
  }
  return n;
}

export function findOnPath(cmd: string, env: Env = process.env): string | undefined {
  for (const d of (env["PATH"] ?? "").split(delimiter)) {
    if (d !== "" && existsSync(join(d, cmd))) return join(d, cmd);
  }
  return undefined;
}

/** A value inside a QEMU option list (`-chardev socket,path=...`): commas are doubled (QEMU's QemuOpts). */
const optValue = (v: string): string => v.replaceAll(",", ",,");

export interface LabPorts {
  /** The kernel's console (ttyS1) goes to this file. */
  kernelLog: string;
  /** The lab agent's serial port (ttyS2), a unix socket QEMU listens on. */
  agentSocket: string;
  /** QMP, a unix socket QEMU listens on. */
  qmpSocket: string;
}

export function labQemuArgs(k: LabKernel, o: { memoryMiB: number; cpus: number; append: string; ports: LabPorts }): string[] {
  return [
    // thread names ("CPU 0/TCG") in /proc, for the watchdog's report of QEMU's own threads
    "-name", "typevisor-lab,debug-threads=on",
    "-M", "q35",
    // a bigger translation cache than QEMU's default means fewer flushes while node runs
    "-accel", "tcg,tb-size=1024",
    "-cpu", "EPYC",
    "-smp", String(o.cpus),
    "-m", String(o.memoryMiB),
    "-nographic",
    "-no-reboot",
    "-nic", "none",
    // ttyS0: the command's terminal, muxed with QEMU's monitor (Ctrl-A x quits)
    "-serial", "mon:stdio",
    // ttyS1: the kernel's console, to a file of its own
    "-chardev", `file,id=tvklog,path=${optValue(o.ports.kernelLog)}`,
    "-serial", "chardev:tvklog",
    // the agent's port: on IRQ 5, not the ISA default 4, which QEMU would share with ttyS0 by
    // overwriting one line's level with the other's (an ISA IRQ is one qemu_irq, not a wired OR)
    "-chardev", `socket,id=tvagent,path=${optValue(o.ports.agentSocket)},server=on,wait=off`,
    "-device", "isa-serial,chardev=tvagent,iobase=0x3e8,irq=5",
    "-qmp", `unix:${optValue(o.ports.qmpSocket)},server=on,wait=off`,
    "-kernel", k.kernel,
    "-initrd", k.initrd,
    "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    "-append", o.append,
  ];
}

const KERNEL_LOG = ".kernel.log";

/** Keep the newest `keep` runs' logs (a run has a console log and a kernel log). */
async function pruneLogs(dir: string, keep: number): Promise<void> {
  const files = await readdir(dir);
  const runs = files.filter((f) => f.endsWith(".log") && !f.endsWith(KERNEL_LOG)).sort();
  const kept = new Set(runs.slice(Math.max(0, runs.length - keep)).map((f) => f.slice(0, -".log".length)));
  for (const f of files) {
    if (!f.endsWith(".log")) continue;
    const base = f.endsWith(KERNEL_LOG) ? f.slice(0, -KERNEL_LOG.length) : f.slice(0, -".log".length);
    if (!kept.has(base)) await rm(join(dir, f), { force: true });
  }
}

/**
 * Run argv inside a fresh lab and resolve with its exit code. Throws TypevisorError for lab
 * failures (QEMU missing, boot failure or timeout, no KVM inside); the console log is then kept
 * in <cache>/lab/logs/ and named in the error.
 */
export async function runInLab(argv: string[], opts: LabOptions = {}): Promise<number> {
  const env = opts.env ?? process.env;
  if (argv.length === 0 || argv[0] === "") throw new TypevisorError("LAB_NO_COMMAND", "no command given to run in the lab", { hint: "npm run lab -- <command> [args...]" });
  const memoryMiB = opts.memoryMiB ?? envInt(env, "TYPEVISOR_LAB_MEMORY", 16384, 256, 1 << 20);
  const cpus = opts.cpus ?? envInt(env, "TYPEVISOR_LAB_CPUS", 1, 1, 64);
  const timeoutSec = opts.timeoutSec ?? envInt(env, "TYPEVISOR_LAB_TIMEOUT", 3600, 1, 7 * 86400);
  const bootTimeoutSec = Math.min(opts.bootTimeoutSec ?? 180, timeoutSec);
  // 600 s: the lab group's longest legitimate silence was 244-298 s on a project machine
  const silenceSec = opts.silenceSec ?? envInt(env, "TYPEVISOR_LAB_SILENCE", 600, 0, 7 * 86400);
  const extraAppend = (env["TYPEVISOR_LAB_APPEND"] ?? "").split(/\s+/).filter((w) => w !== "");
  // The interrupt heartbeat's period (heartbeat.ts; docs/lab.md, "The stall"); 0 turns it off.
  const heartbeatMs = envInt(env, "TYPEVISOR_LAB_HEARTBEAT_MS", 1000, 0, 3_600_000);
  // x86's COMMAND_LINE_SIZE is 2048 bytes; the lab's own words take about 600 of them
  if (extraAppend.join(" ").length > 1024) throw new TypevisorError("LAB_BAD_ENV", "TYPEVISOR_LAB_APPEND is over 1024 bytes (the lab kernel's command line holds 2048)");
  const cache = opts.cache ?? cacheDir(env);
  const say = opts.progress ?? (() => undefined);

  const qemu = findOnPath(QEMU, env);
  if (qemu === undefined) {
    throw new TypevisorError("LAB_QEMU_MISSING", `${QEMU} is not installed (not found on PATH)`, { hint: "install it: apt-get install qemu-system-x86" });
  }
  const k = await prepareLab({ cache, progress: say });
  // the lab mounts fresh tmpfs on /run and /dev/shm: host files there are invisible to the command
  const cwd = opts.cwd ?? process.cwd();
  for (const [what, path] of [["cwd", cwd], ["TYPEVISOR_HOME", env["TYPEVISOR_HOME"]], ["TYPEVISOR_CACHE", env["TYPEVISOR_CACHE"]]] as const) {
    if (path !== undefined && /^\/(run|dev\/shm)(\/|$)/.test(path)) say(`warning: ${what} ${path} is under a directory the lab replaces with an empty tmpfs`);
  }

  const nonce = randomBytes(8).toString("hex");
  const runs = join(labDir(cache), "runs");
  const logs = join(labDir(cache), "logs");
  await mkdir(runs, { recursive: true });
  await mkdir(logs, { recursive: true });
  const specPath = join(runs, `${nonce}.sh`);
  await writeFile(specPath, specScript(argv, cwd, passedEnv(env)));
  const agentPath = join(runs, `${nonce}.agent.sh`);
  await writeFile(agentPath, agentScript(process.execPath));
  const logBase = join(logs, `lab-${new Date().toISOString().replaceAll(":", "-")}-${nonce}`);
  const logPath = `${logBase}.log`;
  const kernelLogPath = `${logBase}${KERNEL_LOG}`;
  const log: WriteStream = createWriteStream(logPath);
  // sockets in a short private directory: a unix socket path has 107 bytes at most (unix(7))
  const sockDir = mkdtempSync(join(tmpdir(), "tvlab-"));
  const ports: LabPorts = { kernelLog: kernelLogPath, agentSocket: join(sockDir, "agent"), qmpSocket: join(sockDir, "qmp") };

  const tty = opts.tty === undefined ? "none" : `${opts.tty.columns}x${opts.tty.rows}`;
  const interactive = opts.tty !== undefined && (opts.interactive ?? process.stdin.isTTY === true);
  const append = [
    // the kernel's messages, all of them, on ttyS1 (the kernel log file), not in the command's output
    "console=ttyS1",
    "loglevel=7",
    "panic=-1",
    // SysRq from the watchdog (every function), and the hung-task detector's reports
    "sysctl.kernel.sysrq=1",
    "sysctl.kernel.hung_task_timeout_secs=60",
    "sysctl.kernel.hung_task_warnings=-1",
    // extra lab kernel parameters, for experiments with the lab kernel itself (docs/lab.md)
    ...extraAppend,
    `tvlab.nonce=${nonce}`,
    `tvlab.spec=${Buffer.from(specPath).toString("base64")}`,
    `tvlab.agent=${Buffer.from(agentPath).toString("base64")}`,
    `tvlab.tty=${tty}`,
    `tvlab.stdin=${interactive ? "console" : "null"}`,
  ].join(" ");
  say(`booting the lab: ${k.package}, ${memoryMiB} MiB, ${cpus} CPU${cpus > 1 ? "s" : ""}`);
  const t0 = performance.now();
  const child = spawn(qemu, labQemuArgs(k, { memoryMiB, cpus, append, ports }), { stdio: ["pipe", "pipe", "pipe"] });
  const filter = new ConsoleFilter(nonce);
  const out = opts.output ?? process.stdout;

  let rawSet = false;
  const cleanup = (): void => {
    rmSync(specPath, { force: true });
    rmSync(agentPath, { force: true });
    rmSync(sockDir, { recursive: true, force: true });
    if (rawSet) {
      process.stdin.unpipe(child.stdin);
      process.stdin.setRawMode(false);
      process.stdin.pause();
      rawSet = false;
    }
  };
  const onSignal = (sig: NodeJS.Signals): void => {
    child.kill("SIGKILL");
    cleanup();
    process.exit(sig === "SIGINT" ? 130 : 143);
  };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);

  let qemuStderr = "";
  // set when the run is decided; console bytes still in flight after that are dropped
  let decided = false;
  child.stderr.on("data", (d: Buffer) => {
    if (decided) return;
    qemuStderr += d.toString("utf8");
    log.write(d);
  });

  type Outcome = { code: number } | { error: TypevisorError };
  /** When the command last printed, and the longest it has been silent so far (ms). */
  let lastOutput = performance.now();
  let longestSilence = 0;
  let diagnosing = false;
  const outcome = await new Promise<Outcome>((resolve) => {
    const finish = (o: Outcome): void => {
      if (decided) return;
      decided = true;
      clearTimeout(bootTimer);
      clearTimeout(runTimer);
      clearInterval(silenceTimer);
      stopHeartbeat();
      // nothing in the lab persists (read-only host root, tmpfs overlay): no need to wait for its poweroff
      child.kill("SIGKILL");
      resolve(o);
    };
    const failure = (code: string, message: string): TypevisorError =>
      new TypevisorError(code, `${message}; lab console log: ${logPath}; lab kernel log: ${kernelLogPath}`, {
        hint: "read the logs; TYPEVISOR_LAB_MEMORY, TYPEVISOR_LAB_CPUS, TYPEVISOR_LAB_TIMEOUT and TYPEVISOR_LAB_SILENCE size the lab",
      });
    const bootTimer = setTimeout(() => {
      if (filter.phase === "boot") finish({ error: failure("LAB_BOOT_FAILED", `the lab did not start the command within ${bootTimeoutSec} s`) });
    }, bootTimeoutSec * 1000);
    const runTimer = setTimeout(() => finish({ error: failure("LAB_TIMEOUT", `the lab run exceeded TYPEVISOR_LAB_TIMEOUT=${timeoutSec} s`) }), timeoutSec * 1000);
    // The silence watchdog: an interactive command may sit at a prompt for ever, any other one
    // that prints nothing for silenceSec is taken as stalled, diagnosed (diagnose.ts) and failed.
    const stopHeartbeat = heartbeatMs > 0 ? startHeartbeat(ports.agentSocket, heartbeatMs, () => diagnosing || decided) : () => {};
    const silenceTimer = setInterval(() => {
      if (filter.phase !== "running" || diagnosing) return;
      const quiet = performance.now() - lastOutput;
      if (silenceSec === 0 || interactive || quiet < silenceSec * 1000) return;
      diagnosing = true;
      say(`the command printed nothing for ${Math.round(quiet / 1000)} s: collecting a diagnosis of the lab into ${logPath}`);
      void diagnoseSilence(child.pid, ports, nonce, (text) => {
        if (!decided) log.write(text);
      }).then((summary) => {
        finish({
          error: failure(
            "LAB_SILENT",
            `the command went silent: it printed nothing for ${Math.round(quiet / 1000)} s (TYPEVISOR_LAB_SILENCE=${silenceSec}); ${summary}; the diagnosis (QEMU threads, lab CPU and APIC state, lab timers, every thread, each VMM's report) is in the console log and SysRq dumps in the kernel log`,
          ),
        });
      });
    }, Math.min(5000, Math.max(1000, silenceSec * 250)));

    child.stdout.on("data", (d: Buffer) => {
      if (decided) return;
      log.write(d);
      const now = performance.now();
      if (filter.phase === "running") longestSilence = Math.max(longestSilence, now - lastOutput);
      lastOutput = now;
      const { output, events } = filter.push(d.toString("latin1"));
      if (output !== "") out.write(Buffer.from(output, "latin1"));
      for (const ev of events) {
        if (ev.kind === "start") {
          if (interactive && process.stdin.isTTY === true) {
            process.stdin.setRawMode(true);
            rawSet = true;
            process.stdin.pipe(child.stdin);
          }
          const ms = performance.now() - t0;
          lastOutput = performance.now();
          say(`lab up in ${(ms / 1000).toFixed(1)} s; running: ${argv.join(" ")}`);
          opts.onStart?.(ms);
        } else if (ev.kind === "exit") {
          finish({ code: ev.code });
        } else {
          finish({ error: failure("LAB_SETUP_FAILED", `the lab could not be set up: ${ev.message}`) });
        }
      }
    });
    child.on("error", (e) => finish({ error: new TypevisorError("LAB_QEMU_FAILED", `cannot run ${qemu}: ${e.message}`, { cause: e }) }));
    child.on("exit", (code, signal) => {
      const how = signal !== null ? `signal ${signal}` : `status ${code}`;
      const why = qemuStderr.trim().split("\n").slice(-2).join(" | ");
      if (filter.phase === "boot") finish({ error: failure("LAB_BOOT_FAILED", `the lab exited (${how}) before the command started${why ? `: ${why}` : ""}`) });
      else if (interactive && code === 0) {
        say("the lab was quit from the keyboard");
        finish({ code: 130 });
      } else finish({ error: failure("LAB_CRASHED", `the lab exited (${how}) while the command was running${why ? `: ${why}` : ""}`) });
    });
  });

  process.removeListener("SIGINT", onSignal);
  process.removeListener("SIGTERM", onSignal);
  cleanup();
  await new Promise<void>((r) => log.end(r));
  if ("error" in outcome) {
    await pruneLogs(logs, 20);
    throw outcome.error;
  }
  say(`the command exited with ${outcome.code} after ${((performance.now() - t0) / 1000).toFixed(0)} s; its longest silence: ${(longestSilence / 1000).toFixed(0)} s`);
  // keep logs of failed lab runs only, unless asked to keep them all
  if (env["TYPEVISOR_LAB_KEEP_LOG"] === "1") say(`console log: ${logPath}; kernel log: ${kernelLogPath}`);
  else {
    if ((await stat(logPath)).isFile()) await rm(logPath, { force: true });
    await rm(kernelLogPath, { force: true });
  }
  await pruneLogs(logs, 20);
  return outcome.code;
}

/**
 * Collect what the lab can tell about a stall (diagnose.ts) into the log, step by step; resolve
 * with a one-line summary for the error.
 */
async function diagnoseSilence(qemuPid: number | undefined, ports: LabPorts, nonce: string, write: (text: string) => void): Promise<string> {
  const section = (title: string, body: string): void => write(`\n\n==== typevisor-lab watchdog: ${title} ====\n${body}\n`);
  const notes: string[] = [];
  if (qemuPid !== undefined) {
    const threads = qemuThreadsReport(qemuPid);
    section("QEMU's threads on the host", threads);
    const hours = /timeout \d+\.\d+ s \(([\d.]+) h/.exec(threads);
    if (hours !== null) notes.push(`QEMU's main loop waits ${hours[1]} h for its next timer (the emulated host has no timer due)`);
  }
  const qmp = await qmpReport(ports.qmpSocket);
  section("QMP: lab CPUs, local APIC, PIC; SysRq l, w, t", qmp);
  const agent = await agentReport(ports.agentSocket, `@@TVLAB:${nonce}:agent-end@@`, 60_000);
  section("lab agent: timers, interrupts, every process and thread, VMM reports", agent);
  if (/did not finish|closed its port|lab agent:/.test(agent)) notes.push("the lab agent did not answer in full");
  // QEMU's threads again: whether the SysRq keys and the agent woke the lab up
  if (qemuPid !== undefined) section("QEMU's threads on the host, after the diagnosis", qemuThreadsReport(qemuPid));
  return notes.length > 0 ? notes.join("; ") : "see the diagnosis";
}
