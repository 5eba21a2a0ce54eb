/**
 * Where typevisor keeps things on the host.
 * - cache (re-creatable: downloaded .deb files, extracted packages, lab initramfs, lab logs):
 *   $TYPEVISOR_CACHE, else $XDG_CACHE_HOME/typevisor, else ~/.cache/typevisor (XDG Base Directory spec).
 * - data (what the user built and wants to keep: images): $TYPEVISOR_HOME, else
 *   $XDG_DATA_HOME/typevisor, else ~/.local/share/typevisor.
 */
import { homedir } from "node:os";
import { join, resolve } from "node:path";

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
