/**
 * The inventory: VMs, their disks and the event log in one SQLite file
 * (better-sqlite3, synchronous: every write is a committed transaction when
 * the call returns, so a daemon killed with SIGKILL loses nothing it said it
 * did). The schema is versioned with PRAGMA user_version; WAL mode lets
 * readers (the CLI's `--db` inspection, backups) run beside the daemon.
 */
import Database from "better-sqlite3";
import { TypevisorError } from "../errors.js";
import type { PoolRow } from "./pools.js";
import { VM_STATES, vmSpec, type EventRecord, type VmExit, type VmSpec, type VmState } from "./spec.js";

/** Events kept by default: about 12,000 VM lifecycles (create, start, stop, remove, ...). */
export const DEFAULT_KEEP_EVENTS = 100_000;
const PRUNE_EVERY = 256;

export const SCHEMA_VERSION = 7;

export interface DiskRow {
  path: string;
  /** The size the guest sees (for qcow2, the virtual size). */
  sizeBytes: number;
  image?: string;
  /** Absent in rows made before qcow2: raw. */
  format?: "raw" | "qcow2";
  /** A qcow2 overlay's backing file (a base, bases.ts). */
  backing?: string;
  /** The storage pool it is in (pools.ts); absent: the default pool (the VM's own directory). */
  pool?: string;
  /** Every file below this one, nearest first (snapshot layers, then a base: snapshots.ts); absent: `backing` alone. */
  chain?: string[];
}

/** What the daemon needs to find a running VMM again after a restart. */
export interface VmRuntime {
  pid: number;
  /** /proc/PID/stat starttime: guards against a recycled pid. */
  pidStartTime: string;
  startedAt: string;
  cgroup?: string;
  /** The uid and gid the VMM runs as in its sandbox (sandbox/sandbox.ts); absent when not jailed. */
  sandboxUid?: number;
}

export interface VmRow {
  id: string;
  name: string;
  spec: VmSpec;
  state: VmState;
  createdAt: string;
  updatedAt: string;
  dir: string;
  disks: DiskRow[];
  runtime?: VmRuntime;
  lastExit?: VmExit;
  restarts: number;
}

interface RawVm {
  id: string;
  name: string;
  spec: string;
  state: string;
  created_at: string;
  updated_at: string;
  dir: string;
  disks: string;
  runtime: string | null;
  last_exit: string | null;
  restarts: number;
}

interface RawEvent {
  seq: number;
  at: string;
  type: string;
  vm: string | null;
  message: string;
  data: string | null;
}

const MIGRATIONS: Record<number, string> = {
  1: `
    CREATE TABLE vms (
      id TEXT PRIMARY KEY,
      name TEXT NOT NULL UNIQUE,
      spec TEXT NOT NULL,
      state TEXT NOT NULL,
      created_at TEXT NOT NULL,
      updated_at TEXT NOT NULL,
      dir TEXT NOT NULL,
      disks TEXT NOT NULL,
      runtime TEXT,
      last_exit TEXT,
      restarts INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE events (
      seq INTEGER PRIMARY KEY AUTOINCREMENT,
      at TEXT NOT NULL,
      type TEXT NOT NULL,
      vm TEXT,
      message TEXT NOT NULL,
      data TEXT
    );
    CREATE INDEX events_vm ON events(vm, seq);
  `,
  // Storage pools (pools.ts); a disk names its pool in the VM's disks JSON.
  2: `
    CREATE TABLE pools (
      name TEXT PRIMARY KEY,
      path TEXT NOT NULL UNIQUE,
      quota_bytes INTEGER,
      created_at TEXT NOT NULL
    );
  `,
  // Identities and the audit log (identity.ts, audit.ts, docs/security.md). Tokens are kept as the
  // SHA-256 of their secret, passwords as scrypt hashes; the audit log is append-only (the
  // triggers) and hash-chained (each row carries the hash of the one before).
  3: `
    CREATE TABLE users (
      name TEXT PRIMARY KEY,
      role TEXT NOT NULL,
      vms TEXT,
      password TEXT,
      created_at TEXT NOT NULL
    );
    CREATE TABLE tokens (
      id TEXT PRIMARY KEY,
      user TEXT NOT NULL REFERENCES users(name),
      role TEXT NOT NULL,
      vms TEXT,
      hash TEXT NOT NULL,
      created_at TEXT NOT NULL,
      expires_at TEXT NOT NULL,
      last_used_at TEXT,
      revoked_at TEXT
    );
    CREATE TABLE audit (
      seq INTEGER PRIMARY KEY,
      at TEXT NOT NULL,
      user TEXT,
      token TEXT,
      peer TEXT NOT NULL,
      action TEXT NOT NULL,
      target TEXT,
      result TEXT NOT NULL,
      detail TEXT,
      prev TEXT NOT NULL,
      hash TEXT NOT NULL
    );
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
  `,
  // Multi-factor login (identity.ts, totp.ts): a user's TOTP secret, the last time step accepted
  // (a replayed code is refused), its unused recovery codes (SHA-256 each, JSON); sessions are
  // tokens of kind 'session' (made by POST /v1/login, revoked by logout).
  4: `
    ALTER TABLE users ADD COLUMN totp_secret TEXT;
    ALTER TABLE users ADD COLUMN totp_last_step INTEGER;
    ALTER TABLE users ADD COLUMN recovery TEXT;
    ALTER TABLE tokens ADD COLUMN kind TEXT NOT NULL DEFAULT 'api';
  `,
  // Metrics history (history.ts): per scope (host, or a VM's id) and resolution, each bucket's sums
  // and counts (the average is sum/count); alert rules (alerts.ts).
  5: `
    CREATE TABLE metrics (
      scope TEXT NOT NULL,
      step INTEGER NOT NULL,
      bucket INTEGER NOT NULL,
      n INTEGER NOT NULL,
      cpu REAL NOT NULL,
      mem REAL NOT NULL,
      n_io INTEGER NOT NULL,
      disk_r REAL NOT NULL,
      disk_w REAL NOT NULL,
      net_rx REAL NOT NULL,
      net_tx REAL NOT NULL,
      state TEXT,
      PRIMARY KEY (scope, step, bucket)
    ) WITHOUT ROWID;
    CREATE INDEX metrics_age ON metrics(step, bucket);
    CREATE TABLE alert_rules (
      name TEXT PRIMARY KEY,
      spec TEXT NOT NULL,
      created_at TEXT NOT NULL
    );
  `,
  // The VMM sandbox (sandbox/sandbox.ts): the uid (and gid) each VM's VMM runs as, unique.
  6: `
    CREATE TABLE sandbox_ids (
      vm_id TEXT PRIMARY KEY,
      uid INTEGER NOT NULL UNIQUE
    );
  `,
  // Snapshots (snapshots.ts, docs/snapshots.md): each VM's snapshots with their frozen disk layers
  // (JSON) and whether a saved memory state goes with them; snapshot_heads the one each VM stands on
  // (taken last or rolled back to: the next one's parent); snapshot_ops holds the plan of a
  // snapshot, rollback or clone under way, written before any file is touched, so a daemon
  // killed midway finishes or undoes it at its next start.
  7: `
    CREATE TABLE snapshots (
      id TEXT PRIMARY KEY,
      vm_id TEXT NOT NULL,
      name TEXT NOT NULL,
      parent TEXT,
      created_at TEXT NOT NULL,
      description TEXT,
      memory INTEGER NOT NULL,
      vm_state TEXT NOT NULL,
      size_bytes INTEGER NOT NULL,
      disks TEXT NOT NULL,
      UNIQUE (vm_id, name)
    );
    CREATE TABLE snapshot_heads (
      vm_id TEXT PRIMARY KEY,
      snapshot_id TEXT NOT NULL
    );
    CREATE TABLE snapshot_ops (
      id TEXT PRIMARY KEY,
      vm_id TEXT NOT NULL,
      plan TEXT NOT NULL,
      started_at TEXT NOT NULL
    );
  `,
};

/** A row this daemon cannot read (hand-edited, or from a newer version): kept, never acted on. */
export interface QuarantinedRow {
  id: string;
  name: string;
  dir: string;
  reason: string;
}

/** The row's fields, checked: a malformed one must not stop the daemon or be acted on as if it were sound. @throws Error */
function checkedRowOf(r: RawVm): VmRow {
  const row = rowOf(r);
  if (!(VM_STATES as readonly string[]).includes(row.state)) throw new Error(`unknown state "${row.state}"`);
  const spec = vmSpec.safeParse(row.spec);
  if (!spec.success) throw new Error(`spec: ${spec.error.issues[0]?.message ?? "invalid"}`);
  if (!Array.isArray(row.disks) || !row.disks.every((d) => typeof d?.path === "string" && typeof d.sizeBytes === "number")) throw new Error("disks: not a list of {path, sizeBytes}");
  if (row.runtime !== undefined && (typeof row.runtime !== "object" || row.runtime === null || typeof row.runtime.pid !== "number")) throw new Error("runtime: no pid");
  if (typeof row.dir !== "string" || row.dir === "") throw new Error("no directory");
  return row;
}

function rowOf(r: RawVm): VmRow {
  return {
    id: r.id,
    name: r.name,
    spec: JSON.parse(r.spec) as VmSpec,
    state: r.state as VmState,
    createdAt: r.created_at,
    updatedAt: r.updated_at,
    dir: r.dir,
    disks: JSON.parse(r.disks) as DiskRow[],
    ...(r.runtime !== null ? { runtime: JSON.parse(r.runtime) as VmRuntime } : {}),
    ...(r.last_exit !== null ? { lastExit: JSON.parse(r.last_exit) as VmExit } : {}),
    restarts: r.restarts,
  };
}

interface RawPool {
  name: string;
  path: string;
  quota_bytes: number | null;
  created_at: string;
}

function poolOf(r: RawPool): PoolRow {
  return { name: r.name, path: r.path, quotaBytes: r.quota_bytes, createdAt: r.created_at };
}

function eventOf(r: RawEvent): EventRecord {
  return {
    seq: r.seq,
    at: r.at,
    type: r.type,
    ...(r.vm !== null ? { vm: r.vm } : {}),
    message: r.message,
    ...(r.data !== null ? { data: JSON.parse(r.data) as Record<string, unknown> } : {}),
  };
}

export class Store {
  /** The connection, for the inventory's other tables (identity.ts, audit.ts); schema changes stay in MIGRATIONS. */
  readonly db: Database.Database;

  /**
   * @param keepEvents the events table keeps the newest this many (older ones go as new ones come),
   *   so a host that creates and removes VMs all day does not grow its inventory without end.
   */
  constructor(
    readonly path: string,
    private readonly keepEvents = DEFAULT_KEEP_EVENTS,
  ) {
    try {
      this.db = new Database(path);
    } catch (e) {
      throw new TypevisorError("STORE", `cannot open the inventory ${path}: ${(e as Error).message}`, { cause: e });
    }
    this.db.pragma("journal_mode = WAL");
    // FULL: a committed transaction survives power loss, not just a process crash.
    this.db.pragma("synchronous = FULL");
    this.db.pragma("busy_timeout = 5000");
    this.migrate();
  }

  private migrate(): void {
    const current = this.db.pragma("user_version", { simple: true }) as number;
    if (current > SCHEMA_VERSION) {
      throw new TypevisorError("STORE_VERSION", `the inventory ${this.path} has schema version ${current}, newer than this typevisor understands (${SCHEMA_VERSION})`, {
        hint: "run a newer typevisor, or point --home at another directory",
      });
    }
    for (let v = current + 1; v <= SCHEMA_VERSION; v++) {
      const sql = MIGRATIONS[v];
      if (sql === undefined) throw new TypevisorError("STORE_VERSION", `no migration to schema version ${v}`);
      this.db.transaction(() => {
        this.db.exec(sql);
        this.db.pragma(`user_version = ${v}`);
      })();
    }
  }

  close(): void {
    this.db.close();
  }

  /** Every readable VM; rows that cannot be read are left out (quarantined() lists them). */
  listVms(): VmRow[] {
    return (this.db.prepare("SELECT * FROM vms ORDER BY name").all() as RawVm[]).flatMap((r) => {
      try {
        return [checkedRowOf(r)];
      } catch {
        return [];
      }
    });
  }

  /** The rows that cannot be read, with why. */
  quarantined(): QuarantinedRow[] {
    return (this.db.prepare("SELECT * FROM vms ORDER BY name").all() as RawVm[]).flatMap((r) => {
      try {
        checkedRowOf(r);
        return [];
      } catch (e) {
        return [{ id: r.id, name: r.name, dir: r.dir, reason: (e as Error).message }];
      }
    });
  }

  /** @throws TypevisorError VM_QUARANTINED for a row that cannot be read (only removing it is possible). */
  getVm(name: string): VmRow | undefined {
    const r = this.db.prepare("SELECT * FROM vms WHERE name = ?").get(name) as RawVm | undefined;
    if (r === undefined) return undefined;
    try {
      return checkedRowOf(r);
    } catch (e) {
      throw new TypevisorError("VM_QUARANTINED", `the inventory row of VM ${name} cannot be read (${(e as Error).message}); the daemon leaves it alone`, {
        hint: `typevisor vm rm ${name} removes it and its directory`,
      });
    }
  }

  /** The quarantined row named `name`, if it is one. */
  quarantinedRow(name: string): QuarantinedRow | undefined {
    return this.quarantined().find((q) => q.name === name);
  }

  insertVm(row: VmRow): void {
    try {
      this.db
        .prepare(
          `INSERT INTO vms (id, name, spec, state, created_at, updated_at, dir, disks, runtime, last_exit, restarts)
           VALUES (@id, @name, @spec, @state, @createdAt, @updatedAt, @dir, @disks, NULL, NULL, 0)`,
        )
        .run({ ...row, spec: JSON.stringify(row.spec), disks: JSON.stringify(row.disks) });
    } catch (e) {
      if ((e as { code?: string }).code === "SQLITE_CONSTRAINT_UNIQUE") throw new TypevisorError("VM_EXISTS", `a VM named ${row.name} already exists`);
      throw e;
    }
  }

  /** Update the mutable fields of a VM; `runtime: null` clears it. */
  updateVm(name: string, patch: { state?: VmState; runtime?: VmRuntime | null; lastExit?: VmExit; restarts?: number }): VmRow {
    const cur = this.getVm(name);
    if (cur === undefined) throw new TypevisorError("VM_NOT_FOUND", `no VM named ${name}`);
    const state = patch.state ?? cur.state;
    const runtime = patch.runtime === null ? null : JSON.stringify(patch.runtime ?? cur.runtime ?? null);
    const lastExit = patch.lastExit !== undefined ? JSON.stringify(patch.lastExit) : cur.lastExit !== undefined ? JSON.stringify(cur.lastExit) : null;
    const updatedAt = new Date().toISOString();
    this.db
      .prepare("UPDATE vms SET state = ?, runtime = ?, last_exit = ?, restarts = ?, updated_at = ? WHERE name = ?")
      .run(state, runtime === "null" ? null : runtime, lastExit, patch.restarts ?? cur.restarts, updatedAt, name);
    return this.getVm(name)!;
  }

  deleteVm(name: string): void {
    this.db.prepare("DELETE FROM vms WHERE name = ?").run(name);
  }

  listPools(): PoolRow[] {
    return (this.db.prepare("SELECT * FROM pools ORDER BY name").all() as RawPool[]).map(poolOf);
  }

  getPool(name: string): PoolRow | undefined {
    const r = this.db.prepare("SELECT * FROM pools WHERE name = ?").get(name) as RawPool | undefined;
    return r === undefined ? undefined : poolOf(r);
  }

  insertPool(p: PoolRow): void {
    try {
      this.db.prepare("INSERT INTO pools (name, path, quota_bytes, created_at) VALUES (?, ?, ?, ?)").run(p.name, p.path, p.quotaBytes, p.createdAt);
    } catch (e) {
      if ((e as { code?: string }).code === "SQLITE_CONSTRAINT_PRIMARYKEY" || (e as { code?: string }).code === "SQLITE_CONSTRAINT_UNIQUE") {
        throw new TypevisorError("POOL_EXISTS", `a pool named ${p.name} or at ${p.path} already exists`);
      }
      throw e;
    }
  }

  deletePool(name: string): void {
    this.db.prepare("DELETE FROM pools WHERE name = ?").run(name);
  }

  /** Replace a VM's disk list (vm disk add/rm). */
  setDisks(name: string, disks: DiskRow[]): void {
    this.db.prepare("UPDATE vms SET disks = ?, updated_at = ? WHERE name = ?").run(JSON.stringify(disks), new Date().toISOString(), name);
  }

  addEvent(e: Omit<EventRecord, "seq" | "at">): EventRecord {
    const at = new Date().toISOString();
    const info = this.db
      .prepare("INSERT INTO events (at, type, vm, message, data) VALUES (?, ?, ?, ?, ?)")
      .run(at, e.type, e.vm ?? null, e.message, e.data !== undefined ? JSON.stringify(e.data) : null);
    const seq = Number(info.lastInsertRowid);
    // Checked every PRUNE_EVERY events, not on each: the table holds at most keepEvents + PRUNE_EVERY.
    if (seq % PRUNE_EVERY === 0) this.db.prepare("DELETE FROM events WHERE seq <= ?").run(seq - this.keepEvents);
    return { seq, at, ...e };
  }

  /**
   * Events oldest first, at most `limit`: with `afterSeq`, the first ones after it (so a client
   * paging forward with the last seq it got misses none); without, the latest ones.
   */
  events(opts: { afterSeq?: number; vm?: string; limit?: number } = {}): EventRecord[] {
    const limit = Math.min(opts.limit ?? 1000, 10000);
    const order = opts.afterSeq !== undefined ? "ASC" : "DESC";
    const rows = (
      opts.vm !== undefined
        ? this.db.prepare(`SELECT * FROM events WHERE seq > ? AND vm = ? ORDER BY seq ${order} LIMIT ?`).all(opts.afterSeq ?? 0, opts.vm, limit)
        : this.db.prepare(`SELECT * FROM events WHERE seq > ? ORDER BY seq ${order} LIMIT ?`).all(opts.afterSeq ?? 0, limit)
    ) as RawEvent[];
    return (order === "DESC" ? rows.reverse() : rows).map(eventOf);
  }
}
