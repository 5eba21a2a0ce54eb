/**
 * Where the CLI finds the daemon. Every client command takes the same three
 * options, resolved in this order:
 *   --host HOST:PORT   the API over TCP (a daemon started with --listen)
 *   --socket PATH      the API's unix socket
 *   --home DIR         the daemon's home (`typevisor daemon --home DIR` serves DIR/typevisor.sock)
 *   $TYPEVISOR_SOCKET  then <data home>/typevisor.sock, the daemon's default
 */
import { join, resolve } from "node:path";
import type { Command } from "commander";
import { TypevisorClient, type ClientTarget } from "../api/client.js";
import { homePaths } from "../control/paths.js";
import { TypevisorError } from "../errors.js";
import { dataHome } from "../images/dirs.js";

export interface ConnectionOptions {
  socket?: string;
  home?: string;
  host?: string;
}

type Env = Record<string, string | undefined>;

/** Add --socket, --home and --host to a command. */
export function addConnectionOptions(cmd: Command): Command {
  return cmd
    .option("--socket <path>", "the daemon's API socket (default: $TYPEVISOR_SOCKET, else DATA_HOME/typevisor.sock)")
    .option("--home <dir>", "the daemon's home directory (as given to `typevisor daemon --home`): use its socket")
    .option("--host <host:port>", "the daemon's API over TCP (`typevisor daemon --listen`)");
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
  if (o.host !== undefined) return parseHostPort(o.host);
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
  return new TypevisorClient(resolveTarget(o, opts.env ?? process.env), opts.timeoutMs ?? 120_000);
}
