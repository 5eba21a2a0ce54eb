import Database from "better-sqlite3";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { hashPassword, Identities, parseDuration, parseToken, verifyPassword } from "./identity.js";
import { Store } from "./store.js";
import { base32Decode, totp } from "./totp.js";

function fresh(): { ids: Identities; path: string } {
  const path = join(mkdtempSync(join(tmpdir(), "tvi-")), "t.db");
  return { ids: new Identities(new Store(path)), path };
}

describe("passwords (scrypt)", () => {
  it("verifies the right password only, with the parameters stored beside the hash", async () => {
    const h = await hashPassword("correct horse");
    expect(h).toMatch(/^scrypt\$32768\$8\$1\$[A-Za-z0-9+/=]{24}\$[A-Za-z0-9+/=]{44}$/);
    expect(await verifyPassword("correct horse", h)).toBe(true);
    expect(await verifyPassword("correct horsf", h)).toBe(false);
    expect(await verifyPassword("correct horse", "md5$x")).toBe(false);
    // two hashes of one password differ (salt)
    expect(await hashPassword("correct horse")).not.toBe(h);
    await expect(hashPassword("short")).rejects.toThrow(/at least 8/);
  });
});

describe("users and tokens (a real SQLite file)", () => {
  it("stores a token only as the hash of its secret, and checks every refusal", () => {
    const { ids, path } = fresh();
    return (async () => {
      await ids.addUser({ name: "alice", role: "operator", scopes: ["vm:a", "vm:b"] });
      const t = ids.createToken({ user: "alice", expiresInMs: 60_000 });
      expect(t.token).toMatch(/^tvt_[0-9a-f]{12}_[A-Za-z0-9_-]{43}$/);
      expect(t.vms).toEqual(["a", "b"]); // a scoped user's token is scoped the same by default
      const raw = new Database(path).prepare("SELECT * FROM tokens").all() as Record<string, unknown>[];
      expect(JSON.stringify(raw)).not.toContain(t.token.slice(17));
      expect(raw[0]!["hash"]).toBe(parseToken(t.token)!.hash);

      expect(ids.authenticateToken(t.token, "x")).toMatchObject({ user: "alice", role: "operator", vms: ["a", "b"], tokenId: t.id });
      expect(ids.authenticateToken("tvt_000000000000_" + "A".repeat(43), "x")).toEqual({ refused: "unknown", tokenId: "000000000000" });
      expect(ids.authenticateToken(`${t.token.slice(0, -1)}${t.token.endsWith("A") ? "B" : "A"}`, "x")).toMatchObject({ refused: "wrong secret" });
      expect(ids.authenticateToken("x".repeat(100000), "x")).toEqual({ refused: "malformed" });
      expect(ids.authenticateToken(t.token, "x", Date.now() + 61_000)).toMatchObject({ refused: "expired" });
      ids.revokeToken(t.id);
      expect(ids.authenticateToken(t.token, "x")).toMatchObject({ refused: "revoked" });
    })();
  });

  it("bounds a token by its user's role and scope now, not only at creation", async () => {
    const { ids } = fresh();
    await ids.addUser({ name: "bob", role: "viewer" });
    expect(() => ids.createToken({ user: "bob", role: "operator", expiresInMs: 60_000 })).toThrow(/at most the role viewer/);
    const t = ids.createToken({ user: "bob", scopes: ["vm:a"], expiresInMs: 60_000 });
    expect(ids.authenticateToken(t.token, "x")).toMatchObject({ role: "viewer", vms: ["a"] });
    ids.removeUser("bob");
    expect(ids.authenticateToken(t.token, "x")).toMatchObject({ refused: "unknown" });
  });

  it("keeps the last admin, and refuses scoped admins and root", async () => {
    const { ids } = fresh();
    await ids.addUser({ name: "a1", role: "admin" });
    expect(() => ids.removeUser("a1")).toThrow(/last admin/);
    await ids.addUser({ name: "a2", role: "admin" });
    ids.removeUser("a1");
    expect(ids.listUsers().map((u) => u.name)).toEqual(["a2"]);
    await expect(ids.addUser({ name: "a3", role: "admin", scopes: ["vm:x"] })).rejects.toThrow(/cannot be scoped/);
    await expect(ids.addUser({ name: "root", role: "viewer" })).rejects.toThrow(/superuser/);
  });

  it("parses lifetimes", () => {
    expect(parseDuration("30d")).toBe(30 * 86_400_000);
    expect(parseDuration("90m")).toBe(90 * 60_000);
    for (const bad of ["", "0m", "30", "1y", "-1d", "99999d", "1e3d"]) expect(() => parseDuration(bad), bad).toThrow();
  });
});

describe("password login with MFA (a real SQLite file)", () => {
  it("checks password, then TOTP or a recovery code; refuses replays, reuse and an admin without MFA", async () => {
    const { ids, path } = fresh();
    await ids.addUser({ name: "ann", role: "admin", password: "ann password" });
    await ids.addUser({ name: "op", role: "operator", password: "op password" });
    await ids.addUser({ name: "np", role: "viewer" });
    expect(await ids.checkLogin({ user: "op", password: "op password" })).toMatchObject({ user: { name: "op" }, factor: "password" });
    expect(await ids.checkLogin({ user: "op", password: "op passwore" })).toEqual({ refused: "wrong password" });
    expect(await ids.checkLogin({ user: "ghost", password: "op password" })).toEqual({ refused: "unknown user" });
    expect(await ids.checkLogin({ user: "np", password: "anything at all" })).toEqual({ refused: "no password set" });
    expect(await ids.checkLogin({ user: "ann", password: "ann password" })).toEqual({ refused: "admin without MFA" });

    const m = ids.enableMfa("ann");
    expect(ids.getUser("ann")!.mfa).toBe(true);
    expect(ids.recoveryLeft("ann")).toBe(10);
    const secret = base32Decode(m.secret);
    const raw = JSON.stringify(new Database(path).prepare("SELECT * FROM users WHERE name = 'ann'").get());
    for (const c of m.recoveryCodes) expect(raw).not.toContain(c.replace(/-/g, ""));

    const t = 1_800_000_000_000;
    expect(await ids.checkLogin({ user: "ann", password: "ann password" }, t)).toEqual({ refused: "MFA code missing" });
    // a good code with a wrong password leaves the code unused
    expect(await ids.checkLogin({ user: "ann", password: "ann passwore", totp: totp(secret, t) }, t)).toEqual({ refused: "wrong password" });
    // two logins racing with one code: one wins
    const both = await Promise.all([ids.checkLogin({ user: "ann", password: "ann password", totp: totp(secret, t) }, t), ids.checkLogin({ user: "ann", password: "ann password", totp: totp(secret, t) }, t)]);
    expect(both.filter((r) => "factor" in r)).toHaveLength(1);
    expect(both.filter((r) => "refused" in r)).toEqual([{ refused: "wrong or replayed TOTP code" }]);
    // the previous step's code is older than the one used: refused too; the next one is fine
    expect(await ids.checkLogin({ user: "ann", password: "ann password", totp: totp(secret, t - 30_000) }, t)).toEqual({ refused: "wrong or replayed TOTP code" });
    expect(await ids.checkLogin({ user: "ann", password: "ann password", totp: totp(secret, t + 30_000) }, t)).toMatchObject({ factor: "totp" });

    const code = m.recoveryCodes[0]!;
    expect(await ids.checkLogin({ user: "ann", password: "ann password", recoveryCode: ` ${code.replace(/-/g, "").toUpperCase()} ` }, t)).toMatchObject({ factor: "recovery code" });
    expect(await ids.checkLogin({ user: "ann", password: "ann password", recoveryCode: code }, t)).toEqual({ refused: "wrong or used recovery code" });
    expect(ids.recoveryLeft("ann")).toBe(9);

    expect(() => ids.enableMfa("ann")).toThrow(expect.objectContaining({ code: "MFA_ENABLED" }));
    ids.disableMfa("ann");
    expect(ids.getUser("ann")!.mfa).toBe(false);
    expect(() => ids.disableMfa("ann")).toThrow(expect.objectContaining({ code: "MFA_NOT_ENABLED" }));
    // a session is a token of its own kind
    const s = ids.createToken({ user: "op", expiresInMs: 60_000, session: true });
    expect(ids.token(s.id).session).toBe(true);
    expect(ids.token(ids.createToken({ user: "op", expiresInMs: 60_000 }).id).session).toBeUndefined();
  }, 60_000);
});
