import { describe, expect, it } from "vitest";
import {
  AUDIT_ARCH_X86_64, CLONE_NEW_MASK, DENIED_SYSCALLS, NR, SECCOMP_RET, VCPU_SYSCALLS, VMM_IOCTLS, VMM_SYSCALLS, X32_SYSCALL_BIT,
  clone3Filter, evaluate, filterBytes, noExecFilter, vcpuFilter, vmmFilter,
} from "./seccomp.js";

/**
 * The filters' decisions, by running their bytes' instructions the way the kernel's classic-BPF
 * interpreter does (test/control/sandbox.test.ts and test/cli/run-sandbox.test.ts prove the kernel
 * takes them and refuses the calls).
 */
const EPERM = SECCOMP_RET.ERRNO | 1;
const ENOSYS = SECCOMP_RET.ERRNO | 38;
const EAFNOSUPPORT = SECCOMP_RET.ERRNO | 97;
const ALLOW = SECCOMP_RET.ALLOW;
/** glibc's pthread_create flags: CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT_SETTID|CHILD_CLEARTID (as measured). */
const THREAD = 0x3d0f00;
/** fork(): CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD. */
const FORK = 0x01200011;
const KVM_RUN = 0xae80;
const TIOCSTI = 0x5412;

describe("the VMM's seccomp allowlist", () => {
  const prog = vmmFilter();

  it("allows each listed call (with arguments its check accepts) and refuses every other number with EPERM", () => {
    const allowed = new Set(Object.values(VMM_SYSCALLS));
    const args: Record<number, number[]> = { [NR.ioctl]: [0, KVM_RUN], [NR.clone]: [THREAD], [NR.socket]: [1], [NR.socketpair]: [1], [NR.prctl]: [15], [NR.seccomp]: [1] };
    for (let nr = 0; nr < 1024; nr++) {
      const want = nr === NR.clone3 ? ENOSYS : allowed.has(nr) ? ALLOW : EPERM;
      expect(evaluate(prog, { nr, args: args[nr] ?? [] }), `system call ${nr}`).toBe(want);
    }
  });

  it("leaves out every call an attacker would want (mount, unshare, ptrace, bpf, keyctl, io_uring, ...)", () => {
    for (const [name, nr] of Object.entries(DENIED_SYSCALLS)) {
      expect(Object.values(VMM_SYSCALLS), name).not.toContain(nr);
      expect(evaluate(prog, { nr }), name).toBe(EPERM);
    }
    for (const name of ["fork", "vfork", "execveat", "ptrace", "memfd_create", "mknod", "chown", "setuid", "link", "symlink"]) expect(Object.keys(VMM_SYSCALLS), name).not.toContain(name);
  });

  it("ioctl: KVM's commands and the listed terminal, libuv and TAP ones; not TIOCSTI, not SIOCSIFFLAGS; the kernel's unsigned int cmd is what is checked", () => {
    for (const cmd of [KVM_RUN, 0xae01 /* KVM_CREATE_VM */, 0x4040ae77 /* KVM_SET_USER_MEMORY_REGION-like */, ...VMM_IOCTLS]) expect(evaluate(prog, { nr: NR.ioctl, args: [7, cmd] }), cmd.toString(16)).toBe(ALLOW);
    for (const cmd of [TIOCSTI, 0x8914 /* SIOCSIFFLAGS */, 0x80081272 /* BLKGETSIZE64 */, 0x5422 /* TIOCNOTTY */, 0xaf01 /* VHOST_SET_OWNER */]) expect(evaluate(prog, { nr: NR.ioctl, args: [7, cmd] }), cmd.toString(16)).toBe(EPERM);
    // bits above 32 are dropped by the kernel (fs/ioctl.c takes unsigned int cmd): the low half decides
    expect(evaluate(prog, { nr: NR.ioctl, args: [7, 2 ** 32 + KVM_RUN] })).toBe(ALLOW);
  });

  it("clone: threads only, without namespace flags; fork refused; clone3 sent back to clone (ENOSYS)", () => {
    expect(evaluate(prog, { nr: NR.clone, args: [THREAD] })).toBe(ALLOW);
    expect(evaluate(prog, { nr: NR.clone, args: [FORK] })).toBe(EPERM);
    for (let bit = 0; bit < 32; bit++) {
      const flag = 2 ** bit;
      if ((CLONE_NEW_MASK & flag) !== 0) expect(evaluate(prog, { nr: NR.clone, args: [THREAD | flag] }), flag.toString(16)).toBe(EPERM);
    }
    expect(evaluate(prog, { nr: NR.clone3 })).toBe(ENOSYS);
  });

  it("socket: unix, inet, inet6 only (netlink, packet, vsock, alg refused); socketpair unix only; prctl thread names only; seccomp only to add filters", () => {
    for (const af of [1, 2, 10]) expect(evaluate(prog, { nr: NR.socket, args: [af, 1, 0] }), String(af)).toBe(ALLOW);
    for (const af of [16, 17, 38, 40, 44]) expect(evaluate(prog, { nr: NR.socket, args: [af, 1, 0] }), String(af)).toBe(EAFNOSUPPORT);
    expect(evaluate(prog, { nr: NR.socketpair, args: [1] })).toBe(ALLOW);
    expect(evaluate(prog, { nr: NR.socketpair, args: [2] })).toBe(EAFNOSUPPORT);
    expect(evaluate(prog, { nr: NR.prctl, args: [15] })).toBe(ALLOW);
    for (const op of [4 /* SET_DUMPABLE */, 22 /* SET_SECCOMP */, 35 /* SET_MM */, 38 /* SET_NO_NEW_PRIVS */, 1 /* SET_PDEATHSIG */]) expect(evaluate(prog, { nr: NR.prctl, args: [op] }), String(op)).toBe(EPERM);
    expect(evaluate(prog, { nr: NR.seccomp, args: [1] })).toBe(ALLOW);
    expect(evaluate(prog, { nr: NR.seccomp, args: [4 /* GET_NOTIF_SIZES */] })).toBe(EPERM);
  });

  it("kills a call through another ABI: i386 numbers, x32", () => {
    expect(evaluate(prog, { nr: 1, arch: 0x40000003 /* AUDIT_ARCH_I386 */ })).toBe(SECCOMP_RET.KILL_PROCESS);
    expect(evaluate(prog, { nr: X32_SYSCALL_BIT | 1 })).toBe(SECCOMP_RET.KILL_PROCESS);
    expect(evaluate(prog, { nr: 1, arch: AUDIT_ARCH_X86_64 })).toBe(ALLOW);
  });

  it("is 8 bytes per instruction, little-endian, well within the kernel's limit, and a lookup is a tree, not a scan", () => {
    const b = filterBytes(prog);
    expect(b.length).toBe(prog.length * 8);
    expect(prog.length).toBeLessThan(4096); // BPF_MAXINSNS
    expect(b.readUInt16LE(0)).toBe(prog[0]!.code);
    expect(b.readUInt32LE(4)).toBe(4); // ld [arch]
    // Instructions run for KVM_RUN, the hot call: log2 of the list, not its length.
    let steps = 0;
    const counting = prog.map((x) => x);
    const trace = new Proxy(counting, { get: (t, k) => (typeof k === "string" && /^\d+$/.test(k) ? (steps++, t[Number(k)]) : Reflect.get(t, k)) });
    evaluate(trace, { nr: NR.ioctl, args: [7, KVM_RUN] });
    expect(steps).toBeLessThan(40);
  });
});

describe("a vCPU thread's filter", () => {
  const prog = vcpuFilter();
  it("allows KVM ioctls, writes, futexes and memory management; refuses other ioctls, files, sockets, threads, exec", () => {
    expect(evaluate(prog, { nr: NR.ioctl, args: [7, KVM_RUN] })).toBe(ALLOW);
    expect(evaluate(prog, { nr: NR.ioctl, args: [7, 0x5401 /* TCGETS */] })).toBe(EPERM);
    expect(evaluate(prog, { nr: NR.ioctl, args: [7, TIOCSTI] })).toBe(EPERM);
    for (const name of ["write", "futex", "mmap", "munmap", "mprotect", "madvise", "exit", "rt_sigreturn"]) expect(evaluate(prog, { nr: VCPU_SYSCALLS[name]! }), name).toBe(ALLOW);
    for (const name of ["openat", "socket", "connect", "clone", "clone3", "execve", "unlink", "rename", "mkdir", "fallocate", "seccomp", "prctl"]) expect(evaluate(prog, { nr: VMM_SYSCALLS[name] ?? NR.execve }), name).toBe(EPERM);
    expect(Object.keys(VCPU_SYSCALLS).length).toBeLessThan(Object.keys(VMM_SYSCALLS).length / 3);
  });
});

describe("the no-exec filter", () => {
  it("refuses execve and execveat, allows the rest", () => {
    const p = noExecFilter();
    expect(evaluate(p, { nr: NR.execve })).toBe(EPERM);
    expect(evaluate(p, { nr: NR.execveat })).toBe(EPERM);
    expect(evaluate(p, { nr: NR.read })).toBe(ALLOW);
  });
});

describe("the quiet clone3 filter", () => {
  it("answers clone3 as the allowlist does (ENOSYS) and allows everything else, so stacked on it it changes no decision", () => {
    const q = clone3Filter();
    expect(evaluate(q, { nr: NR.clone3 })).toBe(ENOSYS);
    for (const nr of [0, 1, NR.clone, NR.ioctl, 165]) expect(evaluate(q, { nr })).toBe(ALLOW);
    expect(evaluate(q, { nr: 1, arch: 0x40000003 })).toBe(SECCOMP_RET.KILL_PROCESS);
  });
});
