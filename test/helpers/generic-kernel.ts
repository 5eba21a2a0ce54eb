import { existsSync, readdirSync } from "node:fs";
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
