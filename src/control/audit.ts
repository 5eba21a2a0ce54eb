/**
 * The audit log: who did what, from where, to what, with what result (docs/security.md). One
 * table in the inventory, append-only (triggers refuse UPDATE and DELETE) and hash-chained:
 * every entry carries `prev`, the hash of the entry before it (64 zeros for the first), and
 * `hash` = SHA-256(prev ‖ its own fields as canonical JSON). Editing an entry changes its hash;
 * removing or reordering entries breaks the next entry's `prev`; `verify` walks the chain and names
 * the first entry that does not hold. What a chain alone cannot show is a cut at the end (the last
 * entries removed): the daemon also writes the head (last seq and hash) to `audit.head`, a file
 * beside the inventory, and verify compares with it.
 *
 * Nothing secret goes in: callers pass user names, token ids (public), peers, actions, targets and
 * results; never a token, a password or a request body.
 */
import { createHash } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import type { Store } from "./store.js";

export interface AuditEntry {
  seq: number;
  at: string;
  user?: string;
  /** The token's public id. */
  token?: string;
  /** `uid N` on the unix socket, the client's address over TCP. */
  peer: string;
  /** e.g. `POST /v1/vms/:name/start`, `console.attach`, `auth.token` */
  action: string;
  /** The VM, user or token acted on. */
  target?: string;
  /** `ok`, `refused`, or the HTTP status. */
  result: string;
  detail?: string;
  prev: string;
  hash: string;
}

export type AuditInput = Omit<AuditEntry, "seq" | "at" | "prev" | "hash">;

interface RawAudit {
  seq: number;
  at: string;
  user: string | null;
  token: string | null;
  peer: string;
  action: string;
  target: string | null;
  result: string;
  detail: string | null;
  prev: string;
  hash: string;
}

const GENESIS = "0".repeat(64);

function entryOf(r: RawAudit): AuditEntry {
  return {
    seq: r.seq,
    at: r.at,
    ...(r.user !== null ? { user: r.user } : {}),
    ...(r.token !== null ? { token: r.token } : {}),
    peer: r.peer,
    action: r.action,
    ...(r.target !== null ? { target: r.target } : {}),
    result: r.result,
    ...(r.detail !== null ? { detail: r.detail } : {}),
    prev: r.prev,
    hash: r.hash,
  };
}

/** The hash an entry must carry: over the previous hash and every field of its own, in a fixed order. */
export function entryHash(e: Omit<AuditEntry, "hash">): string {
  const fields = [e.seq, e.at, e.user ?? null, e.token ?? null, e.peer, e.action, e.target ?? null, e.result, e.detail ?? null];
  return createHash("sha256").update(e.prev).update(JSON.stringify(fields)).digest("hex");
}

export interface AuditQuery {
  since?: string;
  user?: string;
  /** Entries whose target is this VM. */
  vm?: string;
  afterSeq?: number;
  limit?: number;
}

export interface VerifyResult {
  ok: boolean;
  entries: number;
  /** The first entry that does not hold, and why. */
  problem?: { seq: number; reason: string };
}

export class AuditLog {
  /** Entries that could not be written since the daemon started (a full disk, an I/O error). */
  failures = 0;
  /** The last write failed and none has succeeded since: the built-in `audit-write` alert fires. */
  failing = false;
  private readonly failureListeners: ((err: Error) => void)[] = [];

  constructor(private readonly store: Store, private readonly headFile?: string) {}

  /** Called when writing starts failing (the first failure after a success), with the error. */
  onFailure(listener: (err: Error) => void): void {
    this.failureListeners.push(listener);
  }

  /**
   * Append an entry. Throws when it cannot be written; callers go on (a refusal stands, an action
   * that happened is not undone), so the failure is counted here and said once per outage to the
   * onFailure listeners: the daemon turns it into an alert and a metric (docs/security.md).
   */
  record(e: AuditInput): AuditEntry {
    try {
      const entry = this.append(e);
      this.failing = false;
      return entry;
    } catch (err) {
      this.failures++;
      if (!this.failing) {
        this.failing = true;
        for (const l of this.failureListeners) {
          try {
            l(err as Error);
          } catch {
            /* a listener's failure is not the audit log's */
          }
        }
      }
      throw err;
    }
  }

  private append(e: AuditInput): AuditEntry {
    const db = this.store.db;
    // one transaction: the previous hash and the new row cannot interleave with another append
    const entry = db.transaction(() => {
      const last = db.prepare("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").get() as { seq: number; hash: string } | undefined;
      const base = { seq: (last?.seq ?? 0) + 1, at: new Date().toISOString(), ...e, prev: last?.hash ?? GENESIS };
      const entry: AuditEntry = { ...base, hash: entryHash(base) };
      db.prepare("INSERT INTO audit (seq, at, user, token, peer, action, target, result, detail, prev, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)").run(
        entry.seq, entry.at, entry.user ?? null, entry.token ?? null, entry.peer, entry.action, entry.target ?? null, entry.result, entry.detail ?? null, entry.prev, entry.hash,
      );
      return entry;
    })();
    // after the commit: a head ahead of the log would look like a cut; one behind (a crash in between) is only less strict
    if (this.headFile !== undefined) writeFileSync(this.headFile, `${entry.seq} ${entry.hash}\n`, { mode: 0o600 });
    return entry;
  }

  /** Entries oldest first; without `afterSeq`, the latest `limit`. */
  list(q: AuditQuery = {}): AuditEntry[] {
    const where: string[] = ["seq > ?"];
    const args: unknown[] = [q.afterSeq ?? 0];
    if (q.since !== undefined) {
      where.push("at >= ?");
      args.push(q.since);
    }
    if (q.user !== undefined) {
      where.push("user = ?");
      args.push(q.user);
    }
    if (q.vm !== undefined) {
      where.push("target = ?");
      args.push(q.vm);
    }
    const limit = Math.min(q.limit ?? 1000, 10000);
    const order = q.afterSeq !== undefined ? "ASC" : "DESC";
    const rows = this.store.db.prepare(`SELECT * FROM audit WHERE ${where.join(" AND ")} ORDER BY seq ${order} LIMIT ?`).all(...args, limit) as RawAudit[];
    return (order === "DESC" ? rows.reverse() : rows).map(entryOf);
  }

  /** Walk the whole chain. */
  verify(): VerifyResult {
    let prev = GENESIS;
    let expectSeq = 1;
    let n = 0;
    for (const r of this.store.db.prepare("SELECT * FROM audit ORDER BY rowid").iterate() as Iterable<RawAudit>) {
      const e = entryOf(r);
      n++;
      const bad = (reason: string): VerifyResult => ({ ok: false, entries: n, problem: { seq: e.seq, reason } });
      if (e.seq !== expectSeq) {
        return bad(e.seq > expectSeq ? `entry ${e.seq} follows entry ${expectSeq - 1}: ${e.seq === expectSeq + 1 ? `entry ${expectSeq} was` : `entries ${expectSeq}-${e.seq - 1} were`} removed` : `entry ${e.seq} is out of order (expected ${expectSeq})`);
      }
      if (e.prev !== prev) return bad(`entry ${e.seq} does not follow the entry before it (its recorded previous hash differs): an entry before it was removed, replaced or reordered`);
      if (entryHash(e) !== e.hash) return bad(`entry ${e.seq} was modified (its content does not match its hash)`);
      prev = e.hash;
      expectSeq = e.seq + 1;
    }
    if (this.headFile !== undefined) {
      let head: string | undefined;
      try {
        head = readFileSync(this.headFile, "utf8").trim();
      } catch {
        head = undefined;
      }
      if (head !== undefined && head !== "") {
        const [seq, hash] = head.split(" ");
        const last = expectSeq - 1;
        if (Number(seq) > last) return { ok: false, entries: n, problem: { seq: last + 1, reason: `the log ends at entry ${last}, but entry ${seq} was written (audit.head): entries ${last + 1}-${seq} were removed` } };
        if (Number(seq) === last && hash !== prev) return { ok: false, entries: n, problem: { seq: last, reason: `entry ${last} is not the one written (audit.head holds another hash)` } };
      }
    }
    return { ok: true, entries: n };
  }
}
