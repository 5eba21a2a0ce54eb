/**
 * image.json: what an image is made of and where it came from. Versioned (schema) so later code
 * can read images built by earlier versions; parsed with zod because the file is user-editable.
 */
import { execFile } from "node:child_process";
import { stat } from "node:fs/promises";
import { promisify } from "node:util";
import { z } from "zod";
import { TypevisorError } from "../errors.js";

const run = promisify(execFile);

const FileInfo = z.object({ size: z.number().int().nonnegative(), sha256: z.string().regex(/^[0-9a-f]{64}$/) });
const Source = z.object({ package: z.string(), version: z.string(), file: z.string() });

export const ImageManifestSchema = z.object({
  schema: z.literal(1),
  name: z.string(),
  recipe: z.string(),
  kernel: z.object({ package: z.string(), version: z.string(), release: z.string() }),
  /** Kernel command line the image expects (console etc.), without root= or typevisor.run=. */
  cmdline: z.string(),
  files: z.object({ vmlinuz: FileInfo, "initrd.img": FileInfo, "rootfs.ext4": FileInfo }),
  /** Modules the initramfs loads, in order. */
  modules: z.array(z.string()),
  created: z.string(),
  sources: z.array(Source),
});

export type ImageManifest = z.infer<typeof ImageManifestSchema>;
export type ImageFileInfo = z.infer<typeof FileInfo>;

export function parseManifest(text: string, where: string): ImageManifest {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new TypevisorError("IMAGE_MANIFEST_INVALID", `${where} is not valid JSON`, { cause: e });
  }
  const r = ImageManifestSchema.safeParse(json);
  if (!r.success) {
    const first = r.error.issues[0];
    const detail = first === undefined ? "" : `: ${first.path.join(".")} ${first.message}`;
    throw new TypevisorError("IMAGE_MANIFEST_INVALID", `${where} does not match the image manifest schema${detail}`, {
      hint: "rebuild the image with --force",
    });
  }
  return r.data;
}

/**
 * Size and SHA-256 of a file. Hashing a root filesystem or an imported disk is seconds of CPU, so
 * it runs in a child process (coreutils' sha256sum), off the caller's event loop: the daemon keeps
 * answering meanwhile.
 */
export async function fileInfo(path: string): Promise<ImageFileInfo> {
  let stdout: string;
  try {
    ({ stdout } = await run("sha256sum", ["--", path], { timeout: 600_000 }));
  } catch (e) {
    const err = e as { stderr?: string; message: string; code?: string };
    if (err.code === "ENOENT") throw new TypevisorError("MISSING_TOOL", "hashing a file needs sha256sum (coreutils)");
    throw new TypevisorError("FILE_READ", `cannot hash ${path}: ${(err.stderr ?? err.message).trim().split("\n").pop() ?? ""}`);
  }
  // "HASH  NAME", with a leading backslash when the name had to be escaped (a newline or backslash in it)
  const sha256 = /^\\?([0-9a-f]{64}) /.exec(stdout)?.[1];
  if (sha256 === undefined) throw new TypevisorError("FILE_READ", `sha256sum gave no hash for ${path}`);
  return { size: (await stat(path)).size, sha256 };
}
