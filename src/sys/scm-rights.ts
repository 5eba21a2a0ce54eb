/**
 * Descriptors passed over a unix socket (SCM_RIGHTS, unix(7)): how the daemon hands a jailed
 * standby VMM the TAP devices of the VM it becomes (it opens them in the host's network namespace;
 * the VMM has neither that namespace nor CAP_NET_ADMIN). Node's net module drops ancillary data,
 * so sendmsg(2)/recvmsg(2) are called here through koffi on a SOCK_SEQPACKET pair (one message,
 * one set of descriptors, boundaries kept).
 */
import koffi from "koffi";
import { TypevisorError } from "../errors.js";
import { SysError, errno } from "./libc.js";

const libc = koffi.load("libc.so.6");
const iovecT = koffi.struct({ base: "void *", len: "size_t" });
// struct msghdr (x86_64): name, namelen (+pad), iov, iovlen, control, controllen, flags.
const msghdrT = koffi.struct({ name: "void *", namelen: "uint32_t", iov: koffi.pointer(iovecT), iovlen: "size_t", control: "void *", controllen: "size_t", flags: "int" });
const socketpairFn = libc.func("int socketpair(int domain, int type, int protocol, _Out_ int *sv)");
const sendmsgFn = libc.func("sendmsg", "long", ["int", koffi.pointer(msghdrT), "int"]);
const recvmsgFn = libc.func("recvmsg", "long", ["int", koffi.inout(koffi.pointer(msghdrT)), "int"]);
const closeFn = libc.func("int close(int fd)");
const shutdownFn = libc.func("int shutdown(int fd, int how)");

const AF_UNIX = 1;
const SOCK_SEQPACKET = 5;
const SOCK_CLOEXEC = 0x80000;
const SOL_SOCKET = 1;
const SCM_RIGHTS = 1;
const MSG_DONTWAIT = 0x40;
const MSG_CTRUNC = 0x8;
const MSG_CMSG_CLOEXEC = 0x40000000;
/** struct cmsghdr: size_t cmsg_len, int cmsg_level, int cmsg_type, then the data (8-byte aligned). */
const CMSG_HDR = 16;
/** At most this many descriptors in one message (a VM's NICs: the daemon's spec allows 8). */
export const MAX_PASSED_FDS = 16;

/** A connected SOCK_SEQPACKET unix pair, close-on-exec (the end a child gets is passed explicitly). */
export function seqpacketPair(): [number, number] {
  const sv = [-1, -1];
  if (socketpairFn(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) !== 0) throw new SysError("socketpair", errno());
  return [sv[0]!, sv[1]!];
}

/**
 * This end only sends: the peer's sends then fail (EPIPE), so a peer that is not trusted cannot
 * queue messages, or descriptors, on this side (unix(7): shutdown of a stream or seqpacket socket).
 */
export function shutdownRead(fd: number): void {
  if (shutdownFn(fd, 0 /* SHUT_RD */) !== 0) throw new SysError("shutdown", errno());
}

/** One message carrying `fds` (which stay open here: the receiver gets its own copies). */
export function sendFds(sock: number, fds: readonly number[]): void {
  if (fds.length === 0 || fds.length > MAX_PASSED_FDS) throw new TypevisorError("INVALID_ARGUMENT", `between 1 and ${MAX_PASSED_FDS} descriptors per message`);
  const control = Buffer.alloc(CMSG_HDR + 8 * Math.ceil((4 * fds.length) / 8));
  control.writeBigUInt64LE(BigInt(CMSG_HDR + 4 * fds.length), 0);
  control.writeInt32LE(SOL_SOCKET, 8);
  control.writeInt32LE(SCM_RIGHTS, 12);
  fds.forEach((fd, i) => control.writeInt32LE(fd, CMSG_HDR + 4 * i));
  // Safe: the kernel reads the one-byte payload and `control` during the call; both outlive it.
  const r = Number(sendmsgFn(sock, { name: null, namelen: 0, iov: [{ base: Buffer.from([1]), len: 1 }], iovlen: 1, control, controllen: control.length, flags: 0 }, 0));
  if (r !== 1) throw new SysError("sendmsg", errno());
}

/**
 * The descriptors of the message waiting on `sock` (none waiting: EAGAIN), exactly `count` of
 * them, close-on-exec. Whatever else arrives (fewer, more, other ancillary data, a cut list) is
 * closed and refused: the sender is the daemon, but the check costs nothing.
 */
export function recvFds(sock: number, count: number): number[] {
  if (count < 1 || count > MAX_PASSED_FDS) throw new TypevisorError("INVALID_ARGUMENT", `between 1 and ${MAX_PASSED_FDS} descriptors per message`);
  const control = Buffer.alloc(CMSG_HDR + 4 * MAX_PASSED_FDS);
  const data = Buffer.alloc(1);
  const m = { name: null, namelen: 0, iov: [{ base: data, len: 1 }], iovlen: 1, control, controllen: control.length, flags: 0 };
  // Safe: the kernel writes at most controllen bytes into `control` and 1 into `data`, both alive through the call.
  const r = Number(recvmsgFn(sock, m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC));
  if (r < 0) throw new SysError("recvmsg", errno());
  const got: number[] = [];
  let off = 0;
  while (off + CMSG_HDR <= m.controllen) {
    const len = Number(control.readBigUInt64LE(off));
    if (len < CMSG_HDR || off + len > m.controllen) break;
    if (control.readInt32LE(off + 8) === SOL_SOCKET && control.readInt32LE(off + 12) === SCM_RIGHTS) {
      for (let p = off + CMSG_HDR; p + 4 <= off + len; p += 4) got.push(control.readInt32LE(p));
    }
    off += CMSG_HDR + 8 * Math.ceil((len - CMSG_HDR) / 8);
  }
  if (r !== 1 || (m.flags & MSG_CTRUNC) !== 0 || got.length !== count) {
    for (const fd of got) closeFn(fd);
    throw new TypevisorError("INVALID_REQUEST", `expected ${count} descriptor(s) on the hand-off socket, got ${got.length}${(m.flags & MSG_CTRUNC) !== 0 ? " (cut)" : ""}`);
  }
  return got;
}
