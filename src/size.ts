/**
 * Sizes as people write them — "2G", "512M", "1.5G", "4 KiB", "1024" — and back ("1.5 GiB"), for
 * every layer that takes one (VM disks, the daemon's reserve, console log rotation). Suffixes are
 * powers of 1024 whether written K, KB or KiB, as QEMU's size options and `ls -h` mean them.
 */
import { TypevisorError } from "./errors.js";

export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;
/** The largest size parseSize accepts by default: beyond it a number is a typo, not a machine. */
export const MAX_SIZE = 1024 * 1024 * GiB;

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"] as const;

/** "12 B", "4.0 KiB", "512 MiB", "1.5 GiB": one decimal below 100 of a unit, whole numbers above. */
export function formatBytes(n: number): string {
  if (!Number.isFinite(n)) return String(n);
  if (n < 0) return `-${formatBytes(-n)}`;
  let i = 0;
  let v = n;
  // move up while the value would print as 1024 or more of the current unit
  while (i < UNITS.length - 1 && v >= 1023.5) {
    v /= 1024;
    i++;
  }
  if (i === 0) return `${Math.round(v)} B`;
  return `${v >= 99.95 ? Math.round(v) : v.toFixed(1)} ${UNITS[i]}`;
}

const MULTIPLIER: Record<string, number> = { "": 1, b: 1, k: 1024, m: MiB, g: GiB, t: 1024 * GiB, p: MAX_SIZE };

export interface SizeLimits {
  /** What is being parsed, for the message ("--console-log-size"); without it "invalid size ...". */
  what?: string;
  min?: number;
  max?: number;
}

/** Bytes from "2G", "512M", "1.5G", "10K", "2GiB", "4 KiB" or a plain "1024" (case-insensitive). */
export function parseSize(s: string, limits: SizeLimits = {}): number {
  const { what, min = 0, max = MAX_SIZE } = limits;
  const bad = (why: string): TypevisorError =>
    new TypevisorError("INVALID_ARGUMENT", `${what !== undefined ? `${what}: ` : ""}invalid size ${JSON.stringify(s)}: ${why}`, {
      hint: 'write a number of bytes or a number with K, M, G, T or P (powers of 1024): "512M", "2G", "1.5G"',
    });
  const text = String(s).trim();
  if (text.startsWith("-")) throw bad("a size cannot be negative");
  const m = /^(\d+(?:\.\d+)?|\.\d+)\s*(?:([kmgtp])(?:i?b)?|(b))?$/i.exec(text);
  if (m === null) throw bad("not a number with an optional unit");
  const unit = (m[2] ?? m[3] ?? "").toLowerCase();
  const mult = MULTIPLIER[unit]!;
  const value = Number(m[1]);
  if (mult === 1 && !Number.isInteger(value)) throw bad("a byte count must be whole");
  const bytes = Math.round(value * mult);
  if (bytes > max) throw bad(`larger than ${formatBytes(max)}`);
  if (bytes < min) throw bad(`smaller than ${formatBytes(min)}`);
  return bytes;
}
