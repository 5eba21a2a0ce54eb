/**
 * A client for one VMM process's control API (src/vmm/api/server.ts): HTTP/1.1
 * with JSON bodies on a unix socket. Every call has a deadline: a VMM that
 * hangs must not hang the daemon.
 */
import { request } from "node:http";
import { TypevisorError } from "../errors.js";

export class VmmClient {
  constructor(readonly socketPath: string, private readonly timeoutMs = 10_000) {}

  call<T = unknown>(method: string, path: string, body?: unknown, timeoutMs = this.timeoutMs): Promise<T> {
    return new Promise((resolve, reject) => {
      const text = body === undefined ? undefined : JSON.stringify(body);
      const req = request(
        {
          socketPath: this.socketPath,
          method,
          path,
          headers: text !== undefined ? { "content-type": "application/json", "content-length": Buffer.byteLength(text) } : {},
          timeout: timeoutMs,
        },
        (res) => {
          let data = "";
          res.setEncoding("utf8");
          res.on("data", (d: string) => (data += d));
          res.on("end", () => {
            let parsed: unknown;
            try {
              parsed = data === "" ? undefined : JSON.parse(data);
            } catch {
              reject(new TypevisorError("VMM_API", `VMM ${method} ${path}: answer is not JSON`));
              return;
            }
            if ((res.statusCode ?? 500) >= 400) {
              const p = parsed as { code?: string; detail?: string } | undefined;
              reject(new TypevisorError(p?.code ?? "VMM_API", `VMM ${method} ${path}: ${p?.detail ?? `HTTP ${res.statusCode}`}`));
              return;
            }
            resolve(parsed as T);
          });
        },
      );
      req.on("timeout", () => req.destroy(new TypevisorError("VMM_TIMEOUT", `VMM ${method} ${path}: no answer in ${timeoutMs} ms`)));
      req.on("error", (e) => reject(e instanceof TypevisorError ? e : new TypevisorError("VMM_UNREACHABLE", `VMM ${method} ${path}: ${e.message}`, { cause: e })));
      req.end(text);
    });
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
