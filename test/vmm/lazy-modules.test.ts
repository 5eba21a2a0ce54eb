/**
 * What a VMM loads costs every VM on the host (issue 19, docs/benchmarks.md "Density"): zod, the
 * schema library that checks snapshots, migration streams and request bodies, is ~7 MiB of heap
 * and ~70 ms per thread that loads it. A VMM that boots a guest and is only asked GET must not
 * load it in any of its threads (main, device thread, vCPU, disk I/O); the first request with a
 * body does (not POST /migrate: the source side of a migration loads none). Every module each thread resolves is logged by a Node module hook (node:module
 * register, run in each worker through the inherited --import). The CLI runs bundled
 * (bin/bundle.js): each thread's entry is a file of dist/bundle/, and zod is a chunk of its own there.
 */
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { until } from "../helpers/daemon.js";
import { TINY_KERNEL_BANNER, writeTinyKernel } from "../helpers/tiny-kernel.js";
import { bundledWorkerName, type VmmWorkerEntry } from "../../src/vmm/worker-url.js";
import { unixApi } from "../helpers/unix-api.js";

const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
const hasKvm = existsSync("/dev/kvm");
const dir = mkdtempSync(join(tmpdir(), "tv-lazy-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const kernel = join(dir, "tiny.bzImage");
writeTinyKernel(kernel);
const disk = join(dir, "disk.raw");
writeFileSync(disk, "");
truncateSync(disk, 8 * 2 ** 20);
const moduleLog = join(dir, "modules.log");
writeFileSync(join(dir, "hooks.mjs"), `import { appendFileSync } from "node:fs";
export async function resolve(specifier, context, next) {
  const r = await next(specifier, context);
  appendFileSync(${JSON.stringify(moduleLog)}, r.url + "\\n");
  return r;
}
`);
writeFileSync(join(dir, "register.mjs"), `import { register } from "node:module";\nregister(new URL("./hooks.mjs", import.meta.url));\n`);

const loaded = (): string[] => (existsSync(moduleLog) ? readFileSync(moduleLog, "utf8").split("\n") : []);
const zod = (): string[] => loaded().filter((u) => u.includes("/node_modules/zod/") || /\/dist\/bundle(-[0-9a-f]{12})?\/[^/]*-zod-[^/]*\.js$/.test(u));
/** A thread's entry module was loaded: its bundle (the CLI's build). */
const entryLoaded = (rel: VmmWorkerEntry): boolean => loaded().some((u) => new RegExp(`/dist/bundle(-[0-9a-f]{12})?/${bundledWorkerName(rel)}$`).test(u));

describe.skipIf(!hasKvm)("modules a VMM loads (tiny kernel, --force-kvm)", () => {
  it("booting with a disk, an entropy source and an API socket loads no zod in any thread; POST /snapshot loads it", async () => {
    const api = join(dir, "api.sock");
    const log = join(dir, "console.log");
    const child = spawn(process.execPath, ["--import", join(dir, "register.mjs"), BIN, "run", "--force-kvm", "--no-lab", "--kernel", kernel, "--memory", "64", "--disk", `${disk},readonly=on`, "--rng", "--api-socket", api, "--console-log", log], { stdio: ["ignore", "ignore", "pipe"] });
    const exited = new Promise((r) => child.on("exit", r));
    try {
      await until("the banner", () => existsSync(log) && readFileSync(log, "latin1").includes(TINY_KERNEL_BANNER), 30_000);
      expect((await unixApi(api, "GET", "/vm")).status).toBe(200);
      expect((await unixApi(api, "GET", "/stats")).status).toBe(200);
      // The disk's I/O thread starts when the disk first needs one; the tiny guest drives no disk.
      const t = await unixApi(api, "GET", "/threads");
      expect((t.body as { ioThreads?: { state: string }[] }).ioThreads?.[0]?.state).toBe("idle");
      // The hook saw every thread: each one's entry module and koffi (which each thread loads).
      for (const entry of ["devices/platform/device-thread.js", "vcpu/worker.js"] as const) expect(entryLoaded(entry), entry).toBe(true);
      expect(entryLoaded("devices/virtio/block/io-worker.js"), "no I/O thread").toBe(false);
      expect(loaded().filter((u) => /\/node_modules\/koffi\/index\.js$/.test(u)).length).toBeGreaterThanOrEqual(2);
      expect(zod()).toEqual([]);
      // A migration's source loads no zod either: the migrate request waits for its modules (lab:
      // seconds with zod). To a socket nobody listens on: it fails, and the VM runs on.
      const m = await unixApi(api, "POST", "/migrate", { to: `unix:${join(dir, "nobody.sock")}` });
      expect(m.status, JSON.stringify(m.body)).toBe(202);
      await until("the migration to fail", async () => ((await unixApi(api, "GET", "/migrate")).body as { phase?: string }).phase === "failed", 30_000);
      expect((await unixApi(api, "GET", "/vm")).status).toBe(200);
      // The source's module, in its chunk (named after it).
      expect(loaded().some((u) => /\/dist\/bundle(-[0-9a-f]{12})?\/cli-source-[^/]*\.js$/.test(u))).toBe(true);
      expect(zod()).toEqual([]);
      const r = await unixApi(api, "POST", "/snapshot", { path: join(dir, "snap") });
      expect(r.status, JSON.stringify(r.body)).toBe(200);
      expect(zod().length).toBeGreaterThan(0);
    } finally {
      child.kill("SIGKILL");
      await exited;
    }
  });
});
