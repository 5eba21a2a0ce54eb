/**
 * Who may do what: users, API tokens, roles and scopes (docs/security.md).
 *
 * - Roles are fixed sets of permissions: viewer ⊂ operator ⊂ admin.
 * - A user or token may be scoped to named VMs (`vm:NAME`): it then sees and acts on those only.
 * - Passwords are hashed with scrypt (RFC 7914; node:crypto), N=2^15, r=8, p=1, a 16-byte random
 *   salt, a 32-byte key: 32 MiB and about 0.1 s per hash, the parameters OWASP's password storage
 *   cheat sheet gives for scrypt. They are stored with the hash, so they can be raised later.
 * - A token is `tvt_<id>_<secret>`: a 12-hex-digit id (public: `token ls`, the audit log) and a
 *   256-bit random secret. Only SHA-256 of the secret is stored: the secret has 256 bits of
 *   entropy, so a fast hash is enough (a memory-hard one protects guessable passwords, not this),
 *   and a stolen inventory gives no usable token. It is shown once, at creation.
 */
import { createHash, randomBytes, scrypt, timingSafeEqual } from "node:crypto";
import { z } from "zod";
import { TypevisorError } from "../errors.js";
import { NAME_PATTERN } from "./spec.js";
import type { Store } from "./store.js";
import { base32Encode, newTotpSecret, otpauthUri, verifyTotp } from "./totp.js";

export const ROLES = ["viewer", "operator", "admin"] as const;
export type Role = (typeof ROLES)[number];

/**
 * Every permission a route can need. `vm:*` ones are checked against the caller's scope when the
 * route acts on a named VM.
 */
export const PERMISSIONS = [
  "host:read", // health, host report, the OpenAPI document
  "metrics:read", // Prometheus metrics (every VM's: not for scoped callers)
  "vm:read", // list, show, stats, events
  "vm:console", // read a console's captured output, follow it
  "vm:console-input", // attach to a console: type into the guest
  "vm:lifecycle", // start, stop, pause, resume, reboot
  "vm:create",
  "vm:delete",
  "tokens:own", // create, list and revoke one's own tokens (within one's own rights)
  "users:admin", // users, and other users' tokens
  "pools:admin", // create and remove storage pools (host directories)
  "alerts:admin", // add and remove alert rules
  "audit:read",
] as const;
export type Permission = (typeof PERMISSIONS)[number];

const VIEWER: Permission[] = ["host:read", "metrics:read", "vm:read", "vm:console", "tokens:own"];
const OPERATOR: Permission[] = [...VIEWER, "vm:console-input", "vm:lifecycle", "vm:create", "vm:delete"];
export const ROLE_PERMISSIONS: Record<Role, ReadonlySet<Permission>> = {
  viewer: new Set(VIEWER),
  operator: new Set(OPERATOR),
  admin: new Set(PERMISSIONS),
};

export function roleRank(r: Role): number {
  return ROLES.indexOf(r);
}

/** The lesser of two roles. */
export function minRole(a: Role, b: Role): Role {
  return roleRank(a) <= roleRank(b) ? a : b;
}

/** An authenticated caller. */
export interface Principal {
  /** The inventory user, or `root` for uid 0 (and the daemon's own uid) on the unix socket. */
  user: string;
  role: Role;
  /** VM names this caller is limited to; undefined: every VM. */
  vms?: readonly string[];
  /** The token used, if any (its public id). */
  tokenId?: string;
  /** Where from: `uid 1000` on the unix socket, the address over TCP. */
  from: string;
}

export function can(p: Principal, perm: Permission): boolean {
  return ROLE_PERMISSIONS[p.role].has(perm);
}

/** Whether `p` may see VM `name` at all. */
export function inScope(p: Principal, name: string): boolean {
  return p.vms === undefined || p.vms.includes(name);
}

/** Scopes as stored and shown: `vm:NAME`. */
export function scopesOf(vms: readonly string[] | undefined): string[] {
  return vms === undefined ? [] : vms.map((v) => `vm:${v}`);
}

export const userName = z
  .string()
  .regex(/^[a-z_][a-z0-9_.-]{0,31}$/, "a user name is 1-32 lower-case letters, digits, '_', '.' or '-', starting with a letter or '_' (as useradd takes them)")
  .describe("user name");
export const scope = z
  .string()
  .max(70)
  .refine((s) => s.startsWith("vm:") && NAME_PATTERN.test(s.slice(3)), "a scope is vm:NAME (a VM name)")
  .describe("vm:NAME: only this VM");
export const role = z.enum(ROLES);

// ---- passwords -----------------------------------------------------------------

export const SCRYPT = { N: 2 ** 15, r: 8, p: 1, keyLength: 32, saltLength: 16 } as const;
/** Passwords are at most this long: scrypt takes any length, but nobody needs more, and a huge one costs work. */
export const MAX_PASSWORD = 1024;

function scryptAsync(password: string, salt: Buffer, N: number, r: number, p: number, len: number): Promise<Buffer> {
  return new Promise((resolve, reject) =>
    // maxmem: scrypt needs 128·N·r bytes; node's default cap (32 MiB) is exactly that, so leave room.
    scrypt(password, salt, len, { N, r, p, maxmem: 256 * N * r + 1024 * 1024 }, (e, key) => (e !== null ? reject(e) : resolve(key))),
  );
}

/** `scrypt$N$r$p$salt$key` (base64). */
export async function hashPassword(password: string): Promise<string> {
  checkPassword(password);
  const salt = randomBytes(SCRYPT.saltLength);
  const key = await scryptAsync(password, salt, SCRYPT.N, SCRYPT.r, SCRYPT.p, SCRYPT.keyLength);
  return `scrypt$${SCRYPT.N}$${SCRYPT.r}$${SCRYPT.p}$${salt.toString("base64")}$${key.toString("base64")}`;
}

export async function verifyPassword(password: string, stored: string): Promise<boolean> {
  const f = stored.split("$");
  if (f.length !== 6 || f[0] !== "scrypt" || password.length > MAX_PASSWORD) return false;
  const [N, r, p] = [Number(f[1]), Number(f[2]), Number(f[3])];
  const want = Buffer.from(f[5]!, "base64");
  const got = await scryptAsync(password, Buffer.from(f[4]!, "base64"), N, r, p, want.length);
  return got.length === want.length && timingSafeEqual(got, want);
}

export function checkPassword(password: string): void {
  if (password.length < 8) throw new TypevisorError("INVALID_REQUEST", "a password has at least 8 characters");
  if (password.length > MAX_PASSWORD) throw new TypevisorError("INVALID_REQUEST", `a password has at most ${MAX_PASSWORD} characters`);
}

// ---- tokens --------------------------------------------------------------------

const TOKEN_PATTERN = /^tvt_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$/;

export function newToken(): { id: string; secret: string; token: string; hash: string } {
  const id = randomBytes(6).toString("hex");
  const secret = randomBytes(32).toString("base64url");
  return { id, secret, token: `tvt_${id}_${secret}`, hash: sha256(secret) };
}

/** The id and the secret's hash of a token as presented, or undefined if it is not one in form. */
export function parseToken(token: string): { id: string; hash: string } | undefined {
  const m = TOKEN_PATTERN.exec(token);
  return m === null ? undefined : { id: m[1]!, hash: sha256(m[2]!) };
}

function sha256(s: string): string {
  return createHash("sha256").update(s).digest("hex");
}

/** `30d`, `12h`, `90m`: milliseconds. */
export function parseDuration(v: string): number {
  const m = /^\s*(\d{1,5})\s*([mhdw])\s*$/.exec(v);
  if (m === null) throw new TypevisorError("INVALID_REQUEST", `a duration is a whole number with m, h, d or w: 90m, 12h, 30d (got "${v}")`);
  const ms = Number(m[1]) * { m: 60_000, h: 3_600_000, d: 86_400_000, w: 7 * 86_400_000 }[m[2] as "m" | "h" | "d" | "w"];
  if (ms <= 0 || ms > 3650 * 86_400_000) throw new TypevisorError("INVALID_REQUEST", `a token lives between a minute and 3650 days (got "${v}")`);
  return ms;
}

// ---- multi-factor login ---------------------------------------------------------

export const RECOVERY_CODES = 10;

/** 80 random bits as four groups of four base32 characters, lower case: xxxx-xxxx-xxxx-xxxx. */
function newRecoveryCode(): string {
  return base32Encode(randomBytes(10)).toLowerCase().match(/.{4}/g)!.join("-");
}

/**
 * SHA-256 of a recovery code, dashes, spaces and case aside. 80 random bits each: like tokens,
 * too many to guess, so a fast hash is enough.
 */
function recoveryHash(code: string): string {
  return sha256(code.toLowerCase().replace(/[\s-]/g, "").slice(0, 64));
}

/** A valid scrypt hash of nothing anyone types: an unknown user's login costs what a known one's does. */
const DUMMY_HASH = `scrypt$${2 ** 15}$8$1$${Buffer.alloc(16).toString("base64")}$${Buffer.alloc(32).toString("base64")}`;

/** Why a login is refused (for the audit log). */
export type LoginRefusal = "unknown user" | "no password set" | "wrong password" | "admin without MFA" | "MFA code missing" | "wrong or replayed TOTP code" | "wrong or used recovery code";

// ---- the inventory's users and tokens ------------------------------------------

export interface UserRow {
  name: string;
  role: Role;
  /** VM names; undefined: every VM. */
  vms?: string[];
  hasPassword: boolean;
  /** TOTP enabled (user mfa enable). */
  mfa: boolean;
  createdAt: string;
}

export interface TokenRow {
  id: string;
  user: string;
  role: Role;
  vms?: string[];
  createdAt: string;
  expiresAt: string;
  lastUsedAt?: string;
  revokedAt?: string;
  /** Made by an interactive login (POST /v1/login), not `token create`. */
  session?: true;
}

interface RawUser {
  name: string;
  role: string;
  vms: string | null;
  password: string | null;
  created_at: string;
  totp_secret: string | null;
  totp_last_step: number | null;
  recovery: string | null;
}
interface RawToken {
  id: string;
  user: string;
  role: string;
  vms: string | null;
  hash: string;
  created_at: string;
  expires_at: string;
  last_used_at: string | null;
  revoked_at: string | null;
  kind: string;
}

function userOf(r: RawUser): UserRow {
  return { name: r.name, role: r.role as Role, ...(r.vms !== null ? { vms: JSON.parse(r.vms) as string[] } : {}), hasPassword: r.password !== null, mfa: r.totp_secret !== null, createdAt: r.created_at };
}
function tokenOf(r: RawToken): TokenRow {
  return {
    id: r.id,
    user: r.user,
    role: r.role as Role,
    ...(r.vms !== null ? { vms: JSON.parse(r.vms) as string[] } : {}),
    createdAt: r.created_at,
    expiresAt: r.expires_at,
    ...(r.last_used_at !== null ? { lastUsedAt: r.last_used_at } : {}),
    ...(r.revoked_at !== null ? { revokedAt: r.revoked_at } : {}),
    ...(r.kind === "session" ? { session: true as const } : {}),
  };
}

/** VM names from `vm:NAME` scopes; undefined for none (every VM). */
export function vmsOfScopes(scopes: readonly string[] | undefined): string[] | undefined {
  if (scopes === undefined || scopes.length === 0) return undefined;
  return [...new Set(scopes.map((s) => s.slice(3)))].sort();
}

/** The VMs both may see (undefined: every VM). */
function intersect(a: readonly string[] | undefined, b: readonly string[] | undefined): string[] | undefined {
  if (a === undefined) return b === undefined ? undefined : [...b];
  if (b === undefined) return [...a];
  return a.filter((x) => b.includes(x));
}

/** Why a presented token is refused (for the audit log; the client only hears "invalid token"). */
export type TokenRefusal = "malformed" | "unknown" | "wrong secret" | "revoked" | "expired" | "user removed";

/** A token's last use is written at most this often: every request writing (and fsyncing) a row would cost more than the answer. */
const LAST_USED_EVERY_MS = 60_000;

export class Identities {
  private readonly lastUsedWritten = new Map<string, number>();

  constructor(private readonly store: Store) {}

  private get db(): Store["db"] {
    return this.store.db;
  }

  listUsers(): UserRow[] {
    return (this.db.prepare("SELECT * FROM users ORDER BY name").all() as RawUser[]).map(userOf);
  }

  getUser(name: string): UserRow | undefined {
    const r = this.db.prepare("SELECT * FROM users WHERE name = ?").get(name) as RawUser | undefined;
    return r === undefined ? undefined : userOf(r);
  }

  /** @throws TypevisorError USER_NOT_FOUND */
  user(name: string): UserRow {
    const u = this.getUser(name);
    if (u === undefined) throw new TypevisorError("USER_NOT_FOUND", `no user named ${name}`, { hint: "typevisor user ls lists them" });
    return u;
  }

  async addUser(u: { name: string; role: Role; scopes?: string[]; password?: string }): Promise<UserRow> {
    if (u.name === "root") throw new TypevisorError("INVALID_REQUEST", "root is the host's superuser (admin on the unix socket): it cannot be an inventory user");
    const hash = u.password !== undefined ? await hashPassword(u.password) : null;
    const vms = vmsOfScopes(u.scopes);
    if (u.role === "admin" && vms !== undefined) throw new TypevisorError("INVALID_REQUEST", "an admin cannot be scoped to VMs: it manages users, who could be given any VM");
    try {
      this.db.prepare("INSERT INTO users (name, role, vms, password, created_at) VALUES (?, ?, ?, ?, ?)").run(u.name, u.role, vms !== undefined ? JSON.stringify(vms) : null, hash, new Date().toISOString());
    } catch (e) {
      if ((e as { code?: string }).code?.startsWith("SQLITE_CONSTRAINT") === true) throw new TypevisorError("USER_EXISTS", `a user named ${u.name} already exists`);
      throw e;
    }
    return this.user(u.name);
  }

  /** Remove a user and every token of theirs. The last admin stays. */
  removeUser(name: string): void {
    const u = this.user(name);
    this.db.transaction(() => {
      if (u.role === "admin" && (this.db.prepare("SELECT count(*) AS n FROM users WHERE role = 'admin'").get() as { n: number }).n <= 1) {
        throw new TypevisorError("LAST_ADMIN", `${name} is the last admin: add another admin before removing it`);
      }
      this.db.prepare("DELETE FROM tokens WHERE user = ?").run(name);
      this.db.prepare("DELETE FROM users WHERE name = ?").run(name);
    })();
  }

  async setPassword(name: string, password: string): Promise<void> {
    this.user(name);
    const hash = await hashPassword(password);
    this.db.prepare("UPDATE users SET password = ? WHERE name = ?").run(hash, name);
  }

  /**
   * A new token for `user`: its role at most the user's, its scopes within the user's (and
   * within `limit`'s, the creator's own rights, when a non-admin makes a token for itself).
   */
  createToken(t: { user: string; role?: Role; scopes?: string[]; expiresInMs: number; session?: boolean }, limit?: Principal): TokenRow & { token: string } {
    const u = this.user(t.user);
    const role = t.role ?? u.role;
    const cap = limit !== undefined ? minRole(u.role, limit.role) : u.role;
    if (roleRank(role) > roleRank(cap)) throw new TypevisorError("FORBIDDEN", `a token of ${t.user} can have at most the role ${cap} (asked ${role})`);
    const within = intersect(u.vms, limit?.vms);
    // no scope asked: as wide as allowed (for a scoped user, its VMs)
    const asked = vmsOfScopes(t.scopes) ?? within;
    if (within !== undefined && asked !== undefined) {
      const outside = asked.filter((v) => !within.includes(v));
      if (outside.length > 0) throw new TypevisorError("FORBIDDEN", `outside ${t.user}'s scope: ${scopesOf(outside).join(", ")}`);
    }
    const { id, token, hash } = newToken();
    const now = new Date();
    const expiresAt = new Date(now.getTime() + t.expiresInMs).toISOString();
    this.db
      .prepare("INSERT INTO tokens (id, user, role, vms, hash, created_at, expires_at, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
      .run(id, t.user, role, asked !== undefined ? JSON.stringify(asked) : null, hash, now.toISOString(), expiresAt, t.session === true ? "session" : "api");
    return { ...this.token(id), token };
  }

  listTokens(user?: string): TokenRow[] {
    const rows = (user !== undefined ? this.db.prepare("SELECT * FROM tokens WHERE user = ? ORDER BY created_at").all(user) : this.db.prepare("SELECT * FROM tokens ORDER BY user, created_at").all()) as RawToken[];
    return rows.map(tokenOf);
  }

  /** @throws TypevisorError TOKEN_NOT_FOUND */
  token(id: string): TokenRow {
    const r = this.db.prepare("SELECT * FROM tokens WHERE id = ?").get(id) as RawToken | undefined;
    if (r === undefined) throw new TypevisorError("TOKEN_NOT_FOUND", `no token ${id}`, { hint: "typevisor token ls lists them" });
    return tokenOf(r);
  }

  revokeToken(id: string): TokenRow {
    this.lastUsedWritten.delete(id);
    const t = this.token(id);
    if (t.revokedAt === undefined) this.db.prepare("UPDATE tokens SET revoked_at = ? WHERE id = ?").run(new Date().toISOString(), id);
    return this.token(id);
  }

  /** The caller a bearer token stands for, or why it is refused. Constant-time in the secret. */
  authenticateToken(presented: string, from: string, now = Date.now()): Principal | { refused: TokenRefusal; tokenId?: string } {
    const p = parseToken(presented);
    if (p === undefined) return { refused: "malformed" };
    const r = this.db.prepare("SELECT * FROM tokens WHERE id = ?").get(p.id) as RawToken | undefined;
    if (r === undefined) return { refused: "unknown", tokenId: p.id };
    const a = Buffer.from(r.hash, "hex");
    const b = Buffer.from(p.hash, "hex");
    if (a.length !== b.length || !timingSafeEqual(a, b)) return { refused: "wrong secret", tokenId: p.id };
    if (r.revoked_at !== null) return { refused: "revoked", tokenId: p.id };
    if (Date.parse(r.expires_at) <= now) return { refused: "expired", tokenId: p.id };
    const u = this.getUser(r.user);
    if (u === undefined) return { refused: "user removed", tokenId: p.id };
    if (now - (this.lastUsedWritten.get(p.id) ?? -Infinity) >= LAST_USED_EVERY_MS) {
      this.db.prepare("UPDATE tokens SET last_used_at = ? WHERE id = ?").run(new Date(now).toISOString(), p.id);
      this.lastUsedWritten.set(p.id, now);
    }
    // What the user may do now bounds the token: a user demoted or narrowed since takes its tokens along.
    const vms = intersect(u.vms, r.vms !== null ? (JSON.parse(r.vms) as string[]) : undefined);
    return { user: u.name, role: minRole(u.role, r.role as Role), ...(vms !== undefined ? { vms } : {}), tokenId: p.id, from };
  }

  // ---- multi-factor login (docs/security.md) ----------------------------------

  /**
   * Turn TOTP on for `name`: a new secret (shown once, as the otpauth:// URI) and RECOVERY_CODES
   * one-time recovery codes (shown once, stored as SHA-256 each).
   * @throws TypevisorError MFA_ENABLED when it is on already (disable it first: a new secret must be a decision)
   */
  enableMfa(name: string): { uri: string; secret: string; recoveryCodes: string[] } {
    const u = this.user(name);
    if (u.mfa) throw new TypevisorError("MFA_ENABLED", `${name} has MFA on already`, { hint: `to enroll a new authenticator: typevisor user mfa disable ${name}, then enable` });
    const secret = newTotpSecret();
    const codes = Array.from({ length: RECOVERY_CODES }, newRecoveryCode);
    this.db.prepare("UPDATE users SET totp_secret = ?, totp_last_step = NULL, recovery = ? WHERE name = ?").run(secret.toString("hex"), JSON.stringify(codes.map(recoveryHash)), name);
    return { uri: otpauthUri(secret, name), secret: base32Encode(secret), recoveryCodes: codes };
  }

  /** @throws TypevisorError MFA_NOT_ENABLED */
  disableMfa(name: string): void {
    const u = this.user(name);
    if (!u.mfa) throw new TypevisorError("MFA_NOT_ENABLED", `${name} has no MFA to disable`);
    this.db.prepare("UPDATE users SET totp_secret = NULL, totp_last_step = NULL, recovery = NULL WHERE name = ?").run(name);
  }

  /** Unused recovery codes of `name`. */
  recoveryLeft(name: string): number {
    const r = this.db.prepare("SELECT recovery FROM users WHERE name = ?").get(name) as { recovery: string | null } | undefined;
    return r?.recovery != null ? (JSON.parse(r.recovery) as string[]).length : 0;
  }

  /**
   * Check a password login. Every refusal is one of a few reasons (for the audit log; the client
   * hears one message for all but MFA_REQUIRED). An unknown user costs the same scrypt as a known
   * one, so the answer's timing does not tell which names exist. The TOTP step accepted is stored
   * in the same transaction that checks it, so two concurrent requests cannot both use one code.
   */
  async checkLogin(l: { user: string; password: string; totp?: string; recoveryCode?: string }, now = Date.now()): Promise<{ user: UserRow; factor: "password" | "totp" | "recovery code" } | { refused: LoginRefusal }> {
    const raw = this.db.prepare("SELECT * FROM users WHERE name = ?").get(l.user) as RawUser | undefined;
    const passwordOk = await verifyPassword(l.password, raw?.password ?? DUMMY_HASH);
    if (raw === undefined) return { refused: "unknown user" };
    if (raw.password === null) return { refused: "no password set" };
    if (!passwordOk) return { refused: "wrong password" };
    const u = userOf(raw);
    if (raw.totp_secret === null) {
      // Few administrators, each with a second factor: an admin's password alone opens nothing.
      if (u.role === "admin") return { refused: "admin without MFA" };
      return { user: u, factor: "password" };
    }
    if (l.totp !== undefined) {
      const secret = Buffer.from(raw.totp_secret, "hex");
      const ok = this.db.transaction(() => {
        const cur = this.db.prepare("SELECT totp_last_step FROM users WHERE name = ?").get(l.user) as { totp_last_step: number | null };
        const step = verifyTotp(secret, l.totp!, now, cur.totp_last_step ?? undefined);
        if (step === undefined) return false;
        this.db.prepare("UPDATE users SET totp_last_step = ? WHERE name = ?").run(step, l.user);
        return true;
      })();
      return ok ? { user: u, factor: "totp" } : { refused: "wrong or replayed TOTP code" };
    }
    if (l.recoveryCode !== undefined) {
      const h = recoveryHash(l.recoveryCode);
      const ok = this.db.transaction(() => {
        const cur = this.db.prepare("SELECT recovery FROM users WHERE name = ?").get(l.user) as { recovery: string | null };
        const left = cur.recovery !== null ? (JSON.parse(cur.recovery) as string[]) : [];
        // all compared (constant time each): which one matched does not show in the timing
        let hit = -1;
        left.forEach((c, i) => {
          if (timingSafeEqual(Buffer.from(c, "hex"), Buffer.from(h, "hex")) && hit < 0) hit = i;
        });
        if (hit < 0) return false;
        left.splice(hit, 1);
        this.db.prepare("UPDATE users SET recovery = ? WHERE name = ?").run(JSON.stringify(left), l.user);
        return true;
      })();
      return ok ? { user: u, factor: "recovery code" } : { refused: "wrong or used recovery code" };
    }
    return { refused: "MFA code missing" };
  }
}
