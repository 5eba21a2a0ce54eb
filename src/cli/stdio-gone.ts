/**
 * The daemon's stdout and stderr, which may lose their reader while it runs (`typevisor daemon |
 * head`, a log collector that died). A write to a pipe without a reader fails with EPIPE (Node
 * ignores SIGPIPE) and the stream emits "error"; unhandled, that is an uncaught exception, which
 * the last-resort handler logs, to stdout among others: a fault per log line, each making the
 * next (the daemon spun, answered nothing and ignored SIGTERM). Once a stream fails it is dropped:
 * the log file and the other destinations go on.
 */

/** A log destination (pino multistream) writing to stdout until stdout fails, then nowhere. */
export function stdoutWhileItLasts(): { write(line: string): void } {
  let gone = false;
  const forget = (): void => {
    gone = true;
  };
  process.stdout.on("error", forget);
  // stderr gets Node's own warnings and the last-resort handler's fallback: its failure is dropped too.
  process.stderr.on("error", () => undefined);
  return {
    write(line: string): void {
      if (!gone) process.stdout.write(line);
    },
  };
}
