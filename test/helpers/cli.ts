/**
 * The typevisor CLI as a user or a script runs it: bin/typevisor.js in a child process, stdin a
 * pipe (so not a terminal), its exit status and what it printed.
 */
import { spawn } from "node:child_process";
import { BIN } from "./daemon.js";

export interface Run {
  status: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Run `typevisor ARGS`; `input` becomes its stdin. The environment is this process's with `env`
 * on top, less TYPEVISOR_SOCKET (a test names its daemon itself) and any key `env` maps to undefined.
 */
export function runCli(args: string[], opts: { input?: string; env?: Record<string, string | undefined>; cwd?: string; stdoutEncoding?: BufferEncoding } = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const env: Record<string, string | undefined> = { ...process.env, ...opts.env };
    delete env["TYPEVISOR_SOCKET"];
    for (const [k, v] of Object.entries(env)) if (v === undefined) delete env[k];
    const child = spawn(process.execPath, [BIN, ...args], { env, stdio: ["pipe", "pipe", "pipe"], ...(opts.cwd !== undefined ? { cwd: opts.cwd } : {}) });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (b: Buffer) => (stdout += b.toString(opts.stdoutEncoding ?? "utf8")));
    child.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
    child.on("error", reject);
    child.on("close", (status) => resolve({ status, stdout, stderr }));
    child.stdin.end(opts.input ?? "");
  });
}
