/**
 * Shared control words between the VMM main thread and its vCPU workers
 * (Int32Array over a SharedArrayBuffer), and the typed messages they exchange,
 * in the manner of Firecracker's vCPU event channel.
 */
export const CTRL = {
  /** VmRequest: why the VM should stop running (first writer wins). */
  REQUEST: 0,
  /** 1 while the VMM wants the vCPUs parked. */
  PAUSE: 1,
  /** How many vCPUs are parked right now. */
  PAUSED: 2,
  /**
   * Auto-converge (live migration): 0..99, the share of time each vCPU stays out of KVM_RUN.
   * A throttled vCPU, after running THROTTLE_SLICE_MS, sleeps pct/(100-pct) of a slice before
   * it enters the guest again; the VMM kicks the vCPUs every slice so none stays in longer.
   */
  THROTTLE: 3,
  SLOTS: 4,
} as const;

/** The slice auto-converge throttles by (QEMU's cpu-throttle uses 10 ms as well). */
export const THROTTLE_SLICE_MS = 10;

export const VmRequest = { NONE: 0, POWEROFF: 1, RESET: 2, STOP: 3, CRASH: 4 } as const;
export type VmRequestCode = (typeof VmRequest)[keyof typeof VmRequest];

/** Per-vCPU exit counters: one Float64 slot per exit reason (0..STAT_SLOTS-2) plus "other". */
export const STAT_SLOTS = 32;

export interface VcpuWorkerInit {
  vcpuId: number;
  vcpuFd: number;
  vmFd: number;
  runSize: number;
  control: SharedArrayBuffer;
  stats: SharedArrayBuffer;
  serial: SharedArrayBuffer;
  consoleFd: number;
  com1Gsi: number;
  /** The device thread's mailbox, when the VM has PCI devices. */
  platform?: { mailbox: SharedArrayBuffer; eventfd: number };
  /** Added to the thread's inherited nice value (defaults.ts DEFAULT_VCPU_NICE says why). */
  niceOffset: number;
  /** The thread board (threads/board.ts): this vCPU publishes its phase in row `vcpuId`. */
  board: SharedArrayBuffer;
  /** Install this thread's own seccomp filter (sys/seccomp.ts vcpuFilter) before the first KVM_RUN. */
  seccomp?: boolean;
}

export type VcpuMessage =
  /** `nice`: the thread's nice value once set; `niceError`: why it could not be (the vCPU runs on regardless). */
  | { type: "ready"; vcpuId: number; thread: bigint; nice: number; niceError?: string }
  | { type: "exit"; vcpuId: number; request: VmRequestCode; reason: string; dump?: string };
