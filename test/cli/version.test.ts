/** `typevisor --version` and `-V`: the package's version, exit 0, with no command loaded (main.ts). */
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";

const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;
const version = (JSON.parse(readFileSync(new URL("../../package.json", import.meta.url), "utf8")) as { version: string }).version;

describe("typevisor --version", () => {
  it.each(["--version", "-V"])("%s prints the package's version and exits 0", (flag) => {
    const r = spawnSync(process.execPath, [BIN, flag], { encoding: "utf8", timeout: 20_000 });
    expect(r.status).toBe(0);
    expect(r.stdout.trim()).toBe(version);
  });
});
