/**
 * `typevisor image import NAME FILE [--format qcow2|raw]`: a disk image a user brought (a
 * distribution's cloud image in qcow2, a raw disk) into the image store, as
 * `images/NAME/disk.<format>` with `images/NAME/disk.json`. VMs are made from it as linked clones
 * (`vm create --image NAME --kernel ...`: docs/storage.md).
 *
 * The file is hostile. Its format is the one given, else detected from its first bytes (safe
 * here, unlike for a writable disk: the import is read-only and the result is what typevisor
 * then names with its format). The copy, not the source, is what is checked (the source may
 * change while it is read): a qcow2 image with a backing file is refused (its name would point
 * at a file on this host), and every header field, table and L2 entry is checked by our own
 * reader (vmm/disk/qcow2: the checks a VM's requests get, made now for all of it). The copy runs
 * off the event loop (libuv's pool: fs.promises.copyFile). Raw images must be whole sectors.
 */
import { closeSync, constants, existsSync, fstatSync, openSync, readdirSync, readFileSync, readSync } from "node:fs";
import { copyFile, mkdir, rename, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { z } from "zod";
import { TypevisorError } from "../errors.js";
import { Qcow2Backend } from "../vmm/disk/qcow2/image.js";
import { DiskFormatError, parseHeader, QCOW2_MAGIC } from "../vmm/disk/qcow2/format.js";
import { IoFailure } from "../vmm/disk/qcow2/io.js";
import { dataHome, imagePaths, imagesDir } from "./dirs.js";
import { fileInfo } from "./manifest.js";

export const DiskImageManifestSchema = z.object({
  schema: z.literal(1),
  name: z.string(),
  kind: z.literal("disk"),
  format: z.enum(["qcow2", "raw"]),
  /** Size the guest sees, bytes. */
  virtualSize: z.number().int().positive(),
  /** The stored file: disk.qcow2 or disk.raw. */
  file: z.object({ name: z.string(), size: z.number().int().nonnegative(), sha256: z.string().regex(/^[0-9a-f]{64}$/) }),
  /** Where it was imported from (for people). */
  source: z.string(),
  imported: z.string(),
});
export type DiskImageManifest = z.infer<typeof DiskImageManifestSchema>;

/** images/NAME/disk.json, when NAME is an imported disk image. */
export function diskImageManifestPath(name: string, home = dataHome()): string {
  return join(imagePaths(name, home).dir, "disk.json");
}

/** The manifest of imported disk image `name`, or undefined when it is not one. @throws TypevisorError IMAGE_MANIFEST_INVALID */
export function loadDiskImage(name: string, home = dataHome()): (DiskImageManifest & { path: string }) | undefined {
  const p = diskImageManifestPath(name, home);
  if (!existsSync(p)) return undefined;
  let json: unknown;
  try {
    json = JSON.parse(readFileSync(p, "utf8"));
  } catch {
    throw new TypevisorError("IMAGE_MANIFEST_INVALID", `${p} is not valid JSON`);
  }
  const r = DiskImageManifestSchema.safeParse(json);
  if (!r.success || !/^disk\.(qcow2|raw)$/.test(r.data.file.name)) throw new TypevisorError("IMAGE_MANIFEST_INVALID", `${p} does not match the disk image manifest schema`, { hint: "import the image again" });
  return { ...r.data, path: join(imagePaths(name, home).dir, r.data.file.name) };
}

export interface ImportOptions {
  format?: "qcow2" | "raw";
  home?: string;
  progress?: (msg: string) => void;
}

function refuse(message: string, hint?: string): TypevisorError {
  return new TypevisorError("IMAGE_IMPORT", message, hint !== undefined ? { hint } : undefined);
}

/**
 * Check a copied image and return its virtual size. qcow2: the header (no backing file, no
 * external data file, no encryption: what the reader refuses), then every table through
 * Qcow2Backend.verify(). raw: whole sectors.
 */
export function checkImportedImage(path: string, format: "qcow2" | "raw", source: string): number {
  const fd = openSync(path, constants.O_RDONLY);
  try {
    const size = fstatSync(fd).size;
    if (format === "raw") {
      if (size === 0 || size % 512 !== 0) throw refuse(`${source} is ${size} bytes: a raw disk image is a whole number of 512-byte sectors, at least one`, "resize it: truncate -s %512 FILE");
      return size;
    }
    const head = Buffer.alloc(Math.min(64 * 1024, size));
    readSync(fd, head, 0, head.length, 0);
    let backing: string | undefined;
    try {
      backing = parseHeader(head, size).backingFile;
    } catch (e) {
      throw refuse(`${source} is not a qcow2 image typevisor can use: ${(e as Error).message}`);
    }
    if (backing !== undefined) {
      throw refuse(`${source} has a backing file (${JSON.stringify(backing)}): an imported image must stand alone (its backing name would point at a file on this host)`, "flatten it first: qemu-img convert -O qcow2 FILE FLAT.qcow2");
    }
    let b: Qcow2Backend;
    try {
      b = new Qcow2Backend(fd, { readonly: true, path: source });
      b.verify();
    } catch (e) {
      if (e instanceof DiskFormatError || e instanceof IoFailure || e instanceof TypevisorError) throw refuse(`${source} is not a qcow2 image typevisor can use: ${e.message}`);
      throw e;
    }
    const cap = b.capacity;
    b.close();
    if (cap <= 0 || cap % 512 !== 0) throw refuse(`${source} has a virtual size of ${cap} bytes, not a positive whole number of sectors`);
    return cap;
  } finally {
    closeSync(fd);
  }
}

export async function importImage(name: string, file: string, opts: ImportOptions = {}): Promise<DiskImageManifest> {
  const home = opts.home ?? dataHome();
  const p = imagePaths(name, home);
  if (existsSync(p.dir)) throw new TypevisorError("IMAGE_EXISTS", `an image named ${name} already exists`, { hint: `remove it first: typevisor image rm ${name}` });
  // Opened once; what is copied is the file opened (/proc/self/fd/N), a FIFO does not hang us.
  let fd: number;
  try {
    fd = openSync(file, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch (e) {
    throw refuse(`cannot open ${file}: ${(e as Error).message}`);
  }
  const tmp = join(imagesDir(home), `.${name}.import-${randomBytes(4).toString("hex")}`);
  try {
    if (!fstatSync(fd).isFile()) throw refuse(`${file} is not a regular file`);
    const magic = Buffer.alloc(4);
    const got = readSync(fd, magic, 0, 4, 0);
    const detected = got === 4 && magic.readUInt32BE(0) === QCOW2_MAGIC ? "qcow2" : "raw";
    const format = opts.format ?? detected;
    opts.progress?.(`importing ${file} as ${format}${opts.format === undefined ? " (detected; give --format to say)" : ""}`);
    await mkdir(tmp, { recursive: true, mode: 0o755 });
    const stored = join(tmp, `disk.${format}`);
    // A reflink where the filesystem offers one (instant, shared blocks until written).
    await copyFile(`/proc/self/fd/${fd}`, stored, constants.COPYFILE_FICLONE);
    const virtualSize = checkImportedImage(stored, format, file);
    const info = await fileInfo(stored);
    const manifest: DiskImageManifest = { schema: 1, name, kind: "disk", format, virtualSize, file: { name: `disk.${format}`, ...info }, source: file, imported: new Date().toISOString() };
    await writeFile(join(tmp, "disk.json"), `${JSON.stringify(manifest, null, 2)}\n`);
    if (existsSync(p.dir)) throw new TypevisorError("IMAGE_EXISTS", `an image named ${name} appeared meanwhile`);
    await rename(tmp, p.dir);
    return manifest;
  } finally {
    closeSync(fd);
    await rm(tmp, { recursive: true, force: true });
  }
}

/** Every imported disk image in the store. */
export function listDiskImages(home = dataHome()): DiskImageManifest[] {
  const dir = imagesDir(home);
  if (!existsSync(dir)) return [];
  const out: DiskImageManifest[] = [];
  for (const n of readdirSafe(dir).sort()) {
    if (n.startsWith(".")) continue;
    try {
      const m = loadDiskImage(n, home);
      if (m !== undefined) out.push(m);
    } catch {
      // a bad name or manifest: not listed
    }
  }
  return out;
}

function readdirSafe(dir: string): string[] {
  try {
    return readdirSync(dir);
  } catch {
    return [];
  }
}
