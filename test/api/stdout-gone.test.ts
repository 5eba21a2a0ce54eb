/**
 * A daemon whose stdout and stderr go away (`typevisor daemon | head`, a log collector that died)
 * keeps serving and still stops on SIGTERM. It logs to stdout (for systemd's journal) beside its
 * own log file: a write to the closed pipe fails with EPIPE, and that failure must not become a
 * fault that is itself logged to the same pipe (it spun at ~50 % CPU, answered nothing and
 * ignored SIGTERM).
 */
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { TypevisorClient } from "../../src/api/client.js";
import { until } from "../helpers/daemon.js";

const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;

describe("the daemon with its stdout and stderr gone", () => {
  const home = mkdtempSync(join(tmpdir(), "tvd-stdout-"));
  afterAll(() => rmSync(home, { recursive: true, force: true }));

  it("goes on serving, logs to its file, and stops on SIGTERM", async () => {
    const proc = spawn(process.execPath, [BIN, "daemon", "--home", home, "--no-sandbox", "--force-kvm", "--usage-interval", "1"], { stdio: ["ignore", "pipe", "pipe"] });
    const exited = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
    try {
      let out = "";
      proc.stdout.on("data", (d: Buffer) => (out += d.toString()));
      await until("the daemon's first line", () => out.includes("daemon started") || undefined, 30_000);
      // The reader goes away: the daemon's next writes to either stream fail with EPIPE.
      proc.stdout.destroy();
      proc.stderr.destroy();
      const client = new TypevisorClient({ socketPath: join(home, "typevisor.sock") }, 5000);
      // Requests that log (a refused create is an event and a log line), then one that must still be answered.
      for (let i = 0; i < 3; i++) await expect(client.createVm({ name: `bad name ${i}!` } as never)).rejects.toThrow();
      await new Promise((r) => setTimeout(r, 1500));
      expect((await client.health()).ok).toBe(true);
      expect(readFileSync(join(home, "daemon.log"), "utf8")).toMatch(/daemon started/);
      proc.kill("SIGTERM");
      const code = await Promise.race([exited, new Promise((r) => setTimeout(() => r("still running"), 10_000))]);
      expect(code).toBe(0);
    } finally {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
      await exited;
    }
    expect(existsSync(join(home, "typevisor.sock"))).toBe(false);
  }, 60_000);
});
