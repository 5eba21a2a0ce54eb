/**
 * Live migration between daemons over the API (control/migration.ts, docs/migration.md):
 * `/v1/vms/{name}/migrate` on the source (start, progress, cancel), and
 * `/v1/migrations/incoming` on the destination, which the source daemon calls with a token of
 * the destination's (operator or admin: it makes and removes VMs there).
 */
import { z } from "zod";
import { incomingAnswer, incomingSpec, incomingState, migrateSpec, migrationStatus } from "../control/migration.js";
import { route, type Route } from "./routes.js";
import { nameParams } from "./schemas.js";

const migrationParams = z.object({ id: z.string().regex(/^[0-9a-f]{24}$/, "a migration id is 24 hex digits") }).strict();

export const MIGRATION_ROUTES: Route[] = [
  route({
    method: "POST", url: "/v1/vms/:name/migrate", operationId: "migrateVm",
    summary: "Live-migrate a running VM to another typevisor daemon (its API URL, a token of it, its pinned certificate); 202 at once, progress on GET",
    params: nameParams, body: migrateSpec, permission: "vm:delete", target: "path",
    responses: { 202: { description: "started", schema: migrationStatus } },
    handler: async ({ manager, params, body }) => manager.migrations.start(params.name, body),
  }),
  route({
    method: "GET", url: "/v1/vms/:name/migrate", operationId: "getMigration", summary: "The VM's migration: phase, the VMM's progress (round, bytes, dirty rate, expected downtime), error",
    params: nameParams, permission: "vm:read", target: "path",
    responses: { 200: { description: "progress (kept after the VM left this daemon)", schema: migrationStatus } },
    handler: async ({ manager, params }) => manager.migrations.get(params.name),
  }),
  route({
    method: "DELETE", url: "/v1/vms/:name/migrate", operationId: "cancelMigration", summary: "Cancel a migration before its switch-over: the VM runs on here",
    params: nameParams, permission: "vm:lifecycle", target: "path",
    responses: { 200: { description: "progress", schema: migrationStatus } },
    handler: async ({ manager, params }) => manager.migrations.cancel(params.name),
  }),
  route({
    method: "POST", url: "/v1/migrations/incoming", operationId: "prepareIncoming",
    summary: "(daemon to daemon) Prepare to receive a VM: an inventory row in state incoming and a VMM waiting for the TLS stream on the address this request came to",
    body: incomingSpec, permission: "vm:create", hostWide: true,
    responses: { 201: { description: "where the source's VMM sends the stream, and this side's one-time certificate fingerprint", schema: incomingAnswer } },
    handler: async ({ manager, body, request }) => manager.migrations.prepareIncoming(body, request.raw.socket.localAddress),
  }),
  route({
    method: "GET", url: "/v1/migrations/incoming/:id", operationId: "incomingStatus", summary: "(daemon to daemon) Where an incoming migration is: waiting, running (arrived), absent (none, and no VMM of it)",
    params: migrationParams, permission: "vm:read", hostWide: true,
    responses: { 200: { description: "its state", schema: incomingState } },
    handler: async ({ manager, params }) => manager.migrations.incomingStatus(params.id),
  }),
  route({
    method: "DELETE", url: "/v1/migrations/incoming/:id", operationId: "abortIncoming", summary: "(daemon to daemon) Drop an incoming migration that has not arrived: its VMM ends, its row goes",
    params: migrationParams, permission: "vm:delete", hostWide: true,
    responses: { 200: { description: "its state (absent)", schema: incomingState } },
    handler: async ({ manager, params }) => manager.migrations.abortIncoming(params.id),
  }),
];
