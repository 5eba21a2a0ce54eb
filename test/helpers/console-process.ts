/**
 * A child process whose output is a guest's serial console (typevisor run, or
 * QEMU with -nographic), with helpers to wait for text and type commands.
 * Shared by lab tests and benchmarks.
 */
import { spawn, type ChildProcessWithoutNullStreams } from "node:child_process";
import { apiSocketOf, processReport, vmmThreads } from "../../src/lab/threads-report.js";

/** How long a guest may take to power off before exit() gives up on it (a lab boot is 20-50 s). */
export const EXIT_TIMEOUT_MS = 300_000;

export class ConsoleProcess {
  /** Every ConsoleProcess not yet exited: the lab stall report prints their consoles (lab-stall-report.ts). */
  static readonly live = new Set<ConsoleProcess>();
  output = "";
  readonly exited: Promise<number | null>;
  readonly child: ChildProcessWithoutNullStreams;
  readonly t0 = performance.now();
  private waiters: (() => void)[] = [];

  constructor(cmd: string, args: string[], env: NodeJS.ProcessEnv = process.env) {
    this.child = spawn(cmd, args, { stdio: ["pipe", "pipe", "pipe"], env });
    ConsoleProcess.live.add(this);
    const onData = (d: Buffer): void => {
      this.output += d.toString("utf8");
      for (const w of this.waiters) w();
    };
    this.child.stdout.on("data", onData);
    this.child.stderr.on("data", onData);
    this.exited = new Promise((resolve) =>
      this.child.on("exit", (code) => {
        ConsoleProcess.live.delete(this);
        resolve(code);
        for (const w of this.waiters) w();
      }),
    );
  }

  seconds(): number {
    return (performance.now() - this.t0) / 1000;
  }

  /** Wait until `re` matches the output after offset `from`; returns the offset just past the match. */
  waitFor(re: RegExp, from = 0, timeoutMs = 120_000): Promise<number> {
    const find = (): number | undefined => {
      const m = new RegExp(re.source, re.flags.replace("g", "")).exec(this.output.slice(from));
      return m === null ? undefined : from + m.index + m[0].length;
    };
    return new Promise((resolve, reject) => {
      let done = false;
      const check = (): void => {
        if (done) return;
        const at = find();
        if (at !== undefined) {
          done = true;
          clearTimeout(timer);
          this.waiters = this.waiters.filter((w) => w !== check);
          resolve(at);
        } else if (this.child.exitCode !== null || this.child.signalCode !== null) {
          done = true;
          clearTimeout(timer);
          reject(new Error(`process exited before ${re} appeared; output:\n${this.output.slice(-3000)}`));
        }
      };
      const timer = setTimeout(() => {
        done = true;
        this.waiters = this.waiters.filter((w) => w !== check);
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${re}; output:\n${this.output.slice(-3000)}`));
      }, timeoutMs);
      this.waiters.push(check);
      check();
    });
  }

  /**
   * The exit code, or a rejection when the process is still running after `timeoutMs`: a guest
   * that hangs fails its test in minutes instead of running into the test's own timeout with
   * nothing to show. The rejection carries the console's tail and where the process's threads
   * are (for a VMM with --api-socket, its own GET /threads: vCPUs, devices, virtqueue indices);
   * then the process is killed.
   */
  async exit(timeoutMs = EXIT_TIMEOUT_MS): Promise<number | null> {
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<"late">((resolve) => (timer = setTimeout(() => resolve("late"), timeoutMs)));
    const r = await Promise.race([this.exited, late]).finally(() => clearTimeout(timer));
    if (r !== "late") return r;
    const where = await this.whereStuck();
    this.kill();
    throw new Error(`still running after ${timeoutMs} ms (killed)\n${where}\noutput:\n${this.output.slice(-3000)}`);
  }

  /** This process's threads and, for a VMM with an API socket, its own report (lab-stall-report.ts too). */
  async whereStuck(): Promise<string> {
    const pid = this.child.pid;
    if (pid === undefined) return "not started";
    let text = processReport(pid);
    const socket = apiSocketOf(this.child.spawnargs);
    if (socket !== undefined) text += `\nGET /threads on ${socket}:\n${await vmmThreads(socket)}`;
    return text;
  }

  type(text: string): void {
    this.child.stdin.write(text);
  }

  kill(): void {
    if (this.child.exitCode === null) this.child.kill("SIGKILL");
  }
}
