/**
 * Who is on the other end of a unix socket: SO_PEERCRED (socket(7): the pid, uid and gid of the
 * peer when it called connect(2)) and SO_PEERGROUPS (Linux 4.13+: its supplementary groups at that
 * moment). Node has no API for either, so getsockopt(2) goes through koffi on the accepted
 * connection's descriptor. The kernel fills these in at connect time, so a peer cannot lie about
 * them, and a peer that later changes its uid or exits changes nothing here.
 *
 * Also the two lookups the daemon needs to turn a uid into a name and a group name into a gid,
 * from /etc/passwd and /etc/group (local accounts; NSS sources such as LDAP are not consulted).
 */
import { readFileSync } from "node:fs";
import koffi from "koffi";
import { SysError } from "./libc.js";

const c = koffi.load("libc.so.6");
const getsockoptFn = c.func("int getsockopt(int fd, int level, int optname, void *optval, void *optlen)");

/** asm-generic/socket.h */
const SOL_SOCKET = 1;
const SO_PEERCRED = 17;
const SO_PEERGROUPS = 59;
const ERANGE = 34;

export interface PeerCred {
  pid: number;
  uid: number;
  gid: number;
  /** Supplementary groups; empty if the kernel is older than 4.13. */
  groups: number[];
}

/**
 * The credentials of the peer of the connected AF_UNIX socket `fd`.
 * Safe: the kernel writes at most *optlen bytes into optval, and both buffers are ours and live
 * through the call (koffi passes their addresses and keeps the Buffers referenced until it returns).
 * @throws SysError
 */
export function peerCred(fd: number): PeerCred {
  // struct ucred { pid_t pid; uid_t uid; gid_t gid; } (socket(7)): three 32-bit fields.
  const cred = Buffer.alloc(12);
  const len = Buffer.alloc(4);
  len.writeUInt32LE(cred.length);
  if ((getsockoptFn(fd, SOL_SOCKET, SO_PEERCRED, cred, len) as number) !== 0) throw new SysError("getsockopt(SO_PEERCRED)", koffi.errno());
  return { pid: cred.readInt32LE(0), uid: cred.readUInt32LE(4), gid: cred.readUInt32LE(8), groups: peerGroups(fd) };
}

function peerGroups(fd: number): number[] {
  // NGROUPS_MAX is 65536; start small, and grow to what the kernel says it needs (ERANGE sets optlen).
  for (let n = 64; n <= 65536; n *= 16) {
    const buf = Buffer.alloc(n * 4);
    const len = Buffer.alloc(4);
    len.writeUInt32LE(buf.length);
    // Safe as above: the kernel writes at most buf.length bytes.
    if ((getsockoptFn(fd, SOL_SOCKET, SO_PEERGROUPS, buf, len) as number) === 0) {
      const got = len.readUInt32LE(0) / 4;
      return Array.from({ length: got }, (_, i) => buf.readUInt32LE(i * 4));
    }
    const err = koffi.errno();
    if (err === ERANGE) continue;
    // ENOPROTOOPT: a kernel before 4.13; the primary gid still counts
    return [];
  }
  return [];
}

/** The descriptor under a node:net socket (libuv's pipe handle), if it has one. */
export function socketFd(socket: unknown): number | undefined {
  const fd = (socket as { _handle?: { fd?: unknown } })._handle?.fd;
  return typeof fd === "number" && fd >= 0 ? fd : undefined;
}

function colonFile(path: string): string[][] {
  try {
    return readFileSync(path, "utf8").split("\n").filter((l) => l !== "" && !l.startsWith("#")).map((l) => l.split(":"));
  } catch {
    return [];
  }
}

/** The login name of `uid` in /etc/passwd. */
export function userName(uid: number, passwd = "/etc/passwd"): string | undefined {
  return colonFile(passwd).find((f) => f.length >= 3 && Number(f[2]) === uid)?.[0];
}

/** The gid of group `name` in /etc/group. */
export function groupId(name: string, group = "/etc/group"): number | undefined {
  const f = colonFile(group).find((g) => g.length >= 3 && g[0] === name);
  const gid = f !== undefined ? Number(f[2]) : NaN;
  return Number.isInteger(gid) && gid >= 0 ? gid : undefined;
}
