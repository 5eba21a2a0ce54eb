/**
 * Test hook of the daemon's VMM sandbox (`run --sandbox-probe`, passed by `daemon --sandbox-probe`):
 * from inside the VMM process, as it runs, try to open host paths and make system calls the
 * seccomp filter denies, and report what happened. The proof that the sandbox holds is then made
 * by the process it is meant to hold, not by a look at its configuration
 * (test/control/sandbox.test.ts). Nothing here changes state when the sandbox holds; without a
 * sandbox, the calls chosen still do no harm: mount(2) of nothing on "/" fails with EINVAL or
 * EFAULT, and the others ask for nothing lasting (a keyring lookup, a BPF map of size 0).
 */
import { closeSync, openSync, readFileSync } from "node:fs";
import koffi from "koffi";
import * as libc from "../sys/libc.js";
import { DENIED_SYSCALLS } from "../sys/seccomp.js";

const c = koffi.load("libc.so.6");
const syscallFn = c.func("long syscall(long number, long a1, long a2, long a3, long a4, long a5)");

export interface SandboxProbe {
  /** Path → "opened" or the error code. */
  open: Record<string, string>;
  /** System call → "ok" or the errno name. */
  syscalls: Record<string, string>;
  /** Lines of /proc/self/status that say who we are. */
  status: Record<string, string>;
}

const CLONE_NEWUSER = 0x10000000;
/** keyctl(KEYCTL_GET_KEYRING_ID = 0, KEY_SPEC_SESSION_KEYRING = -3, create = 0). */
/** execve(NULL, ...) and execveat(-1, "", ...): EFAULT/EBADF when allowed (nothing runs), EPERM when refused. */
const EXEC_CALLS: Record<string, [number, readonly number[]]> = { execve: [59, [0, 0, 0, 0, 0]], execveat: [322, [-1, 0, 0, 0, 0]] };
const CALLS: Record<string, readonly number[]> = {
  mount: [0, 0, 0, 0, 0],
  unshare: [CLONE_NEWUSER, 0, 0, 0, 0],
  keyctl: [0, -3, 0, 0, 0],
  bpf: [0, 0, 0, 0, 0],
  setns: [-1, 0, 0, 0, 0],
  open_by_handle_at: [-1, 0, 0, 0, 0],
};

export function sandboxProbe(paths: readonly string[]): SandboxProbe {
  const open: Record<string, string> = {};
  for (const p of paths) {
    try {
      closeSync(openSync(p, "r"));
      open[p] = "opened";
    } catch (e) {
      open[p] = (e as NodeJS.ErrnoException).code ?? String(e);
    }
  }
  const syscalls: Record<string, string> = {};
  for (const [name, [nr, args]] of [...Object.entries(CALLS).map(([n, a]) => [n, [DENIED_SYSCALLS[n]!, a]] as const), ...Object.entries(EXEC_CALLS)]) {
    // Safe: every argument is a number or a null pointer; no call is handed memory.
    const r = syscallFn(nr, ...args) as number;
    syscalls[name] = r < 0 ? libc.errnoName(libc.errno()) : "ok";
  }
  const status: Record<string, string> = {};
  for (const line of readFileSync("/proc/self/status", "utf8").split("\n")) {
    const m = /^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp|NSpid):\s*(.*)$/.exec(line);
    if (m !== null) status[m[1]!] = m[2]!.trim();
  }
  return { open, syscalls, status };
}
