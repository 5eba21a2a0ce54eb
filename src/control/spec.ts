/**
 * The VM specification: what a user asks for when creating a VM. One zod
 * schema validates API requests and CLI input and generates the OpenAPI
 * document (src/api/openapi.ts), so the three never disagree. Strict objects:
 * an unknown field is an error, not silently ignored.
 */
import { z } from "zod";
import { MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB } from "../vmm/defaults.js";

/** Names become file and cgroup names: no path characters, no leading dash. */
export const NAME_PATTERN = /^[a-z0-9][a-z0-9-]{0,62}$/;
export const vmName = z
  .string()
  .regex(NAME_PATTERN, "a name is 1-63 lower-case letters, digits and '-', starting with a letter or digit")
  .describe("VM name, unique on this host");

const SIZE_PATTERN = /^\s*\d+(\.\d+)?\s*([KMGT](i?B)?|B)?\s*$/i;
/** Bytes as a number, or a string with a K/M/G/T suffix (powers of 1024). */
export const sizeField = z
  .union([z.number().int().positive(), z.string().regex(SIZE_PATTERN, "a size is a number of bytes or a number with K, M, G or T")])
  .describe('size in bytes, or with a suffix: "2G", "512M"');

const absolutePath = z.string().min(1).max(4096).startsWith("/", "give an absolute path");

export const netSpec = z
  .object({
    tap: z.string().regex(/^[a-zA-Z0-9_.-]{1,15}$/, "a TAP name is 1-15 letters, digits, '_', '.' or '-'"),
    mac: z.string().regex(/^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$/, "a MAC is six hex pairs: 52:54:00:12:34:56").optional(),
  })
  .strict();

export const vmSpec = z
  .object({
    name: vmName,
    image: z.string().regex(/^[a-z0-9][a-z0-9._-]{0,62}$/, "an image name is lower-case letters, digits, '.', '_' and '-'").optional()
      .describe("boot this image (typevisor image ls); its root filesystem becomes the VM's own disk"),
    kernel: absolutePath.optional().describe("boot this kernel instead of an image's (host path); with an imported disk image (image import), the kernel it boots"),
    initrd: absolutePath.optional(),
    cmdline: z.string().max(2048).optional().describe("kernel command line, replacing the default"),
    append: z.string().max(2048).optional().describe("text appended to the default kernel command line"),
    // The VMM's own limits (vmm/defaults.ts); the host's (KVM_CAP_MAX_VCPUS, physical memory ×
    // overcommit) are checked at admission and by the VMM, each with its own message.
    cpus: z.number().int().min(1).max(MAX_VCPUS).default(1),
    memoryMiB: z.number().int().min(MIN_MEMORY_MIB).max(MAX_MEMORY_MIB).default(256),
    diskSize: sizeField.optional().describe("size of the VM's disk (grown to this size from the image's root filesystem, or blank)"),
    diskFormat: z
      .enum(["qcow2", "raw"])
      .default("qcow2")
      .describe("qcow2: a thin overlay on a shared read-only base of the image (instant, small whatever the size); raw: a full copy"),
    pool: z.string().regex(NAME_PATTERN, "a pool name is 1-63 lower-case letters, digits and '-'").default("default")
      .describe("the storage pool the VM's disk goes in (typevisor pool ls)"),
    nets: z.array(netSpec).max(8).default([]),
    rng: z.boolean().default(true),
    balloon: z.boolean().default(false),
    cpuWeight: z.number().int().min(1).max(10000).optional().describe("cgroup v2 cpu.weight (default 100)"),
    restart: z.enum(["no", "on-crash"]).default("no").describe("restart the VM when its VMM process dies unexpectedly"),
  })
  .strict()
  .refine((s) => s.image !== undefined || s.kernel !== undefined, { message: "give an image or a kernel to boot" })
  .refine((s) => !(s.cmdline !== undefined && s.append !== undefined), { message: "give either cmdline (replaces) or append (adds), not both" });

/** What `vm disk add` takes. */
export const diskAddSpec = z
  .object({
    size: sizeField.describe("the disk's size (virtual size for qcow2)"),
    pool: z.string().regex(NAME_PATTERN, "a pool name is 1-63 lower-case letters, digits and '-'").default("default").describe("the storage pool it goes in"),
    format: z.enum(["qcow2", "raw"]).default("qcow2").describe("qcow2: thin; raw: a sparse file"),
  })
  .strict();

/** What a client sends. */
export type VmSpecInput = z.input<typeof vmSpec>;
/** With defaults filled in: what the inventory stores. */
export type VmSpec = z.output<typeof vmSpec>;

/** migrating: this daemon's VM is being moved to another daemon; incoming: a VM being moved here (control/migration.ts). */
export const VM_STATES = ["defined", "starting", "running", "paused", "stopping", "stopped", "crashed", "migrating", "incoming"] as const;
export type VmState = (typeof VM_STATES)[number];

export const vmExit = z.object({
  result: z.enum(["poweroff", "stopped", "reset", "crash", "error", "killed", "migrated"]),
  code: z.number().int().nullable(),
  signal: z.string().nullable(),
  reason: z.string().optional(),
  at: z.string(),
});
export type VmExit = z.infer<typeof vmExit>;

export const diskInfo = z.object({
  name: z.string().describe("disk0 (the one the VM boots from), disk1, ...: what vm disk rm takes"),
  path: z.string(),
  sizeBytes: z.number().describe("the size the guest sees (a qcow2 disk's virtual size)"),
  image: z.string().optional(),
  format: z.enum(["raw", "qcow2"]),
  allocatedBytes: z.number().describe("bytes the disk's file takes on the host now"),
  backing: z.string().optional().describe("a qcow2 overlay's backing file (its base)"),
  pool: z.string().describe("the storage pool it is in"),
});

export const vmInfo = z.object({
  id: z.string(),
  name: z.string(),
  state: z.enum(VM_STATES),
  spec: z.record(z.string(), z.unknown()).describe("the VmSpec, defaults filled in"),
  createdAt: z.string(),
  updatedAt: z.string(),
  pid: z.number().int().optional(),
  startedAt: z.string().optional(),
  disks: z.array(diskInfo),
  consoleLog: z.string(),
  apiSocket: z.string(),
  lastExit: vmExit.optional(),
  restarts: z.number().int(),
  cgroup: z.string().optional(),
  sandbox: z
    .object({ uid: z.number().int().describe("the VMM's own uid, also its gid (from the daemon's --sandbox-uids range)") })
    .optional()
    .describe("present while the VMM runs in its sandbox (docs/security.md, \"The VMM sandbox\")"),
  unresponsive: z
    .object({ since: z.string() })
    .optional()
    .describe("present while the VMM's control API does not answer within a few seconds (a hung or stopped VMM); its state is what it was before"),
  consoleDroppedBytes: z
    .number()
    .int()
    .optional()
    .describe("guest console output the VMM could not write to the console log (its disk full) since it started; absent when none"),
  pauseReason: z
    .object({ kind: z.string(), message: z.string(), disk: z.string().optional(), filesystem: z.string().optional() })
    .optional()
    .describe("present while the VMM paused the VM by itself: kind disk-full (a disk's filesystem is full; its writes wait, resume once space is freed)"),
});
export type VmInfo = z.infer<typeof vmInfo>;

export const vmUsage = z.object({
  at: z.string(),
  cpuSeconds: z.number().describe("CPU time of the VMM process (guest and VMM)"),
  cpuPercent: z.number().describe("since the previous sample; 100 = one host CPU"),
  memoryBytes: z.number().describe("resident memory of the VMM process (cgroup memory.current where limited)"),
  diskReadBytes: z.number(),
  diskWriteBytes: z.number(),
  netRxBytes: z.number(),
  netTxBytes: z.number(),
  uptimeMs: z.number(),
});
export type VmUsage = z.infer<typeof vmUsage>;

export const eventRecord = z.object({
  seq: z.number().int(),
  at: z.string(),
  type: z.string().describe("vm.created, vm.starting, vm.running, vm.paused (data.reason disk-full when the VMM paused it because a disk's filesystem is full), vm.resumed, vm.stopping, vm.stopped, vm.crashed, vm.rebooted, vm.removed, vm.restarting, vm.reattached, vm.migrating, vm.migrated (it left this daemon), vm.incoming, vm.migrated-in (it arrived), vm.migration-failed, daemon.started, daemon.stopping"),
  vm: z.string().optional(),
  message: z.string(),
  data: z.record(z.string(), z.unknown()).optional(),
});
export type EventRecord = z.infer<typeof eventRecord>;
