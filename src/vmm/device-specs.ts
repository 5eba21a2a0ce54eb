/**
 * Device specifications as plain data, and the parsers for their
 * command-line form. Validated fully before a VM is created.
 */
import { existsSync, statSync } from "node:fs";
import type { DiskFormat } from "./disk/backend.js";
import { TypevisorError } from "../errors.js";
import { tapNameProblem } from "../sys/tap.js";
import { unixPathProblem } from "../sys/unix-socket.js";
import { parseMac } from "./devices/virtio/net/mac.js";

export interface DiskSpec {
  path: string;
  readonly: boolean;
  /** Undefined: raw, and a file with the qcow2 magic is refused (the format is never guessed: vmm/disk/open.ts). */
  format?: DiskFormat;
  /** Reported to the guest by VIRTIO_BLK_T_GET_ID (at most 20 bytes, virtio 1.2 §5.2.6). */
  serial?: string;
}

export interface NetSpec {
  /** TAP interface name (created if absent and we may). */
  tap: string;
  /** "02:xx:..." ; generated stably from the TAP name when absent. */
  mac?: string;
  /** The TAP already open as this descriptor (a sandboxed VMM, sys/tap.ts adoptTap), instead of opening it by name. */
  fd?: number;
}

export interface BalloonSpec {
  /** Ask the guest for fresh statistics this often (0 = only on request). */
  statsPollSeconds: number;
  deflateOnOom: boolean;
}

export interface VsockSpec {
  /** The guest's context ID (3..0xfffffffe; 0-2 are reserved, virtio 1.2 §5.10.4). */
  cid: number;
  /** Host unix socket: host programs connect here ("CONNECT <port>\n"); guest connections reach `${uds}_<port>`. */
  uds: string;
}

export interface DeviceSpecs {
  disks: DiskSpec[];
  nets: NetSpec[];
  rng: boolean;
  balloon?: BalloonSpec;
  vsock?: VsockSpec;
}

export function hasDevices(d: DeviceSpecs | undefined): d is DeviceSpecs {
  return d !== undefined && (d.disks.length > 0 || d.nets.length > 0 || d.rng || d.balloon !== undefined || d.vsock !== undefined);
}

const bad = (msg: string) => new TypevisorError("INVALID_DEVICE", msg);

function parseOptions(spec: string, flag: string, headIsOption = false): { head: string; opts: Map<string, string> } {
  const parts = spec.split(",");
  const head = headIsOption ? "" : (parts.shift() ?? "");
  const rest = parts;
  const opts = new Map<string, string>();
  for (const kv of rest) {
    const eq = kv.indexOf("=");
    if (eq <= 0) throw bad(`${flag} ${spec}: expected key=value, got "${kv}"`);
    const k = kv.slice(0, eq);
    if (opts.has(k)) throw bad(`${flag} ${spec}: "${k}" given twice`);
    opts.set(k, kv.slice(eq + 1));
  }
  return { head, opts };
}

function onOff(v: string, what: string): boolean {
  if (v === "on" || v === "true") return true;
  if (v === "off" || v === "false") return false;
  throw bad(`${what} must be on or off (got "${v}")`);
}

/**
 * `PATH[,format=raw|qcow2][,readonly=on][,serial=ID]`. `mayNotExist`: an incoming migration's
 * disk, which the migration creates when it copies the disks (migration/destination.ts).
 */
export function parseDiskSpec(spec: string, opts2: { mayNotExist?: boolean } = {}): DiskSpec {
  const { head: path, opts } = parseOptions(spec, "--disk");
  if (path === "") throw bad("--disk needs a path: --disk PATH[,format=raw|qcow2][,readonly=on][,serial=ID]");
  const disk: DiskSpec = { path, readonly: false };
  for (const [k, v] of opts) {
    if (k === "readonly") disk.readonly = onOff(v, "readonly");
    else if (k === "format") {
      if (v !== "raw" && v !== "qcow2") throw bad(`--disk format must be raw or qcow2 (got "${v}")`);
      disk.format = v;
    } else if (k === "serial") {
      if (!/^[\x20-\x7e]{1,20}$/.test(v)) throw bad(`--disk serial must be 1-20 printable ASCII characters (got "${v}")`);
      disk.serial = v;
    } else throw bad(`--disk: unknown option "${k}" (known: format, readonly, serial)`);
  }
  let size: number;
  if (opts2.mayNotExist === true && !existsSync(path)) return disk;
  try {
    const st = statSync(path);
    if (!st.isFile() && !st.isBlockDevice()) throw bad(`--disk ${path}: not a regular file or block device`);
    size = st.size;
  } catch (e) {
    if (e instanceof TypevisorError) throw e;
    throw new TypevisorError("FILE_NOT_FOUND", `--disk ${path}: ${(e as NodeJS.ErrnoException).code === "ENOENT" ? "no such file" : (e as Error).message}`);
  }
  // A qcow2 image's virtual size is its header's (checked when the VMM opens it), not the file's.
  if (disk.format !== "qcow2" && size % 512 !== 0) {
    throw new TypevisorError("DISK_SIZE", `--disk ${path}: size ${size} is not a multiple of 512 bytes (virtio-blk counts 512-byte sectors)`);
  }
  return disk;
}

/** `tap=NAME[,mac=MAC][,fd=N]` */
export function parseNetSpec(spec: string): NetSpec {
  const { opts } = parseOptions(spec, "--net", true);
  const tap = opts.get("tap");
  if (tap === undefined) throw bad("--net needs tap=NAME: --net tap=NAME[,mac=MAC]");
  const problem = tapNameProblem(tap);
  if (problem !== undefined) throw bad(`--net tap=${tap}: ${problem}`);
  const net: NetSpec = { tap };
  for (const [k, v] of opts) {
    if (k === "tap") continue;
    if (k === "mac") {
      parseMac(v); // throws NET_MAC with the reason
      net.mac = v;
    } else if (k === "fd") {
      // 0-2 are stdio; an fd is inherited from the process that started us (the daemon's sandbox).
      if (!/^\d{1,5}$/.test(v) || Number(v) < 3) throw bad(`--net fd must be a descriptor number from 3 (got "${v}")`);
      net.fd = Number(v);
    } else throw bad(`--net: unknown option "${k}" (known: tap, mac, fd)`);
  }
  return net;
}

/** `[stats=SECONDS][,deflate-on-oom=on|off]` (an empty spec takes the defaults: no polling, off). */
export function parseBalloonSpec(spec: string): BalloonSpec {
  const balloon: BalloonSpec = { statsPollSeconds: 0, deflateOnOom: false };
  if (spec === "") return balloon;
  const { opts } = parseOptions(spec, "--balloon", true);
  for (const [k, v] of opts) {
    if (k === "stats") {
      if (!/^\d{1,5}$/.test(v)) throw bad(`--balloon stats must be a whole number of seconds (got "${v}")`);
      balloon.statsPollSeconds = Number(v);
    } else if (k === "deflate-on-oom") balloon.deflateOnOom = onOff(v, "deflate-on-oom");
    else throw bad(`--balloon: unknown option "${k}" (known: stats, deflate-on-oom)`);
  }
  return balloon;
}

/** `cid=N[,uds=PATH]`; the default socket is `$XDG_RUNTIME_DIR/typevisor-vsock-<pid>.sock` or under /tmp. */
export function parseVsockSpec(spec: string, defaultUds: string): VsockSpec {
  const { opts } = parseOptions(spec, "--vsock", true);
  const cidText = opts.get("cid");
  if (cidText === undefined) throw bad("--vsock needs cid=N: --vsock cid=N[,uds=PATH]");
  if (!/^\d{1,10}$/.test(cidText) || Number(cidText) < 3 || Number(cidText) > 0xffff_fffe) {
    throw bad(`--vsock cid must be 3..4294967294 (0-2 are reserved for the hypervisor and host; got "${cidText}")`);
  }
  const uds = opts.get("uds") ?? defaultUds;
  const problem = unixPathProblem(uds);
  if (problem !== undefined) throw bad(`--vsock uds=${uds}: ${problem}`);
  for (const k of opts.keys()) if (k !== "cid" && k !== "uds") throw bad(`--vsock: unknown option "${k}" (known: cid, uds)`);
  return { cid: Number(cidText), uds };
}
