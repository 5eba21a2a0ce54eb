import { readdirSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { rehearseNet } from "./rehearse.js";

const openFds = (): number => readdirSync("/proc/self/fd").length;

describe("rehearseNet", () => {
  it("moves a frame each way and acknowledges an announce, before and after a live restore, and leaves no fd open", () => {
    const before = openFds();
    // Before and after the save and restore: two of each, or a path did not run.
    const r = rehearseNet();
    expect({ sent: r.sent, received: r.received, acked: r.acked }).toEqual({ sent: 2, received: 2, acked: 2 });
    // A live NIC's state, which the device state's checker accepts: every queue where the driver put it.
    expect(r.state.activated).toBe(true);
    expect(r.state.queues.map((q) => q?.config.size)).toEqual([256, 256, 64]);
    expect(openFds()).toBe(before);
  });
});
