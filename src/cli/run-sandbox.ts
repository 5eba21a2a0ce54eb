/**
 * `typevisor run --sandbox`: a VMM started by hand in the same sandbox the daemon gives each of
 * its VMMs (docs/security.md, "The VMM sandbox"): its own uid and gid, no capabilities,
 * no_new_privs, its own mount, PID, IPC, UTS and network namespaces with a root holding only what
 * this VM needs, the seccomp allowlist, and narrower filters on its vCPU threads.
 *
 * This process (root) stays as the VMM's supervisor: it binds the control and console sockets and
 * opens the TAPs (the VMM could not, from its empty network namespace and without privileges) and
 * hands them over as descriptors, gives the VM's files to the sandbox uid for the run and gives
 * them back when the VMM ends, then exits with the VMM's status. The VMM itself is `typevisor run`
 * with the same options, re-serialized with absolute paths (its working directory is the jail's
 * root), started through typevisor-jail (src/control/sandbox/typevisor-jail.c).
 */
import { spawn } from "node:child_process";
import { chmodSync, chownSync, closeSync, existsSync, mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { TypevisorError } from "../errors.js";
import { TYPEVISOR_BIN } from "../engine/native.js";
import { DEFAULT_UID_RANGE, JAIL_BIN, systemBinds, vmmRlimits } from "../control/sandbox/sandbox.js";
import { clone3Filter, filterBytes, vmmFilter } from "../sys/seccomp.js";
import { openTap, setLinkUp } from "../sys/tap.js";
import { unixListen } from "../sys/unix-socket.js";
import { openDisk } from "../vmm/disk/open.js";
import { parseDiskSpec, parseNetSpec, parseVsockSpec } from "../vmm/device-specs.js";
import { VMM_NODE_FLAGS } from "../vmm/isolates.js";
import { resolveBootPaths, type RunOptions } from "./run.js";

/** The uids processes run as now (/proc/N/status), to keep a hand-run VMM off one in use. */
function uidsInUse(): Set<number> {
  const out = new Set<number>();
  for (const d of readdirSync("/proc")) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const m = /^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${d}/status`, "utf8"));
      if (m !== null) out.add(Number(m[1]));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

/**
 * The uid of a hand-run sandboxed VMM: `--sandbox-uid`, else the highest one of the daemon's
 * default range that no process runs as (the daemon gives out the lowest first, so the two meet
 * only when the range is nearly full).
 */
export function chooseSandboxUid(given: string | undefined): number {
  if (given !== undefined) {
    if (!/^\d{1,10}$/.test(given.trim()) || Number(given) < 1 || Number(given) > 0xfffffffe) {
      throw new TypevisorError("INVALID_ARGUMENT", `--sandbox-uid must be a uid from 1 to 4294967294 (got "${given}")`);
    }
    return Number(given);
  }
  const used = uidsInUse();
  for (let uid = DEFAULT_UID_RANGE.base + DEFAULT_UID_RANGE.count - 1; uid >= DEFAULT_UID_RANGE.base; uid--) if (!used.has(uid)) return uid;
  throw new TypevisorError("SANDBOX_UIDS", "every uid of the sandbox range is in use", { hint: "give one with --sandbox-uid" });
}

/** Why `run --sandbox` cannot run here, or undefined. */
export function sandboxRunProblem(o: RunOptions): string | undefined {
  if (typeof process.getuid !== "function" || process.getuid() !== 0) return "run --sandbox needs root (it builds namespaces, mounts and a uid of its own for the VMM); run it as root, or drop --sandbox";
  if (!existsSync(JAIL_BIN)) return `the sandbox helper ${JAIL_BIN} is not built (install gcc and libc6-dev and run npm run build)`;
  if (o.standby === true) return "--standby cannot be combined with --sandbox (a standby VMM becomes whatever VM it is given)";
  if (o.incoming?.startsWith("tcp:") === true) return "--incoming tcp: cannot be combined with --sandbox (the VMM's network namespace is empty); use --incoming unix:PATH";
  if (o.apiSocketFd !== undefined || o.consoleSocketFd !== undefined) return "--api-socket-fd and --console-socket-fd are the sandbox's own";
  return undefined;
}

interface Handover {
  /** typevisor-jail's arguments before `--`. */
  jail: string[];
  /** `typevisor run`'s arguments for the VMM inside. */
  vmm: string[];
  /** Descriptors for the child, in order from fd 4 (fd 3 is the pid pipe). */
  fds: number[];
  /** Files given to the sandbox uid, with their owners before. */
  chowned: { path: string; uid: number; gid: number }[];
}

/** Give `path` to uid:gid (remembering its owner) unless `readOnly` and already readable by anyone. */
function handOver(h: Handover, path: string, uid: number, readOnly: boolean): void {
  const st = statSync(path);
  if (readOnly && (st.mode & 0o004) !== 0) return;
  if (h.chowned.some((c) => c.path === path)) return;
  h.chowned.push({ path, uid: st.uid, gid: st.gid });
  chownSync(path, uid, uid);
}

/** Everything the sandboxed VMM is given, and its command line; sockets and TAPs opened here. */
function prepare(h: Handover, o: RunOptions, uid: number, root: string): void {
  const dirs = new Set<string>();
  const files: string[] = [];
  const slot = (i: number): number => 4 + i;
  const restoring = o.restore !== undefined || o.incoming !== undefined;
  const v = h.vmm;
  if (!restoring) {
    const boot = resolveBootPaths(o);
    v.push("--kernel", boot.kernel, "--cmdline", boot.cmdline);
    handOver(h, boot.kernel, uid, true);
    files.push(boot.kernel);
    if (boot.initrd !== undefined) {
      v.push("--initrd", boot.initrd);
      handOver(h, boot.initrd, uid, true);
      files.push(boot.initrd);
    }
    v.push("--cpus", o.cpus, "--memory", o.memory);
    if (o.rng) v.push("--rng");
    if (o.balloon !== undefined) v.push(o.balloon === true ? "--balloon" : `--balloon=${String(o.balloon)}`);
  }
  if (o.restore !== undefined) {
    const dir = resolve(o.restore);
    v.push("--restore", dir);
    // The snapshot's memory file is mapped privately, its state read: read-only is enough.
    files.push(dir);
    for (const f of readdirSync(dir)) handOver(h, join(dir, f), uid, true);
    if (o.keepClock === true) v.push("--keep-clock");
  }
  if (o.incoming !== undefined) {
    const path = resolve(o.incoming.slice("unix:".length));
    v.push("--incoming", `unix:${path}`);
    dirs.add(dirname(path));
  }
  for (const [flag, val] of [["--vcpu-nice", o.vcpuNice], ["--memory-overcommit", o.memoryOvercommit], ["--id", o.id], ["--console-log-size", o.consoleLogSize]] as const) if (val !== undefined) v.push(flag, val);
  if (!o.reboot) v.push("--no-reboot");
  if (o.paused === true) v.push("--paused");
  if (o.forceKvm === true) v.push("--force-kvm");
  for (const spec of o.disk) {
    const d = parseDiskSpec(spec);
    const path = resolve(d.path);
    v.push("--disk", [path, ...(d.format !== undefined ? [`format=${d.format}`] : []), ...(d.readonly ? ["readonly=on"] : []), ...(d.serial !== undefined ? [`serial=${d.serial}`] : [])].join(","));
    // The chain: the top read-write (unless readonly), its backing files read-only.
    const opened = openDisk(path, { ...(d.format !== undefined ? { format: d.format } : {}), readonly: true });
    try {
      handOver(h, path, uid, d.readonly);
      h.jail.push("--bind", d.readonly ? path : `${path}:rw`);
      for (let b = opened.init.backing; b !== undefined; b = b.backing) {
        handOver(h, b.path, uid, true);
        files.push(b.path);
      }
    } finally {
      opened.close();
    }
  }
  if (o.vsock !== undefined) {
    const vs = parseVsockSpec(o.vsock, join(tmpdir(), `typevisor-vsock-${process.pid}.sock`));
    const uds = resolve(vs.uds);
    v.push("--vsock", `cid=${vs.cid},uds=${uds}`);
    dirs.add(dirname(uds));
  }
  for (const [flag, path] of [["--console-log", o.consoleLog], ["--exit-file", o.exitFile], ["--stats-file", o.statsFile]] as const) {
    if (path === undefined) continue;
    v.push(flag, resolve(path));
    dirs.add(dirname(resolve(path)));
  }
  // The control and console sockets: bound here, at their paths, handed over as descriptors.
  for (const [flag, path] of [["--api-socket", o.apiSocket], ["--console-socket", o.consoleSocket]] as const) {
    if (path === undefined) continue;
    const abs = resolve(path);
    rmSync(abs, { force: true });
    const fd = unixListen(abs);
    chmodSync(abs, 0o600);
    v.push(flag, abs, `${flag}-fd`, String(slot(h.fds.length)));
    h.fds.push(fd);
  }
  for (const spec of o.net) {
    const n = parseNetSpec(spec);
    const t = openTap(n.tap);
    if (t.created) setLinkUp(t.name);
    v.push("--net", `tap=${n.tap},fd=${slot(h.fds.length)}${n.mac !== undefined ? `,mac=${n.mac}` : ""}`);
    h.fds.push(t.fd);
  }
  for (const d of o.sandboxBind ?? []) dirs.add(resolve(d));
  for (const d of dirs) {
    const st = statSync(d);
    if (!st.isDirectory()) throw new TypevisorError("INVALID_ARGUMENT", `${d} is not a directory`);
    // The VMM sees (and may write) the whole directory: a shared one would hand it everyone's files.
    if (d === "/" || (st.mode & 0o002) !== 0) {
      throw new TypevisorError("INVALID_ARGUMENT", `--sandbox would give the VMM the whole of ${d}, a directory others share`, { hint: "put the console log, exit file, sockets, vsock socket and snapshots of a sandboxed run in a directory of their own" });
    }
    // Owned by root and shared: the VMM writes there through its own uid's rights, given for the run.
    handOver(h, d, uid, false);
  }
  v.push("--seccomp-no-exec", "--seccomp-vcpu", "--no-lab");
  if (o.sandboxProbe !== undefined) v.push("--sandbox-probe", o.sandboxProbe);
  const sys = systemBinds();
  // Directories first, then files (a file inside a bound directory is bound again on top, read-only).
  h.jail.unshift(
    "--uid", String(uid), "--gid", String(uid),
    "--root", root,
    "--hostname", `vm-${o.id ?? "run"}`.slice(0, 64),
    "--pid-fd", "3",
    "--die-with-parent", "1",
    ...Object.entries(vmmRlimits()).flatMap(([k, val]) => ["--rlimit", `${k}=${val}`]),
    "--dev", "/dev/kvm",
    ...[...dirs].flatMap((d) => ["--bind", `${d}:rw`]),
    ...files.flatMap((f) => ["--bind", f]),
  );
  h.jail.push(
    ...sys.binds.flatMap((b) => ["--bind", b]),
    ...sys.symlinks.flatMap((x) => ["--symlink", x]),
    ...h.fds.flatMap((_, i) => ["--keep-fd", String(slot(i))]),
    "--seccomp", filterBytes(vmmFilter()).toString("hex"), "--seccomp-quiet", filterBytes(clone3Filter()).toString("hex"),
  );
}

/**
 * Run the VM of `o` sandboxed; resolves with the exit status to use (the VMM's, or 128 + its
 * signal). `log` gets one line with the VMM's host pid and uid once it runs.
 * @throws TypevisorError SANDBOX when this host or these options cannot have it
 */
export async function runSandboxed(o: RunOptions, log: (line: string) => void): Promise<number> {
  const problem = sandboxRunProblem(o);
  if (problem !== undefined) throw new TypevisorError("SANDBOX", problem);
  const uid = chooseSandboxUid(o.sandboxUid);
  const root = mkdtempSync(join(tmpdir(), "typevisor-jail-"));
  // Filled as things are opened and handed over, so a failure half-way closes and gives back what was done.
  const h: Handover = { jail: [], vmm: [], fds: [], chowned: [] };
  try {
    prepare(h, o, uid, root);
    const child = spawn(JAIL_BIN, [...h.jail, "--", realpathSync(process.execPath), ...VMM_NODE_FLAGS, TYPEVISOR_BIN, "run", ...h.vmm], {
      stdio: ["inherit", "inherit", "inherit", "pipe", ...h.fds],
      // The VMM's environment: nothing of this shell's (tokens, credentials) but PATH and the terminal's type.
      env: { PATH: process.env["PATH"] ?? "/usr/bin:/bin", ...(process.env["TERM"] !== undefined ? { TERM: process.env["TERM"] } : {}) },
    });
    for (const fd of h.fds.splice(0)) closeSync(fd);
    const forward = (sig: NodeJS.Signals): void => void child.kill(sig);
    for (const s of ["SIGTERM", "SIGINT", "SIGHUP"] as const) process.on(s, forward);
    const pipe = child.stdio[3] as NodeJS.ReadableStream | null;
    let text = "";
    pipe?.on("data", (d: Buffer) => {
      text += d.toString();
      const m = /^(\d+)\n/.exec(text);
      if (m !== null) log(`typevisor: sandboxed VMM pid ${m[1]} (uid ${uid}, gid ${uid})`);
    });
    const code = await new Promise<number>((res, rej) => {
      child.once("error", (e) => rej(new TypevisorError("SANDBOX", `cannot start ${JAIL_BIN}: ${e.message}`)));
      child.once("exit", (c, sig) => res(c ?? 128 + (sig !== null ? signalNumber(sig) : 0)));
    });
    for (const s of ["SIGTERM", "SIGINT", "SIGHUP"] as const) process.off(s, forward);
    return code;
  } finally {
    for (const fd of h.fds) closeSync(fd);
    // The files go back to who had them; a file the VMM removed (a rotated log) has nothing to give back.
    for (const c of h.chowned) {
      try {
        chownSync(c.path, c.uid, c.gid);
      } catch {
        // gone
      }
    }
    rmSync(root, { recursive: true, force: true });
  }
}

function signalNumber(sig: NodeJS.Signals): number {
  const n = (({ SIGHUP: 1, SIGINT: 2, SIGQUIT: 3, SIGILL: 4, SIGABRT: 6, SIGKILL: 9, SIGSEGV: 11, SIGPIPE: 13, SIGTERM: 15, SIGSYS: 31 }) as Record<string, number>)[sig];
  return n ?? 0;
}
