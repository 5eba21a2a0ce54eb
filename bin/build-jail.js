#!/usr/bin/env node
// Builds dist/typevisor-jail, the daemon's VMM sandbox helper, from src/control/sandbox/typevisor-jail.c
// (run by `npm run build` and by `npm ci` through the prepare script). Static, so it runs wherever
// the daemon does (the KVM lab included). Without gcc it says so and leaves the sandbox unavailable:
// a daemon run as root then refuses to start unless given --no-sandbox (docs/security.md).
import { spawnSync } from "node:child_process";
import { mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..") + "/";
mkdirSync(`${root}dist`, { recursive: true });
const args = ["-O2", "-Wall", "-Wextra", "-Werror", "-static", "-o", `${root}dist/typevisor-jail`, `${root}src/control/sandbox/typevisor-jail.c`];
const r = spawnSync(process.env["CC"] ?? "gcc", args, { stdio: "inherit" });
if (r.error !== undefined || r.status !== 0) {
  process.stderr.write(`build-jail: could not build dist/typevisor-jail (${r.error?.message ?? `gcc exited ${r.status}`}): install gcc and libc6-dev for the VMM sandbox\n`);
}
