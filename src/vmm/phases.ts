/**
 * Start-up phase marks, for finding where a restore's or a boot's time goes: with
 * TYPEVISOR_TRACE_PHASES=1 in its environment a VMM logs, once its vCPUs are released, how many
 * milliseconds after the first mark each later one came (bench/snapshot prints them). Off, a
 * mark is one comparison.
 */
const enabled = process.env["TYPEVISOR_TRACE_PHASES"] === "1";
const marks: [string, number][] = [];

export function phase(name: string): void {
  if (enabled) marks.push([name, performance.now()]);
}

/** The marks so far as one line ("name +ms, ..."), and forgotten; undefined when tracing is off or nothing was marked. */
export function takePhases(): string | undefined {
  if (!enabled || marks.length === 0) return undefined;
  const t0 = marks[0]![1];
  // The monotonic clock too: V8's CPU profiles (profile.ts, --cpu-prof) time their samples on it.
  const monotonicUs = Number(process.hrtime.bigint() / 1000n) - Math.round((performance.now() - t0) * 1000);
  const line = `from ${(performance.timeOrigin + t0).toFixed(1)} (epoch ms, monotonic ${monotonicUs} us): ${marks.map(([n, t]) => `${n} +${(t - t0).toFixed(1)}`).join(", ")}`;
  marks.length = 0;
  return line;
}

/** Whether marks are taken (a worker thread prints its own, with epoch times). */
export const tracingPhases = enabled;
