import { execFileSync } from "node:child_process";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { threadNice } from "../../sys/libc.js";
import { mayLowerNice, niceHelperThreads } from "./kernel.js";
import { CAN_GRANT_NICE } from "../../../test/helpers/privileges.js";

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
    if (!mayLowerNice(Math.min(...before.filter((t) => t.comm === "node" && t.tid !== process.pid).map((t) => t.nice)))) {
      // Without CAP_SYS_NICE or RLIMIT_NICE nothing could be put back: nothing is changed.
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

describe("niceHelperThreads without CAP_SYS_NICE (a jailed VMM)", () => {
  const kernelJs = new URL("../../../dist/vmm/threads/kernel.js", import.meta.url).pathname;
  // An unprivileged process (nobody, no capabilities) runs the built module, as the daemon's VMMs do.
  const asNobody = (prlimit: string[]): { changed: boolean; during: number[]; after: number[] } => {
    const script = `import { niceHelperThreads } from ${JSON.stringify(kernelJs)};
import { readdirSync, readFileSync } from "node:fs";
const nices = () => readdirSync("/proc/self/task").filter((t) => t !== String(process.pid) && readFileSync("/proc/self/task/" + t + "/comm", "utf8").trim() === "node").map((t) => Number(readFileSync("/proc/self/task/" + t + "/stat", "utf8").split(") ")[1].split(" ")[16]));
const undo = niceHelperThreads(19);
const during = nices();
undo?.();
console.log(JSON.stringify({ changed: undo !== undefined, during, after: nices() }));`;
    const setpriv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", process.execPath, "--input-type=module", "-e", script];
    const [cmd, ...args] = prlimit.length > 0 ? ["prlimit", ...prlimit, ...setpriv] : setpriv;
    return JSON.parse(execFileSync(cmd!, args, { encoding: "utf8", timeout: 30_000 })) as { changed: boolean; during: number[]; after: number[] };
  };
  const root = process.getuid?.() === 0 && existsSync(kernelJs);
  // Raising RLIMIT_NICE's hard limit needs CAP_SYS_RESOURCE, which not every root has (a container's).
  const canGrantNice = root && CAN_GRANT_NICE;

  it.skipIf(!root)("leaves them alone where nothing could put them back (no CAP_SYS_NICE, RLIMIT_NICE 0)", () => {
    const r = asNobody(["--nice=0:0"]);
    expect(r.changed).toBe(false);
    expect(r.during.length).toBeGreaterThan(0);
    expect(r.during.every((n) => n === 0)).toBe(true);
  });

  it.skipIf(!canGrantNice)("sets them aside and back where RLIMIT_NICE lets it undo that", () => {
    const r = asNobody(["--nice=20:20"]);
    expect(r.changed).toBe(true);
    expect(r.during.every((n) => n === 19)).toBe(true);
    expect(r.after.every((n) => n === 0)).toBe(true);
  });
});

describe("niceEveryThread", () => {
  const kernelJs = new URL("../../../dist/vmm/threads/kernel.js", import.meta.url).pathname;
  const libcJs = new URL("../../../dist/sys/libc.js", import.meta.url).pathname;
  // In a process of its own: nobody may take the nice value back without CAP_SYS_NICE.
  it.skipIf(!existsSync(kernelJs))("sets every thread of the process but the one it is told to leave (a migration's source reports before its own teardown goes last)", () => {
    const script = `import { niceEveryThread } from ${JSON.stringify(kernelJs)};
import { gettid, threadNice } from ${JSON.stringify(libcJs)};
import { Worker } from "node:worker_threads";
import { readdirSync } from "node:fs";
const w = new Worker("setInterval(() => {}, 1000)", { eval: true });
await new Promise((r) => w.once("online", r));
const me = gettid();
const was = threadNice(me);
const n = niceEveryThread(19, me);
const others = readdirSync("/proc/self/task").map(Number).filter((t) => t !== me).map((t) => threadNice(t));
console.log(JSON.stringify({ n, was, me: threadNice(me), others }));
process.exit(0);`;
    const r = JSON.parse(execFileSync(process.execPath, ["--input-type=module", "-e", script], { encoding: "utf8", timeout: 30_000 })) as { n: number; was: number; me: number; others: number[] };
    expect(r.me).toBe(r.was);
    expect(r.was).toBeLessThan(19);
    // V8's platform workers and the worker's thread at least.
    expect(r.others.length).toBeGreaterThan(2);
    expect(r.others.every((v) => v === 19)).toBe(true);
    expect(r.n).toBe(r.others.length);
  });
});
