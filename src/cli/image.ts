/**
 * `typevisor image build|ls|rm`: guest images made from Debian packages (src/images, docs/images.md).
 * Errors are TypevisorErrors, printed by the main CLI.
 */
import type { Command } from "commander";
import { imagesDir } from "../images/dirs.js";
import type { ImageManifest } from "../images/image.js";

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
    .command("ls")
    .description(`list images`)
    .option("--json", "print the manifests as JSON")
    .action(async (o: { json?: boolean }) => {
      const list = await (await images()).listImages();
      if (o.json === true) process.stdout.write(`${JSON.stringify(list, null, 2)}\n`);
      else if (list.length === 0) process.stdout.write(`no images in ${imagesDir()} (build one: typevisor image build minimal)\n`);
      else process.stdout.write(formatImageTable(list));
    });

  image
    .command("rm")
    .description("remove an image")
    .argument("<name>", "image name")
    .action(async (name: string) => {
      await (await images()).removeImage(name);
      process.stdout.write(`removed image ${name}\n`);
    });
}
