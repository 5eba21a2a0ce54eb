/**
 * The VMM's seccomp filter (seccomp(2), Documentation/userspace-api/seccomp_filter.rst): a classic
 * BPF program over struct seccomp_data {int nr; u32 arch; u64 instruction_pointer; u64 args[6]}
 * that the kernel runs on every system call of the process. It is built here, as bytes, and
 * installed by the sandbox helper (src/control/sandbox/typevisor-jail.c) just before it execs the
 * VMM, so it covers Node from its first instruction and every thread Node starts later (a filter
 * is inherited across clone and execve).
 *
 * A denylist: the system calls below are refused with EPERM (clone3 with ENOSYS), everything else
 * is allowed. What each group is for and how the list was chosen: docs/security.md, "seccomp".
 * The architecture is checked first: a call made through another ABI (i386 int 0x80, x32) has
 * other numbers, and would slip past a list of x86_64 numbers, so it kills the process.
 */

import koffi from "koffi";

/** linux/audit.h: AUDIT_ARCH_X86_64 = EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE. */
export const AUDIT_ARCH_X86_64 = 0xc000003e;
/** x32 system calls are x86_64 numbers with this bit set (arch/x86/include/uapi/asm/unistd.h). */
export const X32_SYSCALL_BIT = 0x40000000;

/** linux/seccomp.h return values (the high 16 bits; ERRNO carries the errno in the low 16). */
export const SECCOMP_RET = { KILL_PROCESS: 0x80000000, ERRNO: 0x00050000, ALLOW: 0x7fff0000 } as const;

const EPERM = 1;
const ENOSYS = 38;

/** linux/sched.h: every CLONE_NEW* flag (a new namespace from clone(2) is as dangerous as unshare(2)). */
export const CLONE_NEW_MASK = 0x00000080 /* NEWTIME */ | 0x00020000 /* NEWNS */ | 0x02000000 /* NEWCGROUP */ | 0x04000000 /* NEWUTS */ | 0x08000000 /* NEWIPC */ | 0x10000000 /* NEWUSER */ | 0x20000000 /* NEWPID */ | 0x40000000; /* NEWNET */

/**
 * x86_64 numbers (arch/x86/entry/syscalls/syscall_64.tbl) of the system calls the VMM never makes
 * and an attacker who took it over would want: each group says why.
 */
export const DENIED_SYSCALLS: Readonly<Record<string, number>> = {
  // The filesystem view: the sandbox's mount namespace is built; changing it would undo it.
  mount: 165, umount2: 166, pivot_root: 155, chroot: 161, open_tree: 428, move_mount: 429,
  fsopen: 430, fsconfig: 431, fsmount: 432, fspick: 433, mount_setattr: 442,
  // New namespaces (user namespaces above all: they hand out capabilities) and joining others.
  unshare: 272, setns: 308,
  // Other processes' memory and state.
  ptrace: 101, process_vm_readv: 310, process_vm_writev: 311, kcmp: 312, pidfd_getfd: 438,
  process_madvise: 440,
  // The kernel itself: modules, kexec, BPF programs, the keyring, perf, the kernel log.
  init_module: 175, finit_module: 313, delete_module: 176, kexec_load: 246, kexec_file_load: 320,
  bpf: 321, keyctl: 250, add_key: 248, request_key: 249, perf_event_open: 298, syslog: 103,
  // Files by handle bypass the path walk, and so the mount namespace (the "shocker" escape).
  open_by_handle_at: 304, name_to_handle_at: 303,
  // userfaultfd stretches kernel races into exploits; io_uring is a large attack surface of its own
  // (libuv falls back to its thread pool when io_uring_setup fails).
  userfaultfd: 323, io_uring_setup: 425, io_uring_enter: 426, io_uring_register: 427,
  // The host's clock, swap, power, hostname, accounting, I/O ports, quotas, personality.
  settimeofday: 164, clock_settime: 227, clock_adjtime: 305, adjtimex: 159, swapon: 167, swapoff: 168,
  reboot: 169, sethostname: 170, setdomainname: 171, acct: 163, iopl: 172, ioperm: 173,
  quotactl: 179, quotactl_fd: 443, personality: 135, vhangup: 153, lookup_dcookie: 212,
  fanotify_init: 300, uselib: 134, nfsservctl: 180,
};

const NR_CLONE = 56;
const NR_CLONE3 = 435;

// BPF opcodes (linux/bpf_common.h).
const BPF_LD_W_ABS = 0x00 | 0x00 | 0x20; // BPF_LD | BPF_W | BPF_ABS
const BPF_JMP_JEQ_K = 0x05 | 0x10 | 0x00;
const BPF_JMP_JGE_K = 0x05 | 0x30 | 0x00;
const BPF_JMP_JSET_K = 0x05 | 0x40 | 0x00;
const BPF_RET_K = 0x06 | 0x00;

/** One struct sock_filter. */
export interface BpfInsn {
  code: number;
  jt: number;
  jf: number;
  k: number;
}

/** Offsets in struct seccomp_data (linux/seccomp.h). */
const OFF_NR = 0;
const OFF_ARCH = 4;
/** args[0], its low 32 bits (little-endian): clone's flags. */
const OFF_ARG0_LO = 16;

/**
 * The filter as instructions. Layout: arch check; x32 check; one JEQ per denied number jumping to
 * a shared `ret ERRNO(EPERM)`; clone with namespace flags → EPERM; clone3 → ENOSYS (its flags are
 * behind a pointer a filter cannot read, so it is refused and glibc falls back to clone, as
 * container runtimes do); everything else allowed.
 */
export function vmmFilter(denied: readonly number[] = Object.values(DENIED_SYSCALLS)): BpfInsn[] {
  const p: BpfInsn[] = [];
  const ins = (code: number, k: number, jt = 0, jf = 0): void => void p.push({ code, jt, jf, k });
  ins(BPF_LD_W_ABS, OFF_ARCH);
  ins(BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64, 1, 0);
  ins(BPF_RET_K, SECCOMP_RET.KILL_PROCESS);
  ins(BPF_LD_W_ABS, OFF_NR);
  ins(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 0, 1);
  ins(BPF_RET_K, SECCOMP_RET.KILL_PROCESS);
  // After the list: [clone check: 4 insns] [clone3: 2] [allow] [deny]
  const list = [...new Set(denied)];
  const tail = 4 + 2 + 1; // instructions between the list's end and the deny return
  list.forEach((nr, i) => {
    const jt = list.length - 1 - i + tail;
    if (jt > 255) throw new Error("seccomp denylist too long for 8-bit jumps");
    ins(BPF_JMP_JEQ_K, nr, jt, 0);
  });
  ins(BPF_JMP_JEQ_K, NR_CLONE, 0, 3);
  ins(BPF_LD_W_ABS, OFF_ARG0_LO);
  ins(BPF_JMP_JSET_K, CLONE_NEW_MASK, 4, 0); // → deny
  ins(BPF_RET_K, SECCOMP_RET.ALLOW);
  ins(BPF_JMP_JEQ_K, NR_CLONE3, 0, 1);
  ins(BPF_RET_K, SECCOMP_RET.ERRNO | ENOSYS);
  ins(BPF_RET_K, SECCOMP_RET.ALLOW);
  ins(BPF_RET_K, SECCOMP_RET.ERRNO | EPERM);
  return p;
}

/** struct sock_filter array bytes (little-endian, 8 bytes each), as the kernel reads them. */
export function filterBytes(prog: readonly BpfInsn[]): Buffer {
  const b = Buffer.alloc(prog.length * 8);
  prog.forEach((x, i) => {
    b.writeUInt16LE(x.code, i * 8);
    b.writeUInt8(x.jt, i * 8 + 2);
    b.writeUInt8(x.jf, i * 8 + 3);
    b.writeUInt32LE(x.k >>> 0, i * 8 + 4);
  });
  return b;
}

/**
 * Run a filter on one system call, as the kernel's classic-BPF interpreter would (only the
 * instructions vmmFilter emits): for tests and for documenting what the filter decides.
 */
export function evaluate(prog: readonly BpfInsn[], call: { nr: number; arch?: number; args?: readonly number[] }): number {
  const data = Buffer.alloc(64);
  data.writeInt32LE(call.nr, OFF_NR);
  data.writeUInt32LE(call.arch ?? AUDIT_ARCH_X86_64, OFF_ARCH);
  (call.args ?? []).forEach((a, i) => data.writeBigUInt64LE(BigInt(a), 16 + i * 8));
  let acc = 0;
  for (let pc = 0; pc < prog.length; pc++) {
    const x = prog[pc]!;
    switch (x.code) {
      case BPF_LD_W_ABS:
        acc = data.readUInt32LE(x.k);
        break;
      case BPF_JMP_JEQ_K:
        pc += acc === x.k >>> 0 ? x.jt : x.jf;
        break;
      case BPF_JMP_JGE_K:
        pc += acc >= x.k >>> 0 ? x.jt : x.jf;
        break;
      case BPF_JMP_JSET_K:
        pc += (acc & x.k) !== 0 ? x.jt : x.jf;
        break;
      case BPF_RET_K:
        return x.k >>> 0;
      default:
        throw new Error(`instruction ${x.code} at ${pc} not understood`);
    }
  }
  throw new Error("filter ran off its end");
}

const NR_EXECVE = 59;
const NR_EXECVEAT = 322;

/**
 * A second filter, installed by the VMM itself once it runs (run --seccomp-no-exec, which the
 * daemon's sandbox passes): execve and execveat refused with EPERM. The first filter must allow
 * them, since the helper execs node under it; once node runs, a VMM never execs anything, and a
 * VMM taken over then cannot start another program either. Filters stack: the strictest answer
 * of all installed filters wins (seccomp(2), "multiple filters").
 */
export function noExecFilter(): BpfInsn[] {
  return [
    { code: BPF_LD_W_ABS, jt: 0, jf: 0, k: OFF_ARCH },
    { code: BPF_JMP_JEQ_K, jt: 1, jf: 0, k: AUDIT_ARCH_X86_64 },
    { code: BPF_RET_K, jt: 0, jf: 0, k: SECCOMP_RET.KILL_PROCESS },
    { code: BPF_LD_W_ABS, jt: 0, jf: 0, k: OFF_NR },
    { code: BPF_JMP_JEQ_K, jt: 2, jf: 0, k: NR_EXECVE },
    { code: BPF_JMP_JEQ_K, jt: 1, jf: 0, k: NR_EXECVEAT },
    { code: BPF_RET_K, jt: 0, jf: 0, k: SECCOMP_RET.ALLOW },
    { code: BPF_RET_K, jt: 0, jf: 0, k: SECCOMP_RET.ERRNO | EPERM },
  ];
}

const SECCOMP_SET_MODE_FILTER = 1;
const SECCOMP_FILTER_FLAG_TSYNC = 1;
const NR_SECCOMP = 317;
let seccompFn: ((nr: number, op: number, flags: number, prog: { len: number; filter: Uint8Array }) => number) | undefined;

/**
 * Install `prog` on every thread of this process (SECCOMP_FILTER_FLAG_TSYNC: Node already runs
 * V8's and libuv's threads; threads started later inherit it from the thread that starts them).
 * Needs no_new_privs (or CAP_SYS_ADMIN), which the sandbox set.
 * @throws Error with the errno when the kernel refuses it
 */
export function installFilter(prog: readonly BpfInsn[]): void {
  if (seccompFn === undefined) {
    // Loaded on first use: most processes that import this module never install anything.
    const k = koffi;
    // struct sock_fprog (x86_64): unsigned short len @0, struct sock_filter *filter @8.
    const fprogT = k.struct({ len: "uint16", filter: "void *" });
    const fn = k.load("libc.so.6").func("syscall", "long", ["long", "uint", "uint", k.pointer(fprogT)]);
    seccompFn = (nr, op, flags, p) => fn(nr, op, flags, p) as number;
  }
  const bytes = filterBytes(prog);
  // Safe: the kernel copies the program during the call (seccomp_prepare_filter) and keeps no pointer to `bytes`.
  const r = seccompFn(NR_SECCOMP, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, { len: prog.length, filter: bytes });
  if (r !== 0) throw new Error(`seccomp(SECCOMP_SET_MODE_FILTER, TSYNC): ${r < 0 ? `errno ${koffi.errno()}` : `thread ${r} could not be synchronized`}`);
}
