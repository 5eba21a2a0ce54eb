import Database from "better-sqlite3";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { parseVmSpec } from "./manager.js";
import { SCHEMA_VERSION, Store, type VmRow } from "./store.js";

function row(name: string): VmRow {
  const now = new Date().toISOString();
  return { id: `id-${name}`, name, spec: parseVmSpec({ name, kernel: "/k" }), state: "defined", createdAt: now, updatedAt: now, dir: `/x/${name}`, disks: [{ path: "/x/d", sizeBytes: 512 }], restarts: 0 };
}

describe("inventory (a real SQLite file)", () => {
  it("keeps VMs and events across reopening, with versioned schema", () => {
    const path = join(mkdtempSync(join(tmpdir(), "tvs-")), "t.db");
    const s = new Store(path);
    s.insertVm(row("a"));
    s.insertVm(row("b"));
    expect(() => s.insertVm(row("a"))).toThrow(/already exists/);
    s.updateVm("a", { state: "starting", runtime: { pid: 42, pidStartTime: "7", startedAt: "t" } });
    s.updateVm("a", { state: "running" });
    s.addEvent({ type: "vm.created", vm: "a", message: "m", data: { k: 1 } });
    s.addEvent({ type: "daemon.started", message: "d" });
    s.close();

    const again = new Store(path);
    expect(again.listVms().map((v) => [v.name, v.state, v.runtime?.pid])).toEqual([["a", "running", 42], ["b", "defined", undefined]]);
    expect(again.getVm("a")!.spec.cpus).toBe(1);
    again.updateVm("a", { state: "stopped", runtime: null, lastExit: { result: "poweroff", code: 0, signal: null, at: "t" } });
    expect(again.getVm("a")!.runtime).toBeUndefined();
    expect(again.getVm("a")!.lastExit?.result).toBe("poweroff");
    const ev = again.events();
    expect(ev.map((e) => e.type)).toEqual(["vm.created", "daemon.started"]);
    expect(ev[0]!.data).toEqual({ k: 1 });
    expect(again.events({ afterSeq: ev[0]!.seq }).map((e) => e.type)).toEqual(["daemon.started"]);
    expect(again.events({ vm: "a" }).length).toBe(1);
    again.deleteVm("b");
    expect(again.listVms().length).toBe(1);
    again.close();

    const db = new Database(path);
    expect(db.pragma("user_version", { simple: true })).toBe(SCHEMA_VERSION);
    expect(db.pragma("journal_mode", { simple: true })).toBe("wal");
    db.pragma(`user_version = ${SCHEMA_VERSION + 1}`);
    db.close();
    expect(() => new Store(path)).toThrow(/newer than this typevisor understands/);
  });

  it("migrates a version-1 inventory to the current version (2: pools, 3: users, tokens, audit) in place, its VMs and events kept", () => {
    const path = join(mkdtempSync(join(tmpdir(), "tvs-")), "t.db");
    // Version 1 as an earlier typevisor made it.
    const db = new Database(path);
    db.exec(`CREATE TABLE vms (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, spec TEXT NOT NULL, state TEXT NOT NULL, created_at TEXT NOT NULL,
      updated_at TEXT NOT NULL, dir TEXT NOT NULL, disks TEXT NOT NULL, runtime TEXT, last_exit TEXT, restarts INTEGER NOT NULL DEFAULT 0);
      CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, type TEXT NOT NULL, vm TEXT, message TEXT NOT NULL, data TEXT);`);
    db.prepare("INSERT INTO vms VALUES ('id-old', 'old', ?, 'stopped', 't', 't', '/x/old', ?, NULL, NULL, 0)").run(JSON.stringify({ name: "old", kernel: "/k", cpus: 1, memoryMiB: 64 }), JSON.stringify([{ path: "/x/old/disk0.raw", sizeBytes: 512 }]));
    db.prepare("INSERT INTO events (at, type, message) VALUES ('t', 'daemon.started', 'd')").run();
    db.pragma("user_version = 1");
    db.close();
    const s = new Store(path);
    expect(s.listVms().map((v) => [v.name, v.state, v.spec.pool, v.disks[0]!.pool])).toEqual([["old", "stopped", undefined, undefined]]);
    expect(s.events().map((e) => e.type)).toEqual(["daemon.started"]);
    expect(s.listPools()).toEqual([]);
    s.insertPool({ name: "p", path: "/srv/p", quotaBytes: 1024, createdAt: "t" });
    expect(() => s.insertPool({ name: "q", path: "/srv/p", quotaBytes: null, createdAt: "t" })).toThrow(expect.objectContaining({ code: "POOL_EXISTS" }));
    expect(s.getPool("p")).toEqual({ name: "p", path: "/srv/p", quotaBytes: 1024, createdAt: "t" });
    s.close();
    const after = new Database(path);
    expect(after.pragma("user_version", { simple: true })).toBe(SCHEMA_VERSION);
    expect(SCHEMA_VERSION).toBe(7);
    const tables = (after.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").all() as { name: string }[]).map((t) => t.name);
    for (const t of ["alert_rules", "audit", "metrics", "pools", "snapshot_heads", "snapshot_ops", "snapshots", "tokens", "users"]) expect(tables).toContain(t);
    after.close();
  });

  it("pages events forward without gaps: after a seq, the first `limit`; without one, the latest", () => {
    const s = new Store(join(mkdtempSync(join(tmpdir(), "tvs-")), "t.db"));
    for (let i = 0; i < 10; i++) s.addEvent({ type: "vm.created", vm: i % 2 === 0 ? "a" : "b", message: `e${i}` });
    const seqs = (o: Parameters<Store["events"]>[0]): number[] => s.events(o).map((e) => e.seq);
    expect(seqs({ limit: 3 })).toEqual([8, 9, 10]);
    expect(seqs({ afterSeq: 1, limit: 3 })).toEqual([2, 3, 4]);
    expect(seqs({ afterSeq: 1, vm: "a", limit: 2 })).toEqual([3, 5]);
    const paged: number[] = [];
    for (let page = seqs({ afterSeq: 0, limit: 4 }); page.length > 0; page = seqs({ afterSeq: paged.at(-1)!, limit: 4 })) paged.push(...page);
    expect(paged).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    s.close();
  });

  it("keeps the newest events only: a busy host's inventory does not grow without end", () => {
    const s = new Store(join(mkdtempSync(join(tmpdir(), "tvs-")), "t.db"), 100);
    for (let i = 0; i < 700; i++) s.addEvent({ type: "vm.created", vm: "a", message: `e${i}` });
    const count = (s.db.prepare("SELECT count(*) AS n FROM events").get() as { n: number }).n;
    // pruned every 256 events to the newest 100
    expect(count).toBeGreaterThanOrEqual(100);
    expect(count).toBeLessThanOrEqual(100 + 256);
    const all = s.events({ afterSeq: 0, limit: 10000 }).map((e) => e.seq);
    expect(all.at(-1)).toBe(700);
    expect(all).toEqual(Array.from({ length: all.length }, (_, i) => 701 - all.length + i));
    s.close();
  });
});
