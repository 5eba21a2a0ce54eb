/**
 * `typevisor alerts [-f]` (the alerts firing now; -f then prints each alert.firing and
 * alert.resolved event as it comes) and `typevisor alert rule add|ls|rm` (docs/control-plane.md,
 * "Metrics history and alerts"). Exit codes as in vm.ts.
 */
import type { Command } from "commander";
import type { FiringAlertInfo } from "../api/alert-routes.js";
import { ALERT_METRICS, SEVERITIES, type AlertMetric } from "../control/alerts.js";
import { TypevisorError } from "../errors.js";
import { parseSize } from "../size.js";
import type { EventRecord } from "../control/spec.js";
import { connect, type ConnectionOptions } from "./connect.js";
import { printFollowed } from "./follow.js";
import { formatTime, renderTable, toJson } from "./format.js";
import { escapeControls } from "./terminal-safe.js";
import { parseHistoryRange } from "./history.js";
import { clientCommand } from "./vm.js";

function bad(message: string): TypevisorError {
  return new TypevisorError("INVALID_ARGUMENT", message);
}

/** --above: a percentage for cpu, else bytes (or bytes/s) with K, M, G... */
export function parseThreshold(metric: AlertMetric, v: string): number {
  if (metric === "cpu") {
    if (!/^\s*\d+(\.\d+)?\s*%?\s*$/.test(v)) throw bad(`--above for cpu is a percentage of one CPU, e.g. 80 or 150 (got "${v}")`);
    return Number(v.replace("%", ""));
  }
  return parseSize(v.replace(/\/s$/, ""), { what: "--above" });
}

function formatAlerts(alerts: FiringAlertInfo[]): string {
  if (alerts.length === 0) return "no alerts firing\n";
  return renderTable(
    ["SINCE", "SEVERITY", "RULE", "SUBJECT", "MESSAGE"],
    alerts.map((a) => [formatTime(a.since), a.severity, a.rule, a.subject, escapeControls(a.message)]),
  );
}

export function registerAlertCommands(program: Command): void {
  clientCommand(program, "alerts", "the alerts firing now; -f then prints each alert as it fires or resolves")
    .option("-f, --follow", "keep printing alert.firing and alert.resolved events until Ctrl-C")
    .option("--json", "print the API's JSON (with -f: one event per line)")
    .action(async (o: ConnectionOptions & { follow?: boolean; json?: boolean }) => {
      const c = connect(o);
      // the latest event first: following from it misses nothing that happens after the listing
      const last = (await c.events({ limit: 1 })).at(-1)?.seq ?? 0;
      const alerts = await c.alerts();
      process.stdout.write(o.json === true ? (o.follow === true ? alerts.map((a) => `${JSON.stringify(a)}\n`).join("") : toJson({ alerts })) : formatAlerts(alerts));
      if (o.follow !== true) return;
      const alertOnly = (e: EventRecord): boolean => e.type.startsWith("alert.") && !e.type.startsWith("alert.rule");
      const print = (e: EventRecord): string =>
        !alertOnly(e) ? "" : o.json === true ? `${JSON.stringify(e)}\n` : `${formatTime(e.at)}  ${e.type === "alert.firing" ? "FIRING  " : "RESOLVED"}  ${escapeControls(e.message)}\n`;
      await printFollowed(connect(o, { timeoutMs: 0 }).followEvents({ after: last }), print, "event stream");
    });

  const alert = program.command("alert").description("alert rules: typevisor alert rule add|ls|rm");
  const rule = alert.command("rule").description("alert rules: built-in ones and your own (a VM metric above a threshold for a while)");
  clientCommand(rule, "add", "add a rule: it fires when a VM's metric stays above N for the given time")
    .argument("<name>", "rule name: 1-63 lower-case letters, digits and '-'")
    .requiredOption("--metric <metric>", `${ALERT_METRICS.join(", ")} (cpu: % of one CPU; memory: bytes; the others: bytes per second)`)
    .requiredOption("--above <n>", "the threshold: 80 (cpu), 2G (memory), 50M (bytes per second)")
    .option("--for <duration>", "how long it must stay above: 30s, 2m, 1h (default: at once)")
    .option("--severity <severity>", SEVERITIES.join(" or "), "warning")
    .option("--vm <name>", "only this VM (default: every VM)")
    .option("--json", "print the API's JSON")
    .action(async (name: string, o: ConnectionOptions & { metric: string; above: string; for?: string; severity: string; vm?: string; json?: boolean }) => {
      if (!(ALERT_METRICS as readonly string[]).includes(o.metric)) throw bad(`--metric is one of ${ALERT_METRICS.join(", ")} (got "${o.metric}")`);
      const metric = o.metric as AlertMetric;
      if (!(SEVERITIES as readonly string[]).includes(o.severity)) throw bad(`--severity is ${SEVERITIES.join(" or ")} (got "${o.severity}")`);
      const forSeconds = o.for !== undefined ? Math.round(parseHistoryRange("--for", o.for) / 1000) : 0;
      const r = await connect(o).addAlertRule({
        name, metric, above: parseThreshold(metric, o.above), forSeconds, severity: o.severity as (typeof SEVERITIES)[number], ...(o.vm !== undefined ? { vm: o.vm } : {}),
      });
      process.stdout.write(o.json === true ? toJson(r) : `alert rule ${r.name} added\n`);
    });
  clientCommand(rule, "ls", "the rules: built-in ones, then yours")
    .option("--json", "print the API's JSON")
    .action(async (o: ConnectionOptions & { json?: boolean }) => {
      const rules = await connect(o).alertRules();
      if (o.json === true) return void process.stdout.write(toJson({ rules }));
      process.stdout.write(
        renderTable(
          ["NAME", "SEVERITY", "CONDITION", "VM"],
          rules.map((r) => [
            r.name,
            r.severity,
            r.builtin ? (r.description ?? "built-in") : `${r.metric} above ${r.above}${r.forSeconds !== undefined && r.forSeconds > 0 ? ` for ${r.forSeconds}s` : ""}`,
            r.builtin ? "-" : (r.vm ?? "every VM"),
          ]),
        ),
      );
    });
  clientCommand(rule, "rm", "remove one of your rules (its firing alerts resolve)")
    .argument("<name>", "rule name")
    .action(async (name: string, o: ConnectionOptions) => {
      await connect(o).removeAlertRule(name);
      process.stdout.write(`alert rule ${name} removed\n`);
    });
}
