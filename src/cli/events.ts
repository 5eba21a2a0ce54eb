/**
 * `typevisor events [-f]`: the daemon's lifecycle and error events. For
 * people, one line each: TIME TYPE VM MESSAGE, in fixed columns so a followed
 * stream lines up with the backlog. For scripts, `--json`: one JSON object per
 * line (NDJSON), which a followed stream can produce incrementally (a single
 * JSON document could not). Exit codes as in vm.ts.
 */
import type { Command } from "commander";
import type { EventRecord } from "../control/spec.js";
import { connect, type ConnectionOptions } from "./connect.js";
import { printFollowed } from "./follow.js";
import { formatTime } from "./format.js";
import { escapeControls } from "./terminal-safe.js";
import { clientCommand, parseWhole } from "./vm.js";

const TYPE_WIDTH = 16; // "daemon.stopping" and every vm.* type fit
const VM_WIDTH = 12;

export function eventHeader(): string {
  return `${"TIME".padEnd(20)}  ${"TYPE".padEnd(TYPE_WIDTH)}  ${"VM".padEnd(VM_WIDTH)}  MESSAGE\n`;
}

export function formatEvent(e: EventRecord, json: boolean): string {
  if (json) return `${JSON.stringify(e)}\n`;
  // a message can carry what a VMM or guest said (a crash reason): no control sequences to a terminal
  return `${formatTime(e.at).padEnd(20)}  ${e.type.padEnd(TYPE_WIDTH)}  ${(e.vm ?? "-").padEnd(VM_WIDTH)}  ${escapeControls(e.message)}\n`;
}

interface EventsOptions extends ConnectionOptions {
  follow?: boolean;
  vm?: string;
  after?: string;
  json?: boolean;
}

export function registerEventsCommand(program: Command): void {
  clientCommand(program, "events", "lifecycle and error events, oldest first; -f follows new ones")
    .option("-f, --follow", "keep printing new events until Ctrl-C")
    .option("--vm <name>", "only this VM's events")
    .option("--after <seq>", "only events after this sequence number (the `seq` of --json)")
    .option("--json", "one JSON object per line (NDJSON)")
    .action(async (o: EventsOptions) => {
      const after = o.after !== undefined ? parseWhole("--after", o.after) : undefined;
      const opts = { ...(after !== undefined ? { after } : {}), ...(o.vm !== undefined ? { vm: o.vm } : {}) };
      const json = o.json === true;
      if (o.follow !== true) {
        const events = await connect(o).events(opts);
        process.stdout.write((json ? "" : eventHeader()) + events.map((e) => formatEvent(e, json)).join(""));
        return;
      }
      // No request timeout (the daemon's keep-alives come every 15 s, but an idle hour is normal).
      const stream = connect(o, { timeoutMs: 0 }).followEvents(opts);
      // The header comes with the first event: a refused request (a bad --vm) then prints only its error.
      await printFollowed(stream, (e, first) => (first && !json ? eventHeader() : "") + formatEvent(e, json), "event stream");
    });
}
