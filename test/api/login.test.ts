/**
 * Interactive login with MFA (docs/security.md) against a real daemon over HTTPS: a password login
 * for an operator, an admin refused without MFA and let in with a TOTP code computed here from the
 * secret the daemon handed out, a replayed code refused, a recovery code that works once, failed
 * logins rate-limited per user and per address (429, audit entries and `auth.lockout` events),
 * session expiry and logout, and fuzzed login bodies (never a 5xx).
 */
import { request as httpsRequest } from "node:https";
import { join } from "node:path";
import Database from "better-sqlite3";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { base32Decode, totp } from "../../src/control/totp.js";
import { startDaemon, tcpPort, type TestDaemon } from "../helpers/daemon.js";
import { prng } from "../helpers/prng.js";

const isRoot = process.getuid?.() === 0;

interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
  json: () => Record<string, unknown>;
}

/** One HTTPS request from `from` (any 127.x.y.z: each is its own address to the daemon's limits). */
function https(port: number, method: string, path: string, opts: { token?: string; body?: unknown; raw?: Buffer | string; from?: string } = {}): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const text = opts.raw ?? (opts.body !== undefined ? JSON.stringify(opts.body) : undefined);
    const req = httpsRequest(
      {
        host: "127.0.0.1",
        port,
        method,
        path,
        localAddress: opts.from ?? "127.0.0.1",
        rejectUnauthorized: false,
        agent: false,
        headers: { ...(opts.token !== undefined ? { authorization: `Bearer ${opts.token}` } : {}), ...(text !== undefined ? { "content-type": "application/json" } : {}) },
      },
      (res) => {
        let body = "";
        res.on("data", (d: Buffer) => (body += d.toString()));
        res.on("end", () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body, json: () => JSON.parse(body) as Record<string, unknown> }));
      },
    );
    req.on("error", reject);
    req.end(text);
  });
}

const PW = "correct horse battery";

describe.skipIf(!isRoot)("interactive login with MFA, against a real daemon", () => {
  let d: TestDaemon;
  let port: number;
  let adminSecret: Buffer;
  let recovery: string[];

  beforeAll(async () => {
    d = await startDaemon({ args: ["--listen", "127.0.0.1:0"] });
    port = await tcpPort(d);
    await d.client.addUser({ name: "ops", role: "operator", password: PW, scopes: ["vm:web"] });
    await d.client.addUser({ name: "boss", role: "admin", password: PW });
    await d.client.addUser({ name: "nopw", role: "viewer" });
    await d.client.addUser({ name: "victim", role: "viewer", password: PW });
  }, 60_000);

  afterAll(async () => {
    await d?.stop();
  });

  it("logs an operator in with its password: a session token with its role and scope, usable as Bearer", async () => {
    const a = await https(port, "POST", "/v1/login", { body: { user: "ops", password: PW }, from: "127.0.1.1" });
    expect(a.status, a.body).toBe(201);
    const s = a.json() as { token: string; role: string; scopes: string[]; session: boolean; expiresAt: string };
    expect(s).toMatchObject({ user: "ops", role: "operator", scopes: ["vm:web"], session: true });
    const hours = (Date.parse(s.expiresAt) - Date.now()) / 3_600_000;
    expect(hours).toBeGreaterThan(11.9);
    expect(hours).toBeLessThanOrEqual(12);
    expect((await https(port, "GET", "/v1/vms", { token: s.token })).status).toBe(200);
    // its role holds: no users:admin
    expect((await https(port, "GET", "/v1/users", { token: s.token })).status).toBe(403);
    expect((await d.client.listUsers()).find((u) => u.name === "ops")?.mfa).toBe(false);
    // the one operation the OpenAPI document lets go without a token
    const doc = (await d.client.openapi()) as { paths: Record<string, Record<string, { security?: unknown[] }>> };
    const open = Object.entries(doc.paths).flatMap(([p, ops]) => Object.entries(ops).filter(([, o]) => o.security !== undefined).map(([m, o]) => `${m} ${p} ${JSON.stringify(o.security)}`));
    expect(open).toEqual(["post /v1/login []"]);
  });

  it("refuses an admin's password login without MFA, saying how to enable it", async () => {
    const a = await https(port, "POST", "/v1/login", { body: { user: "boss", password: PW }, from: "127.0.2.1" });
    expect(a.status).toBe(403);
    expect(a.json()).toMatchObject({ code: "MFA_REQUIRED" });
    expect(String(a.json()["detail"])).toMatch(/needs MFA/);
    expect(a.body).not.toContain("token");
  });

  it("lets the admin in with a TOTP code, refuses the same code again, and wants a code once MFA is on", async () => {
    const m = await d.client.enableMfa("boss");
    expect(m.uri).toMatch(/^otpauth:\/\/totp\/typevisor:boss\?secret=[A-Z2-7]{32}&issuer=typevisor&/);
    expect(m.recoveryCodes).toHaveLength(10);
    expect(new Set(m.recoveryCodes).size).toBe(10);
    adminSecret = base32Decode(m.secret);
    recovery = m.recoveryCodes;
    expect((await d.client.listUsers()).find((u) => u.name === "boss")?.mfa).toBe(true);
    // a second enable would replace the authenticator silently: refused
    expect(await d.client.enableMfa("boss").then(() => "ok", (e: { code?: string }) => e.code)).toBe("MFA_ENABLED");
    // nothing secret is stored in the clear but the TOTP seed (it must be: the daemon computes codes from it)
    const db = new Database(join(d.home, "typevisor.db"), { readonly: true });
    const row = db.prepare("SELECT recovery FROM users WHERE name = 'boss'").get() as { recovery: string };
    db.close();
    for (const c of recovery) expect(row.recovery).not.toContain(c.replace(/-/g, ""));

    const missing = await https(port, "POST", "/v1/login", { body: { user: "boss", password: PW }, from: "127.0.3.1" });
    expect(missing.status).toBe(401);
    expect(String(missing.json()["detail"])).toMatch(/MFA on/);
    const code = totp(adminSecret, Date.now());
    const ok = await https(port, "POST", "/v1/login", { body: { user: "boss", password: PW, totp: code }, from: "127.0.3.1" });
    expect(ok.status, ok.body).toBe(201);
    const token = String(ok.json()["token"]);
    expect((await https(port, "GET", "/v1/users", { token })).status).toBe(200);
    const replay = await https(port, "POST", "/v1/login", { body: { user: "boss", password: PW, totp: code }, from: "127.0.3.2" });
    expect(replay.status).toBe(401);
    // a wrong code with the right password: one from ten minutes on, outside the accepted window (the step and one either side)
    const far = totp(adminSecret, Date.now() + 10 * 60_000);
    expect((await https(port, "POST", "/v1/login", { body: { user: "boss", password: PW, totp: far }, from: "127.0.3.4" })).status).toBe(401);
    // a wrong password with a good code is refused too
    const next = totp(adminSecret, Date.now() + 30_000);
    expect((await https(port, "POST", "/v1/login", { body: { user: "boss", password: "wrong password!", totp: next }, from: "127.0.3.3" })).status).toBe(401);
    const audit = await d.client.audit({ user: "boss" });
    expect(audit.some((e) => e.action === "auth.login" && e.result === "ok" && /totp/.test(e.detail ?? ""))).toBe(true);
    expect(audit.some((e) => e.action === "auth.login" && e.result === "refused" && e.detail === "wrong or replayed TOTP code")).toBe(true);
    expect(audit.some((e) => e.action === "auth.login" && e.detail === "admin without MFA")).toBe(true);
    // never a password or a code in the log
    const all = JSON.stringify(await d.client.audit({ limit: 10000 }));
    expect(all).not.toContain(PW);
    expect(all).not.toContain(code);
    expect(d.log()).not.toContain(PW);
    expect(d.log()).not.toContain(m.secret);
  });

  it("takes a recovery code once", async () => {
    const c = recovery[3]!;
    const first = await https(port, "POST", "/v1/login", { body: { user: "boss", password: PW, recoveryCode: c.toUpperCase() }, from: "127.0.4.1" });
    expect(first.status, first.body).toBe(201);
    const again = await https(port, "POST", "/v1/login", { body: { user: "boss", password: PW, recoveryCode: c }, from: "127.0.4.2" });
    expect(again.status).toBe(401);
    expect((await https(port, "POST", "/v1/login", { body: { user: "boss", password: PW, recoveryCode: recovery[4]! }, from: "127.0.4.3" })).status).toBe(201);
  });

  it("ends a session at logout and at expiry", async () => {
    const login = async (): Promise<{ id: string; token: string }> => (await https(port, "POST", "/v1/login", { body: { user: "ops", password: PW }, from: "127.0.5.1" })).json() as { id: string; token: string };
    const s = await login();
    expect((await https(port, "POST", "/v1/logout", { token: s.token, from: "127.0.5.1" })).status).toBe(204);
    const after = await https(port, "GET", "/v1/vms", { token: s.token, from: "127.0.5.1" });
    expect(after.status).toBe(401);
    const e = await login();
    expect((await https(port, "GET", "/v1/vms", { token: e.token, from: "127.0.5.2" })).status).toBe(200);
    // twelve hours is too long to wait: the inventory says when it ends
    const db = new Database(join(d.home, "typevisor.db"));
    db.prepare("UPDATE tokens SET expires_at = ? WHERE id = ?").run(new Date(Date.now() - 1000).toISOString(), e.id);
    db.close();
    expect((await https(port, "GET", "/v1/vms", { token: e.token, from: "127.0.5.2" })).status).toBe(401);
    // a uid on the unix socket has no session to end
    expect(await d.client.logout().then(() => "ok", (x: { status?: number }) => x.status)).toBe(400);
  });

  it("rate-limits wrong passwords per user (from many addresses) and per address (for many users), with growing delays", async () => {
    // per user: four wrong passwords, each from another address
    for (let i = 0; i < 4; i++) expect((await https(port, "POST", "/v1/login", { body: { user: "victim", password: `guess ${i} wrong` }, from: `127.0.6.${i + 1}` })).status).toBe(401);
    const locked = await https(port, "POST", "/v1/login", { body: { user: "victim", password: PW }, from: "127.0.6.99" });
    expect(locked.status).toBe(429);
    expect(locked.headers["retry-after"]).toBe("1");
    await new Promise((r) => setTimeout(r, 1100));
    expect((await https(port, "POST", "/v1/login", { body: { user: "victim", password: "wrong again" }, from: "127.0.6.5" })).status).toBe(401);
    const longer = await https(port, "POST", "/v1/login", { body: { user: "victim", password: PW }, from: "127.0.6.99" });
    expect(longer.status).toBe(429);
    expect(longer.headers["retry-after"]).toBe("2");
    await new Promise((r) => setTimeout(r, 2100));
    expect((await https(port, "POST", "/v1/login", { body: { user: "victim", password: PW }, from: "127.0.6.99" })).status).toBe(201);
    // per address: four users guessed from one address
    for (const u of ["nobody1", "nobody2", "nopw", "ops"]) expect((await https(port, "POST", "/v1/login", { body: { user: u, password: "not the one" }, from: "127.0.7.1" })).status).toBe(401);
    expect((await https(port, "POST", "/v1/login", { body: { user: "ops", password: PW }, from: "127.0.7.1" })).status).toBe(429);
    // the user itself, from elsewhere, is not locked out by that
    expect((await https(port, "POST", "/v1/login", { body: { user: "ops", password: PW }, from: "127.0.7.2" })).status).toBe(201);
    const audit = await d.client.audit({ limit: 10000 });
    const lockouts = audit.filter((e) => e.action === "auth.lockout").map((e) => e.detail);
    expect(lockouts).toContain("user victim locked out for 1 s after repeated failed logins");
    expect(lockouts).toContain("user victim locked out for 2 s after repeated failed logins");
    expect(lockouts).toContain("address 127.0.7.1 locked out for 1 s after repeated failed logins");
    const events = await d.client.events({ limit: 1000 });
    expect(events.filter((e) => e.type === "auth.lockout").map((e) => e.message)).toEqual(expect.arrayContaining(["user victim locked out for 1 s after repeated failed logins", "address 127.0.7.1 locked out for 1 s after repeated failed logins"]));
    expect(await d.client.verifyAudit()).toMatchObject({ ok: true });
  }, 60_000);

  it("can turn MFA off, after which the admin is refused again", async () => {
    await d.client.disableMfa("boss");
    expect((await d.client.listUsers()).find((u) => u.name === "boss")?.mfa).toBe(false);
    expect((await https(port, "POST", "/v1/login", { body: { user: "boss", password: PW, totp: totp(adminSecret, Date.now()) }, from: "127.0.8.1" })).status).toBe(403);
    expect(await d.client.disableMfa("boss").then(() => "ok", (e: { code?: string }) => e.code)).toBe("MFA_NOT_ENABLED");
  });

  it("never answers 5xx to malformed, hostile or huge login bodies", async () => {
    const seed = Number(process.env["TYPEVISOR_FUZZ_SEED"] ?? Date.now() % 2 ** 31);
    const rnd = prng(seed);
    const pick = <T,>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!;
    const str = (n: number): string => Array.from({ length: n }, () => String.fromCharCode(Math.floor(rnd() * 0x3000))).join("");
    const values: (() => unknown)[] = [() => str(Math.floor(rnd() * 40)), () => Math.floor(rnd() * 1e9), () => null, () => true, () => [], () => ({}), () => "ops", () => "boss", () => PW, () => "123456", () => str(2000), () => "a".repeat(1025)];
    const bodies: (() => Buffer | string)[] = [
      () => JSON.stringify({ user: pick(values)(), password: pick(values)(), ...(rnd() < 0.5 ? { totp: pick(values)() } : {}), ...(rnd() < 0.3 ? { recoveryCode: pick(values)() } : {}) }),
      () => JSON.stringify({ user: pick(["ops", "boss", "victim", "ghost"]), password: pick([PW, "wrong wrong", ""]), [pick(["extra", "__proto__", "constructor"])]: pick(values)() }),
      () => `{"user":"ops","password":${JSON.stringify(str(Math.floor(rnd() * 50)))}`,
      () => Buffer.from(Array.from({ length: Math.floor(rnd() * 300) }, () => Math.floor(rnd() * 256))),
      () => JSON.stringify(pick(values)()),
      () => `{"user":"${"x".repeat(70_000)}","password":"p"}`,
      () => `${"[".repeat(5000)}${"]".repeat(5000)}`,
      () => JSON.stringify({ user: "boss", password: PW, totp: "123456", recoveryCode: "aaaa-bbbb-cccc-dddd" }),
    ];
    const byStatus = new Map<number, number>();
    const bad: string[] = [];
    let n = 0;
    const worker = async (): Promise<void> => {
      while (n < 300) {
        const i = n++;
        const body = pick(bodies)();
        const a = await https(port, "POST", "/v1/login", { raw: body, from: `127.9.${Math.floor(i / 200)}.${1 + (i % 200)}` }).catch((e: Error) => ({ status: 0, body: e.message }) as Answer);
        byStatus.set(a.status, (byStatus.get(a.status) ?? 0) + 1);
        if ((a.status >= 500 || a.status === 0) && bad.length < 10) bad.push(`${a.status} ${a.body.slice(0, 200)} for ${String(body).slice(0, 200)}`);
      }
    };
    await Promise.all(Array.from({ length: 4 }, worker));
    const summary = `seed ${seed}: by status ${JSON.stringify(Object.fromEntries([...byStatus].sort((a, b) => a[0] - b[0])))}`;
    console.log(summary);
    expect(bad, summary).toEqual([]);
    expect(byStatus.get(400) ?? 0).toBeGreaterThan(0);
    expect(d.proc.exitCode).toBeNull();
    expect((await d.client.health()).pid).toBe(d.proc.pid);
  }, 300_000);
});
