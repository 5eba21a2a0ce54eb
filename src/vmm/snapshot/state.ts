/**
 * A VM snapshot's state file: what every vCPU, the in-kernel interrupt controllers, the PIT,
 * the kvmclock, the serial port and the virtio devices hold, as plain data. Kernel structs are
 * kept as the kernel gave them (base64 of struct kvm_sregs, kvm_xsave, ...: KVM validates them
 * again on restore); 64-bit values as hex strings, never a JS number.
 *
 * On disk (state.json): one header line, then the JSON body.
 *
 *   typevisor-snapshot 1 bytes=<body length> sha256=<hex of the body>\n
 *   {...}
 *
 * Decoding reads at most MAX_STATE_BYTES, checks the header, length and checksum, parses, and
 * validates the body against the schema below before anything is built from it: a truncated,
 * corrupted or foreign file is one clear SNAPSHOT_INVALID error.
 */
import { phase } from "../phases.js";
import { createHash } from "node:crypto";
import { z } from "zod";
import { TypevisorError } from "../../errors.js";
import { MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB } from "../defaults.js";
import { SIZEOF } from "../../kvm/ioctls.js";
import { exactRecord, isU32 } from "../plain-checks.js";
import { MAX_STATE_BYTES, SNAPSHOT_FILES, SNAPSHOT_VERSION } from "./state-file.js";

// The file's framing and the helpers that need no schema live in state-file.ts (loaded without zod).
export { MAX_SNAPSHOT_CHAIN, MAX_STATE_BYTES, SNAPSHOT_FILES, SNAPSHOT_VERSION, b64, encodeState, fromB64, hex, stateSha256 } from "./state-file.js";

const HEX64 = /^0x[0-9a-f]{1,16}$/;
const hex64 = z.string().regex(HEX64, "a 64-bit value as 0x-prefixed hex");

/** Base64 of exactly `size` bytes (or at least `size` with `atLeast`: kvm_xsave grows with KVM_CAP_XSAVE2). */
function blob(size: number, atLeast = false) {
  const maxB64 = Math.ceil((atLeast ? 64 * 1024 : size) / 3) * 4;
  return z.string().max(maxB64).regex(/^[A-Za-z0-9+/]*={0,2}$/, "base64").refine((s) => {
    const n = Buffer.from(s, "base64").length;
    return atLeast ? n >= size : n === size;
  }, `must be ${atLeast ? "at least " : ""}${size} bytes`);
}

/**
 * A list of flat records with exactly `fields` (each passing its check), at most `max` long,
 * checked in one loop. An object schema per entry costs far more while V8 has not optimized
 * zod's code yet, as inside a migration's pause (its destination checks one sample state ahead):
 * the vCPU's ~70 MSRs and ~80 CPUID entries were most of the state's check. The vCPU schema's
 * second run took 2.5 ms on the host, 0.2 ms with these loops; the lab's pause spent 110-136 ms in
 * the whole state's schema.
 */
function flatList<T>(fields: Record<keyof T & string, (v: unknown) => boolean>, max: number, what: string) {
  const entry = exactRecord(fields);
  return z.custom<T[]>((v) => {
    if (!Array.isArray(v) || v.length > max) return false;
    // A loop rather than every(): a hole in the array is an entry that fails, not one skipped.
    for (const e of v as unknown[]) if (!entry(e)) return false;
    return true;
  }, `must be at most ${max} entries of exactly {${Object.keys(fields).join(", ")}} (${what})`);
}

const regNames = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags"] as const;

export const VcpuStateSchema = z.object({
  id: z.number().int().min(0).max(MAX_VCPUS - 1),
  /** KVM_MP_STATE_* (KVM API §4.38): 0 runnable .. 8 (AP reset hold); anything else KVM refuses. */
  mpState: z.number().int().min(0).max(16),
  regs: z.object(Object.fromEntries(regNames.map((r) => [r, hex64])) as Record<(typeof regNames)[number], typeof hex64>),
  sregs: blob(SIZEOF.kvm_sregs),
  xsave: blob(SIZEOF.kvm_xsave, true),
  xcrs: blob(SIZEOF.kvm_xcrs).nullable(),
  debugregs: blob(SIZEOF.kvm_debugregs),
  lapic: blob(SIZEOF.kvm_lapic_state),
  msrs: flatList<{ index: number; data: string }>({ index: isU32, data: (v) => typeof v === "string" && HEX64.test(v) }, 4096, "u32 index, 0x-hex data"),
  events: blob(SIZEOF.kvm_vcpu_events),
  cpuid: flatList<{ function: number; index: number; flags: number; eax: number; ebx: number; ecx: number; edx: number }>(
    { function: isU32, index: isU32, flags: isU32, eax: isU32, ebx: isU32, ecx: isU32, edx: isU32 },
    4096,
    "u32 fields",
  ),
  /** The guest's TSC frequency (KVM_GET_TSC_KHZ), null where KVM does not say. */
  tscKhz: z.number().int().min(1).max(100_000_000).nullable(),
});
export type VcpuState = z.infer<typeof VcpuStateSchema>;

export const VmKvmStateSchema = z.object({
  picMaster: blob(SIZEOF.kvm_irqchip),
  picSlave: blob(SIZEOF.kvm_irqchip),
  ioapic: blob(SIZEOF.kvm_irqchip),
  pit2: blob(SIZEOF.kvm_pit_state2),
  clock: blob(SIZEOF.kvm_clock_data),
  /** The host's wall time when saved (ns since the epoch): moves the clock on where KVM_CLOCK_REALTIME is not available. */
  savedAtNs: hex64,
});
export type VmKvmState = z.infer<typeof VmKvmStateSchema>;

export const SerialStateSchema = z.object({
  ier: z.number().int().min(0).max(255), lcr: z.number().int().min(0).max(255), mcr: z.number().int().min(0).max(255),
  scr: z.number().int().min(0).max(255), dll: z.number().int().min(0).max(255), dlm: z.number().int().min(0).max(255),
  fcr: z.number().int().min(0).max(255), threPending: z.boolean(), rx: z.array(z.number().int().min(0).max(255)).max(4096),
});

const pathString = z.string().min(1).max(4096).refine((s) => !s.includes("\0"), "no NUL bytes");

/** What the VM was made of: enough to build the same machine again (and to boot it on a reset). */
export const SnapshotConfigSchema = z.object({
  cpus: z.number().int().min(1).max(MAX_VCPUS),
  memoryMiB: z.number().int().min(MIN_MEMORY_MIB).max(MAX_MEMORY_MIB),
  vcpuNice: z.number().int().min(0).max(19).optional(),
  memoryOvercommit: z.number().positive().max(64).optional(),
  devices: z.object({
    disks: z.array(z.object({ path: pathString, readonly: z.boolean(), format: z.enum(["raw", "qcow2"]).optional(), serial: z.string().max(20).optional() })).max(64),
    nets: z.array(z.object({ tap: z.string().min(1).max(15), mac: z.string().max(17).optional() })).max(64),
    rng: z.boolean(),
    balloon: z.object({ statsPollSeconds: z.number().int().min(0).max(86_400), deflateOnOom: z.boolean() }).optional(),
    vsock: z.object({ cid: z.number().int().min(3).max(0xffff_fffe), uds: pathString }).optional(),
  }),
  /** The boot payload, by path: a restored VM that the guest reboots boots from these. */
  boot: z.object({ kernel: pathString, initrd: pathString.optional(), cmdline: z.string().max(64 * 1024) }).optional(),
});
export type SnapshotConfig = z.infer<typeof SnapshotConfigSchema>;

const pageRun = z.tuple([z.number().int().min(0), z.number().int().min(1)]);

export const MemoryLayoutSchema = z.object({
  file: z.literal(SNAPSHOT_FILES.memory),
  bytes: z.number().int().min(0).max(MAX_MEMORY_MIB * 1024 * 1024),
  /**
   * Each RAM region at `fileOffset` of the memory file (offsets page-aligned, regions back to
   * back). In an incremental snapshot, `runs` lists the pages the file holds ([first page, count]
   * within the region, ascending, apart); every other page is the base's.
   */
  regions: z.array(z.object({
    guestPhysAddr: z.number().int().min(0), size: z.number().int().min(4096), fileOffset: z.number().int().min(0),
    runs: z.array(pageRun).max(1 << 22).optional(),
  })).min(1).max(8),
  /**
   * Set in an incremental snapshot: the snapshot this one holds the changes since, found at
   * `path` (relative to this snapshot's directory, or absolute), whose state.json body must have
   * this SHA-256 (its header's): a base replaced or changed since is refused.
   */
  base: z.object({ path: z.string().min(1).max(4096).refine((v) => !v.includes("\0"), "no NUL bytes"), sha256: z.string().regex(/^[0-9a-f]{64}$/) }).optional(),
}).superRefine((m, ctx) => {
  for (const [i, r] of m.regions.entries()) {
    if (r.runs === undefined) {
      if (m.base !== undefined) ctx.addIssue({ code: "custom", message: `region ${i}: an incremental snapshot lists its pages` });
      continue;
    }
    if (m.base === undefined) ctx.addIssue({ code: "custom", message: `region ${i}: page runs without a base snapshot` });
    let next = 0;
    for (const [start, count] of r.runs) {
      if (start < next || start + count > r.size / 4096) {
        ctx.addIssue({ code: "custom", message: `region ${i}: page runs must be ascending, apart and inside the region` });
        break;
      }
      next = start + count + 1;
    }
  }
});
export type MemoryLayout = z.infer<typeof MemoryLayoutSchema>;

export const SnapshotStateSchema = z.object({
  version: z.literal(SNAPSHOT_VERSION),
  createdAt: z.string().max(64),
  /** What the guest was doing when saved: a restore goes back to it (paused stays paused unless told). */
  runState: z.enum(["running", "paused"]),
  config: SnapshotConfigSchema,
  /** Null: the configuration only (a disk-only snapshot), which cannot be restored by the VMM. */
  memory: MemoryLayoutSchema.nullable(),
  vcpus: z.array(VcpuStateSchema).max(MAX_VCPUS),
  vm: VmKvmStateSchema.nullable(),
  platform: z.object({ serial: SerialStateSchema }).nullable(),
  /** The device thread's state (its own schema validates it: devices/platform). */
  devices: z.unknown(),
}).superRefine((s, ctx) => {
  if (s.memory !== null) {
    if (s.vcpus.length !== s.config.cpus) ctx.addIssue({ code: "custom", message: `${s.vcpus.length} vCPU states for ${s.config.cpus} vCPUs` });
    if (s.vcpus.some((v, i) => v.id !== i)) ctx.addIssue({ code: "custom", message: "vCPU states out of order" });
    if (s.vm === null || s.platform === null) ctx.addIssue({ code: "custom", message: "a snapshot with memory needs the VM and platform state" });
    const total = s.memory.regions.reduce((n, r) => n + r.size, 0);
    if (total !== s.config.memoryMiB * 1024 * 1024 || s.memory.bytes !== total) ctx.addIssue({ code: "custom", message: `memory regions of ${total} bytes for ${s.config.memoryMiB} MiB` });
    let off = 0;
    for (const r of s.memory.regions) {
      if (r.fileOffset !== off || r.size % 4096 !== 0) ctx.addIssue({ code: "custom", message: "memory regions must lie back to back in page-sized multiples" });
      off += r.size;
    }
  }
});
export type SnapshotState = z.infer<typeof SnapshotStateSchema>;


const invalid = (what: string, detail: string): TypevisorError =>
  new TypevisorError("SNAPSHOT_INVALID", `${what}: ${detail}`, { hint: "the snapshot is damaged or was not written by this version of typevisor; take a new one" });

/**
 * The state in `bytes` (a state.json file's content), validated. `what` names the file in errors.
 * @throws TypevisorError SNAPSHOT_INVALID (never anything else for any input)
 */
export function decodeState(bytes: Uint8Array, what: string): SnapshotState {
  if (bytes.length > MAX_STATE_BYTES) throw invalid(what, `${bytes.length} bytes, more than a state file can be (${MAX_STATE_BYTES})`);
  const nl = Buffer.from(bytes.subarray(0, 256)).indexOf(0x0a);
  if (nl < 0) throw invalid(what, "no header line (not a typevisor snapshot, or truncated)");
  const header = Buffer.from(bytes.subarray(0, nl)).toString("latin1");
  const m = /^typevisor-snapshot (\d+) bytes=(\d+) sha256=([0-9a-f]{64})$/.exec(header);
  if (m === null) throw invalid(what, "not a typevisor snapshot state file (bad header)");
  if (Number(m[1]) !== SNAPSHOT_VERSION) throw invalid(what, `snapshot format version ${m[1]}, this typevisor reads version ${SNAPSHOT_VERSION}`);
  const body = Buffer.from(bytes.subarray(nl + 1));
  if (body.length !== Number(m[2])) throw invalid(what, `truncated or padded: the body is ${body.length} bytes, the header says ${m[2]}`);
  if (createHash("sha256").update(body).digest("hex") !== m[3]) throw invalid(what, "checksum mismatch (the file was changed or damaged)");
  phase("sha256");
  let json: unknown;
  try {
    json = JSON.parse(body.toString("utf8"));
  } catch {
    throw invalid(what, "the body is not JSON");
  }
  phase("json");
  const r = SnapshotStateSchema.safeParse(json);
  phase("schema");
  if (!r.success) {
    const first = r.error.issues[0];
    throw invalid(what, `${first?.path.join(".") || "(root)"}: ${first?.message ?? "invalid"}`);
  }
  return r.data;
}
