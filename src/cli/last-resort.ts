/**
 * The daemon's last line of defence: an exception that escaped every handler
 * (an `error` event nobody listens to on some socket, a throw in a timer
 * callback, a rejected promise nobody awaited) is logged and reported, and the
 * daemon keeps serving. Node's default is to exit, which would leave every
 * running VM unmanaged: the VMMs are separate processes and the inventory is
 * SQLite with each change in one transaction, so the daemon's durable state is
 * consistent at every await point and surviving is the lesser harm.
 *
 * It is a backstop, not error handling: every fault it catches is a bug, and
 * each one is logged at `error` with its stack and counted (`faults()`), so it
 * is seen rather than hidden.
 */
import type { Logger } from "pino";

export interface LastResort {
  /** Faults caught since install. */
  faults(): number;
  uninstall(): void;
}

/**
 * Install the handlers. `report` is called after logging (the daemon turns it into
 * a `daemon.fault` event); a report that itself throws is only logged.
 */
export function installLastResort(logger: Logger, report?: (kind: string, message: string) => void): LastResort {
  let count = 0;
  const caught = (kind: string, err: unknown): void => {
    count++;
    const message = err instanceof Error ? err.message : String(err);
    try {
      logger.error({ err, kind }, `last-resort handler caught an ${kind} (a bug; the daemon keeps serving)`);
      report?.(kind, message);
    } catch (e) {
      // Nothing may throw from here: that would be fatal, which is what this is for.
      process.stderr.write(`typevisor: last-resort handler failed to report an ${kind}: ${String(e)}\n`);
    }
  };
  const onException = (err: Error): void => caught("uncaught exception", err);
  const onRejection = (reason: unknown): void => caught("unhandled rejection", reason);
  process.on("uncaughtException", onException);
  process.on("unhandledRejection", onRejection);
  return {
    faults: () => count,
    uninstall: () => {
      process.off("uncaughtException", onException);
      process.off("unhandledRejection", onRejection);
    },
  };
}
