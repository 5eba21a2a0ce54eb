/**
 * The VMM's seccomp filters (seccomp(2), Documentation/userspace-api/seccomp_filter.rst): classic
 * BPF programs over struct seccomp_data {int nr; u32 arch; u64 instruction_pointer; u64 args[6]}
 * that the kernel runs on every system call. Built here, as bytes.
 *
 * - vmmFilter: an **allowlist** for the whole VMM process, installed by the sandbox helper
 *   (src/control/sandbox/typevisor-jail.c) just before it execs node, so it covers Node from its
 *   first instruction and every thread (a filter is inherited across clone and execve). Only the
 *   calls the VMM was measured to make (plus a few reviewed ones) pass; ioctl, clone, socket,
 *   socketpair, prctl and seccomp only with the argument values it uses; everything else fails
 *   with EPERM (why not kill: docs/security.md, "seccomp").
 * - vcpuFilter: narrower, installed by each vCPU thread on itself before its first KVM_RUN.
 * - noExecFilter: execve and execveat refused, installed by the VMM on all its threads at start.
 *
 * The architecture is checked first: a call made through another ABI (i386 int 0x80, x32) has
 * other numbers, and would be judged by a list of x86_64 numbers, so it kills the process.
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

/** x86_64 numbers (arch/x86/entry/syscalls/syscall_64.tbl) of the calls this module names in code. */
export const NR = { read: 0, ioctl: 16, socket: 41, socketpair: 53, clone: 56, execve: 59, prctl: 157, seccomp: 317, execveat: 322, clone3: 435 } as const;

/**
 * The system calls the VMM process made, measured: every VMM of the host tests (tiny guests:
 * boot, disks raw and qcow2 written by a guest, a full disk, snapshots and restores, live
 * migration over unix and tcp with hostile streams, the console and control sockets, the daemon's
 * sandboxed VMMs) run under `strace -f`, then `node bin/seccomp-measure.js`; and the lab's Debian
 * guests in the daemon's sandbox (disk and network I/O through the handed-over TAP). Method and
 * figures: docs/security.md, "seccomp". (The measurement's refused calls, made by the sandbox
 * probe, are left out: they are what must stay refused.)
 */
export const MEASURED_VMM_SYSCALLS: Readonly<Record<string, number>> = {
  accept4: 288, access: 21, arch_prctl: 158, bind: 49, brk: 12, capget: 125, chmod: 90, clone: 56,
  clone3: 435, close: 3, connect: 42, epoll_create1: 291, epoll_ctl: 233, epoll_pwait: 281, eventfd2: 290,
  execve: 59, exit: 60, exit_group: 231, fallocate: 285, fcntl: 72, fdatasync: 75, fstat: 5, fsync: 74,
  ftruncate: 77, futex: 202, getcwd: 79, getdents64: 217, getegid: 108, geteuid: 107, getgid: 104,
  getpid: 39, getppid: 110, getpriority: 140, getrandom: 318, getsockname: 51, getsockopt: 55, gettid: 186,
  getuid: 102, ioctl: 16, listen: 50, lseek: 8, madvise: 28, mkdir: 83, mmap: 9, mprotect: 10, munmap: 11,
  newfstatat: 262, openat: 257, pipe2: 293, pkey_alloc: 330, poll: 7, prctl: 157, pread64: 17,
  prlimit64: 302, pwrite64: 18, pwritev: 296, read: 0, readlink: 89, rename: 82, rmdir: 84, rseq: 334,
  rt_sigaction: 13, rt_sigprocmask: 14, rt_sigreturn: 15, sched_getaffinity: 204, seccomp: 317,
  set_robust_list: 273, set_tid_address: 218, setpriority: 141, setsockopt: 54, shutdown: 48, socket: 41,
  statfs: 137, statx: 332, sysinfo: 99, tgkill: 234, umask: 95, uname: 63, unlink: 87, write: 1, writev: 20,
};

/**
 * Added by reading the code rather than measured, each for a path the tests do not reach or a
 * fallback of the C library: I/O on descriptors the VMM already holds (readv, preadv2, sendmsg, ...,
 * which libuv and the virtio back ends use on paths such as vsock and a net device's receive),
 * the clock calls that the vDSO falls back to on a host whose clock source it cannot read (the
 * lab's emulated CPU), restart_syscall (the kernel's own restart of an interrupted sleep), memory
 * protection keys (V8 asks for them, and copes when refused), sigaltstack, kill.
 */
export const REVIEWED_VMM_SYSCALLS: Readonly<Record<string, number>> = {
  clock_getres: 229, clock_gettime: 228, clock_nanosleep: 230, dup: 32, dup3: 292, epoll_wait: 232,
  faccessat: 269, faccessat2: 439, fstatfs: 138, getpeername: 52, getrusage: 98, gettimeofday: 96, kill: 62,
  mremap: 25, nanosleep: 35, pkey_free: 331, pkey_mprotect: 329, ppoll: 271, preadv: 295, preadv2: 327,
  pwritev2: 328, readlinkat: 267, readv: 19, recvfrom: 45, recvmsg: 47, restart_syscall: 219,
  sched_yield: 24, sendmsg: 46, sendto: 44, sigaltstack: 131, socketpair: 53,
};

/** The process-wide allowlist: everything else is refused (EPERM) and logged. */
export const VMM_SYSCALLS: Readonly<Record<string, number>> = { ...MEASURED_VMM_SYSCALLS, ...REVIEWED_VMM_SYSCALLS };

/**
 * A vCPU thread's system calls from its first KVM_RUN to its end (measured as above: KVM_RUN,
 * KVM_IRQ_LINE for the serial port's interrupt, writes to the console and to eventfds, futexes of
 * Atomics.wait and postMessage, its isolate's garbage collector, and the worker's teardown), and
 * reviewed additions: the clock and sleep fallbacks, restart_syscall, what abort() needs (a V8
 * fatal error on this thread must still end the process as an abort), brk and mremap (malloc),
 * pkey_mprotect (V8 protects its code pages with a memory protection key where the CPU has them,
 * and this thread's isolate allocates its own).
 */
export const MEASURED_VCPU_SYSCALLS: Readonly<Record<string, number>> = {
  close: 3, epoll_pwait: 281, exit: 60, futex: 202, getpid: 39, ioctl: 16, madvise: 28, mmap: 9,
  mprotect: 10, munmap: 11, read: 0, rt_sigprocmask: 14, rt_sigreturn: 15, write: 1,
};
export const REVIEWED_VCPU_SYSCALLS: Readonly<Record<string, number>> = {
  brk: 12, clock_gettime: 228, clock_nanosleep: 230, epoll_wait: 232, exit_group: 231, gettid: 186,
  gettimeofday: 96, mremap: 25, nanosleep: 35, restart_syscall: 219, rt_sigaction: 13, sched_yield: 24,
  sigaltstack: 131, tgkill: 234, pkey_mprotect: 329,
};
export const VCPU_SYSCALLS: Readonly<Record<string, number>> = { ...MEASURED_VCPU_SYSCALLS, ...REVIEWED_VCPU_SYSCALLS };

/**
 * Calls an attacker who took over the VMM would want, none of them in the allowlist (a test checks
 * it); the sandbox's probe (src/vmm/sandbox-probe.ts) tries some of them from inside the VMM.
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

/** linux/kvm.h: KVMIO, the type byte of every KVM ioctl. */
const KVMIO = 0xae;
/**
 * The other ioctls the VMM makes, by exact number (asm-generic/ioctls.h, linux/if_tun.h): the
 * terminal of `run` by hand (TCGETS to ask whether it is one, TCSETS* for raw mode, its size),
 * FIONBIO/FIOCLEX/FIONCLEX/FIONREAD (libuv), and the TAP handed over (TUNGETIFF, TUNSETOFFLOAD,
 * TUNSETVNETHDRSZ; TUNSETIFF when it opens one by name). Not TIOCSTI (typing into the terminal
 * the VMM was started from) nor any other.
 */
export const VMM_IOCTLS: readonly number[] = [
  0x5401 /* TCGETS */, 0x5402 /* TCSETS */, 0x5403 /* TCSETSW */, 0x5404 /* TCSETSF */, 0x5413 /* TIOCGWINSZ */,
  0x541b /* FIONREAD */, 0x5421 /* FIONBIO */, 0x5450 /* FIONCLEX */, 0x5451 /* FIOCLEX */,
  0x400454ca /* TUNSETIFF */, 0x400454d0 /* TUNSETOFFLOAD */, 0x800454d2 /* TUNGETIFF */, 0x400454d8 /* TUNSETVNETHDRSZ */,
];
/** linux/socket.h: the families the VMM opens (unix sockets; inet for a tcp: migration). Not netlink, packet, vsock, alg, ... */
const AF_UNIX = 1;
export const VMM_SOCKET_FAMILIES: readonly number[] = [AF_UNIX, 2 /* AF_INET */, 10 /* AF_INET6 */];
/** linux/prctl.h: PR_SET_NAME, PR_GET_NAME (thread names): measured, the only options the VMM uses. */
export const VMM_PRCTLS: readonly number[] = [15, 16];
/** linux/sched.h */
const CLONE_THREAD = 0x00010000;

// BPF opcodes (linux/bpf_common.h).
const BPF_LD_W_ABS = 0x00 | 0x00 | 0x20; // BPF_LD | BPF_W | BPF_ABS
const BPF_JMP_JA = 0x05 | 0x00; // BPF_JMP | BPF_JA: pc += k (32 bits: the one long jump)
const BPF_JMP_JEQ_K = 0x05 | 0x10 | 0x00;
const BPF_JMP_JGE_K = 0x05 | 0x30 | 0x00;
const BPF_JMP_JSET_K = 0x05 | 0x40 | 0x00;
const BPF_ALU_AND_K = 0x04 | 0x50 | 0x00; // BPF_ALU | BPF_AND | BPF_K
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
/** args[i], its low 32 bits (little-endian). Every argument checked here is an int or unsigned int to the kernel (clone's flags: lower_32_bits), so the high half does not matter. */
const argLo = (i: number): number => 16 + i * 8;

const ALLOW = SECCOMP_RET.ALLOW;
const refuse = (errno: number): number => SECCOMP_RET.ERRNO | errno;
const EAFNOSUPPORT = 97;

/** A block of instructions for one system call whose arguments are checked; it always returns. Jumps are relative, inside the block. */
type ArgCheck = () => BpfInsn[];
const insn = (code: number, k: number, jt = 0, jf = 0): BpfInsn => ({ code, jt, jf, k });

/** Allowed when argument `arg` (low 32 bits) is one of `values`; else refused with `errno`. */
function argIn(arg: number, values: readonly number[], errno = EPERM): ArgCheck {
  return () => {
    const n = values.length;
    if (n > 250) throw new Error("seccomp: too many values for 8-bit jumps");
    return [
      insn(BPF_LD_W_ABS, argLo(arg)),
      ...values.map((v, i) => insn(BPF_JMP_JEQ_K, v >>> 0, n - i, 0)),
      insn(BPF_RET_K, refuse(errno)),
      insn(BPF_RET_K, ALLOW),
    ];
  };
}

/** ioctl(fd, cmd): allowed for KVM's commands (type 0xAE, linux/kvm.h: _IO*(KVMIO, ...)) and for `others` (exact numbers); else EPERM. */
function ioctlCheck(others: readonly number[]): ArgCheck {
  return () => {
    const n = others.length;
    // KVM's first: KVM_RUN is the call a vCPU makes all day.
    return [
      insn(BPF_LD_W_ABS, argLo(1)),
      insn(BPF_ALU_AND_K, 0xff00), // the type byte of asm-generic/ioctl.h's encoding
      insn(BPF_JMP_JEQ_K, KVMIO << 8, n + 2, 0), // → allow
      insn(BPF_LD_W_ABS, argLo(1)),
      ...others.map((v, i) => insn(BPF_JMP_JEQ_K, v >>> 0, n - i, 0)),
      insn(BPF_RET_K, refuse(EPERM)),
      insn(BPF_RET_K, ALLOW),
    ];
  };
}

/** clone(flags, ...): threads only (CLONE_THREAD set), and no CLONE_NEW* flag. */
const cloneCheck: ArgCheck = () => [
  insn(BPF_LD_W_ABS, argLo(0)),
  insn(BPF_JMP_JSET_K, CLONE_NEW_MASK, 1, 0), // → refuse
  insn(BPF_JMP_JSET_K, CLONE_THREAD, 1, 0), // → allow
  insn(BPF_RET_K, refuse(EPERM)),
  insn(BPF_RET_K, ALLOW),
];

/**
 * An allowlist filter: the architecture must be x86_64 and the number not an x32 one (else the
 * process is killed: a list of x86_64 numbers says nothing about another ABI's), then the number
 * is looked up in a binary search tree of JGE tests (about log2(n) comparisons, not n), each leaf
 * allowing its call or running its argument check; anything else is refused with `EPERM`.
 */
export function allowlistFilter(allowed: Readonly<Record<string, number>>, checks: ReadonlyMap<number, ArgCheck>): BpfInsn[] {
  const entries = [...new Set(Object.values(allowed))].sort((a, b) => a - b);
  const deny = insn(BPF_RET_K, refuse(EPERM));
  const tree = (lo: number, hi: number): BpfInsn[] => {
    if (hi - lo <= 3) {
      const out: BpfInsn[] = [];
      for (let i = lo; i < hi; i++) {
        const nr = entries[i]!;
        const check = checks.get(nr);
        const body = check !== undefined ? check() : [insn(BPF_RET_K, ALLOW)];
        if (body.length > 255) throw new Error("seccomp: an argument check too long for an 8-bit jump");
        out.push(insn(BPF_JMP_JEQ_K, nr, 0, body.length), ...body);
      }
      out.push(deny);
      return out;
    }
    const mid = (lo + hi) >> 1;
    const left = tree(lo, mid);
    const right = tree(mid, hi);
    // nr >= entries[mid]: the next instruction, a long jump over the left half; else the left half.
    return [insn(BPF_JMP_JGE_K, entries[mid]!, 0, 1), insn(BPF_JMP_JA, left.length), ...left, ...right];
  };
  return [
    insn(BPF_LD_W_ABS, OFF_ARCH),
    insn(BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
    insn(BPF_RET_K, SECCOMP_RET.KILL_PROCESS),
    insn(BPF_LD_W_ABS, OFF_NR),
    insn(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 0, 1),
    insn(BPF_RET_K, SECCOMP_RET.KILL_PROCESS),
    ...tree(0, entries.length),
  ];
}

/** The whole VMM process's filter (installed by the sandbox helper before it execs node). */
export function vmmFilter(): BpfInsn[] {
  const checks = new Map<number, ArgCheck>([
    [NR.ioctl, ioctlCheck(VMM_IOCTLS)],
    [NR.clone, cloneCheck],
    // clone3's flags are behind a pointer a filter cannot read: ENOSYS sends glibc back to clone (as container runtimes do).
    [NR.clone3, () => [insn(BPF_RET_K, refuse(ENOSYS))]],
    [NR.socket, argIn(0, VMM_SOCKET_FAMILIES, EAFNOSUPPORT)],
    [NR.socketpair, argIn(0, [AF_UNIX], EAFNOSUPPORT)],
    [NR.prctl, argIn(0, VMM_PRCTLS)],
    // Only more filters (SECCOMP_SET_MODE_FILTER): a filter can only narrow what is allowed.
    [NR.seccomp, argIn(0, [1])],
  ]);
  return allowlistFilter(VMM_SYSCALLS, checks);
}

/**
 * clone3 → ENOSYS, everything else allowed: installed after vmmFilter, without the LOG flag, so
 * the refusal Node meets at each new thread (glibc then uses clone) is not logged. Between equal
 * answers the newest filter's counts, with its flags (kernel/seccomp.c seccomp_run_filters), and
 * vmmFilter alone gives the same answer.
 */
export function clone3Filter(): BpfInsn[] {
  return [
    insn(BPF_LD_W_ABS, OFF_ARCH),
    insn(BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
    insn(BPF_RET_K, SECCOMP_RET.KILL_PROCESS),
    insn(BPF_LD_W_ABS, OFF_NR),
    insn(BPF_JMP_JEQ_K, NR.clone3, 0, 1),
    insn(BPF_RET_K, refuse(ENOSYS)),
    insn(BPF_RET_K, ALLOW),
  ];
}

/**
 * A vCPU thread's own filter, installed by the thread itself (without TSYNC: it binds that thread
 * alone, and any thread it would start, seccomp(2)) just before it enters its KVM_RUN loop
 * (src/vmm/vcpu/worker.ts). It stacks on the process's: the stricter answer wins. ioctl only with
 * KVM's commands; no thread creation; no sockets, files by path, or process-wide changes.
 */
export function vcpuFilter(): BpfInsn[] {
  return allowlistFilter(VCPU_SYSCALLS, new Map<number, ArgCheck>([[NR.ioctl, ioctlCheck([])]]));
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
 * instructions these filters use): for tests and for documenting what the filter decides.
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
      case BPF_JMP_JA:
        pc += x.k >>> 0;
        break;
      case BPF_ALU_AND_K:
        acc = (acc & x.k) >>> 0;
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
    { code: BPF_JMP_JEQ_K, jt: 2, jf: 0, k: NR.execve },
    { code: BPF_JMP_JEQ_K, jt: 1, jf: 0, k: NR.execveat },
    { code: BPF_RET_K, jt: 0, jf: 0, k: SECCOMP_RET.ALLOW },
    { code: BPF_RET_K, jt: 0, jf: 0, k: SECCOMP_RET.ERRNO | EPERM },
  ];
}

const SECCOMP_SET_MODE_FILTER = 1;
/** linux/seccomp.h filter flags. */
export const SECCOMP_FILTER_FLAG = { TSYNC: 1, LOG: 2 } as const;
let seccompFn: ((nr: number, op: number, flags: number, prog: { len: number; filter: Uint8Array }) => number) | undefined;

/**
 * Install `prog`. `allThreads`: on every thread of this process (SECCOMP_FILTER_FLAG_TSYNC: Node
 * already runs V8's and libuv's threads); otherwise on the calling thread alone (and threads it
 * starts later), which is how a vCPU thread narrows itself. SECCOMP_FILTER_FLAG_LOG: every refusal
 * is written to the kernel log (an audit record of type 1326 with the pid, the program and the
 * system call number; docs/security.md), so a refused call is seen, not guessed at. Needs
 * no_new_privs (or CAP_SYS_ADMIN), which the sandbox set.
 * @throws Error with the errno when the kernel refuses it
 */
export function installFilter(prog: readonly BpfInsn[], opts: { allThreads: boolean } = { allThreads: true }): void {
  if (seccompFn === undefined) {
    // Loaded on first use: most processes that import this module never install anything.
    const k = koffi;
    // struct sock_fprog (x86_64): unsigned short len @0, struct sock_filter *filter @8.
    const fprogT = k.struct({ len: "uint16", filter: "void *" });
    const fn = k.load("libc.so.6").func("syscall", "long", ["long", "uint", "uint", k.pointer(fprogT)]);
    seccompFn = (nr, op, flags, p) => fn(nr, op, flags, p) as number;
  }
  const bytes = filterBytes(prog);
  const flags = SECCOMP_FILTER_FLAG.LOG | (opts.allThreads ? SECCOMP_FILTER_FLAG.TSYNC : 0);
  // Safe: the kernel copies the program during the call (seccomp_prepare_filter) and keeps no pointer to `bytes`.
  const r = seccompFn(NR.seccomp, SECCOMP_SET_MODE_FILTER, flags, { len: prog.length, filter: bytes });
  if (r !== 0) throw new Error(`seccomp(SECCOMP_SET_MODE_FILTER${opts.allThreads ? ", TSYNC" : ""}): ${r < 0 ? `errno ${koffi.errno()}` : `thread ${r} could not be synchronized`}`);
}
