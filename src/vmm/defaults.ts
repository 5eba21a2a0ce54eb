/** The kernel command line a VM boots with unless told otherwise: console on COM1, reboot on panic. */
export const DEFAULT_CMDLINE = "console=ttyS0 panic=-1";

/** Guest memory limits (kept here, free of KVM imports, so the control plane's schemas can share them). */
export const MIN_MEMORY_MIB = 64;
/** One ArrayBuffer view must cover guest RAM for now (V8 caps a view at 4 GiB). */
export const MAX_MEMORY_MIB = 4096;

/**
 * How much nicer than the VMM's other threads its vCPU threads run (setpriority(2) on each vCPU
 * thread; 0 = the same weight). Where a vCPU and the device thread share a CPU (an overcommitted
 * host, or the one-CPU lab), CFS lets a waking thread preempt the running one only when the woken
 * one has had less weighted CPU time (Documentation/scheduler/sched-design-CFS.rst; wake-up
 * preemption). At equal weight the device thread, which does the copying, never qualifies: the
 * MSI that completes a request wakes the halted vCPU, the vCPU preempts the device thread, and the
 * guest's next kick finds that thread runnable rather than asleep, so nothing runs it until the
 * guest goes idle and halts — once per request. Three steps of nice (weight 1024 → 526) reverse
 * that: the completion does not preempt the device thread, which goes back to sleep; the next kick
 * wakes it and it runs at once, as QEMU's main loop does (measured in docs/benchmarks.md). Within
 * a VM's own cgroup (the control plane gives each VMM one) this only orders the VM's own threads.
 */
export const DEFAULT_VCPU_NICE = 3;
/** The largest nice value (setpriority(2)). */
export const MAX_NICE = 19;
