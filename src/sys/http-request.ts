/**
 * One HTTP/1.1 request with an optional JSON body, over a unix socket or TCP,
 * read to the end: the transport shared by the daemon's client for a VMM
 * (engine/vmm-client.ts) and the package's client for the daemon
 * (api/client.ts). Each caller maps failures to its own error codes, so this
 * module throws no TypevisorError.
 */
import { request, type IncomingMessage, type OutgoingHttpHeaders, type RequestOptions } from "node:http";

export interface HttpAnswer {
  status: number;
  body: Buffer;
}

/** The socket was idle for `timeoutMs`; the request has been destroyed. */
export class HttpTimeoutError extends Error {
  constructor(readonly timeoutMs: number) {
    super(`no answer in ${timeoutMs} ms`);
    this.name = "HttpTimeoutError";
  }
}

/** The answer's body passed `maxBytes`; the request has been destroyed. */
export class HttpTooLargeError extends Error {
  constructor(readonly maxBytes: number) {
    super(`answer over ${maxBytes} bytes`);
    this.name = "HttpTooLargeError";
  }
}

/** node:http's options, with headers as an object so a JSON body's headers can be added. */
export type HttpRequestOptions = Omit<RequestOptions, "headers" | "timeout"> & { headers?: OutgoingHttpHeaders };

/**
 * Send `body` (when given) as JSON; resolve with the status and the whole body, whatever the status.
 * Rejects with HttpTimeoutError when the socket stays idle for `timeoutMs` (as node's own timeout,
 * the clock restarts on every byte), otherwise with the socket's error as is.
 * A body JSON.stringify refuses throws synchronously, before anything is sent: that is the
 * caller's bug, not a transport failure, and a caller that maps failures with `.catch` keeps it apart.
 */
export function httpRequest(options: HttpRequestOptions, body?: unknown, timeoutMs?: number, maxBytes?: number): Promise<HttpAnswer> {
  const text = body === undefined ? undefined : JSON.stringify(body);
  const headers = text === undefined ? options.headers : { ...options.headers, "content-type": "application/json", "content-length": Buffer.byteLength(text) };
  return new Promise((resolve, reject) => {
    // A connection of its own (agent: false), not one kept alive from an earlier request: since
    // Node 19 the global agent keeps connections, a server drops an idle one after its keep-alive
    // timeout (5 s for node:http), and a caller whose event loop was busy past that (a synchronous
    // child process, a long computation) has not yet seen the close, so it writes the next request
    // into a dead socket: EPIPE on a unix socket (seen in the daemon lab test after spawnSync of a
    // slow `vm stop`). Over a unix socket a new connection costs tens of microseconds.
    const req = request({ agent: false, ...options, headers }, (res) => {
      readBody(res, maxBytes).then((b) => resolve({ status: res.statusCode ?? 0, body: b }), (e: unknown) => {
        req.destroy();
        reject(e);
      });
    });
    if (timeoutMs !== undefined) req.setTimeout(timeoutMs, () => req.destroy(new HttpTimeoutError(timeoutMs)));
    req.on("error", reject);
    req.end(text);
  });
}

/**
 * The rest of a response's body. Rejects if the connection drops before its end (node emits no
 * "end" then), or with HttpTooLargeError once more than `maxBytes` arrived (a peer that does not
 * stop must not grow this process without bound).
 */
export function readBody(res: IncomingMessage, maxBytes = Infinity): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    res.on("data", (c: Buffer) => {
      size += c.length;
      if (size > maxBytes) {
        chunks.length = 0;
        res.destroy(new HttpTooLargeError(maxBytes));
        return;
      }
      chunks.push(c);
    });
    res.on("end", () => resolve(Buffer.concat(chunks)));
    res.on("error", reject);
  });
}

/** The string fields of a problem+json body (RFC 9457, as api/problem.ts writes it). */
export interface ProblemFields {
  code?: string;
  detail?: string;
  hint?: string;
}

/** Tolerant: a body that is not JSON, or not an object, gives {} and the caller falls back on the status. */
export function parseProblem(body: Buffer | string): ProblemFields {
  let v: unknown;
  try {
    v = JSON.parse(typeof body === "string" ? body : body.toString("utf8"));
  } catch {
    return {};
  }
  if (typeof v !== "object" || v === null) return {};
  const o = v as Record<string, unknown>;
  const p: ProblemFields = {};
  for (const k of ["code", "detail", "hint"] as const) {
    const s = o[k];
    if (typeof s === "string") p[k] = s;
  }
  return p;
}
