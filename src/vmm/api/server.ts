/**
 * The VMM's control API: HTTP/1.1 with JSON bodies on a unix socket (the
 * Firecracker/Cloud Hypervisor convention, so `curl --unix-socket` works).
 * Errors are problem+json (RFC 9457) with a code; never a stack trace.
 *
 *   GET  /vm       state and configuration; pauseReason {kind "disk-full", errno, op, disk,
 *                  filesystem {mountPoint, type, source, sizeBytes, freeBytes}, message, at} while
 *                  the VMM paused the VM because a disk's filesystem is full (null otherwise)
 *   GET  /stats    vCPU exits by reason, uptime, memory, disk/network I/O counters
 *   POST /pause    park every vCPU (interrupts KVM_RUN)
 *   POST /snapshot {"path": DIR, "memory"?: bool, "track"?: bool, "base"?: DIR0}  save the whole VM
 *                  into DIR (must not exist): state.json, config.json and (unless memory is false)
 *                  the memory file; a running VM is paused meanwhile and runs on afterwards. 200
 *                  {path, ms, memoryBytes, dataBytes}; `typevisor run --restore DIR` starts from it.
 *                  track: count the pages written from now on; base: an incremental snapshot of
 *                  only the pages written since DIR0, the tracked snapshot (docs/snapshots.md)
 *   POST /migrate  {"to": "tcp:HOST:PORT"|"unix:PATH", "maxDowntimeMs"?, "maxRounds"?, "timeoutMs"?,
 *                  "maxBandwidth"? (bytes/s), "autoConverge"? (default true), "disks"? "shared"|"copy",
 *                  "tls"?: {"cert", "key", "ca"?, "peerFingerprint"?} (PEM texts), "plainTcp"?: true}:
 *                  live-migrate the VM to a VMM started with `run --incoming`; 202 with progress.
 *                  Over TCP the stream needs TLS (both sides authenticated) or plainTcp.
 *                  GET /migrate: progress {phase, round, bytesSent, dirtyBytes, bytesRemaining,
 *                  bandwidth, dirtyRate, expectedDowntimeMs, throttlePercent, downtimeMs?,
 *                  switchover? (where the pause went), disks?, error?}; DELETE /migrate cancels
 *                  (the VM runs on)
 *   PUT  /restore  (a standby VMM only, `run --standby`) {"snapshot": DIR, "id"?, "consoleLog"?,
 *                  "consoleSocket"?, "exitFile"?, "statsFile"?, "disks"?: [SPEC], "nets"?: [SPEC], "vsock"?: SPEC,
 *                  "paused"?: bool, "keepClock"?: bool}: become the VM saved in DIR, on this same
 *                  socket; answers 200 once the VM is built (its errors as for `run --restore`)
 *   POST /resume
 *   POST /stop     stop the VM; the VMM process then exits
 *   POST /reboot   reset the guest as its own reboot would (restarted, or exit with --no-reboot)
 *   GET  /registers  every vCPU's registers (only while paused)
 *   GET  /devices  PCI devices and their virtio status
 *   GET  /balloon  balloon size (target/actual pages) and guest memory statistics
 *   PUT  /balloon  {"targetMiB": N}: inflate/deflate the balloon to N MiB (memory taken from the guest)
 *   POST /balloon/stats  ask the guest to refresh its statistics
 *   GET  /threads  where every VMM thread is, without stopping the VM (docs/vmm.md "GET /threads"):
 *                  vcpus[] {id, tid, phase starting|run|exit|paused|finished, phaseMs, exits,
 *                  exit {reason, address, write, size, mailbox}}; devices {tid, phase poll|mailbox|
 *                  notify|backend|command|tick|..., phaseMs, passes, device, queue, answering,
 *                  answerMs, pci[] (each device's status, ISR, MSI-X, and per queue its registers,
 *                  the device's cursor and the ring indices in guest memory)} or null without
 *                  devices; ioThreads[] {disk, name, tid, state none|idle|starting|running|failed, busy,
 *                  inFlight, current, phaseMs, completed}; kernel[] {tid, comm, state, wchan, syscall,
 *                  cpuSeconds}.
 *                  Waits at most about 1 s for the device thread (answering: false if it does not
 *                  answer) and never blocks this thread.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { existsSync, unlinkSync } from "node:fs";
import { listenOnFd, listenOwnerOnly } from "../../sys/owner-only-socket.js";
import { TypevisorError, isTypevisorError } from "../../errors.js";
import type { MigrateRequest } from "../migration/source.js";
import type { SnapshotRequest } from "./requests.js";

export type { SnapshotRequest };
/**
 * The schemas of the request bodies, loaded by the first request that has one: they need zod,
 * which a VMM that is only ever asked GET /stats does not load (snapshot/state-file.ts says what
 * it costs per VMM).
 */
const requests = () => import("./requests.js");

/** POST /migrate's body, as checked here: the migration's own request (migration/source.ts). */
export type MigrateBody = MigrateRequest;

export interface ControlTarget {
  info(): unknown;
  /** May need the device thread (I/O counters), hence asynchronous. */
  stats(): Promise<unknown>;
  registers(): unknown;
  devices(): Promise<unknown>;
  /** GET: size and statistics; PUT {pages}: set the balloon's size; POST: ask the guest for fresh statistics. */
  balloon(method: "GET" | "PUT" | "POST", body?: { pages: number }): Promise<unknown>;
  /**
   * Where every VMM thread is (Vm.threads: ThreadsReport). Must never block the main thread:
   * it waits for the device thread's answer on a timer (about 1 s) and reports without it.
   */
  threads(): Promise<unknown>;
  pause(): Promise<void>;
  /** POST: start a live migration (body checked here); GET: its progress; DELETE: cancel it. */
  migrate?(method: "POST" | "GET" | "DELETE", body?: MigrateBody): Promise<unknown>;
  /** Save the VM into `path` (Vm.snapshot). */
  snapshot(req: SnapshotRequest): Promise<unknown>;
  resume(): void;
  stop(): void;
  /** Host-initiated reset (VM_STATE when there is no running VM). */
  reboot(): void;
  /** Only a standby VMM (`run --standby`): become the VM in a snapshot; answers once it is built. */
  restore?(body: unknown): Promise<unknown>;
}

/**
 * A target that can be swapped while the server keeps listening: a standby VMM answers on its
 * socket as "standby" and then, on the same socket, as the VM it became.
 */
export class SwitchableTarget implements ControlTarget {
  constructor(public current: ControlTarget) {}
  info(): unknown { return this.current.info(); }
  stats(): Promise<unknown> { return this.current.stats(); }
  registers(): unknown { return this.current.registers(); }
  devices(): Promise<unknown> { return this.current.devices(); }
  balloon(method: "GET" | "PUT" | "POST", body?: { pages: number }): Promise<unknown> { return this.current.balloon(method, body); }
  threads(): Promise<unknown> { return this.current.threads(); }
  pause(): Promise<void> { return this.current.pause(); }
  snapshot(req: SnapshotRequest): Promise<unknown> { return this.current.snapshot(req); }
  migrate(method: "POST" | "GET" | "DELETE", body?: MigrateBody): Promise<unknown> {
    if (this.current.migrate === undefined) return Promise.reject(new TypevisorError("VM_STATE", "this VMM has no VM to migrate"));
    return this.current.migrate(method, body);
  }
  resume(): void { this.current.resume(); }
  stop(): void { this.current.stop(); }
  reboot(): void { this.current.reboot(); }
  restore(body: unknown): Promise<unknown> {
    if (this.current.restore === undefined) return Promise.reject(new TypevisorError("VM_STATE", "this VMM already runs a VM: PUT /restore is for a standby VMM"));
    return this.current.restore(body);
  }
}

function send(res: ServerResponse, status: number, body: unknown, type = "application/json"): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { "content-type": type, "content-length": Buffer.byteLength(text) });
  res.end(text);
}

function problem(res: ServerResponse, status: number, code: string, detail: string): void {
  send(res, status, { type: `urn:typevisor:error:${code}`, title: code, status, code, detail }, "application/problem+json");
}

const STATE_ERRORS = new Set(["VM_STATE", "SNAPSHOT_EXISTS", "DISK_HELD"]);
const NOT_FOUND_ERRORS = new Set(["NOT_FOUND"]);
/** Errors that mean the request itself was wrong (400), not the VM's state. */
const INPUT_ERRORS = new Set([
  "BALLOON_TARGET", "INVALID_REQUEST", "NO_BALLOON", "NO_DEVICES", "INVALID_ARGUMENT", "INVALID_DEVICE",
  "SNAPSHOT_INVALID", "SNAPSHOT_NOT_FOUND", "SNAPSHOT_MISMATCH", "SNAPSHOT_CPU",
]);
const MAX_BODY = 16384;

/** A small JSON body (bounded: this socket is a control API, not an upload endpoint). */
function readJson(req: IncomingMessage): Promise<unknown> {
  return new Promise((resolve, reject) => {
    let text = "";
    req.setEncoding("utf8");
    req.on("data", (d: string) => {
      text += d;
      if (text.length > MAX_BODY) {
        reject(new TypevisorError("INVALID_REQUEST", `request body over ${MAX_BODY} bytes`));
        req.destroy();
      }
    });
    req.on("end", () => {
      try {
        resolve(text === "" ? undefined : JSON.parse(text));
      } catch {
        reject(new TypevisorError("INVALID_REQUEST", "request body is not valid JSON"));
      }
    });
  });
}

/**
 * Serve `target` on `socketPath` (or on the listening socket `listenFd`). With `until`, the socket
 * listens now but every request waits for `until` before it is answered (an incoming migration:
 * the socket is bound before the guest's pause, so its set-up is not in it and a failure to bind
 * fails the migration while the source still runs the guest; and it still answers only once the
 * VM runs here, which is how a daemon learns that it arrived). If `until` rejects, requests get 503.
 */
export function startControlServer(socketPath: string, target: ControlTarget, listenFd?: number, opts: { until?: Promise<void> } = {}): Promise<Server> {
  const until = opts.until;
  until?.catch(() => undefined);
  if (listenFd === undefined && existsSync(socketPath)) {
    // A stale socket from a dead VMM would make listen() fail with EADDRINUSE.
    unlinkSync(socketPath);
  }
  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const route = `${req.method ?? ""} ${(req.url ?? "").split("?")[0]}`;
    const handle = async (): Promise<void> => {
      if (until !== undefined) {
        const arrived = await until.then(() => true, () => false);
        if (!arrived) return problem(res, 503, "VM_STATE", "the VM did not arrive");
      }
      switch (route) {
        case "GET /vm":
          return send(res, 200, target.info());
        case "GET /stats":
          return send(res, 200, await target.stats());
        case "GET /balloon":
          return send(res, 200, await target.balloon("GET"));
        case "PUT /balloon": {
          const body = await readJson(req);
          const mib = (body as { targetMiB?: unknown } | undefined)?.targetMiB;
          if (typeof mib !== "number" || !Number.isInteger(mib) || mib < 0) {
            return problem(res, 400, "INVALID_REQUEST", 'body must be {"targetMiB": <whole number of MiB >= 0>}');
          }
          return send(res, 200, await target.balloon("PUT", { pages: mib * 256 }));
        }
        case "POST /balloon/stats":
          return send(res, 200, await target.balloon("POST"));
        case "GET /devices":
          return send(res, 200, await target.devices());
        case "GET /registers":
          return send(res, 200, target.registers());
        case "GET /threads":
          return send(res, 200, await target.threads());
        case "POST /pause":
          await target.pause();
          return send(res, 200, { ok: true });
        case "POST /snapshot": {
          const { SnapshotRequestSchema } = await requests();
          const r = SnapshotRequestSchema.safeParse(await readJson(req));
          if (!r.success) return problem(res, 400, "INVALID_REQUEST", 'body must be {"path": "<directory to create>", "memory"?: true|false, "base"?: "<tracked snapshot>", "track"?: true|false}');
          return send(res, 200, await target.snapshot(r.data));
        }
        case "POST /migrate":
        case "GET /migrate":
        case "DELETE /migrate": {
          if (target.migrate === undefined) return problem(res, 409, "VM_STATE", "this VMM has no VM to migrate");
          const method = req.method as "POST" | "GET" | "DELETE";
          if (method !== "POST") return send(res, 200, await target.migrate(method));
          const body = (await readJson(req)) as Record<string, unknown> | undefined;
          const num = (k: string, max: number): boolean => body?.[k] === undefined || (typeof body[k] === "number" && Number.isInteger(body[k]) && (body[k] as number) > 0 && (body[k] as number) <= max);
          if (typeof body?.["to"] !== "string" || body["to"].length > 4096 || !num("maxDowntimeMs", 3_600_000) || !num("maxRounds", 1000) || !num("timeoutMs", 86_400_000) ||
            !num("maxBandwidth", 2 ** 40) || (body["autoConverge"] !== undefined && typeof body["autoConverge"] !== "boolean") ||
            (body["disks"] !== undefined && body["disks"] !== "shared" && body["disks"] !== "copy")) {
            return problem(res, 400, "INVALID_REQUEST", 'body must be {"to": "tcp:HOST:PORT" | "unix:PATH", "maxDowntimeMs"?, "maxRounds"?, "timeoutMs"?, "maxBandwidth"? (bytes/s), "autoConverge"?: bool, "disks"?: "shared" | "copy", "tls"?: {"cert", "key", "ca"?, "peerFingerprint"?}, "plainTcp"?: true}');
          }
          // The stream's security (migration/transport.ts): PEM texts checked here, the endpoint's policy (TCP needs TLS or plainTcp) when it connects.
          if (body["tls"] !== undefined) {
            const [{ checkStreamTls }, { StreamTlsSchema }] = await Promise.all([import("../migration/transport.js"), import("../migration/tls-schema.js")]);
            const t = StreamTlsSchema.safeParse(body["tls"]);
            if (!t.success) return problem(res, 400, "INVALID_REQUEST", `tls: ${t.error.issues[0]?.path.join(".") ?? ""}: ${t.error.issues[0]?.message ?? "invalid"}`);
            checkStreamTls(t.data);
          }
          if (body["plainTcp"] !== undefined && typeof body["plainTcp"] !== "boolean") return problem(res, 400, "INVALID_REQUEST", "plainTcp must be true or false");
          return send(res, 202, await target.migrate("POST", body as unknown as MigrateBody));
        }
        case "PUT /restore": {
          if (target.restore === undefined) return problem(res, 409, "VM_STATE", "this VMM is not a standby VMM");
          return send(res, 200, await target.restore(await readJson(req)));
        }
        case "POST /resume":
          target.resume();
          return send(res, 200, { ok: true });
        case "POST /stop":
          target.stop();
          return send(res, 202, { ok: true });
        case "POST /reboot":
          // 202: the reset happens asynchronously (the VM is rebuilt, or the process exits with --no-reboot).
          target.reboot();
          return send(res, 202, { ok: true });
        default:
          return problem(res, 404, "NOT_FOUND", `no route ${route}; try GET /vm, GET /stats, GET /threads, POST /pause, POST /resume, POST /stop, POST /reboot`);
      }
    };
    handle().catch((e: unknown) => {
      if (isTypevisorError(e)) problem(res, STATE_ERRORS.has(e.code) ? 409 : INPUT_ERRORS.has(e.code) ? 400 : NOT_FOUND_ERRORS.has(e.code) ? 404 : e.code === "DISK_FULL" ? 507 : 500, e.code, e.message);
      else problem(res, 500, "INTERNAL", "internal error");
    });
  });
  // owner-only whatever the caller's umask: a client can stop the VM. Or a socket the supervisor
  // bound at socketPath (0600, its own) and handed over: a sandboxed VMM cannot bind there.
  return (listenFd !== undefined ? listenOnFd(server, listenFd) : listenOwnerOnly(server, socketPath)).then(
    () => server,
    (e: unknown) => {
      throw new TypevisorError("API_SOCKET", `cannot listen on ${socketPath}: ${(e as Error).message}`);
    },
  );
}
