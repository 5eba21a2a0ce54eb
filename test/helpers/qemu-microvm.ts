/**
 * QEMU as the peer in lab tests: a `microvm` machine with KVM (inside the lab), the guest's serial
 * console on stdio, no firmware, no default devices; `extra` adds drives and devices.
 */
export function microvm(kernel: string, initrd: string, append: string, extra: string[] = []): string[] {
  return [
    "-M", "microvm",
    "-accel", "kvm",
    "-cpu", "host",
    "-m", "256",
    "-smp", "1",
    "-nodefaults",
    "-no-user-config",
    "-display", "none",
    "-serial", "stdio",
    "-no-reboot",
    "-kernel", kernel,
    "-initrd", initrd,
    "-append", append,
    ...extra,
  ];
}
