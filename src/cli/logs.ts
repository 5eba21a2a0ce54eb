/**
 * `typevisor logs [-f] [--vm NAME] [--since 1h] [--grep RE] [--source daemon,vmm,console]`: the
 * daemon's own log and a VM's VMM log (and its console, when asked) (GET /v1/logs, docs/control-plane.md "Logs"). For people, one line each: TIME LEVEL SOURCE VM
 * MESSAGE; for scripts, `--json`: the API's line objects, one per line (NDJSON).
 *
 * --grep is a regular expression run here, on the lines the daemon sent: the daemon itself only
 * takes a plain substring (`--contains`), so no caller's pattern ever runs in it (a pathological
 * regex would stall its event loop).
 */
import type { Command } from "commander";
import type { LogLine } from "../control/logs.js";
import { LOG_LEVELS, LOG_SOURCES, type LogLevel, type LogSource } from "../control/logs.js";
import { TypevisorError } from "../errors.js";
import { connect, type ConnectionOptions } from "./connect.js";
import { printFollowed } from "./follow.js";
import { formatTime } from "./format.js";
import { parseHistoryRange } from "./history.js";
import { escapeControls } from "./terminal-safe.js";
import { clientCommand, parseWhole } from "./vm.js";

export function formatLogLine(l: LogLine, json: boolean): string {
  if (json) return `${JSON.stringify(l)}\n`;
  const data = l.fields !== undefined ? ` ${JSON.stringify(l.fields)}` : "";
  // a line can carry what a VMM or a guest said: no control sequences to a terminal
  return `${(l.time !== null ? formatTime(l.time) : "-").padEnd(20)}  ${l.level.padEnd(5)}  ${l.source.padEnd(7)}  ${(l.vm ?? "-").padEnd(12)}  ${escapeControls(l.msg + data)}\n`;
}

interface LogsOptions extends ConnectionOptions {
  follow?: boolean;
  vm?: string;
  since?: string;
  grep?: string;
  contains?: string;
  level?: string;
  limit?: string;
  source?: string;
  json?: boolean;
}

function grepOf(v: string | undefined): RegExp | undefined {
  if (v === undefined) return undefined;
  try {
    return new RegExp(v, "i");
  } catch (e) {
    throw new TypevisorError("INVALID_ARGUMENT", `--grep: ${(e as Error).message}`);
  }
}

export function registerLogsCommand(program: Command): void {
  clientCommand(program, "logs", "the daemon's log (VM events, errors, requests refused); with --vm that VM's lines and its VMM's log (--source console: its serial console); -f follows")
    .option("-f, --follow", "keep printing new lines until Ctrl-C")
    .option("--vm <name>", "only this VM's lines, and its VMM's log")
    .option("--since <range>", "only lines from this far back: 90s, 15m, 1h, 7d")
    .option("--grep <re>", "only lines matching this regular expression (case-insensitive; message and fields)")
    .option("--contains <text>", "only lines containing this text (case-insensitive; filtered by the daemon)")
    .option("--level <level>", `only lines at this level or above: ${LOG_LEVELS.join(", ")}`)
    .option("--source <list>", `which logs, comma-separated: ${LOG_SOURCES.join(", ")} (default daemon,vmm; vmm and console need --vm)`)
    .option("-n, --limit <n>", "the latest N lines (default 1000; with -f, 100 before the new ones)")
    .option("--json", "one JSON object per line (NDJSON)")
    .action(async (o: LogsOptions) => {
      const re = grepOf(o.grep);
      if (o.level !== undefined && !(LOG_LEVELS as readonly string[]).includes(o.level)) throw new TypevisorError("INVALID_ARGUMENT", `--level is one of ${LOG_LEVELS.join(", ")} (got "${o.level}")`);
      const sources = o.source?.split(",");
      if (sources !== undefined && !sources.every((x) => (LOG_SOURCES as readonly string[]).includes(x))) throw new TypevisorError("INVALID_ARGUMENT", `--source is a comma-separated list of ${LOG_SOURCES.join(", ")} (got "${o.source!}")`);
      const opts = {
        ...(o.vm !== undefined ? { vm: o.vm } : {}),
        ...(o.since !== undefined ? { since: new Date(Date.now() - parseHistoryRange("--since", o.since)) } : {}),
        ...(o.contains !== undefined ? { contains: o.contains } : {}),
        ...(o.level !== undefined ? { level: o.level as LogLevel } : {}),
        ...(o.limit !== undefined ? { limit: parseWhole("--limit", o.limit) } : {}),
        ...(sources !== undefined ? { sources: sources as LogSource[] } : {}),
      };
      const json = o.json === true;
      const keep = (l: LogLine): boolean => re === undefined || re.test(l.fields !== undefined ? `${l.msg} ${JSON.stringify(l.fields)}` : l.msg);
      if (o.follow !== true) {
        const lines = await connect(o).logs(opts);
        process.stdout.write(lines.filter(keep).map((l) => formatLogLine(l, json)).join(""));
        return;
      }
      const stream = connect(o, { timeoutMs: 0 }).followLogs(opts);
      await printFollowed(stream, (l) => (keep(l) ? formatLogLine(l, json) : ""), "log stream");
    });
}
