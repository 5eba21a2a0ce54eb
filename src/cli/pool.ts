/**
 * `typevisor pool create|ls|show|rm`: storage pools over the daemon's API (src/control/pools.ts,
 * docs/storage.md). Exit codes as in vm.ts.
 */
import type { Command } from "commander";
import type { PoolInfo } from "../control/pools.js";
import { connect, type ConnectionOptions } from "./connect.js";
import { formatBytes, formatNumber, renderFields, renderTable, toJson } from "./format.js";
import { clientCommand, EXIT_CODES_HELP } from "./vm.js";

export function formatPoolTable(pools: readonly PoolInfo[]): string {
  const right = (title: string) => ({ title, align: "right" as const });
  return renderTable(
    ["NAME", "PATH", right("CAPACITY"), right("QUOTA"), right("ALLOCATED"), right("USED"), right("AVAILABLE"), right("OVERCOMMIT"), right("DISKS")],
    pools.map((p) => [
      p.name,
      p.path,
      formatBytes(p.capacityBytes),
      p.quotaBytes !== null ? formatBytes(p.quotaBytes) : "-",
      formatBytes(p.allocatedBytes),
      formatBytes(p.usedBytes),
      formatBytes(p.availableBytes),
      `${formatNumber(p.overcommit)}x`,
      p.disks,
    ]),
  );
}

export function formatPoolDetails(p: PoolInfo): string {
  return renderFields([
    ["name", p.name],
    ["path", p.path],
    ["capacity", `${formatBytes(p.capacityBytes)} (the filesystem), ${formatBytes(p.freeBytes)} free on it`],
    ["quota", p.quotaBytes !== null ? formatBytes(p.quotaBytes) : "none (the filesystem's size)"],
    ["allocated", `${formatBytes(p.allocatedBytes)} (virtual size of its disks)`],
    ["used", `${formatBytes(p.usedBytes)} (what their files take)`],
    ["available", `${formatBytes(p.availableBytes)} (what another disk may still be given)`],
    ["overcommit", `${formatNumber(p.overcommit)}x`],
    ["disks", p.disks],
    ["vms", p.vms.length > 0 ? p.vms.join(", ") : "none"],
  ]);
}

export function registerPoolCommands(program: Command): void {
  const pool = program.command("pool").description("storage pools: directories VM disks live in, with quotas").addHelpText("after", EXIT_CODES_HELP);

  clientCommand(pool, "create", "create a storage pool on an existing directory")
    .argument("<name>", "pool name: 1-63 lower-case letters, digits and '-'")
    .requiredOption("--path <dir>", "an existing directory, absolute (not inside another pool or the daemon's own directories)")
    .option("--quota <size>", "the most virtual disk size its disks may add up to (e.g. 500G); none: the filesystem's size")
    .option("--json", "print the API's JSON")
    .action(async (name: string, o: ConnectionOptions & { path: string; quota?: string; json?: boolean }) => {
      const p = await connect(o).createPool({ name, path: o.path, ...(o.quota !== undefined ? { quota: o.quota } : {}) });
      process.stdout.write(o.json === true ? toJson(p) : `pool ${p.name} created at ${p.path}\n`);
    });

  clientCommand(pool, "ls", "list storage pools: capacity, quota, allocated, used, available, overcommit")
    .option("--json", "print the API's JSON")
    .action(async (o: ConnectionOptions & { json?: boolean }) => {
      const list = await connect(o).listPools();
      process.stdout.write(o.json === true ? toJson(list) : formatPoolTable(list));
    });

  clientCommand(pool, "show", "one storage pool in detail")
    .argument("<name>", "pool name")
    .option("--json", "print the API's JSON")
    .action(async (name: string, o: ConnectionOptions & { json?: boolean }) => {
      const p = await connect(o).getPool(name);
      process.stdout.write(o.json === true ? toJson(p) : formatPoolDetails(p));
    });

  clientCommand(pool, "rm", "forget a storage pool (its directory and files stay); refused while any disk is in it")
    .argument("<name>", "pool name")
    .action(async (name: string, o: ConnectionOptions) => {
      await connect(o).removePool(name);
      process.stdout.write(`pool ${name} removed\n`);
    });
}
