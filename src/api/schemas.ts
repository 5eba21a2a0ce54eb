/**
 * The API's request and response shapes. Requests are validated with these
 * schemas and /openapi.json is generated from the same objects.
 */
import { z } from "zod";
import { poolInfo, poolName, poolSpec } from "../control/pools.js";
import { diskAddSpec, eventRecord, vmInfo, vmName, vmSpec, vmUsage, VM_STATES } from "../control/spec.js";

export { diskAddSpec, eventRecord, poolInfo, poolSpec, vmInfo, vmName, vmSpec, vmUsage };

export const diskParams = z.object({ name: vmName, disk: z.string().regex(/^(disk)?\d{1,3}$/, "a disk is disk<N> or N (vm show lists them)") }).strict();
export const poolParams = z.object({ name: poolName }).strict();
export const poolList = z.object({ pools: z.array(poolInfo) });

export const nameParams = z.object({ name: vmName }).strict();

export const boolString = z.enum(["true", "false", "1", "0"]).transform((v) => v === "true" || v === "1");

export const createQuery = z.object({ start: boolString.optional() }).strict();
export const removeQuery = z.object({ force: boolString.optional() }).strict();
export const stopBody = z
  .object({
    force: z.boolean().default(false).describe("SIGKILL the VMM at once"),
    timeoutSeconds: z.number().positive().max(3600).optional().describe("then SIGKILL (default: the daemon's stop timeout)"),
  })
  .strict();
export const consoleQuery = z
  .object({
    tail: z.coerce.number().int().min(0).max(64 * 2 ** 20).optional().describe("only the last N bytes"),
    follow: boolString.optional().describe("keep the response open and stream new output"),
  })
  .strict();
export const eventsQuery = z
  .object({
    after: z.coerce.number().int().min(0).optional().describe("events with a sequence number above this"),
    vm: vmName.optional(),
    limit: z.coerce.number().int().min(1).max(10000).optional(),
    follow: boolString.optional().describe("stream as server-sent events (text/event-stream)"),
  })
  .strict();

export const vmList = z.object({ vms: z.array(vmInfo) });
export const eventList = z.object({ events: z.array(eventRecord) });
export const vmStats = z.object({ name: z.string(), state: z.enum(VM_STATES), usage: vmUsage.optional() });

const resourceLine = z.object({ capacity: z.number(), budget: z.number(), allocated: z.number(), used: z.number(), free: z.number() });
export const hostReport = z.object({
  cpu: resourceLine.describe("CPUs"),
  memory: resourceLine.describe("bytes"),
  disk: resourceLine.describe("bytes, in the daemon's home"),
  overcommit: z.object({ cpu: z.number(), memory: z.number(), disk: z.number(), reservedMemoryBytes: z.number() }),
  cgroups: z.object({ available: z.boolean(), mount: z.string().optional(), controllers: z.array(z.string()), reason: z.string().optional() }),
  vms: z.record(z.string(), z.number()),
  standbyVmms: z
    .object({ size: z.number().int(), ready: z.number().int(), template: z.string().optional().describe("under the VMM sandbox: the id of the memory snapshot the standbys are jailed for") })
    .describe("VMMs kept started for restores (--standby-vmms), and how many wait ready now (docs/snapshots.md)"),
  tls: z.object({ fingerprint: z.string().describe("SHA-256 of the HTTPS listener's certificate (pin it: --fingerprint)") }).optional(),
});
export const problemSchema = z.object({
  type: z.string(),
  title: z.string(),
  status: z.number().int(),
  code: z.string(),
  detail: z.string(),
  hint: z.string().optional(),
});
export const health = z.object({ ok: z.boolean(), version: z.string(), pid: z.number().int() });

export type HostReport = z.infer<typeof hostReport>;
export type VmStats = z.infer<typeof vmStats>;

export const isoTime = z
  .string()
  .max(40)
  .refine((s) => !Number.isNaN(Date.parse(s)), "an ISO 8601 time")
  .transform((s) => Date.parse(s));
export const metricsHistoryQuery = z
  .object({
    vm: vmName.optional().describe("the VM; absent: the host"),
    from: isoTime.optional().describe("ISO 8601; default: an hour before `to`"),
    to: isoTime.optional().describe("ISO 8601; default: now"),
    step: z.coerce.number().int().optional().describe("10, 300 or 3600 seconds; absent: the finest that holds `from` in at most 2000 points"),
  })
  .strict();
export const historyPoint = z.object({
  t: z.string().describe("the bucket's start"),
  samples: z.number().int().describe("usage samples averaged in the bucket (0: only the state is known)"),
  cpuPercent: z.number().optional().describe("VM: of one CPU (200 = two busy vCPUs); host: of all its CPUs"),
  memoryBytes: z.number().optional(),
  diskReadBps: z.number().optional().describe("bytes per second; host: the VMs' sum"),
  diskWriteBps: z.number().optional(),
  netRxBps: z.number().optional(),
  netTxBps: z.number().optional(),
  state: z.string().optional().describe("the VM's last state in the bucket"),
});
export const metricsHistory = z.object({ vm: z.string().optional(), step: z.number().int(), from: z.string(), to: z.string(), points: z.array(historyPoint) });
export type MetricsHistoryReport = z.infer<typeof metricsHistory>;
