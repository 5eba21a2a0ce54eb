/**
 * GET /threads: where each VMM thread is, assembled on the main thread from what the threads
 * publish (the board, the disks' I/O rings), the device thread's answer when it gives one in
 * time, and the kernel's view of every thread. Plain data, so it goes out as JSON unchanged.
 * The pieces here are pure (decoding), so they are tested without threads.
 */
import { EXIT, EXIT_NAMES } from "../../kvm/ioctls.js";
import type { DeviceThreadReport } from "../devices/platform/device-thread-init.js";
import type { IoRingStatus } from "../devices/virtio/block/io-ring.js";
import { decodeDeviceWord, decodeVcpuWord, isStamped, type PhaseName, type PhaseWatch, type RowSnapshot } from "./board.js";
import type { KernelThread } from "./kernel.js";

/** One vCPU thread. */
export interface VcpuThreadReport {
  id: number;
  /** Kernel thread id; null until the thread has started. */
  tid: number | null;
  /** starting | run (inside KVM_RUN) | exit (handling one in user space) | paused | finished. */
  phase: PhaseName;
  /**
   * How long it has been in this phase. starting/paused/finished: exact (stamped by the thread).
   * run/exit, entered per exit and never stamped: how long the VMM has seen the same phase, exit
   * and exit count (a lower bound, as fine as SAMPLE_MS); 0 while the vCPU is exiting busily.
   */
  phaseMs: number;
  /** Exits so far (every reason, as GET /stats counts them). */
  exits: number;
  /** The exit being handled (phase exit), or the last one handled (other phases); null before the first. */
  exit: {
    reason: string;
    /** io: the port; mmio: the guest-physical address (hex). */
    address?: string;
    write?: boolean;
    size?: number;
    /** Waiting for the device thread to answer this access (PCI config or a BAR register, through the mailbox). */
    mailbox: boolean;
  } | null;
}

/** The device thread: its published phase always, its own report when it answers in time. */
export interface DeviceThreadThreadsReport {
  tid: number | null;
  /** starting | poll (waiting, 1 s timeout) | mailbox | notify | backend | command | tick | stopping | finished. */
  phase: PhaseName;
  /** Since it entered poll, or since it woke for the work it does now (every phase is stamped). */
  phaseMs: number;
  /** Passes through its poll loop so far. */
  passes: number;
  /** notify/backend: the device it serves (and notify: the queue). */
  device?: string;
  queue?: number;
  /** Whether it answered the "threads" command within the timeout; a stuck device thread is itself the answer. */
  answering: boolean;
  /** How long the answer took (answering), or how long it was waited for. */
  answerMs: number;
  /** Why there is no answer besides the timeout (the VM stopped, the command failed). */
  error?: string;
  /** Its report (answering), else null. */
  pci: DeviceThreadReport["devices"] | null;
}

/** One disk's I/O thread, from its shared ring (read by the main thread: works while the device thread is stuck). */
export interface IoThreadReport {
  disk: string;
  /** Thread name (tv-blkN); null for a disk without an I/O thread. */
  name: string | null;
  tid: number | null;
  /**
   * none (served on the device thread) | idle (no thread now: it starts when the disk needs one,
   * and ends after idling) | starting | running | failed (gone; its requests were answered with
   * IOERR or are stuck).
   */
  state: "none" | "idle" | "starting" | "running" | "failed";
  /** Working on a request now. */
  busy: boolean;
  /** Requests submitted to the thread and not done by it. */
  inFlight: number;
  /** The request it works on (busy), else null: op, byte position, length. */
  current: IoRingStatus["current"];
  /** How long it has shown the same request (busy) or been idle, by the VMM's observations (lower bound). */
  phaseMs: number;
  /** Requests done since it started. */
  completed: number;
  /** The device thread's count of requests awaiting an answer (submitted, not reaped), when it answered. */
  deviceInFlight?: number;
}

export interface ThreadsReport {
  /** When this was read (ISO time). */
  at: string;
  /** The VM's state (running, paused, ...). */
  state: string;
  vcpus: VcpuThreadReport[];
  /** null: the VM has no devices, so no device thread. */
  devices: DeviceThreadThreadsReport | null;
  ioThreads: IoThreadReport[];
  /** Every thread of the process as the kernel sees it; null if /proc did not answer in time. */
  kernel: KernelThread[] | null;
}

const hex = (n: number): string => `0x${n.toString(16)}`;

/** A vCPU's row (and its exit count) as reported; `watch` times the unstamped phases. */
export function vcpuReport(id: number, snap: RowSnapshot, exits: number, now: number, watch: PhaseWatch): VcpuThreadReport {
  const w = decodeVcpuWord(snap.word);
  const code = snap.word & 0xff;
  const observed = watch.observe(`vcpu${id}`, snap.word, exits, now);
  const phaseMs = isStamped(code) ? Math.max(0, now - snap.since) : observed;
  const io = w.reason === EXIT.IO || w.reason === EXIT.MMIO;
  const exit: VcpuThreadReport["exit"] =
    exits === 0 && w.reason === 0
      ? null
      : {
          reason: EXIT_NAMES[w.reason] ?? `exit_${w.reason}`,
          ...(io ? { address: hex(snap.addr), write: w.write, size: w.size } : {}),
          mailbox: w.mailbox,
        };
  return { id, tid: snap.tid === 0 ? null : snap.tid, phase: w.phase, phaseMs: Math.round(phaseMs), exits, exit };
}

/** The device thread's published phase, with the device names it publishes indices of. */
export function deviceThreadPhase(snap: RowSnapshot, deviceNames: readonly string[], now: number): Pick<DeviceThreadThreadsReport, "tid" | "phase" | "phaseMs" | "passes" | "device" | "queue"> {
  const w = decodeDeviceWord(snap.word);
  const about = w.phase === "notify" || w.phase === "backend";
  return {
    tid: snap.tid === 0 ? null : snap.tid,
    phase: w.phase,
    phaseMs: Math.round(Math.max(0, now - snap.since)),
    passes: snap.seq,
    ...(about ? { device: deviceNames[w.device] ?? `device ${w.device}` } : {}),
    ...(w.phase === "notify" ? { queue: w.queue } : {}),
  };
}

/** An I/O thread's state as its ring shows it; `alive`: whether the kernel still lists it (a thread that died shows as failed). */
export function ioRingState(status: IoRingStatus, alive: boolean): "idle" | "starting" | "running" | "failed" {
  return !status.active ? "idle" : status.tid === 0 ? "starting" : alive ? "running" : "failed";
}

/**
 * One disk's I/O thread. `ring`: its ring's status (undefined: the disk has no I/O thread);
 * `alive`: whether the kernel still lists its tid under its name; `fromDevices`: the device
 * thread's view of the disk, when it answered (it alone knows it dropped a failed thread).
 */
export function ioThreadReport(
  index: number,
  disk: string,
  thread: { name: string; status: IoRingStatus; alive: boolean } | undefined,
  fromDevices: DeviceThreadReport["disks"][number] | undefined,
  now: number,
  watch: PhaseWatch,
): IoThreadReport {
  if (thread === undefined) {
    return { disk, name: null, tid: null, state: "none", busy: false, inFlight: 0, current: null, phaseMs: 0, completed: 0, ...(fromDevices !== undefined ? { deviceInFlight: fromDevices.inFlight } : {}) };
  }
  const { status } = thread;
  const inFlight = (status.submitted - status.completed) | 0;
  const busy = inFlight !== 0;
  const state: IoThreadReport["state"] = fromDevices?.ioThread === "failed" ? "failed" : ioRingState(status, thread.alive);
  return {
    disk,
    name: thread.name,
    tid: status.tid === 0 ? null : status.tid,
    state,
    busy,
    inFlight,
    current: status.current,
    phaseMs: Math.round(watch.observe(`io${index}`, busy ? 1 : 0, status.completed, now)),
    completed: status.completed >>> 0,
    ...(fromDevices !== undefined ? { deviceInFlight: fromDevices.inFlight } : {}),
  };
}
