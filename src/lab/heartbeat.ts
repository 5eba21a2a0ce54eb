import { createConnection, type Socket } from "node:net";

/**
 * The lab's interrupt heartbeat: every `periodMs`, one line ("tick") to the lab agent's serial
 * port (the agent ignores anything but "dump"). Each byte the lab's UART receives is an
 * interrupt, and any interrupt ends the stall QEMU 7.2's TCG can fall into: the lab CPU with its
 * local APIC timer interrupt pending in IRR, deliverable, and never taken, so the lab kernel
 * waits for a tick that never comes (docs/lab.md, "The stall"). A stuck timer then costs the lab
 * at most one period instead of the run. One short connection per tick: QEMU's socket chardev
 * takes one client, and the watchdog's diagnosis needs it (`paused` is true meanwhile).
 */
export function startHeartbeat(agentSocket: string, periodMs: number, paused: () => boolean): () => void {
  let current: Socket | undefined;
  const timer = setInterval(() => {
    if (paused() || current !== undefined) return;
    const s = createConnection(agentSocket);
    current = s;
    const done = (): void => {
      s.destroy();
      if (current === s) current = undefined;
    };
    s.setTimeout(periodMs * 2, done);
    s.on("connect", () => s.end("tick\n"));
    s.on("error", done);
    s.on("close", done);
  }, periodMs);
  timer.unref();
  return () => {
    clearInterval(timer);
    current?.destroy();
    current = undefined;
  };
}
