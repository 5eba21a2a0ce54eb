/**
 * What a real daemon loads at start: nothing it never runs. Fastify's default schema compilers
 * (ajv, fast-json-stringify) were ~125 ms of the daemon's ~830 ms start on the host while no route
 * gives fastify a JSON schema (every request is checked with zod: src/api/server.ts); the CommonJS
 * module cache, written by a preloaded script when the daemon exits, says what was loaded (the
 * bundle leaves those compilers outside it, so Node's cache would show them).
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { startDaemon } from "../helpers/daemon.js";

describe("the daemon's start", () => {
  const dir = mkdtempSync(join(tmpdir(), "tvdmods-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("loads no JSON-schema compiler, and still answers every kind of request", async () => {
    const out = join(dir, "modules.txt");
    const preload = join(dir, "modules.cjs");
    writeFileSync(preload, `process.on("exit", () => require("node:fs").writeFileSync(${JSON.stringify(out)}, Object.keys(require.cache).join("\\n")));\n`);
    const d = await startDaemon({ home: join(dir, "home"), args: ["--force-kvm"], env: { NODE_OPTIONS: `--require ${preload}` } });
    try {
      // A route with a path parameter, one with a body (refused by its zod schema), the OpenAPI document.
      await expect(d.client.getVm("nope")).rejects.toThrow(/nope/);
      await expect(d.client.createVm({ name: "bad name!" } as never)).rejects.toThrow();
      expect((await d.client.health()).ok).toBe(true);
    } finally {
      await d.stop();
    }
    const loaded = readFileSync(out, "utf8").split("\n");
    // It did load a package through the same cache (its inventory's native SQLite binding; the
    // bundled CLI leaves that and fastify's schema compilers to Node: bin/bundle.js): the list is the daemon's.
    expect(loaded.some((m) => m.includes("/node_modules/better-sqlite3/"))).toBe(true);
    // (fastify's own error serializer, prebuilt, needs only fast-json-stringify's small runtime, lib/.)
    expect(loaded.filter((m) => /\/node_modules\/(ajv|@fastify\/ajv-compiler|@fastify\/fast-json-stringify-compiler)\/|\/node_modules\/fast-json-stringify\/index\.js$/.test(m))).toEqual([]);
  }, 60_000);
});
