/**
 * The native engine: how the control plane drives a typevisor VMM. A VM is one
 * `typevisor run` process (Firecracker's and Cloud Hypervisor's process
 * model): started detached in its own session, so a daemon that dies or
 * restarts leaves it running; its serial console goes to a rotated log file
 * and a console socket, its control API to a unix socket, and how it ended
 * to an exit file (the daemon may not be its parent when it exits).
 */
import { spawn, type ChildProcess } from "node:child_process";
import { closeSync, mkdirSync, openSync } from "node:fs";
import { dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { VMM_NODE_FLAGS } from "../vmm/isolates.js";

export interface VmmLaunch {
  id: string;
  kernel: string;
  initrd?: string;
  cmdline: string;
  cpus: number;
  memoryMiB: number;
  /** The daemon's memory overcommit ratio: the VMM refuses more guest memory than host memory × this. */
  memoryOvercommit?: number;
  disks: { path: string; format: "raw" | "qcow2"; readonly?: boolean; serial?: string }[];
  nets: { tap: string; mac?: string }[];
  rng: boolean;
  balloon: boolean;
  apiSocket: string;
  consoleLog: string;
  consoleLogSize: number;
  consoleSocket: string;
  exitFile: string;
  /**
   * The VMM's stats page (`run --stats-file`, vmm/stats/layout.ts): the daemon reads the VM's I/O
   * counters from it instead of asking the VMM. In a directory the VMM cannot write.
   */
  statsFile?: string;
  /** The VMM's own stderr (its messages, not the guest's). */
  vmmLog: string;
  /** Run on a PVM /dev/kvm (purpose-built guests only). */
  forceKvm: boolean;
  /**
   * Start from a saved state (`run --restore DIR`, docs/snapshots.md) instead of booting: the
   * kernel, command line, CPUs and memory come from the snapshot; the disks and NICs given here
   * replace its back ends in order. `paused`: the VM stays paused after the restore.
   */
  restore?: { dir: string; paused: boolean };
  /**
   * Wait for a live migration instead of booting (`run --incoming`, docs/migration.md): the
   * machine comes in the stream; the disks and NICs given here are this host's back ends. TLS:
   * this side's one-time certificate and key files, and the source's fingerprint; none on a unix
   * endpoint (a sandboxed VMM's, which its daemon relays: control/migration-relay.ts).
   */
  incoming?: { endpoint: string; tls?: { certFile: string; keyFile: string; peerFingerprint: string } };
}

/** bin/typevisor.js of this installation (dist/engine/native.js → ../../bin). */
export const TYPEVISOR_BIN = fileURLToPath(new URL("../../bin/typevisor.js", import.meta.url));

export function vmmArgs(l: VmmLaunch): string[] {
  if (l.restore !== undefined) return restoreArgs(l, l.restore);
  if (l.incoming !== undefined) {
    const i = l.incoming;
    return [
      "run", "--no-lab", "--id", l.id, "--incoming", i.endpoint,
      ...(i.tls !== undefined ? ["--tls-cert", i.tls.certFile, "--tls-key", i.tls.keyFile, "--tls-peer-fingerprint", i.tls.peerFingerprint] : []),
      "--api-socket", l.apiSocket, "--console-log", l.consoleLog, "--console-log-size", String(l.consoleLogSize), "--console-socket", l.consoleSocket, "--exit-file", l.exitFile,
      ...statsArgs(l), ...backEndArgs(l), ...(l.forceKvm ? ["--force-kvm"] : []),
    ];
  }
  const args = [
    "run", "--no-lab", "--id", l.id,
    "--kernel", l.kernel,
    ...(l.initrd !== undefined ? ["--initrd", l.initrd] : []),
    "--cmdline", l.cmdline,
    "--cpus", String(l.cpus),
    "--memory", String(l.memoryMiB),
    ...(l.memoryOvercommit !== undefined ? ["--memory-overcommit", String(l.memoryOvercommit)] : []),
    "--api-socket", l.apiSocket,
    "--console-log", l.consoleLog,
    "--console-log-size", String(l.consoleLogSize),
    "--console-socket", l.consoleSocket,
    "--exit-file", l.exitFile,
    ...statsArgs(l),
  ];
  args.push(...backEndArgs(l));
  if (l.rng) args.push("--rng");
  if (l.balloon) args.push("--balloon");
  if (l.forceKvm) args.push("--force-kvm");
  return args;
}

/** A --disk value (also PUT /restore's `disks` entries). The format always said: the VMM never guesses it (vmm/disk/open.ts). */
export function diskArg(d: VmmLaunch["disks"][number]): string {
  return [d.path, `format=${d.format}`, ...(d.readonly === true ? ["readonly=on"] : []), ...(d.serial !== undefined ? [`serial=${d.serial}`] : [])].join(",");
}

/** A --net value (also PUT /restore's `nets` entries). */
export function netArg(n: VmmLaunch["nets"][number]): string {
  return `tap=${n.tap}${n.mac !== undefined ? `,mac=${n.mac}` : ""}`;
}

function statsArgs(l: VmmLaunch): string[] {
  return l.statsFile !== undefined ? ["--stats-file", l.statsFile] : [];
}

/** --disk and --net flags, the same for a boot and a restore (where they replace the snapshot's back ends in order). */
function backEndArgs(l: VmmLaunch): string[] {
  return [...l.disks.flatMap((d) => ["--disk", diskArg(d)]), ...l.nets.flatMap((n) => ["--net", netArg(n)])];
}

/**
 * `run --restore DIR`: the machine (CPUs, memory, devices, kernel) is the snapshot's; this VM's
 * sockets, logs and back ends are given. (With a standby VMM ready, the daemon sends the same as
 * `PUT /restore` instead: control/standby.ts.)
 */
function restoreArgs(l: VmmLaunch, r: { dir: string; paused: boolean }): string[] {
  return [
    "run", "--no-lab", "--id", l.id,
    "--restore", r.dir,
    // What a guest reboot boots: this VM's own copies, not the paths in the snapshot (its source's).
    "--kernel", l.kernel,
    ...(l.initrd !== undefined ? ["--initrd", l.initrd] : []),
    "--api-socket", l.apiSocket,
    "--console-log", l.consoleLog,
    "--console-log-size", String(l.consoleLogSize),
    "--console-socket", l.consoleSocket,
    "--exit-file", l.exitFile,
    ...statsArgs(l),
    ...backEndArgs(l),
    ...(r.paused ? ["--paused"] : []),
    ...(l.forceKvm ? ["--force-kvm"] : []),
  ];
}

/**
 * The VMM's whole environment: it reads none of the daemon's (every path it needs comes as a flag;
 * TYPEVISOR_TRACE_PHASES=1 alone is passed on, as that value only), and whatever the daemon was
 * given (tokens, credentials, NODE_OPTIONS) stays out of a process that a guest may one day take over.
 */
export function vmmEnv(id: string, env: NodeJS.ProcessEnv = process.env): Record<string, string> {
  return {
    PATH: env["PATH"] ?? "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    TYPEVISOR_VM_ID: id,
    // The start-up phase marks (vmm/phases.ts), for a daemon started with them: one switch, its value fixed.
    ...(env["TYPEVISOR_TRACE_PHASES"] === "1" ? { TYPEVISOR_TRACE_PHASES: "1" } : {}),
  };
}

/**
 * Start the VMM. Detached (setsid) with no inherited descriptors but its log:
 * a SIGKILL of the daemon, or a Ctrl-C in the daemon's terminal, never reaches it.
 */
export function spawnVmm(l: VmmLaunch): ChildProcess {
  for (const f of [l.consoleLog, l.exitFile]) mkdirSync(dirname(f), { recursive: true, mode: 0o700 });
  const log = openSync(l.vmmLog, "a");
  try {
    const child = spawn(process.execPath, [...VMM_NODE_FLAGS, TYPEVISOR_BIN, ...vmmArgs(l)], {
      detached: true,
      stdio: ["ignore", log, log],
      env: vmmEnv(l.id),
    });
    child.unref();
    return child;
  } finally {
    closeSync(log);
  }
}
