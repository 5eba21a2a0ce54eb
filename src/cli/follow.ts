/**
 * The tail of every `-f` command (`events -f`, `logs -f`): print what a followed stream yields until
 * Ctrl-C, a reader that went away, or the daemon closing the stream.
 */
import { TypevisorError } from "../errors.js";

/** Prints each item through `print` (told whether it is the first); never returns normally. */
export async function printFollowed<T>(stream: AsyncIterable<T>, print: (item: T, first: boolean) => string, what: string): Promise<never> {
  // A pending `next()` cannot be cancelled from outside the generator, so Ctrl-C (or a reader that
  // went away) ends the process here: nothing is left to flush, stdout to a pipe or a terminal is
  // synchronous on Linux.
  const end = (): never => process.exit(0);
  process.once("SIGINT", end);
  process.once("SIGTERM", end);
  process.stdout.on("error", (e: NodeJS.ErrnoException) => {
    if (e.code === "EPIPE") end();
  });
  try {
    let first = true;
    for await (const item of stream) {
      process.stdout.write(print(item, first));
      first = false;
    }
  } catch (e) {
    if (e instanceof TypevisorError) throw e; // refused up front (a bad --vm, no daemon)
    // "aborted": the connection dropped mid-stream.
  }
  // The stream only ends from the daemon's side: it stopped, so a follower (a script) should know.
  throw new TypevisorError("DAEMON_UNREACHABLE", `the daemon closed the ${what} (it stopped?)`);
}
