/**
 * The daemon's reading of a VMM's stats page (`run --stats-file`, vmm/stats/layout.ts): the VM's
 * disk and network counters without a request to the VMM, so sampling usage every few seconds
 * wakes none of its threads. The VMM writes the page's content and a guest may own the VMM: the
 * file is opened without following a symlink or blocking on a FIFO, only its first page is read,
 * and every field is checked (parseStatsPage); anything else reads as no page.
 */
import { closeSync, readSync } from "node:fs";
import { openRegularNoFollow } from "../sys/untrusted-file.js";
import { parseStatsPage, STATS_PAGE_BYTES, type StatsReading } from "../vmm/stats/layout.js";

export function readStatsFile(path: string): StatsReading | undefined {
  let fd: number;
  try {
    fd = openRegularNoFollow(path);
  } catch {
    return undefined;
  }
  try {
    const buf = Buffer.alloc(STATS_PAGE_BYTES);
    let got = 0;
    while (got < buf.length) {
      const n = readSync(fd, buf, got, buf.length - got, got);
      if (n <= 0) break;
      got += n;
    }
    return parseStatsPage(buf.subarray(0, got));
  } catch {
    return undefined;
  } finally {
    closeSync(fd);
  }
}
