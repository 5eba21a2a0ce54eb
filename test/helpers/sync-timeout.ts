/**
 * The bound on every synchronous child process a lab test or benchmark runs (execFileSync,
 * spawnSync): while one runs, the harness's event loop stands still, so its own timers (test
 * timeouts, waitFor deadlines) cannot fire; a tool that hung would hang the run with no word.
 * Each of these tools takes well under a second normally.
 */
export const SYNC_TIMEOUT_MS = 60_000;
