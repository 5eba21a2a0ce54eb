/**
 * The VM lifecycle as an explicit state machine. User actions are checked
 * here before anything happens, so an illegal request gets a clear 409 and
 * never a half-done action. Internal transitions (the VMM came up, the VMM
 * process exited) are listed too, so the manager cannot invent new ones.
 *
 *   defined ─start→ starting ─(API up)→ running ⇄ paused
 *   running/paused ─stop→ stopping ─(exit)→ stopped
 *   running/paused ─(guest poweroff)→ stopped
 *   starting/running/paused/stopping ─(unexpected exit)→ crashed
 *   stopped/crashed ─start→ starting
 *   running/paused ─migrate→ migrating ─(failed)→ running/paused; ─(moved)→ row removed
 *   (created as) incoming ─(arrived)→ running; ─(did not)→ row removed   (control/migration.ts)
 */
import { TypevisorError } from "../errors.js";
import type { VmState } from "./spec.js";

export type VmAction = "start" | "stop" | "kill" | "pause" | "resume" | "reboot" | "remove" | "change disks of";

const ALLOWED: Record<VmAction, readonly VmState[]> = {
  start: ["defined", "stopped", "crashed"],
  stop: ["starting", "running", "paused"],
  // A forced stop also ends a VM stuck in stopping.
  kill: ["starting", "running", "paused", "stopping"],
  pause: ["running"],
  resume: ["paused"],
  reboot: ["running"],
  remove: ["defined", "stopped", "crashed"],
  // vm disk add|rm: the VMM opens its disks at start, so only while there is none.
  "change disks of": ["defined", "stopped", "crashed"],
};

const TRANSITIONS: Record<VmState, readonly VmState[]> = {
  defined: ["starting"],
  // paused: a VMM that restored a saved state paused (snapshots.ts)
  starting: ["running", "paused", "stopping", "stopped", "crashed"],
  running: ["paused", "stopping", "stopped", "crashed", "running", "migrating"],
  paused: ["running", "stopping", "stopped", "crashed", "migrating"],
  stopping: ["stopped", "crashed"],
  stopped: ["starting"],
  crashed: ["starting"],
  migrating: ["running", "paused", "crashed"],
  incoming: ["running", "crashed"],
};

/** Whether `action` may be asked of a VM in `state`. */
export function actionAllowed(state: VmState, action: VmAction): boolean {
  return ALLOWED[action].includes(state);
}

export function assertAction(name: string, state: VmState, action: VmAction): void {
  if (actionAllowed(state, action)) return;
  const verb = action === "kill" ? "force-stop" : action;
  throw new TypevisorError("VM_STATE", `cannot ${verb} VM ${name}: it is ${state} (${verb} needs ${ALLOWED[action].join(" or ")})`, {
    hint: hintFor(action, state, name),
  });
}

function hintFor(action: VmAction, state: VmState, name: string): string | undefined {
  if (action === "remove" && (state === "running" || state === "paused" || state === "starting")) return `stop it first (typevisor vm stop ${name}) or remove with --force`;
  if (action === "change disks of") return `stop it first (typevisor vm stop ${name})`;
  if (action === "start" && (state === "running" || state === "paused")) return "it is already started";
  if (action === "stop" && state === "stopping") return `force it: typevisor vm stop --force ${name}`;
  return undefined;
}

/** Internal transitions; a bug (not user input) if violated. */
export function assertTransition(from: VmState, to: VmState): void {
  if (!TRANSITIONS[from].includes(to)) throw new TypevisorError("INTERNAL_STATE", `illegal VM state transition ${from} → ${to}`);
}

/** States in which a VMM process exists (or should) and holds CPU and memory. */
export const ACTIVE_STATES: readonly VmState[] = ["starting", "running", "paused", "stopping", "migrating", "incoming"];
export function isActive(state: VmState): boolean {
  return ACTIVE_STATES.includes(state);
}
