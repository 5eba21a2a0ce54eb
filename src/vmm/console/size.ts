/**
 * Sizes on the command line (`--console-log-size`): whole bytes, or a number
 * with a binary suffix K/M/G (1K = 1024, as ls -h and QEMU's size options mean it).
 */
import { TypevisorError } from "../../errors.js";

const SUFFIX: Record<string, number> = { "": 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3 };
/** Below this a log would rotate on nearly every line; above it Number loses whole bytes. */
export const MIN_LOG_SIZE = 1024;
export const MAX_LOG_SIZE = 1024 ** 4;

/** Parse "4096", "4K", "1M", "2G" (suffix case-insensitive, optional trailing "B"/"iB"). */
export function parseSize(flag: string, text: string, min = MIN_LOG_SIZE, max = MAX_LOG_SIZE): number {
  const m = /^(\d{1,16})\s*([kmg]?)(?:i?b)?$/i.exec(text.trim());
  const bad = (why: string): TypevisorError =>
    new TypevisorError("INVALID_ARGUMENT", `${flag} ${why} (got "${text}"); give bytes or a number with K, M or G, e.g. 512K`);
  if (m === null) throw bad("is not a size");
  const n = Number(m[1]) * SUFFIX[m[2]!.toUpperCase()]!;
  if (!Number.isSafeInteger(n) || n > max) throw bad(`is larger than ${max} bytes`);
  if (n < min) throw bad(`must be at least ${min} bytes`);
  return n;
}
