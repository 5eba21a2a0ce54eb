/**
 * Alerts (docs/control-plane.md, "Metrics history and alerts"): built-in rules and user rules,
 * evaluated on every usage sample (VmManager.collectUsage) and, for a crash, at once. A rule's
 * condition holding for its `for` duration makes an alert fire; the condition ending (or its
 * subject going away: the VM removed, the rule removed) resolves it. Each change is an event
 * (alert.firing, alert.resolved) recorded with the others, so `typevisor alerts -f` and any event
 * follower see it.
 *
 * The engine keeps its state in memory: after a daemon restart a condition that still holds fires
 * again once (a new alert.firing event). The clock is injected (tests).
 */
import type Database from "better-sqlite3";
import { z } from "zod";
import { TypevisorError } from "../errors.js";
import type { MetricSample } from "./history.js";
import { vmName } from "./spec.js";

export const ALERT_METRICS = ["cpu", "memory", "disk-read", "disk-write", "net-rx", "net-tx"] as const;
export type AlertMetric = (typeof ALERT_METRICS)[number];
export const SEVERITIES = ["warning", "critical"] as const;
export type Severity = (typeof SEVERITIES)[number];

/** A share of the host's memory or of a pool's filesystem above which the built-in rules fire. */
export const HOST_MEMORY_THRESHOLD = 0.9;
export const POOL_DISK_THRESHOLD = 0.9;

export const BUILTIN_RULES = [
  { name: "vm-crashed", severity: "critical", description: "a VM's VMM exited unexpectedly (crashed; resolved when it runs again, is stopped or removed)" },
  { name: "vmm-unresponsive", severity: "critical", description: "a VM's VMM does not answer on its control socket" },
  { name: "host-memory", severity: "warning", description: `the host's memory in use above ${HOST_MEMORY_THRESHOLD * 100}%` },
  { name: "pool-disk", severity: "warning", description: `a storage pool's filesystem above ${POOL_DISK_THRESHOLD * 100}% full` },
  { name: "vm-paused-disk-full", severity: "critical", description: "a VM paused because a disk's filesystem is full" },
  { name: "audit-write", severity: "critical", description: "the audit log cannot be written (resolved by the next entry written)" },
] as const satisfies readonly { name: string; severity: Severity; description: string }[];

const BUILTIN_NAMES = new Set<string>(BUILTIN_RULES.map((r) => r.name));

export const alertRuleName = z
  .string()
  .regex(/^[a-z0-9][a-z0-9-]{0,62}$/, "a rule name is 1-63 lower-case letters, digits and '-'")
  .refine((n) => !BUILTIN_NAMES.has(n), "that name is a built-in rule's");

export const alertRuleSpec = z
  .object({
    name: alertRuleName,
    metric: z.enum(ALERT_METRICS).describe("cpu: percent of one CPU; memory: bytes; disk-read, disk-write, net-rx, net-tx: bytes per second"),
    above: z.number().finite().min(0).max(2 ** 53).describe("the threshold, in the metric's unit"),
    forSeconds: z.number().int().min(0).max(86_400).default(0).describe("how long the metric must stay above it before the alert fires"),
    severity: z.enum(SEVERITIES).default("warning"),
    vm: vmName.optional().describe("only this VM; absent: every VM"),
  })
  .strict();
export type AlertRuleSpec = z.output<typeof alertRuleSpec>;
export type AlertRule = AlertRuleSpec & { createdAt: string };

export interface FiringAlert {
  rule: string;
  /** host, vm:NAME or pool:NAME */
  subject: string;
  vm?: string;
  severity: Severity;
  since: string;
  message: string;
  value?: number;
  threshold?: number;
}

/** What the engine looks at, once per usage sample. */
export interface Observation {
  host: { memoryBytes: number; memoryTotalBytes: number };
  vms: { name: string; state: string; sample?: MetricSample; unresponsive: boolean; pausedDiskFull: boolean }[];
  pools: { name: string; capacityBytes: number; freeBytes: number }[];
  /** The audit log's state, where the daemon has one (audit.ts). */
  audit?: { failing: boolean; failures: number };
}

export interface AlertChange {
  kind: "firing" | "resolved";
  alert: FiringAlert;
}

interface Condition {
  rule: string;
  subject: string;
  vm?: string;
  severity: Severity;
  forMs: number;
  /** true: holds; false: does not; undefined: unknown this time (leave the alert as it is). */
  active: boolean | undefined;
  message: string;
  value?: number;
  threshold?: number;
}

function metricValue(m: AlertMetric, s: MetricSample | undefined): number | undefined {
  if (s === undefined) return undefined;
  switch (m) {
    case "cpu":
      return s.cpuPercent;
    case "memory":
      return s.memoryBytes;
    case "disk-read":
      return s.io?.diskReadBps;
    case "disk-write":
      return s.io?.diskWriteBps;
    case "net-rx":
      return s.io?.netRxBps;
    case "net-tx":
      return s.io?.netTxBps;
  }
}

const ACTIVE_STATES = new Set(["starting", "running", "paused", "stopping"]);

export class AlertEngine {
  private readonly firing = new Map<string, FiringAlert>();
  private readonly pending = new Map<string, number>();

  constructor(private readonly now: () => number = Date.now) {}

  /** The alerts firing now, oldest first. */
  current(): FiringAlert[] {
    return [...this.firing.values()].sort((a, b) => a.since.localeCompare(b.since) || a.rule.localeCompare(b.rule) || a.subject.localeCompare(b.subject));
  }

  /** A condition seen outside the samples (a crash event): fires now unless already firing. */
  fireNow(c: Omit<Condition, "active" | "forMs">): AlertChange[] {
    const key = `${c.rule}|${c.subject}`;
    if (this.firing.has(key)) return [];
    const alert = this.alertOf(c);
    this.firing.set(key, alert);
    return [{ kind: "firing", alert }];
  }

  evaluate(obs: Observation, rules: readonly AlertRule[]): AlertChange[] {
    const conds: Condition[] = [];
    const { host } = obs;
    if (host.memoryTotalBytes > 0) {
      const share = host.memoryBytes / host.memoryTotalBytes;
      conds.push({
        rule: "host-memory", subject: "host", severity: "warning", forMs: 0, active: share > HOST_MEMORY_THRESHOLD,
        message: `the host's memory is ${(share * 100).toFixed(0)}% in use (above ${HOST_MEMORY_THRESHOLD * 100}%)`, value: share * 100, threshold: HOST_MEMORY_THRESHOLD * 100,
      });
    }
    for (const p of obs.pools) {
      if (p.capacityBytes <= 0) continue;
      const share = 1 - p.freeBytes / p.capacityBytes;
      conds.push({
        rule: "pool-disk", subject: `pool:${p.name}`, severity: "warning", forMs: 0, active: share > POOL_DISK_THRESHOLD,
        message: `storage pool ${p.name}'s filesystem is ${(share * 100).toFixed(0)}% full (above ${POOL_DISK_THRESHOLD * 100}%)`, value: share * 100, threshold: POOL_DISK_THRESHOLD * 100,
      });
    }
    if (obs.audit !== undefined) {
      conds.push({ rule: "audit-write", subject: "audit", severity: "critical", forMs: 0, active: obs.audit.failing, message: `the audit log cannot be written (${obs.audit.failures} entries lost since the daemon started)`, value: obs.audit.failures });
    }
    for (const v of obs.vms) {
      const subject = `vm:${v.name}`;
      conds.push({ rule: "vm-crashed", subject, vm: v.name, severity: "critical", forMs: 0, active: v.state === "crashed", message: `VM ${v.name} crashed` });
      conds.push({ rule: "vmm-unresponsive", subject, vm: v.name, severity: "critical", forMs: 0, active: v.unresponsive, message: `VM ${v.name}'s VMM does not answer` });
      conds.push({ rule: "vm-paused-disk-full", subject, vm: v.name, severity: "critical", forMs: 0, active: v.pausedDiskFull, message: `VM ${v.name} is paused: a disk's filesystem is full` });
      for (const r of rules) {
        if (r.vm !== undefined && r.vm !== v.name) continue;
        const value = metricValue(r.metric, v.sample);
        // no VMM: the metric is not above anything; a VMM whose figure could not be read this
        // time: unknown, the alert stays as it is
        const active = !ACTIVE_STATES.has(v.state) ? false : value === undefined ? undefined : value > r.above;
        conds.push({
          rule: r.name, subject, vm: v.name, severity: r.severity, forMs: r.forSeconds * 1000, active,
          message: `VM ${v.name}: ${r.metric} ${value !== undefined ? formatValue(r.metric, value) : "?"} above ${formatValue(r.metric, r.above)}${r.forSeconds > 0 ? ` for ${r.forSeconds} s` : ""}`,
          ...(value !== undefined ? { value } : {}), threshold: r.above,
        });
      }
    }
    const now = this.now();
    const changes: AlertChange[] = [];
    const seen = new Set<string>();
    for (const c of conds) {
      const key = `${c.rule}|${c.subject}`;
      seen.add(key);
      if (c.active === undefined) continue;
      const was = this.firing.get(key);
      if (c.active) {
        const since = this.pending.get(key) ?? now;
        this.pending.set(key, since);
        if (was === undefined && now - since >= c.forMs) {
          const alert = this.alertOf(c);
          this.firing.set(key, alert);
          changes.push({ kind: "firing", alert });
        }
      } else {
        this.pending.delete(key);
        if (was !== undefined) {
          this.firing.delete(key);
          changes.push({ kind: "resolved", alert: { ...was, message: resolvedMessage(c.rule, was) } });
        }
      }
    }
    // subjects or rules that went away: their alerts resolve
    for (const [key, was] of [...this.firing]) {
      if (seen.has(key)) continue;
      this.firing.delete(key);
      changes.push({ kind: "resolved", alert: { ...was, message: `${was.message}: no longer observed (the VM, pool or rule was removed)` } });
    }
    for (const key of [...this.pending.keys()]) if (!seen.has(key)) this.pending.delete(key);
    return changes;
  }

  private alertOf(c: Omit<Condition, "active" | "forMs">): FiringAlert {
    return {
      rule: c.rule, subject: c.subject, ...(c.vm !== undefined ? { vm: c.vm } : {}), severity: c.severity, since: new Date(this.now()).toISOString(), message: c.message,
      ...(c.value !== undefined ? { value: c.value } : {}), ...(c.threshold !== undefined ? { threshold: c.threshold } : {}),
    };
  }
}

function resolvedMessage(rule: string, was: FiringAlert): string {
  return `resolved: ${was.message}${rule === "vm-crashed" ? " (it is no longer in the crashed state)" : ""}`;
}

function formatValue(m: AlertMetric, v: number): string {
  if (m === "cpu") return `${Math.round(v * 10) / 10}%`;
  return m === "memory" ? `${Math.round(v)} bytes` : `${Math.round(v)} bytes/s`;
}

/** User rules in the inventory (schema 5, alert_rules). */
export class AlertRules {
  constructor(private readonly db: Database.Database) {}

  list(): AlertRule[] {
    return (this.db.prepare("SELECT spec, created_at FROM alert_rules ORDER BY name").all() as { spec: string; created_at: string }[]).flatMap((r) => {
      // a hand-edited row that does not parse is left out, never acted on
      const p = alertRuleSpec.safeParse(JSON.parse(r.spec));
      return p.success ? [{ ...p.data, createdAt: r.created_at }] : [];
    });
  }

  /** @throws TypevisorError ALERT_RULE_EXISTS */
  add(spec: AlertRuleSpec): AlertRule {
    const createdAt = new Date().toISOString();
    try {
      this.db.prepare("INSERT INTO alert_rules (name, spec, created_at) VALUES (?, ?, ?)").run(spec.name, JSON.stringify(spec), createdAt);
    } catch (e) {
      if ((e as { code?: string }).code === "SQLITE_CONSTRAINT_PRIMARYKEY") throw new TypevisorError("ALERT_RULE_EXISTS", `an alert rule named ${spec.name} already exists`);
      throw e;
    }
    return { ...spec, createdAt };
  }

  /** @throws TypevisorError ALERT_RULE_NOT_FOUND */
  remove(name: string): void {
    if (this.db.prepare("DELETE FROM alert_rules WHERE name = ?").run(name).changes === 0) {
      throw new TypevisorError("ALERT_RULE_NOT_FOUND", `no alert rule named ${name}`, { hint: "typevisor alert rule ls lists them" });
    }
  }
}
