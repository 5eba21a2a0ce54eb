/**
 * Debian packages as a source of kernels and busybox, without installing anything:
 * `apt-cache` to resolve a metapackage, `apt-get download` into our cache, `dpkg-deb -x` into a
 * per-package extraction dir. Both steps are cached and made atomic (temp dir + rename), so a
 * second build reuses them and an interrupted one leaves nothing half-made behind.
 */
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, readdir, rename, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { TypevisorError } from "../errors.js";
import { cacheDir } from "./dirs.js";

const run = promisify(execFile);

export type Progress = (message: string) => void;

export interface DebianPackage {
  /** Concrete package name, e.g. linux-image-6.1.0-56-cloud-amd64. */
  name: string;
  version: string;
  /** The .deb in the cache. */
  deb: string;
  /** Where the package's files were unpacked (its root: boot/, lib/, usr/, ...). */
  root: string;
}

const BYO_HINT =
  "on a non-Debian host bring your own kernel and initramfs: typevisor run --kernel PATH --initrd PATH";

interface ExecError {
  code?: string | number;
  stderr?: string;
}

async function tool(cmd: string, args: string[], opts: { cwd?: string } = {}): Promise<string> {
  try {
    const { stdout } = await run(cmd, args, {
      cwd: opts.cwd,
      maxBuffer: 64 * 1024 * 1024,
      // apt prints translated messages otherwise; we parse its output.
      env: { ...process.env, LC_ALL: "C" },
    });
    return stdout;
  } catch (e) {
    const err = e as ExecError;
    if (err.code === "ENOENT") {
      throw new TypevisorError("DEBIAN_TOOLS_MISSING", `${cmd} is not installed: Debian packaging tools are needed to fetch kernels`, {
        cause: e,
        hint: BYO_HINT,
      });
    }
    const detail = (err.stderr ?? "").trim().split("\n").slice(-3).join(" | ");
    throw new TypevisorError("DEBIAN_TOOL_FAILED", `${cmd} ${args.join(" ")} failed: ${detail || String(e)}`, { cause: e });
  }
}

/** apt-get writes files named `<name>_<version with ':' as %3a>_<arch>.deb`. */
export function debFilePrefix(name: string, version: string): string {
  return `${name}_${version.replaceAll(":", "%3a")}_`;
}

/** Parse `apt-cache policy` output: the Candidate line, or undefined for "(none)" / unknown. */
export function parseCandidate(policy: string): string | undefined {
  const m = /^\s*Candidate:\s*(\S+)\s*$/m.exec(policy);
  if (m === null || m[1] === undefined || m[1] === "(none)") return undefined;
  return m[1];
}

/** Parse `apt-cache depends` output into the names it depends on (first alternative of each). */
export function parseDepends(depends: string): string[] {
  const out: string[] = [];
  for (const line of depends.split("\n")) {
    const m = /^\s+\|?Depends:\s*<?([^\s>]+)>?/.exec(line);
    if (m?.[1] !== undefined) out.push(m[1]);
  }
  return out;
}

async function candidateVersion(name: string): Promise<string> {
  const policy = await tool("apt-cache", ["policy", name]);
  const v = parseCandidate(policy);
  if (v === undefined) {
    const lists = existsSync("/var/lib/apt/lists")
      ? (await readdir("/var/lib/apt/lists")).filter((f) => f.endsWith("_Packages") || f.endsWith("_Packages.lz4"))
      : [];
    if (lists.length === 0) {
      throw new TypevisorError("APT_LISTS_EMPTY", `apt knows no packages (its package lists are empty), so ${name} cannot be fetched`, {
        hint: "run apt-get update (as root), then try again",
      });
    }
    throw new TypevisorError("DEBIAN_PACKAGE_UNKNOWN", `no installable version of Debian package ${name} is known to apt`, {
      hint: "check the package name, or run apt-get update",
    });
  }
  return v;
}

/**
 * Resolve a metapackage such as `linux-image-cloud-amd64` to the concrete package it pulls in
 * (`linux-image-6.1.0-56-cloud-amd64`), by the first dependency matching `concrete`.
 * A name that already matches is returned unchanged.
 */
export async function resolveMetapackage(meta: string, concrete: RegExp): Promise<string> {
  if (concrete.test(meta)) return meta;
  await candidateVersion(meta); // gives the clear "run apt-get update" error when lists are empty
  const deps = parseDepends(await tool("apt-cache", ["depends", "--no-recommends", "--no-suggests", meta]));
  const hit = deps.find((d) => concrete.test(d));
  if (hit === undefined) {
    throw new TypevisorError("DEBIAN_METAPACKAGE_UNRESOLVED", `${meta} depends on no package matching ${concrete.source} (depends: ${deps.join(", ") || "none"})`);
  }
  return hit;
}

/** Kernel image packages: `linux-image-<abi>-<flavour>`, abi starting with a digit. */
export const KERNEL_PACKAGE = /^linux-image-\d[^\s]*$/;

async function findCachedDeb(debDir: string, name: string, version: string): Promise<string | undefined> {
  if (!existsSync(debDir)) return undefined;
  const prefix = debFilePrefix(name, version);
  const hit = (await readdir(debDir)).find((f) => f.startsWith(prefix) && f.endsWith(".deb"));
  return hit === undefined ? undefined : join(debDir, hit);
}

/** Remove `*.tmp-<pid>-*` dirs left by builds whose process is gone (killed mid-way). */
export async function removeDeadTemps(dir: string): Promise<void> {
  if (!existsSync(dir)) return;
  for (const entry of await readdir(dir)) {
    const m = /\.tmp-(\d+)-/.exec(entry);
    if (m?.[1] === undefined) continue;
    if (!pidAlive(Number(m[1]))) await rm(join(dir, entry), { recursive: true, force: true });
  }
}

export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    // EPERM: exists but belongs to someone else.
    return (e as ExecError).code === "EPERM";
  }
}

export function tempName(base: string): string {
  return `${base}.tmp-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
}

/**
 * Make a Debian package available unpacked: download it unless cached, unpack it unless cached.
 * `name` may be a metapackage when `concrete` is given (see resolveMetapackage).
 */
export async function fetchPackage(
  name: string,
  opts: { concrete?: RegExp; cache?: string; progress?: Progress } = {},
): Promise<DebianPackage> {
  const cache = opts.cache ?? cacheDir();
  const say = opts.progress ?? (() => undefined);
  const concreteName = opts.concrete !== undefined ? await resolveMetapackage(name, opts.concrete) : name;
  const version = await candidateVersion(concreteName);
  const debDir = join(cache, "debs");
  const extractDir = join(cache, "extract");
  await mkdir(debDir, { recursive: true });
  await mkdir(extractDir, { recursive: true });
  await removeDeadTemps(debDir);
  await removeDeadTemps(extractDir);

  let deb = await findCachedDeb(debDir, concreteName, version);
  if (deb === undefined) {
    say(`downloading ${concreteName} ${version}`);
    // Download into a private temp dir, then move: a killed download leaves only a temp dir.
    const tmp = join(debDir, tempName("dl"));
    await mkdir(tmp);
    try {
      await tool("apt-get", ["download", "-q", `${concreteName}=${version}`], { cwd: tmp });
      const got = (await readdir(tmp)).find((f) => f.endsWith(".deb"));
      if (got === undefined) throw new TypevisorError("DEBIAN_DOWNLOAD_FAILED", `apt-get download ${concreteName} produced no .deb`);
      deb = join(debDir, got);
      await rename(join(tmp, got), deb);
      say(`downloaded ${got} (${((await stat(deb)).size / 1048576).toFixed(1)} MiB)`);
    } finally {
      await rm(tmp, { recursive: true, force: true });
    }
  }

  const root = join(extractDir, `${concreteName}_${version.replaceAll(":", "%3a")}`);
  if (!existsSync(join(root, ".typevisor-extracted"))) {
    say(`extracting ${concreteName} ${version}`);
    const tmp = tempName(root);
    await mkdir(tmp, { recursive: true });
    try {
      await tool("dpkg-deb", ["-x", deb, tmp]);
      await writeFile(join(tmp, ".typevisor-extracted"), `${concreteName} ${version}\n`);
      await rm(root, { recursive: true, force: true });
      await rename(tmp, root);
    } catch (e) {
      await rm(tmp, { recursive: true, force: true });
      throw e;
    }
  }
  return { name: concreteName, version, deb, root };
}

/** The kernel release (`uname -r`) shipped by an unpacked linux-image package: its lib/modules/<kver>. */
export async function kernelRelease(pkg: DebianPackage): Promise<string> {
  const dir = join(pkg.root, "lib", "modules");
  const entries = existsSync(dir) ? await readdir(dir) : [];
  const kver = entries[0];
  if (entries.length !== 1 || kver === undefined) {
    throw new TypevisorError("KERNEL_PACKAGE_LAYOUT", `${pkg.name}: expected exactly one lib/modules/<release> dir, found ${entries.length}`);
  }
  return kver;
}

/** Path of the bzImage inside an unpacked linux-image package. */
export async function kernelImage(pkg: DebianPackage): Promise<string> {
  const kver = await kernelRelease(pkg);
  const p = join(pkg.root, "boot", `vmlinuz-${kver}`);
  if (!existsSync(p)) throw new TypevisorError("KERNEL_PACKAGE_LAYOUT", `${pkg.name}: no boot/vmlinuz-${kver}`);
  return p;
}
