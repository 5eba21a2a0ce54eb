/**
 * Interactive login and MFA over the API (docs/security.md).
 *
 * - `POST /v1/login {user, password, totp? | recoveryCode?}`: the one route the gate lets through
 *   without credentials (`public`). A good login answers a session token: a bearer token of kind
 *   `session` (stored hashed like any token, SESSION_HOURS long, revocable), with the user's role
 *   and scopes. An admin's login needs a second factor (MFA_REQUIRED otherwise); so does any user's
 *   who has MFA on.
 * - Failed logins are counted per user and per address, each in an AuthThrottle like the gate's
 *   for tokens: past three, growing lock-outs (1 s, 2 s, ... 15 min), answered 429 with
 *   Retry-After before the password is looked at. A lock-out is an `auth.lockout` audit entry and
 *   daemon event. Every login, failed or not, is an `auth.login` audit entry (never a password or
 *   a code).
 * - `POST /v1/logout`: revokes the token the request carries.
 * - `POST|DELETE /v1/users/:user/mfa` (users:admin): turn TOTP on (the otpauth URI and the recovery
 *   codes are in this answer only) or off.
 */
import { z } from "zod";
import type { AuditInput, AuditLog } from "../control/audit.js";
import { can, MAX_PASSWORD, PERMISSIONS, scopesOf, userName, type Identities } from "../control/identity.js";
import { TypevisorError } from "../errors.js";
import { AuthThrottle } from "./auth.js";
import { HANDLED, route, type Route } from "./routes.js";
import { boolString } from "./schemas.js";
import { tokenInfo, userParams } from "./security-routes.js";
import { checkCsrf, clearedCookie, SESSION_COOKIE, sessionCookie } from "./web.js";

export const SESSION_HOURS = 12;

export const loginBody = z
  .object({
    user: userName,
    password: z.string().max(MAX_PASSWORD),
    totp: z.string().regex(/^\d{6}$/, "a TOTP code is 6 digits").optional().describe("the authenticator's current code (RFC 6238)"),
    recoveryCode: z.string().max(64).optional().describe("one of the recovery codes shown by user mfa enable (each works once)"),
  })
  .strict()
  .refine((b) => b.totp === undefined || b.recoveryCode === undefined, "give totp or recoveryCode, not both");

export const session = tokenInfo.extend({ token: z.string().optional().describe("the session's bearer token: shown this once, stored only as a hash (with ?cookie=true: in the cookie instead)") });
export const loginQuery = z.object({ cookie: boolString.optional().describe(`the web console's login: the token goes in an HttpOnly, SameSite=Strict cookie (${SESSION_COOKIE}), not in the answer`) }).strict();
export const whoami = z.object({
  user: z.string(),
  role: z.string(),
  scopes: z.array(z.string()).optional().describe("the VMs this caller is limited to"),
  permissions: z.array(z.enum(PERMISSIONS)).describe("what this caller may do (the web console offers only these)"),
  tokenId: z.string().optional(),
});
export const mfaEnabled = z.object({
  user: z.string(),
  uri: z.string().describe("otpauth://totp/typevisor:USER?secret=...: for an authenticator app (as text or a QR code)"),
  secret: z.string().describe("the same secret, base32, for typing in"),
  recoveryCodes: z.array(z.string()).describe("one-time codes for when the authenticator is lost: shown this once, stored hashed"),
});

/** The login limits of one daemon (one pair per Identities: the daemon has one). */
const throttles = new WeakMap<Identities, { byUser: AuthThrottle; byAddress: AuthThrottle }>();
function throttlesOf(i: Identities): { byUser: AuthThrottle; byAddress: AuthThrottle } {
  let t = throttles.get(i);
  if (t === undefined) throttles.set(i, (t = { byUser: new AuthThrottle(), byAddress: new AuthThrottle() }));
  return t;
}

function record(audit: AuditLog, e: AuditInput): void {
  try {
    audit.record(e);
  } catch {
    // a full disk must not turn a refusal into an acceptance or a 5xx
  }
}

function tooMany(wait: number, who: string): TypevisorError {
  const e = new TypevisorError("TOO_MANY_ATTEMPTS", `too many failed logins ${who}: try again in ${Math.ceil(wait / 1000)} s`);
  (e as TypevisorError & { retryAfter?: number }).retryAfter = Math.ceil(wait / 1000);
  return e;
}

function badLogin(message: string): TypevisorError {
  const e = new TypevisorError("UNAUTHENTICATED", message);
  (e as TypevisorError & { wwwAuthenticate?: string }).wwwAuthenticate = 'Bearer realm="typevisor"';
  return e;
}

export const LOGIN_ROUTES: Route[] = [
  route({
    method: "POST", url: "/v1/login", operationId: "login", summary: "Log in with a password (and a TOTP or recovery code): an expiring session token", permission: "tokens:own", public: true, body: loginBody, query: loginQuery,
    description: `No credentials needed. An admin, and any user with MFA on, must give \`totp\` or \`recoveryCode\`. The session lasts ${SESSION_HOURS} h; POST /v1/logout ends it. Failed logins are rate-limited per user and per address (429 with Retry-After).`,
    responses: { 201: { description: "logged in", schema: session } },
    handler: async ({ auth, body, query, request, reply, manager }) => {
      // a login form posted from another site must not log this browser in (login CSRF): the same header check as the cookie's other requests
      if (query.cookie === true) checkCsrf(request.raw);
      const from = request.raw.socket.remoteAddress ?? "unix socket";
      const { byUser, byAddress } = throttlesOf(auth.identities);
      const userKey = `user ${body.user}`;
      const base = { user: body.user, peer: from, action: "auth.login" };
      const wait = Math.max(byUser.lockedFor(userKey), byAddress.lockedFor(from));
      if (wait > 0) {
        record(auth.audit, { ...base, result: "refused", detail: "locked out (not checked)" });
        throw tooMany(wait, byUser.lockedFor(userKey) > 0 ? `for ${body.user}` : `from ${from}`);
      }
      const got = await auth.identities.checkLogin(body);
      if ("refused" in got) {
        // A right password without the second factor it needs is no guess: not counted, and said plainly.
        if (got.refused === "admin without MFA" || got.refused === "MFA code missing") {
          record(auth.audit, { ...base, result: "refused", detail: got.refused });
          if (got.refused === "admin without MFA") {
            throw new TypevisorError("MFA_REQUIRED", `${body.user} is an admin: an admin's password login needs MFA, and ${body.user} has none enabled`, { hint: `enable it first over the unix socket as root: typevisor user mfa enable ${body.user}` });
          }
          throw badLogin(`${body.user} has MFA on: give the authenticator's code (totp) or a recovery code`);
        }
        const lockUser = byUser.fail(userKey);
        const lockAddress = byAddress.fail(from);
        record(auth.audit, { ...base, result: "refused", detail: got.refused });
        for (const [lock, who] of [[lockUser, `user ${body.user}`], [lockAddress, `address ${from}`]] as const) {
          if (lock === 0) continue;
          const detail = `${who} locked out for ${Math.ceil(lock / 1000)} s after repeated failed logins`;
          record(auth.audit, { ...base, action: "auth.lockout", result: "locked", detail });
          manager.daemonEvent("auth.lockout", detail, { user: body.user, peer: from, seconds: Math.ceil(lock / 1000) });
        }
        throw badLogin("wrong user name, password or code");
      }
      byUser.succeed(userKey);
      byAddress.succeed(from);
      const u = got.user;
      const t = auth.identities.createToken({ user: u.name, scopes: scopesOf(u.vms), expiresInMs: SESSION_HOURS * 3_600_000, session: true });
      record(auth.audit, { ...base, token: t.id, result: "ok", detail: `session for ${SESSION_HOURS} h (${got.factor})` });
      const { vms, token, ...rest } = t;
      if (query.cookie === true) void reply.header("set-cookie", sessionCookie(request.raw, token, SESSION_HOURS * 3600));
      return { ...rest, ...(query.cookie === true ? {} : { token }), ...(vms !== undefined ? { scopes: scopesOf(vms) } : {}) };
    },
  }),
  route({
    method: "POST", url: "/v1/logout", operationId: "logout", summary: "Revoke the token this request carries (a session, or an API token)", permission: "tokens:own",
    responses: { 204: { description: "revoked" } },
    handler: async ({ auth, reply, request }) => {
      const id = auth.principal.tokenId;
      if (id === undefined) throw new TypevisorError("INVALID_REQUEST", "this request carries no token to log out of (the unix socket's uid is no session)");
      auth.identities.revokeToken(id);
      // the web console's cookie goes with it
      if (request.headers.cookie?.includes(`${SESSION_COOKIE}=`) === true) void reply.header("set-cookie", clearedCookie(request.raw));
      void reply.code(204).send();
      return HANDLED;
    },
  }),
  route({
    method: "GET", url: "/v1/session", operationId: "whoami", summary: "Who this request is authenticated as: user, role, VM scope and permissions", permission: "tokens:own",
    responses: { 200: { description: "the caller", schema: whoami } },
    handler: async ({ auth }) => {
      const p = auth.principal;
      return { user: p.user, role: p.role, ...(p.vms !== undefined ? { scopes: scopesOf(p.vms) } : {}), permissions: PERMISSIONS.filter((x) => can(p, x)), ...(p.tokenId !== undefined ? { tokenId: p.tokenId } : {}) };
    },
  }),
  route({
    method: "POST", url: "/v1/users/:user/mfa", operationId: "enableMfa", summary: "Turn on TOTP for a user: its otpauth URI and recovery codes (in this answer only)", permission: "users:admin", params: userParams,
    responses: { 201: { description: "enabled", schema: mfaEnabled } },
    handler: async ({ auth, params }) => ({ user: params.user, ...auth.identities.enableMfa(params.user) }),
  }),
  route({
    method: "DELETE", url: "/v1/users/:user/mfa", operationId: "disableMfa", summary: "Turn off a user's TOTP (and its recovery codes)", permission: "users:admin", params: userParams,
    responses: { 204: { description: "disabled" } },
    handler: async ({ auth, params, reply }) => {
      auth.identities.disableMfa(params.user);
      void reply.code(204).send();
      return HANDLED;
    },
  }),
];
