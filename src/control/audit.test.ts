import Database from "better-sqlite3";
import { mkdirSync, mkdtempSync, rmdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { AuditLog } from "./audit.js";
import { Store } from "./store.js";

/** A log of `n` entries in a fresh inventory, and a second connection to tamper with it as an intruder with the file would. */
function logOf(n: number): { log: AuditLog; db: Database.Database; path: string } {
  const dir = mkdtempSync(join(tmpdir(), "tva-"));
  const path = join(dir, "t.db");
  const log = new AuditLog(new Store(path), join(dir, "audit.head"));
  for (let i = 1; i <= n; i++) log.record({ user: `u${i}`, peer: "uid 0", action: "POST /v1/vms/:name/start", target: `vm${i}`, result: "200" });
  const db = new Database(path);
  return { log, db, path };
}

describe("the audit log (a real SQLite file)", () => {
  it("counts the entries it cannot write and tells its listeners once per outage", () => {
    const dir = mkdtempSync(join(tmpdir(), "tva-"));
    const head = join(dir, "audit.head");
    mkdirSync(head); // the head cannot be written: EISDIR, as an I/O error would
    const log = new AuditLog(new Store(join(dir, "t.db")), head);
    const told: string[] = [];
    log.onFailure((e) => told.push((e as NodeJS.ErrnoException).code ?? e.message));
    const entry = { user: "u", peer: "uid 0", action: "POST /v1/vms", result: "201" };
    expect(() => log.record(entry)).toThrow();
    expect(() => log.record(entry)).toThrow();
    expect([log.failures, log.failing, told]).toEqual([2, true, ["EISDIR"]]);
    rmdirSync(head);
    log.record(entry);
    expect(log.failing).toBe(false);
    rmSync(head);
    mkdirSync(head);
    expect(() => log.record(entry)).toThrow();
    expect([log.failures, told]).toEqual([3, ["EISDIR", "EISDIR"]]);
  });

  it("chains every entry to the one before and verifies intact", () => {
    const { log } = logOf(5);
    const all = log.list();
    expect(all.map((e) => e.seq)).toEqual([1, 2, 3, 4, 5]);
    for (let i = 1; i < all.length; i++) expect(all[i]!.prev).toBe(all[i - 1]!.hash);
    expect(log.verify()).toEqual({ ok: true, entries: 5 });
    expect(log.list({ user: "u3" }).map((e) => e.target)).toEqual(["vm3"]);
    expect(log.list({ vm: "vm4" }).map((e) => e.user)).toEqual(["u4"]);
  });

  it("refuses UPDATE and DELETE through SQL (append-only)", () => {
    const { db } = logOf(2);
    expect(() => db.prepare("UPDATE audit SET result = 'ok' WHERE seq = 1").run()).toThrow(/append-only/);
    expect(() => db.prepare("DELETE FROM audit WHERE seq = 1").run()).toThrow(/append-only/);
  });

  it("names an edited entry", () => {
    const { log, db } = logOf(5);
    db.exec("DROP TRIGGER audit_no_update");
    db.prepare("UPDATE audit SET result = '403' WHERE seq = 3").run();
    expect(log.verify()).toMatchObject({ ok: false, problem: { seq: 3, reason: expect.stringMatching(/entry 3 was modified/) } });
  });

  it("names a removed entry, in the middle and at the end", () => {
    const { log, db } = logOf(5);
    db.exec("DROP TRIGGER audit_no_delete");
    db.prepare("DELETE FROM audit WHERE seq = 5").run();
    expect(log.verify()).toMatchObject({ ok: false, problem: { seq: 5, reason: expect.stringMatching(/entries 5-5 were removed/) } });
    db.prepare("DELETE FROM audit WHERE seq = 2").run();
    expect(log.verify()).toMatchObject({ ok: false, problem: { seq: 3, reason: expect.stringMatching(/entry 2 was removed/) } });
  });

  it("names reordered entries, even with their sequence numbers rewritten to look in order", () => {
    const { log, db } = logOf(5);
    db.exec("DROP TRIGGER audit_no_update");
    // swap entries 2 and 4 whole (every field but seq): the sequence still counts 1..5
    const cols = "at, user, token, peer, action, target, result, detail, prev, hash";
    const two = db.prepare(`SELECT ${cols} FROM audit WHERE seq = 2`).get() as Record<string, unknown>;
    const four = db.prepare(`SELECT ${cols} FROM audit WHERE seq = 4`).get() as Record<string, unknown>;
    const set = db.prepare(`UPDATE audit SET ${cols.split(", ").map((c) => `${c} = @${c}`).join(", ")} WHERE seq = @seq`);
    set.run({ ...four, seq: 2 });
    set.run({ ...two, seq: 4 });
    expect(log.verify()).toMatchObject({ ok: false, problem: { seq: 2, reason: expect.stringMatching(/does not follow the entry before it/) } });
  });

  it("survives reopening, and goes on with the chain", () => {
    const { log, path } = logOf(2);
    const again = new AuditLog(new Store(path));
    again.record({ peer: "127.0.0.1", action: "auth.token", result: "refused" });
    expect(again.verify()).toEqual({ ok: true, entries: 3 });
    expect(log.list().at(-1)!.prev).toBe(log.list().at(-2)!.hash);
  });
});
