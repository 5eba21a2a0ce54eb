/**
 * Saved VM states and the VMM sandbox (docs/snapshots.md "Under the VMM sandbox"; issue 15).
 *
 * A jailed VMM (sandbox/sandbox.ts) can write only its own output directory (`vms/<id>/out/`,
 * owned by its uid) and can read only what was bound into its root. So:
 *   - saving: the daemon makes `out/<op>.op/` (the VM's uid, 0700) and the VMM saves into
 *     `out/<op>.op/state`; once that VMM has ended (no process of its uid is left to race the
 *     daemon), the daemon checks what it finds (every path component a real directory, not a
 *     symlink; only the snapshot's three files, each a regular file with one link), renames it into
 *     its own `snapshots/` tree (same filesystem: a rename, whatever the memory's size) and makes
 *     it root's, read-only;
 *   - restoring: the state's directory is handed to one group, root:G 0750 and its files root:G
 *     0440, and the restoring VMM gets G as a supplementary group (typevisor-jail --group) with
 *     the directory bound read-only into its root. G is the snapshot's own group for a memory
 *     snapshot (allocated per snapshot from the sandbox's uid range, so a clone of snapshot S may
 *     read S and no other snapshot, even one of the same source VM), or the VM's own gid for a
 *     state saved only to restart that VM. The files stay root's and read-only: no VMM can change
 *     a snapshot that other clones map (MAP_PRIVATE pages not yet touched are read from the file).
 * What a VMM wrote is untrusted: state.json is validated again by every VMM that restores it
 * (vmm/snapshot/state.ts); the daemon only moves, checks the shape of and re-owns the files.
 */
import { execFile } from "node:child_process";
import { chmodSync, chownSync, lchownSync, lstatSync, mkdirSync, readdirSync, renameSync, rmSync } from "node:fs";
import { basename, dirname } from "node:path";
import { promisify } from "node:util";
import { TypevisorError } from "../errors.js";
import { SNAPSHOT_FILES } from "../vmm/snapshot/state.js";

const run = promisify(execFile);
const ALLOWED = new Set<string>(Object.values(SNAPSHOT_FILES));

/** `opDir` (`out/<op>.op/`), the jailed VMM's of uid `uid`, for it to save into `opDir/state` (which it makes). */
export function prepareJailSave(opDir: string, uid: number): void {
  // Not recursive: an existing one (the VMM's, made in advance) is refused, not taken over.
  mkdirSync(opDir, { mode: 0o700 });
  chownSync(opDir, uid, uid);
}

function realDir(path: string, uid: number | undefined): void {
  const st = lstatSync(path);
  if (!st.isDirectory() || (uid !== undefined && st.uid !== uid)) {
    throw new TypevisorError("SNAPSHOT_INVALID", `${path} is not a directory of the VM's sandbox uid (${st.isSymbolicLink() ? "a symlink" : `mode ${st.mode.toString(8)}, owner ${st.uid}`}): the saved state is not taken`);
  }
}

/**
 * Move the state a jailed VMM saved at `from` (out/<op>.op/state) to `to` (the daemon's), once
 * that VMM has ended. Checks before it moves and after (the daemon's directory is out of the
 * uid's reach once the rename is done), then makes every file root's, 0400.
 * @throws TypevisorError SNAPSHOT_INVALID (what is there is not a saved state's shape; `to` is removed)
 */
export function adoptJailSave(from: string, to: string, uid: number): void {
  realDir(dirname(from), uid);
  realDir(from, uid);
  mkdirSync(dirname(to), { recursive: true, mode: 0o700 });
  renameSync(from, to);
  try {
    realDir(to, uid);
    for (const f of readdirSync(to)) {
      const p = `${to}/${f}`;
      const st = lstatSync(p);
      if (!ALLOWED.has(f) || !st.isFile() || st.nlink !== 1) {
        throw new TypevisorError("SNAPSHOT_INVALID", `${p}: ${ALLOWED.has(f) ? "not a regular file with one link" : "not a file of a saved state"}: the saved state is not taken`);
      }
      // lchown: never follows a link (checked above, and the uid can no longer reach this path).
      lchownSync(p, 0, 0);
      chmodSync(p, 0o400);
    }
    chownSync(to, 0, 0);
    chmodSync(to, 0o700);
  } catch (e) {
    rmSync(to, { recursive: true, force: true });
    throw e;
  }
}

/**
 * Let group `gid` read the saved state in `dir` (a daemon-owned directory: adoptJailSave made it
 * so): root:gid, the directory 0750, its files 0440.
 */
export function shareWithGroup(dir: string, gid: number): void {
  for (const f of readdirSync(dir)) {
    const p = `${dir}/${f}`;
    const st = lstatSync(p);
    if (!st.isFile() || st.uid !== 0) throw new TypevisorError("SNAPSHOT_INVALID", `${p} is not a regular file of the daemon's`);
    lchownSync(p, 0, gid);
    chmodSync(p, 0o440);
  }
  chownSync(dir, 0, gid);
  chmodSync(dir, 0o750);
}

/**
 * Remove `out/<op>.op` as the VM's uid (from inside its output directory): a VMM that may still
 * run there cannot turn the removal into one of the daemon's (root's) own files by swapping a
 * directory for a symlink halfway.
 */
export async function removeJailSave(opDir: string, uid: number): Promise<void> {
  try {
    // libuv changes directory before it drops to uid/gid: the uid needs no way through vms/<id>/ (root's, 0700).
    await run("rm", ["-rf", "--", basename(opDir)], { cwd: dirname(opDir), uid, gid: uid, timeout: 600_000 });
  } catch {
    // Gone already, or the VM's directory with it.
  }
}
