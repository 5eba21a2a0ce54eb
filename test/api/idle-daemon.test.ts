/**
 * An idle daemon lets its main thread sleep: no timer of its own or of a library wakes it a
 * hundred times a second (prom-client's event-loop delay monitor did, at its default 10 ms).
 */
import { afterAll, describe, expect, it } from "vitest";
import { startDaemon, type TestDaemon } from "../helpers/daemon.js";
import { contextSwitches as switches } from "../helpers/thread-wakeups.js";

let d: TestDaemon | undefined;
afterAll(async () => {
  await d?.stop();
});

describe("an idle daemon", () => {
  it("wakes its main thread a few times a second at most, and still reports its event loop's delay", async () => {
    d = await startDaemon({ args: ["--force-kvm"] });
    const pid = d.proc.pid!;
    await new Promise((r) => setTimeout(r, 3000));
    const a = switches(pid);
    await new Promise((r) => setTimeout(r, 4000));
    // A 10 ms timer made ~400 here; the usage sampler (every 5 s) and the delay monitor (every
    // second) leave a handful.
    expect(switches(pid) - a).toBeLessThanOrEqual(40);
    const m = await d.client.metrics();
    expect(m).toMatch(/typevisor_daemon_nodejs_eventloop_lag_max_seconds \d/);
  }, 60_000);
});
