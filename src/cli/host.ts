/**
 * `typevisor host`: what this host has, what the daemon's overcommit policy
 * lets VMs have, what they were given and what is actually used — the numbers
 * behind an INSUFFICIENT_RESOURCES refusal. Exit codes as in vm.ts.
 */
import type { Command } from "commander";
import type { HostReport } from "../api/schemas.js";
import { VM_STATES } from "../control/spec.js";
import { connect, type ConnectionOptions } from "./connect.js";
import { formatBytes, formatNumber, renderTable, toJson } from "./format.js";
import { formatHistory, parseHistoryRange, parseStep } from "./history.js";
import { clientCommand } from "./vm.js";

function ratio(r: number): string {
  return `${formatNumber(r)}x`;
}

export function formatHostReport(h: HostReport): string {
  const right = (title: string) => ({ title, align: "right" as const });
  const line = (name: string, l: HostReport["cpu"], fmt: (n: number) => string) => [name, fmt(l.capacity), fmt(l.budget), fmt(l.allocated), fmt(l.used), fmt(l.free)];
  let out = renderTable(
    ["RESOURCE", right("CAPACITY"), right("BUDGET"), right("ALLOCATED"), right("USED"), right("FREE")],
    [line("cpu", h.cpu, formatNumber), line("memory", h.memory, formatBytes), line("disk", h.disk, formatBytes)],
  );
  const o = h.overcommit;
  out += `\novercommit: cpu ${ratio(o.cpu)}, memory ${ratio(o.memory)}, disk ${ratio(o.disk)}; ${formatBytes(o.reservedMemoryBytes)} of memory reserved for the host\n`;
  const c = h.cgroups;
  out += c.available
    ? `cgroups:    v2 at ${c.mount ?? "?"} (controllers: ${c.controllers.length > 0 ? c.controllers.join(", ") : "none"})\n`
    : `cgroups:    not available${c.reason !== undefined ? ` (${c.reason})` : ""}: VMs run without CPU and memory limits\n`;
  // States in lifecycle order, then anything a newer daemon reports.
  const states = [...VM_STATES.filter((s) => s in h.vms), ...Object.keys(h.vms).filter((s) => !(VM_STATES as readonly string[]).includes(s))];
  const counts = states.map((s) => [s, h.vms[s] ?? 0] as const).filter(([, n]) => n > 0);
  const total = counts.reduce((a, [, n]) => a + n, 0);
  if (h.tls !== undefined) out += `https:      certificate SHA-256 ${h.tls.fingerprint}\n`;
  // optional: an older daemon does not say
  if (h.standbyVmms !== undefined && h.standbyVmms.size > 0) {
    const t = h.standbyVmms.template;
    out += `standby:    ${h.standbyVmms.ready} of ${h.standbyVmms.size} VMM(s) started and waiting for a restore${t !== undefined ? ` (jailed for snapshot ${t})` : ""}\n`;
  }
  out += `vms:        ${total === 0 ? "none" : `${total} (${counts.map(([s, n]) => `${n} ${s}`).join(", ")})`}\n`;
  return out;
}

export function registerHostCommand(program: Command): void {
  clientCommand(program, "host", "host resources: capacity, budget under the overcommit policy, allocated to VMs, used, free")
    .option("--history <range>", "the host's usage over the last RANGE (90s, 15m, 1h, 7d, 1y): averages per 10 s, 5 min or 1 h")
    .option("--step <seconds>", "with --history: 10, 300 or 3600 (default: chosen from the range)")
    .option("--json", "print the API's JSON")
    .action(async (o: ConnectionOptions & { json?: boolean; history?: string; step?: string }) => {
      if (o.history !== undefined || o.step !== undefined) {
        const range = parseHistoryRange("--history", o.history ?? "1h");
        const to = new Date();
        const hist = await connect(o).metricsHistory({ from: new Date(to.getTime() - range), to, ...(o.step !== undefined ? { step: parseStep("--step", o.step) } : {}) });
        process.stdout.write(o.json === true ? toJson(hist) : formatHistory(hist));
        return;
      }
      const h = await connect(o).host();
      process.stdout.write(o.json === true ? toJson(h) : formatHostReport(h));
    });
}
