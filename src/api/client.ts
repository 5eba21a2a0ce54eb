/**
 * A typed client for the daemon's API, over its unix socket (default) or HTTPS.
 * Exported by the package: `import { TypevisorClient } from "typevisor"`.
 * Errors from the daemon arrive as ApiError with the problem's code, status
 * and message.
 *
 * Over HTTPS the server is checked before anything is sent: against a pinned
 * certificate fingerprint (`fingerprint`, what `typevisor host` shows), a CA
 * (`ca`), or the system's CAs. A bearer token (`token`) goes in every request.
 */
import { request, type IncomingMessage } from "node:http";
import { isIP } from "node:net";
import type { Duplex } from "node:stream";
import { connect as tlsConnect, type TLSSocket } from "node:tls";
import type { EventRecord, VmInfo, VmSpecInput } from "../control/spec.js";
import { TypevisorError } from "../errors.js";
import { HttpTimeoutError, httpRequest, parseProblem, readBody, type HttpRequestOptions } from "../sys/http-request.js";
import type { PoolInfo, PoolSpecInput } from "../control/pools.js";
import type { HostReport, MetricsHistoryReport, VmStats } from "./schemas.js";
import type { AlertRuleInfo, FiringAlertInfo, WebhookInfo } from "./alert-routes.js";
import type { alertRuleSpec } from "../control/alerts.js";
import type { AuditEntry, VerifyResult } from "../control/audit.js";
import type { Role, TokenRow, UserRow } from "../control/identity.js";
import { normalizeFingerprint } from "../control/tls.js";
import type { LogLevel, LogLine, LogSource } from "../control/logs.js";
import type { CloneInput, SnapshotCreateInput, SnapshotInfo } from "../control/snapshots.js";
import { ApiError } from "./api-error.js";
import type { incomingAnswer, incomingSpec, incomingState, MigrateInput, MigrationStatus } from "../control/migration.js";

export { ApiError };

export type ClientTarget =
  | { socketPath: string }
  | {
      host: string;
      port: number;
      /** The server certificate's SHA-256 fingerprint (hex, colons optional): pinned, no CA needed. */
      fingerprint?: string;
      /** PEM CA certificate(s) the server's certificate must chain to (else the system's CAs). */
      ca?: string;
    };

export interface ClientOptions {
  /** How long a request may stay silent (ms). */
  timeoutMs?: number;
  /** A bearer token (`typevisor token create`). */
  token?: string;
}

export interface LogsOptions {
  vm?: string;
  since?: Date;
  contains?: string;
  level?: LogLevel;
  limit?: number;
  sources?: LogSource[];
}

function logsQueryString(o: LogsOptions & { follow?: boolean }): string {
  const q = new URLSearchParams();
  if (o.vm !== undefined) q.set("vm", o.vm);
  if (o.since !== undefined) q.set("since", o.since.toISOString());
  if (o.contains !== undefined) q.set("contains", o.contains);
  if (o.level !== undefined) q.set("level", o.level);
  if (o.limit !== undefined) q.set("limit", String(o.limit));
  if (o.sources !== undefined) q.set("source", o.sources.join(","));
  if (o.follow === true) q.set("follow", "true");
  const s = q.toString();
  return s !== "" ? `?${s}` : "";
}

export type UserInfo = Omit<UserRow, "vms"> & { scopes?: string[]; mfa: boolean; tokens: number };
export type TokenInfo = Omit<TokenRow, "vms"> & { scopes?: string[] };

export interface Health {
  ok: boolean;
  version: string;
  pid: number;
}

export class TypevisorClient {
  private readonly timeoutMs: number;
  private readonly token: string | undefined;

  constructor(readonly target: ClientTarget, options: number | ClientOptions = {}) {
    const o = typeof options === "number" ? { timeoutMs: options } : options;
    this.timeoutMs = o.timeoutMs ?? 120_000;
    this.token = o.token;
  }

  /** A TLS connection whose server has been checked; only then does a request (and its token) go out. */
  private secure(t: { host: string; port: number; fingerprint?: string; ca?: string }): Promise<TLSSocket> {
    const pin = t.fingerprint !== undefined ? normalizeFingerprint(t.fingerprint) : undefined;
    if (t.fingerprint !== undefined && pin === undefined) return Promise.reject(new TypevisorError("INVALID_ARGUMENT", `a fingerprint is 32 bytes of hex, as typevisor host shows it (got "${t.fingerprint}")`));
    return new Promise((resolve, reject) => {
      const s = tlsConnect({
        host: t.host,
        port: t.port,
        ...(isIP(t.host) === 0 ? { servername: t.host } : {}),
        // pinned: the fingerprint below is the whole check (a self-signed certificate has no CA to chain to)
        ...(pin !== undefined ? { rejectUnauthorized: false } : t.ca !== undefined ? { ca: t.ca } : {}),
        ALPNProtocols: ["http/1.1"],
      });
      const timer = this.timeoutMs > 0 ? setTimeout(() => s.destroy(new Error(`no TLS handshake in ${this.timeoutMs / 1000} s`)), this.timeoutMs) : undefined;
      s.once("secureConnect", () => {
        clearTimeout(timer);
        s.removeAllListeners("error");
        const got = s.getPeerCertificate().fingerprint256;
        if (pin !== undefined && got !== pin) {
          s.destroy();
          reject(new TypevisorError("TLS_FINGERPRINT", `the server at ${t.host}:${t.port} presented a certificate with fingerprint ${got}, not the pinned ${pin}`, { hint: "check `typevisor host` on the daemon's machine; a changed certificate may mean someone is in between" }));
          return;
        }
        resolve(s);
      });
      s.once("error", (e) => {
        clearTimeout(timer);
        reject(e);
      });
    });
  }

  private async options(method: string, path: string, headers: Record<string, string | number> = {}): Promise<HttpRequestOptions> {
    const h = { ...headers, ...(this.token !== undefined ? { authorization: `Bearer ${this.token}` } : {}) };
    if ("socketPath" in this.target) {
      // one connection per request: see sys/http-request.ts for the keep-alive race this avoids
      return { socketPath: this.target.socketPath, method, path, headers: h, agent: false };
    }
    const sock = await this.secure(this.target).catch((e: unknown) => {
      throw e instanceof TypevisorError ? e : this.unreachable(e as Error);
    });
    // no agent: the request goes over this checked connection
    return { host: this.target.host, port: this.target.port, method, path, headers: h, agent: undefined, createConnection: () => sock };
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
    const res = await httpRequest(await this.options(method, path), body, this.timeoutMs).catch((e: unknown) => {
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
  private async open(path: string): Promise<IncomingMessage> {
    const options = await this.options("GET", path);
    return new Promise((resolve, reject) => {
      const req = request(options, (res) => {
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
  /** A VM's snapshots, oldest first (docs/snapshots.md). */
  async listSnapshots(vm: string): Promise<SnapshotInfo[]> {
    return (await this.json<{ snapshots: SnapshotInfo[] }>("GET", `/v1/vms/${encodeURIComponent(vm)}/snapshots`)).snapshots;
  }
  getSnapshot(vm: string, name: string): Promise<SnapshotInfo> {
    return this.json("GET", `/v1/vms/${encodeURIComponent(vm)}/snapshots/${encodeURIComponent(name)}`);
  }
  createSnapshot(vm: string, spec: SnapshotCreateInput): Promise<SnapshotInfo> {
    return this.json("POST", `/v1/vms/${encodeURIComponent(vm)}/snapshots`, spec);
  }
  rollbackSnapshot(vm: string, name: string): Promise<VmInfo> {
    return this.json("POST", `/v1/vms/${encodeURIComponent(vm)}/snapshots/${encodeURIComponent(name)}/rollback`);
  }
  async removeSnapshot(vm: string, name: string): Promise<void> {
    await this.json("DELETE", `/v1/vms/${encodeURIComponent(vm)}/snapshots/${encodeURIComponent(name)}`);
  }
  /** A new VM from a snapshot of `vm` (linked, or `full`). */
  cloneVm(vm: string, spec: CloneInput): Promise<VmInfo> {
    return this.json("POST", `/v1/vms/${encodeURIComponent(vm)}/clone`, spec);
  }
  /** Live-migrate a VM to another daemon (docs/migration.md); 202 at once, then poll migration(). */
  migrateVm(name: string, spec: MigrateInput): Promise<MigrationStatus> {
    return this.json("POST", `/v1/vms/${encodeURIComponent(name)}/migrate`, spec);
  }
  migration(name: string): Promise<MigrationStatus> {
    return this.json("GET", `/v1/vms/${encodeURIComponent(name)}/migrate`);
  }
  cancelMigration(name: string): Promise<MigrationStatus> {
    return this.json("DELETE", `/v1/vms/${encodeURIComponent(name)}/migrate`);
  }
  /** The destination side, called by the source daemon. */
  prepareIncoming(body: import("zod").input<typeof incomingSpec>): Promise<import("zod").infer<typeof incomingAnswer>> {
    return this.json("POST", "/v1/migrations/incoming", body);
  }
  incomingStatus(migrationId: string): Promise<import("zod").infer<typeof incomingState>> {
    return this.json("GET", `/v1/migrations/incoming/${encodeURIComponent(migrationId)}`);
  }
  abortIncoming(migrationId: string): Promise<import("zod").infer<typeof incomingState>> {
    return this.json("DELETE", `/v1/migrations/incoming/${encodeURIComponent(migrationId)}`);
  }

  vmStats(name: string): Promise<VmStats> {
    return this.json("GET", `/v1/vms/${encodeURIComponent(name)}/stats`);
  }
  /** Usage history of a VM, or of the host without `vm` (GET /v1/metrics/history). */
  metricsHistory(opts: { vm?: string; from?: Date; to?: Date; step?: number } = {}): Promise<MetricsHistoryReport> {
    const q = new URLSearchParams();
    if (opts.vm !== undefined) q.set("vm", opts.vm);
    if (opts.from !== undefined) q.set("from", opts.from.toISOString());
    if (opts.to !== undefined) q.set("to", opts.to.toISOString());
    if (opts.step !== undefined) q.set("step", String(opts.step));
    const qs = q.toString();
    return this.json("GET", `/v1/metrics/history${qs !== "" ? `?${qs}` : ""}`);
  }
  /** The alerts firing now. */
  async alerts(): Promise<FiringAlertInfo[]> {
    return (await this.json<{ alerts: FiringAlertInfo[] }>("GET", "/v1/alerts")).alerts;
  }
  async alertWebhooks(): Promise<WebhookInfo[]> {
    return (await this.json<{ webhooks: WebhookInfo[] }>("GET", "/v1/alerts/webhooks")).webhooks;
  }
  async alertRules(): Promise<AlertRuleInfo[]> {
    return (await this.json<{ rules: AlertRuleInfo[] }>("GET", "/v1/alerts/rules")).rules;
  }
  addAlertRule(spec: import("zod").input<typeof alertRuleSpec>): Promise<AlertRuleInfo> {
    return this.json("POST", "/v1/alerts/rules", spec);
  }
  async removeAlertRule(name: string): Promise<void> {
    await this.json("DELETE", `/v1/alerts/rules/${encodeURIComponent(name)}`);
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
  async attachConsole(name: string): Promise<Duplex> {
    const options = await this.options("GET", `/v1/vms/${encodeURIComponent(name)}/console/attach`, { connection: "Upgrade", upgrade: "tcp" });
    return new Promise((resolve, reject) => {
      const req = request(options);
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
    yield* this.records(`/v1/events?${q.toString()}`, "\n\n", (block) => {
      const data = block
        .split("\n")
        .filter((l) => l.startsWith("data: "))
        .map((l) => l.slice(6))
        .join("\n");
      return data !== "" ? (JSON.parse(data) as EventRecord) : undefined;
    });
  }
  /** The daemon's log (and a VM's VMM log), searched: GET /v1/logs. */
  async logs(opts: LogsOptions = {}): Promise<LogLine[]> {
    return (await this.json<{ lines: LogLine[] }>("GET", `/v1/logs${logsQueryString(opts)}`)).lines;
  }
  /** The matching backlog, then new lines as they are written; iterate with `for await`. */
  async *followLogs(opts: LogsOptions = {}): AsyncGenerator<LogLine> {
    // empty lines are the daemon's keep-alives
    yield* this.records(`/v1/logs${logsQueryString({ ...opts, follow: true })}`, "\n", (line) => (line.trim() !== "" ? (JSON.parse(line) as LogLine) : undefined));
  }
  /** A streamed response cut into records at `sep`; `parse` gives undefined for a keep-alive. */
  private async *records<T>(path: string, sep: string, parse: (record: string) => T | undefined): AsyncGenerator<T> {
    const res = await this.open(path);
    let buf = "";
    try {
      res.setEncoding("utf8");
      for await (const chunk of res) {
        buf += chunk as string;
        let i: number;
        while ((i = buf.indexOf(sep)) >= 0) {
          const record = parse(buf.slice(0, i));
          buf = buf.slice(i + sep.length);
          if (record !== undefined) yield record;
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

  // ---- users, tokens, audit (docs/security.md) ----
  async listUsers(): Promise<UserInfo[]> {
    return (await this.json<{ users: UserInfo[] }>("GET", "/v1/users")).users;
  }
  addUser(u: { name: string; role: Role; scopes?: string[]; password?: string }): Promise<UserInfo> {
    return this.json("POST", "/v1/users", u);
  }
  getUser(name: string): Promise<UserInfo & { tokenList: TokenInfo[] }> {
    return this.json("GET", `/v1/users/${encodeURIComponent(name)}`);
  }
  async removeUser(name: string): Promise<void> {
    await this.json("DELETE", `/v1/users/${encodeURIComponent(name)}`);
  }
  async setPassword(name: string, password: string): Promise<void> {
    await this.json("PUT", `/v1/users/${encodeURIComponent(name)}/password`, { password });
  }
  /** The answer's `token` is the secret, shown this once. */
  createToken(t: { user: string; role?: Role; scopes?: string[]; expires?: string }): Promise<TokenInfo & { token: string }> {
    return this.json("POST", "/v1/tokens", t);
  }
  async listTokens(opts: { user?: string } = {}): Promise<TokenInfo[]> {
    return (await this.json<{ tokens: TokenInfo[] }>("GET", `/v1/tokens${opts.user !== undefined ? `?user=${encodeURIComponent(opts.user)}` : ""}`)).tokens;
  }
  revokeToken(id: string): Promise<TokenInfo> {
    return this.json("DELETE", `/v1/tokens/${encodeURIComponent(id)}`);
  }
  /** A session token (in `token`), for an interactive login (login-routes.ts). */
  login(l: { user: string; password: string; totp?: string; recoveryCode?: string }): Promise<TokenInfo & { token: string }> {
    return this.json("POST", "/v1/login", l);
  }
  /** Revoke the token this client sends. */
  async logout(): Promise<void> {
    await this.json("POST", "/v1/logout");
  }
  enableMfa(user: string): Promise<{ user: string; uri: string; secret: string; recoveryCodes: string[] }> {
    return this.json("POST", `/v1/users/${encodeURIComponent(user)}/mfa`);
  }
  async disableMfa(user: string): Promise<void> {
    await this.json("DELETE", `/v1/users/${encodeURIComponent(user)}/mfa`);
  }
  async audit(q: { since?: string; user?: string; vm?: string; after?: number; limit?: number } = {}): Promise<AuditEntry[]> {
    const p = new URLSearchParams();
    for (const [k, v] of Object.entries(q)) if (v !== undefined) p.set(k, String(v));
    const qs = p.toString();
    return (await this.json<{ entries: AuditEntry[] }>("GET", `/v1/audit${qs !== "" ? `?${qs}` : ""}`)).entries;
  }
  verifyAudit(): Promise<VerifyResult> {
    return this.json("GET", "/v1/audit/verify");
  }
}
