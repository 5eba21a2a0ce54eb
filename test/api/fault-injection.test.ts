/**
 * Fault injection against a real daemon and real VMMs (issue: "kill -9 the daemon at random
 * moments during create, start, stop, rm, N times, and after each restart the inventory matches
 * the processes and files on the host exactly: no orphan, no lost VM, no leaked budget").
 *
 * One home for the whole run. Each round sends a random concurrent mix of operations on a few VM
 * names, SIGKILLs the daemon at a random moment (at once, on a timer, or while a create is under
 * way), starts it again on the same home and checks the host against its inventory
 * (test/helpers/host-state.ts). Random but replayable: the seed is in the test's name, and
 * TYPEVISOR_FAULT_SEED=<seed> runs the same script again (the timing of the host it runs on still
 * decides where each kill lands). TYPEVISOR_FAULT_ROUNDS changes the number of rounds.
 */
import { execFileSync } from "node:child_process";
import { randomInt } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { prng } from "../helpers/prng.js";
import { ApiError, type TypevisorClient } from "../../src/api/client.js";
import { basesDir } from "../../src/control/bases.js";
import { homePaths } from "../../src/control/paths.js";
import type { VmInfo, VmSpecInput } from "../../src/control/spec.js";
import { VmmClient } from "../../src/engine/vmm-client.js";
import { TypevisorError } from "../../src/errors.js";
import { startDaemon, until, type TestDaemon } from "../helpers/daemon.js";
import { settledDiscrepancies, vmCgroupDir, vmmProcesses } from "../helpers/host-state.js";
import { writeTinyKernel } from "../helpers/tiny-kernel.js";

const hasKvm = existsSync("/dev/kvm");
const built = existsSync(new URL("../../dist/cli/main.js", import.meta.url));
if (hasKvm && !built) throw new Error("run `npm run build` first: the daemon and VMM run from dist/");

const SEED = (process.env["TYPEVISOR_FAULT_SEED"] ?? "") !== "" ? Number(process.env["TYPEVISOR_FAULT_SEED"]) : randomInt(2 ** 31);
if (!Number.isSafeInteger(SEED)) throw new Error(`TYPEVISOR_FAULT_SEED must be an integer, not ${process.env["TYPEVISOR_FAULT_SEED"]}`);
/** About 4 s a round on an idle 2-CPU host: a daemon start, up to 1.5 s of operations, a check. */
const ROUNDS = Number(process.env["TYPEVISOR_FAULT_ROUNDS"] ?? 12);
/** TYPEVISOR_FAULT_VERBOSE=1: each round's script, outcomes and settling time on stdout. */
const VERBOSE = process.env["TYPEVISOR_FAULT_VERBOSE"] === "1";
const NAMES = ["fi-a", "fi-b", "fi-c", "fi-d", "fi-e"];

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface Op {
  /** ms after the round began */
  at: number;
  what: string;
  run: (c: TypevisorClient) => Promise<unknown>;
}

/** What each VMM process of `home` is doing: for a failure message. */
async function vmmReport(home: string, ids: ReadonlySet<string>): Promise<string> {
  const lines: string[] = [];
  for (const p of vmmProcesses(home, ids)) {
    const read = (f: string): string => {
      try {
        return readFileSync(`/proc/${p.pid}/${f}`, "utf8").trim();
      } catch (e) {
        return `(${(e as Error).message})`;
      }
    };
    let said: string;
    try {
      said = JSON.stringify(await new VmmClient(join(homePaths(home).run, `${p.id ?? "?"}.api`), 3000).info());
    } catch (e) {
      said = `no answer: ${(e as Error).message}`;
    }
    const state = /^State:.*$/m.exec(read("status"))?.[0] ?? "?";
    let log: string;
    try {
      log = readFileSync(join(homePaths(home).vms, p.id ?? "?", "vmm.log"), "utf8");
    } catch (e) {
      log = `(${(e as Error).message})`;
    }
    lines.push(`VMM ${p.pid} (${p.id ?? "?"}): ${state}, wchan ${read("wchan")}, GET /vm: ${said}; vmm.log: ${log.slice(-500)}`);
  }
  return lines.join("\n");
}

// In the suite again since 2026-12-04: seed 486385414, which failed once in a full unit run on
// 2026-12-02 (its discrepancy was not kept), passed 4 times replayed, and 4 random seeds passed,
// one of them inside a full unit run beside three labs (load 7 on 2 CPUs). A failure prints its
// seed and script: replay with TYPEVISOR_FAULT_SEED. TYPEVISOR_FAULT=0 leaves it out.
describe.skipIf(!hasKvm || process.env["TYPEVISOR_FAULT"] === "0")("a daemon killed with SIGKILL at random moments", () => {
  const dir = mkdtempSync(join(tmpdir(), "tvf-"));
  const kernel = join(dir, "tiny.bin");
  const imagesHome = join(dir, "data");
  const home = mkdtempSync(join(tmpdir(), "tvf-home-"));
  const args = ["--force-kvm", "--allow-files", dir, "--stop-timeout", "10"];
  const env = { TYPEVISOR_HOME: imagesHome };
  /** Every VM id this home has had, from the inventory and from vms/: their processes and cgroups are looked for to the end. */
  const knownIds = new Set<string>();
  let d: TestDaemon | undefined;

  afterAll(async () => {
    // Whatever happened, no VMM of this run outlives it.
    for (const p of vmmProcesses(home, knownIds)) {
      try {
        process.kill(p.pid, "SIGKILL");
      } catch {
        /* gone */
      }
    }
    await d?.stop("SIGKILL");
    // startDaemon gives up on a daemon that does not answer in time but leaves it running
    for (const pid of readdirSync("/proc").filter((p) => /^\d+$/.test(p))) {
      try {
        if (readFileSync(`/proc/${pid}/cmdline`, "utf8").includes(`\0daemon\0--home\0${home}\0`)) process.kill(Number(pid), "SIGKILL");
      } catch {
        /* gone */
      }
    }
  }, 30_000);

  it(`leaves the inventory matching the host after every kill (seed ${SEED}, ${ROUNDS} rounds)`, async () => {
    writeTinyKernel(kernel);
    // An image with a real ext4 root, so creates make bases (bases.ts) and grow filesystems.
    mkdirSync(join(imagesHome, "images", "small"), { recursive: true });
    writeTinyKernel(join(imagesHome, "images", "small", "vmlinuz"));
    execFileSync("mkfs.ext4", ["-q", "-F", join(imagesHome, "images", "small", "rootfs.ext4"), "8M"], { timeout: 60_000 });

    const rnd = prng(SEED);
    const below = (n: number): number => Math.floor(rnd() * n);
    const pick = <T>(xs: readonly T[]): T => xs[below(xs.length)]!;
    const spec = (name: string): VmSpecInput => {
      const base = { name, memoryMiB: 64, rng: false };
      // as many draws whatever the spec, so one seed's draws stay aligned with the same ops
      const [kind, format, sized] = [below(5), pick(["qcow2", "raw"] as const), rnd() < 0.5];
      switch (kind) {
        case 0:
          return { ...base, kernel };
        case 1:
          return { ...base, kernel, diskSize: "4M", diskFormat: format };
        case 2:
          return { ...base, image: "small" }; // a linked clone on the image-sized base
        case 3:
          return { ...base, image: "small", diskSize: "16M" }; // on a grown base: e2fsck and resize2fs
        default:
          return { ...base, image: "small", diskFormat: "raw", ...(sized ? { diskSize: "12M" } : {}) };
      }
    };
    type Kind = "create" | "create-start" | "start" | "stop" | "stop-force" | "pause" | "resume" | "rm" | "rm-force";
    // What a name's VM will be if the ops so far succeed: most ops are ones that state allows,
    // so a round goes through whole lifecycles (create, start, pause, stop, rm) and the kill lands
    // inside them; one in five is any op at all, a refusal the daemon must give cleanly.
    type Expect = "absent" | "defined" | "running" | "paused" | "stopped";
    const fits: Record<Expect, readonly Kind[]> = {
      absent: ["create", "create-start", "create-start"],
      defined: ["start", "start", "rm", "rm-force"],
      stopped: ["start", "rm", "rm-force"],
      running: ["stop", "stop-force", "pause", "rm-force"],
      paused: ["resume", "stop", "stop-force", "rm-force"],
    };
    const after: Record<Kind, Expect> = { create: "defined", "create-start": "running", start: "running", stop: "stopped", "stop-force": "stopped", pause: "paused", resume: "running", rm: "absent", "rm-force": "absent" };
    const ALL = Object.keys(after) as Kind[];
    const randomOp = (at: number, expected: Map<string, Expect>): Op => {
      const name = pick(NAMES);
      const now = expected.get(name) ?? "absent";
      const [any, anyKind, fitting] = [rnd() < 0.2, pick(ALL), pick(fits[now])];
      const kind = any ? anyKind : fitting;
      if (fits[now].includes(kind)) expected.set(name, after[kind]);
      const s = spec(name);
      const runs: Record<Kind, (c: TypevisorClient) => Promise<unknown>> = {
        create: (c) => c.createVm(s),
        "create-start": (c) => c.createVm(s, { start: true }),
        start: (c) => c.startVm(name),
        stop: (c) => c.stopVm(name),
        "stop-force": (c) => c.stopVm(name, { force: true }),
        pause: (c) => c.pauseVm(name),
        resume: (c) => c.resumeVm(name),
        rm: (c) => c.removeVm(name),
        "rm-force": (c) => c.removeVm(name, { force: true }),
      };
      return { at, what: `${kind} ${name}${kind.startsWith("create") ? ` ${JSON.stringify({ ...s, name: undefined, kernel: s.kernel !== undefined ? "tiny" : undefined })}` : ""}`, run: runs[kind] };
    };
    const expectedOf = (vms: VmInfo[]): Map<string, Expect> =>
      new Map(vms.map((v) => [v.name, v.state === "running" || v.state === "paused" || v.state === "defined" || v.state === "stopped" ? v.state : v.state === "crashed" ? "stopped" : "running"]));

    const t0 = performance.now();
    d = await startDaemon({ home, args, env });
    for (let round = 0; round < ROUNDS; round++) {
      const expected = expectedOf(await d.client.listVms());
      const ops = Array.from({ length: 4 + below(7) }, () => below(1500))
        .sort((a, b) => a - b)
        .map((at) => randomOp(at, expected));
      // Where the kill lands: before anything reached the daemon, on a timer, or while a create works.
      const mode = pick(["at-once", "timer", "timer", "mid-create", "mid-create"] as const);
      const create = ops.find((o) => o.what.startsWith("create"));
      const killAt = mode === "at-once" ? 0 : mode === "mid-create" && create !== undefined ? create.at + below(400) : below(1500);
      const script = `round ${round} (seed ${SEED}): kill at ${killAt} ms (${mode}); ${ops.map((o) => `${o.at} ms ${o.what}`).join("; ")}`;

      let killed = false;
      const failures: string[] = [];
      const outcomes: string[] = [];
      const client = d.client;
      const runs = ops.map(async (op) => {
        await sleep(op.at);
        if (killed) return;
        try {
          await op.run(client);
          outcomes.push(`${op.what.split(" {")[0]} ok`);
        } catch (e) {
          outcomes.push(`${op.what.split(" {")[0]}: ${e instanceof ApiError ? `${e.status} ${e.code}` : e instanceof TypevisorError ? e.code : String(e)}`);
          // 4xx: a refusal the random mix earns (409 VM_STATE, 404 ...), except a budget refused
          // with nearly all of it free, which is one leaked. 5xx: the daemon failed. Unreachable: the kill,
          // or, before it, a daemon that died by itself.
          if (e instanceof ApiError) {
            if (e.status >= 500 || e.code === "INSUFFICIENT_RESOURCES") failures.push(`${op.what} answered ${e.status} ${e.code}: ${e.message}`);
          } else if (!(killed && e instanceof TypevisorError && e.code === "DAEMON_UNREACHABLE")) {
            failures.push(`${op.what} failed${killed ? "" : " before the kill"}: ${String(e)}`);
          }
        }
      });
      await sleep(killAt);
      killed = true;
      await d.stop("SIGKILL");
      await Promise.all(runs);
      expect(failures, script).toEqual([]);

      // Ids the inventory may never have recorded (a directory renamed into place before its row).
      for (const f of readdirSync(homePaths(home).vms)) knownIds.add(f.replace(/\.creating$/, ""));
      // health answers only once the start-up re-attach and sweep are done (cli/daemon.ts)
      try {
        d = await startDaemon({ home, args, env });
      } catch (e) {
        throw new Error(`${script}\nthe daemon did not come back: ${(e as Error).message}\n${await vmmReport(home, knownIds)}`, { cause: e });
      }
      for (const v of await d.client.listVms()) knownIds.add(v.id);
      const tCheck = performance.now();
      const transients = new Set<string>();
      const found = await settledDiscrepancies({ home, client: d.client, knownIds }, 15_000, (f) => f.forEach((x) => transients.add(x)));
      if (VERBOSE) console.log(`${script}\n  outcomes: ${outcomes.join("; ")}\n  states: ${(await d.client.listVms()).map((v) => `${v.name}=${v.state}`).join(" ")}\n  settled in ${(performance.now() - tCheck).toFixed(0)} ms${transients.size > 0 ? `; transient: ${[...transients].join(" | ")}` : ""}`);
      expect(found, `${script}\nstates: ${(await d.client.listVms()).map((v) => `${v.name}=${v.state}`).join(" ")}\ndaemon log:\n${d.log().slice(-4000)}`).toEqual([]);
    }

    // The end: every VM goes, and nothing of any of them is left on the host.
    for (const v of await d.client.listVms()) await d.client.removeVm(v.name, { force: true });
    expect(await settledDiscrepancies({ home, client: d.client, knownIds })).toEqual([]);
    const cgroups = (await d.client.host()).cgroups;
    expect(await d.stop("SIGTERM")).toBe(0);
    await until("no VMM process of this home", () => vmmProcesses(home, knownIds).length === 0 || undefined, 10_000);
    expect(readdirSync(homePaths(home).vms)).toEqual([]);
    expect(readdirSync(homePaths(home).run)).toEqual([]);
    expect(existsSync(basesDir(home)) ? readdirSync(basesDir(home)) : []).toEqual([]);
    if (cgroups.available && cgroups.mount !== undefined) expect([...knownIds].map((id) => vmCgroupDir(cgroups.mount!, id)).filter((p) => existsSync(p))).toEqual([]);
    console.log(`fault injection: ${ROUNDS} rounds, ${knownIds.size} VMs, ${((performance.now() - t0) / 1000).toFixed(1)} s (seed ${SEED})`);
    rmSync(home, { recursive: true, force: true });
    rmSync(dir, { recursive: true, force: true });
  }, 300_000);
});
