/**
 * The REST API as one table: each route names its parameter, query and body
 * schemas (zod), which both validate the request and generate /openapi.json
 * (openapi.ts). Handlers only translate HTTP to VmManager calls.
 */
import type { FastifyReply, FastifyRequest } from "fastify";
import type { z } from "zod";
import type { AuditLog } from "../control/audit.js";
import { inScope, type Identities, type Permission, type Principal } from "../control/identity.js";
import type { VmManager } from "../control/manager.js";
import { TypevisorError } from "../errors.js";
import { followConsole, readConsole } from "./console.js";
import * as S from "./schemas.js";

export interface RouteContext<P, Q, B> {
  params: P;
  query: Q;
  body: B;
  manager: VmManager;
  request: FastifyRequest;
  reply: FastifyReply;
  limits: StreamLimits;
  /** Who asked (auth.ts), and the daemon's identities and audit log. */
  auth: ApiAuth;
}

export interface ApiAuth {
  principal: Principal;
  identities: Identities;
  audit: AuditLog;
  /** The HTTPS listener's certificate (SHA-256, colon-separated hex), when there is one. */
  tlsFingerprint?: string;
}

export interface StreamLimits {
  /** A stream client that takes nothing for this long is disconnected (`--stream-stall-timeout`). */
  streamStallMs: number;
}

/**
 * What a handler returns when it has answered itself (204, bytes, a stream).
 * Not the Reply: a Reply is thenable, so awaiting it would not give it back.
 */
export const HANDLED = Symbol("handled");

export interface ResponseDoc {
  description: string;
  schema?: z.ZodType;
  contentType?: string;
}

export interface Route {
  method: "GET" | "POST" | "PUT" | "DELETE";
  url: string;
  operationId: string;
  summary: string;
  description?: string;
  params?: z.ZodType;
  query?: z.ZodType;
  body?: z.ZodType;
  responses: Record<number, ResponseDoc>;
  /** The permission a caller needs (control/identity.ts): the one gate (auth.ts) checks it before the handler runs. */
  permission: Permission;
  /** Where the VM it acts on is named, for callers scoped to VMs (auth.ts Guard). */
  target?: "path" | "body" | "query";
  /** Shows every VM: refused to callers scoped to VMs. */
  hostWide?: boolean;
  /** Reachable without credentials (POST /v1/login only): the gate lets it through, the handler authenticates. */
  public?: true;
  /** What the handler returns is sent as JSON with the first 2xx status, unless it took over the reply. */
  handler: (ctx: RouteContext<any, any, any>) => Promise<unknown>; // eslint-disable-line @typescript-eslint/no-explicit-any -- each route's own schemas type its context; the table holds them all
}

export function route<P extends z.ZodType | undefined, Q extends z.ZodType | undefined, B extends z.ZodType | undefined>(
  r: Omit<Route, "handler" | "params" | "query" | "body"> & {
    params?: P;
    query?: Q;
    body?: B;
    handler: (ctx: RouteContext<P extends z.ZodType ? z.output<P> : undefined, Q extends z.ZodType ? z.output<Q> : undefined, B extends z.ZodType ? z.output<B> : undefined>) => Promise<unknown>;
  },
): Route {
  return r as Route;
}

const vmDoc = { 200: { description: "the VM", schema: S.vmInfo } };

export const VERSION = "0.1.0";

export const ROUTES: Route[] = [
  route({
    method: "GET", url: "/v1/health", operationId: "health", summary: "Is the daemon up", permission: "host:read",
    responses: { 200: { description: "up", schema: S.health } },
    handler: async () => ({ ok: true, version: VERSION, pid: process.pid }),
  }),
  route({
    method: "GET", url: "/v1/host", operationId: "getHost", summary: "Host capacity, budget (with overcommit), allocation and use", permission: "host:read",
    responses: { 200: { description: "per resource", schema: S.hostReport } },
    handler: async ({ manager, auth }) => ({ ...manager.host(), ...(auth.tlsFingerprint !== undefined ? { tls: { fingerprint: auth.tlsFingerprint } } : {}) }),
  }),
  route({
    method: "GET", url: "/v1/vms", operationId: "listVms", summary: "Every VM on this host (a caller scoped to VMs: those)", permission: "vm:read",
    responses: { 200: { description: "VMs by name", schema: S.vmList } },
    handler: async ({ manager, auth }) => ({ vms: manager.list().filter((v) => inScope(auth.principal, v.name)) }),
  }),
  route({
    method: "POST", url: "/v1/vms", operationId: "createVm", summary: "Create a VM (its disk from an image); ?start=true starts it too",
    query: S.createQuery, body: S.vmSpec, permission: "vm:create", target: "body",
    responses: { 201: { description: "created", schema: S.vmInfo } },
    handler: async ({ manager, body, query }) => {
      const vm = await manager.create(body);
      return query.start === true ? manager.start(vm.name) : vm;
    },
  }),
  route({
    method: "GET", url: "/v1/vms/:name", operationId: "getVm", summary: "One VM", params: S.nameParams, permission: "vm:read", target: "path",
    responses: vmDoc,
    handler: async ({ manager, params }) => manager.get(params.name),
  }),
  route({
    method: "DELETE", url: "/v1/vms/:name", operationId: "removeVm", summary: "Remove a stopped VM and its disks (?force=true stops it first)",
    params: S.nameParams, query: S.removeQuery, permission: "vm:delete", target: "path",
    responses: { 204: { description: "removed" } },
    handler: async ({ manager, params, query, reply }) => {
      await manager.remove(params.name, { force: query.force === true });
      void reply.code(204).send();
      return HANDLED;
    },
  }),
  ...(["start", "pause", "resume", "reboot"] as const).map((action) =>
    route({
      method: "POST", url: `/v1/vms/:name/${action}`, operationId: `${action}Vm`, summary: `${action[0]!.toUpperCase()}${action.slice(1)} a VM`,
      params: S.nameParams, permission: "vm:lifecycle", target: "path",
      responses: vmDoc,
      handler: async ({ manager, params }) => manager[action](params.name),
    }),
  ),
  route({
    method: "POST", url: "/v1/vms/:name/stop", operationId: "stopVm", summary: "Stop a VM (the VMM stops its vCPUs and exits; force or timeout: SIGKILL)",
    params: S.nameParams, body: S.stopBody.optional(), permission: "vm:lifecycle", target: "path",
    responses: vmDoc,
    handler: async ({ manager, params, body }) =>
      manager.stop(params.name, { force: body?.force === true, ...(body?.timeoutSeconds !== undefined ? { timeoutMs: body.timeoutSeconds * 1000 } : {}) }),
  }),
  route({
    method: "GET", url: "/v1/vms/:name/stats", operationId: "vmStats", summary: "The VM's latest usage sample (CPU, memory, disk and network)",
    params: S.nameParams, permission: "vm:read", target: "path",
    responses: { 200: { description: "usage; absent when the VM has no VMM", schema: S.vmStats } },
    handler: async ({ manager, params }) => {
      const vm = manager.get(params.name);
      const usage = manager.stats(params.name);
      return { name: vm.name, state: vm.state, ...(usage !== undefined ? { usage } : {}) };
    },
  }),
  route({
    method: "GET", url: "/v1/metrics/history", operationId: "metricsHistory",
    summary: "Usage history of a VM (?vm=NAME) or of the host: averages per 10 s (kept a day), 5 min (30 days) or 1 h (a year)",
    query: S.metricsHistoryQuery, permission: "vm:read", target: "query",
    responses: { 200: { description: "the buckets in the range, oldest first (at most 2000)", schema: S.metricsHistory } },
    handler: async ({ manager, query }) => manager.metricsHistory(query),
  }),
  route({
    method: "GET", url: "/v1/vms/:name/console", operationId: "vmConsole",
    summary: "The VM's serial console output (captured log); ?follow=true streams new output",
    description: "Interactive console: GET /v1/vms/{name}/console/attach with `Connection: Upgrade` and `Upgrade: tcp`; after `101 Switching Protocols` the connection carries the raw serial bytes both ways.",
    params: S.nameParams, query: S.consoleQuery, permission: "vm:console", target: "path",
    responses: { 200: { description: "bytes as the guest wrote them", contentType: "application/octet-stream" } },
    handler: async ({ manager, params, query, reply, request }) => {
      const c = manager.consolePaths(params.name);
      const head = readConsole(c.log, query.tail);
      if (query.follow !== true) {
        void reply.type("application/octet-stream").send(head);
        return HANDLED;
      }
      reply.hijack();
      const res = reply.raw;
      res.writeHead(200, { "content-type": "application/octet-stream", "cache-control": "no-store" });
      res.flushHeaders();
      res.write(head);
      const stop = followConsole(c.log, res);
      const end = (): void => {
        stop();
        manager.off("event", onEvent);
      };
      // The stream ends when the VM is removed; a stopped VM's log can still grow when it is started again.
      const onEvent = (e: { type: string; vm?: string }): void => {
        if (e.vm === params.name && e.type === "vm.removed") {
          end();
          res.end();
        }
      };
      manager.on("event", onEvent);
      request.raw.on("close", end);
      return HANDLED;
    },
  }),
  route({
    method: "POST", url: "/v1/vms/:name/disks", operationId: "addDisk", summary: "Add a blank disk to a VM without a VMM (defined, stopped, crashed): the next virtio-blk device at its next start",
    params: S.nameParams, body: S.diskAddSpec, permission: "vm:create", target: "path",
    responses: { 201: { description: "the VM with its new disk", schema: S.vmInfo } },
    handler: async ({ manager, params, body }) => manager.addDisk(params.name, body),
  }),
  route({
    method: "DELETE", url: "/v1/vms/:name/disks/:disk", operationId: "removeDisk", summary: "Remove a disk (disk<N>, not disk0) and its file from a VM without a VMM",
    params: S.diskParams, permission: "vm:delete", target: "path",
    responses: vmDoc,
    handler: async ({ manager, params }) => manager.removeDisk(params.name, params.disk),
  }),
  route({
    method: "GET", url: "/v1/pools", operationId: "listPools", summary: "Storage pools: capacity, quota, virtual size allocated, bytes used, overcommit", permission: "host:read",
    responses: { 200: { description: "pools by name", schema: S.poolList } },
    handler: async ({ manager }) => ({ pools: manager.listPools() }),
  }),
  route({
    method: "POST", url: "/v1/pools", operationId: "createPool", summary: "Create a storage pool on an existing directory (absolute; not inside another pool or the daemon's own directories)",
    body: S.poolSpec, permission: "pools:admin",
    responses: { 201: { description: "created", schema: S.poolInfo } },
    handler: async ({ manager, body }) => manager.createPool(body),
  }),
  route({
    method: "GET", url: "/v1/pools/:name", operationId: "getPool", summary: "One storage pool", params: S.poolParams, permission: "host:read",
    responses: { 200: { description: "the pool", schema: S.poolInfo } },
    handler: async ({ manager, params }) => manager.getPool(params.name),
  }),
  route({
    method: "DELETE", url: "/v1/pools/:name", operationId: "removePool", summary: "Forget a storage pool (its directory stays); refused while any disk is in it",
    params: S.poolParams, permission: "pools:admin",
    responses: { 204: { description: "removed" } },
    handler: async ({ manager, params, reply }) => {
      manager.removePool(params.name);
      void reply.code(204).send();
      return HANDLED;
    },
  }),
  route({
    method: "GET", url: "/v1/events", operationId: "events", summary: "Lifecycle and error events; ?follow=true streams them as server-sent events",
    query: S.eventsQuery, permission: "vm:read", target: "query",
    responses: { 200: { description: "events, oldest first", schema: S.eventList } },
    handler: async ({ manager, query, reply, limits }) => {
      const opts = { ...(query.after !== undefined ? { afterSeq: query.after } : {}), ...(query.vm !== undefined ? { vm: query.vm } : {}), ...(query.limit !== undefined ? { limit: query.limit } : {}) };
      if (query.follow !== true) return { events: manager.events(opts) };
      reply.hijack();
      const res = reply.raw;
      res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-store", connection: "keep-alive" });
      // Headers now, so a client knows it is subscribed before the first event.
      res.flushHeaders();
      // SSE (HTML Living Standard §9.2): `id` lets a client resume with ?after=<last id>.
      const frame = (e: { seq: number }): string => `id: ${e.seq}\nevent: vm-event\ndata: ${JSON.stringify(e)}\n\n`;
      void (async () => {
        let last = query.after ?? 0;
        // The backlog, page by page, at the pace the client takes it: a write the socket does not
        // take at once waits for 'drain' (the response corks writes within one tick, so writing a
        // whole backlog in one go would only pile it up here). A client that takes nothing for
        // streamStallMs is cut off; it resumes with ?after=<the last id it got>.
        if (query.after !== undefined) {
          for (let page = manager.events(opts); page.length > 0; page = manager.events({ ...opts, afterSeq: last })) {
            for (const e of page) {
              last = e.seq;
              if (!res.write(frame(e)) && !(await drained(res, limits.streamStallMs))) return;
            }
          }
        }
        if (res.destroyed) return;
        // Live events from here (the last page came up empty in this same tick: nothing falls in between).
        const onEvent = (e: { seq: number; vm?: string }): void => {
          if (e.seq <= last || (query.vm !== undefined && e.vm !== query.vm)) return;
          // A client that does not keep up is cut off, not buffered for without end: the events
          // stay in the inventory for it to resume from.
          if (res.writableLength > EVENT_STREAM_HIGH_WATER) {
            res.destroy();
            return;
          }
          last = e.seq;
          res.write(frame(e));
        };
        manager.on("event", onEvent);
        const keepAlive = setInterval(() => res.write(": keep-alive\n\n"), 15_000);
        res.once("close", () => {
          clearInterval(keepAlive);
          manager.off("event", onEvent);
        });
      })().catch(() => res.destroy());
      return HANDLED;
    },
  }),
];

/** True once `res` has taken what it holds ('drain'); false, and `res` destroyed, if it closed or stalled for `stallMs`. */
function drained(res: import("node:http").ServerResponse, stallMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const done = (ok: boolean): void => {
      clearTimeout(timer);
      res.off("drain", onDrain);
      res.off("close", onClose);
      if (!ok) res.destroy();
      resolve(ok);
    };
    const onDrain = (): void => done(true);
    const onClose = (): void => done(false);
    const timer = setTimeout(() => done(false), stallMs);
    res.once("drain", onDrain);
    res.once("close", onClose);
  });
}

/** Unsent bytes an event-stream follower may leave in the daemon before it is disconnected. */
export const EVENT_STREAM_HIGH_WATER = 1 << 20;

export function notFound(method: string, url: string): TypevisorError {
  return new TypevisorError("NOT_FOUND", `no route ${method} ${url.split("?")[0] ?? url}`, { hint: "GET /openapi.json lists the API" });
}
