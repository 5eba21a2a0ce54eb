/**
 * Where typevisor keeps things on the host.
 * - cache (re-creatable: downloaded .deb files, extracted packages, lab initramfs, lab logs):
 *   $TYPEVISOR_CACHE, else $XDG_CACHE_HOME/typevisor, else ~/.cache/typevisor (XDG Base Directory spec).
 * - data (what the user built and wants to keep: images): $TYPEVISOR_HOME, else
 *   $XDG_DATA_HOME/typevisor, else ~/.local/share/typevisor.
 */
import { homedir } from "node:os";
import { join, resolve } from "node:path";
import { TypevisorError } from "../errors.js";

type Env = Record<string, string | undefined>;

function nonEmpty(v: string | undefined): string | undefined {
  return v !== undefined && v !== "" ? v : undefined;
}

export function cacheDir(env: Env = process.env): string {
  const explicit = nonEmpty(env["TYPEVISOR_CACHE"]);
  if (explicit !== undefined) return resolve(explicit);
  const xdg = nonEmpty(env["XDG_CACHE_HOME"]);
  return xdg !== undefined ? join(resolve(xdg), "typevisor") : join(homedir(), ".cache", "typevisor");
}

export function dataHome(env: Env = process.env): string {
  const explicit = nonEmpty(env["TYPEVISOR_HOME"]);
  if (explicit !== undefined) return resolve(explicit);
  const xdg = nonEmpty(env["XDG_DATA_HOME"]);
  return xdg !== undefined ? join(resolve(xdg), "typevisor") : join(homedir(), ".local", "share", "typevisor");
}

// Paths of an image, kept here (no zod, no manifest parsing) so `typevisor run` starts fast.
export interface ImagePaths {
  dir: string;
  kernel: string;
  initrd: string;
  rootfs: string;
  manifest: string;
}

export function validateImageName(name: string): void {
  if (!/^[a-z0-9][a-z0-9._-]{0,62}$/.test(name)) {
    throw new TypevisorError("IMAGE_BAD_NAME", `bad image name ${JSON.stringify(name)}: use lower-case letters, digits, '.', '_' and '-'`);
  }
}

export function imagesDir(home = dataHome()): string {
  return join(home, "images");
}

export function imagePaths(name: string, home = dataHome()): ImagePaths {
  validateImageName(name);
  const dir = join(imagesDir(home), name);
  return {
    dir,
    kernel: join(dir, "vmlinuz"),
    initrd: join(dir, "initrd.img"),
    rootfs: join(dir, "rootfs.ext4"),
    manifest: join(dir, "image.json"),
  };
}

