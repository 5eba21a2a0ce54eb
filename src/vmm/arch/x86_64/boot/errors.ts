import { TypevisorError } from "../../../../errors.js";

/**
 * Error codes of the kernel loader. Everything that comes from the kernel
 * image is untrusted input: a malformed or truncated image is reported with
 * KERNEL_INVALID before any guest memory is written.
 */
export type BootErrorCode =
  | "KERNEL_INVALID"
  | "INITRD_TOO_LARGE"
  | "MEMORY_TOO_SMALL"
  | "CMDLINE_TOO_LONG"
  | "CMDLINE_INVALID";

export function bootError(code: BootErrorCode, message: string, hint?: string): TypevisorError {
  return new TypevisorError(code, message, hint !== undefined ? { hint } : undefined);
}

export function kernelInvalid(message: string): TypevisorError {
  return bootError("KERNEL_INVALID", `invalid kernel image: ${message}`);
}

export function hex(n: number | bigint): string {
  return `0x${n.toString(16)}`;
}
