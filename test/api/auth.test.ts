/**
 * The one gate (docs/security.md) against a real daemon: every route of the table, the console
 * attach, the event and console streams, /metrics and /openapi.json answer 401 without credentials;
 * roles and VM scopes (403 naming the permission, 404 outside a scope); expired and revoked tokens;
 * SO_PEERCRED on the unix socket (root is admin; a member of the socket group is the inventory user
 * of its login name, checked with a real process running as `nobody`); HTTPS only on TCP with a
 * generated certificate, pinned by fingerprint or trusted as a CA; the audit log of all of it.
 */
import { spawnSync } from "node:child_process";
import { chmodSync, existsSync, mkdtempSync, readFileSync, statSync } from "node:fs";
import { request as httpRequest } from "node:http";
import { request as httpsRequest } from "node:https";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect as tlsConnect, type ConnectionOptions } from "node:tls";
import Database from "better-sqlite3";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ApiError, TypevisorClient } from "../../src/api/client.js";
import { FREE_FAILURES } from "../../src/api/auth.js";
import { allGuards } from "../../src/api/server.js";
import { API_ROUTES } from "../../src/api/table.js";
import { PERMISSIONS } from "../../src/control/identity.js";
import { startDaemon, tcpPort, type TestDaemon } from "../helpers/daemon.js";
import { prng } from "../helpers/prng.js";
import { writeTinyKernel } from "../helpers/tiny-kernel.js";

const hasKvm = existsSync("/dev/kvm");
const isRoot = process.getuid?.() === 0;

interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

/** One HTTPS request to 127.0.0.1:port (certificate not checked: these tests are about the gate). */
function https(port: number, method: string, path: string, opts: { token?: string; body?: unknown; headers?: Record<string, string> } = {}): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const text = opts.body !== undefined ? JSON.stringify(opts.body) : undefined;
    const req = httpsRequest(
      {
        host: "127.0.0.1",
        port,
        method,
        path,
        rejectUnauthorized: false,
        agent: false,
        headers: { ...(opts.token !== undefined ? { authorization: `Bearer ${opts.token}` } : {}), ...(text !== undefined ? { "content-type": "application/json" } : {}), ...opts.headers },
      },
      (res) => {
        let body = "";
        res.on("data", (d: Buffer) => (body += d.toString()));
        res.on("end", () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
        // streams that were let through would never end: the status is what we want
        if ((res.statusCode ?? 0) < 300) setTimeout(() => res.destroy(), 300);
        res.on("close", () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
      },
    );
    req.on("upgrade", (res, socket) => {
      socket.destroy();
      resolve({ status: res.statusCode ?? 0, headers: res.headers, body: "" });
    });
    req.on("error", reject);
    req.end(text);
  });
}

async function status(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return "ok";
  } catch (e) {
    if (e instanceof ApiError) return `${e.status} ${e.code}`;
    throw e;
  }
}

function pathOf(url: string): string {
  return url.replace(":name", "vm-a").replace(":user", "alice").replace(":id", "0123456789ab").replace(":disk", "disk1");
}

describe("the route table", () => {
  it("declares a known permission on every route, the ones outside the table included", () => {
    const guards = allGuards();
    expect(guards.length).toBe(API_ROUTES.length + 3 + 3); // /openapi.json, /metrics, the attach; the web console's files, its root and console WebSocket
    for (const g of guards) expect(PERMISSIONS, `${g.method} ${g.url}`).toContain(g.permission);
    // a route acting on a named VM says where the name is, so the gate can check the caller's scope
    for (const g of guards) if (g.url.startsWith("/v1/vms/:name")) expect(g.target, `${g.method} ${g.url}`).toBe("path");
  });
});

describe.skipIf(!hasKvm || !isRoot)("the gate, against a real daemon", () => {
  let d: TestDaemon;
  let port: number;
  let kernel: string;
  const tokens: Record<string, { id: string; token: string }> = {};

  beforeAll(async () => {
    const dir = mkdtempSync(join(tmpdir(), "tva-"));
    kernel = join(dir, "tiny.bin");
    writeTinyKernel(kernel);
    d = await startDaemon({ args: ["--force-kvm", "--allow-files", dir, "--listen", "127.0.0.1:0"] });
    port = await tcpPort(d);
    // root on the unix socket is admin: it sets up users and VMs
    await d.client.createVm({ name: "vm-a", kernel, memoryMiB: 64, rng: false }, { start: true });
    await d.client.createVm({ name: "vm-b", kernel, memoryMiB: 64, rng: false });
    await d.client.addUser({ name: "admin1", role: "admin" });
    await d.client.addUser({ name: "alice", role: "viewer", password: "correct horse" });
    await d.client.addUser({ name: "bob", role: "operator" });
    await d.client.addUser({ name: "carol", role: "operator", scopes: ["vm:vm-a"] });
    for (const u of ["admin1", "alice", "bob", "carol"]) tokens[u] = await d.client.createToken({ user: u });
  }, 60_000);

  afterAll(async () => {
    if (d === undefined) return;
    for (const vm of await d.client.listVms().catch(() => [])) await d.client.removeVm(vm.name, { force: true }).catch(() => undefined);
    await d.stop();
  });

  it("answers 401 with WWW-Authenticate: Bearer on every route without credentials, streams and console attach included", async () => {
    const tried: string[] = [];
    for (const g of allGuards()) {
      // without credentials: how they are obtained (test/api/login.test.ts), and the web console's files, which hold no data (test/web)
      if (g.public === true) {
        expect(["POST /v1/login", "GET /ui/*", "GET /"]).toContain(`${g.method} ${g.url}`);
        if (g.url === "/v1/login") expect((await https(port, g.method, g.url)).status).toBe(400);
        continue;
      }
      const path = pathOf(g.url);
      const variants = g.url === "/v1/events" ? [path, `${path}?follow=true`] : g.url.endsWith("/console") ? [path, `${path}?follow=true`] : [path];
      for (const p of variants) {
        const upgrade: Record<string, string> | undefined = g.url.endsWith("/attach") ? { connection: "Upgrade", upgrade: "tcp" } : g.url.endsWith("/console/ws") ? { connection: "Upgrade", upgrade: "websocket", "sec-websocket-version": "13", "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==" } : undefined;
        const a = await https(port, g.method, p, upgrade !== undefined ? { headers: upgrade } : {});
        expect(a.status, `${g.method} ${p}`).toBe(401);
        expect(a.headers["www-authenticate"], `${g.method} ${p}`).toMatch(/^Bearer realm="typevisor"/);
        expect(a.headers["content-type"], `${g.method} ${p}`).toMatch(/application\/problem\+json/);
        tried.push(`${g.method} ${p}`);
      }
    }
    // unknown paths too: nothing beside the gate
    expect((await https(port, "GET", "/nowhere")).status).toBe(401);
    expect(tried.length).toBeGreaterThan(API_ROUTES.length);
  });

  it("lets a token through, as the role and scope of its user", async () => {
    const alice = new TypevisorClient({ host: "127.0.0.1", port, fingerprint: (await d.client.host()).tls!.fingerprint }, { token: tokens["alice"]!.token });
    expect((await alice.listVms()).map((v) => v.name)).toEqual(["vm-a", "vm-b"]);
    expect((await alice.health()).ok).toBe(true);
    expect(await alice.metrics()).toContain("typevisor_vm_state");
    expect((await alice.console("vm-a")).length).toBeGreaterThanOrEqual(0);
  });

  it("refuses a viewer's lifecycle action and console input with 403 naming the permission", async () => {
    const t = tokens["alice"]!.token;
    const start = await https(port, "POST", "/v1/vms/vm-b/start", { token: t });
    expect(start.status).toBe(403);
    expect(JSON.parse(start.body).detail).toMatch(/lacks the permission vm:lifecycle/);
    const attach = await https(port, "GET", "/v1/vms/vm-a/console/attach", { token: t, headers: { connection: "Upgrade", upgrade: "tcp" } });
    expect(attach.status).toBe(403);
    expect(attach.body).toMatch(/vm:console-input/);
    expect((await https(port, "POST", "/v1/users", { token: t, body: { name: "eve", role: "admin" } })).body).toMatch(/users:admin/);
    expect((await https(port, "GET", "/v1/audit", { token: t })).body).toMatch(/audit:read/);
    // an operator may
    const bob = await https(port, "POST", "/v1/vms/vm-a/pause", { token: tokens["bob"]!.token });
    expect(bob.status).toBe(200);
    expect((await https(port, "POST", "/v1/vms/vm-a/resume", { token: tokens["bob"]!.token })).status).toBe(200);
    const attached = await https(port, "GET", "/v1/vms/vm-a/console/attach", { token: tokens["bob"]!.token, headers: { connection: "Upgrade", upgrade: "tcp" } });
    expect(attached.status).toBe(101);
  });

  it("shows a scoped operator its VMs only, and acts on them only", async () => {
    const t = tokens["carol"]!.token;
    expect(JSON.parse((await https(port, "GET", "/v1/vms", { token: t })).body).vms.map((v: { name: string }) => v.name)).toEqual(["vm-a"]);
    expect((await https(port, "GET", "/v1/vms/vm-a", { token: t })).status).toBe(200);
    // another VM is as absent as one that does not exist
    const other = await https(port, "GET", "/v1/vms/vm-b", { token: t });
    expect(other.status).toBe(404);
    expect(JSON.parse(other.body).code).toBe("VM_NOT_FOUND");
    expect((await https(port, "POST", "/v1/vms/vm-b/start", { token: t })).status).toBe(404);
    expect((await https(port, "DELETE", "/v1/vms/vm-b", { token: t })).status).toBe(404);
    expect((await https(port, "POST", "/v1/vms", { token: t, body: { name: "vm-c", kernel, memoryMiB: 64 } })).status).toBe(403);
    expect((await https(port, "GET", "/v1/events", { token: t })).status).toBe(403);
    expect((await https(port, "GET", "/v1/events?vm=vm-b", { token: t })).status).toBe(404);
    const mine = JSON.parse((await https(port, "GET", "/v1/events?vm=vm-a", { token: t })).body).events as { vm?: string }[];
    expect(mine.length).toBeGreaterThan(0);
    expect(mine.every((e) => e.vm === "vm-a")).toBe(true);
    expect((await https(port, "GET", "/metrics", { token: t })).status).toBe(403);
    expect((await https(port, "POST", "/v1/vms/vm-a/reboot", { token: t })).status).toBe(200);
    // its own tokens stay within its rights
    expect((await https(port, "POST", "/v1/tokens", { token: t, body: { user: "carol", scopes: ["vm:vm-b"] } })).status).toBe(403);
    expect((await https(port, "POST", "/v1/tokens", { token: t, body: { user: "carol", role: "admin", scopes: ["vm:vm-a"] } })).status).toBe(403);
    expect((await https(port, "POST", "/v1/tokens", { token: t, body: { user: "bob" } })).status).toBe(403);
    const own = await https(port, "POST", "/v1/tokens", { token: t, body: { user: "carol", role: "viewer", scopes: ["vm:vm-a"], expires: "1h" } });
    expect(own.status).toBe(201);
    expect((await https(port, "POST", "/v1/vms/vm-a/pause", { token: JSON.parse(own.body).token })).status).toBe(403);
  });

  it("refuses expired and revoked tokens, and tokens of a removed user", async () => {
    const t = await d.client.createToken({ user: "bob", expires: "90m" });
    expect((await https(port, "GET", "/v1/vms", { token: t.token })).status).toBe(200);
    // an hour and a half is too long to wait: the inventory says when it expires
    const db = new Database(join(d.home, "typevisor.db"));
    db.prepare("UPDATE tokens SET expires_at = ? WHERE id = ?").run(new Date(Date.now() - 1000).toISOString(), t.id);
    db.close();
    const expired = await https(port, "GET", "/v1/vms", { token: t.token });
    expect(expired.status).toBe(401);
    expect(expired.headers["www-authenticate"]).toMatch(/error="invalid_token"/);
    const r = await d.client.createToken({ user: "bob" });
    await d.client.revokeToken(r.id);
    expect((await https(port, "GET", "/v1/vms", { token: r.token })).status).toBe(401);
    // the secret alone matters: the right id with another secret is refused
    expect((await https(port, "GET", "/v1/vms", { token: `${tokens["bob"]!.token.slice(0, -4)}AAAA` })).status).toBe(401);
    await d.client.addUser({ name: "dave", role: "viewer" });
    const dt = await d.client.createToken({ user: "dave" });
    await d.client.removeUser("dave");
    expect((await https(port, "GET", "/v1/vms", { token: dt.token })).status).toBe(401);
    // four failures from this address: it is locked out for a second (rate limiting has its own test)
    await new Promise((res) => setTimeout(res, 1100));
    expect(await status(d.client.removeUser("admin1"))).toBe("409 LAST_ADMIN");
    expect(await status(d.client.addUser({ name: "alice", role: "viewer" }))).toBe("409 USER_EXISTS");
  });

  it("records changes, console attaches, refusals and failed tokens in a chain that verifies", async () => {
    const entries = await d.client.audit({ limit: 10000 });
    const has = (f: (e: (typeof entries)[number]) => boolean, what: string): void => expect(entries.some(f), what).toBe(true);
    has((e) => e.action === "POST /v1/users" && e.user === "root" && e.peer === "uid 0" && e.target === "alice" && e.result === "201", "user added by root");
    has((e) => e.action === "POST /v1/vms/:name/start" && e.user === "alice" && e.result === "refused" && e.detail === "missing vm:lifecycle" && e.token === tokens["alice"]!.id, "viewer refused");
    has((e) => e.action === "console.attach" && e.user === "bob" && e.target === "vm-a" && e.result === "ok", "console attach");
    has((e) => e.action === "auth.token" && e.result === "refused" && e.peer === "127.0.0.1" && /expired/.test(e.detail ?? ""), "expired token");
    has((e) => e.action === "auth.token" && /revoked/.test(e.detail ?? ""), "revoked token");
    has((e) => e.action === "POST /v1/vms/:name/pause" && e.user === "bob" && e.result === "200" && e.target === "vm-a", "an operator's action");
    has((e) => e.user === "carol" && e.target === "vm-b" && e.result === "refused", "out of scope");
    // nothing secret: no token, no password
    const all = JSON.stringify(entries);
    for (const t of Object.values(tokens)) expect(all).not.toContain(t.token.slice(17));
    expect(all).not.toContain("correct horse");
    expect(await d.client.verifyAudit()).toMatchObject({ ok: true });
  });

  it("serves only HTTPS on TCP, with a generated certificate whose key is owner-only", async () => {
    const certPath = join(d.home, "tls", "cert.pem");
    expect(statSync(join(d.home, "tls", "key.pem")).mode & 0o777).toBe(0o600);
    const host = await d.client.host();
    expect(d.log()).toContain(host.tls!.fingerprint);
    // plain HTTP gets no HTTP answer
    const plain = await new Promise<string>((resolve) => {
      const req = httpRequest({ host: "127.0.0.1", port, path: "/v1/health", agent: false }, (res) => resolve(`HTTP ${res.statusCode}`));
      req.on("error", (e) => resolve(`error ${(e as NodeJS.ErrnoException).code ?? e.message}`));
      req.end();
    });
    expect(plain).toMatch(/^error /);
    // pinned: a wrong fingerprint is refused before the token leaves
    const wrong = new TypevisorClient({ host: "127.0.0.1", port, fingerprint: "00".repeat(32) }, { token: tokens["alice"]!.token });
    expect(await status(wrong.health()).catch((e: Error & { code?: string }) => e.code)).toBe("TLS_FINGERPRINT");
    // the certificate as a CA: verified chain and address
    const ca = new TypevisorClient({ host: "127.0.0.1", port, ca: readFileSync(certPath, "utf8") }, { token: tokens["alice"]!.token });
    expect((await ca.health()).ok).toBe(true);
    // no pin and no CA: the system's CAs do not know it
    const unpinned = new TypevisorClient({ host: "127.0.0.1", port }, { token: tokens["alice"]!.token });
    expect(await status(unpinned.health()).catch((e: Error & { code?: string }) => e.code)).toBe("DAEMON_UNREACHABLE");
  });
});

describe.skipIf(!isRoot)("the unix socket with a socket group (SO_PEERCRED)", () => {
  let d: TestDaemon;
  let sock: string;

  /** GET or POST as another uid/gid, from a real process: what the kernel reports of it is what is tested. */
  function as(uid: number, gid: number, method: string, path: string): { status: number; body: string } {
    const script = `const r=require("http").request({socketPath:${JSON.stringify(sock)},method:${JSON.stringify(method)},path:${JSON.stringify(path)}},(res)=>{let b="";res.on("data",(d)=>b+=d);res.on("end",()=>{process.stdout.write(JSON.stringify({status:res.statusCode,body:b}))})});r.on("error",(e)=>process.stdout.write(JSON.stringify({status:0,body:e.code})));r.end();`;
    const out = spawnSync(process.execPath, ["-e", script], { uid, gid, cwd: "/", encoding: "utf8", timeout: 20_000 });
    if (out.status !== 0) throw new Error(`child failed: ${out.stderr}`);
    return JSON.parse(out.stdout) as { status: number; body: string };
  }

  beforeAll(async () => {
    const dir = mkdtempSync(join(tmpdir(), "tvg-"));
    chmodSync(dir, 0o755);
    sock = join(dir, "tv.sock");
    // nogroup (65534) stands in for the typevisor group; nobody (65534) is its member by primary gid
    d = await startDaemon({ socket: sock, args: ["--socket-group", "nogroup"] });
  }, 30_000);

  afterAll(async () => {
    await d?.stop();
  });

  it("is open to root and the group only, mode 0660", () => {
    const st = statSync(sock);
    expect(st.mode & 0o777).toBe(0o660);
    expect(st.gid).toBe(65534);
    // a uid outside the group cannot even connect
    expect(as(65534, 1, "GET", "/v1/vms")).toEqual({ status: 0, body: "EACCES" });
  });

  it("maps a group member to the inventory user of its login name, with that user's role", async () => {
    const before = as(65534, 65534, "GET", "/v1/vms");
    expect(before.status).toBe(403);
    expect(JSON.parse(before.body).detail).toMatch(/nobody is not a typevisor user/);
    const client = new TypevisorClient({ socketPath: sock });
    await client.addUser({ name: "nobody", role: "viewer" });
    expect(as(65534, 65534, "GET", "/v1/vms").status).toBe(200);
    const start = as(65534, 65534, "POST", "/v1/vms/x/start");
    expect(start.status).toBe(403);
    expect(JSON.parse(start.body).detail).toMatch(/nobody \(role viewer\) lacks the permission vm:lifecycle/);
    // root stays admin
    expect((await client.listUsers()).map((u) => u.name)).toEqual(["nobody"]);
    const audit = await client.audit();
    expect(audit.some((e) => e.peer === "uid 65534" && e.user === "nobody" && e.result === "refused" && e.detail === "missing vm:lifecycle")).toBe(true);
    expect(audit.some((e) => e.peer === "uid 65534" && e.detail === "no inventory user of that name")).toBe(true);
  });
});

/** One raw request over TLS from `localAddress` (any 127.x.y.z: each is its own client to the throttle); the status line's code. */
function rawTls(port: number, localAddress: string, head: Buffer): Promise<number> {
  return new Promise((resolve) => {
    let got = "";
    // localAddress is net.connect's option, which tls.connect passes on (its type leaves it out)
    const s = tlsConnect({ host: "127.0.0.1", port, localAddress, rejectUnauthorized: false } as ConnectionOptions, () => s.write(head));
    const t = setTimeout(() => s.destroy(), 3000);
    s.on("data", (d: Buffer) => {
      got += d.toString("latin1");
      const m = /^HTTP\/1\.[01] (\d{3})/.exec(got);
      if (m !== null) {
        clearTimeout(t);
        s.destroy();
        resolve(Number(m[1]));
      }
    });
    s.on("error", () => undefined);
    s.on("close", () => {
      clearTimeout(t);
      resolve(0);
    });
  });
}

describe.skipIf(!isRoot)("failed authentication, rate-limited and fuzzed", () => {
  let d: TestDaemon;
  let port: number;
  let good: string;

  beforeAll(async () => {
    d = await startDaemon({ args: ["--listen", "127.0.0.1:0"] });
    port = await tcpPort(d);
    await d.client.addUser({ name: "ops", role: "operator" });
    good = (await d.client.createToken({ user: "ops" })).token;
  }, 30_000);

  afterAll(async () => {
    await d?.stop();
  });

  it("locks an address out with growing delays (429, Retry-After), even for a good token, and lets it in after", async () => {
    const bad = `tvt_000000000000_${"A".repeat(43)}`;
    for (let i = 0; i < FREE_FAILURES + 1; i++) expect((await https(port, "GET", "/v1/vms", { token: bad })).status).toBe(401);
    const locked = await https(port, "GET", "/v1/vms", { token: good });
    expect(locked.status).toBe(429);
    expect(locked.headers["retry-after"]).toBe("1");
    // no credentials is no attempt: still a plain 401
    expect((await https(port, "GET", "/v1/vms")).status).toBe(401);
    await new Promise((r) => setTimeout(r, 1100));
    expect((await https(port, "GET", "/v1/vms", { token: bad })).status).toBe(401);
    const longer = await https(port, "GET", "/v1/vms", { token: good });
    expect(longer.status).toBe(429);
    expect(longer.headers["retry-after"]).toBe("2");
    await new Promise((r) => setTimeout(r, 2100));
    expect((await https(port, "GET", "/v1/vms", { token: good })).status).toBe(200);
    // a success forgives: the next failure is a free one again
    expect((await https(port, "GET", "/v1/vms", { token: bad })).status).toBe(401);
    expect((await https(port, "GET", "/v1/vms", { token: good })).status).toBe(200);
    const audit = await d.client.audit();
    expect(audit.filter((e) => e.action === "auth.lockout" && e.peer === "127.0.0.1").map((e) => e.detail)).toEqual(["1 s after repeated failures", "2 s after repeated failures"]);
  }, 30_000);

  it("never answers 5xx to malformed or huge Authorization headers, on any route", async () => {
    const seed = Number(process.env["TYPEVISOR_FUZZ_SEED"] ?? Date.now() % 2 ** 31);
    const rnd = prng(seed);
    const pick = <T,>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!;
    const chars = (n: number, alphabet: string): string => Array.from({ length: n }, () => alphabet[Math.floor(rnd() * alphabet.length)]).join("");
    const b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    const values = [
      () => "",
      () => "Bearer",
      () => "Bearer ",
      () => `Bearer ${chars(Math.floor(rnd() * 12_000), b64 + "+/=.~")}`,
      () => `Bearer tvt_${chars(12, "0123456789abcdef")}_${chars(43, b64)}`,
      () => `Bearer ${good.slice(0, Math.floor(rnd() * good.length))}`,
      () => `Bearer ${good}${chars(1 + Math.floor(rnd() * 5), b64)}`,
      () => `Bearer ${good.slice(0, 20)}${chars(good.length - 20, b64)}`,
      () => `${pick(["bearer", "BEARER", "Basic", "Digest", "Negotiate", "Token", "Bearer\t", "Bearer:"])} ${chars(Math.floor(rnd() * 80), b64)}`,
      () => Buffer.from(Array.from({ length: Math.floor(rnd() * 200) }, () => 0x20 + Math.floor(rnd() * 224))).toString("latin1"),
      () => `Bearer ${"A".repeat(17_000)}`,
      () => `Bearer ${good}\r\nAuthorization: Bearer ${chars(43, b64)}`,
      () => `Bearer ${good}, Bearer ${good}`,
    ];
    const routes = allGuards();
    const byStatus = new Map<number, number>();
    const bad: string[] = [];
    let n = 0;
    const worker = async (): Promise<void> => {
      while (n < 1500) {
        const i = n++;
        const g = pick(routes);
        const value = pick(values)();
        const extra = g.url.endsWith("/attach") ? "Connection: Upgrade\r\nUpgrade: tcp\r\n" : "Connection: close\r\n";
        const head = Buffer.from(`${g.method} ${pathOf(g.url)} HTTP/1.1\r\nHost: x\r\nAuthorization: ${value}\r\n${extra}Content-Length: 0\r\n\r\n`, "latin1");
        const from = `127.${1 + (i % 200)}.${Math.floor(i / 200)}.${1 + Math.floor(rnd() * 250)}`;
        const s = await rawTls(port, from, head);
        byStatus.set(s, (byStatus.get(s) ?? 0) + 1);
        if (s >= 500 && bad.length < 10) bad.push(`${s}: ${JSON.stringify(value.slice(0, 200))} on ${g.method} ${g.url}`);
      }
    };
    await Promise.all(Array.from({ length: 8 }, worker));
    const summary = `seed ${seed}: by status ${JSON.stringify(Object.fromEntries([...byStatus].sort((a, b) => a[0] - b[0])))}`;
    console.log(summary);
    expect(bad, summary).toEqual([]);
    expect(byStatus.get(401) ?? 0).toBeGreaterThan(0);
    expect(d.proc.exitCode).toBeNull();
    expect(d.log()).not.toContain("last-resort handler caught");
    expect((await d.client.health()).pid).toBe(d.proc.pid);
  }, 300_000);
});
