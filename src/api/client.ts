/**
 * A typed client for the daemon's API, over its unix socket (default) or TCP.
 * Exported by the package: `import { TypevisorClient } from "typevisor"`.
 * Errors from the daemon arrive as ApiError with the problem's code, status
 * and message.
 */
import { request, type IncomingMessage } from "node:http";
import type { Duplex } from "node:stream";
import type { EventRecord, VmInfo, VmSpecInput } from "../control/spec.js";
import { TypevisorError } from "../errors.js";
import { HttpTimeoutError, httpRequest, parseProblem, readBody, type HttpRequestOptions } from "../sys/http-request.js";
import type { PoolInfo, PoolSpecInput } from "../control/pools.js";
import type { HostReport, VmStats } from "./schemas.js";

export class ApiError extends TypevisorError {
  constructor(readonly status: number, code: string, message: string, hint?: string) {
    super(code, message, hint !== undefined ? { hint } : undefined);
    this.name = "ApiError";
  }
}

export type ClientTarget = { socketPath: string } | { host: string; port: number };

export interface Health {
  ok: boolean;
  version: string;
  pid: number;
}

export class TypevisorClient {
  constructor(readonly target: ClientTarget, private readonly timeoutMs = 120_000) {}

  private options(method: string, path: string, headers: Record<string, string | number> = {}): HttpRequestOptions {
    return {
      ...("socketPath" in this.target ? { socketPath: this.target.socketPath } : { host: this.target.host, port: this.target.port }),
      method,
      path,
      headers,
      // one connection per request: see sys/http-request.ts for the keep-alive race this avoids
      agent: false,
    };
  }

  private unreachable(e: Error): TypevisorError {
    const where = "socketPath" in this.target ? this.target.socketPath : `${this.target.host}:${this.target.port}`;
    const code = (e as NodeJS.ErrnoException).code;
    if (code === "ENOENT" || code === "ECONNREFUSED") {
      return new TypevisorError("DAEMON_UNREACHABLE", `no typevisor daemon answers at ${where}`, { hint: "start one: typevisor daemon (or give --socket)" });
    }
    return new TypevisorError("DAEMON_UNREACHABLE", `the daemon at ${where}: ${e.message}`);
  }

  private problem(status: number, body: Buffer): ApiError {
    const p = parseProblem(body);
    return new ApiError(status, p.code ?? `HTTP_${status}`, p.detail ?? `HTTP ${status}`, p.hint);
  }

  /** A whole answer; a status >= 400 becomes ApiError. */
  private async answer(method: string, path: string, body?: unknown): Promise<Buffer> {
    // .catch, not try: a body JSON cannot encode (a caller's spec) throws from httpRequest itself and stays a plain error.
    const res = await httpRequest(this.options(method, path), body, this.timeoutMs).catch((e: unknown) => {
      throw this.unreachable(e instanceof HttpTimeoutError ? new Error(`no answer in ${this.timeoutMs / 1000} s`) : (e as Error));
    });
    if (res.status >= 400) throw this.problem(res.status, res.body);
    return res.body;
  }

  private async json<T>(method: string, path: string, body?: unknown): Promise<T> {
    const text = (await this.answer(method, path, body)).toString("utf8");
    return (text === "" ? undefined : JSON.parse(text)) as T;
  }

  private bytes(path: string): Promise<Buffer> {
    return this.answer("GET", path);
  }

  /**
   * A streamed GET (console or events follow): resolve with the live response once headers arrive.
   * It may stay quiet for hours, so unlike answer() it has no timeout.
   */
  private open(path: string): Promise<IncomingMessage> {
    return new Promise((resolve, reject) => {
      const req = request(this.options("GET", path), (res) => {
        const status = res.statusCode ?? 0;
        if (status < 400) return resolve(res);
        readBody(res).then((b) => reject(this.problem(status, b)), (e: Error) => reject(this.unreachable(e)));
      });
      req.on("error", (e) => reject(this.unreachable(e)));
      req.end();
    });
  }

  health(): Promise<Health> {
    return this.json("GET", "/v1/health");
  }
  host(): Promise<HostReport> {
    return this.json("GET", "/v1/host");
  }
  async listVms(): Promise<VmInfo[]> {
    return (await this.json<{ vms: VmInfo[] }>("GET", "/v1/vms")).vms;
  }
  getVm(name: string): Promise<VmInfo> {
    return this.json("GET", `/v1/vms/${encodeURIComponent(name)}`);
  }
  createVm(spec: VmSpecInput, opts: { start?: boolean } = {}): Promise<VmInfo> {
    return this.json("POST", `/v1/vms${opts.start === true ? "?start=true" : ""}`, spec);
  }
  startVm(name: string): Promise<VmInfo> {
    return this.json("POST", `/v1/vms/${encodeURIComponent(name)}/start`);
  }
  stopVm(name: string, opts: { force?: boolean; timeoutSeconds?: number } = {}): Promise<VmInfo> {
    return this.json("POST", `/v1/vms/${encodeURIComponent(name)}/stop`, opts);
  }
  pauseVm(name: string): Promise<VmInfo> {
    return this.json("POST", `/v1/vms/${encodeURIComponent(name)}/pause`);
  }
  resumeVm(name: string): Promise<VmInfo> {
    return this.json("POST", `/v1/vms/${encodeURIComponent(name)}/resume`);
  }
  rebootVm(name: string): Promise<VmInfo> {
    return this.json("POST", `/v1/vms/${encodeURIComponent(name)}/reboot`);
  }
  async removeVm(name: string, opts: { force?: boolean } = {}): Promise<void> {
    await this.json("DELETE", `/v1/vms/${encodeURIComponent(name)}${opts.force === true ? "?force=true" : ""}`);
  }
  vmStats(name: string): Promise<VmStats> {
    return this.json("GET", `/v1/vms/${encodeURIComponent(name)}/stats`);
  }
  /** The captured console (the last `tail` bytes). */
  console(name: string, opts: { tail?: number } = {}): Promise<Buffer> {
    return this.bytes(`/v1/vms/${encodeURIComponent(name)}/console${opts.tail !== undefined ? `?tail=${opts.tail}` : ""}`);
  }
  /** The console as a stream that goes on with new output until destroyed. */
  followConsole(name: string, opts: { tail?: number } = {}): Promise<IncomingMessage> {
    return this.open(`/v1/vms/${encodeURIComponent(name)}/console?follow=true${opts.tail !== undefined ? `&tail=${opts.tail}` : ""}`);
  }
  /** The interactive serial console: a duplex byte stream to the guest's UART. */
  attachConsole(name: string): Promise<Duplex> {
    return new Promise((resolve, reject) => {
      const req = request(this.options("GET", `/v1/vms/${encodeURIComponent(name)}/console/attach`, { connection: "Upgrade", upgrade: "tcp" }));
      req.on("upgrade", (_res, socket, head) => {
        if (head.length > 0) socket.unshift(head);
        resolve(socket);
      });
      // Not upgraded: the daemon answered with a problem instead.
      req.on("response", (res) => {
        readBody(res).then((b) => reject(this.problem(res.statusCode ?? 0, b)), (e: Error) => reject(this.unreachable(e)));
      });
      req.on("error", (e) => reject(this.unreachable(e)));
      req.end();
    });
  }
  async events(opts: { after?: number; vm?: string; limit?: number } = {}): Promise<EventRecord[]> {
    const q = new URLSearchParams();
    if (opts.after !== undefined) q.set("after", String(opts.after));
    if (opts.vm !== undefined) q.set("vm", opts.vm);
    if (opts.limit !== undefined) q.set("limit", String(opts.limit));
    const qs = q.toString();
    return (await this.json<{ events: EventRecord[] }>("GET", `/v1/events${qs !== "" ? `?${qs}` : ""}`)).events;
  }
  /** Server-sent events, parsed; iterate with `for await`, `return()` ends the stream. */
  async *followEvents(opts: { after?: number; vm?: string } = {}): AsyncGenerator<EventRecord> {
    const q = new URLSearchParams({ follow: "true" });
    if (opts.after !== undefined) q.set("after", String(opts.after));
    if (opts.vm !== undefined) q.set("vm", opts.vm);
    const res = await this.open(`/v1/events?${q.toString()}`);
    let buf = "";
    try {
      res.setEncoding("utf8");
      for await (const chunk of res) {
        buf += chunk as string;
        let i: number;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          const data = block
            .split("\n")
            .filter((l) => l.startsWith("data: "))
            .map((l) => l.slice(6))
            .join("\n");
          if (data !== "") yield JSON.parse(data) as EventRecord;
        }
      }
    } finally {
      res.destroy();
    }
  }
  /** A blank disk more for a stopped VM (size, pool, format). */
  addDisk(name: string, disk: { size: string | number; pool?: string; format?: "qcow2" | "raw" }): Promise<VmInfo> {
    return this.json("POST", `/v1/vms/${encodeURIComponent(name)}/disks`, disk);
  }
  /** Remove disk `disk` (disk<N> or N) of a stopped VM, with its file. */
  removeDisk(name: string, disk: string): Promise<VmInfo> {
    return this.json("DELETE", `/v1/vms/${encodeURIComponent(name)}/disks/${encodeURIComponent(disk)}`);
  }
  async listPools(): Promise<PoolInfo[]> {
    return (await this.json<{ pools: PoolInfo[] }>("GET", "/v1/pools")).pools;
  }
  getPool(name: string): Promise<PoolInfo> {
    return this.json("GET", `/v1/pools/${encodeURIComponent(name)}`);
  }
  createPool(spec: PoolSpecInput): Promise<PoolInfo> {
    return this.json("POST", "/v1/pools", spec);
  }
  async removePool(name: string): Promise<void> {
    await this.json("DELETE", `/v1/pools/${encodeURIComponent(name)}`);
  }
  async metrics(): Promise<string> {
    return (await this.bytes("/metrics")).toString("utf8");
  }
  openapi(): Promise<Record<string, unknown>> {
    return this.json("GET", "/openapi.json");
  }
}
