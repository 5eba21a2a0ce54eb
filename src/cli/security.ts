/**
 * `typevisor user ...`, `typevisor token ...`, `typevisor audit ...`: identities and the audit log
 * over the daemon's API (docs/security.md). Exit codes as in vm.ts.
 */
import type { Command } from "commander";
import type { TokenInfo, UserInfo } from "../api/client.js";

import type { AuditEntry } from "../control/audit.js";
import { ROLES, type Role } from "../control/identity.js";
import { TypevisorError } from "../errors.js";
import { userInfo } from "node:os";
import { ApiError, TypevisorClient } from "../api/client.js";
import { connect, resolveTarget, saveSession, sessionKey, type ConnectionOptions } from "./connect.js";
import { formatTime, renderFields, renderTable, toJson } from "./format.js";
import { escapeControls } from "./terminal-safe.js";
import { clientCommand, EXIT_CODES_HELP } from "./vm.js";

function print(text: string): void {
  process.stdout.write(text);
}

function parseRole(v: string): Role {
  if (!(ROLES as readonly string[]).includes(v)) throw new TypevisorError("INVALID_ARGUMENT", `--role must be one of ${ROLES.join(", ")} (got "${v}")`);
  return v as Role;
}

/** The password on stdin (one line; a trailing newline is not part of it). */
async function passwordFromStdin(): Promise<string> {
  if (process.stdin.isTTY === true) throw new TypevisorError("INVALID_ARGUMENT", "--password-stdin reads the password from a pipe: printf '%s' \"$PW\" | typevisor user ...");
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of process.stdin) {
    size += (c as Buffer).length;
    if (size > 4096) throw new TypevisorError("INVALID_ARGUMENT", "a password on stdin is at most 4 KiB");
    chunks.push(c as Buffer);
  }
  return Buffer.concat(chunks).toString("utf8").replace(/\r?\n$/, "");
}

const collect = (v: string, prev: string[] | undefined): string[] => [...(prev ?? []), v];

export function formatUsers(users: readonly UserInfo[]): string {
  return renderTable(
    ["NAME", "ROLE", "SCOPES", "PASSWORD", "MFA", { title: "TOKENS", align: "right" }, "CREATED"],
    users.map((u) => [u.name, u.role, u.scopes?.join(",") ?? "all VMs", u.hasPassword ? "set" : "-", u.mfa ? "on" : "off", u.tokens, formatTime(u.createdAt)]),
  );
}

function tokenState(t: TokenInfo, now = Date.now()): string {
  if (t.revokedAt !== undefined) return `revoked ${formatTime(t.revokedAt)}`;
  if (Date.parse(t.expiresAt) <= now) return "expired";
  return "active";
}

export function formatTokens(tokens: readonly TokenInfo[]): string {
  return renderTable(
    ["ID", "KIND", "USER", "ROLE", "SCOPES", "EXPIRES", "LAST USED", "STATE"],
    tokens.map((t) => [t.id, t.session === true ? "session" : "api", t.user, t.role, t.scopes?.join(",") ?? "all VMs", formatTime(t.expiresAt), t.lastUsedAt !== undefined ? formatTime(t.lastUsedAt) : "never", tokenState(t)]),
  );
}

export function formatAudit(entries: readonly AuditEntry[]): string {
  return renderTable(
    ["SEQ", "TIME", "USER", "FROM", "ACTION", "TARGET", "RESULT", "DETAIL"],
    // a detail can carry a name a client chose: no control sequences to a terminal
    entries.map((e) => [e.seq, formatTime(e.at), `${e.user ?? "-"}${e.token !== undefined ? ` (token ${e.token})` : ""}`, e.peer, escapeControls(e.action), e.target !== undefined ? escapeControls(e.target) : "-", e.result, e.detail !== undefined ? escapeControls(e.detail) : ""]),
  );
}

export function registerUserCommands(program: Command): void {
  const user = program.command("user").description("users of the daemon's API: roles (viewer, operator, admin) and VM scopes").addHelpText("after", EXIT_CODES_HELP);
  clientCommand(user, "add", "add a user")
    .argument("<name>", "user name (a local account of the same name reaches the unix socket as this user)")
    .requiredOption("--role <role>", "viewer: read only; operator: VM lifecycle and consoles; admin: everything, users included")
    .option("--scope <vm:NAME>", "limit the user to this VM (repeatable)", collect)
    .option("--password-stdin", "read a password from stdin (for interactive login)")
    .option("--json", "print the user as JSON")
    .action(async (name: string, o: ConnectionOptions & { role: string; scope?: string[]; passwordStdin?: boolean; json?: boolean }) => {
      const role = parseRole(o.role);
      const password = o.passwordStdin === true ? await passwordFromStdin() : undefined;
      const u = await connect(o).addUser({ name, role, ...(o.scope !== undefined ? { scopes: o.scope } : {}), ...(password !== undefined ? { password } : {}) });
      print(o.json === true ? toJson(u) : `${u.name}: added (${u.role}${u.scopes !== undefined ? `, ${u.scopes.join(", ")}` : ""})\n`);
    });
  clientCommand(user, "ls", "list users: role, scopes, password, MFA, tokens")
    .option("--json", "print the API's JSON")
    .action(async (o: ConnectionOptions & { json?: boolean }) => {
      const users = await connect(o).listUsers();
      print(o.json === true ? toJson({ users }) : users.length === 0 ? "no users (root on the unix socket is admin; add one: typevisor user add NAME --role ROLE)\n" : formatUsers(users));
    });
  clientCommand(user, "show", "one user and its tokens")
    .argument("<name>", "user name")
    .option("--json", "print the API's JSON")
    .action(async (name: string, o: ConnectionOptions & { json?: boolean }) => {
      const u = await connect(o).getUser(name);
      if (o.json === true) return print(toJson(u));
      print(renderFields([["name", u.name], ["role", u.role], ["scopes", u.scopes?.join(", ") ?? "all VMs"], ["password", u.hasPassword ? "set" : "not set"], ["mfa", u.mfa ? "on" : "off"], ["created", formatTime(u.createdAt)]]));
      print(u.tokenList.length === 0 ? "tokens: none\n" : `tokens:\n${formatTokens(u.tokenList)}`);
    });
  clientCommand(user, "rm", "remove a user and its tokens (not the last admin)")
    .argument("<name>", "user name")
    .action(async (name: string, o: ConnectionOptions) => {
      await connect(o).removeUser(name);
      print(`${name}: removed\n`);
    });
  const mfa = user.command("mfa").description("multi-factor login (TOTP, RFC 6238): an admin's password login needs it").addHelpText("after", EXIT_CODES_HELP);
  clientCommand(mfa, "enable", "turn on TOTP for a user: prints the otpauth:// URI for an authenticator app and 10 one-time recovery codes (shown only now)")
    .argument("<name>", "user name")
    .option("--json", "print the answer as JSON (the secret included)")
    .action(async (name: string, o: ConnectionOptions & { json?: boolean }) => {
      const m = await connect(o).enableMfa(name);
      if (o.json === true) return print(toJson(m));
      process.stderr.write(`MFA on for ${m.user}. Add this to an authenticator app (or type the secret in); it and the recovery codes are shown only now:\n`);
      print(`${m.uri}\nsecret: ${m.secret}\nrecovery codes (each works once, instead of a TOTP code):\n${m.recoveryCodes.map((c) => `  ${c}\n`).join("")}`);
    });
  clientCommand(mfa, "disable", "turn off TOTP for a user (its recovery codes go too)")
    .argument("<name>", "user name")
    .action(async (name: string, o: ConnectionOptions) => {
      await connect(o).disableMfa(name);
      print(`${name}: MFA off\n`);
    });
  clientCommand(user, "passwd", "set a user's password (read from stdin)")
    .argument("<name>", "user name")
    .option("--password-stdin", "read the password from stdin (the only way: it never appears on a command line)")
    .action(async (name: string, o: ConnectionOptions) => {
      const password = await passwordFromStdin();
      await connect(o).setPassword(name, password);
      print(`${name}: password set\n`);
    });
}

/** One line from the terminal, not echoed (a password, a code). */
async function prompt(question: string, hidden: boolean): Promise<string> {
  const input = process.stdin;
  if (input.isTTY !== true) throw new TypevisorError("INVALID_ARGUMENT", `no terminal to ask for ${question.replace(/:\s*$/, "")}: use --password-stdin (and --totp CODE)`);
  process.stderr.write(question);
  input.setRawMode(hidden);
  input.resume();
  input.setEncoding("utf8");
  try {
    return await new Promise<string>((resolve, reject) => {
      let line = "";
      const onData = (chunk: string): void => {
        for (const c of chunk) {
          if (c === "\r" || c === "\n") {
            input.off("data", onData);
            process.stderr.write("\n");
            return resolve(line);
          }
          if (c === "\u0003") {
            input.off("data", onData);
            process.stderr.write("\n");
            return reject(new TypevisorError("INVALID_ARGUMENT", "interrupted"));
          }
          if (c === "\u007f" || c === "\b") line = line.slice(0, -1);
          else if (line.length < 4096) line += c;
        }
      };
      input.on("data", onData);
    });
  } finally {
    if (hidden) input.setRawMode(false);
    input.pause();
  }
}

function hostOnly(o: ConnectionOptions, what: string): string {
  const key = sessionKey(o);
  if (key === undefined) throw new TypevisorError("INVALID_ARGUMENT", `${what} is for a daemon over HTTPS: give --host HOST:PORT (on the unix socket the daemon knows you by your uid)`);
  return key;
}

export function registerLoginCommands(program: Command): void {
  clientCommand(program, "login", "log in to a daemon over HTTPS with a password (and a TOTP code): saves a 12 h session for that host")
    .option("--user <name>", "the typevisor user (default: your login name)")
    .option("--password-stdin", "read the password from stdin (else it is asked on the terminal)")
    .option("--totp <code>", "the authenticator's current 6-digit code (asked on the terminal when needed)")
    .option("--recovery-code <code>", "a recovery code instead of --totp (each works once)")
    .addHelpText("after", "\nThe session is saved (mode 0600) in $XDG_CONFIG_HOME/typevisor/sessions.json (else ~/.config/...), for that --host\nonly; later commands with the same --host use it unless --token-file or $TYPEVISOR_TOKEN is given.\nAn admin's password login needs MFA: typevisor user mfa enable NAME (as root on the unix socket).\n")
    .action(async (o: ConnectionOptions & { user?: string; passwordStdin?: boolean; totp?: string; recoveryCode?: string }) => {
      const key = hostOnly(o, "login");
      const user = o.user ?? userInfo().username;
      const password = o.passwordStdin === true ? await passwordFromStdin() : await prompt(`password for ${user}: `, true);
      // no token: a login is what gets one
      const client = new TypevisorClient(resolveTarget(o), { timeoutMs: 120_000 });
      const ask = { user, password, ...(o.totp !== undefined ? { totp: o.totp } : {}), ...(o.recoveryCode !== undefined ? { recoveryCode: o.recoveryCode } : {}) };
      let s;
      try {
        s = await client.login(ask);
      } catch (e) {
        // the password was right and a code is wanted: ask for it, when there is a terminal to ask on
        if (!(e instanceof ApiError && e.status === 401 && /MFA on/.test(e.message) && o.totp === undefined && o.recoveryCode === undefined && process.stdin.isTTY === true)) throw e;
        s = await client.login({ ...ask, totp: (await prompt("TOTP code: ", false)).trim() });
      }
      const file = saveSession(key, { token: s.token, user: s.user, expiresAt: s.expiresAt });
      print(`logged in to ${key} as ${s.user} (${s.role}) until ${formatTime(s.expiresAt)}; session saved in ${file}\n`);
    });
  clientCommand(program, "logout", "end the session saved for --host (revoked on the daemon, removed here)")
    .action(async (o: ConnectionOptions) => {
      const key = hostOnly(o, "logout");
      try {
        await connect(o).logout();
      } finally {
        saveSession(key, undefined);
      }
      print(`logged out of ${key}\n`);
    });
}

export function registerTokenCommands(program: Command): void {
  const token = program.command("token").description("API tokens (Authorization: Bearer): shown once, stored as hashes, revocable").addHelpText("after", EXIT_CODES_HELP);
  clientCommand(token, "create", "create a token for a user; prints it once (keep it: only its hash is stored)")
    .requiredOption("--user <name>", "whose token (without users:admin: your own)")
    .option("--expires <duration>", "lifetime: 90m, 12h, 30d, 8w", "30d")
    .option("--scope <vm:NAME>", "limit the token to this VM (repeatable; within the user's)", collect)
    .option("--role <role>", "at most the user's role (default: the user's)")
    .option("--json", "print the answer as JSON (the token included)")
    .action(async (o: ConnectionOptions & { user: string; expires: string; scope?: string[]; role?: string; json?: boolean }) => {
      const t = await connect(o).createToken({ user: o.user, expires: o.expires, ...(o.scope !== undefined ? { scopes: o.scope } : {}), ...(o.role !== undefined ? { role: parseRole(o.role) } : {}) });
      if (o.json === true) return print(toJson(t));
      process.stderr.write(`token ${t.id} for ${t.user} (${t.role}${t.scopes !== undefined ? `, ${t.scopes.join(", ")}` : ""}), expires ${formatTime(t.expiresAt)}; it is shown only now:\n`);
      print(`${t.token}\n`);
    });
  clientCommand(token, "ls", "list tokens (without users:admin: your own)")
    .option("--user <name>", "only this user's")
    .option("--json", "print the API's JSON")
    .action(async (o: ConnectionOptions & { user?: string; json?: boolean }) => {
      const tokens = await connect(o).listTokens(o.user !== undefined ? { user: o.user } : {});
      print(o.json === true ? toJson({ tokens }) : tokens.length === 0 ? "no tokens\n" : formatTokens(tokens));
    });
  clientCommand(token, "revoke", "revoke a token: refused from now on")
    .argument("<id>", "the token's id (token ls)")
    .action(async (id: string, o: ConnectionOptions) => {
      await connect(o).revokeToken(id);
      print(`${id}: revoked\n`);
    });
}

export function registerAuditCommands(program: Command): void {
  const audit = program.command("audit").description("the audit log: every change, console attach, refusal and failed authentication; hash-chained").addHelpText("after", EXIT_CODES_HELP);
  clientCommand(audit, "ls", "audit entries, oldest first")
    .option("--since <time>", "from this time on (ISO 8601, e.g. 2026-12-01 or 2026-12-01T10:00:00Z)")
    .option("--user <name>", "only this user's")
    .option("--vm <name>", "only those acting on this VM")
    .option("--limit <n>", "the latest N (default 1000)")
    .option("--json", "one JSON object per line (NDJSON), for a log platform")
    .action(async (o: ConnectionOptions & { since?: string; user?: string; vm?: string; limit?: string; json?: boolean }) => {
      const entries = await connect(o).audit({ ...(o.since !== undefined ? { since: o.since } : {}), ...(o.user !== undefined ? { user: o.user } : {}), ...(o.vm !== undefined ? { vm: o.vm } : {}), ...(o.limit !== undefined ? { limit: Number(o.limit) } : {}) });
      print(o.json === true ? entries.map((e) => `${JSON.stringify(e)}\n`).join("") : entries.length === 0 ? "no entries\n" : formatAudit(entries));
    });
  clientCommand(audit, "verify", "check the hash chain: names the first entry edited, removed or out of order (exit 1 then)")
    .option("--json", "print the API's JSON")
    .action(async (o: ConnectionOptions & { json?: boolean }) => {
      const r = await connect(o).verifyAudit();
      if (o.json === true) print(toJson(r));
      else print(r.ok ? `audit log intact: ${r.entries} entries\n` : `audit log BROKEN at entry ${r.problem?.seq ?? "?"}: ${r.problem?.reason ?? "?"}\n`);
      if (!r.ok) process.exitCode = 1;
    });
}
