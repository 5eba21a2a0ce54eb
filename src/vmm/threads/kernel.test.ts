import { readdirSync, readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { threadNice } from "../../sys/libc.js";
import { mayLowerNice, niceHelperThreads } from "./kernel.js";

/** Every thread of this process: tid, name and nice value. */
function threads(): { tid: number; comm: string; nice: number }[] {
  const out: { tid: number; comm: string; nice: number }[] = [];
  for (const t of readdirSync("/proc/self/task")) {
    try {
      out.push({ tid: Number(t), comm: readFileSync(`/proc/self/task/${t}/comm`, "utf8").trim(), nice: threadNice(Number(t)) });
    } catch {
      // ended meanwhile
    }
  }
  return out;
}

describe("niceHelperThreads", () => {
  it("sets V8's helper threads aside and puts each back, leaving the main thread and named threads alone", () => {
    const before = threads();
    const undo = niceHelperThreads(19);
    if (!mayLowerNice()) {
      // Without CAP_SYS_NICE nothing could be put back: nothing is changed.
      expect(undo).toBeUndefined();
      expect(threads().map((t) => [t.tid, t.nice])).toEqual(before.map((t) => [t.tid, t.nice]));
      return;
    }
    expect(undo).toBeDefined();
    const during = threads();
    const helpers = during.filter((t) => t.comm === "node" && t.tid !== process.pid);
    // Node always has V8's platform workers: there is something to set aside.
    expect(helpers.length).toBeGreaterThan(0);
    for (const t of helpers) expect(t.nice).toBe(19);
    const was = new Map(before.map((t) => [t.tid, t.nice]));
    for (const t of during.filter((x) => x.tid === process.pid || x.comm !== "node")) expect(t.nice).toBe(was.get(t.tid));
    undo!();
    for (const t of threads()) if (was.has(t.tid)) expect(t.nice).toBe(was.get(t.tid));
    // Twice is harmless.
    undo!();
  });
});
