/**
 * Pieces of a busybox initramfs: the static busybox from Debian's busybox-static package with a
 * symlink per applet, a kernel's modules in load order, and device nodes the kernel needs before
 * devtmpfs is mounted. Used by the guest images and by the lab.
 */
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { TypevisorError } from "../errors.js";
import type { CpioEntry } from "./cpio.js";
import type { DebianPackage } from "./debian.js";
import type { ResolvedModule } from "./kmod.js";

const run = promisify(execFile);

/** Where the module load list lives inside an initramfs: one path per line, relative to lib/modules/<release>. */
export const MODULE_LIST = "etc/typevisor/modules";

export function busyboxPath(pkg: DebianPackage): string {
  for (const p of ["bin/busybox", "usr/bin/busybox"]) if (existsSync(join(pkg.root, p))) return join(pkg.root, p);
  throw new TypevisorError("BUSYBOX_MISSING", `${pkg.name} ${pkg.version} contains no busybox binary`);
}

/** The applet paths (e.g. "bin/sh", "sbin/insmod") a busybox binary provides, from `busybox --list-full`. */
export async function busyboxApplets(busybox: string): Promise<string[]> {
  // busybox-static is a static x86-64 binary, so the host can run it to ask for its applet list.
  const { stdout } = await run(busybox, ["--list-full"]);
  const applets = stdout.split("\n").map((s) => s.trim()).filter((s) => s !== "" && !s.endsWith("/busybox"));
  if (!applets.includes("bin/sh")) throw new TypevisorError("BUSYBOX_NO_SH", `${busybox} has no sh applet`);
  return applets;
}

/** busybox at /bin/busybox and a symlink to it for each applet. */
export async function busyboxEntries(busybox: string): Promise<CpioEntry[]> {
  const entries: CpioEntry[] = [{ type: "file", path: "bin/busybox", data: await readFile(busybox), mode: 0o755 }];
  for (const a of await busyboxApplets(busybox)) entries.push({ type: "symlink", path: a, target: "/bin/busybox" });
  return entries;
}

/** The skeleton every init here expects: mount points and /dev/console (char 5:1, devices.txt). */
export function skeletonEntries(): CpioEntry[] {
  return [
    ...["dev", "proc", "sys", "tmp", "run", "root", "etc", "etc/typevisor", "mnt"].map((path): CpioEntry => ({ type: "dir", path, mode: path === "tmp" ? 0o1777 : 0o755 })),
    { type: "char", path: "dev/console", major: 5, minor: 1, mode: 0o600 },
    { type: "char", path: "dev/null", major: 1, minor: 3, mode: 0o666 },
  ];
}

/** Module files under lib/modules/<release>/ plus the ordered load list. */
export async function moduleEntries(release: string, modules: ResolvedModule[]): Promise<CpioEntry[]> {
  const entries: CpioEntry[] = [];
  for (const m of modules) entries.push({ type: "file", path: `lib/modules/${release}/${m.rel}`, data: await readFile(m.path) });
  entries.push({ type: "file", path: MODULE_LIST, data: Buffer.from(modules.map((m) => `${m.rel}\n`).join("")) });
  return entries;
}
