/**
 * bench/snapshot, daemon part (issue 15 "instant create"): a VM created through the daemon from a
 * template (a clone of a memory snapshot: it restores, no boot) against a cold create and boot of
 * the same guest, each timed from the API request to the guest answering a line typed on its
 * console (through the daemon's console stream). The template is the minimal image, 256 MiB, 1
 * vCPU, booted once and snapshotted with memory. Four series, alternating:
 *   - cold: `POST /v1/vms {image: minimal, start}`, to the answer;
 *   - clone, standby pool: the same daemon run with `--no-sandbox --standby-vmms 1` (a VMM already
 *     started takes the restore; docs/snapshots.md "Instant starts"), the pool refilled between runs;
 *   - clone, sandboxed with a jailed standby: a daemon run as root with its default VMM sandbox and
 *     `--standby-vmms 1` (a standby jailed for the template takes it: docs/security.md "Standby
 *     VMMs in the sandbox");
 *   - clone, sandboxed, no standby: the same with `--standby-vmms 0`: a jailed VMM starts for each restore.
 * Goal (issue 15): instant create at most 0.1x a cold create+boot.
 *
 * Run alone: BENCH_ONLY=daemon npm run bench:snapshot     (BENCH_RUNS: runs per series; BENCH_TRACE=1
 * prints each create's timeline: request returned, console attached, first output, answer)
 */
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TypevisorClient } from "../src/api/client.js";
import { startDaemon, until, type TestDaemon } from "../test/helpers/daemon.js";
import { median } from "./lib.js";

const PROBE_RETRY_MS = 2000;
const ANSWER_MS = 600_000;
/** BENCH_TRACE=1: each run's timeline (answered()). */
const TRACE = process.env["BENCH_TRACE"] === "1";

/**
 * Type a probe on the VM's console until the guest answers (the shell may not be up yet); ms from
 * `t0`. `drain`: then also wait until every probe typed was answered, so the guest's tty holds
 * none of them (a template: its snapshot would keep them, and each clone would answer them first,
 * one console line at a time, before the line its own measure types).
 */
async function answered(c: TypevisorClient, vm: string, t0: number, drain = false): Promise<number> {
  const requested = performance.now() - t0;
  const con = await c.attachConsole(vm);
  const attached = performance.now() - t0;
  let out = "";
  let firstOutput: number | undefined;
  con.on("data", (b: Buffer) => {
    firstOutput ??= performance.now() - t0;
    out += b.toString("latin1");
  });
  let n = 0;
  // The marker is computed by the shell, so the echo of the typed line never matches, and carries
  // this call's own tag: a clone's shell may still hold lines its template was typed (a snapshot
  // taken right after the template answered keeps the rest in its tty), and answers them first.
  const tag = randomBytes(3).toString("hex");
  const probe = (): void => void con.write(`echo ans-${tag}-$((${n++}+1000))\n`);
  probe();
  const timer = setInterval(probe, PROBE_RETRY_MS);
  try {
    const answer = new RegExp(`ans-${tag}-(1\\d{3})`);
    await until(`${vm} answering`, () => (answer.test(out) ? true : undefined), ANSWER_MS);
    const ms = performance.now() - t0;
    // Where the time went (ms from the request): the API call's return, the console attached, the guest's first byte on it, probes typed (one every 2 s without an answer; the answer names the one it answers).
    if (TRACE) console.log(`  ${vm}: request returned ${requested.toFixed(0)}, console attached ${attached.toFixed(0)}, first output ${firstOutput?.toFixed(0) ?? "-"}, answered ${ms.toFixed(0)} (probes typed ${n}, answered ${answer.exec(out)?.[1] ?? "?"})`);
    if (drain) {
      clearInterval(timer);
      const last = `ans-${tag}-${n - 1 + 1000}`;
      await until(`${vm} answering every probe typed`, () => (out.includes(last) ? true : undefined), ANSWER_MS);
    }
    return ms;
  } finally {
    clearInterval(timer);
    con.destroy();
  }
}

const spec = (name: string) => ({ name, image: "minimal", cpus: 1, memoryMiB: 256, rng: false });

async function template(d: TestDaemon): Promise<void> {
  await d.client.createVm(spec("tpl"), { start: true });
  await answered(d.client, "tpl", performance.now(), true);
  await d.client.createSnapshot("tpl", { name: "gold" });
}

export async function instantCreate(runs: number): Promise<{ coldMs: number[]; standbyMs: number[]; jailedStandbyMs: number[]; sandboxedMs: number[] }> {
  const homes = [0, 1, 2].map((i) => mkdtempSync(join(tmpdir(), `bench-ic-${i}-`)));
  const pooled = await startDaemon({ home: homes[0]!, args: ["--no-sandbox", "--standby-vmms", "1"] });
  const jailedPooled = await startDaemon({ home: homes[1]!, args: ["--standby-vmms", "1"] });
  const jailed = await startDaemon({ home: homes[2]!, args: ["--standby-vmms", "0"] });
  const daemons = [pooled, jailedPooled, jailed];
  const out = { coldMs: [] as number[], standbyMs: [] as number[], jailedStandbyMs: [] as number[], sandboxedMs: [] as number[] };
  const standbyReady = (d: TestDaemon) => until("a standby VMM ready", async () => ((await d.client.host()).standbyVmms.ready >= 1 ? true : undefined), ANSWER_MS);
  const clone = async (d: TestDaemon, name: string): Promise<number> => {
    const t0 = performance.now();
    await d.client.cloneVm("tpl", { name, snapshot: "gold" });
    const ms = await answered(d.client, name, t0);
    await d.client.removeVm(name, { force: true });
    return ms;
  };
  try {
    for (const d of daemons) await template(d);
    console.log("bench/instant-create: templates booted and snapshotted (with memory)");
    for (let i = 0; i < runs; i++) {
      const t0 = performance.now();
      await pooled.client.createVm(spec(`cold${i}`), { start: true });
      out.coldMs.push(await answered(pooled.client, `cold${i}`, t0));
      await pooled.client.removeVm(`cold${i}`, { force: true });

      // Each clone with both pools full: a standby refilled after a take (5 s later: Node, the VMM's
      // modules and its threads starting, seconds of the lab's one CPU) would slow the next series'
      // guest, not its own.
      const poolsFull = async (): Promise<void> => {
        await standbyReady(pooled);
        await standbyReady(jailedPooled);
      };
      await poolsFull();
      out.standbyMs.push(await clone(pooled, `c${i}`));
      await poolsFull();
      out.jailedStandbyMs.push(await clone(jailedPooled, `c${i}`));
      await poolsFull();
      out.sandboxedMs.push(await clone(jailed, `c${i}`));
      console.log(
        `run ${i + 1}: cold create+boot ${out.coldMs[i]!.toFixed(0)} ms, clone with a standby VMM ${out.standbyMs[i]!.toFixed(0)} ms, ` +
          `clone sandboxed with a jailed standby ${out.jailedStandbyMs[i]!.toFixed(0)} ms, clone sandboxed (no standby) ${out.sandboxedMs[i]!.toFixed(0)} ms`,
      );
    }
    const cold = median(out.coldMs);
    for (const [label, xs] of [["with a standby VMM (--no-sandbox)", out.standbyMs], ["sandboxed, with a jailed standby", out.jailedStandbyMs], ["sandboxed, no standby", out.sandboxedMs]] as const) {
      const r = median(xs) / cold;
      console.log(`daemon: create from a template ${label}: median ${median(xs).toFixed(0)} ms vs cold create+boot ${cold.toFixed(0)} ms: ${r.toFixed(3)}x (goal at most 0.1x: ${r <= 0.1 ? "met" : "not met"})`);
    }
    return out;
  } finally {
    for (const d of daemons) {
      for (const v of await d.client.listVms().catch(() => [])) await d.client.removeVm(v.name, { force: true }).catch(() => undefined);
      await d.stop();
    }
    for (const h of homes) rmSync(h, { recursive: true, force: true });
  }
}
