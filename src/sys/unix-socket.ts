import koffi from "koffi";
import { TypevisorError } from "../errors.js";
import * as libc from "./libc.js";

/*
 * AF_UNIX stream sockets and epoll through raw syscalls (koffi), for code on the VMM's device
 * thread: that thread sleeps in poll(2) inside a koffi call, so Node's event loop never turns
 * there and node:net cannot be used. Every socket is non-blocking and close-on-exec; hot-path
 * calls return -errno instead of throwing. Loaded per thread like libc.ts.
 *
 * SIGPIPE: a write to a stream whose peer is gone raises SIGPIPE unless it is ignored. Node
 * ignores SIGPIPE process-wide at start-up (its worker threads share the disposition), so such
 * writes return -EPIPE here, which callers treat as a closed peer.
 */
const c = koffi.load("libc.so.6");
const socketFn = c.func("int socket(int domain, int type, int protocol)");
const bindFn = c.func("int bind(int fd, const void *addr, uint32_t len)");
const listenFn = c.func("int listen(int fd, int backlog)");
const accept4Fn = c.func("int accept4(int fd, void *addr, void *len, int flags)");
const connectFn = c.func("int connect(int fd, const void *addr, uint32_t len)");
const shutdownFn = c.func("int shutdown(int fd, int how)");
const unlinkFn = c.func("int unlink(const char *path)");
const epollCreate1Fn = c.func("int epoll_create1(int flags)");
const epollCtlFn = c.func("int epoll_ctl(int epfd, int op, int fd, void *event)");
const epollWaitFn = c.func("int epoll_wait(int epfd, void *events, int maxevents, int timeout)");

export const AF_UNIX = 1;
export const SOCK_STREAM = 1;
export const SOCK_NONBLOCK = 0x800;
export const SOCK_CLOEXEC = 0x80000;
/** shutdown(2) `how` (sys/socket.h). */
export const SHUT_RD = 0;
export const SHUT_WR = 1;
export const SHUT_RDWR = 2;

export const ENOENT = 2;
export const EPIPE = 32;
export const EINPROGRESS = 115;
export const ECONNREFUSED = 111;
export const ECONNRESET = 104;

/** sizeof(struct sockaddr_un) on Linux: sa_family_t (u16) + sun_path[108] (sys/un.h). */
const SOCKADDR_UN_SIZE = 110;
/** Longest path that fits sun_path with its terminating NUL. */
export const UNIX_PATH_MAX = 107;

/** Why `path` cannot name a unix socket, or undefined when it can. */
export function unixPathProblem(path: string): string | undefined {
  const n = Buffer.byteLength(path, "utf8");
  if (n === 0) return "is empty";
  if (path.includes("\0")) return "contains a NUL byte";
  if (n > UNIX_PATH_MAX) return `is ${n} bytes long; unix socket paths have at most ${UNIX_PATH_MAX}`;
  return undefined;
}

/** struct sockaddr_un for a filesystem path, and the length to pass (family + path + NUL). */
function sockaddrUn(path: string): { addr: Uint8Array; len: number } | undefined {
  if (unixPathProblem(path) !== undefined) return undefined;
  const p = Buffer.from(path, "utf8");
  const addr = new Uint8Array(SOCKADDR_UN_SIZE);
  new DataView(addr.buffer).setUint16(0, AF_UNIX, true);
  addr.set(p, 2);
  return { addr, len: 2 + p.length + 1 };
}

function newStream(): number {
  const fd = socketFn(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0) as number;
  return fd < 0 ? -libc.errno() : fd;
}

/**
 * A non-blocking listening AF_UNIX stream socket bound at `path` (which must not exist).
 * @throws TypevisorError UNIX_SOCKET
 */
export function unixListen(path: string, backlog = 128): number {
  const problem = unixPathProblem(path);
  if (problem !== undefined) throw new TypevisorError("UNIX_SOCKET", `unix socket path ${JSON.stringify(path)} ${problem}`);
  const sa = sockaddrUn(path)!;
  const fd = newStream();
  if (fd < 0) throw new TypevisorError("UNIX_SOCKET", `socket(AF_UNIX): ${libc.errnoName(-fd)}`);
  if ((bindFn(fd, sa.addr, sa.len) as number) < 0) {
    const e = libc.errno();
    libc.close(fd);
    throw new TypevisorError("UNIX_SOCKET", `cannot bind unix socket ${path}: ${libc.errnoName(e)}`, {
      hint: e === 17 ? "the path exists; remove it or choose another" : undefined,
    });
  }
  if ((listenFn(fd, backlog) as number) < 0) {
    const e = libc.errno();
    libc.close(fd);
    throw new TypevisorError("UNIX_SOCKET", `cannot listen on unix socket ${path}: ${libc.errnoName(e)}`);
  }
  return fd;
}

/** accept4(2) one pending connection as a non-blocking, close-on-exec fd; -errno (-EAGAIN: none). */
export function unixAccept(listenFd: number): number {
  const fd = accept4Fn(listenFd, null, null, SOCK_NONBLOCK | SOCK_CLOEXEC) as number;
  return fd < 0 ? -libc.errno() : fd;
}

/**
 * Connect a new non-blocking AF_UNIX stream socket to `path`. Returns the fd, or -errno
 * (-ENOENT: no such path, -ECONNREFUSED: nobody listening, -EAGAIN: the listener's backlog is
 * full; -EINVAL for a path that cannot be a socket address). AF_UNIX connects complete or fail
 * at once (the connection waits in the listener's backlog), so there is no EINPROGRESS state.
 */
export function unixConnect(path: string): number {
  const sa = sockaddrUn(path);
  if (sa === undefined) return -22;
  const fd = newStream();
  if (fd < 0) return fd;
  if ((connectFn(fd, sa.addr, sa.len) as number) < 0) {
    const e = libc.errno();
    libc.close(fd);
    return -e;
  }
  return fd;
}

/** shutdown(2); 0 or -errno. */
export function shutdownSocket(fd: number, how: number): number {
  return (shutdownFn(fd, how) as number) < 0 ? -libc.errno() : 0;
}

/** unlink(2); 0 or -errno. */
export function unlinkPath(path: string): number {
  return (unlinkFn(path) as number) < 0 ? -libc.errno() : 0;
}

/*
 * epoll (epoll(7)): an epoll fd is itself readable while any fd registered in it has an event,
 * so code that can only be polled for readability (the device thread) can wait for
 * writability through one. struct epoll_event is packed on x86_64: u32 events @0, u64 data @4.
 */
export const EPOLLIN = 0x1;
export const EPOLLOUT = 0x4;
export const EPOLLERR = 0x8;
export const EPOLLHUP = 0x10;
export const EPOLL_CTL_ADD = 1;
export const EPOLL_CTL_DEL = 2;
export const EPOLL_CTL_MOD = 3;
const EPOLL_CLOEXEC = 0x80000;
const EPOLL_EVENT_SIZE = 12;

/** @throws TypevisorError UNIX_SOCKET */
export function epollCreate(): number {
  const fd = epollCreate1Fn(EPOLL_CLOEXEC) as number;
  if (fd < 0) throw new TypevisorError("UNIX_SOCKET", `epoll_create1: ${libc.errnoName(libc.errno())}`);
  return fd;
}

/** epoll_ctl(2) with the target fd as the event's data; 0 or -errno. */
export function epollCtl(epfd: number, op: number, fd: number, events: number): number {
  const ev = new Uint8Array(EPOLL_EVENT_SIZE);
  const dv = new DataView(ev.buffer);
  dv.setUint32(0, events >>> 0, true);
  dv.setBigUint64(4, BigInt(fd), true);
  return (epollCtlFn(epfd, op, fd, ev) as number) < 0 ? -libc.errno() : 0;
}

export interface EpollEvent {
  fd: number;
  events: number;
}

/** epoll_wait(2) without blocking: up to `max` ready registrations (empty on error). */
export function epollReady(epfd: number, max = 64): EpollEvent[] {
  const buf = new Uint8Array(EPOLL_EVENT_SIZE * max);
  const n = epollWaitFn(epfd, buf, max, 0) as number;
  if (n <= 0) return [];
  const dv = new DataView(buf.buffer);
  const out: EpollEvent[] = [];
  for (let i = 0; i < n; i++) out.push({ events: dv.getUint32(i * EPOLL_EVENT_SIZE, true), fd: Number(dv.getBigUint64(i * EPOLL_EVENT_SIZE + 4, true)) });
  return out;
}
