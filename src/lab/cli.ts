/**
 * `npm run lab -- <command> [args...]` (bin/lab.js): run a command inside a fresh KVM lab and exit
 * with its exit code. Lab status goes to stderr, the command's output (stdout and stderr merged,
 * as the lab has one serial console) to stdout.
 */
import { isTypevisorError } from "../errors.js";
import { runInLab } from "./lab.js";

export function parseLabArgs(args: string[]): string[] {
  // `npm run lab -- cmd` passes "cmd"; `node bin/lab.js -- cmd` passes "--" too
  return args[0] === "--" ? args.slice(1) : args;
}

export async function main(args: string[]): Promise<number> {
  const argv = parseLabArgs(args);
  const quiet = process.env["TYPEVISOR_LAB_QUIET"] === "1";
  try {
    return await runInLab(argv, {
      progress: quiet ? undefined : (m) => process.stderr.write(`typevisor-lab: ${m}\n`),
      tty: process.stdout.isTTY ? { columns: process.stdout.columns, rows: process.stdout.rows } : undefined,
    });
  } catch (e) {
    if (isTypevisorError(e)) {
      process.stderr.write(`error[${e.code}]: ${e.message}\n${e.hint !== undefined ? `hint: ${e.hint}\n` : ""}`);
      return 125;
    }
    throw e;
  }
}
