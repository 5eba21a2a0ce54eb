/**
 * One virtual machine: guest memory, the in-kernel interrupt controllers and
 * PIT, platform tables, the loaded kernel, and one worker_thread per vCPU.
 *
 * Order matters and follows what KVM documents: the irqchip must exist before
 * vCPUs are created (KVM API §4.24), CPUID before the first KVM_RUN, and
 * everything the guest can see is validated and written before any vCPU runs.
 */
import { totalmem } from "node:os";
import { setFlagsFromString } from "node:v8";
import type { Worker } from "node:worker_threads";
import { endPrestarted, spawnWorker } from "./threads/spawn.js";
import { TypevisorError } from "../errors.js";
import { formatBytes } from "../size.js";
import { Kvm, VcpuFd, VmFd } from "../kvm/kvm.js";
import { CAP, EXIT_NAMES, KVM_MEM_LOG_DIRTY_PAGES, X2APIC_API } from "../kvm/ioctls.js";
import { decodeSregs, encodeBootFpu, type KvmCpuidEntry, type KvmRegs } from "../kvm/structs.js";
import * as libc from "../sys/libc.js";
import { writeAcpiTables } from "./arch/x86_64/acpi/tables.js";
import { loadKernel, type BootCpuState, type BootPlan } from "./arch/x86_64/boot/index.js";
import { filterCpuid } from "./arch/x86_64/cpuid.js";
import { IRQ, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR, PCI_ECAM_START, ramRanges } from "./arch/x86_64/layout.js";
import { pciHostBridgeAml } from "./devices/pci/acpi.js";
import { newGeneration, writeGenerationId } from "./devices/legacy/vmgenid/vmgenid.js";
import { Serial, createSerialShared } from "./devices/legacy/serial/serial.js";
import { DirtyLog, GuestMemory, type HostRegion } from "./memory/guest-memory.js";
import { CTRL, STAT_SLOTS, THROTTLE_SLICE_MS, VmRequest, type VcpuMessage, type VcpuWorkerInit, type VmRequestCode } from "./vcpu/control.js";
import { formatRegisterDump } from "./vcpu/dump.js";
import { writeResetVector } from "./arch/x86_64/reset-vector.js";
import { hasDevices, type DeviceSpecs } from "./device-specs.js";
import { createMailbox } from "./devices/platform/mailbox.js";
import type { DeviceCommand, DeviceReplies, DeviceRequest, DevicesState, DeviceThreadInit, DeviceThreadMessage, DeviceThreadReport, IoStats } from "./devices/platform/device-thread-init.js";
import { ioRing, ioRingStatus, type IoRing } from "./devices/virtio/block/io-ring.js";
import { boardRow, clockMs, createBoard, deviceRow, nextSampleMs, PhaseWatch, readRow, SAMPLE_MS, type BoardRow } from "./threads/board.js";
import { kernelThreads, type KernelThread } from "./threads/kernel.js";
import { deviceThreadPhase, ioRingState, ioThreadReport, vcpuReport, type DeviceThreadThreadsReport, type IoThreadReport, type ThreadsReport, type VcpuThreadReport } from "./threads/report.js";
import { bootMsrs } from "./arch/x86_64/msrs.js";
import { setLint } from "./arch/x86_64/lapic.js";
import { filesystemOf, type FilesystemInfo } from "./disk/filesystem.js";
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync, openSync, fsyncSync, closeSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { completePendingHalt, cpuCaps, type CpuCaps, elapsedSinceSave, markClockPaused, missingCpuFeatures, msrsToSave, restoreVcpu, restoreVmKvm, saveVcpu, saveVmKvm } from "./snapshot/cpu.js";
import { bitmapBytes, mapMemoryLayers, populateMemoryLayers, writeDirtyMemoryFile, writeMemoryFile, type MemoryLayer, type MemoryWriteResult, type RegionSource } from "./snapshot/memory.js";
import { encodeState, SNAPSHOT_FILES, SNAPSHOT_VERSION, stateSha256 } from "./snapshot/state-file.js";
import type { SnapshotConfig, SnapshotState } from "./snapshot/state.js";

import { DEFAULT_VCPU_NICE, MAX_MEMORY_MIB, MAX_NICE, MAX_VCPUS, MIN_MEMORY_MIB } from "./defaults.js";
import { XAPIC_MAX_CPUS } from "./arch/x86_64/acpi/tables.js";
import { phase, takePhases } from "./phases.js";
import { processStatsPage, type StatsPage } from "./stats/page.js";
import type { BlockStats } from "./devices/virtio/block/block.js";

export { MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB };
export type { IoStats, IoTotals } from "./devices/platform/device-thread-init.js";
export type { ThreadsReport } from "./threads/report.js";

/** How long GET /threads waits for the device thread's own answer (and for /proc) before reporting without it. */
export const THREADS_ANSWER_MS = 1000;

/** x86-64 huge page: guest RAM is aligned to it (see where it is mapped). */
const HUGE_PAGE = 2 * 1024 * 1024;

/*
 * V8 optimizes a function (TurboFan) once it has run through its "interrupt budget" of bytecode
 * (V8 11 default 67584 bytes). The per-request and per-frame functions of the device and vCPU
 * threads (interrupt delivery, ring re-arming, header handling) are small and each runs a few
 * times per request, so at the default they stayed in baseline code for the first hundreds of MiB
 * and were compiled in the middle of the traffic. A quarter of the budget gets them optimized
 * while the guest boots and warms up: in the lab (emulated CPU, where one compile costs 5-120 ms)
 * host->guest TCP went from 30-40 to 58 MB/s and the device thread's CPU for it from 0.26-0.39 s
 * to 0.15 s (docs/benchmarks.md). Process-wide, and set before the device and vCPU workers exist.
 */
const V8_INTERRUPT_BUDGET = 16384;

export interface SnapshotOptions {
  /** false: state and configuration only (a disk-only snapshot). */
  memory?: boolean;
  config: SnapshotConfig;
  /**
   * An incremental snapshot: only the pages written since the snapshot in this directory, which
   * must be the one this VM tracks (taken with `track`, or the last incremental one).
   */
  base?: string;
  /** Count the pages written from now on, so that the next snapshot may name this one as its base. */
  track?: boolean;
}

/** One reader of the dirty log: the pages written since it last took them (`acc`), and the copy it was last given (`out`). */
interface DirtySubscriber {
  acc: Uint8Array[];
  out: Uint8Array[];
}

export type BootSource =
  | { kind: "linux"; kernel: Uint8Array; initrd?: Uint8Array; cmdline: string }
  /** A tiny test guest: `setup` writes code and returns the boot CPU state. */
  | { kind: "custom"; setup: (mem: GuestMemory) => BootCpuState }
  /**
   * A snapshot: guest memory mapped from `memory` (its memory file, or the base's and each
   * incremental layer's, base first; the VM keeps them open and closes them), every vCPU and the
   * platform as saved. `state` was validated by decodeState; `what` names the
   * snapshot in errors. `keepClock`: the guest clock continues from the saved time instead of
   * being moved to now.
   */
  | {
    kind: "snapshot"; state: SnapshotState; memory: readonly MemoryLayer[]; what: string; keepClock?: boolean;
    /**
     * Built ahead of its restore (a standby VMM's template: builder.ts prepareRestore): memory
     * mapped and populated, vCPUs made; the state is left for applyState(), and the VM's console
     * and back ends for takeHost() once it is asked for.
     */
    deferState?: boolean;
  }
  /**
   * A VM arriving by live migration: memory starts empty (zero) and is filled by the caller,
   * then applyState() puts the vCPUs and devices in place before run().
   */
  | { kind: "incoming" };

export interface VmConfig {
  cpus: number;
  memoryMiB: number;
  boot: BootSource;
  /** Where the serial console's output goes (fd). */
  consoleFd: number;
  /** virtio devices on PCI (served by the device thread). */
  devices?: DeviceSpecs;
  /** Nice offset of the vCPU threads over the VMM's other threads, 0..MAX_NICE (default DEFAULT_VCPU_NICE). */
  vcpuNice?: number;
  /** Guest memory allowed per byte of host memory (checkHostMemory; default 1). */
  memoryOvercommit?: number;
  /** Let deviceCommand send the device thread's debug.* commands (tests of a device thread that does not answer). */
  debugDeviceCommands?: boolean;
  /** Told when the VMM pauses the VM by itself (a full disk), after the vCPUs stopped (or failed to). */
  onPaused?: (reason: PauseReason) => void;
  /** Each vCPU thread narrows itself with its own seccomp filter before its first KVM_RUN (the sandbox). */
  vcpuSeccomp?: boolean;
  /** Where the devices count their I/O (stats/page.ts); default the process's page (processStatsPage). */
  statsPage?: StatsPage;
}

export type VmExitResult =
  | { kind: "poweroff" }
  | { kind: "reset" }
  | { kind: "stopped" }
  | { kind: "crash"; reason: string; dump?: string };

export interface VcpuStats {
  id: number;
  exits: Record<string, number>;
  /** The vCPU thread's nice value once it started (`niceError`: why the offset could not be applied). */
  nice?: number;
  niceError?: string;
}

export interface VmStats {
  state: VmState;
  uptimeMs: number;
  memoryBytes: number;
  cpus: number;
  vcpus: VcpuStats[];
  totalExits: number;
}

export type VmState = "created" | "running" | "paused" | "stopped";

/**
 * Why the VMM paused the VM by itself: a disk's host filesystem is full (ENOSPC; EDQUOT over a
 * quota). The write that failed is held, not failed (QEMU's werror=enospc): resume() runs it
 * again once space is freed, and pauses again if there is still none.
 */
export interface PauseReason {
  kind: "disk-full";
  errno: string;
  /** The request that could not be done (write, flush, write-zeroes). */
  op: string;
  /** The disk's image file. */
  disk: string;
  filesystem: FilesystemInfo;
  message: string;
  at: string;
}

/** Counters of a VM without devices. */
export function emptyIoStats(): IoStats {
  return {
    diskReadBytes: 0, diskWriteBytes: 0, diskReadOps: 0, diskWriteOps: 0,
    netRxBytes: 0, netTxBytes: 0, netRxPackets: 0, netTxPackets: 0, disks: [], nets: [],
  };
}

export function validateConfig(cfg: Pick<VmConfig, "cpus" | "memoryMiB" | "vcpuNice" | "memoryOvercommit">, maxVcpus = MAX_VCPUS): void {
  if (cfg.vcpuNice !== undefined && (!Number.isInteger(cfg.vcpuNice) || cfg.vcpuNice < 0 || cfg.vcpuNice > MAX_NICE)) {
    throw new TypevisorError("INVALID_ARGUMENT", `--vcpu-nice must be a whole number from 0 to ${MAX_NICE} (got ${cfg.vcpuNice})`);
  }
  if (cfg.memoryOvercommit !== undefined && (!Number.isFinite(cfg.memoryOvercommit) || cfg.memoryOvercommit <= 0 || cfg.memoryOvercommit > MAX_MEMORY_OVERCOMMIT)) {
    throw new TypevisorError("INVALID_ARGUMENT", `--memory-overcommit must be a number above 0 and at most ${MAX_MEMORY_OVERCOMMIT} (got ${cfg.memoryOvercommit})`);
  }
  if (!Number.isInteger(cfg.cpus) || cfg.cpus < 1) {
    throw new TypevisorError("INVALID_CPUS", `--cpus must be a whole number of at least 1 (got ${cfg.cpus})`);
  }
  const max = Math.min(maxVcpus, MAX_VCPUS);
  if (cfg.cpus > max) {
    throw new TypevisorError("INVALID_CPUS", `--cpus ${cfg.cpus} exceeds the maximum of ${max} ${max < MAX_VCPUS ? "this host's KVM allows (KVM_CAP_MAX_VCPUS)" : "vCPUs"}`);
  }
  if (!Number.isInteger(cfg.memoryMiB) || cfg.memoryMiB < MIN_MEMORY_MIB) {
    throw new TypevisorError("INVALID_MEMORY", `--memory must be at least ${MIN_MEMORY_MIB} MiB (got ${cfg.memoryMiB})`);
  }
  if (cfg.memoryMiB > MAX_MEMORY_MIB) {
    throw new TypevisorError("INVALID_MEMORY", `--memory ${cfg.memoryMiB} MiB exceeds the supported maximum of ${MAX_MEMORY_MIB} MiB`);
  }
}

/** The largest --memory-overcommit (the daemon's policy allows the same). */
export const MAX_MEMORY_OVERCOMMIT = 64;

/**
 * Whether this host can back `memoryMiB` of guest RAM: at most its physical memory times the
 * overcommit allowed (1 unless told: a guest that touches all its RAM must not send the host
 * into its OOM killer), and RAM must end inside the guest-physical address space KVM offers
 * (`physBits`, CPUID 0x80000008 EAX[7:0]; KVM cannot map a slot past it). Guest RAM is mapped
 * lazily (MAP_NORESERVE), so nothing else would stop an impossible size before the guest ran
 * into it.
 * @throws TypevisorError INVALID_MEMORY with both figures
 */
export function checkHostMemory(memoryMiB: number, host: { memoryBytes: number; overcommit?: number; physBits?: number }): void {
  const ratio = host.overcommit ?? 1;
  const limit = Math.floor(host.memoryBytes * ratio);
  const bytes = memoryMiB * 1024 * 1024;
  if (bytes > limit) {
    throw new TypevisorError(
      "INVALID_MEMORY",
      `--memory ${memoryMiB} MiB is more than this host can back: ${formatBytes(host.memoryBytes)} of physical memory × overcommit ${ratio} = ${formatBytes(limit)}`,
      { hint: "ask for less memory, or allow more overcommit (--memory-overcommit, the daemon's --memory-overcommit)" },
    );
  }
  if (host.physBits !== undefined && host.physBits > 0) {
    const end = Math.max(...ramRanges(bytes).map((r) => r.start + r.size));
    if (end > 2 ** host.physBits) {
      throw new TypevisorError(
        "INVALID_MEMORY",
        `--memory ${memoryMiB} MiB would put guest RAM up to 0x${end.toString(16)}, past the ${host.physBits}-bit guest-physical address space this host's KVM offers`,
      );
    }
  }
}

/** The guest-physical address width KVM offers (CPUID 0x80000008 EAX[7:0]), or undefined when it does not say. */
function guestPhysBits(supported: readonly { function: number; eax: number }[]): number | undefined {
  const leaf = supported.find((e) => e.function === 0x80000008);
  const bits = leaf === undefined ? 0 : leaf.eax & 0xff;
  return bits > 0 ? bits : undefined;
}

/** The device thread's answer to "threads", or why there is none (no `report`: it did not answer in time). */
interface DeviceAnswer {
  report?: DeviceThreadReport;
  error?: string;
  ms: number;
}

export class Vm {
  readonly memory: GuestMemory;
  readonly plan: BootPlan | undefined;
  private readonly kvm: Kvm;
  private readonly vm: VmFd;
  private readonly vcpus: VcpuFd[] = [];
  private readonly runMaps: { map: libc.Mapping; run: Uint8Array }[] = [];
  /** One host mapping per guest RAM region (ramRanges order). */
  private readonly mems: libc.Mapping[] = [];
  private readonly control = new SharedArrayBuffer(CTRL.SLOTS * 4);
  private readonly ctrl = new Int32Array(this.control);
  /** Kicks the vCPUs every throttle slice while auto-converge throttles them (setThrottle). */
  private throttleTimer: ReturnType<typeof setInterval> | undefined;
  private readonly stats: SharedArrayBuffer;
  private readonly serialShared = createSerialShared();
  readonly serial: Serial;
  private workers: Worker[] = [];
  private deviceThread: { worker: Worker; eventfd: number; control: Int32Array } | undefined;
  private deviceNames: string[] = [];
  /** The NICs' names in stats-page order (the device thread's "ready"). */
  private netNames: string[] = [];
  private readonly statsPage: StatsPage;
  /** Each disk and its I/O thread's shared ring (read here for GET /threads, whatever the device thread is doing). */
  private diskThreads: { name: string; ioThread: { name: string; ring: IoRing } | null }[] = [];
  private deviceFailure: string | undefined;
  private commandSeq = 0;
  private readonly pendingCommands = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  /** Where every thread is (threads/board.ts): one row per vCPU, then the device thread's. */
  private readonly board: SharedArrayBuffer;
  private readonly boardRows: BoardRow[];
  /** Times the phases nobody stamps (vCPU run/exit, I/O requests), from the sampler's observations (nextSampleMs). */
  private readonly watch = new PhaseWatch();
  private sampler: NodeJS.Timeout | undefined;
  private samplerMs = SAMPLE_MS;
  /** The device thread's "threads" answer still awaited: a stuck thread gets one request, not one per GET. */
  private threadsAnswer: Promise<DeviceThreadReport> | undefined;
  /** Each vCPU thread's pthread_t (kicks, names). */
  private pthreads: bigint[] = [];
  private readonly nice: { nice: number; niceError?: string }[] = [];
  private startedAt = 0;
  private currentState: VmState = "created";
  /** The VM's state; each change is counted in the stats page, where a supervisor looks for it (stats/layout.ts). */
  private get state(): VmState {
    return this.currentState;
  }
  private set state(s: VmState) {
    if (s === this.currentState) return;
    this.currentState = s;
    this.statsPage.noteChange();
  }
  private destroyed = false;
  private pendingInput: Uint8Array[] = [];
  /** Set while the VM is paused because a disk's filesystem is full; cleared by resume(). */
  private pauseReason_: PauseReason | undefined;
  private inputTimer: NodeJS.Timeout | undefined;
  /** A restored VM's memory file (each region a private mapping of it), kept open for the VM's life. */
  private memoryFds: number[] = [];
  private memorySources: (RegionSource | undefined)[] = [];
  /** What a restore found KVM would not take back (MSR indices), for the caller to report. */
  readonly restoreWarnings: string[] = [];
  /** Saved device state to hand the device thread (a restore). */
  private restoredDevices: unknown;
  /** The run state a restored guest was saved in. */
  private restoredRunState: "running" | "paused" | undefined;
  private devicesStarted: Promise<VcpuWorkerInit["platform"]> | undefined;
  /** The device thread's mailbox and eventfd, made as it is created (before it is ready). */
  private devicePlatform: VcpuWorkerInit["platform"];
  /**
   * True while run() waits for the device thread with the vCPU threads already created and
   * parked: pause() and resume() then only say what the vCPUs do once the devices are up.
   */
  private starting = false;
  /** The vCPU workers once created (by run(), or earlier by prestart()). */
  private vcpuThreads: { ready: Promise<void>; exited: Promise<VmExitResult> } | undefined;
  /** prestart(): the device thread starts without the devices' state; restoreDevices() sends it later. */
  private deferDeviceState = false;
  /** The pages the device thread writes, while dirty logging is on. */
  private deviceDirty: DirtyLog | undefined;
  /** While guest writes are logged: KVM's bitmap per RAM slot, a bit per page. */
  private dirtyMaps: libc.Mapping[] | undefined;
  /** Who reads the dirty log: a live migration, the incremental-snapshot tracker. */
  private readonly dirtySubscribers = new Set<DirtySubscriber>();
  private migrationDirty: DirtySubscriber | undefined;
  /** Set while pages written since a snapshot are tracked (its state's SHA-256): the base an incremental snapshot may name. */
  private tracked: { sha256: string; dir: string; sub: DirtySubscriber } | undefined;
  /** Built for a state that applyState() has not put in place yet (a restore or an incoming migration). */
  private awaitingState: boolean;
  /** Each vCPU's CPUID table as set (KVM_SET_CPUID2), for snapshots. */
  private readonly cpuids: KvmCpuidEntry[][] = [];

  /** The configuration minus the boot payload (kernel and initrd are not kept once loaded); takeHost() may replace it once. */
  private cfg: Omit<VmConfig, "boot">;
  /** Built ahead for a snapshot (boot.deferState) and not yet given its host (takeHost). */
  private aheadOfHost: boolean;

  constructor(config: VmConfig) {
    const { boot: _payload, ...rest } = config;
    this.cfg = rest;
    validateConfig(config);
    this.statsPage = config.statsPage ?? processStatsPage();
    const snap = config.boot.kind === "snapshot" ? config.boot : undefined;
    this.aheadOfHost = snap?.deferState === true;
    if (snap !== undefined) {
      // The VM is built with the saved machine's shape; anything else would not match its state.
      if (snap.state.memory === null) throw new TypevisorError("SNAPSHOT_INVALID", `${snap.what}: a snapshot without memory (disk-only) cannot be restored by the VMM`);
      if (config.cpus !== snap.state.config.cpus || config.memoryMiB !== snap.state.config.memoryMiB) throw new TypevisorError("SNAPSHOT_MISMATCH", `${snap.what}: saved with ${snap.state.config.cpus} vCPUs and ${snap.state.config.memoryMiB} MiB`);
      this.memoryFds = snap.memory.map((l) => l.fd);
    }
    this.kvm = new Kvm();
    try {
      validateConfig(config, this.kvm.maxVcpus());
      const supported = this.kvm.supportedCpuid();
      const tscDeadline = this.tscDeadline();
      // Refuse before anything is built when the guest may use a CPU feature this host cannot offer.
      if (snap !== undefined) this.checkCpu(snap.state, snap.what, supported, tscDeadline);
      checkHostMemory(config.memoryMiB, { memoryBytes: totalmem(), overcommit: config.memoryOvercommit ?? 1, physBits: guestPhysBits(supported) });
      const memBytes = config.memoryMiB * 1024 * 1024;
      this.vm = this.kvm.createVm();
      this.vm.setTssAddr(KVM_TSS_ADDR);
      this.vm.setIdentityMapAddr(KVM_IDENTITY_MAP_ADDR);
      this.vm.createIrqchip();
      if (config.cpus > XAPIC_MAX_CPUS) {
        // Past 254 vCPUs APIC IDs no longer fit xAPIC's 8 bits: the guest runs its LAPICs in
        // x2APIC mode, and KVM must take 32-bit APIC IDs in MSI routes and LAPIC state
        // (KVM API §7.7 KVM_CAP_X2APIC_API), without the broadcast quirk that reads ID 0xff as
        // broadcast in x2APIC mode. QEMU does the same past 255.
        this.vm.enableCap(CAP.X2APIC_API, [X2APIC_API.USE_32BIT_IDS | X2APIC_API.DISABLE_BROADCAST_QUIRK]);
      }
      this.vm.createPit2();

      // One mapping and one KVM memory slot per RAM region (below the MMIO hole, above 4 GiB;
      // layout.ts), so no region's size depends on another's and a region is contiguous in host
      // memory (one host address serves an iovec anywhere in it). Each is private anonymous
      // memory, reserved lazily (MAP_NORESERVE): a 12 GiB guest that touches 100 MiB costs
      // 100 MiB. Not inherited by forks (MADV_DONTFORK). 2 MiB-aligned and marked for
      // transparent huge pages, as QEMU and Cloud Hypervisor do with guest RAM: every region
      // starts at a 2 MiB-aligned guest address, so guest-physical and host addresses agree
      // modulo 2 MiB and KVM maps the region 2 MiB at a time (fewer nested-paging walks and TLB
      // entries), and the kernel compacts memory to find huge pages where it would otherwise
      // settle for 4 KiB.
      const hostRegions: HostRegion[] = [];
      for (const r of ramRanges(memBytes)) {
        const map = libc.mmapAligned(r.size, HUGE_PAGE, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_NORESERVE);
        this.mems.push(map);
        libc.madvise(map, libc.MADV_DONTFORK);
        try {
          libc.madvise(map, libc.MADV_HUGEPAGE);
        } catch {
          // EINVAL: a kernel without transparent huge pages; 4 KiB pages work, only slower.
        }
        hostRegions.push({ guestPhysAddr: r.start, size: r.size, hostAddress: Number(map.address) });
      }
      if (snap !== undefined && snap.state.memory !== null) {
        const layout = snap.state.memory;
        if (layout.regions.some((r, i) => r.guestPhysAddr !== hostRegions[i]?.guestPhysAddr || r.size !== hostRegions[i]?.size) || layout.regions.length !== hostRegions.length) {
          throw new TypevisorError("SNAPSHOT_INVALID", `${snap.what}: its memory regions do not match a ${config.memoryMiB} MiB VM's`);
        }
        mapMemoryLayers(snap.memory, this.mems);
        // Built ahead of its restore: the host side of the guest's first touches done now, off its time.
        if (snap.deferState === true) populateMemoryLayers(snap.memory, this.mems);
        for (const m of this.mems) libc.madvise(m, libc.MADV_DONTFORK);
        this.memorySources = layout.regions.map((_r, i) => ({
          layers: snap.memory.map((l) => {
            const lr = l.layout.regions[i]!;
            return { fd: l.fd, offset: lr.fileOffset, ...(lr.runs !== undefined ? { runs: lr.runs } : {}) };
          }),
        }));
      }
      // Safe to hand to the kernel: each slot is exactly one mapping made above, kept mapped
      // until releaseKvm() closes the VM fd (which drops the slots) before unmapping it.
      hostRegions.forEach((h, slot) => this.vm.setUserMemoryRegion(slot, h.guestPhysAddr, h.size, BigInt(h.hostAddress)));
      this.memory = GuestMemory.mapped(hostRegions);

      const vmFd = this.vm;
      this.serial = new Serial(this.serialShared, () => {
        vmFd.irqLine(IRQ.COM1, 1);
        vmFd.irqLine(IRQ.COM1, 0);
      }, (b) => libc.writeAll(this.cfg.consoleFd, b));

      let boot: BootCpuState | undefined;
      this.awaitingState = config.boot.kind === "snapshot" || config.boot.kind === "incoming";
      if (this.awaitingState) {
        // Memory already holds the tables, the kernel and everything the guest did since.
        this.plan = undefined;
      } else if (config.boot.kind === "linux") {
        const pci = hasDevices(config.devices);
        const { rsdpAddr } = writeAcpiTables(this.memory, {
          cpus: config.cpus,
          // The PCI host bridge and its ECAM exist only when there are devices to put on it.
          ...(pci ? { pciEcam: { base: PCI_ECAM_START, segment: 0, startBus: 0, endBus: 0 }, sbDevices: [pciHostBridgeAml()] } : {}),
        });
        writeResetVector(this.memory);
        writeGenerationId(this.memory);
        const plan = loadKernel(this.memory, {
          kernel: config.boot.kernel,
          ...(config.boot.initrd !== undefined ? { initrd: config.boot.initrd } : {}),
          cmdline: config.boot.cmdline,
          memBytes,
          rsdpAddr,
        });
        this.plan = plan;
        boot = plan.cpu;
      } else if (config.boot.kind === "custom") {
        this.plan = undefined;
        boot = config.boot.setup(this.memory);
      } else {
        this.plan = undefined;
      }

      this.stats = new SharedArrayBuffer(config.cpus * STAT_SLOTS * 8);
      this.board = createBoard(config.cpus);
      this.boardRows = Array.from({ length: config.cpus + 1 }, (_, r) => boardRow(this.board, r));
      // The LAPIC is in the kernel (KVM_CREATE_IRQCHIP), so its TSC-deadline mode is KVM's to offer.
      const runSize = this.kvm.vcpuMmapSize();
      for (let id = 0; id < config.cpus; id++) {
        const vcpu = this.vm.createVcpu(id);
        this.vcpus.push(vcpu);
        if (!this.awaitingState) {
          const cpuid = filterCpuid(supported, { vcpuId: id, cpus: config.cpus, tscDeadline });
          vcpu.setCpuid(cpuid);
          this.cpuids.push(cpuid);
          vcpu.setMsrs(bootMsrs());
          vcpu.setFpu(encodeBootFpu());
          setLint(vcpu);
        }
        const map = libc.mmap(runSize, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, vcpu.fd, 0);
        this.runMaps.push({ map, run: new Uint8Array(libc.view(map.pointer, runSize)) });
      }
      phase("built");
      if (snap !== undefined && snap.deferState !== true) {
        // A restored snapshot is a new machine to the guest (a live migration is not: same VM, moved).
        this.applyState(snap.state, { what: snap.what, newMachine: true, ...(snap.keepClock !== undefined ? { keepClock: snap.keepClock } : {}) });
      } else if (!this.awaitingState) {
        // Only the boot CPU gets an entry state; APs wait in KVM for INIT/SIPI from the guest.
        this.setBootState(this.vcpus[0]!, boot!);
      }
    } catch (e) {
      this.releaseKvm();
      throw e;
    }
  }

  /**
   * What a capture reads of each vCPU: the MSRs KVM lists and its XSAVE/XCRS capabilities. KVM's
   * answers never change, so they are asked once (KVM_GET_MSR_INDEX_LIST and the checks took
   * 24-32 ms of a migration's pause in the lab when asked there); a live migration asks before
   * the pause.
   */
  saveSet(): { msrs: readonly number[]; caps: CpuCaps } {
    this.saveSetCache ??= { msrs: msrsToSave(this.kvm), caps: cpuCaps(this.kvm) };
    return this.saveSetCache;
  }
  private saveSetCache: { msrs: readonly number[]; caps: CpuCaps } | undefined;

  private sampleCpuid(vcpuId: number): KvmCpuidEntry[] {
    return filterCpuid(this.kvm.supportedCpuid(), { vcpuId, cpus: this.cfg.cpus, tscDeadline: this.tscDeadline() });
  }

  /** Whether KVM's in-kernel LAPIC offers the TSC-deadline timer (a boot's CPUID says so only then). */
  private tscDeadline(): boolean {
    return this.kvm.checkExtension(CAP.TSC_DEADLINE_TIMER) > 0;
  }

  private checkCpu(state: SnapshotState, what: string, supported: KvmCpuidEntry[], tscDeadline: boolean): void {
    const missing = new Set(state.vcpus.flatMap((v) => missingCpuFeatures(v.cpuid, filterCpuid(supported, { vcpuId: v.id, cpus: state.config.cpus, tscDeadline }))));
    if (missing.size > 0) {
      throw new TypevisorError("SNAPSHOT_CPU", `${what} was taken on a CPU with features this host's KVM does not offer: ${[...missing].slice(0, 8).join(", ")}${missing.size > 8 ? ` and ${missing.size - 8} more` : ""}`, { hint: "restore it on a host with the same CPU model (or a newer one)" });
    }
  }

  get config(): Readonly<Omit<VmConfig, "boot">> {
    return this.cfg;
  }

  /**
   * A VM built ahead for a snapshot (boot.deferState) becomes the VM asked for: its console, back
   * ends and limits replace those it was built with, before it runs. The machine (vCPUs, memory,
   * the state applied) stays the snapshot's.
   */
  takeHost(h: Pick<VmConfig, "consoleFd" | "devices" | "vcpuNice" | "memoryOvercommit" | "onPaused" | "vcpuSeccomp">): void {
    if (!this.aheadOfHost || this.state !== "created") throw new TypevisorError("VM_STATE", "takeHost() is for a VM built ahead, once, before it runs");
    const next = { ...this.cfg, ...h };
    validateConfig(next, this.kvm.maxVcpus());
    checkHostMemory(next.memoryMiB, { memoryBytes: totalmem(), overcommit: next.memoryOvercommit ?? 1, physBits: guestPhysBits(this.kvm.supportedCpuid()) });
    this.cfg = next;
    this.aheadOfHost = false;
  }

  /**
   * An incoming migration's warm-up, while memory streams in: put `sample` (this VM's own
   * never-run state, from captureState) back the way applyState puts a state in, so that code has
   * run once before the guest's pause waits on it (lab: applyState took ~100 ms there, most of it
   * code running for the first time). What it writes is what was read, so nothing changes: no new
   * generation ID, no clock-paused flag, and the VM still waits for its state.
   */
  rehearseApply(sample: SnapshotState): void {
    if (!this.awaitingState || this.state !== "created" || sample.vm === null || sample.platform === null || sample.vcpus.length !== this.vcpus.length) {
      throw new TypevisorError("VM_STATE", "rehearseApply() is for a VM awaiting its state, with a sample of its own");
    }
    this.checkCpu(sample, "a warm-up sample", this.kvm.supportedCpuid(), this.tscDeadline());
    this.putState(sample.vcpus, sample.vm, sample.platform, false);
  }

  /**
   * The vCPUs, the in-kernel devices and the UART from a checked state, in the order KVM needs
   * (snapshot/cpu.ts); `each` runs after each vCPU's restore with the MSRs KVM refused.
   */
  private putState(
    vcpus: SnapshotState["vcpus"],
    vmState: NonNullable<SnapshotState["vm"]>,
    platform: NonNullable<SnapshotState["platform"]>,
    keepClock: boolean,
    each?: (vcpu: VcpuFd, saved: SnapshotState["vcpus"][number], refused: number[]) => void,
  ): void {
    const advance = keepClock ? 0n : elapsedSinceSave(vmState);
    for (const vcpu of this.vcpus) {
      const saved = vcpus[vcpu.id]!;
      each?.(vcpu, saved, restoreVcpu(vcpu, saved, advance));
    }
    restoreVmKvm(this.vm, this.kvm, vmState, keepClock);
    this.serial.restore(platform.serial);
  }

  /**
   * Put a saved or migrated VM's state in place (vCPUs, interrupt controllers, PIT, clock, UART;
   * the devices when the device thread starts), once, before run(). Guest memory must hold the
   * same moment's contents already. The order is the one KVM needs (snapshot/cpu.ts).
   */
  applyState(state: SnapshotState, opts: { what: string; keepClock?: boolean; newMachine?: boolean }): void {
    if (!this.awaitingState || this.state !== "created") throw new TypevisorError("VM_STATE", "state can be applied once, to a VM built for it, before it runs");
    if (state.vm === null || state.platform === null || state.vcpus.length !== this.vcpus.length) throw new TypevisorError("SNAPSHOT_INVALID", `${opts.what}: no vCPU state to restore`);
    if (state.config.cpus !== this.cfg.cpus || state.config.memoryMiB !== this.cfg.memoryMiB) throw new TypevisorError("SNAPSHOT_MISMATCH", `${opts.what}: saved with ${state.config.cpus} vCPUs and ${state.config.memoryMiB} MiB`);
    phase("apply");
    this.checkCpu(state, opts.what, this.kvm.supportedCpuid(), this.tscDeadline());
    this.awaitingState = false;
    this.putState(state.vcpus, state.vm, state.platform, opts.keepClock === true, (vcpu, saved, refused) => {
      this.cpuids[vcpu.id] = saved.cpuid;
      if (refused.length > 0) this.restoreWarnings.push(`vCPU ${vcpu.id}: KVM did not take back MSR ${refused.map((i) => `0x${i.toString(16)}`).join(", ")}`);
      // A paravirtual spinlock's kick that was in flight is not in the state: see completePendingHalt.
      completePendingHalt(vcpu, (gpa) => (gpa < BigInt(Number.MAX_SAFE_INTEGER) ? this.memory.trySlice(Number(gpa), 1)?.[0] : undefined));
    });
    // A new machine (a restored snapshot, maybe one of many clones): new generation ID and its GED
    // interrupt pending before any vCPU runs (IOAPIC and LAPICs are back by now), so the guest
    // reseeds its RNG (vmgenid.ts).
    if (opts.newMachine === true) newGeneration(this.memory, this.vm);
    // Before the first KVM_RUN: the guest's watchdogs see a host pause, not a hung CPU.
    for (const v of this.vcpus) markClockPaused(v);
    this.restoredDevices = state.devices;
    this.restoredRunState = state.runState;
    phase("applied");
  }

  /**
   * Everything but memory, as a snapshot holds it: every vCPU, the VM's in-kernel devices, the
   * UART and the device thread's state (in-flight disk requests completed first). Only while
   * paused: KVM's getters would wait for a running vCPU.
   */
  async captureState(config: SnapshotConfig, runState: "running" | "paused"): Promise<Omit<SnapshotState, "memory">> {
    // A prestart()ed VM's threads are parked too: its (never run) state can be read, as a sample.
    if (this.state !== "paused" && !(this.state === "created" && this.vcpuThreads !== undefined)) throw new TypevisorError("VM_STATE", `the VM must be paused to capture its state (it is ${this.state})`);
    const devices = this.deviceThread !== undefined ? await this.deviceCommand({ command: "snapshot" }) : null;
    const { msrs, caps } = this.saveSet();
    return {
      version: SNAPSHOT_VERSION, createdAt: new Date().toISOString(), runState, config,
      // A prestarted VM's vCPUs have no CPUID yet (the incoming state brings it): what a VM built
      // here would get (the host's, filtered as a boot filters it), for a sample.
      vcpus: this.vcpus.map((v) => saveVcpu(v, msrs, caps, this.cpuids[v.id] ?? this.sampleCpuid(v.id))),
      vm: saveVmKvm(this.vm),
      platform: { serial: this.serial.save() },
      devices,
    };
  }

  private setBootState(vcpu: VcpuFd, boot: BootCpuState): void {
    const regs: KvmRegs = {
      rax: 0n, rbx: BigInt(boot.regs.rbx), rcx: 0n, rdx: 0n, rsi: BigInt(boot.regs.rsi), rdi: 0n,
      rsp: BigInt(boot.regs.rsp), rbp: BigInt(boot.regs.rbp),
      r8: 0n, r9: 0n, r10: 0n, r11: 0n, r12: 0n, r13: 0n, r14: 0n, r15: 0n,
      rip: BigInt(boot.regs.rip), rflags: BigInt(boot.regs.rflags),
    };
    const cur = decodeSregs(vcpu.getSregsRaw());
    vcpu.setSregs({ ...cur, ...boot.sregs });
    vcpu.setRegs(regs);
  }

  /**
   * Start the device thread (when there are devices) and wait until its back
   * ends are open, so a bad disk fails before any vCPU runs.
   */
  /**
   * Start the device thread now rather than in run(): its back ends are open and its state in
   * place when this resolves (an incoming migration says READY only then). run() uses it.
   */
  prepareDevices(): Promise<VcpuWorkerInit["platform"]> {
    if (this.awaitingState) return Promise.reject(new TypevisorError("VM_STATE", "this VM waits for its state (applyState) first"));
    this.devicesStarted ??= this.startDevices();
    return this.devicesStarted;
  }

  private async startDevices(): Promise<VcpuWorkerInit["platform"]> {
    const devices = this.cfg.devices;
    // Counted from 0 on each boot, as the devices are new; a VM without devices has a page of none.
    this.statsPage.setDevices(devices?.disks.length ?? 0, devices?.nets.length ?? 0);
    if (devices === undefined || !hasDevices(devices)) return undefined;
    const eventfd = libc.eventfd();
    const mailbox = createMailbox(this.vcpus.length);
    const control = new SharedArrayBuffer(4);
    this.devicePlatform = { mailbox, eventfd };
    const init: DeviceThreadInit = {
      vmFd: this.vm.fd,
      memory: this.memory.hostRegions,
      mailbox, eventfd, vcpus: this.vcpus.length, devices, control, board: this.board, statsPage: this.statsPage.ref,
      ...(this.cfg.debugDeviceCommands === true ? { debugCommands: true } : {}),
      // Checked again by the device thread (parseDevicesState) before anything is built from it.
      ...(this.deferDeviceState ? { deferRestore: true } : this.restoredDevices !== undefined && this.restoredDevices !== null ? { restore: this.restoredDevices as DevicesState } : {}),
    };
    const w = spawnWorker("devices/platform/device-thread.js", init);
    this.deviceThread = { worker: w, eventfd, control: new Int32Array(control) };
    await new Promise<void>((resolve, reject) => {
      w.on("message", (m: DeviceThreadMessage) => {
        if (m.type === "ready") {
          this.deviceNames = m.devices;
          this.netNames = m.nets;
          this.diskThreads = m.disks.map((d) => ({ name: d.name, ioThread: d.ioThread === null ? null : { name: d.ioThread.name, ring: ioRing(d.ioThread.ring) } }));
          resolve();
        } else if (m.type === "error") reject(new TypevisorError(m.code, m.message));
        else if (m.type === "reply") {
          const waiter = this.pendingCommands.get(m.id);
          this.pendingCommands.delete(m.id);
          if (m.ok) waiter?.resolve(m.result);
          else waiter?.reject(new TypevisorError(m.code, m.message));
        } else if (m.type === "no-space") this.onNoSpace(m);
        else process.stderr.write(`typevisor: ${m.message}\n`);
      });
      w.on("error", (e) => reject(new TypevisorError("DEVICE_THREAD", `device thread failed: ${e.message}`)));
      w.on("exit", () => {
        reject(new TypevisorError("DEVICE_THREAD", "device thread exited during start-up"));
        // Dying while the guest runs (not stopped by stopDevices) leaves every device dead: stop the VM
        // as crashed rather than let vCPUs time out on each access.
        if (this.deviceThread?.worker === w) {
          this.deviceFailure = "the device thread exited unexpectedly";
          Atomics.compareExchange(this.ctrl, CTRL.REQUEST, VmRequest.NONE, VmRequest.CRASH);
          this.kickAll();
        }
      });
    });
    return { mailbox, eventfd };
  }

  /** Ask the device thread to run `request` (it wakes from poll through its eventfd). */
  deviceCommand<R extends DeviceRequest>(request: R): Promise<DeviceReplies[R["command"]]> {
    const d = this.deviceThread;
    if (d === undefined) return Promise.reject(new TypevisorError("NO_DEVICES", "this VM has no devices"));
    if (request.command.startsWith("debug.") && this.cfg.debugDeviceCommands !== true) {
      return Promise.reject(new TypevisorError("INVALID_REQUEST", `${request.command} needs debugDeviceCommands`));
    }
    const id = ++this.commandSeq;
    const msg: DeviceCommand = { ...request, type: "command", id };
    return new Promise<DeviceReplies[R["command"]]>((resolve, reject) => {
      // The reply carrying this id answers this request: its result has the request's reply type.
      this.pendingCommands.set(id, { resolve: resolve as (v: unknown) => void, reject });
      d.worker.postMessage(msg);
      libc.eventfdSignal(d.eventfd);
    });
  }

  /** Devices on the PCI bus, as the device thread named them at start-up. */
  get devices(): readonly string[] {
    return this.deviceNames;
  }

  /** Stop the device thread after the vCPUs: it flushes and closes the back ends. */
  private async stopDevices(): Promise<void> {
    const d = this.deviceThread;
    if (d === undefined) return;
    this.deviceThread = undefined;
    for (const w of this.pendingCommands.values()) w.reject(new TypevisorError("VM_STATE", "the VM stopped"));
    this.pendingCommands.clear();
    Atomics.store(d.control, 0, 1);
    libc.eventfdSignal(d.eventfd);
    await new Promise<void>((resolve) => {
      if (d.worker.threadId === -1) resolve();
      else d.worker.once("exit", () => resolve());
    });
    libc.close(d.eventfd);
  }

  /**
   * Runs the vCPUs; resolves when the guest powers off, resets, crashes, or stop() is called.
   * `paused`: the vCPUs start parked (resume() lets them go); a restored VM starts paused when
   * it was saved paused, unless `paused` is false.
   */
  async run(opts: { paused?: boolean; onStarted?: () => void } = {}): Promise<VmExitResult> {
    if (this.state !== "created") throw new TypevisorError("VM_STATE", `cannot start a VM that is ${this.state}`);
    if (this.awaitingState) throw new TypevisorError("VM_STATE", "this VM waits for its state (applyState) before it can run");
    if (this.aheadOfHost) throw new TypevisorError("VM_STATE", "this VM was built ahead and waits for its host (takeHost) before it can run");
    const startPaused = opts.paused ?? this.restoredRunState === "paused";
    // Paused from the start: the vCPUs park at their first look at the control words. Set before
    // the devices start (an await): a resume() meanwhile (a daemon resuming a VM restored paused,
    // as soon as its API answers) clears it, and must not be undone below.
    this.state = startPaused ? "paused" : "running";
    if (startPaused) Atomics.store(this.ctrl, CTRL.PAUSE, 1);
    const devicesReady = this.prepareDevices();
    // The vCPU threads are created now, beside the device thread, rather than once it is ready:
    // each is a Node worker whose bootstrap and module loading is most of a VMM's start-up
    // (docs/benchmarks.md, density), so the two start together. They wait parked until the
    // devices are up: a bad disk still fails before any guest code runs.
    phase("run");
    if (this.vcpuThreads === undefined && this.devicePlatform !== undefined) {
      this.starting = true;
      this.spawnVcpus(true, this.devicePlatform);
    }
    let platform: VcpuWorkerInit["platform"];
    try {
      platform = await devicesReady;
    } catch (e) {
      this.starting = false;
      if (this.vcpuThreads !== undefined) {
        this.stop();
        await this.vcpuThreads.exited;
      }
      this.state = "stopped";
      await this.stopDevices();
      throw e;
    }
    this.starting = false;
    this.startedAt = Date.now();
    this.statsPage.setStartedAt(this.startedAt);
    this.startSampler();
    let exited: Promise<VmExitResult>;
    if (this.vcpuThreads !== undefined) {
      // Started parked (by prestart() for an incoming migration, or above): let them go, unless paused now.
      exited = this.vcpuThreads.exited;
      if (this.state === "running") {
        Atomics.store(this.ctrl, CTRL.PAUSE, 0);
        Atomics.notify(this.ctrl, CTRL.PAUSE);
      }
    } else exited = this.spawnVcpus(false, platform).exited; // PAUSE is as set above (or by a resume() since)
    // Every thread of this VM is started: spare ones a standby started ahead that it did not take go.
    endPrestarted();
    phase("released");
    const phases = takePhases();
    if (phases !== undefined) process.stderr.write(`typevisor: phases ${phases}\n`);
    // The vCPU workers exist by now (created synchronously): tell the caller on the next turn.
    if (opts.onStarted !== undefined) setImmediate(opts.onStarted);
    const result = await exited;
    await this.stopDevices();
    this.stopSampler();
    return result;
  }

  /**
   * An incoming migration, while its memory streams in: start the device thread (devices built,
   * back ends open, state left for restoreDevices()) and the vCPU threads, parked, so neither
   * thread start-up is part of the guest's pause. Nothing runs guest code until run().
   */
  async prestart(): Promise<void> {
    if (!this.awaitingState || this.state !== "created" || this.vcpuThreads !== undefined) throw new TypevisorError("VM_STATE", "prestart() is for a VM built for an incoming state, once");
    this.deferDeviceState = true;
    this.devicesStarted = this.startDevices();
    const platform = await this.devicesStarted;
    await this.spawnVcpus(true, platform).ready;
  }

  /** After applyState(), on a prestart()ed VM: the device thread puts the devices' state back. */
  async restoreDevices(): Promise<void> {
    if (this.awaitingState || !this.deferDeviceState) throw new TypevisorError("VM_STATE", "restoreDevices() is for a prestarted VM whose state was applied");
    if (this.deviceThread !== undefined && this.restoredDevices !== undefined && this.restoredDevices !== null) {
      await this.deviceCommand({ command: "restore", args: { state: this.restoredDevices } });
    }
  }

  /** Create the vCPU workers (`paused`: set the pause flag first, so they park); `ready` once each runs its loop, `exited` once all ended. */
  private spawnVcpus(paused: boolean, platform: VcpuWorkerInit["platform"]): { ready: Promise<void>; exited: Promise<VmExitResult> } {
    if (paused) Atomics.store(this.ctrl, CTRL.PAUSE, 1);
    // Idempotent, so a rebooted VM in the same process sets it again harmlessly.
    setFlagsFromString(`--interrupt-budget=${V8_INTERRUPT_BUDGET}`);
    libc.installKickHandler();
    let readyCount = 0;
    let onReady: () => void = () => undefined;
    let onFail: (e: Error) => void = () => undefined;
    const ready = new Promise<void>((resolve, reject) => {
      onReady = resolve;
      onFail = reject;
    });
    const exited = new Promise<VmExitResult>((resolve) => {
      let first: { request: VmRequestCode; reason: string; dump?: string } | undefined;
      let exitedCount = 0;
      let failed: Error | undefined;
      this.pthreads = new Array<bigint>(this.vcpus.length).fill(0n);
      this.workers = this.vcpus.map((vcpu) => {
        const init: VcpuWorkerInit = {
          vcpuId: vcpu.id, vcpuFd: vcpu.fd, vmFd: this.vm.fd, runSize: this.runMaps[vcpu.id]!.run.length,
          control: this.control, stats: this.stats, serial: this.serialShared,
          consoleFd: this.cfg.consoleFd, com1Gsi: IRQ.COM1, niceOffset: this.cfg.vcpuNice ?? DEFAULT_VCPU_NICE, board: this.board,
          ...(platform !== undefined ? { platform } : {}),
          ...(this.cfg.vcpuSeccomp === true ? { seccomp: true } : {}),
        };
        const w = spawnWorker("vcpu/worker.js", init);
        w.on("message", (m: VcpuMessage) => {
          if (m.type === "ready") {
            this.pthreads[m.vcpuId] = m.thread;
            this.nice[m.vcpuId] = m.niceError !== undefined ? { nice: m.nice, niceError: m.niceError } : { nice: m.nice };
            // Named for per-thread CPU accounting (/proc/PID/task/TID/comm; Node names every thread "node").
            libc.pthreadSetName(m.thread, `tv-vcpu${m.vcpuId}`);
            if (++readyCount === this.vcpus.length) onReady();
          } else {
            // The first vCPU to stop decides why; the others are kicked out of KVM_RUN.
            if (first === undefined && m.request !== VmRequest.NONE) first = m;
            Atomics.compareExchange(this.ctrl, CTRL.REQUEST, VmRequest.NONE, m.request);
            this.kickAll();
          }
        });
        w.on("error", (e) => {
          failed ??= e;
          onFail(new TypevisorError("VCPU_THREAD", `vCPU thread failed: ${e.message}`));
          Atomics.compareExchange(this.ctrl, CTRL.REQUEST, VmRequest.NONE, VmRequest.CRASH);
          this.kickAll();
        });
        w.on("exit", () => {
          exitedCount++;
          onFail(new TypevisorError("VCPU_THREAD", "a vCPU thread exited during start-up"));
          if (exitedCount < this.workers.length) return;
          this.state = "stopped";
          const req = Atomics.load(this.ctrl, CTRL.REQUEST);
          if (failed !== undefined) resolve({ kind: "crash", reason: `vCPU thread failed: ${failed.message}` });
          else if (req === VmRequest.POWEROFF) resolve({ kind: "poweroff" });
          else if (req === VmRequest.RESET) resolve({ kind: "reset" });
          else if (req === VmRequest.STOP) resolve({ kind: "stopped" });
          else resolve({ kind: "crash", reason: this.deviceFailure ?? first?.reason ?? "vCPU stopped", ...(first?.dump !== undefined ? { dump: first.dump } : {}) });
        });
        return w;
      });
    });
    // Rejections after readiness (a later exit) are nobody's concern here: `exited` reports them.
    ready.catch(() => undefined);
    this.vcpuThreads = { ready, exited };
    return this.vcpuThreads;
  }

  /** Observes the board for the phases nobody stamps: often while they move, seldom while the VM idles. */
  private startSampler(): void {
    this.samplerMs = SAMPLE_MS;
    const tick = (): void => {
      this.samplerMs = nextSampleMs(this.samplerMs, this.observeThreads());
      this.sampler = setTimeout(tick, this.samplerMs);
      this.sampler.unref();
    };
    this.sampler = setTimeout(tick, this.samplerMs);
    this.sampler.unref();
  }

  private stopSampler(): void {
    if (this.sampler !== undefined) clearTimeout(this.sampler);
    this.sampler = undefined;
  }

  /**
   * Auto-converge for a live migration (vcpu/control.ts CTRL.THROTTLE): keep every vCPU out of
   * the guest `percent`% of the time (0 ends it). The vCPUs are kicked out of KVM_RUN every
   * slice while throttled, since a guest that never exits would never see the throttle.
   */
  setThrottle(percent: number): void {
    const pct = Math.max(0, Math.min(99, Math.round(percent)));
    if (Atomics.load(this.ctrl, CTRL.THROTTLE) === pct) return;
    Atomics.store(this.ctrl, CTRL.THROTTLE, pct);
    Atomics.notify(this.ctrl, CTRL.THROTTLE);
    if (pct === 0) {
      if (this.throttleTimer !== undefined) clearInterval(this.throttleTimer);
      this.throttleTimer = undefined;
    } else if (this.throttleTimer === undefined) {
      // Not waking the sleepers: that would cut their throttle slice short.
      this.throttleTimer = setInterval(() => this.kickAll(false), THROTTLE_SLICE_MS);
      this.throttleTimer.unref();
    }
  }

  /**
   * Run the vCPU threads `offset` steps nicer than the main thread (0..MAX_NICE; the VM's own
   * setting is `vcpuNice`). A migration's source lifts them to 0 while it streams memory: at +3
   * they lost every shared CPU to the streaming main thread, and in the one-CPU lab the guest made
   * no line for ~300 ms before the pause (docs/benchmarks.md). `undefined` puts the VM's own back.
   * Best effort: a refused change leaves the thread as it was.
   */
  setVcpuNice(offset?: number): void {
    const off = offset ?? this.cfg.vcpuNice ?? DEFAULT_VCPU_NICE;
    let base = 0;
    try {
      base = libc.threadNice(libc.gettid());
    } catch {
      // keep 0: the main thread's nice is what the vCPUs started from
    }
    const nice = Math.min(MAX_NICE, base + off);
    for (const v of this.vcpus) {
      const tid = readRow(this.boardRows[v.id]!).tid;
      if (tid <= 0) continue;
      try {
        libc.setThreadNice(tid, nice);
        this.nice[v.id] = { nice };
      } catch {
        // Refused (a lift without CAP_SYS_NICE): the thread keeps the nice value it had, which is what it reports.
      }
    }
  }

  /** The auto-converge throttle now (0..99). */
  get throttle(): number {
    return Atomics.load(this.ctrl, CTRL.THROTTLE);
  }

  /** Make every vCPU leave KVM_RUN promptly (KVM API §4.10, immediate_exit; kvm-lab.md). */
  private kickAll(wakeThrottled = true): void {
    // A vCPU sleeping off a throttle slice looks at the control words again now (pause, stop).
    if (wakeThrottled) Atomics.notify(this.ctrl, CTRL.THROTTLE);
    this.runMaps.forEach(({ run }, i) => {
      run[1] = 1; // kvm_run.immediate_exit: catches a kick that lands just before KVM_RUN
      const t = this.pthreads[i];
      if (t !== undefined && t !== 0n) {
        try {
          libc.pthreadKill(t, libc.SIG_VCPU_KICK);
        } catch {
          // thread already gone
        }
      }
    });
  }

  async pause(): Promise<void> {
    if (this.state !== "running") throw new TypevisorError("VM_STATE", `cannot pause a VM that is ${this.state}`);
    // Still starting: the vCPUs are parked until the devices are up, and run() keeps them so.
    if (this.starting) {
      this.state = "paused";
      return;
    }
    Atomics.store(this.ctrl, CTRL.PAUSE, 1);
    this.kickAll();
    const deadline = Date.now() + 5000;
    while (Atomics.load(this.ctrl, CTRL.PAUSED) < this.vcpus.length) {
      if (Atomics.load(this.ctrl, CTRL.REQUEST) !== VmRequest.NONE) break;
      if (Date.now() > deadline) throw new TypevisorError("PAUSE_TIMEOUT", "vCPUs did not stop within 5 s");
      await new Promise((r) => setTimeout(r, 1));
      this.kickAll();
    }
    this.state = "paused";
  }

  resume(): void {
    if (this.state !== "paused") throw new TypevisorError("VM_STATE", `cannot resume a VM that is ${this.state}`);
    const heldForSpace = this.pauseReason_ !== undefined;
    this.pauseReason_ = undefined;
    // Still starting: run() lets the parked vCPUs go once the devices are up.
    if (this.starting) {
      this.state = "running";
      return;
    }
    Atomics.store(this.ctrl, CTRL.PAUSE, 0);
    Atomics.notify(this.ctrl, CTRL.PAUSE);
    this.state = "running";
    // The writes a full disk held run again now; one that still finds no space pauses the VM again.
    if (heldForSpace && this.deviceThread !== undefined) {
      this.deviceCommand({ command: "disks.retry" }).catch((e: unknown) => process.stderr.write(`typevisor: retrying the held disk requests failed: ${(e as Error).message}\n`));
    }
  }

  /** Why the VMM paused the VM by itself, while it is paused for that. */
  get pauseReason(): PauseReason | undefined {
    return this.pauseReason_;
  }

  /**
   * A disk's host filesystem is full: its request is held (not failed) on the device thread and
   * the disk takes no more; stop the vCPUs too, as QEMU's werror=enospc does, so the guest
   * waits instead of seeing I/O errors, and say why (GET /vm pauseReason, onPaused).
   */
  private onNoSpace(m: { path: string; errno: string; op: string }): void {
    const fs = filesystemOf(m.path);
    const message = `disk ${m.path}: the filesystem ${fs.mountPoint} (${fs.type}) is full (${m.errno} on a ${m.op}; ${formatBytes(fs.freeBytes)} free of ${formatBytes(fs.sizeBytes)}): the VM is paused; free space there and resume it`;
    this.pauseReason_ = { kind: "disk-full", errno: m.errno, op: m.op, disk: m.path, filesystem: fs, message, at: new Date().toISOString() };
    const reason = this.pauseReason_;
    const told = (): void => this.cfg.onPaused?.(reason);
    if (this.state !== "running") return told();
    void this.pauseForDisk(reason).then(told);
  }

  /** pause(), tried again while the vCPUs are slow to stop (a loaded host) and the reason still stands. */
  private async pauseForDisk(reason: PauseReason): Promise<void> {
    for (let tries = 1; ; tries++) {
      try {
        await this.pause();
        return;
      } catch (e) {
        if (this.pauseReason_ !== reason || this.state !== "running" || tries >= 12) {
          process.stderr.write(`typevisor: pausing for a full disk failed: ${(e as Error).message}\n`);
          return;
        }
      }
    }
  }

  /** Stop the vCPUs (host-initiated); run() then resolves with "stopped". */
  stop(): void {
    Atomics.compareExchange(this.ctrl, CTRL.REQUEST, VmRequest.NONE, VmRequest.STOP);
    Atomics.store(this.ctrl, CTRL.PAUSE, 0);
    Atomics.notify(this.ctrl, CTRL.PAUSE);
    this.kickAll();
  }

  /**
   * Host-initiated reboot: the vCPUs stop as if the guest had written the ACPI
   * reset register, so run() resolves with "reset" and the caller's reboot
   * policy (restart or exit) applies unchanged.
   */
  reset(): void {
    if (this.state !== "running" && this.state !== "paused") throw new TypevisorError("VM_STATE", `cannot reboot a VM that is ${this.state}`);
    Atomics.compareExchange(this.ctrl, CTRL.REQUEST, VmRequest.NONE, VmRequest.RESET);
    Atomics.store(this.ctrl, CTRL.PAUSE, 0);
    Atomics.notify(this.ctrl, CTRL.PAUSE);
    this.kickAll();
  }

  /**
   * Disk and network counters as the device thread's back ends counted them into the stats page
   * (zeros without devices), with each disk's I/O thread as its ring shows it: read here, so
   * asking does not wake the device thread. (A thread that failed shows in GET /threads, which
   * asks the device thread.)
   */
  ioStats(): IoStats {
    const r = this.deviceThread === undefined ? undefined : this.statsPage.read();
    if (r === undefined) return emptyIoStats();
    return {
      ...r.totals,
      disks: r.disks.map((d, i) => ({ name: this.diskThreads[i]?.name ?? `disk ${i}`, ...d, ioThread: this.ioThreadState(i) })),
      nets: r.nics.map((n, i) => ({ name: this.netNames[i] ?? `nic ${i}`, ...n })),
    };
  }

  private ioThreadState(disk: number): BlockStats["ioThread"] {
    const t = this.diskThreads[disk]?.ioThread;
    if (t === undefined || t === null) return "none";
    // Without /proc's view (GET /threads reads it): a thread its ring shows is taken as alive.
    return ioRingState(ioRingStatus(t.ring), true);
  }

  /** Exits of vCPU `id` so far, every reason (its row of the stats buffer). */
  private exitsOf(id: number): number {
    const f = new Float64Array(this.stats, id * STAT_SLOTS * 8, STAT_SLOTS);
    let n = 0;
    for (let r = 0; r < STAT_SLOTS; r++) n += f[r]!;
    return n;
  }

  private vcpuReports(now: number): VcpuThreadReport[] {
    return this.vcpus.map((v) => vcpuReport(v.id, readRow(this.boardRows[v.id]!), this.exitsOf(v.id), now, this.watch));
  }

  private ioThreadReports(now: number, kernel: readonly KernelThread[] | null, fromDevices: DeviceThreadReport | undefined): IoThreadReport[] {
    return this.diskThreads.map((d, i) => {
      const t = d.ioThread;
      const status = t === null ? undefined : ioRingStatus(t.ring);
      // comm holds at most 15 bytes of the name (pthread_setname_np(3)); without /proc, trust it is there.
      const alive = t === null || status === undefined ? false : kernel === null || kernel.some((k) => k.tid === status.tid && k.comm === t.name.slice(0, 15));
      return ioThreadReport(i, d.name, t === null || status === undefined ? undefined : { name: t.name, status, alive }, fromDevices?.disks[i], now, this.watch);
    });
  }

  /** One observation of the unstamped phases (the sampler's tick); whether any of them moved. */
  private observeThreads(): boolean {
    const before = this.watch.changes;
    const now = clockMs();
    this.vcpuReports(now);
    this.ioThreadReports(now, null, undefined);
    return this.watch.changes !== before;
  }

  /** The device thread's own report, or why there is none, waited for at most `ms` (a timer: this thread never blocks). */
  private askDeviceThread(ms: number): Promise<DeviceAnswer> {
    const start = clockMs();
    const pending = (this.threadsAnswer ??= this.deviceCommand({ command: "threads" }).finally(() => {
      this.threadsAnswer = undefined;
    }));
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve({ ms: clockMs() - start }), ms);
      pending.then(
        (report) => {
          clearTimeout(timer);
          resolve({ report, ms: clockMs() - start });
        },
        (e: unknown) => {
          clearTimeout(timer);
          resolve({ error: e instanceof Error ? e.message : String(e), ms: clockMs() - start });
        },
      );
    });
  }

  /**
   * Where every VMM thread is (GET /threads): vCPUs and the device thread from the board, the
   * device thread's own report of every device and queue when it answers within `answerMs`,
   * each disk's I/O thread from its ring, and the kernel's view of every thread. Never blocks:
   * at most `answerMs` of waiting, on timers.
   */
  async threads(answerMs = THREADS_ANSWER_MS): Promise<ThreadsReport> {
    // An observation now, so the times reported below cover at least this request's wait even
    // when the sampler, the VM idle, last looked seconds ago.
    this.observeThreads();
    // A VM with devices whose thread is not running (not started yet, or stopped) still shows its row.
    let asked: Promise<DeviceAnswer> | undefined;
    if (this.deviceThread !== undefined) asked = this.askDeviceThread(answerMs);
    else if (hasDevices(this.cfg.devices)) asked = Promise.resolve({ error: `the device thread is not running (the VM is ${this.state})`, ms: 0 });
    const kernel = new Promise<KernelThread[] | null>((resolve) => {
      const timer = setTimeout(() => resolve(null), answerMs);
      kernelThreads().then(
        (k) => {
          clearTimeout(timer);
          resolve(k);
        },
        () => {
          clearTimeout(timer);
          resolve(null);
        },
      );
    });
    const [answer, threads] = await Promise.all([asked, kernel]);
    const now = clockMs();
    let devices: DeviceThreadThreadsReport | null = null;
    if (answer !== undefined) {
      devices = {
        ...deviceThreadPhase(readRow(this.boardRows[deviceRow(this.vcpus.length)]!), this.deviceNames, now),
        answering: answer.report !== undefined,
        answerMs: Math.round(answer.ms),
        ...(answer.error !== undefined ? { error: answer.error } : {}),
        pci: answer.report?.devices ?? null,
      };
    }
    return {
      at: new Date().toISOString(),
      state: this.state,
      vcpus: this.vcpuReports(now),
      devices,
      ioThreads: this.ioThreadReports(now, threads, answer?.report),
      kernel: threads,
    };
  }

  /** Console input; what the UART FIFO cannot take yet is retried shortly. */
  sendInput(bytes: Uint8Array): void {
    this.pendingInput.push(bytes);
    this.flushInput();
  }

  private flushInput(): void {
    while (this.pendingInput.length > 0) {
      const head = this.pendingInput[0]!;
      const n = this.serial.receive(head);
      if (n === head.length) this.pendingInput.shift();
      else {
        this.pendingInput[0] = head.subarray(n);
        this.inputTimer ??= setTimeout(() => {
          this.inputTimer = undefined;
          this.flushInput();
        }, 5);
        return;
      }
    }
  }

  getStats(): VmStats {
    const f = new Float64Array(this.stats);
    let total = 0;
    const vcpus = this.vcpus.map((v) => {
      const exits: Record<string, number> = {};
      for (let r = 0; r < STAT_SLOTS; r++) {
        const n = f[v.id * STAT_SLOTS + r]!;
        if (n > 0) {
          exits[r === STAT_SLOTS - 1 ? "other" : (EXIT_NAMES[r] ?? `exit_${r}`)] = n;
          total += n;
        }
      }
      return { id: v.id, exits, ...this.nice[v.id] };
    });
    return {
      state: this.state,
      uptimeMs: this.startedAt === 0 ? 0 : Date.now() - this.startedAt,
      memoryBytes: this.memory.size,
      cpus: this.vcpus.length,
      vcpus,
      totalExits: total,
    };
  }

  /** Register dumps of every vCPU; only while paused (KVM_GET_REGS on a running vCPU would wait for it). */
  registers(): { id: number; dump: string }[] {
    if (this.state !== "paused") throw new TypevisorError("VM_STATE", `registers can be read only while paused (the VM is ${this.state})`);
    return this.vcpus.map((v) => ({ id: v.id, dump: formatRegisterDump(v.getRegs(), v.getSregs()) }));
  }

  get vmState(): VmState {
    return this.state;
  }

  /**
   * Save the whole VM into `dir` (which must not exist; its parent must): state.json (every vCPU,
   * the interrupt controllers, PIT, clock, serial port and devices), config.json, and with
   * `memory` (the default) guest memory as a sparse file. A running VM is paused meanwhile
   * and runs again afterwards. The directory appears whole or not at all: everything is
   * written under a temporary name, synced, then renamed.
   */
  async snapshot(dir: string, opts: SnapshotOptions): Promise<{ path: string; ms: number; memoryBytes: number; dataBytes: number; base?: string }> {
    if (this.state !== "running" && this.state !== "paused") throw new TypevisorError("VM_STATE", `cannot snapshot a VM that is ${this.state}`);
    if (this.pauseReason_ !== undefined) throw new TypevisorError("VM_STATE", "the VM is paused for a full disk: free space and resume it first");
    if (opts.memory === false && (opts.base !== undefined || opts.track === true)) throw new TypevisorError("INVALID_REQUEST", "an incremental snapshot (base) or dirty tracking (track) needs memory: drop \"memory\": false");
    const started = performance.now();
    const wasRunning = this.state === "running";
    const tmp = join(dirname(dir), `.${dir.split("/").pop() ?? "snapshot"}.tmp-${process.pid}`);
    if (existsSync(dir)) throw new TypevisorError("SNAPSHOT_EXISTS", `${dir} already exists`);
    const base = opts.base !== undefined ? this.trackedBase(opts.base) : undefined;
    try {
      mkdirSync(tmp, { mode: 0o700 });
    } catch (e) {
      throw new TypevisorError((e as NodeJS.ErrnoException).code === "ENOSPC" ? "DISK_FULL" : "INVALID_REQUEST", `cannot create ${dir}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message} (its directory ${dirname(dir)} must exist and be writable)`);
    }
    try {
      if (wasRunning) await this.pause();
      const runState = wasRunning ? "running" : "paused";
      let state: SnapshotState;
      let dataBytes = 0;
      if (opts.memory !== false) {
        const captured = await this.captureState(opts.config, runState);
        let written: MemoryWriteResult;
        if (base !== undefined) {
          // Every page written since the base (by the guest or the devices), and nothing else.
          this.harvestDirty();
          written = writeDirtyMemoryFile(join(tmp, SNAPSHOT_FILES.memory), this.memory.hostRegions, base.sub.acc);
          written.layout.base = { path: relative(dir, base.dir) || ".", sha256: base.sha256 };
        } else {
          written = writeMemoryFile(join(tmp, SNAPSHOT_FILES.memory), this.memory.hostRegions, this.memorySources, (gpa, len) => this.memory.trySlice(gpa, len));
        }
        dataBytes = written.dataBytes;
        state = { ...captured, memory: written.layout };
      } else {
        state = { version: SNAPSHOT_VERSION, createdAt: new Date().toISOString(), runState, config: opts.config, memory: null, vcpus: [], vm: null, platform: null, devices: null };
      }
      const memory = state.memory;
      const stateBytes = encodeState(state);
      writeSynced(join(tmp, SNAPSHOT_FILES.state), stateBytes);
      writeSynced(join(tmp, SNAPSHOT_FILES.config), Buffer.from(JSON.stringify(opts.config, null, 2) + "\n"));
      renameSync(tmp, dir);
      syncDir(dirname(dir));
      // From here on, pages written are counted against this snapshot (still paused: none yet).
      if (base !== undefined || opts.track === true) await this.trackFrom(dir, stateSha256(stateBytes)!);
      return { path: dir, ms: Math.round(performance.now() - started), memoryBytes: memory?.bytes ?? 0, dataBytes, ...(base !== undefined ? { base: base.dir } : {}) };
    } catch (e) {
      rmSync(tmp, { recursive: true, force: true });
      throw e;
    } finally {
      if (wasRunning && this.state === "paused") this.resume();
    }
  }

  /**
   * The tracked snapshot, when `baseDir` is it: its state file there must still be the one taken
   * (same SHA-256), else the pages counted since are not the difference to what is there now.
   */
  private trackedBase(baseDir: string): { sha256: string; dir: string; sub: DirtySubscriber } {
    const t = this.tracked;
    if (t === undefined) throw new TypevisorError("VM_STATE", "no snapshot is tracked yet: take one with \"track\": true first, then incremental ones with \"base\"");
    let sha: string | undefined;
    try {
      sha = stateSha256(readFileSync(join(baseDir, SNAPSHOT_FILES.state)).subarray(0, 256));
    } catch (e) {
      throw new TypevisorError("SNAPSHOT_NOT_FOUND", `${baseDir}: ${(e as NodeJS.ErrnoException).code === "ENOENT" ? "not a snapshot (no state.json)" : (e as Error).message}`);
    }
    if (sha !== t.sha256) throw new TypevisorError("SNAPSHOT_MISMATCH", `${baseDir} is not the snapshot this VM tracks its changes since (that is ${t.dir}): take a full one with "track": true`);
    return { ...t, dir: resolve(baseDir) };
  }

  /** Count the pages written from now on against the snapshot just written to `dir`. */
  private async trackFrom(dir: string, sha256: string): Promise<void> {
    const sub = this.tracked?.sub ?? (await this.subscribeDirty());
    for (const acc of sub.acc) acc.fill(0);
    this.tracked = { sha256, dir, sub };
  }

  /**
   * Start logging the guest's writes to RAM for a live migration (KVM_MEM_LOG_DIRTY_PAGES on every
   * slot, KVM API §4.35): takeDirtyLog() then says which pages changed since the last call. The
   * device thread marks its own writes (KVM does not see them). The log is shared: an
   * incremental-snapshot tracker may be reading it too, and each reader sees every page once.
   */
  async startDirtyLog(): Promise<void> {
    if (this.migrationDirty !== undefined) return;
    this.migrationDirty = await this.subscribeDirty();
  }

  /** Each slot's pages written since the last call (or startDirtyLog), one bit per 4 KiB page; views valid until the next call. */
  takeDirtyLog(): Uint8Array[] {
    const sub = this.migrationDirty;
    if (sub === undefined) throw new TypevisorError("VM_STATE", "dirty logging is off");
    this.harvestDirty();
    sub.acc.forEach((acc, slot) => {
      sub.out[slot]!.set(acc);
      acc.fill(0);
    });
    return sub.out;
  }

  stopDirtyLog(): void {
    const sub = this.migrationDirty;
    this.migrationDirty = undefined;
    if (sub !== undefined) this.unsubscribeDirty(sub);
  }

  /** A new reader of the dirty log, from now on (logging starts with the first). */
  private async subscribeDirty(): Promise<DirtySubscriber> {
    const regions = this.memory.hostRegions;
    if (this.dirtyMaps === undefined) {
      // Safe to hand to KVM_GET_DIRTY_LOG: each is a private mapping of exactly the bitmap size
      // KVM writes for its slot (one bit per page, rounded up to 64 bits), unmapped only once
      // logging is off (stopDirtyLogging) or the VM is released.
      this.dirtyMaps = regions.map((r) => libc.mmap(bitmapBytes(r.size), libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS));
      regions.forEach((h, slot) => this.vm.setUserMemoryRegion(slot, h.guestPhysAddr, h.size, BigInt(h.hostAddress), KVM_MEM_LOG_DIRTY_PAGES));
      // The devices' own writes (used rings, received frames, disk reads) never reach KVM's log: the device thread marks them here.
      if (this.deviceThread !== undefined) {
        const end = Math.max(...regions.map((r) => r.guestPhysAddr + r.size));
        this.deviceDirty = DirtyLog.create(end);
        await this.deviceCommand({ command: "dirtyLog", args: { buffer: this.deviceDirty.shared } });
      }
    } else {
      // What was written until now belongs to the readers already there.
      this.harvestDirty();
    }
    const sub: DirtySubscriber = { acc: regions.map((r) => new Uint8Array(bitmapBytes(r.size))), out: regions.map((r) => new Uint8Array(bitmapBytes(r.size))) };
    this.dirtySubscribers.add(sub);
    return sub;
  }

  private unsubscribeDirty(sub: DirtySubscriber): void {
    this.dirtySubscribers.delete(sub);
    if (this.dirtySubscribers.size > 0) return;
    const maps = this.dirtyMaps;
    if (maps === undefined) return;
    this.dirtyMaps = undefined;
    if (this.deviceDirty !== undefined && this.deviceThread !== undefined) {
      this.deviceCommand({ command: "dirtyLog", args: { buffer: null } }).catch(() => undefined);
    }
    this.deviceDirty = undefined;
    this.memory.hostRegions.forEach((h, slot) => this.vm.setUserMemoryRegion(slot, h.guestPhysAddr, h.size, BigInt(h.hostAddress)));
    for (const m of maps) libc.munmap(m);
  }

  /** Read (and clear) KVM's and the device thread's logs into every reader's bitmaps. */
  private harvestDirty(): void {
    const maps = this.dirtyMaps;
    if (maps === undefined) return;
    const regions = this.memory.hostRegions;
    const subs = [...this.dirtySubscribers];
    maps.forEach((m, slot) => {
      this.vm.getDirtyLog(slot, m);
      // Safe: a view of the bitmap mapping made in subscribeDirty, alive while logging is on.
      const bits = new Uint8Array(libc.view(m.pointer, m.length));
      for (const sub of subs) {
        const acc = sub.acc[slot]!;
        for (let i = 0; i < bits.length; i++) if (bits[i] !== 0) acc[i]! |= bits[i]!;
      }
    });
    // Fold in what the devices wrote (guest-physical page numbers) as bits of each slot.
    for (const page of this.deviceDirty?.take() ?? []) {
      const gpa = page * 4096;
      const slot = regions.findIndex((r) => gpa >= r.guestPhysAddr && gpa < r.guestPhysAddr + r.size);
      if (slot < 0) continue;
      const p = (gpa - regions[slot]!.guestPhysAddr) / 4096;
      for (const sub of subs) sub.acc[slot]![p >> 3]! |= 1 << (p & 7);
    }
  }

  /** Where each RAM region's pages came from when the VM was restored (snapshot/memory.ts RegionSource). */
  get memoryRegionSources(): readonly (RegionSource | undefined)[] {
    return this.memorySources;
  }

  private releaseKvm(): void {
    for (const { map } of this.runMaps) libc.munmap(map);
    this.runMaps.length = 0;
    for (const v of this.vcpus) v.close();
    this.vcpus.length = 0;
    // Fields may be unset when the constructor failed part-way.
    const self = this as unknown as { vm?: VmFd; kvm?: Kvm };
    self.vm?.close();
    for (const m of this.dirtyMaps ?? []) libc.munmap(m);
    this.dirtyMaps = undefined;
    this.dirtySubscribers.clear();
    this.migrationDirty = undefined;
    this.tracked = undefined;
    for (const m of this.mems) libc.munmap(m);
    this.mems.length = 0;
    self.kvm?.close();
  }

  /**
   * Give up a VM that never ran: stop its device thread if prepareDevices() started it (the
   * thread uses guest memory, and would keep the process alive), then release everything.
   */
  async discard(): Promise<void> {
    if (this.state !== "created") throw new TypevisorError("VM_STATE", `discard() is for a VM that never ran (this one is ${this.state})`);
    this.state = "stopped";
    await this.devicesStarted?.catch(() => undefined);
    // prestart()ed vCPU threads, parked: they leave at the stop request without running guest code.
    const threads = this.vcpuThreads;
    if (threads !== undefined) {
      this.stop();
      await threads.exited;
    }
    await this.stopDevices();
    this.destroy();
  }

  /** Release KVM fds and guest memory. Call after run() resolved. */
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    if (this.inputTimer !== undefined) clearTimeout(this.inputTimer);
    if (this.throttleTimer !== undefined) clearInterval(this.throttleTimer);
    this.throttleTimer = undefined;
    this.stopSampler();
    this.releaseKvm();
    // Only now: a constructor that failed leaves the memory file to whoever opened it.
    for (const fd of this.memoryFds) closeSync(fd);
    this.memoryFds = [];
  }
}

function writeSynced(path: string, data: Uint8Array): void {
  writeFileSync(path, data, { mode: 0o600, flag: "wx" });
  syncPath(path);
}

function syncPath(path: string): void {
  const fd = openSync(path, "r");
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** fsync a directory, so a rename in it survives a crash. */
function syncDir(path: string): void {
  syncPath(path);
}
