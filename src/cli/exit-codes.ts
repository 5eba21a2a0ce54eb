/**
 * The command line's exit codes (the table is in vm.ts and in every client
 * command's --help) and the one mapping from an error to its code, shared by
 * main() and by `run`'s --exit-file, so the file records the status the
 * process really exits with.
 */
import { ApiError } from "../api/api-error.js";
import { isTypevisorError } from "../errors.js";

export const EXIT = { OK: 0, FAILED: 1, BAD_INPUT: 2, NOT_FOUND: 3, CONFLICT: 4, UNREACHABLE: 5, DENIED: 6 } as const;
/** Not a TypevisorError: a bug, not something a user caused (EX_SOFTWARE, sysexits.h). */
export const EXIT_INTERNAL = 70;

/**
 * Well-known codes first, then the HTTP status of an error from the daemon,
 * then local errors (a failing syscall or KVM is a run-time failure, anything
 * else bad input).
 */
export function exitCodeFor(e: unknown): number {
  if (!isTypevisorError(e)) return EXIT_INTERNAL;
  const c = e.code;
  if (c === "DAEMON_UNREACHABLE") return EXIT.UNREACHABLE;
  if (c === "UNAUTHENTICATED" || c === "FORBIDDEN" || c === "TOO_MANY_ATTEMPTS" || c === "MFA_REQUIRED" || c === "TLS_FINGERPRINT") return EXIT.DENIED;
  if (c === "VM_NOT_FOUND") return EXIT.NOT_FOUND;
  if (c === "VM_STATE" || c === "VM_EXISTS" || c === "INSUFFICIENT_RESOURCES" || c === "IMAGE_IN_USE" || c === "IMAGE_EXISTS") return EXIT.CONFLICT;
  if (c === "VM_START_FAILED" || c.startsWith("VMM")) return EXIT.FAILED;
  if (e instanceof ApiError) {
    if (e.status === 404) return EXIT.NOT_FOUND;
    if (e.status === 409) return EXIT.CONFLICT;
    if (e.status >= 500 || e.status < 400) return EXIT.FAILED;
    return EXIT.BAD_INPUT;
  }
  return c === "SYSCALL_FAILED" || c.startsWith("KVM") ? EXIT.FAILED : EXIT.BAD_INPUT;
}
