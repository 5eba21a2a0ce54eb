import { readdirSync, readFileSync } from "node:fs";

/** Pids of VMM processes whose API socket lies under `home`. */
export function vmmProcesses(home: string): number[] {
  return readdirSync("/proc")
    .filter((p) => /^\d+$/.test(p))
    .filter((p) => {
      try {
        return readFileSync(`/proc/${p}/cmdline`, "utf8").includes(`\0--api-socket\0${home}/`);
      } catch {
        return false;
      }
    })
    .map(Number);
}
