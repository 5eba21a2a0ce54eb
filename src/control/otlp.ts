/**
 * Forwarding the daemon's log to an OpenTelemetry collector (`typevisor daemon --log-otlp
 * http://HOST:4318/v1/logs`): OTLP/HTTP with the JSON encoding (OTLP specification, "OTLP/HTTP" and
 * "JSON Protobuf Encoding"): each POST is an ExportLogsServiceRequest of one resource (service.name
 * `typevisor`, host.name, process.pid) whose LogRecords are the daemon's lines since the last one:
 * timeUnixNano (a decimal string: a 64-bit integer in the protobuf JSON mapping), severityNumber and
 * severityText (the data model's INFO 9, WARN 13, ERROR 17, FATAL 21, DEBUG 5, TRACE 1), the message
 * as body, and the line's fields as attributes (strings, numbers and booleans; `vm` and `event` among
 * them).
 *
 * Batched: a POST at most every second, of at most MAX_BATCH records. A batch that does not get a
 * 2xx (within 10 s) is retried after 1, 2, 4 and 8 s and then dropped (counted), as the webhooks
 * are; at most MAX_QUEUE records wait (the oldest dropped first). Nothing of it holds the daemon up.
 */
import { hostname } from "node:os";
import { TypevisorError } from "../errors.js";
import { pinoObject } from "./logs.js";

export const MAX_BATCH = 512;
export const MAX_QUEUE = 10_000;
const ATTEMPTS = 5;
const ATTEMPT_TIMEOUT_MS = 10_000;

/** pino level → OpenTelemetry severity (logs data model, "SeverityNumber"). */
const SEVERITY: Record<number, [number, string]> = { 10: [1, "TRACE"], 20: [5, "DEBUG"], 30: [9, "INFO"], 40: [13, "WARN"], 50: [17, "ERROR"], 60: [21, "FATAL"] };

type AnyValue = { stringValue: string } | { intValue: string } | { doubleValue: number } | { boolValue: boolean };
interface KeyValue {
  key: string;
  value: AnyValue;
}
export interface LogRecord {
  timeUnixNano: string;
  observedTimeUnixNano: string;
  severityNumber: number;
  severityText: string;
  body: { stringValue: string };
  attributes: KeyValue[];
}

/** An http(s) URL, as given (the collector's logs path included: OTLP/HTTP's default is /v1/logs). */
export function parseOtlpUrl(v: string): string {
  let u: URL | undefined;
  try {
    u = new URL(v);
  } catch {
    /* below */
  }
  if (u === undefined || (u.protocol !== "http:" && u.protocol !== "https:")) throw new TypevisorError("INVALID_ARGUMENT", `--log-otlp takes the collector's http(s) URL, e.g. http://localhost:4318/v1/logs (got "${v}")`);
  return u.toString();
}

function anyValue(v: unknown): AnyValue | undefined {
  if (typeof v === "string") return { stringValue: v.slice(0, 8192) };
  if (typeof v === "boolean") return { boolValue: v };
  if (typeof v === "number" && Number.isFinite(v)) return Number.isSafeInteger(v) ? { intValue: String(v) } : { doubleValue: v };
  return undefined;
}

/** The LogRecord for one pino line, or undefined for what is not one. */
export function logRecord(line: string, observedMs = Date.now()): LogRecord | undefined {
  const o = pinoObject(line);
  if (o === undefined) return undefined;
  const { time, level, msg, pid: _pid, hostname: _h, ...rest } = o;
  const ms = typeof time === "number" && Number.isFinite(time) ? time : observedMs;
  const [severityNumber, severityText] = SEVERITY[typeof level === "number" ? level : 30] ?? [9, "INFO"];
  const attributes: KeyValue[] = [];
  for (const [key, v] of Object.entries(rest)) {
    const value = anyValue(v);
    if (value !== undefined) attributes.push({ key, value });
  }
  // milliseconds to nanoseconds as a decimal string: BigInt, since ms × 10^6 passes 2^53
  const nanos = (t: number): string => (BigInt(Math.trunc(t)) * 1_000_000n).toString();
  return { timeUnixNano: nanos(ms), observedTimeUnixNano: nanos(observedMs), severityNumber, severityText, body: { stringValue: typeof msg === "string" ? msg : "" }, attributes };
}

export interface OtlpStatus {
  url: string;
  sent: number;
  dropped: number;
  failedAttempts: number;
  lastError?: string;
}

/** The pino destination that forwards each line (pino.multistream takes any object with write()). */
export class OtlpForwarder {
  private readonly queue: LogRecord[] = [];
  private timer: NodeJS.Timeout | undefined;
  private busy = false;
  private closed = false;
  readonly status: OtlpStatus;
  private readonly resource: { attributes: KeyValue[] };

  constructor(readonly url: string, private readonly opts: { intervalMs?: number; baseDelayMs?: number } = {}) {
    const shown = new URL(url);
    this.status = { url: `${shown.protocol}//${shown.host}${shown.pathname}`, sent: 0, dropped: 0, failedAttempts: 0 };
    this.resource = {
      attributes: [
        { key: "service.name", value: { stringValue: "typevisor" } },
        { key: "host.name", value: { stringValue: hostname() } },
        { key: "process.pid", value: { intValue: String(process.pid) } },
      ],
    };
  }

  write(line: string): boolean {
    const r = logRecord(line);
    if (r === undefined || this.closed) return true;
    this.queue.push(r);
    if (this.queue.length > MAX_QUEUE) {
      this.queue.shift();
      this.status.dropped++;
    }
    if (this.timer === undefined && !this.busy) {
      this.timer = setTimeout(() => void this.send(), this.opts.intervalMs ?? 1000);
      this.timer.unref();
    }
    return true;
  }

  /** The body of one POST: an ExportLogsServiceRequest. */
  request(records: LogRecord[]): unknown {
    return { resourceLogs: [{ resource: this.resource, scopeLogs: [{ scope: { name: "typevisor" }, logRecords: records }] }] };
  }

  private async send(): Promise<void> {
    this.timer = undefined;
    this.busy = true;
    try {
      while (this.queue.length > 0 && !this.closed) {
        const batch = this.queue.splice(0, MAX_BATCH);
        let ok = false;
        for (let attempt = 0; attempt < ATTEMPTS && !this.closed; attempt++) {
          if (attempt > 0) await new Promise((r) => setTimeout(r, (this.opts.baseDelayMs ?? 1000) * 2 ** (attempt - 1)).unref());
          try {
            const res = await fetch(this.url, { method: "POST", headers: { "content-type": "application/json", "user-agent": "typevisor" }, body: JSON.stringify(this.request(batch)), signal: AbortSignal.timeout(ATTEMPT_TIMEOUT_MS), redirect: "error" });
            await res.arrayBuffer().catch(() => undefined);
            if (res.ok) {
              ok = true;
              break;
            }
            this.status.lastError = `HTTP ${res.status}`;
          } catch (e) {
            this.status.lastError = (e as Error).cause instanceof Error ? ((e as Error).cause as Error).message : (e as Error).message;
          }
          this.status.failedAttempts++;
        }
        if (ok) this.status.sent += batch.length;
        else this.status.dropped += batch.length;
      }
    } finally {
      this.busy = false;
    }
  }

  /** Send what is queued (one last try each), then stop. */
  async close(): Promise<void> {
    clearTimeout(this.timer);
    this.timer = undefined;
    if (!this.busy && this.queue.length > 0) {
      const batch = this.queue.splice(0, MAX_BATCH);
      await fetch(this.url, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(this.request(batch)), signal: AbortSignal.timeout(2000) }).then(
        () => (this.status.sent += batch.length),
        () => (this.status.dropped += batch.length),
      );
    }
    this.closed = true;
  }
}
