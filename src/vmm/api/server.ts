/**
 * The VMM's control API: HTTP/1.1 with JSON bodies on a unix socket (the
 * Firecracker/Cloud Hypervisor convention, so `curl --unix-socket` works).
 * Errors are problem+json (RFC 9457) with a code; never a stack trace.
 *
 *   GET  /vm       state and configuration
 *   GET  /stats    vCPU exits by reason, uptime, memory
 *   POST /pause    park every vCPU (interrupts KVM_RUN)
 *   POST /resume
 *   POST /stop     stop the VM; the VMM process then exits
 *   GET  /registers  every vCPU's registers (only while paused)
 *   GET  /devices  PCI devices and their virtio status
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { existsSync, unlinkSync } from "node:fs";
import { TypevisorError, isTypevisorError } from "../../errors.js";

export interface ControlTarget {
  info(): unknown;
  stats(): unknown;
  registers(): unknown;
  devices(): Promise<unknown>;
  pause(): Promise<void>;
  resume(): void;
  stop(): void;
}

function send(res: ServerResponse, status: number, body: unknown, type = "application/json"): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { "content-type": type, "content-length": Buffer.byteLength(text) });
  res.end(text);
}

function problem(res: ServerResponse, status: number, code: string, detail: string): void {
  send(res, status, { type: `urn:typevisor:error:${code}`, title: code, status, code, detail }, "application/problem+json");
}

const STATE_ERRORS = new Set(["VM_STATE"]);

export function startControlServer(socketPath: string, target: ControlTarget): Promise<Server> {
  if (existsSync(socketPath)) {
    // A stale socket from a dead VMM would make listen() fail with EADDRINUSE.
    unlinkSync(socketPath);
  }
  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const route = `${req.method ?? ""} ${(req.url ?? "").split("?")[0]}`;
    req.resume();
    const handle = async (): Promise<void> => {
      switch (route) {
        case "GET /vm":
          return send(res, 200, target.info());
        case "GET /stats":
          return send(res, 200, target.stats());
        case "GET /devices":
          return send(res, 200, await target.devices());
        case "GET /registers":
          return send(res, 200, target.registers());
        case "POST /pause":
          await target.pause();
          return send(res, 200, { ok: true });
        case "POST /resume":
          target.resume();
          return send(res, 200, { ok: true });
        case "POST /stop":
          target.stop();
          return send(res, 202, { ok: true });
        default:
          return problem(res, 404, "NOT_FOUND", `no route ${route}; try GET /vm, GET /stats, POST /pause, POST /resume, POST /stop`);
      }
    };
    handle().catch((e: unknown) => {
      if (isTypevisorError(e)) problem(res, STATE_ERRORS.has(e.code) ? 409 : 500, e.code, e.message);
      else problem(res, 500, "INTERNAL", "internal error");
    });
  });
  return new Promise((resolve, reject) => {
    server.once("error", (e) => reject(new TypevisorError("API_SOCKET", `cannot listen on ${socketPath}: ${e.message}`)));
    server.listen(socketPath, () => resolve(server));
  });
}
