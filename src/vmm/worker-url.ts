import { fileURLToPath } from "node:url";

/**
 * Where a compiled worker entry lives (`rel` from src/vmm/, e.g. "vcpu/worker.js").
 * Under vitest the VMM's modules run from src/ as TypeScript, so point at dist/ (built first).
 */
export function workerUrl(rel: string): URL {
  const here = fileURLToPath(import.meta.url);
  if (here.endsWith(".ts")) return new URL(`file://${here.replace(/\/src\/vmm\/worker-url\.ts$/, `/dist/vmm/${rel}`)}`);
  return new URL(`./${rel}`, import.meta.url);
}
