/**
 * A child process whose output is a guest's serial console (typevisor run, or
 * QEMU with -nographic), with helpers to wait for text and type commands.
 * Shared by lab tests and benchmarks.
 */
import { spawn, type ChildProcessWithoutNullStreams } from "node:child_process";

export class ConsoleProcess {
  output = "";
  readonly exited: Promise<number | null>;
  readonly child: ChildProcessWithoutNullStreams;
  readonly t0 = performance.now();
  private waiters: (() => void)[] = [];

  constructor(cmd: string, args: string[], env: NodeJS.ProcessEnv = process.env) {
    this.child = spawn(cmd, args, { stdio: ["pipe", "pipe", "pipe"], env });
    const onData = (d: Buffer): void => {
      this.output += d.toString("utf8");
      for (const w of this.waiters) w();
    };
    this.child.stdout.on("data", onData);
    this.child.stderr.on("data", onData);
    this.exited = new Promise((resolve) =>
      this.child.on("exit", (code) => {
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

  type(text: string): void {
    this.child.stdin.write(text);
  }

  kill(): void {
    if (this.child.exitCode === null) this.child.kill("SIGKILL");
  }
}
