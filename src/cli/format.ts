/**
 * Output for people: plain-text tables, durations, key/value blocks. Scripts
 * use `--json` instead, so nothing here is a stable format. Byte counts go
 * through formatBytes (control/resources.ts) so the CLI and the daemon's
 * messages write sizes the same way.
 */
import { formatBytes } from "../size.js";

export { formatBytes };

export type Align = "left" | "right";
export type Cell = string | number | undefined | null;
/** A column: its title, and an alignment when numbers have been formatted to text ("512 MiB" should still line up right). */
export type Column = string | { title: string; align?: Align };

const EMPTY = "-";

function cellText(c: Cell): string {
  if (c === undefined || c === null || c === "") return EMPTY;
  return typeof c === "number" ? String(c) : c;
}

/**
 * A table: header row, two spaces between columns, widths from the content.
 * Text is left-aligned and numbers right-aligned: a column without an explicit
 * alignment is right-aligned when every value in it is a number. Missing
 * values print as "-" so columns never collapse. No trailing spaces.
 */
export function renderTable(columns: readonly Column[], rows: readonly (readonly Cell[])[]): string {
  const cols = columns.map((c) => (typeof c === "string" ? { title: c, align: undefined } : c));
  const align: Align[] = cols.map((c, i) => {
    if (c.align !== undefined) return c.align;
    const values = rows.map((r) => r[i]).filter((v) => v !== undefined && v !== null && v !== "");
    return values.length > 0 && values.every((v) => typeof v === "number") ? "right" : "left";
  });
  const text = [cols.map((c) => c.title), ...rows.map((r) => cols.map((_, i) => cellText(r[i])))];
  const widths = cols.map((_, i) => Math.max(...text.map((r) => (r[i] ?? "").length)));
  return (
    text
      .map((r) =>
        r
          .map((c, i) => (align[i] === "right" ? c.padStart(widths[i] ?? 0) : c.padEnd(widths[i] ?? 0)))
          .join("  ")
          .trimEnd(),
      )
      .join("\n") + "\n"
  );
}

/** `key: value` lines with the values lined up; undefined values are left out (an absent field is not "-"). */
export function renderFields(fields: readonly (readonly [string, Cell])[]): string {
  const present = fields.filter(([, v]) => v !== undefined && v !== null);
  const width = Math.max(0, ...present.map(([k]) => k.length + 1));
  return present.map(([k, v]) => `${`${k}:`.padEnd(width)}  ${cellText(v)}`.trimEnd()).join("\n") + "\n";
}

/**
 * "850ms", "4.2s", "42s", "3m12s", "2h05m", "3d04h": two units at most, since
 * an uptime or an elapsed time is read at a glance. Negative or non-finite
 * input (a clock step) prints as "0s" rather than nonsense.
 */
export function formatDuration(ms: number): string {
  if (!Number.isFinite(ms) || ms < 0) return "0s";
  if (ms < 1000) return `${Math.floor(ms)}ms`;
  const tenths = Math.floor(ms / 100);
  if (tenths < 100) return `${(tenths / 10).toFixed(1)}s`;
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s}s`;
  const pad = (n: number): string => String(n).padStart(2, "0");
  if (s < 3600) return `${Math.floor(s / 60)}m${pad(s % 60)}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${pad(Math.floor((s % 3600) / 60))}m`;
  return `${Math.floor(s / 86400)}d${pad(Math.floor((s % 86400) / 3600))}h`;
}

/** A CPU count or CPU-seconds: whole numbers as they are, fractions to one decimal ("0.3"). */
export function formatNumber(n: number): string {
  return Number.isInteger(n) ? String(n) : n.toFixed(1);
}

/** An ISO timestamp without milliseconds, as an operator reads it: "2024-05-01 12:00:03Z". */
export function formatTime(iso: string): string {
  return iso.replace("T", " ").replace(/\.\d+Z$/, "Z");
}

/** One JSON document, pretty, newline-terminated: what every `--json` prints. */
export function toJson(value: unknown): string {
  return `${JSON.stringify(value, null, 2)}\n`;
}

/**
 * An elapsed-time line on stderr while `fn` runs ("⠋ creating vm1… 1.2s"),
 * erased when it ends. Only on a terminal: a pipe or a log gets nothing, so
 * scripts see exactly what they asked for.
 */
export async function withProgress<T>(label: string, fn: () => Promise<T>, stream: NodeJS.WriteStream = process.stderr): Promise<T> {
  if (stream.isTTY !== true) return fn();
  const frames = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏";
  const t0 = performance.now();
  let i = 0;
  const draw = (): void => {
    // Tenths of a second while it is short: a ticking "0.3s" reads as progress, "300ms" as noise.
    const ms = performance.now() - t0;
    stream.write(`\r${frames[i++ % frames.length] ?? ""} ${label}… ${ms < 60_000 ? `${(ms / 1000).toFixed(1)}s` : formatDuration(ms)}\x1b[K`);
  };
  draw();
  const timer = setInterval(draw, 100);
  try {
    return await fn();
  } finally {
    clearInterval(timer);
    stream.write("\r\x1b[K");
  }
}
