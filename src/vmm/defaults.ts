/**
 * The kernel command line a VM boots with unless told otherwise: console on COM1, reboot on panic,
 * and `quiet` (loglevel 4: warnings and errors still reach the console, the rest is in dmesg).
 * Every byte the kernel prints goes out through the 8250's transmit register, a port write the
 * VMM handles after a VM exit, plus the driver's polls of the line status register. A Debian cloud
 * kernel's ~20 KB boot log cost 15 of 27 s of `typevisor run --image minimal` in the lab
 * (2026-12-07: 27.4 s → 12.6 s with `quiet`); on hardware an exit costs far less, but the log is
 * still tens of thousands of them.
 */
export const DEFAULT_CMDLINE = "console=ttyS0 panic=-1 quiet";

/** Guest memory limits (kept here, free of KVM imports, so the control plane's schemas can share them). */
export const MIN_MEMORY_MIB = 64;
/**
 * The largest guest memory any VMM accepts: 4 TiB, the guest-physical space of a CPU with 43 or
 * more address bits once the 1 GiB MMIO hole is skipped. The host bounds it further, each checked
 * with its own message: its physical memory times the memory overcommit allowed
 * (`--memory-overcommit`, the daemon's policy), and the guest's physical address width (CPUID
 * 0x80000008 EAX[7:0] as KVM offers it). Guest RAM is seen through views of at most 4 GiB each
 * (memory/guest-memory.ts), so no JavaScript limit applies.
 */
export const MAX_MEMORY_MIB = 4 * 1024 * 1024;

/**
 * The most vCPUs any VMM accepts: 4096, the largest KVM_MAX_VCPUS an x86 kernel can be built with
 * (CONFIG_KVM_MAX_NR_VCPUS). The host's own KVM_CAP_MAX_VCPUS (1024 on Debian 12's kernel) is
 * checked when the VM is created. Past 254 vCPUs the guest needs x2APIC: the MADT lists those
 * CPUs as Local x2APIC structures and the VMM turns on KVM's 32-bit x2APIC IDs (vm.ts).
 */
export const MAX_VCPUS = 4096;

/**
 * Host memory a VMM process needs besides guest RAM, as a cgroup's memory.max must allow it:
 * the base (Node, the main thread, the device thread and its I/O threads: `baseBytes`), about
 * 16 MiB per vCPU (each vCPU thread is a worker with its own V8 isolate; measured 10-12 MiB of
 * RSS each on a project machine), and the page tables of guest RAM, which the kernel charges to
 * the cgroup: KVM's (EPT/NPT) and the VMM process's own over the same mappings, each at most 8
 * bytes per 4 KiB page (1/512 of guest RAM) when no huge page could be used.
 */
export function vmmOverheadBytes(cpus: number, memoryBytes: number, baseBytes = 384 * 1024 * 1024): number {
  return baseBytes + cpus * 16 * 1024 * 1024 + 2 * Math.ceil(memoryBytes / 512);
}

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
