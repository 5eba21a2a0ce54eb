import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, realpathSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { passedEnv, shQuote, specScript } from "./spec.js";

// The spec runs under the host's /bin/sh inside the lab; run it under the same shell here.
function sh(script: string): { out: string; err: string; status: number | null } {
  const r = spawnSync("/bin/sh", ["-c", script], { env: {} });
  return { out: r.stdout.toString(), err: r.stderr.toString(), status: r.status };
}

describe("shQuote", () => {
  it("round-trips any string without NUL through /bin/sh", () => {
    fc.assert(
      fc.property(fc.string({ unit: "binary" }).filter((s) => !s.includes("\0")), (s) => {
        expect(sh(`printf %s ${shQuote(s)}`).out).toBe(s);
      }),
      { numRuns: 50 },
    );
  });
});

describe("specScript", () => {
  it("recreates cwd and env, marks the lab, and execs the command with its exit code", () => {
    const dir = realpathSync(mkdtempSync(join(tmpdir(), "tv spec '")));
    try {
      const env = passedEnv({ PATH: "/usr/bin:/bin", TYPEVISOR_X: "it's", BENCH_RUNS: "2", CI: "1", SECRET_TOKEN: "no", npm_config_x: "no" });
      const script = specScript(["sh", "-c", 'echo "$PWD|$TYPEVISOR_X|$BENCH_RUNS|$CI|$TYPEVISOR_IN_LAB|${SECRET_TOKEN-unset}"; exit 9'], dir, env);
      const r = sh(script);
      expect(r.out).toBe(`${dir}|it's|2|1|1|unset\n`);
      expect(r.status).toBe(9);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("exits 127 with a message when the command does not exist", () => {
    const r = sh(specScript(["typevisor-no-such-command"], "/", passedEnv({ PATH: "/usr/bin:/bin" })));
    expect(r.status).toBe(127);
    expect(r.err).toContain("typevisor-lab: command not found: typevisor-no-such-command");
  });

  it("exits 127 with a message when the cwd does not exist in the lab", () => {
    const r = sh(specScript(["true"], "/nonexistent/typevisor", passedEnv({ PATH: "/usr/bin:/bin" })));
    expect(r.status).toBe(127);
    expect(r.err).toContain("cannot enter /nonexistent/typevisor");
  });
});
