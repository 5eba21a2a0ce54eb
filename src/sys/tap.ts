import { existsSync } from "node:fs";
import koffi from "koffi";
import { TypevisorError } from "../errors.js";
import * as libc from "./libc.js";

/*
 * TAP devices (Linux Documentation/networking/tuntap.rst, include/uapi/linux/if_tun.h) and the
 * few socket/iovec calls a network back end needs, through koffi. Loaded per thread like libc.ts.
 */
const c = koffi.load("libc.so.6");
const socketFn = c.func("int socket(int domain, int type, int protocol)");

/** ioctl request numbers, as the kernel's _IOC macro builds them (asm-generic/ioctl.h). */
function ioc(dir: number, type: string, nr: number, size: number): number {
  // dir<<30 | size<<16 | type<<8 | nr; `>>> 0` keeps _IOR (dir 2) positive.
  return ((dir << 30) | (size << 16) | (type.charCodeAt(0) << 8) | nr) >>> 0;
}
const IOC_WRITE = 1;
const IOC_READ = 2;
/** if_tun.h: #define TUNSETIFF _IOW('T', 202, int) = 0x400454ca. */
export const TUNSETIFF = ioc(IOC_WRITE, "T", 202, 4);
/** if_tun.h: _IOW('T', 208, unsigned int) = 0x400454d0. */
export const TUNSETOFFLOAD = ioc(IOC_WRITE, "T", 208, 4);
/** if_tun.h: _IOR('T', 210, unsigned int) = 0x800454d2. */
export const TUNGETIFF = ioc(IOC_READ, "T", 210, 4);
/** if_tun.h: _IOW('T', 216, int) = 0x400454d8. */
export const TUNSETVNETHDRSZ = ioc(IOC_WRITE, "T", 216, 4);

/** if_tun.h TUNSETIFF flags. */
export const IFF_TAP = 0x0002;
export const IFF_NO_PI = 0x1000;
export const IFF_VNET_HDR = 0x4000;
/** if_tun.h TUNSETOFFLOAD bits (what the TAP may hand us, host -> guest). */
export const TUN_F = { CSUM: 0x01, TSO4: 0x02, TSO6: 0x04, TSO_ECN: 0x08, UFO: 0x10 } as const;

/** IFNAMSIZ (include/uapi/linux/if.h) counts the NUL: names have at most 15 bytes. */
export const IFNAMSIZ = 16;
/** sizeof(struct ifreq) on x86_64: 16-byte name + a 24-byte union (ifr_flags is a short at 16). */
const IFREQ_SIZE = 40;
/**
 * struct virtio_net_hdr_v1 with num_buffers: 12 bytes. VERSION_1 makes this the header size
 * whether or not MRG_RXBUF is negotiated (virtio 1.2 §5.1.6).
 */
export const VNET_HDR_LEN = 12;

const O_NONBLOCK = 0x800;

export interface TapHandle {
  fd: number;
  /** The interface name the kernel gave (differs from the request only for templates like "tap%d"). */
  name: string;
  /** True when this call created the interface (it disappears when the fd closes). */
  created: boolean;
}

/**
 * Why `name` cannot be an interface name, or undefined when it can. Mirrors the kernel's
 * dev_valid_name (net/core/dev.c): 1..15 bytes, not "." or "..", no '/', ':' or whitespace.
 */
export function tapNameProblem(name: string): string | undefined {
  const bytes = Buffer.byteLength(name, "utf8");
  if (bytes === 0) return "is empty";
  if (bytes >= IFNAMSIZ) return `is ${bytes} bytes long; Linux interface names have at most ${IFNAMSIZ - 1}`;
  if (name === "." || name === "..") return "is not a valid interface name";
  if (/[/:\s\0]/.test(name)) return "contains '/', ':', a NUL or whitespace";
  return undefined;
}

function tapError(name: string, msg: string, hint?: string, cause?: unknown): TypevisorError {
  return new TypevisorError("TAP_OPEN", `TAP ${name}: ${msg}`, { cause, hint });
}

/**
 * Open (and create, if absent and we may) the TAP interface `name` as a non-blocking fd in the
 * form a virtio-net back end wants: Ethernet frames without packet info (IFF_NO_PI), each
 * preceded by a 12-byte virtio_net_hdr when `vnetHdr` (default true). Host -> guest offloads are
 * switched off (TUNSETOFFLOAD 0), so the kernel hands us plain, checksummed frames.
 * A TAP we create is not persistent: it goes away when the fd is closed.
 * @throws TypevisorError TAP_OPEN (bad name, no /dev/net/tun, no permission, busy, not a TAP)
 */
export function openTap(name: string, opts: { vnetHdr?: boolean } = {}): TapHandle {
  const problem = tapNameProblem(name);
  if (problem !== undefined) throw tapError(JSON.stringify(name), `the name ${problem}`);
  const vnetHdr = opts.vnetHdr ?? true;
  const existed = !name.includes("%") && existsSync(`/sys/class/net/${name}`);
  let fd: number;
  try {
    fd = libc.open("/dev/net/tun", libc.O_RDWR | O_NONBLOCK | libc.O_CLOEXEC);
  } catch (e) {
    const errno = e instanceof libc.SysError ? e.errno : 0;
    if (errno === 2 || errno === 19) throw tapError(name, "/dev/net/tun does not exist", "load the tun module: modprobe tun", e);
    if (errno === 1 || errno === 13) throw tapError(name, "no permission to open /dev/net/tun", "run as root or give this user access to /dev/net/tun", e);
    throw tapError(name, `cannot open /dev/net/tun: ${e instanceof Error ? e.message : String(e)}`, undefined, e);
  }
  try {
    const ifr = new Uint8Array(IFREQ_SIZE);
    ifr.set(Buffer.from(name, "utf8"));
    new DataView(ifr.buffer).setUint16(16, IFF_TAP | IFF_NO_PI | (vnetHdr ? IFF_VNET_HDR : 0), true);
    try {
      libc.ioctl(fd, TUNSETIFF, ifr, "TUNSETIFF");
    } catch (e) {
      const errno = e instanceof libc.SysError ? e.errno : 0;
      if (errno === 1 || errno === 13) {
        if (!existed) {
          throw tapError(name, "the interface does not exist and creating it needs CAP_NET_ADMIN", `create it once as root: ip tuntap add dev ${name} mode tap user $(id -un)`, e);
        }
        throw tapError(name, "not allowed to attach to this TAP (it belongs to another user or group)", `ip tuntap add dev ${name} mode tap user $(id -un), or run with CAP_NET_ADMIN`, e);
      }
      if (errno === 16) throw tapError(name, "already in use by another process", undefined, e);
      if (errno === 22) throw tapError(name, "an interface of that name exists and is not a single-queue TAP", undefined, e);
      throw tapError(name, `TUNSETIFF failed: ${e instanceof Error ? e.message : String(e)}`, undefined, e);
    }
    const end = ifr.indexOf(0);
    const actual = Buffer.from(ifr.subarray(0, end < 0 || end > IFNAMSIZ - 1 ? IFNAMSIZ - 1 : end)).toString("utf8");
    if (vnetHdr) {
      const sz = new Uint8Array(4);
      new DataView(sz.buffer).setInt32(0, VNET_HDR_LEN, true);
      libc.ioctl(fd, TUNSETVNETHDRSZ, sz, "TUNSETVNETHDRSZ");
    }
    // No host -> guest offloads until the device negotiates GUEST_CSUM/TSO: a persistent TAP
    // may keep offloads a previous user set (if_tun.h TUNSETOFFLOAD takes the value itself).
    libc.ioctlValue(fd, TUNSETOFFLOAD, 0, "TUNSETOFFLOAD");
    return { fd, name: actual, created: !existed };
  } catch (e) {
    libc.close(fd);
    if (e instanceof TypevisorError && e.code === "TAP_OPEN") throw e;
    throw tapError(name, e instanceof Error ? e.message : String(e), undefined, e);
  }
}

const fcntlFn = c.func("int fcntl(int fd, int cmd, int arg)");
/** fcntl.h F_DUPFD_CLOEXEC. */
const F_DUPFD_CLOEXEC = 1030;

/**
 * A TAP a supervisor opened with openTap and handed over as descriptor `fd` (the sandboxed VMM
 * cannot open one: it has no CAP_NET_ADMIN and its own, empty network namespace). Duplicated, so
 * each boot of the VM closes its own copy and a reboot finds `fd` still open.
 * @throws TypevisorError TAP_OPEN when `fd` is not an attached TAP
 */
export function adoptTap(fd: number, name: string): TapHandle {
  const dup = fcntlFn(fd, F_DUPFD_CLOEXEC, 3) as number;
  if (dup < 0) throw tapError(name, `descriptor ${fd}: ${libc.errnoName(libc.errno())}`);
  try {
    const ifr = new Uint8Array(IFREQ_SIZE);
    libc.ioctl(dup, TUNGETIFF, ifr, "TUNGETIFF");
    const flags = new DataView(ifr.buffer).getUint16(16, true);
    if ((flags & IFF_TAP) === 0) throw tapError(name, `descriptor ${fd} is not a TAP`);
    const end = ifr.indexOf(0);
    return { fd: dup, name: Buffer.from(ifr.subarray(0, end < 0 || end > IFNAMSIZ - 1 ? IFNAMSIZ - 1 : end)).toString("utf8"), created: false };
  } catch (e) {
    libc.close(dup);
    if (e instanceof TypevisorError && e.code === "TAP_OPEN") throw e;
    throw tapError(name, `descriptor ${fd}: ${e instanceof Error ? e.message : String(e)}`, undefined, e);
  }
}

/** Set the offloads the TAP may use towards us (TUN_F bits); on failure -errno, else 0. */
export function setTapOffload(fd: number, flags: number): number {
  try {
    libc.ioctlValue(fd, TUNSETOFFLOAD, flags, "TUNSETOFFLOAD");
    return 0;
  } catch (e) {
    return e instanceof libc.SysError ? -e.errno : -22;
  }
}

/** sockios.h: SIOCGIFFLAGS / SIOCSIFFLAGS; if.h IFF_UP. */
const SIOCGIFFLAGS = 0x8913;
const SIOCSIFFLAGS = 0x8914;
const IFF_UP = 0x1;
const AF_INET = 2;
const SOCK_DGRAM = 2;
const SOCK_CLOEXEC = 0x80000;

/**
 * Bring interface `name` up (what `ip link set NAME up` does: SIOCSIFFLAGS with IFF_UP).
 * A TAP we just created starts down, and a down TAP drops what the guest sends.
 * @throws TypevisorError TAP_UP (needs CAP_NET_ADMIN)
 */
export function setLinkUp(name: string): void {
  const problem = tapNameProblem(name);
  if (problem !== undefined) throw new TypevisorError("TAP_UP", `interface name ${JSON.stringify(name)} ${problem}`);
  const s = socketFn(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0) as number;
  if (s < 0) throw new TypevisorError("TAP_UP", `socket: ${libc.errnoName(libc.errno())}`);
  try {
    const ifr = new Uint8Array(IFREQ_SIZE);
    ifr.set(Buffer.from(name, "utf8"));
    libc.ioctl(s, SIOCGIFFLAGS, ifr, "SIOCGIFFLAGS");
    const dv = new DataView(ifr.buffer);
    dv.setUint16(16, dv.getUint16(16, true) | IFF_UP, true);
    libc.ioctl(s, SIOCSIFFLAGS, ifr, "SIOCSIFFLAGS");
  } catch (e) {
    throw new TypevisorError("TAP_UP", `cannot bring ${name} up: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
  } finally {
    libc.close(s);
  }
}

