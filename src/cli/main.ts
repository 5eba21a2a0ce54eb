/**
 * The `typevisor` command line. Every expected failure is a TypevisorError,
 * printed as one line `typevisor: error[CODE]: message` (plus a hint), with an
 * exit code that says what kind of failure it was (the table is in vm.ts: 2 for
 * usage/input errors); never a stack trace for anything a user can cause.
 */
import { Command, CommanderError } from "commander";
import { isTypevisorError } from "../errors.js";
import { EXIT_INTERNAL, exitCodeFor } from "./exit-codes.js";

export { exitCodeFor };

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

const COMMANDS = ["run", "image", "daemon", "vm", "pool", "host", "events", "alerts", "alert", "user", "token", "audit", "login", "logout", "logs"] as const;

/**
 * The program with the commands `argv` needs. Only the command being run is
 * loaded: every VMM is a `typevisor run` process, and loading the daemon's
 * modules (fastify, SQLite, prom-client) there would cost each VM start time
 * and memory (seconds under the lab's emulator). Help loads them all.
 */
export async function buildProgram(argv: string[] = process.argv): Promise<Command> {
  const first = argv.slice(2).find((a) => !a.startsWith("-"));
  // `typevisor --version` needs no command: loading them all (as help does) took seconds in the lab.
  const versionOnly = first === undefined && argv.slice(2).some((a) => a === "--version" || a === "-V");
  const want = (c: (typeof COMMANDS)[number]): boolean => !versionOnly && (first === c || !(COMMANDS as readonly string[]).includes(first ?? ""));
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
  if (want("pool")) (await import("./pool.js")).registerPoolCommands(program);
  if (want("host")) (await import("./host.js")).registerHostCommand(program);
  if (want("events")) (await import("./events.js")).registerEventsCommand(program);
  if (want("alerts") || want("alert")) (await import("./alerts.js")).registerAlertCommands(program);
  if (want("user")) (await import("./security.js")).registerUserCommands(program);
  if (want("token")) (await import("./security.js")).registerTokenCommands(program);
  if (want("audit")) (await import("./security.js")).registerAuditCommands(program);
  if (want("logs")) (await import("./logs.js")).registerLogsCommand(program);
  if (want("login") || want("logout")) (await import("./security.js")).registerLoginCommands(program);
  return program;
}

export async function main(argv: string[]): Promise<number> {
  // A `run` that builds its VM here starts the VM's threads first, so their start overlaps its own.
  const early = argv[2] === "run" ? await import("./early-threads.js") : undefined;
  early?.startEarlyThreads(argv);
  try {
    return await parseAndRun(argv);
  } finally {
    // Spares no VM took (a usage error, say) must not hold the process until they have started.
    early?.endEarlyThreads();
  }
}

async function parseAndRun(argv: string[]): Promise<number> {
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
    return EXIT_INTERNAL;
  }
}
