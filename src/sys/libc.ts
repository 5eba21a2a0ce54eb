import koffi from "koffi";
import { TypevisorError } from "../errors.js";

/**
 * The few libc calls the VMM needs, through koffi. Every wrapper checks the
 * return value and turns errno into a SysError, the way rust-vmm's wrappers
 * do, so callers never see a raw -1.
 *
 * Loaded once per thread (koffi handles are per isolate): each vCPU worker
 * imports this module again.
 */
const libc = koffi.load("libc.so.6");

// x86_64 SysV passes the variadic third ioctl argument in a register like any
// other integer, so two fixed prototypes (pointer, integer) are safe.
const ioctlPtr = libc.func("int ioctl(int fd, unsigned long req, void *arg)");
const ioctlInt = libc.func("int ioctl(int fd, unsigned long req, unsigned long arg)");
const openFn = libc.func("int open(const char *path, int flags, int mode)");
const closeFn = libc.func("int close(int fd)");
const mmapFn = libc.func("void *mmap(void *addr, size_t len, int prot, int flags, int fd, long off)");
const munmapFn = libc.func("int munmap(void *addr, size_t len)");
// The address as an integer: MAP_FIXED places a mapping over a range this process already reserved.
const mmapAtFn = libc.func("void *mmap(uintptr_t addr, size_t len, int prot, int flags, int fd, long off)");
const lseekFn = libc.func("int64_t lseek(int fd, int64_t off, int whence)");
const madviseFn = libc.func("int madvise(void *addr, size_t len, int advice)");
const mallocTrimFn = libc.func("int malloc_trim(size_t pad)");
const writeFn = libc.func("long write(int fd, const void *buf, size_t n)");
const readFn = libc.func("long read(int fd, void *buf, size_t n)");
const pollFn = libc.func("int poll(void *fds, unsigned long nfds, int timeout)");
// struct iovec (x86_64): void *iov_base @0, size_t iov_len @8.
// Anonymous type: a named one would clash when the module is evaluated twice in one isolate (vitest).
const iovecT = koffi.struct({ base: "void *", len: "size_t" });
const writevFn = libc.func("writev", "long", ["int", koffi.pointer(iovecT), "int"]);
const eventfdFn = libc.func("int eventfd(unsigned int initval, int flags)");
const pthreadSelfFn = libc.func("unsigned long pthread_self()");
const pthreadKillFn = libc.func("int pthread_kill(unsigned long thread, int sig)");
const sigactionFn = libc.func("int sigaction(int sig, const void *act, void *oldact)");
const dlsymFn = libc.func("uintptr_t dlsym(uintptr_t handle, const char *name)");
const getpidFn = libc.func("int getpid()");
const pipe2Fn = libc.func("int pipe2(void *fds, int flags)");
const socketpairFn = libc.func("int socketpair(int domain, int type, int protocol, void *sv)");
const gettidFn = libc.func("int gettid()");
const preadFn = libc.func("long pread(int fd, void *buf, size_t n, int64_t off)");
const pwriteFn = libc.func("long pwrite(int fd, const void *buf, size_t n, int64_t off)");
const fallocateFn = libc.func("int fallocate(int fd, int mode, int64_t off, int64_t len)");
const ftruncateFn = libc.func("int ftruncate(int fd, int64_t len)");
const fdatasyncFn = libc.func("int fdatasync(int fd)");
// PRIO_PROCESS with a thread id names that one thread on Linux (setpriority(2), NOTES: "a thread's nice value").
const getpriorityFn = libc.func("int getpriority(int which, unsigned int who)");
const setpriorityFn = libc.func("int setpriority(int which, unsigned int who, int prio)");
const PRIO_PROCESS = 0;
// Thread names show in /proc/PID/task/TID/comm, so per-thread CPU can be told apart (Node names every thread "node").
const pthreadSetnameFn = libc.func("int pthread_setname_np(unsigned long thread, const char *name)");
// memmove(dst, dst, 0) returns dst: the one portable way to turn an address
// received from another thread into a koffi pointer we can view.
const pointerAtFn = libc.func("void *memmove(uintptr_t dst, uintptr_t src, size_t n)");

export const O_RDWR = 0x2;
export const O_CLOEXEC = 0x80000;
export const PROT_READ = 0x1;
export const PROT_WRITE = 0x2;
export const MAP_SHARED = 0x01;
export const MAP_PRIVATE = 0x02;
export const MAP_ANONYMOUS = 0x20;
export const MAP_NORESERVE = 0x4000;
export const MAP_FIXED = 0x10;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;
export const ENXIO = 6;
export const MADV_DONTFORK = 10;
export const MADV_MERGEABLE = 12;
export const MADV_HUGEPAGE = 14;
export const EFD_CLOEXEC = 0x80000;
export const EFD_NONBLOCK = 0x800;

export const EINTR = 4;
export const EAGAIN = 11;
export const EIO = 5;
export const EINVAL = 22;
export const EOPNOTSUPP = 95;
export const ENOSPC = 28;
/** Disk quota exceeded (errno(3)): a full filesystem, as far as a writer can tell. */
export const EDQUOT = 122;
/** fallocate(2) modes. */
export const FALLOC_FL_KEEP_SIZE = 0x1;
export const FALLOC_FL_PUNCH_HOLE = 0x2;

/** An opaque native pointer (koffi external). */
export type Pointer = unknown;

export class SysError extends TypevisorError {
  readonly errno: number;
  readonly call: string;
  constructor(call: string, errno: number) {
    super("SYSCALL_FAILED", `${call} failed: ${errnoName(errno)} (errno ${errno})`);
    this.errno = errno;
    this.call = call;
  }
}

const ERRNO_NAMES: Record<number, string> = {
  1: "EPERM", 2: "ENOENT", 3: "ESRCH", 4: "EINTR", 5: "EIO", 9: "EBADF", 11: "EAGAIN", 12: "ENOMEM", 13: "EACCES",
  14: "EFAULT", 16: "EBUSY", 17: "EEXIST", 19: "ENODEV", 22: "EINVAL", 24: "EMFILE", 25: "ENOTTY",
  28: "ENOSPC", 38: "ENOSYS", 95: "EOPNOTSUPP", 122: "EDQUOT",
};

export function errnoName(errno: number): string {
  return ERRNO_NAMES[errno] ?? `errno ${errno}`;
}

export function errno(): number {
  return koffi.errno();
}

function check(call: string, ret: number): number {
  if (ret < 0) throw new SysError(call, koffi.errno());
  return ret;
}

/** check() for a call made again after EINTR: true when `ret` says a signal interrupted it, else `ret` is returned by the caller or thrown here. */
function interrupted(call: string, ret: number): boolean {
  if (ret >= 0) return false;
  const e = koffi.errno();
  if (e !== EINTR) throw new SysError(call, e);
  return true;
}

/**
 * ioctl with a pointer (buffer) argument; returns the non-negative result. Made again when a
 * signal interrupted it (EINTR: the call did nothing, signal(7)): a VMM gets signals while it
 * builds its VM (SIGPROF from a profiler, SIGWINCH, SIGCHLD), and on PVM hosts KVM_CREATE_VM
 * sleeps interruptibly (QEMU's kvm_init loops on KVM_CREATE_VM's EINTR the same way). KVM_RUN,
 * whose EINTR means "stopped for a signal" (KVM API §4.10), goes through ioctlRaw, not here.
 */
export function ioctl(fd: number, req: number, arg: Uint8Array | null, name = "ioctl"): number {
  let r: number;
  do r = ioctlPtr(fd, req, arg) as number;
  while (interrupted(name, r));
  return r;
}

/** ioctl with an integer argument, made again after EINTR as ioctl() is. */
export function ioctlValue(fd: number, req: number, arg: number | bigint, name = "ioctl"): number {
  let r: number;
  do r = ioctlInt(fd, req, arg) as number;
  while (interrupted(name, r));
  return r;
}

/** ioctl returning -errno instead of throwing (for hot paths such as KVM_RUN). */
export function ioctlRaw(fd: number, req: number, arg: number): number {
  const r = ioctlInt(fd, req, arg) as number;
  return r < 0 ? -koffi.errno() : r;
}

export function open(path: string, flags: number): number {
  const fd = openFn(path, flags | O_CLOEXEC, 0) as number;
  if (fd < 0) throw new SysError(`open(${path})`, koffi.errno());
  return fd;
}

export function close(fd: number): void {
  closeFn(fd);
}

export interface Mapping {
  pointer: Pointer;
  address: bigint;
  length: number;
}

export function mmap(length: number, prot: number, flags: number, fd = -1, offset = 0): Mapping {
  const p = mmapFn(null, length, prot, flags, fd, offset);
  const address = koffi.address(p) as bigint;
  // MAP_FAILED is (void *)-1.
  if (address === 0xffff_ffff_ffff_ffffn || address === 0n) throw new SysError("mmap", koffi.errno());
  return { pointer: p, address, length };
}

/**
 * An anonymous mapping whose start is a multiple of `align` (a power of two): map `align` bytes
 * more, then unmap the unaligned head and the tail. For guest RAM, 2 MiB alignment lets the
 * kernel back it with transparent huge pages and KVM map them 2 MiB at a time, which it can only
 * do where guest-physical and host-virtual addresses agree modulo 2 MiB.
 */
export function mmapAligned(length: number, align: number, prot: number, flags: number): Mapping {
  const raw = mmap(length + align, prot, flags);
  const a = BigInt(align);
  const start = (raw.address + a - 1n) & ~(a - 1n);
  const head = Number(start - raw.address);
  if (head > 0) check("munmap", munmapFn(raw.pointer, head) as number);
  // head < align, so a tail of align - head bytes is always left over past the aligned range.
  check("munmap", munmapFn(pointerAt(start + BigInt(length)), align - head) as number);
  return { pointer: pointerAt(start), address: start, length };
}

/**
 * mmap(2) of `fd` at exactly `address` (MAP_FIXED), replacing what was mapped there. Only for a
 * range the caller reserved itself (mmapAligned): MAP_FIXED over anything else would silently
 * unmap memory someone else owns.
 */
export function mmapFixed(address: bigint, length: number, prot: number, flags: number, fd: number, offset: number): Mapping {
  const p = mmapAtFn(address, length, prot, flags | MAP_FIXED, fd, offset);
  const got = koffi.address(p) as bigint;
  if (got === 0xffff_ffff_ffff_ffffn) throw new SysError("mmap", koffi.errno());
  if (got !== address) throw new TypevisorError("MMAP", `mmap placed a fixed mapping at 0x${got.toString(16)}, not 0x${address.toString(16)}`);
  return { pointer: p, address, length };
}

/** lseek(2); the new offset, or -errno (SEEK_DATA past the last data: -ENXIO). */
export function lseek(fd: number, off: number, whence: number): number {
  const r = Number(lseekFn(fd, off, whence) as bigint | number);
  return r < 0 ? -koffi.errno() : r;
}

export function munmap(m: Mapping): void {
  check("munmap", munmapFn(m.pointer, m.length) as number);
}

/**
 * Give the free memory of every malloc arena back to the kernel (glibc malloc_trim(3), pad 0:
 * madvise(MADV_DONTNEED) on free pages, and the main heap's top). A thread that ended leaves its
 * arena to the process with whatever it freed still resident; nothing is handed to the kernel
 * but glibc's own free lists. Returns whether any memory was released.
 */
export function mallocTrim(): boolean {
  return (mallocTrimFn(0) as number) === 1;
}

export function madvise(m: Mapping, advice: number): void {
  check("madvise", madviseFn(m.pointer, m.length, advice) as number);
}

/** An ArrayBuffer over native memory, without copying. */
export function view(pointer: Pointer, length: number): ArrayBuffer {
  return koffi.view(pointer, length) as ArrayBuffer;
}

/** A pointer for an address obtained elsewhere (e.g. posted from another thread). */
export function pointerAt(address: bigint): Pointer {
  return pointerAtFn(address, address, 0);
}

/** write(2); returns bytes written or -errno. */
export function writeRaw(fd: number, buf: Uint8Array): number {
  const r = writeFn(fd, buf, buf.length) as number;
  return r < 0 ? -koffi.errno() : r;
}

/** read(2); returns bytes read or -errno. */
export function readRaw(fd: number, buf: Uint8Array): number {
  const r = readFn(fd, buf, buf.length) as number;
  return r < 0 ? -koffi.errno() : r;
}

/** Linux UIO_MAXIOV: readv/writev refuse more iovecs with EINVAL. */
export const IOV_MAX = 1024;

/**
 * writev(2) of `views`; returns the bytes written or -errno. At most IOV_MAX
 * views (else -EINVAL, as the kernel would say). On a TAP one call is one frame.
 */
export function writevRaw(fd: number, views: readonly Uint8Array[]): number {
  if (views.length > IOV_MAX) return -22;
  const iov = views.map((v) => ({ base: v, len: v.length }));
  const r = writevFn(fd, iov, iov.length) as number;
  return r < 0 ? -koffi.errno() : r;
}

const POLLOUT = 0x4;
/**
 * Write all of `buf`, waiting with poll(2) when the fd is non-blocking and full
 * (Node may have put a shared stdout pipe in O_NONBLOCK mode).
 */
export function writeAll(fd: number, buf: Uint8Array): void {
  let off = 0;
  const pfd = new Uint8Array(8);
  const dv = new DataView(pfd.buffer);
  while (off < buf.length) {
    const r = writeRaw(fd, off === 0 ? buf : buf.subarray(off));
    if (r >= 0) {
      off += r;
    } else if (r === -EAGAIN) {
      dv.setInt32(0, fd, true);
      dv.setInt16(4, POLLOUT, true);
      pollFn(pfd, 1, 1000);
    } else if (r !== -EINTR) {
      return; // console gone (EPIPE etc.): drop output rather than kill the vCPU
    }
  }
}

export function eventfd(initval = 0, flags = EFD_CLOEXEC | EFD_NONBLOCK): number {
  return check("eventfd", eventfdFn(initval, flags) as number);
}

const eventfdBuf = new Uint8Array(8);
/** Add 1 to an eventfd's counter (wakes its poller). */
export function eventfdSignal(fd: number): void {
  new DataView(eventfdBuf.buffer).setBigUint64(0, 1n, true);
  writeRaw(fd, eventfdBuf);
}

/** Read and reset a non-blocking eventfd; returns the count (0 if it was not signalled). */
export function eventfdDrain(fd: number): number {
  const b = new Uint8Array(8);
  const r = readRaw(fd, b);
  return r === 8 ? Number(new DataView(b.buffer).getBigUint64(0, true)) : 0;
}

const clearBuf = new Uint8Array(8);
/** Reset a non-blocking eventfd's counter, discarding the count (no allocation: hot device loops). */
export function eventfdClear(fd: number): void {
  readFn(fd, clearBuf, 8);
}

export const POLLIN = 0x1;

/**
 * poll(2) on `fds` for readability; returns the indices that are readable.
 * Blocks the calling thread (use only on device worker threads).
 */
export function pollIn(fds: readonly number[], timeoutMs: number): number[] {
  const buf = new Uint8Array(8 * fds.length);
  const dv = new DataView(buf.buffer);
  fds.forEach((fd, i) => {
    dv.setInt32(i * 8, fd, true);
    dv.setInt16(i * 8 + 4, POLLIN, true);
  });
  const n = pollFn(buf, fds.length, timeoutMs) as number;
  if (n <= 0) return [];
  const ready: number[] = [];
  fds.forEach((_, i) => {
    if (dv.getInt16(i * 8 + 6, true) !== 0) ready.push(i);
  });
  return ready;
}

/**
 * A reusable poll(2) set for readability: the pollfd array is built once per fd list (set())
 * and each wait() only clears revents and calls poll, so a device loop allocates nothing per pass.
 */
export class PollSet {
  private buf = new Uint8Array(0);
  private dv = new DataView(this.buf.buffer);
  private count = 0;
  /** Indices of the readable fds after the last wait(); the first `ready` entries are valid. */
  readonly readyIdx: number[] = [];
  ready = 0;

  set(fds: readonly number[]): void {
    if (this.buf.length < 8 * fds.length) {
      this.buf = new Uint8Array(8 * fds.length);
      this.dv = new DataView(this.buf.buffer);
    }
    for (let i = 0; i < fds.length; i++) {
      this.dv.setInt32(i * 8, fds[i]!, true);
      this.dv.setInt16(i * 8 + 4, POLLIN, true);
    }
    this.count = fds.length;
  }

  /** Wait up to `timeoutMs`; returns how many fds are readable (indices in readyIdx[0, ready)). */
  wait(timeoutMs: number): number {
    const dv = this.dv;
    for (let i = 0; i < this.count; i++) dv.setInt16(i * 8 + 6, 0, true);
    const n = pollFn(this.buf, this.count, timeoutMs) as number;
    let k = 0;
    if (n > 0) {
      for (let i = 0; i < this.count; i++) {
        if (dv.getInt16(i * 8 + 6, true) !== 0) this.readyIdx[k++] = i;
      }
    }
    this.ready = k;
    return k;
  }
}

/** Name a thread (at most 15 bytes, pthread_setname_np(3)); best effort, for diagnostics. */
export function pthreadSetName(thread: bigint, name: string): void {
  pthreadSetnameFn(thread, name.slice(0, 15));
}

export function pthreadSelf(): bigint {
  return BigInt(pthreadSelfFn() as number | bigint);
}

export function pthreadKill(thread: bigint, sig: number): void {
  const r = pthreadKillFn(thread, sig) as number;
  if (r !== 0) throw new SysError("pthread_kill", r);
}

export function getpid(): number {
  return getpidFn() as number;
}

export function gettid(): number {
  return gettidFn() as number;
}

/** A thread's nice value, -20..19 (getpriority may legitimately return -1: errno tells). */
export function threadNice(tid: number): number {
  koffi.errno(0);
  const r = getpriorityFn(PRIO_PROCESS, tid) as number;
  if (r === -1 && koffi.errno() !== 0) throw new SysError("getpriority", koffi.errno());
  return r;
}

/** Set a thread's nice value (raising it needs no privilege; lowering it needs CAP_SYS_NICE or RLIMIT_NICE). */
export function setThreadNice(tid: number, nice: number): void {
  if ((setpriorityFn(PRIO_PROCESS, tid, nice) as number) !== 0) throw new SysError("setpriority", koffi.errno());
}

/** SIGRTMIN+1 under glibc (which reserves 32 and 33 for itself). */
export const SIG_VCPU_KICK = 35;

let kickInstalled = false;
/**
 * Install a do-nothing handler for the vCPU kick signal, without SA_RESTART,
 * so a signal sent with pthread_kill makes a blocked KVM_RUN return EINTR
 * (KVM API §4.10 KVM_RUN: "-EINTR: an unmasked signal is pending").
 * The handler is libc's getpid: async-signal-safe and side-effect free, so no
 * JS ever runs in signal context (kvm-lab.md: measured to work here).
 * Process-wide: once is enough.
 */
export function installKickHandler(): void {
  if (kickInstalled) return;
  const handler = dlsymFn(0, "getpid") as number | bigint;
  if (BigInt(handler) === 0n) throw new SysError("dlsym(getpid)", koffi.errno());
  // struct sigaction (x86_64 glibc): sa_handler @0, sa_mask @8 (128 bytes), sa_flags @136, sa_restorer @144.
  const act = new Uint8Array(152);
  new DataView(act.buffer).setBigUint64(0, BigInt(handler), true);
  check("sigaction", sigactionFn(SIG_VCPU_KICK, act, null) as number);
  kickInstalled = true;
}

/**
 * pipe2(2) with O_CLOEXEC: [read end, write end]. The VMM's console pipe: vCPU
 * threads write guest serial output into it with write(2) (blocking, so a full
 * pipe slows the guest instead of losing bytes) while the main thread reads it.
 */
export function pipe2(flags = O_CLOEXEC): [number, number] {
  const fds = new Int32Array(2);
  check("pipe2", pipe2Fn(fds, flags) as number);
  return [fds[0]!, fds[1]!];
}

/**
 * socketpair(2) of non-blocking, close-on-exec AF_UNIX datagram sockets. A stand-in for a TAP
 * where a device's code runs with no network (net/rehearse.ts): like a TAP fd, each read is one
 * packet and each write(v) sends one. The kernel writes the two fds into `fds`, alive for the call.
 */
export function datagramPair(): [number, number] {
  const AF_UNIX = 1;
  const SOCK_DGRAM = 2;
  const SOCK_NONBLOCK = 0o4000;
  const fds = new Int32Array(2);
  check("socketpair", socketpairFn(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | O_CLOEXEC, 0, fds) as number);
  return [fds[0]!, fds[1]!];
}

/**
 * pread(2)/pwrite(2) of all of `buf` at `off`, resuming after short transfers and EINTR; 0, or
 * -errno (a read that meets the end of the file first is -EIO). The kernel reads or writes
 * within `buf`'s own length, which stays alive for the call.
 */
export function preadFull(fd: number, buf: Uint8Array, off: number): number {
  return transferFull(fd, buf, off, false);
}

export function pwriteFull(fd: number, buf: Uint8Array, off: number): number {
  return transferFull(fd, buf, off, true);
}

function transferFull(fd: number, buf: Uint8Array, off: number, write: boolean): number {
  let done = 0;
  while (done < buf.length) {
    const n = (write ? pwriteFn : preadFn)(fd, buf.subarray(done), buf.length - done, off + done) as number;
    if (n < 0) {
      const e = koffi.errno();
      if (e === EINTR) continue;
      return -e;
    }
    if (n === 0) return -EIO;
    done += n;
  }
  return 0;
}

/** fallocate(2); 0 or -errno. */
export function fallocate(fd: number, mode: number, off: number, len: number): number {
  return (fallocateFn(fd, mode, off, len) as number) < 0 ? -koffi.errno() : 0;
}

/** ftruncate(2); 0 or -errno. */
export function ftruncate(fd: number, len: number): number {
  return (ftruncateFn(fd, len) as number) < 0 ? -koffi.errno() : 0;
}

/** fdatasync(2), retried on EINTR; 0 or -errno. */
export function fdatasync(fd: number): number {
  for (;;) {
    if ((fdatasyncFn(fd) as number) === 0) return 0;
    const e = koffi.errno();
    if (e !== EINTR) return -e;
  }
}
