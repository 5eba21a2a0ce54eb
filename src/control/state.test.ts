import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { TypevisorError } from "../errors.js";
import { VM_STATES } from "./spec.js";
import { actionAllowed, assertAction, assertTransition, isActive, type VmAction } from "./state.js";

const ACTIONS: VmAction[] = ["start", "stop", "kill", "pause", "resume", "reboot", "remove"];

describe("VM state machine", () => {
  it("allows exactly the documented actions", () => {
    const table = Object.fromEntries(VM_STATES.map((s) => [s, ACTIONS.filter((a) => actionAllowed(s, a))]));
    expect(table).toEqual({
      defined: ["start", "remove"],
      starting: ["stop", "kill"],
      running: ["stop", "kill", "pause", "reboot"],
      paused: ["stop", "kill", "resume"],
      stopping: ["kill"],
      stopped: ["start", "remove"],
      crashed: ["start", "remove"],
      // A migration's VM takes no action until it has ended one way or the other (control/migration.ts).
      migrating: [],
      incoming: [],
    });
  });

  it("refuses an illegal action with VM_STATE naming the state and what is needed", () => {
    try {
      assertAction("web", "stopped", "pause");
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(TypevisorError);
      expect((e as TypevisorError).code).toBe("VM_STATE");
      expect((e as TypevisorError).message).toBe("cannot pause VM web: it is stopped (pause needs running)");
    }
    expect(() => assertAction("web", "running", "remove")).toThrow(/stop it first|needs defined or stopped or crashed/);
  });

  it("every state an allowed action leads to is a legal transition; VMs hold a VMM exactly in active states", () => {
    const target: Record<VmAction, string> = { start: "starting", stop: "stopping", kill: "stopping", pause: "paused", resume: "running", reboot: "running", remove: "", "change disks of": "" };
    fc.assert(
      fc.property(fc.constantFrom(...VM_STATES), fc.constantFrom(...ACTIONS), (s, a) => {
        if (!actionAllowed(s, a) || a === "remove" || a === "change disks of") return;
        const to = target[a];
        if (to === s) return;
        expect(() => assertTransition(s, to as (typeof VM_STATES)[number])).not.toThrow();
      }),
    );
    expect(VM_STATES.filter(isActive)).toEqual(["starting", "running", "paused", "stopping", "migrating", "incoming"]);
    expect(() => assertTransition("stopped", "running")).toThrow(/illegal/);
  });
});
