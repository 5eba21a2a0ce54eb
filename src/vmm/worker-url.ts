import { fileURLToPath } from "node:url";

/**
 * Entry modules of the VMM's worker threads (relative to src/vmm/, as workerUrl takes them): the
 * main thread starts the device thread and the vCPU threads, the device thread each disk's I/O
 * thread. bin/bundle.js bundles each of them (bundledWorkerName).
 */
export const VMM_WORKER_ENTRIES = ["devices/platform/device-thread.js", "vcpu/worker.js", "devices/virtio/block/io-worker.js"] as const;
export type VmmWorkerEntry = (typeof VMM_WORKER_ENTRIES)[number];

/**
 * The file name of a worker entry's bundle in dist/bundle/ (bin/bundle.js names them so): flat,
 * like every file there, e.g. "vmm-vcpu-worker.js".
 */
export function bundledWorkerName(rel: VmmWorkerEntry): string {
  return `vmm-${rel.replace(/\//g, "-")}`;
}

/**
 * A file of a bundled build: dist/bundle-<hash>/ once Node has resolved the dist/bundle link
 * (bin/bundle.js), dist/bundle/ where it is a directory.
 */
const BUNDLED = /\/dist\/bundle(?:-[0-9a-f]{12})?\//;

/**
 * Where a worker entry lives. The CLI runs from its build's directory (bin/typevisor.js), where this code
 * is inlined into some chunk and the entries are bundles beside it; the compiled modules in
 * dist/vmm/ are the unbundled build. Under vitest the VMM's modules run from src/ as TypeScript,
 * so point at dist/ (built first).
 */
export function workerUrl(rel: VmmWorkerEntry): URL {
  const here = fileURLToPath(import.meta.url);
  if (here.endsWith(".ts")) return new URL(`file://${here.replace(/\/src\/vmm\/worker-url\.ts$/, `/dist/vmm/${rel}`)}`);
  if (BUNDLED.test(here)) return new URL(`./${bundledWorkerName(rel)}`, import.meta.url);
  return new URL(`./${rel}`, import.meta.url);
}
