/**
 * Forwarding the daemon's log to syslog (`typevisor daemon --log-syslog udp://HOST:514`): each pino
 * line becomes one RFC 5424 message, sent over UDP (RFC 5426: one message per datagram) or TCP
 * (RFC 6587 §3.4.1 octet counting: "LENGTH SP MESSAGE").
 *
 *   <PRI>1 TIMESTAMP HOSTNAME typevisor PROCID MSGID [typevisor@32473 vm="web" event="vm.crashed"] MSG
 *
 * PRI is facility daemon (3) × 8 + the severity (RFC 5424 §6.2.1, table 2) of the pino level;
 * MSGID is the event type where the line is an event, else "-"; the structured data carries the VM
 * and the event (SD-ID typevisor@32473: 32473 is the private enterprise number RFC 5612 reserves for
 * documentation and examples; a site with its own number can rewrite it); MSG is the message text.
 *
 * Never a reason for the daemon to stall: sends are asynchronous, a message waits in a bounded
 * queue (the oldest are dropped past MAX_QUEUE, counted) while a TCP receiver is away, and the
 * connection is retried with backoff (1 s doubling to 30 s). Plain syslog over TCP has no
 * acknowledgements (RFC 6587): what was written into a connection the receiver was closing at that
 * moment is lost, as with any such sender; UDP loses what the network drops.
 */
import { createSocket, type Socket as UdpSocket } from "node:dgram";
import { hostname } from "node:os";
import { connect, type Socket } from "node:net";
import { TypevisorError } from "../errors.js";
import { pinoObject } from "./logs.js";

/** Facility `daemon` (RFC 5424 §6.2.1 table 1). */
const FACILITY_DAEMON = 3;
/** pino level → syslog severity (RFC 5424 table 2): trace and debug are debug, fatal is critical. */
const SEVERITY: Record<number, number> = { 10: 7, 20: 7, 30: 6, 40: 4, 50: 3, 60: 2 };
/** RFC 5426 §3.2: receivers must take 480 octets and should take 2048; a longer message is cut. */
export const MAX_UDP_MESSAGE = 2048;
/** A TCP message is cut here too (8 KiB: a daemon log line, with room for the header). */
export const MAX_TCP_MESSAGE = 8192;
export const MAX_QUEUE = 10_000;
export const SD_ID = "typevisor@32473";

export interface SyslogTarget {
  protocol: "udp" | "tcp";
  host: string;
  port: number;
}

/** `udp://HOST:PORT` or `tcp://HOST:PORT` (port 514 by default; IPv6 hosts in brackets). */
export function parseSyslogTarget(v: string): SyslogTarget {
  const m = /^(udp|tcp):\/\/(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?\/?$/.exec(v);
  const port = m?.[3] !== undefined ? Number(m[3]) : 514;
  if (m === null || port < 1 || port > 65535) throw new TypevisorError("INVALID_ARGUMENT", `--log-syslog takes udp://HOST[:PORT] or tcp://HOST[:PORT] (got "${v}")`);
  return { protocol: m[1] as "udp" | "tcp", host: m[2]!.replace(/^\[|\]$/g, ""), port };
}

/** An SD-PARAM value (RFC 5424 §6.3.3): '"', '\' and ']' escaped with a backslash. */
function sdValue(v: string): string {
  return v.replace(/[\\"\]]/g, (c) => `\\${c}`);
}

/** PRINTUSASCII without spaces (RFC 5424 §6.2), at most `max` long; "-" when empty. */
function token(v: string, max: number): string {
  const t = v.replace(/[^\x21-\x7e]/g, "").slice(0, max);
  return t === "" ? "-" : t;
}

/** The RFC 5424 message for one pino line, or undefined for what is not one. */
export function formatSyslog(line: string, host = hostname()): string | undefined {
  const o = pinoObject(line);
  if (o === undefined) return undefined;
  const level = typeof o["level"] === "number" ? o["level"] : 30;
  const pri = FACILITY_DAEMON * 8 + (SEVERITY[level] ?? 6);
  const time = typeof o["time"] === "number" && Number.isFinite(o["time"]) ? new Date(o["time"]).toISOString() : "-";
  const pid = typeof o["pid"] === "number" ? String(o["pid"]) : "-";
  const event = typeof o["event"] === "string" ? o["event"] : undefined;
  const params: string[] = [];
  for (const k of ["vm", "event"] as const) {
    const v = o[k];
    if (typeof v === "string") params.push(`${k}="${sdValue(v.slice(0, 256))}"`);
  }
  const sd = params.length > 0 ? `[${SD_ID} ${params.join(" ")}]` : "-";
  let msg = typeof o["msg"] === "string" ? o["msg"] : "";
  if (typeof o["err"] === "string") msg += `: ${o["err"]}`;
  // one line per message: a newline inside would read as two to a line-based receiver
  msg = msg.replace(/[\r\n]+/g, " ");
  return `<${pri}>1 ${time} ${token(host, 255)} typevisor ${token(pid, 128)} ${event !== undefined ? token(event, 32) : "-"} ${sd}${msg !== "" ? ` ${msg}` : ""}`;
}

/** Cut `s` to at most `max` bytes of UTF-8, never inside a character. */
function cut(s: string, max: number): Buffer {
  const b = Buffer.from(s, "utf8");
  if (b.length <= max) return b;
  let end = max;
  while (end > 0 && (b[end]! & 0xc0) === 0x80) end--;
  return b.subarray(0, end);
}

/** The pino destination that forwards each line (pino.multistream takes any object with write()). */
export class SyslogForwarder {
  private udp: UdpSocket | undefined;
  private tcp: Socket | undefined;
  private connected = false;
  /** A TCP forwarder with a live connection (UDP: always). */
  get up(): boolean {
    return this.udp !== undefined || this.connected;
  }
  private readonly queue: Buffer[] = [];
  private retryMs = 1000;
  private retryTimer: NodeJS.Timeout | undefined;
  private closed = false;
  /** Messages lost: dropped from a full queue, or a datagram the socket refused. */
  dropped = 0;
  sent = 0;

  constructor(readonly target: SyslogTarget, private readonly host = hostname()) {
    if (target.protocol === "udp") {
      this.udp = createSocket(target.host.includes(":") ? "udp6" : "udp4");
      this.udp.on("error", () => this.dropped++);
      this.udp.unref();
    } else {
      this.connect();
    }
  }

  write(line: string): boolean {
    const m = formatSyslog(line, this.host);
    if (m === undefined || this.closed) return true;
    if (this.udp !== undefined) {
      this.udp.send(cut(m, MAX_UDP_MESSAGE), this.target.port, this.target.host, (err) => {
        if (err !== null) this.dropped++;
        else this.sent++;
      });
      return true;
    }
    const body = cut(m, MAX_TCP_MESSAGE);
    this.queue.push(Buffer.concat([Buffer.from(`${body.length} `), body]));
    if (this.queue.length > MAX_QUEUE) {
      this.queue.shift();
      this.dropped++;
    }
    this.flush();
    return true;
  }

  private connect(): void {
    if (this.closed) return;
    const s = connect(this.target.port, this.target.host);
    this.tcp = s;
    s.unref();
    s.setNoDelay(true);
    s.on("connect", () => {
      this.connected = true;
      this.retryMs = 1000;
      this.flush();
    });
    s.on("drain", () => this.flush());
    s.on("error", () => {
      /* 'close' follows */
    });
    s.on("close", () => {
      this.connected = false;
      this.tcp = undefined;
      if (this.closed) return;
      this.retryTimer = setTimeout(() => this.connect(), this.retryMs);
      this.retryTimer.unref();
      this.retryMs = Math.min(30_000, this.retryMs * 2);
    });
  }

  private flush(): void {
    const s = this.tcp;
    if (s === undefined || !this.connected) return;
    while (this.queue.length > 0) {
      const m = this.queue.shift()!;
      this.sent++;
      if (!s.write(m)) return; // 'drain' calls back
    }
  }

  close(): void {
    this.closed = true;
    clearTimeout(this.retryTimer);
    this.udp?.close();
    this.tcp?.end();
  }
}
