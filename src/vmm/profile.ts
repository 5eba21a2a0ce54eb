/**
 * A diagnostic: with TYPEVISOR_PROFILE_DIR=DIR in its environment, the thread that calls these
 * (a migration's main threads, the destination's device thread) records V8's CPU profile between
 * two points of a switch-over and writes it to DIR/NAME-PID-THREADID.cpuprofile (Chrome DevTools'
 * format). Only those threads are sampled: node's --cpu-prof samples every worker too, and its
 * signals interrupt the vCPU's KVM_RUN so often that a guest under the lab's nested KVM barely
 * boots. Off, each call is one comparison.
 */
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Session } from "node:inspector";
import { threadId } from "node:worker_threads";

const dir = process.env["TYPEVISOR_PROFILE_DIR"];
// Loaded ahead (never when off): a start must be synchronous, before the step it measures runs.
let inspector: typeof import("node:inspector") | undefined;
if (dir !== undefined) void import("node:inspector").then((m) => (inspector = m));
let session: Session | undefined;

/** Start sampling (once; later calls until the stop are ignored). The in-thread session answers synchronously. */
export function startProfile(): void {
  if (inspector === undefined || session !== undefined) return;
  const s = new inspector.Session();
  s.connect();
  s.post("Profiler.enable");
  s.post("Profiler.setSamplingInterval", { interval: 250 });
  s.post("Profiler.start");
  session = s;
}

/** Stop sampling and write the profile as DIR/NAME-PID-THREADID.cpuprofile. */
export function stopProfile(name: string): void {
  const s = session;
  if (dir === undefined || s === undefined) return;
  session = undefined;
  s.post("Profiler.stop", (err, r) => {
    if (err === null) writeFileSync(join(dir, `${name}-${process.pid}-${threadId}.cpuprofile`), JSON.stringify(r.profile));
    s.disconnect();
  });
}
