/**
 * The daemon's logs, searchable (GET /v1/logs, `typevisor logs`, the web console's log view).
 *
 * - The daemon's own log: pino JSON lines (one object per line: `time` in ms since the epoch,
 *   `level` as pino's number, `msg`, and fields such as `vm` and `event`). Besides stdout (for
 *   systemd's journal) the daemon writes it to HOME/daemon.log, rotated by size to daemon.log.1
 *   (RotatingLog: one generation, so at most twice `--log-size` on disk). Every VM event is in it
 *   (manager.ts logs each one with its `vm`), so a VM's lines are the daemon's lines naming it.
 * - Each VM's VMM log (vms/ID/vmm.log): what its VMM process wrote to stdout and stderr, plain text
 *   without timestamps; shown for a named VM (`?vm=NAME`).
 * - Each VM's serial console log (vms/ID/console.log, rotated by its VMM): what the guest wrote, also
 *   without timestamps; searched for a named VM when asked (`source` includes `console`).
 *
 * Every line is untrusted text (a VMM's output can carry what a guest made it say): it is parsed
 * defensively, cut to MAX_LINE characters, and never interpreted further.
 */
import { readFileSync } from "node:fs";
import { RotatingLog } from "../vmm/console/rotating-log.js";

export const LOG_LEVELS = ["trace", "debug", "info", "warn", "error", "fatal"] as const;
export const LOG_SOURCES = ["daemon", "vmm", "console"] as const;
export type LogSource = (typeof LOG_SOURCES)[number];
/** What a query reads when it names no source: the daemon's log and the VMM's (a console can be megabytes of a guest's chatter). */
export const DEFAULT_SOURCES: readonly LogSource[] = ["daemon", "vmm"];
export type LogLevel = (typeof LOG_LEVELS)[number];

export interface LogLine {
  /** ISO 8601; null for a VMM log line read back from its file (the VMM writes no timestamps). */
  time: string | null;
  level: LogLevel;
  source: LogSource;
  vm?: string;
  msg: string;
  /** The line's other fields (the daemon's structured data: event, err, pid, ...). */
  fields?: Record<string, unknown>;
}

export interface LogQuery {
  vm?: string;
  /** Epoch ms: lines at or after this (lines without a time are kept). */
  since?: number;
  /** Case-insensitive substring of the message or any field (a substring, not a regex: the daemon never runs a caller's pattern). */
  contains?: string;
  /** Lines at this level or above. */
  level?: LogLevel;
  /** The latest this many. */
  limit: number;
  /** Which logs (default DEFAULT_SOURCES); vmm and console only for a named VM. */
  sources?: readonly LogSource[];
}

/** A line longer than this is cut: a runaway line cannot make one answer huge. */
export const MAX_LINE = 8192;

const PINO_LEVELS: Record<number, LogLevel> = { 10: "trace", 20: "debug", 30: "info", 40: "warn", 50: "error", 60: "fatal" };

/** A pino line's object, or undefined for what is not a JSON object (a torn write, garbage, a runaway line). */
export function pinoObject(text: string): Record<string, unknown> | undefined {
  let o: unknown;
  try {
    o = JSON.parse(text.length > MAX_LINE * 4 ? "" : text);
  } catch {
    return undefined;
  }
  return typeof o === "object" && o !== null && !Array.isArray(o) ? (o as Record<string, unknown>) : undefined;
}

/** One line of the daemon's log, or undefined for what is not one of its JSON objects. */
export function parseDaemonLine(text: string): LogLine | undefined {
  const o = pinoObject(text);
  if (o === undefined) return undefined;
  const { time, level, msg, vm, pid: _pid, hostname: _host, ...rest } = o;
  const t = typeof time === "number" && Number.isFinite(time) ? new Date(time) : undefined;
  if (t === undefined || Number.isNaN(t.getTime())) return undefined;
  const line: LogLine = {
    time: t.toISOString(),
    level: PINO_LEVELS[typeof level === "number" ? level : 30] ?? "info",
    source: "daemon",
    msg: typeof msg === "string" ? msg.slice(0, MAX_LINE) : "",
  };
  if (typeof vm === "string") line.vm = vm.slice(0, 64);
  if (Object.keys(rest).length > 0) line.fields = rest;
  return line;
}

export function vmmLine(text: string, vm: string, time: string | null, source: "vmm" | "console" = "vmm"): LogLine {
  // a guest's serial lines end in CR LF: the CR is no part of the text
  return { time, level: "info", source, vm, msg: text.replace(/\r+$/, "").slice(0, MAX_LINE) };
}

function readLines(path: string): string[] {
  const parts: string[] = [];
  for (const f of [`${path}.1`, path]) {
    try {
      parts.push(readFileSync(f, "utf8"));
    } catch {
      /* absent: never written, or never rotated */
    }
  }
  return parts.join("").split("\n").filter((l) => l.length > 0);
}

/** Does `l` pass the query's filters (all but `limit`)? */
export function matches(l: LogLine, q: Omit<LogQuery, "limit">): boolean {
  if (q.vm !== undefined && l.vm !== q.vm) return false;
  if (q.since !== undefined && l.time !== null && Date.parse(l.time) < q.since) return false;
  if (q.level !== undefined && LOG_LEVELS.indexOf(l.level) < LOG_LEVELS.indexOf(q.level)) return false;
  if (q.contains !== undefined) {
    const needle = q.contains.toLowerCase();
    const hay = l.fields !== undefined ? `${l.msg} ${JSON.stringify(l.fields)}` : l.msg;
    if (!hay.toLowerCase().includes(needle)) return false;
  }
  return true;
}

/**
 * The latest `q.limit` lines that match, oldest first: the daemon's lines, then (for a named VM)
 * its VMM log's, which have no time to be merged by.
 */
export function readLogs(paths: { daemon: string; vmm?: string; console?: string }, q: LogQuery): LogLine[] {
  const sources = q.sources ?? DEFAULT_SOURCES;
  const out: LogLine[] = [];
  if (sources.includes("daemon")) {
    for (const text of readLines(paths.daemon)) {
      const l = parseDaemonLine(text);
      if (l !== undefined && matches(l, q)) out.push(l);
    }
  }
  for (const source of ["vmm", "console"] as const) {
    const path = paths[source];
    if (path === undefined || q.vm === undefined || !sources.includes(source)) continue;
    for (const text of readLines(path)) {
      const l = vmmLine(text, q.vm, null, source);
      if (matches(l, q)) out.push(l);
    }
  }
  return out.slice(Math.max(0, out.length - q.limit));
}

/**
 * Splits a byte stream into lines (a follower of a log file gets arbitrary chunks); a line longer
 * than MAX_LINE is cut there.
 */
export class LineSplitter {
  private rest = "";
  constructor(private readonly onLine: (line: string) => void) {}

  push(chunk: Buffer | string): void {
    this.rest += typeof chunk === "string" ? chunk : chunk.toString("utf8");
    let i: number;
    while ((i = this.rest.indexOf("\n")) >= 0) {
      const line = this.rest.slice(0, i);
      this.rest = this.rest.slice(i + 1);
      if (line.length > 0) this.onLine(line.slice(0, MAX_LINE));
    }
    if (this.rest.length > MAX_LINE) {
      this.onLine(this.rest.slice(0, MAX_LINE));
      this.rest = "";
    }
  }
}

/**
 * The daemon log's file destination for pino (pino.multistream takes any object with write()):
 * each write is one whole line, so a rotation never cuts one.
 */
export class DaemonLogFile {
  private readonly log: RotatingLog;

  constructor(path: string, maxBytes: number) {
    this.log = new RotatingLog(path, maxBytes);
  }

  write(line: string): boolean {
    this.log.write(Buffer.from(line, "utf8"));
    return true;
  }

  close(): void {
    this.log.close();
  }
}
