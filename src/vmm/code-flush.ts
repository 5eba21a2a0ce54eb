/**
 * V8 throws away a function's bytecode when it has not run for a few full collections
 * (`--flush-bytecode`, after `--bytecode-old-age` = 5 in Node 20's V8); its next call compiles it
 * again. That is what a VMM wants for code that ran once at start-up (density), and what a live
 * migration does not: its side warms code for the pause (the state's checks, applyState's
 * rehearsal, the device thread's state check) while memory streams in, and the stream itself
 * drives several full collections (256 MiB: five on the destination, in the lab), so the pause
 * found the warmed code flushed again (`--trace-flush-bytecode` lists it).
 *
 * The flag is the process's (every isolate's) and V8 reads it at each collection, so it can be
 * turned off while any migration runs and back on after. A VMM started with
 * `--no-flush-bytecode` (on its command line or in NODE_OPTIONS) keeps its own setting.
 */
import { setFlagsFromString } from "node:v8";

let holds = 0;
const givenOff = [...process.execArgv, ...(process.env["NODE_OPTIONS"] ?? "").split(/\s+/)].some((a) => a === "--no-flush-bytecode" || a === "--no-flush_bytecode");

/** Keep every compiled function until the returned release is called (each release once). */
export function keepCompiledCode(): () => void {
  if (holds++ === 0 && !givenOff) setFlagsFromString("--no-flush-bytecode");
  let released = false;
  return () => {
    if (released) return;
    released = true;
    if (--holds === 0 && !givenOff) setFlagsFromString("--flush-bytecode");
  };
}
