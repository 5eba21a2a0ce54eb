/**
 * Where a VM is assembled: the one place that turns a machine description into a running Vm,
 * with two entries, a cold boot (`bootVm`) and a snapshot (`restoreVm`). `typevisor run`, a
 * guest's reboot and a restore all come through here; the CLI only parses flags into a
 * MachineConfig.
 */
import { closeSync, fstatSync, openSync, readFileSync, realpathSync, statSync } from "node:fs";
import { join, resolve } from "node:path";
import { TypevisorError } from "../errors.js";
import { discardPages } from "../sys/iov.js";
import type { DeviceSpecs } from "./device-specs.js";
import type { MemoryLayer } from "./snapshot/memory.js";
import { MAX_SNAPSHOT_CHAIN, MAX_STATE_BYTES, SNAPSHOT_FILES, stateSha256 } from "./snapshot/state-file.js";
import type { SnapshotConfig, SnapshotState } from "./snapshot/state.js";
import { Vm, type PauseReason } from "./vm.js";
import { phase } from "./phases.js";

/** A VM's whole description as plain data (what a snapshot's config.json holds). */
export type MachineConfig = SnapshotConfig;

/** What the host side provides, whichever way the VM is made. */
export interface VmHost {
  consoleFd: number;
  onPaused?: (reason: PauseReason) => void;
  /** Each vCPU thread installs its own seccomp filter (sys/seccomp.ts vcpuFilter) before it runs the guest. */
  vcpuSeccomp?: boolean;
}

/** Kernel and initrd already read (the first boot reads them once to validate them). */
export interface BootPayload {
  kernel: Uint8Array;
  initrd?: Uint8Array;
}

function readInput(path: string, what: string): Uint8Array {
  try {
    const st = statSync(path);
    if (!st.isFile()) throw new TypevisorError("INVALID_ARGUMENT", `${what} ${path} is not a regular file`);
    return readFileSync(path);
  } catch (e) {
    if (e instanceof TypevisorError) throw e;
    const code = (e as NodeJS.ErrnoException).code;
    throw new TypevisorError("FILE_NOT_FOUND", `${what} ${path}: ${code === "ENOENT" ? "no such file" : (e as Error).message}`);
  }
}

/** The kernel and initrd of `config.boot`, read now. */
export function readBootPayload(config: MachineConfig): BootPayload {
  if (config.boot === undefined) throw new TypevisorError("INVALID_ARGUMENT", "this VM has no kernel to boot (it was restored from a snapshot that names none)");
  return {
    kernel: readInput(config.boot.kernel, "kernel"),
    ...(config.boot.initrd !== undefined ? { initrd: readInput(config.boot.initrd, "initrd") } : {}),
  };
}

/**
 * A VM that boots `config.boot`'s kernel (read now unless `payload` has it). The payload is
 * spent once the VM is built (its bytes are in guest memory): its pages are handed back then
 * (iov.ts discardPages), and it must not be used again.
 */
export function bootVm(config: MachineConfig, host: VmHost, payload?: BootPayload): Vm {
  const p = payload ?? readBootPayload(config);
  try {
    return new Vm({
      ...shape(config), ...host,
      boot: { kind: "linux", kernel: p.kernel, ...(p.initrd !== undefined ? { initrd: p.initrd } : {}), cmdline: config.boot!.cmdline },
    });
  } finally {
    discardPages(p.kernel);
    if (p.initrd !== undefined) discardPages(p.initrd);
  }
}

function shape(config: MachineConfig): { cpus: number; memoryMiB: number; devices: DeviceSpecs; vcpuNice?: number; memoryOvercommit?: number } {
  return {
    cpus: config.cpus, memoryMiB: config.memoryMiB, devices: config.devices,
    ...(config.vcpuNice !== undefined ? { vcpuNice: config.vcpuNice } : {}),
    ...(config.memoryOvercommit !== undefined ? { memoryOvercommit: config.memoryOvercommit } : {}),
  };
}

/** A VM for an incoming live migration: memory empty, state to come (Vm.applyState). */
export function incomingVm(config: MachineConfig, host: VmHost): Vm {
  return new Vm({ ...shape(config), ...host, boot: { kind: "incoming" } });
}

/** Back ends a restore puts in place of the snapshot's (a clone's own disk, TAP, MAC, CID); each list replaces the saved one in order. */
export interface RestoreOverrides {
  disks?: DeviceSpecs["disks"];
  nets?: DeviceSpecs["nets"];
  vsock?: DeviceSpecs["vsock"];
  /** What a guest reboot boots (the same command line), in place of the snapshot's kernel and initrd paths: a clone's own copies. */
  rebootKernel?: { kernel: string; initrd?: string };
  vcpuNice?: number;
  memoryOvercommit?: number;
}

type DecodeState = typeof import("./snapshot/state.js").decodeState;

/**
 * The state file's decoder, loaded on the first restore only: its schemas need zod, which a VMM
 * that boots and never restores does not load (snapshot/state-file.ts says what it costs).
 */
async function stateDecoder(): Promise<DecodeState> {
  return (await import("./snapshot/state.js")).decodeState;
}

/** The bytes of `dir`'s state.json (a regular file, at most MAX_STATE_BYTES), not yet decoded. */
function readStateFile(dir: string): Buffer {
  const path = join(dir, SNAPSHOT_FILES.state);
  try {
    const st = statSync(path);
    if (!st.isFile()) throw new TypevisorError("SNAPSHOT_INVALID", `${path} is not a regular file`);
    if (st.size > MAX_STATE_BYTES) throw new TypevisorError("SNAPSHOT_INVALID", `${path}: ${st.size} bytes, more than a state file can be`);
    return readFileSync(path);
  } catch (e) {
    if (e instanceof TypevisorError) throw e;
    const code = (e as NodeJS.ErrnoException).code;
    throw new TypevisorError("SNAPSHOT_NOT_FOUND", `${dir}: ${code === "ENOENT" ? "not a snapshot (no state.json)" : (e as Error).message}`);
  }
}

/** The saved configuration with `o`'s back ends in place of the saved ones (same count and kinds). */
export function applyOverrides(saved: MachineConfig, o: RestoreOverrides): MachineConfig {
  const devices = { ...saved.devices };
  if (o.disks !== undefined && o.disks.length > 0) {
    if (o.disks.length !== saved.devices.disks.length) throw new TypevisorError("SNAPSHOT_MISMATCH", `the snapshot has ${saved.devices.disks.length} disks; --disk was given ${o.disks.length} times`);
    devices.disks = o.disks;
  }
  if (o.nets !== undefined && o.nets.length > 0) {
    if (o.nets.length !== saved.devices.nets.length) throw new TypevisorError("SNAPSHOT_MISMATCH", `the snapshot has ${saved.devices.nets.length} network devices; --net was given ${o.nets.length} times`);
    devices.nets = o.nets;
  }
  if (o.vsock !== undefined) {
    if (saved.devices.vsock === undefined) throw new TypevisorError("SNAPSHOT_MISMATCH", "the snapshot has no vsock device");
    devices.vsock = o.vsock;
  }
  const rk = o.rebootKernel;
  return {
    ...saved, devices,
    ...(rk !== undefined ? { boot: { cmdline: saved.boot?.cmdline ?? "", kernel: rk.kernel, ...(rk.initrd !== undefined ? { initrd: rk.initrd } : {}) } } : {}),
    ...(o.vcpuNice !== undefined ? { vcpuNice: o.vcpuNice } : {}),
    ...(o.memoryOvercommit !== undefined ? { memoryOvercommit: o.memoryOvercommit } : {}),
  };
}

/**
 * A snapshot made ready for a restore before it is asked for (a standby VMM's template:
 * cli/standby.ts): its state file's bytes and what they decode to, and a VM built for it with that
 * state in place, which the first restore of that very snapshot takes.
 */
export interface PreparedRestore {
  /** The snapshot's directory, resolved. */
  dir: string;
  bytes: Buffer;
  state: SnapshotState;
  /** Built ahead (boot.deferState); undefined once a restore took or dropped it. */
  vm: Vm | undefined;
  /** Each memory file the VM maps, as it was opened: the VM is taken only while these are still the files at those paths. */
  files: { path: string; dev: number; ino: number; size: number; mtimeMs: number }[];
}

/**
 * Make ready for restores of the snapshot in `dir`: its state decoded and kept, and a VM built
 * for it with the state in place, its memory mapped and the host page tables of the guest's data
 * filled (snapshot/memory.ts populateMemoryLayers). A restore of that snapshot then only gives it
 * its console and back ends. In the lab (docs/benchmarks.md, 2026-12-06), a standby's restore of a
 * 256 MiB guest spent 0.14 s decoding the state, 0.07 s building the VM, 0.15 s applying the state
 * (cold code, and OpenSSL's first random bytes for the generation ID) and 0.07 s more in host page
 * faults under the guest's first touches.
 */
export async function prepareRestore(dir: string): Promise<PreparedRestore> {
  const decodeState = await stateDecoder();
  const real = realpathSync(dir);
  const bytes = readStateFile(real);
  const state = decodeState(bytes, join(real, SNAPSHOT_FILES.state));
  if (state.memory === null) throw new TypevisorError("SNAPSHOT_INVALID", `${dir}: a snapshot without memory (disk-only) cannot be restored into a running VM`);
  const layers = openMemoryChain(real, state, decodeState);
  let vm: Vm;
  try {
    vm = new Vm({ ...shape(state.config), consoleFd: 1, boot: { kind: "snapshot", state, memory: layers, what: real, deferState: true } });
  } catch (e) {
    for (const l of layers) closeSync(l.fd);
    throw e;
  }
  // The state goes in now, as at the restore itself: the guest's clocks, once set, run on with the
  // host's (KVM_SET_CLOCK's kvmclock, the TSC's offset), so when the VM runs they say the time of
  // that moment, as they would had the state been set then; the new generation ID is this VM's
  // alone. What a request brings (console, back ends) is only the host's side (takeHost).
  try {
    vm.applyState(state, { what: real, newMachine: true });
  } catch (e) {
    vm.destroy();
    throw e;
  }
  const files = layers.map((l) => {
    const st = fstatSync(l.fd);
    return { path: join(l.what, SNAPSHOT_FILES.memory), dev: st.dev, ino: st.ino, size: st.size, mtimeMs: st.mtimeMs };
  });
  return { dir: real, bytes, state, vm, files };
}

/** `p`'s VM, if a restore of `dir` may take it: the same snapshot, its memory files unchanged. Otherwise (or without `dir`) it is given up. */
async function takePrepared(p: PreparedRestore, dir?: string): Promise<Vm | undefined> {
  const vm = p.vm;
  if (vm === undefined) return undefined;
  p.vm = undefined;
  let same = false;
  try {
    same = dir !== undefined && realpathSync(dir) === p.dir && p.files.every((f) => {
      const st = statSync(f.path);
      return st.dev === f.dev && st.ino === f.ino && st.size === f.size && st.mtimeMs === f.mtimeMs;
    });
  } catch {
    // gone or unreadable: not the same
  }
  if (same) return vm;
  // Its memory and KVM VM go before another is built.
  await vm.discard();
  return undefined;
}

/**
 * A VM restored from the snapshot in `dir`: its memory mapped from the snapshot's file (loaded
 * as the guest touches it), every vCPU and device as saved. Bad input (a damaged or foreign
 * snapshot, a CPU that lacks what the guest used) fails here, before any vCPU runs. `prepared`:
 * what a standby made ready for its template (prepareRestore), used when `dir`'s state file holds
 * exactly its bytes.
 */
export async function restoreVm(dir: string, overrides: RestoreOverrides, host: VmHost, opts: { keepClock?: boolean; prepared?: PreparedRestore } = {}): Promise<{ vm: Vm; config: MachineConfig; state: SnapshotState; builtAhead: boolean }> {
  const decodeState = await stateDecoder();
  phase("restoreVm");
  const bytes = readStateFile(dir);
  const p = opts.prepared !== undefined && bytes.equals(opts.prepared.bytes) ? opts.prepared : undefined;
  // Another snapshot: the VM built ahead goes first (its memory and KVM VM), then this one is built as usual.
  if (p === undefined && opts.prepared?.vm !== undefined) await takePrepared(opts.prepared);
  const state = p !== undefined ? p.state : decodeState(bytes, join(dir, SNAPSHOT_FILES.state));
  phase("decoded");
  if (state.memory === null) throw new TypevisorError("SNAPSHOT_INVALID", `${dir}: a snapshot without memory (disk-only) cannot be restored into a running VM; boot its disk instead`);
  const config = applyOverrides(state.config, overrides);
  // --keep-clock wants the clocks as saved, not run on since the VM was built: that one is built now.
  const ahead = p !== undefined ? await takePrepared(p, opts.keepClock === true ? undefined : dir) : undefined;
  if (ahead !== undefined) {
    try {
      ahead.takeHost({ ...host, devices: config.devices, vcpuNice: config.vcpuNice, memoryOvercommit: config.memoryOvercommit });
    } catch (e) {
      await ahead.discard();
      throw e;
    }
    return { vm: ahead, config, state, builtAhead: true };
  }
  const layers = openMemoryChain(dir, state, decodeState);
  try {
    const vm = new Vm({
      ...shape(config), ...host,
      boot: { kind: "snapshot", state, memory: layers, what: dir, ...(opts.keepClock === true ? { keepClock: true } : {}) },
    });
    return { vm, config, state, builtAhead: false };
  } catch (e) {
    // The Vm owns the files only once built.
    for (const l of layers) closeSync(l.fd);
    throw e;
  }
}

function openMemoryFile(dir: string): number {
  const memPath = join(dir, SNAPSHOT_FILES.memory);
  try {
    return openSync(memPath, "r");
  } catch (e) {
    throw new TypevisorError("SNAPSHOT_INVALID", `${memPath}: ${(e as NodeJS.ErrnoException).code === "ENOENT" ? "missing" : (e as Error).message}`);
  }
}

/**
 * The memory files a restore of `state` (read from `dir`) maps, base first: its own, and for an
 * incremental snapshot its base's, and so on down to a full snapshot. Each base must be the very
 * snapshot named (its state's SHA-256), of the same machine, at most MAX_SNAPSHOT_CHAIN deep.
 */
export function openMemoryChain(dir: string, state: SnapshotState, decodeState: DecodeState): MemoryLayer[] {
  const layers: MemoryLayer[] = [];
  try {
    let cur = { dir, state };
    for (;;) {
      const memory = cur.state.memory;
      if (memory === null) throw new TypevisorError("SNAPSHOT_INVALID", `${cur.dir}: a snapshot without memory (disk-only) cannot be the base of a restore`);
      layers.unshift({ fd: openMemoryFile(cur.dir), layout: memory, what: cur.dir });
      if (memory.base === undefined) return layers;
      if (layers.length > MAX_SNAPSHOT_CHAIN) throw new TypevisorError("SNAPSHOT_INVALID", `${dir}: more than ${MAX_SNAPSHOT_CHAIN} incremental snapshots stand on each other`);
      const baseDir = resolve(cur.dir, memory.base.path);
      const bytes = readStateFile(baseDir);
      if (stateSha256(bytes) !== memory.base.sha256) {
        throw new TypevisorError("SNAPSHOT_MISMATCH", `${cur.dir}: its base ${baseDir} is not the snapshot it was taken on (replaced or changed since)`);
      }
      const base = decodeState(bytes, join(baseDir, SNAPSHOT_FILES.state));
      const same = base.memory !== null && base.config.memoryMiB === state.config.memoryMiB && base.memory.regions.length === memory.regions.length &&
        base.memory.regions.every((r, i) => r.guestPhysAddr === memory.regions[i]!.guestPhysAddr && r.size === memory.regions[i]!.size);
      if (!same) throw new TypevisorError("SNAPSHOT_MISMATCH", `${cur.dir}: its base ${baseDir} is not of the same machine's memory`);
      cur = { dir: baseDir, state: base };
    }
  } catch (e) {
    for (const l of layers) closeSync(l.fd);
    throw e;
  }
}
