/**
 * The one gate every request passes (docs/security.md): authenticate, then authorize, then the
 * handler. server.ts calls authenticate() for every request it receives (fastify's onRequest hook,
 * so unknown paths too, and the console-attach upgrade, which does not go through fastify), and
 * authorize() with the route's declared permission before any handler runs.
 *
 * Who the caller is:
 * - `Authorization: Bearer TOKEN` (RFC 6750 §2.1), on any listener;
 * - else, on the unix socket, the peer's uid from SO_PEERCRED: uid 0 (and the daemon's own uid)
 *   is admin; any other uid must belong to the socket's group and be an inventory user of the
 *   same login name;
 * - else 401 with `WWW-Authenticate: Bearer` (RFC 6750 §3).
 *
 * Failed token attempts are counted per address (the TCP client's address; the uid on the unix
 * socket): past FREE_FAILURES, each failure locks the address out for twice as long as the one
 * before (1 s, 2 s, 4 s, ... at most 15 min), during which any request carrying credentials is
 * answered 429 with Retry-After without being checked. Refusals and failures go to the audit log.
 */
import type { IncomingMessage } from "node:http";
import type { AuditInput, AuditLog } from "../control/audit.js";
import { can, inScope, type Identities, type Permission, type Principal } from "../control/identity.js";
import { TypevisorError } from "../errors.js";
import { userName, type PeerCred } from "../sys/peercred.js";

/** What a route declares about its caller (routes.ts). */
export interface Guard {
  method: string;
  url: string;
  permission: Permission;
  /**
   * Where the VM the request acts on is named, for callers scoped to VMs: the path's `name`, the
   * body's `name` (create) or the query's `vm` (events).
   */
  target?: "path" | "body" | "query";
  /** Reveals every VM (metrics): refused to callers scoped to VMs. */
  hostWide?: boolean;
  /** Needs no credentials (login: its handler checks the password itself). */
  public?: true;
}

export const FREE_FAILURES = 3;
export const MAX_LOCKOUT_MS = 15 * 60_000;
/** A failure is forgotten after this long without another from the same address. */
const FORGET_MS = 15 * 60_000;
/** Addresses tracked at most (the oldest is forgotten first): a flood of sources costs bounded memory. */
const MAX_TRACKED = 10_000;

export class AuthThrottle {
  private readonly failures = new Map<string, { n: number; last: number; until: number }>();

  constructor(private readonly now: () => number = Date.now) {}

  /** Milliseconds `from` must still wait, 0 if it may try. */
  lockedFor(from: string): number {
    const f = this.failures.get(from);
    if (f === undefined) return 0;
    const t = this.now();
    if (t - f.last > FORGET_MS) {
      this.failures.delete(from);
      return 0;
    }
    return Math.max(0, f.until - t);
  }

  /** Count a failure; returns the lock-out it starts (0: none yet). */
  fail(from: string): number {
    const t = this.now();
    const prev = this.failures.get(from);
    const n = prev !== undefined && t - prev.last <= FORGET_MS ? prev.n + 1 : 1;
    const lock = n > FREE_FAILURES ? Math.min(MAX_LOCKOUT_MS, 1000 * 2 ** (n - FREE_FAILURES - 1)) : 0;
    this.failures.delete(from); // re-inserted last: the map's order is the eviction order
    this.failures.set(from, { n, last: t, until: t + lock });
    if (this.failures.size > MAX_TRACKED) this.failures.delete(this.failures.keys().next().value!);
    return lock;
  }

  succeed(from: string): void {
    this.failures.delete(from);
  }
}

/** Counts requests without credentials per address, so that at most one a minute is recorded each. */
export class AnonymousCounter {
  private readonly seen = new Map<string, { last: number; since: number }>();

  constructor(private readonly now: () => number = Date.now, private readonly everyMs = 60_000) {}

  /** Whether to record this one, and how many went unrecorded since the last recorded one. */
  note(from: string): { record: boolean; since: number } {
    const t = this.now();
    const s = this.seen.get(from);
    if (s !== undefined && t - s.last < this.everyMs) {
      s.since++;
      return { record: false, since: s.since };
    }
    this.seen.delete(from);
    this.seen.set(from, { last: t, since: 0 });
    if (this.seen.size > MAX_TRACKED) this.seen.delete(this.seen.keys().next().value!);
    return { record: true, since: s?.since ?? 0 };
  }
}

export interface Gate {
  identities: Identities;
  audit: AuditLog;
  throttle: AuthThrottle;
  /** Requests without credentials, recorded at most once a minute per address. */
  anonymous?: AnonymousCounter;
  /** The socket group's gid, when the unix socket is open to a group. */
  socketGid?: number;
  /** The daemon's own uid: its owner is admin on the socket like root. */
  ownUid: number;
  /** uid → login name (tests give their own). */
  userName?: (uid: number) => string | undefined;
}

/** Who a connection comes from, for the audit log and the throttle. */
export function peerLabel(peer: PeerCred | undefined, address: string | undefined): string {
  if (peer !== undefined) return `uid ${peer.uid}`;
  return address ?? "unknown";
}

function unauthenticated(message: string, invalidToken = false): TypevisorError {
  const e = new TypevisorError("UNAUTHENTICATED", message, { hint: "send Authorization: Bearer TOKEN (typevisor token create), or use the unix socket as root or a member of its group" });
  (e as TypevisorError & { wwwAuthenticate?: string }).wwwAuthenticate = invalidToken ? 'Bearer realm="typevisor", error="invalid_token"' : 'Bearer realm="typevisor"';
  return e;
}

/** The WWW-Authenticate value a 401 error carries. */
export function wwwAuthenticate(e: unknown): string | undefined {
  return (e as { wwwAuthenticate?: string } | undefined)?.wwwAuthenticate;
}

function audit(g: Gate, e: AuditInput): void {
  try {
    g.audit.record(e);
  } catch {
    // A full disk must not turn a refusal into an acceptance or a 5xx: the refusal stands.
  }
}

/** `Bearer TOKEN`: the token, or undefined when the header is not of that form. */
export function bearerToken(header: string): string | undefined {
  // RFC 9110 §11.1: the scheme is case-insensitive; RFC 6750 §2.1: b64token, one space (we allow more).
  const m = /^Bearer +([A-Za-z0-9._~+/-]+=*) *$/i.exec(header);
  return m?.[1];
}

/**
 * The caller of `req`, or a TypevisorError: UNAUTHENTICATED (401), FORBIDDEN (403, a socket peer
 * that is no user), TOO_MANY_ATTEMPTS (429).
 */
export function authenticate(g: Gate, req: IncomingMessage, peer: PeerCred | undefined): Principal {
  const from = peerLabel(peer, req.socket.remoteAddress);
  const header = req.headers.authorization;
  const action = `${req.method ?? "?"} ${(req.url ?? "").split("?")[0]!.slice(0, 200)}`;
  if (header !== undefined) {
    const wait = g.throttle.lockedFor(from);
    if (wait > 0) {
      const e = new TypevisorError("TOO_MANY_ATTEMPTS", `too many failed authentication attempts from ${from}: try again in ${Math.ceil(wait / 1000)} s`);
      (e as TypevisorError & { retryAfter?: number }).retryAfter = Math.ceil(wait / 1000);
      throw e;
    }
    const token = bearerToken(header);
    const got = token !== undefined ? g.identities.authenticateToken(token, from) : { refused: "malformed" as const };
    if ("refused" in got) {
      const lock = g.throttle.fail(from);
      audit(g, { peer: from, action: "auth.token", result: "refused", detail: `${got.refused}${header.length > 0 && token === undefined ? " Authorization header (not Bearer TOKEN)" : " token"} on ${action}`, ...(got.tokenId !== undefined ? { token: got.tokenId } : {}) });
      if (lock > 0) audit(g, { peer: from, action: "auth.lockout", result: "locked", detail: `${Math.ceil(lock / 1000)} s after repeated failures` });
      throw unauthenticated(token === undefined ? "the Authorization header is not `Bearer TOKEN`" : "the token is not valid (unknown, wrong, expired or revoked)", true);
    }
    g.throttle.succeed(from);
    return got;
  }
  if (peer !== undefined) {
    if (peer.uid === 0 || peer.uid === g.ownUid) return { user: peer.uid === 0 ? "root" : ((g.userName ?? userName)(peer.uid) ?? `uid ${peer.uid}`), role: "admin", from };
    const name = (g.userName ?? userName)(peer.uid);
    if (g.socketGid !== undefined && peer.gid !== g.socketGid && !peer.groups.includes(g.socketGid)) {
      audit(g, { peer: from, ...(name !== undefined ? { user: name } : {}), action, result: "refused", detail: "not a member of the socket's group" });
      throw new TypevisorError("FORBIDDEN", `uid ${peer.uid} is not a member of the daemon's socket group`);
    }
    const u = name !== undefined ? g.identities.getUser(name) : undefined;
    if (u === undefined) {
      audit(g, { peer: from, ...(name !== undefined ? { user: name } : {}), action, result: "refused", detail: "no inventory user of that name" });
      throw new TypevisorError("FORBIDDEN", `${name ?? `uid ${peer.uid}`} is not a typevisor user`, { hint: `an admin adds it: typevisor user add ${name ?? "NAME"} --role viewer|operator|admin` });
    }
    return { user: u.name, role: u.role, ...(u.vms !== undefined ? { vms: u.vms } : {}), from };
  }
  // One entry per address a minute at most: requests without credentials cost a client nothing, and
  // an fsync'd row each would let anyone on the network fill the disk and the log.
  const n = g.anonymous?.note(from);
  if (n === undefined || n.record) audit(g, { peer: from, action, result: "refused", detail: `no credentials${n !== undefined && n.since > 0 ? ` (and ${n.since} more from ${from} in the minute before, not recorded one by one)` : ""}` });
  throw unauthenticated("authentication required");
}

/**
 * Is `p` allowed what `r` needs? Throws FORBIDDEN (403) naming the missing permission, or
 * VM_NOT_FOUND (404) for a VM outside a scoped caller's VMs: the same answer as for a VM that does
 * not exist, so a scoped token cannot learn which other VMs are there.
 * `vm`: the VM the request names (per r.target), when the request has been parsed.
 */
export function authorize(g: Gate, p: Principal, r: Guard, vm?: { name: string | undefined }): void {
  const refuse = (message: string, detail: string, target?: string): never => {
    audit(g, { user: p.user, ...(p.tokenId !== undefined ? { token: p.tokenId } : {}), peer: p.from, action: `${r.method} ${r.url}`, ...(target !== undefined ? { target } : {}), result: "refused", detail });
    throw new TypevisorError("FORBIDDEN", message);
  };
  if (!can(p, r.permission)) refuse(`${p.user} (role ${p.role}) lacks the permission ${r.permission} that ${r.method} ${r.url} needs`, `missing ${r.permission}`);
  if (p.vms === undefined) return;
  if (r.hostWide === true) refuse(`${r.method} ${r.url} shows every VM: a caller scoped to VMs (${p.vms.join(", ") || "none"}) cannot read it`, "scoped caller, host-wide route");
  if (r.target === undefined || vm === undefined) return;
  const name = vm.name;
  if (name === undefined) refuse(`${p.user} is scoped to VMs (${p.vms.join(", ") || "none"}): name one (?vm=NAME)`, "scoped caller, no VM named");
  if (inScope(p, name!)) return;
  if (r.target === "body") refuse(`${p.user} is scoped to VMs (${p.vms.join(", ") || "none"}): ${name!} is not one of them`, `VM ${name!} out of scope`, name);
  audit(g, { user: p.user, ...(p.tokenId !== undefined ? { token: p.tokenId } : {}), peer: p.from, action: `${r.method} ${r.url}`, target: name!, result: "refused", detail: "VM out of scope (answered 404)" });
  throw new TypevisorError("VM_NOT_FOUND", `no VM named ${name!}`);
}

export { can, inScope };
