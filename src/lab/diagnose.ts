/**
 * What the lab watchdog collects when a command goes silent (docs/lab.md "When a run goes silent"):
 *  1. QEMU's own threads on the host: which are running, which wait, and for how long QEMU's main
 *     loop means to sleep (the timeout of its ppoll, read from its memory: a lab whose emulated
 *     host has no timer due waits for hours).
 *  2. Through QMP: every lab CPU's registers and local APIC (its timer, IRR/ISR), the PIC; then
 *     SysRq keys on the lab's keyboard (l: all CPUs' backtraces, w: blocked tasks, t: every task),
 *     which the lab kernel prints to its log even when its userspace cannot run.
 *  3. Through the lab agent (a shell on the lab's third serial port): the lab's timers
 *     (/proc/timer_list), interrupt counts, and every process and thread, with each typevisor
 *     VMM's own thread report (threads-report.ts).
 * Each step has its own time limit: a wedged lab answers some of them and not others, and which
 * is itself part of the answer.
 */
import { closeSync, openSync, readSync } from "node:fs";
import { connect } from "node:net";
import { threadStates } from "../sys/proc-stat.js";
import { QmpClient } from "./qmp.js";
import { threadLine } from "./threads-report.js";

const PPOLL = 271;

/** The timeout a thread blocked in ppoll(2) passed (its struct timespec, read from /proc/PID/mem). */
function ppollTimeout(pid: number, addr: bigint): string {
  if (addr === 0n) return "no timeout (waits for an event)";
  let fd: number | undefined;
  try {
    fd = openSync(`/proc/${pid}/mem`, "r");
    const b = Buffer.alloc(16);
    if (readSync(fd, b, 0, 16, addr) !== 16) return "timeout unreadable";
    const s = Number(b.readBigInt64LE(0)) + Number(b.readBigInt64LE(8)) / 1e9;
    return `timeout ${s.toFixed(3)} s${s > 3600 ? ` (${(s / 3600).toFixed(1)} h: no timer due in the emulated host)` : ""}`;
  } catch (e) {
    return `timeout unreadable: ${(e as Error).message}`;
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}

export function qemuThreadsReport(pid: number): string {
  const lines = [`QEMU pid ${pid}, threads on the host:`];
  for (const t of threadStates(pid)) {
    let line = threadLine(t);
    if (typeof t.syscall === "object" && t.syscall.nr === PPOLL) line += ` ${ppollTimeout(pid, t.syscall.args[2] ?? 0n)}`;
    lines.push(line);
  }
  return lines.join("\n");
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** The lab's CPU and interrupt state, then SysRq l, w, t on its keyboard (their output goes to the kernel log). */
export async function qmpReport(qmpPath: string): Promise<string> {
  const out: string[] = [];
  let qmp: QmpClient | undefined;
  try {
    qmp = await QmpClient.open(qmpPath, 5000);
    const status = (await qmp.execute("query-status", undefined, 5000)) as { status?: string };
    out.push(`QEMU run state: ${status.status ?? "?"}`);
    for (const cmd of ["info registers -a", "info lapic", "info pic", "info irq"]) {
      try {
        out.push(`== (qemu) ${cmd}\n${(await qmp.hmp(cmd, 10_000)).trimEnd()}`);
      } catch (e) {
        out.push(`== (qemu) ${cmd}: ${(e as Error).message}`);
      }
    }
    for (const key of ["l", "w", "t"]) {
      await qmp.execute("send-key", { keys: [{ type: "qcode", data: "alt" }, { type: "qcode", data: "sysrq" }, { type: "qcode", data: key }] }, 5000);
      out.push(`sent SysRq-${key} (output in the lab kernel log)`);
      await sleep(1000);
    }
    // the key presses interrupt the lab CPU: its timer state after them tells a lost timer from a stopped one
    out.push(`== (qemu) info lapic, after the SysRq keys\n${(await qmp.hmp("info lapic", 10_000)).trimEnd()}`);
  } catch (e) {
    out.push(`QMP: ${(e as Error).message}`);
  } finally {
    qmp?.close();
  }
  return out.join("\n");
}

/** Ask the lab agent for its report; whatever arrived by the deadline, with a note if it did not finish. */
export function agentReport(agentPath: string, endMarker: string, timeoutMs: number): Promise<string> {
  return new Promise((resolve) => {
    let text = "";
    let done = false;
    const sock = connect(agentPath);
    const finish = (note?: string): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      sock.destroy();
      const at = text.indexOf(endMarker);
      resolve((at >= 0 ? text.slice(0, at) : text).replaceAll("\r", "").trimEnd() + (note !== undefined ? `\n(${note})` : ""));
    };
    const timer = setTimeout(() => finish(`the lab agent did not finish within ${timeoutMs / 1000} s`), timeoutMs);
    sock.setEncoding("latin1");
    sock.on("connect", () => sock.write("dump\n"));
    sock.on("data", (d: string) => {
      text += d;
      // a report is a few hundred KiB at most; past 16 MiB the agent is not making sense
      if (text.includes(endMarker)) finish();
      else if (text.length > 16 << 20) finish("report cut at 16 MiB");
    });
    sock.on("error", (e) => finish(`lab agent: ${e.message}`));
    sock.on("close", () => finish("the lab agent closed its port"));
  });
}
