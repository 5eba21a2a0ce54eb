/**
 * `typevisor vm migrate NAME --to https://PEER:PORT --peer-token TOKEN [--peer-fingerprint SHA256]
 * [--max-downtime MS] [--copy-disks]`: live-migrate a VM to another daemon (docs/migration.md,
 * "Between daemons"). The source daemon does the work; this command starts it and shows its
 * progress (GET /v1/vms/{name}/migrate, polled) until it ends.
 */
import type { Command } from "commander";
import type { MigrationStatus } from "../control/migration.js";
import { TypevisorError } from "../errors.js";
import { connect, type ConnectionOptions } from "./connect.js";
import { formatBytes, toJson } from "./format.js";
import { clientCommand, parseWhole } from "./vm.js";

function line(s: MigrationStatus): string {
  const v = (s.vmm ?? {}) as { round?: number; bytesSent?: number; dirtyBytes?: number; expectedDowntimeMs?: number; downtimeMs?: number };
  const parts = [`${s.vm}: ${s.phase}`];
  if (v.round !== undefined) parts.push(`round ${v.round}`);
  if (v.bytesSent !== undefined) parts.push(`${formatBytes(v.bytesSent)} sent`);
  if (v.dirtyBytes !== undefined && s.phase === "precopy") parts.push(`${formatBytes(v.dirtyBytes)} dirty`);
  if (v.expectedDowntimeMs !== undefined && s.phase === "precopy") parts.push(`expected downtime ${v.expectedDowntimeMs} ms`);
  if (v.downtimeMs !== undefined) parts.push(`downtime ${v.downtimeMs} ms`);
  return parts.join(", ");
}

export function registerMigrateCommand(vm: Command): void {
  clientCommand(vm, "migrate", "live-migrate a running VM to another typevisor daemon: it goes on running there and leaves this daemon's inventory")
    .argument("<name>", "VM name")
    .requiredOption("--to <url>", "the destination daemon's API URL (https://HOST:PORT)")
    .requiredOption("--peer-token <token>", "an API token of the destination daemon with the operator or admin role (typevisor token create there)")
    .option("--peer-fingerprint <sha256>", "the destination daemon's certificate fingerprint (typevisor host there); else a system CA must vouch for it")
    .option("--max-downtime <ms>", "the longest pause the guest may see at the switch-over (default 300)")
    .option("--copy-disks", "copy the VM's disks into the destination daemon's own directory while the VM runs (a qcow2 disk becomes a standalone qcow2 image there; without it the disks must be on storage both daemons see)")
    .option("--no-wait", "return once the migration has started (follow it with GET /v1/vms/NAME/migrate)")
    .option("--json", "print the final progress as the API's JSON")
    .action(async (name: string, o: ConnectionOptions & { to: string; peerToken: string; peerFingerprint?: string; maxDowntime?: string; copyDisks?: boolean; wait: boolean; json?: boolean }) => {
      const c = connect(o);
      const started = await c.migrateVm(name, {
        to: o.to, peerToken: o.peerToken,
        ...(o.peerFingerprint !== undefined ? { peerFingerprint: o.peerFingerprint } : {}),
        ...(o.maxDowntime !== undefined ? { maxDowntimeMs: parseWhole("--max-downtime", o.maxDowntime, "milliseconds") } : {}),
        ...(o.copyDisks === true ? { copyDisks: true } : {}),
      });
      let s = started;
      let last = "";
      const say = (t: string): void => {
        if (o.json !== true && t !== last) process.stderr.write(`${t}\n`);
        last = t;
      };
      say(line(s));
      while (o.wait && !["completed", "failed", "cancelled"].includes(s.phase)) {
        await new Promise((r) => setTimeout(r, 500));
        s = await c.migration(name);
        say(line(s));
      }
      if (o.json === true) process.stdout.write(toJson(s));
      else if (s.phase === "completed") process.stdout.write(`${name}: migrated to ${s.to}; it runs there now\n`);
      if (s.phase === "failed" || s.phase === "cancelled") throw new TypevisorError("MIGRATION_FAILED", `${name} did not migrate (${s.error ?? s.phase}); it runs on here`);
    });
}
