/**
 * The audit log cannot be written (its head file replaced by a directory, as an I/O error would
 * make it fail): a real daemon fires the built-in `audit-write` alert at the first lost entry, counts
 * them in /metrics, says so in its log, and resolves the alert once entries are written again.
 */
import { mkdirSync, rmSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { homePaths } from "../../src/control/paths.js";
import { startDaemon, until, type TestDaemon } from "../helpers/daemon.js";

describe("audit-write alert (real daemon)", () => {
  let d: TestDaemon;

  beforeAll(async () => {
    d = await startDaemon();
  }, 30_000);

  afterAll(async () => {
    await d?.stop();
  });

  it("fires at the first entry lost, is counted and logged, and resolves when writing works again", async () => {
    const c = d.client;
    await c.addUser({ name: "first", role: "viewer" }); // audited: the head file exists now
    expect((await c.alerts()).map((a) => a.rule)).not.toContain("audit-write");
    const head = homePaths(d.home).auditHead;
    rmSync(head);
    mkdirSync(head);
    // the action itself stands (it happened); its audit entry is what is lost
    await c.addUser({ name: "second", role: "viewer" });
    expect((await c.alerts()).find((a) => a.rule === "audit-write")).toMatchObject({ severity: "critical", subject: "audit" });
    await c.addUser({ name: "third", role: "viewer" });
    const text = await c.metrics();
    expect(text).toMatch(/^typevisor_audit_write_failures 2$/m);
    expect(text).toMatch(/^typevisor_alerts_firing\{rule="audit-write",severity="critical"\} 1$/m);
    expect((await c.events()).some((e) => e.type === "alert.firing" && /audit-write/.test(e.message))).toBe(true);
    expect((await c.logs({ contains: "audit log cannot be written", level: "error" })).length).toBeGreaterThan(0);

    rmSync(head, { recursive: true });
    await c.addUser({ name: "fourth", role: "viewer" });
    await until("audit-write resolved", async () => ((await c.alerts()).some((a) => a.rule === "audit-write") ? undefined : true), 10_000);
    expect((await c.events()).some((e) => e.type === "alert.resolved" && /audit-write/.test(e.message))).toBe(true);
  }, 30_000);
});
