/** The kernel command line a VM boots with unless told otherwise: console on COM1, reboot on panic. */
export const DEFAULT_CMDLINE = "console=ttyS0 panic=-1";
