/**
 * Standby VMMs under the VMM sandbox (docs/security.md "Standby VMMs in the sandbox"; issue 15,
 * instant create). A jailed VMM is built for one VM: its uid, the VM's files bound into its root,
 * its sockets passed at exec. A standby is started before its VM exists, so:
 *   - its uid is its own (`standby:<key>:<snapshot>` in sandbox_ids) and becomes the VM's when it is
 *     handed one (only a VM that has no uid yet: a new clone);
 *   - it is started for one memory snapshot, the pool's template, whose group it is given (a clone
 *     of snapshot S reads S and nothing else, as with a fresh jail); the row's name keeps that
 *     group reserved (allocateUid) while the standby lives;
 *   - its control and console sockets are bound by the daemon in `standby/` and renamed into the
 *     VM's places when it is handed one;
 *   - the template's saved state is bound into its view (read-only) when it starts, so it builds
 *     that snapshot's VM ahead (`run --standby --template`);
 *   - the VM's files reach its view through its hand-off directory `standby/<key>.d`: a shared
 *     mount the jail holds as a slave at the daemon's home (typevisor-jail --handoff). Handing it a
 *     VM binds each file the VM needs (the same list a fresh jail gets: vmFileBinds) at its own
 *     path under the hand-off directory, so the VMM sees it at its host path. Then the tree is made
 *     private and detached on the host (sealHandoff): the VMM keeps its copies, the host keeps no
 *     mount for it, and the directories they are mounted on move into the VM's directory.
 *   - the VM's TAP devices, which the daemon opens in the host's network namespace, are sent over a
 *     unix socket pair whose other end the standby got at exec (SCM_RIGHTS: sys/scm-rights.ts).
 * What cannot be handed over this way: files outside the daemon's home (a disk in a pool
 * elsewhere). A restore that needs them starts a fresh jail as before.
 */
import type { ChildProcess } from "node:child_process";
import { chmodSync, closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, renameSync, rmdirSync, rmSync, statSync } from "node:fs";
import { dirname, join, relative, sep } from "node:path";
import type Database from "better-sqlite3";
import { TypevisorError } from "../../errors.js";
import type { VmmLaunch } from "../../engine/native.js";
import { attachBind, detachMount, makePrivateTree, makeSharedMount } from "../../sys/mount-api.js";
import { parseMountinfo } from "../../sys/mounts.js";
import { seqpacketPair, shutdownRead } from "../../sys/scm-rights.js";
import type { StandbyJailer, StandbyTemplate } from "../standby.js";
import { allocateUid, spawnSandboxed, vmFileBinds, type SandboxOptions } from "./sandbox.js";

/** The sandbox_ids owner of a jailed standby's uid: its key and its template (whose group it holds). */
export const standbyOwner = (key: string, snapId: string): string => `standby:${key}:${snapId}`;

/** Mount points under `dir` in this process's mount namespace (deepest first). */
function mountsUnder(dir: string): string[] {
  return parseMountinfo(readFileSync("/proc/self/mountinfo", "utf8"))
    .map((m) => m.mountPoint)
    .filter((mp) => mp === dir || mp.startsWith(dir + sep))
    .sort((a, b) => b.length - a.length);
}

/** Every mount at or under `dir` detached, deepest first, until the mount table shows none. */
function detachAllUnder(dir: string): void {
  for (let left = mountsUnder(dir), tries = 0; left.length > 0; left = mountsUnder(dir), tries++) {
    if (tries > 16) throw new TypevisorError("SANDBOX", `cannot detach the mounts under ${dir}: ${left.join(", ")}`);
    for (const m of left) detachMount(m);
  }
}

/**
 * A hand-off directory's mounts detached and the directory removed. Nothing is removed while a
 * mount is left under it: a removal would reach the VM's own files through a bind.
 */
export function releaseHandoff(dir: string): void {
  detachAllUnder(dir);
  rmSync(dir, { recursive: true, force: true });
  removeJailRoot(`${dir}.root`);
}

/**
 * The directory the jail's root was mounted on, in the VMM's namespace only (here it is empty, and
 * pivot_root(2) moved that mount off it): removed, never recursively.
 */
function removeJailRoot(dir: string): void {
  try {
    rmdirSync(dir);
  } catch {
    // not there, or not empty: left
  }
}

/**
 * Once the VM's files are bound (handVmFiles) the standby's namespace holds its own copies: the
 * hand-off tree is made private, so detaching it here does not propagate there, then detached.
 * Its directories stay, moved to `keepAt` (in the VM's directory): the VMM's copies are mounted on
 * those very directory entries, and removing one would unmount them there too (a mount point
 * removed in another namespace is detached from every one: rmdir(2), unlink(2) since Linux 3.18).
 * They go with the VM's directory, or at the VM's next hand-off. Nothing of that VMM stays mounted
 * in the host's namespace, whatever happens to it or to the daemon afterwards.
 */
export function sealHandoff(dir: string, keepAt: string): void {
  makePrivateTree(dir);
  detachAllUnder(dir);
  // A previous hand-off's, whose VMM has ended (this VM is being started).
  for (const old of [keepAt, `${keepAt}.root`]) rmSync(old, { recursive: true, force: true });
  renameSync(dir, keepAt);
  try {
    renameSync(`${dir}.root`, `${keepAt}.root`);
  } catch {
    // not there: nothing to keep
  }
}

export class JailedStandbys implements StandbyJailer {
  constructor(
    private readonly o: {
      db: Database.Database;
      home: string;
      sandbox: SandboxOptions;
      forceKvm: boolean;
      /** The group that may read `template`'s saved state (Snapshots.shareForRestore). */
      templateGroup: (template: StandbyTemplate) => number;
    },
  ) {}

  async spawn(key: string, template: StandbyTemplate, files: { socket: string; consoleSocket: string; log: string; handoff: string }): Promise<{ child: ChildProcess; pid: number; uid: number; fdSocket: number }> {
    const sb = this.o.sandbox;
    const group = this.o.templateGroup(template);
    const uid = allocateUid(this.o.db, standbyOwner(key, template.id), sb.uidBase, sb.uidCount);
    // Root's, traversable: the VMM's uid walks through it to the files bound under it.
    mkdirSync(files.handoff, { mode: 0o711 });
    chmodSync(files.handoff, 0o711); // under the daemon's umask
    makeSharedMount(files.handoff);
    // The template's saved state, read-only, in its view from the start (it would be handed over
    // with its first VM anyway, and its group may read it): the standby builds its VM ahead.
    const templateAt = underHome(this.o.home, template.dir);
    if (templateAt !== undefined) bindAt({ path: template.dir, rw: false }, join(files.handoff, templateAt));
    const l: VmmLaunch = {
      id: `standby-${key}`, kernel: "", cmdline: "", cpus: 1, memoryMiB: 0, disks: [], nets: [], rng: false, balloon: false,
      apiSocket: files.socket, consoleLog: "", consoleLogSize: 0, consoleSocket: files.consoleSocket, exitFile: "", vmmLog: files.log, forceKvm: this.o.forceKvm,
    };
    // The VM's TAPs go over this pair when it is handed one (scm-rights.ts); the standby's end is passed at exec.
    const [mine, theirs] = seqpacketPair();
    try {
      shutdownRead(mine); // a standby taken over cannot queue anything on the daemon's side
      const s = await spawnSandboxed(l, {
        uid, root: `${files.handoff}.root`, outDir: "", restoreGroup: group, allowedBacking: () => false,
        standby: { handoff: files.handoff, home: this.o.home, socket: theirs, ...(templateAt !== undefined ? { template: template.dir } : {}) },
      });
      return { child: s.child, pid: s.pid, uid, fdSocket: mine };
    } catch (e) {
      closeSync(mine);
      throw e;
    }
  }

  release(key: string, handoff: string): void {
    releaseHandoff(handoff);
    this.o.db.prepare("DELETE FROM sandbox_ids WHERE vm_id LIKE ?").run(`standby:${key}:%`);
  }

  sweep(dir: string): void {
    for (const f of existsSync(dir) ? readdirSync(dir) : []) {
      if (f.endsWith(".d")) releaseHandoff(join(dir, f));
      else if (f.endsWith(".d.root")) removeJailRoot(join(dir, f));
    }
    // No standby outlives its daemon (StandbyPool.start ends them); one handed a VM was renamed to the VM's.
    this.o.db.prepare("DELETE FROM sandbox_ids WHERE vm_id LIKE 'standby:%'").run();
  }
}

/**
 * Give `vmId` (which has no uid yet) the jailed standby's uid: its row becomes the VM's.
 * False when the VM has one already (a rollback of a VM that ran: its files are its uid's).
 */
export function adoptStandbyUid(db: Database.Database, vmId: string, key: string): boolean {
  return db.transaction(() => {
    if (hasSandboxUid(db, vmId)) return false;
    return db.prepare("UPDATE sandbox_ids SET vm_id = ? WHERE vm_id LIKE ?").run(vmId, `standby:${key}:%`).changes === 1;
  })();
}

/** Whether `vmId` has a sandbox uid already. */
export function hasSandboxUid(db: Database.Database, vmId: string): boolean {
  return db.prepare("SELECT 1 FROM sandbox_ids WHERE vm_id = ?").get(vmId) !== undefined;
}

/**
 * The VM's files bound into a jailed standby's view, each at its host path (docs above): the same
 * list and ownership a fresh jail gets (vmFileBinds: out/, kernel, initrd, disks and their backing
 * files, the saved state). False, with nothing bound, when one of them lies outside `home` or
 * inside another.
 */
export function handVmFiles(l: VmmLaunch, s: { uid: number; home: string; handoff: string; outDir: string; allowedBacking: (path: string) => boolean }): boolean {
  const binds = vmFileBinds(l, s.uid, s.outDir, s.allowedBacking);
  const rel = binds.map((b) => underHome(s.home, b.path));
  if (rel.some((r) => r === undefined)) return false;
  // None inside another: a placeholder is made through the host's path, which must not pass
  // through a bound directory the VMM can write (its out/: a symlink put there would be followed).
  if (binds.some((a) => binds.some((b) => b !== a && a.path.startsWith(b.path + sep)))) return false;
  binds.forEach((b, i) => bindAt(b, join(s.handoff, rel[i]!)));
  return true;
}

/** Home-relative, when `path` lies inside `home` (not `home` itself). */
function underHome(home: string, path: string): string | undefined {
  const r = relative(home, path);
  return r === "" || r.startsWith("..") || r.startsWith(sep) ? undefined : r;
}

/**
 * `b` bound at `at` (under a hand-off directory), the directories up to it made (traversable
 * only). A directory bound again where it is already (the template's saved state, bound when the
 * standby started) is stacked on the first: the same files.
 */
function bindAt(b: { path: string; rw: boolean }, at: string): void {
  for (let d = dirname(at), made: string[] = []; ; d = dirname(d)) {
    if (existsSync(d)) {
      for (const m of made.reverse()) {
        mkdirSync(m, { mode: 0o711 });
        chmodSync(m, 0o711); // under the umask
      }
      break;
    }
    made.push(d);
  }
  if (statSync(b.path).isDirectory()) mkdirSync(at, { recursive: true, mode: 0o700 });
  else closeSync(openSync(at, "wx", 0o600)); // O_EXCL: a new file, never one that was there (nor a symlink)
  attachBind(b.path, at, b.rw);
}
