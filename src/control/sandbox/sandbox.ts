/**
 * The sandbox around each VMM process the daemon starts (docs/security.md, "The VMM sandbox"): its
 * own uid and gid, its own mount, PID, IPC, UTS and network namespaces with a root that holds only
 * what that VM needs, no capabilities, no_new_privs, a seccomp filter and resource limits. The
 * privileged work is split in two:
 *   - here, in the daemon: choose the VM's uid (from a range, recorded in the inventory), give it
 *     the VM's files (kernel, initrd, its disks; backing files stay read-only and shared), make
 *     its output directory, open what needs privilege or would give the VMM a way out of its
 *     namespaces (the control and console sockets, bound at their usual paths by the daemon; TAP
 *     devices, attached in the host's network namespace) and pass them as descriptors;
 *   - in typevisor-jail (a small C program built by `npm run build`): namespaces, mounts,
 *     pivot_root, credentials, limits, seccomp, exec. Why C: typevisor-jail.c's header.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { chmodSync, chownSync, closeSync, constants, existsSync, lstatSync, mkdirSync, openSync, readlinkSync, realpathSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { getPriority } from "node:os";
import type Database from "better-sqlite3";
import { TypevisorError } from "../../errors.js";
import { TYPEVISOR_BIN, vmmArgs, vmmEnv, type VmmLaunch } from "../../engine/native.js";
import { clone3Filter, filterBytes, vmmFilter } from "../../sys/seccomp.js";
import { openTap, setLinkUp } from "../../sys/tap.js";
import { unixListen } from "../../sys/unix-socket.js";
import { openDisk } from "../../vmm/disk/open.js";
import { VMM_NODE_FLAGS } from "../../vmm/isolates.js";
import type { DiskInit } from "../../vmm/disk/backend.js";

/** The project's root: bin/typevisor.js's parent directory. */
const PROJECT_ROOT = dirname(dirname(TYPEVISOR_BIN));
/** Built by `npm run build` (bin/build-jail.js) from typevisor-jail.c. */
export const JAIL_BIN = join(PROJECT_ROOT, "dist", "typevisor-jail");

/** Default uid range: far above login users (1000+), systemd's dynamic users and the usual subuid ranges (100000 + 65536·n for a few users). */
export const DEFAULT_UID_RANGE = { base: 1_900_000_000, count: 65_536 } as const;

/** Resource limits of a VMM (setrlimit(2)). NOFILE: Node, every vCPU's fds, eventfds, disks, sockets; NPROC counts threads of this uid (one uid per VM). */
export const VMM_RLIMITS = { nofile: 4096, core: 0, nproc: 1024 } as const;

/**
 * VMM_RLIMITS, and RLIMIT_NICE at the nice value the VMM starts with (this process's: it inherits
 * it). Without CAP_SYS_NICE a thread may lower its nice value only down to 20 - RLIMIT_NICE
 * (setrlimit(2), sched(7)); with this the VMM can take back what it gave up itself (its vCPU
 * threads run DEFAULT_VCPU_NICE nicer and are lifted to its own value while a migration streams,
 * vmm/migration/source.ts) and can never rise above the process that started it.
 */
export function vmmRlimits(): Record<string, number> {
  return { ...VMM_RLIMITS, nice: Math.min(40, Math.max(1, 20 - getPriority())) };
}

export interface SandboxOptions {
  uidBase: number;
  uidCount: number;
  /** Test hook: paths the VMM tries to open, and denied system calls it tries, reporting to its log (run --sandbox-probe). */
  probe?: string[];
}

/** "BASE-LAST" or "BASE:COUNT" → {base, count}; refuses 0 (root) and the invalid uid 2^32-1. */
export function parseUidRange(v: string): { base: number; count: number } {
  const m = /^(\d{1,10})([-:])(\d{1,10})$/.exec(v.trim());
  const bad = (): TypevisorError => new TypevisorError("INVALID_ARGUMENT", `--sandbox-uids must be FIRST-LAST or FIRST:COUNT of uids from 1 to 4294967294 (got "${v}")`);
  if (m === null) throw bad();
  const base = Number(m[1]);
  const count = m[2] === "-" ? Number(m[3]) - base + 1 : Number(m[3]);
  if (base < 1 || count < 1 || base + count - 1 > 0xfffffffe) throw bad();
  return { base, count };
}

/** The sandbox_ids owner of a memory snapshot's group (snapshotGroup). */
export const snapshotOwner = (snapId: string): string => `snapshot:${snapId}`;

/**
 * The uid (also used as gid) of VM `vmId`: the one it had, else the lowest free one in the range.
 * Recorded in the inventory's sandbox_ids table; rows of VMs and snapshots that are gone are freed
 * here. A memory snapshot's group (`snapshotOwner(id)`) comes from the same range and table, so it
 * is never a VM's uid or gid.
 * @throws TypevisorError SANDBOX_UIDS when the range is used up
 */
export function allocateUid(db: Database.Database, vmId: string, base: number, count: number): number {
  return db.transaction(() => {
    // A jailed standby's row (`standby:<key>:<snapshot>`, jailed-standby.ts) is freed by the pool; it
    // also keeps its template's group reserved, even once that snapshot is removed, while it lives.
    db.prepare(
      `DELETE FROM sandbox_ids WHERE vm_id NOT IN (SELECT id FROM vms) AND vm_id NOT IN (SELECT 'snapshot:' || id FROM snapshots)
         AND vm_id NOT LIKE 'standby:%'
         AND vm_id NOT IN (SELECT 'snapshot:' || substr(vm_id, instr(substr(vm_id, 9), ':') + 9) FROM sandbox_ids WHERE vm_id LIKE 'standby:%')`,
    ).run();
    const had = db.prepare("SELECT uid FROM sandbox_ids WHERE vm_id = ?").get(vmId) as { uid: number } | undefined;
    if (had !== undefined && had.uid >= base && had.uid < base + count) return had.uid;
    if (had !== undefined) db.prepare("DELETE FROM sandbox_ids WHERE vm_id = ?").run(vmId);
    const used = new Set((db.prepare("SELECT uid FROM sandbox_ids WHERE uid >= ? AND uid < ?").all(base, base + count) as { uid: number }[]).map((r) => r.uid));
    for (let uid = base; uid < base + count; uid++) {
      if (used.has(uid)) continue;
      db.prepare("INSERT INTO sandbox_ids (vm_id, uid) VALUES (?, ?)").run(vmId, uid);
      return uid;
    }
    throw new TypevisorError("SANDBOX_UIDS", `all ${count} sandbox uids (${base}-${base + count - 1}) are in use`, { hint: "give the daemon a larger --sandbox-uids range" });
  })();
}

/** Every file of a disk's chain, top first. */
function chainFiles(init: DiskInit): string[] {
  const out = [init.path];
  for (let b = init.backing; b !== undefined; b = b.backing) out.push(b.path);
  return out;
}

/**
 * The directories and symlinks of the host's / that Node and the libraries it loads need, read-only:
 * /usr, and /bin, /lib, /lib64... as they are here (symlinks into /usr on a merged-/usr system).
 */
export function systemBinds(): { binds: string[]; symlinks: string[] } {
  const binds = ["/usr:exec"];
  const symlinks: string[] = [];
  for (const d of ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]) {
    let st;
    try {
      st = lstatSync(d);
    } catch {
      continue;
    }
    if (st.isSymbolicLink()) symlinks.push(`${d}=${readlinkSync(d)}`);
    else if (st.isDirectory()) binds.push(`${d}:exec`);
  }
  // The dynamic linker's cache (no secrets; without it libraries in multiarch directories may not be found).
  if (existsSync("/etc/ld.so.cache")) binds.push("/etc/ld.so.cache");
  const node = realpathSync(process.execPath);
  if (!node.startsWith("/usr/")) binds.push(`${node}:exec`);
  // The project: code read-only; native addons (koffi) need exec.
  binds.push(join(PROJECT_ROOT, "package.json"), join(PROJECT_ROOT, "bin"), join(PROJECT_ROOT, "dist"), `${join(PROJECT_ROOT, "node_modules")}:exec`);
  return { binds, symlinks };
}

export interface SandboxedVmm {
  /** The helper process (the VMM's waiter): its exit is the VMM's exit. */
  child: ChildProcess;
  /** The VMM's pid as the host sees it. */
  pid: number;
  uid: number;
}

/** A file or directory a jailed VMM sees at its host path; read-only unless `rw`. */
export interface VmBind {
  path: string;
  rw: boolean;
}

/**
 * What `l`'s VMM must see of the host beyond the system (vmFileBinds): its output directory
 * (read-write, made and given to `uid`), its kernel and initrd (given to `uid`), the top of each
 * disk's chain (given to `uid`; read-write unless read-only) and the chain's backing files
 * (read-only; each a shared base or another of its own disks: the chain comes from headers a VMM
 * once wrote, so it is untrusted), and a restore's saved state (read-only).
 * @throws TypevisorError SANDBOX for a backing file the VM may not use
 */
export function vmFileBinds(l: VmmLaunch, uid: number, outDir: string, allowedBacking: (path: string) => boolean): VmBind[] {
  const gid = uid;
  mkdirSync(outDir, { recursive: true, mode: 0o700 });
  chownSync(outDir, uid, gid);
  const binds: VmBind[] = [{ path: outDir, rw: true }];
  // The kernel and initrd copies are the VM's own: its uid reads them (none for an incoming migration: the guest comes running).
  for (const f of [...(l.kernel !== "" ? [l.kernel] : []), ...(l.initrd !== undefined ? [l.initrd] : [])]) {
    chownSync(f, uid, gid);
    binds.push({ path: f, rw: false });
  }
  const own = new Set(l.disks.map((d) => d.path));
  for (const d of l.disks) {
    const opened = openDisk(d.path, { format: d.format, readonly: true });
    let files: string[];
    try {
      files = chainFiles(opened.init);
    } finally {
      opened.close();
    }
    const [top, ...backing] = files;
    if (top === undefined) continue;
    chownSync(top, uid, gid);
    binds.push({ path: top, rw: d.readonly !== true });
    for (const b of backing) {
      if (!own.has(b) && !allowedBacking(b)) throw new TypevisorError("SANDBOX", `disk ${d.path} has the backing file ${b}, which is neither a base image nor one of this VM's disks`);
      // once, however many of its disks share it: a second bind would find the first one's read-only file
      if (!own.has(b) && !binds.some((x) => x.path === b)) binds.push({ path: b, rw: false });
    }
  }
  // A restore reads the saved state in place (its memory mapped MAP_PRIVATE: clones share its pages).
  if (l.restore !== undefined) binds.push({ path: l.restore.dir, rw: false });
  // The stats page: made here, empty, and given to the VM's uid, which maps it and writes its
  // counters; it lies in the daemon's directory, so the VMM can change its content, never where
  // the daemon's path leads (the daemon reads it with O_NOFOLLOW all the same: control/stats-page.ts).
  if (l.statsFile !== undefined) {
    rmSync(l.statsFile, { force: true });
    closeSync(openSync(l.statsFile, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600));
    chownSync(l.statsFile, uid, gid);
    binds.push({ path: l.statsFile, rw: true });
  }
  return binds;
}

/**
 * Start `l`'s VMM inside its sandbox. `root` is an empty directory the jail's root is mounted on
 * (in the VMM's mount namespace only); `outDir` the one directory the VMM may write (console log,
 * exit file), owned by its uid. Resolves once the helper reported the VMM's pid.
 *
 * With `standby`, the VMM is a standby (`run --standby`, docs/security.md "Standby VMMs in the
 * sandbox"): it has no VM yet, so no VM file is bound; `standby.handoff` (a shared mount the
 * daemon made) is bound at `standby.home` as a slave, `standby.socket` is passed for the VM's TAPs
 * (`run --handoff-fd`), and the daemon binds the VM's files under it when it hands this VMM a VM
 * (jailed-standby.ts handVmFiles).
 * @throws TypevisorError SANDBOX (the helper missing, a disk chain outside what the VM may use), TAP_OPEN, UNIX_SOCKET
 */
export async function spawnSandboxed(
  l: VmmLaunch,
  s: {
    uid: number; root: string; outDir: string; cgroup?: string; probe?: string[]; allowedBacking: (path: string) => boolean;
    /** A restore: the saved state's directory (bound read-only) and the group that may read it (shareWithGroup). */
    restoreGroup?: number;
    /** `socket`: this end of a SOCK_SEQPACKET pair, over which the daemon sends the VM's TAPs (scm-rights.ts); closed here once passed. */
    standby?: { handoff: string; home: string; socket: number; template?: string };
  },
): Promise<SandboxedVmm> {
  if (!existsSync(JAIL_BIN)) {
    throw new TypevisorError("SANDBOX", `the VMM sandbox helper ${JAIL_BIN} is not built`, { hint: "install gcc and libc6-dev and run npm run build, or start the daemon with --no-sandbox" });
  }
  const uid = s.uid;
  const gid = s.uid;
  mkdirSync(s.root, { recursive: true, mode: 0o700 });
  const binds: string[] = s.standby !== undefined ? [] : vmFileBinds(l, uid, s.outDir, s.allowedBacking).map((b) => (b.rw ? `${b.path}:rw` : b.path));
  const sys = systemBinds();
  binds.push(...sys.binds);

  // Descriptors: [3] the pid pipe, then the API socket, the console socket, each TAP.
  const fds: number[] = [];
  const close = (): void => {
    for (const fd of fds.splice(0)) {
      try {
        closeSync(fd);
      } catch {
        // already closed
      }
    }
  };
  let child: ChildProcess;
  try {
    for (const p of [l.apiSocket, l.consoleSocket]) rmSync(p, { force: true });
    const api = unixListen(l.apiSocket);
    fds.push(api);
    const con = unixListen(l.consoleSocket);
    fds.push(con);
    // Bound by root under umask: narrowed to the daemon alone (the run directory is 0700 too).
    for (const p of [l.apiSocket, l.consoleSocket]) chmodSync(p, 0o600);
    if (s.standby !== undefined) fds.push(s.standby.socket);
    for (const n of l.nets) {
      const t = openTap(n.tap);
      fds.push(t.fd);
      // A TAP made just now starts down; the VMM, without CAP_NET_ADMIN, could not bring it up.
      if (t.created) setLinkUp(t.name);
    }
    const slot = (i: number): number => 4 + i; // the child's fd numbers: stdio index = fd
    const vmm = [
      ...(s.standby !== undefined
        ? ["run", "--standby", "--no-lab", "--api-socket", l.apiSocket, "--handoff-fd", String(slot(2)), ...(s.standby.template !== undefined ? ["--template", s.standby.template] : []), ...(l.forceKvm ? ["--force-kvm"] : [])]
        : vmmArgs({ ...l, nets: [] })),
      "--api-socket-fd", String(slot(0)),
      "--console-socket-fd", String(slot(1)),
      "--seccomp-no-exec", "--seccomp-vcpu",
      ...l.nets.flatMap((n, i) => ["--net", `tap=${n.tap},fd=${slot(2 + i)}${n.mac !== undefined ? `,mac=${n.mac}` : ""}`]),
      ...(s.probe !== undefined && s.probe.length > 0 ? ["--sandbox-probe", s.probe.join(",")] : []),
    ];
    const args = [
      "--uid", String(uid), "--gid", String(gid),
      ...(s.restoreGroup !== undefined ? ["--group", String(s.restoreGroup)] : []),
      "--root", s.root,
      "--hostname", `vm-${l.id}`.slice(0, 64),
      "--pid-fd", "3",
      ...(s.cgroup !== undefined ? ["--cgroup", s.cgroup] : []),
      ...Object.entries(vmmRlimits()).flatMap(([k, v]) => ["--rlimit", `${k}=${v}`]),
      "--dev", "/dev/kvm",
      ...binds.flatMap((b) => ["--bind", b]),
      ...(s.standby !== undefined ? ["--handoff", `${s.standby.handoff}=${s.standby.home}`] : []),
      ...sys.symlinks.flatMap((x) => ["--symlink", x]),
      ...fds.map((_, i) => ["--keep-fd", String(slot(i))]).flat(),
      "--seccomp", filterBytes(vmmFilter()).toString("hex"), "--seccomp-quiet", filterBytes(clone3Filter()).toString("hex"),
      "--", realpathSync(process.execPath), ...VMM_NODE_FLAGS, TYPEVISOR_BIN, ...vmm,
    ];
    const log = openSync(l.vmmLog, "a");
    try {
      child = spawn(JAIL_BIN, args, {
        detached: true,
        stdio: ["ignore", log, log, "pipe", ...fds],
        env: vmmEnv(l.id),
      });
    } finally {
      closeSync(log);
    }
  } finally {
    close();
  }
  child.unref();
  const pidPipe = child.stdio[3] as NodeJS.ReadableStream | null;
  const pid = await new Promise<number>((resolve, reject) => {
    let text = "";
    const fail = (why: string): void => reject(new TypevisorError("SANDBOX", `the VMM sandbox did not start: ${why}`, { hint: `its log: ${l.vmmLog}` }));
    child.once("error", (e) => fail(e.message));
    if (pidPipe === null) return fail("no pid pipe");
    pidPipe.on("data", (d: Buffer) => {
      text += d.toString();
      const m = /^(\d+)\n/.exec(text);
      if (m !== null) resolve(Number(m[1]));
    });
    pidPipe.once("end", () => fail("the helper ended before it started the VMM"));
  });
  (pidPipe as unknown as { destroy(): void }).destroy();
  return { child, pid, uid };
}

/** Whether this process may build sandboxes (root: the helper needs CAP_SYS_ADMIN and friends). */
export function canSandbox(): boolean {
  return typeof process.getuid === "function" && process.getuid() === 0;
}
