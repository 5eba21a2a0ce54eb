/**
 * Base images: the read-only root filesystems VM disks are thin qcow2 overlays on (linked
 * clones). A base is the daemon's own copy of an image's rootfs (a reflink where the filesystem
 * offers one), named by the rootfs's content and the size its filesystem was grown to:
 * `<home>/bases/<sha256 prefix>[-<bytes>].raw`. Rebuilding or removing the image never changes a
 * base a VM stands on, VMs of the same image and size share one, and a base goes when the last
 * VM on it is removed. Made under a temporary name and renamed into place whole, so a daemon
 * killed midway leaves only a `*.tmp` that the start-up sweep removes.
 */
import { randomBytes } from "node:crypto";
import { chmodSync, constants, existsSync, mkdirSync, readdirSync, renameSync, rmSync, statSync } from "node:fs";
import { copyFile, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileInfo } from "../images/manifest.js";
import { diskFromImage } from "./disks.js";

export function basesDir(home: string): string {
  return join(home, "bases");
}

/**
 * The base for `rootfs` with its filesystem grown to `sizeBytes` (at least the rootfs's size),
 * made if missing. `sha256`: the rootfs's, from the image manifest (hashed here when absent).
 * @throws TypevisorError from diskFromImage (DISK_RESIZE, MISSING_TOOL)
 */
export async function ensureBase(home: string, rootfs: string, sha256: string | undefined, sizeBytes: number): Promise<string> {
  const rootfsBytes = statSync(rootfs).size;
  const sha = sha256 ?? (await fileInfo(rootfs)).sha256;
  const grown = sizeBytes > rootfsBytes;
  const path = join(basesDir(home), `${sha.slice(0, 16)}${grown ? `-${sizeBytes}` : ""}.raw`);
  return makeBase(path, (tmp) => diskFromImage(rootfs, tmp, grown ? sizeBytes : undefined));
}

/**
 * The base for an imported disk image (images/NAME/disk.<fmt>, image import): a read-only copy of
 * it as it is (a partitioned disk: nothing to grow), `<sha256 prefix>-img.<format>`, made if
 * missing, off the event loop.
 */
export async function ensureDiskImageBase(home: string, file: string, sha256: string, format: "raw" | "qcow2"): Promise<string> {
  const path = join(basesDir(home), `${sha256.slice(0, 16)}-img.${format}`);
  return makeBase(path, (tmp) => copyFile(file, tmp, constants.COPYFILE_FICLONE));
}

/** `path`, made if missing by `fill` under a temporary name, then read-only and renamed into place whole. */
async function makeBase(path: string, fill: (tmp: string) => Promise<unknown>): Promise<string> {
  if (existsSync(path)) return path;
  mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
  const tmp = `${path}.${randomBytes(4).toString("hex")}.tmp`;
  try {
    await fill(tmp);
    // Read-only from here: overlays depend on every byte of it staying as it is.
    chmodSync(tmp, 0o444);
    // Another create may have made the same base meanwhile: keep the one overlays may already use.
    if (existsSync(path)) rmSync(tmp, { force: true });
    else renameSync(tmp, path);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw e;
  }
  return path;
}

/**
 * Remove the bases no disk in `inUse` stands on; returns the paths removed. Each is renamed out of
 * the way at once (a create that runs meanwhile cannot find it and stand on it), then deleted off
 * the event loop (unlinking gigabytes takes a while); a daemon killed between the two leaves a
 * `*.tmp` for the start-up sweep.
 */
export async function removeUnusedBases(home: string, inUse: ReadonlySet<string>): Promise<string[]> {
  const dir = basesDir(home);
  if (!existsSync(dir)) return [];
  const doomed: [string, string][] = [];
  for (const f of readdirSync(dir)) {
    const p = join(dir, f);
    if ((f.endsWith(".raw") || f.endsWith(".qcow2")) && !inUse.has(p)) {
      const trash = `${p}.${randomBytes(4).toString("hex")}.tmp`;
      renameSync(p, trash);
      doomed.push([p, trash]);
    }
  }
  await Promise.all(doomed.map(([, trash]) => rm(trash, { force: true })));
  return doomed.map(([p]) => p);
}

/** Half-made bases (`*.tmp`) a killed daemon left behind. */
export function leftoverBaseFiles(home: string): string[] {
  const dir = basesDir(home);
  if (!existsSync(dir)) return [];
  return readdirSync(dir).filter((f) => f.endsWith(".tmp")).map((f) => join(dir, f));
}
