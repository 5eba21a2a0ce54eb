/**
 * `typevisor daemon`: the control plane in the foreground (systemd-friendly:
 * logs JSON lines to stdout, exits cleanly on SIGTERM/SIGINT). VMs keep
 * running when it stops unless --stop-vms-on-exit; a new daemon re-attaches
 * to them.
 */
import { chmodSync, existsSync, mkdirSync, realpathSync, statSync } from "node:fs";
import { Option, type Command } from "commander";
import { pino } from "pino";
import { TypevisorError } from "../errors.js";
import { TypevisorClient } from "../api/client.js";
import { startApi } from "../api/server.js";
import { AuditLog } from "../control/audit.js";
import { Identities } from "../control/identity.js";
import { DaemonLogFile } from "../control/logs.js";
import { parseSyslogTarget, SyslogForwarder } from "../control/syslog.js";
import { OtlpForwarder, parseOtlpUrl } from "../control/otlp.js";
import { VmManager } from "../control/manager.js";
import { canSandbox, DEFAULT_UID_RANGE, JAIL_BIN, parseUidRange, type SandboxOptions } from "../control/sandbox/sandbox.js";
import { ensureSelfSigned, loadTls, type TlsMaterial } from "../control/tls.js";
import { groupId } from "../sys/peercred.js";
import { checkSocketPaths, homePaths } from "../control/paths.js";
import { parsePolicy } from "../control/resources.js";
import { parseSize } from "../size.js";
import { LOG_SIZE_LIMITS } from "../vmm/console/rotating-log.js";
import { dataHome } from "../images/dirs.js";
import { kvmHostKind } from "../kvm/kvm.js";
import { installLastResort } from "./last-resort.js";
import { stdoutWhileItLasts } from "./stdio-gone.js";

interface DaemonOptions {
  home?: string;
  socket?: string;
  listen?: string;
  tlsCert?: string;
  tlsKey?: string;
  socketGroup: string;
  cpuOvercommit: string;
  memoryOvercommit: string;
  diskOvercommit: string;
  reservedMemory: string;
  consoleLogSize: string;
  stopTimeout: string;
  startTimeout: string;
  usageInterval: string;
  streamStallTimeout: string;
  stopVmsOnExit: boolean;
  forceKvm: boolean;
  standbyVmms?: string;
  cgroups: boolean;
  /** false with --no-sandbox. */
  sandbox: boolean;
  sandboxUids: string;
  sandboxProbe?: string;
  logLevel: string;
  logSize: string;
  logSyslog: string[];
  logOtlp?: string;
  allowFiles: string[];
  alertWebhook: string[];
}

/** --allow-files directories as real paths (symlinks resolved once, at start); each must exist. */
function allowedDirs(dirs: string[]): string[] {
  return dirs.map((d) => {
    try {
      const real = realpathSync(d);
      if (!statSync(real).isDirectory()) throw new Error("not a directory");
      return real;
    } catch (e) {
      throw new TypevisorError("INVALID_ARGUMENT", `--allow-files ${d}: ${(e as Error).message}`);
    }
  });
}

function checkWebhookUrl(v: string): string {
  let u: URL | undefined;
  try {
    u = new URL(v);
  } catch {
    /* below */
  }
  if (u === undefined || (u.protocol !== "http:" && u.protocol !== "https:")) throw new TypevisorError("INVALID_ARGUMENT", `--alert-webhook takes an http:// or https:// URL (got "${v}")`);
  return u.toString();
}

/** --standby-vmms: 0..16 (each is a Node process of its own: docs/snapshots.md says what one costs). */
function standbyCount(v: string): number {
  const n = /^\d{1,2}$/.test(v.trim()) ? Number(v) : NaN;
  if (!(n >= 0 && n <= 16)) throw new TypevisorError("INVALID_ARGUMENT", `--standby-vmms must be a whole number from 0 to 16 (got "${v}")`);
  return n;
}

function seconds(name: string, v: string): number {
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0 || n > 86400) throw new TypevisorError("INVALID_ARGUMENT", `${name} must be a number of seconds between 0 and 86400 (got "${v}")`);
  return n * 1000;
}

/**
 * `HOST:PORT`, any address: the TCP listener is HTTPS only and every request is authenticated
 * (docs/security.md), so it may face a network.
 */
function parseListen(v: string): { host: string; port: number } {
  const m = /^(\[[0-9a-fA-F:]+\]|[^:]+):(\d{1,5})$/.exec(v);
  const port = m !== null ? Number(m[2]) : NaN;
  if (m === null || port > 65535) throw new TypevisorError("INVALID_ARGUMENT", `--listen takes HOST:PORT, e.g. 0.0.0.0:8420 (got "${v}")`);
  return { host: m[1]!.replace(/^\[|\]$/g, ""), port };
}

/**
 * The VMM sandbox's settings: on as root unless --no-sandbox. Building it needs root (namespaces,
 * mounts, another uid): a daemon run by another user (development) runs its VMMs as that user,
 * unconfined, and says so in its log. As root, a missing helper is an error, not a quiet fallback.
 */
function sandboxOptions(o: DaemonOptions, warn: (msg: string) => void): SandboxOptions | undefined {
  const range = parseUidRange(o.sandboxUids);
  if (!o.sandbox) return undefined;
  if (!canSandbox()) {
    warn("not running as root: VMMs run as this user without the sandbox (own uid, namespaces, seccomp); run the daemon as root for it");
    return undefined;
  }
  if (!existsSync(JAIL_BIN)) {
    throw new TypevisorError("SANDBOX", `the VMM sandbox helper ${JAIL_BIN} is not built`, { hint: "install gcc and libc6-dev, then npm run build; or start the daemon with --no-sandbox" });
  }
  return { uidBase: range.base, uidCount: range.count, ...(o.sandboxProbe !== undefined ? { probe: o.sandboxProbe.split(",").filter((x) => x !== "") } : {}) };
}

export async function daemonCommand(o: DaemonOptions): Promise<number> {
  const home = o.home ?? dataHome();
  const policy = parsePolicy({ cpu: o.cpuOvercommit, memory: o.memoryOvercommit, disk: o.diskOvercommit }, o.reservedMemory);
  const consoleLogSize = parseSize(o.consoleLogSize, { what: "--console-log-size", ...LOG_SIZE_LIMITS });
  const logSize = parseSize(o.logSize, { what: "--log-size", ...LOG_SIZE_LIMITS });
  const tcp = o.listen !== undefined ? parseListen(o.listen) : undefined;
  const streamStallMs = seconds("--stream-stall-timeout", o.streamStallTimeout);
  const config = {
    stopTimeoutMs: seconds("--stop-timeout", o.stopTimeout),
    startTimeoutMs: seconds("--start-timeout", o.startTimeout),
    usageIntervalMs: seconds("--usage-interval", o.usageInterval),
  };
  // Everything the daemon makes (inventory, sockets, VM directories, logs) and every VMM it starts
  // is for its owner alone: umask first, so no file is ever created looser and narrowed later.
  process.umask(0o077);
  mkdirSync(home, { recursive: true, mode: 0o700 });
  // a home that already existed keeps its mode through mkdir: narrow it at every start
  chmodSync(home, 0o700);
  checkSocketPaths(home);
  const socketPath = o.socket ?? homePaths(home).socket;

  // One daemon per home: a live one answering on the socket wins.
  try {
    const h = await new TypevisorClient({ socketPath }, 2000).health();
    throw new TypevisorError("DAEMON_RUNNING", `a typevisor daemon (pid ${h.pid}) already serves ${socketPath}`);
  } catch (e) {
    if (e instanceof TypevisorError && e.code === "DAEMON_RUNNING") throw e;
  }

  // stdout for systemd's journal, and HOME/daemon.log (rotated) for GET /v1/logs and `typevisor logs` (logs.ts)
  const logFile = new DaemonLogFile(homePaths(home).daemonLog, logSize);
  // and to syslog receivers (RFC 5424 over UDP or TCP), where --log-syslog names them
  const syslog = o.logSyslog.map((v) => new SyslogForwarder(parseSyslogTarget(v)));
  // and to an OpenTelemetry collector (OTLP/HTTP, JSON), where --log-otlp names one
  const otlp = o.logOtlp !== undefined ? new OtlpForwarder(parseOtlpUrl(o.logOtlp)) : undefined;
  const logger = pino(
    { level: o.logLevel, base: { pid: process.pid } },
    pino.multistream([
      { level: o.logLevel as "info", stream: stdoutWhileItLasts() },
      { level: o.logLevel as "info", stream: logFile },
      ...syslog.map((stream) => ({ level: o.logLevel as "info", stream })),
      ...(otlp !== undefined ? [{ level: o.logLevel as "info", stream: otlp }] : []),
    ]),
  );
  // Installed before the manager exists (its construction can fault too); faults become events once it does.
  const events: { manager?: VmManager } = {};
  const lastResort = installLastResort(logger, (kind, message) => events.manager?.daemonEvent("daemon.fault", `the daemon caught an ${kind} and kept serving: ${message}`, { kind }));
  const kind = kvmHostKind();
  if (kind !== "hardware" && !o.forceKvm) {
    logger.warn({ kvm: kind }, "this host's KVM cannot boot stock kernels: starting a VM will be refused (run the daemon inside the lab, or --force-kvm for purpose-built guests)");
  }
  const sandbox = sandboxOptions(o, (msg) => logger.warn(msg));
  logger.info({ sandbox: sandbox === undefined ? "off" : { uids: `${sandbox.uidBase}-${sandbox.uidBase + sandbox.uidCount - 1}` } }, sandbox === undefined ? "VMMs run without a sandbox" : "each VMM runs in its sandbox");
  const manager = new VmManager({
    home,
    ...(sandbox !== undefined ? { sandbox } : {}),
    allowedDirs: allowedDirs(o.allowFiles),
    alertWebhooks: o.alertWebhook.map(checkWebhookUrl),
    policy,
    forceKvm: o.forceKvm,
    noCgroups: !o.cgroups,
    consoleLogSize,
    logger,
    ...(o.standbyVmms !== undefined ? { standbyVmms: standbyCount(o.standbyVmms) } : {}),
    // A live migration's source reaches the destination daemon through the same typed client as the CLI (control/migration.ts).
    // The destination answers "prepare" once its incoming VMM listens, which may take its own
    // --start-timeout (taken to be this daemon's): waited for that long and a minute more. A
    // fixed minute failed a migration in the lab whose destination VMM took longer to start.
    migrationPeer: (peer) => new TypevisorClient({ host: peer.host, port: peer.port, ...(peer.fingerprint !== undefined ? { fingerprint: peer.fingerprint } : {}) }, { token: peer.token, timeoutMs: config.startTimeoutMs + 60_000 }),
    ...config,
  });
  events.manager = manager;
  await manager.reattach();
  manager.startUsageCollection();
  if ((o.tlsCert === undefined) !== (o.tlsKey === undefined)) throw new TypevisorError("INVALID_ARGUMENT", "give both --tls-cert and --tls-key, or neither (a certificate is then made in HOME/tls)");
  let tls: TlsMaterial | undefined;
  if (tcp !== undefined) {
    tls = o.tlsCert !== undefined && o.tlsKey !== undefined ? loadTls(o.tlsCert, o.tlsKey) : await ensureSelfSigned(home, tcp.host);
    logger.info({ certificate: tls.certPath, fingerprint: tls.fingerprint, generated: tls.generated }, `HTTPS certificate SHA-256 fingerprint ${tls.fingerprint} (clients: --fingerprint or TYPEVISOR_FINGERPRINT)`);
  }
  const socketGid = groupId(o.socketGroup);
  const security = {
    identities: new Identities(manager.store),
    audit: new AuditLog(manager.store, homePaths(home).auditHead),
    ...(socketGid !== undefined ? { socketGid } : {}),
    ...(tls !== undefined ? { tls } : {}),
  };
  manager.watchAudit(security.audit);
  const api = await startApi(manager, logger, { socketPath, ...(tcp !== undefined ? { tcp } : {}) }, security, { streamStallMs });
  manager.daemonEvent("daemon.started", `daemon started (pid ${process.pid})`, { socket: socketPath, ...(api.tcpAddress !== undefined ? { tcp: `${api.tcpAddress.host}:${api.tcpAddress.port}` } : {}) });
  logger.info({ socket: socketPath, tcp: api.tcpAddress, home, cgroups: manager.cgroups }, "typevisor daemon ready");

  await new Promise<void>((resolve) => {
    const stop = (sig: string): void => {
      logger.info({ signal: sig }, "shutting down");
      resolve();
    };
    process.once("SIGTERM", () => stop("SIGTERM"));
    process.once("SIGINT", () => stop("SIGINT"));
  });
  manager.daemonEvent("daemon.stopping", `daemon stopping${o.stopVmsOnExit ? " (stopping VMs)" : " (VMs keep running)"}`);
  // Let event-stream followers receive that event before their connections close.
  await new Promise((r) => setTimeout(r, 100));
  await api.close();
  await manager.close({ stopVms: o.stopVmsOnExit });
  lastResort.uninstall();
  logger.info({ faults: lastResort.faults() }, "stopped");
  logger.flush();
  logFile.close();
  for (const s of syslog) s.close();
  await otlp?.close();
  // Shut down in order: whatever still holds the event loop now (a peer's connection that never
  // closes, a delivery in flight) must not keep the daemon up; an unref'd timer does not itself.
  setTimeout(() => process.exit(0), 2000).unref();
  return 0;
}

export function registerDaemonCommand(program: Command): void {
  program
    .command("daemon")
    .description("run the control plane in the foreground: VM inventory (SQLite), one VMM process per VM, the REST API on a unix socket")
    .option("--home <dir>", "state directory: inventory, VM disks, consoles, sockets (default: $TYPEVISOR_HOME or ~/.local/share/typevisor)")
    .option("--socket <path>", "API unix socket (default: HOME/typevisor.sock)")
    .option("--listen <host:port>", "also serve the API over HTTPS on this address (any address: every request is authenticated; bearer tokens)")
    .option("--tls-cert <file>", "the HTTPS certificate (PEM; default: one made on first start in HOME/tls, its fingerprint printed)")
    .option("--tls-key <file>", "the HTTPS certificate's private key (PEM)")
    .option("--socket-group <group>", "members of this group may connect to the unix socket (mode 0660), each as the inventory user of its login name; absent group: root only (0600)", "typevisor")
    .option("--cpu-overcommit <ratio>", "vCPUs allowed per host CPU", "4")
    .option("--memory-overcommit <ratio>", "guest memory allowed per byte of host memory", "1")
    .option("--disk-overcommit <ratio>", "VM disk bytes allowed per byte of the home's filesystem", "1")
    .option("--reserved-memory <size>", "host memory kept for the host and the daemon", "256M")
    .option("--console-log-size <size>", "rotate a VM's console log past this size", "1M")
    .option("--start-timeout <seconds>", "a VMM (a standby VMM too) must answer on its API socket within this; a migration's source waits this long and a minute more for the destination daemon to prepare", "60")
    .option("--stop-timeout <seconds>", "then a stopping VMM is killed", "30")
    .option("--usage-interval <seconds>", "how often per-VM usage is sampled", "5")
    .option("--stream-stall-timeout <seconds>", "an event-stream client that takes nothing for this long is disconnected (it resumes with ?after=)", "30")
    .option("--stop-vms-on-exit", "stop every VM when the daemon exits (default: they keep running)", false)
    .option("--no-sandbox", "run VMMs as the daemon's own children, unconfined: no per-VM uid, namespaces, seccomp filter (the default as root: each VMM in its sandbox, docs/security.md; as another user the sandbox cannot be built and is off)")
    .option("--sandbox-uids <range>", "the uids (and gids) sandboxed VMMs get, one per VM: FIRST-LAST or FIRST:COUNT", `${DEFAULT_UID_RANGE.base}:${DEFAULT_UID_RANGE.count}`)
    .addOption(new Option("--sandbox-probe <paths>", "test hook: each VMM tries to open these paths and a few denied system calls and logs what happened").hideHelp())
    .option("--no-cgroups", "do not put VMMs in per-VM cgroups (no CPU or memory limits) even where cgroup v2 is available")
    .option(
      "--allow-files <dir>",
      "VM specs may name kernels and initrds under this directory (repeatable; by default only images boot: a spec naming any other host file is refused)",
      (v: string, prev: string[]) => [...prev, v],
      [] as string[],
    )
    .option(
      "--alert-webhook <url>",
      "POST each alert.firing and alert.resolved event as JSON to this http(s) URL, retried with backoff (repeatable; GET /v1/alerts/webhooks shows how they fare)",
      (v: string, prev: string[]) => [...prev, v],
      [] as string[],
    )
    .option("--force-kvm", "start VMMs on a /dev/kvm that cannot boot stock kernels (PVM: purpose-built test guests only)", false)
    .option("--log-size <size>", "rotate the daemon's own log (HOME/daemon.log, read by `typevisor logs`) past this size; one older generation is kept", "10M")
    .option(
      "--log-syslog <url>",
      "also send the daemon's log to syslog, RFC 5424 messages over udp://HOST[:PORT] or tcp://HOST[:PORT] (port 514 by default; repeatable)",
      (v: string, prev: string[]) => [...prev, v],
      [] as string[],
    )
    .option("--log-otlp <url>", "also send the daemon's log to an OpenTelemetry collector: OTLP/HTTP JSON, POSTed to this URL (e.g. http://localhost:4318/v1/logs) in batches, retried")
    .option("--standby-vmms <n>", "VMM processes kept started and waiting, so a VM restored from a snapshot (rollback, clone) does not wait for one to start; each has the VM of the memory snapshot restored last built ahead, and under the VMM sandbox serves only that snapshot's clones (default: 1 where KVM is hardware, else 0; docs/snapshots.md, docs/security.md)")
    .addOption(new Option("--log-level <level>", "log level").choices(["trace", "debug", "info", "warn", "error"]).default("info"))
    .action(async (opts: DaemonOptions) => {
      process.exitCode = await daemonCommand(opts);
    });
}
