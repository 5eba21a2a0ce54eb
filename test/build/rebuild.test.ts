/**
 * `npm run build` under running processes (bin/bundle.js): a VMM started from one build goes on
 * loading that build's chunks after a rebuild, the next process gets the new build, and a build
 * killed halfway leaves the previous one working. Runs the real bundler on a copy of the project
 * (bin/, dist/ as tsc left it, package.json; node_modules linked), so the suite's own dist/ is
 * never rebuilt under the other tests.
 */
import { spawn, spawnSync } from "node:child_process";
import { appendFileSync, cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { until } from "../helpers/daemon.js";
import { TINY_KERNEL_BANNER, writeTinyKernel } from "../helpers/tiny-kernel.js";
import { unixApi } from "../helpers/unix-api.js";

const ROOT = new URL("../..", import.meta.url).pathname;
const hasKvm = existsSync("/dev/kvm");
const dir = mkdtempSync(join(tmpdir(), "tv-rebuild-"));
const copy = join(dir, "project");
const dist = join(copy, "dist");
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** The copy's compiled modules (not the builds), each given a statement that changes every chunk's hash. */
function changeSources(tag: string): void {
  const walk = (d: string): void => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory() && !e.name.startsWith("bundle") && !e.name.startsWith(".bundle")) walk(p);
      else if (e.isFile() && e.name.endsWith(".js")) appendFileSync(p, `\nglobalThis.__tvRebuild = ${JSON.stringify(tag)};\n`);
    }
  };
  walk(dist);
}

const bundle = () => spawnSync(process.execPath, [join(copy, "bin", "bundle.js")], { encoding: "utf8", timeout: 120_000 });
const builds = (): string[] => readdirSync(dist).filter((n) => /^bundle-[0-9a-f]{12}$/.test(n)).sort();
const version = () => spawnSync(process.execPath, [join(copy, "bin", "typevisor.js"), "--version"], { encoding: "utf8", timeout: 60_000 });

describe("rebuilding under running processes (bin/bundle.js)", () => {
  it("copies the project", () => {
    cpSync(join(ROOT, "bin"), join(copy, "bin"), { recursive: true });
    cpSync(join(ROOT, "package.json"), join(copy, "package.json"));
    cpSync(join(ROOT, "dist"), dist, { recursive: true, filter: (src) => !/\/dist\/\.?bundle[^/]*$/.test(src) });
    symlinkSync(join(ROOT, "node_modules"), join(copy, "node_modules"));
    const b = bundle();
    expect(b.status, b.stderr).toBe(0);
    expect(readlinkSync(join(dist, "bundle"))).toMatch(/^bundle-[0-9a-f]{12}$/);
    expect(version().stdout.trim()).toMatch(/^\d+\.\d+\.\d+/);
  });

  it.skipIf(!hasKvm)("a running VMM loads its own build's chunks after a rebuild; a new process gets the new build", async () => {
    const kernel = join(dir, "tiny.bzImage");
    writeTinyKernel(kernel);
    const api = join(dir, "api.sock");
    const log = join(dir, "console.log");
    const first = readlinkSync(join(dist, "bundle"));
    const child = spawn(process.execPath, [join(copy, "bin", "typevisor.js"), "run", "--force-kvm", "--no-lab", "--kernel", kernel, "--memory", "64", "--api-socket", api, "--console-log", log], { stdio: ["ignore", "ignore", "pipe"] });
    let err = "";
    child.stderr.on("data", (b: Buffer) => (err += b.toString()));
    const exited = new Promise((r) => child.on("exit", r));
    try {
      await until("the banner", () => existsSync(log) && readFileSync(log, "latin1").includes(TINY_KERNEL_BANNER), 30_000);
      changeSources("second");
      const b = bundle();
      expect(b.status, b.stderr).toBe(0);
      const second = readlinkSync(join(dist, "bundle"));
      expect(second).not.toBe(first);
      expect(builds()).toEqual([first, second].sort());
      // A snapshot loads chunks the VMM had not loaded yet (the state's schemas, zod): its own
      // build's, which a rebuild that emptied the directory would have taken away.
      const r = await unixApi(api, "POST", "/snapshot", { path: join(dir, "snap") });
      expect(r.status, `${JSON.stringify(r.body)} ${err}`).toBe(200);
      expect(existsSync(join(dir, "snap"))).toBe(true);
      // A process started now loads through the link, which names the second build: it runs.
      expect(version().status).toBe(0);
    } finally {
      child.kill("SIGKILL");
      await exited;
    }
  }, 120_000);

  it("a build killed at any point leaves the previous one working; the next build cleans up after it", async () => {
    const before = readlinkSync(join(dist, "bundle"));
    changeSources("third");
    for (const ms of [50, 300, 800, 1500]) {
      const p = spawn(process.execPath, [join(copy, "bin", "bundle.js")], { stdio: "ignore" });
      const exited = new Promise((r) => p.on("exit", r));
      await new Promise((r) => setTimeout(r, ms));
      p.kill("SIGKILL");
      await exited;
      const now = readlinkSync(join(dist, "bundle"));
      // Either the old build or, had it finished, the complete new one: never a partial one.
      expect(existsSync(join(dist, now, "cli.js")), `killed after ${ms} ms`).toBe(true);
      const v = version();
      expect(v.status, `killed after ${ms} ms: ${v.stderr}`).toBe(0);
    }
    expect(before).toMatch(/^bundle-/);
    const b = bundle();
    expect(b.status, b.stderr).toBe(0);
    expect(readdirSync(dist).filter((n) => n.startsWith(".bundle-"))).toEqual([]);
    // At most the current build and the four before it.
    for (let i = 0; i < 5; i++) {
      changeSources(`more-${i}`);
      expect(bundle().status).toBe(0);
    }
    expect(builds()).toHaveLength(5);
    expect(builds()).toContain(readlinkSync(join(dist, "bundle")));
  }, 180_000);
});
