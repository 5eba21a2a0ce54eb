/**
 * The console WebSocket (GET /v1/vms/NAME/console/ws, docs/web.md) with a plain WebSocket client and
 * bearer tokens, against a real daemon over HTTPS and the tiny guest (it echoes its serial input):
 * bytes both ways, a viewer's keystrokes dropped by the daemon, oversized messages, and the answers
 * for VMs that are stopped, unknown, malformed or outside a scoped caller's VMs.
 */
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { WebSocket } from "ws";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startDaemon, tcpPort, until, type TestDaemon } from "../helpers/daemon.js";
import { writeTinyKernel } from "../helpers/tiny-kernel.js";

const ready = existsSync("/dev/kvm") && process.getuid?.() === 0;

describe.skipIf(!ready)("console WebSocket (real daemon, tiny guest)", () => {
  let d: TestDaemon;
  let dir: string;
  let port: number;
  const tokens: Record<string, string> = {};

  /** Open the console of `vm` as `user`: the socket once open, or the HTTP status it was refused with. */
  function open(vm: string, user: string, headers: Record<string, string> = {}): Promise<WebSocket | number> {
    return new Promise((resolve) => {
      const ws = new WebSocket(`wss://127.0.0.1:${port}/v1/vms/${vm}/console/ws`, { rejectUnauthorized: false, headers: { authorization: `Bearer ${tokens[user]!}`, ...headers } });
      ws.on("open", () => resolve(ws));
      ws.on("unexpected-response", (_req, res) => resolve(res.statusCode ?? 0));
      ws.on("error", () => resolve(-1));
    });
  }

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "tvws-"));
    const kernel = join(dir, "tiny.bin");
    writeTinyKernel(kernel);
    // --stop-vms-on-exit: the last test stops the daemon with a VM running.
    d = await startDaemon({ args: ["--listen", "127.0.0.1:0", "--force-kvm", "--allow-files", dir, "--stop-vms-on-exit"] });
    port = await tcpPort(d);
    await d.client.createVm({ name: "ws1", kernel, memoryMiB: 64, rng: false }, { start: true });
    await d.client.createVm({ name: "ws2", kernel, memoryMiB: 64, rng: false });
    await d.client.addUser({ name: "op", role: "operator" });
    await d.client.addUser({ name: "view", role: "viewer" });
    await d.client.addUser({ name: "scoped", role: "operator", scopes: ["vm:ws2"] });
    for (const u of ["op", "view", "scoped"]) tokens[u] = (await d.client.createToken({ user: u })).token;
  }, 60_000);

  afterAll(async () => {
    if (d !== undefined) {
      for (const vm of await d.client.listVms().catch(() => [])) await d.client.removeVm(vm.name, { force: true }).catch(() => undefined);
      await d.stop();
    }
    rmSync(dir, { recursive: true, force: true });
  }, 60_000);

  it("carries bytes both ways for an operator; a viewer watches and what it types is dropped", async () => {
    const op = await open("ws1", "op");
    const view = await open("ws1", "view");
    if (typeof op === "number" || typeof view === "number") throw new Error(`refused: ${String(op)} ${String(view)}`);
    let seenByOp = "";
    let seenByView = "";
    op.on("message", (b: Buffer) => (seenByOp += b.toString()));
    view.on("message", (b: Buffer) => (seenByView += b.toString()));
    view.send(Buffer.from("from-the-viewer"));
    op.send(Buffer.from("from-the-operator"));
    await until("the echo, seen by both", () => (seenByOp.includes("from-the-operator") && seenByView.includes("from-the-operator") ? true : undefined));
    await new Promise((r) => setTimeout(r, 300));
    expect(seenByOp + seenByView).not.toContain("from-the-viewer");
    // each connection is in the audit log, with what it may do
    const audit = (await d.client.audit({ vm: "ws1" })).filter((e) => e.action === "console.ws");
    expect(audit.map((e) => [e.user, e.detail])).toEqual(expect.arrayContaining([["op", "read-write"], ["view", "read-only"]]));
    view.close();

    // a message over 64 KiB closes that connection (1009, RFC 6455 §7.4.1), nothing else
    const closed = new Promise<number>((r) => op.once("close", (code) => r(code)));
    op.send(Buffer.alloc(65 * 1024, 0x41));
    expect(await closed).toBe(1009);
    expect((await d.client.getVm("ws1")).state).toBe("running");
    const again = await open("ws1", "op");
    expect(typeof again).not.toBe("number");
    (again as WebSocket).close();
  });

  it("answers 409 for a VM that does not run, 404 for an unknown one or one outside the caller's VMs, 400 for a malformed name, 403 for another origin", async () => {
    expect(await open("ws2", "op")).toBe(409);
    expect(await open("nope", "op")).toBe(404);
    expect(await open("ws1", "scoped")).toBe(404);
    expect(await open("Bad%20Name", "op")).toBe(400);
    expect(await open("%E0%A4%A", "op")).toBe(400);
    expect(await open("ws1", "op", { origin: "https://elsewhere.example" })).toBe(403);
    const same = await open("ws1", "op", { origin: `https://127.0.0.1:${port}` });
    expect(same).toBeInstanceOf(WebSocket);
    (same as WebSocket).close();
  });

  // Last: it stops the daemon.
  it("stops with a console attached and a console WebSocket open: both are cut and the daemon exits 0", async () => {
    const ws = await open("ws1", "op");
    if (typeof ws === "number") throw new Error(`refused: ${ws}`);
    const wsClosed = new Promise<void>((r) => ws.once("close", () => r()));
    const con = await d.client.attachConsole("ws1");
    const conClosed = new Promise<void>((r) => con.once("close", () => r()));
    expect(await d.stop()).toBe(0);
    await Promise.all([wsClosed, conClosed]);
  }, 60_000);
});
