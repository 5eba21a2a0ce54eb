/** The kernel command line a VM boots with unless told otherwise: console on COM1, reboot on panic. */
export const DEFAULT_CMDLINE = "console=ttyS0 panic=-1";

/** Guest memory limits (kept here, free of KVM imports, so the control plane's schemas can share them). */
export const MIN_MEMORY_MIB = 64;
/** One ArrayBuffer view must cover guest RAM for now (V8 caps a view at 4 GiB). */
export const MAX_MEMORY_MIB = 4096;
