/**
 * Guest images in `<dataHome>/images/<name>/`: vmlinuz, initrd.img, rootfs.ext4, image.json.
 * A build happens in a temp dir beside the target and is renamed into place at the end, so an
 * interrupted build never leaves a half-made image; temp dirs of dead builds are removed by the next one.
 */
import { execFile } from "node:child_process";
import { existsSync, rmSync } from "node:fs";
import { chmod, copyFile, mkdir, readdir, readFile, rename, rm, symlink, writeFile } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { promisify } from "node:util";
import { TypevisorError } from "../errors.js";
import { DEFAULT_CMDLINE } from "../vmm/defaults.js";
import { writeNewc, withParents, type CpioEntry } from "./cpio.js";
import { fetchPackage, kernelImage, kernelRelease, KERNEL_PACKAGE, removeDeadTemps, tempName, type Progress } from "./debian.js";
import { dataHome, imagePaths, imagesDir } from "./dirs.js";
import { GUEST_INIT, GUEST_INITTAB, GUEST_PROFILE } from "./guest-init.js";
import { busyboxApplets, busyboxEntries, busyboxPath, moduleEntries, skeletonEntries } from "./initramfs.js";
import { indexModules, resolveLoadOrder } from "./kmod.js";
import { fileInfo, parseManifest, type ImageManifest } from "./manifest.js";

export { dataHome, imagePaths, imagesDir, validateImageName, type ImagePaths } from "./dirs.js";
export type { ImageManifest } from "./manifest.js";

const run = promisify(execFile);

export const RECIPES = ["minimal"] as const;
export type Recipe = (typeof RECIPES)[number];

/** What the minimal image's initramfs loads (plus dependencies, resolved from the modules themselves). */
export const MINIMAL_MODULES = [
  "virtio_ring",
  "virtio",
  "virtio_pci_legacy_dev",
  "virtio_pci_modern_dev",
  "virtio_pci",
  // microvm exposes virtio-mmio devices through ACPI; Debian's kernels build the driver as a module
  "virtio_mmio?",
  "virtio_blk",
  "virtio_net", // pulls net_failover and failover
  "virtio_console",
  "virtio_rng?", // drivers/char/hw_random/virtio-rng.ko
  "virtio_balloon",
  "vsock",
  "vmw_vsock_virtio_transport_common",
  "vmw_vsock_virtio_transport",
  // ext4 and its helpers are built into Debian's cloud kernel; listed so a kernel that has them as modules works
  "crc32c_generic?",
  "ext4?",
];

export const ROOTFS_SIZE_MIB = 48;

export async function loadImage(name: string, home = dataHome()): Promise<ImageManifest> {
  const p = imagePaths(name, home);
  if (!existsSync(p.manifest)) {
    throw new TypevisorError("IMAGE_NOT_FOUND", `no image named ${name} in ${imagesDir(home)}`, {
      hint: name === "minimal" ? "build it: typevisor image build minimal" : "build one: typevisor image build minimal",
    });
  }
  return parseManifest(await readFile(p.manifest, "utf8"), p.manifest);
}

export async function listImages(home = dataHome()): Promise<ImageManifest[]> {
  const dir = imagesDir(home);
  if (!existsSync(dir)) return [];
  const out: ImageManifest[] = [];
  for (const e of (await readdir(dir, { withFileTypes: true })).sort((a, b) => a.name.localeCompare(b.name))) {
    if (!e.isDirectory() || e.name.includes(".tmp-") || e.name.includes(".old-")) continue;
    if (existsSync(join(dir, e.name, "image.json"))) out.push(await loadImage(e.name, home));
  }
  return out;
}

export async function removeImage(name: string, home = dataHome()): Promise<void> {
  const p = imagePaths(name, home);
  if (!existsSync(p.dir)) throw new TypevisorError("IMAGE_NOT_FOUND", `no image named ${name} in ${imagesDir(home)}`, { hint: "list images: typevisor image ls" });
  // rename first so a concurrent reader never sees a half-deleted image
  const doomed = tempName(p.dir);
  await rename(p.dir, doomed);
  await rm(doomed, { recursive: true, force: true });
}

export interface BuildOptions {
  /** Rebuild even when the image exists. */
  force?: boolean;
  progress?: Progress;
  /** Data dir (default dataHome()). */
  home?: string;
  /** Cache dir for packages (default cacheDir()). */
  cache?: string;
}

async function mkfsExt4(staging: string, out: string, sizeMiB: number): Promise<void> {
  try {
    // -d populates from a directory, root_owner makes / owned by root: no root privileges needed
    // (mke2fs(8) in e2fsprogs >= 1.43).
    await run("mkfs.ext4", ["-q", "-F", "-L", "typevisor-root", "-d", staging, "-E", "root_owner=0:0", out, `${sizeMiB}M`]);
  } catch (e) {
    if ((e as { code?: string }).code === "ENOENT") {
      throw new TypevisorError("MKFS_MISSING", "mkfs.ext4 is not installed", { cause: e, hint: "install e2fsprogs (apt-get install e2fsprogs)" });
    }
    throw new TypevisorError("MKFS_FAILED", `mkfs.ext4 failed: ${String((e as { stderr?: string }).stderr ?? e).trim()}`, { cause: e });
  }
}

/** A directory tree for the root filesystem: busybox, the shared init, inittab, profile. */
async function stageRootfs(staging: string, busybox: string): Promise<void> {
  for (const d of ["bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "root", "etc/typevisor", "mnt"]) {
    await mkdir(join(staging, d), { recursive: true });
  }
  await chmod(join(staging, "tmp"), 0o1777);
  await copyFile(busybox, join(staging, "bin", "busybox"));
  await chmod(join(staging, "bin", "busybox"), 0o755);
  for (const a of await busyboxApplets(busybox)) {
    await mkdir(join(staging, dirname(a)), { recursive: true });
    await symlink("/bin/busybox", join(staging, a));
  }
  await writeFile(join(staging, "init"), GUEST_INIT, { mode: 0o755 });
  await writeFile(join(staging, "etc", "typevisor", "rootfs"), "");
  await writeFile(join(staging, "etc", "inittab"), GUEST_INITTAB);
  await writeFile(join(staging, "etc", "profile"), GUEST_PROFILE);
}

/**
 * Build an image from a recipe (only "minimal" for now) into `<home>/images/<name>`.
 * Returns the existing manifest without rebuilding unless `force`.
 */
export async function buildImage(name: string, opts: BuildOptions = {}): Promise<ImageManifest> {
  const home = opts.home ?? dataHome();
  const say = opts.progress ?? (() => undefined);
  if (!(RECIPES as readonly string[]).includes(name)) {
    throw new TypevisorError("IMAGE_UNKNOWN_RECIPE", `no image recipe named ${name}; known: ${RECIPES.join(", ")}`);
  }
  const paths = imagePaths(name, home);
  if (!opts.force && existsSync(paths.manifest)) {
    say(`image ${name} exists (${paths.dir}); use --force to rebuild`);
    return loadImage(name, home);
  }
  await mkdir(imagesDir(home), { recursive: true });
  await removeDeadTemps(imagesDir(home));

  const tmp = tempName(paths.dir);
  // Ctrl-C: remove the temp dir before exiting (a kill -9 leaves it to the next build's cleanup).
  const onSignal = (sig: NodeJS.Signals): void => {
    rmSync(tmp, { recursive: true, force: true });
    process.exit(sig === "SIGINT" ? 130 : 143);
  };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  try {
    await mkdir(tmp);
    const fetchOpts = { progress: say, ...(opts.cache !== undefined ? { cache: opts.cache } : {}) };
    const kernel = await fetchPackage("linux-image-cloud-amd64", { ...fetchOpts, concrete: KERNEL_PACKAGE });
    const bb = await fetchPackage("busybox-static", fetchOpts);
    const release = await kernelRelease(kernel);
    const busybox = busyboxPath(bb);

    say("writing vmlinuz");
    await copyFile(await kernelImage(kernel), join(tmp, "vmlinuz"));

    say("writing initrd.img");
    const modules = await resolveLoadOrder(await indexModules(kernel.root, release), MINIMAL_MODULES);
    const entries: CpioEntry[] = [
      ...skeletonEntries(),
      ...(await busyboxEntries(busybox)),
      ...(await moduleEntries(release, modules)),
      { type: "file", path: "init", data: Buffer.from(GUEST_INIT), mode: 0o755 },
      { type: "file", path: "etc/inittab", data: Buffer.from(GUEST_INITTAB) },
      { type: "file", path: "etc/profile", data: Buffer.from(GUEST_PROFILE) },
    ];
    await writeFile(join(tmp, "initrd.img"), writeNewc(withParents(entries)));

    say(`writing rootfs.ext4 (${ROOTFS_SIZE_MIB} MiB, mkfs.ext4 -d)`);
    const staging = join(tmp, "rootfs-staging");
    await stageRootfs(staging, busybox);
    await mkfsExt4(staging, join(tmp, "rootfs.ext4"), ROOTFS_SIZE_MIB);
    await rm(staging, { recursive: true, force: true });

    const manifest: ImageManifest = {
      schema: 1,
      name,
      recipe: name,
      kernel: { package: kernel.name, version: kernel.version, release },
      cmdline: DEFAULT_CMDLINE, // what `typevisor run --image` boots it with
      files: {
        vmlinuz: await fileInfo(join(tmp, "vmlinuz")),
        "initrd.img": await fileInfo(join(tmp, "initrd.img")),
        "rootfs.ext4": await fileInfo(join(tmp, "rootfs.ext4")),
      },
      modules: modules.map((m) => m.name),
      created: new Date().toISOString(),
      sources: [kernel, bb].map((p) => ({ package: p.name, version: p.version, file: basename(p.deb) })),
    };
    await writeFile(join(tmp, "image.json"), `${JSON.stringify(manifest, null, 2)}\n`);

    if (existsSync(paths.dir)) {
      const old = tempName(paths.dir);
      await rename(paths.dir, old);
      await rename(tmp, paths.dir);
      await rm(old, { recursive: true, force: true });
    } else {
      await rename(tmp, paths.dir);
    }
    say(`image ${name} ready in ${paths.dir}`);
    return manifest;
  } catch (e) {
    await rm(tmp, { recursive: true, force: true });
    throw e;
  } finally {
    process.removeListener("SIGINT", onSignal);
    process.removeListener("SIGTERM", onSignal);
  }
}
