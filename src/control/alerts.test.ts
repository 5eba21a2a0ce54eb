import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { AlertEngine, AlertRules, alertRuleSpec, type AlertRule, type Observation } from "./alerts.js";
import { Store } from "./store.js";

const GiB = 2 ** 30;

function obs(vms: Observation["vms"], over: Partial<Observation> = {}): Observation {
  return { host: { memoryBytes: GiB, memoryTotalBytes: 8 * GiB }, vms, pools: [], ...over };
}
const running = (name: string, cpuPercent: number | undefined, extra: Partial<Observation["vms"][number]> = {}): Observation["vms"][number] => ({
  name, state: "running", sample: cpuPercent === undefined ? {} : { cpuPercent, memoryBytes: 1 }, unresponsive: false, pausedDiskFull: false, ...extra,
});
const rule = (over: Partial<AlertRule> = {}): AlertRule => ({ ...alertRuleSpec.parse({ name: "hot", metric: "cpu", above: 80, forSeconds: 120, severity: "critical" }), createdAt: "t", ...over });

describe("alert rules", () => {
  it("fires audit-write while the audit log cannot be written, and resolves it once an entry is written", () => {
    const e = new AlertEngine();
    expect(e.evaluate(obs([], { audit: { failing: false, failures: 0 } }), [])).toEqual([]);
    expect(e.evaluate(obs([], { audit: { failing: true, failures: 3 } }), [])).toEqual([{ kind: "firing", alert: expect.objectContaining({ rule: "audit-write", subject: "audit", severity: "critical", value: 3 }) }]);
    expect(e.evaluate(obs([], { audit: { failing: true, failures: 4 } }), [])).toEqual([]);
    expect(e.evaluate(obs([], { audit: { failing: false, failures: 4 } }), [])).toEqual([{ kind: "resolved", alert: expect.objectContaining({ rule: "audit-write" }) }]);
    // fired at once from the first failure (fireNow), then kept by the samples while it lasts
    expect(e.fireNow({ rule: "audit-write", subject: "audit", severity: "critical", message: "x" })).toHaveLength(1);
    expect(e.evaluate(obs([], { audit: { failing: true, failures: 5 } }), [])).toEqual([]);
  });

  it("fires only after the metric stayed above the threshold for the rule's time, and resolves when it drops", () => {
    const clock = { ms: 0 };
    const e = new AlertEngine(() => clock.ms);
    const rules = [rule()];
    const tick = (cpu: number | undefined, name = "a") => {
      clock.ms += 10_000;
      return e.evaluate(obs([running(name, cpu)]), rules);
    };
    expect(tick(90)).toEqual([]); // above since t=10 s
    for (let i = 0; i < 11; i++) expect(tick(95)).toEqual([]); // t=120 s: 110 s above
    const fired = tick(95); // t=130 s: 120 s above
    expect(fired).toEqual([{ kind: "firing", alert: expect.objectContaining({ rule: "hot", subject: "vm:a", vm: "a", severity: "critical", value: 95, threshold: 80 }) }]);
    expect(e.current()).toHaveLength(1);
    expect(tick(99)).toEqual([]); // still firing: no second event
    expect(tick(undefined)).toEqual([]); // figure unreadable this time: stays as it is
    expect(e.current()).toHaveLength(1);
    expect(tick(10)).toEqual([{ kind: "resolved", alert: expect.objectContaining({ rule: "hot", message: expect.stringMatching(/^resolved: /) }) }]);
    expect(e.current()).toEqual([]);
    // a dip resets the clock: above, below, above again for less than 2 min: nothing
    tick(90);
    tick(10);
    for (let i = 0; i < 11; i++) expect(tick(90)).toEqual([]);
  });

  it("applies to every VM without --vm, to one with it; a removed VM or rule resolves its alerts", () => {
    const e = new AlertEngine(() => 0);
    const now = [rule({ forSeconds: 0 })];
    const two = obs([running("a", 90), running("b", 90)]);
    expect(e.evaluate(two, now).map((c) => c.alert.subject)).toEqual(["vm:a", "vm:b"]);
    expect(e.evaluate(obs([running("b", 90)]), now)).toEqual([{ kind: "resolved", alert: expect.objectContaining({ subject: "vm:a" }) }]);
    expect(e.evaluate(obs([running("b", 90)]), [])).toEqual([{ kind: "resolved", alert: expect.objectContaining({ subject: "vm:b" }) }]);
    const only = new AlertEngine(() => 0);
    expect(only.evaluate(two, [rule({ forSeconds: 0, vm: "b" })]).map((c) => c.alert.subject)).toEqual(["vm:b"]);
    // a stopped VM is not above anything
    expect(only.evaluate(obs([running("a", 90), { ...running("b", undefined), state: "stopped", sample: { state: "stopped" } }]), [rule({ forSeconds: 0, vm: "b" })])).toEqual([
      { kind: "resolved", alert: expect.objectContaining({ subject: "vm:b" }) },
    ]);
  });

  it("has built-in rules: crashed, unresponsive, paused on a full disk, host memory, pool disk", () => {
    const e = new AlertEngine(() => 0);
    const changes = e.evaluate(
      obs(
        [
          { ...running("c", undefined), state: "crashed" },
          running("u", 1, { unresponsive: true }),
          { ...running("p", 1, { pausedDiskFull: true }), state: "paused" },
          running("fine", 1),
        ],
        { host: { memoryBytes: 7.5 * GiB, memoryTotalBytes: 8 * GiB }, pools: [{ name: "full", capacityBytes: 100, freeBytes: 5 }, { name: "roomy", capacityBytes: 100, freeBytes: 50 }] },
      ),
      [],
    );
    expect(changes.map((c) => `${c.kind} ${c.alert.rule} ${c.alert.subject}`).sort()).toEqual([
      "firing host-memory host",
      "firing pool-disk pool:full",
      "firing vm-crashed vm:c",
      "firing vm-paused-disk-full vm:p",
      "firing vmm-unresponsive vm:u",
    ]);
    // a crash seen as an event fires at once, once
    const f = new AlertEngine(() => 0);
    expect(f.fireNow({ rule: "vm-crashed", subject: "vm:x", vm: "x", severity: "critical", message: "VM x crashed" })).toHaveLength(1);
    expect(f.fireNow({ rule: "vm-crashed", subject: "vm:x", vm: "x", severity: "critical", message: "VM x crashed" })).toHaveLength(0);
    // restarted: running again at the next sample resolves it
    expect(f.evaluate(obs([running("x", 1)]), [])).toEqual([{ kind: "resolved", alert: expect.objectContaining({ rule: "vm-crashed", subject: "vm:x" }) }]);
  });

  it("validates rules and keeps them in the inventory", () => {
    expect(alertRuleSpec.safeParse({ name: "vm-crashed", metric: "cpu", above: 1 }).success).toBe(false);
    expect(alertRuleSpec.safeParse({ name: "x", metric: "load", above: 1 }).success).toBe(false);
    expect(alertRuleSpec.safeParse({ name: "x", metric: "cpu", above: -1 }).success).toBe(false);
    expect(alertRuleSpec.safeParse({ name: "x", metric: "cpu", above: 1, forSeconds: 86_401 }).success).toBe(false);
    expect(alertRuleSpec.safeParse({ name: "x", metric: "cpu", above: 1, extra: 1 }).success).toBe(false);
    const s = new Store(join(mkdtempSync(join(tmpdir(), "tva-")), "t.db"));
    const r = new AlertRules(s.db);
    r.add(alertRuleSpec.parse({ name: "big", metric: "memory", above: GiB, vm: "a" }));
    expect(() => r.add(alertRuleSpec.parse({ name: "big", metric: "cpu", above: 1 }))).toThrow(expect.objectContaining({ code: "ALERT_RULE_EXISTS" }));
    // a hand-edited row is left out, not acted on
    s.db.prepare("INSERT INTO alert_rules VALUES ('bad', '{\"name\":\"bad\"}', 't')").run();
    expect(r.list().map((x) => [x.name, x.metric, x.above, x.forSeconds, x.severity, x.vm])).toEqual([["big", "memory", GiB, 0, "warning", "a"]]);
    r.remove("big");
    expect(() => r.remove("big")).toThrow(expect.objectContaining({ code: "ALERT_RULE_NOT_FOUND" }));
    s.close();
  });
});
