/**
 * A `typevisor run --force-kvm` VMM started by a test, with its API socket, console socket,
 * console log and exit file in a directory of its own under `parent`.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { join } from "node:path";

const BIN = new URL("../../bin/typevisor.js", import.meta.url).pathname;

export interface Vmm {
  child: ChildProcess;
  exited: Promise<number | null>;
  stderr: () => string;
  api: string;
  sock: string;
  log: string;
  /** Its exit record (`--exit-file`): `result` says how it ended. */
  exit: string;
}

export function startVmm(parent: string, name: string, args: string[]): Vmm {
  const d = mkdtempSync(join(parent, `${name}-`));
  const api = join(d, "api.sock");
  const sock = join(d, "c.sock");
  const log = join(d, "c.log");
  const exit = join(d, "exit.json");
  const child = spawn(process.execPath, [BIN, "run", "--force-kvm", "--no-lab", "--api-socket", api, "--console-socket", sock, "--console-log", log, "--exit-file", exit, ...args], { stdio: ["ignore", "pipe", "pipe"] });
  let err = "";
  child.stderr!.on("data", (b: Buffer) => (err += b.toString()));
  const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
  return { child, exited, stderr: () => err, api, sock, log, exit };
}

export async function killVmm(v: Vmm): Promise<void> {
  v.child.kill("SIGKILL");
  await v.exited;
}
