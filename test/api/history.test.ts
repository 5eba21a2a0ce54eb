/**
 * Metrics history against a real daemon (sampling every second) and a real VMM running the tiny
 * guest: GET /v1/metrics/history for a VM and the host, its bounds, and the CLI's --history.
 */
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Store } from "../../src/control/store.js";
import { homePaths } from "../../src/control/paths.js";
import { writeTinyKernel } from "../helpers/tiny-kernel.js";
import { outcome } from "../helpers/thrown.js";
import { BIN, startDaemon, until, type TestDaemon } from "../helpers/daemon.js";

const hasKvm = existsSync("/dev/kvm");

describe.skipIf(!hasKvm)("metrics history (real daemon, tiny guest)", () => {
  let d: TestDaemon;
  let dir: string;
  let kernel: string;
  /** A real webhook receiver: the first POST is answered 500 (the daemon retries), the rest 204. */
  let hook: Server;
  const hooked: { type: string; vm?: string; data?: Record<string, unknown> }[] = [];
  let hookAnswers = 0;
  const tv = (args: string[]) => spawnSync(process.execPath, [BIN, ...args, "--socket", d.socket], { encoding: "utf8", timeout: 60_000 });

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "tvhist-"));
    kernel = join(dir, "tiny.bin");
    writeTinyKernel(kernel);
    hook = createServer((req, res) => {
      let b = "";
      req.on("data", (x: Buffer) => (b += x.toString()));
      req.on("end", () => {
        res.statusCode = hookAnswers++ === 0 ? 500 : 204;
        if (res.statusCode === 204) hooked.push(JSON.parse(b) as (typeof hooked)[number]);
        res.end();
      });
    });
    await new Promise<void>((r) => hook.listen(0, "127.0.0.1", r));
    const hookUrl = `http://127.0.0.1:${(hook.address() as AddressInfo).port}/alerts?key=secret`;
    d = await startDaemon({ args: ["--force-kvm", "--allow-files", dir, "--alert-webhook", hookUrl] });
  }, 30_000);

  afterAll(async () => {
    if (d !== undefined) {
      for (const vm of await d.client.listVms().catch(() => [])) await d.client.removeVm(vm.name, { force: true }).catch(() => undefined);
      await d.stop();
    }
    hook?.close();
    rmSync(dir, { recursive: true, force: true });
  }, 60_000);

  it("records a running VM's usage and state, and the host's, and serves them", async () => {
    const c = d.client;
    await c.createVm({ name: "h1", kernel, memoryMiB: 64, rng: false });
    const vm = await c.startVm("h1");
    const running = await until(
      "a 10 s bucket with usage",
      async () => (await c.metricsHistory({ vm: "h1", step: 10 })).points.find((p) => p.samples > 0 && p.state === "running"),
      30_000,
    );
    expect(running.memoryBytes).toBeGreaterThan(0);
    expect(running.cpuPercent).toBeGreaterThanOrEqual(0);
    // the same samples in the 5 min and 1 h buckets
    expect((await c.metricsHistory({ vm: "h1", step: 300 })).points.at(-1)!.samples).toBeGreaterThan(0);
    expect((await c.metricsHistory({ vm: "h1", step: 3600 })).points.at(-1)!.samples).toBeGreaterThan(0);
    const host = await c.metricsHistory();
    expect(host.vm).toBeUndefined();
    expect(host.step).toBe(10);
    const hp = host.points.at(-1)!;
    expect(hp.memoryBytes).toBeGreaterThan(0);
    expect(hp.cpuPercent).toBeGreaterThanOrEqual(0);
    expect(hp.cpuPercent).toBeLessThanOrEqual(100);
    expect(hp.diskReadBps).toBeGreaterThanOrEqual(0);

    // the VMM killed: the history shows the crash
    process.kill(vm.pid!, "SIGKILL");
    await until("crashed in the history", async () => (await c.metricsHistory({ vm: "h1", step: 10 })).points.find((p) => p.state === "crashed"), 30_000);

    // the CLI prints a table of it
    const out = tv(["vm", "stats", "h1", "--history", "5m"]);
    expect(out.stderr).toBe("");
    expect(out.status).toBe(0);
    expect(out.stdout).toMatch(/^VM h1: \d+ point\(s\) of 10 s from /);
    expect(out.stdout).toMatch(/TIME\s+STATE\s+CPU\s+MEMORY\s+DISK READ\s+DISK WRITE\s+NET RX\s+NET TX/);
    expect(out.stdout).toMatch(/ (running|crashed) +\d+\.\d%/);
    const hostOut = tv(["host", "--history", "2h", "--json"]);
    expect(hostOut.status).toBe(0);
    expect((JSON.parse(hostOut.stdout) as { step: number }).step).toBe(10);
    expect(tv(["host", "--history", "soon"]).status).not.toBe(0);

    // removing the VM removes its history
    const id = (await c.getVm("h1")).id;
    await c.removeVm("h1");
    expect(await outcome(c.metricsHistory({ vm: "h1" }))).toBe("404 VM_NOT_FOUND");
    const s = new Store(homePaths(d.home).db);
    try {
      expect((s.db.prepare("SELECT count(*) AS n FROM metrics WHERE scope = ?").get(id) as { n: number }).n).toBe(0);
    } finally {
      s.close();
    }
  }, 90_000);

  it("fires and resolves alerts as events: a user rule on a VM's memory, a crash at once", async () => {
    const c = d.client;
    const from = (await c.events({ limit: 1 })).at(-1)?.seq ?? 0;
    expect(await outcome(c.addAlertRule({ name: "vm-crashed", metric: "cpu", above: 1 }))).toBe("400 INVALID_REQUEST");
    expect(await outcome(c.addAlertRule({ name: "x", metric: "cpu", above: 1, vm: "nosuch" }))).toBe("404 VM_NOT_FOUND");
    await c.createVm({ name: "h2", kernel, memoryMiB: 64, rng: false });
    const vm = await c.startVm("h2");
    // a follower started before the rule: it prints what is firing now, then each change
    const follow = spawn(process.execPath, [BIN, "alerts", "-f", "--socket", d.socket], { stdio: ["ignore", "pipe", "pipe"] });
    let followed = "";
    follow.stdout.on("data", (b: Buffer) => (followed += b.toString()));
    // once it has listed (no alerts, or a table), it follows from the event before its listing
    await until("the follower's listing", () => (followed.startsWith("no alerts firing\n") || followed.startsWith("SINCE") ? true : undefined), 20_000);
    const add = tv(["alert", "rule", "add", "big", "--metric", "memory", "--above", "1K", "--for", "2s", "--severity", "critical", "--vm", "h2"]);
    expect(add.stderr).toBe("");
    expect(add.stdout).toBe("alert rule big added\n");
    expect(tv(["alert", "rule", "add", "big", "--metric", "memory", "--above", "1K"]).status).not.toBe(0);
    const ls = tv(["alert", "rule", "ls"]).stdout;
    expect(ls).toMatch(/vm-crashed\s+critical/);
    expect(ls).toMatch(/big\s+critical\s+memory above 1024 for 2s\s+h2/);
    const fired = await until("alert.firing", async () => (await c.events({ after: from })).find((e) => e.type === "alert.firing" && e.data?.["rule"] === "big"), 30_000);
    expect(fired.vm).toBe("h2");
    // (filtered to the VM: a loaded test host may have its own host-memory or pool-disk alert)
    expect((await c.alerts()).filter((a) => a.vm === "h2").map((a) => `${a.rule} ${a.subject} ${a.severity}`)).toEqual(["big vm:h2 critical"]);
    const line = await until("FIRING on alerts -f", () => followed.split("\n").find((l) => / FIRING +critical alert big: VM h2: memory/.test(l)), 20_000);
    expect(line).toMatch(/^\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ {2}FIRING {2}/);
    follow.kill("SIGTERM");
    const out = tv(["alerts"]).stdout;
    expect(out).toMatch(/critical\s+big\s+vm:h2\s+VM h2: memory \d+ bytes above 1024 bytes for 2 s/);

    // the VMM killed: vm-crashed fires at once (the event, not the next sample), and the memory
    // rule resolves (no VMM: nothing is above anything)
    process.kill(vm.pid!, "SIGKILL");
    await until("vm-crashed", async () => (await c.alerts()).find((a) => a.rule === "vm-crashed" && a.vm === "h2"), 10_000);
    await until("big resolved", async () => (await c.events({ after: from })).find((e) => e.type === "alert.resolved" && e.data?.["rule"] === "big"), 30_000);
    // removed: its alerts resolve
    await c.removeVm("h2");
    await until("vm-crashed resolved", async () => (await c.events({ after: from })).find((e) => e.type === "alert.resolved" && e.data?.["rule"] === "vm-crashed" && e.vm === "h2"), 30_000);
    expect((await c.alerts()).filter((a) => a.vm === "h2")).toEqual([]);
    expect(tv(["alert", "rule", "rm", "big"]).stdout).toBe("alert rule big removed\n");

    // the webhook got them, in order, the first after a retry; its status says so
    await until("webhook deliveries", () => (hooked.filter((e) => e.vm === "h2").length >= 4 ? true : undefined), 30_000);
    expect(hooked.filter((e) => e.vm === "h2").map((e) => `${e.type} ${String(e.data?.["rule"])}`)).toEqual([
      "alert.firing big",
      "alert.firing vm-crashed",
      "alert.resolved big",
      "alert.resolved vm-crashed",
    ]);
    const [ws] = await c.alertWebhooks();
    expect(ws).toMatchObject({ url: expect.stringMatching(/^http:\/\/127\.0\.0\.1:\d+\/alerts$/), failedAttempts: 1, givenUp: 0, lastError: { message: "HTTP 500" } });
    expect(ws!.delivered).toBeGreaterThanOrEqual(4);
    expect(await outcome(c.removeAlertRule("big"))).toBe("404 ALERT_RULE_NOT_FOUND");
  }, 90_000);

  it("refuses bad ranges and steps, and answers in at most 2000 points", async () => {
    const c = d.client;
    const now = Date.now();
    expect(await outcome(c.metricsHistory({ step: 60 }))).toBe("400 INVALID_REQUEST");
    expect(await outcome(c.metricsHistory({ from: new Date(now - 86_400_000), step: 10 }))).toBe("400 INVALID_REQUEST");
    expect(await outcome(c.metricsHistory({ from: new Date(now), to: new Date(now - 1000) }))).toBe("400 INVALID_REQUEST");
    const year = await c.metricsHistory({ from: new Date(now - 365 * 86_400_000) });
    expect(year.step).toBe(3600);
    expect(year.points.length).toBeLessThanOrEqual(2000);
  });
});
