/**
 * `typevisor image build|ls|rm`: guest images made from Debian packages (src/images, docs/images.md).
 * Errors are TypevisorErrors, printed by the main CLI.
 */
import { existsSync } from "node:fs";
import { resolve } from "node:path";
import type { Command } from "commander";
import { homePaths } from "../control/paths.js";
import { TypevisorError } from "../errors.js";
import { dataHome, imagesDir } from "../images/dirs.js";
import { addConnectionOptions, connect, type ConnectionOptions } from "./connect.js";
import type { ImageManifest } from "../images/image.js";
import type { DiskImageManifest } from "../images/import.js";

/** Loaded on use: the image builder pulls in zod and friends, which `typevisor run` should not pay for at start-up. */
const images = () => import("../images/image.js");

function mib(bytes: number): string {
  return `${(bytes / 1048576).toFixed(1)}M`;
}

/** Plain-text table: name, kernel, file sizes, created, sources. */
export function formatImageTable(images: ImageManifest[]): string {
  const rows = [
    ["NAME", "KERNEL", "VMLINUZ", "INITRD", "ROOTFS", "CREATED", "SOURCE"],
    ...images.map((m) => [
      m.name,
      m.kernel.release,
      mib(m.files.vmlinuz.size),
      mib(m.files["initrd.img"].size),
      mib(m.files["rootfs.ext4"].size),
      m.created.replace(/\.\d+Z$/, "Z"),
      m.sources.map((s) => `${s.package} ${s.version}`).join(", "),
    ]),
  ];
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? "").length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i] ?? 0))).join("  ")).join("\n") + "\n";
}

/** Imported disk images: name, format, virtual size, file size, imported, source. */
export function formatDiskImageTable(disks: DiskImageManifest[]): string {
  const rows = [
    ["DISK IMAGE", "FORMAT", "VIRTUAL", "FILE", "IMPORTED", "SOURCE"],
    ...disks.map((m) => [m.name, m.format, mib(m.virtualSize), mib(m.file.size), m.imported.replace(/\.\d+Z$/, "Z"), m.source]),
  ];
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? "").length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i] ?? 0))).join("  ")).join("\n") + "\n";
}

/**
 * VMs whose disks are qcow2 overlays on image `name`'s base: asked of the daemon, or, when none
 * answers, read from its inventory (read-only; SQLite WAL lets readers beside a writer).
 */
export async function linkedClonesOf(name: string, o: ConnectionOptions): Promise<string[]> {
  const of = (vms: { name: string; disks: { image?: string; backing?: string }[] }[]): string[] =>
    vms.filter((v) => Array.isArray(v.disks) && v.disks.some((d) => d.image === name && d.backing !== undefined)).map((v) => v.name).sort();
  try {
    return of(await connect(o).listVms());
  } catch (e) {
    if (!(e instanceof TypevisorError) || e.code !== "DAEMON_UNREACHABLE") throw e;
  }
  const db = homePaths(o.home ?? dataHome()).db;
  if (!existsSync(db)) return [];
  const { default: Database } = await import("better-sqlite3");
  const conn = new Database(db, { readonly: true, fileMustExist: true });
  try {
    const rows = conn.prepare("SELECT name, disks FROM vms").all() as { name: string; disks: string }[];
    return of(rows.map((r) => {
      try {
        return { name: r.name, disks: JSON.parse(r.disks) as { image?: string; backing?: string }[] };
      } catch {
        return { name: r.name, disks: [] };
      }
    }));
  } finally {
    conn.close();
  }
}

export function registerImageCommands(program: Command): void {
  const image = program.command("image").description("build, list and remove guest images (from Debian packages)");

  image
    .command("build")
    .description("build a guest image: the Debian cloud kernel, a busybox initramfs with virtio modules, an ext4 root filesystem")
    .argument("<name>", "recipe to build (minimal)")
    .option("--force", "rebuild even if the image exists")
    .action(async (name: string, o: { force?: boolean }) => {
      const t0 = performance.now();
      const { buildImage } = await images();
      const m = await buildImage(name, { force: o.force === true, progress: (msg) => process.stderr.write(`typevisor: ${msg}\n`) });
      process.stdout.write(`${m.name}: kernel ${m.kernel.release}, ${Object.keys(m.files).join(", ")} (${((performance.now() - t0) / 1000).toFixed(1)} s)\n`);
    });

  image
    .command("import")
    .description("import a disk image you brought (e.g. a distribution's cloud image in qcow2) into the image store; VMs are linked clones of it (vm create --image NAME --kernel ...)")
    .argument("<name>", "image name: lower-case letters, digits, '.', '_' and '-'")
    .argument("<file>", "the disk image (qcow2 without a backing file, or raw)")
    .option("--format <format>", "qcow2 or raw (default: detected from the file's first bytes)")
    .action(async (name: string, file: string, o: { format?: string }) => {
      if (o.format !== undefined && o.format !== "qcow2" && o.format !== "raw") throw new TypevisorError("INVALID_ARGUMENT", `--format must be qcow2 or raw (got "${o.format}")`);
      const { importImage } = await import("../images/import.js");
      const t0 = performance.now();
      const m = await importImage(name, resolve(file), { ...(o.format !== undefined ? { format: o.format as "qcow2" | "raw" } : {}), progress: (msg) => process.stderr.write(`typevisor: ${msg}\n`) });
      process.stdout.write(`${m.name}: ${m.format}, ${mib(m.virtualSize)} virtual, ${mib(m.file.size)} file (${((performance.now() - t0) / 1000).toFixed(1)} s)\n`);
    });

  image
    .command("ls")
    .description(`list images`)
    .option("--json", "print the manifests as JSON")
    .action(async (o: { json?: boolean }) => {
      const list = await (await images()).listImages();
      const disks = (await import("../images/import.js")).listDiskImages();
      if (o.json === true) process.stdout.write(`${JSON.stringify([...list, ...disks], null, 2)}\n`);
      else if (list.length === 0 && disks.length === 0) process.stdout.write(`no images in ${imagesDir()} (build one: typevisor image build minimal)\n`);
      else {
        if (list.length > 0) process.stdout.write(formatImageTable(list));
        if (disks.length > 0) {
          if (list.length > 0) process.stdout.write("\n");
          process.stdout.write(formatDiskImageTable(disks));
        }
      }
    });

  addConnectionOptions(
    image
      .command("rm")
      .description("remove an image; refused while VMs are linked clones of it (their qcow2 disks are overlays on its base) unless --force")
      .argument("<name>", "image name")
      .option("--force", "remove it anyway: the VMs keep working, their disks stand on the daemon's own copy of it (a base), which stays until the last of them goes"),
  ).action(async (name: string, o: ConnectionOptions & { force?: boolean }) => {
    if (o.force !== true) {
      const users = await linkedClonesOf(name, o);
      if (users.length > 0) {
        throw new TypevisorError("IMAGE_IN_USE", `image ${name} has linked clones: VM${users.length > 1 ? "s" : ""} ${users.join(", ")} (qcow2 overlays on its base)`, {
          hint: `remove them first (typevisor vm rm ${users[0]!}), or remove the image anyway with --force (their base stays)`,
        });
      }
    }
    await (await images()).removeImage(name);
    process.stdout.write(`removed image ${name}\n`);
  });
}
