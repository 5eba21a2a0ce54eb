/**
 * A small QMP client for the lab's QEMU (QEMU QMP reference: docs/interop/qmp-spec.rst): one
 * connection, capabilities negotiated, then commands answered in order. The lab watchdog uses it
 * to ask a stalled lab for its CPU and interrupt-controller state (`info registers`, `info lapic`
 * through `human-monitor-command`) and to press SysRq keys on its PS/2 keyboard (`send-key`), which
 * reach the lab kernel even when nothing in its userspace can run.
 */
import { connect, type Socket } from "node:net";
import { TypevisorError } from "../errors.js";

/** Answers longer than this are cut (a register dump is a few KiB; this bounds a confused peer). */
const MAX_LINE = 1 << 20;

export class QmpClient {
  private buf = "";
  private waiting: { resolve: (v: unknown) => void; reject: (e: Error) => void } | undefined;
  private closed: Error | undefined;

  private constructor(private readonly sock: Socket) {
    sock.setEncoding("utf8");
    sock.on("data", (d: string) => this.onData(d));
    const end = (e?: Error): void => {
      this.closed = e ?? new Error("QMP connection closed");
      this.waiting?.reject(this.closed);
      this.waiting = undefined;
    };
    sock.on("error", end);
    sock.on("close", () => end());
  }

  /** Connect, read the greeting and leave capabilities negotiation mode. */
  static async open(path: string, timeoutMs: number): Promise<QmpClient> {
    const sock = connect(path);
    const c = new QmpClient(sock);
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new TypevisorError("LAB_QMP", `no QMP connection to ${path} within ${timeoutMs} ms`)), timeoutMs);
      sock.once("connect", () => {
        clearTimeout(t);
        resolve();
      });
      sock.once("error", (e) => {
        clearTimeout(t);
        reject(new TypevisorError("LAB_QMP", `cannot connect to QMP at ${path}: ${e.message}`));
      });
    });
    // The greeting ({"QMP": ...}) arrives first; it takes the place of an answer.
    await c.next(timeoutMs);
    await c.execute("qmp_capabilities", undefined, timeoutMs);
    return c;
  }

  private onData(d: string): void {
    this.buf += d;
    if (this.buf.length > MAX_LINE && !this.buf.includes("\n")) {
      this.buf = "";
      this.waiting?.reject(new Error("QMP answer over 1 MiB"));
      this.waiting = undefined;
      return;
    }
    for (let nl = this.buf.indexOf("\n"); nl >= 0; nl = this.buf.indexOf("\n")) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line === "") continue;
      let msg: unknown;
      try {
        msg = JSON.parse(line);
      } catch {
        continue;
      }
      // asynchronous events ({"event": ...}) are not answers
      if (typeof msg === "object" && msg !== null && "event" in msg) continue;
      const w = this.waiting;
      this.waiting = undefined;
      w?.resolve(msg);
    }
  }

  private next(timeoutMs: number): Promise<unknown> {
    if (this.closed !== undefined) return Promise.reject(this.closed);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => {
        this.waiting = undefined;
        reject(new TypevisorError("LAB_QMP", `QMP did not answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiting = {
        resolve: (v) => {
          clearTimeout(t);
          resolve(v);
        },
        reject: (e) => {
          clearTimeout(t);
          reject(e);
        },
      };
    });
  }

  /** Run one command; resolves with its "return" value, rejects with its "error". */
  async execute(command: string, args: Record<string, unknown> | undefined, timeoutMs: number): Promise<unknown> {
    if (this.waiting !== undefined) throw new Error("QmpClient: one command at a time");
    const answer = this.next(timeoutMs);
    this.sock.write(JSON.stringify(args === undefined ? { execute: command } : { execute: command, arguments: args }) + "\n");
    const msg = (await answer) as { return?: unknown; error?: { class?: string; desc?: string } };
    if (msg.error !== undefined) throw new TypevisorError("LAB_QMP", `QMP ${command}: ${msg.error.class ?? "error"}: ${msg.error.desc ?? ""}`);
    return msg.return;
  }

  /** A human monitor command (HMP), e.g. "info lapic"; its text output. */
  async hmp(commandLine: string, timeoutMs: number): Promise<string> {
    const r = await this.execute("human-monitor-command", { "command-line": commandLine }, timeoutMs);
    return typeof r === "string" ? r : JSON.stringify(r);
  }

  close(): void {
    this.sock.destroy();
  }
}
