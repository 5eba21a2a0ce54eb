/**
 * Alerts over the API (docs/control-plane.md, "Metrics history and alerts"): the alerts firing
 * now and the rules. Reading them shows every VM's (host-wide: not for callers scoped to VMs);
 * changing rules needs alerts:admin. Firing and resolving are events (GET /v1/events).
 */
import { z } from "zod";
import { ALERT_METRICS, alertRuleName, alertRuleSpec, BUILTIN_RULES, SEVERITIES } from "../control/alerts.js";
import { HANDLED, route, type Route } from "./routes.js";

export const firingAlert = z.object({
  rule: z.string(),
  subject: z.string().describe("host, vm:NAME or pool:NAME"),
  vm: z.string().optional(),
  severity: z.enum(SEVERITIES),
  since: z.string(),
  message: z.string(),
  value: z.number().optional(),
  threshold: z.number().optional(),
});
export const alertList = z.object({ alerts: z.array(firingAlert) });
export const alertRuleInfo = z.object({
  name: z.string(),
  builtin: z.boolean(),
  description: z.string().optional(),
  metric: z.enum(ALERT_METRICS).optional(),
  above: z.number().optional(),
  forSeconds: z.number().int().optional(),
  severity: z.enum(SEVERITIES),
  vm: z.string().optional(),
  createdAt: z.string().optional(),
});
export const alertRuleList = z.object({ rules: z.array(alertRuleInfo) });
export const webhookList = z.object({
  webhooks: z.array(
    z.object({
      url: z.string(),
      delivered: z.number().int(),
      failedAttempts: z.number().int(),
      givenUp: z.number().int(),
      dropped: z.number().int(),
      queued: z.number().int(),
      lastSuccessAt: z.string().optional(),
      lastError: z.object({ at: z.string(), message: z.string() }).optional(),
    }),
  ),
});
export type WebhookInfo = z.infer<typeof webhookList>["webhooks"][number];
export const alertRuleParams = z.object({ rule: alertRuleName }).strict();
export type FiringAlertInfo = z.infer<typeof firingAlert>;
export type AlertRuleInfo = z.infer<typeof alertRuleInfo>;

export const ALERT_ROUTES: Route[] = [
  route({
    method: "GET", url: "/v1/alerts", operationId: "listAlerts", summary: "The alerts firing now (alert.firing and alert.resolved events tell when they change)",
    permission: "metrics:read", hostWide: true,
    responses: { 200: { description: "oldest first", schema: alertList } },
    handler: async ({ manager }) => ({ alerts: manager.firingAlerts() }),
  }),
  route({
    method: "GET", url: "/v1/alerts/webhooks", operationId: "alertWebhooks", summary: "The daemon's alert webhooks (--alert-webhook): deliveries, failed attempts, events given up on, the last error",
    permission: "metrics:read", hostWide: true,
    responses: { 200: { description: "per URL (without its query)", schema: webhookList } },
    handler: async ({ manager }) => ({ webhooks: manager.webhookStatus() }),
  }),
  route({
    method: "GET", url: "/v1/alerts/rules", operationId: "listAlertRules", summary: "Alert rules: the built-in ones, then the users'",
    permission: "metrics:read", hostWide: true,
    responses: { 200: { description: "rules", schema: alertRuleList } },
    handler: async ({ manager }) => ({
      rules: [...BUILTIN_RULES.map((r) => ({ ...r, builtin: true })), ...manager.listAlertRules().map((r) => ({ ...r, builtin: false }))],
    }),
  }),
  route({
    method: "POST", url: "/v1/alerts/rules", operationId: "addAlertRule", summary: "Add an alert rule: a VM metric above a threshold for a while",
    body: alertRuleSpec, permission: "alerts:admin",
    responses: { 201: { description: "added", schema: alertRuleInfo } },
    handler: async ({ manager, body }) => ({ ...manager.addAlertRule(body), builtin: false }),
  }),
  route({
    method: "DELETE", url: "/v1/alerts/rules/:rule", operationId: "removeAlertRule", summary: "Remove an alert rule (its firing alerts resolve at the next sample)",
    params: alertRuleParams, permission: "alerts:admin",
    responses: { 204: { description: "removed" } },
    handler: async ({ manager, params, reply }) => {
      manager.removeAlertRule(params.rule);
      void reply.code(204).send();
      return HANDLED;
    },
  }),
];
