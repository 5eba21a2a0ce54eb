/**
 * The `typevisor` command line. Every expected failure is a TypevisorError,
 * printed as one line `typevisor: error[CODE]: message` (plus a hint), exit 2
 * for usage/input errors; never a stack trace for anything a user can cause.
 */
import { Command, CommanderError } from "commander";
import { isTypevisorError } from "../errors.js";
import { registerImageCommands } from "./image.js";
import { registerRunCommand } from "./run.js";

const VERSION = "0.1.0";

/** Re-run this very command inside the KVM lab (hosts whose KVM cannot boot stock kernels). */
async function runInLabAgain(): Promise<number> {
  const { runInLab } = await import("../lab/lab.js");
  process.stderr.write(
    "typevisor: running inside the KVM lab (a real KVM host under QEMU's emulator): everything is emulated, so it is slow. " +
      "Press Ctrl-A x to quit.\n",
  );
  const out = process.stdout;
  const tty = out.isTTY === true ? { columns: out.columns, rows: out.rows } : undefined;
  return runInLab([process.execPath, process.argv[1] ?? "typevisor", ...process.argv.slice(2), "--no-lab"], tty !== undefined ? { tty } : {});
}

export function buildProgram(): Command {
  const program = new Command();
  program
    .name("typevisor")
    .description("typevisor: a hypervisor in TypeScript — its own VMM on Linux KVM")
    .version(VERSION)
    .showHelpAfterError("(run with --help for usage)")
    .exitOverride();
  registerRunCommand(program, runInLabAgain);
  registerImageCommands(program);
  return program;
}

export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return typeof process.exitCode === "number" ? process.exitCode : 0;
  } catch (e) {
    if (e instanceof CommanderError) {
      return e.exitCode === 0 ? 0 : 2;
    }
    if (isTypevisorError(e)) {
      process.stderr.write(`typevisor: error[${e.code}]: ${e.message}\n`);
      if (e.hint !== undefined) process.stderr.write(`  hint: ${e.hint}\n`);
      return e.code === "SYSCALL_FAILED" || e.code.startsWith("KVM") ? 1 : 2;
    }
    process.stderr.write(`typevisor: internal error: ${(e as Error).message ?? String(e)}\n`);
    if (process.env.TYPEVISOR_DEBUG) process.stderr.write(`${(e as Error).stack ?? ""}\n`);
    return 70;
  }
}
