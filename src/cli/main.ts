/**
 * The `typevisor` command line. Every expected failure is a TypevisorError,
 * printed as one line `typevisor: error[CODE]: message` (plus a hint), with an
 * exit code that says what kind of failure it was (the table is in vm.ts: 2 for
 * usage/input errors); never a stack trace for anything a user can cause.
 */
import { Command, CommanderError } from "commander";
import { ApiError } from "../api/client.js";
import { isTypevisorError, type TypevisorError } from "../errors.js";
import { EXIT } from "./vm.js";

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

const COMMANDS = ["run", "image", "daemon", "vm", "host", "events"] as const;

/**
 * The program with the commands `argv` needs. Only the command being run is
 * loaded: every VMM is a `typevisor run` process, and loading the daemon's
 * modules (fastify, SQLite, prom-client) there would cost each VM start time
 * and memory (seconds under the lab's emulator). Help loads them all.
 */
export async function buildProgram(argv: string[] = process.argv): Promise<Command> {
  const first = argv.slice(2).find((a) => !a.startsWith("-"));
  const want = (c: (typeof COMMANDS)[number]): boolean => first === c || !(COMMANDS as readonly string[]).includes(first ?? "");
  const program = new Command();
  program
    .name("typevisor")
    .description("typevisor: a hypervisor in TypeScript — its own VMM on Linux KVM")
    .version(VERSION)
    .showHelpAfterError("(run with --help for usage)")
    .exitOverride();
  if (want("run")) (await import("./run.js")).registerRunCommand(program, runInLabAgain);
  if (want("image")) (await import("./image.js")).registerImageCommands(program);
  if (want("daemon")) (await import("./daemon.js")).registerDaemonCommand(program);
  if (want("vm")) (await import("./vm.js")).registerVmCommands(program);
  if (want("host")) (await import("./host.js")).registerHostCommand(program);
  if (want("events")) (await import("./events.js")).registerEventsCommand(program);
  return program;
}

/**
 * The exit code for an error (the table is in vm.ts): well-known codes first, then
 * the HTTP status of an error from the daemon, then local errors (a failing
 * syscall or KVM is a run-time failure, anything else bad input).
 */
export function exitCodeFor(e: TypevisorError): number {
  const c = e.code;
  if (c === "DAEMON_UNREACHABLE") return EXIT.UNREACHABLE;
  if (c === "VM_NOT_FOUND") return EXIT.NOT_FOUND;
  if (c === "VM_STATE" || c === "VM_EXISTS" || c === "INSUFFICIENT_RESOURCES") return EXIT.CONFLICT;
  if (c === "VM_START_FAILED" || c.startsWith("VMM")) return EXIT.FAILED;
  if (e instanceof ApiError) {
    if (e.status === 404) return EXIT.NOT_FOUND;
    if (e.status === 409) return EXIT.CONFLICT;
    if (e.status >= 500 || e.status < 400) return EXIT.FAILED;
    return EXIT.BAD_INPUT;
  }
  return c === "SYSCALL_FAILED" || c.startsWith("KVM") ? EXIT.FAILED : EXIT.BAD_INPUT;
}

export async function main(argv: string[]): Promise<number> {
  const program = await buildProgram(argv);
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
      return exitCodeFor(e);
    }
    process.stderr.write(`typevisor: internal error: ${(e as Error).message ?? String(e)}\n`);
    if (process.env.TYPEVISOR_DEBUG) process.stderr.write(`${(e as Error).stack ?? ""}\n`);
    return 70;
  }
}
