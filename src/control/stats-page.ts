/**
 * The daemon's reading of a VMM's stats page (`run --stats-file`, vmm/stats/layout.ts): the VM's
 * disk and network counters without a request to the VMM, so sampling usage every few seconds
 * wakes none of its threads. The VMM writes the page's content and a guest may own the VMM: the
 * file is opened without following a symlink or blocking on a FIFO, only its first page is read,
 * and every field is checked (parseStatsPage); anything else reads as no page.
 */
import { readRegularNoFollowHead } from "../sys/untrusted-file.js";
import { parseStatsChanges, parseStatsPage, STATS_HEADER_BYTES, STATS_PAGE_BYTES, type StatsReading } from "../vmm/stats/layout.js";

export function readStatsFile(path: string): StatsReading | undefined {
  const b = readHead(path, STATS_PAGE_BYTES);
  return b === undefined ? undefined : parseStatsPage(b);
}

/** The page's change counter alone (its header): what the watchdog looks at every tick. */
export function readStatsChanges(path: string): number | undefined {
  const b = readHead(path, STATS_HEADER_BYTES);
  return b === undefined ? undefined : parseStatsChanges(b);
}

/** The first `bytes` of the file (fewer if it is shorter), or undefined when it cannot be read as a regular file. */
function readHead(path: string, bytes: number): Buffer | undefined {
  try {
    return readRegularNoFollowHead(path, bytes);
  } catch {
    return undefined;
  }
}
