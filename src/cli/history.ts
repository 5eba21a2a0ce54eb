/**
 * `--history` of `typevisor vm stats` and `typevisor host`: the daemon's usage history
 * (GET /v1/metrics/history, docs/control-plane.md "Metrics history and alerts") as a table.
 */
import type { MetricsHistoryReport } from "../api/schemas.js";
import { TypevisorError } from "../errors.js";
import { formatBytes, formatTime, renderTable } from "./format.js";

const UNIT_MS = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 7 * 86_400_000, y: 365 * 86_400_000 } as const;

/** "90s", "15m", "1h", "7d", "2w", "1y": how far back. @throws TypevisorError INVALID_ARGUMENT */
export function parseHistoryRange(flag: string, v: string): number {
  const m = /^\s*(\d{1,6})\s*([smhdwy])\s*$/.exec(v);
  const ms = m === null ? NaN : Number(m[1]) * UNIT_MS[m[2] as keyof typeof UNIT_MS];
  if (!Number.isFinite(ms) || ms <= 0 || ms > UNIT_MS.y) {
    throw new TypevisorError("INVALID_ARGUMENT", `${flag} is how far back, a whole number with s, m, h, d, w or y, at most 1y: 15m, 1h, 7d (got "${v}")`);
  }
  return ms;
}

/** A step flag: 10, 300 or 3600 seconds (the daemon checks it too). */
export function parseStep(flag: string, v: string): number {
  if (!/^\s*\d{1,5}\s*$/.test(v)) throw new TypevisorError("INVALID_ARGUMENT", `${flag} is 10, 300 or 3600 seconds (got "${v}")`);
  return Number(v);
}

function rate(n: number | undefined): string | undefined {
  return n === undefined ? undefined : `${formatBytes(n)}/s`;
}

/** One row per bucket, oldest first; "-" where a bucket has no sample of that figure. */
export function formatHistory(h: MetricsHistoryReport): string {
  const right = (title: string) => ({ title, align: "right" as const });
  const withState = h.vm !== undefined;
  const head = `${h.vm !== undefined ? `VM ${h.vm}` : "host"}: ${h.points.length} point(s) of ${h.step} s from ${formatTime(h.from)} to ${formatTime(h.to)}\n`;
  if (h.points.length === 0) return head;
  return (
    head +
    renderTable(
      ["TIME", ...(withState ? ["STATE"] : []), right("CPU"), right("MEMORY"), right("DISK READ"), right("DISK WRITE"), right("NET RX"), right("NET TX")],
      h.points.map((p) => [
        formatTime(p.t),
        ...(withState ? [p.state] : []),
        p.cpuPercent !== undefined ? `${p.cpuPercent.toFixed(1)}%` : undefined,
        p.memoryBytes !== undefined ? formatBytes(p.memoryBytes) : undefined,
        rate(p.diskReadBps),
        rate(p.diskWriteBps),
        rate(p.netRxBps),
        rate(p.netTxBps),
      ]),
    )
  );
}
