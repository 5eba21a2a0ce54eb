import { describe, expect, it } from "vitest";
import { AUDIT_ARCH_X86_64, CLONE_NEW_MASK, DENIED_SYSCALLS, SECCOMP_RET, X32_SYSCALL_BIT, evaluate, filterBytes, vmmFilter } from "./seccomp.js";

/**
 * The filter's decisions, by running its bytes' instructions the way the kernel's classic-BPF
 * interpreter does (test/control/sandbox.test.ts proves the kernel takes it and refuses the calls).
 */
describe("the VMM's seccomp filter", () => {
  const prog = vmmFilter();
  const EPERM = SECCOMP_RET.ERRNO | 1;

  it("refuses every denied system call with EPERM", () => {
    for (const [name, nr] of Object.entries(DENIED_SYSCALLS)) expect(evaluate(prog, { nr }), name).toBe(EPERM);
  });

  it("allows what the VMM does all day: read, write, ioctl (KVM_RUN), mmap, futex, epoll, openat, exit", () => {
    for (const nr of [0, 1, 16, 9, 202, 232, 257, 60, 231, 435 - 1]) expect(evaluate(prog, { nr }), String(nr)).toBe(SECCOMP_RET.ALLOW);
  });

  it("allows clone for threads, refuses clone with any new-namespace flag, and sends clone3 back to clone (ENOSYS)", () => {
    // glibc's pthread_create flags: CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT_SETTID|CHILD_CLEARTID
    expect(evaluate(prog, { nr: 56, args: [0x3d0f00] })).toBe(SECCOMP_RET.ALLOW);
    for (let bit = 0; bit < 32; bit++) {
      const flag = 2 ** bit;
      if ((CLONE_NEW_MASK & flag) !== 0) expect(evaluate(prog, { nr: 56, args: [0x3d0f00 | flag] }), flag.toString(16)).toBe(EPERM);
    }
    expect(evaluate(prog, { nr: 435 })).toBe(SECCOMP_RET.ERRNO | 38);
  });

  it("kills a call through another ABI: i386 numbers, x32", () => {
    expect(evaluate(prog, { nr: 1, arch: 0x40000003 /* AUDIT_ARCH_I386 */ })).toBe(SECCOMP_RET.KILL_PROCESS);
    expect(evaluate(prog, { nr: X32_SYSCALL_BIT | 165 })).toBe(SECCOMP_RET.KILL_PROCESS);
    expect(evaluate(prog, { nr: 165, arch: AUDIT_ARCH_X86_64 })).toBe(EPERM);
  });

  it("is 8 bytes per instruction, little-endian, within the kernel's limits", () => {
    const b = filterBytes(prog);
    expect(b.length).toBe(prog.length * 8);
    expect(prog.length).toBeLessThan(4096); // BPF_MAXINSNS
    expect(b.readUInt16LE(0)).toBe(prog[0]!.code);
    expect(b.readUInt32LE(4)).toBe(4); // ld [arch]
  });
});
