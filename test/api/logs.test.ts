/**
 * The daemon's logs against a real daemon and a real VMM running the tiny guest: GET /v1/logs
 * (search and follow), the VMM's log beside the daemon's, what a hostile query gets, the CLI, and
 * forwarding to a syslog receiver (RFC 5424 over UDP) and an OpenTelemetry collector (OTLP/HTTP).
 */
import { createSocket, type Socket as UdpSocket } from "node:dgram";
import { appendFileSync, existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { LogLine } from "../../src/control/logs.js";
import { homePaths } from "../../src/control/paths.js";
import { runCli } from "../helpers/cli.js";
import { startDaemon, until, type TestDaemon } from "../helpers/daemon.js";
import { outcome } from "../helpers/thrown.js";
import { writeTinyKernel } from "../helpers/tiny-kernel.js";
import { unixApi } from "../helpers/unix-api.js";

const hasKvm = existsSync("/dev/kvm");

describe.skipIf(!hasKvm)("logs (real daemon, tiny guest)", () => {
  let d: TestDaemon;
  let dir: string;
  let kernel: string;
  let syslog: UdpSocket;
  const datagrams: string[] = [];
  let collector: Server;
  /** LogRecords the collector received: body and attributes as plain strings. */
  const otlp: { body: string; attrs: Record<string, string> }[] = [];

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "tvlogs-"));
    kernel = join(dir, "tiny.bin");
    writeTinyKernel(kernel);
    syslog = createSocket("udp4");
    syslog.on("message", (b) => datagrams.push(b.toString("utf8")));
    await new Promise<void>((r) => syslog.bind(0, "127.0.0.1", r));
    collector = createServer((req, res) => {
      let b = "";
      req.on("data", (x: Buffer) => (b += x.toString()));
      req.on("end", () => {
        const body = JSON.parse(b) as { resourceLogs: { scopeLogs: { logRecords: { body: { stringValue: string }; attributes: { key: string; value: { stringValue?: string } }[] }[] }[] }[] };
        for (const r of body.resourceLogs[0]!.scopeLogs[0]!.logRecords) otlp.push({ body: r.body.stringValue, attrs: Object.fromEntries(r.attributes.map((a) => [a.key, a.value.stringValue ?? ""])) });
        res.end();
      });
    });
    await new Promise<void>((r) => collector.listen(0, "127.0.0.1", r));
    d = await startDaemon({
      args: ["--force-kvm", "--allow-files", dir, "--log-syslog", `udp://127.0.0.1:${(syslog.address() as AddressInfo).port}`, "--log-otlp", `http://127.0.0.1:${(collector.address() as AddressInfo).port}/v1/logs`],
    });
  }, 30_000);

  afterAll(async () => {
    if (d !== undefined) {
      for (const vm of await d.client.listVms().catch(() => [])) await d.client.removeVm(vm.name, { force: true }).catch(() => undefined);
      await d.stop();
    }
    syslog?.close();
    collector?.close();
    rmSync(dir, { recursive: true, force: true });
  }, 60_000);

  it("keeps the daemon's log in its home and serves a VM's lines with its VMM's log; follow streams new ones", async () => {
    const c = d.client;
    expect(existsSync(homePaths(d.home).daemonLog)).toBe(true);
    expect((await c.logs()).some((l) => l.source === "daemon" && /daemon started/.test(l.msg))).toBe(true);

    await c.createVm({ name: "lg1", kernel, memoryMiB: 64, rng: false });
    await c.createVm({ name: "lg2", kernel, memoryMiB: 64, rng: false });
    const started = await c.startVm("lg1");
    // what the VMM process writes to its stdout and stderr goes to vmm.log (a sandboxed VMM that
    // runs well says nothing there): a line appended as the VMM's output would be
    appendFileSync(join(d.home, "vms", started.id, "vmm.log"), "typevisor: a line from the VMM\n");
    const mine = await until("lg1's lines", async () => {
      const ls = await c.logs({ vm: "lg1" });
      return ls.some((l) => l.source === "vmm") && ls.some((l) => /started|running/.test(l.msg)) ? ls : undefined;
    });
    expect(mine.every((l) => l.vm === "lg1")).toBe(true);
    // the VMM's output, untimed
    expect(mine.find((l) => l.source === "vmm")).toMatchObject({ time: null, vm: "lg1", msg: "typevisor: a line from the VMM" });
    expect((await c.logs({ vm: "lg2" })).some((l) => l.msg.includes("lg1"))).toBe(false);
    // the guest's console, when asked: what the tiny guest printed, untimed, without its CR
    expect(mine.some((l) => l.source === "console")).toBe(false);
    const consoleLines = await until("lg1's console", async () => {
      const ls = await c.logs({ vm: "lg1", sources: ["console"] });
      return ls.some((l) => l.msg === "tiny-guest: up") ? ls : undefined;
    });
    expect(consoleLines.every((l) => l.source === "console" && l.time === null)).toBe(true);
    expect((await c.logs({ contains: "LG2" })).length).toBeGreaterThan(0);
    expect((await c.logs({ level: "error" })).every((l) => l.level === "error" || l.level === "fatal")).toBe(true);
    expect((await c.logs({ since: new Date(Date.now() + 60_000) })).length).toBe(0);
    expect((await c.logs({ limit: 2 })).length).toBe(2);

    // follow: the backlog first, then a line written after the stream opened, within seconds
    const got: LogLine[] = [];
    const stream = c.followLogs({ vm: "lg1", limit: 1 });
    const reading = (async () => {
      for await (const l of stream) {
        got.push(l);
        if (/paused/.test(l.msg)) break;
      }
    })();
    await until("the backlog", () => (got.length >= 1 ? true : undefined));
    await c.pauseVm("lg1");
    await until("the pause, followed", () => (got.some((l) => /paused/.test(l.msg)) ? true : undefined), 10_000);
    await reading;
    expect(got.every((l) => l.vm === "lg1")).toBe(true);
  }, 60_000);

  it("forwards the daemon's log to syslog as RFC 5424 messages, a VM's events with its name in the structured data", async () => {
    await until("the daemon's start and lg1's events at the receiver", () => (datagrams.some((m) => /daemon started/.test(m)) && datagrams.some((m) => /vm="lg1"/.test(m)) ? true : undefined));
    const started = datagrams.find((m) => /daemon started/.test(m))!;
    expect(started).toMatch(/^<30>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \S+ typevisor \d+ daemon\.started \[typevisor@32473 event="daemon\.started"\] daemon started/);
    expect(datagrams.find((m) => / vm\.paused /.test(m))).toMatch(/\[typevisor@32473 vm="lg1" event="vm\.paused"\] VM lg1 paused/);
  });

  it("forwards the daemon's log to an OpenTelemetry collector, a VM's events with their vm and event attributes", async () => {
    await until("lg1's pause at the collector", () => otlp.find((r) => r.attrs["event"] === "vm.paused"), 15_000);
    expect(otlp.find((r) => r.attrs["event"] === "vm.paused")).toEqual({ body: "VM lg1 paused", attrs: expect.objectContaining({ vm: "lg1", event: "vm.paused" }) });
    expect(otlp.some((r) => /daemon started/.test(r.body))).toBe(true);
  });

  it("refuses hostile queries", async () => {
    const api = (method: string, path: string) => unixApi(d.socket, method, path);
    expect((await api("GET", "/v1/logs?contains=" + "x".repeat(201))).status).toBe(400);
    expect((await api("GET", "/v1/logs?vm=../etc")).status).toBe(400);
    expect((await api("GET", "/v1/logs?limit=0")).status).toBe(400);
    expect((await api("GET", "/v1/logs?level=loud")).status).toBe(400);
    expect((await api("GET", "/v1/logs?since=yesterday")).status).toBe(400);
    expect((await api("GET", "/v1/logs?vm=lg1&source=console,secrets")).status).toBe(400);
    expect((await api("GET", "/v1/logs?grep=(a%2B)%2B%24")).status).toBe(400); // no patterns: the daemon runs none
    expect(await outcome(d.client.logs({ vm: "nope" }))).toBe("404 VM_NOT_FOUND");
  });

  it("typevisor logs: a table, --grep, --json, and a bad pattern is a usage error", async () => {
    const table = await runCli(["logs", "--socket", d.socket, "--vm", "lg1", "--grep", "start(ing|ed)"]);
    expect(table.status).toBe(0);
    expect(table.stdout).toMatch(/info\s+daemon\s+lg1\s+VM lg1 start/);
    expect(table.stdout).not.toMatch(/paused/);
    const json = await runCli(["logs", "--socket", d.socket, "--json", "-n", "3"]);
    expect(json.stdout.trim().split("\n").map((l) => (JSON.parse(l) as LogLine).source)).toHaveLength(3);
    const bad = await runCli(["logs", "--socket", d.socket, "--grep", "("]);
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/--grep/);
    const badSyslog = await runCli(["daemon", "--home", dir, "--log-syslog", "http://x"]);
    expect([badSyslog.status, badSyslog.stderr]).toEqual([2, expect.stringMatching(/--log-syslog takes udp:\/\/HOST/)]);
  });
});
