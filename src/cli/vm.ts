/**
 * `typevisor vm ...`: the VM lifecycle over the daemon's API (src/api/client.ts).
 * Tables for people, `--json` for scripts (the API's JSON as is), a progress
 * line on a terminal for the slow operations (create, start).
 *
 * Exit codes, the same for every client command (vm, host, events), so a
 * script can tell "try again later" from "you asked for something wrong":
 *   0  ok
 *   1  the operation failed at run time (VM_START_FAILED, VMM_*, any 5xx)
 *   2  bad input (a 4xx not listed below; usage errors)
 *   3  not found (VM_NOT_FOUND, 404)
 *   4  conflict with the VM's state or the host's resources (VM_STATE, VM_EXISTS, INSUFFICIENT_RESOURCES, 409)
 *   5  the daemon is unreachable (DAEMON_UNREACHABLE)
 *   6  not allowed (UNAUTHENTICATED 401, FORBIDDEN 403, TOO_MANY_ATTEMPTS 429, TLS_FINGERPRINT)
 * exit-codes.ts maps errors to these (exitCodeFor).
 */
import { resolve } from "node:path";
import type { Duplex } from "node:stream";
import { Option, type Command } from "commander";
import type { TypevisorClient } from "../api/client.js";
import type { VmInfo, VmSpecInput } from "../control/spec.js";
import { isActive } from "../control/state.js";
import { TypevisorError } from "../errors.js";
import { addConnectionOptions, connect, type ConnectionOptions } from "./connect.js";
import { formatBytes, formatDuration, formatTime, renderFields, renderTable, toJson, withProgress } from "./format.js";
import { formatHistory, parseHistoryRange, parseStep } from "./history.js";
import { registerSnapshotCommands } from "./snapshot.js";
import { registerMigrateCommand } from "./migrate.js";
import { TerminalSafeStream } from "./terminal-safe.js";


/** The exit-code table in every client command's --help (one text, so they cannot drift apart). */
export const EXIT_CODES_HELP = `
Exit codes:
  0  ok
  1  the operation failed at run time (VM_START_FAILED, VMM_*, daemon 5xx)
  2  bad input (invalid name, number, size or flag; other 4xx)
  3  not found (VM_NOT_FOUND)
  4  conflict with the VM's state or the host's resources (VM_STATE, VM_EXISTS, INSUFFICIENT_RESOURCES)
  5  the daemon is unreachable (DAEMON_UNREACHABLE)
  6  not allowed: no or bad credentials, a missing permission, locked out, or a certificate not the pinned one`;

/** A client subcommand: connection options and the exit-code help. */
export function clientCommand(parent: Command, name: string, description: string): Command {
  return addConnectionOptions(parent.command(name).description(description)).addHelpText("after", EXIT_CODES_HELP);
}

// ---- input ------------------------------------------------------------------

function bad(message: string, hint?: string): TypevisorError {
  return new TypevisorError("INVALID_ARGUMENT", message, hint !== undefined ? { hint } : undefined);
}

/** A whole number from a flag; ranges are the daemon's to check (one schema, src/control/spec.ts). */
export function parseWhole(flag: string, v: string, unit = ""): number {
  const n = /^\s*-?\d+\s*$/.test(v) ? Number(v) : NaN;
  if (!Number.isSafeInteger(n)) throw bad(`${flag} must be a whole number${unit !== "" ? ` of ${unit}` : ""} (got "${v}")`);
  return n;
}

/** A number of seconds (fractions allowed). */
export function parseSeconds(flag: string, v: string): number {
  const n = /^\s*\d+(\.\d+)?\s*$/.test(v) ? Number(v) : NaN;
  if (!Number.isFinite(n) || n <= 0) throw bad(`${flag} must be a positive number of seconds (got "${v}")`);
  return n;
}

/** `tap=NAME[,mac=MAC]`, as `typevisor run --net` takes it. */
export function parseNet(v: string): { tap: string; mac?: string } {
  const fields = new Map<string, string>();
  for (const part of v.split(",")) {
    const eq = part.indexOf("=");
    const key = eq < 0 ? "" : part.slice(0, eq).trim();
    if (key !== "tap" && key !== "mac") throw bad(`--net ${v}: expected tap=NAME[,mac=MAC] (got "${part}")`);
    if (fields.has(key)) throw bad(`--net ${v}: ${key} given twice`);
    fields.set(key, part.slice(eq + 1).trim());
  }
  const tap = fields.get("tap");
  if (tap === undefined || tap === "") throw bad(`--net ${v}: tap=NAME is required`);
  const mac = fields.get("mac");
  return { tap, ...(mac !== undefined ? { mac } : {}) };
}

/** `ctrl-]`, `ctrl-x`, `^]`: the byte that key sends in raw mode (the letter or symbol & 0x1f). */
export function parseDetachKey(v: string): number {
  const m = /^(?:ctrl-|\^)(.)$/i.exec(v.trim());
  const ch = m?.[1]?.toUpperCase();
  const code = ch !== undefined ? ch.charCodeAt(0) : -1;
  // @ A-Z [ \ ] ^ _ are the characters with a control code (0x40-0x5f).
  if (code < 0x40 || code > 0x5f) throw bad(`--detach-key takes ctrl-KEY, KEY a letter or one of @ [ \\ ] ^ _ (got "${v}")`);
  return code & 0x1f;
}

interface CreateOptions extends ConnectionOptions {
  image?: string;
  kernel?: string;
  initrd?: string;
  cmdline?: string;
  append?: string;
  cpus?: string;
  memory?: string;
  diskSize?: string;
  diskFormat?: string;
  pool?: string;
  net?: string[];
  rng: boolean;
  balloon?: boolean;
  cpuWeight?: string;
  restart?: "no" | "on-crash";
  start?: boolean;
  json?: boolean;
}

/** `vm show`'s line for a disk: path, format, virtual size, bytes on the host, image, backing chain. */
export function diskLine(d: VmInfo["disks"][number]): string {
  const from = d.image !== undefined ? `  from image ${d.image}` : "";
  const backing = d.backing !== undefined ? `\n    backing: ${d.backing} (raw, read-only)` : "";
  const pool = d.pool !== undefined ? `  pool ${d.pool}` : "";
  return `  ${d.name !== undefined ? `${d.name}  ` : ""}${d.path}  ${d.format}  ${formatBytes(d.sizeBytes)} virtual, ${formatBytes(d.allocatedBytes)} allocated${pool}${from}${backing}\n`;
}

function parseDiskFormat(v: string, flag = "--disk-format"): "qcow2" | "raw" {
  if (v !== "qcow2" && v !== "raw") throw new TypevisorError("INVALID_ARGUMENT", `${flag} must be qcow2 or raw (got "${v}")`);
  return v;
}

/** The spec to send: only what the user gave, so the daemon's defaults stay the defaults. */
export function specFromOptions(name: string, o: CreateOptions, cwd = process.cwd()): VmSpecInput {
  return {
    name,
    ...(o.image !== undefined ? { image: o.image } : {}),
    // The daemon reads these on its side: a path relative to the caller's directory means nothing there.
    ...(o.kernel !== undefined ? { kernel: resolve(cwd, o.kernel) } : {}),
    ...(o.initrd !== undefined ? { initrd: resolve(cwd, o.initrd) } : {}),
    ...(o.cmdline !== undefined ? { cmdline: o.cmdline } : {}),
    ...(o.append !== undefined ? { append: o.append } : {}),
    ...(o.cpus !== undefined ? { cpus: parseWhole("--cpus", o.cpus) } : {}),
    ...(o.memory !== undefined ? { memoryMiB: parseWhole("--memory", o.memory, "MiB") } : {}),
    ...(o.diskSize !== undefined ? { diskSize: o.diskSize } : {}),
    ...(o.diskFormat !== undefined ? { diskFormat: parseDiskFormat(o.diskFormat) } : {}),
    ...(o.pool !== undefined ? { pool: o.pool } : {}),
    ...(o.net !== undefined ? { nets: o.net.map(parseNet) } : {}),
    ...(o.rng === false ? { rng: false } : {}),
    ...(o.balloon === true ? { balloon: true } : {}),
    ...(o.cpuWeight !== undefined ? { cpuWeight: parseWhole("--cpu-weight", o.cpuWeight) } : {}),
    ...(o.restart !== undefined ? { restart: o.restart } : {}),
  };
}

// ---- output -----------------------------------------------------------------

function specOf(vm: VmInfo): { cpus?: number; memoryMiB?: number } {
  const s = vm.spec as { cpus?: unknown; memoryMiB?: unknown };
  return {
    ...(typeof s.cpus === "number" ? { cpus: s.cpus } : {}),
    ...(typeof s.memoryMiB === "number" ? { memoryMiB: s.memoryMiB } : {}),
  };
}

/** How long the VMM has run; only while it does (startedAt stays behind after a stop). */
function uptime(vm: VmInfo, now = Date.now()): string | undefined {
  if (vm.startedAt === undefined || !isActive(vm.state)) return undefined;
  return formatDuration(now - Date.parse(vm.startedAt));
}

export function formatVmTable(vms: readonly VmInfo[], now = Date.now()): string {
  const right = (title: string) => ({ title, align: "right" as const });
  return renderTable(
    ["NAME", "STATE", right("CPUS"), right("MEMORY"), right("DISK"), right("PID"), right("UPTIME")],
    vms.map((vm) => {
      const s = specOf(vm);
      return [
        vm.name,
        // the watchdog's word: the VMM does not answer (docs/control-plane.md)
        vm.unresponsive !== undefined ? `${vm.state}, unresponsive` : vm.state,
        s.cpus,
        s.memoryMiB !== undefined ? formatBytes(s.memoryMiB * 2 ** 20) : undefined,
        vm.disks.length > 0 ? formatBytes(vm.disks.reduce((a, d) => a + d.sizeBytes, 0)) : undefined,
        isActive(vm.state) ? vm.pid : undefined,
        uptime(vm, now),
      ];
    }),
  );
}

function specValue(v: unknown): string {
  if (typeof v === "string") return v;
  if (Array.isArray(v)) return v.length === 0 ? "none" : v.map((x) => (typeof x === "object" && x !== null ? Object.entries(x).map(([k, y]) => `${k}=${String(y)}`).join(",") : String(x))).join(" ");
  return JSON.stringify(v);
}

export function formatVmDetails(vm: VmInfo, now = Date.now()): string {
  const s = specOf(vm);
  const spec = vm.spec as Record<string, unknown>;
  const exit = vm.lastExit;
  const lines: [string, string | number | undefined][] = [
    ["name", vm.name],
    ["id", vm.id],
    ["state", vm.state],
    ["unresponsive", vm.unresponsive !== undefined ? `since ${formatTime(vm.unresponsive.since)} (its VMM does not answer)` : undefined],
    ["paused by", vm.pauseReason !== undefined ? `${vm.pauseReason.kind}: ${vm.pauseReason.message}` : undefined],
    ["pid", isActive(vm.state) ? vm.pid : undefined],
    ["started", vm.startedAt !== undefined ? formatTime(vm.startedAt) : undefined],
    ["uptime", uptime(vm, now)],
    ["created", formatTime(vm.createdAt)],
    ["cpus", s.cpus],
    ["memory", s.memoryMiB !== undefined ? formatBytes(s.memoryMiB * 2 ** 20) : undefined],
    ["restarts", vm.restarts],
    ["console log", vm.consoleDroppedBytes !== undefined ? `${vm.consoleLog} (${formatBytes(vm.consoleDroppedBytes)} of output dropped: its disk was full)` : vm.consoleLog],
    ["api socket", vm.apiSocket],
    ["cgroup", vm.cgroup],
    ["sandbox", vm.sandbox !== undefined ? `uid ${vm.sandbox.uid} (gid ${vm.sandbox.uid}), own namespaces, seccomp` : undefined],
    [
      "last exit",
      exit !== undefined
        ? `${exit.result}${exit.code !== null ? ` (code ${exit.code})` : ""}${exit.signal !== null ? ` (signal ${exit.signal})` : ""}${exit.reason !== undefined ? `: ${exit.reason}` : ""} at ${formatTime(exit.at)}`
        : undefined,
    ],
  ];
  let out = renderFields(lines);
  out += "spec:\n";
  out += renderFields(Object.entries(spec).filter(([k]) => k !== "name").map(([k, v]) => [`  ${k}`, specValue(v)] as const));
  out += "disks:\n";
  out += vm.disks.length === 0 ? "  none\n" : vm.disks.map(diskLine).join("");
  return out;
}

// ---- the commands -----------------------------------------------------------

function print(text: string): void {
  process.stdout.write(text);
}

/** `vm1: running`, or the VM as JSON. */
function printState(vm: VmInfo, json: boolean | undefined): void {
  print(json === true ? toJson(vm) : `${vm.name}: ${vm.state}\n`);
}

/** Ends when the user presses Ctrl-C (SIGINT) or the daemon hangs up; for `-f` modes. */
function untilInterrupted(onInterrupt: () => void): () => void {
  const handler = (): void => onInterrupt();
  process.once("SIGINT", handler);
  process.once("SIGTERM", handler);
  return () => {
    process.off("SIGINT", handler);
    process.off("SIGTERM", handler);
  };
}

/** A reader that went away (`| head`) ends the command quietly rather than with EPIPE. */
function quietOnEpipe(onGone: () => void): void {
  process.stdout.on("error", (e: NodeJS.ErrnoException) => {
    if (e.code === "EPIPE") onGone();
  });
}

async function followLogs(client: TypevisorClient, name: string, tail: number | undefined, raw: boolean): Promise<void> {
  const res = await client.followConsole(name, tail !== undefined ? { tail } : {});
  let stopped = false;
  const stop = (): void => {
    stopped = true;
    res.destroy();
  };
  const release = untilInterrupted(stop);
  quietOnEpipe(stop);
  const safe = new TerminalSafeStream();
  try {
    for await (const chunk of res) {
      if (!process.stdout.write(raw ? (chunk as Buffer) : safe.push(chunk as Buffer))) await new Promise((r) => process.stdout.once("drain", r));
    }
  } catch (e) {
    // Destroyed by Ctrl-C or a closed stdout: a normal end. Anything else is the daemon going away.
    if (!stopped) throw new TypevisorError("DAEMON_UNREACHABLE", `the console stream broke: ${(e as Error).message}`);
  } finally {
    release();
  }
}

/**
 * The interactive serial console. On a terminal: raw mode, every key goes to
 * the guest except the detach key. Otherwise (a pipe, a file): stdin is copied
 * to the guest byte for byte, the detach key included (a script may mean it),
 * and the command ends when stdin does, after a grace period for the answer.
 */
export async function attachConsole(socket: Duplex, name: string, detachKey: number, detachLabel: string): Promise<void> {
  const stdin = process.stdin;
  const tty = stdin.isTTY === true;
  if (tty) process.stderr.write(`attached to ${name}'s console; ${detachLabel} detaches\r\n`);
  await new Promise<void>((done) => {
    let finished = false;
    let grace: NodeJS.Timeout | undefined;
    const finish = (why: string | undefined): void => {
      if (finished) return;
      finished = true;
      if (grace !== undefined) clearTimeout(grace);
      stdin.off("data", onInput);
      stdin.off("end", onEnd);
      if (tty) stdin.setRawMode(false);
      stdin.pause();
      socket.destroy();
      if (why !== undefined) process.stderr.write(tty ? `\r\n${why}\r\n` : `${why}\n`);
      done();
    };
    const onInput = (b: Buffer): void => {
      const at = tty ? b.indexOf(detachKey) : -1;
      if (at < 0) {
        socket.write(b);
        return;
      }
      if (at > 0) socket.write(b.subarray(0, at));
      finish(`detached from ${name}'s console`);
    };
    const onEnd = (): void => {
      // Output the guest produces in answer to the last input arrives a moment later: through the
      // daemon and the VMM, on a loaded host, 300 ms was sometimes too short for even an echo.
      grace = setTimeout(() => finish(undefined), CONSOLE_PIPE_GRACE_MS);
    };
    socket.on("data", (b: Buffer) => process.stdout.write(b));
    socket.on("close", () => finish(tty ? `${name}'s console closed (the VM stopped or the daemon went away)` : undefined));
    socket.on("error", () => finish(`${name}'s console: the connection broke`));
    if (tty) stdin.setRawMode(true);
    stdin.on("data", onInput);
    stdin.on("end", onEnd);
    stdin.resume();
  });
}

/** After a piped stdin ends, how long `vm console` waits for the guest's answer before it exits. */
const CONSOLE_PIPE_GRACE_MS = 1000;

export function registerVmCommands(program: Command): void {
  const vm = program.command("vm").description("create, run and inspect VMs through the typevisor daemon").addHelpText("after", EXIT_CODES_HELP);

  clientCommand(vm, "create", "create a VM (its disk from an image, or a kernel to boot); --start starts it too")
    .argument("<name>", "VM name: 1-63 lower-case letters, digits and '-'")
    .option("--image <name>", "boot this image (typevisor image ls); its root filesystem becomes the VM's disk")
    .option("--kernel <path>", "boot this kernel instead of an image's (with an imported disk image, image import: the kernel it boots)")
    .option("--initrd <path>", "initial ramdisk for --kernel")
    .option("--cmdline <text>", "kernel command line, replacing the default")
    .option("--append <text>", "text appended to the default kernel command line")
    .option("--cpus <n>", "vCPUs (default 1)")
    .option("--memory <MiB>", "guest memory in MiB (default 256)")
    .option("--disk-size <size>", 'size of the VM\'s disk, e.g. "2G" (grown from the image, or blank)')
    .option("--disk-format <format>", "qcow2 (default): a thin overlay on a shared base of the image, instant and small; raw: a full copy")
    .option("--pool <name>", "the storage pool the disk goes in (default: default, the daemon's data directory; typevisor pool ls)")
    .option("--net <tap=NAME[,mac=MAC]>", "a virtio-net device on a host TAP (repeatable)", (v: string, prev: string[] | undefined) => [...(prev ?? []), v])
    .option("--no-rng", "no virtio-rng device")
    .option("--balloon", "a virtio-balloon device")
    .option("--cpu-weight <n>", "cgroup v2 cpu.weight, 1-10000 (default 100)")
    .addOption(new Option("--restart <policy>", "restart the VM when its VMM dies unexpectedly").choices(["no", "on-crash"]))
    .option("--start", "start the VM once created")
    .option("--json", "print the VM as JSON")
    .action(async (name: string, o: CreateOptions) => {
      const spec = specFromOptions(name, o);
      const client = connect(o);
      const created = await withProgress(`${o.start === true ? "creating and starting" : "creating"} ${name}`, () => client.createVm(spec, { start: o.start === true }));
      printState(created, o.json);
    });

  clientCommand(vm, "ls", "list VMs: name, state, size, process and uptime")
    .option("--json", "print the API's JSON")
    .action(async (o: ConnectionOptions & { json?: boolean }) => {
      const vms = await connect(o).listVms();
      if (o.json === true) print(toJson({ vms }));
      else if (vms.length === 0) print("no VMs (create one: typevisor vm create NAME --image minimal)\n");
      else print(formatVmTable(vms));
    });

  clientCommand(vm, "show", "one VM in detail: state, spec, disks, console log, last exit")
    .argument("<name>", "VM name")
    .option("--json", "print the API's JSON")
    .action(async (name: string, o: ConnectionOptions & { json?: boolean }) => {
      const info = await connect(o).getVm(name);
      print(o.json === true ? toJson(info) : formatVmDetails(info));
    });

  const simple: [action: "start" | "pause" | "resume" | "reboot", description: string, progress: boolean][] = [
    ["start", "start a VM (defined, stopped or crashed)", true],
    ["pause", "pause a running VM's vCPUs", false],
    ["resume", "resume a paused VM", false],
    ["reboot", "reset a running VM (a new boot in the same VMM)", false],
  ];
  for (const [action, description, progress] of simple) {
    clientCommand(vm, action, description)
      .argument("<name>", "VM name")
      .option("--json", "print the VM as JSON")
      .action(async (name: string, o: ConnectionOptions & { json?: boolean }) => {
        const client = connect(o);
        const call = (): Promise<VmInfo> => (action === "start" ? client.startVm(name) : action === "pause" ? client.pauseVm(name) : action === "resume" ? client.resumeVm(name) : client.rebootVm(name));
        printState(progress ? await withProgress(`${action === "start" ? "starting" : action} ${name}`, call) : await call(), o.json);
      });
  }

  clientCommand(vm, "stop", "stop a VM: the VMM stops its vCPUs and exits (killed after --timeout, or at once with --force)")
    .argument("<name>", "VM name")
    .option("--force", "kill the VMM at once (also ends a VM stuck stopping)")
    .option("--timeout <seconds>", "kill the VMM if it has not exited by then (default: the daemon's --stop-timeout)")
    .option("--json", "print the VM as JSON")
    .action(async (name: string, o: ConnectionOptions & { force?: boolean; timeout?: string; json?: boolean }) => {
      const timeoutSeconds = o.timeout !== undefined ? parseSeconds("--timeout", o.timeout) : undefined;
      const client = connect(o);
      const info = await withProgress(`stopping ${name}`, () => client.stopVm(name, { force: o.force === true, ...(timeoutSeconds !== undefined ? { timeoutSeconds } : {}) }));
      printState(info, o.json);
    });

  clientCommand(vm, "rm", "remove a VM and its disks (--force stops it first)")
    .argument("<name>", "VM name")
    .option("--force", "stop the VM first if it runs")
    .action(async (name: string, o: ConnectionOptions & { force?: boolean }) => {
      await connect(o).removeVm(name, { force: o.force === true });
      print(`${name}: removed\n`);
    });

  const disk = vm.command("disk").description("add and remove a VM's extra disks (while it is stopped)").addHelpText("after", EXIT_CODES_HELP);
  clientCommand(disk, "add", "add a blank disk to a stopped VM: the next virtio-blk device (/dev/vdb, ...) at its next start")
    .argument("<vm>", "VM name")
    .requiredOption("--size <size>", 'the disk\'s size, e.g. "10G" (virtual size for qcow2)')
    .option("--pool <name>", "the storage pool it goes in (default: default)")
    .option("--format <format>", "qcow2 (default, thin) or raw (a sparse file)")
    .option("--json", "print the VM as JSON")
    .action(async (name: string, o: ConnectionOptions & { size: string; pool?: string; format?: string; json?: boolean }) => {
      const info = await connect(o).addDisk(name, { size: o.size, ...(o.pool !== undefined ? { pool: o.pool } : {}), ...(o.format !== undefined ? { format: parseDiskFormat(o.format, "--format") } : {}) });
      const added = info.disks.at(-1);
      print(o.json === true ? toJson(info) : `${name}: ${added?.name ?? "disk"} added\n${added !== undefined ? diskLine(added) : ""}`);
    });
  clientCommand(disk, "rm", "remove a disk (disk1, disk2, ...; vm show lists them) and its file from a stopped VM")
    .argument("<vm>", "VM name")
    .argument("<disk>", "disk<N> or N (not disk0, the disk the VM boots from)")
    .option("--json", "print the VM as JSON")
    .action(async (name: string, d: string, o: ConnectionOptions & { json?: boolean }) => {
      const info = await connect(o).removeDisk(name, d);
      print(o.json === true ? toJson(info) : `${name}: ${d.startsWith("disk") ? d : `disk${d}`} removed\n`);
    });

  registerSnapshotCommands(vm);
  registerMigrateCommand(vm);

  clientCommand(vm, "logs", "the VM's serial console output, as captured by the daemon")
    .argument("<name>", "VM name")
    .option("-f, --follow", "keep printing new output until Ctrl-C")
    .option("--tail <bytes>", "only the last BYTES bytes")
    .option("--raw", "the guest's bytes as they are, escape sequences included (default: control characters shown as \\xNN)")
    .action(async (name: string, o: ConnectionOptions & { follow?: boolean; tail?: string; raw?: boolean }) => {
      const tail = o.tail !== undefined ? parseWhole("--tail", o.tail, "bytes") : undefined;
      const raw = o.raw === true;
      if (o.follow === true) {
        // No request timeout: a quiet guest may print nothing for hours.
        await followLogs(connect(o, { timeoutMs: 0 }), name, tail, raw);
        return;
      }
      const bytes = await connect(o).console(name, tail !== undefined ? { tail } : {});
      quietOnEpipe(() => undefined); // `vm logs NAME | head`: the rest is not wanted
      // what a guest printed is hostile to a terminal (terminal-safe.ts)
      if (raw) process.stdout.write(bytes);
      else {
        const safe = new TerminalSafeStream();
        process.stdout.write(safe.push(bytes) + safe.end());
      }
    });

  clientCommand(vm, "console", "the VM's serial console, interactive (Ctrl-] detaches)")
    .argument("<name>", "VM name")
    .option("--detach-key <key>", "the key that detaches, as ctrl-KEY", "ctrl-]")
    .action(async (name: string, o: ConnectionOptions & { detachKey: string }) => {
      const key = parseDetachKey(o.detachKey);
      const socket = await connect(o, { timeoutMs: 0 }).attachConsole(name);
      await attachConsole(socket, name, key, `Ctrl-${String.fromCharCode(key + 0x40)}`);
    });

  clientCommand(vm, "stats", "the VM's latest usage sample: CPU, memory, disk and network I/O, uptime; --history: its usage over time")
    .argument("<name>", "VM name")
    .option("--history <range>", "the history of the last RANGE (90s, 15m, 1h, 7d, 1y): averages per 10 s, 5 min or 1 h")
    .option("--step <seconds>", "with --history: 10, 300 or 3600 (default: chosen from the range)")
    .option("--json", "print the API's JSON")
    .action(async (name: string, o: ConnectionOptions & { json?: boolean; history?: string; step?: string }) => {
      if (o.history !== undefined || o.step !== undefined) {
        const range = parseHistoryRange("--history", o.history ?? "1h");
        const to = new Date();
        const h = await connect(o).metricsHistory({ vm: name, from: new Date(to.getTime() - range), to, ...(o.step !== undefined ? { step: parseStep("--step", o.step) } : {}) });
        return print(o.json === true ? toJson(h) : formatHistory(h));
      }
      const s = await connect(o).vmStats(name);
      if (o.json === true) return print(toJson(s));
      const u = s.usage;
      if (u === undefined) return print(`${s.name}: ${s.state}, no usage sample (it has no VMM process, or the first sample is not taken yet)\n`);
      print(
        renderFields([
          ["name", s.name],
          ["state", s.state],
          ["cpu", `${u.cpuPercent.toFixed(1)}%`],
          ["cpu time", formatDuration(u.cpuSeconds * 1000)],
          ["memory", formatBytes(u.memoryBytes)],
          ["disk read", formatBytes(u.diskReadBytes)],
          ["disk write", formatBytes(u.diskWriteBytes)],
          ["net rx", formatBytes(u.netRxBytes)],
          ["net tx", formatBytes(u.netTxBytes)],
          ["uptime", formatDuration(u.uptimeMs)],
          ["sampled", formatTime(u.at)],
        ]),
      );
    });
}
