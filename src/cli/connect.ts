/**
 * Where the CLI finds the daemon. Every client command takes the same three
 * options, resolved in this order:
 *   --host HOST:PORT   the API over TCP (a daemon started with --listen)
 *   --socket PATH      the API's unix socket
 *   --home DIR         the daemon's home (`typevisor daemon --home DIR` serves DIR/typevisor.sock)
 *   $TYPEVISOR_SOCKET  then <data home>/typevisor.sock, the daemon's default
 *   $TYPEVISOR_TIMEOUT  seconds a request may wait for its answer (default 120)
 * and, to prove who is asking and whom it talks to (docs/security.md):
 *   --token-file FILE  or $TYPEVISOR_TOKEN: a bearer token (never a command-line argument: ps shows those);
 *                      else, with --host, the session `typevisor login` saved for that host
 *   --fingerprint FP   or $TYPEVISOR_FINGERPRINT: the daemon's HTTPS certificate, pinned
 *   --ca FILE          or $TYPEVISOR_CA: a CA the daemon's certificate chains to
 * On the unix socket the daemon knows the caller's uid, so no token is needed there.
 */
import { chmodSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { homedir } from "node:os";
import { dirname, join, resolve } from "node:path";
import type { Command } from "commander";
import { TypevisorClient, type ClientTarget } from "../api/client.js";
import { homePaths } from "../control/paths.js";
import { TypevisorError } from "../errors.js";
import { dataHome } from "../images/dirs.js";

export interface ConnectionOptions {
  socket?: string;
  home?: string;
  host?: string;
  tokenFile?: string;
  fingerprint?: string;
  ca?: string;
}

type Env = Record<string, string | undefined>;

/** Add --socket, --home and --host to a command. */
export function addConnectionOptions(cmd: Command): Command {
  return cmd
    .option("--socket <path>", "the daemon's API socket (default: $TYPEVISOR_SOCKET, else DATA_HOME/typevisor.sock)")
    .option("--home <dir>", "the daemon's home directory (as given to `typevisor daemon --home`): use its socket")
    .option("--host <host:port>", "the daemon's API over HTTPS (`typevisor daemon --listen`)")
    .option("--token-file <file>", "a bearer token for the daemon (default: $TYPEVISOR_TOKEN)")
    .option("--fingerprint <sha256>", "pin the daemon's HTTPS certificate (typevisor host shows it; default: $TYPEVISOR_FINGERPRINT)")
    .option("--ca <file>", "a CA certificate the daemon's HTTPS certificate chains to (default: $TYPEVISOR_CA, else the system's)");
}

function readSmall(flag: string, path: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch (e) {
    throw new TypevisorError("INVALID_ARGUMENT", `${flag} ${path}: ${(e as Error).message}`);
  }
}

/**
 * Where `typevisor login` keeps its sessions: $XDG_CONFIG_HOME/typevisor/sessions.json, else
 * ~/.config/typevisor/sessions.json (XDG Base Directory spec), mode 0600 in a 0700 directory.
 * One session per daemon address: a session is sent only to the daemon that issued it.
 */
export function sessionFile(env: Env = process.env): string {
  const xdg = env["XDG_CONFIG_HOME"];
  return join(xdg !== undefined && xdg !== "" ? resolve(xdg) : join(homedir(), ".config"), "typevisor", "sessions.json");
}

export interface SavedSession {
  token: string;
  user: string;
  expiresAt: string;
}

export function readSessions(env: Env = process.env): Record<string, SavedSession> {
  try {
    const v = JSON.parse(readFileSync(sessionFile(env), "utf8")) as unknown;
    return typeof v === "object" && v !== null && !Array.isArray(v) ? (v as Record<string, SavedSession>) : {};
  } catch {
    return {}; // none yet, or unreadable: no session
  }
}

/** Save (or with `s` undefined, forget) the session for `host`. */
export function saveSession(host: string, s: SavedSession | undefined, env: Env = process.env): string {
  const file = sessionFile(env);
  const all = readSessions(env);
  if (s === undefined) delete all[host];
  else all[host] = s;
  mkdirSync(dirname(file), { recursive: true, mode: 0o700 });
  writeFileSync(file, `${JSON.stringify(all, null, 2)}\n`, { mode: 0o600 });
  chmodSync(file, 0o600); // an existing file keeps its mode through writeFileSync
  return file;
}

/** The key a session is saved under: the --host given, normalized. */
export function sessionKey(o: ConnectionOptions): string | undefined {
  if (o.host === undefined) return undefined;
  const { host, port } = parseHostPort(o.host);
  return `${host.includes(":") ? `[${host}]` : host}:${port}`;
}

/** The token to send, if any: --token-file, else $TYPEVISOR_TOKEN, else (with --host) the saved session for that host. */
export function resolveToken(o: ConnectionOptions, env: Env = process.env): string | undefined {
  const t = o.tokenFile !== undefined ? readSmall("--token-file", o.tokenFile).trim() : env["TYPEVISOR_TOKEN"]?.trim();
  if (t !== undefined && t !== "") return t;
  const key = sessionKey(o);
  const saved = key !== undefined ? readSessions(env)[key] : undefined;
  return typeof saved?.token === "string" && saved.token !== "" ? saved.token : undefined;
}

function parseHostPort(v: string): { host: string; port: number } {
  // [v6]:port or name:port; the brackets are only syntax.
  const m = /^(\[[0-9a-fA-F:.]+\]|[^:[\]]+):(\d{1,5})$/.exec(v.trim());
  const port = m !== null ? Number(m[2]) : NaN;
  if (m === null || port < 1 || port > 65535) {
    throw new TypevisorError("INVALID_ARGUMENT", `--host takes HOST:PORT, e.g. 127.0.0.1:8420 (got "${v}")`);
  }
  return { host: m[1]!.replace(/^\[|\]$/g, ""), port };
}

export function resolveTarget(o: ConnectionOptions, env: Env = process.env): ClientTarget {
  const given = [o.host !== undefined && "--host", o.socket !== undefined && "--socket", o.home !== undefined && "--home"].filter((x): x is string => x !== false);
  if (given.length > 1) throw new TypevisorError("INVALID_ARGUMENT", `give one of ${given.join(", ")}: they all say where the daemon is`);
  if (o.host !== undefined) {
    const fingerprint = o.fingerprint ?? env["TYPEVISOR_FINGERPRINT"];
    const caFile = o.ca ?? env["TYPEVISOR_CA"];
    return {
      ...parseHostPort(o.host),
      ...(fingerprint !== undefined && fingerprint !== "" ? { fingerprint } : {}),
      ...(caFile !== undefined && caFile !== "" ? { ca: readSmall("--ca", caFile) } : {}),
    };
  }
  if (o.socket !== undefined) return { socketPath: resolve(o.socket) };
  if (o.home !== undefined) return { socketPath: homePaths(resolve(o.home)).socket };
  const fromEnv = env["TYPEVISOR_SOCKET"];
  if (fromEnv !== undefined && fromEnv !== "") return { socketPath: resolve(fromEnv) };
  return { socketPath: join(dataHome(env), "typevisor.sock") };
}

/**
 * A client for the daemon. `timeoutMs` is how long a request may stay silent; 0 for
 * streams that follow (console, events), which may legitimately be idle for hours.
 */
export function connect(o: ConnectionOptions, opts: { timeoutMs?: number; env?: Env } = {}): TypevisorClient {
  const env = opts.env ?? process.env;
  const token = resolveToken(o, env);
  return new TypevisorClient(resolveTarget(o, env), { timeoutMs: opts.timeoutMs ?? requestTimeoutMs(env), ...(token !== undefined ? { token } : {}) });
}

/**
 * How long a request may wait for the daemon's answer: $TYPEVISOR_TIMEOUT seconds, else 120 s. A
 * `vm create --start` or `vm start` answers once the VMM is up, which the daemon bounds by its
 * own --start-timeout: a daemon given a longer one (a slow host) needs a longer wait here too.
 */
export function requestTimeoutMs(env: Env): number {
  const v = env["TYPEVISOR_TIMEOUT"];
  if (v === undefined || v === "") return 120_000;
  const s = Number(v);
  if (!/^\d+$/.test(v.trim()) || !Number.isSafeInteger(s) || s < 1 || s > 86_400) throw new TypevisorError("INVALID_ARGUMENT", `TYPEVISOR_TIMEOUT must be a whole number of seconds from 1 to 86400 (got "${v}")`);
  return s * 1000;
}
