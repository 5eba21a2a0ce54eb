/**
 * A client for one VMM process's control API (src/vmm/api/server.ts): HTTP/1.1
 * with JSON bodies on a unix socket. Every call has a deadline: a VMM that
 * hangs must not hang the daemon.
 */
import { TypevisorError } from "../errors.js";
import { HttpTimeoutError, HttpTooLargeError, httpRequest, parseProblem } from "../sys/http-request.js";

/**
 * The largest answer the daemon reads from a VMM: its biggest (GET /stats of a VM with many
 * devices, GET /threads) is a few tens of KiB; a VMM that a guest took over may send without end.
 */
export const MAX_VMM_ANSWER = 1 << 20;

export class VmmClient {
  constructor(readonly socketPath: string, private readonly timeoutMs = 10_000) {}

  async call<T = unknown>(method: string, path: string, body?: unknown, timeoutMs = this.timeoutMs): Promise<T> {
    const where = `VMM ${method} ${path}`;
    // .catch, not try: a body JSON cannot encode throws from httpRequest itself and stays a plain error.
    const res = await httpRequest({ socketPath: this.socketPath, method, path }, body, timeoutMs, MAX_VMM_ANSWER).catch((e: unknown) => {
      if (e instanceof HttpTimeoutError) throw new TypevisorError("VMM_TIMEOUT", `${where}: no answer in ${timeoutMs} ms`);
      if (e instanceof HttpTooLargeError) throw new TypevisorError("VMM_API", `${where}: answer over ${MAX_VMM_ANSWER} bytes`);
      throw new TypevisorError("VMM_UNREACHABLE", `${where}: ${(e as Error).message}`, { cause: e });
    });
    const text = res.body.toString("utf8");
    let parsed: unknown;
    try {
      parsed = text === "" ? undefined : JSON.parse(text);
    } catch {
      throw new TypevisorError("VMM_API", `${where}: answer is not JSON`);
    }
    if (res.status >= 400) {
      const p = parseProblem(text);
      throw new TypevisorError(p.code ?? "VMM_API", `${where}: ${p.detail ?? `HTTP ${res.status}`}`);
    }
    return parsed as T;
  }

  info(): Promise<{ id?: string; state?: string; pid: number; boots?: number }> {
    return this.call("GET", "/vm");
  }
  stats(): Promise<VmmStats> {
    return this.call("GET", "/stats");
  }
  pause(): Promise<void> {
    return this.call("POST", "/pause");
  }
  resume(): Promise<void> {
    return this.call("POST", "/resume");
  }
  stop(): Promise<void> {
    return this.call("POST", "/stop");
  }
  reboot(): Promise<void> {
    return this.call("POST", "/reboot");
  }

  /** Poll GET /vm until the VMM answers or `deadline` (ms since epoch) passes. */
  async waitReady(deadline: number, alive: () => boolean): Promise<void> {
    for (;;) {
      try {
        await this.call("GET", "/vm", undefined, 2000);
        return;
      } catch (e) {
        if (!alive()) throw new TypevisorError("VMM_EXITED", "the VMM process exited while starting");
        if (Date.now() > deadline) throw new TypevisorError("VMM_TIMEOUT", `the VMM's API socket ${this.socketPath} did not answer in time: ${(e as Error).message}`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

export interface VmmStats {
  state?: string;
  uptimeMs?: number;
  totalExits?: number;
  io?: {
    diskReadBytes?: number;
    diskWriteBytes?: number;
    netRxBytes?: number;
    netTxBytes?: number;
  };
}
