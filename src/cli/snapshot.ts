/**
 * `typevisor vm snapshot create|ls|show|rollback|rm` and `typevisor vm clone` over the daemon's
 * API (docs/snapshots.md). `ls` draws the snapshots as a tree: each under the one the VM stood on
 * when it was taken, `*` marking the one it stands on now.
 */
import type { Command } from "commander";
import type { SnapshotInfo } from "../control/snapshots.js";
import type { VmInfo } from "../control/spec.js";
import { connect, type ConnectionOptions } from "./connect.js";
import { formatBytes, formatTime, renderFields, renderTable, toJson, withProgress } from "./format.js";
import { escapeControls } from "./terminal-safe.js";
import { clientCommand, EXIT_CODES_HELP, parseNet } from "./vm.js";

/** The snapshots as a tree (parents before children, siblings oldest first), one row each. */
export function formatSnapshotTree(snapshots: readonly SnapshotInfo[]): string {
  const byName = new Set(snapshots.map((s) => s.name));
  const children = new Map<string | undefined, SnapshotInfo[]>();
  for (const s of snapshots) {
    // a parent not in the list (cannot happen from the daemon, but a tree must not lose rows)
    const p = s.parent !== undefined && byName.has(s.parent) ? s.parent : undefined;
    children.set(p, [...(children.get(p) ?? []), s]);
  }
  const rows: (string | undefined)[][] = [];
  const walk = (parent: string | undefined, prefix: string): void => {
    const kids = children.get(parent) ?? [];
    kids.forEach((s, i) => {
      const last = i === kids.length - 1;
      const branch = parent === undefined ? "" : last ? "└─ " : "├─ ";
      rows.push([
        `${prefix}${branch}${s.name}${s.current ? " *" : ""}`,
        formatTime(s.createdAt),
        s.memory ? `yes (${s.vmState})` : "no",
        formatBytes(s.sizeBytes),
        s.description !== undefined ? escapeControls(s.description) : undefined,
      ]);
      walk(s.name, parent === undefined ? prefix : prefix + (last ? "   " : "│  "));
    });
  };
  walk(undefined, "");
  return renderTable(["NAME", "CREATED", "MEMORY", { title: "SIZE", align: "right" }, "DESCRIPTION"], rows);
}

function snapshotDetails(s: SnapshotInfo): string {
  return (
    renderFields([
      ["name", s.name],
      ["id", s.id],
      ["vm", s.vm],
      ["parent", s.parent],
      ["created", formatTime(s.createdAt)],
      ["description", s.description !== undefined ? escapeControls(s.description) : undefined],
      ["memory", s.memory ? `saved (the VM was ${s.vmState})` : `no (disks only; the VM was ${s.vmState})`],
      ["size", formatBytes(s.sizeBytes)],
      ["current", s.current ? "yes: the VM's disks stand on it" : "no"],
    ]) +
    "disks:\n" +
    (s.disks.length === 0 ? "  none\n" : s.disks.map((d) => `  ${d.name}  ${d.layer}  ${d.format}  ${formatBytes(d.sizeBytes)} virtual, ${formatBytes(d.allocatedBytes)} allocated\n`).join(""))
  );
}

function print(text: string): void {
  process.stdout.write(text);
}

export function registerSnapshotCommands(vm: Command): void {
  const snap = vm.command("snapshot").description("snapshots of a VM: its disks and, while it runs, its memory; rollback to one (docs/snapshots.md)").addHelpText("after", EXIT_CODES_HELP);

  clientCommand(snap, "create", "take a snapshot: the disks (frozen, the VM goes on on new overlays) and, if the VM runs, its memory (a short pause while its VMM restarts)")
    .argument("<vm>", "VM name")
    .argument("<name>", "snapshot name: 1-63 lower-case letters, digits and '-'")
    .option("--no-memory", "disks only (crash-consistent for a running VM); a rollback to it boots")
    .option("--description <text>", "a note kept with it")
    .option("--json", "print the snapshot as JSON")
    .action(async (vmName: string, name: string, o: ConnectionOptions & { memory: boolean; description?: string; json?: boolean }) => {
      const s = await withProgress(`snapshotting ${vmName}`, () =>
        connect(o).createSnapshot(vmName, { name, ...(o.memory === false ? { memory: false } : {}), ...(o.description !== undefined ? { description: o.description } : {}) }),
      );
      print(o.json === true ? toJson(s) : `${vmName}: snapshot ${s.name} taken (${s.memory ? "disks and memory" : "disks only"}, ${formatBytes(s.sizeBytes)})\n`);
    });

  clientCommand(snap, "ls", "a VM's snapshots as a tree: parent, date, memory or not, size (* = the one the VM stands on now: taken last or rolled back to)")
    .argument("<vm>", "VM name")
    .option("--json", "print the API's JSON")
    .action(async (vmName: string, o: ConnectionOptions & { json?: boolean }) => {
      const list = await connect(o).listSnapshots(vmName);
      if (o.json === true) print(toJson({ snapshots: list }));
      else if (list.length === 0) print(`${vmName} has no snapshots (take one: typevisor vm snapshot create ${vmName} NAME)\n`);
      else print(formatSnapshotTree(list));
    });

  clientCommand(snap, "show", "one snapshot in detail: its layers and what it takes on disk")
    .argument("<vm>", "VM name")
    .argument("<name>", "snapshot name")
    .option("--json", "print the API's JSON")
    .action(async (vmName: string, name: string, o: ConnectionOptions & { json?: boolean }) => {
      const s = await connect(o).getSnapshot(vmName, name);
      print(o.json === true ? toJson(s) : snapshotDetails(s));
    });

  clientCommand(snap, "rollback", "return the VM to a snapshot: its disks, and with memory the guest running as it was then (what happened since is lost)")
    .argument("<vm>", "VM name")
    .argument("<name>", "snapshot name")
    .option("--json", "print the VM as JSON")
    .action(async (vmName: string, name: string, o: ConnectionOptions & { json?: boolean }) => {
      const info: VmInfo = await withProgress(`rolling ${vmName} back to ${name}`, () => connect(o).rollbackSnapshot(vmName, name));
      print(o.json === true ? toJson(info) : `${vmName}: rolled back to ${name} (${info.state})\n`);
    });

  clientCommand(snap, "rm", "remove a snapshot (its disk layers are freed once nothing stands on them)")
    .argument("<vm>", "VM name")
    .argument("<name>", "snapshot name")
    .action(async (vmName: string, name: string, o: ConnectionOptions) => {
      await connect(o).removeSnapshot(vmName, name);
      print(`${vmName}: snapshot ${name} removed\n`);
    });

  clientCommand(vm, "clone", "a new VM from a snapshot of SRC (without --snapshot: one taken now): linked by default, --full for a copy; a memory snapshot's clone starts running at once")
    .argument("<src>", "the VM to clone")
    .argument("<new>", "the new VM's name")
    .option("--snapshot <name>", "clone this snapshot of SRC (default: take one named clone-NEW)")
    .option("--full", "copy the disks (independent of SRC) instead of overlays on the snapshot's layers")
    .option("--net <tap=NAME[,mac=MAC]>", "the clone's NIC on its own TAP, one per NIC of SRC (repeatable; a new MAC unless given)", (v: string, prev: string[] | undefined) => [...(prev ?? []), v])
    .option("--start", "start the clone of a disk-only snapshot too (a memory snapshot's clone always starts)")
    .option("--json", "print the new VM as JSON")
    .action(async (src: string, name: string, o: ConnectionOptions & { snapshot?: string; full?: boolean; net?: string[]; start?: boolean; json?: boolean }) => {
      const spec = {
        name,
        ...(o.snapshot !== undefined ? { snapshot: o.snapshot } : {}),
        ...(o.full === true ? { full: true } : {}),
        ...(o.net !== undefined ? { nets: o.net.map(parseNet) } : {}),
        ...(o.start === true ? { start: true } : {}),
      };
      const info = await withProgress(`cloning ${src} to ${name}`, () => connect(o).cloneVm(src, spec));
      print(o.json === true ? toJson(info) : `${name}: ${info.state} (a ${o.full === true ? "full" : "linked"} clone of ${src})\n`);
    });
}
