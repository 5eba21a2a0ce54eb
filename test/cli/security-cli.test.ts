/**
 * `typevisor user|token|audit` and the CLI over HTTPS, end to end: a real daemon with an HTTPS
 * listener and its generated certificate, the real CLI from dist/ as root on the unix socket (admin)
 * and as a token holder over HTTPS with the fingerprint pinned.
 */
import { join } from "node:path";
import Database from "better-sqlite3";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runCli, type Run } from "../helpers/cli.js";
import { startDaemon, tcpPort, type TestDaemon } from "../helpers/daemon.js";

const isRoot = process.getuid?.() === 0;


describe.skipIf(!isRoot)("typevisor user/token/audit and HTTPS", () => {
  let d: TestDaemon;
  let port: number;

  function tv(args: string[], opts: { input?: string; env?: Record<string, string>; home?: boolean } = {}): Promise<Run> {
    return runCli([...args, ...(opts.home === false ? [] : ["--home", d.home])], { ...(opts.env !== undefined ? { env: opts.env } : {}), ...(opts.input !== undefined ? { input: opts.input } : {}) });
  }

  beforeAll(async () => {
    d = await startDaemon({ args: ["--listen", "127.0.0.1:0"] });
    port = await tcpPort(d);
  }, 30_000);

  afterAll(async () => {
    await d?.stop();
  });

  it("adds, lists, shows and removes users; keeps the last admin", async () => {
    expect(await tv(["user", "add", "ann", "--role", "admin"])).toMatchObject({ status: 0, stdout: "ann: added (admin)\n" });
    expect(await tv(["user", "add", "vic", "--role", "viewer", "--scope", "vm:web", "--password-stdin"], { input: "a good password\n" })).toMatchObject({ status: 0, stdout: "vic: added (viewer, vm:web)\n" });
    const ls = await tv(["user", "ls"]);
    expect(ls.stdout).toMatch(/^NAME\s+ROLE\s+SCOPES\s+PASSWORD\s+MFA\s+TOKENS\s+CREATED\n/);
    expect(ls.stdout).toMatch(/\nann\s+admin\s+all VMs\s+-\s+off\s+0 /);
    expect(ls.stdout).toMatch(/\nvic\s+viewer\s+vm:web\s+set\s+off\s+0 /);
    expect(await tv(["user", "add", "x", "--role", "king"])).toMatchObject({ status: 2 });
    expect(await tv(["user", "add", "vic", "--role", "viewer"])).toMatchObject({ status: 4 });
    const last = await tv(["user", "rm", "ann"]);
    expect(last.status).toBe(4);
    expect(last.stderr).toContain("LAST_ADMIN");
    expect(await tv(["user", "passwd", "vic", "--password-stdin"], { input: "another good one" })).toMatchObject({ status: 0 });
    expect((await tv(["user", "show", "vic"])).stdout).toMatch(/role:\s+viewer/);
    expect(await tv(["user", "show", "nosuch"])).toMatchObject({ status: 3 });
  });

  it("creates a token shown once, and the CLI works over HTTPS with the pinned fingerprint", async () => {
    await tv(["user", "add", "opal", "--role", "operator"]);
    const created = await tv(["token", "create", "--user", "opal", "--expires", "12h"]);
    expect(created.status).toBe(0);
    const token = created.stdout.trim();
    expect(token).toMatch(/^tvt_[0-9a-f]{12}_[A-Za-z0-9_-]{43}$/);
    expect(created.stderr).toMatch(/shown only now/);
    const host = await tv(["host"]);
    const fp = /https:\s+certificate SHA-256 ([0-9A-F:]{95})/.exec(host.stdout)?.[1];
    expect(fp).toBeDefined();
    expect(d.log()).toContain(fp!);
    const over = ["--host", `127.0.0.1:${port}`];
    expect(await tv(["vm", "ls", ...over], { home: false, env: { TYPEVISOR_TOKEN: token, TYPEVISOR_FINGERPRINT: fp! } })).toMatchObject({ status: 0, stdout: expect.stringMatching(/^no VMs/) });
    expect(await tv(["vm", "ls", ...over, "--fingerprint", fp!.replace(/:/g, "").toLowerCase()], { home: false, env: { TYPEVISOR_TOKEN: token } })).toMatchObject({ status: 0 });
    // without a token: 401, exit 6
    const anon = await tv(["vm", "ls", ...over, "--fingerprint", fp!], { home: false });
    expect(anon.status).toBe(6);
    expect(anon.stderr).toContain("UNAUTHENTICATED");
    // another certificate: refused before anything is sent
    const wrong = await tv(["vm", "ls", ...over, "--fingerprint", "AB".repeat(32)], { home: false, env: { TYPEVISOR_TOKEN: token } });
    expect(wrong.status).toBe(6);
    expect(wrong.stderr).toContain("TLS_FINGERPRINT");
    // an operator may not manage users: 403 naming the permission
    const denied = await tv(["user", "ls", ...over, "--fingerprint", fp!], { home: false, env: { TYPEVISOR_TOKEN: token } });
    expect(denied.status).toBe(6);
    expect(denied.stderr).toContain("users:admin");
    // its own tokens it may list and revoke
    const ls = await tv(["token", "ls", ...over, "--fingerprint", fp!], { home: false, env: { TYPEVISOR_TOKEN: token } });
    expect(ls.stdout).toMatch(/\n[0-9a-f]{12}\s+api\s+opal\s+operator\s+all VMs\s+.*active\n/);
    const id = token.slice(4, 16);
    expect(await tv(["token", "revoke", id])).toMatchObject({ status: 0, stdout: `${id}: revoked\n` });
    expect((await tv(["vm", "ls", ...over, "--fingerprint", fp!], { home: false, env: { TYPEVISOR_TOKEN: token } })).status).toBe(6);
    expect((await tv(["token", "ls", "--user", "opal"])).stdout).toMatch(/revoked/);
  });

  it("lists the audit log and finds a modified entry", async () => {
    const ls = await tv(["audit", "ls", "--user", "root"]);
    expect(ls.stdout).toMatch(/POST \/v1\/users\s+ann\s+201/);
    const json = await tv(["audit", "ls", "--json"]);
    const entries = json.stdout.trim().split("\n").map((l) => JSON.parse(l) as { seq: number; action: string });
    expect(entries.some((e) => e.action === "auth.token")).toBe(true);
    expect(await tv(["audit", "verify"])).toMatchObject({ status: 0, stdout: expect.stringMatching(/^audit log intact: \d+ entries\n$/) });
    const db = new Database(join(d.home, "typevisor.db"));
    db.exec("DROP TRIGGER audit_no_update");
    db.prepare("UPDATE audit SET user = 'someone-else' WHERE seq = 2").run();
    db.close();
    const v = await tv(["audit", "verify"]);
    expect(v.status).toBe(1);
    expect(v.stdout).toContain("audit log BROKEN at entry 2: entry 2 was modified");
  });
});
