/**
 * ConsoleProcess.exit, the lab tests' bound on a guest that never powers off: it must end a hung
 * process with where its threads were and its console, and leave a process that exits alone.
 */
import { describe, expect, it } from "vitest";
import { ConsoleProcess } from "../helpers/console-process.js";

describe("ConsoleProcess.exit", () => {
  it("gives the exit code of a process that ends in time", async () => {
    const p = new ConsoleProcess("sh", ["-c", "echo hello; exit 3"]);
    expect(await p.exit(10_000)).toBe(3);
    expect(p.output).toContain("hello");
    expect(ConsoleProcess.live.has(p)).toBe(false);
  });

  it("kills a process still running at the deadline and reports its threads and console", async () => {
    const p = new ConsoleProcess("sh", ["-c", "echo stuck-here; exec sleep 600"]);
    await p.waitFor(/stuck-here/, 0, 10_000);
    expect(ConsoleProcess.live.has(p)).toBe(true);
    const err = await p.exit(300).then(
      () => undefined,
      (e: unknown) => e as Error,
    );
    expect(err?.message).toMatch(/still running after 300 ms \(killed\)/);
    expect(err?.message).toContain(`pid ${p.child.pid}: sleep 600`);
    expect(err?.message).toContain("stuck-here");
    expect(await p.exited).toBeNull();
    expect(p.child.signalCode).toBe("SIGKILL");
  });
});
