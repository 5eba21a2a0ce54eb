/**
 * Snapshots, rollback and clones over the API (control/snapshots.ts, docs/snapshots.md), under
 * /v1/vms/{name}: all of them act on the VM named in the path (a caller scoped to VMs: its own),
 * and a clone's new VM must be in the caller's scope too.
 */
import { cloneSpec, snapshotCreateSpec, snapshotInfo, snapshotList, snapshotParams } from "../control/snapshots.js";
import { inScope } from "../control/identity.js";
import { vmInfo } from "../control/spec.js";
import { TypevisorError } from "../errors.js";
import { HANDLED, route, type Route } from "./routes.js";
import { nameParams } from "./schemas.js";

export const SNAPSHOT_ROUTES: Route[] = [
  route({
    method: "GET", url: "/v1/vms/:name/snapshots", operationId: "listSnapshots", summary: "A VM's snapshots, oldest first, each with its parent (a tree), size, and whether memory was saved",
    params: nameParams, permission: "vm:read", target: "path",
    responses: { 200: { description: "snapshots", schema: snapshotList } },
    handler: async ({ manager, params }) => ({ snapshots: manager.snapshots.list(params.name) }),
  }),
  route({
    method: "POST", url: "/v1/vms/:name/snapshots", operationId: "createSnapshot",
    summary: "Take a snapshot: the disks frozen into read-only layers (the VM goes on on new overlays) and, when the VM has a VMM, its memory and devices (a short pause: the VMM is restarted on the new overlays)",
    params: nameParams, body: snapshotCreateSpec, permission: "vm:lifecycle", target: "path",
    responses: { 201: { description: "taken", schema: snapshotInfo } },
    handler: async ({ manager, params, body }) => manager.snapshots.create(params.name, body),
  }),
  route({
    method: "GET", url: "/v1/vms/:name/snapshots/:snapshot", operationId: "getSnapshot", summary: "One snapshot",
    params: snapshotParams, permission: "vm:read", target: "path",
    responses: { 200: { description: "the snapshot", schema: snapshotInfo } },
    handler: async ({ manager, params }) => manager.snapshots.get(params.name, params.snapshot),
  }),
  route({
    method: "POST", url: "/v1/vms/:name/snapshots/:snapshot/rollback", operationId: "rollbackSnapshot",
    summary: "Return the VM to the snapshot: its disks, and with a memory snapshot the running guest as it was (what it did since is lost)",
    params: snapshotParams, permission: "vm:lifecycle", target: "path",
    responses: { 200: { description: "the VM after the rollback", schema: vmInfo } },
    handler: async ({ manager, params }) => manager.snapshots.rollback(params.name, params.snapshot),
  }),
  route({
    method: "DELETE", url: "/v1/vms/:name/snapshots/:snapshot", operationId: "removeSnapshot",
    summary: "Remove a snapshot: its children hang from its parent; its disk layers are freed unless the VM, another snapshot or a linked clone stands on them",
    params: snapshotParams, permission: "vm:delete", target: "path",
    responses: { 204: { description: "removed" } },
    handler: async ({ manager, params, reply }) => {
      await manager.snapshots.remove(params.name, params.snapshot);
      void reply.code(204).send();
      return HANDLED;
    },
  }),
  route({
    method: "POST", url: "/v1/vms/:name/clone", operationId: "cloneVm",
    summary: "A new VM from a snapshot of this one (without `snapshot`: one taken now): linked (overlays on the snapshot's layers) or full copies; a memory snapshot's clone starts running at once",
    params: nameParams, body: cloneSpec, permission: "vm:create", target: "path",
    responses: { 201: { description: "the new VM", schema: vmInfo } },
    handler: async ({ manager, params, body, auth }) => {
      // The path names the source; the new VM must be the caller's too.
      if (!inScope(auth.principal, body.name)) throw new TypevisorError("FORBIDDEN", `${auth.principal.user} is scoped to VMs (${auth.principal.vms?.join(", ") ?? ""}): ${body.name} is not one of them`);
      return manager.snapshots.clone(params.name, body);
    },
  }),
];
