/**
 * Users, API tokens and the audit log over the API (docs/security.md). Each route declares its
 * permission like those in routes.ts; the gate checks it first. Token routes need only
 * `tokens:own` (every role has it): a caller without `users:admin` may create, list and revoke
 * its own tokens, never more than its own rights.
 */
import { z } from "zod";
import { can, parseDuration, role, scope, userName, type Principal } from "../control/identity.js";
import { TypevisorError } from "../errors.js";
import { HANDLED, route, type Route } from "./routes.js";

export const userParams = z.object({ user: userName }).strict();
export const tokenParams = z.object({ id: z.string().regex(/^[0-9a-f]{12}$/, "a token id is 12 hex digits") }).strict();

export const userSpec = z
  .object({
    name: userName,
    role: role.describe("viewer: read only; operator: VM lifecycle and consoles; admin: everything, users included"),
    scopes: z.array(scope).max(256).optional().describe("limit the user to these VMs (vm:NAME); none: every VM"),
    password: z.string().max(1024).optional().describe("for interactive login (scrypt-hashed; never stored or logged as is)"),
  })
  .strict();
export const passwordBody = z.object({ password: z.string().max(1024) }).strict();
export const tokenSpec = z
  .object({
    user: userName,
    role: role.optional().describe("at most the user's (default: the user's)"),
    scopes: z.array(scope).max(256).optional().describe("limit the token to these VMs (vm:NAME), within the user's"),
    expires: z.string().max(16).default("30d").describe("lifetime: 90m, 12h, 30d, 8w (default 30d, at most 3650d)"),
  })
  .strict();
export const tokenListQuery = z.object({ user: userName.optional() }).strict();
export const auditQuery = z
  .object({
    since: z.string().max(40).refine((s) => !Number.isNaN(Date.parse(s)), "an ISO 8601 time").transform((s) => new Date(s).toISOString()).optional(),
    user: z.string().max(64).optional(),
    vm: z.string().max(64).optional(),
    after: z.coerce.number().int().min(0).optional(),
    limit: z.coerce.number().int().min(1).max(10000).optional(),
  })
  .strict();

const scopesOut = z.array(z.string()).optional().describe("vm:NAME; absent: every VM");
export const userInfo = z.object({ name: z.string(), role: role, scopes: scopesOut, hasPassword: z.boolean(), mfa: z.boolean(), createdAt: z.string(), tokens: z.number().int() });
export const tokenInfo = z.object({
  id: z.string(),
  user: z.string(),
  role: role,
  scopes: scopesOut,
  createdAt: z.string(),
  expiresAt: z.string(),
  lastUsedAt: z.string().optional(),
  revokedAt: z.string().optional(),
  session: z.literal(true).optional().describe("made by POST /v1/login"),
});
export const createdToken = tokenInfo.extend({ token: z.string().describe("the bearer token: shown this once, stored only as a hash") });
export const auditEntry = z.object({
  seq: z.number().int(),
  at: z.string(),
  user: z.string().optional(),
  token: z.string().optional(),
  peer: z.string(),
  action: z.string(),
  target: z.string().optional(),
  result: z.string(),
  detail: z.string().optional(),
  prev: z.string(),
  hash: z.string(),
});
export const auditVerify = z.object({ ok: z.boolean(), entries: z.number().int(), problem: z.object({ seq: z.number().int(), reason: z.string() }).optional() });

type UserInfo = z.infer<typeof userInfo>;
type TokenInfo = z.infer<typeof tokenInfo>;

function scoped<T extends { vms?: string[] }>(r: T): Omit<T, "vms"> & { scopes?: string[] } {
  const { vms, ...rest } = r;
  return { ...rest, ...(vms !== undefined ? { scopes: vms.map((v) => `vm:${v}`) } : {}) };
}

/** A caller without users:admin acts on its own tokens only. */
function ownOnly(p: Principal, user: string, what: string): void {
  if (!can(p, "users:admin") && user !== p.user) throw new TypevisorError("FORBIDDEN", `${p.user} (role ${p.role}) lacks the permission users:admin that ${what} of another user's tokens needs`);
}

export const SECURITY_ROUTES: Route[] = [
  route({
    method: "GET", url: "/v1/users", operationId: "listUsers", summary: "Users: role, scopes, whether a password is set, tokens", permission: "users:admin",
    responses: { 200: { description: "users by name", schema: z.object({ users: z.array(userInfo) }) } },
    handler: async ({ auth }) => ({ users: auth.identities.listUsers().map((u): UserInfo => ({ ...scoped(u), tokens: auth.identities.listTokens(u.name).filter((t) => t.revokedAt === undefined).length })) }),
  }),
  route({
    method: "POST", url: "/v1/users", operationId: "addUser", summary: "Add a user", permission: "users:admin", body: userSpec,
    responses: { 201: { description: "added", schema: userInfo } },
    handler: async ({ auth, body }) => ({ ...scoped(await auth.identities.addUser(body)), tokens: 0 }),
  }),
  route({
    method: "GET", url: "/v1/users/:user", operationId: "getUser", summary: "One user and its tokens", permission: "users:admin", params: userParams,
    responses: { 200: { description: "the user", schema: userInfo.extend({ tokenList: z.array(tokenInfo) }) } },
    handler: async ({ auth, params }) => {
      const u = auth.identities.user(params.user);
      const tokens = auth.identities.listTokens(u.name).map((t): TokenInfo => scoped(t));
      return { ...scoped(u), tokens: tokens.filter((t) => t.revokedAt === undefined).length, tokenList: tokens };
    },
  }),
  route({
    method: "DELETE", url: "/v1/users/:user", operationId: "removeUser", summary: "Remove a user and its tokens (not the last admin)", permission: "users:admin", params: userParams,
    responses: { 204: { description: "removed" } },
    handler: async ({ auth, params, reply }) => {
      auth.identities.removeUser(params.user);
      void reply.code(204).send();
      return HANDLED;
    },
  }),
  route({
    method: "PUT", url: "/v1/users/:user/password", operationId: "setPassword", summary: "Set a user's password", permission: "users:admin", params: userParams, body: passwordBody,
    responses: { 204: { description: "set" } },
    handler: async ({ auth, params, body, reply }) => {
      await auth.identities.setPassword(params.user, body.password);
      void reply.code(204).send();
      return HANDLED;
    },
  }),
  route({
    method: "GET", url: "/v1/tokens", operationId: "listTokens", summary: "API tokens (without users:admin: one's own)", permission: "tokens:own", query: tokenListQuery,
    responses: { 200: { description: "tokens", schema: z.object({ tokens: z.array(tokenInfo) }) } },
    handler: async ({ auth, query }) => {
      const p = auth.principal;
      const user = can(p, "users:admin") ? query.user : p.user;
      if (query.user !== undefined) ownOnly(p, query.user, "listing");
      return { tokens: auth.identities.listTokens(user).map((t): TokenInfo => scoped(t)) };
    },
  }),
  route({
    method: "POST", url: "/v1/tokens", operationId: "createToken", summary: "Create an API token (its secret is in this answer only)", permission: "tokens:own", body: tokenSpec,
    responses: { 201: { description: "created", schema: createdToken } },
    handler: async ({ auth, body }) => {
      const p = auth.principal;
      ownOnly(p, body.user, "creating");
      // One's own token never exceeds what one may do now (a token making a token included).
      const limit = can(p, "users:admin") ? undefined : p;
      const t = auth.identities.createToken({ user: body.user, ...(body.role !== undefined ? { role: body.role } : {}), ...(body.scopes !== undefined ? { scopes: body.scopes } : {}), expiresInMs: parseDuration(body.expires) }, limit);
      return scoped(t);
    },
  }),
  route({
    method: "DELETE", url: "/v1/tokens/:id", operationId: "revokeToken", summary: "Revoke an API token (it is refused from now on)", permission: "tokens:own", params: tokenParams,
    responses: { 200: { description: "the revoked token", schema: tokenInfo } },
    handler: async ({ auth, params }) => {
      const t = auth.identities.token(params.id);
      ownOnly(auth.principal, t.user, "revoking");
      return scoped(auth.identities.revokeToken(params.id));
    },
  }),
  route({
    method: "GET", url: "/v1/audit", operationId: "listAudit", summary: "The audit log, oldest first (the latest `limit`, or those after `after`)", permission: "audit:read", query: auditQuery,
    responses: { 200: { description: "entries", schema: z.object({ entries: z.array(auditEntry) }) } },
    handler: async ({ auth, query }) => ({
      entries: auth.audit.list({
        ...(query.since !== undefined ? { since: query.since } : {}),
        ...(query.user !== undefined ? { user: query.user } : {}),
        ...(query.vm !== undefined ? { vm: query.vm } : {}),
        ...(query.after !== undefined ? { afterSeq: query.after } : {}),
        ...(query.limit !== undefined ? { limit: query.limit } : {}),
      }),
    }),
  }),
  route({
    method: "GET", url: "/v1/audit/verify", operationId: "verifyAudit", summary: "Walk the audit log's hash chain: the first entry edited, removed or out of order", permission: "audit:read",
    responses: { 200: { description: "the result", schema: auditVerify } },
    handler: async ({ auth }) => auth.audit.verify(),
  }),
];
