/**
 * The daemon's HTTP API (fastify): REST over a unix socket (owner-only, so
 * the file mode is the access control) and optionally TCP on loopback. Every
 * request is validated with the route's zod schemas; every error leaves as
 * problem+json.
 */
import { chmodSync, existsSync, unlinkSync } from "node:fs";
import { createServer, type IncomingMessage, type Server } from "node:http";
import { connect, type Socket } from "node:net";
import type { Duplex } from "node:stream";
import Fastify, { type FastifyBaseLogger, type FastifyInstance } from "fastify";
import type { Logger } from "pino";
import { z } from "zod";
import type { VmManager } from "../control/manager.js";
import { isActive } from "../control/state.js";
import { TypevisorError } from "../errors.js";
import { createMetrics } from "./metrics.js";
import { openApiDocument } from "./openapi.js";
import { problem, toProblem, type Problem } from "./problem.js";
import { HANDLED, ROUTES, notFound, type StreamLimits } from "./routes.js";
import { vmName } from "./schemas.js";

const BODY_LIMIT = 64 * 1024;

function parse<T>(s: z.ZodType<T> | undefined, value: unknown, where: string): T {
  if (s === undefined) return undefined as T;
  const r = s.safeParse(value);
  if (r.success) return r.data;
  const detail = r.error.issues.map((i) => `${where}${i.path.length > 0 ? "." + i.path.join(".") : ""}: ${i.message}`).join("; ");
  throw new TypevisorError("INVALID_REQUEST", detail);
}

export function buildApi(manager: VmManager, logger: Logger, limits: StreamLimits = DEFAULT_STREAM_LIMITS): FastifyInstance {
  const app = Fastify({ loggerInstance: logger as FastifyBaseLogger, bodyLimit: BODY_LIMIT, disableRequestLogging: true, return503OnClosing: false });
  const sendProblem = (reply: import("fastify").FastifyReply, p: Problem): unknown => reply.code(p.status).type("application/problem+json").send(p);

  app.setErrorHandler((err, request, reply) => {
    const p = toProblem(err);
    if (p.status >= 500) request.log.error({ err, url: request.url }, "request failed");
    return sendProblem(reply, p);
  });
  app.setNotFoundHandler((request, reply) => sendProblem(reply, toProblem(notFound(request.method, request.url))));

  for (const r of ROUTES) {
    const okStatus = Number(Object.keys(r.responses).find((s) => s.startsWith("2")) ?? 200);
    app.route({
      method: r.method,
      url: r.url,
      handler: async (request, reply) => {
        const params = parse(r.params, request.params, "path");
        const query = parse(r.query, r.query !== undefined ? request.query : {}, "query");
        // A route without a body schema takes none; JSON `null`/absent both mean "no body".
        const body = parse(r.body, request.body ?? undefined, "body");
        if (r.query === undefined && Object.keys(request.query as object).length > 0) {
          throw new TypevisorError("INVALID_REQUEST", `query: ${r.method} ${r.url} takes no query parameters`);
        }
        const out = await r.handler({ params, query, body, manager, request, reply, limits });
        if (out === HANDLED) return reply;
        return reply.code(okStatus).send(out);
      },
    });
  }

  const doc = openApiDocument();
  app.get("/openapi.json", async () => doc);
  const metrics = createMetrics(manager);
  app.get("/metrics", async (_req, reply) => reply.type(metrics.contentType).send(await metrics.metrics()));
  return app;
}

/**
 * GET /v1/vms/NAME/console/attach with `Upgrade: tcp`: after 101 the
 * connection is spliced to the VMM's console socket (the way Docker's attach
 * hijacks its connection). Many clients may attach at once.
 */
function attachHandler(manager: VmManager, attached: Set<Duplex>): (req: IncomingMessage, socket: Duplex, head: Buffer) => void {
  const fail = (socket: Duplex, p: Problem): void => {
    const body = JSON.stringify(p);
    socket.end(`HTTP/1.1 ${p.status} ${p.code}\r\ncontent-type: application/problem+json\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`);
  };
  return (req, socket, head) => {
    // A client may reset the connection at any point, even before our answer: without a listener
    // that 'error' would be thrown from the socket and end the daemon.
    socket.on("error", () => socket.destroy());
    const m = /^\/v1\/vms\/([^/?]+)\/console\/attach(?:\?.*)?$/.exec(req.url ?? "");
    if (req.method !== "GET" || m === null) return fail(socket, toProblem(notFound(req.method ?? "", req.url ?? "")));
    let name: string;
    try {
      name = decodeURIComponent(m[1]!);
    } catch {
      // URIError: a malformed percent-encoding ("%E0%A4%A")
      return fail(socket, problem(400, "INVALID_REQUEST", "path.name: malformed percent-encoding"));
    }
    if (!vmName.safeParse(name).success) return fail(socket, problem(400, "INVALID_REQUEST", "path.name: not a VM name"));
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
      // Upgraded connections are the server's no more (closeAllConnections skips them), yet
      // server.close() waits for them: the daemon's close ends them itself.
      attached.add(socket);
      socket.once("close", () => attached.delete(socket));
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
  tcp?: { host: string; port: number };
}

export const DEFAULT_STREAM_LIMITS: StreamLimits = { streamStallMs: 30_000 };

export interface RunningApi {
  close(): Promise<void>;
  tcpAddress?: { host: string; port: number };
}

export async function startApi(manager: VmManager, logger: Logger, l: Listeners, limits: StreamLimits = DEFAULT_STREAM_LIMITS): Promise<RunningApi> {
  const app = buildApi(manager, logger, limits);
  await app.ready();
  const servers: Server[] = [];
  const attached = new Set<Duplex>();
  const onUpgrade = attachHandler(manager, attached);
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
  unix.on("upgrade", onUpgrade);
  await listen(unix, l.socketPath);
  // Whoever can open the socket controls every VM: owner only.
  chmodSync(l.socketPath, 0o600);
  servers.push(unix);
  let tcpAddress: RunningApi["tcpAddress"];
  if (l.tcp !== undefined) {
    const tcp = createServer((req, res) => app.routing(req, res));
    tcp.on("upgrade", onUpgrade);
    await listen(tcp, l.tcp);
    const a = tcp.address();
    if (a !== null && typeof a === "object") tcpAddress = { host: a.address, port: a.port };
    servers.push(tcp);
  }
  return {
    ...(tcpAddress !== undefined ? { tcpAddress } : {}),
    async close() {
      for (const c of attached) c.destroy();
      for (const s of servers) {
        s.closeAllConnections();
        await new Promise<void>((r) => s.close(() => r()));
      }
      await app.close();
      if (existsSync(l.socketPath)) unlinkSync(l.socketPath);
    },
  };
}
