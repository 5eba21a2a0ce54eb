/**
 * The daemon's HTTP API (fastify): REST over a unix socket (root and the
 * socket group only) and optionally HTTPS over TCP. Every request, whatever
 * it asks for (the route table, /openapi.json, /metrics, an unknown path, the
 * console-attach upgrade), passes one gate first: authenticate, authorize with
 * the permission the route declares, then the handler (auth.ts,
 * docs/security.md). Every request is validated with the route's zod schemas;
 * every error leaves as problem+json.
 */
import { chmodSync, chownSync, existsSync, unlinkSync } from "node:fs";
import { createServer, type IncomingMessage, type Server } from "node:http";
import { createServer as createHttpsServer } from "node:https";
import { connect, type Socket } from "node:net";
import type { Duplex } from "node:stream";
import Fastify, { type FastifyBaseLogger, type FastifyInstance } from "fastify";
import type { Logger } from "pino";
import { z } from "zod";
import type { AuditLog } from "../control/audit.js";
import type { Identities, Principal } from "../control/identity.js";
import type { VmManager } from "../control/manager.js";
import { isActive } from "../control/state.js";
import { TypevisorError } from "../errors.js";
import { peerCred, socketFd, type PeerCred } from "../sys/peercred.js";
import { AnonymousCounter, authenticate, authorize, AuthThrottle, wwwAuthenticate, type Gate, type Guard } from "./auth.js";
import { createMetrics } from "./metrics.js";
import { openApiDocument } from "./openapi.js";
import { problem, toProblem, type Problem } from "./problem.js";
import { HANDLED, notFound, type StreamLimits } from "./routes.js";
import { API_ROUTES } from "./table.js";
import { vmName } from "./schemas.js";
import { checkCsrf, consoleWebSocket, cookieToBearer, registerWebAssets, WEB_GUARDS } from "./web.js";

const BODY_LIMIT = 64 * 1024;

function parse<T>(s: z.ZodType<T> | undefined, value: unknown, where: string): T {
  if (s === undefined) return undefined as T;
  const r = s.safeParse(value);
  if (r.success) return r.data;
  const detail = r.error.issues.map((i) => `${where}${i.path.length > 0 ? "." + i.path.join(".") : ""}: ${i.message}`).join("; ");
  throw new TypevisorError("INVALID_REQUEST", detail);
}

/** The daemon's identities and audit log, and who may reach the socket. */
export interface ApiSecurity {
  identities: Identities;
  audit: AuditLog;
  /** The unix socket's group (`--socket-group`), when it exists: its members may connect. */
  socketGid?: number;
  /** HTTPS for the TCP listener: PEM certificate and key, and the certificate's SHA-256 fingerprint. */
  tls?: { cert: string; key: string; fingerprint: string };
  throttle?: AuthThrottle;
  /** uid → login name (default: /etc/passwd). */
  userName?: (uid: number) => string | undefined;
}

/** The routes served outside the REST table, with what they need: the same gate guards them. */
export const SERVER_GUARDS = {
  openapi: { method: "GET", url: "/openapi.json", permission: "host:read" },
  metrics: { method: "GET", url: "/metrics", permission: "metrics:read", hostWide: true },
  attach: { method: "GET", url: "/v1/vms/:name/console/attach", permission: "vm:console-input", target: "path" },
} as const satisfies Record<string, Guard>;

/** Every route the daemon serves, each with its permission: what the gate checks and the tests walk. */
export function allGuards(): Guard[] {
  return [...API_ROUTES, ...Object.values(SERVER_GUARDS), ...Object.values(WEB_GUARDS)];
}

/** SO_PEERCRED of each unix-socket connection, read once when it is accepted. */
export type Peers = WeakMap<object, PeerCred>;

declare module "fastify" {
  interface FastifyRequest {
    principal?: Principal;
  }
}

/** The VM a request names, where the route says it is (Guard.target). */
function targetOf(t: Guard["target"], params: unknown, query: unknown, body: unknown): { name: string | undefined } | undefined {
  const field = (o: unknown, k: string): string | undefined => {
    const v = (o as Record<string, unknown> | undefined)?.[k];
    return typeof v === "string" ? v : undefined;
  };
  if (t === "path") return { name: field(params, "name") };
  if (t === "body") return { name: field(body, "name") };
  if (t === "query") return { name: field(query, "vm") };
  return undefined;
}

function gateOf(sec: ApiSecurity, throttle: AuthThrottle): Gate {
  return {
    identities: sec.identities,
    audit: sec.audit,
    throttle,
    anonymous: new AnonymousCounter(),
    ownUid: process.getuid?.() ?? 0,
    ...(sec.socketGid !== undefined ? { socketGid: sec.socketGid } : {}),
    ...(sec.userName !== undefined ? { userName: sec.userName } : {}),
  };
}

/** Headers a refusal carries: WWW-Authenticate on 401 (RFC 9110 §11.6.1), Retry-After on 429 (RFC 6585 §4). */
function refusalHeaders(e: unknown): Record<string, string> {
  const h: Record<string, string> = {};
  const www = wwwAuthenticate(e);
  if (www !== undefined) h["www-authenticate"] = www;
  else if ((e as { code?: string } | undefined)?.code === "UNAUTHENTICATED") h["www-authenticate"] = 'Bearer realm="typevisor"';
  const retry = (e as { retryAfter?: number } | undefined)?.retryAfter;
  if (retry !== undefined) h["retry-after"] = String(retry);
  return h;
}

const READ_METHODS = new Set(["GET", "HEAD", "OPTIONS"]);

/** Fastify's compiler factories where no route has a JSON schema: one asked for anyway is a bug here. */
const noSchemaCompiler = (): never => {
  throw new TypevisorError("INTERNAL", "a route gave fastify a JSON schema: this API checks requests with zod");
};

export function buildApi(manager: VmManager, logger: Logger, limits: StreamLimits, sec: ApiSecurity, peers: Peers, gate: Gate = gateOf(sec, sec.throttle ?? new AuthThrottle())): FastifyInstance {
  const app = Fastify({
    loggerInstance: logger as FastifyBaseLogger, bodyLimit: BODY_LIMIT, disableRequestLogging: true, return503OnClosing: false,
    // No route gives fastify a JSON schema (each request is checked with its route's zod schemas,
    // below), so its default compilers (ajv, fast-json-stringify) would never run; fastify loads
    // them unless given others, and that was ~125 ms of the daemon's ~830 ms start on the host.
    schemaController: { compilersFactory: { buildValidator: noSchemaCompiler, buildSerializer: noSchemaCompiler } },
  });
  const sendProblem = (reply: import("fastify").FastifyReply, p: Problem): unknown => reply.code(p.status).type("application/problem+json").send(p);
  /** Requests the gate refused: it audited them already. */
  const refused = new WeakSet<object>();

  app.setErrorHandler((err, request, reply) => {
    const p = toProblem(err);
    if (p.status >= 500) request.log.error({ err, url: request.url }, "request failed");
    void reply.headers(refusalHeaders(err));
    return sendProblem(reply, p);
  });
  app.setNotFoundHandler((request, reply) => sendProblem(reply, toProblem(notFound(request.method, request.url))));

  // The gate's first half, for every request fastify receives (unknown paths too): who is asking.
  const open = new Set(([...API_ROUTES, ...Object.values(WEB_GUARDS)] as Guard[]).filter((r) => r.public === true).map((r) => `${r.method} ${r.url}`));
  app.addHook("onRequest", async (request) => {
    // POST /v1/login (its handler checks the credentials: login-routes.ts) and the web console's files (web.ts)
    // (HEAD is GET without the body: fastify answers it from the GET route)
    if (open.has(`${request.method === "HEAD" ? "GET" : request.method} ${request.routeOptions.url ?? ""}`)) return;
    try {
      // the web console's session cookie stands for a bearer token (web.ts)
      const viaCookie = cookieToBearer(request.raw);
      request.principal = authenticate(gate, request.raw, peers.get(request.raw.socket));
      // and what a cookie-authenticated request changes needs the CSRF header: refused (and audited) before anything is looked at
      if (viaCookie && !READ_METHODS.has(request.method)) {
        try {
          checkCsrf(request.raw);
        } catch (e) {
          const p = request.principal;
          try {
            sec.audit.record({ user: p.user, ...(p.tokenId !== undefined ? { token: p.tokenId } : {}), peer: p.from, action: `${request.method} ${request.routeOptions.url ?? request.url.split("?")[0]!.slice(0, 200)}`, result: "refused", detail: "session cookie without the CSRF header (a cross-site request?)" });
          } catch {
            /* the refusal stands */
          }
          throw e;
        }
      }
    } catch (e) {
      refused.add(request.raw);
      throw e;
    }
  });
  // Every mutating request, whatever its outcome, in the audit log (refusals were recorded at the gate).
  app.addHook("onResponse", async (request, reply) => {
    const p = request.principal;
    if (READ_METHODS.has(request.method) || p === undefined || refused.has(request.raw)) return;
    const params = request.params as Record<string, unknown> | undefined;
    const body = request.body as Record<string, unknown> | undefined;
    // names only: never a body (a password, a spec), never a token
    const target = [params?.["name"], params?.["user"], params?.["id"], body?.["name"], body?.["user"]].find((v): v is string => typeof v === "string");
    try {
      sec.audit.record({
        user: p.user,
        ...(p.tokenId !== undefined ? { token: p.tokenId } : {}),
        peer: p.from,
        action: `${request.method} ${request.routeOptions.url ?? request.url.split("?")[0]!.slice(0, 200)}`,
        ...(target !== undefined ? { target: target.slice(0, 200) } : {}),
        result: String(reply.statusCode),
      });
    } catch (e) {
      request.log.error({ err: e }, "the audit log could not be written");
    }
  });

  /** The gate's second half: the route's permission (and the caller's VM scope), then the handler. */
  const guard = (request: import("fastify").FastifyRequest, g: Guard, target?: { name: string | undefined }): Principal => {
    const p = request.principal;
    if (p === undefined) throw new TypevisorError("UNAUTHENTICATED", "authentication required"); // unreachable: onRequest set it or refused
    try {
      authorize(gate, p, g, target);
    } catch (e) {
      refused.add(request.raw);
      throw e;
    }
    return p;
  };

  for (const r of API_ROUTES) {
    const okStatus = Number(Object.keys(r.responses).find((s) => s.startsWith("2")) ?? 200);
    app.route({
      method: r.method,
      url: r.url,
      handler: async (request, reply) => {
        // the permission before anything of the request is looked at
        const principal = r.public === true ? { user: "-", role: "viewer" as const, from: request.raw.socket.remoteAddress ?? "unix socket" } : guard(request, r);
        const params = parse(r.params, request.params, "path");
        const query = parse(r.query, r.query !== undefined ? request.query : {}, "query");
        // A route without a body schema takes none; JSON `null`/absent both mean "no body".
        const body = parse(r.body, request.body ?? undefined, "body");
        if (r.query === undefined && Object.keys(request.query as object).length > 0) {
          throw new TypevisorError("INVALID_REQUEST", `query: ${r.method} ${r.url} takes no query parameters`);
        }
        // then the VM it names against the caller's scope
        if (r.target !== undefined) guard(request, r, targetOf(r.target, params, query, body));
        const auth = { principal, identities: sec.identities, audit: sec.audit, ...(sec.tls !== undefined ? { tlsFingerprint: sec.tls.fingerprint } : {}) };
        const out = await r.handler({ params, query, body, manager, request, reply, limits, auth });
        if (out === HANDLED) return reply;
        return reply.code(okStatus).send(out);
      },
    });
  }

  registerWebAssets(app);
  // Made at the first request for it, not at start: converting every route's zod schemas to JSON
  // Schema was ~50 ms of the daemon's start on the host (seconds in the lab), for a document few ask for.
  let doc: ReturnType<typeof openApiDocument> | undefined;
  app.get(SERVER_GUARDS.openapi.url, async (request) => {
    guard(request, SERVER_GUARDS.openapi);
    doc ??= openApiDocument();
    return doc;
  });
  const metrics = createMetrics(manager, sec.audit);
  app.get(SERVER_GUARDS.metrics.url, async (request, reply) => {
    guard(request, SERVER_GUARDS.metrics);
    return reply.type(metrics.contentType).send(await metrics.metrics());
  });
  return app;
}

/**
 * GET /v1/vms/NAME/console/attach with `Upgrade: tcp`: after 101 the
 * connection is spliced to the VMM's console socket (the way Docker's attach
 * hijacks its connection). Many clients may attach at once.
 */
function attachHandler(manager: VmManager, gate: Gate, peers: Peers): (req: IncomingMessage, socket: Duplex, head: Buffer) => void {
  const send = (socket: Duplex, p: Problem, headers: Record<string, string> = {}): void => {
    const body = JSON.stringify(p);
    const extra = Object.entries(headers).map(([k, v]) => `${k}: ${v}\r\n`).join("");
    socket.end(`HTTP/1.1 ${p.status} ${p.code}\r\ncontent-type: application/problem+json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n${extra}connection: close\r\n\r\n${body}`);
  };
  return (req, socket, head) => {
    // A client may reset the connection at any point, even before our answer: without a listener
    // that 'error' would be thrown from the socket and end the daemon.
    socket.on("error", () => socket.destroy());
    // The same gate as every other request, before anything else is looked at.
    let principal: Principal;
    try {
      principal = authenticate(gate, req, peers.get(socket));
      authorize(gate, principal, SERVER_GUARDS.attach);
    } catch (e) {
      return send(socket, toProblem(e), refusalHeaders(e));
    }
    let name = "";
    const record = (result: string, detail?: string): void => {
      try {
        gate.audit.record({ user: principal.user, ...(principal.tokenId !== undefined ? { token: principal.tokenId } : {}), peer: principal.from, action: "console.attach", ...(name !== "" ? { target: name } : {}), result, ...(detail !== undefined ? { detail } : {}) });
      } catch {
        /* a full disk: the attach's own outcome stands */
      }
    };
    const fail = (socket: Duplex, p: Problem): void => {
      record(String(p.status), p.code);
      send(socket, p);
    };
    const m = /^\/v1\/vms\/([^/?]+)\/console\/attach(?:\?.*)?$/.exec(req.url ?? "");
    if (req.method !== "GET" || m === null) return fail(socket, toProblem(notFound(req.method ?? "", req.url ?? "")));
    try {
      name = decodeURIComponent(m[1]!);
    } catch {
      // URIError: a malformed percent-encoding ("%E0%A4%A")
      return fail(socket, problem(400, "INVALID_REQUEST", "path.name: malformed percent-encoding"));
    }
    if (!vmName.safeParse(name).success) {
      name = "";
      return fail(socket, problem(400, "INVALID_REQUEST", "path.name: not a VM name"));
    }
    try {
      authorize(gate, principal, SERVER_GUARDS.attach, { name });
    } catch (e) {
      return send(socket, toProblem(e)); // audited by the gate
    }
    // Only the raw-TCP upgrade is spoken here (RFC 9110 §7.8): a WebSocket or h2c client gets a clear 400, not a byte stream it cannot frame.
    if ((req.headers.upgrade ?? "").toLowerCase() !== "tcp") return fail(socket, problem(400, "INVALID_REQUEST", "console attach takes `Upgrade: tcp`"));
    let paths: ReturnType<VmManager["consolePaths"]>;
    try {
      paths = manager.consolePaths(name);
    } catch (e) {
      return fail(socket, toProblem(e));
    }
    if (!isActive(paths.state)) return fail(socket, problem(409, "VM_STATE", `VM ${name} is ${paths.state}: its console is live only while it runs`));
    const vmm: Socket = connect(paths.socket);
    // No socket (yet, or any more) while the VMM starts or stops is the VM's state, not a failure: 409, as for a stopped VM.
    vmm.once("error", (e: NodeJS.ErrnoException) =>
      fail(socket, e.code === "ENOENT" || e.code === "ECONNREFUSED" ? problem(409, "VM_STATE", `VM ${name}: its console is not available (the VMM is starting or stopping)`) : problem(502, "VMM_UNREACHABLE", `console socket: ${e.message}`)),
    );
    vmm.once("connect", () => {
      vmm.removeAllListeners("error");
      // Upgraded: the HTTP server counts it as its own no more, yet server.close() waits for it (startApi's close ends it).
      record("ok");
      socket.write("HTTP/1.1 101 Switching Protocols\r\nupgrade: tcp\r\nconnection: Upgrade\r\n\r\n");
      if (head.length > 0) vmm.write(head);
      socket.pipe(vmm);
      vmm.pipe(socket);
      const close = (): void => {
        socket.destroy();
        vmm.destroy();
      };
      socket.on("error", close);
      vmm.on("error", close);
      socket.on("close", close);
      vmm.on("close", close);
    });
  };
}

export interface Listeners {
  socketPath: string;
  /** HTTPS (ApiSecurity.tls is required with it). */
  tcp?: { host: string; port: number };
}

export const DEFAULT_STREAM_LIMITS: StreamLimits = { streamStallMs: 30_000 };

export interface RunningApi {
  close(): Promise<void>;
  tcpAddress?: { host: string; port: number };
}

export async function startApi(manager: VmManager, logger: Logger, l: Listeners, sec: ApiSecurity, limits: StreamLimits = DEFAULT_STREAM_LIMITS): Promise<RunningApi> {
  const peers: Peers = new WeakMap();
  const gate = gateOf(sec, sec.throttle ?? new AuthThrottle());
  const app = buildApi(manager, logger, limits, sec, peers, gate);
  await app.ready();
  const servers: Server[] = [];
  // Every socket of every listener, until it closes: close() ends them all, those the HTTP server
  // no longer counts as its own included (an attached console, a console WebSocket: upgraded),
  // which otherwise kept server.close() waiting forever: the daemon hung at shutdown after a
  // fuzzer's requests (test/api/fuzz.test.ts, seed 1176699468).
  const sockets = new Set<Duplex>();
  const track = (s: Server): void => {
    s.on("connection", (sock: Duplex) => {
      sockets.add(sock);
      sock.once("close", () => sockets.delete(sock));
    });
  };
  const attach = attachHandler(manager, gate, peers);
  const consoleWs = consoleWebSocket(manager, gate, (s) => peers.get(s));
  const onUpgrade = (req: IncomingMessage, socket: Duplex, head: Buffer): void => {
    if (!consoleWs.handle(req, socket, head)) attach(req, socket, head);
  };
  const listen = (srv: Server, target: string | { host: string; port: number }): Promise<void> =>
    new Promise((resolve, reject) => {
      srv.once("error", reject);
      const done = (): void => {
        srv.off("error", reject);
        resolve();
      };
      if (typeof target === "string") srv.listen(target, done);
      else srv.listen(target.port, target.host, done);
    });

  if (existsSync(l.socketPath)) unlinkSync(l.socketPath); // the caller checked no daemon answers there
  const unix = createServer((req, res) => app.routing(req, res));
  // Who connected, as the kernel saw it at connect(2): read once per connection, before any request on it.
  unix.on("connection", (s: Socket) => {
    const fd = socketFd(s);
    try {
      if (fd !== undefined) peers.set(s, peerCred(fd));
    } catch (e) {
      logger.warn({ err: e }, "SO_PEERCRED failed: the connection is treated as unauthenticated");
    }
  });
  unix.on("upgrade", onUpgrade);
  // Bound under the daemon's umask 077 (srwx------): nobody else can connect before the mode below.
  await listen(unix, l.socketPath);
  if (sec.socketGid !== undefined) {
    // root and the socket group: each member is then mapped to its inventory user (auth.ts)
    chownSync(l.socketPath, process.getuid?.() ?? 0, sec.socketGid);
    chmodSync(l.socketPath, 0o660);
  } else {
    chmodSync(l.socketPath, 0o600);
  }
  track(unix);
  servers.push(unix);
  let tcpAddress: RunningApi["tcpAddress"];
  if (l.tcp !== undefined) {
    // HTTPS only: bearer tokens must never cross a network in the clear.
    if (sec.tls === undefined) throw new TypevisorError("INVALID_ARGUMENT", "a TCP listener needs TLS (a certificate and key)");
    const tcp = createHttpsServer({ cert: sec.tls.cert, key: sec.tls.key, minVersion: "TLSv1.2" }, (req, res) => app.routing(req, res)) as unknown as Server;
    tcp.on("upgrade", onUpgrade);
    await listen(tcp, l.tcp);
    const a = tcp.address();
    if (a !== null && typeof a === "object") tcpAddress = { host: a.address, port: a.port };
    track(tcp);
    servers.push(tcp);
  }
  return {
    ...(tcpAddress !== undefined ? { tcpAddress } : {}),
    async close() {
      const closed = servers.map((s) => new Promise<void>((r) => s.close(() => r())));
      for (const sock of sockets) sock.destroy();
      consoleWs.close();
      await Promise.all(closed);
      await app.close();
      if (existsSync(l.socketPath)) unlinkSync(l.socketPath);
    },
  };
}
