/**
 * The web console (docs/web.md): the daemon serves a single-page UI at `/` of its listeners, and
 * the UI speaks the same REST API through the same gate (auth.ts) as every other client.
 *
 * - Assets: the UI's own files (web/) and the npm packages it uses (xterm.js, its fit addon,
 *   uPlot), read once at start from node_modules, never from a CDN. Served with an ETag
 *   (revalidated: `no-cache`) and a strict Content-Security-Policy: scripts from this origin only,
 *   no inline script, no framing (CSP Level 3 §6; `frame-ancestors 'none'`).
 * - Session: POST /v1/login?cookie=true puts the login's session token in a cookie instead of the
 *   answer: HttpOnly (the page's scripts never see it), SameSite=Strict (a browser sends it with
 *   requests from this origin's own pages only, RFC 6265bis §5.4.7), Secure over HTTPS, Path=/.
 *   The gate then reads the cookie where it would read `Authorization: Bearer` (an explicit
 *   Authorization header wins). A request that changes anything and carries only the cookie must
 *   also carry `X-Requested-With: typevisor`: a cross-site form cannot set a header, and a
 *   cross-site script would need a CORS preflight that the daemon never grants; that, and
 *   SameSite=Strict, is the CSRF defence (OWASP "custom request header").
 * - Console: GET /v1/vms/NAME/console/ws, a WebSocket (RFC 6455) carrying the serial bytes both
 *   ways as binary messages, spliced to the VMM's console socket like the raw attach. Its Origin
 *   must be this daemon's own (a WebSocket handshake is not subject to CORS, §10.2: without the
 *   check any page could drive a logged-in browser's console). Needs vm:console to watch;
 *   keystrokes are passed on only for callers with vm:console-input (a viewer sees, read-only).
 */
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import type { IncomingMessage } from "node:http";
import { createRequire } from "node:module";
import { connect, type Socket } from "node:net";
import { dirname, join } from "node:path";
import type { Duplex } from "node:stream";
import type { TLSSocket } from "node:tls";
import { fileURLToPath } from "node:url";
import type { FastifyInstance } from "fastify";
import { WebSocketServer, type WebSocket } from "ws";
import { can, type Principal } from "../control/identity.js";
import type { VmManager } from "../control/manager.js";
import { isActive } from "../control/state.js";
import { TypevisorError } from "../errors.js";
import type { PeerCred } from "../sys/peercred.js";
import { authenticate, authorize, type Gate, type Guard } from "./auth.js";
import { problem, toProblem, type Problem } from "./problem.js";
import { vmName } from "./schemas.js";

export const SESSION_COOKIE = "tv_session";
export const CSRF_HEADER = "x-requested-with";
export const CSRF_VALUE = "typevisor";

/** The routes the web console adds outside the REST table. */
export const WEB_GUARDS = {
  /** The UI's files: public (they hold no data; the login page is one of them). */
  assets: { method: "GET", url: "/ui/*", permission: "host:read", public: true },
  root: { method: "GET", url: "/", permission: "host:read", public: true },
  consoleWs: { method: "GET", url: "/v1/vms/:name/console/ws", permission: "vm:console", target: "path" },
} as const satisfies Record<string, Guard>;

/** The value of cookie `name` in a Cookie header (RFC 6265 §4.2.1), if it is there once and well-formed. */
export function cookieValue(header: string | undefined, name: string): string | undefined {
  if (header === undefined || header.length > 8192) return undefined;
  const found = header
    .split(";")
    .map((p) => p.trim())
    .filter((p) => p.startsWith(`${name}=`))
    .map((p) => p.slice(name.length + 1));
  // two cookies of one name (one planted by a sibling subdomain, say): trust neither
  return found.length === 1 && /^[A-Za-z0-9._~+/-]+=*$/.test(found[0]!) ? found[0] : undefined;
}

function overTls(req: IncomingMessage): boolean {
  return (req.socket as TLSSocket).encrypted === true;
}

/**
 * A request without an Authorization header but with the session cookie: the cookie's token is
 * given to the gate as a bearer token (so the same checks, throttle and audit apply). Returns
 * whether the request is authenticated by the cookie.
 */
export function cookieToBearer(req: IncomingMessage): boolean {
  if (req.headers.authorization !== undefined) return false;
  const token = cookieValue(req.headers.cookie, SESSION_COOKIE);
  if (token === undefined) return false;
  req.headers.authorization = `Bearer ${token}`;
  return true;
}

/** The CSRF check for a cookie-authenticated request that changes something. */
export function checkCsrf(req: IncomingMessage): void {
  if (req.headers[CSRF_HEADER] !== CSRF_VALUE) {
    throw new TypevisorError("FORBIDDEN", `a request authenticated by the session cookie that changes anything must carry ${CSRF_HEADER}: ${CSRF_VALUE} (cross-site request refused)`);
  }
}

export function sessionCookie(req: IncomingMessage, token: string, maxAgeSeconds: number): string {
  return `${SESSION_COOKIE}=${token}; Path=/; Max-Age=${maxAgeSeconds}; HttpOnly; SameSite=Strict${overTls(req) ? "; Secure" : ""}`;
}

export function clearedCookie(req: IncomingMessage): string {
  return `${SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict${overTls(req) ? "; Secure" : ""}`;
}

/** Is the browser page that opened this request this daemon's own? (Origin, RFC 6454 §7) */
export function sameOrigin(req: IncomingMessage): boolean {
  const origin = req.headers.origin;
  const host = req.headers.host;
  if (origin === undefined || host === undefined) return false;
  return origin === `${overTls(req) ? "https" : "http"}://${host}`;
}

// ---- assets ---------------------------------------------------------------------------------------

export const CONTENT_SECURITY_POLICY = [
  "default-src 'none'",
  "script-src 'self'",
  // xterm.js and uPlot size and colour their elements through style attributes and a <style> of their own
  "style-src 'self' 'unsafe-inline'",
  "img-src 'self' data:",
  "font-src 'self'",
  // CSP Level 3: 'self' also matches ws:/wss: to this host, for the console's WebSocket
  "connect-src 'self'",
  "base-uri 'none'",
  "form-action 'self'",
  "frame-ancestors 'none'",
].join("; ");

const SECURITY_HEADERS = {
  "content-security-policy": CONTENT_SECURITY_POLICY,
  "x-content-type-options": "nosniff",
  "referrer-policy": "no-referrer",
  "x-frame-options": "DENY",
  "cross-origin-opener-policy": "same-origin",
} as const;

interface Asset {
  body: Buffer;
  type: string;
  etag: string;
}

const TYPES: Record<string, string> = { html: "text/html; charset=utf-8", js: "text/javascript; charset=utf-8", css: "text/css; charset=utf-8", svg: "image/svg+xml" };

/** The UI's directory: web/ at the package root (this file runs from src/api or dist/api). */
function webDir(): string {
  return fileURLToPath(new URL("../../web/", import.meta.url));
}

/** URL path under /ui/ → file, for every file the UI may load: nothing else is served. */
function assetFiles(): Record<string, string> {
  const require = createRequire(import.meta.url);
  const xterm = dirname(dirname(require.resolve("@xterm/xterm"))); // .../@xterm/xterm (main: lib/xterm.js)
  const fit = dirname(require.resolve("@xterm/addon-fit")); // .../lib
  const uplot = dirname(require.resolve("uplot")); // .../dist
  const web = webDir();
  return {
    "": join(web, "index.html"),
    "app.js": join(web, "app.js"),
    "app.css": join(web, "app.css"),
    "vendor/xterm.js": join(xterm, "lib", "xterm.js"),
    "vendor/xterm.css": join(xterm, "css", "xterm.css"),
    "vendor/addon-fit.js": join(fit, "addon-fit.js"),
    "vendor/uPlot.js": join(uplot, "uPlot.iife.min.js"),
    "vendor/uPlot.css": join(uplot, "uPlot.min.css"),
  };
}

let cached: Map<string, Asset> | undefined;
function assets(): Map<string, Asset> {
  if (cached !== undefined) return cached;
  const m = new Map<string, Asset>();
  for (const [url, file] of Object.entries(assetFiles())) {
    const body = readFileSync(file);
    const ext = (url === "" ? "index.html" : url).split(".").pop()!;
    m.set(url, { body, type: TYPES[ext] ?? "application/octet-stream", etag: `"${createHash("sha256").update(body).digest("base64url").slice(0, 27)}"` });
  }
  return (cached = m);
}

/** GET / (to the UI) and GET /ui/...: the UI's files, each with the security headers. */
export function registerWebAssets(app: FastifyInstance): void {
  const files = assets(); // at start: a missing package fails the daemon's start, not a user's page
  app.get(WEB_GUARDS.root.url, async (_request, reply) => reply.code(302).headers(SECURITY_HEADERS).header("location", "/ui/").send());
  app.get(WEB_GUARDS.assets.url, async (request, reply) => {
    const path = (request.params as { "*": string })["*"];
    const a = files.get(path);
    if (a === undefined) throw new TypevisorError("NOT_FOUND", `no such file in the web console: /ui/${path.slice(0, 100)}`);
    void reply.headers(SECURITY_HEADERS).header("cache-control", "no-cache").header("etag", a.etag);
    if (request.headers["if-none-match"] === a.etag) return reply.code(304).send();
    return reply.type(a.type).send(a.body);
  });
}

// ---- the console over a WebSocket ---------------------------------------------------------------

/** Bytes a console WebSocket may have queued toward a slow browser before the VMM's output is paused. */
const WS_HIGH_WATER = 1024 * 1024;

export interface ConsoleWs {
  /** Handle the upgrade if it is a console WebSocket's; false: not one, another handler's. */
  handle(req: IncomingMessage, socket: Duplex, head: Buffer): boolean;
  close(): void;
}

export function consoleWebSocket(manager: VmManager, gate: Gate, peerOf: (socket: Duplex) => PeerCred | undefined): ConsoleWs {
  const wss = new WebSocketServer({ noServer: true, maxPayload: 64 * 1024, perMessageDeflate: false });
  const send = (socket: Duplex, p: Problem, headers: Record<string, string> = {}): void => {
    const body = JSON.stringify(p);
    const extra = Object.entries(headers).map(([k, v]) => `${k}: ${v}\r\n`).join("");
    socket.end(`HTTP/1.1 ${p.status} ${p.code}\r\ncontent-type: application/problem+json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n${extra}connection: close\r\n\r\n${body}`);
  };
  return {
    close: () => wss.close(),
    handle(req, socket, head) {
      const m = /^\/v1\/vms\/([^/?]+)\/console\/ws(?:\?.*)?$/.exec(req.url ?? "");
      if (m === null) return false;
      socket.on("error", () => socket.destroy());
      cookieToBearer(req);
      let principal: Principal;
      try {
        principal = authenticate(gate, req, peerOf(socket));
        authorize(gate, principal, WEB_GUARDS.consoleWs);
      } catch (e) {
        send(socket, toProblem(e), e instanceof TypevisorError && e.code === "UNAUTHENTICATED" ? { "www-authenticate": 'Bearer realm="typevisor"' } : {});
        return true;
      }
      let name = "";
      const record = (result: string, detail?: string): void => {
        try {
          gate.audit.record({ user: principal.user, ...(principal.tokenId !== undefined ? { token: principal.tokenId } : {}), peer: principal.from, action: "console.ws", ...(name !== "" ? { target: name } : {}), result, ...(detail !== undefined ? { detail } : {}) });
        } catch {
          /* a full disk: the attach's own outcome stands */
        }
      };
      const fail = (p: Problem): true => {
        record(String(p.status), p.code);
        send(socket, p);
        return true;
      };
      // A browser always sends Origin with a WebSocket handshake (RFC 6455 §4.1): it must be ours.
      if (req.headers.origin !== undefined && !sameOrigin(req)) return fail(problem(403, "FORBIDDEN", "the console WebSocket is only for this daemon's own pages (Origin refused)"));
      try {
        name = decodeURIComponent(m[1]!);
      } catch {
        return fail(problem(400, "INVALID_REQUEST", "path.name: malformed percent-encoding"));
      }
      if (!vmName.safeParse(name).success) {
        name = "";
        return fail(problem(400, "INVALID_REQUEST", "path.name: not a VM name"));
      }
      try {
        authorize(gate, principal, WEB_GUARDS.consoleWs, { name });
      } catch (e) {
        send(socket, toProblem(e)); // audited by the gate
        return true;
      }
      let paths: ReturnType<VmManager["consolePaths"]>;
      try {
        paths = manager.consolePaths(name);
      } catch (e) {
        return fail(toProblem(e));
      }
      if (!isActive(paths.state)) return fail(problem(409, "VM_STATE", `VM ${name} is ${paths.state}: its console is live only while it runs`));
      const typing = can(principal, "vm:console-input");
      const vmm: Socket = connect(paths.socket);
      vmm.once("error", (e: NodeJS.ErrnoException) =>
        fail(e.code === "ENOENT" || e.code === "ECONNREFUSED" ? problem(409, "VM_STATE", `VM ${name}: its console is not available (the VMM is starting or stopping)`) : problem(502, "VMM_UNREACHABLE", `console socket: ${e.message}`)),
      );
      vmm.once("connect", () => {
        vmm.removeAllListeners("error");
        wss.handleUpgrade(req, socket, head, (ws: WebSocket) => {
          record("ok", typing ? "read-write" : "read-only");
          const close = (): void => {
            ws.terminate();
            vmm.destroy();
          };
          vmm.on("data", (b: Buffer) => {
            ws.send(b, { binary: true });
            // a browser that does not keep up: the VMM's console waits (its UART buffers, as a slow terminal would)
            if (ws.bufferedAmount > WS_HIGH_WATER && !vmm.isPaused()) {
              vmm.pause();
              const t = setInterval(() => {
                if (ws.readyState !== ws.OPEN) return clearInterval(t);
                if (ws.bufferedAmount < WS_HIGH_WATER / 2) {
                  clearInterval(t);
                  vmm.resume();
                }
              }, 50);
            }
          });
          ws.on("message", (data: Buffer | ArrayBuffer | Buffer[]) => {
            if (!typing) return; // a viewer watches; what it types goes nowhere
            const b = Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data as ArrayBuffer);
            vmm.write(b);
          });
          ws.on("close", close);
          ws.on("error", close);
          vmm.on("close", () => ws.close(1000, "the VM's console closed"));
          vmm.on("error", close);
        });
      });
      return true;
    },
  };
}
