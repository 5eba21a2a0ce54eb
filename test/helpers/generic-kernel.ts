import { existsSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { cacheDir } from "../../src/images/dirs.js";

/**
 * The generic (non-cloud) Debian kernel the lab itself boots, from the package cache. Lab tests
 * use it for what the cloud kernel leaves out (e.g. CONFIG_VMGENID, under CONFIG_VIRT_DRIVERS).
 */
export function genericKernel(): string | undefined {
  const extract = join(cacheDir(), "extract");
  if (!existsSync(extract)) return undefined;
  for (const d of readdirSync(extract)) {
    if (!/^linux-image-[\d.]+-\d+-amd64_/.test(d)) continue;
    const boot = join(extract, d, "boot");
    const k = readdirSync(boot).find((f) => f.startsWith("vmlinuz-"));
    if (k !== undefined) return join(boot, k);
  }
  return undefined;
}

/**
 * The minimal image's initramfs (its init, busybox, the virtio modules) built for the generic
 * kernel (genericKernel()) instead of the cloud one, at `out`: with it the generic kernel mounts
 * the minimal image's root filesystem from virtio-blk as the cloud kernel does (its virtio
 * drivers are modules, which the cloud image's initramfs has only for the cloud kernel).
 * Undefined when the generic kernel or busybox is not in the package cache.
 */
export async function genericGuestInitrd(out: string): Promise<string | undefined> {
  const extract = join(cacheDir(), "extract");
  if (!existsSync(extract)) return undefined;
  const entries = readdirSync(extract);
  const kdir = entries.find((d) => /^linux-image-[\d.]+-\d+-amd64_/.test(d));
  const bdir = entries.find((d) => d.startsWith("busybox-static_"));
  if (kdir === undefined || bdir === undefined) return undefined;
  const root = join(extract, kdir);
  const release = readdirSync(join(root, "lib", "modules"))[0];
  if (release === undefined) return undefined;
  const { indexModules, resolveLoadOrder } = await import("../../src/images/kmod.js");
  const { busyboxEntries, busyboxPath, moduleEntries, skeletonEntries } = await import("../../src/images/initramfs.js");
  const { writeNewc, withParents } = await import("../../src/images/cpio.js");
  const { MINIMAL_MODULES } = await import("../../src/images/image.js");
  const { GUEST_INIT, GUEST_INITTAB, GUEST_PROFILE } = await import("../../src/images/guest-init.js");
  const modules = await resolveLoadOrder(await indexModules(root, release), MINIMAL_MODULES);
  const bb = { name: "busybox-static", version: "", root: join(extract, bdir) } as Parameters<typeof busyboxPath>[0];
  const cpio = writeNewc(withParents([
    ...skeletonEntries(),
    ...(await busyboxEntries(busyboxPath(bb))),
    ...(await moduleEntries(release, modules)),
    { type: "file", path: "init", data: Buffer.from(GUEST_INIT), mode: 0o755 },
    { type: "file", path: "etc/inittab", data: Buffer.from(GUEST_INITTAB) },
    { type: "file", path: "etc/profile", data: Buffer.from(GUEST_PROFILE) },
  ]));
  writeFileSync(out, cpio);
  return out;
}
